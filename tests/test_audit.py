from __future__ import annotations

import json

import pytest

from gradinv.cli import main
from gradinv.experiments import Case
from gradinv.experiments.audit import audit

MLP = ["--model", "mlp", "--data", "digits", "--quiet"]


def test_audit_names_the_strongest_attack_and_the_ones_that_decline(tmp_path, capsys):
    out = tmp_path / "audit"
    code = main(["audit", *MLP, "--iterations", "20", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "audit.json").read_text())
    rows = {r["attack"]: r for r in result["rows"]}
    assert result["strongest"] == "analytic" and rows["analytic"]["psnr_median"] > 60
    assert rows["rgap"]["declined"] and "relu" in rows["rgap"]["declined"].lower()
    assert rows["invgrad"]["runs"] == 2 and rows["invgrad"]["psnr_median"] < rows["analytic"]["psnr_median"]
    assert "Strongest attack: analytic" in (out / "audit.md").read_text()
    assert (out / "strongest" / "reconstruction.png").stat().st_size > 0
    assert json.loads((out / "strongest" / "metrics.json").read_text())["attack"] == "analytic"
    assert main(["report", str(out)]) == 0 and (out / "report.html").stat().st_size > 0


def test_audit_sees_the_defense_and_refuses_bad_names(tmp_path, capsys):
    clean = audit(Case(model="mlp", data="digits"), attacks=["analytic"], samples=2)
    noisy = audit(Case(model="mlp", data="digits", defenses=("noise:0.01",)), attacks=["analytic"], samples=2)
    assert noisy["config"]["defenses"] == ["noise:std=0.01,clip=none,distribution=gaussian"]
    assert noisy["rows"][0]["psnr_median"] < clean["rows"][0]["psnr_median"] - 20
    bad = tmp_path / "bad"
    assert main(["audit", *MLP, "--attacks", "analytic,nope", "--out", str(bad)]) == 2
    assert main(["audit", *MLP, "--defense", "nope", "--out", str(bad)]) == 2
    assert not bad.exists()


def test_audit_with_a_typo_in_the_model_names_it(tmp_path, capsys):
    assert main(["audit", "--model", "convnett", "--out", str(tmp_path / "a"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "convnett" in err and "did you mean 'convnet'" in err and err.count("\n") == 1
    assert not (tmp_path / "a").exists()


def test_audit_builds_and_trains_its_model_once(monkeypatch):
    """3 samples x 3 attacks: one model, built and trained once, every run gets its own copy."""
    from gradinv.experiments import case as case_module

    builds, trainings = [], []
    real_build, real_train = case_module.build_model, case_module.train_model
    monkeypatch.setattr(case_module, "build_model", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    monkeypatch.setattr(case_module, "train_model", lambda *a, **k: trainings.append(1) or real_train(*a, **k))
    case = Case(model="mlp", data="digits", trained_steps=5)
    result = audit(
        case, attacks=["analytic", "rgap", "invgrad"], samples=3, attack_settings={"invgrad": {"iterations": 2}}
    )
    assert len(builds) == 1 and len(trainings) == 1
    rows = {r["attack"]: r for r in result["rows"]}
    assert rows["analytic"]["runs"] == 3 and rows["invgrad"]["runs"] == 3 and rows["rgap"]["declined"]


def test_copa_with_a_bad_init_is_refused_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "copa"
    assert main(["attack", "copa", "--model", "cnn6", "--attack-option", "init=rgapp", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "rgapp" in err and err.count("\n") == 1 and not out.exists()
    with pytest.raises(Exception, match="rgapp"):
        audit(Case(model="cnn6"), attacks=["copa"], attack_settings={"copa": {"init": "rgapp"}})
