from __future__ import annotations

import pytest
import torch
from torch.func import grad, vmap

from gradinv.attacks import ATTACKS, build_attack
from gradinv.attacks.components.objectives import cosine
from gradinv.attacks.components.priors import total_variation
from gradinv.attacks.components.replay import matching_cost
from gradinv.attacks.labels import recover_labels
from gradinv.data import load_dataset, sample_batch
from gradinv.errors import AttackError, ConfigError, MissingKnowledgeError
from gradinv.fl import FedAvg, Scenario
from gradinv.metrics import score_images
from gradinv.models import build_model
from gradinv.types import Knowledge, ThreatModel


def _scenario(ds, model, *, b=1, seed=0, **kw):
    images, labels = sample_batch(ds, batch_size=b, seed=seed)
    return Scenario.from_images(model, images, labels, normalization=ds.normalization, **kw)


@pytest.mark.parametrize("source", ["digits32", "photos32"])
def test_analytic_exact_on_mlp_batch1(source, request):
    ds = request.getfixturevalue(source)
    for seed in range(3):
        sc = _scenario(ds, build_model("mlp", num_classes=ds.num_classes, seed=seed), seed=seed)
        rec = build_attack("analytic").reconstruct(sc.observe())
        psnr = score_images(rec.images, sc.ground_truth().images).mean_psnr
        assert psnr >= 60, psnr
        assert rec.labels.tolist() == sc.labels.tolist()


def test_analytic_refuses_a_conv_first_layer(photos32):
    sc = _scenario(photos32, build_model("lenet", num_classes=photos32.num_classes))
    with pytest.raises(AttackError, match="fully connected"):
        build_attack("analytic").reconstruct(sc.observe())


def test_analytic_batch_of_distinct_labels_on_a_linear_model(digits32):
    model = build_model("mlp", num_classes=10, hidden=(), seed=0)
    images, labels = sample_batch(digits32, batch_size=4, seed=3, distinct_labels=True)
    sc = Scenario.from_images(model, images, labels, normalization=digits32.normalization)
    rec = build_attack("analytic").reconstruct(sc.observe())
    assert sorted(rec.labels.tolist()) == sorted(labels.tolist())
    # each input is dominated by its own sample: better than the batch mean as a guess
    psnr = score_images(rec.images, sc.ground_truth().images).mean_psnr
    mean_guess = sc.ground_truth().images.mean(0, keepdim=True).expand_as(images)
    assert psnr > score_images(mean_guess, sc.ground_truth().images).mean_psnr


@pytest.mark.parametrize(
    ("model_name", "train_mode"),
    [("lenet", False), ("convnet", False), ("resnet18", False), ("resnet18", True)],
)
def test_idlg_label_rule_is_always_right_at_batch_one(model_name, train_mode, photos32, digits32):
    """100 random (image, label, model seed) cases per model, across both bundled sources."""
    cases = 0
    for seed in range(10):
        model = build_model(model_name, num_classes=10, seed=seed)
        for i in range(10):
            ds = photos32 if i % 2 else digits32
            sc = _scenario(ds, model, seed=100 * seed + i, train_mode=train_mode)
            assert recover_labels(sc.observe(), method="idlg").labels.tolist() == sc.labels.tolist()
            cases += 1
    assert cases == 100


def test_idlg_label_rule_without_bias_and_for_fedavg(digits32):
    torch.manual_seed(0)
    for seed in range(20):
        model = build_model("mlp", num_classes=10, seed=seed, activation="tanh")
        model.layers[-1].bias = None  # a classifier without bias, features of both signs
        sc = _scenario(digits32, model, seed=seed)
        assert recover_labels(sc.observe(), method="idlg").labels.tolist() == sc.labels.tolist()
        sc2 = _scenario(
            digits32,
            build_model("lenet", num_classes=10, seed=seed),
            seed=seed,
            protocol=FedAvg(local_steps=1, lr=0.1),
        )
        assert recover_labels(sc2.observe(), method="idlg").labels.tolist() == sc2.labels.tolist()


