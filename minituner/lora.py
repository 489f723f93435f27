"""LoRA: low-rank adaptation of frozen linear layers (Chapter 06).

Papers
------
- Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685.
- Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA"
  (rsLoRA), arXiv:2312.03732.

A pre-trained weight W0 (out, in) stays frozen; its update is a product of two small
matrices of rank r << min(in, out) (Hu Sec. 4.1, Eq. 3):

    h = W0 x + ΔW x = W0 x + (α / r) B A x                                        (Eq. 3)

    A (r, in)    Kaiming-uniform with a = √5 (nn.Linear's own init; loralib and PEFT use it,
                 the paper says "random Gaussian")
    B (out, r)   zeros: ΔW = B A = 0, so the model is exactly the base when training starts
    α / r        the scaling; rsLoRA's α / √r keeps the update's size stable as r grows

         x (B, T, in) ---------> W0 x (frozen) ------------------+
              |                                                  (+) --> h (B, T, out)
              +--> dropout --> A --> (B, T, R) --> B --> * α/r --+     (only A, B train)

A linear layer gains r (in + out) trainable parameters instead of in * out. Because ΔW has
W0's shape, it can be added into W0 after training (`merge_lora`: no extra latency at
inference, Hu Sec. 4.1) and subtracted again (`unmerge_lora`).

The base may be any module with `in_features` and `out_features` that computes W0 x: an
`nn.Linear`, or the 4-bit `NF4Linear` of minituner/qlora.py (QLoRA), which declares the dtype
the branch computes in as `compute_dtype` (`apply_lora(..., types=(NF4Linear,))`).

One `LoRALinear` can hold several named adapters (A, B pairs) on the same frozen base;
`set_adapter(model, name)` picks the one the forward uses, without reloading the base. Every
adapter's A and B stay trainable (so `protocol.save_adapter` keeps them all); only the active
one receives gradients. LoRA attaches by module wrapping (seam 1 of minituner.model) and
computes the base model exactly under `protocol.disable_adapters`.

The last section reads and writes PEFT's adapter format (adapter_config.json +
adapter_model.safetensors), so an adapter trained here loads in Hugging Face PEFT and back.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from minituner.files import atomic_directory
from minituner.protocol import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    Injected,
    find_modules,
    freeze,
    mark_applied,
    read_peft_config,
    replace_module,
)


@dataclass(frozen=True)
class LoRAConfig:
    r: int = 8  # rank R of the update B A
    alpha: float = 16  # α: the update is scaled by α / r (α / √r with use_rslora)
    dropout: float = 0.0  # dropout on the LoRA branch's input only (W0 x sees x itself)
    target_modules: str | tuple[str, ...] = ("q_proj", "v_proj")  # names (protocol.find_modules' rule)
    use_rslora: bool = False  # Kalajdzievski 2023: scaling α / √r instead of α / r
    adapter_name: str = "default"  # several named adapters may share one base (set_adapter)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r={self.r!r} must be a positive integer (the rank, e.g. 8)")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"alpha={self.alpha!r} must be a positive number (e.g. 16 = 2 r)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))  # lists from JSON
        if not re.fullmatch(r"\w+", self.adapter_name):
            raise ValueError(f"adapter_name={self.adapter_name!r} must be letters, digits or _ (no dots)")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


def _branch_dtype_device(base: nn.Module) -> tuple[torch.dtype, torch.device]:
    """A and B live where the base's weight lives, in its dtype; a quantized base (no float
    weight) names its `compute_dtype`."""
    w = getattr(base, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point():
        return w.dtype, w.device
    t = next(iter(base.buffers()), w)
    device = t.device if isinstance(t, torch.Tensor) else torch.device("cpu")
    return getattr(base, "compute_dtype", torch.float32), device


class LoRALinear(Injected):
    """h = base(x) + (α/r) B A dropout(x) with the active adapter's A, B (Eq. 3)."""

    def __init__(self, base: nn.Module, config: LoRAConfig = LoRAConfig()) -> None:
        super().__init__()
        self.base = base  # the original nn.Linear (or NF4Linear), frozen, called as it was
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.ParameterDict()  # adapter name -> A (R, in)
        self.lora_B = nn.ParameterDict()  # adapter name -> B (out, R)
        self.lora_dropout = nn.ModuleDict()
        self.configs: dict[str, LoRAConfig] = {}
        self.active: str | None = None  # the adapter the forward adds (None: the base alone)
        self.merged: str | None = None  # the adapter added into base.weight, if any
        self.add_adapter(config)

    def add_adapter(self, config: LoRAConfig) -> None:
        name = config.adapter_name
        if name in self.configs:
            raise ValueError(f"this layer already has an adapter named {name!r}; choose another adapter_name")
        dtype, device = _branch_dtype_device(self.base)
        A = torch.empty(config.r, self.in_features, device=device, dtype=dtype)  # (R, in)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, config.r, device=device, dtype=dtype))
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.configs[name] = config
        self.active = name

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """ΔW = (α/r) B A, (out, in), in float32."""
        name = name or self.active
        return self.configs[name].scaling * (self.lora_B[name].float() @ self.lora_A[name].float())  # (out, R) @ (R, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)  # W0 x (+ bias), (B, T, out)
        if self.disabled:
            if self.merged is not None:
                raise RuntimeError("disable_adapters on a merged LoRA layer cannot give the base model; "
                                   "call minituner.lora.unmerge_lora(model) first")
            return h
        name = self.active
        if name is None or self.merged is not None:  # merged: W0 + ΔW already computes Eq. 3
            return h
        A, B = self.lora_A[name], self.lora_B[name]
        z = F.linear(self.lora_dropout[name](x.to(A.dtype)), A)  # A dropout(x), (B, T, R)
        return h + (self.configs[name].scaling * F.linear(z, B)).to(h.dtype)  # Eq. 3: (alpha / r) * B A x


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _is_linear(m: nn.Module, types: tuple[type, ...] = (nn.Linear,)) -> bool:
    """A layer computing W0 x that LoRA can wrap: one of `types`, or a quantized linear layer
    (it says how many weights it stands for in `quantized_numel`, as qlora.NF4Linear does)."""
    return isinstance(m, types) or (hasattr(m, "quantized_numel") and hasattr(m, "in_features"))


