"""The pre-trained base model in weights/base: it loads, its numbers are the model card's,
it has learned the world's language and facts, and it does not follow instructions yet.

These tests re-measure what `python -m minituner pretrain` wrote into the model card
(weights/base/README.md, with the same numbers in metrics.json), so a card that drifts
from the committed weights fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from minituner import checkpoint
from minituner.evaluate import fact_recall, instruction_exact_match
from minituner.model import ModelConfig
from minituner.pretrain import INSTRUCTION_EM_BOUND, UNIGRAM_RATIO_BOUND, PretrainConfig, held_out
from minituner.data import PackedLMDataset, pack_documents
from minituner.tokenizer import Tokenizer
from minituner.world import World

BASE = Path(__file__).resolve().parent.parent / "weights" / "base"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "history.json", "metrics.json", "README.md")


@pytest.fixture(scope="module")
def base():
    missing = [f for f in FILES if not (BASE / f).is_file()]
    assert not missing, f"weights/base lacks {missing}; run `python -m minituner pretrain --out weights/base`"
    model = checkpoint.load(BASE)
    tok = Tokenizer.load(BASE / "tokenizer.json")
    metrics = json.loads((BASE / "metrics.json").read_text())
    return model, tok, metrics, World(metrics["config"]["seed"])


def card_number(pattern: str) -> float:
    """A number as printed in the model card (README.md), so the card itself is checked."""
    m = re.search(pattern, (BASE / "README.md").read_text())
    assert m, f"model card has no line matching {pattern!r}"
    return float(m.group(1))


def test_card_states_the_bounds_of_pretrain_py(base):
    """One bound per claim, stated once (minituner/pretrain.py), written into metrics.json and
    the card; the slow tests below and notebook 01 read it from metrics.json."""
    _, _, metrics, _ = base
    assert metrics["unigram_ratio_bound"] == UNIGRAM_RATIO_BOUND
    assert metrics["instruction_em_bound"] == INSTRUCTION_EM_BOUND
    assert card_number(r"Bound stated for the tests: perplexity < unigram perplexity / (\d+(?:\.\d+)?)") \
        == UNIGRAM_RATIO_BOUND
    assert card_number(r"Bound stated for the tests: exact match < (\d+(?:\.\d+)?)") == INSTRUCTION_EM_BOUND


def test_files_fit_the_course_budget():
    """The committed base model stays small: <= 25 MB in all, 1-20 M parameters."""
    size = sum((BASE / f).stat().st_size for f in FILES)
    assert size <= 25e6, f"weights/base is {size / 1e6:.1f} MB"
    model = checkpoint.load(BASE)
    n = sum(p.numel() for p in model.parameters())
    assert 1e6 <= n <= 20e6


def test_config_and_tokenizer_agree(base):
    model, tok, metrics, _ = base
    assert model.config.vocab_size == tok.vocab_size
    # the same model (a config written before a field was added reads back with its default)
    assert model.config == ModelConfig.from_dict(metrics["config"]["model"])
    assert tok.decode(tok.encode("Ada lives in Ashford.")) == "Ada lives in Ashford."


@pytest.mark.slow
def test_held_out_perplexity_matches_card_and_beats_unigram(base):
    """Re-measured held-out perplexity is within 2% of the card's, and far below the
    unigram baseline (a model that learned nothing about context sits at the unigram)."""
    model, tok, metrics, world = base
    T = model.config.block_size
    cfg = PretrainConfig(seed=metrics["config"]["seed"], n_docs=metrics["config"]["n_docs"])
    train_ds = PackedLMDataset(pack_documents(world.corpus("train", n_docs=cfg.n_docs), tok), T)
    val_ds = PackedLMDataset(pack_documents(world.corpus("val"), tok), T)
    h = held_out(model, train_ds, val_ds, tok.vocab_size)
    card_ppl = card_number(r"\| this model \| [\d.]+ \| ([\d.]+) \|")
    assert h["perplexity"] == pytest.approx(card_ppl, rel=0.02)
    assert h["unigram_perplexity"] == pytest.approx(card_number(r"\| unigram baseline \(add-one\) \| [\d.]+ \| ([\d.]+) \|"), rel=0.02)
    bound = metrics["unigram_ratio_bound"]
    assert h["perplexity"] < h["unigram_perplexity"] / bound, \
        f"held-out perplexity is not below the unigram's / {bound}: the base model has not learned the language"


@pytest.mark.slow
def test_knows_the_facts(base):
    """Fact recall is far above chance (the card's mean, re-measured)."""
    model, tok, metrics, world = base
    r = fact_recall(model, tok, world)
    assert r["mean"] == pytest.approx(metrics["fact_recall"]["mean"], abs=0.02)
    for attr in ("town", "color", "pet", "job"):
        assert r[attr]["accuracy"] > 3 * r[attr]["chance"], (attr, r[attr])


@pytest.mark.slow
def test_does_not_follow_instructions_yet(base):
    """Exact match on the instruction test split stays below the bound the card states:
    instruction following is what chapter 08 adds, so it must not be there already."""
    model, tok, metrics, world = base
    bound = metrics["instruction_em_bound"]
    r = instruction_exact_match(model, tok, world.instructions("test"))
    assert r["exact_match"] < bound
    assert r["exact_match"] == pytest.approx(metrics["instruction_exact_match"]["exact_match"], abs=0.01)
