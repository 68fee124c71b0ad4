"""Tests for gradinv.data.text: the bundled corpus, tokenizers, user text files and the TextDataset."""

from __future__ import annotations

import json
import re
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch

from gradinv.data import text as text_module
from gradinv.data.text import (
    BUNDLED_CLASSES,
    GROUP_NAMES,
    MIN_BPE_VOCAB_SIZE,
    MODULE_FAMILIES,
    SPECIAL_TOKENS,
    TOPIC_GROUPS,
    BPETokenizer,
    TextDataset,
    TextTokenizer,
    WordTokenizer,
    _module_family,
    _stdlib_sources,
    _topic_group,
    bundled_sentences,
    bundled_tokenizer,
    load_text,
    load_tokenizer,
    split_sentences,
    stdlib_docstring_sentences,
)
from gradinv.errors import ConfigError, DataError

PROSE = (
    "The cat sat on the mat. The dog sat on the log! Did the cat see the dog? "
    "Yes, the cat saw the dog and the dog saw the cat.\n\n"
    "A second paragraph\nspans two lines. It ends here."
)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- sentences ----------------------------------------------------------------------------------------------------


def test_split_sentences_by_hand() -> None:
    assert split_sentences(PROSE) == [
        "The cat sat on the mat.",
        "The dog sat on the log!",
        "Did the cat see the dog?",
        "Yes, the cat saw the dog and the dog saw the cat.",
        "A second paragraph spans two lines.",
        "It ends here.",
    ]
    # no split before a lower-case word (abbreviations), closing quotes stay with their sentence
    assert split_sentences('Use e.g. this one. Then "stop." Done') == ["Use e.g. this one.", 'Then "stop."', "Done"]
    assert split_sentences(" \n\n \t") == []


def test_bundled_sentences_are_prose() -> None:
    corpus = bundled_sentences()
    assert corpus is bundled_sentences()  # cached
    sentences = [s for s, _ in corpus]
    assert len(set(sentences)) == len(sentences)
    assert {g for _, g in corpus} == set(range(len(GROUP_NAMES)))
    groups = [g for _, g in corpus]
    reference = groups.index(4)  # the language reference (groups 0..3) comes first, then the docstrings
    assert set(groups[:reference]) == {0, 1, 2, 3} and all(g >= 4 for g in groups[reference:])
    assert reference > 1000 and len(corpus) - reference > 5000  # Python 3.11: 2,512 and 11,179
    for s in sentences:
        assert ">>>" not in s and "::=" not in s and "\n" not in s and "  " not in s and "`" not in s
        assert not re.search(r"\*\w+\*", s)  # reST emphasis removed
    for s in sentences[reference:]:
        assert not re.search(r"[=\\{}|]|->", s)  # no code in the docstring part
    # most sentences are ordinary English: they start with a capital letter and end with a full stop or colon
    for part in (sentences[:reference], sentences[reference:]):
        proper = sum(bool(re.match(r"^[\"'(A-Z].*[.:?!]$", s)) for s in part)
        assert proper > 0.85 * len(part)


def test_topic_groups_cover_the_running_python_and_fall_back_by_name() -> None:
    from pydoc_data.topics import topics

    known = [t for t in topics if t in TOPIC_GROUPS]
    assert len(known) > 0.9 * len(topics)
    assert _topic_group("if", "") == 0 and _topic_group("typesseq", "") == 3
    assert _topic_group("typesnew", "") == 3
    assert _topic_group("newthing", 'The "match" statement\n*****\n') == 0
    assert _topic_group("newexpr", "Conditional expressions\n****\n") == 1
    assert _topic_group("newobj", "Coroutine objects\n****\n") == 2


def test_module_families_cover_the_running_python_and_fall_back_by_name() -> None:
    modules = {m for _, m in stdlib_docstring_sentences()}
    assert modules and modules <= set(MODULE_FAMILIES)  # every module with docstring prose is placed by hand
    assert set(MODULE_FAMILIES.values()) == {4, 5, 6, 7}
    assert _module_family("asyncio") == 7 and _module_family("json") == 5 and _module_family("pathlib") == 6
    assert _module_family("unittest") == 4
    # modules of other Python versions: the public twin of a private module, then words of the name
    assert _module_family("_pyjson") == 5 and _module_family("_threadpool") == 7
    assert _module_family("filelock") == 6 and _module_family("_pyrepl") == 4