def test_batched_restarts_equal_separate_runs(photos32):
    """vmap over restarts computes exactly what a loop over restarts computes (oracle test)."""
    sc = _scenario(photos32, build_model("convnet", num_classes=9, width=8, seed=0))
    cost = matching_cost(sc.observe(), objective=cosine, prior=lambda x: 1e-4 * total_variation(x))
    xs = torch.randn(3, 1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batched = vmap(grad(cost), in_dims=(0, None))(xs, sc.labels)
    for r in range(3):
        torch.testing.assert_close(batched[r], grad(cost)(xs[r], sc.labels), rtol=1e-4, atol=1e-7)


def test_invgrad_lowers_the_matching_cost_and_is_deterministic(photos32):
    sc = _scenario(photos32, build_model("convnet", num_classes=9, width=8, seed=0))
    obs = sc.observe()
    a = build_attack("invgrad", iterations=60, restarts=2, log_every=10)
    r1 = a.reconstruct(obs, seed=5)
    r2 = a.reconstruct(obs, seed=5)
    assert torch.equal(r1.inputs, r2.inputs)
    assert r1.trace[-1].cost < r1.trace[0].cost
    assert len(r1.extras["restart_costs"]) == 2
    assert r1.settings["label_source"] == "idlg"
    lo = (0 - torch.tensor(photos32.mean)) / torch.tensor(photos32.std)
    assert (r1.inputs >= lo.reshape(3, 1, 1) - 1e-6).all()  # box constraint


def test_dlg_and_idlg_reduce_cost(digits32):
    sc = _scenario(digits32, build_model("lenet", num_classes=10, seed=0))
    for name in ("dlg", "idlg"):
        rec = build_attack(name, iterations=15).reconstruct(sc.observe(), seed=0)
        assert rec.trace[-1].cost < rec.trace[0].cost
        assert rec.labels.shape == (1,)


def _case_for(name: str, digits32, deficient_chain):
    """A scenario each attack accepts: its paper's setting, small enough for a quick test."""
    from torch import nn

    from gradinv.experiments.runner import reconstructs_tokens
    from gradinv.fl.malicious import ImprintServer, TrapWeightsServer

    norm = digits32.normalization
    threat = ThreatModel()
    if name in ("analytic", "trap-weights", "rtf"):
        model = build_model("mlp", num_classes=10, seed=0)
        if name == "rtf":
            threat = ThreatModel(server=ImprintServer(bins=16, input_shape=(3, 32, 32)))
        if name == "trap-weights":
            threat = ThreatModel(server=TrapWeightsServer(normalization=norm))
    elif name == "rgap":
        model = build_model("mlp", num_classes=10, seed=0, activation="leaky_relu", hidden=(32,))
    elif name == "copa":
        model = deficient_chain("sigmoid")
        digits32 = load_dataset("digits", image_size=16, channels=3)
    elif name == "ppdl-spn":
        model = nn.Sequential(nn.Conv2d(3, 64, 5, stride=4, padding=2), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 64, 10))
    elif name == "fedavg_epochs":  # several local epochs over a shuffled batch
        model = build_model("convnet", num_classes=10, seed=0, width=8)
        protocol = FedAvg(local_steps=4, lr=0.1, local_batch_size=1, shuffle=True)
        return _scenario(digits32, model, b=2, protocol=protocol)
    elif name in ("april", "april-opt"):  # a vision transformer with a learnable position embedding
        model = build_model("vit-tiny", num_classes=10, seed=0, width=64, depth=1, heads=2, patch_size=8)
    elif reconstructs_tokens(ATTACKS[name]):  # a small causal language model on token ids
        from gradinv.models import build_text_model

        model = build_text_model("gpt2-tiny", vocab_size=64, seed=0, width=32, heads=2)
        tokens = torch.randint(4, 64, (2, 6), generator=torch.Generator().manual_seed(0))
        return Scenario.from_tokens(model, tokens)
    else:
        model = build_model("convnet", num_classes=10, seed=0, width=8)
    return _scenario(digits32, model, threat=threat)


