"""Prefix tuning (Chapter 05).

Paper
-----
Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", arXiv:2101.00190.

The language model stays frozen; P "virtual tokens" are put in front of every sequence, and
their activations are free parameters, never computed from an input (Sec. 4, "Method"):

    h_i = P_theta[i, :]          if i is a prefix slot (i < P)
    h_i = LM_phi(z_i, h_<i)      otherwise                     (every later token reads them)

What a later token reads from slot i, in layer l, is its key and its value. So P_theta holds,
per slot, a key and a value for every layer and key/value head (H_kv: grouped-query
attention shares them like the model's own keys):

    P_theta (P, L * 2 * H_kv * D)  --view-->  K_l, V_l (H_kv, P, D) for l = 0 .. L-1
    attention_l(q) = softmax(q [K_l ; K_x]^T / sqrt(D)) [V_l ; V_x]          (Vaswani Eq. 1)

Reparametrisation (Sec. 4, "Parametrization of P_theta"): optimising P_theta directly is
unstable, so it is trained through a small MLP on a smaller matrix P' (P, H_kv * D),

    P_theta[i, :] = MLP_theta(P'_theta[i, :]),   MLP = Linear -> tanh -> Linear     (PEFT's too)

and once trained only P_theta is kept: `fold_prefix` computes it and drops P' and the MLP.

Initialisation: P' ~ N(0, 1) and PyTorch's Linear init (PEFT's default); `init_weights="zero"`
starts every prefix key and value at 0 (PEFT's option); `init_token_ids` starts P_theta itself
as the keys and values the base model computes for P real words (Li & Liang's analysis: real
words' activations beat random ones), which is exactly those words read before the input.

Measured on the world's day stories (finetune.run, 2,000 examples, mean pooling, seed 0;
majority 0.333, full fine-tuning 0.862): with the MLP (14.3% trainable while training) lr 3e-3
gives 0.527 at 300 steps and 0.553 at 900, and lr 1e-2 diverges; without it (P_theta trained
directly, 0.59%) lr 1e-1 gives 0.700 at 300 steps, and from 10 real words lr 3e-2 gives 0.625
at 300 steps and 0.837 at 900. On this small model the reparametrisation slows training down.

How the prefix reaches attention (seam 2 of minituner.model)
------------------------------------------------------------
`apply_prefix` puts a `Prefix` module at `model.prefix` and a forward pre-hook on every
`blocks.{i}.attn`. Each attention call, whoever made it (`forward`, `hidden_states`, `generate`
with its KV cache), gets layer i's (K_i, V_i) (1, H_kv, P, D) in front of its keys and values
(after any `prefix_kv` the caller passed: the model's own argument keeps its meaning), and the
attention mask gains P columns that every query may see. Hooking attention rather than
`Transformer.forward` is what makes `hidden_states` (the recipe's head) see the prefix too.
P_theta is computed once per model call, at layer 0. Like the seam says, prefix slots take no
positions: with RoPE the stored keys are already rotated, and the first real token is at 0.

PEFT's layout (`save_peft` / `load_peft`)
-----------------------------------------
PEFT stores `prompt_embeddings` (P, L * 2 * H_kv * D) -- the same P_theta, viewed as
(P, L, 2, H_kv, D) -- and feeds it to the Hugging Face model as a KV cache of P past tokens.
That cache moves every real token to position P + t:
- RoPE (llama family): a key's score depends on positions only through m - n, so PEFT's
  keys are ours rotated by position P (K_peft = R_P K), exactly, for every query.
- Learned positions (gpt2, bert): token t reads position embedding P + t in PEFT, t here;
  no prefix can make up for a different input embedding, so these families are refused.
- Padding: Hugging Face derives positions from the cache length, not the attention mask, so
  PEFT's outputs shift with left padding; ours do not. Logits agree on unpadded and
  right-padded rows (tests/test_prefix.py, 1e-5).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from minituner.files import atomic_directory
from minituner.model import KVCache, apply_rope, rope_cos_sin
from minituner.protocol import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    Injected,
    applied,
    freeze,
    mark_applied,
    read_peft_config,
)


@dataclass(frozen=True)
class PrefixConfig:
    """Field names follow PEFT's PrefixTuningConfig."""

    num_virtual_tokens: int = 10  # P, prefix slots per layer (0: the model is unchanged)
    prefix_projection: bool = True  # train through P = MLP(P') (Sec. 4); False: P itself
    encoder_hidden_size: int | None = None  # the MLP's hidden width; None -> H_kv * D (PEFT's)
    init_weights: str | None = None  # None: PEFT's random init; "zero": P_theta starts at 0 (PEFT's too)
    init_token_ids: tuple[int, ...] | None = None  # P words: P_theta starts as their keys and values

    def __post_init__(self) -> None:
        if isinstance(self.num_virtual_tokens, bool) or not isinstance(self.num_virtual_tokens, int) \
                or self.num_virtual_tokens < 0:
            raise ValueError(f"num_virtual_tokens={self.num_virtual_tokens!r} must be an integer >= 0")
        if self.encoder_hidden_size is not None and (not isinstance(self.encoder_hidden_size, int)
                                                     or self.encoder_hidden_size < 1):
            raise ValueError(f"encoder_hidden_size={self.encoder_hidden_size!r}: a positive width, "
                             "or None for H_kv * D")
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights={self.init_weights!r}; use None (random) or 'zero'")
        if self.init_token_ids is not None:  # a JSON list (load_adapter) or any sequence -> tuple
            object.__setattr__(self, "init_token_ids", tuple(int(i) for i in self.init_token_ids))
        if self.init_token_ids is not None and (len(self.init_token_ids) != self.num_virtual_tokens
                                                or self.prefix_projection or self.init_weights):
            raise ValueError(f"init_token_ids ({len(self.init_token_ids)} words) sets P_theta itself: it needs "
                             f"num_virtual_tokens={len(self.init_token_ids)}, prefix_projection=False and "
                             "init_weights=None")


