"""Malicious-server threat: Robbing the Fed (Fowl et al. 2022) and trap weights (Boenisch et al. 2023)."""

from __future__ import annotations

import math

import pytest
import torch

from gradinv.attacks import ATTACKS, build_attack
from gradinv.attacks.imprint import score_recovered
from gradinv.data import ImageDataset, sample_batch
from gradinv.errors import AttackError, ConfigError
from gradinv.fl import FedAvg, Scenario
from gradinv.fl.malicious import (
    ImprintedModel,
    ImprintServer,
    TrappedModel,
    TrapWeightsServer,
    parse_server,
)
from gradinv.models import build_model
from gradinv.types import ThreatModel


@pytest.fixture(scope="module")
def split(digits32):
    """The server's public images (normalised, 600) and the clients' private pool (the other 1,197), disjoint."""
    perm = torch.randperm(len(digits32), generator=torch.Generator().manual_seed(0))
    public = digits32.normalization.normalize(digits32.images[perm[:600]])
    rest = perm[600:]
    private = ImageDataset.from_tensors("digits-private", digits32.images[rest], digits32.labels[rest])
    return public, private


def _run(ds, model, images, labels, server, attack, **options):
    sc = Scenario.from_images(
        model, images, labels, normalization=ds.normalization, threat=ThreatModel(server=server), **options
    )
    rec = build_attack(attack).reconstruct(sc.observe())
    return sc, rec, score_recovered(rec.images, sc.ground_truth().images)


def _separated_batch(pool, server, *, size, seed):
    """``size`` private images whose measurements fall in distinct bins of ``server`` (the constructed case)."""
    x = pool.normalization.normalize(pool.images).flatten(1).double()
    m = server.measurement_vector(x.shape[1])
    c = server.thresholds(*server.fit(m))
    bins = torch.bucketize(x @ m, c)
    picked: list[int] = []
    for i in torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist():
        if int(bins[i]) not in {int(bins[j]) for j in picked}:
            picked.append(i)
        if len(picked) == size:
            break
    index = torch.tensor(picked)
    return pool.images[index], pool.labels[index]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- Robbing the Fed -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("measurement", "distribution"), [("random", "gaussian"), ("mean", "laplace")])
def test_rtf_recovers_every_sample_when_the_bins_separate_them(split, digits32, measurement, distribution):
    public, private = split
    for seed in range(3):
        server = ImprintServer(bins=64, measurement=measurement, distribution=distribution, seed=seed, auxiliary=public)
        images, labels = _separated_batch(private, server, size=4, seed=seed)
        model = build_model("mlp", num_classes=10, image_size=32, seed=seed)
        _, rec, scores = _run(digits32, model, images, labels, server, "rtf")
        assert rec.inputs.shape == (4, 3, 32, 32)
        assert scores.psnr.min() >= 60, scores.psnr
        assert sorted(scores.best.tolist()) == [0, 1, 2, 3]  # one recovered image per sample
        assert all(rec.extras["in_bin"])


def test_rtf_one_step_fedavg_and_a_conv_model(split, digits32):
    public, private = split
    server = ImprintServer(bins=64, seed=1, auxiliary=public)
    images, labels = _separated_batch(private, server, size=6, seed=1)
    model = build_model("lenet", num_classes=10, image_size=32, seed=1)
    for protocol in (None, FedAvg(local_steps=1, lr=0.1)):
        options = {} if protocol is None else {"protocol": protocol}
        _, _, scores = _run(digits32, model, images, labels, server, "rtf", **options)
        assert scores.psnr.min() >= 60, (protocol, scores.psnr)


def test_rtf_recovers_half_of_64_digits_with_128_bins(split, digits32):
    """The issue's acceptance line, as the mean over ten batches (batch, model and measurement all change).

    A sample is clean iff no other sample shares its bin: about (1 - 1/128)^63 = 61% of the batch with ideal
    bins, so single batches can fall below half (bench/imprint.py: 41 of 50 seeds reach it, mean 0.59)."""
    public, private = split
    fractions = []
    for seed in range(10):
        images, labels = sample_batch(private, batch_size=64, seed=seed)
        model = build_model("mlp", num_classes=10, image_size=32, seed=seed)
        server = ImprintServer(bins=128, seed=seed, auxiliary=public)
        _, rec, scores = _run(digits32, model, images, labels, server, "rtf")
        assert rec.inputs.shape[0] <= 64
        fractions.append(scores.fraction)
    assert sum(fractions) / len(fractions) >= 0.5, fractions