#: settings that keep an attack's toy run short: GIAS trains a generator, LAMP a language model prior (tested with a
#: small prior in tests/test_tag_lamp.py)
_QUICK = {"gias": {"generator_steps": 5}, "lamp": {"lm_weight": 0.0, "init_candidates": 2, "candidates": 3}}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_leaves_model_unchanged_and_no_hooks(name, digits32, deficient_chain):
    obs = _case_for(name, digits32, deficient_chain).observe()
    before = {k: v.clone() for k, v in obs.model.state_dict().items()}
    fields = ATTACKS[name].Settings.__dataclass_fields__
    options = {"iterations": 3} if "iterations" in fields else {}
    options.update(_QUICK.get(name, {}))
    build_attack(name, **options).reconstruct(obs)
    for k, v in obs.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for m in obs.model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    for k, v in obs.parameters.items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_contract_shapes_determinism_and_trace(name, digits32, deficient_chain):
    """Every registered attack, a few iterations on its toy case: the batch's shape, the same numbers for the
    same seed, labels per sample, and a trace for the iterative ones."""
    obs = _case_for(name, digits32, deficient_chain).observe()
    fields = ATTACKS[name].Settings.__dataclass_fields__
    iterative = "log_every" in fields
    options = {"iterations": 3, "log_every": 1} if iterative else {"iterations": 3} if "iterations" in fields else {}
    options.update(_QUICK.get(name, {}))
    attack = build_attack(name, **options)
    first, again = attack.reconstruct(obs, seed=3), attack.reconstruct(obs, seed=3)
    k = obs.knowledge
    assert first.inputs.shape[1:] == k.input_shape
    if name not in ("rtf", "trap-weights"):  # malicious servers return one candidate per bin or trap row
        assert first.inputs.shape[0] == k.num_samples
    assert torch.equal(first.inputs, again.inputs)
    assert torch.isfinite(first.inputs).all()
    if first.labels is not None and name not in ("rtf", "trap-weights"):
        assert first.labels.shape == (k.num_samples,)
    if iterative:
        assert first.trace and all(p.seconds >= 0 for p in first.trace)
        assert first.extras.get("stopped") is not None


def test_attack_rejects_ground_truth_and_missing_knowledge(digits32):
    sc = _scenario(digits32, build_model("mlp", num_classes=10))
    with pytest.raises(TypeError):
        build_attack("invgrad").reconstruct(sc.ground_truth())
    obs = sc.observe()
    blind = obs.with_knowledge(input_shape=None, num_samples=None)
    with pytest.raises(MissingKnowledgeError, match="input_shape, num_samples"):
        build_attack("invgrad").reconstruct(blind)
    with pytest.raises(ConfigError):
        build_attack("invgrad", no_such_setting=1)
    with pytest.raises(ConfigError):
        build_attack("nope")


def test_known_labels_are_used(digits32):
    sc = _scenario(digits32, build_model("lenet", num_classes=10), threat=ThreatModel(known_labels=True))
    rec = build_attack("idlg", iterations=2).reconstruct(sc.observe())
    assert rec.settings["label_source"] == "knowledge"
    assert isinstance(sc.observe().knowledge, Knowledge)


def test_run_cell_passes_attack_settings():
    from gradinv.experiments import Case, Cell, run_cell

    r = run_cell(Cell(Case(model="lenet", data="digits"), "invgrad", (("iterations", 2), ("tv", 0.5))))
    assert r.reconstruction.settings["tv"] == 0.5 and r.record.to_dict()["iterations"] == 2


def test_any_user_module_works_through_the_api(digits32):
    from torch import nn

    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 32 * 32, 10))
    sc = _scenario(digits32, net, seed=4)
    rec = build_attack("invgrad", iterations=20, log_every=5).reconstruct(sc.observe())
    assert rec.labels.tolist() == sc.labels.tolist()
    assert rec.trace[-1].cost < rec.trace[0].cost


# -- declines as data, validation at construction, the restart budget ------------------------------------------


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_applicable_accepts_the_papers_setting_and_lists_reasons_elsewhere(name, digits32, deficient_chain):
    attack = build_attack(name)
    assert attack.applicable(_case_for(name, digits32, deficient_chain).observe()) == []
    # an honest LeNet, batch 2: no attack may raise here, each answers with a list
    honest = _scenario(digits32, build_model("lenet", num_classes=10, seed=0), b=2).observe()
    reasons = attack.applicable(honest)
    assert isinstance(reasons, list) and all(isinstance(r, str) and r for r in reasons)
    if name in ("rgap", "copa", "ppdl-spn", "analytic", "rtf", "trap-weights"):
        assert reasons, name
        with pytest.raises(AttackError) as err:
            attack.reconstruct(honest)
        assert all(r in str(err.value) for r in reasons)
    blind = honest.with_knowledge(input_shape=None, num_samples=None)
    if attack.requires:
        assert "needs knowledge" in attack.applicable(blind)[0]


