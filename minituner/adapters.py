"""Bottleneck adapters (Chapter 04).

Papers
------
- Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", arXiv:1902.00751.
- Pfeiffer et al. 2021, "AdapterFusion", arXiv:2005.00247 (one adapter per layer, after
  the feed-forward sublayer, is as good as two and cheaper).

An adapter is a small bottleneck MLP with a skip connection, inserted into every layer of a
frozen transformer (Houlsby Sec. 2.1 and Fig. 2). With d the model width and m << d:

    adapter(h) = h + W_up f(W_down h + b_down) + b_up                         (Houlsby Fig. 2)

    W_down (m, d), b_down (m,), W_up (d, m), b_up (d,):   2md + d + m parameters each,
    m = d / reduction_factor (Pfeiffer's name for d / m).

It acts on a sublayer's output before the block adds its own residual (and, in BERT, before
its LayerNorm):

         x ----------------------------------------+
         |                                         |
    [attention ... o_proj] --> h --+--> down --> f --> up --+--> (+) --> x + ...
                                   |                       |
                                   +------- skip ----------+ adapter(h)

    placement="houlsby":  after attn.o_proj and after the whole MLP: 2 adapters per layer
    placement="pfeiffer": after the MLP only:                         1 adapter per layer

So a model with L layers gains L * k * (2md + d + m) trainable parameters (k = 2 or 1).
With init="zeros" (W_up = 0, b_up = 0) every adapter is the identity, so the adapted model
computes exactly the base model at the start of training; init="near_identity" is
Houlsby's: both projections drawn from a zero-mean normal with standard deviation 1e-2
(truncated at two deviations), so the model starts near the base.

Adapters attach by module wrapping (seam 1 of minituner.model): `Adapted` holds the original
module and calls it, and under `protocol.disable_adapters` returns its output untouched.
Pfeiffer's variant here keeps the block's residual and norms as they are (adapter-
transformers' "pfeiffer" config also re-routes the residual around the MLP's LayerNorm).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minituner.model import RMSNorm
from minituner.protocol import Injected, applied, find_modules, freeze, mark_applied, replace_module

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh}
PLACEMENTS = {  # where the adapters go: module name patterns (see minituner.model)
    "houlsby": ("attn.o_proj", "mlp"),
    "pfeiffer": ("mlp",),
}
INITS = ("zeros", "near_identity")


@dataclass(frozen=True)
class AdapterConfig:
    placement: str = "houlsby"  # "houlsby": after attention and MLP; "pfeiffer": after the MLP only
    reduction_factor: int = 16  # d / m: the bottleneck width m is d // reduction_factor
    activation: str = "relu"  # f, the bottleneck's non-linearity
    init: str = "zeros"  # "zeros": W_up = 0 (exactly the base); "near_identity": N(0, 1e-2) both
    train_layernorms: bool = False  # also train every LayerNorm/RMSNorm gain (and bias), in place

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement={self.placement!r}; use one of {sorted(PLACEMENTS)}")
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 1:
            raise ValueError(f"reduction_factor={self.reduction_factor!r} must be a positive integer")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}; use one of {sorted(ACTIVATIONS)}")
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r}; use one of {INITS}")


class Adapter(nn.Module):
    """adapter(h) = h + W_up f(W_down h + b_down) + b_up, on h (..., d)."""

    def __init__(self, d: int, m: int, activation: str = "relu", init: str = "zeros") -> None:
        super().__init__()
        if m < 1 or d < 1:
            raise ValueError(f"an adapter needs d >= 1 and m >= 1, got d={d}, m={m}")
        self.down = nn.Linear(d, m)  # W_down (m, d), b_down (m,)
        self.up = nn.Linear(m, d)  # W_up (d, m), b_up (d,)
        self.act = ACTIVATIONS[activation]  # f
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str = "zeros") -> None:
        std = 1e-2  # Houlsby Sec. 3.6: near-identity, N(0, 1e-2) truncated at two deviations
        nn.init.trunc_normal_(self.down.weight, std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)
        if init == "zeros":
            nn.init.zeros_(self.up.weight)  # W_up = 0: adapter(h) = h exactly
        elif init == "near_identity":
            nn.init.trunc_normal_(self.up.weight, std=std, a=-2 * std, b=2 * std)
        else:
            raise ValueError(f"init={init!r}; use one of {INITS}")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.act(self.down(h))  # f(W_down h + b_down), (..., m)
        return h + self.up(z)  # h + W_up z + b_up, (..., d)


class Adapted(Injected):
    """A module followed by an adapter: adapter(base(...)); while disabled, base(...)."""

    def __init__(self, base: nn.Module, adapter: Adapter) -> None:
        super().__init__()
        self.base = base  # the original module, frozen, called as it was
        self.adapter = adapter

    def forward(self, *args, **kwargs) -> torch.Tensor:
        h = self.base(*args, **kwargs)  # the sublayer's output, (B, T, C)
        return h if self.disabled else self.adapter(h)  # before the block's residual add


def bottleneck(d: int, reduction_factor: int) -> int:
    """m = d // reduction_factor, at least 1."""
    m = d // reduction_factor
    if m < 1:
        raise ValueError(f"reduction_factor={reduction_factor} leaves no bottleneck for width d={d}; "
                         f"use a reduction_factor <= {d}")
    return m


def adapter_parameters(d: int, m: int) -> int:
    """Parameters of one adapter: W_down and W_up (m*d each), b_down (m), b_up (d)."""
    return 2 * m * d + d + m


def apply_adapters(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Freeze `model`, insert an adapter after every targeted sublayer, make the adapters
    (and, with train_layernorms, the norms) trainable; returns the model."""
    if any(t["technique"] == "adapters" for t in applied(model)) or \
            any(isinstance(m, Adapted) for m in model.modules()):
        raise ValueError("the model already has adapters; build a fresh base model to apply them again "
                         "(or load_adapter(fresh_model, dir))")
    d = model.config.n_embd
    m = bottleneck(d, config.reduction_factor)
    targets = find_modules(model, PLACEMENTS[config.placement], types=None)
    freeze(model)
    for name, module in targets:
        ref = next((p for p in module.parameters() if p.is_floating_point()), None)
        adapter = Adapter(d, m, config.activation, config.init)
        if ref is not None:
            adapter.to(ref.device, ref.dtype)
        replace_module(model, name, Adapted(module, adapter))  # trainable: requires_grad=True
    if config.train_layernorms:
        for module in model.modules():
            if isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.requires_grad_(True)
    mark_applied(model, "adapters", config)
    return model
