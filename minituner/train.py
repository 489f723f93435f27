"""The one training loop: every chapter (pre-training, full fine-tuning, PEFT, SFT, DPO) uses it.

The objective is a function passed in, `loss_fn(model, batch) -> loss` (or `(loss, metrics)`),
so classification, instruction tuning and preference losses plug in without a second loop.
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

Around that: gradient accumulation (k micro-batches of mean loss / k), gradient clipping by
global norm (Pascanu et al. 2013, arXiv:1211.5063), evaluation every N steps, a tqdm bar with
loss and tokens/s, and a history (list of dicts) for plots.

Reliability: data order is a seeded permutation per epoch, so the data position is two
integers (epoch, batch). Checkpoints (every N steps) hold the model, the optimizer state, RNG
states, the step and the data position, in safetensors + JSON (never pickle), written to a
temporary directory and renamed into place, so a crash never leaves a half-written one.
Resuming from one gives the same final weights, bit for bit on the CPU, as never stopping.
A NaN/Inf loss or gradient norm raises `TrainingDiverged` before the parameters are touched;
the last good checkpoint stays as it was.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, load_model, save_file, save_model
from tqdm.auto import tqdm

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], "torch.Tensor | tuple[torch.Tensor, dict]"]
IGNORE_INDEX = -100


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/Inf; the parameters were not updated."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


# ---------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class TrainConfig:
    max_steps: int | None = 100  # optimizer steps; None -> epochs * (batches per epoch / accum)
    epochs: float | None = None  # used only when max_steps is None
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

        if self.max_steps is None and self.epochs is None:
            raise ValueError("TrainConfig needs max_steps=<int> or epochs=<number> (with max_steps=None)")
        if self.epochs is not None and self.epochs <= 0:
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
    Returns (loss, {"num_tokens": number of target tokens}) so averages can be token-weighted.
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


def _num_tokens(batch: Batch, metrics: dict) -> float:
    if "num_tokens" in metrics:
        return float(metrics["num_tokens"])
    if "attention_mask" in batch:
        return float(batch["attention_mask"].sum())
    x = batch.get("input_ids")
    return float(x.numel()) if x is not None else float(len(next(iter(batch.values()))))


# ---------------------------------------------------------------------------- data
def default_collate(examples: Sequence[Mapping[str, Any]]) -> Batch:
    """Stack a list of dict examples; 1-D sequences of different lengths are right-padded
    (input_ids with 0, labels with -100, attention_mask with 0 and created if absent)."""
    if not examples or not isinstance(examples[0], Mapping):
        raise TypeError("each example must be a dict of tensors, e.g. {'input_ids': tensor([...])}; "
                        "pass collate_fn= for other formats")
    keys = list(examples[0].keys())
    rows = {k: [torch.as_tensor(ex[k]) for ex in examples] for k in keys}
    ragged = [k for k, v in rows.items() if len({tuple(t.shape) for t in v}) > 1]
    if not ragged:
        return {k: torch.stack(v) for k, v in rows.items()}
    bad = [k for k in ragged if any(t.dim() != 1 for t in rows[k])]
    if bad:
        raise ValueError(f"examples' {bad} have different shapes that are not 1-D sequences; pass collate_fn=")
    if "attention_mask" not in rows and "input_ids" in ragged:
        rows["attention_mask"] = [torch.ones_like(t) for t in rows["input_ids"]]
        ragged.append("attention_mask")
    fill = {"labels": IGNORE_INDEX}
    return {k: (nn.utils.rnn.pad_sequence(v, batch_first=True, padding_value=fill.get(k, 0)) if k in ragged
                else torch.stack(v)) for k, v in rows.items()}


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
    return (collate_fn or default_collate)([data[int(i)] for i in idx])


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
    """Mean loss over `data` (token-weighted when loss_fn reports num_tokens) and its perplexity.

    The model is put in eval mode and its previous mode restored. Returns
    {"loss", "perplexity", "num_tokens"}.
    """
    loss_fn = loss_fn or next_token_loss
    n = _data_len(data)
    if n == 0:
        raise ValueError("evaluate got an empty data set")
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    total, weight = 0.0, 0.0
    try:
        for b, start in enumerate(range(0, n, batch_size)):
            if max_batches is not None and b >= max_batches:
                break
            batch = _to_device(_make_batch(data, torch.arange(start, min(n, start + batch_size)), collate_fn), device)
            loss, metrics = _call_loss(loss_fn, model, batch)
            w = float(metrics["num_tokens"]) if "num_tokens" in metrics else float(min(n, start + batch_size) - start)
            total += float(loss) * w
            weight += w
    finally:
        model.train(was_training)
    mean = total / max(weight, 1e-12)
    return {"loss": mean, "perplexity": perplexity(mean), "num_tokens": weight}


# ---------------------------------------------------------------------------- optimizer
def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: decayed matrices, and the rest (biases, norm gains,
    embeddings, any 1-D tensor) without weight decay. Tied parameters appear once."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():  # parameters() already deduplicates tied weights
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (all requires_grad=False); "
                         "apply an adapter or unfreeze some parameters")
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def _build_optimizer(model: nn.Module, config: TrainConfig, optimizer) -> torch.optim.Optimizer:
    if optimizer is None:
        return torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr,
                                 betas=config.betas, eps=config.eps)
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if callable(optimizer):  # a factory: optimizer(param_groups) -> Optimizer
        opt = optimizer(param_groups(model, config.weight_decay))
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"the optimizer factory returned {type(opt).__name__}, not a torch.optim.Optimizer")
        return opt
    raise TypeError("optimizer must be None (AdamW), a torch.optim.Optimizer, or a callable "
                    "param_groups -> Optimizer (e.g. functools.partial(torch.optim.SGD, lr=0.1))")


# ---------------------------------------------------------------------------- optimizer (de)serialization
def _to_json(x):
    if isinstance(x, tuple):
        return {"__tuple__": [_to_json(v) for v in x]}
    if isinstance(x, list):
        return [_to_json(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _to_json(v) for k, v in x.items()}
    if isinstance(x, torch.dtype):
        return {"__dtype__": str(x).removeprefix("torch.")}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"optimizer state holds a {type(x).__name__}, which cannot be stored without pickle")


def _from_json(x):
    if isinstance(x, dict):
        if "__tuple__" in x:
            return tuple(_from_json(v) for v in x["__tuple__"])
        if "__dtype__" in x:
            return getattr(torch, x["__dtype__"])
        return {k: _from_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_json(v) for v in x]
    return x


def optimizer_state_to_safetensors(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into tensors ("state.<param id>.<name>") and a JSON tree."""
    tensors, meta = {}, {"param_groups": _to_json(state_dict["param_groups"]), "state": {}}
    for pid, st in state_dict["state"].items():
        entry = {}
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = v.detach().cpu().contiguous().clone()
                entry[name] = {"__tensor__": f"state.{pid}.{name}"}
            else:
                entry[name] = _to_json(v)
        meta["state"][str(pid)] = entry
    return tensors, meta


