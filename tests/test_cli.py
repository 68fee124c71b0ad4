from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from gradinv.cli import main

FAST = ["--model", "mlp", "--data", "digits", "--quiet"]


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_list(capsys):
    code, out, _ = _run(["list"], capsys)
    assert code == 0
    for name in (
        "dlg",
        "idlg",
        "invgrad",
        "analytic",
        "lenet",
        "convnet",
        "resnet18",
        "cnn6",
        "digits",
        "photos",
    ):
        assert name in out


def test_attack_writes_metrics_and_picture(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = _run(["attack", "analytic", *FAST, "--out", str(out)], capsys)
    assert code == 0, stdout
    m = json.loads((out / "metrics.json").read_text())
    for key in (
        "attack",
        "model",
        "data",
        "batch_size",
        "image_size",
        "iterations",
        "restarts",
        "seed",
        "psnr",
        "psnr_per_sample",
        "ssim",
        "label_accuracy",
        "seconds",
    ):
        assert key in m
    assert m["psnr"] >= 60 and m["label_accuracy"] == 1.0
    assert (out / "reconstruction.png").stat().st_size > 1000


def test_known_labels_gives_null_label_accuracy(tmp_path, capsys):
    code, _, _ = _run(["attack", "idlg", *FAST, "--iterations", "2", "--known-labels", "--out", str(tmp_path)], capsys)
    assert code == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["label_accuracy"] is None and m["label_source"] == "knowledge"


def test_same_seed_same_numbers(tmp_path, capsys):
    runs = []
    for i in range(2):
        d = tmp_path / f"r{i}"
        argv = [
            "attack",
            "invgrad",
            "--model",
            "convnet",
            "--data",
            "photos",
            "--iterations",
            "4",
            "--restarts",
            "2",
            "--seed",
            "3",
            "--quiet",
            "--out",
            str(d),
        ]
        assert _run(argv, capsys)[0] == 0
        m = json.loads((d / "metrics.json").read_text())
        for timing in ("seconds", "seconds_total"):
            m.pop(timing)
        runs.append(m)
    assert runs[0] == runs[1]


def _attack_files(cap, out, *options):
    """argv attacking the weights and update that `gradinv capture` wrote to ``cap`` with the analytic attack."""
    files = ["--weights", str(cap / "weights.safetensors"), "--update", str(cap / "update.safetensors")]
    return ["attack", "analytic", "--model", "mlp", "--quiet", *files, "--out", str(out), *options]


def test_capture_then_attack_the_files(tmp_path, capsys):
    cap = tmp_path / "cap"
    assert _run(["capture", "--model", "mlp", "--data", "photos", "--seed", "2", "--out", str(cap)], capsys)[0] == 0
    out = tmp_path / "att"
    argv = _attack_files(cap, out, "--data", "photos", "--seed", "2")
    assert _run(argv, capsys)[0] == 0
    assert json.loads((out / "metrics.json").read_text())["psnr"] >= 60
    # without --data there is no truth: scoring is skipped
    out2 = tmp_path / "blind"
    argv = _attack_files(cap, out2, "--data", "none", "--num-classes", "9")
    assert _run(argv, capsys)[0] == 0
    m = json.loads((out2 / "metrics.json").read_text())
    assert m["psnr"] is None and (out2 / "reconstruction.png").exists()


def _bad_cases(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file at all")
    np.savez(tmp_path / "x.npz", images=np.zeros((3, 8, 8)), labels=np.zeros(3, dtype=int))
    return {
        "unknown attack": ["attack", "nope"],
        "unknown model": ["attack", "invgrad", "--model", "vgg99"],
        "missing data": ["attack", "invgrad", "--data", str(tmp_path / "missing")],
        "batch too large": [
            "attack",
            "analytic",
            "--model",
            "mlp",
            "--data",
            str(tmp_path / "x.npz"),
            "--batch-size",
            "5",
        ],
        "image too small": ["attack", "invgrad", "--model", "convnet", "--image-size", "8"],
        "corrupt update": ["attack", "analytic", "--model", "mlp", "--update", str(corrupt)],
        "bad integer": ["attack", "invgrad", "--iterations", "-3"],
        "bad model option value": ["attack", "rgap", "--model", "cnn6", "--model-option", "channels=abc"],
        "model option not a list": ["labels", "auto", "--model", "cnn6", "--model-option", "channels=4"],
        "bad attack option value": ["attack", "copa", "--model", "cnn6", "--attack-option", "iterations=abc"],
        "not a KEY=VALUE": ["attack", "copa", "--model", "cnn6", "--attack-option", "smooth"],
    }


def _exit_code(argv):
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        return exc.code


@pytest.mark.parametrize(
    "case",
    [
        "unknown attack",
        "unknown model",
        "missing data",
        "batch too large",
        "image too small",
        "corrupt update",
        "bad integer",
        "bad model option value",
        "model option not a list",
        "bad attack option value",
        "not a KEY=VALUE",
    ],
)
def test_user_mistakes_give_one_line_and_exit_2(case, tmp_path, capsys):
    out = tmp_path / "out"
    code = _exit_code([*_bad_cases(tmp_path)[case], "--quiet", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("gradinv: error:")
    assert "unrecognized arguments" not in err  # the case's own mistake, not a flag the command lacks
    assert not out.exists()


def test_mismatched_update_file(tmp_path, capsys):
    cap = tmp_path / "cap"
    assert _run(["capture", "--model", "mlp", "--data", "digits", "--out", str(cap)], capsys)[0] == 0
    code, _, err = _run(
        [
            "attack",
            "invgrad",
            "--model",
            "lenet",
            "--data",
            "digits",
            "--quiet",
            "--update",
            str(cap / "update.safetensors"),
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert code == 2 and "does not match the model" in err
    assert not (tmp_path / "o").exists()


def test_console_script_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "gradinv.cli", "attack", "invgrad", "--data", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_trained_model_and_train_mode_options(tmp_path, capsys):
    out = tmp_path / "t"
    argv = ["attack", "idlg", *FAST, "--iterations", "1", "--trained-steps", "5", "--train-mode", "--out", str(out)]
    assert _run(argv, capsys)[0] == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["trained_steps"] == 5 and m["train_data"] == "digits" and m["train_mode"] is True
    assert m["label_accuracy"] == 1.0


def test_fedavg_options_reach_the_protocol(tmp_path, capsys):
    out = tmp_path / "f"
    argv = ["attack", "analytic", *FAST, "--local-steps", "1", "--local-lr", "0.05", "--out", str(out)]
    assert _run(argv, capsys)[0] == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["protocol"] == {"name": "fedavg", "local_steps": 1, "lr": 0.05, "local_batch_size": None}
    assert m["psnr"] >= 60  # one full-batch step: the delta is a scaled gradient, the ratio rule still holds


def test_update_file_carries_its_protocol(tmp_path, capsys):
    cap = tmp_path / "cap"
    argv = [
        "capture",
        "--model",
        "mlp",
        "--data",
        "photos",
        "--local-steps",
        "1",
        "--local-lr",
        "0.2",
        "--out",
        str(cap),
    ]
    assert _run(argv, capsys)[0] == 0
    out = tmp_path / "a"
    argv = _attack_files(cap, out, "--data", "photos")
    assert _run(argv, capsys)[0] == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["protocol"]["name"] == "fedavg" and m["protocol"]["lr"] == 0.2


def test_a_captured_update_replays_its_own_client(tmp_path, capsys):
    """The file's recorded protocol, batch, image size and seed win; a flag that contradicts them is an error."""
    cap = tmp_path / "cap"
    setup = ["--batch-size", "2", "--seed", "3", "--local-steps", "3", "--local-lr", "0.05"]
    assert _run(["capture", "--model", "mlp", "--data", "digits", *setup, "--out", str(cap)], capsys)[0] == 0
    out = tmp_path / "a"
    assert _run(_attack_files(cap, out, "--data", "digits"), capsys)[0] == 0  # no flags: the file's client
    m = json.loads((out / "metrics.json").read_text())
    assert m["protocol"] == {"name": "fedavg", "local_steps": 3, "lr": 0.05, "local_batch_size": None}
    assert m["batch_size"] == 2 and m["seed"] == 3
    for flags, word in [
        (["--local-steps", "3"], "protocol"),  # resets lr to 0.1: a different client
        (["--local-steps", "1", "--local-lr", "0.05"], "protocol"),
        (["--batch-size", "4"], "batch_size"),
        (["--seed", "1"], "seeds"),
    ]:
        code, _, err = _run(_attack_files(cap, tmp_path / "x", "--data", "digits", *flags), capsys)
        assert code == 2 and word in err and err.count("\n") == 1, (flags, err)
    code, _, err = _run(["attack", "analytic", *FAST, "--local-lr", "0.05", "--out", str(tmp_path / "y")], capsys)
    assert code == 2 and "--local-steps" in err
    trained = tmp_path / "trained"  # a model trained before the round: the attack must be given its weights
    assert _run(["capture", *FAST, "--trained-steps", "2", "--out", str(trained)], capsys)[0] == 0
    files = ["--update", str(trained / "update.safetensors")]
    code, _, err = _run(["attack", "analytic", *FAST, *files, "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "--weights" in err
    assert (
        _run(["attack", "analytic", *FAST, *files, "--weights", str(trained / "weights.safetensors")], capsys)[0] == 0
    )
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_out_that_cannot_be_written_fails_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (str(blocker / "sub"), str(blocker), "/proc/gradinv-x"):
        for argv in (["attack", "analytic"], ["capture"], ["labels", "ilrg"]):
            code, _, err = _run([*argv, *FAST, "--out", out], capsys)
            assert code == 2 and "--out" in err and err.count("\n") == 1, (argv, out, err)


def test_a_partly_recovered_batch_prints_its_recovered_fraction(tmp_path, capsys):
    argv = ["attack", "rtf", *FAST, "--batch-size", "16", "--server", "imprint:8", "--out", str(tmp_path / "r")]
    code, out, _ = _run(argv, capsys)
    assert code == 0 and "samples above 40 dB" in out
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert 0 < m["recovered_fraction_40db"] < 1


def test_help_is_fast_and_version_prints(capsys):
    code = subprocess.run(
        [sys.executable, "-c", "import sys, gradinv.cli; print('torch' in sys.modules)"], capture_output=True, text=True
    )
    assert code.stdout.strip() == "False"  # --help and --version load no torch
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and "gradinv" in capsys.readouterr().out
