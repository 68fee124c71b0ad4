from __future__ import annotations

import json
import math

import pytest
import torch
from scipy.stats import norm
from torch import nn

import gradinv
from gradinv.cli import main
from gradinv.defenses import (
    DEFENSES,
    ClientBatch,
    build_defense,
    dp_epsilon,
    gaussian_epsilon,
    parse_defense,
)
from gradinv.defenses import functional as D
from gradinv.errors import ConfigError
from gradinv.fl.functional import layer_input, stateless_twin
from gradinv.types import named_state

SURVEY_TABLE_2 = {"mixup", "instahide", "pixelate", "dropout", "noise", "dpsgd", "prune", "sign", "soteria"}


def _scenario(data, *, model="mlp", batch_size=4, seed=0, **options):
    images, labels = gradinv.sample_batch(data, batch_size=batch_size, seed=seed)
    net = gradinv.build_model(model, num_classes=data.num_classes, image_size=32, seed=seed)
    return gradinv.Scenario.from_images(net, images, labels, normalization=data.normalization, **options)


def _tiny_mlp(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))


# -- registry and specs ------------------------------------------------------------------------------------------


def test_registry_holds_the_survey_defenses_and_specs_round_trip():
    assert set(DEFENSES) >= SURVEY_TABLE_2
    for name in DEFENSES:
        d = build_defense(name)
        assert d.stage in ("data", "model", "update")
        again = parse_defense(d.spec())
        assert type(again) is type(d) and again.settings == d.settings


def test_spec_forms():
    assert parse_defense("prune:0.5").settings.fraction == 0.5
    assert parse_defense("noise:std=0.1,clip=2,distribution=laplace").settings.clip == 2.0
    assert parse_defense("sign:false").settings.scaled is False
    assert parse_defense("soteria:fraction=0.3,layer=none").settings.layer is None


@pytest.mark.parametrize(
    "spec",
    ["bogus", "noise:abc", "noise:sdt=1", "prune:0.5,0.6", "prune:1.5", "noise:-1", "mixup:1", "sign:maybe"],
)
def test_bad_specs_raise_config_errors(spec):
    with pytest.raises(ConfigError):
        parse_defense(spec)