_ATTN_ARGS = ("x", "mask", "is_causal", "rope", "prefix", "cache", "layer", "rows")  # Attention.forward's


class Prefix(Injected):
    """P_theta for every layer: `embedding` is P' (P, H_kv*D) with `transform` (the MLP), or
    P_theta (P, L*2*H_kv*D) itself without (PEFT's PrefixEncoder names)."""

    def __init__(self, n_layer: int, n_kv_head: int, head_dim: int, config: PrefixConfig) -> None:
        super().__init__()
        self.n_layer, self.n_kv_head, self.head_dim = n_layer, n_kv_head, head_dim
        P, token_dim = config.num_virtual_tokens, n_kv_head * head_dim
        out = n_layer * 2 * token_dim
        if config.prefix_projection:
            hidden = config.encoder_hidden_size or token_dim
            self.embedding = nn.Parameter(torch.randn(P, token_dim))  # P' (P, H_kv*D)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, out))
        else:
            self.embedding = nn.Parameter(torch.randn(P, out))  # P_theta (P, L*2*H_kv*D)
            self.transform = None
        if config.init_weights == "zero":  # every prefix key and value 0: scores 0, values 0
            zeroed = [self.embedding] if self.transform is None else [self.transform[-1].weight, self.transform[-1].bias]
            for t in zeroed:
                nn.init.zeros_(t)
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # this call's, from layer 0

    def prefix(self) -> torch.Tensor:
        """P_theta (P, L*2*H_kv*D): MLP(P') while reparametrised, else the stored table."""
        return self.embedding if self.transform is None else self.transform(self.embedding)

    def key_values(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(K_l, V_l)] per layer, each (1, H_kv, P, D), in the rotated space (seam 2)."""
        P = self.embedding.shape[0]
        kv = self.prefix().view(P, self.n_layer, 2, self.n_kv_head, self.head_dim)  # (P, L, 2, H_kv, D)
        kv = kv.permute(1, 2, 3, 0, 4)[:, :, None]  # (L, 2, 1, H_kv, P, D)
        return [(k, v) for k, v in kv]

    def inject(self, layer: int, attn: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Forward pre-hook of blocks.{layer}.attn (Attention.forward's arguments, by name):
        put (K, V) in front of `prefix` and P columns every query sees in front of `mask`."""
        if self.disabled or self.embedding.shape[0] == 0:
            return None
        if layer == 0 or self._kv is None:
            self._kv = self.key_values()  # P_theta once per model call (the MLP runs once)
        pk, pv = self._kv[layer]  # (1, H_kv, P, D) each
        if layer == self.n_layer - 1:
            self._kv = None  # hold no graph between calls
        a = {**dict(zip(_ATTN_ARGS, args)), **kwargs}
        x, mask, prefix = a["x"], a.get("mask"), a.get("prefix")
        T, P = (a["rows"].T if a.get("rows") is not None else x.shape[1]), pk.shape[2]  # x: (B, T, C) or (N, C)
        if prefix is not None:  # the caller's prefix_kv stays, after ours
            ck, cv = prefix  # (B|1, H_kv, P_c, D) each
            pk = torch.cat((pk.to(ck.dtype).expand(ck.shape[0], -1, -1, -1), ck), dim=2)  # (B|1, H_kv, P+P_c, D)
            pv = torch.cat((pv.to(cv.dtype).expand(cv.shape[0], -1, -1, -1), cv), dim=2)
        if a.get("is_causal"):  # SDPA's own causal mask (no mask, cache or prefix): t sees 0..t
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None, None]  # (1, 1, T, T)
        if mask is not None:  # every query sees every prefix slot: P columns of True in front
            seen = mask.new_ones(*mask.shape[:-1], P)  # (B|1, 1, T, P)
            mask = torch.cat((seen, mask), dim=-1)  # (B|1, 1, T, P + S)
        return (), {**a, "mask": mask, "is_causal": False, "prefix": (pk, pv)}


