"""The adapter protocol: what every fine-tuning technique shares, written once.

A technique file (heads.py, adapters.py, lora.py, prefix.py, prompt.py, qlora.py) exposes a
frozen `XConfig` dataclass and `apply_x(model, config) -> model`, which freezes the base,
injects trainable modules and records itself with `mark_applied`. Everything after that is
generic and lives here:

    freeze / trainable_parameters / count_parameters     what is trained, how much of it
    find_modules / replace_module                        where a technique attaches (seam 1)
    Injected / disable_adapters                          the base model back, without a copy
    adapter_state_dict / save_adapter / load_adapter     the trained tensors only, on disk
    memory_bytes                                         weights, gradients, optimizer states
    read_peft_config                                     a PEFT adapter directory, checked once

Module names follow `model.named_modules()` (e.g. `blocks.0.attn.q_proj`). A target pattern
follows PEFT's rule: a plain name matches a module whose full name equals it or ends with
"." + the name (`"q_proj"`, `"attn.o_proj"`); any other string is a regular expression that
must match the whole name (`r"blocks\\.[01]\\.attn\\.(q|v)_proj"`).

An adapter directory holds two files:

    adapter.safetensors    the tensors a technique trains, keyed by their parameter path
    adapter_config.json    {"techniques": [{"technique": "adapters", "config": {...}}, ...],
                            "base_config": {...}, "base_fingerprint": "<16 hex digits>"}

so `load_adapter(plain_base_model, dir)` re-applies the techniques in order, checks that the
base model is the one the adapter was trained on, and loads the tensors (never a pickle).

A technique can also train on top of a fully fine-tuned model (DPO with LoRA on a full SFT
model): `load_as_base(model, full_run_dir)` loads that run and makes it the new, frozen base.
The adapter saved afterwards is useless without those weights, so `save_adapter` copies the
full run into `start/` beside it and records it (`"start": "start"` in the config), and
`load_adapter` loads `start/` first: a plain base model always comes back as it was trained.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from minituner.files import atomic_directory, refuse_pickle

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
START_DIR = "start"  # inside an adapter directory: the full run it was trained on (load_as_base)

# technique name -> (module, config class, apply function); imported only when loading.
TECHNIQUES: dict[str, tuple[str, str, str]] = {
    "full": ("minituner.full", "FullConfig", "apply_full"),
    "head": ("minituner.heads", "HeadConfig", "apply_head"),
    "adapters": ("minituner.adapters", "AdapterConfig", "apply_adapters"),
    "lora": ("minituner.lora", "LoRAConfig", "apply_lora"),
    "prompt": ("minituner.prompt", "PromptConfig", "apply_prompt"),
    "prefix": ("minituner.prefix", "PrefixConfig", "apply_prefix"),
    "qlora": ("minituner.qlora", "QLoRAConfig", "apply_qlora"),
}


# ---------------------------------------------------------------------------- what is trained
def freeze(model: nn.Module) -> nn.Module:
    """Set requires_grad=False on every parameter (the base model stays as it is)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters with requires_grad=True, each once (a tied weight appears once)."""
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of parameters; a tied tensor (GPT-2's lm_head = tok_emb)
    is counted once. A quantized layer (minituner.qlora.NF4Linear) stores its frozen weight
    as buffers and says how many weights they stand for in `quantized_numel`; those count."""
    params = list(model.parameters())  # parameters() yields a shared Parameter once
    quantized = sum(int(getattr(m, "quantized_numel", 0)) for m in model.modules())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + quantized


# ---------------------------------------------------------------------------- the techniques applied
def mark_applied(model: nn.Module, technique: str, config: Any) -> None:
    """Record that `technique` was applied with `config` (a dataclass), in order."""
    if technique not in TECHNIQUES:
        raise ValueError(f"unknown technique {technique!r}; register it in "
                         f"minituner.protocol.TECHNIQUES (known: {sorted(TECHNIQUES)})")
    if not hasattr(model, "minituner_techniques"):
        model.minituner_techniques = []  # a plain attribute: copied by deepcopy, not saved
    model.minituner_techniques.append({"technique": technique, "config": dataclasses.asdict(config)})


