"""Tokenizer: a thin layer over Hugging Face `tokenizers` (the Rust library).

Two kinds of tokenizer pass through this one class:

* a **byte-level BPE** trained here from an iterator of texts (Sennrich et al. 2016,
  arXiv:1508.07909; byte-level as in GPT-2, Radford et al. 2019). BPE starts from the 256
  byte symbols and repeatedly merges the most frequent adjacent pair,

      (a, b)* = argmax_{(a, b)} count(a b)            (the merge rule, Sennrich 2016, Alg. 1)

  until the vocabulary holds `vocab_size` symbols. Working on bytes means every string is
  encodable: there is no unknown token. The special tokens `SPECIAL_TOKENS` come first,
  so a trained tokenizer has pad=0, bos=1, eos=2 and the chat-role markers 3..5.
* a **real checkpoint's `tokenizer.json`**: GPT-2's byte-level BPE or BERT/MiniLM's
  WordPiece (Wu et al. 2016, arXiv:1609.08144), loaded as the file describes it.

What this layer adds over `tokenizers` is policy a training library needs:

* the file's own padding/truncation settings are switched off: padding happens in
  `encode_batch` (right by default, `padding_side="left"` for generation) and truncation
  only when asked (`truncation=True`), counted in `BatchEncoding.num_truncated`;
  a too-long text without `truncation=True` is an error, never a silent cut;
* special tokens are added explicitly. `add_bos` / `add_eos` prepend / append the BOS / EOS
  ids. `add_special_tokens=True` instead runs the file's post-processor, which for a BERT
  WordPiece file is the template `[CLS] text [SEP]` (what `transformers` does by default);
  for BERT files bos/eos resolve to [CLS]/[SEP], so either route gives the same ids.
  `template_ids` says what the post-processor adds around one text (None: nothing), so
  data sets can feed each model the input it was trained on;
* `bos_id`, `eos_id`, `pad_id` resolved from the vocabulary by their usual names. GPT-2 has
  no pad token; its EOS `<|endoftext|>` pads instead (the attention mask marks pads anyway).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from minituner.files import PICKLE_SUFFIXES, atomic_file

SPECIAL_TOKENS: list[str] = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]

# Names under which real checkpoints spell their special tokens, most specific first.
_PAD_NAMES = ("<|pad|>", "[PAD]", "<pad>")
_BOS_NAMES = ("<|bos|>", "<s>", "[CLS]", "<|begin_of_text|>", "<|endoftext|>")
_EOS_NAMES = ("<|eos|>", "</s>", "[SEP]", "<|end_of_text|>", "<|eot_id|>", "<|endoftext|>")
_NOT_JSON = PICKLE_SUFFIXES + (".model",)  # pickles, and sentencepiece models


class BatchEncoding(dict):
    """`{"input_ids": (B, T) long, "attention_mask": (B, T) long}`, plus `num_truncated`.

    A plain dict (so `model(**batch)` works) that also carries, as attributes, how many texts
    were cut by truncation and each text's length before padding.
    """

    def __init__(self, data: dict, num_truncated: int, lengths: list[int]):
        super().__init__(data)
        self.num_truncated = num_truncated
        self.lengths = lengths


class Tokenizer:
    """A `tokenizers.Tokenizer` with explicit special tokens, padding and truncation."""

    def __init__(self, backend: _HFTokenizer):
        if not isinstance(backend, _HFTokenizer):
            raise TypeError(f"Tokenizer wraps a tokenizers.Tokenizer, got {type(backend).__name__}; "
                            "use Tokenizer.load(path) or Tokenizer.train(texts, vocab_size)")
        backend.no_padding()  # padding is done by encode_batch, on request
        backend.no_truncation()  # truncation only when asked, and counted
        self._tok = backend

    # ------------------------------------------------------------------ building
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2,
              special_tokens: Sequence[str] = SPECIAL_TOKENS, show_progress: bool = False) -> "Tokenizer":
        """Train a byte-level BPE on `texts`; `special_tokens` get ids 0..len-1 in order."""
        special_tokens = list(special_tokens)
        n_bytes = len(pre_tokenizers.ByteLevel.alphabet())  # 256 byte symbols
        if vocab_size < n_bytes + len(special_tokens):
            raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs the {n_bytes} "
                             f"byte symbols plus {len(special_tokens)} special tokens; "
                             f"use vocab_size >= {n_bytes + len(special_tokens)}")
        if min_frequency < 1:
            raise ValueError(f"min_frequency={min_frequency} must be >= 1")
        if isinstance(texts, str):
            raise TypeError("texts must be an iterable of strings, not one string; wrap it: [text]")
        backend = _HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=special_tokens, show_progress=show_progress,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        n_seen = 0

        def checked(it: Iterable[str]):
            nonlocal n_seen
            for t in it:
                if not isinstance(t, str):
                    raise TypeError(f"texts[{n_seen}] is {type(t).__name__}, expected str")
                n_seen += 1
                yield t

        backend.train_from_iterator(checked(texts), trainer=trainer)
        if n_seen == 0:
            raise ValueError("Tokenizer.train got no texts; pass a non-empty iterable of strings")
        return cls(backend)

    @classmethod
    def load(cls, path_or_dir: str | os.PathLike) -> "Tokenizer":
        """Load a `tokenizer.json` (a file, or a checkpoint directory that holds one)."""
        path = Path(path_or_dir)
        if path.is_dir():
            found = path / "tokenizer.json"
            if not found.is_file():
                present = sorted(p.name for p in path.iterdir())[:20]
                raise FileNotFoundError(
                    f"no tokenizer.json in {path} (it holds: {present}). A directory with only "
                    "vocab.txt or vocab.json + merges.txt can be converted once with transformers: "
                    "AutoTokenizer.from_pretrained(dir).save_pretrained(dir) writes tokenizer.json")
            path = found
        if path.suffix.lower() in _NOT_JSON:
            raise ValueError(f"{path} is not a tokenizer.json: minituner reads only the JSON format of "
                             "the `tokenizers` library (no pickled or sentencepiece files); convert it with "
                             "transformers: AutoTokenizer.from_pretrained(...).save_pretrained(dir)")
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}; pass a tokenizer.json path or "
                                    "the directory that holds it")
        try:
            backend = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust error says which field; name the file too
            raise ValueError(f"{path} is not a valid tokenizer.json ({e}); it must be a file written "
                             "by tokenizers/transformers (Tokenizer.save / save_pretrained)") from e
        return cls(backend)

    def save(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json atomically (a directory gets `dir/tokenizer.json`); returns the file."""
        path = Path(path)
        if path.is_dir() or path.suffix == "":
            path.mkdir(parents=True, exist_ok=True)
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:  # readers see the old or the new file
            self._tok.save(str(tmp))
        return path

    # ------------------------------------------------------------------ vocabulary
    @property
    def backend(self) -> _HFTokenizer:
        """The wrapped `tokenizers.Tokenizer` (padding/truncation disabled)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids, special and added tokens included (the model's V must be >= this)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int:
        """Id of `token`; KeyError naming the special tokens if it is not in the vocabulary."""
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary; special tokens here: "
                           f"{self.special_tokens}")
        return i

    def id_to_token(self, i: int) -> str:
        tok = self._tok.id_to_token(int(i))
        if tok is None:
            raise KeyError(f"id {i} is out of range for a vocabulary of {self.vocab_size}")
        return tok

    @property
    def special_tokens(self) -> list[str]:
        """The added special tokens, by id."""
        added = self._tok.get_added_tokens_decoder()
        return [t.content for _, t in sorted(added.items()) if t.special]

    def _first(self, names: Sequence[str]) -> int | None:
        for name in names:
            i = self._tok.token_to_id(name)
            if i is not None:
                return i
        return None

    @property
    def bos_id(self) -> int | None:
        """Begin-of-sequence id (<|bos|>, <s>, [CLS], <|endoftext|>...), None if there is none."""
        return self._first(_BOS_NAMES)

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence id (<|eos|>, </s>, [SEP], <|endoftext|>...), None if there is none."""
        return self._first(_EOS_NAMES)

    @property
    def pad_id(self) -> int | None:
        """Padding id: <|pad|>/[PAD]/<pad>, else the EOS id (GPT-2 style), else None."""
        i = self._first(_PAD_NAMES)
        return i if i is not None else self.eos_id

    @property
    def template_ids(self) -> tuple[list[int], list[int]] | None:
        """`(before, after)`: the special ids the file's post-processor puts around one text,
        `([101], [102])` for BERT's template `[CLS] $A [SEP]`; None when it adds none (a BPE
        trained here, GPT-2). A model is fed `before + encode(text) + after`, which is
        `encode(text, add_special_tokens=True)`; truncation cuts the text, never `after`."""
        post = self._tok.post_processor
        if post is None or post.num_special_tokens_to_add(False) == 0:
            return None
        probe = self._tok.encode("a", add_special_tokens=True)  # e.g. [CLS] a [SEP]
        text = [k for k, s in enumerate(probe.sequence_ids) if s is not None]  # positions of "a"
        if not text:
            raise ValueError("the post-processor's template leaves no place for the text; "
                             "check the tokenizer.json's post_processor")
        return probe.ids[:text[0]], probe.ids[text[-1] + 1:]

    def _require(self, name: str, value: int | None) -> int:
        if value is None:
            raise ValueError(f"this tokenizer has no {name} token (special tokens: {self.special_tokens}); "
                             f"train one with it in special_tokens or pass add_{name}=False")
        return value

    # ------------------------------------------------------------------ encoding
    def _encode_many(self, texts: list[str], add_bos: bool, add_eos: bool, add_special_tokens: bool,
                     max_length: int | None, truncation: bool, truncation_side: str) -> tuple[list[list[int]], int]:
        for k, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{k}] is {type(t).__name__}, expected str")
        if truncation and max_length is None:
            raise ValueError("truncation=True needs max_length=<int>")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length={max_length} must be >= 1")
        if truncation_side not in ("right", "left"):
            raise ValueError(f"truncation_side={truncation_side!r}; use 'right' (keep the start) or 'left'")
        prefix = [self._require("bos", self.bos_id)] if add_bos else []
        suffix = [self._require("eos", self.eos_id)] if add_eos else []
        # the file's post-processor (BERT: [CLS] ... [SEP]) runs after truncation, so it survives it
        post = self._tok.post_processor if add_special_tokens else None
        n_post = post.num_special_tokens_to_add(False) if post is not None else 0
        n_special = len(prefix) + len(suffix) + n_post
        encs = self._tok.encode_batch(texts, add_special_tokens=False)
        out, n_truncated = [], 0
        for k, enc in enumerate(encs):
            total = len(enc.ids) + n_special
            if max_length is not None and total > max_length:
                if not truncation:
                    raise ValueError(f"text {k} is {total} tokens long, more than max_length={max_length}; "
                                     "pass truncation=True to cut it (counted in num_truncated) "
                                     "or raise max_length")
                keep = max_length - n_special  # special tokens survive truncation
                if keep < 0:
                    raise ValueError(f"max_length={max_length} cannot even hold the {n_special} special tokens")
                enc.truncate(keep, direction=truncation_side)
                n_truncated += 1
            if post is not None:
                enc = self._tok.post_process(enc)
            out.append(prefix + enc.ids + suffix)
        return out, n_truncated

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False,
               add_special_tokens: bool = False, max_length: int | None = None,
               truncation: bool = False) -> list[int]:
        """Token ids of one text.

        `add_special_tokens=True` applies the file's post-processor (BERT: [CLS] ... [SEP]);
        it is off by default so that nothing is added unless asked.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes one str, got {type(text).__name__}; use encode_batch for a list")
        ids, _ = self._encode_many([text], add_bos, add_eos, add_special_tokens, max_length,
                                   truncation, "right")
        return ids[0]

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (a list or a 1-D tensor); special tokens dropped unless asked."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes a 1-D sequence of ids, got shape {tuple(ids.shape)}; "
                                 "use decode_batch for (B, T)")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_batch(self, ids: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        rows = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return [self.decode(r, skip_special_tokens=skip_special_tokens) for r in rows]

    def encode_batch(self, texts: Sequence[str], *, padding: bool | str = True, max_length: int | None = None,
                     truncation: bool = False, add_bos: bool = False, add_eos: bool = False,
                     add_special_tokens: bool = False, padding_side: str = "right",
                     truncation_side: str = "right") -> BatchEncoding:
        """Encode and pad a batch: `{"input_ids": (B, T) long, "attention_mask": (B, T) long}`.

        padding: True pads to the longest text, "max_length" to `max_length`, False requires
        equal lengths. padding_side "right" (training) or "left" (generation: the last column
        is every row's last real token). Truncation happens only with `truncation=True` and is
        counted in the result's `num_truncated`; a too-long text otherwise raises ValueError.
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of texts; for one text use encode(text) or [text]")
        texts = list(texts)
        if not texts:
            raise ValueError("encode_batch got an empty list of texts")
        if padding not in (True, False, "longest", "max_length"):
            raise ValueError(f"padding={padding!r}; use True/'longest', 'max_length' or False")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side={padding_side!r}; use 'right' (training) or 'left' (generation)")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length=<int>")
        rows, n_truncated = self._encode_many(texts, add_bos, add_eos, add_special_tokens, max_length,
                                              truncation, truncation_side)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)  # (B,)
        T = max_length if padding == "max_length" else int(lengths.max())
        if padding is False and bool((lengths != T).any()):
            raise ValueError(f"texts have different lengths {sorted(set(lengths.tolist()))} and padding=False; "
                             "pass padding=True")
        pad = self.pad_id
        if pad is None and bool((lengths != T).any()):
            raise ValueError("this tokenizer has no pad or eos token to pad with; "
                             "train it with '<|pad|>' in special_tokens")
        pos = torch.arange(T).unsqueeze(0)  # (1, T)
        if padding_side == "right":
            mask = pos < lengths.unsqueeze(1)  # (B, T) real tokens first
        else:
            mask = pos >= T - lengths.unsqueeze(1)  # (B, T) real tokens last
        input_ids = torch.full((len(rows), T), pad if pad is not None else 0, dtype=torch.long)
        # boolean-mask assignment fills row by row, left to right: exactly the concatenated rows
        input_ids[mask] = torch.tensor([i for r in rows for i in r], dtype=torch.long)
        return BatchEncoding({"input_ids": input_ids, "attention_mask": mask.long()},
                             num_truncated=n_truncated, lengths=lengths.tolist())

    def __call__(self, texts: Sequence[str], **kwargs) -> BatchEncoding:
        """Alias of `encode_batch`."""
        return self.encode_batch(texts, **kwargs)

    def __repr__(self) -> str:
        model = type(self._tok.model).__name__
        return f"Tokenizer({model}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})"
