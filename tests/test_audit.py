from __future__ import annotations

import json

from gradinv.audit import audit
from gradinv.cli import main

MLP = ["--model", "mlp", "--data", "digits", "--quiet"]


def test_audit_names_the_strongest_attack_and_the_ones_that_decline(tmp_path, capsys):
    out = tmp_path / "audit"
    code = main(["audit", *MLP, "--iterations", "20", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "audit.json").read_text())
    rows = {r["attack"]: r for r in result["rows"]}
    assert result["strongest"] == "analytic" and rows["analytic"]["psnr_median"] > 60
    assert rows["rgap"]["declined"] and "relu" in rows["rgap"]["declined"]
    assert rows["invgrad"]["runs"] == 2 and rows["invgrad"]["psnr_median"] < rows["analytic"]["psnr_median"]
    assert "Strongest attack: analytic" in (out / "audit.md").read_text()
    assert (out / "strongest" / "reconstruction.png").stat().st_size > 0
    assert json.loads((out / "strongest" / "metrics.json").read_text())["attack"] == "analytic"


def test_audit_sees_the_defense_and_refuses_bad_names(tmp_path, capsys):
    clean = audit(attacks=["analytic"], samples=2, model="mlp", data="digits")
    noisy = audit(attacks=["analytic"], samples=2, model="mlp", data="digits", defenses=["noise:0.01"])
    assert noisy["config"]["defenses"] == ["noise:std=0.01,clip=None,distribution=gaussian"]
    assert noisy["rows"][0]["psnr_median"] < clean["rows"][0]["psnr_median"] - 20
    bad = tmp_path / "bad"
    assert main(["audit", *MLP, "--attacks", "analytic,nope", "--out", str(bad)]) == 2
    assert main(["audit", *MLP, "--defense", "nope", "--out", str(bad)]) == 2
    assert not bad.exists()
