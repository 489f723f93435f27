"""The one fine-tuning recipe: base model -> method -> train -> evaluate -> `Result`.

Every chapter's numbers come from `finetune(...)`, and so does the command line
(`python -m minituner finetune --method M --task T`); chapter 10's comparison is a loop over
it. A method is an entry in `METHODS` (name -> the technique's config class and `apply_*`
function, found through `protocol.TECHNIQUES`, and the recipe's defaults for it): a technique
file adds itself there and nothing else, so no chapter has a training script of its own.

    base model ──apply_<method>──> model with a trainable part ──train.train──> trained
        │                                                                       │
        └── before: zero-shot accuracy, held-out perplexity, fact recall ──────┴── after

Full fine-tuning is a method like the others: `minituner/full.py` (ULMFiT's discriminative
rates and gradual unfreezing); the recipe runs its stages.

Three tasks: `classify` (the day stories; accuracy), `instruct` (instruction tuning, sft.py:
exact match of greedy answers, seen and held-out instruction families apart) and `prefer`
(DPO or ORPO, dpo.py / orpo.py, from the base or from a saved SFT run: reward accuracy on
held-out pairs and the judge's win rate against the starting model).

Forgetting is measured on what pre-training taught: held-out corpus perplexity and fact
recall, before and after. With a technique that can be switched off (`disable_adapters`) the
base model comes back exactly, and the result says so.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from . import checkpoint, heads, protocol
from .data import ClassificationDataset, Collator, PackedLMDataset, pack_documents
from .evaluate import fact_recall
from .files import write_text
from .full import FullConfig, apply_full, discriminative_param_groups, layer_groups, unfreeze_top  # noqa: F401
from .tokenizer import Tokenizer
from .train import TrainConfig, evaluate, train
from .scoring import judge, normalize, win_rate
from .world import CLASS_NAMES, World

TASKS = ("classify", "instruct", "prefer")
LOSSES = ("dpo", "orpo")  # task "prefer"
TASK_OPTIONS = {  # run()'s task options: name -> (default, the tasks that read it)
    "pooling": ("last", ("classify",)),
    "template": ("alpaca", ("instruct", "prefer")),
    "packing": (False, ("instruct",)),
    "completion_only": (True, ("instruct",)),
    "loss": ("dpo", ("prefer",)),
    "beta": (0.1, ("prefer",)),
    "loss_type": ("sigmoid", ("prefer",)),
    "label_smoothing": (0.0, ("prefer",)),
    "rpo_alpha": (None, ("prefer",)),
    "start_from": (None, ("prefer",)),
}
METHOD_OPTIONS = {  # the command line's method options: dest -> the methods whose config reads it
    "placement": ("adapters",), "reduction_factor": ("adapters",),
    "r": ("lora", "qlora"), "alpha": ("lora", "qlora"), "rslora": ("lora", "qlora"),
    "target_modules": ("lora", "qlora"), "num_virtual_tokens": ("prefix", "prompt"),
    "lr_decay": ("full",), "gradual_unfreezing": ("full",),
}


class OptionError(ValueError):
    """An option that does not fit the method or task (the command line prints it as one line)."""

# Sentences the corpus itself ends its day stories with: the base model scores each class's
# sentence after the story, zero-shot (no training), for the "before" number.
ZERO_SHOT_VERBALIZERS = {"bad": "It was a bad day.", "neutral": "It was neither a good nor a bad day.",
                         "good": "It was a good day."}


# -- the registry of methods ----------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """How the recipe runs one technique: its defaults, and what it allows."""

    technique: str  # key of protocol.TECHNIQUES: the config class and apply function
    lr: float  # peak learning rate that works for it on the base model
    steps: int  # optimizer steps by default
    batch_size: int = 16
    disableable: bool = False  # disable_adapters gives the base model back exactly
    cached_features: bool = False  # the encoder runs once; the head trains on cached tensors

    def config_class(self) -> type:
        module, config_name, _ = protocol.TECHNIQUES[self.technique]
        return getattr(importlib.import_module(module), config_name)

    def apply(self, model: nn.Module, config: Any) -> nn.Module:
        module, _, apply_name = protocol.TECHNIQUES[self.technique]
        return getattr(importlib.import_module(module), apply_name)(model, config)


METHODS: dict[str, Method] = {
    # steps measured on the day stories (2,000 examples, mean pooling): adapters need ~900 to
    # converge (300: 0.680, 900: 0.823-0.845); full fine-tuning also gains (300: 0.845, 900: 0.862)
    "full": Method("full", lr=3e-4, steps=900),
    "head": Method("head", lr=3e-2, steps=600, batch_size=64, cached_features=True),
    "adapters": Method("adapters", lr=1e-2, steps=900, disableable=True),
    # LoRA r=8 on q/k/v/o, 2000 stories (held-out ppl 1.943): at 300 steps lr 1e-3 0.783 (ppl 5.07)
    # vs full 0.845 (6.90), 3e-3 0.798 but ppl 16.3 (forgets more), 1e-2 diverges; at 600 steps
    # (both) lr 1e-3 0.877 (ppl 6.88) vs full 0.838 (12.31): LoRA needs the steps, not a higher rate
    "lora": Method("lora", lr=1e-3, steps=600, disableable=True),
    # QLoRA is LoRA on an NF4 base, at the same rate and steps (300 steps: lr 1e-3 QLoRA 0.635,
    # LoRA 0.637; 3e-3 0.807 / 0.815)
    "qlora": Method("qlora", lr=1e-3, steps=600, disableable=True),
    # prefix (P=10 through the MLP; 2,000 stories, mean pooling): lr 3e-3 at 900 steps 0.553 (300:
    # 0.527); 1e-3: 0.475; 1e-2 diverges
    "prefix": Method("prefix", lr=3e-3, steps=900, disableable=True),
    "prompt": Method("prompt", lr=3e-2, steps=300, disableable=True),
}


def register(name: str, method: Method) -> None:
    """Add a method to the recipe (and so to `minituner finetune --method`)."""
    if method.technique not in protocol.TECHNIQUES:
        raise ValueError(f"technique {method.technique!r} is not in protocol.TECHNIQUES; add it there first")
    METHODS[name] = method


# -- the result ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Result:
    """One fine-tuning run, measured; `to_json` / `from_json` round-trip it."""

    method: str
    task: str
    metric: str  # the task metric's name ("accuracy")
    before: float | None  # the base model zero-shot (None where it cannot be scored)
    after: float  # the fine-tuned model
    majority: float  # always answering the most common training label
    trainable: int  # parameters that trained
    total: int  # parameters of the model (tied ones once)
    trainable_pct: float
    forgetting: dict  # held-out perplexity and fact recall before / after (/ disabled)
    memory: dict  # protocol.memory_bytes after training (weights, gradients, optimizer)
    bytes_per_param: float  # (weights + gradients + optimizer) / parameters
    wall_s: float  # the whole run, measuring included
    train_s: float  # the training loop (and feature extraction for cached features)
    tokens_per_s: float  # training tokens (real, not padding) per second of train_s
    steps: int
    n_train: int
    n_test: int
    seed: int
    config: dict  # the method's config
    train_config: dict
    history: list = field(default_factory=list, repr=False)  # per-step training log
    extra: dict = field(default_factory=dict)  # the task's other numbers (instruct: seen / held-out)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True, allow_nan=True) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Result":
        known = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(n for n in known - set(d) if n not in ("history", "extra"))
        if missing:
            raise ValueError(f"result is missing fields {missing}")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, text: str) -> "Result":
        return cls.from_dict(json.loads(text))

    HEADER = ("method", "before", "after", "trainable %", "ppl before", "ppl after", "facts after",
              "bytes/param", "train s", "tokens/s")

    def row(self) -> tuple:
        f = self.forgetting
        fmt = lambda x, p=3: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
        return (self.method, fmt(self.before), fmt(self.after), f"{self.trainable_pct:.2f}",
                fmt(f.get("perplexity_before"), 3), fmt(f.get("perplexity_after"), 3),
                fmt(f.get("fact_recall_after")), f"{self.bytes_per_param:.1f}",
                f"{self.train_s:.1f}", f"{self.tokens_per_s:.0f}")


def table(results: Sequence[Result], labels: Sequence[str] | None = None) -> str:
    """A Markdown table of results, one row each; `labels` name the rows (e.g. a setting)."""
    if labels is not None and len(labels) != len(results):
        raise ValueError(f"{len(labels)} labels for {len(results)} results")
    head = (("run",) if labels is not None else ()) + Result.HEADER
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(results):
        row = ((labels[i],) if labels is not None else ()) + r.row()
        lines.append("| " + " | ".join(map(str, row)) + " |")
    return "\n".join(lines)


# -- the base model and the task's data -------------------------------------------------------------
def default_base() -> Path:
    """The course's base model (weights/base; `checkpoint.find_base_model` says where it looks)."""
    return checkpoint.find_base_model()


