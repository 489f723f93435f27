"""Tests of minituner/data.py: packing, prompt masking, the collator, overflow accounting and
the JSONL readers (hand-written bad lines and hypothesis-fuzzed ones)."""
import json
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minituner.data import (IGNORE_INDEX, ClassificationDataset, Collator, DataError, PackedLMDataset,
                            PreferenceDataset, SFTDataset, encode_with_specials, pack_documents,
                            read_alpaca, read_chat, read_preferences, write_jsonl)
from minituner.tokenizer import Tokenizer
from minituner.world import World, format_prompt


@pytest.fixture(scope="module")
def w():
    return World(0)


@pytest.fixture(scope="module")
def tok(w):
    return Tokenizer.train(w.corpus("train", n_docs=400), vocab_size=600)


# ------------------------------------------------------------------------- pre-training
def test_pack_documents_is_bos_text_eos_concatenated(w, tok):
    docs = w.corpus("val", n_docs=40)
    ids = pack_documents(docs, tok, chunk=7)
    ref = [i for d in docs for i in [tok.bos_id] + tok.encode(d) + [tok.eos_id]]
    assert ids.tolist() == ref
    with pytest.raises(DataError, match="no documents"):
        pack_documents([], tok)


@settings(max_examples=30)
@given(n=st.integers(2, 300), block=st.integers(2, 40))
def test_packed_blocks_tile_the_stream(n, block):
    """Blocks are consecutive slices: concatenated they give ids[: len * T]; labels = inputs."""
    ids = torch.arange(n) * 7 % 101
    if n < block:
        with pytest.raises(DataError, match="smaller block_size"):
            PackedLMDataset(ids, block)
        return
    ds = PackedLMDataset(ids, block)
    assert len(ds) == n // block and ds.n_dropped_tokens == n % block
    items = [ds[i] for i in range(len(ds))]
    assert torch.equal(torch.cat([x["input_ids"] for x in items]), ids[: len(ds) * block])
    assert all(torch.equal(x["input_ids"], x["labels"]) and x["input_ids"].shape == (block,) for x in items)
    assert torch.equal(ds[-1]["input_ids"], items[-1]["input_ids"])
    with pytest.raises(IndexError):
        ds[len(ds)]


# ------------------------------------------------------------------------- prompt masks
def test_sft_labels_are_masked_exactly_on_prompt_and_padding(w, tok):
    """For each example the prompt length P is recomputed independently: labels are -100 on
    the first P positions and on padding, and equal the input ids everywhere else; the
    unmasked tokens decode to the answer followed by eos."""
    examples = w.instructions("train", n_per_family=3)
    for template in ("alpaca", "chat"):
        ds = SFTDataset(examples, tok, template=template)
        batch = Collator(tok.pad_id)([ds[i] for i in range(len(ds))])
        B, T = batch["input_ids"].shape
        for b, ex in enumerate(examples):
            P = 1 + len(encode_with_specials(tok, format_prompt(ex["instruction"], ex["input"], template)))
            L = int(batch["attention_mask"][b].sum())
            lab, ids = batch["labels"][b], batch["input_ids"][b]
            assert (lab[:P] == IGNORE_INDEX).all() and (lab[L:] == IGNORE_INDEX).all()
            assert torch.equal(lab[P:L], ids[P:L]) and (ids[L:] == tok.pad_id).all()
            assert (batch["attention_mask"][b, :L] == 1).all() and ids[0] == tok.bos_id
            assert tok.decode(ids[P:L].tolist()) == ex["output"] and ids[L - 1] == tok.eos_id


def test_chat_messages_learn_every_assistant_turn(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where does Ada live?"},
            {"role": "assistant", "content": "Ashford"}, {"role": "user", "content": "And Ben?"},
            {"role": "assistant", "content": "Millbrook"}, {"role": "user", "content": "Thanks"}]
    x = SFTDataset([{"messages": msgs}], tok)[0]
    kept = x["input_ids"][x["labels"] != IGNORE_INDEX].tolist()
    assert kept == tok.encode("Ashford") + [tok.eos_id] + tok.encode("Millbrook") + [tok.eos_id]
    # the ids are those of the chat template's text up to the last assistant turn
    from minituner.world import format_chat
    assert x["input_ids"].tolist() == [tok.bos_id] + encode_with_specials(tok, format_chat(msgs[:5]).rstrip("\n"))
    with pytest.raises(DataError, match="no assistant"):
        SFTDataset([{"messages": msgs[:2]}], tok)


