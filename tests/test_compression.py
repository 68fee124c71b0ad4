from __future__ import annotations

import pytest
import torch

import gradinv
from gradinv.defenses import build_defense, parse_defense
from gradinv.defenses.base import UpdateDefense, payload_bytes
from gradinv.defenses.compression import (
    low_rank,
    powersgd_update,
    quantize_tensor,
    quantize_update,
    round_bytes,
)
from gradinv.errors import ConfigError


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _update(seed: int = 0) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    return {
        "conv.weight": torch.randn(6, 3, 5, 5, generator=g),
        "conv.bias": torch.randn(6, generator=g),
        "fc.weight": torch.randn(10, 40, generator=g),
        "fc.bias": torch.randn(10, generator=g),
    }


def _relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum((a[k] - b[k]).double().pow(2).sum() for k in a)
    den = sum(b[k].double().pow(2).sum() for k in b)
    return float((num / den).sqrt())


# -- quantize -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["max", "norm"])
@pytest.mark.parametrize("bits", [1, 2, 3])
def test_quantize_uses_at_most_2_to_the_bits_levels_spanning_the_scale(bits, scale):
    v = torch.randn(5000, generator=_gen())
    q = quantize_tensor(v, bits=bits, scale=scale, generator=_gen(1))
    s = v.abs().max() if scale == "max" else v.norm()
    levels = torch.linspace(-1, 1, 2**bits, dtype=torch.float64) * s.double()
    values = q.unique()
    assert len(values) <= 2**bits
    assert float(values.double()[:, None].sub(levels).abs().min(dim=1).values.max() / s) < 1e-6
    # stochastic rounding moves an entry only to one of its two neighbouring levels
    assert float((q - v).abs().max()) <= float(2 * s / (2**bits - 1)) + 1e-5


@pytest.mark.parametrize("scale", ["max", "norm"])
def test_stochastic_quantize_is_unbiased_over_seeds(scale):
    v = torch.randn(50, generator=_gen(), dtype=torch.float64)
    mean = torch.stack([quantize_tensor(v, bits=2, scale=scale, generator=_gen(s)) for s in range(4000)]).mean(0)
    step = float(2 * (v.abs().max() if scale == "max" else v.norm()) / 3)
    # per entry the rounding's std is at most step / 2, so the mean of 4000 is within 5 sigma of the input
    assert float((mean - v).abs().max()) < 5 * step / 2 / 4000**0.5
    nearest = quantize_tensor(v, bits=2, stochastic=False, scale=scale)
    assert float((nearest - v).abs().mean()) > 5 * float((mean - v).abs().mean())  # rounding to nearest is biased


def test_quantize_error_shrinks_with_bits_and_is_half_a_step_when_rounding_to_nearest():
    u = _update()
    errors = [_relative_error(quantize_update(u, bits=b, generator=_gen()), u) for b in (1, 2, 4, 8, 16)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)) and errors[-1] < 1e-4
    v = u["fc.weight"]
    q = quantize_tensor(v, bits=4, stochastic=False)
    assert float((q - v).abs().max()) <= float(v.abs().max() / 15) + 1e-6
    assert torch.equal(quantize_tensor(torch.zeros(3, 4), bits=4, generator=_gen()), torch.zeros(3, 4))


def test_quantize_follows_the_seed():
    u = _update()
    a = quantize_update(u, bits=3, generator=_gen(7))
    b = quantize_update(u, bits=3, generator=_gen(7))
    c = quantize_update(u, bits=3, generator=_gen(8))
    assert all(torch.equal(a[k], b[k]) for k in u)
    assert any(not torch.equal(a[k], c[k]) for k in u)


# -- powersgd -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 3])
def test_powersgd_is_exact_for_a_matrix_of_its_rank(rank):
    g = _gen()
    m = torch.randn(20, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, 30, generator=g).double()
    approx = low_rank(m, rank=rank, power_iterations=1, generator=_gen(1))
    assert torch.allclose(approx, m, atol=1e-10)


def test_powersgd_approaches_the_best_rank_r_approximation_and_improves_with_rank():
    m = torch.randn(40, 30, generator=_gen(), dtype=torch.float64)
    sigma = torch.linalg.svdvals(m)
    previous = float("inf")
    for rank in (1, 2, 4, 8):
        best = float(sigma[rank:].pow(2).sum().sqrt())  # Eckart-Young
        one = float(torch.linalg.matrix_norm(m - low_rank(m, rank=rank, generator=_gen(1))))
        many = float(torch.linalg.matrix_norm(m - low_rank(m, rank=rank, power_iterations=100, generator=_gen(1))))
        assert best - 1e-9 <= many <= one and many < best * 1.01
        assert many < previous
        previous = many
    assert torch.allclose(low_rank(m, rank=30, generator=_gen()), m, atol=1e-10)  # full rank: exact


