"""Token models: GPT2Tiny, BertTiny, their TextModelSpec, the registry of text models and the Hugging Face adapter."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from gradinv.errors import ConfigError, ShapeError
from gradinv.fl.functional import stateless_twin
from gradinv.models.transformer import (
    TEXT_MODELS,
    BertTiny,
    GPT2Tiny,
    build_text_model,
    list_text_models,
    next_token_loss,
    text_model_spec,
)

V, D, P = 97, 32, 16


def gpt2(**kw) -> GPT2Tiny:
    torch.manual_seed(0)
    return GPT2Tiny(V, **{"n_positions": P, "width": D, "layers": 2, "heads": 4, **kw})


def bert(**kw) -> BertTiny:
    torch.manual_seed(0)
    return BertTiny(V, **{"num_classes": 3, "n_positions": P, "width": D, "layers": 2, "heads": 4, **kw})


def ids(b: int = 2, length: int = 5, seed: int = 1, vocab: int = V) -> torch.Tensor:
    return torch.randint(0, vocab, (b, length), generator=torch.Generator().manual_seed(seed))


def loss_of(model: torch.nn.Module, out: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    if out.dim() == 3:
        return next_token_loss(out, tokens)
    return F.cross_entropy(out, torch.arange(out.shape[0]) % out.shape[1])


def first_attention_input(model: torch.nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The input of submodule ``layer`` in a forward pass on ``x``, captured by a forward pre-hook."""
    seen = []
    handle = model.get_submodule(layer).register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0]


def flat_positions(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, length = tokens.shape
    return tokens.reshape(-1), torch.arange(length).repeat(b)


# ----------------------------------------------------------------------------------------------- our models


def test_shapes_and_parameter_names():
    g, b = gpt2(), bert()
    assert g(ids()).shape == (2, 5, V)
    assert b(ids()).shape == (2, 3)
    names = dict(g.named_parameters())
    for name in (
        "wte.weight",
        "wpe.weight",
        "blocks.1.ln1.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.bias",
    ):
        assert name in names
    assert names["blocks.0.attn.qkv.weight"].shape == (3 * D, D)
    assert names["head.weight"].shape == (V, D) and "head.bias" not in names
    assert names["head.weight"].data_ptr() != names["wte.weight"].data_ptr()
    tied = gpt2(tie_embeddings=True)
    assert tied.head.weight is tied.wte.weight and "head.weight" not in dict(tied.named_parameters())


def test_input_errors_say_what_is_wrong():
    g = gpt2()
    with pytest.raises(ShapeError, match="at most 16 tokens"):
        g(ids(length=P + 1))
    with pytest.raises(ShapeError, match=r"token embeddings \(B, L, 32\)"):
        g(torch.zeros(2, 5, D + 1))
    with pytest.raises(ShapeError, match=r"\(B, L\)"):
        bert()(torch.zeros(2, 5, 1, dtype=torch.long))
    with pytest.raises(ConfigError, match="multiple of heads"):
        GPT2Tiny(V, width=30, heads=4)
    with pytest.raises(ConfigError, match="vocab_size"):
        BertTiny(0)
    with pytest.raises(ConfigError, match="dropout"):
        GPT2Tiny(V, width=8, heads=2, dropout=1.0)


@pytest.mark.parametrize("make", [gpt2, bert])
def test_ids_path_equals_embeddings_path(make):
    model = make()
    tokens = ids()
    assert torch.equal(model(tokens), model(model.wte(tokens)))


def test_gpt2_is_causal_and_bert_is_not():
    g, b = gpt2(), bert()
    tokens = ids(b=2, length=6)
    changed = tokens.clone()
    changed[:, 3] = (changed[:, 3] + 1) % V
    out, out_changed = g(tokens), g(changed)
    assert torch.equal(out[:, :3], out_changed[:, :3])
    assert (out[:, 3:] - out_changed[:, 3:]).abs().amax(-1).min() > 0  # every later position sees the change
    last = tokens.clone()
    last[:, -1] = (last[:, -1] + 1) % V
    assert not torch.allclose(b(tokens), b(last))  # the pooled first position attends to the last token


def test_next_token_loss():
    logits = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 1]])
    manual = torch.stack([-logits[i, j].log_softmax(-1)[tokens[i, j + 1]] for i in range(2) for j in range(3)]).mean()
    assert torch.allclose(next_token_loss(logits, tokens), manual)
    with pytest.raises(ShapeError, match="at least 2 tokens"):
        next_token_loss(logits[:, :1], tokens[:, :1])
    with pytest.raises(ShapeError, match=r"logits \(B, L, V\)"):
        next_token_loss(logits[0], tokens)