def prefix_module(model: nn.Module) -> Prefix | None:
    m = getattr(model, "prefix", None)
    return m if isinstance(m, Prefix) else None


def apply_prefix(model: nn.Module, config: PrefixConfig) -> nn.Module:
    """Freeze `model` and give every attention layer P trainable prefix keys and values;
    returns the model. Only `model.prefix` trains."""
    if prefix_module(model) is not None or any(t["technique"] == "prefix" for t in applied(model)):
        raise ValueError("the model already has a prefix; build a fresh base model to apply one again "
                         "(or load_adapter(fresh_model, dir))")
    cfg = model.config
    freeze(model)
    ref = next(p for p in model.parameters() if p.is_floating_point())
    words = word_prefix(model, config.init_token_ids) if config.init_token_ids is not None else None
    model.prefix = Prefix(cfg.n_layer, cfg.n_kv_head, cfg.head_dim, config).to(ref.device, ref.dtype)
    if words is not None:
        with torch.no_grad():
            model.prefix.embedding.copy_(words)
    for i, block in enumerate(model.blocks):  # a bound method in a partial: deepcopy keeps it ours
        block.attn.register_forward_pre_hook(partial(model.prefix.inject, i), with_kwargs=True)
    mark_applied(model, "prefix", config)
    return model


@torch.no_grad()
def word_prefix(model: nn.Module, token_ids) -> torch.Tensor:
    """P_theta (P, L*2*H_kv*D) made of the keys and values `model` computes for P real words
    at positions 0..P-1 (Li & Liang: initialising with real words' activations helps).
    With RoPE the keys are rotated by R_{-P}, and the prefix then acts exactly as those words
    placed before the input; with learned positions, as those words at other positions."""
    cfg, P = model.config, len(token_ids)
    if P == 0:
        return torch.zeros(0, cfg.n_layer * 2 * cfg.n_kv_head * cfg.head_dim)
    ids = torch.tensor([list(token_ids)], device=next(model.parameters()).device)  # (1, P)
    cache, was_training = KVCache(P), model.training
    model.eval()
    model(ids, kv_cache=cache)
    model.train(was_training)
    kv = torch.stack([torch.stack((cache.k[i][0], cache.v[i][0])) for i in range(cfg.n_layer)])  # (L, 2, H_kv, P, D)
    table = kv.permute(3, 0, 1, 2, 4).reshape(P, -1)  # (P, L*2*H_kv*D)
    return _rotate(model, table, -P) if cfg.positions == "rope" else table


@torch.no_grad()
def fold_prefix(model: nn.Module) -> nn.Module:
    """Replace P' and the MLP by P_theta = MLP(P'), computed once (Sec. 4: after training only
    P_theta is kept); the outputs do not change. The recorded config becomes
    prefix_projection=False, so save_adapter/load_adapter carry the folded table."""
    p = prefix_module(model)
    if p is None:
        raise ValueError("the model has no prefix to fold; apply_prefix first")
    if p.transform is not None:
        p.embedding = nn.Parameter(p.prefix().detach().clone())  # (P, L*2*H_kv*D)
        p.transform = None
        for t in model.minituner_techniques:
            if t["technique"] == "prefix":
                t["config"] = {**t["config"], "prefix_projection": False, "encoder_hidden_size": None}
    return model


