"""QLoRA: LoRA on top of a frozen 4-bit NormalFloat base model (Chapter 07).

Paper: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314.

The base model's linear weights are stored as 4-bit NF4 codes with double-quantized block
scales (kernels/nf4.py: Eq. 1, 4 and 6), and LoRA (Hu 2021, minituner/lora.py) trains on top in
the compute dtype (bf16 or fp32). For one quantized linear layer (Sec. 3, Eq. 5-6):

    Y = X doubleDequant(c1, c2, W_NF4) + s X L1 L2                                    (Eq. 5)
    doubleDequant(c1, c2, W_k-bit) = dequant(dequant(c1, c2_k-bit), W_4bit) = W       (Eq. 6)

    c2    one absmax per block of 64 weights, stored as 8-bit codes (+ their mean, `offset`)
    c1    one float32 absmax per block of 256 of those codes
    L1 L2 the LoRA matrices (lora_A, lora_B), s = alpha / r

          W_NF4 (uint8, 2 codes a byte) --doubleDequant--> W (out, in), compute dtype
                                                            |
         X (B, T, in) -------------------------------> X W^T ---------------+
              |                                                             (+) --> Y (B, T, out)
              +--> A --> (B, T, R) --> B --> * s ---------------------------+   (only A, B train)

Gradients flow through the frozen base to the input, never to its weight (Sec. 3: "we only
compute dE/dX"): `_NF4Matmul` is a custom autograd function whose backward dequantizes W again
and returns dE/dX = dE/dY W. It saves no float copy of W between forward and backward, so a
layer holds 4.127 bits per weight at rest and in backward; the float W exists only while one
matmul runs. On a CPU that transient W is written into one scratch buffer per thread and dtype,
reused by every layer (`_scratch`): a fresh 64 MiB tensor for a 4096 x 4096 weight costs more in
page faults than the dequantization itself, and a reused one costs none. The buffer is as large
as the largest quantized layer in the compute dtype; `release_scratch()` frees it.

    bits / weight = 4 (codes) + 8/64 (c2 codes) + 32/(64*256) (c1) = 4.127      (double quant)

`quantize_model` swaps every `nn.Linear` for an `NF4Linear` in place (the lm_head and any weight
shared with another module stay in float); `apply_qlora` quantizes, then applies LoRA with
`minituner.lora.apply_lora`, and records the technique so `protocol.save_adapter`/`load_adapter`
work: the adapter holds the LoRA tensors only, and loading re-quantizes the plain base model,
which is deterministic, so the result is bit for bit the saved model. `save_quantized` /
`load_quantized` store a quantized model in safetensors with no float copy of its weights.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from minituner.files import atomic_directory
from minituner.kernels.blockwise import check_blocksize
from minituner.kernels.nf4 import (
    dequantize_nf4,
    double_dequantize,
    double_quantize,
    quantize_nf4,
)
from minituner.lora import LoRAConfig, apply_lora
from minituner.protocol import _matches, find_modules, mark_applied, replace_module

DQ_BLOCKSIZE = 256  # double quantization: one float32 c1 per 256 block scales (Sec. 3)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _compute_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"compute_dtype={dtype!r} must be one of {sorted(_DTYPES)} (the dtype LoRA and the "
                     "dequantized weight compute in)")


# ---------------------------------------------------------------------------- the quantized layer
_scratch_buffers = threading.local()  # per thread: {dtype: flat tensor}, CPU only


def _scratch(layer: NF4Linear) -> torch.Tensor | None:
    """A flat CPU buffer of the compute dtype, at least as large as `layer`'s weight, shared by
    every NF4Linear of this thread (None on other devices: CUDA's caching allocator already
    reuses memory). Only the autograd function below writes it, and it is done with the W it
    holds before the next layer's dequantization starts (the CPU runs one op after another)."""
    if layer.weight_nf4.device.type != "cpu":
        return None
    buffers = _scratch_buffers.__dict__.setdefault("by_dtype", {})
    need = 2 * layer.weight_nf4.numel()  # two codes a byte
    buf = buffers.get(layer.compute_dtype)
    if buf is None or buf.numel() < need:
        buf = buffers[layer.compute_dtype] = torch.empty(need, dtype=layer.compute_dtype)
    return buf


def release_scratch() -> None:
    """Free this thread's dequantization buffers (the next NF4 forward allocates them again)."""
    _scratch_buffers.__dict__.pop("by_dtype", None)