def test_preference_pairs_share_the_masked_prompt(w, tok):
    prefs = w.preferences("train", n_per_family=2)
    ds = PreferenceDataset(prefs, tok)
    batch = Collator(tok.pad_id)([ds[i] for i in range(len(ds))])
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    for b, p in enumerate(prefs):
        P = 1 + len(encode_with_specials(tok, p["prompt"]))
        for side in ("chosen", "rejected"):
            lab = batch[f"{side}_labels"][b]
            L = int(batch[f"{side}_attention_mask"][b].sum())
            assert (lab[:P] == IGNORE_INDEX).all() and (lab[L:] == IGNORE_INDEX).all()
            assert tok.decode(lab[P:L].tolist()) == p[side]
        assert torch.equal(batch["chosen_input_ids"][b, :P], batch["rejected_input_ids"][b, :P])


def test_classification_batches(w, tok):
    ex = w.classification("test", n=6)
    ds = ClassificationDataset(ex, tok)
    batch = Collator(tok.pad_id, pad_to_multiple_of=8)([ds[i] for i in range(6)])
    assert batch["labels"].tolist() == [e["label"] for e in ex]
    assert batch["input_ids"].shape[1] % 8 == 0
    lengths = batch["attention_mask"].sum(1)
    assert lengths.tolist() == [1 + len(tok.encode(e["text"])) for e in ex]


# ----------------------------------------------------------------------------- overflow
@settings(max_examples=20)
@given(max_length=st.integers(20, 90), policy=st.sampled_from(["truncate", "drop"]))
def test_overflow_is_counted_never_silent(w, tok, max_length, policy):
    """Every example is kept whole, truncated (then exactly max_length long) or dropped, and
    the counts add up; a warning reports them; 'error' raises naming the example."""
    examples = w.instructions("test", n_per_family=4)
    full = SFTDataset(examples, tok)
    lengths = [len(full[i]["input_ids"]) for i in range(len(full))]
    n_long = sum(n > max_length for n in lengths)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = SFTDataset(examples, tok, max_length=max_length, overflow=policy)
        except DataError as e:  # everything was too long
            assert "no examples left" in str(e) and n_long == len(examples)
            return
    assert ds.n_truncated + ds.n_dropped == n_long
    assert len(ds) == len(examples) - ds.n_dropped
    assert all(len(ds[i]["input_ids"]) <= max_length for i in range(len(ds)))
    assert all((ds[i]["labels"] != IGNORE_INDEX).any() for i in range(len(ds)))
    if policy == "drop":
        assert ds.n_truncated == 0
    assert (n_long > 0) == any("longer than max_length" in str(c.message) for c in caught)
    if n_long:
        with pytest.raises(DataError, match="overflow='truncate'"):
            SFTDataset(examples, tok, max_length=max_length)


def test_classification_label_errors_name_example_and_field(tok):
    """A missing, non-integer, boolean or negative label (-100 would silently carry no loss)
    and a missing text are errors naming the example's index and the field."""
    good = {"text": "Ada lives in Ashford.", "label": 1}
    for bad, field in (({"text": "x"}, "'label' is missing"), ({"text": "x", "label": "1"}, "'label' must be"),
                       ({"text": "x", "label": 1.0}, "'label' must be"), ({"text": "x", "label": True}, "'label'"),
                       ({"text": "x", "label": -100}, "'label' must be an integer class id >= 0"),
                       ({"label": 0}, "'text' must be a string, got missing"),
                       ({"text": 3, "label": 0}, "'text' must be a string, got a int")):
        with pytest.raises(DataError) as e:
            ClassificationDataset([good, good, bad], tok)
        assert "example 2" in str(e.value) and field in str(e.value), str(e.value)
    ds = ClassificationDataset([good, {"text": "x", "label": np.int64(3)}], tok)
    assert [int(ds[i]["labels"]) for i in range(2)] == [1, 3]


