"""The iteration engine: its parts (inits, objectives, priors, schedules) and its loop (restarts, patience,
time budget, the two ways of differentiating)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.func import grad

from gradinv.attacks import build_attack
from gradinv.attacks.components.engine import MatchingSettings, optimise
from gradinv.attacks.components.inits import INITS
from gradinv.attacks.components.objectives import OBJECTIVES, layer_weights
from gradinv.attacks.components.optim import schedule_factor
from gradinv.attacks.components.priors import bn_targets, build_priors, group_consistency, total_variation
from gradinv.attacks.components.replay import box_bounds, matching_cost
from gradinv.data import sample_batch
from gradinv.errors import ConfigError
from gradinv.fl import FedAvg, Scenario
from gradinv.models import build_model
from gradinv.types import ThreatModel


def _obs(ds, model, *, b=1, **kw):
    images, labels = sample_batch(ds, batch_size=b, seed=0)
    sc = Scenario.from_images(model, images, labels, normalization=ds.normalization, **kw)
    return sc, sc.observe()


@pytest.mark.parametrize("name", sorted(INITS))
def test_inits_are_seeded_and_inside_the_box(name, digits32):
    shape = (2, 3, 3, 32, 32)
    _, obs = _obs(digits32, build_model("lenet", num_classes=10))
    bounds = box_bounds(obs, shape)
    a = INITS[name](shape, generator=torch.Generator().manual_seed(0), bounds=bounds)
    b = INITS[name](shape, generator=torch.Generator().manual_seed(0), bounds=bounds)
    assert a.shape == shape and torch.equal(a, b)
    if name != "gaussian":
        assert (a >= bounds[0] - 1e-6).all() and (a <= bounds[1] + 1e-6).all()
    if name == "pattern":  # a 4x4 patch tiled: the image repeats every 4 pixels
        assert torch.equal(a[..., :4, :4], a[..., 4:8, 4:8])


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objectives_are_zero_at_the_target_and_positive_elsewhere(name):
    g = torch.Generator().manual_seed(0)
    target = {"a.weight": torch.randn(4, 3, generator=g), "a.bias": torch.randn(4, generator=g)}
    other = {k: v + torch.randn(v.shape, generator=g) for k, v in target.items()}
    for weights in (None, layer_weights(list(target), "linear")):
        d = OBJECTIVES[name](target, weights=weights)
        assert float(d(target)) == pytest.approx(0, abs=1e-6)
        assert float(d(other)) > 0


@pytest.mark.parametrize("name", ["cosine", "layer_cosine"])
def test_fused_cosines_match_the_elementwise_formula_to_second_order_and_under_vmap(name):
    g = torch.Generator().manual_seed(1)
    target = {"w": torch.randn(3, 4, generator=g, dtype=torch.float64), "b": torch.randn(5, generator=g).double()}
    weights = {"w": 2.0, "b": 0.5}
    bias = torch.randn(5, generator=g, dtype=torch.float64)

    def elementwise(x: torch.Tensor) -> torch.Tensor:
        cand = {"w": x, "b": bias}
        if name == "layer_cosine":
            terms = [
                weights[k] * (1 - (cand[k] * t).sum() / (cand[k].pow(2).sum().sqrt() * t.pow(2).sum().sqrt()))
                for k, t in target.items()
            ]
            return sum(terms) / sum(weights.values())
        dot = sum(weights[k] * (cand[k] * t).sum() for k, t in target.items())
        norm = sum(weights[k] * cand[k].pow(2).sum() for k in target).sqrt()
        return 1 - dot / (norm * sum(weights[k] * t.pow(2).sum() for k, t in target.items()).sqrt())

    fused_distance = OBJECTIVES[name](target, weights=weights)

    def fused(x: torch.Tensor) -> torch.Tensor:
        return fused_distance({"w": x, "b": bias})

    x = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    for order in range(3):  # the value, its gradient, and the gradient of the gradient's sum
        a, b = fused(x), elementwise(x)
        for _ in range(order):
            (a,) = torch.autograd.grad(a.sum(), x, create_graph=True)
            (b,) = torch.autograd.grad(b.sum(), x, create_graph=True)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    xs = torch.randn(4, 3, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.vmap(grad(fused))(xs), torch.vmap(grad(elementwise))(xs), rtol=1e-12, atol=1e-14)


def test_layer_weights_and_schedules():
    names = ["c.weight", "c.bias", "f.weight", "f.bias"]
    assert layer_weights(names, "equal") is None
    assert layer_weights(names, "first") == {"c.weight": 1, "c.bias": 1, "f.weight": 0, "f.bias": 0}
    assert layer_weights(names, "linear")["c.weight"] == 1 and layer_weights(names, "linear")["f.bias"] == 0.25
    with pytest.raises(ConfigError, match="layer weights"):
        layer_weights(names, "nope")
    assert [schedule_factor("step", i, 80) for i in (0, 30, 50, 70)] == pytest.approx([1, 0.1, 0.01, 0.001])
    assert schedule_factor("cosine", 0, 100) == 1 and schedule_factor("cosine", 100, 100) == pytest.approx(0)
    assert [schedule_factor("none", i, 10, warmup=4) for i in (0, 3, 4)] == [0.25, 1, 1]


def test_bn_prior_targets_running_statistics_or_the_known_batch(photos32):
    model = build_model("convnet", num_classes=10, width=4, seed=0)
    sc, obs = _obs(photos32, model, b=2)
    running = bn_targets(obs)
    assert set(running) == {f"model.bn{i}" for i in range(8)}
    assert torch.equal(running["model.bn0"][0], obs.buffers["model.bn0.running_mean"])
    sc2, known = _obs(photos32, model, b=2, threat=ThreatModel(known_bn_statistics=True))
    exact = bn_targets(known)
    first = sc2.inputs  # bn0's input is conv0's output on the batch
    conv = model.model.conv0(first)
    torch.testing.assert_close(exact["model.bn0"][0], conv.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(exact["model.bn0"][1], conv.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)
    prior = build_priors(known, sc2.labels, {"bn": 1.0})
    assert float(prior(sc2.inputs)) == pytest.approx(0, abs=1e-4)  # the batch itself matches its own statistics
    assert float(prior(torch.zeros_like(sc2.inputs))) > 0.1
    with pytest.raises(ConfigError, match="BatchNorm"):
        build_priors(_obs(photos32, build_model("lenet", num_classes=10))[1], sc2.labels, {"bn": 1.0})


@pytest.mark.parametrize("train_mode", [False, True])
def test_replay_measures_the_batchnorm_prior_in_its_own_forward_pass(train_mode, photos32):
    """A BatchNorm prior fused into the FedSGD replay (no second forward pass) gives the cost and gradient of the
    prior evaluated separately (oracle), with autograd and under vmap; other protocols keep the separate pass."""
    from torch.func import vmap

    from gradinv.attacks.components.replay import _fused_batchnorm

    model = build_model("convnet", num_classes=10, width=4, seed=0)
    sc, obs = _obs(photos32, model, b=2, train_mode=train_mode, threat=ThreatModel(known_bn_statistics=True))
    prior = build_priors(obs, sc.labels, {"bn": 0.3, "tv": 1e-2})
    assert [w for w, _ in _fused_batchnorm(obs, prior)[0]] == [0.3]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    distance = matching_cost(obs, objective=OBJECTIVES["cosine"])
    for autograd in (True, False):
        fused = matching_cost(obs, objective=OBJECTIVES["cosine"], prior=prior, autograd=autograd)
        xr, xs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        value = fused(xr, sc.labels)
        separate = distance(xs, sc.labels) + prior(xs)
        torch.testing.assert_close(value, separate, rtol=1e-5, atol=1e-6)
        (g_fused,) = torch.autograd.grad(value, xr)
        (g_separate,) = torch.autograd.grad(separate, xs)
        torch.testing.assert_close(g_fused, g_separate, rtol=1e-4, atol=1e-7)
    func = matching_cost(obs, objective=OBJECTIVES["cosine"], prior=prior)
    batched = vmap(grad(func), in_dims=(0, None))(torch.stack([x, x + 0.1]), sc.labels)
    torch.testing.assert_close(batched[0], g_separate, rtol=1e-4, atol=1e-7)
    fedavg = _obs(photos32, model, b=2, train_mode=train_mode, protocol=FedAvg(local_steps=2, lr=0.1))[1]
    assert _fused_batchnorm(fedavg, build_priors(fedavg, sc.labels, {"bn": 0.3}))[0] == []


def test_group_consistency_is_zero_for_equal_restarts():
    x = torch.randn(1, 2, 3, 4, 4).expand(3, 2, 3, 4, 4)
    assert float(group_consistency(x)) == pytest.approx(0, abs=1e-12)
    assert float(group_consistency(torch.randn(3, 2, 3, 4, 4))) > 0


@pytest.mark.parametrize("protocol", [None, FedAvg(local_steps=2, lr=0.1)])
def test_autograd_and_func_replays_give_the_same_gradient(protocol, digits32):
    """The engine's two ways of differentiating the cost agree (oracle test)."""
    kw = {} if protocol is None else {"protocol": protocol}
    sc, obs = _obs(digits32, build_model("convnet", num_classes=10, width=4, seed=0), b=2, **kw)
    prior = lambda x: 1e-3 * total_variation(x)  # noqa: E731
    func = matching_cost(obs, objective=OBJECTIVES["cosine"], prior=prior)
    auto = matching_cost(obs, objective=OBJECTIVES["cosine"], prior=prior, autograd=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    xr = x.clone().requires_grad_(True)
    (g_auto,) = torch.autograd.grad(auto(xr, sc.labels), xr)
    torch.testing.assert_close(g_auto, grad(func)(x, sc.labels), rtol=1e-4, atol=1e-7)


def _quadratic(target):
    return lambda x: ((x - target) ** 2).sum()


def test_engine_patience_time_budget_and_trace():
    target = torch.full((1, 2, 2), 0.5)
    settings = MatchingSettings(
        iterations=10_000, optimizer="adam", lr=0.05, schedule="none", patience=25, log_every=100
    )
    r = optimise(_quadratic(target), torch.zeros(2, 1, 2, 2), settings=settings, bounds=None)
    assert r.stopped == "patience" and r.iterations_run < 10_000
    assert r.candidates.shape == (2, 1, 2, 2) and float(r.costs.max()) < 0.05  # from 1.0
    assert r.trace[-1].iteration == r.iterations_run - 1
    slow = lambda x: (torch.ones(300, 300) @ torch.ones(300, 300)).sum() * 0 + ((x - target) ** 2).sum()  # noqa: E731
    budget = dataclasses.replace(settings, patience=0, time_budget=0.05)
    r = optimise(slow, torch.zeros(1, 1, 2, 2), settings=budget, bounds=None)
    assert r.stopped == "time_budget" and r.iterations_run < 10_000 and r.trace[-1].seconds >= 0.05
    lbfgs = dataclasses.replace(settings, optimizer="lbfgs", iterations=50, patience=3, lr=1)
    r = optimise(_quadratic(target), torch.zeros(2, 1, 2, 2), settings=lbfgs, bounds=None)
    assert float(r.costs.max()) < 1e-8 and r.stopped in ("converged", "patience")


def test_group_weight_pulls_restarts_together():
    target = torch.zeros(1, 4)
    x0 = torch.randn(3, 1, 4, generator=torch.Generator().manual_seed(0))
    free = MatchingSettings(iterations=30, lr=0.01, schedule="none", optimizer="sgd")
    cost = lambda x: 0 * x.sum() + ((x - target) ** 2).sum() * 0  # noqa: E731  (only the group term moves x)
    spread = lambda r: float(group_consistency(r.candidates))  # noqa: E731
    alone = optimise(cost, x0, settings=free, bounds=None)
    pulled = optimise(cost, x0, settings=dataclasses.replace(free, group=10.0), bounds=None)
    assert spread(pulled) < 0.5 * spread(alone)


def test_patience_and_time_budget_reach_the_attacks(digits32):
    sc, obs = _obs(digits32, build_model("lenet", num_classes=10, seed=0))
    r = build_attack("invgrad", iterations=5000, patience=5, min_improvement=0.5).reconstruct(obs)
    assert r.extras["stopped"] == "patience" and r.extras["iterations_run"] < 100
    r = build_attack("dlg", iterations=5000, time_budget=0.5).reconstruct(obs)
    # the budget is checked after every L-BFGS step (up to 20 inner iterations), long before the 5,000 steps
    assert r.extras["stopped"] in ("time_budget", "converged") and r.extras["lbfgs_iterations"] < 5000 * 20 // 10


def test_lbfgs_refines_in_float64_where_float32_cannot_resolve_a_decrease():
    """A least-squares cost whose float32 residuals are multiples of ~1e-3 (they pass through 1e4): float32 stalls
    within ~1e-3 of the minimum, and refining continues in float64 from the same point."""
    import time

    from gradinv.attacks.components.lbfgs import lbfgs_match

    a = torch.tensor([[2.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 4.0]], dtype=torch.float64)
    b = torch.tensor([1 / 3, 1 / 7, 1 / 11], dtype=torch.float64)
    solution = torch.linalg.solve(a, b)

    def cost(x, _y):
        return ((a.to(x.dtype) @ x + 1e4) - (b + 1e4).to(x.dtype)).pow(2).sum() + 1  # never 0: no early stop

    def run(refine):
        x, _, value, _, counts = lbfgs_match(
            cost,
            torch.zeros(3),
            None,
            iterations=30,
            inner_iterations=20,
            lr=1.0,
            history_size=10,
            line_search="strong_wolfe",
            log_every=10,
            desc="t",
            progress=False,
            callback=None,
            start=time.perf_counter(),
            refine=(lambda: cost) if refine else None,
        )
        return x, counts

    coarse, counts = run(False)
    assert counts["refined_at"] is None and float((coarse - solution).abs().max()) > 1e-5
    fine, counts = run(True)
    assert counts["refined_at"] is not None and fine.dtype == torch.float32
    assert float((fine - solution).abs().max()) < 1e-6


def test_observation_in_precision_casts_floats_and_leaves_the_original(digits32):
    model = build_model("convnet", num_classes=10, width=8)
    _, obs = _obs(digits32, model, threat=ThreatModel(known_bn_statistics=True))
    wide = obs.in_precision(torch.float64)
    assert all(v.dtype == torch.float64 for v in (*wide.update.values(), *wide.parameters.values()))
    assert next(wide.model.parameters()).dtype == torch.float64 and next(obs.model.parameters()).dtype == torch.float32
    assert all(m.dtype == torch.float64 for m, _ in wide.knowledge.bn_statistics.values())
    assert all(v.dtype == torch.float32 for v in obs.update.values())
    assert wide.knowledge.num_samples == obs.knowledge.num_samples


@pytest.mark.parametrize("line_search", ["strong_wolfe", None])
def test_compact_lbfgs_takes_torch_lbfgs_steps(line_search):
    """The compact representation gives the two-loop recursion's directions: in float64, the same losses, points
    and counts as ``torch.optim.LBFGS`` over 15 steps, with a history of 10 pairs that wraps around."""
    from gradinv.attacks.components.lbfgs import CompactLBFGS

    def run(cls):
        g = torch.Generator().manual_seed(0)
        a = torch.randn(60, 12, generator=g, dtype=torch.float64) / 3
        x = torch.randn(60, generator=g, dtype=torch.float64).requires_grad_(True)
        opt = cls([x], lr=1, max_iter=20, history_size=10, line_search_fn=line_search)

        def closure():
            opt.zero_grad()
            value = ((x @ a).sin() ** 2).sum() + 1e-2 * (x**4).sum() + 0.1 * (x**2).sum()
            value.backward()
            return value

        losses = [float(opt.step(closure).detach()) for _ in range(15)]
        return torch.tensor(losses), x.detach(), opt.state[x]["n_iter"], opt.state[x]["func_evals"]

    ref, compact = run(torch.optim.LBFGS), run(CompactLBFGS)
    assert ref[2] > 10  # the history wrapped
    torch.testing.assert_close(compact[0], ref[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(compact[1], ref[1], rtol=1e-8, atol=1e-9)
    assert compact[2:] == ref[2:]


def test_tiny_convolutions_run_on_native_kernels_and_the_flag_is_restored(digits32):
    """DLG's LeNet at batch 1 (0.69 million multiply-accumulates, counted on the meta device) runs without oneDNN;
    ResNet-18 keeps it; the model is untouched and the global flag is restored after the attack."""
    from gradinv.attacks.components.backend import NATIVE_CONV_MACS, convolution_macs, native_convolutions

    lenet = build_model("lenet", num_classes=10, seed=0)
    before = {k: v.clone() for k, v in lenet.state_dict().items()}
    # three 12-channel 5x5 convolutions: 3->12 (16x16 out), 12->12 (8x8), 12->12 (8x8)
    assert convolution_macs(lenet, (3, 32, 32), 1) == 12 * 16 * 16 * 3 * 25 + 2 * 12 * 8 * 8 * 12 * 25
    assert convolution_macs(lenet, (3, 32, 32), 8) > NATIVE_CONV_MACS
    assert convolution_macs(build_model("mlp", num_classes=10), (3, 32, 32), 1) == 0
    assert all(torch.equal(v, lenet.state_dict()[k]) for k, v in before.items())
    assert not any(m._forward_hooks for m in lenet.modules())
    _, obs = _obs(digits32, lenet)
    _, big = _obs(digits32, build_model("resnet18", num_classes=10))
    assert native_convolutions(obs) and not native_convolutions(big)
    seen = []
    enabled = torch.backends.mkldnn.enabled
    build_attack("dlg", iterations=1).reconstruct(obs, callback=lambda *_: seen.append(torch.backends.mkldnn.enabled))
    assert seen and not any(seen) and torch.backends.mkldnn.enabled == enabled