def _write_source(root: Path, rel: str, source: str) -> None:
    _write(root / rel, textwrap.dedent(source))


def _small_library(root: Path) -> Path:
    """A made-up standard library: one module with every kind of docstring, a package, and skipped files."""
    _write_source(
        root,
        "zeta.py",
        '''
        """The zeta module computes special functions for the test.

        Example::

            zeta(2) == pi ** 2 / 6

        >>> zeta(2)
        1.6449340668482264
        This line follows the example and goes too.

        Use :func:`zeta` or ``zeta_fast`` for speed when the argument is large.
        """

        def zeta(s):
            """Return the value of the zeta function at s.

            x = f(y) is code that no sentence should keep
            """
            def inner():
                """The inner helper is documented as well, and nested."""

        if True:
            class Cache:
                """A cache that keeps every computed value around."""

                def get(self):
                    """Return the value of the zeta function at s."""
        ''',
    )
    _write_source(root, "alpha/__init__.py", '"""The alpha package groups a few helpers together."""\n')
    _write_source(root, "alpha/beta.py", '"""The beta module of the alpha package is read second."""\n')
    skipped_files = ("test/t.py", "idlelib/editor.py", "tkinter/ui.py", "lib2to3/fixer.py", "site-packages/x.py")
    for skipped in skipped_files:
        _write_source(root, skipped, '"""This text is in a folder that the corpus never reads."""\n')
    _write_source(root, "broken.py", '"""This file does not parse as Python source code."""\ndef (:\n')
    _write_source(root, "notes.txt", "Only Python sources are read, never other files like this one.\n")
    return root


def test_docstring_sentences_of_a_small_library(tmp_path: Path) -> None:
    root = _small_library(tmp_path / "lib")
    pairs = stdlib_docstring_sentences(root, cache_dir=tmp_path / "cache")
    assert pairs == (
        ("The alpha package groups a few helpers together.", "alpha"),  # sorted paths: alpha/ before zeta.py
        ("The beta module of the alpha package is read second.", "alpha"),
        ("The zeta module computes special functions for the test.", "zeta"),  # literal block and doctest gone
        ("Use zeta or zeta_fast for speed when the argument is large.", "zeta"),  # reST roles keep their text
        ("Return the value of the zeta function at s.", "zeta"),  # the code line is dropped, the repeat too
        ("The inner helper is documented as well, and nested.", "zeta"),
        ("A cache that keeps every computed value around.", "zeta"),
    )
    assert [parts for parts, _ in _stdlib_sources(root)] == [
        ("alpha", "__init__.py"),
        ("alpha", "beta.py"),
        ("broken.py",),
        ("zeta.py",),
    ]


