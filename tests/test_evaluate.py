"""The measuring tools behind every chapter's before/after numbers (minituner.evaluate)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from minituner.evaluate import (complete, fact_recall, instruction_exact_match, sequence_scores,
                                unigram_baseline)
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


class OracleLM(torch.nn.Module):
    """A stand-in language model with known answers, to check the bookkeeping around a model.

    forward: certain of every next token of the texts it `believes` (logit 50 on the true next
    token, so log p ~ -V e^-50 ~ 0 per token) and uniform on every other text (log p = -ln V
    per token). So among sentences that differ in one value, the believed one scores highest.
    generate: continues a prompt with `answers[prompt]` (or "I do not know"), then either EOS
    or a newline and more text, which `complete` must cut off."""

    def __init__(self, tok: Tokenizer, believes=(), answers=None, block_size: int = 512):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device
        self.tok, self.believes, self.answers = tok, set(believes), answers or {}
        self.config = SimpleNamespace(block_size=block_size)

    def _text(self, ids: torch.Tensor, mask: torch.Tensor) -> str:
        return self.tok.decode(ids[mask.bool()].tolist())  # real tokens, bos dropped

    def forward(self, ids, attention_mask):
        B, T = ids.shape
        logits = torch.zeros(B, T, self.tok.vocab_size)  # (B, T, V) uniform
        for b in range(B):
            if self._text(ids[b], attention_mask[b]) in self.believes:
                logits[b, :-1].scatter_(1, ids[b, 1:, None], 50.0)  # (T-1, V): certain of x_t+1
        return logits

    def generate(self, ids, max_new_tokens, *, attention_mask, eos_token_id, pad_token_id):
        rows = []
        for b in range(len(ids)):
            answer = self.answers.get(self._text(ids[b], attention_mask[b]), "I do not know")
            ending = [self.tok.eos_id] if b % 2 else self.tok.encode("\nAnd more text.")
            rows.append((self.tok.encode(answer) + ending)[:max_new_tokens])
        new = torch.full((len(ids), max(map(len, rows))), pad_token_id)  # (B, N) pad after the end
        for b, r in enumerate(rows):
            new[b, :len(r)] = torch.tensor(r)
        return torch.cat([ids, new], 1)  # (B, T + N)


def test_fact_recall_counts_an_oracle_right(tiny):
    """An oracle that believes the true town of every 2nd person, the true color of every
    3rd, the true pet of the first 7 and no true job (a wrong value otherwise) scores exactly
    town 30/60, color 20/60, pet 7/60, job 0, mean their average; chance is 1/candidates."""
    _, tok, world = tiny
    people = world.people
    assert len(people) == 60
    right = {"town": lambda i: i % 2 == 0, "color": lambda i: i % 3 == 0,
             "pet": lambda i: i < 7, "job": lambda i: False}
    candidates = {"town": [t.name for t in world.towns],
                  "color": sorted({p.color for p in people}), "pet": sorted({p.pet for p in people}),
                  "job": sorted({p.job for p in people})}
    sentence = {"town": "{} lives in {}.", "color": "{}'s favourite color is {}.",
                "pet": "{}'s pet is a {}.", "job": "{} works as a {}."}
    believes = set()
    for attr, is_right in right.items():
        for i, p in enumerate(people):
            truth = getattr(p, attr)
            value = truth if is_right(i) else next(v for v in candidates[attr] if v != truth)
            believes.add(sentence[attr].format(p.name, value))
    r = fact_recall(OracleLM(tok, believes), tok, world, batch_size=50)
    expected = {"town": 30 / 60, "color": 20 / 60, "pet": 7 / 60, "job": 0.0}
    for attr, acc in expected.items():
        assert r[attr] == {"accuracy": pytest.approx(acc), "chance": pytest.approx(1 / len(candidates[attr])),
                           "n": 60}, attr
    assert r["mean"] == pytest.approx(sum(expected.values()) / 4)


def test_instruction_exact_match_counts_an_oracle_right(tiny):
    """An oracle that answers every 3rd test prompt right (in upper case with a full stop,
    which exact match forgives) and says "I do not know" to the rest: exact match is the
    share of rigged prompts overall and per family, through batching, length ordering, left
    padding, and answers cut at EOS or at a newline."""
    _, tok, world = tiny
    examples = world.instructions("test", n_per_family=4)
    prompts = [f"### Instruction:\n{e['instruction']}\n\n" + (f"### Input:\n{e['input']}\n\n" if e["input"] else "")
               + "### Response:\n" for e in examples]  # the alpaca template, written out
    rigged = [i % 3 == 0 for i in range(len(examples))]
    answers = {p: e["output"].upper() + "." for p, e, r in zip(prompts, examples, rigged) if r}
    r = instruction_exact_match(OracleLM(tok, answers=answers, block_size=1024), tok, examples,
                                batch_size=5, max_new_tokens=64)  # upper case takes many tokens
    assert r["exact_match"] == pytest.approx(sum(rigged) / len(examples)) and r["n"] == len(examples)
    for fam in {e["family"] for e in examples}:
        flags = [f for f, e in zip(rigged, examples) if e["family"] == fam]
        assert r["by_family"][fam] == pytest.approx(sum(flags) / len(flags)), fam
    assert r["answers"] == [e["output"].upper() + "." if f else "I do not know"
                            for e, f in zip(examples, rigged)]