def applied(model: nn.Module) -> list[dict]:
    """The techniques applied to `model`, in order: [{"technique", "config"}, ...]."""
    return list(getattr(model, "minituner_techniques", []))


# ---------------------------------------------------------------------------- where techniques attach
_PLAIN = re.compile(r"[\w.]+")


def _matches(name: str, pattern: str) -> bool:
    if _PLAIN.fullmatch(pattern):  # PEFT's rule: the full name, or a dotted suffix of it
        return name == pattern or name.endswith("." + pattern)
    return re.fullmatch(pattern, name) is not None  # a regular expression for the whole name


def _compact(names: Iterable[str]) -> list[str]:
    """Module names with layer indices collapsed: blocks.0.attn.q_proj -> blocks.{i}.attn.q_proj."""
    return sorted({re.sub(r"\.\d+(?=\.|$)", ".{i}", n) for n in names})


def find_modules(model: nn.Module, patterns: str | Sequence[str],
                 types: tuple[type, ...] | None = (nn.Linear,)) -> list[tuple[str, nn.Module]]:
    """(name, module) for every module of one of `types` (None: any type) whose name matches
    one of `patterns`, in `named_modules()` order. No match raises a ValueError that lists
    the module names that exist."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns:
        raise ValueError("no target patterns given; pass names like ['q_proj', 'v_proj']")
    for p in patterns:
        if not _PLAIN.fullmatch(p):
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"target pattern {p!r} is neither a module name nor a valid "
                                 f"regular expression: {e}") from None
    candidates = [(n, m) for n, m in model.named_modules()
                  if n and (types is None or isinstance(m, types))]
    found = [(n, m) for n, m in candidates if any(_matches(n, p) for p in patterns)]
    if not found:
        kinds = "modules" if types is None else "/".join(t.__name__ for t in types) + " modules"
        names = _compact(n for n, _ in candidates) or _compact(n for n, _ in model.named_modules() if n)
        raise ValueError(f"target patterns {patterns} match none of the model's {kinds}; "
                         f"names that exist ({{i}} = any layer): {names}")
    return found


def replace_module(model: nn.Module, name: str, new_module: nn.Module) -> None:
    """Put `new_module` at the dotted path `name` (e.g. 'blocks.0.attn.o_proj')."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not hasattr(parent, child):
        raise ValueError(f"the model has no module {name!r} to replace")
    setattr(parent, child, new_module)


# ---------------------------------------------------------------------------- the base model back
class Injected(nn.Module):
    """Base class of every module a technique injects (adapter wrappers, LoRA, prefixes).

    While `disabled` is True the module computes exactly what the base model computed there
    (a wrapper returns the wrapped module's output), which is how `disable_adapters` gives
    the base model without a copy of its weights. `adapter_buffers` names buffers of this
    module (not of a wrapped base) that `adapter_state_dict` must carry along.
    """

    disabled: bool = False
    adapter_buffers: tuple[str, ...] = ()


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `model` computes the base model: every `Injected` module is
    disabled; on exit (also on an exception) each gets its previous state back, so nested
    use works. Parameters a technique trains in place (full fine-tuning, adapters'
    `train_layernorms`) are not undone: use a copy of the base as the reference then."""
    injected = [m for m in model.modules() if isinstance(m, Injected)]
    before = [m.disabled for m in injected]
    try:
        for m in injected:
            m.disabled = True
        yield model
    finally:
        for m, was in zip(injected, before):
            m.disabled = was


# ---------------------------------------------------------------------------- saving and loading
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors the techniques train (requires_grad=True), keyed by `named_parameters`
    path, plus the `adapter_buffers` of `Injected` modules: detached, contiguous, on the CPU
    (like `state_dict()`, a CPU tensor shares memory with the model)."""
    out = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    for mod_name, m in model.named_modules():
        if isinstance(m, Injected):
            for b in m.adapter_buffers:
                out[f"{mod_name}.{b}" if mod_name else b] = getattr(m, b).detach().cpu().contiguous()
    return out


def _base_config(model: nn.Module) -> dict | None:
    cfg = getattr(model, "config", None)
    return cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else None