@pytest.mark.parametrize("make", [gpt2, bert])
def test_double_backward_through_embeddings(make):
    """Gradient matching differentiates the parameter gradient with respect to the input embeddings."""
    model = make()
    tokens = ids()
    params = [p for n, p in model.named_parameters() if n != "wte.weight"]  # not used by embeddings input
    target = [g.detach() for g in torch.autograd.grad(loss_of(model, model(tokens), tokens), params)]
    x = (model.wte(tokens) + 0.1 * torch.randn(2, 5, D, generator=torch.Generator().manual_seed(2))).detach()
    x.requires_grad_(True)
    grads = torch.autograd.grad(loss_of(model, model(x), tokens), params, create_graph=True)
    distance = sum(((a - b) ** 2).sum() for a, b in zip(grads, target, strict=True))
    (dx,) = torch.autograd.grad(distance, x)
    assert torch.isfinite(dx).all() and dx.abs().sum() > 0


@pytest.mark.parametrize("make", [gpt2, bert])
def test_double_backward_is_exact(make):
    """gradcheck of x -> d loss / d (first attention weight), in float64 on a very small model."""
    model = make(width=8, heads=2, layers=1).double()
    tokens = ids(b=1, length=3)
    weight = model.blocks[0].attn.qkv.weight

    def parameter_gradient(x: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(loss_of(model, model(x), tokens), weight, create_graph=True)[0]

    x = model.wte(tokens).detach().requires_grad_(True)
    assert torch.autograd.gradcheck(parameter_gradient, (x,), atol=1e-6)


def test_torch_func_vmap_over_restarts():
    """functional_call + grad + vmap: several candidates' parameter gradients at once equal a Python loop."""
    model = stateless_twin(gpt2(width=16, heads=2), train_mode=True)
    params = dict(model.named_parameters())
    tokens = ids()

    def qkv_gradient(x: torch.Tensor) -> torch.Tensor:
        def loss(p):
            return next_token_loss(functional_call(model, p, (x,)), tokens)

        return grad(loss)(params)["blocks.0.attn.qkv.weight"]

    xs = torch.randn(3, 2, 5, 16, generator=torch.Generator().manual_seed(0))
    batched = vmap(qkv_gradient)(xs)
    looped = torch.stack([qkv_gradient(x) for x in xs])
    assert torch.allclose(batched, looped, atol=1e-6)


# ------------------------------------------------------------------------------------------------- registry


def test_build_text_model_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a = build_text_model("gpt2-tiny", vocab_size=V, seed=3, width=D, heads=4, n_positions=P)
    b = build_text_model("gpt2-tiny", vocab_size=V, seed=3, width=D, heads=4, n_positions=P)
    c = build_text_model("gpt2-tiny", vocab_size=V, seed=4, width=D, heads=4, n_positions=P)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.wte.weight, c.wte.weight)
    assert a.training
    assert a.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)  # GPT-2's N(0, 0.02)
    m = build_text_model("bert-tiny", vocab_size=V, num_classes=4, seed=0, width=32, heads=2, dropout=0)
    assert isinstance(m, BertTiny) and m(ids()).shape == (2, 4)


