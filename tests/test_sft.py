"""Instruction tuning (minituner/sft.py) and packed sequences in the model (document_ids).

Math by hand: the loss counts only the answer's tokens; parity: a packed batch gives every
example exactly the logits and the loss it gets alone (float64, 1e-10; float32, 1e-6);
invariants (hypothesis): the packer keeps every example once, within max_length.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minituner import sft
from minituner.data import IGNORE_INDEX, Collator, SFTDataset, encode_with_specials
from minituner.model import ModelConfig, Transformer
from minituner.tokenizer import SPECIAL_TOKENS, Tokenizer
from minituner.world import World, format_prompt


@pytest.fixture(scope="module")
def tok():
    world = World(0)
    texts = [e["instruction"] + " " + e["input"] + " " + e["output"] for e in world.instructions("train", 20)]
    return Tokenizer.train(texts + world.corpus("train", n_docs=50), vocab_size=300)


@pytest.fixture(scope="module")
def examples():
    # 24 short examples of 8 families (a day's story is long for this tiny tokenizer)
    return [e for e in World(0).instructions("train", 3) if e["family"] != "day_outcome"]


def _model(tok, family="gpt2", dtype=torch.float64):
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, vocab_size=tok.vocab_size, block_size=256, n_layer=2, n_head=2, n_embd=16)
    return Transformer(cfg).to(dtype).eval()


# -- templates -----------------------------------------------------------------------------------
@pytest.mark.parametrize("template", sft.TEMPLATES)
def test_templates_round_trip_through_special_tokens(tok, examples, template):
    """The prompt encodes with each special token (<|user|>, <|eos|>, ...) as its one id and
    decodes back to the very same text; the data set's prompt part is exactly those ids."""
    ex = examples[0]
    prompt = sft.prompt_of(ex, template)
    assert prompt == format_prompt(ex["instruction"], ex["input"], template)
    ids = encode_with_specials(tok, prompt)
    assert tok.decode(ids, skip_special_tokens=False) == prompt
    specials = [tok.token_to_id(s) for s in SPECIAL_TOKENS[3:]]  # system, user, assistant
    if template == "chat":
        assert [i for i in ids if i in specials] == specials  # one id each, in order
        assert ids.count(tok.eos_id) == 2  # the end of the system and of the user turn
    else:
        assert not set(ids) & set(specials)
    item = SFTDataset([ex], tok, template=template)[0]
    assert item["input_ids"][1:len(ids) + 1].tolist() == ids  # after <bos>


def test_chat_prompt_is_the_conversation_up_to_the_last_answer():
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]
    ex = {"messages": msgs}
    assert sft.prompt_of(ex) == ("<|user|>\nHi<|eos|>\n<|assistant|>\nHello<|eos|>\n"
                                 "<|user|>\nAdd 2 and 3.<|eos|>\n<|assistant|>\n")
    assert sft.reference_of(ex) == "5"


# -- the loss ------------------------------------------------------------------------------------
def test_prompt_tokens_carry_no_loss(tok, examples):
    """Changing the logits at prompt positions leaves the loss unchanged; changing them at an
    answer position changes it. By hand on a one-example batch: L = mean over the answer's
    tokens (and <eos>) of -log p, computed here with a loop over positions."""
    model = _model(tok)
    item = SFTDataset(examples[:1], tok)[0]
    batch = Collator(tok.pad_id)([item])
    loss, m = sft.sft_loss(model, batch)
    loss = loss.detach()
    ids, labels = item["input_ids"], item["labels"]
    n_prompt = int((labels == IGNORE_INDEX).sum())
    answer = tok.encode(examples[0]["output"]) + [tok.eos_id]
    assert labels[n_prompt:].tolist() == answer and int(m["num_tokens"]) == len(answer)
    logp = torch.log_softmax(model(ids[None])[0], -1)  # (T, V)
    by_hand = (-sum(logp[t - 1, ids[t]] for t in range(n_prompt, len(ids))) / len(answer)).detach()
    assert float(loss) == pytest.approx(float(by_hand), abs=1e-12)

    class Poke(torch.nn.Module):  # adds noise to the logits at chosen positions
        def __init__(self, positions):
            super().__init__()
            self.positions = positions

        def forward(self, input_ids, **kw):
            out = model(input_ids, **kw).clone()
            out[:, self.positions] += torch.randn_like(out[:, self.positions]) * 5
            return out

    prompt_pos = list(range(n_prompt - 1))  # positions whose next token is in the prompt
    assert float(sft.sft_loss(Poke(prompt_pos), batch)[0]) == pytest.approx(float(loss), abs=1e-12)
    assert float(sft.sft_loss(Poke([n_prompt - 1]), batch)[0]) != pytest.approx(float(loss), abs=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_packed_loss_equals_unpacked_loss(tok, examples, family):
    """Packed rows (block-diagonal mask, per-example positions) give the loss of the same
    examples padded one per row: |difference| <= 1e-10 in float64, <= 1e-6 in float32; and
    every example's logits equal its own logits alone."""
    ds = SFTDataset(examples, tok)
    packed = sft.PackedSFTDataset(ds, max_length=256)
    assert len(packed) < len(ds) // 2  # short examples: several per row
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-6)):
        model = _model(tok, family, dtype)
        collate = Collator(tok.pad_id)
        unpacked = sft.sft_loss(model, collate([ds[i] for i in range(len(ds))]))
        rows = collate([packed[i] for i in range(len(packed))])
        got = sft.sft_loss(model, rows)
        assert int(got[1]["num_tokens"]) == int(unpacked[1]["num_tokens"])
        assert abs(float(got[0]) - float(unpacked[0])) <= tol
    logits = model(rows["input_ids"], document_ids=rows["document_ids"])  # positions derived by the model
    r, b = 0, packed.bins[0]
    start = 0
    for i in b:
        n = len(ds[i]["input_ids"])
        alone = model(ds[i]["input_ids"][None])[0]
        assert torch.allclose(logits[r, start:start + n], alone, atol=1e-5)
        start += n


