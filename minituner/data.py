"""Data: from text (the world's, or your JSONL files) to batches of token ids.

Four kinds of examples feed the chapters, each a map-style data set (``len`` and ``[i]``
returning a dict of 1-D tensors) that the trainer batches with ``Collator``:

===================  ==========================================  =========================
data set             one example                                 used by
===================  ==========================================  =========================
PackedLMDataset      input_ids (T,), labels (T,) = input_ids     pre-training
ClassificationDataset input_ids (T,), labels () = class id       heads, adapters, LoRA
                     (<bos> text, or the file's [CLS] text [SEP])
SFTDataset           input_ids (T,), labels (T,), prompt = -100  instruction tuning
PreferenceDataset    chosen_/rejected_ input_ids and labels      DPO, ORPO
===================  ==========================================  =========================

Labels follow the Hugging Face convention that ``minituner.train`` uses: ``labels[t]`` is
aligned with ``input_ids[t]`` and the loss shifts them (position t predicts token t+1);
``IGNORE_INDEX = -100`` marks positions that carry no loss. Supervised fine-tuning puts the
loss on the answer only (Ouyang et al. 2022, arXiv:2203.02155, train on completions):

    tokens   <bos> ### Instruction: ... ### Response:\\n  Ashford <eos> <pad> <pad>
    labels   -100  -100 ...                    -100       Ashford <eos> -100  -100

Prompt and answer are tokenized separately and concatenated, which is exactly how a prompt
is tokenized at generation time. The special tokens ``<|system|>``, ``<|user|>``,
``<|assistant|>``, ``<|eos|>`` written in a template's text map to their ids whatever the
tokenizer does with them (``encode_with_specials``).

Too long examples are never cut silently: ``overflow="error"`` (default) raises,
``"truncate"`` keeps the first ``max_length`` tokens (a BERT input keeps its closing
``[SEP]``), ``"drop"`` leaves the example out; the
data set counts them (``n_truncated``, ``n_dropped``) and warns once with the counts. An
empty data set is an error.

JSONL readers (``read_alpaca``, ``read_chat``, ``read_preferences``) check every line and
raise ``DataError`` (a ``ValueError``) naming the file, the line and the field.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np
import torch

from minituner.files import write_text
from minituner.tokenizer import SPECIAL_TOKENS
from minituner.world import DEFAULT_SYSTEM, format_prompt

IGNORE_INDEX = -100  # a label that carries no loss (F.cross_entropy's default ignore_index)
OVERFLOW = ("error", "truncate", "drop")
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL_TOKENS) + ")")


class DataError(ValueError):
    """Bad data: the message names the file, the line and the field (or the example)."""


class TokenizerLike(Protocol):
    """What the data sets need of ``minituner.tokenizer.Tokenizer`` (its ``template_ids``
    too where it has them: read with ``getattr``, absent means none)."""
    pad_id: int | None
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

    def token_to_id(self, token: str) -> int: ...


def encode_with_specials(tokenizer: TokenizerLike, text: str) -> list[int]:
    """Token ids of ``text`` where each special token written in it (``<|eos|>``...) becomes
    its own id and the text between is encoded normally."""
    ids: list[int] = []
    for piece in _SPECIAL_RE.split(text):
        if piece in SPECIAL_TOKENS:
            ids.append(tokenizer.token_to_id(piece))
        elif piece:
            ids.extend(tokenizer.encode(piece))
    return ids


def _special(tokenizer: TokenizerLike, name: str) -> int:
    value = getattr(tokenizer, name + "_id")
    if value is None:
        raise ValueError(f"the tokenizer has no {name} token; train it with SPECIAL_TOKENS")
    return int(value)


def _check_overflow(overflow: str, max_length: int | None) -> None:
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {OVERFLOW}, got {overflow!r}")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be >= 2 (or None for no limit), got {max_length}")


class _Fitted:
    """Applies the overflow policy to (ids, labels) pairs and counts what it did."""

    def __init__(self, name: str, max_length: int | None, overflow: str) -> None:
        _check_overflow(overflow, max_length)
        self.name, self.max_length, self.overflow = name, max_length, overflow
        self.n_truncated = self.n_dropped = 0

    def __call__(self, i: int, ids: list[int], labels: list[int] | None, keep_end: int = 0) -> tuple | None:
        """``keep_end``: the last tokens (BERT's [SEP]) survive truncation, the text before them is cut."""
        m = self.max_length
        if m is None or len(ids) <= m:
            return ids, labels
        if self.overflow == "error":
            raise DataError(f"{self.name}: example {i} is {len(ids)} tokens long, more than "
                            f"max_length={m}; raise max_length or pass overflow='truncate' or 'drop'")
        if self.overflow == "drop" or (labels is not None and all(x == IGNORE_INDEX for x in labels[:m])):
            self.n_dropped += 1  # dropped, or truncated down to no target at all
            return None
        self.n_truncated += 1
        if keep_end:
            if keep_end >= m:
                raise DataError(f"{self.name}: max_length={m} cannot hold the {keep_end} closing special "
                                f"tokens and any text; raise max_length")
            return ids[:m - keep_end] + ids[-keep_end:], None
        return ids[:m], (labels[:m] if labels is not None else None)

    def report(self, n_kept: int) -> None:
        if n_kept == 0:
            raise DataError(f"{self.name}: no examples left (dropped {self.n_dropped} longer than "
                            f"max_length={self.max_length}); pass examples or raise max_length")
        if self.n_truncated or self.n_dropped:
            warnings.warn(f"{self.name}: truncated {self.n_truncated} and dropped {self.n_dropped} "
                          f"examples longer than max_length={self.max_length} "
                          f"(kept {n_kept})", stacklevel=3)


def _nonempty(examples: Sequence, name: str) -> None:
    if len(examples) == 0:
        raise DataError(f"{name}: the data set is empty; pass at least one example")


# ------------------------------------------------------------------------- pre-training
def pack_documents(docs: Iterable[str], tokenizer: TokenizerLike, chunk: int = 256) -> torch.Tensor:
    """One stream of ids (N,): every document as ``<bos> text <eos>``, concatenated in order.
    Uses the tokenizer's ``encode_batch`` (parallel, in chunks of ``chunk`` documents) when
    it has one."""
    docs = list(docs)
    if not docs:
        raise DataError("pack_documents: no documents; pass at least one text")
    if not hasattr(tokenizer, "encode_batch"):
        return torch.tensor([i for d in docs for i in tokenizer.encode(d, add_bos=True, add_eos=True)])
    parts = []
    for s in range(0, len(docs), chunk):
        enc = tokenizer.encode_batch(docs[s:s + chunk], add_bos=True, add_eos=True)  # (B, T)
        parts.append(enc["input_ids"][enc["attention_mask"].bool()])  # row-major: docs in order
    return torch.cat(parts).long()


class PackedLMDataset(torch.utils.data.Dataset):
    """Non-overlapping blocks of ``block_size`` tokens from one id stream (N,). Block i is
    ids[i*T:(i+1)*T] with labels equal to the inputs (the loss shifts them). The last
    ``N mod T`` tokens do not fill a block and are left out (``n_dropped_tokens``)."""

    def __init__(self, ids: Sequence[int] | torch.Tensor, block_size: int) -> None:
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {block_size}")
        self.ids = torch.as_tensor(ids, dtype=torch.long).flatten()  # (N,)
        self.block_size = block_size
        self.n_blocks = self.ids.numel() // block_size
        if self.n_blocks == 0:
            raise DataError(f"PackedLMDataset: {self.ids.numel()} tokens do not fill one block of "
                            f"{block_size}; pass more text or a smaller block_size")
        self.n_dropped_tokens = self.ids.numel() - self.n_blocks * block_size

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -self.n_blocks <= i < self.n_blocks:
            raise IndexError(f"block {i} out of range for {self.n_blocks} blocks")
        i %= self.n_blocks
        x = self.ids[i * self.block_size:(i + 1) * self.block_size]  # (T,)
        return {"input_ids": x, "labels": x.clone()}


# ------------------------------------------------------------------------ classification
class _TokenLabelDataset(torch.utils.data.Dataset):
    """A list of (input_ids, labels) tensor pairs, served as {"input_ids", "labels"} dicts."""

    items: list[tuple[torch.Tensor, torch.Tensor]]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.items[i]
        return {"input_ids": x, "labels": y}


def classification_ids(tokenizer: TokenizerLike) -> tuple[list[int], list[int]]:
    """``(before, after)``: the ids around a text that is fed to a model to classify, the
    input the model saw in pre-training. A tokenizer whose file has a template that adds
    special tokens gets its template (``tokenizer.template_ids``): ``[CLS] text [SEP]`` for
    BERT/MiniLM, as transformers and sentence-transformers feed it. Otherwise ``<bos> text``:
    our BPE and GPT-2, whose pre-training documents start with bos."""
    template = getattr(tokenizer, "template_ids", None)
    if template is not None:
        return list(template[0]), list(template[1])
    return [_special(tokenizer, "bos")], []


class ClassificationDataset(_TokenLabelDataset):
    """``{"text", "label"}`` examples as ``{"input_ids": (T,), "labels": ()}`` with the text
    encoded as ``before + encode(text) + after`` (``classification_ids``): ``<bos> text`` for
    our BPE, ``[CLS] text [SEP]`` for BERT. ``max_length`` and ``overflow`` as in the module
    docstring; truncation cuts the text and keeps ``after`` ([SEP]) at the end."""

    def __init__(self, examples: Sequence[Mapping[str, Any]], tokenizer: TokenizerLike,
                 max_length: int | None = None, overflow: str = "error") -> None:
        _nonempty(examples, "ClassificationDataset")
        fit = _Fitted("ClassificationDataset", max_length, overflow)
        before, after = classification_ids(tokenizer)
        self.items = []
        for i, ex in enumerate(examples):
            text, label = _example_text(i, ex), _example_label(i, ex)  # check before encoding
            got = fit(i, before + tokenizer.encode(text) + after, None, keep_end=len(after))
            if got is not None:
                self.items.append((torch.tensor(got[0]), torch.tensor(label)))
        fit.report(len(self.items))
        self.n_truncated, self.n_dropped = fit.n_truncated, fit.n_dropped


def _example_text(i: int, ex: Mapping[str, Any]) -> str:
    if not isinstance(ex, Mapping):
        raise DataError(f"ClassificationDataset: example {i} must be a dict with 'text' and 'label', "
                        f"got a {type(ex).__name__}")
    text = ex.get("text")
    if not isinstance(text, str):
        got = "missing" if text is None else f"a {type(text).__name__}"
        raise DataError(f"ClassificationDataset: example {i}: field 'text' must be a string, got {got}")
    return text


def _example_label(i: int, ex: Mapping[str, Any]) -> int:
    """A class id: an integer >= 0. Not a bool, a float or a string: "1" or 1.0 are likely a
    mistake upstream, and -100 would silently carry no loss (IGNORE_INDEX)."""
    label = ex.get("label")
    if label is None:
        raise DataError(f"ClassificationDataset: example {i}: field 'label' is missing; "
                        "every example needs an integer class id")
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label < 0:
        raise DataError(f"ClassificationDataset: example {i}: field 'label' must be an integer class id "
                        f">= 0, got {label!r} ({type(label).__name__}); map label names to ids first")
    return int(label)


# ------------------------------------------------------------------------------ SFT
def _chat_ids(tokenizer: TokenizerLike, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[int]]:
    """Ids and labels of a conversation in the chat template (``world.format_chat``): the
    loss is on every assistant turn's content and its ``<|eos|>``; turns after the last
    assistant turn carry no target and are left out."""
    eos = _special(tokenizer, "eos")
    ids, labels, pending = [_special(tokenizer, "bos")], [IGNORE_INDEX], ""
    for m in messages:
        if m["role"] == "assistant":
            p = encode_with_specials(tokenizer, pending + "<|assistant|>\n")
            c = tokenizer.encode(m["content"]) + [eos]
            ids += p + c
            labels += [IGNORE_INDEX] * len(p) + c
            pending = "\n"
        else:
            pending += f"<|{m['role']}|>\n{m['content']}<|eos|>\n"
    return ids, labels


class SFTDataset(_TokenLabelDataset):
    """Instruction examples as ``{"input_ids": (T,), "labels": (T,)}``, the prompt masked.

    An example is either ``{"instruction", "input", "output"}`` (formatted with
    ``world.format_prompt(..., template)``; the answer is followed by eos) or
    ``{"messages": [{"role", "content"}, ...]}`` (the chat template, loss on every assistant
    turn). ``max_length`` and ``overflow`` as in the module docstring; truncation keeps the
    start, and an example left without any answer token counts as dropped."""

    def __init__(self, examples: Sequence[Mapping[str, Any]], tokenizer: TokenizerLike,
                 max_length: int | None = None, template: str = "alpaca", overflow: str = "error",
                 system: str | None = DEFAULT_SYSTEM) -> None:
        _nonempty(examples, "SFTDataset")
        fit = _Fitted("SFTDataset", max_length, overflow)
        bos, eos = _special(tokenizer, "bos"), _special(tokenizer, "eos")
        self.items = []
        for i, ex in enumerate(examples):
            if "messages" in ex:
                ids, labels = _chat_ids(tokenizer, ex["messages"])
                if all(y == IGNORE_INDEX for y in labels):
                    raise DataError(f"SFTDataset: example {i} has no assistant message to learn")
            else:
                prompt = format_prompt(ex["instruction"], ex.get("input") or "", template, system)
                p = [bos] + encode_with_specials(tokenizer, prompt)
                c = tokenizer.encode(ex["output"]) + [eos]
                ids, labels = p + c, [IGNORE_INDEX] * len(p) + c  # loss on the answer only
            got = fit(i, ids, labels)
            if got is not None:
                self.items.append((torch.tensor(got[0]), torch.tensor(got[1])))
        fit.report(len(self.items))
        self.n_truncated, self.n_dropped = fit.n_truncated, fit.n_dropped


# ---------------------------------------------------------------------- preferences
class PreferenceDataset(torch.utils.data.Dataset):
    """``{"prompt", "chosen", "rejected"}`` as ``chosen_input_ids``, ``chosen_labels``,
    ``rejected_input_ids``, ``rejected_labels`` (each (T,)): ``<bos> prompt answer <eos>``
    with the shared prompt masked. ``prompt`` is used as written (``world.preferences``
    formats it already) unless ``template`` is given, which formats it as an instruction.
    If either side is too long, both are handled by ``overflow`` together."""

    def __init__(self, examples: Sequence[Mapping[str, Any]], tokenizer: TokenizerLike,
                 max_length: int | None = None, overflow: str = "error",
                 template: str | None = None, system: str | None = DEFAULT_SYSTEM) -> None:
        _nonempty(examples, "PreferenceDataset")
        fit = _Fitted("PreferenceDataset", max_length, overflow)
        bos, eos = _special(tokenizer, "bos"), _special(tokenizer, "eos")
        self.items = []
        for i, ex in enumerate(examples):
            prompt = ex["prompt"] if template is None else format_prompt(ex["prompt"], "", template, system)
            p = [bos] + encode_with_specials(tokenizer, prompt)
            pair = []
            for side in ("chosen", "rejected"):
                c = tokenizer.encode(ex[side]) + [eos]
                pair.append((p + c, [IGNORE_INDEX] * len(p) + c))
            longest = max(pair, key=lambda t: len(t[0]))
            if fit(i, *longest) is None:  # one decision (and one count) for the pair
                continue
            m = max_length if max_length is not None else len(longest[0])
            self.items.append(tuple(torch.tensor(s[:m]) for ids, labels in pair for s in (ids, labels)))
        fit.report(len(self.items))
        self.n_truncated, self.n_dropped = fit.n_truncated, fit.n_dropped

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ci, cl, ri, rl = self.items[i]
        return {"chosen_input_ids": ci, "chosen_labels": cl,
                "rejected_input_ids": ri, "rejected_labels": rl}


# -------------------------------------------------------------------------- collator
class Collator:
    """Batches a list of example dicts into a dict of tensors, the one collator of minituner.

    ``Collator(pad_id)`` right-pads every 1-D sequence to one length T (the longest in the
    batch, rounded up to ``pad_to_multiple_of``): ``*input_ids`` with ``pad_id``, ``*labels``
    with ``IGNORE_INDEX``, anything else with 0; for each ``<prefix>input_ids`` it adds a
    ``<prefix>attention_mask`` (B, T) marking real tokens with 1. Scalars are stacked (B,).
    Chosen and rejected share T, so they can be concatenated into one (2B, T) batch.

    ``Collator()`` (no pad id) only stacks examples of equal shapes, adding nothing: it is
    ``train``'s default, right for fixed-length data (``PackedLMDataset``), and it refuses
    ragged sequences with a message saying to pass ``Collator(tokenizer.pad_id)``: padding
    with a guessed id (0 is a real token in most vocabularies) would train on wrong inputs.
    """

    def __init__(self, pad_id: int | None = None, pad_to_multiple_of: int | None = None) -> None:
        if pad_to_multiple_of is not None and (pad_id is None or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of} needs a pad_id and a positive multiple")
        self.pad_id = None if pad_id is None else int(pad_id)
        self.multiple = pad_to_multiple_of

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("Collator got an empty batch")
        if not all(isinstance(ex, Mapping) for ex in examples):
            raise TypeError("each example must be a dict of tensors, e.g. {'input_ids': tensor([...])}; "
                            "pass collate_fn= for other formats")
        keys = list(examples[0])
        for j, ex in enumerate(examples):
            if set(ex) != set(keys):
                raise ValueError(f"Collator: example {j} has keys {sorted(ex)}, example 0 has {sorted(keys)}")
        rows = {k: [torch.as_tensor(ex[k]) for ex in examples] for k in keys}
        ragged = [k for k, v in rows.items() if len({t.shape for t in v}) > 1]
        if self.pad_id is None:
            if ragged:
                lengths = sorted({tuple(t.shape) for t in rows[ragged[0]]})
                raise ValueError(f"examples' {ragged} have different shapes ({lengths[0]} ... {lengths[-1]}) "
                                 "and this collator has no pad id; pass collate_fn=data.Collator(tokenizer.pad_id)")
            return {k: torch.stack(v) for k, v in rows.items()}  # (B, ...)
        bad = [k for k in ragged if any(t.dim() != 1 for t in rows[k])]
        if bad:
            raise ValueError(f"examples' {bad} have different shapes and are not 1-D sequences; pass collate_fn=")
        seqs = [k for k, v in rows.items() if v[0].dim() == 1]
        T = max((t.numel() for k in seqs for t in rows[k]), default=0)
        if self.multiple:
            T = -(-T // self.multiple) * self.multiple
        out = {}
        for k, v in rows.items():
            if k not in seqs:
                out[k] = torch.stack(v)  # (B,)
                continue
            fill = IGNORE_INDEX if k.endswith("labels") else self.pad_id if k.endswith("input_ids") else 0
            batch = torch.full((len(v), T), fill, dtype=v[0].dtype)  # (B, T)
            for b, t in enumerate(v):
                batch[b, :t.numel()] = t
            out[k] = batch
            if k.endswith("input_ids") and k[:-len("input_ids")] + "attention_mask" not in rows:
                lengths = torch.tensor([t.numel() for t in v])  # (B,)
                out[k[:-len("input_ids")] + "attention_mask"] = \
                    (torch.arange(T)[None, :] < lengths[:, None]).long()  # (B, T)
        return out


# ---------------------------------------------------------------------------- JSONL
def _lines(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSONL file."""
    path = Path(path)
    out = []
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark (Windows editors)
    for n, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{n}: the line is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if not line:
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise DataError(f"{path}:{n}: not valid JSON ({str(e)[:80]}); write one JSON object per line") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object {{...}}, got {type(obj).__name__}")
        out.append((n, obj))
    if not out:
        raise DataError(f"{path}: no examples (the file is empty or only blank lines)")
    return out


def _text(path: Path, n: int, obj: Mapping, field: str, *, optional: bool = False,
          name: str | None = None) -> str:
    v = obj.get(field)
    where = f"{path}:{n}: field '{name or field}'"
    if v is None and optional:
        return ""
    if v is None:
        raise DataError(f"{where} is missing; every line needs it")
    if not isinstance(v, str):
        raise DataError(f"{where} must be a string, got {type(v).__name__}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{where} holds an unpaired surrogate escape; fix the text's encoding") from None
    if not optional and not v.strip():
        raise DataError(f"{where} is empty")
    return v


def read_alpaca(path: str | Path) -> list[dict]:
    """Alpaca-style JSONL: ``instruction`` and ``output`` (non-empty strings), ``input``
    (optional string). Returns ``{"instruction", "input", "output"}`` dicts."""
    return [{"instruction": _text(Path(path), n, o, "instruction"),
             "input": _text(Path(path), n, o, "input", optional=True),
             "output": _text(Path(path), n, o, "output")} for n, o in _lines(path)]


def read_chat(path: str | Path) -> list[dict]:
    """Chat JSONL: ``messages``, a list of ``{"role": system|user|assistant, "content": str}``
    with at least one assistant turn. Returns ``{"messages": [...]}`` dicts."""
    out = []
    for n, o in _lines(path):
        msgs = o.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{path}:{n}: field 'messages' must be a non-empty list of "
                            f"{{'role', 'content'}} objects, got {type(msgs).__name__}")
        clean = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise DataError(f"{path}:{n}: field 'messages[{j}]' must be an object, got {type(m).__name__}")
            role = m.get("role")
            if role not in ("system", "user", "assistant"):
                raise DataError(f"{path}:{n}: field 'messages[{j}].role' must be 'system', 'user' "
                                f"or 'assistant', got {str(role)[:40]!r}")
            clean.append({"role": role, "content": _text(Path(path), n, m, "content",
                                                         name=f"messages[{j}].content")})
        if not any(m["role"] == "assistant" for m in clean):
            raise DataError(f"{path}:{n}: field 'messages' has no assistant turn to learn from")
        out.append({"messages": clean})
    return out


def read_preferences(path: str | Path) -> list[dict]:
    """Preference JSONL: ``prompt``, ``chosen``, ``rejected`` (non-empty strings, chosen !=
    rejected). Returns ``{"prompt", "chosen", "rejected"}`` dicts."""
    out = []
    for n, o in _lines(path):
        ex = {f: _text(Path(path), n, o, f) for f in ("prompt", "chosen", "rejected")}
        if ex["chosen"] == ex["rejected"]:
            raise DataError(f"{path}:{n}: field 'rejected' equals 'chosen'; a pair needs two different answers")
        out.append(ex)
    return out


def read_classification(path: str | Path, class_names: Sequence[str] | None = None
                        ) -> tuple[list[dict], list[str]]:
    """Classification JSONL: ``text`` (non-empty string) and ``label`` (a class name, or an
    integer index). Returns (``{"text", "label"}`` dicts with ``label`` an index, the class
    names). Names are sorted (integers keep their order) unless ``class_names`` fixes them,
    as for an evaluation file that must use the training file's classes."""
    rows = []
    for n, o in _lines(path):
        text = _text(Path(path), n, o, "text")
        label = o.get("label")
        if label is None:
            raise DataError(f"{path}:{n}: field 'label' is missing; every line needs a class "
                            "name or an integer index")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DataError(f"{path}:{n}: field 'label' must be a class name (string) or an integer, "
                            f"got {type(label).__name__}")
        rows.append((n, text, label))
    if class_names is None:
        kinds = {type(lab) for _, _, lab in rows}
        if len(kinds) > 1:
            n = next(n for n, _, lab in rows if type(lab) is not type(rows[0][2]))
            raise DataError(f"{path}:{n}: field 'label' mixes strings and integers across lines; use one kind")
        names = sorted({str(lab) for _, _, lab in rows}, key=lambda x: (len(x), x) if kinds == {int} else x)
    else:
        names = [str(c) for c in class_names]
    out = []
    for n, text, label in rows:
        if str(label) not in names:
            raise DataError(f"{path}:{n}: field 'label' is {label!r}, not one of the classes {names}")
        out.append({"text": text, "label": names.index(str(label))})
    if len(names) < 2:
        raise DataError(f"{path}: every line has the label {names[0]!r}; a classifier needs at least two classes")
    return out, names


def write_jsonl(path: str | Path, examples: Iterable[Mapping[str, Any]]) -> Path:
    """Write examples one JSON object per line (UTF-8), e.g. the world's tasks for other tools."""
    return write_text(path, "".join(json.dumps(dict(ex), ensure_ascii=False) + "\n" for ex in examples))
