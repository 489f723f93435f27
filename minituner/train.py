"""The one training loop: every chapter (pre-training, full fine-tuning, PEFT, SFT, DPO) uses it.

The objective is a function passed in, `loss_fn(model, batch)`, so classification, instruction
tuning and preference losses plug in without a second loop (the `LossFn` contract is below).
The default is the next-token (causal language modelling) loss (Radford et al. 2018/2019):

    L = -1/N * sum_{t : y_t != -100} log p_theta(y_t | x_{<=t})            (LM objective)

with labels y shifted one position left of the inputs and -100 marking ignored positions
(padding, prompts in SFT). The optimizer is AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101,
Alg. 2: decoupled weight decay theta <- theta - lr * lambda * theta, applied only to matrices,
never to biases, norm gains or embeddings). The learning rate follows a linear warmup then a
cosine decay (Loshchilov & Hutter 2017, SGDR, arXiv:1608.03983, Eq. 5), for step s = 0..S-1:

    lr_s = lr * (s + 1) / W                                         s < W   (warmup)
    lr_s = min_lr + 1/2 (lr - min_lr) (1 + cos(pi * p)),  p = (s - W) / max(1, S - W - 1)

so the first step already trains, the peak is reached at s = W - 1 and the last step uses min_lr.
Each parameter group follows this curve scaled to its own base rate, so per-group rates
(ULMFiT's discriminative fine-tuning, Howard & Ruder 2018, arXiv:1801.06146, Eq. 2: a lower
rate for lower layers) keep their ratios all the way: pass the groups with `lr_scale` (or
an optimizer built with its own per-group `lr`).

The `LossFn` contract. `loss_fn(model, batch)` returns a scalar MEAN loss over the batch's
units, or `(mean, metrics)` with `metrics` a dict of scalars (tensors or numbers). A unit is:
- a target token, when `metrics["num_tokens"]` holds how many the mean is over (the LM and
  SFT losses): masked prompts make that count differ between batches;
- otherwise an example, and the loop counts the micro-batch's examples (a classification
  head's cross-entropy, DPO's and ORPO's losses per preference pair).
Gradient accumulation then gives exactly the update of one big batch of all the window's
units: micro-batch i with mean L_i over n_i units enters as

    L_window = sum_i n_i L_i / sum_i n_i                     (the big batch's mean)

(the loop backpropagates n_i L_i and divides the summed gradients by sum_i n_i once, since
the total is only known after the last forward). The logged loss is L_window, and every
other metric is averaged with the same weights (accuracy over a window is correct / examples).

Around that: gradient clipping by global norm (Pascanu et al. 2013, arXiv:1211.5063),
evaluation every N steps, a tqdm bar with loss and tokens/s, a history (list of dicts, also
passed to `callback` as each is logged) for plots.

No host synchronization inside a step: the loss, the metrics and the gradient norm stay on
the device. One value per step comes to the host: after the backward and the clip, before
`optimizer.step()`, the flag isfinite(window loss) & isfinite(gradient norm), computed on the
device (on a logging step, the logged values themselves, which give the flag). Checking once
per step, rather than only at logging points, is what lets a NaN/Inf raise `TrainingDiverged`
naming its step before the parameters or the optimizer's moments are touched, and before any
checkpoint is written; the last good checkpoint stays as it was. The old loop waited for the
device once per micro-batch and again for the norm.

Reliability: data order is a seeded permutation per epoch, so the data position is two
integers (epoch, batch). Checkpoints (every N steps, `minituner.train_state`) hold the model,
the optimizer state, RNG states, the step and the data position, in safetensors + JSON (never
pickle), written atomically. Resuming from one gives the same final weights, bit for bit on
the CPU, as never stopping.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from minituner.data import IGNORE_INDEX, Collator
from minituner.train_state import latest_checkpoint, load_checkpoint, save_checkpoint

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], "torch.Tensor | tuple[torch.Tensor, dict]"]
Callback = Callable[[dict], None]


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/Inf; the parameters were not updated."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


# ---------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class TrainConfig:
    # How long: give max_steps (optimizer steps) OR epochs (passes over the data, may be
    # fractional: steps = ceil(epochs * batches per epoch / grad_accum_steps)), not both.
    # Neither given: one epoch.
    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8  # examples per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step (effective batch = product)
    lr: float = 3e-4  # peak learning rate
    min_lr: float = 0.0  # learning rate at the last step (cosine floor)
    warmup_steps: int = 0  # linear warmup steps
    weight_decay: float = 0.0  # AdamW decoupled decay on matrices only
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global gradient norm; None = no clipping
    eval_every: int | None = None  # evaluate every N steps (and at the end) when eval_data is given
    eval_batches: int | None = None  # cap the number of eval batches (None = the whole eval set)
    checkpoint_dir: str | None = None  # where checkpoints go; None = no checkpoints
    checkpoint_every: int | None = None  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    resume: bool = False  # continue from the newest checkpoint in checkpoint_dir
    seed: int | None = 0  # seeds data order and torch/python/numpy RNGs; None leaves RNGs alone
    shuffle: bool = True  # a new seeded permutation every epoch
    drop_last: bool = False  # drop an incomplete last micro-batch of each epoch
    device: str | None = None  # None = the model's device
    amp_dtype: str | None = None  # "bfloat16" autocast (CUDA/CPU); None = full precision
    progress: bool = True  # show a tqdm bar
    log_every: int = 1  # history entry every N steps

    def __post_init__(self):
        def positive(name: str, allow_none: bool = False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TrainConfig.{name}={v!r} must be a positive integer")

        if self.max_steps is not None and self.epochs is not None:
            raise ValueError(f"TrainConfig got max_steps={self.max_steps} and epochs={self.epochs}; give one: "
                             "drop epochs to train for max_steps optimizer steps, or drop max_steps to train "
                             "for epochs passes over the data")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"TrainConfig.epochs={self.epochs} must be > 0")
        for name in ("max_steps", "eval_every", "eval_batches", "checkpoint_every"):
            positive(name, allow_none=True)
        for name in ("batch_size", "grad_accum_steps", "keep_checkpoints", "log_every"):
            positive(name)
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps={self.warmup_steps!r} must be an integer >= 0")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay={self.weight_decay} must be >= 0")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip={self.grad_clip}; use a positive norm or None to disable")
        if self.checkpoint_every is not None and self.checkpoint_dir is None:
            raise ValueError("checkpoint_every is set but checkpoint_dir is None; pass checkpoint_dir='...'")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir='...' (where the checkpoints are)")
        if self.amp_dtype not in (None, "bfloat16"):
            raise ValueError(f"amp_dtype={self.amp_dtype!r}; use 'bfloat16' or None "
                             "(float16 needs a gradient scaler this loop does not have)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known: {sorted(known)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


# ---------------------------------------------------------------------------- schedule
def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to min_lr."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps  # warmup
    p = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps - 1))  # progress in [0, 1]
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * p))  # SGDR Eq. 5


# ---------------------------------------------------------------------------- losses
def next_token_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
    """Mean next-token cross-entropy over target positions (labels != -100).

    `batch["labels"]` (B, T) is aligned with input_ids (HF convention) and shifted here; without
    it the targets are the input ids, with padding (attention_mask == 0) ignored.
    Returns (loss, {"num_tokens": number of target tokens}): the loop weights by that count.
    """
    input_ids = batch["input_ids"]  # (B, T)
    mask = batch.get("attention_mask")
    logits = model(input_ids, attention_mask=mask) if mask is not None else model(input_ids)  # (B, T, V)
    labels = batch.get("labels")
    if labels is None:
        labels = input_ids if mask is None else input_ids.masked_fill(mask == 0, IGNORE_INDEX)
    targets = labels[:, 1:]  # (B, T-1): token t+1 is the target of position t
    logits = logits[:, :-1]  # (B, T-1, V)
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="sum")  # -sum log p(y_t | x_<=t)
    n = (targets != IGNORE_INDEX).sum()
    return nll / n.clamp(min=1), {"num_tokens": n}  # LM objective (a batch without targets gives 0)


def perplexity(loss: float) -> float:
    """exp(mean NLL in nats), the effective number of equally likely next tokens."""
    return math.exp(min(loss, 700.0))


def _call_loss(loss_fn: LossFn, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
    out = loss_fn(model, batch)
    loss, metrics = (out if isinstance(out, tuple) else (out, {}))
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise TypeError("loss_fn must return a scalar tensor or (scalar tensor, metrics dict), got "
                        f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
    return loss, metrics


def _units(metrics: dict, n_examples: int) -> torch.Tensor | int:
    """What the loss is a mean over (the LossFn contract): its target tokens if it reports
    num_tokens (a device tensor, left there: no sync), else the batch's examples (an int)."""
    n = metrics.get("num_tokens", n_examples)
    return n.detach() if isinstance(n, torch.Tensor) else n