def test_naive_packing_without_the_block_mask_changes_the_loss(tok, examples):
    """The block mask is what makes packing exact: the same rows with one document per row
    (every example sees the ones before it) give a different loss."""
    model = _model(tok)
    packed = sft.PackedSFTDataset(SFTDataset(examples, tok), max_length=256)
    rows = Collator(tok.pad_id)([packed[i] for i in range(len(packed))])
    exact = sft.sft_loss(model, rows)[0]
    naive = {**rows, "document_ids": (rows["document_ids"] > 0).long()}
    naive.pop("position_ids")
    assert abs(float(sft.sft_loss(model, naive)[0]) - float(exact)) > 1e-4


def test_document_positions_restart_per_document():
    docs = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    pos = Transformer._document_positions(docs)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]


def test_one_document_per_row_is_plain_causal_attention(tok):
    """document_ids all equal: the explicit mask gives the logits of SDPA's is_causal path."""
    model = _model(tok, dtype=torch.float32)
    ids = torch.randint(0, tok.vocab_size, (2, 12))
    plain = model(ids)
    assert torch.allclose(model(ids, document_ids=torch.ones_like(ids)), plain, atol=1e-6)


def test_document_ids_with_kv_cache_is_an_error(tok):
    from minituner.model import KVCache

    model = _model(tok)
    cache = KVCache(16)
    model(torch.ones(1, 3, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="document_ids"):
        model(torch.ones(1, 1, dtype=torch.long), kv_cache=cache, document_ids=torch.ones(1, 1))


# -- packing invariants --------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=40), st.integers(30, 80))
def test_pack_bins_keep_every_example_once_within_max_length(lengths, max_length):
    bins = sft.pack_bins(lengths, max_length)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= max_length for b in bins)
    assert len(bins) >= math.ceil(sum(lengths) / max_length)


def test_packing_labels_never_cross_examples(tok, examples):
    packed = sft.PackedSFTDataset(SFTDataset(examples, tok), max_length=256)
    for row in packed.rows:
        starts = torch.nonzero(row["position_ids"] == 0).flatten()
        assert (row["labels"][starts] == IGNORE_INDEX).all()
        assert row["input_ids"].numel() <= 256
    assert sum(len(b) for b in packed.bins) == len(examples)
    assert 0 < packed.fill <= 1


def test_too_long_example_is_an_error_naming_the_fix():
    with pytest.raises(ValueError, match="max_length"):
        sft.pack_bins([5, 50], 10)


def test_sft_dataset_rejects_unknown_template(tok, examples):
    with pytest.raises(ValueError, match="template"):
        sft.sft_dataset(examples, tok, 128, template="vicuna")


def test_completion_only_false_puts_the_loss_on_the_prompt_too(tok, examples):
    masked = sft.sft_dataset(examples[:2], tok, 256)
    full = sft.sft_dataset(examples[:2], tok, 256, completion_only=False)
    for i in range(2):
        assert (masked[i]["labels"][masked[i]["labels"] != IGNORE_INDEX]
                == full[i]["labels"][masked[i]["labels"] != IGNORE_INDEX]).all()
        assert full[i]["labels"][0] == IGNORE_INDEX and (full[i]["labels"][1:] == full[i]["input_ids"][1:]).all()