def test_docstring_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _small_library(tmp_path / "lib")
    cache = tmp_path / "cache"
    first = stdlib_docstring_sentences(root, cache_dir=cache)
    (stored,) = cache.glob("stdlib-docstrings-*.json")

    def no_parsing(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached sentences should have been used")

    with monkeypatch.context() as patch:
        patch.setattr(text_module.ast, "parse", no_parsing)
        assert stdlib_docstring_sentences(root, cache_dir=cache) == first  # read back, not parsed
    stored.write_text("{damaged", encoding="utf-8")
    assert stdlib_docstring_sentences(root, cache_dir=cache) == first  # rebuilt
    assert json.loads(stored.read_text(encoding="utf-8"))["format"] == "gradinv.stdlib_docstrings"
    # a changed source is a new cache entry
    _write_source(root, "alpha/beta.py", '"""The beta module now says something else entirely."""\n')
    changed = stdlib_docstring_sentences(root, cache_dir=cache)
    assert changed[1] == ("The beta module now says something else entirely.", "alpha")
    assert len(list(cache.glob("stdlib-docstrings-*.json"))) == 2
    # a cache folder that cannot be made is no error
    blocker = _write(tmp_path / "file", "x")
    assert stdlib_docstring_sentences(root, cache_dir=blocker / "sub") == changed
    # $GRADINV_CACHE decides where the default cache lives
    monkeypatch.setenv("GRADINV_CACHE", str(tmp_path / "env"))
    assert stdlib_docstring_sentences(root) == changed
    assert len(list((tmp_path / "env" / "text").glob("stdlib-docstrings-*.json"))) == 1
    assert stdlib_docstring_sentences(tmp_path / "missing", cache_dir=cache) == ()


def test_docstring_corpus_is_deterministic(tmp_path: Path) -> None:
    """Parsing the running Python's library again, without the cache, gives the same sentences in the same
    (sorted file) order."""
    fresh = stdlib_docstring_sentences(cache_dir=tmp_path)
    assert fresh == stdlib_docstring_sentences()
    modules = [m for _, m in fresh]
    assert modules == sorted(modules)
    seen = {s for s, g in bundled_sentences() if g < 4}
    assert [s for s, _ in bundled_sentences()[len(seen) :]] == [s for s, _ in fresh if s not in seen]


# --- the word tokenizer ------------------------------------------------------------------------------------------


def test_word_tokenizer_ranks_by_frequency_then_alphabet() -> None:
    tok = WordTokenizer.train(["b a c a", "B; c d"], vocab_size=8)
    # counts: a 2, b 2, c 2, d 1, ; 1  -> ties broken alphabetically (";" sorts before "d")
    assert tok.vocab == (*SPECIAL_TOKENS, "a", "b", "c", ";")
    assert tok.vocab_size == 8
    assert tok.encode("A d b") == [4, 1, 5]  # "d" did not make the cut: <unk>
    assert tok.encode("a", bos=True, eos=True) == [2, 4, 3]
    assert WordTokenizer.train(["x y z"], vocab_size=100).vocab_size == 7  # capped by the distinct tokens
    assert isinstance(tok, TextTokenizer)


def test_word_tokenizer_roundtrip_and_detokenize() -> None:
    text = 'The "if" statement (see below) is built-in, isn\'t it?'
    tok = WordTokenizer.train([text], vocab_size=100)
    assert tok.tokenize(text) == [
        "the", '"', "if", '"', "statement", "(", "see", "below", ")", "is", "built", "-", "in", ",", "isn't", "it", "?",
    ]  # fmt: skip
    assert tok.decode(tok.encode(text)) == text.lower()
    assert tok.decode(torch.tensor(tok.encode(text, bos=True, eos=True) + [0, 0])) == text.lower()
    assert tok.decode([2, 1, 3], skip_special=False) == "<bos> <unk> <eos>"
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_word_tokenizer_save_load(tmp_path: Path) -> None:
    tok = WordTokenizer.train([PROSE], vocab_size=20)
    path = tmp_path / "tok.json"
    tok.save(path)
    assert WordTokenizer.load(path) == tok
    assert load_tokenizer(path) == tok
    assert WordTokenizer.from_json(tok.to_json()).vocab == tok.vocab
    _write(tmp_path / "bad.json", "{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        WordTokenizer.load(tmp_path / "bad.json")
    _write(tmp_path / "other.json", json.dumps({"format": "x"}))
    with pytest.raises(DataError, match="no known tokenizer"):
        load_tokenizer(tmp_path / "other.json")
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="special tokens"):
        WordTokenizer(["a", "b"])
    with pytest.raises(ConfigError, match="repeated"):
        WordTokenizer([*SPECIAL_TOKENS, "a", "a"])
    with pytest.raises(ConfigError, match="vocabulary size 3 is out of range"):
        WordTokenizer.train([PROSE], vocab_size=3)


def test_bundled_vocabulary() -> None:
    tok = bundled_tokenizer(5000)
    assert tok is bundled_tokenizer(5000)  # trained once per process
    assert tok.vocab_size == 5000  # the GPT-2 vocabulary of at least 5,000 tokens
    distinct = Counter(t for s, _ in bundled_sentences() for t in WordTokenizer.tokenize(s))
    assert len(distinct) > 7000  # Python 3.11: 8,350
    large = bundled_tokenizer(8000)
    assert large.vocab_size == min(8000, len(SPECIAL_TOKENS) + len(distinct))
    assert large.vocab[:5000] == tok.vocab  # the same ranking, cut later
    reference = Counter(t for s, g in bundled_sentences() if g < 4 for t in WordTokenizer.tokenize(s))
    assert len(reference) < 5000  # the docstrings are what takes the vocabulary past 5,000
    small = bundled_tokenizer(500)
    assert small.vocab_size == 500 and small.vocab[4:8] == tok.vocab[4:8]


# --- the bundled source -----------------------------------------------------------------------------------------


def test_load_bundled_text() -> None:
    ds = load_text("text", seq_len=16, vocab_size=5000)
    assert isinstance(ds, TextDataset)
    n = len(ds)
    assert n > 4000 and ds.tokens.shape == (n, 16) and ds.tokens.dtype == torch.int64  # Python 3.11: 5,912
    assert ds.labels.shape == (n,) and ds.num_classes == 2
    assert ds.class_names == ("language and tools", "data, files and network")
    assert ds.tokenizer is bundled_tokenizer(5000) and ds.vocab_size == 5000
    assert len(torch.unique(ds.tokens)) > 4000  # the rows use most of the vocabulary
    assert len(ds.texts) == n and ds.seq_len == 16 and ds.vocab_size == ds.tokenizer.vocab_size
    assert int(ds.tokens.min()) >= 0 and not (ds.tokens == 0).any()  # truncation: no padding anywhere
    assert len({tuple(r) for r in ds.tokens.tolist()}) == n  # no repeated rows
    counts = torch.bincount(ds.labels, minlength=2)
    assert counts.min() > 0.3 * n  # both classes well represented
    # each row is the start of its sentence
    for i in range(0, n, 97):
        assert ds.tokens[i].tolist() == ds.tokenizer.encode(ds.texts[i])[:16]
    again = load_text("text", seq_len=16)
    assert torch.equal(again.tokens, ds.tokens) and torch.equal(again.labels, ds.labels)
    assert "sequences=" in repr(ds)


@pytest.mark.parametrize("num_classes", [2, 3, 4, 8])
def test_bundled_labels_are_the_topic_groups_and_module_families(num_classes: int) -> None:
    ds = load_text("text", seq_len=12, num_classes=num_classes)
    group_of = dict(bundled_sentences())
    group_to_class = {g: c for c, (_, groups) in enumerate(BUNDLED_CLASSES[num_classes]) for g in groups}
    expected = [group_to_class[group_of[t]] for t in ds.texts]
    assert ds.labels.tolist() == expected
    assert set(ds.labels.tolist()) == set(range(num_classes))


def test_bundled_options_and_errors() -> None:
    longer = load_text("text", seq_len=32)
    assert longer.tokens.shape[1] == 32 and len(longer) < len(load_text("text", seq_len=16))
    assert len(longer) > 1000  # Python 3.11: 1,288
    assert min(torch.bincount(longer.labels).tolist()) > 0.3 * len(longer)
    padded = load_text("text", seq_len=32, fit="pad")
    assert len(padded) > len(longer) and (padded.tokens == 0).any()
    # padding only at the end of a row
    rows = padded.tokens.tolist()
    assert all(r[r.index(0) :] == [0] * (32 - r.index(0)) for r in rows if 0 in r)
    small = load_text("text", seq_len=8, vocab_size=100)
    assert small.vocab_size == 100 and (small.tokens == 1).any()  # rare words become <unk>
    with pytest.raises(ConfigError, match=r"has 2, 3, 4, 8 classes .*num_classes=5"):
        load_text("text", num_classes=5)
    with pytest.raises(ConfigError, match="seq_len 1 is out of range"):
        load_text("text", seq_len=1)
    with pytest.raises(ConfigError, match="seq_len 5000 is out of range"):
        load_text("text", seq_len=5000)
    with pytest.raises(ConfigError, match="seq_len must be an integer"):
        load_text("text", seq_len=16.0)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"no sentence .* has 1000 tokens .*fit='pad'"):
        load_text("text", seq_len=1000)
    with pytest.raises(ConfigError, match="vocabulary size 4 is out of range"):
        load_text("text", vocab_size=4)
    with pytest.raises(ConfigError, match="unknown fit"):
        load_text("text", fit="pack")
    with pytest.raises(ConfigError, match="unknown tokenizer"):
        load_text("text", tokenizer="chars")
    with pytest.raises(ConfigError, match="tokenizer must be"):
        load_text("text", tokenizer=object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="name or a path"):
        load_text(3)  # type: ignore[arg-type]


