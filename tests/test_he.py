"""CKKS aggregation (TenSEAL): the decrypted sum is the plain weighted mean to CKKS precision, the server cannot
decrypt, attacks see what they see on the plain mean, and the core never loads TenSEAL."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("tenseal")

from gradinv.attacks import build_attack  # noqa: E402
from gradinv.cli import build_parser, case_from_args, main  # noqa: E402
from gradinv.data import sample_batch  # noqa: E402
from gradinv.errors import ConfigError  # noqa: E402
from gradinv.experiments.case import Case  # noqa: E402
from gradinv.fl import FedSGD, Scenario  # noqa: E402
from gradinv.fl.functional import stateless_twin  # noqa: E402
from gradinv.fl.protocols import aggregate, client_update  # noqa: E402
from gradinv.integrations.he import CKKSAggregator  # noqa: E402
from gradinv.metrics import score_images  # noqa: E402
from gradinv.models import build_model  # noqa: E402
from gradinv.types import named_state  # noqa: E402


def _client_updates(ds, model_name: str, sizes: list[int], *, seed: int = 0):
    """Each client's FedSGD gradient on its own slice of one batch, as :class:`Scenario` computes them."""
    model = build_model(model_name, num_classes=ds.num_classes, seed=seed)
    params, buffers = named_state(model)
    twin = stateless_twin(model, train_mode=False)
    images, labels = sample_batch(ds, batch_size=sum(sizes), seed=seed)
    inputs = ds.normalization.normalize(images)
    updates, start = [], 0
    for n in sizes:
        part = slice(start, start + n)
        with torch.no_grad():
            updates.append(client_update(FedSGD(), twin, params, buffers, inputs[part], labels[part]))
        start += n
    return updates


def test_decrypted_sum_is_the_weighted_mean_of_three_lenet_updates(photos32):
    sizes = [1, 2, 3]  # unequal: the clients' weights n_i / N matter
    updates = _client_updates(photos32, "lenet", sizes)
    result = CKKSAggregator().aggregate(updates, sizes)
    exact = {k: sum(u[k].double() * n / sum(sizes) for u, n in zip(updates, sizes, strict=True)) for k in updates[0]}
    assert list(result.update) == list(updates[0])
    for k, v in result.update.items():
        assert v.shape == updates[0][k].shape and v.dtype == updates[0][k].dtype
        rel = float((v.double() - exact[k]).norm() / exact[k].norm())
        assert rel < 1e-3, (k, rel)
    costs = result.costs
    values = sum(t.numel() for t in updates[0].values())
    assert costs.clients == 3 and costs.values == values and costs.ciphertexts == math.ceil(values / 4096)
    assert costs.plain_bytes == 4 * values
    assert len(costs.encrypt_seconds) == 3 and all(s > 0 for s in costs.encrypt_seconds)
    # a fresh CKKS ciphertext at degree 8192 holds two polynomials over a 140-bit modulus: far above 4 bytes a value
    assert all(b > 10 * costs.plain_bytes for b in costs.ciphertext_bytes)
    assert costs.expansion > 10 and costs.public_context_bytes > 0
    assert costs.server_add_seconds > 0 and costs.decrypt_seconds > 0
    assert 0 < costs.relative_error < 1e-3 and costs.max_abs_error < 1e-5
    plain = aggregate(updates, sizes)
    diff = torch.cat([(result.update[k] - plain[k]).flatten() for k in plain])
    assert float(diff.abs().max()) == pytest.approx(costs.max_abs_error, rel=1e-3, abs=1e-12)
    assert set(costs.to_dict()) >= {"encrypt_seconds", "ciphertext_bytes", "plain_bytes", "relative_error"}


def test_the_server_context_holds_no_secret_key_and_cannot_decrypt(digits32):
    aggregator = CKKSAggregator()
    keys = aggregator.keygen()
    assert keys.client.has_secret_key() and not keys.server.has_secret_key() and keys.server.is_public()
    updates = _client_updates(digits32, "lenet", [1, 1])
    total = aggregator.add([aggregator.encrypt(u, weight=0.5, keys=keys) for u in updates], keys=keys)
    with pytest.raises(ValueError, match="secret"):
        total[0].decrypt()  # the server's sum, linked to its public context
    mean = aggregator.decrypt(total, keys=keys, like=updates[0])  # the key holders can
    plain = aggregate(updates, [1, 1])
    for k in plain:
        assert torch.allclose(mean[k], plain[k], rtol=1e-3, atol=1e-6)