class _NF4Matmul(torch.autograd.Function):
    """Y = X W^T + b with W dequantized from 4 bits; backward: dE/dX = dE/dY W only (and dE/db
    when the bias trains). Nothing but the layer itself is kept for backward: no float W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: NF4Linear) -> torch.Tensor:
        ctx.layer, ctx.has_bias = layer, bias is not None
        W = layer.dequantize(out=_scratch(layer))  # (out, in) doubleDequant(c1, c2, W_NF4)
        return F.linear(x, W, bias)  # (B, T, in) @ (in, out) -> (B, T, out)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            W = ctx.layer.dequantize(out=_scratch(ctx.layer))  # (out, in), again: nothing was saved
            grad_x = grad_y @ W  # (B, T, out) @ (out, in) -> (B, T, in): dE/dX
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)  # (out,)
        return grad_x, grad_bias, None


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (+ double-quantized scales).

    Buffers (in the state dict, safetensors-friendly):
        weight_nf4     uint8 (ceil(out*in/2),)  two 4-bit codes a byte, first in the high nibble
        absmax         float32 (nb,)            without double quantization: c2, one per block
        absmax_codes   uint8 (nb,)              with it: c2 - offset as 8-bit dynamic codes
        absmax_c1      float32 (ceil(nb/256),)  ... their block scales c1
        absmax_offset  float32 ()               ... and the mean of c2
    The bias (if any) is an ordinary parameter in the compute dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, blocksize: int = 64,
                 double_quant: bool = True, compute_dtype: str | torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.double_quant = blocksize, double_quant
        self.compute_dtype = _compute_dtype(compute_dtype)
        n = out_features * in_features
        nb = -(-n // blocksize)
        self.quantized_numel = n  # weights this layer stands for (protocol counts them)
        self.register_buffer("weight_nf4", torch.zeros(-(-n // 2), dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("absmax_codes", torch.zeros(nb, dtype=torch.uint8, device=device))
            self.register_buffer("absmax_c1", torch.ones(-(-nb // DQ_BLOCKSIZE), device=device))
            self.register_buffer("absmax_offset", torch.zeros((), device=device))
        else:
            self.register_buffer("absmax", torch.ones(nb, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=self.compute_dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: str | torch.dtype = torch.float32) -> NF4Linear:
        """Quantize `linear`'s weight (Eq. 1 with the NF4 code; Eq. 6 for its scales)."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, blocksize,
                    double_quant, compute_dtype, device=w.device)
        packed, absmax = quantize_nf4(w.float(), blocksize)  # (ceil(n/2),) uint8, (nb,) float32 c2
        layer.weight_nf4.copy_(packed)
        if double_quant:
            codes, c1, offset = double_quantize(absmax, DQ_BLOCKSIZE)  # Eq. 6: c2 -> 8 bits + c1
            layer.absmax_codes.copy_(codes)
            layer.absmax_c1.copy_(c1)
            layer.absmax_offset.copy_(offset)
        else:
            layer.absmax.copy_(absmax)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
            layer.bias.requires_grad_(linear.bias.requires_grad)
        return layer

    def block_scales(self) -> torch.Tensor:
        """c2, float32 (nb,): stored, or doubleDequant's inner dequant(c1, c2_8bit) (Eq. 6)."""
        if not self.double_quant:
            return self.absmax
        return double_dequantize(self.absmax_codes, self.absmax_c1, self.absmax_offset, DQ_BLOCKSIZE)

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """W = doubleDequant(c1, c2, W_NF4), (out, in), in `dtype` (default: the compute dtype);
        a new tensor, or a view of the flat buffer `out` that it overwrites."""
        return dequantize_nf4(self.weight_nf4, self.block_scales(), (self.out_features, self.in_features),
                              self.blocksize, dtype or self.compute_dtype, out=out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        y = _NF4Matmul.apply(x.to(self.compute_dtype), bias, self)  # X doubleDequant(c1, c2, W_NF4)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


# ---------------------------------------------------------------------------- the whole model
def _shared_weights(model: nn.Module) -> set[str]:
    """Names of modules whose weight another module also holds (GPT-2's lm_head = tok_emb)."""
    owners: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(n.rpartition(".")[0])
    return {m for names in owners.values() if len(names) > 1 for m in names}


@torch.no_grad()
def quantize_model(model: nn.Module, skip: str | tuple[str, ...] = ("lm_head",), blocksize: int = 64,
                   double_quant: bool = True, compute_dtype: str | torch.dtype = torch.float32) -> nn.Module:
    """Replace, in place, every `nn.Linear` not named in `skip` (protocol.find_modules' rule: a
    name, a dotted suffix or a regular expression) by an `NF4Linear`, freeing its float weight.
    A weight shared with another module (a tied lm_head) is left in float, as in transformers."""
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    shared = _shared_weights(model)
    targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear
               and n not in shared and not any(_matches(n, p) for p in skip)]
    for n, m in targets:
        replace_module(model, n, NF4Linear.from_linear(m, blocksize, double_quant, compute_dtype))
        m.weight = None  # the float weight goes once nothing else holds the old module
    return model


