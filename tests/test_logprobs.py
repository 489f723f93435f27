"""Tests for minituner.logprobs: completion log-probabilities, by hand, against a slow float64
loop, against TRL's own code, and as invariants (chunking, one concatenated forward)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from minituner.logprobs import (completion_mask, concatenate_pair, concatenated_logprobs,
                                sequence_logprobs, token_logprobs)
from minituner.model import ModelConfig, Transformer

V = 23


def tiny(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(family="gpt2", vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=16,
                      intermediate_size=24)
    return Transformer(cfg).eval()


def random_labels(B: int, T: int, prompt: int, g: torch.Generator) -> torch.Tensor:
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :prompt] = -100  # the prompt carries no score
    return labels


def slow_reference(logits: torch.Tensor, labels: torch.Tensor, average: bool) -> torch.Tensor:
    """Obviously right: a loop over sequences and positions in float64, softmax by its definition."""
    out = []
    for b in range(logits.size(0)):
        total, n = 0.0, 0
        for t in range(1, logits.size(1)):
            y = int(labels[b, t])
            if y == -100:
                continue
            z = logits[b, t - 1].double()  # the logits BEFORE token t score it
            total += float(z[y] - torch.log(torch.exp(z - z.max()).sum()) - z.max())
            n += 1
        out.append(total / max(n, 1) if average else total)
    return torch.tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------------------- by hand
def test_uniform_logits_give_minus_m_log_v():
    """Equal logits: every token has probability 1/V, so a completion of m tokens has
    log-probability -m log V (sum) and -log V (mean). Row 0 scores tokens 2..4 (m = 3), row 1
    tokens 1..4 (m = 4); the prompt's -100 labels and the first position are never scored."""
    logits = torch.zeros(2, 5, V)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 7, 8, 9, 10]])
    assert torch.allclose(sequence_logprobs(logits, labels), torch.tensor([-3 * math.log(V), -4 * math.log(V)]))
    assert torch.allclose(sequence_logprobs(logits, labels, average=True), torch.full((2,), -math.log(V)))


def test_the_shift_scores_each_token_with_the_previous_positions_logits():
    """Put all the mass of position t-1 on token y_t: every scored token gets log-prob ~0, while
    an unshifted reading (logits at t scoring y_t) would be ~-30 per token."""
    labels = torch.tensor([[-100, 1, 2, 3]])
    logits = torch.full((1, 4, V), -30.0)
    for t in range(1, 4):
        logits[0, t - 1, labels[0, t]] = 30.0
    assert sequence_logprobs(logits, labels).abs().item() < 1e-6


def test_mask_combines_with_the_labels():
    """mask (aligned with the labels) removes token 3 from row 0: its sum loses that term."""
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(2, 6, V, generator=g), random_labels(2, 6, 2, g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 3] = 0
    per_token = token_logprobs(logits, labels)  # (B, T-1): target t is at index t-1
    full, masked = sequence_logprobs(logits, labels), sequence_logprobs(logits, labels, mask)
    assert torch.allclose(full[0] - masked[0], per_token[0, 2])
    assert torch.equal(full[1], masked[1])
    assert completion_mask(labels, mask).sum().item() == (labels[:, 1:] != -100).sum().item() - 1


# ---------------------------------------------------------------------------- against a slow reference
@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(2, 9), prompt=st.integers(0, 4), average=st.booleans(),
       chunk=st.one_of(st.none(), st.integers(1, 5)), seed=st.integers(0, 10_000))
def test_matches_a_float64_loop_for_any_shape_and_chunking(B, T, prompt, average, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(B, T, V, generator=g)
    labels = random_labels(B, T, min(prompt, T), g)
    got = sequence_logprobs(logits, labels, average=average, chunk_size=chunk)
    assert got.dtype == torch.float32 and got.shape == (B,)
    torch.testing.assert_close(got.double(), slow_reference(logits, labels, average), rtol=1e-5, atol=1e-4)


@settings(max_examples=10, deadline=None)
@given(T=st.integers(2, 12), chunk=st.integers(1, 12), seed=st.integers(0, 1000))
def test_chunking_over_time_changes_nothing_values_or_gradients(T, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, T, V, generator=g)
    labels = random_labels(2, T, 1, g)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ya, yb = sequence_logprobs(a, labels), sequence_logprobs(b, labels, chunk_size=chunk)
    torch.testing.assert_close(ya, yb, rtol=0, atol=1e-6)
    (ya * torch.tensor([1.0, -2.0])).sum().backward()
    (yb * torch.tensor([1.0, -2.0])).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6)


