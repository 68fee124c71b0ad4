"""Text data for attacks on language models: a bundled English corpus, tokenizers and fixed-length sequences.

>>> ds = load_text("text", seq_len=16)
>>> tokens, labels = ds.sample(4, seed=0)  # (4, 16) token ids, (4,) class labels

Sources (all offline):

* ``"text"``: English prose that every Python ships in its standard library, in two parts, both cleaned the
  same way (grammar rules, interactive examples, code and literal blocks, tables and headings removed,
  whitespace collapsed, prose split into sentences):

  1. the language reference (``pydoc_data.topics``: one documentation text per help topic), each sentence
     in the *group of help topics* it comes from (:data:`TOPIC_GROUPS`: statements, expressions, data model,
     built-in types);
  2. the docstrings of the standard library's pure-Python modules (:func:`stdlib_docstring_sentences`):
     the ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` are parsed with :mod:`ast` in sorted path
     order, never imported (tests, ``idlelib``, ``tkinter``, ``lib2to3``, ``site-packages``, codec tables and
     files that do not parse are skipped); reST roles and backticks keep their text, and only sentences that
     read as English are kept (:func:`_is_prose_sentence`). Each sentence is in the *family* of its top-level
     module (:data:`MODULE_FAMILIES`: development tools, data and text, files and system, network and
     concurrency).

  The eight groups (:data:`GROUP_NAMES`) are merged into ``num_classes`` of 2, 3, 4 or 8 classes
  (:data:`BUNDLED_CLASSES`), so a text classifier has a real task: telling apart, say, prose about the
  language and its tools from prose about files and networks. The parsed docstrings are cached on disk
  (``$GRADINV_CACHE/text`` or ``~/.cache/gradinv/text``, keyed by the Python version and the sources' sizes
  and times), so only the first load on a machine parses the library: about 2 s of CPU on Python 3.11, then
  about 0.2 s. The text is the one of the running Python, so counts differ between Python versions (Python
  3.11: 13,691 distinct sentences, 2,512 of them from the language reference, and 8,350 distinct
  word/punctuation tokens, so a word vocabulary of up to 8,354 entries; 5,912 sequences of 16 tokens and
  1,288 of 32). Without the modules that Python 3.12 and 3.13 removed (``distutils``, ``asyncore``, ``cgi``...)
  8,104 and 8,005 distinct tokens would remain (counted on 3.11), so a 5,000-token vocabulary should stay full.
* a ``.txt`` file (UTF-8), a flat folder of ``.txt`` files (one class), or a folder with one sub-folder of
  ``.txt`` files per class (sorted sub-folder names are the classes): paragraphs are separated by blank
  lines, split into sentences, and the tokenizer is trained on these sentences unless one is given.
* ``"synthetic"``: uniformly random token ids (never the special tokens) and random labels from a seeded
  generator, for tests.

Every row is exactly ``seq_len`` tokens, without ``<bos>``/``<eos>``. With ``fit="truncate"`` (the default)
only sentences of at least ``seq_len`` tokens are kept and cut to their first ``seq_len`` tokens, so no row
holds padding (attacks see natural text at every position); with ``fit="pad"`` every non-empty sentence is
kept, cut or right-padded with ``<pad>``. Rows whose token ids repeat an earlier row are dropped (first
occurrence kept), so a batch never holds two identical sequences.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import gc
import hashlib
import itertools
import json
import os
import re
import sys
import sysconfig
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from gradinv.errors import ConfigError, DataError

__all__ = [
    "BUNDLED_CLASSES",
    "FITS",
    "GROUP_NAMES",
    "MAX_SEQ_LEN",
    "MAX_VOCAB_SIZE",
    "MIN_BPE_VOCAB_SIZE",
    "MIN_SEQ_LEN",
    "MIN_VOCAB_SIZE",
    "MODULE_FAMILIES",
    "SPECIAL_TOKENS",
    "TEXT_SOURCES",
    "TOPIC_GROUPS",
    "BPETokenizer",
    "TextDataset",
    "TextTokenizer",
    "WordTokenizer",
    "bundled_sentences",
    "bundled_tokenizer",
    "load_text",
    "load_tokenizer",
    "split_sentences",
    "stdlib_docstring_sentences",
]

#: Special tokens, at ids 0..3 in every tokenizer of this module.
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<bos>", "<eos>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

MIN_SEQ_LEN = 2  # a next-token loss needs two positions
MAX_SEQ_LEN = 1024
MIN_VOCAB_SIZE = 8  # the 4 special tokens and at least 4 words
MIN_BPE_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # byte-level BPE starts from all 256 bytes
MAX_VOCAB_SIZE = 1_000_000

#: How sentences are made exactly ``seq_len`` tokens long (see the module docstring).
FITS: tuple[str, ...] = ("truncate", "pad")

#: Named text sources and one-line summaries (any ``.txt`` file or folder of them also works).
TEXT_SOURCES: dict[str, str] = {
    "text": "English prose of the Python language reference (stdlib pydoc_data.topics) and of the standard "
    "library's docstrings, 2, 3, 4 or 8 classes by topic group and module family",
    "synthetic": "uniformly random token ids and labels from a seeded generator (for tests)",
}

# ---------------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------------

#: Words (letters, digits, underscores, with inner apostrophes: "don't") or one punctuation character.
_TOKEN_RE = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")
_CLOSERS = frozenset(".,;:!?%)]}”’")
_OPENERS = frozenset("([{“‘")


def _detokenize(words: Sequence[str]) -> str:
    """Words joined by spaces, except before closing and after opening punctuation, around ``-``, and inside
    double quotes (taken as alternately opening and closing)."""
    parts: list[str] = []
    glue_next = True  # no space before the first word
    quote_open = False
    for word in words:
        glue = glue_next
        glue_next = False
        if word == '"':
            if quote_open:
                glue = True
            else:
                glue_next = True
            quote_open = not quote_open
        elif word in _CLOSERS:
            glue = True
        elif word in _OPENERS:
            glue_next = True
        elif word == "-":
            glue = glue_next = True
        parts.append(word if glue else " " + word)
    return "".join(parts)


@runtime_checkable
class TextTokenizer(Protocol):
    """What :func:`load_text` and the text attacks need from a tokenizer."""

    pad_id: int

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int] | Tensor) -> str: ...


def _ids_list(ids: Iterable[int] | Tensor) -> list[int]:
    if isinstance(ids, Tensor):
        if ids.dim() > 1:
            raise ConfigError(f"decode takes one sequence of token ids, got a tensor of shape {tuple(ids.shape)}")
        return [int(i) for i in ids.detach().cpu().tolist()]
    return [int(i) for i in ids]


def _check_vocab_size(vocab_size: object, *, minimum: int = MIN_VOCAB_SIZE) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ConfigError(f"vocabulary size must be an integer, got {vocab_size!r}")
    if not minimum <= vocab_size <= MAX_VOCAB_SIZE:
        raise ConfigError(
            f"vocabulary size {vocab_size} is out of range: use {minimum} to {MAX_VOCAB_SIZE:,} "
            f"({len(SPECIAL_TOKENS)} special tokens included)"
        )
    return vocab_size


class WordTokenizer:
    """Lower-cased word/punctuation tokenizer with a frequency-ranked vocabulary (own code).

    Text is lower-cased and split by a regular expression into words (``\\w+`` with inner apostrophes) and
    single punctuation characters. The vocabulary is ``<pad>, <unk>, <bos>, <eos>`` (ids 0..3) followed by the
    most frequent training tokens, ties broken alphabetically, so training is deterministic. Unknown tokens
    encode to ``<unk>``. ``decode`` joins tokens with spaces, less the spaces next to punctuation, so it inverts
    ``encode`` up to case and spacing.
    """

    pad_id = PAD_ID
    unk_id = UNK_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, vocab: Sequence[str]) -> None:
        vocab = tuple(vocab)
        if vocab[: len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
            raise ConfigError(f"a word vocabulary must start with the special tokens {', '.join(SPECIAL_TOKENS)}")
        if not all(isinstance(t, str) and t for t in vocab):
            raise ConfigError("every vocabulary entry must be a non-empty string")
        if len(set(vocab)) != len(vocab):
            raise ConfigError("the vocabulary has repeated tokens: give each token once")
        self._vocab = vocab
        self._index = {t: i for i, t in enumerate(vocab)}

    @staticmethod
    def tokenize(text: str) -> list[str]:
        """The lower-cased word and punctuation tokens of ``text``."""
        return _TOKEN_RE.findall(text.lower())

    @classmethod
    def train(cls, texts: Iterable[str], *, vocab_size: int) -> WordTokenizer:
        """Vocabulary of the ``vocab_size - 4`` most frequent tokens of ``texts`` (fewer if the texts have
        fewer distinct tokens; ``vocab_size`` counts the 4 special tokens)."""
        vocab_size = _check_vocab_size(vocab_size)
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(cls.tokenize(text))
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        return cls(SPECIAL_TOKENS + tuple(t for t, _ in ranked[: vocab_size - len(SPECIAL_TOKENS)]))

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def vocab(self) -> tuple[str, ...]:
        """Tokens by id."""
        return self._vocab

    def token_to_id(self, token: str) -> int:
        return self._index.get(token, UNK_ID)

    def id_to_token(self, index: int) -> str:
        if not 0 <= index < len(self._vocab):
            raise ConfigError(f"token id {index} is outside the vocabulary 0..{len(self._vocab) - 1}")
        return self._vocab[index]

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``, optionally framed by ``<bos>``/``<eos>``."""
        ids = [self._index.get(t, UNK_ID) for t in self.tokenize(text)]
        return ([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else [])

    def decode(self, ids: Iterable[int] | Tensor, *, skip_special: bool = True) -> str:
        """Text of token ids; ``<pad>``, ``<bos>`` and ``<eos>`` are left out unless ``skip_special=False``."""
        skip = {PAD_ID, BOS_ID, EOS_ID} if skip_special else set()
        return _detokenize([self.id_to_token(i) for i in _ids_list(ids) if i not in skip])

    def to_json(self) -> str:
        return json.dumps({"format": "gradinv.WordTokenizer", "version": 1, "vocab": list(self._vocab)})

    @classmethod
    def from_json(cls, text: str) -> WordTokenizer:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"the tokenizer file is not valid JSON ({exc.msg}): save it again") from None
        if not isinstance(data, dict) or data.get("format") != "gradinv.WordTokenizer":
            raise DataError("the tokenizer file is not a gradinv WordTokenizer: save it with WordTokenizer.save")
        vocab = data.get("vocab")
        if not isinstance(vocab, list):
            raise DataError("the tokenizer file has no 'vocab' list: save it again with WordTokenizer.save")
        try:
            return cls(vocab)
        except ConfigError as exc:
            raise DataError(f"the tokenizer file's vocabulary is invalid: {exc}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        return cls.from_json(_read_tokenizer_file(path))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WordTokenizer) and other._vocab == self._vocab

    def __hash__(self) -> int:
        return hash(self._vocab)

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size})"


