"""Tiny random Hugging Face models for the PEFT parity tests (LoRA, prompt and prefix tuning),
and the same weights loaded into minituner with `checkpoint.load_hf`.

A helper module, not a test file: test_lora.py, test_prompt.py and test_prefix.py import it.
"""

from __future__ import annotations

import pytest
import torch

from minituner.checkpoint import load_hf
from minituner.model import Transformer


def hf_model(family: str, vocab_size: int, seed: int = 0):
    """A random 2-layer transformers model of `family` (llama: grouped-query, 4 heads sharing 2
    key/value heads), its weights moved off their init by 0.2 N(0, 1) so that every term counts."""
    transformers = pytest.importorskip("transformers", reason="PEFT parity needs transformers (test extra)")
    torch.manual_seed(seed)
    if family == "llama":
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=vocab_size, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    elif family == "gpt2":
        m = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=vocab_size, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0))
    elif family == "bert":
        m = transformers.BertModel(transformers.BertConfig(
            vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=24, max_position_embeddings=32))
    else:
        raise ValueError(f"unknown family {family!r}")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m.eval()


def ours_from(hf) -> Transformer:
    """The same weights in minituner's Transformer (a copy: training ours leaves `hf` as it is)."""
    return load_hf({k: v.detach().clone() for k, v in hf.state_dict().items()}, config=hf.config.to_dict())
