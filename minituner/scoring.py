"""Scoring answers against the world's exact answers: the evaluators behind every chapter's
before/after number. They take predictions (label ids, class names or generated text) and
examples, never a model; ``minituner/evaluate.py`` runs a model to get the predictions.

- ``normalize`` / ``exact_match``: answers are compared after stripping, case-folding,
  collapsing whitespace and dropping trailing full stops, so "Ashford." == "ashford".
- ``evaluate_classification``: accuracy = (1/N) sum_i [pred_i = label_i], overall and within
  each true class (the recall of each class; balanced classes make their mean the accuracy).
- ``evaluate_instructions``: exact match overall, per family, and over the seen and the
  held-out families (generalization to unseen instructions, Wei et al. 2022, FLAN).
- ``judge`` / ``win_rate``: the rule the preference pairs are built on -- 2 correct and
  concise, 1 correct but verbose, 0 wrong -- and the share of pairwise wins under it
  (a tie counts one half), the offline stand-in for an LLM judge's win rate.
"""
from __future__ import annotations

import re
from typing import Sequence

from .lexicon import CLASS_NAMES, HELD_OUT_FAMILIES


def normalize(text: str) -> str:
    """Strip, case-fold, collapse whitespace and drop trailing periods: 'Ashford.' == 'ashford'."""
    return " ".join(text.split()).casefold().rstrip(".").strip()


def exact_match(pred: str, ref: str) -> bool:
    """Equal after ``normalize``."""
    return normalize(pred) == normalize(ref)


def _check_lengths(preds: Sequence, examples: Sequence) -> None:
    if len(preds) != len(examples):
        raise ValueError(f"got {len(preds)} predictions for {len(examples)} examples; "
                         "pass one prediction per example, in order")
    if not examples:
        raise ValueError("no examples to evaluate")


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def evaluate_classification(preds: Sequence[int | str], examples: Sequence[dict]) -> dict:
    """Accuracy of ``preds`` (label ids, or class names such as a generated "good"; any other
    text counts as wrong) against ``examples[i]["label"]``, and the accuracy within each true
    class: ``{"accuracy", "n", "per_class": {name: accuracy or nan if absent}}``."""
    _check_lengths(preds, examples)
    ids = [CLASS_NAMES.index(normalize(p)) if isinstance(p, str) and normalize(p) in CLASS_NAMES
           else (int(p) if not isinstance(p, str) else -1) for p in preds]
    gold = [ex["label"] for ex in examples]
    per = {name: _mean([ids[i] == c for i, g in enumerate(gold) if g == c])
           for c, name in enumerate(CLASS_NAMES)}
    return {"accuracy": _mean([p == g for p, g in zip(ids, gold)]), "n": len(gold), "per_class": per}


def evaluate_instructions(preds: Sequence[str], examples: Sequence[dict]) -> dict:
    """Normalized exact match against ``examples[i]["output"]``: overall, per family, and
    over the seen and the held-out families (nan where there are none)."""
    _check_lengths(preds, examples)
    hits = [exact_match(p, ex["output"]) for p, ex in zip(preds, examples)]
    fams = sorted({ex["family"] for ex in examples})
    by = {f: _mean([h for h, ex in zip(hits, examples) if ex["family"] == f]) for f in fams}
    return {"exact_match": _mean(hits), "n": len(hits), "by_family": by,
            "seen": _mean([h for h, ex in zip(hits, examples) if ex["family"] not in HELD_OUT_FAMILIES]),
            "held_out": _mean([h for h, ex in zip(hits, examples) if ex["family"] in HELD_OUT_FAMILIES])}


def judge(answer: str, reference: str) -> int:
    """The rule behind the preferences: 2 = correct and concise (exact match), 1 = correct
    but verbose (the normalized reference appears in the answer as whole words), 0 = wrong."""
    a, r = normalize(answer), normalize(reference)
    if a == r:
        return 2
    return 1 if r and re.search(r"(?<!\w)" + re.escape(r) + r"(?!\w)", a) else 0


def win_rate(answers: Sequence[str], examples: Sequence[dict],
             against: Sequence[str] | None = None) -> float:
    """Share of examples where ``answers[i]`` beats ``against[i]`` (default: each example's
    ``rejected``) under ``judge`` against the reference (``chosen``, else ``output``); a tie
    counts one half."""
    _check_lengths(answers, examples)
    against = [ex["rejected"] for ex in examples] if against is None else against
    _check_lengths(against, examples)
    total = 0.0
    for a, b, ex in zip(answers, against, examples):
        ref = ex["chosen"] if "chosen" in ex else ex["output"]
        sa, sb = judge(a, ref), judge(b, ref)
        total += 1.0 if sa > sb else 0.5 if sa == sb else 0.0
    return total / len(examples)