def test_sample() -> None:
    ds = load_text("text", seq_len=16)
    tokens, labels = ds.sample(6, seed=3)
    assert tokens.shape == (6, 16) and labels.shape == (6,)
    again, _ = ds.sample(6, seed=3)
    assert torch.equal(tokens, again)
    assert not torch.equal(tokens, ds.sample(6, seed=4)[0])
    assert len({tuple(r) for r in tokens.tolist()}) == 6
    rows = {tuple(r): i for i, r in enumerate(ds.tokens.tolist())}
    assert all(int(ds.labels[rows[tuple(r)]]) == int(y) for r, y in zip(tokens.tolist(), labels, strict=True))
    _, distinct = ds.sample(2, seed=0, distinct_labels=True)
    assert sorted(distinct.tolist()) == [0, 1]
    with pytest.raises(ConfigError, match="distinct labels needs 3 classes"):
        ds.sample(3, seed=0, distinct_labels=True)
    with pytest.raises(ConfigError, match="larger than text source"):
        ds.sample(len(ds) + 1, seed=0)
    with pytest.raises(ConfigError, match="positive integer"):
        ds.sample(0, seed=0)
    assert ds.decode(tokens)[0] == ds.tokenizer.decode(tokens[0])


# --- synthetic ----------------------------------------------------------------------------------------------------