def _linear_names(model: nn.Module, types: tuple[type, ...] = (nn.Linear,)) -> list[str]:
    """Every layer a LoRA can target: LoRALinear layers and linear ones (not a LoRA's base)."""
    wrapped = {n for n, _ in lora_layers(model)}
    return [n for n, m in model.named_modules() if isinstance(m, LoRALinear)
            or (_is_linear(m, types) and n.rpartition(".")[0] not in wrapped)]


def apply_lora(model: nn.Module, config: LoRAConfig, types: tuple[type, ...] = (nn.Linear,)) -> nn.Module:
    """Freeze `model` and add adapter `config.adapter_name` to every linear layer (of `types`,
    a quantized linear such as qlora.NF4Linear, or a LoRALinear) named by `config.target_modules`;
    that adapter becomes the active one. `types` may name any module with in_features and
    out_features computing W0 x. Returns the model."""
    if any(m.merged is not None for _, m in lora_layers(model)):
        raise ValueError("an adapter is merged into the weights; call unmerge_lora(model) before apply_lora")
    types = tuple(types)
    allowed = set(_linear_names(model, types))
    kinds = (*types, *{type(m) for m in model.modules() if _is_linear(m, types)}, LoRALinear)  # + quantized ones
    targets = [(n, m) for n, m in find_modules(model, config.target_modules, types=kinds) if n in allowed]
    if not targets:
        raise ValueError(f"target_modules {config.target_modules!r} match only the base layers inside "
                         "LoRALinear modules; target the LoRALinear names (e.g. 'q_proj')")
    for n, m in targets:
        if isinstance(m, LoRALinear) and config.adapter_name in m.configs:
            raise ValueError(f"{n} already has LoRA adapter {config.adapter_name!r}; pass another adapter_name")
    if not lora_layers(model):
        freeze(model)  # the first LoRA: the base is frozen; later adapters keep earlier ones as they are
    for n, m in targets:
        if isinstance(m, LoRALinear):
            m.add_adapter(config)
        else:
            replace_module(model, n, LoRALinear(m, config))  # A, B: requires_grad=True
    mark_applied(model, "lora", config)
    set_adapter(model, config.adapter_name)
    return model


