"""Prompt templates: how an instruction, or a conversation, becomes the text a model reads.

Two formats, both ending where the model's answer starts, and an answer ends with the
tokenizer's eos token (``data.SFTDataset`` appends it):

``"alpaca"`` (Taori et al. 2023, Stanford Alpaca)::

    ### Instruction:
    {instruction}

    ### Input:            <- only when there is an input
    {input}

    ### Response:
    {answer}<|eos|>

``"chat"``: one turn per message, ``<|role|>\\n{content}<|eos|>\\n`` with the special tokens
``<|system|>``, ``<|user|>``, ``<|assistant|>`` (the tokenizer's ``SPECIAL_TOKENS``)::

    <|system|>
    You are a helpful assistant who answers briefly and exactly.<|eos|>
    <|user|>
    {instruction}

    {input}<|eos|>
    <|assistant|>
    {answer}<|eos|>
"""
from __future__ import annotations

from typing import Sequence

DEFAULT_SYSTEM = "You are a helpful assistant who answers briefly and exactly."
ROLES = ("system", "user", "assistant")


def format_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """``[{"role", "content"}, ...]`` as text: each turn is ``<|role|>\\ncontent<|eos|>\\n``;
    ``add_generation_prompt`` appends ``<|assistant|>\\n`` for the model to continue."""
    out = []
    for m in messages:
        if m.get("role") not in ROLES:
            raise ValueError(f"message role must be system, user or assistant, got {m.get('role')!r}")
        out.append(f"<|{m['role']}|>\n{m['content']}<|eos|>\n")
    return "".join(out) + ("<|assistant|>\n" if add_generation_prompt else "")


def format_prompt(instruction: str, input: str = "", template: str = "alpaca",
                  system: str | None = DEFAULT_SYSTEM) -> str:
    """The prompt of an instruction example; the model's answer follows it directly.

    ``"alpaca"``: ``### Instruction:\\n...\\n\\n[### Input:\\n...\\n\\n]### Response:\\n``.
    ``"chat"``: ``format_chat`` of an optional system turn and one user turn (instruction,
    a blank line, input), ending with ``<|assistant|>\\n``."""
    if template == "alpaca":
        body = f"### Instruction:\n{instruction}\n\n"
        if input:
            body += f"### Input:\n{input}\n\n"
        return body + "### Response:\n"
    if template == "chat":
        user = f"{instruction}\n\n{input}" if input else instruction
        msgs = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": user}]
        return format_chat(msgs, add_generation_prompt=True)
    raise ValueError(f"template must be 'alpaca' or 'chat', got {template!r}")