def nf4_layers(model: nn.Module) -> list[tuple[str, NF4Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NF4Linear)]


# ---------------------------------------------------------------------------- QLoRA = NF4 base + LoRA
@dataclass(frozen=True)
class QLoRAConfig:
    r: int = 8  # LoRA rank R
    alpha: float = 16  # LoRA scaling s = alpha / r
    dropout: float = 0.0  # dropout on the LoRA branch's input (the paper: 0.1 up to 13B, 0.05 above)
    target_modules: str | tuple[str, ...] = ("q_proj", "v_proj")  # LoRA targets (the paper: all linear layers)
    use_rslora: bool = False  # alpha / sqrt(r) instead of alpha / r
    blocksize: int = 64  # NF4 block of weights sharing one absmax c2
    double_quant: bool = True  # quantize the c2 themselves to 8 bits (4.5 -> 4.127 bits per weight)
    compute_dtype: str = "float32"  # dequantized W and the LoRA branch: "float32", "bfloat16", "float16"
    skip: tuple[str, ...] = ("lm_head",)  # Linear layers kept in float

    def __post_init__(self) -> None:
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))  # lists from JSON
        object.__setattr__(self, "skip", (self.skip,) if isinstance(self.skip, str) else tuple(self.skip))
        dtype = str(_compute_dtype(self.compute_dtype)).removeprefix("torch.")  # torch.bfloat16 -> "bfloat16"
        object.__setattr__(self, "compute_dtype", dtype)  # a string: the config saves as JSON
        check_blocksize(self.blocksize)
        self.lora_config()  # LoRAConfig checks r, alpha, dropout

    def lora_config(self) -> LoRAConfig:
        return LoRAConfig(r=self.r, alpha=self.alpha, dropout=self.dropout,
                          target_modules=self.target_modules, use_rslora=self.use_rslora)


def apply_qlora(model: nn.Module, config: QLoRAConfig | None = None) -> nn.Module:
    """Quantize `model`'s linear layers to NF4 (+ DQ), then put LoRA on `config.target_modules`
    (in the compute dtype; default QLoRAConfig()). Only the LoRA matrices train. Returns the model."""
    config = config or QLoRAConfig()
    if nf4_layers(model):
        raise ValueError("the model is already quantized; apply_qlora quantizes a float base model "
                         "(use minituner.lora.apply_lora(model, cfg, types=(NF4Linear,)) to add LoRA)")
    find_modules(model, config.target_modules)  # a pattern that matches nothing fails before quantizing
    quantize_model(model, config.skip, config.blocksize, config.double_quant, config.compute_dtype)
    apply_lora(model, config.lora_config(), types=(NF4Linear, nn.Linear))
    model.minituner_techniques.pop()  # apply_lora recorded "lora"; load_adapter must re-apply "qlora"
    mark_applied(model, "qlora", config)
    return model


# ---------------------------------------------------------------------------- saving a quantized model
QUANT_CONFIG = "quantization.json"  # beside checkpoint.save's config.json and model.safetensors