def set_adapter(model: nn.Module, name: str) -> None:
    """Make adapter `name` the active one in every LoRA layer (layers without it compute the base)."""
    layers = lora_layers(model)
    names = sorted({a for _, m in layers for a in m.configs})
    if name not in names:
        raise ValueError(f"the model has no LoRA adapter {name!r}; adapters: {names}")
    if any(m.merged is not None for _, m in layers):
        raise ValueError("an adapter is merged into the weights; call unmerge_lora(model) before set_adapter")
    for _, m in layers:
        m.active = name if name in m.configs else None


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """W = W0 + (α/r) B A in every LoRA layer, for the active adapter: the forward then costs
    what the base costs. Refuses (changing nothing) a weight that would become NaN/Inf, or
    one shared with another module (GPT-2's lm_head is tok_emb), and names the module."""
    layers = [(n, m) for n, m in lora_layers(model) if m.active is not None and m.merged is None]
    owners: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(n)
    merged = []
    for n, m in layers:
        if not isinstance(m.base, nn.Linear):
            raise ValueError(f"{n}: LoRA can be merged into an nn.Linear only, not {type(m.base).__name__} "
                             "(a quantized base would need re-quantizing: keep the adapter separate)")
        w = m.base.weight
        if len(owners[id(w)]) > 1:
            raise ValueError(f"{n}: its weight is shared with {owners[id(w)]}; merging would change them too")
        new = (w.float() + m.delta_weight()).to(w.dtype)  # W0 + (alpha / r) B A, (out, in)
        if not torch.isfinite(new).all():  # also a sum that overflows the weight's dtype
            raise ValueError(f"merging adapter {m.active!r} into {n} gives NaN/Inf {w.dtype} weights; check "
                             "its lora_A/lora_B (or merge in a wider dtype); nothing was merged")
        merged.append((m, new))
    for m, new in merged:
        m.base.weight.copy_(new)
        m.merged = m.active
    return model


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> nn.Module:
    """W0 = W - (α/r) B A in every merged LoRA layer: the adapter is a separate branch again."""
    for _, m in lora_layers(model):
        if m.merged is not None:
            w = m.base.weight
            w.copy_((w.float() - m.delta_weight(m.merged)).to(w.dtype))
            m.merged = None
    return model


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """`merge_lora`, then every LoRA layer replaced by its base `nn.Linear` holding W0 + ΔW
    (PEFT's `merge_and_unload`): the model is the base architecture again, module for module,
    for deployment. The adapters are gone: no unmerge, no set_adapter (keep a copy for that)."""
    merge_lora(model)  # refuses, changing nothing, what cannot be merged
    for name, m in lora_layers(model):
        replace_module(model, name, m.base)  # W0 + ΔW, or W0 (inactive)
    model.minituner_techniques = [t for t in getattr(model, "minituner_techniques", []) if t["technique"] != "lora"]
    return model


