"""Instruction tuning: supervised fine-tuning (SFT) on (instruction, answer) pairs, with packing.

Wei et al. 2022, "Finetuned Language Models Are Zero-Shot Learners" (FLAN, arXiv:2109.01652):
fine-tune a pre-trained language model on many tasks phrased as instructions, and it follows
instructions of tasks it never saw (their Fig. 1: held-out task clusters). Taori et al. 2023
(Stanford Alpaca) fixed the plain-text template most open models copied. The objective is
the language-modelling loss on the answer only (the prompt is given, not learned):

    L_SFT = -1/|R| * sum_{t in R} log p_theta(x_t | x_<t)          R = response tokens

where R holds each answer's tokens and its <|eos|> (so the model learns to stop), summed over
every example of the batch (a token-weighted mean, as TRL's SFTTrainer computes it).

The answer's first word. A byte-level BPE (GPT-2's, ours) spells a word differently with and
without its leading space, and running text puts a space before almost every word: our base
model read " 66" and " good" (one token each) thousands of times in pre-training, but "66"
and "good" (the digits "6" "6"; "g" "ood") almost never. An answer follows the template's
newline, so encoded alone it would start with those rare spellings, and the model would have
to learn to spell its first word anew. `as_word` writes each answer as running text writes a
word, " 66"; the model then answers " 66" and the evaluators normalize the space away.
Measured with the recipe (full, 300 steps, the 9 seen families): exact match 0.189 without
the space, 0.322 with it (facts 0.00 -> 0.55: the answer reuses the token pre-training
stored the fact under).

Templates (`minituner.prompts`, re-exported by `world`): "alpaca" (### Instruction / ### Input /
### Response) and "chat" (<|system|> <|user|> <|assistant|> turns). `data.SFTDataset` builds
(input_ids, labels) with the prompt's labels set to -100; `prompt_of` gives the same prompt text
for generation, so training and evaluation read exactly the same tokens.

Packing. Answers are short, so padding a batch to its longest example wastes most of the
compute. Packing concatenates several examples into one row of up to `max_length` tokens;
each token carries its example's `document_ids` and its position within the example:

    input_ids     <bos> p p p a a <eos> <bos> p p a <eos> <bos> p p p p a a <eos> <pad>
    document_ids    1   1 1 1 1 1   1     2   2 2 2   2     3   3 3 3 3 3 3   3     0
    position_ids    0   1 2 3 4 5   6     0   1 2 3   4     0   1 2 3 4 5 6   7     0

and the model's mask is block-diagonal (`Transformer._mask`): a token attends to earlier
tokens of its own example only. With per-example positions, every example computes exactly
the logits it would alone, so the packed loss equals the unpacked loss (tests/test_sft.py
checks it to 1e-10 in float64). Without the block mask (naive packing, as many trainers do
by default) examples see their neighbours: a different, noisier objective.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import IGNORE_INDEX, DataError, SFTDataset, TokenizerLike
from .prompts import DEFAULT_SYSTEM, format_chat, format_prompt

TEMPLATES = ("alpaca", "chat")


# -- templates -----------------------------------------------------------------------------------
def prompt_of(example: Mapping[str, Any], template: str = "alpaca",
              system: str | None = DEFAULT_SYSTEM) -> str:
    """The text the model reads before its answer: an instruction example formatted with
    `template` (`world.format_prompt`), or a chat example's turns up to its last assistant
    turn, ending with "<|assistant|>\\n" (`world.format_chat`)."""
    if "messages" in example:
        msgs = list(example["messages"])
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return format_chat(msgs[:last], add_generation_prompt=True)
    return format_prompt(example["instruction"], example.get("input") or "", template, system)


def reference_of(example: Mapping[str, Any]) -> str:
    """The answer to compare with: `output`, or the content of the last assistant turn."""
    if "messages" in example:
        return [m for m in example["messages"] if m["role"] == "assistant"][-1]["content"]
    return example["output"]


# -- the answer as running text ------------------------------------------------------------------
def as_word(text: str) -> str:
    """`text` led by one space (unless it starts with whitespace already): the spelling the
    base model's tokenizer gives a word inside running text, e.g. " 66", not "6" "6"."""
    return text if text[:1].isspace() else " " + text


def from_word(answer: str) -> str:
    """A generated answer without the one leading space `as_word` taught the model to write."""
    return answer.removeprefix(" ")


def answers_as_words(examples: Sequence[Mapping[str, Any]], keys: Sequence[str] = ("output",)) -> list[dict]:
    """Copies of `examples` with `as_word` applied to each of `keys` ("output" of an
    instruction; "chosen" and "rejected" of a preference pair) and to the content of every
    assistant turn of a chat example."""
    out = []
    for e in examples:
        e = dict(e)
        if "messages" in e:
            e["messages"] = [{**m, "content": as_word(m["content"])} if m["role"] == "assistant" else m
                             for m in e["messages"]]
        for k in keys:
            if k in e:
                e[k] = as_word(e[k])
        out.append(e)
    return out


