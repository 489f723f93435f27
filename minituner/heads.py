"""Feature extraction: a classification head on a frozen encoder (Chapter 03).

The cheapest way to adapt a pre-trained model: keep every weight of the encoder as it is,
pool its final hidden states into one vector per text, and train only a small classifier on
top (the "feature-based approach" of Devlin et al. 2018, arXiv:1810.04805, Sec. 5.3, and of
ELMo before it). For a text x with hidden states h_1..h_T (B, T, C):

    z = pool(h_1..h_T)             "last" real token (GPT-2, Llama: the only position
                                    that has seen the whole text), "mean" over real tokens,
                                    or "first" token (BERT's [CLS])
    logits = W z + b               K classes; or W2 dropout(GELU(W1 z + b1)) + b2 with `hidden`
    L = -1/B sum_i log softmax(logits_i)[y_i]                        (cross-entropy)

    input_ids --[ frozen encoder ]--> h (B,T,C) --pool--> z (B,C) --[ head ]--> logits (B,K)
                 no gradients, run once                              trained

Because the encoder is frozen, z never changes during training: `extract_features` runs the
encoder once over the data set and the head then trains on the cached (N, C) tensors in
seconds, through the same `train.train` loop (`FeatureDataset` + `feature_loss`). That gives
exactly the head that training through the frozen encoder gives, at a fraction of the cost.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from minituner.data import Collator
from minituner.protocol import applied, freeze, mark_applied

POOLINGS = ("last", "mean", "first")


@dataclass(frozen=True)
class HeadConfig:
    num_classes: int  # K
    pooling: str = "last"  # "last" | "mean" | "first": which hidden states make z
    hidden: int | None = None  # width of a hidden layer (Linear-GELU-dropout-Linear); None: one Linear
    dropout: float = 0.0  # dropout on the head's input (and hidden layer)
    freeze_base: bool = True  # apply_head freezes the encoder; False keeps what is trainable

    def __post_init__(self) -> None:
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"num_classes={self.num_classes!r}: a classifier needs an integer >= 2")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}; use one of {POOLINGS}")
        if self.hidden is not None and (not isinstance(self.hidden, int) or self.hidden < 1):
            raise ValueError(f"hidden={self.hidden!r}: a positive width, or None for a single Linear")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class ClassificationHead(nn.Module):
    """logits (B, K) from pooled features z (B, C): dropout, then Linear; or, with
    `hidden`, dropout - Linear(C, hidden) - GELU - dropout - Linear(hidden, K)."""

    def __init__(self, n_embd: int, config: HeadConfig) -> None:
        super().__init__()
        self.pooling = config.pooling
        self.dropout = nn.Dropout(config.dropout)
        self.dense = nn.Linear(n_embd, config.hidden) if config.hidden else None  # W1, b1
        width = config.hidden or n_embd
        self.out_proj = nn.Linear(width, config.num_classes)  # W (or W2), b

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        z = self.dropout(pooled.to(self.out_proj.weight.dtype))  # (B, C)
        if self.dense is not None:
            z = self.dropout(F.gelu(self.dense(z)))  # (B, hidden)
        return self.out_proj(z)  # logits = W z + b, (B, K)


def _attach(model: nn.Module, config: HeadConfig) -> None:
    if getattr(model, "head", None) is not None:
        raise ValueError("the model already has a head; build a fresh model to attach another")
    ref = next(model.parameters())  # the head lives on the encoder's device, in its float dtype
    head = ClassificationHead(model.config.n_embd, config)
    model.head = head.to(ref.device, ref.dtype if ref.is_floating_point() else None)


def add_head(model: nn.Module, config: HeadConfig) -> nn.Module:
    """Attach a trainable `model.head` without freezing anything (full fine-tuning with a
    head, or a head on top of adapters: add it last). Recorded with freeze_base=False."""
    _attach(model, config)
    mark_applied(model, "head", replace(config, freeze_base=False))
    return model


def apply_head(model: nn.Module, config: HeadConfig) -> nn.Module:
    """Freeze the encoder (unless config.freeze_base is False) and attach a trainable head.

    On a model another technique was applied to (adapters, LoRA) the base is frozen already
    and that technique's parameters stay trainable. Apply the head last: apply_* of another
    technique freezes everything it finds, a head included."""
    if config.freeze_base and not applied(model):
        freeze(model)
    _attach(model, config)
    mark_applied(model, "head", config)
    return model


def classify(model: nn.Module, input_ids: torch.Tensor,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, K) of a model with a head: head(pool(hidden states))."""
    if getattr(model, "head", None) is None:
        raise ValueError("the model has no classification head; call apply_head(model, HeadConfig(...))")
    z = model.hidden_states(input_ids, attention_mask, pooling=model.head.pooling)  # (B, C)
    return model.head(z)  # (B, K)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    loss = F.cross_entropy(logits.float(), labels)  # -1/B sum log softmax(logits)[y]
    accuracy = (logits.argmax(-1) == labels).float().mean()  # a tensor: no host sync
    return loss, {"accuracy": accuracy.detach()}


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """train.py LossFn: cross-entropy of classify(...) against batch["labels"] (B,)."""
    logits = classify(model, batch["input_ids"], batch.get("attention_mask"))  # (B, K)
    return _cross_entropy(logits, batch["labels"])