def test_rtf_reports_labels_of_the_batch(split, digits32):
    public, private = split
    images, labels = sample_batch(private, batch_size=8, seed=0)
    model = build_model("mlp", num_classes=10, image_size=32, seed=0)
    _, rec, _ = _run(digits32, model, images, labels, ImprintServer(bins=32, auxiliary=public), "rtf")
    assert rec.labels is not None and rec.labels.numel() == 8
    assert rec.extras["labels_aligned"] is False


# -- trap weights --------------------------------------------------------------------------------------------


def test_trap_weights_rows_of_one_sample_are_exact(split, digits32):
    public, private = split
    for seed in range(3):
        images, labels = sample_batch(private, batch_size=8, seed=seed)
        model = build_model("mlp", num_classes=10, image_size=32, seed=seed, hidden=(512, 64))
        server = TrapWeightsServer(normalization=digits32.normalization, auxiliary=public, rate=1 / 8, seed=seed)
        _, rec, scores = _run(digits32, model, images, labels, server, "trap-weights")
        assert rec.inputs.shape[0] <= 8
        assert scores.fraction >= 0.5, scores.psnr
        # candidates that several rows agree on are single samples
        truth = digits32.normalization.normalize(images)
        for x, rows in zip(rec.inputs, rec.extras["rows_per_input"], strict=True):
            if rows >= 2:
                err = (truth - x).flatten(1).norm(dim=1).min() / x.norm()
                assert err < 1e-4


def test_trap_weights_fixed_scale_and_an_added_block(split, digits32):
    public, private = split
    images, labels = sample_batch(private, batch_size=4, seed=0)
    mlp = build_model("mlp", num_classes=10, image_size=32, seed=0)
    _, rec, scores = _run(
        digits32, mlp, images, labels, TrapWeightsServer(normalization=digits32.normalization), "trap-weights"
    )
    assert rec.extras["layer"] == "model.layers.0"
    assert scores.fraction >= 0.25 and scores.psnr.max() >= 60
    lenet = build_model("lenet", num_classes=10, image_size=32, seed=0)
    server = TrapWeightsServer(normalization=digits32.normalization, auxiliary=public, rate=1 / 4, width=128)
    _, rec, scores = _run(digits32, lenet, images, labels, server, "trap-weights", protocol=FedAvg(lr=0.1))
    assert rec.extras["layer"] == "trap.measure"
    assert scores.fraction >= 0.5 and scores.psnr.max() >= 60


# -- the servers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "lenet"])
def test_servers_never_modify_the_given_model(name, split):
    public, _ = split
    model = build_model(name, num_classes=10, image_size=32, seed=0)
    before = _state(model)
    norm = ImageDataset.from_tensors("x", torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)).normalization
    for server in (
        ImprintServer(bins=16, auxiliary=public),
        TrapWeightsServer(normalization=norm, input_shape=(3, 32, 32), width=16),
    ):
        sent = server.modify(model)
        assert isinstance(sent, ImprintedModel | TrappedModel) and sent is not model
        own = {p.data_ptr() for p in model.parameters()}
        assert not own & {p.data_ptr() for p in sent.parameters()}
        after = _state(model)
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
        again = server.modify(model)  # deterministic for a given seed
        assert all(
            torch.equal(a, b) for a, b in zip(sent.state_dict().values(), again.state_dict().values(), strict=True)
        )


def test_imprinted_model_keeps_the_original_function(split):
    public, private = split
    model = build_model("convnet", num_classes=10, image_size=32, seed=0, width=8).eval()
    sent = ImprintServer(bins=128, auxiliary=public).modify(model).eval()
    x = private.normalization.normalize(private.images[:16])
    with torch.no_grad():
        shifted = sent.imprint(x) - x
        assert shifted.abs().max() < 1e-2  # the original model sees its input, up to a small constant
        assert torch.allclose(sent(x), model(x), atol=1e-2)


def test_server_errors_say_what_to_fix():
    with pytest.raises(ConfigError, match="bins >= 2"):
        ImprintServer(bins=1)
    with pytest.raises(ConfigError, match="choose one of random, mean"):
        ImprintServer(measurement="fourier")
    with pytest.raises(ConfigError, match="input_shape=\\(C, H, W\\)"):
        ImprintServer().modify(build_model("lenet", num_classes=10, image_size=32))
    with pytest.raises(ConfigError, match="auxiliary"):
        TrapWeightsServer(rate=0.1)
    with pytest.raises(ConfigError, match="input_shape"):
        ImprintServer(input_shape=(3, 32, 32), auxiliary=torch.zeros(4, 3, 16, 16))