def _at_least_1(n: torch.Tensor | int) -> torch.Tensor | int:
    return n.clamp(min=1) if isinstance(n, torch.Tensor) else max(n, 1)


def _total(counts: list[torch.Tensor | int]) -> int:
    """Sum of counts, some on the device: one host read for all of them."""
    tensors = [c for c in counts if isinstance(c, torch.Tensor)]
    on_host = sum(c for c in counts if not isinstance(c, torch.Tensor))
    return on_host + (int(torch.stack(tensors).sum()) if tensors else 0)


def _tokens(batch: Batch, metrics: dict, n_examples: int) -> torch.Tensor | int:
    """Tokens a micro-batch processed, for throughput: the loss's target tokens, else the real
    (unpadded) input tokens, else the examples. Stays on the device."""
    if "num_tokens" in metrics:
        return metrics["num_tokens"]
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    return batch["input_ids"].numel() if "input_ids" in batch else n_examples


# ---------------------------------------------------------------------------- data
_STACK = Collator()  # the default collate_fn: stacks equal shapes, refuses ragged ones (no pad id)


def _data_len(data) -> int:
    if isinstance(data, Mapping):
        lens = {k: len(v) for k, v in data.items()}
        if len(set(lens.values())) != 1:
            raise ValueError(f"a dict data set needs tensors of equal first dimension, got {lens}")
        return next(iter(lens.values()))
    try:
        return len(data)
    except TypeError:
        raise TypeError("train_data must be a map-style data set (len and [i] returning a dict of tensors) "
                        "or a dict of tensors with a shared first dimension; wrap iterables in a list") from None


