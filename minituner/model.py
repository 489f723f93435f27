"""One small transformer that is GPT-2, Llama or BERT by configuration.

Papers
------
- Attention: Vaswani et al. 2017, arXiv:1706.03762, Eq. 1
      Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V
- GPT-2: Radford et al. 2019 (pre-LayerNorm, learned positions, GELU, tied embeddings).
- Llama: Touvron et al. 2023, arXiv:2302.13971 (pre-RMSNorm, RoPE, SwiGLU, no biases), with
  grouped-query attention (Ainslie et al. 2023, arXiv:2305.13245): H query heads share
  H_kv key/value heads, H_kv divides H.
- RMSNorm: Zhang & Sennrich 2019, arXiv:1910.07467, Eq. 4:  a_i / RMS(a) * g_i,
  RMS(a) = sqrt(mean(a^2) + eps).
- RoPE: Su et al. 2021, arXiv:2104.09864, Eq. 34:  R x = x * cos(m theta) + rot(x) * sin(m theta),
  with theta_i = base^(-2i/D). rot() is Hugging Face's `rotate_half` convention (first half of
  the head dim pairs with the second half), so Llama checkpoints load without permuting q/k.
- SwiGLU: Shazeer 2020, arXiv:2002.05202, Eq. 6:  FFN(x) = (Swish(x W) * x V) W2.
- GELU: Hendrycks & Gimpel 2016, arXiv:1606.08415 (GPT-2 uses the tanh approximation,
  BERT the exact erf form).
- BERT: Devlin et al. 2018, arXiv:1810.04805 (post-LayerNorm, token-type embeddings,
  bidirectional attention, LayerNorm on the embeddings).

Shapes: B batch, T time (new tokens), S keys (prefix + cache + new), P prefix length,
C channels, H heads, H_kv key/value heads, D head dim, V vocab.

Families are configurations
---------------------------
`family` names a checkpoint layout and sets the defaults of the architectural fields below;
the code reads only the fields, never the family. Set a field to override its default:
Qwen2 is `ModelConfig(family="llama", qkv_bias=True)`, Mistral is `family="llama"`.

    field         gpt2        llama     bert
    norm          layernorm   rmsnorm   layernorm
    positions     learned     rope      learned
    mlp           gelu_tanh   swiglu    gelu
    post_norm     False       False     True
    causal        True        True      False
    bias          True        False     True     (qkv_bias, mlp_bias: None -> bias)
    lm_head       True        True      False
    tie_embeddings True       False     False
    token_types   False       False     True
    emb_norm      False       False     True

Module names (stable: LoRA and adapters target them)
----------------------------------------------------
    tok_emb, pos_emb (positions="learned"), type_emb (token_types), emb_norm (emb_norm)
    blocks.{i}.attn_norm, blocks.{i}.attn.{q_proj,k_proj,v_proj,o_proj}
    blocks.{i}.mlp_norm,  blocks.{i}.mlp.{fc,proj}                    (mlp="gelu", "gelu_tanh")
                          blocks.{i}.mlp.{gate_proj,up_proj,down_proj} (mlp="swiglu")
    norm_f (pre-norm only), lm_head (lm_head; tied to tok_emb when tie_embeddings)
Pre-norm (gpt2, llama): x = x + attn(attn_norm(x)); x = x + mlp(mlp_norm(x)).
Post-norm (bert):       x = attn_norm(x + attn(x)); x = mlp_norm(x + mlp(x)).

Without an LM head (bert) `forward` returns the final hidden states (B, T, C) (BertModel's
`last_hidden_state`, pooler dropped); heads live in `minituner.heads`.

The three seams every technique attaches through
------------------------------------------------
::

    input_ids --tok_emb--> x (B,T,C) --+                 (3) inputs_embeds=(B,T,C) replaces
                                       |                     the lookup: soft prompts are
    inputs_embeds (B,T,C) ------------>+                     prepended by the caller
                                       v
          +------------- block i ------------------------------------------+
          |  q = q_proj(x)  k = k_proj(x)  v = v_proj(x)   (1) every Linear |
          |                                                    may be wrapped|
          |  K = [ prefix_kv[i][0] | cache | k ]   (2) prefix keys/values    |
          |  V = [ prefix_kv[i][1] | cache | v ]       (B,H_kv,P,D), always  |
          |  y = o_proj(softmax(q K^T/sqrt(D) + mask) V)   attended to        |
          +-----------------------------------------------------------------+

1. Module wrapping: LoRA, adapters and NF4 replace an `nn.Linear` (found by the names above)
   with a module that holds the original and calls it; nothing here is subclassed.
2. Extra keys/values: `prefix_kv` is a list (one per layer) of (k, v), each (B, H_kv, P, D),
   already in the rotated (RoPE) space (a batch of 1 is broadcast). Every query attends to all
   P prefix slots; the padding mask covers only real tokens, the prefix columns are added to
   it here. Prefix slots take no positions: the first real token is at position 0.
3. Input embeddings: `forward(inputs_embeds=...)` skips the token lookup
   (`get_input_embeddings()` is `tok_emb`); positions still count the embedded slots.

Padding: attention_mask (B, T) is 1 for real tokens, 0 for padding, left or right.
Position ids are derived from it (cumsum - 1), so a padded row gets the same positions as the
unpadded one. With a KV cache the mask covers cache + new tokens. Outputs at pad positions are
unspecified (zeros when padding is skipped, below). Without an attention_mask (and no prefix or
cache) SDPA runs with is_causal=True; with one, a boolean mask is always built on the device:
deciding from its values whether there is any padding would need a host sync in every step.

Skipping padding (the fast path, CPU only): every layer but attention works token by token, so
on the CPU, where reading the mask costs no device sync, a padded batch runs its norms,
projections, MLPs and the LM head on the N real tokens only (`Rows`: (B, T, C) -> (N, C)), and
attention alone sees the padded (B, H, T, D) layout. A batch that is 23% padding does 23%
fewer matrix products; the real tokens' outputs are the same (test_model checks it against
`skip_padding = False`, the plain path).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

FAMILIES = ("gpt2", "llama", "bert")  # model families (checkpoint layouts), not world.py's tasks
_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)  # SDPA enable_gqa

# Each family's architecture, the default of every None field below (table in the docstring).
_FAMILY_DEFAULTS = {
    "gpt2": dict(norm="layernorm", positions="learned", mlp="gelu_tanh", post_norm=False, causal=True,
                 bias=True, lm_head=True, tie_embeddings=True, token_types=False, emb_norm=False),
    "llama": dict(norm="rmsnorm", positions="rope", mlp="swiglu", post_norm=False, causal=True,
                  bias=False, lm_head=True, tie_embeddings=False, token_types=False, emb_norm=False),
    "bert": dict(norm="layernorm", positions="learned", mlp="gelu", post_norm=True, causal=False,
                 bias=True, lm_head=False, tie_embeddings=False, token_types=True, emb_norm=True),
}
_CHOICES = {"norm": ("layernorm", "rmsnorm"), "positions": ("learned", "rope"),
            "mlp": ("gelu", "gelu_tanh", "swiglu")}
_SIZES = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head",
          "intermediate_size", "head_dim", "type_vocab_size")
_FLAGS = ("post_norm", "causal", "bias", "qkv_bias", "mlp_bias", "lm_head", "tie_embeddings",
          "token_types", "emb_norm")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a `Transformer`; None fields take the family's default."""

    family: str = "gpt2"  # "gpt2" | "llama" | "bert": checkpoint layout, defaults of the fields below
    vocab_size: int = 50257  # V, rows of the token embedding
    block_size: int = 1024  # maximum positions (learned table size, or RoPE range)
    n_layer: int = 12  # number of blocks
    n_head: int = 12  # H, query heads
    n_kv_head: int | None = None  # H_kv, key/value heads (grouped-query attention); None -> H
    n_embd: int = 768  # C, residual stream width
    intermediate_size: int | None = None  # MLP hidden width; None -> 4 * C
    head_dim: int | None = None  # D; None -> C // H (some Llama checkpoints set it)
    norm_eps: float = 1e-5  # epsilon of LayerNorm / RMSNorm
    rope_theta: float = 10000.0  # RoPE base (positions="rope")
    type_vocab_size: int = 2  # token-type (segment) embeddings (token_types)
    dropout: float = 0.0  # residual, embedding and attention dropout
    bias: bool | None = None  # biases in Linear layers (not lm_head)
    tie_embeddings: bool | None = None  # lm_head shares tok_emb
    # -- architecture; None -> the family's default -----------------------------------------
    norm: str | None = None  # "layernorm" | "rmsnorm"
    positions: str | None = None  # "learned" (pos_emb table) | "rope" (rotary, in attention)
    mlp: str | None = None  # "gelu" (erf) | "gelu_tanh" (GPT-2's gelu_new) | "swiglu" (gated)
    post_norm: bool | None = None  # norm after each residual add (BERT) instead of before
    causal: bool | None = None  # a query sees only earlier tokens (decoder) or all (encoder)
    qkv_bias: bool | None = None  # biases in q/k/v_proj (Qwen2: True with bias=False); None -> bias
    mlp_bias: bool | None = None  # biases in the MLP's Linears; None -> bias
    lm_head: bool | None = None  # a vocabulary head: forward returns logits, else hidden states
    token_types: bool | None = None  # add token-type (segment) embeddings, type_emb
    emb_norm: bool | None = None  # LayerNorm on the embedding sum, emb_norm

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r} is not one of {FAMILIES}")
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        for name in _SIZES:  # before any arithmetic: 256.0, "256" or True are not sizes
            value = getattr(self, name)
            if value is None and name in ("n_kv_head", "intermediate_size", "head_dim"):
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            set_(name, int(value))  # numpy integers -> int, so to_dict stays JSON
        for name, default in _FAMILY_DEFAULTS[self.family].items():
            if getattr(self, name) is None:
                set_(name, default)
        for name in ("qkv_bias", "mlp_bias"):
            if getattr(self, name) is None:
                set_(name, self.bias)
        if self.n_kv_head is None:
            set_("n_kv_head", self.n_head)
        if self.intermediate_size is None:
            set_("intermediate_size", 4 * self.n_embd)
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_head={self.n_head} must divide n_embd={self.n_embd} "
                                 "(or set head_dim explicitly)")
            set_("head_dim", self.n_embd // self.n_head)
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {choices}")
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True, False or None, got {getattr(self, name)!r}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.tie_embeddings and not self.lm_head:
            raise ValueError("tie_embeddings=True needs lm_head=True (there is no head to tie)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Inverse of `to_dict`; dicts written before a field existed load with its default."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019, Eq. 4), computed in float32 like Llama."""

    fast = True  # float32: the same values through _RMSNormFunction's hand-derived backward

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast and x.dtype == self.weight.dtype == torch.float32:
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)  # a_i / RMS(a)
        return self.weight * h.to(x.dtype)  # * g_i


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm's fast path: the forward above, and its backward derived by hand, which makes
    half the passes over x that autograd makes through pow, mean, rsqrt and two products
    (test_model checks both paths agree). With y = g * x * r, r = (mean(x^2) + eps)^(-1/2):

        dL/dx = r * u - x * r^3 * mean(u * x),  u = dL/dy * g      dL/dg = sum over tokens of dL/dy * x * r
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # 1 / RMS(a), (..., 1)
        ctx.save_for_backward(x, weight, r)
        return weight * (x * r)  # (..., C)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        u = dy * weight  # (..., C)
        dx = torch.addcmul(u * r, x, (u * x).mean(-1, keepdim=True) * r.pow(3), value=-1.0)
        dw = (dy * x * r).reshape(-1, x.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int,
                 theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of m * theta_i for positions m (B, T): each (B, 1, T, D), in float32."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=position_ids.device,
                                       dtype=torch.float32) / head_dim)  # theta_i, (D/2,)
    freqs = position_ids.float()[..., None] * inv_freq  # m * theta_i, (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D), rotate_half layout
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (Su et al. 2021, Eq. 34) on x (B, H, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)  # rot(x): rotate_half
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # x is bf16/fp16 under autocast
    return x * cos + rotated * sin  # x cos(m theta) + rot(x) sin(m theta)


class KVCache:
    """Keys and values of the tokens seen so far, per layer, preallocated to `max_len`.

    Each layer writes its new keys at [length, length + T); `advance(T)` runs once after all
    layers. Buffers are allocated on the first write, with the keys' dtype and device.
    """

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, T, D = k.shape
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} needed. "
                             "Create a larger KVCache(max_len=...).")
        if layer not in self.k:
            self.k[layer] = k.new_empty(B, H, self.max_len, D)
            self.v[layer] = v.new_empty(B, H, self.max_len, D)
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, H_kv, past+T, D)

    def advance(self, n: int) -> None:
        self.length += n


class Rows:
    """The real tokens of a padded batch as rows: gather (B, T, ...) -> (N, ...), scatter back
    with zeros at the pads. N = the number of 1s in attention_mask (B, T), read on the host.
    Each is the other's gradient (every position is one row or one pad), so neither backward
    zero-fills more than the pad rows."""

    def __init__(self, attention_mask: torch.Tensor) -> None:
        real = attention_mask.bool().reshape(-1)  # (B*T,)
        self.B, self.T = attention_mask.shape
        self.index = real.nonzero().squeeze(1)  # (N,) flat positions b*T + t
        self.pads = (~real).nonzero().squeeze(1)  # (B*T - N,)
        self.padded = len(self.pads) > 0
        real = real.view(self.B, self.T)
        self.right_padded = not bool((real[:, 1:] & ~real[:, :-1]).any())  # no real token after a pad

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return _Gather.apply(x.reshape(self.B * self.T, *x.shape[2:]), self)  # (N, ...)

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        return _Scatter.apply(x, self).view(self.B, self.T, *x.shape[1:])  # (B, T, ...)

    def _scatter(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(self.B * self.T, *x.shape[1:])  # (B*T, ...)
        out.index_fill_(0, self.pads, 0)  # zeros at the pads only
        return out.index_copy_(0, self.index, x)  # in place: out-of-place index_copy is ~10x slower on the CPU


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: Rows) -> torch.Tensor:
        ctx.rows = rows
        return x.index_select(0, rows.index)  # (N, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.rows._scatter(grad), None  # (B*T, ...): zeros at the pads


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: Rows) -> torch.Tensor:
        ctx.rows = rows
        return rows._scatter(x)  # (B*T, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.index_select(0, ctx.rows.index), None  # (N, ...)


class Attention(nn.Module):
    """Multi-head (grouped-query) attention with separate q/k/v/o projections."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        C, H, Hkv, D = config.n_embd, config.n_head, config.n_kv_head, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = H, Hkv, D
        self.q_proj = nn.Linear(C, H * D, bias=config.qkv_bias)
        self.k_proj = nn.Linear(C, Hkv * D, bias=config.qkv_bias)
        self.v_proj = nn.Linear(C, Hkv * D, bias=config.qkv_bias)
        self.o_proj = nn.Linear(H * D, C, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, layer: int = 0, rows: Rows | None = None) -> torch.Tensor:
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q = self.q_proj(x).unflatten(-1, (H, D))  # (B, T, H, D), or (N, H, D) with rows
        k = self.k_proj(x).unflatten(-1, (Hkv, D))  # (B, T, H_kv, D), or (N, H_kv, D)
        v = self.v_proj(x).unflatten(-1, (Hkv, D))
        if rope is not None:  # cos, sin: (B|1, T, 1, D), or (N, 1, D)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if rows is not None:  # padding skipped: attention alone needs the padded layout
            q, k, v = rows.scatter(q), rows.scatter(k), rows.scatter(v)  # (B, T, ·, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D), (B, H_kv, T, D)
        B, _, T, _ = q.shape
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H_kv, past+T, D)
        if prefix is not None:  # seam 2: prefix keys/values in front
            pk, pv = prefix
            k = torch.cat((pk.to(k.dtype).expand(B, -1, -1, -1), k), dim=2)  # (B, H_kv, S, D)
            v = torch.cat((pv.to(v.dtype).expand(B, -1, -1, -1), v), dim=2)  # (B, H_kv, S, D)
        gqa = {}
        if Hkv != H:
            if _HAS_GQA:
                gqa = {"enable_gqa": True}
            else:  # each key/value head serves H / H_kv query heads
                k = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, S, D)
                v = v.repeat_interleave(H // Hkv, dim=1)
        y = F.scaled_dot_product_attention(  # softmax(q k^T / sqrt(D) + mask) v, Eq. 1
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0, **gqa)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
        if rows is not None:
            y = rows.gather(y)  # (N, H*D)
        return self.o_proj(y)  # (B, T, C), or (N, C)


class MLP(nn.Module):
    """GPT-2 / BERT feed-forward: proj(GELU(fc(x)))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.intermediate_size, bias=config.mlp_bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.mlp_bias)
        self.approximate = "tanh" if config.mlp == "gelu_tanh" else "none"  # GPT-2's gelu_new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate=self.approximate))


class GatedMLP(nn.Module):
    """Llama feed-forward, SwiGLU (Shazeer 2020, Eq. 6): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        C, I, bias = config.n_embd, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(C, I, bias=bias)  # W
        self.up_proj = nn.Linear(C, I, bias=bias)  # V
        self.down_proj = nn.Linear(I, C, bias=bias)  # W2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (Swish(xW) * xV) W2


class Block(nn.Module):
    """One transformer layer, pre-norm (gpt2, llama) or post-norm (bert)."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.post_norm = layer, config.post_norm
        self.attn_norm = make_norm(config)
        self.attn = Attention(config)
        self.mlp_norm = make_norm(config)
        self.mlp = GatedMLP(config) if config.mlp == "swiglu" else MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                rope=None, prefix=None, cache: KVCache | None = None, rows: Rows | None = None) -> torch.Tensor:
        if self.post_norm:
            x = self.attn_norm(x + self.drop(self.attn(x, mask, is_causal, rope, prefix, cache, self.layer, rows)))
            return self.mlp_norm(x + self.drop(self.mlp(x)))
        x = x + self.drop(self.attn(self.attn_norm(x), mask, is_causal, rope, prefix, cache, self.layer, rows))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Transformer(nn.Module):
    """GPT-2, Llama or BERT, chosen by the config's fields; see the module docstring."""

    skip_padding = True  # CPU fast path: token-wise layers on the real tokens only (docstring)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"Transformer needs a ModelConfig, got {type(config).__name__}")
        self.config = config
        C = config.n_embd
        self.tok_emb = nn.Embedding(config.vocab_size, C)
        if config.positions == "learned":
            self.pos_emb = nn.Embedding(config.block_size, C)
        if config.token_types:
            self.type_emb = nn.Embedding(config.type_vocab_size, C)
        if config.emb_norm:
            self.emb_norm = make_norm(config)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        if not config.post_norm:  # pre-norm leaves the residual stream unnormalized
            self.norm_f = make_norm(config)
        if config.lm_head:
            self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2L)
            if name.endswith(("o_proj.weight", "mlp.proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok_emb

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights counted once

    # -- masks and positions ----------------------------------------------------------------
    def _mask(self, attention_mask: torch.Tensor | None, B: int, T: int, past: int, P: int,
              device: torch.device, document_ids: torch.Tensor | None = None
              ) -> tuple[torch.Tensor | None, bool]:
        """Boolean SDPA mask (B|1, 1, T, S), True = attend, or None with is_causal.

        `document_ids` (B, T), for packed sequences: a query sees only keys of its own document
        (block-diagonal, and causal within a block), so packed examples never attend to each
        other; prefix slots stay visible to all. Decided from shapes only, never from the
        mask's values (that would be a host sync).
        """
        causal = self.config.causal
        if attention_mask is None and document_ids is None:
            if not causal or T == 1:  # every query sees every key (one new query sees its past)
                return None, False
            if past == 0 and P == 0:  # plain causal: SDPA's fused kernels build it themselves
                return None, True
        S = P + past + T
        allowed = torch.ones(T, S, dtype=torch.bool, device=device)  # (T, S)
        if causal:  # query at position past+i sees token keys 0..past+i, and every prefix slot
            q_pos = torch.arange(past, past + T, device=device)[:, None]  # (T, 1)
            allowed[:, P:] = torch.arange(past + T, device=device)[None] <= q_pos  # (T, past+T)
        if document_ids is not None:  # block diagonal: same document only, (B, T, T)
            same = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
            allowed = allowed[None].repeat(document_ids.shape[0], 1, 1)  # (B, T, S)
            allowed[:, :, P:] &= same
        if attention_mask is None:
            return (allowed if allowed.dim() == 3 else allowed[None])[:, None], False  # (B|1, 1, T, S)
        keys = torch.cat((attention_mask.new_ones(B, P), attention_mask), 1).bool()  # (B, S)
        allowed = allowed & keys[:, None, :]  # (B, T, S): no query sees a pad key
        # a pad query sees at least itself: no softmax row is empty (its output is unspecified)
        allowed[:, :, P + past:] |= torch.eye(T, dtype=torch.bool, device=device)  # (B, T, T)
        return allowed[:, None], False  # (B, 1, T, S)

    @staticmethod
    def _document_positions(document_ids: torch.Tensor) -> torch.Tensor:
        """Positions that restart at 0 where each packed document starts: (B, T) -> (B, T)."""
        T = document_ids.shape[1]
        t = torch.arange(T, device=document_ids.device).expand_as(document_ids)  # (B, T)
        starts = torch.ones_like(document_ids, dtype=torch.bool)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]  # (B, T) first token of a document
        return t - torch.where(starts, t, torch.zeros_like(t)).cummax(1).values  # t - its document's start

    # -- the backbone -----------------------------------------------------------------------
    def _backbone(self, input_ids=None, inputs_embeds=None, attention_mask=None,
                  token_type_ids=None, position_ids=None, prefix_kv=None,
                  kv_cache: KVCache | None = None, document_ids=None,
                  head: nn.Module | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C), or head(them) (B, T, ·) when a token-wise head is given."""
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, T) or inputs_embeds (B, T, C)")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
            x = self.tok_emb(input_ids)  # (B, T, C)
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != cfg.n_embd:
                raise ValueError(f"inputs_embeds must be (B, T, {cfg.n_embd}), "
                                 f"got {tuple(inputs_embeds.shape)}")
            x = inputs_embeds  # seam 3
        B, T, _ = x.shape
        device = x.device
        past = kv_cache.length if kv_cache is not None else 0
        if past + T > cfg.block_size:
            raise ValueError(f"sequence of {past + T} positions exceeds block_size={cfg.block_size}; "
                             "truncate the input (or generate fewer tokens)")
        if attention_mask is not None and tuple(attention_mask.shape) != (B, past + T):
            raise ValueError(f"attention_mask must be (B, past+T) = {(B, past + T)}, "
                             f"got {tuple(attention_mask.shape)}")
        if document_ids is not None and (tuple(document_ids.shape) != (B, T) or past):
            raise ValueError(f"document_ids must be (B, T) = {(B, T)} and cannot be used with a KV cache, "
                             f"got {tuple(document_ids.shape)} with {past} cached positions")
        P = 0
        if prefix_kv is not None:
            if len(prefix_kv) != cfg.n_layer:
                raise ValueError(f"prefix_kv needs one (k, v) per layer: {cfg.n_layer}, got {len(prefix_kv)}")
            P = prefix_kv[0][0].shape[2]
        if position_ids is None:
            if document_ids is not None:  # packed documents: each counts its positions from 0
                position_ids = self._document_positions(document_ids)  # (B, T)
            elif attention_mask is not None:  # padding takes no positions: real tokens count 0, 1, ...
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)[:, past:]  # (B, T)
            else:
                position_ids = torch.arange(past, past + T, device=device)[None]  # (1, T)
        rope = None
        if cfg.positions == "rope":  # cos, sin (B|1, T, 1, D): q, k rotate as (B, T, H, D)
            rope = tuple(t.transpose(1, 2) for t in rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta))
        else:
            x = x + self.pos_emb(position_ids)  # (B, T, C) learned absolute positions
        if cfg.token_types:
            x = x + (self.type_emb.weight[0] if token_type_ids is None else self.type_emb(token_type_ids))
        if cfg.emb_norm:
            x = self.emb_norm(x)
        x = self.drop(x)
        rows = None
        if (self.skip_padding and device.type == "cpu" and attention_mask is not None
                and kv_cache is None and document_ids is None):
            rows = Rows(attention_mask)  # on the CPU reading the mask costs no device sync
        if rows is not None and P == 0 and (not rows.padded or (cfg.causal and rows.right_padded)):
            # every real query sees exactly its real keys without a mask: after the last real
            # token of a right-padded row come only pads, which no real query sees causally
            mask, is_causal = None, cfg.causal
        else:
            mask, is_causal = self._mask(attention_mask, B, T, past, P, device, document_ids)
        if rows is not None and rows.padded:
            x = rows.gather(x)  # (N, C): the real tokens only; pad queries' outputs are dropped
            rope = rope and tuple(rows.gather(t.expand(B, -1, -1, -1)) for t in rope)  # (N, 1, D) each
        else:
            rows = None
        for i, block in enumerate(self.blocks):
            x = block(x, mask, is_causal, rope, prefix_kv[i] if prefix_kv is not None else None, kv_cache, rows)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = x if cfg.post_norm else self.norm_f(x)  # (B, T, C), or (N, C)
        if head is not None:
            x = head(x)  # (B, T, V), or (N, V)
        return rows.scatter(x) if rows is not None else x  # (B, T, ·), zeros at the pads

    def forward(self, input_ids: torch.Tensor | None = None, *,
                inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                prefix_kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
                kv_cache: KVCache | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) with an LM head (gpt2, llama); final hidden states (B, T, C) without (bert).
        `document_ids` (B, T) marks packed examples: see `_mask` (positions restart per document)."""
        return self._backbone(input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids,
                              prefix_kv, kv_cache, document_ids, self.lm_head if self.config.lm_head else None)

    def hidden_states(self, input_ids: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None, pooling: str | None = None, *,
                      inputs_embeds: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None,
                      prefix_kv=None) -> torch.Tensor:
        """Final hidden states (B, T, C), or pooled (B, C): "last" non-pad token, "mean" over
        real tokens (sentence-transformers' mean pooling), or "first" real token (BERT's CLS).
        Padding may be on either side. Gradients flow (fine-tuning through a head); wrap in
        torch.no_grad() to extract."""
        if pooling not in (None, "last", "mean", "first"):
            raise ValueError(f"pooling={pooling!r}; use None, 'last', 'mean' or 'first'")
        h = self._backbone(input_ids, inputs_embeds, attention_mask, token_type_ids,
                           None, prefix_kv, None)  # (B, T, C)
        if pooling is None:
            return h
        B, T, _ = h.shape
        real = (attention_mask.bool() if attention_mask is not None
                else torch.ones(B, T, dtype=torch.bool, device=h.device))  # (B, T)
        if pooling == "mean":  # sum in float32: bf16 cannot even count past 256 exactly
            total = (h * real[..., None].to(h.dtype)).sum(1, dtype=torch.float32)  # (B, C)
            return (total / real.sum(1, keepdim=True).clamp(min=1)).to(h.dtype)  # (B, C)
        # Integer positions: in bf16 neighbouring positions above 256 round to the same value.
        pos = torch.arange(T, device=h.device)  # (T,) int64
        if pooling == "last":
            idx = (pos * real).amax(1)  # (B,) last real position (0 for an all-pad row)
        else:
            idx = real.long().argmax(1)  # (B,) argmax returns the first maximal index
        return h[torch.arange(B, device=h.device), idx]  # (B, C)

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
        """Next token (B,) from logits (B, V): greedy at temperature 0, else sampled."""
        if temperature == 0.0:
            return logits.argmax(-1)
        logits = logits.float() / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None:  # nucleus: smallest set whose probability reaches top_p
            sorted_logits, order = logits.sort(-1, descending=True)  # (B, V)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already >= p
            drop[:, 0] = False
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        probs = logits.softmax(-1)  # (B, V)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | Sequence[int] | None = None,
                 generator: torch.Generator | None = None, *,
                 attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None,
                 prefix_kv=None) -> torch.Tensor:
        """The prompt as given, then N <= max_new_tokens new tokens per row: (B, T + N).

        `out[:, :T]` is `input_ids` unchanged (padding where it was), `out[i, T:]` is row i's
        continuation, whatever the padding side: decode `out[:, T:]`. Prompts may be padded on
        the left or the right (pass attention_mask): each row continues from its own last real
        token, at its own positions, and no row attends to a pad. A row stops at its first EOS;
        its later slots hold pad_token_id (or the EOS id). Stops when every row is done.
        Uses the module's current train/eval mode: call `model.eval()` first for no dropout.
        """
        if not self.config.causal:
            raise ValueError("generate() needs a causal model (gpt2, llama); this one is bidirectional (bert)")
        if max_new_tokens < 0 or temperature < 0:
            raise ValueError("max_new_tokens and temperature must be >= 0")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        B, T = input_ids.shape
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"block_size={self.config.block_size}; shorten one of them")
        step_ids, mask = input_ids, None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, T):
                raise ValueError(f"attention_mask must be (B, T) = {(B, T)}, got {tuple(attention_mask.shape)}")
            real = attention_mask.bool()  # (B, T)
            if not bool(real.any(1).all()):  # one host sync, before the loop
                raise ValueError("a prompt has no real token (its attention_mask row is all 0); drop it")
            # Left-align each row, once, on the device: a stable sort puts the pads (0) first and
            # the real tokens (1) after them in order, so every row's last real token is at T-1.
            order = real.long().argsort(dim=1, stable=True)  # (B, T)
            step_ids, mask = input_ids.gather(1, order), real.gather(1, order)  # (B, T) left-padded
        eos = None
        if eos_token_id is not None:
            ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
            eos = torch.tensor(ids, device=input_ids.device)
            pad = pad_token_id if pad_token_id is not None else ids[0]
        cache = KVCache(T + max_new_tokens)
        new: list[torch.Tensor] = []
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = self(step_ids, attention_mask=mask, kv_cache=cache, prefix_kv=prefix_kv)
            nxt = self._sample(logits[:, -1], temperature, top_k, top_p, generator)  # (B,)
            if eos is not None:
                nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
                finished |= torch.isin(nxt, eos)
            step_ids = nxt[:, None]  # (B, 1)
            new.append(step_ids)
            if mask is not None:
                mask = torch.cat((mask, mask.new_ones(B, 1)), dim=1)  # (B, past + 1)
            if eos is not None and bool(finished.all()):
                break
        return torch.cat((input_ids, *new), dim=1)  # (B, T + N)
