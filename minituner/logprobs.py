"""Log-probabilities of completions: what SFT, DPO and ORPO all score (Chapters 08-09).

A causal language model gives, at every position t, logits z_t (V,) for the NEXT token. The
log-probability of a completion y = (y_1 .. y_m) after a prompt x is the sum over its tokens

    log pi(y | x) = sum_{t in completion} log softmax(z_{t-1})[y_t]
                  = sum_t ( z_{t-1}[y_t] - log sum_v exp z_{t-1}[v] )

and its length-normalized form (ORPO, IPO, SimPO) divides by the number m of completion
tokens. Labels follow the Hugging Face convention of `minituner.data`: `labels[t]` is aligned
with `input_ids[t]` and -100 marks tokens that are not scored (prompt, padding), so

    position   0      1      2      3       4        labels aligned with the inputs;
    labels     -100   -100   y_1    y_2     <eos>    the logits at t-1 score the label at t:
    logits     z_0    z_1    z_2    z_3     z_4      z_0 .. z_{T-2} against labels 1 .. T-1

Memory: the one (B, T-1, V) tensor built here beyond the model's float32 logits is the
log-softmax, from which the label's entry is gathered (no one-hot, no second copy; the
shift is a view). bfloat16 logits are upcast to float32 for accuracy, which costs a float32
copy of what is upcast. With `chunk_size`, the time axis is done `chunk_size` positions at
a time, so the peak of new tensors is (B, chunk_size, V); without gradients (a reference
model's pass) that is the whole cost. Under autograd each chunk's log-softmax is kept for
the backward pass, and the chunks' gradients are written into one (B, T-1, V) (`split`).

`concatenated_logprobs(model, batch)` runs chosen and rejected in ONE forward pass of the
model on a (2B, T) batch (DPO's trick: one launch of every kernel, weights read once),
and splits the result back into the two halves.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minituner.data import IGNORE_INDEX


# ---------------------------------------------------------------------------- per token
def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """log p(labels[t] | inputs[<t]) for t = 1 .. T-1, as (B, T-1) float32 (float64 for float64
    logits); positions whose label
    is IGNORE_INDEX get 0 (their value is meaningless: multiply by a mask before summing).

    logits (B, T, V), labels (B, T) aligned with the inputs (HF convention); the shift is here.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"token_logprobs needs logits (B, T, V) and labels (B, T) of the same B, T; got "
                         f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer, or None for no chunking")
    targets = labels[:, 1:]  # (B, T-1): the token after position t is scored by z_t
    logits = logits[:, :-1]  # (B, T-1, V) a view: no copy
    targets = targets.masked_fill(targets == IGNORE_INDEX, 0)  # any valid id; masked out by the caller
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32  # at least float32
    if targets.size(1) == 0:  # T = 1: nothing to score
        return logits.new_zeros(targets.shape, dtype=acc)
    step = chunk_size or targets.size(1)
    out = []
    # split (not slicing in a loop): its backward writes each chunk's gradient into one (B, T-1, V)
    for z, y in zip(logits.split(step, dim=1), targets.split(step, dim=1)):  # (B, c, V), (B, c)
        logp = F.log_softmax(z, dim=-1, dtype=acc)  # (B, c, V): the one (B, c, V) tensor made here
        out.append(logp.gather(-1, y[..., None]).squeeze(-1))  # (B, c): log p(y_t)
    return torch.cat(out, dim=1)  # (B, T-1)


def completion_mask(labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T-1) float mask of the scored targets labels[:, 1:]: labels != IGNORE_INDEX, and
    `mask[:, 1:]` (aligned with the labels, 1 = score this token) when given."""
    m = labels[:, 1:] != IGNORE_INDEX  # (B, T-1)
    if mask is not None:
        if mask.shape != labels.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must have the labels' shape {tuple(labels.shape)}")
        m = m & mask[:, 1:].bool()
    return m.float()


# ---------------------------------------------------------------------------- per sequence
def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None,
                      average: bool = False, chunk_size: int | None = None) -> torch.Tensor:
    """Per-sequence sum (or, with `average`, mean) of the completion tokens' log-probabilities.

    logits (B, T, V); labels (B, T) aligned with the inputs, IGNORE_INDEX (-100) where not
    scored; mask (B, T) optional, aligned with the labels, 1 where a token is scored (combined
    with labels != -100). Returns (B,) float32 (float64 for float64 logits). A sequence with no scored token gets 0 (sum)
    or 0 (mean, divided by max(1, 0 tokens)).
    """
    logp = token_logprobs(logits, labels, chunk_size)  # (B, T-1)
    m = completion_mask(labels, mask)  # (B, T-1)
    total = (logp * m).sum(-1)  # (B,): log pi(y | x) = sum_t log p(y_t | x, y_<t)
    return total / m.sum(-1).clamp(min=1) if average else total


# ---------------------------------------------------------------------------- chosen and rejected
def _pad_to(x: torch.Tensor, T: int, value: int) -> torch.Tensor:
    return F.pad(x, (0, T - x.size(1)), value=value) if x.size(1) < T else x  # right-pad (B, T)


def concatenate_pair(batch: dict[str, torch.Tensor], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """`chosen_*` and `rejected_*` (each (B, T_c) / (B, T_r)) stacked as one (2B, T) batch,
    chosen first: `input_ids`, `labels`, `attention_mask` (right-padded to T = max(T_c, T_r);
    pad_id for ids, -100 for labels, 0 for the mask; a missing mask means all ones)."""
    for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
        if k not in batch:
            raise KeyError(f"a preference batch needs {k!r} (minituner.data.PreferenceDataset + "
                           f"Collator(tokenizer.pad_id) makes one); got keys {sorted(batch)}")
    T = max(batch["chosen_input_ids"].size(1), batch["rejected_input_ids"].size(1))
    out = {}
    for key, fill in (("input_ids", pad_id), ("labels", IGNORE_INDEX), ("attention_mask", 0)):
        halves = []
        for side in ("chosen", "rejected"):
            x = batch.get(f"{side}_{key}")
            if x is None:  # no mask: every position is a real token
                x = torch.ones_like(batch[f"{side}_input_ids"])
            halves.append(_pad_to(x, T, fill))
        out[key] = torch.cat(halves, dim=0)  # (2B, T)
    return out


def concatenated_logprobs(model: nn.Module, batch: dict[str, torch.Tensor], *, pad_id: int = 0,
                          chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    """One forward pass of `model` over chosen and rejected together, then split.

    Returns (each (B,), float32): `chosen_logps`, `rejected_logps` (sums over the completion
    tokens) and `chosen_tokens`, `rejected_tokens` (how many tokens each sum is over), so a
    caller wanting means divides (ORPO, IPO) without a second pass.
    """
    pair = concatenate_pair(batch, pad_id)
    logits = model(pair["input_ids"], attention_mask=pair["attention_mask"])  # (2B, T, V)
    logp = token_logprobs(logits, pair["labels"], chunk_size)  # (2B, T-1)
    m = completion_mask(pair["labels"])  # (2B, T-1)
    sums, counts = (logp * m).sum(-1), m.sum(-1)  # (2B,), (2B,)
    chosen_logps, rejected_logps = sums.chunk(2)  # (B,), (B,): the batch is [chosen; rejected]
    chosen_tokens, rejected_tokens = counts.chunk(2)
    return {"chosen_logps": chosen_logps, "rejected_logps": rejected_logps,
            "chosen_tokens": chosen_tokens, "rejected_tokens": rejected_tokens}
