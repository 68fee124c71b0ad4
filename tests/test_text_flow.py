"""Token inputs through Scenario -> Observation -> GroundTruth, and text cases (issue 12).

Oracles: the observed update of a text model equals the gradient (or the K local SGD steps) computed directly with
autograd on the same tokens; defenses on the update act unchanged, those on pixels refuse token ids in one line.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from gradinv.errors import ConfigError, DataError, ShapeError
from gradinv.experiments import Case, build_client
from gradinv.fl import FedAvg, FedSGD, Scenario
from gradinv.models import BertTiny, GPT2Tiny, next_token_loss
from gradinv.types import Normalization, ThreatModel

VOCAB, LENGTH, BATCH = 40, 6, 3


def _gpt2(seed: int = 0) -> GPT2Tiny:
    torch.manual_seed(seed)
    return GPT2Tiny(VOCAB, n_positions=8, width=16, layers=2, heads=2)


def _bert(seed: int = 0) -> BertTiny:
    torch.manual_seed(seed)
    return BertTiny(VOCAB, num_classes=3, n_positions=8, width=16, layers=2, heads=2)


def _tokens(batch: int = BATCH, length: int = LENGTH, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _autograd(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    names, params = zip(*model.named_parameters(), strict=True)
    return dict(zip(names, torch.autograd.grad(loss, params), strict=True))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_language_model_update_is_the_next_token_gradient_and_the_server_sees_no_text():
    model, tokens = _gpt2(), _tokens()
    scenario = Scenario.from_tokens(model, tokens)
    obs = scenario.observe()
    model.eval()
    direct = _autograd(model, next_token_loss(model(tokens), tokens))
    assert _max_diff(dict(obs.update), direct) < 1e-7
    assert isinstance(obs.protocol, FedSGD) and obs.update_kind == "gradient"
    k = obs.knowledge
    assert k.input_shape == (LENGTH,) and k.num_samples == BATCH
    assert k.labels is None and k.normalization is None and not k.bn_statistics
    assert obs.parameters["wte.weight"].shape[0] == VOCAB  # the vocabulary is the sent model's
    truth = scenario.ground_truth()
    assert truth.inputs.dtype == torch.int64 and torch.equal(truth.inputs, tokens) and truth.labels is None
    truth.inputs[0, 0] = 0  # a copy: the scenario keeps its batch
    assert int(scenario.inputs[0, 0]) == int(tokens[0, 0])


def test_classifier_update_is_the_cross_entropy_gradient_and_labels_follow_the_threat_model():
    model, tokens, labels = _bert(), _tokens(), torch.tensor([0, 2, 1])
    obs = Scenario.from_tokens(model, tokens, labels).observe()
    model.eval()
    direct = _autograd(model, F.cross_entropy(model(tokens), labels))
    assert _max_diff(dict(obs.update), direct) < 1e-7
    assert obs.knowledge.labels is None and obs.knowledge.input_shape == (LENGTH,)
    known = Scenario.from_tokens(model, tokens, labels, threat=ThreatModel(known_labels=True)).observe()
    assert torch.equal(known.knowledge.labels, labels)


def test_fedavg_replays_k_local_steps_on_tokens():
    model, tokens = _gpt2(), _tokens(batch=4)
    protocol = FedAvg(local_steps=3, lr=0.1, local_batch_size=2)
    obs = Scenario.from_tokens(model, tokens, protocol=protocol).observe()
    assert obs.update_kind == "weight_delta"
    twin = _gpt2()
    twin.eval()
    start = {k: v.detach().clone() for k, v in twin.named_parameters()}
    for step in range(3):  # the cyclic local batches of client_update: [0, 1], [2, 3], [0, 1]
        idx = torch.arange(step * 2, step * 2 + 2) % 4
        g = _autograd(twin, next_token_loss(twin(tokens[idx]), tokens[idx]))
        with torch.no_grad():
            for name, p in twin.named_parameters():
                p -= 0.1 * g[name]
    manual = {k: v.detach() - start[k] for k, v in twin.named_parameters()}
    assert _max_diff(dict(obs.update), manual) < 1e-6


def test_secure_aggregation_of_clients_is_the_weighted_mean_of_their_gradients():
    model, tokens = _gpt2(), _tokens(batch=5)
    obs = Scenario.from_tokens(model, tokens, clients=2).observe()
    assert obs.clients == 2
    model.eval()
    first = _autograd(model, next_token_loss(model(tokens[:3]), tokens[:3]))
    second = _autograd(model, next_token_loss(model(tokens[3:]), tokens[3:]))
    mean = {k: (3 * first[k] + 2 * second[k]) / 5 for k in first}
    assert _max_diff(dict(obs.update), mean) < 1e-7


def test_noise_defense_adds_noise_of_its_std_and_is_deterministic_in_the_seed():
    model, tokens = _gpt2(), _tokens()
    clean = Scenario.from_tokens(model, tokens).observe().update
    noisy = Scenario.from_tokens(model, tokens, defenses=("noise:0.01",), seed=3).observe().update
    again = Scenario.from_tokens(model, tokens, defenses=("noise:0.01",), seed=3).observe().update
    other = Scenario.from_tokens(model, tokens, defenses=("noise:0.01",), seed=4).observe().update
    assert _max_diff(dict(noisy), dict(again)) == 0.0
    assert _max_diff(dict(noisy), dict(other)) > 1e-3
    residual = torch.cat([(noisy[k] - clean[k]).flatten() for k in clean])
    assert abs(float(residual.std()) - 0.01) < 0.001 and abs(float(residual.mean())) < 0.001


@pytest.mark.parametrize("spec", ["dpsgd:noise_multiplier=1,clip=1", "prune:0.9", "sign", "dropout:0.5"])
def test_update_and_model_defenses_act_on_token_clients(spec):
    model, tokens = _gpt2(), _tokens()
    clean = Scenario.from_tokens(model, tokens).observe().update
    first = Scenario.from_tokens(model, tokens, defenses=(spec,), seed=1).observe().update
    second = Scenario.from_tokens(model, tokens, defenses=(spec,), seed=1).observe().update
    assert set(first) == set(clean)
    assert all(bool(torch.isfinite(v).all()) for v in first.values())
    assert _max_diff(dict(first), dict(second)) == 0.0  # the same seed, the same numbers
    assert _max_diff(dict(first), dict(clean)) > 0
    if spec.startswith("prune"):
        zeros = sum(int((v == 0).sum()) for v in first.values())
        assert zeros >= 0.85 * sum(v.numel() for v in first.values())


def test_dpsgd_under_fedavg_on_a_classifier():
    model, tokens, labels = _bert(), _tokens(batch=4), torch.tensor([0, 1, 2, 0])
    protocol = FedAvg(local_steps=2, lr=0.1, local_batch_size=2)
    obs = Scenario.from_tokens(model, tokens, labels, protocol=protocol, defenses=("dpsgd:1",)).observe()
    assert all(bool(torch.isfinite(v).all()) for v in obs.update.values())


@pytest.mark.parametrize("spec", ["mixup:2", "instahide:2", "pixelate:2"])
def test_pixel_defenses_refuse_token_ids_in_one_line(spec):
    with pytest.raises(ConfigError, match="acts on image pixels.*token ids") as err:
        Scenario.from_tokens(_gpt2(), _tokens(), defenses=(spec,))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="token ids"):
        Case(model="gpt2-tiny", data="synthetic", seq_len=6, vocab_size=40, defenses=(spec,))


def test_token_scenarios_refuse_wrong_inputs_with_the_fix():
    gpt2, bert, tokens = _gpt2(), _bert(), _tokens()
    with pytest.raises(ConfigError, match="language model's loss has no labels"):
        Scenario.from_tokens(gpt2, tokens, torch.zeros(BATCH, dtype=torch.long))
    with pytest.raises(ConfigError, match="pass labels"):
        Scenario.from_tokens(bert, tokens)
    with pytest.raises(DataError, match="outside the model's vocabulary of 40"):
        Scenario.from_tokens(gpt2, tokens + VOCAB)
    with pytest.raises(ShapeError, match="longer than the model's 8 positions"):
        Scenario.from_tokens(gpt2, _tokens(length=9))
    with pytest.raises(ShapeError, match="at least 2 tokens"):
        Scenario.from_tokens(gpt2, _tokens(length=1))
    with pytest.raises(DataError, match="integer token ids"):
        Scenario.from_tokens(gpt2, tokens.float())
    with pytest.raises(DataError, match="negative token ids"):
        Scenario.from_tokens(gpt2, tokens - 10)
    with pytest.raises(ConfigError, match="not normalised"):
        Scenario(gpt2, tokens, None, targets=tokens, normalization=Normalization.identity(1))


def test_text_case_builds_a_token_client_and_round_trips():
    case = Case(
        model="gpt2-tiny", data="text", seq_len=6, vocab_size=300, batch_size=2, model_options={"width": 16, "heads": 2}
    )
    assert case.is_text and case.is_language_model
    client = build_client(case)
    obs, truth = client.observation, client.truth
    assert obs.knowledge.input_shape == (6,) and obs.knowledge.num_samples == 2
    assert obs.parameters["wte.weight"].shape[0] == client.dataset.vocab_size <= 300
    assert truth.inputs.shape == (2, 6) and truth.labels is None
    assert all(len(text.split()) >= 1 for text in client.dataset.decode(truth.inputs))
    assert Case.from_dict(case.to_dict()) == case
    again = build_client(case)
    assert torch.equal(again.truth.inputs, truth.inputs)
    assert _max_diff(dict(again.observation.update), dict(obs.update)) == 0
    bert = build_client(case.replace(model="bert-tiny", data="synthetic", vocab_size=40))
    assert bert.truth.labels is not None and bert.truth.labels.shape == (2,)
    assert "seq_len" not in Case(model="mlp", data="digits").to_dict()  # image cases are written as before


def test_text_case_reports_its_problems_at_once():
    with pytest.raises(ConfigError) as err:
        Case(model="gpt2-tiny", data="photos", seq_len=100, trained_steps=2, server="imprint")
    text = str(err.value)
    for part in ("--seq-len 100 is longer than gpt2-tiny's 64 positions", "is images", "--trained-steps", "--server"):
        assert part in text, part
    with pytest.raises(ConfigError, match="is text, but convnet takes images"):
        Case(model="convnet", data="text")
    with pytest.raises(ConfigError, match="belong to text models"):
        Case(model="mlp", data="digits", seq_len=8)
    with pytest.raises(ConfigError, match="soteria"):
        Case(model="bert-tiny", data="text", defenses=("soteria",))
    with pytest.raises(ConfigError, match="vocab_size=10 is smaller than the tokenizer's vocabulary of 40"):
        build_client(Case(model="gpt2-tiny", data="synthetic", vocab_size=40, model_options={"vocab_size": 10}))