def test_bfloat16_logits_are_scored_in_float32():
    g = torch.Generator().manual_seed(3)
    logits, labels = torch.randn(2, 7, V, generator=g).bfloat16(), random_labels(2, 7, 2, g)
    got = sequence_logprobs(logits, labels)
    assert got.dtype == torch.float32
    assert sequence_logprobs(logits.double(), labels).dtype == torch.float64
    torch.testing.assert_close(got.double(), slow_reference(logits.float(), labels, False), rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------- memory
class _NewLargeTensors(TorchDispatchMode):
    """Records every op output of at least `numel` elements that is a NEW allocation (not a view
    of an input): what a (B, T, V) copy would show up as."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.made = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for o in tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.numel() >= self.numel and o.untyped_storage().data_ptr() not in inputs:
                self.made.append(str(func))
        return out


def test_one_vocabulary_sized_tensor_beyond_the_logits_and_chunks_bound_the_peak():
    """Float32 logits: the forward allocates exactly one tensor of (B, T-1, V) elements (the
    log-softmax); no one-hot, no float copy, no unshifted copy. With chunk_size=c nothing
    larger than (B, c, V) is allocated."""
    B, T, chunk = 2, 17, 4
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(B, T, V, generator=g, requires_grad=True), random_labels(B, T, 3, g)
    with _NewLargeTensors(B * (T - 1) * V) as mode:
        sequence_logprobs(logits, labels)
    assert mode.made == ["aten._log_softmax.default"]
    with _NewLargeTensors(B * (chunk + 1) * V) as mode:
        sequence_logprobs(logits, labels, chunk_size=chunk)
    assert mode.made == []


# ---------------------------------------------------------------------------- one concatenated forward
def _pair_batch(g: torch.Generator, B: int = 3, Tc: int = 9, Tr: int = 7) -> dict:
    batch = {}
    for side, T in (("chosen", Tc), ("rejected", Tr)):
        ids = torch.randint(0, V, (B, T), generator=g)
        lengths = torch.randint(4, T + 1, (B,), generator=g)
        mask = (torch.arange(T)[None] < lengths[:, None]).long()
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :3] = -100  # prompt
        batch.update({f"{side}_input_ids": ids.masked_fill(mask == 0, 0), f"{side}_labels": labels,
                      f"{side}_attention_mask": mask})
    return batch


def test_concatenated_forward_equals_two_separate_forwards():
    """Chosen and rejected padded to one T and stacked (2B, T): right padding is masked and the
    model is causal, so each half scores exactly as in its own forward."""
    model, g = tiny(), torch.Generator().manual_seed(0)
    batch = _pair_batch(g)
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(out.shape))
    out = concatenated_logprobs(model, batch)
    assert calls == [torch.Size([6, 9, V])]  # ONE forward over 2B sequences
    for side in ("chosen", "rejected"):
        logits = model(batch[f"{side}_input_ids"], attention_mask=batch[f"{side}_attention_mask"])
        torch.testing.assert_close(out[f"{side}_logps"], sequence_logprobs(logits, batch[f"{side}_labels"]),
                                   rtol=1e-5, atol=1e-5)
        assert torch.equal(out[f"{side}_tokens"], (batch[f"{side}_labels"][:, 1:] != -100).sum(1).float())


def test_concatenate_pair_pads_and_orders_chosen_first():
    g = torch.Generator().manual_seed(0)
    batch = _pair_batch(g, B=2, Tc=5, Tr=8)
    pair = concatenate_pair(batch, pad_id=1)
    assert pair["input_ids"].shape == (4, 8)
    assert torch.equal(pair["input_ids"][:2, :5], batch["chosen_input_ids"])
    assert (pair["input_ids"][:2, 5:] == 1).all() and (pair["labels"][:2, 5:] == -100).all()
    assert (pair["attention_mask"][:2, 5:] == 0).all()
    assert torch.equal(pair["labels"][2:], batch["rejected_labels"])
    with pytest.raises(KeyError, match="PreferenceDataset"):
        concatenate_pair({"chosen_input_ids": batch["chosen_input_ids"]})


def test_shapes_that_do_not_fit_say_so():
    with pytest.raises(ValueError, match="logits"):
        sequence_logprobs(torch.zeros(2, 5, V), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        sequence_logprobs(torch.zeros(2, 5, V), torch.zeros(2, 5, dtype=torch.long), chunk_size=0)


# ---------------------------------------------------------------------------- parity with TRL
def test_equals_trl_get_batch_logps_on_fixed_tensors():
    """TRL's ORPOTrainer.get_batch_logps (sum and average) on the same logits and labels."""
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOTrainer

    g = torch.Generator().manual_seed(5)
    logits, labels = 4 * torch.randn(4, 11, V, generator=g), random_labels(4, 11, 4, g)
    labels[1, 8:] = -100  # padding
    for average in (False, True):
        ref = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=average)
        torch.testing.assert_close(sequence_logprobs(logits, labels, average=average), ref, rtol=0, atol=1e-6)


def tiny_hf_gpt2(seed: int = 0):
    """A tiny randomly initialized GPT-2 of transformers (no download)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_equals_trl_fused_lm_head_log_probs_of_a_tiny_model():
    """DPOTrainer computes per-token log-probs with TRL's fused LM head (`add_fused_lm_head`,
    never materializing the logits); summed over the completion they equal ours on the same
    model's logits within 1e-6 relative (+ 1e-6 absolute): both are float32 sums of ~20 nats,
    whose last bit is 2e-6, and TRL's kernel sums its tiles in another order."""
    pytest.importorskip("trl")
    from trl.trainer.utils import add_fused_lm_head

    model = tiny_hf_gpt2()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100
    with torch.no_grad():
        ours = sequence_logprobs(model(ids, attention_mask=mask).logits, labels)
        add_fused_lm_head(model)
        trl_logps = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs.sum(1)
    torch.testing.assert_close(ours, trl_logps, rtol=1e-6, atol=1e-6)