def load_base(base: str | os.PathLike | None = None) -> tuple[nn.Module, Tokenizer]:
    """A base model directory (ours, or a Hugging Face GPT-2/Llama/BERT one) and its tokenizer."""
    if base is not None and not Path(base).is_dir():
        raise checkpoint.CheckpointError(f"base model directory {base} does not exist; check the path")
    d = checkpoint.find_base_model(base)  # a named directory must hold config.json
    hf = "model_type" in json.loads((d / "config.json").read_text())
    model = checkpoint.load_hf(d) if hf else checkpoint.load(d)
    if not (d / "tokenizer.json").is_file():
        raise checkpoint.CheckpointError(f"{d} holds no tokenizer.json; the recipe needs the base model's tokenizer")
    return model.float(), Tokenizer.load(d / "tokenizer.json")


@dataclass
class TaskData:
    """A classification task: examples, class names and the encoded data sets."""

    train: list[dict]
    test: list[dict]
    class_names: tuple[str, ...]
    world: World | None  # the world the examples come from (None for the user's own data)


def hold_out(examples: Sequence[Any]) -> tuple[list, list]:
    """(train, test) of a user's file read without --eval-data: every fifth example is held
    out, by position (deterministic, and stratified enough for data in any order)."""
    return [e for i, e in enumerate(examples) if i % 5], list(examples[::5])


def _read_user_split(read: Callable[[Any], list], data, eval_data, n_train, n_test) -> tuple[list, list, None]:
    """A user's JSONL read with `read`: (train, test, no world); test from `eval_data`, else held out."""
    train_ex = read(data)
    if eval_data is not None:
        test_ex = read(eval_data)
    else:
        train_ex, test_ex = hold_out(train_ex)
    return train_ex[:n_train], test_ex[:n_test], None


def classify_data(data: str | os.PathLike | None = None, eval_data: str | os.PathLike | None = None, *,
                  n_train: int | None = None, n_test: int | None = None, world_seed: int = 0) -> TaskData:
    """The world's day stories, or the user's JSONL of {"text", "label"} (labels read from it)."""
    if data is None:
        world = World(world_seed)
        return TaskData(world.classification("train", n_train), world.classification("test", n_test),
                        tuple(CLASS_NAMES), world)
    from .data import read_classification

    train_ex, names = read_classification(data)
    if eval_data is not None:
        test_ex, _ = read_classification(eval_data, class_names=names)
    else:
        train_ex, test_ex = hold_out(train_ex)
    return TaskData(train_ex[:n_train], test_ex[:n_test], tuple(names), None)


def encode(examples: Sequence[dict], tok: Tokenizer, model: nn.Module) -> ClassificationDataset:
    """Token ids of each text (cut to the model's context), as a ClassificationDataset."""
    return ClassificationDataset(examples, tok, max_length=model.config.block_size, overflow="truncate")


def majority_accuracy(train_ex: Sequence[dict], test_ex: Sequence[dict]) -> float:
    """Accuracy of always answering the most common training label."""
    top = Counter(e["label"] for e in train_ex).most_common(1)[0][0]
    return sum(e["label"] == top for e in test_ex) / len(test_ex)


@torch.no_grad()
def zero_shot_scores(model: nn.Module, tok: Tokenizer, examples: Sequence[dict],
                     verbalizers: Sequence[str], batch_size: int = 96) -> torch.Tensor:
    """(N, K) scores: the base model reads each text and scores each class's sentence after it,
    log p(sentence | text) = sum over the sentence's tokens of log p(x_t | x_<t). No training: the pre-training corpus ends
    some day stories with these very sentences. A text too long for the context loses its
    beginning, never the sentence. The class with the highest score is the answer."""
    model.eval()
    device = next(model.parameters()).device
    T = model.config.block_size
    verbs = [tok.encode(" " + v) for v in verbalizers]
    rows, spans = [], []
    for e in examples:
        text = tok.encode(e["text"], add_bos=True)
        for v in verbs:
            ids = (text + v)[-T:]
            rows.append(torch.tensor(ids))
            spans.append(len(v))
    scores = []
    for s in range(0, len(rows), batch_size):
        batch = rows[s:s + batch_size]
        ids = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True, padding_value=tok.pad_id).to(device)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in batch], batch_first=True).to(device)
        logp = torch.log_softmax(model(ids, attention_mask=mask)[:, :-1].float(), -1)  # (B, T-1, V)
        logp = logp.gather(2, ids[:, 1:, None]).squeeze(-1)  # (B, T-1): log p(x_t | x_<t)
        lengths = mask.sum(1)  # (B,)
        pos = torch.arange(ids.shape[1] - 1, device=device)  # target positions 0..T-2 predict x_1..x_{T-1}
        n = torch.tensor(spans[s:s + batch_size], device=device)
        in_sentence = (pos[None] >= (lengths - 1 - n)[:, None]) & (pos[None] < (lengths - 1)[:, None])
        scores.append((logp * in_sentence).sum(1).cpu())  # (B,) log p(sentence | text)
    return torch.cat(scores).view(len(examples), len(verbalizers))  # (N, K)