def test_an_attack_on_the_ckks_aggregate_scores_as_on_the_plain_mean(digits32):
    """Analytic (Phong et al. 2018) on a linear model, 3 clients: each label's row mixes the clients' images."""
    images, labels = sample_batch(digits32, batch_size=3, seed=3, distinct_labels=True)
    model = build_model("mlp", num_classes=10, hidden=(), seed=0)
    results = {}
    for aggregation in ("mean", "ckks"):
        sc = Scenario.from_images(
            model, images, labels, normalization=digits32.normalization, clients=3, aggregation=aggregation
        )
        observation = sc.observe()
        rec = build_attack("analytic").reconstruct(observation)
        results[aggregation] = (observation, score_images(rec.images, sc.ground_truth().images).mean_psnr, rec)
    (plain, psnr_plain, rec_plain), (ckks, psnr_ckks, rec_ckks) = results["mean"], results["ckks"]
    for k in plain.update:
        assert torch.allclose(ckks.update[k], plain.update[k], rtol=1e-3, atol=1e-6)
    assert 15 < psnr_plain < 60  # a mixture, not an exact recovery: the aggregate hides each client's image
    assert abs(psnr_ckks - psnr_plain) < 0.1, (psnr_plain, psnr_ckks)
    assert sorted(rec_ckks.labels.tolist()) == sorted(rec_plain.labels.tolist())


def test_the_cli_and_case_carry_the_aggregation(tmp_path, capsys):
    argv = ["attack", "analytic", "--model", "mlp", "--data", "digits", "--batch-size", "2", "--clients", "2"]
    case = case_from_args(build_parser().parse_args([*argv, "--aggregation", "ckks"]))
    assert case.aggregation == "ckks" and case.to_dict()["aggregation"] == "ckks"
    assert Case.from_dict(case.to_dict()) == case
    assert "aggregation" not in Case().to_dict()  # the plain mean keeps older cases' keys
    assert main([*argv, "--aggregation", "ckks", "--quiet", "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "metrics.json").is_file()
    capsys.readouterr()


def test_settings_are_checked_with_their_fix(digits32):
    with pytest.raises(ConfigError, match="poly_modulus_degree must be one of") as err:
        CKKSAggregator(poly_modulus_degree=1000, global_scale=0.5)
    assert "global_scale" in str(err.value)  # every problem in one error
    with pytest.raises(ConfigError, match="more than the 109"):
        CKKSAggregator(poly_modulus_degree=4096)  # (60, 40, 40, 60) = 200 bits
    with pytest.raises(ConfigError, match="does not fit"):
        CKKSAggregator(coeff_mod_bit_sizes=[30, 60], global_scale=2.0**40)
    assert CKKSAggregator(coeff_mod_bit_sizes=[60, 40, 60]).coeff_mod_bit_sizes == (60, 40, 60)
    images, labels = sample_batch(digits32, batch_size=2, seed=0)
    model = build_model("lenet", num_classes=10, seed=0)
    with pytest.raises(ConfigError, match="'mean' or 'ckks'"):
        Scenario.from_images(model, images, labels, normalization=digits32.normalization, aggregation="paillier")
    with pytest.raises(ConfigError, match="aggregation must be"):
        Case(aggregation="sum")


def test_without_tenseal_ckks_says_how_to_install_it(digits32, monkeypatch):
    monkeypatch.setitem(sys.modules, "tenseal", None)  # import tenseal now raises ImportError
    images, labels = sample_batch(digits32, batch_size=2, seed=0)
    model = build_model("lenet", num_classes=10, seed=0)
    with pytest.raises(ConfigError, match=r"pip install gradinv\[he\]"):
        Scenario.from_images(model, images, labels, normalization=digits32.normalization, aggregation="ckks")
    with pytest.raises(ConfigError, match=r"pip install gradinv\[he\]"):
        CKKSAggregator().keygen()


def test_the_core_never_imports_tenseal():
    code = (
        "import sys, gradinv, gradinv.fl, gradinv.attacks, gradinv.defenses, gradinv.experiments, gradinv.cli\n"
        "import gradinv.integrations.he\n"
        "from gradinv.data import load_dataset, sample_batch\n"
        "from gradinv.models import build_model\n"
        "ds = load_dataset('digits', image_size=32, channels=3)\n"
        "x, y = sample_batch(ds, batch_size=2, seed=0)\n"
        "sc = gradinv.fl.Scenario.from_images(build_model('lenet', num_classes=10), x, y,"
        " normalization=ds.normalization, clients=2)\n"
        "sc.observe()\n"
        "assert 'tenseal' not in sys.modules, 'tenseal was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