def _make_batch(data, idx: torch.Tensor, collate_fn) -> Batch:
    if isinstance(data, Mapping) and collate_fn is None:
        return {k: v[idx] for k, v in data.items()}  # vectorized gather along the first dim
    return (collate_fn or _STACK)([data[int(i)] for i in idx])


def _epoch_order(n: int, seed: int | None, epoch: int, shuffle: bool) -> torch.Tensor:
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed((seed or 0) * 1_000_003 + epoch)  # own generator: resumable
    return torch.randperm(n, generator=g)


def _batches_per_epoch(n: int, bs: int, drop_last: bool) -> int:
    return n // bs if drop_last else -(-n // bs)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: nn.Module, data, loss_fn: LossFn | None = None, *, batch_size: int = 8,
             collate_fn=None, max_batches: int | None = None, device: str | torch.device | None = None) -> dict:
    """Mean loss over `data`, weighted by each batch's units as in training (target tokens
    when loss_fn reports num_tokens, else examples), and its perplexity.

    The model is put in eval mode and its previous mode restored. Sums stay on the device
    until the end. Returns {"loss", "perplexity", "num_tokens"} (num_tokens: the units).
    """
    loss_fn = loss_fn or next_token_loss
    n = _data_len(data)
    if n == 0:
        raise ValueError("evaluate got an empty data set")
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    total, weight = torch.zeros((), device=device), 0
    try:
        for b, start in enumerate(range(0, n, batch_size)):
            if max_batches is not None and b >= max_batches:
                break
            idx = torch.arange(start, min(n, start + batch_size))
            batch = _to_device(_make_batch(data, idx, collate_fn), device)
            loss, metrics = _call_loss(loss_fn, model, batch)
            w = _units(metrics, len(idx))
            total, weight = total + loss.float() * w, weight + w
    finally:
        model.train(was_training)
    mean, weight = (total / _at_least_1(weight)).item(), float(weight)
    return {"loss": mean, "perplexity": perplexity(mean), "num_tokens": weight}