def test_applicable_names_every_broken_assumption(digits32):
    cnn6 = _scenario(digits32, build_model("cnn6", num_classes=10, seed=0), b=2, protocol=FedAvg()).observe()
    reasons = build_attack("rgap").applicable(cnn6)
    assert any("batch 1" in r for r in reasons) and any("FedSGD" in r for r in reasons), reasons
    relu = _scenario(digits32, build_model("mlp", num_classes=10, seed=0)).observe()
    assert any("not invertible" in r for r in build_attack("copa").applicable(relu))
    lenet = _scenario(digits32, build_model("lenet", num_classes=10, seed=0)).observe()
    assert any("fully connected" in r for r in build_attack("analytic").applicable(lenet))
    no_bias = build_model("mlp", num_classes=10, seed=0)
    no_bias.layers[0].bias = None
    reasons = build_attack("analytic").applicable(_scenario(digits32, no_bias).observe())
    assert any("no bias" in r for r in reasons), reasons
    linear = build_model("mlp", num_classes=10, hidden=(), seed=0)
    images, labels = sample_batch(digits32, batch_size=3, seed=0)
    repeated = Scenario.from_images(
        linear,
        images,
        torch.tensor([1, 1, 2]),
        normalization=digits32.normalization,
        threat=ThreatModel(known_labels=True),
    ).observe()
    assert any("distinct labels" in r for r in build_attack("analytic").applicable(repeated))
    with pytest.raises(ConfigError, match="no such layer"):
        build_attack("analytic", layer="nope").applicable(relu)


def test_a_bad_setting_is_refused_at_construction_with_the_closest_choice():
    with pytest.raises(ConfigError, match="rgapp") as err:
        build_attack("copa", init="rgapp")
    message = str(err.value)
    assert "'zero', 'rgap'" in message and "did you mean 'rgap'" in message and "\n" not in message


def test_every_bad_setting_is_named_in_one_error():
    with pytest.raises(ConfigError) as err:
        build_attack("invgrad", iterations=0, restarts=0, tv=-1.0, objective="cosin", lr="fast", bogus=1, log_every=0)
    message = str(err.value)
    for part in ("bogus", "iterations must be >= 1", "restarts must be >= 1", "tv must be >= 0", "cosine"):
        assert part in message, part
    assert "lr must be float, got 'fast'" in message and "log_every" in message and "\n" not in message
    with pytest.raises(ConfigError) as err:
        build_attack("dlg", inner_iterations=0, line_search="wolfe", label_method="ilrgg", history_size=0)
    for part in ("inner_iterations", "'strong_wolfe'", "did you mean 'ilrg'", "history_size"):
        assert part in str(err.value), part
    for name in ATTACKS:  # the defaults are valid for every attack
        build_attack(name)
    with pytest.raises(ConfigError, match="label_method"):
        build_attack("rgap", label_method="yinn")


def test_a_huge_restart_count_is_refused_before_any_allocation(digits32, monkeypatch):
    obs = _scenario(digits32, build_model("lenet", num_classes=10, seed=0)).observe()
    with pytest.raises(ConfigError) as err:
        build_attack("invgrad", restarts=10**9, iterations=1).reconstruct(obs)  # ~10 TB of dummy inputs
    message = str(err.value)
    assert "restarts" in message and "\n" not in message
    monkeypatch.setenv("GRADINV_MEMORY_LIMIT", "20MB")
    with pytest.raises(ConfigError, match="1000 batched restarts.*restarts"):
        build_attack("invgrad", restarts=1000, iterations=1).reconstruct(obs)
    build_attack("invgrad", restarts=2, iterations=1).reconstruct(obs)  # a small count still runs under it


def test_the_base_class_keeps_the_books(digits32):
    sc = _scenario(digits32, build_model("mlp", num_classes=10, seed=0))
    obs = sc.observe()
    rec = build_attack("analytic").reconstruct(obs)
    assert rec.attack == "analytic" and rec.seconds > 0 and rec.normalization is obs.knowledge.normalization
    assert rec.settings["layer"] == "layers.0" and rec.settings["label_source"] == "idlg"
    assert "layer_inputs" in rec.extras


def test_invgrad_tv_follows_the_architecture_unless_set(digits32):
    from gradinv.attacks.inverting_gradients import PAPER_TV, TV_BY_ARCHITECTURE, default_tv
    from gradinv.models import ResNet

    resnet = build_model("resnet18", num_classes=10, seed=0)
    assert (
        default_tv(resnet) == TV_BY_ARCHITECTURE[ResNet]
        and default_tv(build_model("lenet", num_classes=10)) == PAPER_TV
    )
    obs = _scenario(digits32, build_model("convnet", num_classes=10, seed=0, width=8)).observe()
    assert build_attack("invgrad", iterations=2).reconstruct(obs).settings["tv"] == PAPER_TV
    assert build_attack("invgrad", iterations=2, tv=0.3).reconstruct(obs).settings["tv"] == 0.3
    with pytest.raises(ConfigError):
        build_attack("invgrad", tv=-1.0)