def optimizer_state_from_safetensors(tensors: Mapping[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of `optimizer_state_to_safetensors`: a dict for `optimizer.load_state_dict`."""
    state = {}
    for pid, entry in meta["state"].items():
        state[int(pid)] = {name: (tensors[v["__tensor__"]] if isinstance(v, dict) and "__tensor__" in v
                                  else _from_json(v)) for name, v in entry.items()}
    return {"state": state, "param_groups": _from_json(meta["param_groups"])}


# ---------------------------------------------------------------------------- checkpoints
def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    meta = {"python": _to_json(random.getstate()), "numpy": [kind, int(pos), int(has_gauss), float(gauss)]}
    return tensors, meta


def _set_rng_state(tensors: Mapping[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len([k for k in tensors if k.startswith("cuda.")]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    random.setstate(_from_json(meta["python"]))
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint (`step_XXXXXXXX`) in the directory, or None."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return None
    done = sorted(p for p in d.glob("step_*") if p.is_dir() and (p / "trainer_state.json").is_file())
    return done[-1] if done else None


def save_checkpoint(checkpoint_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict, keep: int = 2) -> Path:
    """Write `checkpoint_dir/step_<step>` atomically: files go to a hidden temporary directory,
    which is fsynced then renamed into place; older checkpoints beyond `keep` are removed."""
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{trainer_state['step']:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))  # handles tied (shared) weights
    opt_tensors, opt_meta = optimizer_state_to_safetensors(optimizer.state_dict())
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng_tensors, rng_meta = _rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    for name, obj in (("optimizer.json", opt_meta), ("rng.json", rng_meta), ("trainer_state.json", trainer_state)):
        (tmp / name).write_text(json.dumps(obj, indent=1))
    for f in tmp.iterdir():  # flush file contents before the rename makes them visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # re-saving a step: move the old one aside first
        old = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)  # atomic: the checkpoint appears complete or not at all
    for stale in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(stale)
    return final


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True) -> dict:
    """Load a checkpoint written by `save_checkpoint` into `model` (and `optimizer`, RNGs);
    returns its trainer_state dict."""
    path = Path(path)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete training checkpoint (no trainer_state.json); "
                                "use latest_checkpoint(dir) to find one")
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing keys {missing[:10]}, "
                         f"unexpected keys {unexpected[:10]}; build the model with the same config and adapters")
    if optimizer is not None:
        meta = json.loads((path / "optimizer.json").read_text())
        optimizer.load_state_dict(optimizer_state_from_safetensors(load_file(str(path / "optimizer.safetensors")), meta))
    if restore_rng:
        _set_rng_state(load_file(str(path / "rng.safetensors")), json.loads((path / "rng.json").read_text()))
    return json.loads((path / "trainer_state.json").read_text())


# ---------------------------------------------------------------------------- the loop
_ORDER_FIELDS = ("batch_size", "grad_accum_steps", "seed", "shuffle", "drop_last")


def train(model: nn.Module, train_data, config: TrainConfig, *, loss_fn: LossFn | None = None,
          optimizer=None, eval_data=None, collate_fn=None) -> list[dict]:
    """Train `model` in place; returns the history, one dict per logged step
    ({"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", ...metrics},
    plus "eval_loss"/"eval_perplexity" on evaluation steps).

    train_data: a map-style data set (len, [i] -> dict of tensors) or a dict of tensors with
    a shared first dimension. optimizer: None (AdamW from the config, no decay on biases,
    norms and embeddings), an Optimizer instance (its per-group lr are the schedule's peaks),
    or a factory param_groups -> Optimizer.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    loss_fn = loss_fn or next_token_loss
    n = _data_len(train_data)
    per_epoch = _batches_per_epoch(n, config.batch_size, config.drop_last)
    if per_epoch == 0:
        raise ValueError(f"the training set has {n} examples, fewer than batch_size={config.batch_size} "
                         "with drop_last=True" if n else "the training set is empty")
    max_steps = config.max_steps or max(1, math.ceil(config.epochs * per_epoch / config.grad_accum_steps))
    device = torch.device(config.device) if config.device else _model_device(model)
    model.to(device)
    opt = _build_optimizer(model, config, optimizer)
    for g in opt.param_groups:
        g.setdefault("initial_lr", g["lr"])  # the schedule's peak for this group

    step, epoch, batch_in_epoch, tokens_seen, history = 0, 0, 0, 0.0, []
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
        tokens_seen, history = state["tokens_seen"], state["history"]

    def trainer_state() -> dict:
        return {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "num_examples": n,
                "tokens_seen": tokens_seen, "max_steps": max_steps, "config": config.to_dict(), "history": history}

    params = [p for g in opt.param_groups for p in g["params"]]
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if config.amp_dtype else None
    order = _epoch_order(n, config.seed, epoch, config.shuffle)
    bar = tqdm(total=max_steps, initial=step, disable=not config.progress, desc="train", dynamic_ncols=True)
    model.train()
    try:
        while step < max_steps:
            t0, loss_sum, tokens, metric_sums = time.perf_counter(), 0.0, 0.0, {}
            for g in opt.param_groups:  # warmup + cosine, relative to each group's peak
                g["lr"] = g["initial_lr"] * lr_at(step, lr=1.0, min_lr=config.min_lr / config.lr,
                                                   warmup_steps=config.warmup_steps, max_steps=max_steps)
            for micro in range(config.grad_accum_steps):
                if batch_in_epoch >= per_epoch:  # next epoch, next permutation
                    epoch, batch_in_epoch = epoch + 1, 0
                    order = _epoch_order(n, config.seed, epoch, config.shuffle)
                idx = order[batch_in_epoch * config.batch_size:(batch_in_epoch + 1) * config.batch_size]
                batch = _to_device(_make_batch(train_data, idx, collate_fn), device)
                batch_in_epoch += 1
                if amp is not None:
                    with amp:
                        loss, metrics = _call_loss(loss_fn, model, batch)
                else:
                    loss, metrics = _call_loss(loss_fn, model, batch)
                value = float(loss.detach())
                if not math.isfinite(value):
                    opt.zero_grad(set_to_none=True)
                    raise TrainingDiverged(_diverged_msg("loss", value, step + 1, micro, opt, config), step + 1)
                (loss / config.grad_accum_steps).backward()  # mean over micro-batches = big-batch mean
                loss_sum += value
                tokens += _num_tokens(batch, metrics)
                for k, v in metrics.items():
                    if k != "num_tokens":
                        metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
            grad_norm = float(nn.utils.clip_grad_norm_(params, config.grad_clip or float("inf")))
            if not math.isfinite(grad_norm):
                opt.zero_grad(set_to_none=True)
                raise TrainingDiverged(_diverged_msg("gradient norm", grad_norm, step + 1, None, opt, config), step + 1)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens
            dt = time.perf_counter() - t0
            entry = {"step": step, "epoch": epoch, "loss": loss_sum / config.grad_accum_steps,
                     "lr": opt.param_groups[0]["lr"], "grad_norm": grad_norm, "tokens": tokens_seen,
                     "tokens_per_s": tokens / max(dt, 1e-9)}
            entry.update({k: v / config.grad_accum_steps for k, v in metric_sums.items()})
            do_eval = eval_data is not None and (step == max_steps or (config.eval_every and step % config.eval_every == 0))
            if do_eval:
                ev = evaluate(model, eval_data, loss_fn, batch_size=config.batch_size, collate_fn=collate_fn,
                              max_batches=config.eval_batches, device=device)
                entry.update(eval_loss=ev["loss"], eval_perplexity=ev["perplexity"])
            if do_eval or step % config.log_every == 0 or step == max_steps:
                history.append(entry)
            bar.update(1)
            bar.set_postfix(loss=f"{entry['loss']:.4f}", tok_s=f"{entry['tokens_per_s']:.0f}")
            if config.checkpoint_dir and (step == max_steps or (config.checkpoint_every and step % config.checkpoint_every == 0)):
                save_checkpoint(config.checkpoint_dir, model, opt, trainer_state(), keep=config.keep_checkpoints)
    finally:
        bar.close()
    return history


def _diverged_msg(what: str, value: float, step: int, micro: int | None, opt, config: TrainConfig) -> str:
    where = f"step {step}" + (f" (micro-batch {micro})" if micro is not None else "")
    last = latest_checkpoint(config.checkpoint_dir) if config.checkpoint_dir else None
    kept = f"the last good checkpoint {last} is intact" if last else "no checkpoint was written"
    return (f"training diverged: {what} is {value} at {where}; the parameters were not updated and {kept}. "
            f"Lower the learning rate (lr={opt.param_groups[0]['lr']:.3g} now), enable or tighten gradient "
            f"clipping (grad_clip={config.grad_clip}), add warmup, or check the data and loss_fn.")