def test_build_text_model_errors():
    with pytest.raises(ConfigError, match="known text models: bert-tiny"):
        build_text_model("gpt3", vocab_size=V)
    with pytest.raises(ConfigError, match="no option 'depth'"):
        build_text_model("gpt2-tiny", vocab_size=V, depth=3)
    with pytest.raises(ConfigError, match="option 'width' must be an integer"):
        build_text_model("bert-tiny", vocab_size=V, width="wide")
    with pytest.raises(ConfigError, match="vocab_size of at least 2"):
        build_text_model("bert-tiny", vocab_size=1)
    assert {name for name, _ in list_text_models()} == set(TEXT_MODELS)
    with pytest.raises(ConfigError, match="option 'tie_embeddings' must be true or false"):
        build_text_model("gpt2-tiny", vocab_size=V, tie_embeddings="maybe")


# --------------------------------------------------------------------------------------------- the spec


@pytest.mark.parametrize("make", [gpt2, bert])
def test_layer_inputs_equal_the_first_attention_input(make):
    model = make()
    spec = text_model_spec(model)
    tokens = ids(b=3, length=7)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}  # as observation.parameters
    z = spec.layer_inputs(*flat_positions(tokens), params)
    captured = first_attention_input(model, spec.first_attention[0].removesuffix(".weight"), tokens)
    assert z.shape == (21, D)
    assert torch.allclose(z, captured.reshape(-1, D), atol=1e-6)
    assert spec.width == D and spec.vocab_size == V and spec.max_positions == P and not spec.transposed
    assert spec.causal == isinstance(model, GPT2Tiny)
    assert spec.token_embedding in params and spec.position_embedding in params


def test_text_model_spec_refuses_other_models():
    with pytest.raises(ConfigError, match="give a TextModelSpec"):
        text_model_spec(torch.nn.Linear(3, 3))
    with pytest.raises(ConfigError, match="no 'wte.weight'"):
        text_model_spec(gpt2()).layer_inputs(torch.tensor([1]), torch.tensor([0]), {})


def _span_residual(rows: torch.Tensor, basis: torch.Tensor) -> float:
    """Relative norm of ``rows`` outside span{basis rows}."""
    q, _ = torch.linalg.qr(basis.T)
    return ((rows - rows @ q @ q.T).norm() / rows.norm()).item()


def _rank(matrix: torch.Tensor) -> int:
    s = torch.linalg.svdvals(matrix)
    return int((s > 1e-9 * s[0]).sum())


@pytest.mark.parametrize("make", [gpt2, bert])
def test_first_attention_gradient_lies_in_the_span_of_the_layer_inputs(make):
    """DAGER's observation (Petrov et al., NeurIPS 2024): the rows of the first attention weight's gradient are
    combinations of the batch's token inputs z_i, and a token not in the batch is outside their span."""
    model = make(width=64, heads=4).double()
    spec = text_model_spec(model)
    tokens = ids(b=2, length=5)
    params = dict(model.named_parameters())
    loss = loss_of(model, model(tokens), tokens)
    (g,) = torch.autograd.grad(loss, [params[spec.first_attention[0]]])
    with torch.no_grad():
        z = spec.layer_inputs(*flat_positions(tokens), params)
        absent = torch.tensor([t for t in range(V) if t not in tokens][:4])
        z_absent = spec.layer_inputs(absent, torch.tensor([0, 1, 2, 3]), params)
    assert _span_residual(g, z) < 1e-10
    assert _span_residual(z_absent, z) > 0.1
    if spec.causal:  # the last token's logits are not in the next-token loss: its row carries no gradient
        assert _rank(g) == 2 * 4
        assert _span_residual(g, z.reshape(2, 5, -1)[:, :4].reshape(8, -1)) < 1e-10
    else:
        assert _rank(g) == 10


# ------------------------------------------------------------------------------------------ Hugging Face


