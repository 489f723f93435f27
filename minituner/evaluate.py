"""Measuring a language model on the world: the numbers every chapter's before/after reports.

- `unigram_baseline`: the cross-entropy of the best model that ignores context,
      H_uni = -1/N sum_t log q(y_t),  q(v) = (count_train(v) + 1) / (N_train + V)   (add-one)
  A language model has learned something about *language* only when its held-out loss is
  far below this number (perplexity = exp(loss); the unigram perplexity is its ceiling).
- `sequence_scores` / `fact_recall`: does the model *know the world's facts*? For each person
  and each attribute, every candidate value is put in one sentence ("Ada lives in Ashford.")
  and scored by its total log-probability; the model is right when the true value scores
  highest. Chance is 1 / (number of candidates).
- `complete` / `instruction_exact_match`: greedy answers to prompts, batched with left
  padding and a KV cache, scored by the world's exact evaluators.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .tokenizer import Tokenizer
from .prompts import format_prompt
from .scoring import evaluate_instructions
from .world import World


def unigram_baseline(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab_size: int) -> dict:
    """Add-one unigram cross-entropy (nats/token) of `eval_ids` under counts of `train_ids`."""
    if train_ids.numel() == 0 or eval_ids.numel() == 0:
        raise ValueError("unigram_baseline needs non-empty train and eval token streams")
    counts = torch.bincount(train_ids.flatten(), minlength=vocab_size).double()  # (V,)
    logq = torch.log((counts + 1) / (counts.sum() + vocab_size))  # (V,) add-one smoothing
    loss = float(-logq[eval_ids.flatten()].mean())  # H_uni
    return {"loss": loss, "perplexity": math.exp(loss)}


@torch.no_grad()
def sequence_scores(model, tokenizer: Tokenizer, texts: Sequence[str], *, batch_size: int = 64,
                    add_bos: bool = True) -> torch.Tensor:
    """Total log-probability (nats) of each text under the model: sum_t log p(x_t | x_<t)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer.encode_batch(list(texts[i:i + batch_size]), add_bos=add_bos)
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)  # (B, T)
        logits = model(ids, attention_mask=mask)[:, :-1].float()  # (B, T-1, V)
        logp = torch.gather(F.log_softmax(logits, -1), 2, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
        out.append((logp * mask[:, 1:]).sum(1).cpu())  # (B,) padding contributes nothing
    return torch.cat(out)


# One sentence per attribute, in the corpus's own words; {v} is the candidate value.
FACT_TEMPLATES = {
    "town": ("{name} lives in {v}.", lambda w: [t.name for t in w.towns], lambda p: p.town),
    "color": ("{name}'s favourite color is {v}.", lambda w: sorted({p.color for p in w.people}),
              lambda p: p.color),
    "pet": ("{name}'s pet is a {v}.", lambda w: sorted({p.pet for p in w.people}), lambda p: p.pet),
    "job": ("{name} works as a {v}.", lambda w: sorted({p.job for p in w.people}), lambda p: p.job),
}


def fact_recall(model, tokenizer: Tokenizer, world: World, *, batch_size: int = 128) -> dict:
    """Accuracy of picking each person's true attribute among all candidates, per attribute,
    with the chance level beside it. Returns {attr: {"accuracy", "chance", "n"}, "mean": ...}."""
    result, accs = {}, []
    for attr, (template, candidates, truth) in FACT_TEMPLATES.items():
        values = candidates(world)
        texts = [template.format(name=p.name, v=v) for p in world.people for v in values]
        scores = sequence_scores(model, tokenizer, texts, batch_size=batch_size)
        scores = scores.view(len(world.people), len(values))  # (people, candidates)
        picked = scores.argmax(1)
        gold = torch.tensor([values.index(truth(p)) for p in world.people])
        acc = float((picked == gold).float().mean())
        result[attr] = {"accuracy": acc, "chance": 1 / len(values), "n": len(world.people)}
        accs.append(acc)
    result["mean"] = sum(accs) / len(accs)
    return result


@torch.no_grad()
def complete(model, tokenizer: Tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 32,
             batch_size: int = 64, add_bos: bool = True, stop: str | None = "\n",
             progress: bool = False) -> list[str]:
    """Greedy continuations of `prompts` (batched, left-padded, KV cache), cut at EOS and
    at the first `stop` string. Longest prompts first, so each batch pads little."""
    if not prompts:
        return []
    model.eval()
    device = next(model.parameters()).device
    # Every token whose text contains `stop` ends a row early, like EOS: generation halts
    # as soon as every row has finished its first line, instead of running max_new_tokens.
    eos_text = tokenizer.decode([tokenizer.eos_id], skip_special_tokens=False) if tokenizer.eos_id is not None else ""
    stop_ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    if stop:
        stop_ids += [i for i in range(tokenizer.vocab_size)
                     if stop in tokenizer.decode([i], skip_special_tokens=False)]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    starts = range(0, len(order), batch_size)
    for s in tqdm(starts, desc="generating", disable=not progress):
        idx = order[s:s + batch_size]
        enc = tokenizer.encode_batch([prompts[i] for i in idx], add_bos=add_bos, padding_side="left")
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)  # (B, T)
        room = model.config.block_size - ids.shape[1]
        if room <= 0:
            raise ValueError(f"a prompt of {ids.shape[1]} tokens leaves no room to generate within "
                             f"block_size={model.config.block_size}; shorten the prompt")
        out = model.generate(ids, min(max_new_tokens, room), attention_mask=mask,
                             eos_token_id=stop_ids or None, pad_token_id=tokenizer.pad_id)
        for i, row in zip(idx, out[:, ids.shape[1]:].tolist()):
            if eos_text:  # cut at EOS (what follows is padding); keep other special tokens
                text = tokenizer.decode(row, skip_special_tokens=False).split(eos_text)[0]
            else:
                text = tokenizer.decode(row)
            answers[i] = text.split(stop)[0] if stop else text
    return answers


def instruction_exact_match(model, tokenizer: Tokenizer, examples: Sequence[dict], *,
                            template: str = "alpaca", max_new_tokens: int = 32,
                            batch_size: int = 64, progress: bool = False) -> dict:
    """Exact match of greedy answers on instruction examples, overall and per family
    (the world's `evaluate_instructions`), with the answers for inspection."""
    prompts = [format_prompt(e["instruction"], e.get("input", ""), template=template) for e in examples]
    answers = complete(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                       batch_size=batch_size, progress=progress)
    return {**evaluate_instructions(answers, examples), "answers": answers}