def zero_shot_accuracy(model: nn.Module, tok: Tokenizer, examples: Sequence[dict],
                       verbalizers: Sequence[str], batch_size: int = 96) -> float:
    """Accuracy of the class whose sentence the model finds most likely after the text."""
    scores = zero_shot_scores(model, tok, examples, verbalizers, batch_size)  # (N, K)
    gold = torch.tensor([e["label"] for e in examples])
    return float((scores.argmax(1) == gold).float().mean())


def _held_out_blocks(world: World, tok: Tokenizer, block_size: int, n_docs: int = 300) -> PackedLMDataset:
    return PackedLMDataset(pack_documents(world.corpus("val")[:n_docs], tok), block_size)


def forgetting_measures(model: nn.Module, tok: Tokenizer, world: World, block_size: int | None = None) -> dict:
    """What pre-training taught, measured: held-out corpus perplexity (on blocks of `block_size`
    tokens, default the model's context) and fact recall."""
    held = evaluate(model, _held_out_blocks(world, tok, block_size or model.config.block_size), batch_size=16)
    return {"perplexity": held["perplexity"], "fact_recall": fact_recall(model, tok, world)["mean"]}


_BASE_MEASURES: dict[tuple, dict] = {}


def _fingerprint(base: str | os.PathLike | None) -> tuple:
    weights = Path(base if base is not None else default_base()) / "model.safetensors"
    stat = weights.stat() if weights.exists() else None
    return (str(weights.resolve()), stat.st_size if stat else 0, stat.st_mtime_ns if stat else 0)


def _base_measures(key: tuple, compute: Callable[[], dict]) -> dict:
    """The base model's numbers are the same for every method: measured once per process, keyed
    by the weights file's path, size and modification time (a changed base is measured anew)."""
    if key not in _BASE_MEASURES:
        _BASE_MEASURES[key] = compute()
    return _BASE_MEASURES[key]


# -- training --------------------------------------------------------------------------------------
class _CountTokens:
    """A loss function that also counts the real tokens it saw (on the device: no host sync)."""

    def __init__(self, loss_fn: Callable) -> None:
        self.loss_fn, self.tokens = loss_fn, None

    def __call__(self, model: nn.Module, batch: dict):
        n = batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
        self.tokens = n if self.tokens is None else self.tokens + n
        return self.loss_fn(model, batch)

    @property
    def count(self) -> int:
        return int(self.tokens) if self.tokens is not None else 0