# ---------------------------------------------------------------------------- PEFT's layout
def _rotate(model: nn.Module, table: torch.Tensor, position: int) -> torch.Tensor:
    """The keys of a (P, L*2*H_kv*D) table rotated by RoPE position `position` (values kept)."""
    cfg = model.config
    P = table.shape[0]
    kv = table.float().view(P, cfg.n_layer, 2, cfg.n_kv_head, cfg.head_dim).clone()  # (P, L, 2, H_kv, D)
    cos, sin = rope_cos_sin(torch.full((1, 1), position, device=table.device), cfg.head_dim, cfg.rope_theta)  # (1, 1, 1, D)
    kv[:, :, 0] = apply_rope(kv[:, :, 0], cos[0], sin[0])  # R_position K
    return kv.view(P, -1).to(table.dtype)


def _check_peft_expressible(model: nn.Module) -> None:
    cfg = model.config
    if cfg.positions != "rope" or not cfg.causal:
        raise ValueError(
            f"PEFT's prefix tuning cannot express ours on a {cfg.family} model: PEFT passes the prefix as "
            "a KV cache of P past tokens, so the Hugging Face model puts real token t at position P + t; "
            f"with learned position embeddings ({cfg.positions}) that is a different input, which no prefix "
            "can make up for. Only RoPE decoders (llama family) map exactly; save with "
            "minituner.protocol.save_adapter instead.")


def save_peft(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the (folded) prefix as PEFT's `adapter_config.json` + `adapter_model.safetensors`
    (`prompt_embeddings`), for the Hugging Face model of `checkpoint.save_hf`, atomically."""
    p = prefix_module(model)
    if p is None:
        raise ValueError("the model has no prefix to save; apply_prefix first")
    _check_peft_expressible(model)
    cfg = model.config
    with torch.no_grad():
        table = _rotate(model, p.prefix().detach().cpu(), p.embedding.shape[0])  # K_peft = R_P K
    token_dim = cfg.n_kv_head * cfg.head_dim
    config = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
              "num_virtual_tokens": table.shape[0], "token_dim": token_dim, "num_transformer_submodules": 1,
              "num_attention_heads": cfg.n_kv_head, "num_layers": cfg.n_layer,
              "encoder_hidden_size": token_dim, "prefix_projection": False, "inference_mode": True}
    with atomic_directory(directory) as tmp:
        save_file({"prompt_embeddings": table.contiguous()}, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return Path(directory)


def load_peft(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a prefix PEFT saved (`save_pretrained`) into a plain base model (applied folded,
    prefix_projection=False) or one with a folded prefix of the same length; returns it."""
    directory, config = read_peft_config(directory, "PREFIX_TUNING")
    cfg_path, weights = directory / PEFT_CONFIG, directory / PEFT_WEIGHTS
    _check_peft_expressible(model)
    mc = model.config
    want = {"num_layers": mc.n_layer, "num_attention_heads": mc.n_kv_head,
            "token_dim": mc.n_kv_head * mc.head_dim, "num_transformer_submodules": 1}
    wrong = {k: (config.get(k), v) for k, v in want.items() if config.get(k) != v}
    if wrong:
        raise ValueError(f"{cfg_path} does not fit this model: (saved, model) = {wrong}")
    table = load_file(str(weights))["prompt_embeddings"]  # (P, L*2*H_kv*D)
    P = config["num_virtual_tokens"]
    if tuple(table.shape) != (P, mc.n_layer * 2 * want["token_dim"]):
        raise ValueError(f"prompt_embeddings has shape {tuple(table.shape)}; expected {(P, mc.n_layer * 2 * want['token_dim'])}")
    p = prefix_module(model)
    if p is None:
        p = apply_prefix(model, PrefixConfig(num_virtual_tokens=P, prefix_projection=False)).prefix
    if p.transform is not None or p.embedding.shape[0] != P:
        raise ValueError("the model's prefix is reparametrised or of another length; load onto a plain base model")
    with torch.no_grad():
        p.embedding.copy_(_rotate(model, table, -P))  # K = R_{-P} K_peft
    return model