def test_one_registry_and_grammar_behind_the_defense_names():
    import gradinv.registry
    from gradinv.fl.client import ClientBatch as FLClientBatch

    assert DEFENSES is gradinv.registry.DEFENSES and ClientBatch is FLClientBatch
    assert parse_defense == DEFENSES.parse and build_defense == DEFENSES.build
    assert parse_defense("PRUNE: 0.5").settings.fraction == 0.5
    assert parse_defense("pixelate:epsilon=1e-1,block=2").spec() == "pixelate:block=2,epsilon=0.1,m=16"
    assert build_defense("sign", scaled=False).spec() == "sign:scaled=false"
    for message, spec in [
        ("unknown defense 'prun' \\(did you mean 'prune'\\?\\): choose one of dpsgd, dropout", "prun:0.9"),
        (
            "noise has no setting 'sdt' \\(did you mean 'std'\\?\\): its settings are std, clip, distribution",
            "noise:sdt=1",
        ),
        ("noise std must be a number, got 'abc'", "noise:abc"),
        ("sign scaled must be true or false, got 'maybe'", "sign:maybe"),
        ("sets 'std' twice", "noise:std=1,std=2"),
        ("a defense spec is a string", 0.9),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_defense(spec)


class _Double:
    """A defense that is no gradinv class: a name, a stage, a spec and a transform are all a scenario needs."""

    name = "double"
    stage = "update"

    def spec(self) -> str:
        return "double"

    def transform(self, update, *, client, generator):
        return {k: 2 * v for k, v in update.items()}


def test_the_scenario_tells_stages_apart_by_name_not_by_class(digits32):
    clean = _scenario(digits32).observe()
    doubled = _scenario(digits32, defenses=(_Double(),)).observe()
    assert all(torch.allclose(doubled.update[k], 2 * clean.update[k]) for k in clean.update)
    with pytest.raises(ConfigError, match="data, then model, then update"):
        _scenario(digits32, defenses=(_Double(), "mixup"))


def test_adaptive_matching_asks_the_defense_objects_whether_they_sparsify(digits32):
    from gradinv.attacks.components.replay import sent_entries

    assert sent_entries(_scenario(digits32, defenses=("noise:0.01",)).observe()) is None
    pruned = _scenario(digits32, defenses=("prune:0.5",)).observe()
    masks = sent_entries(pruned)
    assert masks is not None and all(torch.equal(masks[k], (pruned.update[k] != 0).float()) for k in masks)


def test_defenses_must_act_data_first(digits32):
    with pytest.raises(ConfigError, match="data, then model, then update"):
        _scenario(digits32, defenses=("noise:0.1", "mixup"))
    with pytest.raises(ConfigError, match="first update defense"):
        _scenario(digits32, defenses=("prune:0.5", "dpsgd"))
    _scenario(digits32, defenses=("dpsgd", "prune:0.5")).observe()  # DP-SGD's update, then pruned


# -- update defenses: their maths ------------------------------------------------------------------------------


def _update(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(40, 50, generator=g), "a.bias": torch.randn(40, generator=g)}


def test_prune_zeroes_exactly_the_smallest_fraction_of_each_tensor():
    update = _update()
    pruned = D.prune_smallest(update, 0.7)
    for k, v in update.items():
        kept = pruned[k] != 0
        assert int((~kept).sum()) == round(0.7 * v.numel())
        assert torch.equal(pruned[k][kept], v[kept])
        assert v[kept].abs().min() >= v[~kept].abs().max()


def test_sign_sends_signs_scaled_by_mean_magnitude():
    update = _update()
    signed = D.scaled_sign(update)
    for k, v in update.items():
        assert torch.allclose(signed[k].abs(), v.abs().mean().expand_as(v))
        assert torch.equal(torch.sign(signed[k]), torch.sign(v))


@pytest.mark.parametrize("distribution", ["gaussian", "laplace"])
def test_noise_has_the_asked_std_and_follows_the_seed(distribution):
    zero = {"w": torch.zeros(200_000)}
    a = D.add_noise(zero, std=0.3, generator=torch.Generator().manual_seed(1), distribution=distribution)["w"]
    b = D.add_noise(zero, std=0.3, generator=torch.Generator().manual_seed(1), distribution=distribution)["w"]
    c = D.add_noise(zero, std=0.3, generator=torch.Generator().manual_seed(2), distribution=distribution)["w"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(float(a.std()) - 0.3) < 0.01 and abs(float(a.mean())) < 0.01
    kurtosis = float(((a / a.std()) ** 4).mean())
    assert abs(kurtosis - (3.0 if distribution == "gaussian" else 6.0)) < 0.5


def test_noise_clip_bounds_the_global_norm():
    update = _update()
    clipped = D.clip_update(update, 1.5)
    assert float(D.global_norm(clipped)) == pytest.approx(1.5, rel=1e-5)
    small = D.clip_update(update, 1e6)
    assert all(torch.equal(small[k], update[k]) for k in update)


def test_dpsgd_matches_a_naive_per_sample_loop(digits32):
    """Oracle: with zero noise, DP-SGD's update is the mean of per-sample gradients each clipped to C."""
    sc = _scenario(digits32, batch_size=5, defenses=("dpsgd:noise_multiplier=0,clip=0.05",))
    obs = sc.observe()
    expected = _clipped_mean_gradient(sc.model, sc.inputs, sc.labels, 0.05)
    for n in expected:
        assert torch.allclose(obs.update[n], expected[n], atol=1e-6)
    noisy = _scenario(digits32, batch_size=5, defenses=("dpsgd:noise_multiplier=2,clip=0.05",)).observe()
    diff = torch.cat([(noisy.update[n] - obs.update[n]).flatten() for n in expected])
    assert float(diff.std()) == pytest.approx(2 * 0.05 / 5, rel=0.05)


def _clipped_mean_gradient(model, xs, ys, clip):
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, y in zip(xs, ys, strict=True):
        model.zero_grad()
        nn.functional.cross_entropy(model(x.unsqueeze(0)), y.unsqueeze(0)).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        norm_ = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
        for n, g in grads.items():
            total[n] += g * min(1.0, clip / norm_) / len(xs)
    return total


def test_dpsgd_under_fedavg_takes_private_local_steps(digits32):
    """Oracle: with zero noise, DP-FedAvg's delta is K local SGD steps on clipped per-sample gradients."""
    import copy

    protocol = gradinv.FedAvg(local_steps=3, lr=0.5, local_batch_size=2)
    sc = _scenario(digits32, batch_size=4, protocol=protocol, defenses=("dpsgd:noise_multiplier=0,clip=0.05",))
    obs = sc.observe()
    model = copy.deepcopy(sc.model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(3):
        idx = torch.arange(step * 2, step * 2 + 2) % 4
        g = _clipped_mean_gradient(model, sc.inputs[idx], sc.labels[idx], 0.05)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p -= 0.5 * g[n]
    for n, p in model.named_parameters():
        assert torch.allclose(obs.update[n], p.detach() - start[n], atol=1e-6)
    # each sample is in ceil(3 * 2 / 4) = 2 of the 3 local steps: two Gaussian mechanisms compose
    eps = dp_epsilon([build_defense("dpsgd", noise_multiplier=1.0)], protocol=protocol, num_samples=4)
    assert eps == pytest.approx(gaussian_epsilon(1.0, delta=1e-5, rounds=2))


def test_dpsgd_follows_a_shuffling_clients_order(digits32):
    """With zero noise and a clip no gradient reaches, DP-FedAvg on a shuffling client equals the plain shuffled
    update: the private steps take the same (private) sample order as the protocol's own loop."""
    protocol = gradinv.FedAvg(local_steps=4, lr=0.5, local_batch_size=1, shuffle=True)
    plain = _scenario(digits32, batch_size=3, protocol=protocol, seed=7).observe()
    private = _scenario(
        digits32, batch_size=3, protocol=protocol, seed=7, defenses=("dpsgd:noise_multiplier=0,clip=1e6",)
    ).observe()
    for k in plain.update:
        torch.testing.assert_close(private.update[k], plain.update[k], rtol=1e-5, atol=1e-7)


def test_gaussian_epsilon_solves_the_privacy_curve_and_composes():
    eps = gaussian_epsilon(1.0, delta=1e-5)
    mu = 1.0
    delta = norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)
    assert delta == pytest.approx(1e-5, rel=1e-6)
    assert 4.0 < eps < 4.8  # below the classical sqrt(2 ln(1.25/delta)) calibration's 4.84
    assert gaussian_epsilon(2.0, delta=1e-5) < eps
    assert gaussian_epsilon(2.0, delta=1e-5, rounds=4) == pytest.approx(eps, rel=1e-9)
    assert dp_epsilon([build_defense("dpsgd", noise_multiplier=1.0)]) == pytest.approx(eps)
    assert dp_epsilon([build_defense("noise")]) is None


def test_soteria_scores_match_a_per_feature_autograd_loop():
    model = _tiny_mlp()
    twin = stateless_twin(model, train_mode=False)
    params, buffers = named_state(model)
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(0))
    scores = D.soteria_scores(layer_input(twin, params, buffers, "3"), x, eps=0.1, chunk=4)
    expected = torch.zeros(6)
    for i in range(3):
        xi = x[i : i + 1].clone().requires_grad_(True)
        r = torch.relu(model[1](model[0](xi)))[0]
        for f in range(6):
            (g,) = torch.autograd.grad(r[f], xi, retain_graph=True, allow_unused=True)
            g = torch.zeros_like(xi) if g is None else g
            expected[f] += g.norm() / (r[f].detach() + 0.1)
    assert torch.allclose(scores, expected, atol=1e-5)


def test_soteria_zeroes_only_representation_columns(digits32):
    clean = _scenario(digits32, batch_size=2).observe()
    obs = _scenario(digits32, batch_size=2, defenses=("soteria:0.5",)).observe()
    name = gradinv.models.classifier_layer(obs.model)[0]
    for k in clean.update:
        if k != f"{name}.weight":
            assert torch.equal(obs.update[k], clean.update[k])
    w, w0 = obs.update[f"{name}.weight"], clean.update[f"{name}.weight"]
    zero_cols = (w == 0).all(dim=0)
    assert int(zero_cols.sum()) >= round(0.5 * w.shape[1])
    assert torch.equal(w[:, ~zero_cols], w0[:, ~zero_cols])


# -- data defenses ----------------------------------------------------------------------------------------------


def _batch(data, b=6):
    images, labels = gradinv.sample_batch(data, batch_size=b, seed=0)
    return ClientBatch(data.normalization.normalize(images), labels, data.normalization, data.num_classes)


def test_mixup_makes_convex_mixes_of_the_batch_and_its_labels(digits32):
    batch = _batch(digits32)
    g = torch.Generator().manual_seed(0)
    partners = D.mix_partners(6, 3, generator=g)
    coeffs = D.dirichlet_coefficients(6, 3, alpha=1.0, generator=g)
    assert all(int(partners[i, 0]) == i and len(set(partners[i].tolist())) == 3 for i in range(6))
    assert torch.allclose(coeffs.sum(dim=1), torch.ones(6, dtype=coeffs.dtype)) and bool((coeffs >= 0).all())
    mixed, targets = D.mix(batch.inputs, batch.soft_targets(), partners=partners, coeffs=coeffs)
    c = coeffs.float()
    expected = sum(c[:, j].view(-1, 1, 1, 1) * batch.inputs[partners[:, j]] for j in range(3))
    assert torch.allclose(mixed, expected, atol=1e-6)
    assert torch.allclose(targets.sum(dim=1), torch.ones(6))
    out = build_defense("mixup").transform(batch, generator=torch.Generator().manual_seed(0))
    assert out.targets.shape == (6, digits32.num_classes) and out.inputs.shape == batch.inputs.shape


def test_instahide_flips_signs_of_a_bounded_mix(digits32):
    batch = _batch(digits32)
    coeffs = D.instahide_coefficients(6, 4, upper=0.65, generator=torch.Generator().manual_seed(0))
    assert float(coeffs.max()) <= 0.65 and torch.allclose(coeffs.sum(dim=1), torch.ones(6, dtype=coeffs.dtype))
    x, key = D.random_sign_flip(batch.inputs, generator=torch.Generator().manual_seed(0))
    assert set(key.unique().tolist()) == {-1.0, 1.0} and torch.equal(x.abs(), batch.inputs.abs())
    out = build_defense("instahide").transform(batch, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.targets.sum(dim=1), torch.ones(6))
    with pytest.raises(ConfigError, match="at least 4"):
        build_defense("instahide").transform(_batch(digits32, 3), generator=torch.Generator())


def test_pixelate_makes_constant_blocks(photos32):
    images = gradinv.sample_batch(photos32, batch_size=2, seed=0)[0]
    out = D.pixelate(images, block=4)
    cells = out.unfold(2, 4, 4).unfold(3, 4, 4)
    assert torch.allclose(cells.amax(dim=(-1, -2)), cells.amin(dim=(-1, -2)))
    assert torch.allclose(cells.mean(dim=(-1, -2)), nn.functional.avg_pool2d(images, 4), atol=1e-6)
    assert torch.equal(D.pixelate(images, block=1), images)
    odd = D.pixelate(images[..., :30, :30], block=4)  # edge cells are averaged over what they hold
    assert odd.shape == (2, 3, 30, 30) and torch.allclose(odd[..., 28:, 28:].mean(), images[..., 28:30, 28:30].mean())
    noisy = D.dp_pixelate(images, block=4, epsilon=1.0, m=16, generator=torch.Generator().manual_seed(0))
    assert float(noisy.min()) >= 0 and float(noisy.max()) <= 1 and not torch.allclose(noisy, out)


# -- the scenario with defenses ---------------------------------------------------------------------------------


def test_defended_observation_is_deterministic_and_leaves_truth_and_model_alone(digits32):
    specs = ("mixup", "noise:0.01", "soteria:0.3")
    sc = _scenario(digits32, defenses=specs, seed=0)
    before = {k: v.clone() for k, v in sc.model.state_dict().items()}
    a, b = sc.observe(), sc.observe()
    assert all(torch.equal(a.update[k], b.update[k]) for k in a.update)
    assert [d.name for d in a.defenses] == ["mixup", "noise", "soteria"]  # objects, not strings
    truth = sc.ground_truth()
    assert torch.equal(truth.inputs, sc.inputs)
    assert all(torch.equal(before[k], v) for k, v in sc.model.state_dict().items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in sc.model.modules())
    other = _scenario(digits32, defenses=specs, seed=0)
    other = gradinv.Scenario(other.model, other.inputs, other.labels, defenses=specs, seed=1).observe()
    assert not all(torch.equal(a.update[k], other.update[k]) for k in a.update)


def test_noise_degrades_the_analytic_attack_that_pruning_does_not_stop(photos32):
    """Phong et al.'s inversion divides a row's weight gradient by its bias gradient: noise of 1e-2 ruins it,
    while pruning half of each tensor keeps the rows with the largest bias gradient whole."""
    psnr = {}
    for spec in (None, "noise:0.01", "prune:0.5"):
        sc = _scenario(photos32, batch_size=1, defenses=(spec,) if spec else ())
        rec = gradinv.build_attack("analytic").reconstruct(sc.observe())
        psnr[spec] = gradinv.score_images(rec.images, sc.ground_truth().images).mean_psnr
    assert psnr[None] > 60 and psnr["prune:0.5"] > 60
    assert psnr["noise:0.01"] < psnr[None] - 20


# -- the CLI --------------------------------------------------------------------------------------------------------

FAST = ["--model", "mlp", "--data", "digits", "--quiet"]


def test_cli_attack_records_defenses_and_epsilon(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["attack", "analytic", *FAST, "--defense", "dpsgd:noise_multiplier=1,clip=1", "--out", str(out)])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["defenses"] == ["dpsgd:noise_multiplier=1.0,clip=1.0,delta=1e-05"]
    assert m["dp_epsilon"] == pytest.approx(gaussian_epsilon(1.0, delta=1e-5))


def test_cli_capture_applies_defenses_and_the_attack_reads_them_back(tmp_path, capsys):
    out = tmp_path / "cap"
    setup = ["--batch-size", "4", "--clients", "2", "--local-steps", "2", "--defense", "prune:0.9"]
    assert main(["capture", *FAST[:-1], *setup, "--out", str(out)]) == 0
    meta = json.loads((out / "capture.json").read_text())
    assert meta["defenses"] == ["prune:fraction=0.9"] and meta["clients"] == 2
    run = tmp_path / "run"
    files = ["--weights", str(out / "weights.safetensors"), "--update", str(out / "update.safetensors")]
    argv = ["attack", "invgrad", *FAST, "--batch-size", "4", *files, "--iterations", "2", "--out", str(run)]
    assert main(argv) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["defenses"] == ["prune:fraction=0.9"] and m["clients"] == 2 and m["protocol"]["local_steps"] == 2


@pytest.mark.parametrize(
    "extra",
    [
        ["--defense", "bogus"],
        ["--defense", "prune:2"],
        ["--defense", "mixup"],  # batch 1 has nothing to mix with
        ["--defense", "noise:0.1", "--update", "missing.safetensors"],
    ],
)
def test_cli_defense_mistakes_are_one_line_errors(tmp_path, capsys, extra):
    out = tmp_path / "bad"
    code = main(["attack", "analytic", *FAST, *extra, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


# -- the defense sweep ----------------------------------------------------------------------------------------------


def test_bench_defenses_writes_table_picture_and_resumes(tmp_path):
    from gradinv.experiments import Case
    from gradinv.experiments.defenses import bench_defenses
    from gradinv.experiments.store import StoreError

    out = tmp_path / "sweep"
    case = Case(model="mlp", data="digits")
    kw = dict(attack="analytic", samples=2, out=out)
    first = bench_defenses(case, defenses=["noise:1e-2", "mixup", "dpsgd:1"], **kw)
    rows = {r["defense"].split(":")[0]: r for r in first["summary"]}
    assert rows["none"]["psnr"] > 60 and rows["none"]["update_cosine"] == pytest.approx(1.0)
    assert rows["noise"]["psnr"] < rows["none"]["psnr"] - 20 and rows["noise"]["update_cosine"] < 1
    assert rows["mixup"]["answered"] == 0 and "at least 2" in rows["mixup"]["declined"]
    assert rows["dpsgd"]["dp_epsilon"] == pytest.approx(gaussian_epsilon(1.0, delta=1e-5))
    for name in ("defenses.json", "defenses.md", "defenses.png", "report.html", "results.csv"):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "defenses.json").read_text())
    assert len(saved["trials"]) == 2 * 4
    with pytest.raises(StoreError, match="--resume"):  # a finished sweep is not silently rerun or mixed
        bench_defenses(case, defenses=["noise:1e-2", "mixup", "dpsgd:1"], **kw)
    again = bench_defenses(case, defenses=["noise:1e-2", "mixup", "dpsgd:1", "sign"], resume=True, **kw)
    assert len(again["trials"]) == 2 * 5
    old = {t["key"]: t for t in first["trials"]}
    assert all(old[t["key"]] == t for t in again["trials"] if t["key"] in old)  # finished runs kept, not redone
    with pytest.raises(StoreError, match="other settings"):  # fewer samples: old seeds would mix into medians
        bench_defenses(case, defenses=["noise:1e-2", "mixup", "dpsgd:1", "sign"], resume=True, **{**kw, "samples": 1})


def test_cli_bench_defenses(tmp_path, capsys):
    out = tmp_path / "b"
    argv = ["bench", "defenses", "--attack", "analytic", "--model", "mlp", "--data", "digits", "--samples", "1"]
    assert main([*argv, "--defense", "prune:0.9", "--out", str(out), "--quiet"]) == 0
    assert "prune:fraction=0.9" in capsys.readouterr().out
    assert main([*argv, "--out", str(tmp_path / "c")]) == 2  # no --defense
    assert main([*argv, "--defense", "nope", "--out", str(tmp_path / "d")]) == 2
    assert not (tmp_path / "d").exists()


# -- secure aggregation: several clients, the server sees their mean update ------------------------------------


def test_fedsgd_aggregate_of_equal_clients_is_the_batch_gradient(digits32):
    one = _scenario(digits32, batch_size=6).observe()
    three = _scenario(digits32, batch_size=6, clients=3).observe()
    assert three.clients == 3
    assert all(torch.allclose(one.update[k], three.update[k], atol=1e-6) for k in one.update)


def test_fedavg_aggregate_is_the_weighted_mean_of_client_rounds_and_replays_exactly(digits32):
    from gradinv.attacks.components.objectives import OBJECTIVES
    from gradinv.attacks.components.replay import matching_cost

    protocol = gradinv.FedAvg(local_steps=3, lr=0.5, local_batch_size=1)
    sc = _scenario(digits32, batch_size=5, clients=2, protocol=protocol)
    obs = sc.observe()
    parts = [sc.inputs[:3], sc.inputs[3:]], [sc.labels[:3], sc.labels[3:]]
    alone = [gradinv.Scenario(sc.model, x, y, protocol=protocol).observe().update for x, y in zip(*parts, strict=True)]
    for k in obs.update:
        assert torch.allclose(obs.update[k], 0.6 * alone[0][k] + 0.4 * alone[1][k], atol=1e-6)
    cost = matching_cost(obs, objective=OBJECTIVES["euclidean"])
    assert float(cost(sc.inputs, sc.labels)) < 1e-10
    shuffled = torch.cat([sc.inputs[3:], sc.inputs[:3]])  # the same samples, other clients: another update
    assert float(cost(shuffled, torch.cat([sc.labels[3:], sc.labels[:3]]))) > 1e-8


def test_each_client_defends_its_own_update(digits32):
    sc = _scenario(digits32, batch_size=4, clients=2, defenses=("noise:0.1",))
    clean = _scenario(digits32, batch_size=4, clients=2).observe()
    diff = torch.cat([(sc.observe().update[k] - clean.update[k]).flatten() for k in clean.update])
    assert float(diff.std()) == pytest.approx(0.1 / 2**0.5, rel=0.05)  # mean of two independent noises
    with pytest.raises(ConfigError, match="cannot share"):
        _scenario(digits32, batch_size=2, clients=3)


def test_dropout_masks_the_clients_classifier_input_only(digits32):
    clean = _scenario(digits32, batch_size=3).observe()
    sc = _scenario(digits32, batch_size=3, defenses=("dropout:0.5",))
    a, b = sc.observe(), sc.observe()
    name = gradinv.models.classifier_layer(a.model)[0]
    w, w0 = a.update[f"{name}.weight"], clean.update[f"{name}.weight"]
    assert torch.equal(w, b.update[f"{name}.weight"]) and not torch.allclose(w, w0)
    assert float((w == 0).all(dim=0).float().mean()) > 0.2  # inputs dropped for all 3 samples give zero columns
    assert not any(m._forward_pre_hooks for m in a.model.modules()) and not any(
        m._forward_pre_hooks for m in sc.model.modules()
    )
    none = _scenario(digits32, batch_size=3, defenses=("dropout:0",)).observe()
    assert all(torch.equal(none.update[k], clean.update[k]) for k in clean.update)
    with pytest.raises(ConfigError, match="dropout"):
        _scenario(digits32, batch_size=3, defenses=("dropout", "dpsgd")).observe()


# -- adaptive attacks: the server knows the protocol, so it matches only what a pruned update sent --------------


@pytest.mark.parametrize("seed", [0, 2])
def test_adaptive_invgrad_undoes_pruning(seed):
    data = gradinv.load_dataset("photos", image_size=16)
    images, labels = gradinv.sample_batch(data, batch_size=1, seed=seed)
    net = gradinv.build_model("convnet", num_classes=10, width=8, seed=seed, image_size=16)
    psnr = {}
    for spec, adaptive in [(None, True), ("prune:0.9", False), ("prune:0.9", True)]:
        sc = gradinv.Scenario.from_images(
            net, images, labels, normalization=data.normalization, defenses=(spec,) if spec else ()
        )
        rec = gradinv.build_attack("invgrad", iterations=150, adaptive=adaptive).reconstruct(sc.observe(), seed=seed)
        psnr[spec, adaptive] = gradinv.score_images(rec.images, sc.ground_truth().images).mean_psnr
    assert psnr["prune:0.9", True] > psnr["prune:0.9", False] + 1.5
    assert psnr["prune:0.9", True] > psnr[None, True] - 1.0


def test_defended_accuracy_prices_the_defense(digits32):
    from gradinv.experiments.defenses import defended_accuracy

    net = gradinv.build_model("mlp", num_classes=10, image_size=32, seed=0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    clean = defended_accuracy(net, digits32, (), steps=100)
    noisy = defended_accuracy(net, digits32, ("noise:1.0",), steps=100)
    assert clean > 0.85 and noisy < clean - 0.3
    assert defended_accuracy(net, digits32, (), steps=100) == clean  # seeded
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_bench_defenses_reports_accuracy_with_utility_steps(tmp_path):
    from gradinv.experiments import Case
    from gradinv.experiments.defenses import bench_defenses, markdown_table

    case = Case(model="mlp", data="digits")
    result = bench_defenses(case, attack="analytic", samples=1, defenses=["noise:1.0"], utility_steps=30)
    rows = {r["defense"]: r for r in result["summary"]}
    assert rows["none"]["accuracy"] > rows["noise:std=1.0,clip=none,distribution=gaussian"]["accuracy"]
    assert "accuracy" in markdown_table(result["config"], result["summary"])


def test_cli_lists_defenses_and_labels_take_them(tmp_path, capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in DEFENSES)
    argv = ["labels", "ilrg", "--model", "mlp", "--data", "digits", "--batch-size", "8", "--trials", "2", "--quiet"]
    assert main([*argv, "--defense", "noise:1e-3", "--clients", "2"]) == 0
    assert "ilrg on mlp" in capsys.readouterr().out


def test_cli_refuses_bad_aggregation_metadata_in_an_update_file(tmp_path, capsys):
    from safetensors.torch import load_file

    from gradinv.io import save_update

    out = tmp_path / "cap"
    assert main(["capture", *FAST[:-1], "--out", str(out)]) == 0
    update = load_file(str(out / "update.safetensors"))
    for meta in ({"clients": "two"}, {"defenses": ["nope"]}, {"defenses": "prune"}):
        bad = tmp_path / "bad.safetensors"
        save_update(update, bad, metadata={"protocol": {"name": "fedsgd"}, **meta})
        run = tmp_path / "run"
        code = main(["attack", "analytic", *FAST, "--update", str(bad), "--out", str(run)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and not run.exists()


def test_dpsgd_in_train_mode_refuses_batchnorm_only(digits32):
    spec = ("dpsgd:noise_multiplier=0.5,clip=1",)
    eval_mode = _scenario(digits32, batch_size=3, defenses=spec).observe()
    train_mode = _scenario(digits32, batch_size=3, defenses=spec, train_mode=True).observe()  # MLP: no BatchNorm
    assert all(torch.allclose(eval_mode.update[k], train_mode.update[k]) for k in eval_mode.update)
    with pytest.raises(ConfigError, match="BatchNorm"):
        _scenario(digits32, model="convnet", batch_size=3, defenses=spec, train_mode=True).observe()
