"""The measuring tools behind every chapter's before/after numbers (minituner.evaluate)."""

from __future__ import annotations

import math

import pytest
import torch

from minituner.evaluate import complete, fact_recall, sequence_scores, unigram_baseline
from minituner.model import ModelConfig, Transformer
from minituner.tokenizer import Tokenizer
from minituner.world import World


@pytest.fixture(scope="module")
def tiny():
    world = World(0)
    tok = Tokenizer.train(world.corpus("train", n_docs=300), vocab_size=400)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(family="gpt2", vocab_size=tok.vocab_size, block_size=96,
                                    n_layer=2, n_head=2, n_embd=32)).eval()
    return model, tok, world


def test_unigram_baseline_by_hand():
    """Train counts {0: 2, 1: 1}, V = 3, add-one: q(0) = 3/6, q(1) = 2/6, q(2) = 1/6.
    Eval [0, 1]: H = -(ln 1/2 + ln 1/3) / 2 = (ln 2 + ln 3) / 2 = ln 6 / 2."""
    r = unigram_baseline(torch.tensor([0, 0, 1]), torch.tensor([0, 1]), vocab_size=3)
    assert r["loss"] == pytest.approx(math.log(6) / 2, abs=1e-12)
    assert r["perplexity"] == pytest.approx(math.sqrt(6), abs=1e-9)
    with pytest.raises(ValueError, match="non-empty"):
        unigram_baseline(torch.tensor([], dtype=torch.long), torch.tensor([0]), 3)


def test_sequence_scores_equal_a_token_by_token_loop(tiny):
    """sum_t log p(x_t | x_<t), batched with padding, equals the same sum computed one text at
    a time, one position at a time (float64 reference)."""
    model, tok, _ = tiny
    texts = ["Ada lives in Ashford.", "Ben is a baker and he has a dog.", "Hi."]
    got = sequence_scores(model, tok, texts, batch_size=2)
    for text, score in zip(texts, got):
        ids = torch.tensor([tok.encode(text, add_bos=True)])  # (1, T)
        with torch.no_grad():
            logp = model.double()(ids).log_softmax(-1)  # (1, T, V)
        model.float()
        ref = sum(float(logp[0, t - 1, ids[0, t]]) for t in range(1, ids.shape[1]))
        assert float(score) == pytest.approx(ref, abs=1e-4)


def test_complete_matches_one_prompt_at_a_time_and_stops_at_newline(tiny):
    """Batched, left-padded completion gives each prompt the greedy continuation it gets
    alone, cut at the first newline, and never contains the stop string."""
    model, tok, _ = tiny
    prompts = ["Ada lives in", "On Monday, Ben went to the market and", "Cora"]
    batched = complete(model, tok, prompts, max_new_tokens=12, batch_size=3)
    for p, b in zip(prompts, batched):
        ids = torch.tensor([tok.encode(p, add_bos=True)])
        out = model.generate(ids, 12)  # greedy, no stop tokens
        alone = tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=False)
        alone = alone.split(tok.decode([tok.eos_id], skip_special_tokens=False))[0].split("\n")[0]
        assert b == alone
        assert "\n" not in b
    assert complete(model, tok, []) == []


def test_complete_refuses_a_prompt_that_fills_the_context(tiny):
    model, tok, _ = tiny
    with pytest.raises(ValueError, match="block_size"):
        complete(model, tok, ["Ada " * 200])


def test_fact_recall_reports_chance_and_scores_in_range(tiny):
    """An untrained model's fact recall is a valid accuracy per attribute, with chance = 1/candidates."""
    model, tok, world = tiny
    r = fact_recall(model, tok, world)
    assert r["town"]["chance"] == pytest.approx(1 / len(world.towns))
    for attr in ("town", "color", "pet", "job"):
        assert 0.0 <= r[attr]["accuracy"] <= 1.0 and r[attr]["n"] == len(world.people)
    assert r["mean"] == pytest.approx(sum(r[a]["accuracy"] for a in ("town", "color", "pet", "job")) / 4)