# ---------------------------------------------------------------------------- optimizer
def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def param_groups(model: nn.Module, weight_decay: float, groups: Iterable[Mapping[str, Any]] | None = None
                 ) -> list[dict]:
    """Trainable parameters in optimizer groups: decayed matrices, and the rest (biases, norm
    gains, embeddings, any 1-D tensor) without weight decay. Tied parameters appear once.

    `groups` (optional): the caller's groups, e.g. one per layer with its own `lr_scale` for
    discriminative rates, `[{"params": [...], "lr_scale": 0.38}, ...]`; each is split the same
    way and keeps its other keys. Parameters in no group are not trained.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    if groups is None:
        groups = [{"params": model.parameters()}]  # parameters() already deduplicates tied weights
    out, seen = [], set()
    for group in groups:
        extra = {k: v for k, v in group.items() if k != "params"}
        decay, no_decay = [], []
        for p in group["params"]:
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
        out += [g for g in ({**extra, "params": decay, "weight_decay": weight_decay},
                            {**extra, "params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if not out:
        raise ValueError("the model has no trainable parameters (all requires_grad=False); "
                         "apply an adapter or unfreeze some parameters")
    return out


def _build_optimizer(model: nn.Module, config: TrainConfig, optimizer) -> torch.optim.Optimizer:
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer  # the caller's: its per-group lr are the schedule's peaks
    groups = None
    if isinstance(optimizer, (list, tuple)):  # param groups with lr_scale: AdamW from the config
        if not all(isinstance(g, Mapping) and "params" in g for g in optimizer):
            raise TypeError("a list passed as optimizer= must hold param-group dicts {'params': [...], "
                            "'lr_scale': x}")
        groups = [{**{k: v for k, v in g.items() if k != "lr_scale"},
                   "lr": config.lr * g.get("lr_scale", 1.0)} for g in optimizer]
        optimizer = None
    groups = param_groups(model, config.weight_decay, groups)
    if optimizer is None:
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    if callable(optimizer):  # a factory: optimizer(param_groups) -> Optimizer
        opt = optimizer(groups)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"the optimizer factory returned {type(opt).__name__}, not a torch.optim.Optimizer")
        return opt
    raise TypeError("optimizer must be None (AdamW), a torch.optim.Optimizer, a list of param groups with "
                    "'lr_scale', or a callable param_groups -> Optimizer (e.g. functools.partial(torch.optim.SGD, "
                    "lr=0.1))")


# ---------------------------------------------------------------------------- the loop
_ORDER_FIELDS = ("batch_size", "grad_accum_steps", "seed", "shuffle", "drop_last")


def _scale_and_clip_(grads: list[torch.Tensor], scale: torch.Tensor | float | None, max_norm: float | None
                     ) -> torch.Tensor:
    """Scale the gradients by s and clip them by global norm (Pascanu et al. 2013,
    arXiv:1211.5063, Alg. 2) in one multiply; return the norm of the scaled gradients:

        g <- g * s * min(1, max_norm / (||g s|| + 1e-6)),     ||g s|| = ||g|| s

    the same as `nn.utils.clip_grad_norm_` after multiplying by s, minus one pass over every
    gradient (and no pass at all when s is None, meaning 1, and clipping is off). The norm
    stays on the device."""
    if not grads:
        return torch.zeros(())
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # ||g||: per-tensor norms, fused
    if scale is not None:
        norm = norm * scale  # ||g s||
    if max_norm is None and scale is None:
        return norm
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0) if max_norm is not None else None
    coef = coef if scale is None else scale if coef is None else coef * scale
    torch._foreach_mul_(grads, coef)
    return norm


class _Window:
    """Sums over one accumulation window, kept on the device (no host sync):
    sum_i n_i L_i, sum_i n_i, and the metrics weighted the same way."""

    def __init__(self, device: torch.device):
        self.device = device
        self.losses: list[torch.Tensor] = []  # each micro-batch's mean, for the divergence message
        self.loss_sum: torch.Tensor | float = 0.0
        self.units: torch.Tensor | int = 0
        self.metric_sums: dict[str, torch.Tensor] = {}

    def add(self, loss: torch.Tensor, weighted: torch.Tensor, units: torch.Tensor | int, metrics: dict) -> None:
        """One micro-batch: its mean loss L_i, n_i L_i, its units n_i, its metrics."""
        self.losses.append(loss.detach())
        first = len(self.losses) == 1  # start the sums from the first terms: no extra zeros
        self.loss_sum = weighted.detach() if first else self.loss_sum + weighted.detach()
        self.units = units if first else self.units + units
        for k, v in metrics.items():
            if k != "num_tokens":
                v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v), device=self.device)
                self.metric_sums[k] = self.metric_sums.get(k, 0.0) + v * units

    def mean_loss(self) -> torch.Tensor:
        return self.loss_sum / _at_least_1(self.units)  # L_window


def _diverged_msg(window: _Window, grad_norm: torch.Tensor, step: int, opt, config: TrainConfig) -> str:
    """Which value went non-finite, and where (read from the device: training stops anyway)."""
    bad = [(i, v) for i, v in enumerate(x.item() for x in window.losses) if not math.isfinite(v)]
    if bad:
        where = f"loss is {bad[0][1]} at step {step} (micro-batch {bad[0][0]})"
    else:
        where = f"gradient norm is {grad_norm.item()} at step {step}"
    last = latest_checkpoint(config.checkpoint_dir) if config.checkpoint_dir else None
    kept = f"the last good checkpoint {last} is intact" if last else "no checkpoint was written"
    return (f"training diverged: {where}; the parameters were not updated and {kept}. "
            f"Lower the learning rate (lr={opt.param_groups[0]['lr']:.3g} now), enable or tighten gradient "
            f"clipping (grad_clip={config.grad_clip}), add warmup, or check the data and loss_fn.")


def train(model: nn.Module, train_data, config: TrainConfig, *, loss_fn: LossFn | None = None,
          optimizer=None, eval_data=None, collate_fn=None, callback: Callback | None = None) -> list[dict]:
    """Train `model` in place; returns the history, one dict per logged step
    ({"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", ...metrics},
    plus "eval_loss"/"eval_perplexity" on evaluation steps). "lr" is the first param group's,
    "tokens" the running total (see `_tokens`), "tokens_per_s" since the previous entry.
    `callback(entry)` is called with each entry as it is logged (live plots, early looks).

    train_data: a map-style data set (len, [i] -> dict of tensors) or a dict of tensors with
    a shared first dimension. collate_fn: None stacks equal-shape examples (and refuses
    ragged ones); pass `data.Collator(tokenizer.pad_id)` to pad. optimizer: None (AdamW from
    the config, no decay on biases, norms and embeddings); a list of param groups with
    `lr_scale` multipliers of config.lr (AdamW, each group split for decay as above); an
    Optimizer instance (its per-group lr are the schedule's peaks); or a factory
    param_groups -> Optimizer. loss_fn: see the module docstring's LossFn contract.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    loss_fn = loss_fn or next_token_loss
    n = _data_len(train_data)
    per_epoch = _batches_per_epoch(n, config.batch_size, config.drop_last)
    if per_epoch == 0:
        raise ValueError(f"the training set has {n} examples, fewer than batch_size={config.batch_size} "
                         "with drop_last=True" if n else "the training set is empty")
    accum = config.grad_accum_steps  # k micro-batches per optimizer step
    epochs = 1.0 if config.epochs is None else config.epochs  # neither given: one epoch
    max_steps = config.max_steps or max(1, math.ceil(epochs * per_epoch / accum))
    device = torch.device(config.device) if config.device else _model_device(model)
    model.to(device)
    opt = _build_optimizer(model, config, optimizer)
    for g in opt.param_groups:
        g.setdefault("initial_lr", g["lr"])  # the schedule's peak for this group

    step, epoch, batch_in_epoch, tokens_seen, history = 0, 0, 0, 0, []
    ckpt = latest_checkpoint(config.checkpoint_dir) if config.checkpoint_dir else None
    if ckpt is not None and not config.resume:
        raise ValueError(f"{config.checkpoint_dir} already holds a checkpoint ({ckpt.name}); pass resume=True "
                         "to continue from it, or choose an empty checkpoint_dir")
    if config.seed is not None:
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed % 2**32)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, opt)  # restores model, optimizer (with lr), RNGs
        saved = state["config"]
        diff = {k: (saved[k], getattr(config, k)) for k in _ORDER_FIELDS if saved[k] != getattr(config, k)}
        if diff or state["num_examples"] != n:
            raise ValueError(f"cannot resume from {ckpt}: the data order changed (saved vs now: {diff}, "
                             f"examples {state['num_examples']} vs {n}); resume with the same config and data")
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        tokens_seen, history = int(state["tokens_seen"]), state["history"]

    def trainer_state() -> dict:
        return {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "num_examples": n,
                "tokens_seen": tokens_seen, "max_steps": max_steps, "config": config.to_dict(), "history": history}

    params = [p for g in opt.param_groups for p in g["params"]]  # the ones the optimizer steps
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if config.amp_dtype else None
    order = _epoch_order(n, config.seed, epoch, config.shuffle)
    bar = tqdm(total=max_steps, initial=step, disable=not config.progress, desc="train", dynamic_ncols=True)
    pending_tokens, t_last = [], time.perf_counter()  # tokens since the last host read, and its time
    model.train()
    try:
        while step < max_steps:
            for g in opt.param_groups:  # warmup + cosine, scaled to each group's own peak
                g["lr"] = g["initial_lr"] * lr_at(step, lr=1.0, min_lr=config.min_lr / config.lr,
                                                   warmup_steps=config.warmup_steps, max_steps=max_steps)
            window = _Window(device)
            for _ in range(accum):
                if batch_in_epoch >= per_epoch:  # next epoch, next permutation
                    epoch, batch_in_epoch = epoch + 1, 0
                    order = _epoch_order(n, config.seed, epoch, config.shuffle)
                idx = order[batch_in_epoch * config.batch_size:(batch_in_epoch + 1) * config.batch_size]
                batch = _to_device(_make_batch(train_data, idx, collate_fn), device)
                batch_in_epoch += 1
                with amp if amp is not None else contextlib.nullcontext():
                    loss, metrics = _call_loss(loss_fn, model, batch)
                units = _units(metrics, len(idx))  # n_i
                weighted = loss.float() * units  # n_i L_i
                # one micro-batch: the mean is the update; k of them: backprop n_i L_i, scale below
                (loss if accum == 1 else weighted).backward()
                window.add(loss, weighted, units, metrics)
                pending_tokens.append(_tokens(batch, metrics, len(idx)))
            # k micro-batches: sum_i n_i grad L_i / sum_i n_i = grad L_window, folded into the clip
            scale = None if accum == 1 else 1.0 / _at_least_1(window.units)
            grad_norm = _scale_and_clip_([p.grad for p in params if p.grad is not None], scale, config.grad_clip)

            done = step + 1
            do_eval = eval_data is not None and (done == max_steps or bool(config.eval_every)
                                                 and done % config.eval_every == 0)
            do_ckpt = config.checkpoint_dir is not None and (done == max_steps or bool(config.checkpoint_every)
                                                             and done % config.checkpoint_every == 0)
            do_log = do_eval or done % config.log_every == 0 or done == max_steps
            # the step's one host read: the logged values (whose finiteness is the flag), or the flag
            if do_log or do_ckpt:
                names = list(window.metric_sums)
                values = torch.stack([window.mean_loss(), grad_norm.float(),
                                      *(window.metric_sums[m] / _at_least_1(window.units) for m in names)]).tolist()
                finite = math.isfinite(values[0]) and math.isfinite(values[1])
                tokens_now = _total(pending_tokens)  # computed already: this read waits for nothing
            else:
                finite = math.isfinite((window.loss_sum + grad_norm).item())  # both finite iff the sum is
            if not finite:
                opt.zero_grad(set_to_none=True)
                raise TrainingDiverged(_diverged_msg(window, grad_norm, done, opt, config), done)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step = done
            bar.update(1)
            if not (do_log or do_ckpt):
                continue
            tokens_seen, pending_tokens = tokens_seen + tokens_now, []
            now = time.perf_counter()
            entry = {"step": step, "epoch": epoch, "loss": values[0], "lr": opt.param_groups[0]["lr"],
                     "grad_norm": values[1], "tokens": tokens_seen,
                     "tokens_per_s": tokens_now / max(now - t_last, 1e-9), **dict(zip(names, values[2:]))}
            t_last = now
            if do_eval:
                ev = evaluate(model, eval_data, loss_fn, batch_size=config.batch_size, collate_fn=collate_fn,
                              max_batches=config.eval_batches, device=device)
                entry.update(eval_loss=ev["loss"], eval_perplexity=ev["perplexity"])
            if do_log:
                history.append(entry)
                bar.set_postfix(loss=f"{entry['loss']:.4f}", tok_s=f"{entry['tokens_per_s']:.0f}")
                if callback is not None:
                    callback(entry)
            if do_ckpt:
                save_checkpoint(config.checkpoint_dir, model, opt, trainer_state(), keep=config.keep_checkpoints)
    finally:
        bar.close()
    return history