def _optimizer(params_or_groups, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params_or_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


def _train_classifier(model: nn.Module, ds, cfg: TrainConfig, pad_id: int, method: str,
                      config: Any) -> tuple[list[dict], torch.optim.Optimizer, int, int]:
    """Train through train.train; returns (history, the last optimizer, tokens seen, steps taken)."""
    counter = _CountTokens(heads.classification_loss)
    collate = Collator(pad_id)
    full = isinstance(config, FullConfig)
    if full and config.gradual_unfreezing:  # ULMFiT Sec. 3.3: stage s trains the top s groups
        groups = layer_groups(model)
        history, per_stage = [], max(1, cfg.max_steps // len(groups))
        for stage in range(1, len(groups) + 1):
            unfreeze_top(model, stage)  # the top `stage` groups train
            stage_cfg = dataclasses.replace(cfg, max_steps=per_stage,
                                            seed=None if cfg.seed is None else cfg.seed + stage)
            opt = _optimizer(_groups(model, cfg, config), stage_cfg)
            for h in train(model, ds, stage_cfg, loss_fn=counter, optimizer=opt, collate_fn=collate):
                history.append({**h, "step": len(history) + 1, "stage": stage})
        return history, opt, counter.count, per_stage * len(groups)  # stages round the steps down
    opt = _optimizer(_groups(model, cfg, config), cfg)
    history = train(model, ds, cfg, loss_fn=counter, optimizer=opt, collate_fn=collate)
    return history, opt, counter.count, cfg.max_steps


def _groups(model: nn.Module, cfg: TrainConfig, config: Any) -> list[dict]:
    if isinstance(config, FullConfig) and config.lr_decay is not None:
        return discriminative_param_groups(model, cfg.lr, config.lr_decay, cfg.weight_decay)
    return [{"params": list(protocol.trainable_parameters(model)), "lr": cfg.lr}]


def _train_head_on_features(model: nn.Module, ds_train, ds_test, cfg: TrainConfig, pad_id: int,
                            progress: bool) -> tuple[list[dict], torch.optim.Optimizer, float, int, float]:
    """Feature extraction: the frozen encoder runs once over each split; the head trains on the
    cached (N, C) features through the same loop, then is scored on the test features."""
    pooling = model.head.pooling
    t0 = time.perf_counter()
    f_train, y_train = heads.extract_features(model, ds_train, pooling, pad_id=pad_id, progress=progress)
    opt = _optimizer(model.head.parameters(), cfg)
    history = train(model.head, heads.FeatureDataset(f_train, y_train), cfg,
                    loss_fn=heads.feature_loss, optimizer=opt)
    train_s = time.perf_counter() - t0  # extraction of the training split + the head's steps
    f_test, y_test = heads.extract_features(model, ds_test, pooling, pad_id=pad_id, progress=progress)
    with torch.no_grad():
        model.head.eval()
        acc = float((model.head(f_test).argmax(-1) == y_test).float().mean())
    tokens = cfg.max_steps * cfg.batch_size * sum(len(x["input_ids"]) for x in ds_train) // len(ds_train)  # examples seen x mean length
    return history, opt, acc, tokens, train_s


# -- the recipe ------------------------------------------------------------------------------------
@dataclass
class Run:
    """What `run` returns: the measured result, and the trained model with its tokenizer."""

    result: Result
    model: nn.Module
    tokenizer: Tokenizer


def run(method: str = "adapters", task: str = "classify", *, base: str | os.PathLike | None = None,
        config: Any = None, steps: int | None = None, lr: float | None = None,
        batch_size: int | None = None, seed: int = 0, n_train: int | None = None,
        n_test: int | None = None, pooling: str = "last", data: str | os.PathLike | None = None,
        eval_data: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
        measure_forgetting: bool = True, progress: bool = True, template: str = "alpaca",
        packing: bool = False, completion_only: bool = True, loss: str = "dpo", beta: float = 0.1,
        loss_type: str = "sigmoid", label_smoothing: float = 0.0, rpo_alpha: float | None = None,
        start_from: str | os.PathLike | None = None, **train_kwargs: Any) -> Run:
    """Fine-tune the base model with `method` on `task` and measure it; see the module docstring.

    `config` is the method's config (default: its defaults); `steps`, `lr` and `batch_size`
    override the recipe's defaults (the method's; per task in `TASK_DEFAULTS`); other keyword
    arguments go to `TrainConfig`. With `out`, the trained tensors (`protocol.save_adapter`)
    and result.json are written there.

    Task "instruct" (`sft.py`): `template` ("alpaca" | "chat"), `packing` and
    `completion_only` (False: the loss on the prompt too); `data` is an
    Alpaca or chat-messages JSONL. Task "prefer": `loss` ("dpo" | "orpo") with `beta`, DPO's
    `loss_type` ("sigmoid" | "hinge" | "ipo"), `label_smoothing` (cDPO) and `rpo_alpha` (+ the
    chosen answers' NLL, Pang 2024);
    `start_from` is a directory the recipe wrote (`out`) to start from, e.g. an SFT run;
    `data` is a preference JSONL. See `_run_instruct` and `_run_prefer`.
    """
    start = time.perf_counter()
    if method not in METHODS:
        raise OptionError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    if task not in TASKS:
        raise OptionError(f"unknown task {task!r}; choose one of {list(TASKS)}")
    given = dict(pooling=pooling, template=template, packing=packing, completion_only=completion_only,
                 loss=loss, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                 rpo_alpha=rpo_alpha, start_from=start_from)
    unused = [f"{k}={v!r} ({'/'.join(TASK_OPTIONS[k][1])} only)" for k, v in given.items()
              if task not in TASK_OPTIONS[k][1] and v != TASK_OPTIONS[k][0]]
    if unused:  # an option the task would ignore is a run the user did not ask for
        raise OptionError(f"task {task!r} does not use {', '.join(unused)}; drop them or choose their task")
    if eval_data is not None and data is None:  # the world's test split would be used instead
        raise OptionError(f"eval_data={str(eval_data)!r} is read only with data (your training JSONL); "
                          "pass data too, or drop eval_data to evaluate on the world's test split")
    if task != "classify":
        if method == "head":
            raise OptionError(f"method 'head' trains a classification head; task {task!r} generates "
                              "text: choose full, lora, adapters, ...")
        runner = _run_instruct if task == "instruct" else _run_prefer
        return runner(method, base=base, config=config, steps=steps, lr=lr, batch_size=batch_size,
                      seed=seed, n_train=n_train, n_test=n_test, data=data, eval_data=eval_data, out=out,
                      measure_forgetting=measure_forgetting, progress=progress, template=template,
                      packing=packing, completion_only=completion_only, loss=loss, beta=beta,
                      loss_type=loss_type, label_smoothing=label_smoothing, rpo_alpha=rpo_alpha,
                      start_from=start_from, start=start,
                      train_kwargs=train_kwargs)
    spec = METHODS[method]
    torch.manual_seed(seed)
    model, tok = load_base(base)
    task_data = classify_data(data, eval_data, n_train=n_train, n_test=n_test)
    K = len(task_data.class_names)
    config_cls = spec.config_class()
    if config is None:
        config = heads.HeadConfig(num_classes=K, pooling=pooling) if method == "head" else config_cls()
    if not isinstance(config, config_cls):
        raise TypeError(f"method {method!r} takes a {config_cls.__name__}, got {type(config).__name__}")
    if method == "head" and config.num_classes != K:
        raise ValueError(f"HeadConfig(num_classes={config.num_classes}) but the task has {K} classes "
                         f"{task_data.class_names}; pass num_classes={K}")
    ds_train, ds_test = encode(task_data.train, tok, model), encode(task_data.test, tok, model)
    causal, world = model.config.causal, task_data.world

    # before: the base model, untouched
    key = (*_fingerprint(base), len(task_data.test), task_data.class_names, world is not None)
    before_zero_shot = None
    if causal and world is not None:
        verbalizers = [ZERO_SHOT_VERBALIZERS[c] for c in task_data.class_names]
        before_zero_shot = _base_measures(key + ("zero_shot",), lambda: {"acc": zero_shot_accuracy(
            model, tok, task_data.test, verbalizers)})["acc"]
    measure = measure_forgetting and causal and world is not None
    # a soft prompt's virtual tokens take positions too: every perplexity of this run (before,
    # after, disabled) reads blocks that leave room for them, so the three stay comparable
    room = model.config.block_size - (config.num_virtual_tokens if spec.technique == "prompt" else 0)
    base_forgetting = _base_measures(key + ("forgetting", room), lambda: forgetting_measures(
        model, tok, world, room)) if measure else None

    # the method
    if method == "head":
        model = heads.apply_head(model, config)
    else:
        model, _ = _apply(method, model, config)
        heads.add_head(model, heads.HeadConfig(num_classes=K, pooling=pooling))
    trainable, total = protocol.count_parameters(model)
    cfg = TrainConfig(max_steps=steps or spec.steps, batch_size=batch_size or spec.batch_size,
                      lr=lr or spec.lr, warmup_steps=max(1, (steps or spec.steps) // 10), seed=seed,
                      progress=progress, **train_kwargs)

    t0 = time.perf_counter()
    steps_taken = cfg.max_steps
    if spec.cached_features:
        history, opt, after, tokens, train_s = _train_head_on_features(model, ds_train, ds_test, cfg,
                                                                       tok.pad_id, progress)
    else:
        model.train()
        history, opt, tokens, steps_taken = _train_classifier(model, ds_train, cfg, tok.pad_id, method, config)
        train_s = time.perf_counter() - t0
        after = heads.accuracy(model, ds_test, tok.pad_id, progress=progress)

    forgetting: dict = {}
    if measure:
        now = forgetting_measures(model, tok, world, room)
        forgetting = {"perplexity_before": base_forgetting["perplexity"], "perplexity_after": now["perplexity"],
                      "fact_recall_before": base_forgetting["fact_recall"], "fact_recall_after": now["fact_recall"]}
        if spec.disableable:
            with protocol.disable_adapters(model):
                off = forgetting_measures(model, tok, world, room)
            forgetting.update(perplexity_disabled=off["perplexity"], fact_recall_disabled=off["fact_recall"])
    memory = protocol.memory_bytes(model, opt)
    result = Result(
        method=method, task=task, metric="accuracy", before=before_zero_shot, after=after,
        majority=majority_accuracy(task_data.train, task_data.test), trainable=trainable, total=total,
        trainable_pct=100.0 * trainable / total, forgetting=forgetting, memory=memory,
        bytes_per_param=memory["total_per_param"], wall_s=time.perf_counter() - start, train_s=train_s,
        tokens_per_s=tokens / max(train_s, 1e-9), steps=steps_taken, n_train=len(task_data.train),
        n_test=len(task_data.test), seed=seed, config=_plain(dataclasses.asdict(config)),
        train_config=_plain(cfg.to_dict()), history=[_plain(h) for h in history])
    if out is not None:
        protocol.save_adapter(model, out)
        write_text(Path(out) / "result.json", result.to_json())
    return Run(result, model.eval(), tok)


# -- the generative tasks: instruct (SFT) and prefer (DPO / ORPO) -----------------------------------
# Recipe defaults per (task, method) where they differ from the method's classification ones:
# generating answers needs more steps than a classification head, and LoRA a higher rate.
TASK_DEFAULTS: dict[tuple[str, str], dict] = {
    ("instruct", "full"): {"lr": 5e-4, "steps": 300},
    ("instruct", "lora"): {"lr": 3e-3, "steps": 300},
    ("instruct", "adapters"): {"lr": 3e-3, "steps": 300},
    ("prefer", "full"): {"lr": 1e-5, "steps": 100, "batch_size": 8},
    ("prefer", "lora"): {"lr": 5e-4, "steps": 100, "batch_size": 8},
}


def _balanced(examples: Sequence[dict], n: int | None) -> list[dict]:
    """The first n examples taking each family in turn (the world lists them by family)."""
    if n is None:
        return list(examples)
    by: dict[str, list[dict]] = {}
    for e in examples:
        by.setdefault(e.get("family", ""), []).append(e)
    out, k = [], 0
    while len(out) < min(n, len(examples)):
        out += [v[k] for v in by.values() if k < len(v)][:n - len(out)]
        k += 1
    return out


def instruct_data(data: str | os.PathLike | None = None, eval_data: str | os.PathLike | None = None, *,
                  n_train: int | None = None, n_test: int | None = None,
                  world_seed: int = 0) -> tuple[list[dict], list[dict], World | None]:
    """(train, test, world): the world's instruction families (test holds the two held-out
    ones), or an Alpaca / chat-messages JSONL (read by its first line's fields; every fifth
    example held out unless `eval_data` is given)."""
    if data is None:
        world = World(world_seed)
        return (_balanced(world.instructions("train"), n_train), _balanced(world.instructions("test"), n_test),
                world)
    from .data import _lines, read_alpaca, read_chat

    read = lambda p: read_chat(p) if "messages" in _lines(p)[0][1] else read_alpaca(p)  # noqa: E731
    return _read_user_split(read, data, eval_data, n_train, n_test)


def _task_train_config(task: str, method: str, steps, lr, batch_size, seed, progress, train_kwargs) -> TrainConfig:
    spec, d = METHODS[method], TASK_DEFAULTS.get((task, method), {})
    n = steps or d.get("steps", spec.steps)
    return TrainConfig(max_steps=n, batch_size=batch_size or d.get("batch_size", spec.batch_size),
                       lr=lr or d.get("lr", spec.lr), warmup_steps=max(1, n // 10), seed=seed,
                       progress=progress, **train_kwargs)


def _apply(method: str, model: nn.Module, config: Any) -> tuple[nn.Module, Any]:
    spec = METHODS[method]
    config_cls = spec.config_class()
    config = config_cls() if config is None else config
    if not isinstance(config, config_cls):
        raise TypeError(f"method {method!r} takes a {config_cls.__name__}, got {type(config).__name__}")
    try:
        return spec.apply(model, config), config
    except ValueError as e:  # the config does not fit this model (no module matches, no bottleneck, ...)
        raise OptionError(str(e)) from e


def _forgetting(model, tok, world, base_measures, disableable: bool) -> dict:
    now = forgetting_measures(model, tok, world)
    out = {"perplexity_before": base_measures["perplexity"], "perplexity_after": now["perplexity"],
           "fact_recall_before": base_measures["fact_recall"], "fact_recall_after": now["fact_recall"]}
    if disableable:
        with protocol.disable_adapters(model):
            off = forgetting_measures(model, tok, world)
        out.update(perplexity_disabled=off["perplexity"], fact_recall_disabled=off["fact_recall"])
    return out


def _finish(run_: Run, out) -> Run:
    if out is not None:
        protocol.save_adapter(run_.model, out)
        write_text(Path(out) / "result.json", run_.result.to_json())
    return run_


def _run_instruct(method: str, *, base, config, steps, lr, batch_size, seed, n_train, n_test, data,
                  eval_data, out, measure_forgetting, progress, template, packing, completion_only, start,
                  train_kwargs, **_: Any) -> Run:
    """Instruction tuning (sft.py): L_SFT on the answers of the training instructions; the
    metric is exact match of greedy answers on the test instructions, before (the base model)
    and after, overall and in `extra` for the seen and the two held-out families (FLAN's
    question: does instruction tuning help on instructions never seen in training?)."""
    from . import sft

    torch.manual_seed(seed)
    model, tok = load_base(base)
    train_ex, test_ex, world = instruct_data(data, eval_data, n_train=n_train, n_test=n_test)
    key = (*_fingerprint(base), "instruct", template, tuple(sft.prompt_of(e, template) for e in test_ex))
    score = lambda m: sft.exact_match(m, tok, test_ex, template, progress=progress)  # noqa: E731
    before = dict(_base_measures(key, lambda: score(model)))
    measure = measure_forgetting and world is not None
    base_forgetting = _base_measures(key[:3] + ("forgetting",), lambda: forgetting_measures(model, tok, world)) \
        if measure else None

    model, config = _apply(method, model, config)
    trainable, total = protocol.count_parameters(model)
    cfg = _task_train_config("instruct", method, steps, lr, batch_size, seed, progress, train_kwargs)
    ds = sft.sft_dataset(train_ex, tok, model.config.block_size, template, packing=packing,
                         completion_only=completion_only)
    counter = _CountTokens(sft.sft_loss)
    t0 = time.perf_counter()
    model.train()
    opt = _optimizer(_groups(model, cfg, config), cfg)
    history = train(model, ds, cfg, loss_fn=counter, optimizer=opt, collate_fn=Collator(tok.pad_id))
    train_s = time.perf_counter() - t0
    after = score(model)

    forgetting = _forgetting(model, tok, world, base_forgetting, METHODS[method].disableable) if measure else {}
    top = Counter(sft.reference_of(e) for e in train_ex).most_common(1)[0][0]
    majority = sum(normalize(sft.reference_of(e)) == normalize(top) for e in test_ex) / len(test_ex)
    extra = {"template": template, "packing": packing, "completion_only": completion_only, "n_rows": len(ds),
             "seen_before": before["seen"], "seen_after": after["seen"],
             "held_out_before": before["held_out"], "held_out_after": after["held_out"],
             "by_family_before": before["by_family"], "by_family_after": after["by_family"],
             "answers_after": after["answers"][:20]}
    memory = protocol.memory_bytes(model, opt)
    result = Result(
        method=method, task="instruct", metric="exact_match", before=before["exact_match"],
        after=after["exact_match"], majority=majority, trainable=trainable, total=total,
        trainable_pct=100.0 * trainable / total, forgetting=forgetting, memory=memory,
        bytes_per_param=memory["total_per_param"], wall_s=time.perf_counter() - start, train_s=train_s,
        tokens_per_s=counter.count / max(train_s, 1e-9), steps=cfg.max_steps, n_train=len(train_ex),
        n_test=len(test_ex), seed=seed, config=_plain(dataclasses.asdict(config)),
        train_config=_plain(cfg.to_dict()), history=[_plain(h) for h in history], extra=_plain(extra))
    return _finish(Run(result, model.eval(), tok), out)


def prefer_data(data: str | os.PathLike | None = None, eval_data: str | os.PathLike | None = None, *,
                n_train: int | None = None, n_test: int | None = None, template: str = "alpaca",
                world_seed: int = 0) -> tuple[list[dict], list[dict], World | None]:
    """(train, test, world): the world's preference pairs (test: held-out prompts and the two
    held-out families), or a preference JSONL {"prompt", "chosen", "rejected"} (every fifth
    pair held out unless `eval_data` is given)."""
    if data is None:
        world = World(world_seed)
        return (_balanced(world.preferences("train", template=template), n_train),
                _balanced(world.preferences("test", template=template), n_test), world)
    from .data import read_preferences

    return _read_user_split(read_preferences, data, eval_data, n_train, n_test)


@torch.no_grad()
def pair_logprobs(model: nn.Module, ds, pad_id: int, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Summed completion log-probs of every pair of a preference data set, and their token
    counts: {"chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens"}, each (N,)."""
    from .logprobs import concatenated_logprobs

    model.eval()
    device = next(model.parameters()).device
    collate, parts = Collator(pad_id), []
    for s in range(0, len(ds), batch_size):
        batch = collate([ds[i] for i in range(s, min(s + batch_size, len(ds)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        parts.append({k: v.float().cpu() for k, v in concatenated_logprobs(model, batch, pad_id=pad_id).items()})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def reward_accuracy(policy: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor] | None = None) -> float:
    """Share of pairs whose chosen answer earns the higher reward: DPO's implicit reward
    r = beta (log pi(y|x) - log pi_ref(y|x)) given a reference (beta > 0 does not change the
    order), else ORPO's, the length-averaged log pi(y|x) (TRL logs both so). A tie is a loss."""
    if reference is not None:
        margin = (policy["chosen_logps"] - reference["chosen_logps"]) - \
            (policy["rejected_logps"] - reference["rejected_logps"])  # (N,)
    else:
        margin = policy["chosen_logps"] / policy["chosen_tokens"].clamp(min=1) - \
            policy["rejected_logps"] / policy["rejected_tokens"].clamp(min=1)  # (N,)
    return float((margin > 0).float().mean())


def _start_model(method: str, base, start_from) -> tuple[nn.Module, Tokenizer, bool]:
    """The model preference tuning starts from: the base, or base + a recipe run's saved
    tensors (`start_from`). Returns (model, tok, continue_training): True when the saved run
    used `method` itself, whose tensors then keep training (TRL's DPO from an SFT adapter)."""
    model, tok = load_base(base)
    if start_from is None:
        return model, tok, False
    d = Path(start_from)
    if not (d / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--from {d}: no adapter_config.json there; pass a directory the recipe "
                                "wrote with --out (e.g. from --task instruct)")
    techniques = [t["technique"] for t in json.loads((d / "adapter_config.json").read_text())["techniques"]]
    same = techniques == [METHODS[method].technique]
    if not same and techniques != ["full"]:
        raise ValueError(f"--from {d} holds a {'+'.join(techniques)} run; preference tuning with "
                         f"--method {method} can start from a full fine-tuning run or a {method} run")
    if same:
        return protocol.load_adapter(model, d), tok, True
    # full SFT weights are the new, frozen base and the method applies on top; --out then carries
    # them along (start/), so that loading the result onto the plain base model gives this model
    return protocol.load_as_base(model, d), tok, False


def _run_prefer(method: str, *, base, config, steps, lr, batch_size, seed, n_train, n_test, data,
                eval_data, out, measure_forgetting, progress, template, loss, beta, loss_type, label_smoothing,
                start_from, start, train_kwargs, rpo_alpha=None, **_: Any) -> Run:
    """Preference tuning (dpo.py, orpo.py) from the base or from a saved run (an SFT model).

    DPO's reference is the starting model: the policy's base under `disable_adapters` when a
    fresh adapter trains on it (no second copy of the weights), log-probs precomputed once for
    full fine-tuning, and a frozen copy when the starting run's own adapter keeps training.
    The metric is reward accuracy on the held-out pairs (`reward_accuracy`; "before" is the
    starting model's for ORPO, and None for DPO, whose rewards all start at 0). `extra` adds
    the judge's win rate of the tuned model's greedy answers against the starting model's (a
    tie counts one half), split by the kind of rejected answer (wrong / verbose), the win rate
    against the rejected answers, and the first step's loss (ln 2 for DPO)."""
    import copy
    import functools

    from . import sft
    from .data import PreferenceDataset
    from .dpo import dpo_step_loss, with_reference_logps
    from .evaluate import complete
    from .orpo import orpo_step_loss

    if loss not in LOSSES:
        raise OptionError(f"unknown loss {loss!r}; choose one of {list(LOSSES)}")
    if loss != "dpo" and (loss_type != "sigmoid" or label_smoothing or rpo_alpha is not None):
        raise OptionError(f"loss_type={loss_type!r} / label_smoothing={label_smoothing} / rpo_alpha={rpo_alpha} "
                          f"are DPO's; --loss {loss} has none of them (ORPO has its own NLL term)")
    torch.manual_seed(seed)
    model, tok, keep_training = _start_model(method, base, start_from)
    train_ex, test_ex, world = prefer_data(data, eval_data, n_train=n_train, n_test=n_test, template=template)
    T, collate = model.config.block_size, Collator(tok.pad_id)
    # the answers as words of running text (" 66", not "6" "6"), as the SFT model learned them (sft.as_word)
    words = lambda ex: sft.answers_as_words(ex, keys=("chosen", "rejected"))  # noqa: E731
    ds_train = PreferenceDataset(words(train_ex), tok, max_length=T, overflow="drop")
    ds_test = PreferenceDataset(words(test_ex), tok, max_length=T)  # every test pair, or an error naming it
    prompts = [e["prompt"] for e in test_ex]
    greedy = lambda m: [sft.from_word(a) for a in complete(m, tok, prompts, progress=progress)]  # noqa: E731

    # the starting model, measured (it is also DPO's reference)
    answers_start = greedy(model)
    start_logps = pair_logprobs(model, ds_test, tok.pad_id)
    measure = measure_forgetting and world is not None
    start_forgetting = forgetting_measures(model, tok, world) if measure else None

    reference = None
    if keep_training:  # the saved run's tensors train on from where they are
        config = protocol.applied(model)[0]["config"]
        if any(isinstance(m, protocol.Injected) for m in model.modules()):  # disabling gives the base,
            reference = protocol.freeze(copy.deepcopy(model)).eval()  # not the start: a frozen copy
    else:
        model, config = _apply(method, model, config)
        config = dataclasses.asdict(config)
    has_adapters = any(isinstance(m, protocol.Injected) for m in model.modules())
    train_items = ds_train
    if loss == "dpo" and reference is None and not has_adapters:  # full: reference log-probs, once
        train_items = with_reference_logps(model, ds_train, collate, batch_size=16)
    if loss == "dpo":
        step_loss = functools.partial(dpo_step_loss, beta=beta, loss_type=loss_type,
                                      label_smoothing=label_smoothing, reference=reference, pad_id=tok.pad_id,
                                      rpo_alpha=rpo_alpha)
    else:
        step_loss = functools.partial(orpo_step_loss, beta=beta, pad_id=tok.pad_id)
    tokens: list[torch.Tensor] = []

    def counted(m: nn.Module, batch: dict):
        tokens.append(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
        return step_loss(m, batch)

    trainable, total = protocol.count_parameters(model)
    cfg = _task_train_config("prefer", method, steps, lr, batch_size, seed, progress, train_kwargs)
    t0 = time.perf_counter()
    model.train()
    opt = _optimizer(protocol.trainable_parameters(model), cfg)
    history = train(model, train_items, cfg, loss_fn=counted, optimizer=opt, collate_fn=collate)
    train_s = time.perf_counter() - t0

    after_logps = pair_logprobs(model, ds_test, tok.pad_id)
    after = reward_accuracy(after_logps, start_logps if loss == "dpo" else None)
    before = None if loss == "dpo" else reward_accuracy(start_logps)
    answers = greedy(model)
    refs = [{"chosen": e["chosen"]} for e in test_ex]
    extra = {"loss": loss, "beta": beta, "loss_type": loss_type if loss == "dpo" else None,
             "label_smoothing": label_smoothing, "rpo_alpha": rpo_alpha,
             "start_from": None if start_from is None else str(start_from),
             "first_loss": history[0]["loss"] if history else None,
             "win_rate_vs_start": win_rate(answers, refs, against=answers_start),
             "win_rate_vs_rejected": win_rate(answers, test_ex),
             "judge_start": sum(judge(a, e["chosen"]) for a, e in zip(answers_start, test_ex)) / len(test_ex),
             "judge_after": sum(judge(a, e["chosen"]) for a, e in zip(answers, test_ex)) / len(test_ex),
             "answers_start": answers_start[:20], "answers_after": answers[:20]}
    for kind in ("wrong", "verbose"):  # which kind of rejected answer the pair taught against
        idx = [i for i, e in enumerate(test_ex) if e.get("reason", "").startswith(kind)]
        if idx:
            extra[f"win_rate_vs_start_{kind}"] = win_rate([answers[i] for i in idx], [refs[i] for i in idx],
                                                          against=[answers_start[i] for i in idx])
    forgetting = _forgetting(model, tok, world, start_forgetting, False) if measure else {}
    if forgetting:  # measured against the starting model, which may be an SFT model
        forgetting = {k.replace("_before", "_start"): v for k, v in forgetting.items()}
    memory = protocol.memory_bytes(model, opt)
    n_tokens = int(torch.stack(tokens).sum()) if tokens else 0
    result = Result(
        method=method, task="prefer", metric="reward_accuracy", before=before, after=after, majority=0.5,
        trainable=trainable, total=total, trainable_pct=100.0 * trainable / total, forgetting=forgetting,
        memory=memory, bytes_per_param=memory["total_per_param"], wall_s=time.perf_counter() - start,
        train_s=train_s, tokens_per_s=n_tokens / max(train_s, 1e-9), steps=cfg.max_steps,
        n_train=len(ds_train), n_test=len(ds_test), seed=seed, config=_plain(config),
        train_config=_plain(cfg.to_dict()), history=[_plain(h) for h in history], extra=_plain(extra))
    return _finish(Run(result, model.eval(), tok), out)


def finetune(method: str = "adapters", task: str = "classify", **kwargs: Any) -> Result:
    """`run(...)`'s measured `Result` (see `run` for the arguments)."""
    return run(method, task, **kwargs).result


def _plain(x: Any) -> Any:
    """JSON-friendly copy of a history entry (tensors to numbers)."""
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# -- the command line: `python -m minituner finetune` ---------------------------------------------
def add_arguments(parser, number: Callable | None = None) -> None:
    """The `finetune` subcommand's options (argparse). `number(kind, low, ...)` makes an
    argument type that rejects out-of-range values while parsing (the CLI's)."""
    count = number(int, 1, name="N") if number else int
    rate = number(float, 0, low_open=True, name="LR") if number else float
    parser.add_argument("--method", choices=sorted(METHODS), default="adapters", help="the technique")
    parser.add_argument("--task", choices=TASKS, default="classify", help="the task to fine-tune on")
    parser.add_argument("--base", default=None, metavar="DIR",
                        help="base model directory (default: the course's base model, as for generate --weights)")
    parser.add_argument("--data", default=None,
                        help='your own JSONL instead of the world\'s task: classify {"text", "label"}; instruct '
                             'Alpaca {"instruction", "input", "output"} or chat {"messages"}; prefer '
                             '{"prompt", "chosen", "rejected"}')
    parser.add_argument("--eval-data", default=None, help="JSONL to evaluate on (default: every 5th line of --data)")
    parser.add_argument("--steps", type=count, default=None, help="optimizer steps (default: the method's)")
    parser.add_argument("--lr", type=rate, default=None, help="peak learning rate (default: the method's)")
    parser.add_argument("--batch-size", type=count, default=None, help="examples per step (default: the method's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order")
    parser.add_argument("--n-train", type=count, default=None, help="use the first N training examples")
    parser.add_argument("--n-test", type=count, default=None, help="use the first N test examples")
    parser.add_argument("--pooling", choices=("last", "mean", "first"), default="last",
                        help="how the head reads the hidden states")
    parser.add_argument("--placement", choices=("houlsby", "pfeiffer"), default="houlsby", help="adapters")
    parser.add_argument("--reduction-factor", type=count, default=16, help="adapters: bottleneck m = d / this")
    parser.add_argument("--r", type=count, default=8, help="lora: rank r of the update B A")
    parser.add_argument("--alpha", type=rate, default=16, help="lora: the update is scaled by alpha / r")
    parser.add_argument("--rslora", action="store_true",
                        help="lora: scale by alpha / sqrt(r) instead (rank-stabilized LoRA, Kalajdzievski 2023)")
    parser.add_argument("--target-modules", nargs="+", default=["q_proj", "v_proj"],
                        help="lora: module names (or one regular expression) to adapt")
    parser.add_argument("--num-virtual-tokens", type=count, default=None,
                        help="prompt, prefix: virtual tokens (default: the technique's)")
    parser.add_argument("--lr-decay", type=rate, default=None,
                        help="full: ULMFiT discriminative rates, eta^(l-1) = eta^l / this (2.6)")
    parser.add_argument("--gradual-unfreezing", action="store_true", help="full: ULMFiT gradual unfreezing")
    parser.add_argument("--template", choices=("alpaca", "chat"), default="alpaca",
                        help="instruct, prefer: the prompt template")
    parser.add_argument("--packing", action="store_true",
                        help="instruct: pack several examples per row (block-diagonal attention)")
    parser.add_argument("--loss", choices=LOSSES, default="dpo", help="prefer: the preference loss")
    parser.add_argument("--beta", type=rate, default=0.1, help="prefer: DPO's / ORPO's beta")
    parser.add_argument("--loss-type", choices=("sigmoid", "hinge", "ipo"), default="sigmoid",
                        help="prefer, dpo: sigmoid (DPO Eq. 7), hinge (SLiC), ipo (IPO, length-averaged)")
    parser.add_argument("--label-smoothing", type=float, default=0.0,
                        help="prefer, dpo sigmoid: cDPO's assumed fraction of flipped labels, in [0, 0.5)")
    parser.add_argument("--rpo-alpha", type=float, default=None,
                        help="prefer, dpo: add this times the chosen answers' NLL per token (Pang 2024; TRL's rpo_alpha)")
    parser.add_argument("--from", dest="start_from", default=None, metavar="DIR",
                        help="prefer: start from a run saved with --out (e.g. --task instruct)")
    parser.add_argument("--no-forgetting", action="store_true", help="skip the perplexity/fact-recall measures")
    parser.add_argument("--out", default=None, help="write the trained tensors and result.json here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args) -> Any:
    """The method's config from the command line's options; another method's option, set to
    anything but its default, is an error rather than silently ignored."""
    import argparse

    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    defaults = vars(defaults.parse_args([]))
    unused = [f"--{k.replace('_', '-')} ({'/'.join(ms)} only)" for k, ms in METHOD_OPTIONS.items()
              if args.method not in ms and getattr(args, k) != defaults[k]]
    if unused:
        raise OptionError(f"--method {args.method} does not use {', '.join(unused)}; drop them or choose their method")
    try:
        return _config_from_args(args)
    except ValueError as e:  # the config's own check, e.g. a reduction factor wider than the model
        raise OptionError(str(e)) from e


def _config_from_args(args) -> Any:
    if args.method == "full":
        return FullConfig(lr_decay=args.lr_decay, gradual_unfreezing=args.gradual_unfreezing)
    if args.method == "adapters":
        from .adapters import AdapterConfig

        return AdapterConfig(placement=args.placement, reduction_factor=args.reduction_factor)
    if args.method == "lora":
        from .lora import LoRAConfig

        return LoRAConfig(r=args.r, alpha=args.alpha, target_modules=tuple(args.target_modules),
                          use_rslora=args.rslora)
    if args.method == "qlora":
        from .qlora import QLoRAConfig

        return QLoRAConfig(r=args.r, alpha=args.alpha, target_modules=tuple(args.target_modules),
                           use_rslora=args.rslora)
    if args.method in ("prompt", "prefix"):
        config_cls = METHODS[args.method].config_class()
        n = args.num_virtual_tokens
        return config_cls() if n is None else config_cls(num_virtual_tokens=n)
    return None  # the method's defaults (the head's num_classes comes from the task)


def cli(args) -> int:
    """Run `finetune` from parsed arguments; print the result row; 0 on success."""
    result = finetune(args.method, args.task, base=args.base, config=config_from_args(args),
                      steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                      n_train=args.n_train, n_test=args.n_test, pooling=args.pooling, data=args.data,
                      eval_data=args.eval_data, out=args.out, measure_forgetting=not args.no_forgetting,
                      progress=not args.quiet, template=args.template, packing=args.packing,
                      loss=args.loss, beta=args.beta, loss_type=args.loss_type,
                      label_smoothing=args.label_smoothing, rpo_alpha=args.rpo_alpha, start_from=args.start_from)
    print(table([result]))
    if args.out:
        print(f"wrote {Path(args.out) / 'result.json'} and the trained tensors (adapter.safetensors)")
    return 0
