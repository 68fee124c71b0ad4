"""``gradinv attack`` on text models (issue 12): metrics.json with the text scores, reconstruction.md with each
private sequence above its reconstruction, and one-line errors (exit 2) for bad text input."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re

import pytest

from gradinv.attacks import ATTACKS
from gradinv.cli import main
from gradinv.experiments import Case, build_client
from gradinv.experiments.runner import TEXT_SCORES, reconstructs_tokens

#: a small GPT-2 and a short batch: each run takes about a second on one thread
SMALL = ["--model-option", "width=32", "--model-option", "heads=2", "--batch-size", "2", "--seq-len", "6"]
SMALL += ["--vocab-size", "300", "--quiet"]


@pytest.fixture(scope="module")
def text_attack() -> str:
    """A registered attack that rebuilds token ids: DAGER when it is there."""
    for module in ("dager", "tag", "lamp"):  # register the text attacks that exist in this tree
        if importlib.util.find_spec(f"gradinv.attacks.{module}") is not None:
            importlib.import_module(f"gradinv.attacks.{module}")
    names = sorted(name for name in ATTACKS if reconstructs_tokens(ATTACKS[name]))
    if not names:
        pytest.skip("no text attack is registered yet")
    return "dager" if "dager" in names else names[0]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_attack_on_a_language_model_writes_text_metrics_and_the_decoded_pairs(tmp_path, capsys, text_attack):
    out = tmp_path / "run"
    code, stdout, err = _run(
        ["attack", text_attack, "--model", "gpt2-tiny", "--data", "text", *SMALL, "--out", str(out)], capsys
    )
    assert code == 0, err
    assert "ROUGE-1" in stdout and "token accuracy" in stdout
    m = json.loads((out / "metrics.json").read_text())
    for key in (*TEXT_SCORES, "seconds", "seq_len", "vocab_size", "attack", "model", "batch_size", "status"):
        assert key in m, key
    assert m["status"] == "ok" and m["seq_len"] == 6 and m["model"] == "gpt2-tiny"
    assert all(0.0 <= m[key] <= 1.0 for key in TEXT_SCORES)
    assert m["psnr"] is None and m["image_size"] is None and not (out / "reconstruction.png").exists()

    md = (out / "reconstruction.md").read_text()
    truth = build_client(
        Case(
            model="gpt2-tiny",
            data="text",
            seq_len=6,
            vocab_size=300,
            batch_size=2,
            model_options={"width": 32, "heads": 2},
        )
    )
    privates = re.findall(r"^private:\s+(.*)$", md, flags=re.M)
    rebuilt = re.findall(r"^reconstructed:\s+(.*)$", md, flags=re.M)
    assert privates == truth.dataset.decode(truth.truth.inputs) and len(rebuilt) == 2
    assert md.index(privates[0]) < md.index("reconstructed:")  # each private sequence above its reconstruction
    hits = [int(h) for h in re.findall(r"(\d+)/6 tokens right", md)]
    assert len(hits) == 2 and sum(hits) == round(m["token_accuracy"] * 12)


def test_attack_on_a_classifier_and_on_synthetic_tokens(tmp_path, capsys, text_attack):
    code, _, err = _run(
        ["attack", text_attack, "--model", "bert-tiny", "--data", "synthetic", *SMALL, "--out", str(tmp_path)], capsys
    )
    assert code == 0, err
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["data"] == "synthetic" and len(m["labels_true"]) == 2
    assert all(0.0 <= m[key] <= 1.0 for key in TEXT_SCORES)
    assert re.findall(r"^private:\s+(w\d+ ?)+$", (tmp_path / "reconstruction.md").read_text(), flags=re.M)


def test_capture_then_attack_the_captured_text_update(tmp_path, capsys, text_attack):
    cap = tmp_path / "cap"
    assert _run(["capture", "--model", "gpt2-tiny", *SMALL, "--out", str(cap)], capsys)[0] == 0
    meta = json.loads((cap / "capture.json").read_text())
    assert meta["seq_len"] == 6 and meta["labels"] is None
    base = ["attack", text_attack, "--model", "gpt2-tiny", "--model-option", "width=32", "--model-option", "heads=2"]
    files = ["--update", str(cap / "update.safetensors"), "--weights", str(cap / "weights.safetensors"), "--quiet"]
    code, _, err = _run([*base, *files, "--out", str(tmp_path / "run")], capsys)
    assert code == 0, err
    direct = tmp_path / "direct"
    assert _run(["attack", text_attack, "--model", "gpt2-tiny", *SMALL, "--out", str(direct)], capsys)[0] == 0
    replayed = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {k: replayed[k] for k in TEXT_SCORES} == {
        k: json.loads((direct / "metrics.json").read_text())[k] for k in TEXT_SCORES
    }
    code, _, err = _run([*base, *files, "--seq-len", "5"], capsys)
    assert code == 2 and "captured with seq_len 6" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "EMPTY"], "is empty"),
        (["--seq-len", "100"], "--seq-len 100 is longer than gpt2-tiny's 64 positions"),
        (["--model-option", "vocab_size=100"], "vocab_size=100 is smaller than the tokenizer's vocabulary"),
        (["--defense", "mixup:2"], "mixup acts on image pixels"),
        (["--data", "photos"], "is images, but gpt2-tiny is a text model"),
        (["--image-size", "16"], "--image-size does not apply"),
    ],
)
def test_bad_text_input_is_one_line_and_exit_2(tmp_path, capsys, extra, message, text_attack):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    extra = [str(empty) if e == "EMPTY" else e for e in extra]
    out = tmp_path / "out"
    code, stdout, err = _run(["attack", text_attack, "--model", "gpt2-tiny", *SMALL, *extra, "--out", str(out)], capsys)
    assert code == 2 and message in err, err
    assert err.startswith("gradinv: error:") and err.count("\n") == 1 and not stdout
    assert not out.exists()


def test_an_image_attack_on_a_text_model_is_refused(capsys):
    code, _, err = _run(["attack", "invgrad", "--model", "gpt2-tiny", *SMALL], capsys)
    assert code == 2 and "invgrad rebuilds images, but gpt2-tiny reads token ids" in err
    code, _, err = _run(["attack", "invgrad", "--model", "convnet", "--data", "text", "--quiet"], capsys)
    assert code == 2 and "is text, but convnet takes images" in err


def test_list_shows_the_text_models_data_and_attacks(capsys, text_attack):
    code, out, _ = _run(["list"], capsys)
    assert code == 0
    for part in ("text models", "gpt2-tiny", "bert-tiny", "text data", "synthetic", "PATH.txt", "text attacks"):
        assert part in out, part
    assert text_attack in out.split("text attacks", 1)[1]


def test_image_runs_keep_their_metrics_without_text_keys(tmp_path, capsys):
    code, _, _ = _run(
        ["attack", "analytic", "--model", "mlp", "--data", "digits", "--quiet", "--out", str(tmp_path)], capsys
    )
    assert code == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["psnr"] >= 60 and m["image_size"] == 32
    assert not any(key in m for key in (*TEXT_SCORES, "seq_len", "vocab_size"))
