"""The Opacus backend of the dpsgd defense and Opacus' accountants beside gradinv's (gradinv.integrations.opacus)."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import gradinv
from gradinv.defenses import build_defense, gaussian_epsilon, parse_defense
from gradinv.defenses.update import local_uses
from gradinv.errors import ConfigError

pytest.importorskip("opacus")

from gradinv.integrations.opacus import compare_epsilon, opacus_epsilon  # noqa: E402


def _scenario(data, spec, *, model="lenet", batch_size=4, seed=0, **options):
    images, labels = gradinv.sample_batch(data, batch_size=batch_size, seed=0)
    net = gradinv.build_model(model, num_classes=data.num_classes, image_size=32, seed=0)
    return gradinv.Scenario.from_images(
        net,
        images,
        labels,
        normalization=data.normalization,
        defenses=(spec,) if isinstance(spec, str) else spec,
        seed=seed,
        **options,
    )


def _update(data, spec, **kw):
    return _scenario(data, spec, **kw).observe().update


def _flat(update):
    return torch.cat([v.flatten() for v in update.values()])


@pytest.mark.parametrize(
    "protocol",
    [
        gradinv.FedSGD(),
        gradinv.FedAvg(local_steps=3, lr=0.5, local_batch_size=2),
        gradinv.FedAvg(local_steps=4, lr=0.5, local_batch_size=1, shuffle=True),
    ],
    ids=["fedsgd", "fedavg", "fedavg-shuffled"],
)
def test_noiseless_opacus_step_equals_gradinvs(digits32, protocol):
    """Oracle: without noise both backends clip the same per-sample gradients on the same local batches."""
    spec = "dpsgd:noise_multiplier=0,clip=0.05"
    mine = _update(digits32, spec, protocol=protocol, seed=3)
    theirs = _update(digits32, spec + ",backend=opacus", protocol=protocol, seed=3)
    assert theirs.keys() == mine.keys()
    for k in mine:
        torch.testing.assert_close(theirs[k], mine[k], rtol=1e-5, atol=1e-7)
    images, labels = gradinv.sample_batch(digits32, batch_size=4, seed=0)
    net = gradinv.build_model("lenet", num_classes=digits32.num_classes, image_size=32, seed=0)
    plain = gradinv.Scenario.from_images(
        net, images, labels, normalization=digits32.normalization, protocol=protocol, seed=3
    ).observe()
    assert float((_flat(plain.update) - _flat(mine)).abs().max()) > 1e-4  # the clip binds


class _WithUnusedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 3))
        self.spare = nn.Linear(6, 3)  # never called: zero per-sample gradients in both backends

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_a_parameter_the_forward_pass_skips_gets_zero_gradient_in_both_backends():
    torch.manual_seed(0)
    net, x, y = _WithUnusedLayer(), torch.randn(3, 3, 2, 2), torch.tensor([0, 2, 1])
    mine, theirs = (
        gradinv.Scenario(net, x, y, defenses=(f"dpsgd:noise_multiplier=0,clip=0.1,backend={b}",)).observe().update
        for b in ("gradinv", "opacus")
    )
    for k in mine:
        torch.testing.assert_close(theirs[k], mine[k], rtol=1e-5, atol=1e-7)
    assert float(theirs["spare.weight"].abs().max()) == 0.0


def test_opacus_noise_is_deterministic_per_seed_with_std_sigma_c_over_b(digits32):
    spec = "dpsgd:noise_multiplier=2,clip=0.05,backend=opacus"
    first, again = _update(digits32, spec, seed=5), _update(digits32, spec, seed=5)
    other = _update(digits32, spec, seed=6)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(_flat(first), _flat(other))
    noiseless = _flat(_update(digits32, "dpsgd:noise_multiplier=0,clip=0.05,backend=opacus"))
    noise = _flat(first) - noiseless
    assert float(noise.std()) == pytest.approx(2 * 0.05 / 4, rel=0.03)  # 15,826 entries: ~0.6% sampling error
    assert abs(float(noise.mean())) < 4 * 2 * 0.05 / 4 / math.sqrt(noise.numel())


def test_epsilon_side_by_side_for_three_settings():
    """Opacus' accountants never report less than gradinv's exact epsilon; PRV agrees to its 0.01 eps_error, RDP
    within its conversion's slack; subsampling (q < 1) is what makes Opacus' usual numbers smaller."""
    for sigma, steps in ((0.5, 1), (1.0, 1), (1.0, 4)):
        c = compare_epsilon(noise_multiplier=sigma, steps=steps, delta=1e-5)
        assert c.gradinv == pytest.approx(gaussian_epsilon(sigma, delta=1e-5, rounds=steps))
        assert c.gradinv <= c.prv <= c.gradinv + 0.02
        assert c.gradinv < c.rdp <= 1.15 * c.gradinv
        assert c.gdp >= c.gradinv
        assert "subsampling" in c.note and "RDP" in c.note
        sub = opacus_epsilon(noise_multiplier=sigma, steps=steps, delta=1e-5, sample_rate=0.01)
        assert sub < c.gradinv / 2
    protocol = gradinv.FedAvg(local_steps=3, lr=0.5, local_batch_size=2)  # each of 4 samples is in 2 steps
    d = build_defense("dpsgd", noise_multiplier=1.0)
    c = compare_epsilon(noise_multiplier=1.0, steps=local_uses(protocol, 4))
    assert gradinv.dp_epsilon([d], protocol=protocol, num_samples=4) == pytest.approx(c.gradinv)
    assert opacus_epsilon(noise_multiplier=0, steps=1, delta=1e-5) == math.inf
    with pytest.raises(ConfigError, match="choose one of rdp, prv, gdp"):
        opacus_epsilon(noise_multiplier=1, steps=1, delta=1e-5, accountant="moments")


def test_backend_is_a_validated_setting_of_the_spec():
    d = parse_defense("dpsgd:noise_multiplier=1,clip=1,backend=opacus")
    assert d.settings.backend == "opacus"
    assert parse_defense(d.spec()) == d
    assert build_defense("dpsgd").settings.backend == "gradinv"
    with pytest.raises(ConfigError, match="backend must be one of gradinv, opacus"):
        parse_defense("dpsgd:backend=tensorflow")


def test_opacus_backend_refuses_batchnorm_clearly(digits32):
    with pytest.raises(ConfigError, match="train-mode BatchNorm"):  # the check both backends share
        _scenario(digits32, "dpsgd:backend=opacus", model="convnet", batch_size=2, train_mode=True).observe()
    with pytest.raises(ConfigError, match="layers with buffers .*backend=gradinv"):  # Opacus refuses any
        _scenario(digits32, "dpsgd:backend=opacus", model="convnet", batch_size=2).observe()


def test_opacus_backend_refuses_models_its_hooks_cannot_follow():
    """gradinv's text models look their position embeddings up without a batch dimension: Opacus' hooks cannot
    split those gradients by sample, so the backend says to use gradinv's."""
    from gradinv.models import build_text_model

    model = build_text_model("gpt2-tiny", vocab_size=50, seed=0)
    tokens = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    sc = gradinv.Scenario.from_tokens(model, tokens, defenses=("dpsgd:backend=opacus",))
    with pytest.raises(ConfigError, match="Opacus could not take per-sample gradients of GPT2Tiny .*backend=gradinv"):
        sc.observe()