def test_collator_without_pad_id_stacks_and_refuses_ragged():
    """Collator() is train's default: equal shapes are stacked with nothing added (no mask);
    ragged sequences are an error naming the fix, never padded with a guessed id. With a pad
    id, input_ids pad with it, labels with -100, and a mask marks the real tokens."""
    same = [{"input_ids": torch.tensor([1, 2, 3]), "label": torch.tensor(0)},
            {"input_ids": torch.tensor([4, 5, 6]), "label": torch.tensor(1)}]
    batch = Collator()(same)
    assert batch.keys() == {"input_ids", "label"} and batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]]
    ragged = [{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([1, 2, 3])},
              {"input_ids": torch.tensor([4]), "labels": torch.tensor([4])}]
    with pytest.raises(ValueError, match=r"Collator\(tokenizer\.pad_id\)"):
        Collator()(ragged)
    batch = Collator(pad_id=9)(ragged)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="keys"):
        Collator(0)([same[0], {"input_ids": torch.tensor([1])}])


def test_bad_arguments(tok):
    with pytest.raises(DataError, match="empty"):
        SFTDataset([], tok)
    with pytest.raises(ValueError, match="overflow"):
        ClassificationDataset([{"text": "a", "label": 0}], tok, overflow="cut")
    with pytest.raises(ValueError, match="empty batch"):
        Collator(0)([])


# -------------------------------------------------------------------------------- JSONL
def write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines))
    return p


def test_readers_accept_good_files_and_round_trip(tmp_path, w):
    ex = w.instructions("test", n_per_family=3)
    got = read_alpaca(write_jsonl(tmp_path / "a.jsonl", ex))
    assert got == [{k: e[k] for k in ("instruction", "input", "output")} for e in ex]
    p = write(tmp_path, "b.jsonl", ['{"instruction": "Hi", "output": "Hello"}', "", "  "])
    assert read_alpaca(p) == [{"instruction": "Hi", "input": "", "output": "Hello"}]
    msgs = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    assert read_chat(write(tmp_path, "c.jsonl", [json.dumps(msgs)])) == [msgs]
    pr = {"prompt": "Q", "chosen": "A", "rejected": "B"}
    assert read_preferences(write(tmp_path, "d.jsonl", [json.dumps(pr)])) == [pr]


def test_readers_accept_a_byte_order_mark(tmp_path):
    """Files saved by Windows editors start with the UTF-8 BOM (EF BB BF); the first line is
    read like any other, with CRLF line ends too."""
    lines = {read_alpaca: ('{"instruction": "Hi", "output": "Hello"}', {"instruction": "Hi", "input": "",
                                                                       "output": "Hello"}),
             read_chat: ('{"messages": [{"role": "assistant", "content": "b"}]}',
                         {"messages": [{"role": "assistant", "content": "b"}]}),
             read_preferences: ('{"prompt": "a", "chosen": "b", "rejected": "c"}',
                                {"prompt": "a", "chosen": "b", "rejected": "c"})}
    for reader, (line, want) in lines.items():
        p = tmp_path / "bom.jsonl"
        p.write_bytes(b"\xef\xbb\xbf" + (line + "\r\n" + line + "\r\n").encode())
        assert reader(p) == [want, want]


