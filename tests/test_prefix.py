"""Tests for minituner/prefix.py: prefix tuning (Li & Liang 2021), folding, PEFT's layout.

By hand: a prefix holding the keys and values the base model computes for real words z is
those words: prefixed(x) = base([z; x]) at x's positions (RoPE: keys rotated by R_{-P}, the
same map save_peft inverts). A zero-length prefix changes nothing; disabled is the base.
Parity: the hook equals the model's own prefix_kv seam; PEFT + transformers (skipped per test
when not installed): get_peft_model -> save_pretrained -> load_peft and ours -> save_peft ->
PeftModel.from_pretrained agree within 1e-5 on a grouped-query Llama.
Invariants (hypothesis): any P, H_kv, batch and padding: padding never changes real positions.
"""

import copy
import json

import hf_tiny
import pytest
import torch
from hf_tiny import hf_model
from hypothesis import given, settings
from hypothesis import strategies as st

from minituner.model import KVCache, ModelConfig, Transformer
from minituner.prefix import (
    PrefixConfig,
    apply_prefix,
    fold_prefix,
    load_peft,
    save_peft,
)
from minituner.protocol import (
    applied,
    apply_technique,
    count_parameters,
    disable_adapters,
    load_adapter,
    save_adapter,
)

V = 64
FAMILIES = ["gpt2", "llama", "bert"]


def tiny(family: str = "llama", seed: int = 0, n_kv_head: int | None = None, n_layer: int = 2) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(family=family, vocab_size=V, block_size=32, n_layer=n_layer, n_head=4, n_embd=16,
                      n_kv_head=n_kv_head or (2 if family == "llama" else None), intermediate_size=24)
    with torch.no_grad():
        m = Transformer(cfg)
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m.eval()


def prefixed(family="llama", P=3, projection=True, seed=0, **kw) -> Transformer:
    torch.manual_seed(seed + 100)
    return apply_prefix(tiny(family, seed, **kw), PrefixConfig(num_virtual_tokens=P, prefix_projection=projection)).eval()