# -- the loss ------------------------------------------------------------------------------------
def sft_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """L_SFT over the batch's response tokens (labels != -100), a `train.train` loss function.

    `batch`: input_ids (B, T), labels (B, T) aligned with the inputs (shifted here), and
    optionally attention_mask (B, T); packed batches add document_ids and position_ids (B, T).
    Returns (loss, {"num_tokens": |R|}) so gradient accumulation weights by tokens."""
    extra = {k: batch[k] for k in ("attention_mask", "document_ids", "position_ids") if k in batch}
    logits = model(batch["input_ids"], **extra)  # (B, T, V)
    targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    logits = logits[:, :-1]  # (B, T-1, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> float32; float64 stays
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="sum")  # -sum_{t in R} log p(x_t | x_<t)
    n = (targets != IGNORE_INDEX).sum()  # |R|
    return nll / n.clamp(min=1), {"num_tokens": n}


# -- packing -------------------------------------------------------------------------------------
def pack_bins(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """First-fit decreasing: example indices grouped into bins of at most `max_length` tokens
    (each bin's examples in their original order). Deterministic, no example split."""
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        raise DataError(f"example {too_long[0]} is {lengths[too_long[0]]} tokens, more than "
                        f"max_length={max_length}; raise max_length or drop it before packing")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_length - lengths[i])
    return [sorted(b) for b in bins]


class PackedSFTDataset(torch.utils.data.Dataset):
    """Examples of an `SFTDataset` (or any data set of input_ids/labels dicts) packed into rows
    of at most `max_length` tokens: {"input_ids", "labels", "document_ids", "position_ids"},
    each (L,), with document ids 1, 2, ... in a row (the Collator pads with 0, a document of
    its own) and positions restarting at 0 per example. The first label of every example is
    -100, so no loss ever crosses from one example into the next."""

    def __init__(self, data: Sequence[Mapping[str, torch.Tensor]], max_length: int) -> None:
        if len(data) == 0:
            raise DataError("PackedSFTDataset: the data set is empty; pass at least one example")
        items = [data[i] for i in range(len(data))]
        self.bins = pack_bins([len(x["input_ids"]) for x in items], max_length)
        self.rows = []
        for b in self.bins:
            ids = torch.cat([items[i]["input_ids"] for i in b])  # (L,)
            labels = torch.cat([torch.cat((torch.tensor([IGNORE_INDEX]), items[i]["labels"][1:])) for i in b])
            docs = torch.cat([torch.full((len(items[i]["input_ids"]),), d + 1) for d, i in enumerate(b)])
            pos = torch.cat([torch.arange(len(items[i]["input_ids"])) for i in b])  # per-example
            self.rows.append({"input_ids": ids, "labels": labels, "document_ids": docs, "position_ids": pos})
        self.n_examples, self.max_length = len(items), max_length

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]

    @property
    def fill(self) -> float:
        """Share of the rows' max_length slots holding real tokens (1.0 = no padding at all)."""
        return sum(len(r["input_ids"]) for r in self.rows) / (len(self.rows) * self.max_length)


def sft_dataset(examples: Sequence[Mapping[str, Any]], tokenizer: TokenizerLike, max_length: int,
                template: str = "alpaca", packing: bool = False, completion_only: bool = True,
                system: str | None = DEFAULT_SYSTEM, words: bool = True) -> torch.utils.data.Dataset:
    """Instruction or chat examples as a training set: `SFTDataset` (prompt masked; examples
    longer than `max_length` dropped with a warning), packed into `max_length` rows if asked.
    `completion_only=False` puts the loss on the prompt's tokens too (plain language
    modelling of the whole example, the ablation of masking the prompt). `words`: each
    answer is encoded as a word of running text (`as_word`, see the module docstring)."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    if words:
        examples = answers_as_words(examples)
    ds = SFTDataset(examples, tokenizer, max_length=max_length, template=template, overflow="drop",
                    system=system)
    if not completion_only:  # every token after <bos> is a target
        ds.items = [(x, torch.cat((torch.tensor([IGNORE_INDEX]), x[1:]))) for x, _ in ds.items]
    return PackedSFTDataset(ds, max_length) if packing else ds


# -- evaluation ----------------------------------------------------------------------------------
def exact_match(model: nn.Module, tokenizer, examples: Sequence[Mapping[str, Any]],
                template: str = "alpaca", *, max_new_tokens: int = 32, batch_size: int = 64,
                system: str | None = DEFAULT_SYSTEM, progress: bool = False) -> dict:
    """Greedy answers to each example's prompt, scored by the world's exact evaluator: overall,
    per family, and seen vs held-out families (`world.evaluate_instructions`; examples without
    a family count as seen). Returns that dict plus "answers"."""
    from .evaluate import complete
    from .scoring import evaluate_instructions

    prompts = [prompt_of(e, template, system) for e in examples]
    answers = complete(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       progress=progress)
    answers = [from_word(a) for a in answers]  # without the space `as_word` taught
    refs = [{"output": reference_of(e), "family": e.get("family", "data")} for e in examples]
    return {**evaluate_instructions(answers, refs), "answers": answers}
