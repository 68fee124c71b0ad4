"""DAGER (Petrov et al., NeurIPS 2024) and the token-set leak (Melis et al. 2019) on small transformers built here:
the span test checked by hand, exact recovery of batches, the head step for the last token, declines and flags."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradinv.attacks.base import ATTACKS, build_attack
from gradinv.attacks.dager import (
    Dager,
    attention_gradient,
    first_layer_distances,
    second_attention_names,
    span_basis,
    span_distance,
)
from gradinv.attacks.token_leak import (
    embedding_is_tied,
    nonzero_rows,
    position_set,
    sequence_length,
    span_token_sets,
    token_set,
)
from gradinv.errors import AttackError, ConfigError
from gradinv.models.transformer import BertTiny, GPT2Tiny, TextModelSpec, next_token_loss
from gradinv.protocol import FedAvg
from gradinv.types import Knowledge, Observation, named_state

# -- a small GPT-style language model and its description ------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.heads, self.causal = heads, causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in self.qkv(x).split(d, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(d), Attention(d, heads, causal), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Token + position embedding, pre-LN blocks, final LayerNorm, a linear head (untied unless ``tie``)."""

    def __init__(self, *, vocab=200, width=64, layers=2, heads=4, positions=16, causal=True, tie=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(positions, width)
        self.blocks = nn.ModuleList(Block(width, heads, causal) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        if tie:
            self.head.weight = self.wte.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (x if x.is_floating_point() else self.wte(x)) + self.wpe(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))


def spec_of(model: TinyLM) -> TextModelSpec:
    """Our test model's description, in the shape gradinv's text models give it."""
    d = model.wte.weight.shape[1]

    def layer_inputs(ids, positions, params):
        x = params["wte.weight"][ids] + params["wpe.weight"][positions]
        return F.layer_norm(x, (d,), params["blocks.0.ln1.weight"], params["blocks.0.ln1.bias"], 1e-5)

    return TextModelSpec(
        token_embedding="wte.weight",
        position_embedding="wpe.weight",
        first_attention=("blocks.0.attn.qkv.weight",),
        layer_inputs=layer_inputs,
        causal=model.blocks[0].attn.causal,
        vocab_size=model.wte.weight.shape[0],
        max_positions=model.wpe.weight.shape[0],
        width=d,
        transposed=False,
    )


def observe(model: nn.Module, tokens: torch.Tensor, **kwargs) -> Observation:
    """The server's view of one FedSGD round: the gradient of the mean next-token cross-entropy."""
    params, buffers = named_state(model)
    logits = model(tokens)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    named = list(model.named_parameters())
    grads = torch.autograd.grad(loss, [p for _, p in named])
    update = {n: g.detach() for (n, _), g in zip(named, grads, strict=True)}
    knowledge = Knowledge(num_samples=tokens.shape[0], input_shape=(tokens.shape[1],))
    return Observation(model=model, parameters=params, buffers=buffers, update=update, knowledge=knowledge, **kwargs)


def draw(batch: int, length: int, *, vocab: int = 200, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def rows_sorted(tokens: torch.Tensor) -> torch.Tensor:
    return tokens[sorted(range(tokens.shape[0]), key=lambda i: tokens[i].tolist())]


# -- the span test by hand ----------------------------------------------------------------------------------


def test_span_test_checked_by_hand_on_a_one_layer_model():
    """Vocabulary 12, width 16, one attention layer, one sequence of 3. By hand: the qkv gradient's rows lie in
    span{z(7, 0), z(2, 1)} (position 2 is never scored), it has rank 2, and the distance of every (token,
    position) input to that plane, by least squares, separates the batch; the attack's distances are the same."""
    model = TinyLM(vocab=12, width=16, layers=1, heads=2, positions=4, seed=3)
    tokens = torch.tensor([[7, 2, 9]])
    obs = observe(model, tokens)
    spec = spec_of(model)

    def z(v: int, p: int) -> torch.Tensor:
        return spec.layer_inputs(torch.tensor([v]), torch.tensor([p]), obs.parameters)[0].double()

    def distance(x: torch.Tensor, plane: torch.Tensor) -> float:
        coef = torch.linalg.lstsq(plane, x[:, None]).solution
        return float((plane @ coef - x[:, None]).norm() / x.norm())

    plane = torch.stack([z(7, 0), z(2, 1)], dim=1)  # (16, 2)
    g = obs.update["blocks.0.attn.qkv.weight"].double()  # (48, 16)
    assert max(distance(row, plane) for row in g if row.norm() > 0) < 1e-5
    s = torch.linalg.svdvals(g)
    assert s[1] / s[0] > 1e-3 and s[2] / s[0] < 1e-6
    residual = torch.tensor([[distance(z(v, p), plane) for v in range(12)] for p in range(3)], dtype=torch.float64)
    assert residual[0, 7] < 1e-6 and residual[1, 2] < 1e-6
    others = torch.ones_like(residual, dtype=torch.bool)
    others[0, 7] = others[1, 2] = False
    assert residual[others].min() > 1e-2
    span = span_basis(attention_gradient(obs.update, spec.first_attention))
    assert span.rank == 2
    ours = first_layer_distances(spec, obs.parameters, span.basis, range(3))
    assert torch.allclose(ours, residual, atol=1e-6)
    rec = Dager(spec=spec).reconstruct(obs)
    assert torch.equal(rec.inputs, tokens)  # the last token from the head (the only exact source for it)
    assert rec.extras["last_token_source"] == "head" and rec.extras["prefix_filter"] is False


def test_span_distance_is_zero_inside_and_one_orthogonal():
    basis = torch.eye(4, dtype=torch.float64)[:, :2]
    v = torch.tensor([[3.0, -4.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    assert torch.allclose(span_distance(v, basis), torch.tensor([0.0, 1.0, 2**-0.5], dtype=torch.float64))


# -- exact recovery on a 2-layer causal model -------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_recovery_on_a_two_layer_causal_model(batch, seed):
    model = TinyLM(vocab=200, width=64, layers=2, seed=seed)
    tokens = draw(batch, 6, seed=10 + seed)
    rec = build_attack("dager", spec=spec_of(model)).reconstruct(observe(model, tokens))
    assert rec.inputs.dtype == torch.long and rec.inputs.shape == (batch, 6)
    assert torch.equal(rec.inputs, rows_sorted(tokens))
    assert rec.extras["rank_layer1"] == batch * 5 and not rec.extras["rank_saturated"]
    assert rec.extras["sequences_found"] == batch and rec.extras["head_fit_residual"] < 1e-4
    assert rec.labels is None and rec.attack == "dager"


def test_the_whole_vocabulary_scan_gives_the_same_batch():
    """``use_token_set=False`` is the paper's scan of every vocabulary token; the default scans only the tokens the
    (untied) embedding's update touched, with the same result."""
    model = TinyLM(seed=6)
    tokens = draw(4, 6, seed=61)
    obs = observe(model, tokens)
    fast, full = (
        Dager(spec=spec_of(model)).reconstruct(obs),
        Dager(spec=spec_of(model), use_token_set=False).reconstruct(obs),
    )
    assert torch.equal(fast.inputs, rows_sorted(tokens)) and torch.equal(full.inputs, fast.inputs)
    assert full.extras["tokens_scanned"] == 200 and fast.extras["tokens_scanned"] == len(
        set(tokens[:, :-1].flatten().tolist())
    )


def test_batch_of_eight_and_shared_prefixes_and_duplicates():
    """Sequences that share a prefix are one branch until they part; a sequence present twice is counted by the
    head step (its multiplicity), so the batch comes back whole."""
    model = TinyLM(seed=4)
    tokens = draw(8, 6, seed=5)
    tokens[1, :4] = tokens[0, :4]  # shares 4 tokens with sequence 0
    tokens[2, :5] = tokens[0, :5]  # differs from sequence 0 in the last token only
    tokens[3] = tokens[4]  # a duplicate
    rec = Dager(spec=spec_of(model)).reconstruct(observe(model, tokens))
    assert torch.equal(rec.inputs, rows_sorted(tokens))
    # prefixes of length L-1: sequences 0 and 2 share one, 3 and 4 are one: multiplicities 2, 2 and four 1s
    assert sorted(rec.extras["multiplicities"]) == pytest.approx([1.0] * 4 + [2.0] * 2, abs=1e-3)


def test_the_paper_setting_without_the_head_recovers_all_but_the_last_token():
    """``last_token="span"`` (the paper's decoder on next-token loss): positions 0..L-2 exact; the last position
    has no layer-1 candidate and is flagged."""
    model = TinyLM(seed=0)
    tokens = draw(2, 6, seed=7)
    rec = Dager(spec=spec_of(model), last_token="span").reconstruct(observe(model, tokens))
    assert torch.equal(rows_sorted(rec.inputs)[:, :-1], rows_sorted(tokens)[:, :-1])
    assert rec.extras["relaxed_positions"] == [5] and rec.extras["last_token_source"] == "span"


def test_a_head_fit_that_fails_falls_back_to_the_spans(monkeypatch):
    """A noisy head gradient can leave the head step without a fit: the last position is then read from the spans
    (as ``last_token="span"``) instead of declining, and the failure is recorded; ``last_token="head"`` still
    raises."""
    import gradinv.attacks.dager as dager

    def no_fit(*_args, **_kwargs):
        raise AttackError("the head's gradient does not fit the recovered prefixes (no positive multiplicities)")

    monkeypatch.setattr(dager, "last_tokens_from_head", no_fit)
    model = TinyLM(seed=0)
    tokens = draw(2, 6, seed=7)
    rec = Dager(spec=spec_of(model)).reconstruct(observe(model, tokens))
    assert torch.equal(rows_sorted(rec.inputs)[:, :-1], rows_sorted(tokens)[:, :-1])
    assert rec.extras["last_token_source"] == "span" and "no positive multiplicities" in rec.extras["head_failed"]
    with pytest.raises(AttackError, match="no positive multiplicities"):
        Dager(spec=spec_of(model), last_token="head").reconstruct(observe(model, tokens))


def test_gap_cut_keeps_the_tokens_before_the_largest_gap():
    from gradinv.attacks.dager import gap_cut

    assert gap_cut(torch.tensor([1e-4, 2e-4, 3e-4, 0.5, 0.6]), 4) == 3  # three true tokens, then the rest
    assert gap_cut(torch.tensor([1e-6, 1e-3, 2e-3, 0.5, 0.6]), 4) == 3  # differences, not ratios, pick the gap
    assert gap_cut(torch.tensor([1e-4, 0.5, 0.6, 0.7]), 3) == 1  # sequences sharing their token here
    assert gap_cut(torch.tensor([1e-4, 2e-4, 3e-4]), 8) == 3  # fewer tokens than the batch: all
    assert gap_cut(torch.tensor([0.3, 0.9]), 1) == 1
    assert gap_cut(torch.tensor([0.90, 0.91, 0.95, 0.96]), 3) is None  # no clear gap: no signal here
    assert gap_cut(torch.tensor([0.5]), 0) == 0


def test_deterministic_and_the_model_is_left_unchanged():
    model = TinyLM(seed=1)
    obs = observe(model, draw(3, 6, seed=3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: v.clone() for k, v in obs.parameters.items()}
    attack = Dager(spec=spec_of(model))
    first, again = attack.reconstruct(obs, seed=0), attack.reconstruct(obs, seed=5)
    assert torch.equal(first.inputs, again.inputs)
    # the same extras; a least-squares residual may differ in its last digits (multithreaded BLAS reductions)
    extras = [{k: v for k, v in r.extras.items() if k != "normaliser"} for r in (first, again)]
    assert extras[0].keys() == extras[1].keys()
    for k, v in extras[0].items():
        assert extras[1][k] == (pytest.approx(v, rel=1e-9) if isinstance(v, float) else v), k
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in obs.parameters.items():
        assert torch.equal(v, params[k]), k
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    assert all(p.requires_grad for p in model.parameters()) and model.training


def test_encoder_exhaustive_search_batch_one_and_two():
    model = TinyLM(width=64, layers=2, causal=False, seed=2)
    for batch in (1, 2):
        tokens = draw(batch, 4, seed=20 + batch)
        rec = Dager(spec=spec_of(model)).reconstruct(observe(model, tokens))
        assert torch.equal(rec.inputs, rows_sorted(tokens)), batch
        assert rec.extras["last_token_source"] == "span"
    with pytest.raises(AttackError, match="max_combinations"):
        Dager(spec=spec_of(model), max_combinations=2).reconstruct(observe(model, draw(2, 4, seed=22)))


# -- declines and flags -----------------------------------------------------------------------------------


def test_rank_saturation_is_flagged_when_the_batch_fills_the_width():
    model = TinyLM(width=64, seed=0)
    tokens = draw(16, 6, seed=1)  # 16 x 5 scored rows >= width 64
    rec = Dager(spec=spec_of(model)).reconstruct(observe(model, tokens))
    # zero LayerNorm biases confine the inputs to 63 dimensions: a rank-63 span holds every token
    assert rec.extras["input_rank"] == 63 and rec.extras["rank_layer1"] == 63
    assert rec.extras["rank_saturated"] is True and rec.extras["candidates_per_position"] == [16] * 6
    assert rec.inputs.shape == (16, 6) and rec.inputs.dtype == torch.long
    with pytest.raises(AttackError, match="full rank"):
        span_token_sets(observe(model, tokens), spec=spec_of(model))


def test_declines_name_every_broken_assumption():
    model = TinyLM(seed=0)
    spec = spec_of(model)
    obs = observe(model, draw(2, 6))
    attack = Dager(spec=spec)
    assert attack.applicable(obs) == []
    fedavg = Observation(
        model=model, parameters=obs.parameters, buffers=obs.buffers, update=obs.update, protocol=FedAvg(),
        knowledge=obs.knowledge, clients=3,
    )  # fmt: skip
    reasons = attack.applicable(fedavg)
    assert any("FedSGD" in r for r in reasons) and any("one client" in r for r in reasons)
    assert any("input_shape" in r for r in attack.applicable(obs.with_knowledge(input_shape=(3, 8, 8))))
    assert any("positions" in r for r in attack.applicable(obs.with_knowledge(input_shape=(40,))))
    assert "needs knowledge" in attack.applicable(obs.with_knowledge(num_samples=None))[0]
    image = Observation(
        model=nn.Linear(4, 2), parameters={}, buffers={}, update={"weight": torch.zeros(2, 4)},
        knowledge=Knowledge(num_samples=1, input_shape=(4,)),
    )  # fmt: skip
    (reason,) = Dager().applicable(image)  # no spec given and none known for this model: a reason, no crash
    assert "Linear" in reason and "spec" in reason
    with pytest.raises(AttackError, match="does not apply"):
        Dager().reconstruct(image)
    one_layer = TinyLM(layers=1)
    assert any(
        "second attention" in r for r in Dager(spec=spec_of(one_layer)).applicable(observe(one_layer, draw(2, 6)))
    )
    headless = {k: v for k, v in obs.update.items() if k != "head.weight"}  # e.g. a frozen head
    no_head = Observation(model=model, parameters=obs.parameters, buffers={}, update=headless, knowledge=obs.knowledge)
    with pytest.raises(AttackError, match="output layer"):
        Dager(spec=spec, last_token="head").reconstruct(no_head)


def test_settings_are_checked_and_registered():
    assert ATTACKS["dager"] is Dager
    with pytest.raises(ConfigError) as err:
        Dager(span_threshold=0.0, last_token="heads", max_candidates=0)
    for part in ("span_threshold", "did you mean 'head'", "max_candidates"):
        assert part in str(err.value)
    assert Dager(prefix_threshold=0.01).settings.prefix_threshold == 0.01
    assert ATTACKS.parse("dager:span_threshold=1e-4,last_token=span").settings.last_token == "span"
    spec = spec_of(TinyLM())
    assert second_attention_names(spec) == ("blocks.1.attn.qkv.weight",)
    hf = dataclasses.replace(spec, first_attention=("transformer.h.0.attn.c_attn.weight",))
    assert second_attention_names(hf) == ("transformer.h.1.attn.c_attn.weight",)
    assert second_attention_names(spec, "a.weight, b.weight") == ("a.weight", "b.weight")


# -- the token-set leak ---------------------------------------------------------------------------------------


def test_token_set_recalls_every_scored_token_of_a_batch_of_four():
    model = TinyLM(seed=0)
    tokens = draw(4, 6, seed=8)
    obs = observe(model, tokens)
    found = set(token_set(obs, spec=spec_of(model)).tolist())
    scored = set(tokens[:, :-1].flatten().tolist())  # the last position leaves no gradient under next-token loss
    assert found == scored  # recall 1.0 and precision 1.0
    assert position_set(obs, spec=spec_of(model)).tolist() == [0, 1, 2, 3, 4]
    assert sequence_length(obs, spec=spec_of(model)) == 6
    per_position = span_token_sets(obs, spec=spec_of(model))
    assert len(per_position) == 6 and per_position[5].numel() == 0
    for p in range(5):
        assert set(tokens[:, p].tolist()) <= set(per_position[p].tolist())


def test_the_heads_targets_fill_the_token_sets_blind_spot():
    """The untied head's gradient gives the next-token targets (positions 1..L-1), so with the embedding's rows the
    whole token set, the last position's tokens included; a tied head is refused."""
    from gradinv.attacks.token_leak import target_token_set

    model = TinyLM(seed=0)
    tokens = draw(4, 6, seed=8)
    obs = observe(model, tokens)
    targets = set(target_token_set(obs, spec=spec_of(model)).tolist())
    assert targets == set(tokens[:, 1:].flatten().tolist())
    assert targets | set(token_set(obs, spec=spec_of(model)).tolist()) == set(tokens.flatten().tolist())
    tied = TinyLM(seed=0, tie=True)
    with pytest.raises(AttackError, match="tied"):
        target_token_set(observe(tied, tokens), spec=spec_of(tied))


def test_token_set_refuses_a_tied_embedding_and_the_span_test_still_works():
    model = TinyLM(tie=True, seed=0)
    assert embedding_is_tied(model, "wte.weight") and not embedding_is_tied(TinyLM(), "wte.weight")
    tokens = draw(2, 6, seed=9)
    obs = observe(model, tokens)
    with pytest.raises(AttackError, match="tied"):
        token_set(obs, spec=spec_of(model))
    untied_all_rows = dict(obs.update)
    untied_all_rows["wte.weight"] = obs.update["wte.weight"] + 1e-3  # e.g. noise: every row nonzero
    noisy = Observation(model=TinyLM(), parameters=obs.parameters, buffers={}, update=untied_all_rows)
    with pytest.raises(AttackError, match="every row"):
        token_set(noisy, spec=spec_of(model))
    per_position = span_token_sets(obs, spec=spec_of(model))
    for p in range(5):
        assert set(tokens[:, p].tolist()) <= set(per_position[p].tolist())


def test_nonzero_rows_uses_a_relative_threshold():
    g = torch.zeros(5, 3)
    g[1] = 10.0
    g[3] = 1e-4
    assert nonzero_rows(g).tolist() == [1, 3]
    assert nonzero_rows(g, threshold=1e-3).tolist() == [1]
    assert nonzero_rows(torch.zeros(4, 2)).numel() == 0
    with pytest.raises(ConfigError):
        nonzero_rows(g, threshold=1.5)


# -- gradinv's own text models, described by text_model_spec ---------------------------------------------------


def test_gpt2_tiny_batch_three_through_its_own_spec():
    torch.manual_seed(0)
    model = GPT2Tiny(300, width=64, heads=4, layers=2, n_positions=16)
    tokens = draw(3, 8, vocab=300, seed=31)
    params, buffers = named_state(model)
    named = list(model.named_parameters())
    grads = torch.autograd.grad(next_token_loss(model(tokens), tokens), [p for _, p in named])
    obs = Observation(
        model=model, parameters=params, buffers=buffers,
        update={n: g for (n, _), g in zip(named, grads, strict=True)},
        knowledge=Knowledge(num_samples=3, input_shape=(8,)),
    )  # fmt: skip
    rec = build_attack("dager").reconstruct(obs)  # no spec: text_model_spec(GPT2Tiny)
    assert torch.equal(rec.inputs, rows_sorted(tokens))
    assert set(token_set(obs).tolist()) == set(tokens[:, :-1].flatten().tolist())


def test_bert_tiny_batch_one_through_its_own_spec():
    """An encoder with a classification loss: every position is in the spans, the search is over combinations."""
    torch.manual_seed(0)
    model = BertTiny(150, width=64, heads=4, layers=2, n_positions=16, num_classes=2)
    tokens = draw(1, 5, vocab=150, seed=41)
    params, buffers = named_state(model)
    named = list(model.named_parameters())
    loss = F.cross_entropy(model(tokens), torch.tensor([1]))
    grads = torch.autograd.grad(loss, [p for _, p in named])
    obs = Observation(
        model=model, parameters=params, buffers=buffers,
        update={n: g for (n, _), g in zip(named, grads, strict=True)},
        knowledge=Knowledge(num_samples=1, input_shape=(5,)),
    )  # fmt: skip
    rec = Dager().reconstruct(obs)
    assert torch.equal(rec.inputs, tokens)
    assert rec.extras["last_token_source"] == "span" and rec.extras["candidates_per_position"] == [1] * 5


@pytest.mark.parametrize("tie", [False, True])
def test_hugging_face_gpt2_through_its_spec(tie):
    """HF GPT-2 keeps Conv1D weights (in, out) (``transposed``); tied embeddings (HF's default) scan the whole
    vocabulary and read the last tokens from the head's rows that no input token touches."""
    pytest.importorskip("transformers")
    from gradinv.models.hf import hf_gpt2

    torch.manual_seed(0)
    model = hf_gpt2(200, width=64, heads=4, layers=2, n_positions=16, tie_embeddings=tie)
    tokens = draw(3, 6, seed=51)
    assert not set(tokens[:, -1].tolist()) & set(tokens[:, :-1].flatten().tolist())  # else a guess when tied
    rec = Dager().reconstruct(observe(model, tokens))
    assert torch.equal(rec.inputs, rows_sorted(tokens))
    assert rec.extras["last_token_source"] == "head" and rec.extras["head_tied"] is tie
    assert rec.extras["tokens_scanned"] == (200 if tie else len(set(tokens[:, :-1].flatten().tolist())))


def test_tied_head_reads_last_tokens_outside_the_inputs_and_guesses_the_others():
    model = TinyLM(tie=True, seed=7)
    tokens = draw(3, 6, seed=71)
    tokens[2, -1] = tokens[0, 2]  # this last token is also an input token: its tied row is contaminated
    rec = Dager(spec=spec_of(model)).reconstruct(observe(model, tokens))
    assert rec.extras["head_tied"] is True and rec.extras["last_tokens_guessed"] == 1
    truth = rows_sorted(tokens)
    assert torch.equal(rec.inputs[:, :-1], truth[:, :-1])
    assert (rec.inputs[:, -1] == truth[:, -1]).sum() >= 2


def test_through_a_scenario_of_the_registered_gpt2_tiny():
    from gradinv.fl.scenario import Scenario
    from gradinv.models import build_text_model

    model = build_text_model("gpt2-tiny", vocab_size=64, seed=0, width=32, heads=2)
    tokens = torch.randint(4, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    obs = Scenario.from_tokens(model, tokens).observe()
    attack = build_attack("dager")
    assert attack.applicable(obs) == [] and attack.modality == "text"
    assert torch.equal(attack.reconstruct(obs).inputs, rows_sorted(tokens))