def save_quantized(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write a quantized base model (after `quantize_model`): config.json (its ModelConfig),
    quantization.json (blocksize, double_quant, compute_dtype, the quantized module names) and
    model.safetensors holding NF4 codes and scales, never a float copy of a quantized weight."""
    from minituner.checkpoint import CONFIG_NAME, WEIGHTS_NAME, _tied
    from minituner.lora import lora_layers

    layers = nf4_layers(model)
    if not layers:
        raise ValueError("the model has no NF4Linear layers; quantize it first (minituner.qlora.quantize_model) "
                         "or save it with minituner.checkpoint.save")
    if lora_layers(model) or getattr(model, "minituner_techniques", None):
        raise ValueError("save_quantized writes a quantized base model; save a QLoRA adapter with "
                         "minituner.protocol.save_adapter (loading re-quantizes the plain base)")
    first = layers[0][1]
    if any((m.blocksize, m.double_quant, m.compute_dtype) != (first.blocksize, first.double_quant,
                                                             first.compute_dtype) for _, m in layers):
        raise ValueError("the NF4Linear layers differ in blocksize/double_quant/compute_dtype; "
                         "quantize the whole model with one quantize_model call")
    quant = {"blocksize": first.blocksize, "double_quant": first.double_quant,
             "compute_dtype": str(first.compute_dtype).removeprefix("torch."), "modules": [n for n, _ in layers]}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if _tied(model):
        state.pop("lm_head.weight")  # it is tok_emb.weight (safetensors refuses shared storage)
    with atomic_directory(directory) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "quantization": "nf4"})
        (tmp / CONFIG_NAME).write_text(json.dumps(model.config.to_dict(), indent=2, sort_keys=True) + "\n")
        (tmp / QUANT_CONFIG).write_text(json.dumps(quant, indent=1) + "\n")
    return Path(directory)


def load_quantized(directory: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Inverse of `save_quantized`: the model is built on the meta device, its quantized layers
    as empty NF4Linear, and the saved tensors become its buffers and parameters (no float
    weight is ever materialized); the logits equal the saved model's bit for bit."""
    from minituner.checkpoint import (
        CONFIG_NAME,
        _model_config,
        load_checked,
        read_json,
        read_safetensors,
    )
    from minituner.model import Transformer

    d = Path(directory)
    if not (d / QUANT_CONFIG).is_file():
        raise FileNotFoundError(f"no {QUANT_CONFIG} in {d}; save a quantized model with "
                                "minituner.qlora.save_quantized (or load a float one with checkpoint.load)")
    quant = read_json(d / QUANT_CONFIG)
    with torch.device("meta"):
        model = Transformer(_model_config(d / CONFIG_NAME))
    for name in quant["modules"]:
        old = model.get_submodule(name)
        replace_module(model, name, NF4Linear(old.in_features, old.out_features, old.bias is not None,
                                              quant["blocksize"], quant["double_quant"], quant["compute_dtype"],
                                              device=device))
    load_checked(model, {k: v.to(device) for k, v in read_safetensors(d).items()}, assign=True)
    return model.eval()


# ---------------------------------------------------------------------------- bitsandbytes' view
def bnb_quant_state(layer: NF4Linear):
    """A `bitsandbytes.functional.QuantState` over this layer's buffers (no copy of the codes):
    bitsandbytes' dequantize_4bit(layer.weight_nf4.view(-1, 1), state) gives `layer.dequantize()`."""
    from bitsandbytes.functional import QuantState

    from minituner.kernels.blockwise import dynamic_code
    from minituner.kernels.nf4 import NF4_CODE

    shape = torch.Size((layer.out_features, layer.in_features))
    device = layer.weight_nf4.device
    if not layer.double_quant:
        return QuantState(absmax=layer.absmax, shape=shape, code=NF4_CODE.to(device), blocksize=layer.blocksize,
                          quant_type="nf4", dtype=layer.compute_dtype)
    state2 = QuantState(absmax=layer.absmax_c1, code=dynamic_code(signed=True).to(device),
                        blocksize=DQ_BLOCKSIZE, dtype=torch.float32)
    return QuantState(absmax=layer.absmax_codes, shape=shape, code=NF4_CODE.to(device), blocksize=layer.blocksize,
                      quant_type="nf4", dtype=layer.compute_dtype, offset=layer.absmax_offset, state2=state2)


def _bnb_tensors(layer: NF4Linear, key: str) -> dict[str, torch.Tensor]:
    """bitsandbytes' Linear4bit serialization of one weight (transformers' save_pretrained names):
    key (uint8 codes, (ceil(n/2), 1)), key.absmax, key.quant_map, key.nested_absmax,
    key.nested_quant_map and key.quant_state.bitsandbytes__nf4 (the JSON of the rest, as bytes)."""
    from minituner.kernels.blockwise import dynamic_code
    from minituner.kernels.nf4 import NF4_CODE

    info = {"quant_type": "nf4", "blocksize": layer.blocksize,
            "dtype": str(layer.compute_dtype).removeprefix("torch."),
            "shape": [layer.out_features, layer.in_features]}
    out = {key: layer.weight_nf4.view(-1, 1), f"{key}.quant_map": NF4_CODE.clone()}
    if layer.double_quant:
        out.update({f"{key}.absmax": layer.absmax_codes, f"{key}.nested_absmax": layer.absmax_c1,
                    f"{key}.nested_quant_map": dynamic_code(signed=True)})
        info.update(nested_blocksize=DQ_BLOCKSIZE, nested_dtype="float32",
                    nested_offset=float(layer.absmax_offset))  # float32 -> float64 -> float32: exact
    else:
        out[f"{key}.absmax"] = layer.absmax
    out[f"{key}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(info).encode()), dtype=torch.uint8)
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def _hf_module(name: str, config) -> str:
    """Hugging Face's module name for our Linear `name` (checkpoint.save_hf's renaming)."""
    from minituner.checkpoint import to_hf_state_dict

    if name == "lm_head":
        return "lm_head"
    if config.family == "gpt2" and (g := re.fullmatch(r"blocks\.(\d+)\.attn\.[qkv]_proj", name)):
        return f"transformer.h.{g.group(1)}.attn.c_attn"  # q, k, v are one fused tensor there
    (key,) = to_hf_state_dict({f"{name}.weight": torch.empty(0, 0, device="meta")}, config)
    return key.removesuffix(".weight")


def save_hf_quantized(model: nn.Module, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Write a quantized base model as transformers + bitsandbytes write a 4-bit one
    (`save_pretrained` after `load_in_4bit=True`): checkpoint.save_hf's names and layouts, each
    quantized weight as bitsandbytes' Linear4bit tensors, and a `quantization_config` in
    config.json; `AutoModelForCausalLM.from_pretrained(dir)` then gives this model's logits.
    GPT-2's fused c_attn is q, k, v's rows stacked: their codes and scales concatenate, but one
    tensor has one double-quantization offset, so its scales are double-quantized again from
    q, k, v's dequantized ones (a change of at most one 8-bit scale step)."""
    from minituner import checkpoint

    layers = dict(nf4_layers(model))
    if not layers:
        raise ValueError("the model has no NF4Linear layers; quantize it first (quantize_model) "
                         "or write a float model with minituner.checkpoint.save_hf")
    config = model.config
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()
             if k.rpartition(".")[0] not in layers or k.endswith(".bias")}
    for n, m in layers.items():  # placeholders: save_hf's renaming, no float copy
        state[f"{n}.weight"] = torch.empty(m.out_features, m.in_features, device="meta")
    try:
        hf = checkpoint.to_hf_state_dict(state, config)
    except (RuntimeError, NotImplementedError):
        raise ValueError("GPT-2's q_proj, k_proj, v_proj are one c_attn tensor in Hugging Face's layout: "
                         "quantize all three or none of them (quantize_model's skip)") from None
    tensors = {k: v for k, v in hf.items() if v.device.type != "meta"}
    fused: dict[str, list[NF4Linear]] = {}
    for n, m in layers.items():
        key = _hf_module(n, config) + ".weight"
        if config.family == "gpt2" and n.endswith(("q_proj", "k_proj", "v_proj")):
            fused.setdefault(key, []).append(m)  # c_attn: q, k, v in this order (named_modules order)
        else:
            tensors.update(_bnb_tensors(m, key))
    for key, (q, k, v) in fused.items():  # (3C, C): rows of q, k, v; their blocks never straddle
        stacked = NF4Linear(q.in_features, 3 * q.out_features, False, q.blocksize, q.double_quant, q.compute_dtype)
        stacked.weight_nf4 = torch.cat([q.weight_nf4, k.weight_nf4, v.weight_nf4])
        c2 = torch.cat([q.block_scales(), k.block_scales(), v.block_scales()])
        if q.double_quant:
            stacked.absmax_codes, stacked.absmax_c1, stacked.absmax_offset = double_quantize(c2, DQ_BLOCKSIZE)
        else:
            stacked.absmax = c2
        tensors.update(_bnb_tensors(stacked, key))
    skipped = sorted({_hf_module(n, config) for n, m in model.named_modules() if type(m) is nn.Linear})
    first = next(iter(layers.values()))
    hf_cfg = checkpoint.hf_config(config, tokenizer)
    hf_cfg["dtype"] = "float32"
    hf_cfg["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": first.double_quant,
        "bnb_4bit_compute_dtype": str(first.compute_dtype).removeprefix("torch."), "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": sorted(set(skipped)) or None, "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / checkpoint.WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / checkpoint.CONFIG_NAME).write_text(json.dumps(hf_cfg, indent=2) + "\n", encoding="utf-8")
    return Path(directory)