@pytest.mark.parametrize("reader,line,field", [
    (read_alpaca, '{"instruction": "Hi"}', "'output' is missing"),
    (read_alpaca, '{"instruction": 3, "output": "x"}', "'instruction' must be a string"),
    (read_alpaca, '{"instruction": "Hi", "input": [1], "output": "x"}', "'input' must be a string"),
    (read_alpaca, '{"instruction": " ", "output": "x"}', "'instruction' is empty"),
    (read_alpaca, '["instruction"]', "expected a JSON object"),
    (read_alpaca, '{"instruction": "Hi", "output": "x"', "not valid JSON"),
    (read_alpaca, b'{"instruction": "\xff", "output": "x"}', "not valid UTF-8"),
    (read_alpaca, '{"instruction": "\\ud800", "output": "x"}', "'instruction' holds an unpaired"),
    (read_chat, '{"messages": []}', "'messages' must be a non-empty list"),
    (read_chat, '{"messages": [{"role": "bot", "content": "x"}]}', "'messages[0].role'"),
    (read_chat, '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}',
     "'messages[1].content' is missing"),
    (read_chat, '{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    (read_preferences, '{"prompt": "Q", "chosen": "A"}', "'rejected' is missing"),
    (read_preferences, '{"prompt": "Q", "chosen": "A", "rejected": "A"}', "'rejected' equals 'chosen'"),
])
def test_reader_errors_name_file_line_and_field(tmp_path, reader, line, field):
    good = {read_alpaca: '{"instruction": "a", "output": "b"}',
            read_chat: '{"messages": [{"role": "assistant", "content": "b"}]}',
            read_preferences: '{"prompt": "a", "chosen": "b", "rejected": "c"}'}[reader]
    p = write(tmp_path, "bad.jsonl", [good, "", line])
    with pytest.raises(DataError) as e:
        reader(p)
    assert f"{p}:3:" in str(e.value) and field in str(e.value)


def test_empty_file_is_an_error(tmp_path):
    for reader in (read_alpaca, read_chat, read_preferences):
        with pytest.raises(DataError, match="no examples"):
            reader(write(tmp_path, "empty.jsonl", ["", "   "]))


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                           max_leaves=8)
fields = st.sampled_from(["instruction", "input", "output", "messages", "role", "content",
                          "prompt", "chosen", "rejected"])
objects = st.dictionaries(fields, json_values | st.lists(st.dictionaries(fields, json_values, max_size=3),
                                                         max_size=3), max_size=5)
lines = st.one_of(objects.map(json.dumps), st.text(max_size=40).map(str.encode), st.binary(max_size=40),
                  json_values.map(json.dumps))


@settings(max_examples=50)
@given(st.lists(lines, min_size=0, max_size=4))
def test_readers_on_fuzzed_lines_raise_only_data_error(tmp_path_factory, content):
    """Whatever the lines hold, a reader returns well-formed examples or raises DataError."""
    p = tmp_path_factory.mktemp("fuzz") / "f.jsonl"
    p.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode("utf-8", "surrogatepass")
                             for x in content))
    for reader, keys in ((read_alpaca, {"instruction", "input", "output"}), (read_chat, {"messages"}),
                         (read_preferences, {"prompt", "chosen", "rejected"})):
        try:
            out = reader(p)
        except DataError as e:
            assert str(p) in str(e)
            continue
        assert out and all(set(ex) == keys for ex in out)
        assert all(isinstance(v, str) for ex in out for k, v in ex.items() if k != "messages")


# -- read_classification (the recipe's --data) ----------------------------------------------------------
def test_read_classification_names_and_errors(tmp_path):
    from minituner.data import DataError, read_classification

    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "a", "label": "spam"}\n{"text": "b", "label": "ham"}\n\n{"text": "c", "label": "spam"}\n')
    rows, names = read_classification(p)
    assert names == ["ham", "spam"] and [r["label"] for r in rows] == [1, 0, 1]
    q = tmp_path / "ints.jsonl"
    q.write_text("".join(f'{{"text": "t{i}", "label": {i % 11}}}\n' for i in range(22)))
    rows, names = read_classification(q)
    assert names[:3] == ["0", "1", "2"] and names[-1] == "10"  # integers keep their order
    assert [r["label"] for r in rows][:12] == list(range(11)) + [0]
    rows, _ = read_classification(p, class_names=["spam", "ham"])  # the training file's classes
    assert [r["label"] for r in rows] == [0, 1, 0]
    cases = {
        '{"text": "a", "label": "x"}\n{"text": "b"}\n': (":2", "'label' is missing"),
        '{"text": "a", "label": "x"}\n{"text": "b", "label": 1.5}\n': (":2", "must be a class name"),
        '{"text": "a", "label": "x"}\n{"text": "", "label": "y"}\n': (":2", "'text' is empty"),
        '{"text": "a", "label": "x"}\n{"text": "b", "label": 2}\n': (":2", "mixes strings and integers"),
        '{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n': ("", "at least two classes"),
    }
    for text, (line, message) in cases.items():
        p.write_text(text)
        with pytest.raises(DataError, match=message) as e:
            read_classification(p)
        assert f"{p}{line}" in str(e.value)
    p.write_text('{"text": "a", "label": "nope"}\n')
    with pytest.raises(DataError, match="not one of the classes"):
        read_classification(p, class_names=["ham", "spam"])
