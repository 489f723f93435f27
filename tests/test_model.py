"""Tests for minituner/model.py: hand-derived values, invariants (hypothesis), errors.

Parity with `transformers` goes through load_hf and lives in test_checkpoint.py.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import contextlib  # noqa: E402
import copy  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from minituner.model import (  # noqa: E402
    KVCache, ModelConfig, RMSNorm, Transformer, apply_rope, rope_cos_sin,
)

V, BLOCK = 61, 24
FAMILIES = ["gpt2", "llama", "bert"]
CAUSAL = ["gpt2", "llama"]
_MODELS: dict = {}


def tiny(family: str, dtype=torch.float32, **kw) -> Transformer:
    """A 2-layer model with non-trivial weights (std 0.3, not 0.02: differences must show)."""
    key = (family, dtype, tuple(sorted(kw.items())))
    if key not in _MODELS:
        torch.manual_seed(0)
        cfg = ModelConfig(family=family, vocab_size=V, block_size=BLOCK, n_layer=2, n_head=4,
                          n_kv_head=2 if family == "llama" else None, n_embd=16,
                          intermediate_size=24, **kw)
        m = Transformer(cfg)
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.3)
        _MODELS[key] = m.to(dtype).eval()
    return _MODELS[key]


def ids(B: int, T: int, seed: int) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# -- configuration ---------------------------------------------------------------------------------
def test_config_defaults_and_round_trip():
    """None fields resolve to the family defaults: 4C MLP, H_kv = H, D = C / H, biases and tying."""
    g = ModelConfig(family="gpt2", n_embd=64, n_head=4)
    assert (g.intermediate_size, g.n_kv_head, g.head_dim, g.bias, g.tie_embeddings) == (256, 4, 16, True, True)
    ll = ModelConfig(family="llama", n_embd=64, n_head=4, n_kv_head=2)
    assert (ll.bias, ll.tie_embeddings, ll.n_kv_head) == (False, False, 2)
    assert ModelConfig.from_dict(ll.to_dict()) == ll
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**ll.to_dict(), "n_heads": 3})


@pytest.mark.parametrize("kw, msg", [
    (dict(n_embd=30, n_head=4), "n_head=4 must divide n_embd=30"),
    (dict(n_embd=32, n_head=4, n_kv_head=3), "n_kv_head=3 must divide n_head=4"),
    (dict(family="t5"), "family='t5' is not one of"),
    (dict(vocab_size=0), "vocab_size must be a positive"),
    (dict(dropout=1.0), "dropout must be in"),
])
def test_bad_config_raises(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ModelConfig(**kw)


SIZE_FIELDS = ["vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head",
               "intermediate_size", "head_dim", "type_vocab_size"]


@pytest.mark.parametrize("field", SIZE_FIELDS)
@pytest.mark.parametrize("bad", [256.0, "256", True, 0, -1])
def test_config_rejects_non_integer_or_non_positive_sizes(field, bad):
    """A float, a string or a bool is not a size (int(256.0) would hide the mistake until a
    shape breaks); 0 and -1 are not positive. The message names the field."""
    with pytest.raises(ValueError, match=f"{field} must be a positive integer, got {bad!r}"):
        ModelConfig(**{**dict(n_embd=256, n_head=4), field: bad})


def test_config_accepts_numpy_integers_as_plain_ints():
    np = pytest.importorskip("numpy")
    c = ModelConfig(n_embd=np.int64(64), n_head=np.int32(4))
    assert type(c.n_embd) is int and c.head_dim == 16  # to_dict stays JSON-serializable


# What each family resolves to: the table in model.py's docstring, written out by hand.
FAMILY_TABLE = {
    "gpt2": dict(norm="layernorm", positions="learned", mlp="gelu_tanh", post_norm=False, causal=True,
                 bias=True, qkv_bias=True, mlp_bias=True, lm_head=True, tie_embeddings=True,
                 token_types=False, emb_norm=False),
    "llama": dict(norm="rmsnorm", positions="rope", mlp="swiglu", post_norm=False, causal=True,
                  bias=False, qkv_bias=False, mlp_bias=False, lm_head=True, tie_embeddings=False,
                  token_types=False, emb_norm=False),
    "bert": dict(norm="layernorm", positions="learned", mlp="gelu", post_norm=True, causal=False,
                 bias=True, qkv_bias=True, mlp_bias=True, lm_head=False, tie_embeddings=False,
                 token_types=True, emb_norm=True),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_sets_the_architecture_defaults(family):
    c = ModelConfig(family=family, n_embd=64, n_head=4)
    assert {k: getattr(c, k) for k in FAMILY_TABLE[family]} == FAMILY_TABLE[family]
    assert ModelConfig.from_dict(c.to_dict()) == c


def test_config_json_written_before_the_architecture_fields_still_loads():
    """weights/base/config.json has only the fields of the first release: it must still load
    into the same gpt2 model (same modules, same parameter shapes)."""
    old = {"bias": True, "block_size": 256, "dropout": 0.0, "family": "gpt2", "head_dim": 64,
           "intermediate_size": 1024, "n_embd": 256, "n_head": 4, "n_kv_head": 4, "n_layer": 4,
           "norm_eps": 1e-05, "rope_theta": 10000.0, "tie_embeddings": True, "type_vocab_size": 2,
           "vocab_size": 1327}
    c = ModelConfig.from_dict(old)
    assert {k: getattr(c, k) for k in FAMILY_TABLE["gpt2"]} == FAMILY_TABLE["gpt2"]
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(c).state_dict().items()}
    assert shapes["pos_emb.weight"] == (256, 256) and shapes["blocks.3.mlp.fc.bias"] == (1024,)
    assert not any(k.startswith(("type_emb", "emb_norm")) for k in shapes)


@pytest.mark.parametrize("kw, msg", [
    (dict(norm="batchnorm"), "norm='batchnorm' is not one of"),
    (dict(positions="alibi"), "positions='alibi' is not one of"),
    (dict(mlp="relu"), "mlp='relu' is not one of"),
    (dict(causal=1), "causal must be True, False or None"),
    (dict(family="bert", tie_embeddings=True), "tie_embeddings=True needs lm_head=True"),
    (dict(positions="rope", n_embd=12, n_head=4), "RoPE needs an even head_dim"),
])
def test_bad_architecture_fields_raise(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ModelConfig(**kw)


def test_architecture_fields_mix_across_families():
    """A gpt2 layout with Llama's parts is a configuration: the modules follow the fields."""
    c = ModelConfig(family="gpt2", vocab_size=V, block_size=BLOCK, n_layer=1, n_head=2, n_embd=8,
                    norm="rmsnorm", positions="rope", mlp="swiglu", qkv_bias=True, bias=False)
    m = Transformer(c)
    names = {n for n, _ in m.named_modules()}
    assert "pos_emb" not in names and "blocks.0.mlp.gate_proj" in names and "blocks.0.mlp.fc" not in names
    assert isinstance(m.norm_f, RMSNorm) and m.lm_head.weight is m.tok_emb.weight
    attn = m.blocks[0].attn
    assert attn.q_proj.bias is not None and attn.v_proj.bias is not None and attn.o_proj.bias is None
    assert m.blocks[0].mlp.up_proj.bias is None
    assert m(ids(2, 5, 0)).shape == (2, 5, V)