def _by_length(data: Sequence) -> list[int]:
    """Indices of `data` sorted by sequence length, so each batch pads little."""
    return sorted(range(len(data)), key=lambda i: len(data[i]["input_ids"]))


def _batches(data: Sequence, batch_size: int, collate_fn: Callable, progress: bool, desc: str,
             order: Sequence[int] | None = None):
    order = range(len(data)) if order is None else order
    starts = range(0, len(data), batch_size)
    for start in tqdm(starts, disable=not progress, desc=desc, dynamic_ncols=True):
        yield collate_fn([data[i] for i in order[start:start + batch_size]])


@torch.no_grad()
def extract_features(model: nn.Module, data: Sequence, pooling: str = "last", batch_size: int = 64, *,
                     pad_id: int = 0, collate_fn: Callable | None = None, progress: bool = True,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the encoder once over `data` ({"input_ids", "labels"} examples, e.g. a
    ClassificationDataset): pooled features (N, C) in `dtype` and labels (N,), on the CPU.

    Eval mode (no dropout) and no gradients; the model's mode is restored. Batches are
    right-padded with `pad_id` (masked out, so any valid id works) unless collate_fn is given.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r}; use one of {POOLINGS}")
    if len(data) == 0:
        raise ValueError("extract_features got an empty data set")
    collate_fn = collate_fn or Collator(pad_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        order = _by_length(data)  # similar lengths together: little padding to compute
        for batch in _batches(data, batch_size, collate_fn, progress, "features", order):
            mask = batch.get("attention_mask")
            z = model.hidden_states(batch["input_ids"].to(device),
                                    mask.to(device) if mask is not None else None, pooling=pooling)  # (B, C)
            feats.append(z.to("cpu", dtype))
            labels.append(batch["labels"])
    finally:
        model.train(was_training)
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))  # position of example i in the sorted order
    return torch.cat(feats)[back], torch.cat(labels)[back]  # (N, C), (N,) in the order of `data`


class FeatureDataset(torch.utils.data.Dataset):
    """Cached features as {"features": (C,), "labels": ()} examples for `train.train`."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        if features.dim() != 2 or labels.shape != features.shape[:1]:
            raise ValueError(f"need features (N, C) and labels (N,), got {tuple(features.shape)} "
                             f"and {tuple(labels.shape)}")
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"features": self.features[i], "labels": self.labels[i]}


def feature_loss(head: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """train.py LossFn for a head alone on cached features: cross-entropy of head(z)."""
    return _cross_entropy(head(batch["features"]), batch["labels"])  # head: (B, C) -> (B, K)


@torch.no_grad()
def accuracy(model: nn.Module, data: Sequence, pad_id: int = 0, batch_size: int = 64, *,
             collate_fn: Callable | None = None, progress: bool = False) -> float:
    """Fraction of `data` ({"input_ids", "labels"} examples) a model with a head classifies
    right, in eval mode (the model's mode is restored)."""
    if len(data) == 0:
        raise ValueError("accuracy got an empty data set")
    collate_fn = collate_fn or Collator(pad_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    try:
        for batch in _batches(data, batch_size, collate_fn, progress, "accuracy"):
            mask = batch.get("attention_mask")
            logits = classify(model, batch["input_ids"].to(device),
                              mask.to(device) if mask is not None else None)  # (B, K)
            correct += (logits.argmax(-1) == batch["labels"].to(device)).sum()
    finally:
        model.train(was_training)
    return correct.item() / len(data)  # one host sync, at the end