def fingerprint(base_config: dict | None) -> str | None:
    """First 16 hex digits of the sha256 of the canonical JSON of a base model's config."""
    if base_config is None:
        return None
    canonical = json.dumps(base_config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write `adapter.safetensors` (the trained tensors only) and `adapter_config.json`
    (techniques, their configs, the base model's config and fingerprint), atomically."""
    tensors = adapter_state_dict(model)
    if not tensors:
        raise ValueError("the model has no trainable tensors to save; apply a technique first "
                         "(e.g. minituner.adapters.apply_adapters)")
    base = _base_config(model)
    meta = {"techniques": applied(model), "base_config": base, "base_fingerprint": fingerprint(base)}
    start = getattr(model, "minituner_start", None)  # the full run under the techniques (load_as_base)
    if start is not None:
        meta["start"] = START_DIR
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "minituner-adapter"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        if start is not None:
            if not (Path(start) / ADAPTER_WEIGHTS).is_file():
                raise FileNotFoundError(f"this model was built on the full fine-tuning run in {start} "
                                        "(load_as_base), which is gone; the adapter needs it beside it")
            shutil.copytree(start, tmp / START_DIR)  # its adapter files (and its own start/, if any)
    return Path(directory)


def load_as_base(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a saved full fine-tuning run (technique "full") into the plain base `model` and make
    it the new base: every weight frozen, no technique recorded, so another technique applies
    on top of it. The run's directory is remembered: `save_adapter` copies it along."""
    directory = Path(directory)
    meta = _read_meta(directory)
    if [t["technique"] for t in meta["techniques"]] != ["full"]:
        raise ValueError(f"{directory} holds a {'+'.join(t['technique'] for t in meta['techniques'])} run; "
                         "only a full fine-tuning run can become a new base (load other adapters with load_adapter)")
    model = load_adapter(model, directory)
    freeze(model)
    model.minituner_techniques = []
    model.minituner_start = directory.resolve()
    return model


def _describe(cfg: dict | None) -> str:
    if cfg is None:
        return "a model without a config"
    keys = ("family", "n_layer", "n_embd", "n_head", "vocab_size")
    return f"{cfg.get('family', '?')} (" + ", ".join(f"{k}={cfg[k]}" for k in keys[1:] if k in cfg) + ")"


def _tuples(x: Any) -> Any:
    """JSON lists back to tuples: configs are frozen dataclasses with tuple fields."""
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    return x


def apply_technique(model: nn.Module, technique: str, config: dict | Any) -> nn.Module:
    """Apply a registered technique by name, with a config dataclass or its dict."""
    if technique not in TECHNIQUES:
        raise ValueError(f"unknown technique {technique!r}; known: {sorted(TECHNIQUES)}")
    module_name, config_name, apply_name = TECHNIQUES[technique]
    module = importlib.import_module(module_name)
    if isinstance(config, dict):
        config = getattr(module, config_name)(**_tuples(config))
    return getattr(module, apply_name)(model, config)


def _read_meta(directory: Path) -> dict:
    """adapter_config.json of a saved adapter, after checking that both files are there."""
    cfg_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for f in (cfg_path, weights_path):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found; save one with minituner.protocol.save_adapter")
    return json.loads(cfg_path.read_text(encoding="utf-8"))


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load an adapter saved by `save_adapter` into `model` and return it.

    On a plain base model the saved techniques are applied first, in order; a model that
    already has exactly those techniques is only loaded into. A different base model, other
    techniques, or tensors that do not fit raise one error that says what differs.
    """
    directory = Path(directory)
    meta = _read_meta(directory)
    base = _base_config(model)
    if meta["base_fingerprint"] != fingerprint(base):
        diff = sorted(k for k in set(base or {}) | set(meta["base_config"] or {})
                      if (base or {}).get(k) != (meta["base_config"] or {}).get(k))
        raise ValueError(f"adapter {directory} was trained on base model {_describe(meta['base_config'])} "
                         f"[fingerprint {meta['base_fingerprint']}], but this model is {_describe(base)} "
                         f"[fingerprint {fingerprint(base)}]; config fields that differ: {diff}. "
                         "Load it onto the base model it was trained on.")
    saved, present = meta["techniques"], applied(model)
    if meta.get("start") is not None:  # trained on a full fine-tune: those weights first
        if present or getattr(model, "minituner_start", None) is not None:
            raise ValueError(f"adapter {directory} was trained on top of the full fine-tuning run in "
                             f"{directory / meta['start']}; load it onto a plain base model, which gets "
                             "those weights first")
        model = load_as_base(model, directory / meta["start"])
    if not present:
        for t in saved:
            model = apply_technique(model, t["technique"], t["config"])
    elif [(t["technique"], _tuples(t["config"])) for t in present] != \
            [(t["technique"], _tuples(t["config"])) for t in saved]:
        raise ValueError(f"the model already has techniques {present}, but {directory} holds {saved}; "
                         "load it onto a plain base model (the techniques are re-applied) or apply the same ones")
    tensors = load_file(str(directory / ADAPTER_WEIGHTS))  # safetensors: no pickle
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = sorted(f"{k}: saved {tuple(tensors[k].shape)}, model {tuple(expected[k].shape)}"
                       for k in set(tensors) & set(expected) if tensors[k].shape != expected[k].shape)
    if missing or unexpected or misshaped:
        raise ValueError(f"adapter {directory} does not fit the model: missing keys {missing}, "
                         f"unexpected keys {unexpected}, mis-shaped {misshaped}")
    targets = dict(model.named_parameters())
    targets.update((k, v) for k, v in model.named_buffers() if k in tensors and k not in targets)
    with torch.no_grad():
        for k, t in tensors.items():
            targets[k].copy_(t)
    return model


# ---------------------------------------------------------------------------- PEFT's directories
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def read_peft_config(directory: str | os.PathLike, peft_type: str) -> tuple[Path, dict]:
    """(directory, adapter_config) of a directory PEFT wrote (`save_pretrained`), checked
    once for every PEFT loader (lora, prompt, prefix): both files are there (a pickled
    adapter_model.bin is refused, never read) and the adapter is a `peft_type` one."""
    d = Path(directory)
    if not (d / PEFT_WEIGHTS).is_file() and (d / "adapter_model.bin").is_file():
        refuse_pickle(d / "adapter_model.bin")
    for f in (d / PEFT_CONFIG, d / PEFT_WEIGHTS):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found; a PEFT adapter directory holds {PEFT_CONFIG} and {PEFT_WEIGHTS}")
    cfg = json.loads((d / PEFT_CONFIG).read_text(encoding="utf-8"))
    if cfg.get("peft_type") != peft_type:
        raise ValueError(f"{d} holds a {cfg.get('peft_type')!r} adapter; this loader reads {peft_type} only")
    return d, cfg


# ---------------------------------------------------------------------------- memory
def _unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the storages behind `tensors`, each storage counted once."""
    seen, total = set(), 0
    for t in tensors:
        s = t.untyped_storage()
        key = (t.device, s.data_ptr())
        if key not in seen:
            seen.add(key)
            total += s.nbytes()
    return total


def memory_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Training memory in bytes, and per parameter (bytes / number of parameters):

        weights     parameters + buffers (a tied or shared storage once)
                    (quantized weights are buffers: NF4 codes and their scales, counted
                    here; their number counts in `parameters`)
        gradients   numel x element size of every trainable parameter (what backward
                    allocates, whether or not .grad exists now)
        optimizer   tensors in optimizer.state, plus a paged optimizer's pages (PagedAdamW:
                    their host copies); 0 before the first step or without one
        total       weights + gradients + optimizer

    plus `parameters` and `trainable` (counts). Activations are not included.
    """
    trainable, total_params = count_parameters(model)
    weights = _unique_bytes(list(model.parameters()) + list(model.buffers()))
    gradients = sum(p.numel() * p.element_size() for p in trainable_parameters(model))
    opt = 0
    if optimizer is not None:
        opt = _unique_bytes(v for st in optimizer.state.values() for v in st.values()
                            if isinstance(v, torch.Tensor))
        pool = getattr(optimizer, "pool", None)  # PagedAdamW: m and v live in its page pool
        if pool is not None:
            opt += pool.total_bytes
    out = {"parameters": total_params, "trainable": trainable, "weights": weights,
           "gradients": gradients, "optimizer": opt, "total": weights + gradients + opt}
    for k in ("weights", "gradients", "optimizer", "total"):
        out[f"{k}_per_param"] = out[k] / max(total_params, 1)
    return out