def test_synthetic() -> None:
    ds = load_text("synthetic", seq_len=8, vocab_size=50, num_classes=3, num_samples=40, seed=1)
    assert ds.tokens.shape == (40, 8) and ds.vocab_size == 50 and ds.num_classes == 3
    assert int(ds.tokens.min()) >= len(SPECIAL_TOKENS) and int(ds.tokens.max()) < 50
    assert int(ds.labels.max()) < 3
    assert torch.equal(ds.tokens, load_text("synthetic", seq_len=8, vocab_size=50, num_samples=40, seed=1).tokens)
    assert not torch.equal(ds.tokens, load_text("synthetic", seq_len=8, vocab_size=50, num_samples=40, seed=2).tokens)
    assert ds.texts[0] == ds.tokenizer.decode(ds.tokens[0])
    assert load_text("synthetic").num_classes == 2
    with pytest.raises(ConfigError, match="num_samples 0 is out of range"):
        load_text("synthetic", num_samples=0)
    with pytest.raises(ConfigError, match="placeholder"):
        load_text("synthetic", tokenizer="bpe")


# --- the user's text ------------------------------------------------------------------------------------------------


def test_load_txt_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "story.txt", PROSE)
    ds = load_text(path, seq_len=6)
    # sentences of >= 6 tokens: the first four ("The cat sat on the mat." has 7 tokens) and the paragraph one
    assert len(ds) == 5 and ds.tokens.shape == (5, 6)
    assert ds.num_classes == 1 and ds.class_names == ("story",) and ds.labels.tolist() == [0] * 5
    assert ds.decode(ds.tokens[:1]) == ["the cat sat on the mat"]
    assert ds.vocab_size == len(SPECIAL_TOKENS) + len(set(WordTokenizer.tokenize(PROSE)))  # trained on the file
    padded = load_text(path, seq_len=12, fit="pad")
    assert len(padded) == 6 and padded.tokens[-1].tolist()[-8:] == [0] * 8  # "it ends here." = 4 tokens
    wider = load_text(path, seq_len=6, num_classes=3)
    assert wider.num_classes == 3 and wider.class_names == ("story", "unused 1", "unused 2")
    given = load_text(str(path), seq_len=6, tokenizer=bundled_tokenizer(5000))
    assert given.tokenizer is bundled_tokenizer(5000)