def test_parse_server():
    assert parse_server("honest") is None
    assert parse_server("none") is None
    imprint = parse_server("imprint:256:mean", input_shape=(3, 32, 32))
    assert isinstance(imprint, ImprintServer)
    assert (imprint.bins, imprint.measurement, imprint.input_shape) == (256, "mean", (3, 32, 32))
    assert parse_server(" Imprint:64 ").bins == 64
    trap = parse_server("trap:1.2")
    assert isinstance(trap, TrapWeightsServer) and math.isclose(trap.scale, 1.2)
    assert isinstance(parse_server("trap"), TrapWeightsServer)
    for spec, message in [
        ("evil", "unknown server 'evil': use 'honest', 'imprint"),
        ("imprint:many", "imprint bins must be an integer >= 2, got 'many'"),
        ("imprint:1", "bins >= 2"),
        ("imprint:128:fourier", "unknown imprint measurement 'fourier'"),
        ("imprint:128:mean:x", "too many parts"),
        ("trap:big", "trap scale must be a number"),
        ("trap:1:2", "too many parts"),
        ("honest:1", "unknown server"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_server(spec)


def test_servers_share_the_registry_grammar_and_write_their_specs(digits32):
    from gradinv.registry import SERVERS

    assert set(SERVERS) == {"imprint", "trap"}
    imprint = parse_server("imprint:bins=64,measurement=mean,seed=3,distribution=laplace", input_shape=(3, 32, 32))
    assert (imprint.bins, imprint.measurement, imprint.seed, imprint.distribution) == (64, "mean", 3, "laplace")
    assert imprint.input_shape == (3, 32, 32)
    again = parse_server(imprint.spec(), input_shape=(3, 32, 32))
    assert again.spec() == imprint.spec() and again.bins == 64 and again.distribution == "laplace"
    trap = parse_server("trap:scale=1.1,width=32", normalization=digits32.normalization)
    assert (trap.scale, trap.width, trap.normalization) == (1.1, 32, digits32.normalization)
    assert parse_server(trap.spec()).spec() == trap.spec()
    assert SERVERS.parse("imprint:32", input_shape=(1, 8, 8)).bins == 32  # the registry itself takes runtime args
    with pytest.raises(ConfigError, match="unknown server 'imprnt:64'.*\\(did you mean 'imprint'\\?\\)"):
        parse_server("imprnt:64")
    with pytest.raises(ConfigError, match="imprint has no setting 'bin' \\(did you mean 'bins'\\?\\)"):
        parse_server("imprint:bin=64")
    with pytest.raises(ConfigError, match="imprint has no setting 'input_shape'"):
        parse_server("imprint:input_shape=3")  # a runtime argument, not a spec's
    with pytest.raises(ConfigError, match="bins given both in the spec 'imprint:32' and as an argument"):
        SERVERS.parse("imprint:32", bins=16)


# -- the attacks ---------------------------------------------------------------------------------------------


def test_attacks_are_registered_and_refuse_an_honest_observation(digits32):
    assert {"rtf", "trap-weights"} <= set(ATTACKS)
    images, labels = sample_batch(digits32, batch_size=2, seed=0)
    model = build_model("mlp", num_classes=10, image_size=32, seed=0)
    honest = Scenario.from_images(model, images, labels, normalization=digits32.normalization).observe()
    for name in ("rtf", "trap-weights"):
        with pytest.raises(AttackError, match="malicious.*ThreatModel\\(server="):
            build_attack(name).reconstruct(honest)
    trapped = Scenario.from_images(
        model, images, labels, normalization=digits32.normalization, threat=ThreatModel(server=TrapWeightsServer())
    ).observe()
    with pytest.raises(AttackError, match="imprint block"):
        build_attack("rtf").reconstruct(trapped)


def test_score_recovered_matches_each_true_image_to_its_best_recovery():
    g = torch.Generator().manual_seed(0)
    truth = torch.rand(3, 1, 4, 4, generator=g)
    recovered = torch.stack([truth[2], truth[0] + 0.1, (truth[0] + truth[1]) / 2])
    scores = score_recovered(recovered, truth)
    assert scores.best.tolist()[0] == 1 and scores.best.tolist()[2] == 0
    assert math.isclose(scores.psnr[0].item(), 20.0, abs_tol=1e-4)
    assert scores.psnr[2].item() >= 150
    assert math.isclose(scores.fraction, 1 / 3)
    empty = score_recovered(torch.zeros(0, 1, 4, 4), truth)
    assert empty.fraction == 0.0 and torch.isinf(empty.psnr).all() and (empty.best == -1).all()