def _hf_llama_layout_to_ours(hf_state: dict) -> dict:
    """Qwen2 and Mistral store Llama's key layout: model.layers.{i}.self_attn.q_proj, ..."""
    import re
    rules = [(r"model\.embed_tokens\.", "tok_emb."), (r"model\.norm\.", "norm_f."),
             (r"model\.layers\.(\d+)\.self_attn\.", r"blocks.\1.attn."),
             (r"model\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
             (r"model\.layers\.(\d+)\.input_layernorm\.", r"blocks.\1.attn_norm."),
             (r"model\.layers\.(\d+)\.post_attention_layernorm\.", r"blocks.\1.mlp_norm.")]
    out = {}
    for k, w in hf_state.items():
        for pattern, repl in rules:
            k = re.sub("^" + pattern, repl, k)
        out[k] = w
    return out


@pytest.mark.parametrize("arch, extra", [("qwen2", dict(qkv_bias=True)), ("mistral", {})])
def test_llama_like_families_are_configurations(arch, extra):
    """Parity with transformers in float64 to 1e-6 (both compute RoPE's angles in float32; a
    missing bias would be off by ~1): Qwen2 (q/k/v biases, no other bias) and Mistral are
    family="llama" plus fields, with no new branch in model.py."""
    transformers = pytest.importorskip("transformers")
    hf_cls, cfg_cls = {"qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config),
                       "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig)}[arch]
    torch.manual_seed(0)
    hf_cfg = cfg_cls(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=BLOCK,
                     rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                     sliding_window=None, use_sliding_window=False, attn_implementation="sdpa")  # HF's eager path gives NaN rows in float64 under padding
    hf = hf_cls(hf_cfg).double().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)  # random biases and norms too: a missing one must show
    ours = Transformer(ModelConfig(family="llama", vocab_size=V, block_size=BLOCK, n_layer=2, n_head=4,
                                   n_kv_head=2, n_embd=16, intermediate_size=24, norm_eps=1e-6, **extra))
    state = _hf_llama_layout_to_ours(hf.state_dict())
    state = {k: v for k, v in state.items() if "rotary_emb" not in k}
    ours.load_state_dict(state, strict=True)
    ours = ours.double().eval()
    x = ids(2, 7, 0)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0  # left padding, as HF expects for generation
    with torch.no_grad():
        ref = hf(input_ids=x, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        got = ours(x, attention_mask=mask)
    torch.testing.assert_close(got[0], ref[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[1, 3:], ref[1, 3:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_stable_module_names(family):
    """LoRA and adapters target these names: they are a contract."""
    names = {n for n, _ in tiny(family).named_modules()}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"blocks.1.attn.{proj}" in names
    mlp = ("gate_proj", "up_proj", "down_proj") if family == "llama" else ("fc", "proj")
    assert all(f"blocks.0.mlp.{n}" in names for n in mlp)
    assert ("lm_head" in names) == (family != "bert")
    assert tiny(family).get_input_embeddings() is tiny(family).tok_emb


def test_gpt2_ties_embeddings_and_gqa_shapes():
    m = tiny("gpt2")
    assert m.lm_head.weight is m.tok_emb.weight
    attn = tiny("llama").blocks[0].attn  # H=4, H_kv=2, D=4, C=16
    assert attn.q_proj.weight.shape == (16, 16) and attn.k_proj.weight.shape == (8, 16)


# -- math by hand ------------------------------------------------------------------------------------
def test_rmsnorm_by_hand():
    """x = [3, 4]: RMS = sqrt((9 + 16) / 2) = sqrt(12.5), so the output is x / sqrt(12.5) * g."""
    n = RMSNorm(2, eps=0.0)
    with torch.no_grad():
        n.weight.copy_(torch.tensor([1.0, 2.0]))
    out = n(torch.tensor([[3.0, 4.0]]))
    r = math.sqrt(12.5)
    torch.testing.assert_close(out, torch.tensor([[3.0 / r, 2 * 4.0 / r]]))


@settings(max_examples=25, deadline=None)
@given(shape=st.sampled_from([(5, 8), (2, 3, 16), (1, 1, 4)]), train_weight=st.booleans(),
       scale=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 999))
def test_rmsnorm_fast_path_equals_the_formula_and_its_autograd(shape, train_weight, scale, seed):
    """The hand-derived backward (_RMSNormFunction) against autograd through the formula, in
    float64, with the weight trained or frozen, and float64 gradcheck; then the module's two
    paths in float32 (RMSNorm.fast True / False), values and gradients."""
    g = torch.Generator().manual_seed(seed)
    n = RMSNorm(shape[-1], eps=1e-5).double()
    with torch.no_grad():
        n.weight.copy_(torch.rand(shape[-1], generator=g, dtype=torch.float64) + 0.5)
    n.weight.requires_grad_(train_weight)
    x = (scale * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_()
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    from minituner.model import _RMSNormFunction
    out = _RMSNormFunction.apply(x, n.weight, n.eps)
    grads = torch.autograd.grad(out, [x, n.weight] if train_weight else [x], dy)
    ref = n.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + n.eps))  # Eq. 4, float64
    ref_grads = torch.autograd.grad(ref, [x, n.weight] if train_weight else [x], dy)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert torch.autograd.gradcheck(lambda x_, w_: _RMSNormFunction.apply(x_, w_, 1e-5),
                                    (x.detach()[..., :4].clone().requires_grad_(),
                                     n.weight.detach()[:4].clone().requires_grad_()))
    n32 = n.float()
    x32 = x.detach().float().requires_grad_()
    paths = []
    for fast in (True, False):
        n32.fast = fast
        y = n32(x32)
        paths.append((y, *torch.autograd.grad(y, [x32, n32.weight] if train_weight else [x32], dy.float())))
    for a, b in zip(*paths):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, 1 / scale))


def test_rmsnorm_fast_path_runs_in_float32_only():
    n = RMSNorm(4, eps=1e-5)
    x = torch.randn(3, 4, requires_grad=True)
    assert type(n(x).grad_fn).__name__ == "_RMSNormFunctionBackward"
    assert type(n(x.bfloat16()).grad_fn).__name__ != "_RMSNormFunctionBackward"  # bf16: the plain path


def test_rope_by_hand():
    """D = 2, theta_0 = base^0 = 1: position m rotates (x1, x2) by angle m.
    rotate_half gives (x1 cos m - x2 sin m, x2 cos m + x1 sin m); (1, 0) at m=1 -> (cos 1, sin 1)."""
    cos, sin = rope_cos_sin(torch.tensor([[0, 1]]), head_dim=2, theta=10000.0)
    x = torch.tensor([1.0, 0.0]).expand(1, 1, 2, 2)  # (B, H, T, D)
    out = apply_rope(x, cos, sin)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(out[0, 0, 1], torch.tensor([math.cos(1.0), math.sin(1.0)]))


@settings(max_examples=20)
@given(m=st.integers(0, 50), n=st.integers(0, 50), shift=st.integers(0, 50), seed=st.integers(0, 999))
def test_rope_scores_depend_only_on_relative_position(m, n, shift, seed):
    """RoPE's point (Su et al. Eq. 16): <R_m q, R_n k> is a function of m - n only."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 1, 1, 8, generator=g, dtype=torch.float64), torch.randn(1, 1, 1, 8, generator=g, dtype=torch.float64)

    def score(a, b):
        ca, sa = rope_cos_sin(torch.tensor([[a]]), 8, 100.0)
        cb, sb = rope_cos_sin(torch.tensor([[b]]), 8, 100.0)
        return (apply_rope(q, ca.double(), sa.double()) * apply_rope(k, cb.double(), sb.double())).sum()

    torch.testing.assert_close(score(m, n), score(m + shift, n + shift), atol=1e-5, rtol=1e-5)


# -- errors -----------------------------------------------------------------------------------------
def test_errors_name_the_fix():
    m = tiny("gpt2")
    with pytest.raises(ValueError, match="exceeds block_size=24"):
        m(ids(1, BLOCK + 1, 0))
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        m(ids(1, 3, 0), inputs_embeds=torch.zeros(1, 3, 16))
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        m()
    with pytest.raises(ValueError, match="attention_mask must be"):
        m(ids(2, 3, 0), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="exceeds block_size"):
        m.generate(ids(1, 20, 0), max_new_tokens=5)
    with pytest.raises(ValueError, match="needs a causal model"):
        tiny("bert").generate(ids(1, 3, 0), 2)
    with pytest.raises(ValueError, match="pooling="):
        m.hidden_states(ids(1, 3, 0), pooling="max")
    with pytest.raises(ValueError, match="one .k, v. per layer"):
        m(ids(1, 3, 0), prefix_kv=[(torch.zeros(1, 4, 0, 4),) * 2])


# -- invariants (hypothesis) -------------------------------------------------------------------------
@settings(max_examples=20)
@given(family=st.sampled_from(CAUSAL), T=st.integers(2, 12), cut=st.integers(1, 11), seed=st.integers(0, 999))
def test_future_never_changes_the_past(family, T, cut, seed):
    cut = min(cut, T - 1)
    x = ids(2, T, seed)
    y = x.clone()
    y[:, cut:] = ids(2, T - cut, seed + 1)  # new future
    m = tiny(family)
    with torch.no_grad():
        torch.testing.assert_close(m(x)[:, :cut], m(y)[:, :cut], atol=1e-5, rtol=0)


def test_bert_is_bidirectional():
    """The same change that a causal model ignores does reach BERT's first position."""
    x = ids(1, 6, 0)
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % V
    with torch.no_grad():
        assert (tiny("bert")(x)[0, 0] - tiny("bert")(y)[0, 0]).abs().max() > 1e-4


@settings(max_examples=15)
@given(family=st.sampled_from(CAUSAL), T=st.integers(1, 8), steps=st.integers(1, 8), seed=st.integers(0, 999))
def test_kv_cache_equals_full_forward(family, T, steps, seed):
    """Feeding a prompt, then one token at a time through the cache, gives the full-forward logits."""
    m = tiny(family)
    x = ids(2, T + steps, seed)
    with torch.no_grad():
        full = m(x)
        cache = KVCache(T + steps)
        parts = [m(x[:, :T], kv_cache=cache)] + [m(x[:, t:t + 1], kv_cache=cache) for t in range(T, T + steps)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


@settings(max_examples=10)
@given(family=st.sampled_from(CAUSAL), T=st.integers(1, 6), n=st.integers(1, 8), seed=st.integers(0, 999))
def test_generate_greedy_equals_argmax_of_full_forward(family, T, n, seed):
    """float64 so that argmax ties cannot flip between the two paths."""
    m = tiny(family, torch.float64)
    x = ids(2, T, seed)
    out = m.generate(x, n)
    ref = x
    with torch.no_grad():
        for _ in range(n):
            ref = torch.cat((ref, m(ref)[:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(out, ref)


def pad_batch(rows: list[torch.Tensor], pad_lens: list[int], side: str):
    """Pad 1-D rows to one length (extra pads per row); returns ids, mask, each row's slice."""
    T = max(len(r) + p for r, p in zip(rows, pad_lens))
    x = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    where = []
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
        x[i, sl], mask[i, sl] = r, 1
        where.append(sl)
    return x, mask, where


@settings(max_examples=20)
@given(family=st.sampled_from(FAMILIES), side=st.sampled_from(["left", "right"]),
       lens=st.lists(st.integers(1, 7), min_size=2, max_size=3), pads=st.lists(st.integers(0, 4), min_size=3, max_size=3),
       seed=st.integers(0, 999))
def test_padding_never_changes_real_positions(family, side, lens, pads, seed):
    m = tiny(family)
    rows = [ids(1, n, seed + i)[0] for i, n in enumerate(lens)]
    x, mask, where = pad_batch(rows, pads[:len(rows)], side)
    with torch.no_grad():
        out = m(x, attention_mask=mask)
        for i, r in enumerate(rows):
            torch.testing.assert_close(out[i, where[i]], m(r[None])[0], atol=1e-5, rtol=0)


@contextlib.contextmanager
def plain_path(m: Transformer):
    """The model with the padding-skipping fast path off (every position computed)."""
    m.skip_padding = False
    try:
        yield m
    finally:
        del m.skip_padding  # back to the class default


@settings(max_examples=30, deadline=None)
@given(family=st.sampled_from(FAMILIES), B=st.integers(1, 4), T=st.integers(1, 9),
       pattern=st.sampled_from(["right", "left", "any"]), seed=st.integers(0, 999))
def test_skipping_padding_equals_the_plain_path(family, B, T, pattern, seed):
    """The CPU fast path (token-wise layers on the real tokens only; a causal right-padded batch
    without a mask) gives the plain path's outputs and gradients at every real position, and
    zeros at the pads. Masks: right- or left-padded, or holes anywhere (a row may be all pads)."""
    m = copy.deepcopy(tiny(family)).train()
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, T + 1, (B,), generator=g)
    t = torch.arange(T)[None]
    mask = {"right": t < lens[:, None], "left": t >= T - lens[:, None],
            "any": torch.rand(B, T, generator=g) < 0.6}[pattern].long()  # (B, T)
    x = ids(B, T, seed)
    weights = torch.randn(*x.shape, m.config.vocab_size if m.config.lm_head else m.config.n_embd, generator=g)

    def run():
        m.zero_grad()
        out = m(x, attention_mask=mask)  # (B, T, V | C)
        (out * weights * mask[..., None]).sum().backward()  # a loss over the real positions only
        return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    fast, fast_grads = run()
    with plain_path(m):
        plain, plain_grads = run()
    real = mask.bool()
    torch.testing.assert_close(fast[real], plain[real], atol=1e-5, rtol=1e-5)
    assert (fast[~real] == 0).all()  # pad positions: zeros, not values that look real
    assert fast_grads.keys() == plain_grads.keys()
    for n in fast_grads:
        torch.testing.assert_close(fast_grads[n], plain_grads[n], atol=1e-4, rtol=1e-4, msg=n)


def test_skipping_padding_runs_the_layers_on_real_tokens_only():
    """What makes the fast path fast: the MLP sees N real rows, not B * T; without padding, or
    with a KV cache, every position runs as before."""
    m = tiny("llama")
    seen = []
    hook = m.blocks[0].mlp.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    try:
        x = ids(3, 5, 0)
        mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
        with torch.no_grad():
            m(x, attention_mask=mask)
            m(x, attention_mask=torch.ones_like(mask))
            m.generate(x[:, :2], max_new_tokens=1, attention_mask=mask[:, :2])
        assert seen[0] == (12, 16) and seen[1] == (3, 5, 16) and len(seen[2]) == 3
    finally:
        hook.remove()


@settings(max_examples=15)
@given(family=st.sampled_from(FAMILIES), T=st.integers(1, 8), padded=st.booleans(), seed=st.integers(0, 999))
def test_zero_length_prefix_changes_nothing(family, T, padded, seed):
    m = tiny(family)
    c = m.config
    x = ids(2, T, seed)
    mask = torch.ones(2, T, dtype=torch.long)
    if padded:
        mask[1, T // 2 + 1:] = 0
    empty = [(torch.zeros(2, c.n_kv_head, 0, c.head_dim),) * 2 for _ in range(c.n_layer)]
    with torch.no_grad():
        torch.testing.assert_close(m(x, attention_mask=mask, prefix_kv=empty), m(x, attention_mask=mask),
                                   atol=1e-6, rtol=0)


@settings(max_examples=15)
@given(family=st.sampled_from(CAUSAL), P=st.integers(1, 6), T=st.integers(1, 6), pad=st.integers(0, 3),
       seed=st.integers(0, 999))
def test_prefix_kv_acts_like_past_tokens(family, P, T, pad, seed):
    """Seam 2: the keys/values of P earlier tokens, passed as prefix_kv, give the same logits as
    running those tokens first (positions continue at P), also with right padding after them."""
    m = tiny(family)
    a, b = ids(2, P, seed), ids(2, T, seed + 1)
    with torch.no_grad():
        full = m(torch.cat((a, b), 1))[:, P:]
        cache = KVCache(P)
        m(a, kv_cache=cache)
        prefix = [(cache.k[i], cache.v[i]) for i in range(m.config.n_layer)]  # (B, H_kv, P, D)
        pos = torch.arange(P, P + T + pad)[None]
        got = m(b, prefix_kv=prefix, position_ids=pos[:, :T])
        torch.testing.assert_close(got, full, atol=1e-5, rtol=0)
        bp = torch.cat((b, torch.zeros(2, pad, dtype=torch.long)), 1)  # right-padded
        mask = (torch.arange(T + pad) < T).long().expand(2, -1)
        got = m(bp, prefix_kv=prefix, attention_mask=mask, position_ids=pos)[:, :T]
        torch.testing.assert_close(got, full, atol=1e-5, rtol=0)


def test_prefix_kv_changes_outputs():
    """A non-empty prefix must reach every query (else the seam would be dead)."""
    m = tiny("bert")
    c = m.config
    pre = [(torch.randn(1, c.n_kv_head, 2, c.head_dim),) * 2 for _ in range(c.n_layer)]
    x = ids(1, 4, 0)
    with torch.no_grad():
        diff = (m(x, prefix_kv=pre) - m(x)).abs().amax(-1)  # (1, T)
    assert bool((diff > 1e-4).all())


@settings(max_examples=15)
@given(family=st.sampled_from(FAMILIES), T=st.integers(1, 8), seed=st.integers(0, 999))
def test_inputs_embeds_equals_token_ids(family, T, seed):
    m = tiny(family)
    x = ids(2, T, seed)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[0, 0] = 0
    with torch.no_grad():
        torch.testing.assert_close(m(inputs_embeds=m.tok_emb(x), attention_mask=mask),
                                   m(x, attention_mask=mask), atol=0, rtol=0)


@settings(max_examples=25, deadline=None)
@given(family=st.sampled_from(CAUSAL), side=st.sampled_from(["left", "right"]),
       lens=st.lists(st.integers(1, 6), min_size=2, max_size=3), pads=st.lists(st.integers(0, 3), min_size=3, max_size=3),
       P=st.sampled_from([0, 2]), eos=st.booleans(), seed=st.integers(0, 999))
def test_padded_generation_equals_one_prompt_at_a_time(family, side, lens, pads, P, eos, seed):
    """Batched generation, with prompts padded on either side (pads hold junk tokens), and with
    a per-row prefix (seam 2) or none, gives each row exactly its unpadded generation: the
    returned tensor is the prompt as given, then the row's new tokens. float64: no argmax ties."""
    m = tiny(family, torch.float64)
    c = m.config
    rows = [ids(1, n, seed + i)[0] for i, n in enumerate(lens)]
    x, mask, where = pad_batch(rows, pads[:len(rows)], side)
    x = torch.where(mask.bool(), x, ids(*x.shape, seed + 99))  # pad slots: junk, never read
    g = torch.Generator().manual_seed(seed)
    prefix = [tuple(torch.randn(len(rows), c.n_kv_head, P, c.head_dim, generator=g, dtype=torch.float64)
                    for _ in "kv") for _ in range(c.n_layer)] if P else None
    # an EOS that some row emits: its later slots must then hold the pad id, 0
    stop = int(m.generate(rows[0][None], 2)[0, -1]) if eos else None
    out = m.generate(x, 5, attention_mask=mask, prefix_kv=prefix, eos_token_id=stop, pad_token_id=0)
    T = x.shape[1]
    assert torch.equal(out[:, :T], x)
    for i, r in enumerate(rows):
        one = m.generate(r[None], 5, prefix_kv=[(k[i:i + 1], v[i:i + 1]) for k, v in prefix] if P else None,
                         eos_token_id=stop, pad_token_id=0)[0, len(r):]
        n = out.shape[1] - T  # the batch runs until its last row stops
        assert torch.equal(out[i, T:], torch.cat((one, one.new_zeros(n - len(one))))), (i, out, one)


# -- generation ---------------------------------------------------------------------------------------
def test_generate_stops_per_row_on_eos_and_pads():
    """Pick as EOS a token row 0 emits early (not last) and row 1 never emits: row 0 must keep
    its tokens up to that EOS then hold pads; row 1 must be the free-running continuation."""
    m = tiny("gpt2")
    for seed in range(50):
        x = ids(2, 3, seed)
        free = m.generate(x, 6)
        new0, new1 = free[0, 3:].tolist(), free[1, 3:].tolist()
        eos = next((t for t in new0[:-1] if t not in new1 and t != 0), None)
        if eos is not None:
            break
    assert eos is not None, "no prompt gave a usable EOS: change the search"
    out = m.generate(x, 6, eos_token_id=eos, pad_token_id=0)
    stop = 3 + new0.index(eos) + 1  # row 0's length through its EOS
    assert out.shape == free.shape
    assert torch.equal(out[0, :stop], free[0, :stop])
    assert stop < out.shape[1] and bool((out[0, stop:] == 0).all())
    assert torch.equal(out[1], free[1])


def test_generate_stops_early_when_all_rows_finish():
    m = tiny("llama")
    x = ids(1, 4, 3)
    eos = int(m.generate(x, 1)[0, -1])  # the very first greedy token
    assert m.generate(x, 10, eos_token_id=[V - 1, eos]).shape == (1, 5)


def test_sampling_is_seeded_and_filters():
    m = tiny("gpt2")
    x = ids(2, 3, 1)

    def gen(seed: int, **kw) -> torch.Tensor:
        return m.generate(x, 6, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(gen(5), gen(5))
    assert not torch.equal(gen(5), gen(6))
    greedy = m.generate(x, 6)
    assert torch.equal(gen(5, top_k=1), greedy)  # top-1 is greedy
    assert torch.equal(gen(5, top_p=1e-6), greedy)  # a tiny nucleus holds only the argmax


def test_top_p_and_top_k_by_hand():
    """probs [0.5, 0.3, 0.2]: top_p=0.7 keeps {0, 1} (0.5 < 0.7, 0.8 >= 0.7); top_p=0.5 keeps {0}
    (0.5 already reaches it); top_k=2 keeps {0, 1}."""
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log().expand(2000, 3)
    g = torch.Generator().manual_seed(0)

    def draw(top_k=None, top_p=None) -> set:
        return set(Transformer._sample(logits, 1.0, top_k, top_p, generator=g).tolist())

    assert draw(top_p=0.7) == {0, 1}
    assert draw(top_p=0.5) == {0}
    assert draw(top_k=2) == {0, 1}
    assert draw() == {0, 1, 2}


# -- pooling ------------------------------------------------------------------------------------------
def test_hidden_state_pooling_by_hand():
    """mean = sum of real rows / count; last / first = the last / first real position."""
    m = tiny("gpt2")
    x = ids(2, 5, 2)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])  # right- and left-padded
    with torch.no_grad():
        h = m.hidden_states(x, mask)
        torch.testing.assert_close(m.hidden_states(x, mask, "mean"),
                                   torch.stack((h[0, :3].mean(0), h[1, 2:].mean(0))))
        torch.testing.assert_close(m.hidden_states(x, mask, "last"), torch.stack((h[0, 2], h[1, 4])))
        torch.testing.assert_close(m.hidden_states(x, mask, "first"), torch.stack((h[0, 0], h[1, 2])))
        torch.testing.assert_close(m.hidden_states(x, pooling="last"), m.hidden_states(x)[:, -1])


def test_pooling_in_bf16_picks_the_right_token_past_256():
    """bf16 holds integers exactly only up to 256 (8 significant bits): 597 and 598 are both
    stored as 596, so a position index in the activation dtype pools the wrong token. At T=600
    "last" / "first" must be the last / first real position under right and left padding, and
    "mean" the float64 mean of the real rows to within one bf16 rounding (2^-8 relative)."""
    torch.manual_seed(0)
    cfg = ModelConfig(family="gpt2", vocab_size=V, block_size=600, n_layer=1, n_head=2, n_embd=8)
    m = Transformer(cfg).to(torch.bfloat16).eval()
    T = 600
    lens = torch.tensor([600, 599, 598, 597, 301, 259])
    right = (torch.arange(T) < lens[:, None]).long()  # (B, T)
    x = ids(len(lens), T, 0)
    with torch.no_grad():
        for mask, last, first in ((right, lens - 1, torch.zeros_like(lens)),
                                  (right.flip(1), torch.full_like(lens, T - 1), T - lens)):
            h = m.hidden_states(x, mask)  # (B, T, C)
            rows = torch.arange(len(lens))
            assert torch.equal(m.hidden_states(x, mask, "last"), h[rows, last])
            assert torch.equal(m.hidden_states(x, mask, "first"), h[rows, first])
            ref = (h.double() * mask[..., None]).sum(1) / lens[:, None]
            torch.testing.assert_close(m.hidden_states(x, mask, "mean").double(), ref, atol=0, rtol=2 ** -8 + 1e-6)


# -- dtypes, devices, gradients -------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_autocast_on_cpu(family):
    m = tiny(family)
    x = ids(2, 6, 4)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    with torch.no_grad():
        ref = m(x, attention_mask=mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m(x, attention_mask=mask)
            if family != "bert":
                assert m.generate(x, 3, attention_mask=mask).shape == (2, 9)
    err = (low.float() - ref).abs().max() / ref.abs().max()
    assert torch.isfinite(low).all() and err < 0.05, err
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(x).float().sum().backward()  # gradients flow under autocast too
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    m.zero_grad(set_to_none=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_meta_device_forward_shapes(family):
    """No tensor is created on a hard-coded device: the whole forward runs on 'meta'."""
    cfg = tiny(family).config
    with torch.device("meta"):
        m = Transformer(cfg)
        out = m(torch.zeros(2, 5, dtype=torch.long))
    assert out.device.type == "meta"
    assert out.shape == ((2, 5, V) if family != "bert" else (2, 5, cfg.n_embd))


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_forward_reads_no_values(family):
    """No host sync in a training step: on the 'meta' device a tensor has no values, so any
    .item() / .tolist() / bool() on the mask would raise here. Padded forward, pooling and a
    KV-cached step all run."""
    cfg = tiny(family).config
    with torch.device("meta"):
        m = Transformer(cfg)
        x, mask = torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)
        assert m(x, attention_mask=mask).shape[:2] == (2, 5)
        assert m.hidden_states(x, mask, "last").shape == (2, cfg.n_embd)
        if cfg.causal:
            cache = KVCache(6)
            m(x, attention_mask=mask, kv_cache=cache)
            m(x[:, :1], attention_mask=torch.ones(2, 6, dtype=torch.long), kv_cache=cache)


def test_sdpa_is_causal_fast_path_without_a_mask():
    """No attention_mask, no prefix, no cache: no mask tensor, SDPA applies causality itself;
    with a mask (any values) a boolean (B, 1, T, S) tensor."""
    m = tiny("llama")
    assert m._mask(None, 2, 5, 0, 0, torch.device("cpu")) == (None, True)
    mask, is_causal = m._mask(torch.ones(2, 5, dtype=torch.long), 2, 5, 0, 0, torch.device("cpu"))
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool and not is_causal
    assert torch.equal(mask[0, 0], torch.ones(5, 5, dtype=torch.bool).tril())


def test_dropout_only_in_training():
    cfg = ModelConfig(family="gpt2", vocab_size=V, block_size=BLOCK, n_layer=1, n_head=2, n_embd=8, dropout=0.5)
    m = Transformer(cfg)
    x = ids(1, 6, 0)
    with torch.no_grad():
        assert not torch.equal(m.train()(x), m(x))
        assert torch.equal(m.eval()(x), m(x))