def test_opacus_backend_trains_through_the_dropout_defense_deterministically(digits32):
    """Opacus takes per-sample gradients in one batched pass, so unlike gradinv's vmap it can go through the
    dropout defense's random mask (drawn from the scenario's seed)."""
    sc = _scenario(digits32, ("dropout", "dpsgd:noise_multiplier=1,clip=0.05,backend=opacus"), seed=2, batch_size=3)
    a, b = sc.observe().update, sc.observe().update
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_attack_on_an_opacus_client_runs_like_any_other():
    from gradinv.experiments import Case, Cell, Seeds, run_cell

    for backend in ("gradinv", "opacus"):
        case = Case(
            model="mlp",
            data="digits",
            batch_size=1,
            defenses=(f"dpsgd:noise_multiplier=0,clip=1,backend={backend}",),
            seeds=Seeds.all(0),
        )
        record = run_cell(Cell(case, "analytic"), raise_errors=True).record
        assert record.status == "ok" and record.psnr > 100  # noiseless: the analytic attack is exact
        assert record.dp_epsilon == math.inf


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, check=False
    )


def test_the_core_never_imports_opacus():
    result = _python(
        """
        import sys
        import gradinv, gradinv.attacks, gradinv.cli, gradinv.defenses, gradinv.experiments, gradinv.fl
        import gradinv.integrations.opacus  # the adapter imports opacus only when it runs
        import torch
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        sc = gradinv.Scenario(net, torch.rand(2, 3, 2, 2), torch.tensor([0, 2]), defenses=("dpsgd:1",))
        sc.observe()
        print("opacus" in sys.modules)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_a_missing_opacus_says_how_to_install_it():
    result = _python(
        """
        import sys
        sys.modules["opacus"] = None  # as if not installed
        import gradinv, torch
        from gradinv.errors import ConfigError
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        sc = gradinv.Scenario(net, torch.rand(2, 3, 2, 2), torch.tensor([0, 2]), defenses=("dpsgd:backend=opacus",))
        try:
            sc.observe()
        except ConfigError as exc:
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "pip install gradinv[opacus]" in result.stdout