def test_missing_transformers_says_how_to_install(monkeypatch):
    from gradinv.models import hf

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ConfigError, match=r"pip install gradinv\[text\]"):
        hf.hf_gpt2(V)


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def _gpt2_to_hf(ours: GPT2Tiny, theirs) -> None:
    """Copy GPT2Tiny's weights into a Hugging Face GPT-2 (Conv1D keeps weights as (in, out))."""
    sd = {
        "transformer.wte.weight": ours.wte.weight,
        "transformer.wpe.weight": ours.wpe.weight,
        "transformer.ln_f.weight": ours.ln_f.weight,
        "transformer.ln_f.bias": ours.ln_f.bias,
    }
    for i, block in enumerate(ours.blocks):
        h = f"transformer.h.{i}."
        for mine, hfs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            sd[h + hfs + ".weight"] = getattr(block, mine).weight
            sd[h + hfs + ".bias"] = getattr(block, mine).bias
        for layer, hfs in ((block.attn.qkv, "attn.c_attn"), (block.attn.proj, "attn.c_proj")):
            sd[h + hfs + ".weight"], sd[h + hfs + ".bias"] = layer.weight.T, layer.bias
        for layer, hfs in ((block.mlp.fc, "mlp.c_fc"), (block.mlp.proj, "mlp.c_proj")):
            sd[h + hfs + ".weight"], sd[h + hfs + ".bias"] = layer.weight.T, layer.bias
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(sd[name])


def _bert_to_hf(ours: BertTiny, theirs) -> None:
    e = "bert.embeddings."
    sd = {
        e + "word_embeddings.weight": ours.wte.weight,
        e + "position_embeddings.weight": ours.wpe.weight,
        e + "token_type_embeddings.weight": ours.wtt.weight,
        e + "LayerNorm.weight": ours.ln_emb.weight,
        e + "LayerNorm.bias": ours.ln_emb.bias,
        "bert.pooler.dense.weight": ours.pooler.weight,
        "bert.pooler.dense.bias": ours.pooler.bias,
        "classifier.weight": ours.classifier.weight,
        "classifier.bias": ours.classifier.bias,
    }
    for i, block in enumerate(ours.blocks):
        h = f"bert.encoder.layer.{i}."
        for j, part in enumerate(("query", "key", "value")):
            rows = slice(j * D, (j + 1) * D)
            sd[h + f"attention.self.{part}.weight"] = block.attn.qkv.weight[rows]
            sd[h + f"attention.self.{part}.bias"] = block.attn.qkv.bias[rows]
        pairs = (
            (block.attn.proj, "attention.output.dense"),
            (block.ln1, "attention.output.LayerNorm"),
            (block.mlp.fc, "intermediate.dense"),
            (block.mlp.proj, "output.dense"),
            (block.ln2, "output.LayerNorm"),
        )
        for layer, hfs in pairs:
            sd[h + hfs + ".weight"], sd[h + hfs + ".bias"] = layer.weight, layer.bias
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(sd[name])


def test_our_models_compute_what_hugging_face_computes(transformers):
    """Oracle: with the same weights, GPT2Tiny and BertTiny give Hugging Face GPT-2's and BERT's logits."""
    from gradinv.models.hf import hf_bert, hf_gpt2

    ours = gpt2(tie_embeddings=True)
    theirs = hf_gpt2(V, n_positions=P, width=D, layers=2, heads=4)
    _gpt2_to_hf(ours, theirs)
    tokens = ids(b=2, length=6)
    assert torch.allclose(ours(tokens), theirs(tokens), atol=1e-5)
    ours_b = bert()
    theirs_b = hf_bert(V, num_classes=3, n_positions=P, width=D, layers=2, heads=4)
    _bert_to_hf(ours_b, theirs_b)
    assert torch.allclose(ours_b(tokens), theirs_b(tokens), atol=1e-5)


