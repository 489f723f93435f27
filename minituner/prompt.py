"""Prompt tuning: n trainable vectors in front of the input, the model frozen (Chapter 05).

Paper
-----
Lester, Al-Rfou & Constant 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning", arXiv:2104.08691.

A frozen model with weights θ classifies or continues a text X, whose token embeddings are
X_e (T, C). Prompt tuning prepends a matrix of n learned "virtual token" embeddings
P_e (n, C), which are no words of the vocabulary, and trains P_e alone (Sec. 2):

    max over θ_P of  log Pr_{θ; θ_P}(Y | [P; X])        input embeddings [P_e; X_e] (n + T, C)

so an adapted model costs n * C numbers (20 * 256 = 5,120 for the course's base model)
instead of a copy of θ. Sec. 2.1 names three initialisations, compared in Sec. 3.2 (Fig. 3):
random uniform in [-0.5, 0.5]; embeddings of tokens sampled from the vocabulary (the paper
samples among the 5,000 most common, we sample all of it, like PEFT's SAMPLE_VOCAB); or the
embeddings of a text (the class labels, say), repeated or cut to n tokens, like PEFT's TEXT.
Sec. 3.1 (Fig. 1): the gap to full fine-tuning closes only with scale (~10^10 parameters).

How it attaches (seam 3 of minituner.model, the input embeddings)
-----------------------------------------------------------------
`forward`, `hidden_states` and `generate` all run the model through one method, `_backbone`.
`apply_prompt` wraps that method for this one model instance (forward hooks would miss
`hidden_states`, which calls the backbone directly); the class and the weights are untouched:

    input_ids (B,T) --tok_emb--> X_e (B,T,C)
                 [P_e; X_e] (B, n+T, C) --inputs_embeds--> backbone --> h (B, n+T, C)
    attention_mask (B,T) -> [1..1; mask] (B, n+T)                        |  h[:, n:]
                                                                         v
                                              (B, T, C): callers see their own positions only

So every output (logits, hidden states, pooled features) is for the real positions only:
labels (B, T) line up with the input as before and no virtual token is ever scored. The
virtual tokens come before everything, left pads included, and are attended to by every
query; they take positions 0..n-1 and the first real token is at position n, as in PEFT
with transformers (GPT-2 and Llama number [P; X] from 0). With a padding mask the real
tokens are numbered from the mask (minituner.model's rule), so padding, left or right,
never changes an output at a real position (transformers' forward would shift left-padded
rows). With a KV cache the prompt is prepended at the first call only; the cache then
holds the n virtual positions, and later calls' masks get n ones in front.

Under `protocol.disable_adapters` the wrapper calls the plain backbone: exactly the base
model. `protocol.save_adapter` carries P_e (`soft_prompt.prompt_embeddings`); the last
section writes and reads PEFT's PROMPT_TUNING format (`prompt_embeddings`, (n, C)).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from minituner.files import atomic_directory
from minituner.protocol import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    Injected,
    freeze,
    mark_applied,
    read_peft_config,
)

INITS = ("vocab", "random", "text")
RANDOM_RANGE = 0.5  # Lester Sec. 3.2: random init uniform in [-0.5, 0.5]


@dataclass(frozen=True)
class PromptConfig:
    num_virtual_tokens: int = 20  # n, rows of P_e (0: the base model exactly)
    init: str = "vocab"  # "vocab" (sampled token embeddings) | "random" (U[-0.5, 0.5]) | "text"
    init_text: str | None = None  # init="text": its tokens' embeddings, repeated/cut to n
    init_token_ids: tuple[int, ...] | None = None  # init="text" without a tokenizer (apply_prompt
    #                                                records the ids it tokenized here)

    def __post_init__(self) -> None:
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"num_virtual_tokens={n!r} must be an integer >= 0 (e.g. 20)")
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r}; use one of {INITS}")
        if self.init_token_ids is not None:
            object.__setattr__(self, "init_token_ids", tuple(int(i) for i in self.init_token_ids))
        if self.init == "text" and not (self.init_text or self.init_token_ids):
            raise ValueError("init='text' needs init_text='...' (or init_token_ids=(...))")


class SoftPrompt(Injected):
    """P_e (n, C): the only trained tensor. Disabled, the model runs without it."""

    def __init__(self, n: int, n_embd: int, device=None, dtype=None) -> None:
        super().__init__()
        self.prompt_embeddings = nn.Parameter(torch.zeros(n, n_embd, device=device, dtype=dtype))  # (n, C)

    @property
    def n(self) -> int:
        return self.prompt_embeddings.shape[0]


def _init_prompt(model: nn.Module, config: PromptConfig, tokenizer) -> tuple[torch.Tensor, PromptConfig]:
    """P_e's initial value (n, C) and the config to record (text resolved to token ids)."""
    emb = model.get_input_embeddings().weight  # (V, C)
    n, V = config.num_virtual_tokens, emb.shape[0]
    if config.init == "random":  # Sec. 3.2: uniform in [-0.5, 0.5]
        return torch.empty(n, emb.shape[1], device=emb.device).uniform_(-RANDOM_RANGE, RANDOM_RANGE), config
    if config.init == "vocab":  # Sec. 2.1: embeddings of sampled vocabulary tokens
        ids = torch.randint(0, V, (n,), device=emb.device)
        return emb[ids].detach().float(), config
    ids = list(config.init_token_ids or ())
    if not ids:
        if tokenizer is None:  # the course's base model's tokenizer, if it fits this model
            from minituner.checkpoint import find_base_model
            from minituner.tokenizer import Tokenizer

            tokenizer = Tokenizer.load(find_base_model())
            if tokenizer.vocab_size != V:
                raise ValueError(f"init='text': the course tokenizer has {tokenizer.vocab_size} tokens, this "
                                 f"model {V}; pass apply_prompt(..., tokenizer=its tokenizer) or init_token_ids")
        ids = list(tokenizer.encode(config.init_text))
        if not ids:
            raise ValueError(f"init_text={config.init_text!r} has no tokens; give a non-empty text")
    if not all(0 <= i < V for i in ids):
        raise ValueError(f"init token ids {ids} must lie in [0, {V}) (this model's vocabulary)")
    ids = (ids * (n // len(ids) + 1))[:n]  # repeated, then cut to n (PEFT's TEXT init)
    return emb[torch.tensor(ids, dtype=torch.long, device=emb.device)].detach().float(), \
        dataclasses.replace(config, init_token_ids=tuple(ids))


def _prompted_backbone(self, *args, **kwargs) -> torch.Tensor:
    """`Transformer._backbone` with the soft prompt P_e in front (see the module docstring)."""
    plain = type(self)._backbone
    prompt = self.soft_prompt
    if prompt.disabled:
        return plain(self, *args, **kwargs)
    a = inspect.signature(plain).bind(self, *args, **kwargs).arguments  # parameter name -> value
    ids, x, mask = a.get("input_ids"), a.get("inputs_embeds"), a.get("attention_mask")
    cache, positions, types_ = a.get("kv_cache"), a.get("position_ids"), a.get("token_type_ids")
    if a.get("document_ids") is not None:
        raise ValueError("packed sequences (document_ids) cannot share one soft prompt; "
                         "train prompt tuning on unpacked, padded batches")
    if cache is not None and cache.length > 0:  # later steps: P_e is in the cache already
        n = getattr(cache, "virtual_tokens", 0)
        if mask is not None:
            a["attention_mask"] = torch.cat((mask.new_ones(mask.shape[0], n), mask), 1)  # (B, n+past+T)
        if positions is not None:
            a["position_ids"] = positions + n
        return plain(**a)
    n = prompt.n
    if x is None:
        x = self.get_input_embeddings()(ids)  # X_e (B, T, C)
    B, T, _ = x.shape
    if n + T > self.config.block_size or (cache is not None and n + cache.max_len > self.config.block_size):
        need = n + (T if cache is None else cache.max_len)
        raise ValueError(f"the soft prompt's {n} virtual tokens + {need - n} positions exceed "
                         f"block_size={self.config.block_size}; shorten the input (or generate fewer tokens)")
    P = prompt.prompt_embeddings.to(x.dtype).expand(B, -1, -1)  # P_e (B, n, C)
    a["input_ids"], a["inputs_embeds"] = None, torch.cat((P, x), 1)  # [P_e; X_e] (B, n+T, C)
    if mask is not None:
        a["attention_mask"] = torch.cat((mask.new_ones(B, n), mask), 1)  # (B, n+T): P_e is real
    if positions is not None:  # P_e takes positions 0..n-1, the given ones follow
        a["position_ids"] = torch.cat((torch.arange(n, device=x.device).expand(positions.shape[0], n),
                                       positions + n), 1)  # (B, n+T)
    if types_ is not None:
        a["token_type_ids"] = torch.cat((types_.new_zeros(B, n), types_), 1)  # (B, n+T)
    if cache is not None:
        cache.virtual_tokens = n  # later calls extend their masks by n
        if not cache.k:  # buffers not allocated yet: room for the virtual tokens too
            cache.max_len += n
    h = plain(**a)  # (B, n+T, C)
    return h[:, n:]  # (B, T, C): the real positions only


def apply_prompt(model: nn.Module, config: PromptConfig, tokenizer: Any = None) -> nn.Module:
    """Freeze `model` and prepend a trainable soft prompt of `config.num_virtual_tokens`
    vectors to every input (see the module docstring). `tokenizer` (anything with
    `encode(text) -> ids`) tokenizes init_text; default: the course base model's. Returns the model."""
    if hasattr(model, "soft_prompt"):
        raise ValueError("the model already has a soft prompt; build a fresh model to apply another")
    if not hasattr(type(model), "_backbone"):
        raise TypeError(f"apply_prompt needs a minituner Transformer, got {type(model).__name__}")
    init, recorded = _init_prompt(model, config, tokenizer)
    freeze(model)
    emb = model.get_input_embeddings().weight
    model.soft_prompt = SoftPrompt(config.num_virtual_tokens, emb.shape[1], emb.device, emb.dtype)
    with torch.no_grad():
        model.soft_prompt.prompt_embeddings.copy_(init)
    model._backbone = types.MethodType(_prompted_backbone, model)  # this instance only
    mark_applied(model, "prompt", recorded)
    return model


# ================================================================================ PEFT's format
# adapter_config.json (peft_type PROMPT_TUNING) + adapter_model.safetensors holding one tensor,
# `prompt_embeddings` (n, C): what PeftModel.from_pretrained reads for a decoder (CAUSAL_LM,
# one transformer submodule). The init is written for the record only (the weights replace it);
# PEFT's TEXT init needs a tokenizer it can load by name, so a text init is written as RANDOM.
_PEFT_INIT = {"vocab": "SAMPLE_VOCAB", "random": "RANDOM", "text": "RANDOM"}


def save_peft_prompt(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the soft prompt in PEFT's prompt-tuning format, atomically; returns the directory."""
    if not hasattr(model, "soft_prompt"):
        raise ValueError("the model has no soft prompt to save; apply_prompt(model, PromptConfig()) first")
    cfg, P = model.config, model.soft_prompt.prompt_embeddings
    recorded = next((t["config"] for t in getattr(model, "minituner_techniques", []) if t["technique"] == "prompt"), {})
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM" if cfg.lm_head else "FEATURE_EXTRACTION",
              "base_model_name_or_path": None, "revision": None, "inference_mode": True,
              "num_virtual_tokens": P.shape[0], "token_dim": P.shape[1], "num_transformer_submodules": 1,
              "num_attention_heads": cfg.n_head, "num_layers": cfg.n_layer,
              "prompt_tuning_init": _PEFT_INIT[recorded.get("init", "random")],
              "prompt_tuning_init_text": recorded.get("init_text"), "tokenizer_name_or_path": None,
              "tokenizer_kwargs": None}
    with atomic_directory(directory) as tmp:
        save_file({"prompt_embeddings": P.detach().cpu().contiguous()}, str(tmp / PEFT_WEIGHTS),
                  metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return Path(directory)


def load_peft_prompt(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Read a PEFT prompt-tuning directory into `model`: a plain base (the prompt is applied
    as adapter_config.json says) or one with a soft prompt of the same length."""
    d, cfg = read_peft_config(directory, "PROMPT_TUNING")
    if cfg.get("num_transformer_submodules", 1) != 1:
        raise ValueError(f"{d}: num_transformer_submodules={cfg['num_transformer_submodules']} is an "
                         "encoder-decoder prompt; minituner's models have one stack (1)")
    n, C = cfg["num_virtual_tokens"], model.config.n_embd
    if cfg.get("token_dim", C) != C:
        raise ValueError(f"{d}: token_dim={cfg['token_dim']} but this model's embeddings have {C} channels")
    P = load_file(str(d / PEFT_WEIGHTS))["prompt_embeddings"]  # safetensors: no pickle
    if tuple(P.shape) != (n, C):
        raise ValueError(f"{d}: prompt_embeddings is {tuple(P.shape)}, adapter_config.json says {(n, C)}")
    if not hasattr(model, "soft_prompt"):
        apply_prompt(model, PromptConfig(num_virtual_tokens=n, init="random"))  # init replaced below
    elif model.soft_prompt.n != n:
        raise ValueError(f"the model's soft prompt has {model.soft_prompt.n} virtual tokens, {d} holds {n}")
    with torch.no_grad():
        model.soft_prompt.prompt_embeddings.copy_(P)
    return model