def _read_tokenizer_file(path: str | Path) -> str:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"tokenizer file '{path}' does not exist: give the path of a saved tokenizer (.json)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"tokenizer file '{path}' is not UTF-8 JSON: save the tokenizer again") from None


def _require_tokenizers():  # noqa: ANN202 - returns the optional module
    try:
        import tokenizers
    except ImportError:
        raise ConfigError(
            "the BPE tokenizer needs the Hugging Face `tokenizers` package: pip install gradinv[text]"
        ) from None
    return tokenizers


class BPETokenizer:
    """Byte-level BPE (Sennrich et al., ACL 2016; GPT-2's byte-level variant, Radford et al. 2019) trained
    with the Hugging Face ``tokenizers`` package (optional: ``pip install gradinv[text]``).

    Text is lower-cased like :class:`WordTokenizer`; the special tokens take ids 0..3. Byte-level BPE never
    needs ``<unk>``. Training is deterministic for the same texts.
    """

    pad_id = PAD_ID
    unk_id = UNK_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, tokenizer: object) -> None:
        lib = _require_tokenizers()
        if not isinstance(tokenizer, lib.Tokenizer):
            raise ConfigError(f"BPETokenizer wraps a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        for i, special in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(special) != i:
                raise ConfigError(f"a BPE tokenizer must have {special} at id {i}: train it with BPETokenizer.train")
        self._tok = tokenizer

    @classmethod
    def train(cls, texts: Iterable[str], *, vocab_size: int) -> BPETokenizer:
        """Learn up to ``vocab_size`` tokens (special tokens and the 256 bytes included) from ``texts``."""
        vocab_size = _check_vocab_size(vocab_size, minimum=MIN_BPE_VOCAB_SIZE)
        lib = _require_tokenizers()
        tok = lib.Tokenizer(lib.models.BPE(unk_token="<unk>"))
        tok.normalizer = lib.normalizers.Lowercase()
        tok.pre_tokenizer = lib.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = lib.decoders.ByteLevel()
        trainer = lib.trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=lib.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(list(texts), trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        return ([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else [])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts at once (parallel in the Rust library)."""
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int] | Tensor, *, skip_special: bool = True) -> str:
        ids = _ids_list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ConfigError(f"token id {bad[0]} is outside the vocabulary 0..{self.vocab_size - 1}")
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def to_json(self) -> str:
        return self._tok.to_str()

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        lib = _require_tokenizers()
        try:
            tok = lib.Tokenizer.from_str(text)
        except Exception as exc:  # the Rust side raises a plain Exception
            raise DataError(f"the tokenizer file is not a tokenizers JSON file ({exc}): save it again") from None
        try:
            return cls(tok)
        except ConfigError as exc:
            raise DataError(f"the tokenizer file does not fit: {exc}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        return cls.from_json(_read_tokenizer_file(path))

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def load_tokenizer(path: str | Path) -> WordTokenizer | BPETokenizer:
    """A tokenizer saved by :meth:`WordTokenizer.save` or :meth:`BPETokenizer.save`."""
    text = _read_tokenizer_file(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"tokenizer file '{path}' is not valid JSON ({exc.msg}): save it again") from None
    if isinstance(data, dict) and data.get("format") == "gradinv.WordTokenizer":
        return WordTokenizer.from_json(text)
    if isinstance(data, dict) and "model" in data:
        return BPETokenizer.from_json(text)
    raise DataError(f"tokenizer file '{path}' holds no known tokenizer: save one with WordTokenizer/BPETokenizer")


# ---------------------------------------------------------------------------------------------------------------
# Sentences
# ---------------------------------------------------------------------------------------------------------------

#: A sentence ends at . ? or ! (closing quotes/brackets allowed) followed by space and a capital letter.
_SENTENCE_END = re.compile(r"(?<=[.?!])([\"'”’)\]]*)\s+(?=[\"'“‘(\[]?[A-Z])")
_WHITESPACE = re.compile(r"\s+")


def split_sentences(text: str) -> list[str]:
    """Sentences of plain text: paragraphs (separated by blank lines) are joined into one line each, runs of
    whitespace collapsed, and split after ``.``, ``?`` or ``!`` that is followed by a capital letter."""
    sentences: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        joined = _WHITESPACE.sub(" ", paragraph).strip()
        if joined:
            sentences.extend(_split_paragraph(joined))
    return sentences


def _split_paragraph(text: str) -> list[str]:
    out: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        end = match.start() + len(match.group(1))
        out.append(text[start:end].strip())
        start = match.end()
    out.append(text[start:].strip())
    return [s for s in out if s]


# --- the bundled corpus ----------------------------------------------------------------------------------------

#: Groups of ``pydoc_data.topics`` help topics, by group index. Topics of other Python versions that are not
#: listed fall into a group by :func:`_topic_group`'s rules.
_GROUP_TOPICS: tuple[tuple[str, ...], ...] = tuple(
    tuple(names.split())
    for names in (
        # 0: statements (simple and compound) and the execution model
        "assert assignment async augassign break class compound continue del else for function global if import "
        "nonlocal pass raise return try while with yield execmodel naming exceptions dynamic-features",
        # 1: expressions, operators, literals and lexical analysis
        "atom-identifiers atom-literals attribute-references await binary bitwise booleans calls comparisons "
        "conversions dict exprlists floating formatstrings id-classes identifiers imaginary in integers lambda "
        "lists numbers operator-summary power shifting slicings strings subscriptions unary",
        # 2: the data model: objects, the standard type hierarchy, special methods
        "attribute-access callable-types context-managers customization numeric-types objects sequence-types "
        "specialattrs specialnames types",
        # 3: built-in types and library: methods of str, list, dict..., truth testing, the pdb debugger
        "bltin-code-objects bltin-ellipsis-object bltin-null-object bltin-type-objects debugger string-methods "
        "truth typesfunctions typesmapping typesmethods typesmodules typesseq typesseq-mutable",
    )
)

#: Group index of each known help topic.
TOPIC_GROUPS: dict[str, int] = {topic: g for g, topics in enumerate(_GROUP_TOPICS) for topic in topics}

#: Names of the corpus groups: 0..3 are the ``pydoc_data.topics`` topic groups (:data:`TOPIC_GROUPS`), 4..7
#: the families of standard-library modules whose docstrings the rest of the corpus comes from
#: (:data:`MODULE_FAMILIES`).
GROUP_NAMES: tuple[str, ...] = (
    "statements",
    "expressions",
    "data model",
    "built-in types",
    "development tools",
    "data and text",
    "files and system",
    "network and concurrency",
)

#: Module families (groups 4..7) by top-level standard-library module or package, after the chapters of the
#: Python Library Reference. Modules of other Python versions that are not listed fall into a family by
#: :func:`_module_family`'s rules.
_FAMILY_MODULES: tuple[tuple[str, ...], ...] = tuple(
    tuple(names.split())
    for names in (
        # 4: development tools: runtime and language services, importing, debugging, profiling, testing,
        # packaging
        "__future__ __hello__ __phello__ _aix_support _osx_support _sitebuiltins abc antigravity ast bdb cProfile "
        "code codeop compileall contextlib dataclasses dis distutils doctest ensurepip gc importlib imp inspect "
        "keyword linecache modulefinder opcode pdb pkgutil profile pstats py_compile pyclbr pydoc rlcompleter runpy "
        "site symtable sysconfig tabnanny this timeit token tokenize trace traceback tracemalloc types typing "
        "unittest venv warnings zipapp zipimport",
        # 5: data and text: text processing, binary data, data types, numbers, functional programming,
        # persistence, file formats, markup, cryptography, internationalisation, command-line parsing
        "_collections_abc _compat_pickle _markupbase _py_abc _pydecimal _strptime _weakrefset argparse array "
        "bisect calendar cmd codecs collections colorsys configparser copy copyreg csv datetime decimal difflib "
        "enum fractions functools getopt gettext graphlib hashlib heapq hmac html json locale math netrc numbers "
        "operator optparse pickle pickletools plistlib pprint random re reprlib secrets shlex sre_compile "
        "sre_constants sre_parse statistics string stringprep struct textwrap tomllib weakref xdrlib xml zoneinfo",
        # 6: files and system: file and directory access, compression and archives, operating-system services,
        # persistence in files, multimedia and terminal
        "_bootsubprocess _compression _pyio aifc bz2 chunk crypt ctypes curses dbm filecmp fileinput fnmatch "
        "genericpath getpass glob gzip imghdr io logging lzma ntpath os pathlib pipes platform posixpath pty "
        "shelve shutil sndhdr sqlite3 stat sunau tarfile tempfile tty turtle wave zipfile",
        # 7: network and concurrency: concurrent execution, networking and IPC, internet data handling and
        # protocols
        "_threading_local asynchat asyncio asyncore base64 binascii cgi cgitb concurrent contextvars email ftplib "
        "http imaplib ipaddress mailbox mailcap mimetypes multiprocessing nntplib nturl2path poplib queue quopri "
        "sched selectors signal smtpd smtplib socket socketserver ssl subprocess telnetlib threading urllib uu "
        "uuid webbrowser wsgiref xmlrpc",
    )
)

#: Group index (4..7, see :data:`GROUP_NAMES`) of each listed top-level standard-library module.
MODULE_FAMILIES: dict[str, int] = {module: 4 + f for f, modules in enumerate(_FAMILY_MODULES) for module in modules}

#: For each ``num_classes``: the class names and the corpus groups (indices into :data:`GROUP_NAMES`) merged
#: into each. Two classes: the language and its tools against the library for data, files and networks; three
#: and four classes: the language reference against library families; eight: every group on its own.
BUNDLED_CLASSES: dict[int, tuple[tuple[str, tuple[int, ...]], ...]] = {
    2: (("language and tools", (0, 1, 2, 3, 4)), ("data, files and network", (5, 6, 7))),
    3: (
        ("language reference", (0, 1, 2, 3)),
        ("tools, data and text", (4, 5)),
        ("files, system and network", (6, 7)),
    ),
    4: (
        ("language reference", (0, 1, 2, 3)),
        ("development tools", (4,)),
        ("data and text", (5,)),
        ("files, system and network", (6, 7)),
    ),
    8: tuple((name, (g,)) for g, name in enumerate(GROUP_NAMES)),
}


def _topic_group(topic: str, document: str) -> int:
    """Group of a help topic: the table above, else by its name or title (for other Python versions)."""
    if topic in TOPIC_GROUPS:
        return TOPIC_GROUPS[topic]
    if topic.startswith(("types", "bltin-", "string")):
        return 3
    title = document.strip().splitlines()[0].lower() if document.strip() else ""
    if "statement" in title:
        return 0
    if any(word in title for word in ("expression", "operat", "literal")):
        return 1
    return 2


_UNDERLINE = re.compile(r"^\s*([*=\-~^\"#+])\1{2,}\s*$")
_LIST_ITEM = re.compile(r"^\s*((?:[*\-+•]|\d+\.|\(\d+\)|[a-z]\.|\[\d+\])\s+)")
_CODE_MARKS = (">>>", "::=", "-[ ", "...:")
_FOOTNOTE_REF = re.compile(r"\s\[\d+\]")
_EMPHASIS = re.compile(r"(?<!\w)\*{1,2}(\S[^*]*?\S|\S)\*{1,2}(?!\w)")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _blocks(document: str) -> Iterable[list[str]]:
    """Blocks of consecutive non-blank lines; headings (a line underlined by *, =, -...) are removed."""
    lines: list[str] = []
    for line in document.splitlines():
        if _UNDERLINE.match(line):
            if lines and lines[-1].strip():
                lines[-1] = ""  # the heading's text
            lines.append("")
        else:
            lines.append(line)
    block: list[str] = []
    for line in [*lines, ""]:
        if line.strip():
            block.append(line)
        elif block:
            yield block
            block = []


def _prose(block: list[str]) -> str | None:
    """The block as one line of prose, or None when it is code, grammar, a table or a bare name.

    Prose is laid out like reStructuredText renders it: every line at one indentation, or a list item
    (``*``, ``1.``, ``[1]``) whose other lines align with its text, or a definition (a term line, then its
    description indented below it, kept without the term). Blocks with interactive prompts, grammar rules or
    table borders, of fewer than 5 words, or with under 75% letters among their non-space characters are code.
    """
    first = _indent(block[0])
    item = _LIST_ITEM.match(block[0])
    body = item.end() if item else first  # where the text of the item's other lines must start
    if not item and len(block) > 1 and len({_indent(line) for line in block[1:]}) == 1 and _indent(block[1]) > first:
        block = block[1:]  # a definition: drop the term
        body = _indent(block[0])
    if any(_indent(line) != body for line in block[1:]):
        return None
    text = " ".join(line.strip() for line in block)
    if item:
        text = text[len(item.group(1).strip()) :].strip()
    if any(mark in text for mark in _CODE_MARKS) or block[0].lstrip()[:1] in "+|":
        return None
    text = _EMPHASIS.sub(r"\1", _FOOTNOTE_REF.sub("", text))
    text = _WHITESPACE.sub(" ", text).strip()
    visible = text.replace(" ", "")
    if len(text.split()) < 5 or sum(map(str.isalpha, visible)) < 0.75 * len(visible):
        return None
    return text


def _module_family(module: str) -> int:
    """Group (4..7) of a top-level standard-library module: :data:`MODULE_FAMILIES`, else that of the public
    module a private one re-implements (``_pyio`` -> ``io``), else by words in its name, else development tools."""
    if module in MODULE_FAMILIES:
        return MODULE_FAMILIES[module]
    public = module.lstrip("_")
    for name in (public, public.removeprefix("py")):
        if name in MODULE_FAMILIES:
            return MODULE_FAMILIES[name]
    if any(word in public for word in ("thread", "async", "socket", "http", "mail", "url", "net")):
        return 7
    if any(word in public for word in ("path", "file", "zip", "tar", "disk", "term")):
        return 6
    if any(word in public for word in ("str", "text", "date", "time", "num", "json", "pickle")):
        return 5
    return 4


# --- library docstrings ---------------------------------------------------------------------------------------

#: Folders of the standard library whose sources are not read: tests, GUI and 2to3 code, third-party packages,
#: codec tables, demos, caches, and ``pydoc_data`` (already the language-reference part).
_SKIPPED_DIRS = frozenset(
    (
        "test",
        "tests",
        "idlelib",
        "tkinter",
        "lib2to3",
        "site-packages",
        "dist-packages",
        "turtledemo",
        "encodings",
        "pydoc_data",
        "__pycache__",
        "lib-dynload",
    )
)
#: Version of the docstring cleaning rules; part of the disk-cache key, so changing the rules rebuilds the cache.
_DOCSTRING_RULES_VERSION = 2
#: reST roles (``:func:`name```, ``:meth:`~a.b```) and inline literals (````x````, ```x```) keep their text.
_REST_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`]+)`")
_REST_LITERAL = re.compile(r"`{1,2}([^`]+)`{1,2}")
#: Old-style quotes, ```name'`` (as in older docstrings), become ``'name'``.
_OLD_QUOTE = re.compile(r"`(\w[^`']*)'")
#: Marks of code, maths, markup or signatures (``a = b``, ``a*b``, ``f() -> int``, ``<name>``, a stray backtick...).
_CODE_IN_SENTENCE = re.compile(r"[=*`\\{}|$@^~]|->|>>>|<\w")
_ALPHA_WORD = re.compile(r"[a-z]+(?:['’][a-z]+)*")
_CAPITALISED = re.compile(r"[\"'“‘(\[]?[A-Z]")
_DEFINITIONS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_BODIES = ("body", "orelse", "finalbody", "handlers", "cases")


def _stdlib_sources(root: Path) -> list[tuple[tuple[str, ...], Path]]:
    """The ``.py`` files under ``root`` but outside :data:`_SKIPPED_DIRS` (and ``config-*``, hidden folders,
    ``_sysconfigdata*``), as ``(relative path parts, path)`` in sorted order of the parts."""
    found: list[tuple[tuple[str, ...], Path]] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith((".", "config-"))]
        rel = Path(folder).relative_to(root).parts
        for name in files:
            if name.endswith(".py") and not name.startswith((".", "_sysconfigdata")):
                found.append(((*rel, name), Path(folder) / name))
    return sorted(found)


def _docstrings(body: Iterable[ast.AST]) -> Iterable[str]:
    """Docstrings of the classes and functions of a statement list, nested ones included, in source order
    (only statements are visited, not expressions, which keeps it fast)."""
    for node in body:
        if isinstance(node, _DEFINITIONS):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc
        for field in _BODIES:
            children = getattr(node, field, None)
            if children:
                yield from _docstrings(children)


def _strip_code(doc: str) -> str:
    """A docstring less its doctest examples (from a ``>>>`` line to the next blank line), its literal blocks
    (the lines indented below a line ending in ``::``, which becomes ``:``) and its reST roles and backticks."""
    out: list[str] = []
    in_example = False
    literal_indent: int | None = None
    for line in doc.splitlines():
        stripped = line.strip()
        if not stripped:
            in_example = False
            out.append("")
            continue
        if literal_indent is not None:
            if _indent(line) > literal_indent:
                continue
            literal_indent = None
        if in_example or stripped.startswith(">>>"):
            in_example = True
            continue
        if stripped.endswith("::"):
            literal_indent = _indent(line)
            line = line.rstrip()[:-1].rstrip(" :") + ":" if stripped != "::" else ""
        out.append(_REST_LITERAL.sub(r"\1", _OLD_QUOTE.sub(r"'\1'", _REST_ROLE.sub(r"\1", line))))
    return "\n".join(out)


def _is_prose_sentence(sentence: str) -> bool:
    """Whether a docstring sentence reads as English: no code marks (:data:`_CODE_IN_SENTENCE`), at least 4
    words of letters making up at least 65% of its tokens, and it starts with a capital letter or ends like a
    sentence (``.``, ``?``, ``!``, ``:``) and does not stop at ``,``, ``;``, ``-`` or ``(``."""
    if sentence[-1] in ",;-(" or _CODE_IN_SENTENCE.search(sentence):
        return False
    if not _CAPITALISED.match(sentence) and sentence[-1] not in ".?!:":
        return False
    tokens = WordTokenizer.tokenize(sentence)
    words = sum(bool(_ALPHA_WORD.fullmatch(t)) for t in tokens)
    return words >= 4 and words >= 0.65 * len(tokens)


def _docstring_sentences(path: Path) -> list[str]:
    """Prose sentences of the docstrings of one source file (module, classes, functions; nested included),
    cleaned like the language reference (:func:`_prose`) and filtered by :func:`_is_prose_sentence`. The file
    is parsed with :mod:`ast`, never imported; a file that cannot be read or parsed gives no sentence."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. SyntaxWarning for invalid escapes in old sources
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    module_doc = ast.get_docstring(tree, clean=True)
    docs = ([module_doc] if module_doc else []) + list(_docstrings(tree.body))
    sentences: list[str] = []
    for doc in docs:
        for block in _blocks(_strip_code(doc)):
            text = _prose(block)
            if text is not None:
                sentences.extend(s for s in _split_paragraph(text) if _is_prose_sentence(s))
    return sentences


def _text_cache_dir() -> Path:
    """Where the extracted docstring sentences are cached: ``$GRADINV_CACHE/text`` or ``~/.cache/gradinv/text``."""
    root = os.environ.get("GRADINV_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "gradinv") / "text"


def _stdlib_fingerprint(root: Path, sources: Sequence[tuple[tuple[str, ...], Path]]) -> str:
    """Hash of the Python version, the cleaning rules and every source's path, size and modification time."""
    digest = hashlib.sha256(f"{_DOCSTRING_RULES_VERSION}\0{sys.version}\0{root}".encode())
    for parts, path in sources:
        try:
            st = path.stat()
        except OSError:
            continue
        digest.update(f"\0{'/'.join(parts)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def stdlib_docstring_sentences(
    root: str | Path | None = None, *, cache_dir: str | Path | None = None
) -> tuple[tuple[str, str], ...]:
    """Prose sentences of the docstrings of the standard library's pure-Python modules, as ``(sentence,
    top-level module)`` pairs, without repeats, in sorted file order and source order within a file.

    ``root`` defaults to the running Python's ``sysconfig.get_paths()["stdlib"]``; the files are parsed with
    :mod:`ast`, never imported (see :func:`_stdlib_sources` for what is skipped). The result is cached as JSON
    in ``cache_dir`` (default :func:`_text_cache_dir`), keyed by :func:`_stdlib_fingerprint`, so only the first
    call on a machine parses the sources; an unreadable or stale cache is rebuilt, an unwritable one ignored.
    """
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    sources = _stdlib_sources(root) if root.is_dir() else []
    folder = _text_cache_dir() if cache_dir is None else Path(cache_dir)
    cache = folder / f"stdlib-docstrings-{_stdlib_fingerprint(root, sources)}.json"
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
        if data.get("format") == "gradinv.stdlib_docstrings" and data.get("root") == str(root):
            return tuple((str(s), str(m)) for s, m in data["sentences"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass  # no cache yet, or a damaged one: rebuild it
    seen: set[str] = set()
    pairs: list[tuple[str, str]] = []
    collecting = gc.isenabled()
    gc.disable()  # syntax trees hold no reference cycles: without the collector, parsing is about 2.5x faster
    try:
        for parts, path in sources:
            module = parts[0].removesuffix(".py")
            for sentence in _docstring_sentences(path):
                if sentence not in seen:
                    seen.add(sentence)
                    pairs.append((sentence, module))
    finally:
        if collecting:
            gc.enable()
    payload = {"format": "gradinv.stdlib_docstrings", "root": str(root), "python": sys.version, "sentences": pairs}
    partial = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")  # written whole, then renamed: never half a file
    try:
        folder.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
        os.replace(partial, cache)
    except OSError:  # a read-only home or a full disk: work without the cache
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
    return tuple(pairs)


# --- the bundled corpus, both parts -----------------------------------------------------------------------------


def _pydoc_sentences() -> list[tuple[str, int]]:
    """``(sentence, topic group)`` pairs of ``pydoc_data.topics`` in sorted topic order, cleaned by
    :func:`_prose`; a sentence found under several topics is kept at its first."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - part of the standard library
        raise DataError(
            "the bundled text needs the standard library module pydoc_data, which this Python lacks: "
            "install the full Python standard library or load a .txt file"
        ) from None
    out: list[tuple[str, int]] = []
    for topic in sorted(topics):
        document = topics[topic]
        group = _topic_group(topic, document)
        for block in _blocks(document):
            text = _prose(block)
            if text is not None:
                out.extend((sentence, group) for sentence in _split_paragraph(text))
    return out


@functools.lru_cache(maxsize=1)
def bundled_sentences() -> tuple[tuple[str, int], ...]:
    """The bundled corpus as ``(sentence, group)`` pairs without repeats (a sentence is kept where it first
    occurs): first the language reference (``pydoc_data.topics``, groups 0..3 of :data:`TOPIC_GROUPS`, in
    sorted topic order), then the standard library's docstrings (:func:`stdlib_docstring_sentences`, groups
    4..7 by module family, :data:`MODULE_FAMILIES`). Computed once per process, and the docstrings once per
    machine (disk cache)."""
    seen: set[str] = set()
    out: list[tuple[str, int]] = []
    docstrings = ((s, _module_family(m)) for s, m in stdlib_docstring_sentences())
    for sentence, group in itertools.chain(_pydoc_sentences(), docstrings):
        if sentence not in seen:
            seen.add(sentence)
            out.append((sentence, group))
    return tuple(out)


def bundled_tokenizer(vocab_size: int = 5000, kind: str = "word") -> WordTokenizer | BPETokenizer:
    """The tokenizer trained on all bundled sentences (kept in memory: later calls return the same object).

    ``kind`` is ``"word"`` (:class:`WordTokenizer`) or ``"bpe"`` (:class:`BPETokenizer`). With the word
    tokenizer the vocabulary is smaller than ``vocab_size`` when the corpus has fewer distinct tokens.
    """
    if kind not in ("word", "bpe"):
        raise ConfigError(f"unknown tokenizer kind {kind!r}: use 'word' or 'bpe'")
    _check_vocab_size(vocab_size, minimum=MIN_VOCAB_SIZE if kind == "word" else MIN_BPE_VOCAB_SIZE)
    return _bundled_tokenizer(vocab_size, kind)


@functools.lru_cache(maxsize=8)
def _bundled_tokenizer(vocab_size: int, kind: str) -> WordTokenizer | BPETokenizer:
    texts = [s for s, _ in bundled_sentences()]
    cls = WordTokenizer if kind == "word" else BPETokenizer
    return cls.train(texts, vocab_size=vocab_size)


# --- the user's text files -------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"text file '{path}' is not UTF-8: save it as UTF-8 text") from None
    except OSError as exc:
        raise DataError(f"text file '{path}' cannot be read ({exc.strerror}): check its permissions") from None


def _is_txt(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() == ".txt"


def _file_sentences(files: Sequence[Path]) -> list[str]:
    return [s for f in files for s in split_sentences(_read_text(f))]


def _user_sentences(path: Path) -> tuple[list[tuple[str, int]], tuple[str, ...]]:
    """``(sentence, class)`` pairs and class names of a .txt file or folder."""
    if path.is_file():
        if path.suffix.lower() != ".txt":
            raise DataError(
                f"text source '{path}' is not a .txt file: pass a UTF-8 .txt file, a folder of .txt files, "
                "'text' or 'synthetic'"
            )
        sentences = split_sentences(_read_text(path))
        if not sentences:
            raise DataError(f"text file '{path}' is empty: put some sentences in it")
        return [(s, 0) for s in sentences], (path.stem,)
    visible = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    files = [p for p in visible if _is_txt(p)]
    class_dirs = [d for d in visible if d.is_dir() and any(_is_txt(p) for p in d.iterdir())]
    if files and class_dirs:
        raise DataError(
            f"text folder '{path}' has both .txt files and class sub-folders: move the loose files into a class "
            "sub-folder, or use a flat folder"
        )
    if files:
        sentences = _file_sentences(files)
        if not sentences:
            raise DataError(f"the .txt files in '{path}' are empty: put some sentences in them")
        return [(s, 0) for s in sentences], (path.name,)
    if not class_dirs:
        raise DataError(
            f"text folder '{path}' has no .txt files: put .txt files in it, or one sub-folder of .txt files per class"
        )
    pairs: list[tuple[str, int]] = []
    for label, folder in enumerate(class_dirs):
        sentences = _file_sentences(sorted(p for p in folder.iterdir() if _is_txt(p)))
        if not sentences:
            raise DataError(f"class folder '{folder}' has only empty .txt files: put some sentences in them")
        pairs.extend((s, label) for s in sentences)
    return pairs, tuple(d.name for d in class_dirs)


# ---------------------------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TextDataset:
    """Fixed-length token sequences with a class label each, the tokenizer that made them and their texts.

    ``texts[i]`` is the sentence row ``i`` was cut from (whole, before truncation); ``tokenizer.decode(tokens[i])``
    gives the text of the row itself.
    """

    tokens: Tensor  # (N, L) int64 token ids
    labels: Tensor  # (N,) int64 in 0..num_classes-1
    tokenizer: TextTokenizer
    texts: tuple[str, ...]
    num_classes: int
    name: str = "text"
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        tokens, labels = self.tokens, self.labels
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype != torch.int64:
            raise DataError(
                f"text dataset '{self.name}': tokens must be an int64 (N, L) tensor, got "
                f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}"
            )
        n = int(tokens.shape[0])
        if n == 0 or tokens.shape[1] == 0:
            raise DataError(f"text dataset '{self.name}' has no sequences: give it at least one non-empty sequence")
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != (n,):
            raise DataError(
                f"text dataset '{self.name}': labels must be an int64 tensor of shape ({n},), got "
                f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}"
            )
        if len(self.texts) != n:
            raise DataError(f"text dataset '{self.name}': {n} sequences but {len(self.texts)} texts: give one each")
        vocab = int(self.tokenizer.vocab_size)
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab:
            raise DataError(
                f"text dataset '{self.name}': token ids {lo}..{hi} do not fit the tokenizer's vocabulary 0..{vocab - 1}"
            )
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise DataError(f"text dataset '{self.name}': num_classes must be a positive integer")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= self.num_classes:
            raise DataError(f"text dataset '{self.name}': labels must lie in 0..{self.num_classes - 1}, got {lo}..{hi}")
        names = tuple(str(s) for s in self.class_names) or tuple(str(i) for i in range(self.num_classes))
        if len(names) != self.num_classes:
            raise DataError(
                f"text dataset '{self.name}': num_classes={self.num_classes} but {len(names)} class names: "
                "give one name per class"
            )
        object.__setattr__(self, "class_names", names)
        object.__setattr__(self, "texts", tuple(str(t) for t in self.texts))

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    def decode(self, tokens: Tensor) -> list[str]:
        """Texts of a ``(B, L)`` batch of token ids (e.g. a reconstruction)."""
        if not isinstance(tokens, Tensor) or tokens.dim() != 2:
            raise ConfigError(f"decode takes a (B, L) tensor of token ids, got {tuple(getattr(tokens, 'shape', ()))}")
        return [self.tokenizer.decode(row) for row in tokens]

    def sample(self, batch_size: int, *, seed: int, distinct_labels: bool = False) -> tuple[Tensor, Tensor]:
        """``batch_size`` different sequences picked reproducibly from ``seed``: ``(tokens (B, L), labels (B,))``.

        Uses its own ``torch.Generator`` (the global RNG is untouched); with ``distinct_labels`` at most one
        sequence per class is taken.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
        n = len(self)
        if batch_size > n:
            raise ConfigError(
                f"batch size {batch_size} is larger than text source '{self.name}', which has {n} sequences: "
                f"use a batch size of at most {n}, a shorter seq_len or more text"
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
        if distinct_labels:
            seen: set[int] = set()
            picked = []
            for i in order.tolist():
                label = int(self.labels[i])
                if label not in seen:
                    seen.add(label)
                    picked.append(i)
                    if len(picked) == batch_size:
                        break
            if len(picked) < batch_size:
                raise ConfigError(
                    f"batch size {batch_size} with distinct labels needs {batch_size} classes, but text source "
                    f"'{self.name}' has sequences of only {len(seen)}: use a batch size of at most {len(seen)} or "
                    "allow repeated labels"
                )
            index = torch.tensor(picked, dtype=torch.int64)
        else:
            index = order[:batch_size]
        return self.tokens[index].clone(), self.labels[index].clone()

    def __repr__(self) -> str:
        return (
            f"TextDataset(name={self.name!r}, sequences={len(self)}x{self.seq_len}, vocab_size={self.vocab_size}, "
            f"num_classes={self.num_classes})"
        )


def _check_int(name: str, value: object, lo: int, hi: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{name} {value} is out of range: use {lo} to {hi}{fix}")
    return value


def _rows(
    pairs: Sequence[tuple[str, int]], tokenizer: TextTokenizer, seq_len: int, fit: str
) -> tuple[list[list[int]], list[int], list[str], int]:
    """Encoded rows, labels and texts per the ``fit`` rule; also the longest sentence's token count."""
    pad = int(getattr(tokenizer, "pad_id", PAD_ID))
    rows: list[list[int]] = []
    labels: list[int] = []
    texts: list[str] = []
    seen: set[tuple[int, ...]] = set()
    longest = 0
    batch = getattr(tokenizer, "encode_batch", None)
    encoded = batch([s for s, _ in pairs]) if callable(batch) else [tokenizer.encode(s) for s, _ in pairs]
    for (sentence, label), ids in zip(pairs, encoded, strict=True):
        ids = list(ids)
        longest = max(longest, len(ids))
        if not ids or (fit == "truncate" and len(ids) < seq_len):
            continue
        row = ids[:seq_len] + [pad] * (seq_len - len(ids))
        key = tuple(row)
        if key in seen:
            continue
        seen.add(key)
        rows.append(row)
        labels.append(label)
        texts.append(sentence)
    return rows, labels, texts, longest


def _resolve_tokenizer(
    tokenizer: object, texts: Callable[[], list[str]], vocab_size: int, *, bundled: bool
) -> TextTokenizer:
    """The tokenizer to use; ``texts`` is only called when one is trained here."""
    if tokenizer is None or isinstance(tokenizer, str):
        kind = "word" if tokenizer is None else tokenizer.strip().lower()
        if kind not in ("word", "bpe"):
            raise ConfigError(f"unknown tokenizer {tokenizer!r}: use 'word', 'bpe' or a tokenizer object")
        if bundled:
            return bundled_tokenizer(vocab_size, kind)
        cls = WordTokenizer if kind == "word" else BPETokenizer
        return cls.train(texts(), vocab_size=vocab_size)
    if not isinstance(tokenizer, TextTokenizer):
        raise ConfigError(
            f"tokenizer must be 'word', 'bpe' or an object with vocab_size, pad_id, encode and decode, "
            f"got {type(tokenizer).__name__}"
        )
    return tokenizer


def load_text(
    source: str | Path = "text",
    *,
    seq_len: int = 16,
    vocab_size: int = 5000,
    num_classes: int | None = None,
    tokenizer: str | TextTokenizer | None = None,
    fit: str = "truncate",
    num_samples: int = 256,
    seed: int = 0,
) -> TextDataset:
    """Load ``"text"`` (bundled), ``"synthetic"``, a ``.txt`` file or a folder of them as sequences of
    exactly ``seq_len`` tokens.

    ``tokenizer`` is ``"word"`` (default: :class:`WordTokenizer`), ``"bpe"`` (:class:`BPETokenizer`), both
    trained here with ``vocab_size`` tokens at most (on the bundled text once per process), or a trained
    tokenizer object, used as is (``vocab_size`` is then not used). ``fit`` is ``"truncate"`` or ``"pad"``
    (module docstring). ``num_classes``: the bundled text has 2 (default), 3, 4 or 8 classes of topic
    groups and module families (:data:`BUNDLED_CLASSES`); a user's file or folder has its own classes (a
    number at least that large widens the label space); synthetic data has 2 by default. ``num_samples`` and
    ``seed`` are used by ``"synthetic"`` only. A ``str`` matching a named source loads it; pass
    ``Path("text")`` for a file or folder named like one.
    """
    seq_len = _check_int("seq_len", seq_len, MIN_SEQ_LEN, MAX_SEQ_LEN, " tokens")
    if fit not in FITS:
        raise ConfigError(f"unknown fit {fit!r}: use 'truncate' (drop shorter sentences) or 'pad' (pad them)")
    if num_classes is not None:
        _check_int("num_classes", num_classes, 1, 1_000_000, " classes")
    if tokenizer is None or isinstance(tokenizer, str):
        _check_vocab_size(vocab_size)

    key = source.strip().lower() if isinstance(source, str) else None
    if key == "synthetic":
        return _load_synthetic(
            seq_len=seq_len,
            vocab_size=vocab_size,
            num_classes=2 if num_classes is None else num_classes,
            tokenizer=tokenizer,
            num_samples=num_samples,
            seed=seed,
        )
    if key == "text":
        classes = 2 if num_classes is None else num_classes
        if classes not in BUNDLED_CLASSES:
            raise ConfigError(
                f"the bundled text has {', '.join(map(str, BUNDLED_CLASSES))} classes (topic groups and module "
                f"families), got num_classes={classes}: pick one of these"
            )
        corpus = bundled_sentences()
        group_to_class = {g: c for c, (_, groups) in enumerate(BUNDLED_CLASSES[classes]) for g in groups}
        pairs = [(s, group_to_class[g]) for s, g in corpus]
        names = tuple(name for name, _ in BUNDLED_CLASSES[classes])
        tok = _resolve_tokenizer(tokenizer, lambda: [s for s, _ in corpus], vocab_size, bundled=True)
        return _build("text", pairs, names, classes, tok, seq_len, fit)
    if not isinstance(source, (str, Path)):
        raise ConfigError(f"text source must be a name or a path, got {type(source).__name__}")

    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"text source '{source}' does not exist: pass a .txt file, a folder of .txt files, 'text' or 'synthetic'"
        )
    pairs, names = _user_sentences(path)
    classes = len(names) if num_classes is None else num_classes
    if classes < len(names):
        raise ConfigError(
            f"text source '{source}' has {len(names)} classes but num_classes={classes}: pass at least "
            f"{len(names)} or leave it unset"
        )
    names = names + tuple(f"unused {i}" for i in range(len(names), classes))
    tok = _resolve_tokenizer(tokenizer, lambda: [s for s, _ in pairs], vocab_size, bundled=False)
    return _build(str(source), pairs, names, classes, tok, seq_len, fit)


def _build(
    name: str,
    pairs: Sequence[tuple[str, int]],
    class_names: tuple[str, ...],
    num_classes: int,
    tokenizer: TextTokenizer,
    seq_len: int,
    fit: str,
) -> TextDataset:
    rows, labels, texts, longest = _rows(pairs, tokenizer, seq_len, fit)
    if not rows:
        if longest == 0:
            raise DataError(f"text source '{name}' has no tokens: put some words in it")
        raise DataError(
            f"no sentence of text source '{name}' has {seq_len} tokens (the longest has {longest}): use a "
            f"seq_len of at most {longest} or fit='pad'"
        )
    return TextDataset(
        tokens=torch.tensor(rows, dtype=torch.int64),
        labels=torch.tensor(labels, dtype=torch.int64),
        tokenizer=tokenizer,
        texts=tuple(texts),
        num_classes=num_classes,
        name=name,
        class_names=class_names,
    )


def _load_synthetic(
    *,
    seq_len: int,
    vocab_size: int,
    num_classes: int,
    tokenizer: str | TextTokenizer | None,
    num_samples: int,
    seed: int,
) -> TextDataset:
    """Uniform token ids in ``4..V-1`` (no special tokens) and uniform labels, from one seeded generator."""
    num_samples = _check_int("num_samples", num_samples, 1, 1_000_000, " sequences")
    if tokenizer is None or tokenizer == "word":
        tok: TextTokenizer = WordTokenizer(SPECIAL_TOKENS + tuple(f"w{i}" for i in range(4, vocab_size)))
    elif isinstance(tokenizer, str):
        raise ConfigError(
            f"synthetic text uses a placeholder word vocabulary, got tokenizer={tokenizer!r}: leave it unset"
        )
    else:
        tok = _resolve_tokenizer(tokenizer, list, vocab_size, bundled=False)
    vocab = int(tok.vocab_size)
    if vocab <= len(SPECIAL_TOKENS):
        raise ConfigError(f"the tokenizer has only {vocab} tokens: synthetic text needs words besides the specials")
    generator = torch.Generator().manual_seed(int(seed))
    tokens = torch.randint(len(SPECIAL_TOKENS), vocab, (num_samples, seq_len), generator=generator)
    labels = torch.randint(0, num_classes, (num_samples,), generator=generator)
    return TextDataset(
        tokens=tokens,
        labels=labels,
        tokenizer=tok,
        texts=tuple(tok.decode(row) for row in tokens),
        num_classes=num_classes,
        name="synthetic",
    )