@pytest.mark.parametrize("kind", ["hf-gpt2", "hf-bert"])
def test_hugging_face_wrapper_contract(transformers, kind):
    model = build_text_model(kind, vocab_size=V, num_classes=3, seed=0, width=D, heads=4, n_positions=P)
    spec = text_model_spec(model)
    params = dict(model.named_parameters())
    assert spec.token_embedding in params and all(name in params for name in spec.first_attention)
    assert model.hf_module.config._attn_implementation == "eager"
    tokens = ids()
    out = model(tokens)
    assert out.shape == ((2, 5, V) if kind == "hf-gpt2" else (2, 3))
    embeddings = params[spec.token_embedding][tokens]
    assert torch.allclose(out, model(embeddings), atol=1e-6)
    # the same seed gives the same weights
    again = build_text_model(kind, vocab_size=V, num_classes=3, seed=0, width=D, heads=4, n_positions=P)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))
    # functional_call on a stateless twin evaluates at the given parameters
    twin = stateless_twin(model, train_mode=True)
    shifted = {k: v + 0.01 for k, v in twin.named_parameters()}
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.01)
    assert torch.allclose(functional_call(twin, shifted, (tokens,)), moved(tokens), atol=1e-5)
    assert torch.equal(model(tokens), out)  # the original is untouched
    # double backward with embeddings input
    x = embeddings.detach().requires_grad_(True)
    first = params[spec.first_attention[0]]
    (g,) = torch.autograd.grad(loss_of(model, model(x), tokens), [first], create_graph=True)
    (dx,) = torch.autograd.grad(g.square().sum(), x)
    assert torch.isfinite(dx).all() and dx.abs().sum() > 0
    # vmap over candidates of the parameter gradient (as batched restarts do)
    twin_params = dict(twin.named_parameters())

    def first_gradient(e: torch.Tensor) -> torch.Tensor:
        return grad(lambda p: loss_of(twin, functional_call(twin, p, (e,)), tokens))(twin_params)[
            spec.first_attention[0]
        ]

    xs = embeddings.detach() + 0.1 * torch.randn(3, *embeddings.shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(vmap(first_gradient)(xs), torch.stack([first_gradient(e) for e in xs]), atol=1e-6)
    # eval / train reach the Hugging Face module itself
    model.eval()
    assert not model.hf_module.training and not any(m.training for m in model.modules())
    model.train()
    assert model.hf_module.training


@pytest.mark.parametrize("kind", ["hf-gpt2", "hf-bert"])
def test_hugging_face_spec(transformers, kind):
    model = build_text_model(kind, vocab_size=V, num_classes=3, seed=0, width=D, heads=4, n_positions=P).double()
    spec = text_model_spec(model)
    assert text_model_spec(model.hf_module).first_attention == spec.first_attention  # bare module, same names
    tokens = ids(b=2, length=5)
    params = dict(model.named_parameters())
    with torch.no_grad():
        z = spec.layer_inputs(*flat_positions(tokens), params)
    layer = spec.first_attention[0].removesuffix(".weight")
    assert torch.allclose(z, first_attention_input(model, layer, tokens).reshape(-1, D), atol=1e-10)
    grads = torch.autograd.grad(loss_of(model, model(tokens), tokens), [params[n] for n in spec.first_attention])
    for g in grads:
        rows = g.T if spec.transposed else g  # Conv1D (in, out): the layer inputs span the columns
        assert _span_residual(rows, z) < 1e-10
    assert spec.transposed == (kind == "hf-gpt2") and spec.causal == (kind == "hf-gpt2")
    assert len(spec.first_attention) == (1 if kind == "hf-gpt2" else 3)


def test_hugging_face_vit_and_refusals(transformers):
    from gradinv.models.hf import HuggingFaceModel

    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=5,
    )  # fmt: skip
    vit = HuggingFaceModel(transformers.ViTForImageClassification(config))
    assert vit(torch.randn(2, 3, 8, 8)).shape == (2, 5)
    with pytest.raises(ShapeError, match="images"):
        vit(ids())
    with pytest.raises(ConfigError, match="has no TextModelSpec"):
        text_model_spec(vit)
    with pytest.raises(ConfigError, match="HuggingFaceModel wraps"):
        HuggingFaceModel(gpt2())