def test_powersgd_sends_vectors_untouched_reshapes_kernels_and_follows_the_seed():
    u = _update()
    out = powersgd_update(u, rank=2, generator=_gen(3))
    assert all(torch.equal(out[k], u[k]) for k in ("conv.bias", "fc.bias"))
    assert out["conv.weight"].shape == (6, 3, 5, 5)
    assert int(torch.linalg.matrix_rank(out["conv.weight"].reshape(6, -1))) == 2
    assert int(torch.linalg.matrix_rank(out["fc.weight"])) == 2
    again = powersgd_update(u, rank=2, generator=_gen(3))
    other = powersgd_update(u, rank=2, generator=_gen(4))
    assert all(torch.equal(out[k], again[k]) for k in u)
    assert not torch.equal(out["fc.weight"], other["fc.weight"])
    errors = [_relative_error(powersgd_update(u, rank=r, generator=_gen()), u) for r in (1, 2, 4, 10)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)) and errors[-1] < 1e-5  # rank 10: exact


# -- bytes --------------------------------------------------------------------------------------------------------


def test_bytes_sent_formulas():
    u = _update()  # 450 + 6 + 400 + 10 entries
    assert payload_bytes(u) == 4 * 866
    assert build_defense("noise").bytes_sent(u) == 4 * 866  # an update defense that does not compress
    assert build_defense("quantize", bits=8).bytes_sent(u) == 866 + 4 * 4
    assert build_defense("quantize", bits=1).bytes_sent(u) == 57 + 1 + 50 + 2 + 4 * 4  # whole bytes per tensor
    # conv (6, 75) and fc (10, 40) as P and Q; biases as float32
    assert build_defense("powersgd", rank=2).bytes_sent(u) == 4 * (2 * (6 + 75) + 2 * (10 + 40) + 6 + 10)
    assert build_defense("powersgd", rank=9).bytes_sent(u) == 4 * (6 * (6 + 75) + 9 * (10 + 40) + 6 + 10)
    chain = [parse_defense("noise:0.1"), parse_defense("quantize:4")]
    assert round_bytes(chain, u) == build_defense("quantize", bits=4).bytes_sent(u)
    assert round_bytes([parse_defense("mixup")], u) == round_bytes([], u) == payload_bytes(u)
    assert issubclass(type(chain[1]), UpdateDefense)


# -- settings and scenario ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("quantize:0", "quantize bits must be a whole number from 1 to 16 .* got 0: e.g. quantize:8"),
        ("quantize:17", "from 1 to 16"),
        ("quantize:2.5", "quantize bits must be an integer, got '2.5'"),
        ("quantize:bits=4,scale=l2", "quantize scale must be 'max' .* or 'norm' .* got 'l2'"),
        ("powersgd:0", "powersgd rank must be a whole number >= 1, got 0: e.g. powersgd:2"),
        ("powersgd:rank=2,power_iterations=0", "power_iterations must be a whole number >= 1"),
        ("powersgd:rnak=2", "did you mean 'rank'"),
    ],
)
def test_bad_settings_are_config_errors_that_say_how_to_fix_them(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_defense(spec)


def test_defaults_and_spec_round_trip():
    q, p = parse_defense("quantize"), parse_defense("powersgd")
    assert (q.settings.bits, q.settings.stochastic, q.settings.scale) == (8, True, "max")
    assert (p.settings.rank, p.settings.power_iterations) == (2, 1)
    assert not q.sparsifies and not p.sparsifies  # zeros they send are values, not dropped entries
    for spec in ("quantize:bits=3,stochastic=false,scale=norm", "powersgd:rank=4,power_iterations=3"):
        assert parse_defense(spec).spec() == spec


def test_scenario_applies_compression_deterministically(digits32):
    images, labels = gradinv.sample_batch(digits32, batch_size=2, seed=0)
    net = gradinv.build_model("lenet", num_classes=digits32.num_classes, image_size=32, seed=0)

    def observe(*defenses):
        sc = gradinv.Scenario.from_images(
            net, images, labels, normalization=digits32.normalization, defenses=defenses, seed=3
        )
        return sc.observe().update

    clean, q, q2 = observe(), observe("quantize:2"), observe("quantize:2")
    p = observe("powersgd:1")
    assert all(torch.equal(q[k], q2[k]) for k in clean)
    assert all(len(q[k].unique()) <= 4 for k in clean)
    for k, v in clean.items():
        if v.ndim >= 2:
            assert int(torch.linalg.matrix_rank(p[k].reshape(v.shape[0], -1))) <= 1
        else:
            assert torch.equal(p[k], v)


def test_prune_and_sign_price_their_encodings():
    from gradinv.defenses import build_defense, payload_bytes, round_bytes

    update = {"w": torch.zeros(100, 10), "b": torch.zeros(10)}
    assert payload_bytes(update) == 4 * 1010
    # prune 0.9: 100 of 1000 kept -> 400 B of values + a 125 B bitmap; 1 of 10 -> 4 B + a 2 B bitmap
    assert build_defense("prune", fraction=0.9).bytes_sent(update) == (400 + 125) + (4 + 2)
    assert build_defense("sign").bytes_sent(update) == (125 + 4) + (2 + 4)
    assert build_defense("sign", scaled=False).bytes_sent(update) == 125 + 2
    chain = [build_defense("noise", std=0.1), build_defense("sign")]
    assert round_bytes(chain, update) == 135 and round_bytes(chain[:1], update) == payload_bytes(update)
