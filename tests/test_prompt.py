"""Tests for minituner/prompt.py: prompt tuning (Lester et al. 2021), and PEFT's PROMPT_TUNING format.

By hand: a prompt of 0 virtual tokens and a disabled prompt give the base model exactly; text
init repeats/cuts the text's token embeddings to n rows; only P_e (n * C numbers) trains.
Parity: with the obviously right reference, the plain base model fed [P_e; X_e] through
`inputs_embeds` with the outputs cut to the real positions; KV-cache generation against full
forwards step by step; PEFT + transformers (skipped per test when not installed), logits
within 1e-5 both ways. Invariants (hypothesis): any n, batch and padding side.
"""

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hf_tiny import hf_model, ours_from
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from minituner.model import KVCache, ModelConfig, Transformer
from minituner.prompt import (
    PromptConfig,
    apply_prompt,
    load_peft_prompt,
    save_peft_prompt,
)
from minituner.protocol import (
    applied,
    count_parameters,
    disable_adapters,
    load_adapter,
    save_adapter,
)

V = 64
FAMILIES = ["gpt2", "llama"]


def tiny(family: str = "gpt2", seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(family=family, vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=16,
                      n_kv_head=2 if family == "llama" else None, intermediate_size=24, **kw)
    with torch.no_grad():
        m = Transformer(cfg)
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m.eval()


def prompted(family: str = "gpt2", n: int = 4, seed: int = 0) -> tuple[Transformer, Transformer]:
    """(a model with a random soft prompt, an untouched copy of its base)."""
    base = tiny(family, seed)
    torch.manual_seed(seed + 1)
    return apply_prompt(copy.deepcopy(base), PromptConfig(num_virtual_tokens=n, init="random")), base


def reference(base: Transformer, P: torch.Tensor, ids: torch.Tensor, mask=None, pooling=None):
    """The definition, through seam 3 of the plain model: [P_e; X_e], mask [1..1; mask], cut to T."""
    B, n = ids.shape[0], P.shape[0]
    x = torch.cat((P.expand(B, -1, -1), base.tok_emb(ids)), 1)  # (B, n+T, C)
    full_mask = None if mask is None else torch.cat((torch.ones(B, n, dtype=mask.dtype), mask), 1)
    if pooling is None:
        return base(inputs_embeds=x, attention_mask=full_mask)[:, n:]
    h = base.hidden_states(inputs_embeds=x, attention_mask=full_mask)[:, n:]  # (B, T, C)
    real = mask.bool()
    last = (torch.arange(ids.shape[1]) * real).amax(1)
    return h[torch.arange(B), last]


def ids(B=2, T=7, seed=0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def pad(x: torch.Tensor, lengths: list[int], side: str, pad_id: int = 0):
    """Rows of x cut to `lengths`, padded on `side` to the longest: (ids, mask)."""
    T = max(lengths)
    out, mask = torch.full((len(lengths), T), pad_id), torch.zeros(len(lengths), T, dtype=torch.long)
    for i, L in enumerate(lengths):
        sl = slice(T - L, T) if side == "left" else slice(0, L)
        out[i, sl], mask[i, sl] = x[i, :L], 1
    return out, mask


# ---------------------------------------------------------------------------- by hand
@pytest.mark.parametrize("family", FAMILIES + ["bert"])
def test_zero_tokens_and_disabled_are_the_base_exactly(family):
    """n = 0 prepends nothing; disable_adapters runs the plain backbone: both equal the base bitwise."""
    base, x = tiny(family), ids()
    empty = apply_prompt(copy.deepcopy(base), PromptConfig(num_virtual_tokens=0))
    assert torch.equal(empty(x), base(x))
    model = apply_prompt(copy.deepcopy(base), PromptConfig(num_virtual_tokens=5, init="random"))
    assert (model(x) - base(x)).abs().max() > 1e-3  # the prompt matters
    with disable_adapters(model):
        assert torch.equal(model(x), base(x))
        assert torch.equal(model.hidden_states(x, torch.ones_like(x), pooling="mean"),
                           base.hidden_states(x, torch.ones_like(x), pooling="mean"))


def test_inits_by_hand():
    """text: ids (5, 6, 7) for n = 7 give rows tok_emb[5, 6, 7, 5, 6, 7, 5], and for n = 2
    tok_emb[5, 6]; vocab: every row is a row of tok_emb; random: U[-0.5, 0.5] (Lester Sec. 3.2)."""
    base = tiny()
    E = base.tok_emb.weight
    for n, want in [(7, [5, 6, 7, 5, 6, 7, 5]), (2, [5, 6])]:
        m = apply_prompt(copy.deepcopy(base), PromptConfig(n, init="text", init_token_ids=(5, 6, 7)))
        assert torch.equal(m.soft_prompt.prompt_embeddings, E[want])
        assert applied(m)[0]["config"]["init_token_ids"] == tuple(want)
    m = apply_prompt(copy.deepcopy(base), PromptConfig(30, init="vocab"))
    P = m.soft_prompt.prompt_embeddings
    assert all(any(torch.equal(row, e) for e in E) for row in P)
    P = apply_prompt(copy.deepcopy(base), PromptConfig(200, init="random")).soft_prompt.prompt_embeddings
    P = P.detach()
    assert P.abs().max() <= 0.5 and P.abs().max() > 0.45 and abs(float(P.mean())) < 0.05


def test_text_init_with_a_tokenizer():
    """init_text goes through the tokenizer given; the recorded config keeps the ids (a load needs no tokenizer)."""

    class Chars:
        def encode(self, text):
            return [ord(c) - ord("a") for c in text]

    m = apply_prompt(tiny(), PromptConfig(4, init="text", init_text="cab"), tokenizer=Chars())
    assert torch.equal(m.soft_prompt.prompt_embeddings, m.tok_emb.weight[[2, 0, 1, 2]])
    assert applied(m)[0]["config"]["init_token_ids"] == (2, 0, 1, 2)


def test_only_the_prompt_trains():
    """Trainable: n * C = 4 * 16 = 64 numbers; after a backward only P_e has a gradient."""
    model, base = prompted()
    trainable, total = count_parameters(model)
    assert trainable == 4 * 16 and total == count_parameters(base)[1] + 64
    model.train()
    model(ids()).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"soft_prompt.prompt_embeddings"}
    assert model.soft_prompt.prompt_embeddings.grad.abs().max() > 0


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PromptConfig(num_virtual_tokens=-1)
    with pytest.raises(ValueError, match="init"):
        PromptConfig(init="zeros")
    with pytest.raises(ValueError, match="init_text"):
        PromptConfig(init="text")
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        apply_prompt(tiny(), PromptConfig(3, init="text", init_token_ids=(70,)))
    model, _ = prompted()
    with pytest.raises(ValueError, match="already has a soft prompt"):
        apply_prompt(model, PromptConfig())
    with pytest.raises(ValueError, match="block_size=32"):
        model(ids(T=30))
    with pytest.raises(ValueError, match="fewer tokens"):
        model.generate(ids(T=20), 10)


# ---------------------------------------------------------------------------- against the definition
@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_are_the_real_positions_of_the_prepended_input(family):
    """logits (B, T, V) = base([P_e; X_e])[:, n:], with and without a mask; pooled features too."""
    model, base = prompted(family)
    x, P = ids(), model.soft_prompt.prompt_embeddings
    out = model(x)
    assert out.shape == (2, 7, V)
    torch.testing.assert_close(out, reference(base, P, x), rtol=0, atol=1e-6)
    x, mask = pad(ids(), [7, 4], "right")
    torch.testing.assert_close(model(x, attention_mask=mask)[1, :4], reference(base, P, x, mask)[1, :4],
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(model.hidden_states(x, mask, pooling="last"),
                               reference(base, P, x, mask, pooling="last"), rtol=0, atol=1e-6)


def test_labels_for_virtual_tokens_are_never_scored():
    """The loss over (B, T) labels is the mean over the T-1 real next-token targets only: it
    equals the cross-entropy of the reference's real positions, and no label tensor for the
    n virtual positions is ever needed."""
    model, base = prompted()
    x = ids()
    logits = model(x)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
    ref = reference(base, model.soft_prompt.prompt_embeddings, x)
    want = F.cross_entropy(ref[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_never_changes_real_positions(family, side):
    """Each row alone, unpadded, gives the same outputs at its real positions as in a padded batch."""
    model, _ = prompted(family)
    lengths = [7, 3, 5]
    x, mask = pad(ids(B=3), lengths, side)
    out = model(x, attention_mask=mask)
    pooled = model.hidden_states(x, mask, pooling="last")
    for i, L in enumerate(lengths):
        alone = model(ids(B=3)[i:i + 1, :L])[0]  # (L, V)
        real = out[i][mask[i].bool()]
        torch.testing.assert_close(real, alone, rtol=0, atol=1e-5)
        h = model.hidden_states(ids(B=3)[i:i + 1, :L], pooling="last")[0]
        torch.testing.assert_close(pooled[i], h, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_kv_cache_generation_equals_full_forwards(family, side):
    """Greedy generate (KV cache, prompt prepended once) picks, at every step, the argmax of a
    full forward of the row so far with the prompt in place, and its logits agree."""
    model, _ = prompted(family)
    lengths = [6, 3]
    x, mask = pad(ids(), lengths, side)
    out = model.generate(x, 6, attention_mask=mask)
    for i, L in enumerate(lengths):
        row = torch.cat((ids()[i, :L], out[i, x.shape[1]:]))  # real prompt tokens, then the new ones
        full = model(row[None])[0]  # (L + 6, V)
        assert torch.equal(full[L - 1:-1].argmax(-1), out[i, x.shape[1]:])
    # logits step by step through an explicit cache
    cache, step = KVCache(7 + 3), ids(B=1)
    logits = [model(step, kv_cache=cache)[:, -1]]
    seq = step
    for _ in range(3):
        step = logits[-1].argmax(-1, keepdim=True)
        seq = torch.cat((seq, step), 1)
        logits.append(model(step, kv_cache=cache)[:, -1])
    full = model(seq)[0, 6:]
    torch.testing.assert_close(torch.cat(logits), full, rtol=0, atol=1e-5)
    assert cache.length == model.soft_prompt.n + 10


@settings(max_examples=15, deadline=None)
@given(n=st.integers(0, 5), B=st.integers(1, 3), T=st.integers(1, 6), side=st.sampled_from(["left", "right"]),
       family=st.sampled_from(FAMILIES), seed=st.integers(0, 10_000))
def test_any_n_and_batch_matches_the_definition(n, B, T, side, family, seed):
    """For any n, batch and padding: real positions equal the reference's; pads never change them."""
    torch.manual_seed(seed)
    base = tiny(family)
    model = apply_prompt(copy.deepcopy(base), PromptConfig(num_virtual_tokens=n, init="random"))
    lengths = torch.randint(1, T + 1, (B,)).tolist()
    x, mask = pad(torch.randint(0, V, (B, T)), lengths, side)
    got = model(x, attention_mask=mask)
    assert got.shape == (B, x.shape[1], V)
    want = reference(base, model.soft_prompt.prompt_embeddings, x, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- saving and loading
def test_protocol_save_load_and_deepcopy(tmp_path):
    """save_adapter -> load_adapter on a fresh base: bitwise the same logits; a deep copy has its own prompt."""
    model, base = prompted("llama", n=3)
    save_adapter(model, tmp_path)
    loaded = load_adapter(copy.deepcopy(base), tmp_path)
    x = ids()
    assert torch.equal(loaded(x), model(x))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.soft_prompt.prompt_embeddings.zero_()
    assert torch.equal(model(x), loaded(x)) and not torch.equal(twin(x), model(x))


def test_peft_format_by_hand_and_round_trip(tmp_path):
    model, base = prompted("gpt2", n=3)
    save_peft_prompt(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["num_virtual_tokens"], cfg["token_dim"], cfg["num_transformer_submodules"],
            cfg["task_type"]) == ("PROMPT_TUNING", 3, 16, 1, "CAUSAL_LM")
    loaded = load_peft_prompt(copy.deepcopy(base), tmp_path)
    assert torch.equal(loaded(ids()), model(ids()))
    with pytest.raises(ValueError, match="3"):
        load_peft_prompt(prompted("gpt2", n=5)[0], tmp_path)


def test_load_peft_prompt_refuses_what_it_cannot_read(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    save_file({"prompt_embeddings": torch.zeros(2, 16)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="reads PROMPT_TUNING only"):
        load_peft_prompt(tiny(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2, "token_dim": 32}))
    with pytest.raises(ValueError, match="token_dim=32"):
        load_peft_prompt(tiny(), tmp_path)


# ---------------------------------------------------------------------------- parity with PEFT
def right_padded():
    x, mask = pad(ids(), [7, 4], "right")
    return x, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_ours_to_peft_from_pretrained(tmp_path, family):
    peft = pytest.importorskip("peft", reason="PEFT parity needs peft (test extra)")
    hf = hf_model(family, V)
    torch.manual_seed(1)
    model = apply_prompt(ours_from(hf), PromptConfig(num_virtual_tokens=5, init="random"))
    save_peft_prompt(model, tmp_path)
    x, mask = right_padded()
    with torch.no_grad():
        base = hf(input_ids=x).logits
        pm = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
        theirs, ours = pm(input_ids=x).logits, model(x)
        theirs_m, ours_m = pm(input_ids=x, attention_mask=mask).logits, model(x, attention_mask=mask)
    assert theirs.shape == (2, 5 + 7, V)  # PEFT returns the virtual positions too
    assert (theirs[:, 5:] - base).abs().max() > 1e-2  # the prompt matters
    torch.testing.assert_close(ours, theirs[:, 5:], rtol=1e-5, atol=1e-5)
    real = mask.bool()
    torch.testing.assert_close(ours_m[real], theirs_m[:, 5:][real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("init", ["RANDOM", "SAMPLE_VOCAB"])
def test_peft_save_pretrained_to_load_peft_prompt(tmp_path, family, init):
    peft = pytest.importorskip("peft", reason="PEFT parity needs peft (test extra)")
    hf = hf_model(family, V)
    model = ours_from(hf)
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, prompt_tuning_init=init)
    pm = peft.get_peft_model(hf, config).eval()
    pm.save_pretrained(tmp_path)
    load_peft_prompt(model, tmp_path)
    x = ids()
    with torch.no_grad():
        theirs, ours = pm(input_ids=x).logits[:, 6:], model(x)
        with pm.disable_adapter():
            base = pm(input_ids=x).logits
    assert (theirs - base).abs().max() > 1e-2
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.soft_prompt.prompt_embeddings, pm.get_prompt(1)[0].to(torch.float32))


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_agrees_with_peft_full_forwards(tmp_path, family):
    """Our greedy generate (KV cache) picks, at every step, the argmax of PeftModel's full forward
    of the sequence so far. (PEFT's own `generate` is not the reference: with peft 0.21.2 and
    transformers 5.24.0 it departs from its own full forwards after two or three tokens, for
    GPT-2 and Llama alike, while ours agree with them at every step.)"""
    peft = pytest.importorskip("peft", reason="PEFT parity needs peft (test extra)")
    hf = hf_model(family, V)
    torch.manual_seed(2)
    model = apply_prompt(ours_from(hf), PromptConfig(num_virtual_tokens=4, init="random"))
    save_peft_prompt(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    seq = ids()
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat((seq, pm(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(model.generate(ids(), 5), seq)


def test_recipe_head_on_a_prompted_model():
    """The recipe's path: apply_prompt, then a head on pooled hidden states; the loss trains P_e and the head."""
    from minituner.heads import HeadConfig, add_head, classification_loss

    model, _ = prompted()
    add_head(model, HeadConfig(num_classes=3))
    x, mask = pad(ids(), [7, 4], "left")
    loss, metrics = classification_loss(model, {"input_ids": x, "attention_mask": mask,
                                                "labels": torch.tensor([0, 2])})
    loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {
        "soft_prompt.prompt_embeddings", "head.out_proj.weight", "head.out_proj.bias"}
    assert isinstance(model.head, nn.Module) and "accuracy" in metrics