# ================================================================================ PEFT's format
# adapter_config.json + adapter_model.safetensors, keyed `base_model.model.<HF module>.lora_A.weight`
# (lora_A (R, in), lora_B (out, R), also for GPT-2's Conv1D layers). Module names map to
# Hugging Face's per family; GPT-2 fuses q, k, v into one c_attn (out = 3C):
#   load: c_attn's A is shared by q, k, v and its B (3C, R) splits by rows into three (C, R): exact.
#   save: q, k, v adapters become one c_attn adapter of rank R' = sum of their ranks, A stacked
#         (R', C), B block-diagonal (3C, R'), α' chosen so the scaling is unchanged:
#         α'/R' = α/r, so α' = 3α (rsLoRA: α'/√R' = α/√r, so α' = √3·α).
_PEFT_PREFIX = "base_model.model."
_HF_PREFIX = {"llama": "model.", "gpt2": "transformer.", "bert": ""}  # LlamaForCausalLM, GPT2LMHeadModel, BertModel
_HF_NAMES = {  # our module name -> HF's (after the prefix)
    "llama": [(r"blocks\.(\d+)\.attn\.([qkvo]_proj)", "layers.{0}.self_attn.{1}"),
              (r"blocks\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)", "layers.{0}.mlp.{1}")],
    "gpt2": [(r"blocks\.(\d+)\.attn\.[qkv]_proj", "h.{0}.attn.c_attn"),
             (r"blocks\.(\d+)\.attn\.o_proj", "h.{0}.attn.c_proj"),
             (r"blocks\.(\d+)\.mlp\.fc", "h.{0}.mlp.c_fc"),
             (r"blocks\.(\d+)\.mlp\.proj", "h.{0}.mlp.c_proj")],
    "bert": [(r"blocks\.(\d+)\.attn\.q_proj", "encoder.layer.{0}.attention.self.query"),
             (r"blocks\.(\d+)\.attn\.k_proj", "encoder.layer.{0}.attention.self.key"),
             (r"blocks\.(\d+)\.attn\.v_proj", "encoder.layer.{0}.attention.self.value"),
             (r"blocks\.(\d+)\.attn\.o_proj", "encoder.layer.{0}.attention.output.dense"),
             (r"blocks\.(\d+)\.mlp\.fc", "encoder.layer.{0}.intermediate.dense"),
             (r"blocks\.(\d+)\.mlp\.proj", "encoder.layer.{0}.output.dense")],
}
_HF_ONLY = {"bert": ["pooler.dense"]}  # HF Linears we do not build: a target must not reach them
# PEFT settings this file cannot express, with the value that is fine
_UNSUPPORTED = {"use_dora": False, "bias": "none", "lora_bias": False, "modules_to_save": None,
                "layers_to_transform": None, "layer_replication": None, "exclude_modules": None,
                "target_parameters": None, "trainable_token_indices": None, "use_qalora": False,
                "use_bdlora": None, "alora_invocation_tokens": None, "megatron_config": None}
_BASE_CHANGING_INITS = ("olora", "pissa", "corda", "loftq")  # they rewrite W0 itself


def _hf_layers(model: nn.Module) -> dict[str, list[str]]:
    """HF module name -> our Linear names behind it (GPT-2's c_attn: q, k, v), in model order."""
    family, out = model.config.family, {}
    for n in _linear_names(model):
        hf = "lm_head" if n == "lm_head" else next(
            (_HF_PREFIX[family] + t.format(*m.groups()) for p, t in _HF_NAMES[family]
             if (m := re.fullmatch(p, n))), None)
        if hf is not None:
            out.setdefault(hf, []).append(n)
    return out


def _selects(name: str, targets: str | list[str]) -> bool:
    """PEFT's target rule, decided by type: a string is a regular expression for the whole
    name, a list holds names that equal the module's name or a dotted suffix of it."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _shortest_targets(chosen: list[str], universe: list[str]) -> list[str]:
    """The shortest dotted suffixes of `chosen` that select exactly `chosen` within `universe`."""
    for k in range(1, max(n.count(".") for n in chosen) + 2):
        suffixes = sorted({".".join(n.split(".")[-k:]) for n in chosen})
        if {u for u in universe if _selects(u, suffixes)} == set(chosen):
            return suffixes
    return sorted(chosen)


def _pattern(patterns: dict, name: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key matching the end of the name."""
    return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", name)), default)