def test_load_txt_folders(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    _write(flat / "a.txt", "One two three four five six. Seven eight nine ten eleven twelve.")
    _write(flat / "b.txt", "Thirteen fourteen fifteen sixteen seventeen eighteen.")
    _write(flat / "notes.md", "ignored")
    ds = load_text(flat, seq_len=5)
    assert len(ds) == 3 and ds.class_names == ("flat",)
    classes = tmp_path / "classes"
    _write(classes / "neg" / "x.txt", "This film was dull and far too long.")
    _write(classes / "pos" / "y.txt", "This film was bright and never too long. I loved every minute of it.")
    ds = load_text(classes, seq_len=5)
    assert ds.class_names == ("neg", "pos") and ds.labels.tolist() == [0, 1, 1]
    with pytest.raises(ConfigError, match="has 2 classes but num_classes=1"):
        load_text(classes, seq_len=5, num_classes=1)
    _write(classes / "loose.txt", "A loose file.")
    with pytest.raises(DataError, match="both .txt files and class sub-folders"):
        load_text(classes, seq_len=5)


def test_user_text_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is empty: put some sentences in it"):
        load_text(_write(tmp_path / "empty.txt", "  \n\n"))
    (tmp_path / "none").mkdir()
    _write(tmp_path / "none" / "image.png", "x")
    with pytest.raises(DataError, match="has no .txt files"):
        load_text(tmp_path / "none")
    _write(tmp_path / "blank" / "a.txt", "")
    with pytest.raises(DataError, match="are empty"):
        load_text(tmp_path / "blank")
    with pytest.raises(DataError, match="does not exist"):
        load_text(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="is not a .txt file"):
        load_text(_write(tmp_path / "data.csv", "a,b"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_text(tmp_path / "latin1.txt")
    with pytest.raises(DataError, match="the longest has 4"):
        load_text(_write(tmp_path / "short.txt", "Too short here."), seq_len=8)
    with pytest.raises(DataError, match="is empty"):
        load_text(_write(tmp_path / "spaces.txt", "\u00a0\u2003\n"), seq_len=2)  # Unicode spaces only


class _Silent:
    """A tokenizer that knows no token at all (any object with these members is accepted)."""

    pad_id = 0
    vocab_size = 10

    def encode(self, text: str) -> list[int]:
        return []

    def decode(self, ids: object) -> str:
        return ""


def test_custom_tokenizer_object(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.txt", PROSE)
    with pytest.raises(DataError, match="has no tokens"):
        load_text(path, seq_len=2, tokenizer=_Silent())


def test_dataset_validation() -> None:
    tok = WordTokenizer.train(["a b c d"], vocab_size=8)
    good = {"tokens": torch.tensor([[4, 5]]), "labels": torch.tensor([0]), "tokenizer": tok, "texts": ("a b",)}
    ds = TextDataset(**good, num_classes=2)
    assert ds.class_names == ("0", "1")
    with pytest.raises(DataError, match="int64 \\(N, L\\)"):
        TextDataset(**{**good, "tokens": torch.tensor([4, 5])}, num_classes=2)
    with pytest.raises(DataError, match="do not fit the tokenizer"):
        TextDataset(**{**good, "tokens": torch.tensor([[4, 8]])}, num_classes=2)
    with pytest.raises(DataError, match="labels must lie in 0..1"):
        TextDataset(**{**good, "labels": torch.tensor([2])}, num_classes=2)
    with pytest.raises(DataError, match="1 sequences but 2 texts"):
        TextDataset(**{**good, "texts": ("a", "b")}, num_classes=2)
    with pytest.raises(DataError, match="2 class names"):
        TextDataset(**good, num_classes=1, class_names=("x", "y"))


# --- BPE ---------------------------------------------------------------------------------------------------------


def test_bpe_tokenizer(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    texts = split_sentences(PROSE) * 3
    tok = BPETokenizer.train(texts, vocab_size=MIN_BPE_VOCAB_SIZE + 20)
    assert tok.vocab_size <= MIN_BPE_VOCAB_SIZE + 20
    again = BPETokenizer.train(texts, vocab_size=MIN_BPE_VOCAB_SIZE + 20)  # training is deterministic
    assert again.to_json() == tok.to_json() and again.encode_batch(texts) == [tok.encode(s) for s in texts]
    ids = tok.encode("The cat saw the mat!")
    assert tok.decode(ids) == "the cat saw the mat!"
    framed = tok.encode("the cat", bos=True, eos=True)
    assert framed == [2, *tok.encode("the cat"), 3] and tok.decode(framed) == "the cat"
    tok.save(tmp_path / "bpe.json")
    loaded = load_tokenizer(tmp_path / "bpe.json")
    assert isinstance(loaded, BPETokenizer) and loaded.encode("the cat") == tok.encode("the cat")
    with pytest.raises(ConfigError, match="vocabulary size 100 is out of range"):
        BPETokenizer.train(texts, vocab_size=100)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        tok.decode([10_000])
    ds = load_text("text", seq_len=16, tokenizer="bpe", vocab_size=1000)
    assert ds.vocab_size == 1000 and isinstance(ds.tokenizer, BPETokenizer) and not (ds.tokens == 0).any()
    assert ds.tokenizer is bundled_tokenizer(1000, "bpe")


def test_bpe_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(ConfigError, match=r"pip install gradinv\[text\]"):
        BPETokenizer.train(["a b"], vocab_size=300)