def ids(B=2, T=7, seed=0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def out(model, x, **kw):
    return model(x, **kw)  # logits (gpt2, llama) or hidden states (bert)


def pad(x: torch.Tensor, n: int, side: str, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T) with n pad columns on `side`, and its attention mask."""
    B, T = x.shape
    p = torch.full((B, n), pad_id, dtype=x.dtype)
    mask = torch.cat((torch.zeros(B, n, dtype=torch.long), torch.ones(B, T, dtype=torch.long)), 1)
    return (torch.cat((p, x), 1), mask) if side == "left" else (torch.cat((x, p), 1), mask.flip(1))


# ---------------------------------------------------------------------------- by hand
@pytest.mark.parametrize("family", FAMILIES)
def test_zero_length_prefix_changes_nothing(family):
    """P = 0: no slot to attend to, so every output is the base model's, with or without a
    mask, and the caller's own prefix_kv keeps its effect."""
    base, model = tiny(family), prefixed(family, P=0)
    x = ids()
    xp, mask = pad(x, 2, "left")
    theirs = [(0.5 * torch.randn(1, base.config.n_kv_head, 2, 4),) * 2 for _ in range(2)]
    with torch.no_grad():
        assert torch.equal(out(model, x), out(base, x))
        assert torch.equal(out(model, xp, attention_mask=mask), out(base, xp, attention_mask=mask))
        assert torch.equal(out(model, x, prefix_kv=theirs), out(base, x, prefix_kv=theirs))


def test_a_prefix_of_real_words_is_those_words():
    """Li & Liang Sec. 4: h_i = P_theta[i] for prefix slots. Fill P_theta with the activations
    (keys, values) of real words z at positions 0..P-1: then prefixed(x) = base([z; x])[P:],
    because RoPE scores depend on m - n only and R_{-P} moves z's keys to "before 0"."""
    base = tiny("llama")
    z, x = ids(1, 4, seed=1), ids(2, 6, seed=2)
    config = PrefixConfig(num_virtual_tokens=4, prefix_projection=False, init_token_ids=tuple(z[0].tolist()))
    model = apply_prefix(copy.deepcopy(base), config)
    with torch.no_grad():
        expected = base(torch.cat((z.expand(2, -1), x), 1))[:, 4:]
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        assert (model(x) - base(x)).abs().max() > 1e-2  # the prefix matters


@pytest.mark.parametrize("family", FAMILIES)
def test_hook_equals_the_models_prefix_kv_seam(family):
    """The hook passes exactly Prefix.key_values() through seam 2, in forward and hidden_states."""
    model = prefixed(family, P=3)
    base, x = tiny(family), ids()
    with torch.no_grad():
        kv = model.prefix.key_values()
        torch.testing.assert_close(out(model, x), out(base, x, prefix_kv=kv), rtol=0, atol=1e-6)
        torch.testing.assert_close(model.hidden_states(x, pooling="mean"),
                                   base.hidden_states(x, pooling="mean", prefix_kv=kv), rtol=0, atol=1e-6)
        # a caller's prefix_kv comes after ours: [ours ; theirs]
        theirs = [(0.5 * torch.randn(2, base.config.n_kv_head, 2, 4),) * 2 for _ in range(2)]
        both = [(torch.cat((k.expand(2, -1, -1, -1), tk), 2), torch.cat((v.expand(2, -1, -1, -1), tv), 2))
                for (k, v), (tk, tv) in zip(kv, theirs)]
        torch.testing.assert_close(out(model, x, prefix_kv=theirs), out(base, x, prefix_kv=both), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_disabled_is_exactly_the_base(family):
    model, base, x = prefixed(family), tiny(family), ids()
    with torch.no_grad():
        assert (out(model, x) - out(base, x)).abs().max() > 1e-3
        with disable_adapters(model):
            assert torch.equal(out(model, x), out(base, x))
        assert (out(model, x) - out(base, x)).abs().max() > 1e-3  # back on


# ---------------------------------------------------------------------------- padding, cache, generate
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_never_changes_real_positions(family, side):
    """Rows of 5, 4, 3, 2 tokens padded to 5 (0..3 pads, left or right) give, at their real
    positions, what each row gives alone: logits and pooled hidden states."""
    model, x = prefixed(family), ids(B=4, T=5)
    rows = [x[i:i + 1, :5 - i] for i in range(4)]
    padded = [pad(r, i, side) for i, r in enumerate(rows)]
    xp, mask = torch.cat([p[0] for p in padded]), torch.cat([p[1] for p in padded])  # (4, 5) each
    real = mask.bool()
    with torch.no_grad():
        alone = torch.cat([out(model, r)[0] for r in rows])  # (14, V|C)
        torch.testing.assert_close(out(model, xp, attention_mask=mask)[real], alone, rtol=1e-5, atol=1e-5)
        for pooling in ("mean", "last", "first"):
            alone = torch.cat([model.hidden_states(r, pooling=pooling) for r in rows])  # (4, C)
            torch.testing.assert_close(model.hidden_states(xp, mask, pooling=pooling), alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kv_cache_equals_full_forward(family):
    model, x = prefixed(family), ids(T=8)
    cache = KVCache(8)
    with torch.no_grad():
        steps = [model(x[:, :3], kv_cache=cache)] + [model(x[:, t:t + 1], kv_cache=cache) for t in range(3, 8)]
        torch.testing.assert_close(torch.cat(steps, 1), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_equals_full_forwards_step_by_step(family):
    """Greedy generation with the KV cache picks, at every step, the argmax of a full forward
    over the prompt and the tokens so far, with the prefix in place; also left-padded."""
    model = prefixed(family)
    x = ids(T=5)
    xp, mask = pad(x, 2, "left")
    g = model.generate(x, max_new_tokens=6)
    gp = model.generate(xp, max_new_tokens=6, attention_mask=mask)
    assert torch.equal(gp[:, 7:], g[:, 5:])  # padding changes nothing
    with torch.no_grad():
        for t in range(5, 11):
            assert torch.equal(model(g[:, :t])[:, -1].argmax(-1), g[:, t])
        with disable_adapters(model):
            assert not torch.equal(model.generate(x, max_new_tokens=6), g)  # the prefix steers it


# ---------------------------------------------------------------------------- training, folding, saving
@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_prefix_trains(family):
    model = prefixed(family, P=3)
    cfg = model.config
    tok, h = cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    expected = 3 * tok + (tok * h + h) + (h * cfg.n_layer * 2 * tok + cfg.n_layer * 2 * tok)  # P', MLP
    trainable, total = count_parameters(model)
    assert trainable == expected and total == tiny(family).num_parameters() + expected
    model.train()
    out(model, ids()).square().mean().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == n.startswith("prefix."), n


@pytest.mark.parametrize("family", FAMILIES)
def test_reparametrised_and_folded_give_the_same_outputs(family):
    model, x = prefixed(family, P=4), ids()
    with torch.no_grad():
        before = out(model, x)
        fold_prefix(model)
        assert model.prefix.transform is None and tuple(model.prefix.embedding.shape) == (4, model.config.n_layer * 2 * 16 // (4 // model.config.n_kv_head))
        torch.testing.assert_close(out(model, x), before, rtol=0, atol=1e-6)
    assert applied(model)[0]["config"]["prefix_projection"] is False
    assert count_parameters(model)[0] == model.prefix.embedding.numel()  # P_theta only


@pytest.mark.parametrize("fold", [False, True])
def test_save_adapter_load_adapter_is_exact(tmp_path, fold):
    model, x = prefixed("llama", P=3), ids()
    if fold:
        fold_prefix(model)
    save_adapter(model, tmp_path)
    loaded = load_adapter(tiny("llama"), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert applied(loaded) == applied(model)


def test_registry_and_deepcopy():
    """The recipe's registry applies it by name; a deep copy's hooks use the copy's prefix."""
    model = apply_technique(tiny("llama"), "prefix", {"num_virtual_tokens": 2})
    twin, x = copy.deepcopy(model), ids()
    with torch.no_grad():
        twin.prefix.embedding.zero_()
        assert not torch.equal(twin(x), model(x))
    with pytest.raises(ValueError, match="already has a prefix"):
        apply_prefix(model, PrefixConfig())
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PrefixConfig(num_virtual_tokens=-1)
    with pytest.raises(ValueError, match="prefix_projection=False"):
        PrefixConfig(num_virtual_tokens=2, init_token_ids=(1, 2))


@pytest.mark.parametrize("projection", [True, False])
def test_zero_init_starts_at_zero_and_still_learns(projection):
    """init_weights="zero" (PEFT's): every prefix key and value is 0 at the start, so each
    prefix slot scores 0 and adds nothing but weight in the softmax; gradients still reach it."""
    torch.manual_seed(0)
    model = apply_prefix(tiny("llama"), PrefixConfig(num_virtual_tokens=3, prefix_projection=projection,
                                                     init_weights="zero"))
    assert all(k.abs().max() == 0 and v.abs().max() == 0 for k, v in model.prefix.key_values())
    model(ids()).square().mean().backward()
    last = model.prefix.transform[-1].weight if projection else model.prefix.embedding
    assert last.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- invariants
@settings(max_examples=12, deadline=None)
@given(P=st.integers(0, 3), n_kv_head=st.sampled_from([1, 2, 4]), B=st.integers(1, 3), T=st.integers(1, 5),
       n_pad=st.integers(0, 3), side=st.sampled_from(["left", "right"]), seed=st.integers(0, 50))
def test_any_shape_matches_the_seam_and_ignores_padding(P, n_kv_head, B, T, n_pad, side, seed):
    model = prefixed("llama", P=P, seed=seed, n_kv_head=n_kv_head)
    base, x = tiny("llama", seed, n_kv_head=n_kv_head), ids(B, T, seed)
    xp, mask = pad(x, n_pad, side)
    with torch.no_grad():
        expected = base(x, prefix_kv=model.prefix.key_values())  # (B, T, V)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(xp, attention_mask=mask)[mask.bool()], expected.flatten(0, 1),
                                   rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- PEFT's layout
def ours_from(hf) -> Transformer:
    return hf_tiny.ours_from(hf).eval()


def test_peft_save_pretrained_to_load_peft(tmp_path):
    peft = pytest.importorskip("peft", reason="PEFT parity needs peft (test extra)")
    hf = hf_model("llama", V)
    model = ours_from(hf)
    pm = peft.get_peft_model(hf, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    pm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["num_attention_heads"] == 2  # H_kv
    load_peft(model, tmp_path)
    x = ids()
    xr, mask = pad(x, 2, "right")
    with torch.no_grad():
        theirs = pm(input_ids=x).logits
        with pm.disable_adapter():
            assert (theirs - pm(input_ids=x).logits).abs().max() > 1e-2  # the prefix matters
        torch.testing.assert_close(model(x), theirs, rtol=1e-5, atol=1e-5)
        theirs_r = pm(input_ids=xr, attention_mask=mask).logits  # right padding: same positions
        torch.testing.assert_close(model(xr, attention_mask=mask)[mask.bool()], theirs_r[mask.bool()],
                                   rtol=1e-5, atol=1e-5)


def test_ours_to_peft_from_pretrained(tmp_path):
    peft = pytest.importorskip("peft", reason="PEFT parity needs peft (test extra)")
    hf = hf_model("llama", V)
    model = apply_prefix(ours_from(hf), PrefixConfig(num_virtual_tokens=4)).eval()  # saved folded
    save_peft(model, tmp_path)
    x = ids()
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path).eval()(input_ids=x).logits
        torch.testing.assert_close(model(x), theirs, rtol=1e-5, atol=1e-5)


def test_gpt2_is_refused_because_peft_shifts_positions(tmp_path):
    """Why GPT-2 is refused: PEFT's prefix is a KV cache of P past tokens, so Hugging Face
    reads position embedding P + t for token t. Loaded by the same layout, PEFT's logits are
    ours with position_ids shifted by P, and differ from ours without the shift."""
    with pytest.raises(ValueError, match="position"):
        save_peft(prefixed("gpt2"), tmp_path)
    peft = pytest.importorskip("peft", reason="PEFT parity needs peft (test extra)")
    transformers = pytest.importorskip("transformers", reason="PEFT parity needs transformers (test extra)")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)).eval()
    model = ours_from(hf)
    pm = peft.get_peft_model(hf, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    pm.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="learned position"):
        load_peft(model, tmp_path)
    from safetensors.torch import load_file

    apply_prefix(model, PrefixConfig(num_virtual_tokens=3, prefix_projection=False))
    with torch.no_grad():
        model.prefix.embedding.copy_(load_file(str(tmp_path / "adapter_model.safetensors"))["prompt_embeddings"])
        x = ids()
        theirs = pm(input_ids=x).logits
        shifted = model(x, position_ids=torch.arange(3, 3 + x.shape[1])[None])
        torch.testing.assert_close(shifted, theirs, rtol=1e-5, atol=1e-5)
        assert (model(x) - theirs).abs().max() > 1e-3


# ---------------------------------------------------------------------------- through the recipe
@pytest.mark.slow
def test_the_recipe_trains_the_prefix_and_the_head_only():
    """finetune.run('prefix') on the base model: what trains is P', the MLP and the head; the
    base weights come back untouched, and disabling the prefix gives the base's features."""
    from minituner import finetune

    run = finetune.run("prefix", n_train=48, n_test=16, steps=3, pooling="mean", measure_forgetting=False,
                       progress=False, config=PrefixConfig(num_virtual_tokens=2))
    model = run.model
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("prefix.", "head.")) for n in names), names
    assert run.result.trainable == sum(p.numel() for n, p in model.named_parameters() if n in names)
    base, _ = finetune.load_base()
    x = torch.tensor([run.tokenizer.encode("Ada lives in Ashford.", add_bos=True)])
    with torch.no_grad(), disable_adapters(model):
        torch.testing.assert_close(model.hidden_states(x, pooling="mean"), base.hidden_states(x, pooling="mean"),
                                   rtol=0, atol=0)