def _tidy(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def _fuse_qkv(parts: list[tuple[str, LoRALinear]], name: str) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """q, k, v adapters of one GPT-2 layer -> one exact c_attn adapter: (A, B, rank, alpha)."""
    first, C = parts[0][1].configs[name], parts[0][1].out_features
    r_sum = sum(m.configs[name].r for _, m in parts)
    ratio = r_sum / first.r
    alpha = first.alpha * (math.sqrt(ratio) if first.use_rslora else ratio)  # same scaling at rank r_sum
    scaling = alpha / (math.sqrt(r_sum) if first.use_rslora else r_sum)
    A = torch.cat([m.lora_A[name].detach() for _, m in parts])  # A stacked, (R', C)
    B = A.new_zeros(3 * C, r_sum)  # block-diagonal, (3C, R')
    col = 0
    for n, m in parts:
        r, row = m.configs[name].r, "qkv".index(n[-6]) * C  # n ends in q_proj, k_proj or v_proj
        B[row:row + C, col:col + r] = m.lora_B[name].detach() * (m.configs[name].scaling / scaling)
        col += r
    return A, B, r_sum, _tidy(alpha)


def save_peft(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write adapter `adapter_name` (default: the active one) in PEFT's format, for the Hugging
    Face model of the same family (LlamaForCausalLM, GPT2LMHeadModel, BertModel), atomically."""
    family = model.config.family
    layers = dict(lora_layers(model))
    name = adapter_name or next((m.active for m in layers.values() if m.active), None)
    hf_layers = {hf: [(n, layers[n]) for n in ours if n in layers and name in layers[n].configs]
                 for hf, ours in _hf_layers(model).items()}
    hf_layers = {hf: parts for hf, parts in hf_layers.items() if parts}
    used = [n for n, m in layers.items() if name in m.configs]
    if not used:
        raise ValueError(f"the model has no LoRA adapter {name!r} to save; apply_lora first")
    lost = sorted(set(used) - {n for parts in hf_layers.values() for n, _ in parts})
    if lost:
        raise ValueError(f"PEFT cannot express LoRA on {lost}: no Hugging Face {family} module corresponds")
    configs = {layers[n].configs[name] for n in used}
    for field in ("use_rslora", "dropout"):
        if len({getattr(c, field) for c in configs}) > 1:
            raise ValueError(f"adapter {name!r} mixes {field} values across layers; PEFT's "
                             f"adapter_config.json holds one {field} per adapter")
    rs, dropout = next(iter(configs)).use_rslora, next(iter(configs)).dropout
    tensors, rank_alpha = {}, {}
    for hf, parts in hf_layers.items():
        if hf.endswith("c_attn"):
            A, B, r, alpha = _fuse_qkv(parts, name)
        else:
            m = parts[0][1]
            A, B, r, alpha = m.lora_A[name].detach(), m.lora_B[name].detach(), m.configs[name].r, m.configs[name].alpha
        tensors[f"{_PEFT_PREFIX}{hf}.lora_A.weight"] = A.cpu().contiguous()  # (R, in)
        tensors[f"{_PEFT_PREFIX}{hf}.lora_B.weight"] = B.cpu().contiguous()  # (out, R)
        rank_alpha[hf] = (r, alpha)
    (r0, alpha0), _ = min(Counter(rank_alpha.values()).items(), key=lambda kv: (-kv[1], kv[0]))  # most common
    other = [hf for hf, ra in rank_alpha.items() if ra != (r0, alpha0)]
    universe = list(_hf_layers(model)) + _HF_ONLY.get(family, [])
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM" if family != "bert" else None,
              "base_model_name_or_path": None, "r": r0, "lora_alpha": alpha0, "lora_dropout": dropout,
              "use_rslora": rs, "target_modules": _shortest_targets(list(rank_alpha), universe),
              "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": family == "gpt2",
              "bias": "none", "modules_to_save": None, "init_lora_weights": True, "inference_mode": True}
    for hf in other:  # PEFT's per-module rank and alpha: by last name ("c_attn") where that is exact
        leaf = hf.rpartition(".")[2]
        same = all(ra == rank_alpha[hf] for o, ra in rank_alpha.items() if _selects(o, [leaf]))
        key = leaf if same else re.escape(hf)
        config["rank_pattern"][key], config["alpha_pattern"][key] = rank_alpha[hf]
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return Path(directory)


def _canonical(hf: str, family: str) -> str:
    """A HF module name as in our family's HF model: GPT2Model's h.0 -> transformer.h.0, ..."""
    if family == "bert":
        return hf.removeprefix("bert.")
    return hf if hf == "lm_head" or hf.startswith(_HF_PREFIX[family]) else _HF_PREFIX[family] + hf


def _alternative(hf: str, family: str) -> str:
    """The same module in the family's other HF class (LlamaModel, GPT2Model, BertFor...)."""
    return "bert." + hf if family == "bert" else hf.removeprefix(_HF_PREFIX[family])


def load_peft(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """Read a PEFT LoRA adapter directory into `model` (a plain base, or one with other
    adapters): apply LoRA as adapter_config.json says, then load adapter_model.safetensors."""
    (d, cfg), family = read_peft_config(directory, "LORA"), model.config.family
    for key, fine in _UNSUPPORTED.items():
        if cfg.get(key, fine) not in (fine, None, False, [], {}):
            raise ValueError(f"{d}: the PEFT setting {key}={cfg[key]!r} is not supported by minituner.lora "
                             f"(supported: {fine!r})")
    init = str(cfg.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_CHANGING_INITS):
        raise ValueError(f"{d}: init_lora_weights={cfg['init_lora_weights']!r} changes the base weights; "
                         "save it with PEFT's path_initial_model_for_weight_conversion to get a plain LoRA")
    hf_layers, targets = _hf_layers(model), cfg.get("target_modules")
    if targets == "all-linear":
        chosen = [hf for hf in hf_layers if hf != "lm_head"]
    elif isinstance(targets, (str, list)):
        chosen = [hf for hf in hf_layers if _selects(hf, targets) or _selects(_alternative(hf, family), targets)]
    else:
        raise ValueError(f"{d}: target_modules={targets!r} is not supported; use a list of names or a regex")
    if not chosen:
        raise ValueError(f"{d}: target_modules={targets!r} match none of the {family} model's layers; "
                         f"Hugging Face names that exist: {sorted(hf_layers)[:12]}")
    found = {}
    for key, t in load_file(str(d / PEFT_WEIGHTS)).items():  # safetensors: no pickle
        m = re.fullmatch(re.escape(_PEFT_PREFIX) + r"(.+)\.lora_([AB])\.weight", key)
        found[(_canonical(m.group(1), family), m.group(2)) if m else (key, "?")] = t
    want = {(hf, ab) for hf in chosen for ab in "AB"}
    missing, unexpected = sorted(want - set(found)), sorted(set(found) - want)
    if missing or unexpected:
        raise ValueError(f"{d / PEFT_WEIGHTS} does not fit target_modules={targets!r}: missing "
                         f"{[f'{hf}.lora_{ab}' for hf, ab in missing]}, unexpected {[k for k, _ in unexpected]}")
    groups: dict[tuple, list[str]] = {}
    for hf in chosen:  # every tensor checked before the model changes
        r = _pattern(cfg.get("rank_pattern") or {}, hf, cfg.get("r", 8))
        parts = [model.get_submodule(n) for n in hf_layers[hf]]
        shapes = {"A": (r, parts[0].in_features), "B": (sum(m.out_features for m in parts), r)}
        for ab, shape in shapes.items():
            if tuple(found[(hf, ab)].shape) != shape:
                raise ValueError(f"{hf}.lora_{ab}: the file has {tuple(found[(hf, ab)].shape)}, the model "
                                 f"needs {shape} at r={r}; is it an adapter for this base model?")
        groups.setdefault((r, _pattern(cfg.get("alpha_pattern") or {}, hf, cfg.get("lora_alpha", 8))),
                          []).extend(hf_layers[hf])
    ours = _linear_names(model)
    for (r, alpha), names in groups.items():
        apply_lora(model, LoRAConfig(r=r, alpha=alpha, dropout=cfg.get("lora_dropout", 0.0),
                                     target_modules=tuple(_shortest_targets(names, ours)),
                                     use_rslora=bool(cfg.get("use_rslora", False)), adapter_name=adapter_name))
    layers = dict(lora_layers(model))
    with torch.no_grad():
        for hf in chosen:
            parts = [layers[n] for n in hf_layers[hf]]
            B_parts = found[(hf, "B")].split([m.out_features for m in parts])  # c_attn: rows of q, k, v
            for m, B_part in zip(parts, B_parts):  # A (R, in) is shared by q, k, v
                m.lora_A[adapter_name].copy_(found[(hf, "A")])
                m.lora_B[adapter_name].copy_(B_part)  # (out, R)
    return model
