"""The recipe's generative tasks end to end: `--task instruct` (SFT) and `--task prefer`
(DPO / ORPO), through the command line, on a tiny base model written to a temporary directory
(seconds). The slow fidelity tests at the end use the real base model in weights/.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from minituner import checkpoint, finetune, sft
from minituner.__main__ import main
from minituner.data import IGNORE_INDEX, DataError
from minituner.finetune import Result
from minituner.model import ModelConfig, Transformer
from minituner.tokenizer import Tokenizer
from minituner.world import World


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny GPT-2-family base model and a tokenizer that knows the instruction texts."""
    d = tmp_path_factory.mktemp("tiny_base")
    world = World(0)
    texts = [" ".join((e["instruction"], e["input"], e["output"])) for e in world.instructions("train", 30)]
    tok = Tokenizer.train(texts + world.corpus("train", n_docs=200), vocab_size=500)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(family="gpt2", vocab_size=tok.vocab_size, block_size=512,
                                    n_layer=2, n_head=2, n_embd=32))
    checkpoint.save(model, d)
    tok.save(d / "tokenizer.json")
    return d


def _cli(args, capsys) -> str:
    assert main(["finetune", *map(str, args), "--quiet"]) == 0
    return capsys.readouterr().out


TINY = ["--n-train", 24, "--n-test", 22, "--batch-size", 4, "--no-forgetting"]


# -- instruct ------------------------------------------------------------------------------------
@pytest.mark.parametrize("packing", [False, True])
def test_cli_instruct_end_to_end(tiny_base, tmp_path, capsys, packing):
    out = tmp_path / "sft"
    text = _cli(["--method", "lora", "--task", "instruct", "--base", tiny_base, "--steps", 3, *TINY,
                 "--out", out] + (["--packing"] if packing else []), capsys)
    assert "| lora |" in text
    r = Result.from_json((out / "result.json").read_text())
    assert (r.task, r.metric, r.steps, r.n_test) == ("instruct", "exact_match", 3, 22)
    assert 0.0 <= r.before <= 1.0 and 0.0 <= r.after <= 1.0
    assert r.extra["packing"] is packing
    for k in ("seen_before", "seen_after", "held_out_before", "held_out_after"):
        assert 0.0 <= r.extra[k] <= 1.0  # both kinds are in the 22 test examples (2 of each family)
    assert set(r.extra["by_family_after"]) >= {"comparison", "negation", "arithmetic"}
    assert Result.from_json(r.to_json()) == r  # the extra dict round-trips too
    assert (out / "adapter.safetensors").is_file()
    if packing:
        assert r.extra["n_rows"] < r.n_train  # several examples per row


@pytest.mark.parametrize("fmt", ["alpaca", "chat"])
def test_instruct_reads_alpaca_and_chat_jsonl(tiny_base, tmp_path, fmt):
    path = tmp_path / "data.jsonl"
    rows = [{"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)} for i in range(10)]
    if fmt == "chat":
        rows = [{"messages": [{"role": "user", "content": r["instruction"]},
                              {"role": "assistant", "content": r["output"]}]} for r in rows]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = finetune.finetune("lora", "instruct", base=tiny_base, data=path, steps=2, batch_size=4,
                          template="chat" if fmt == "chat" else "alpaca", progress=False)
    assert (r.n_train, r.n_test) == (8, 2)  # every fifth line held out
    assert r.extra["by_family_after"].keys() == {"data"} and r.extra["held_out_after"] is None  # no held-out family (nan -> null in JSON)


def test_bad_jsonl_line_names_file_line_and_field(tiny_base, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "Say hi.", "output": "hi"}\n\n{"instruction": "Say yo."}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: field 'output' is missing"):
        finetune.finetune("lora", "instruct", base=tiny_base, data=path, steps=1, progress=False)
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}\n')
    with pytest.raises(DataError, match=r"chat\.jsonl:1: field 'messages\[1\]\.role'"):
        finetune.finetune("lora", "instruct", base=tiny_base, data=chat, steps=1, progress=False)
    pref = tmp_path / "pref.jsonl"
    pref.write_text('{"prompt": "Q", "chosen": "a", "rejected": 3}\n')
    with pytest.raises(DataError, match=r"pref\.jsonl:1: field 'rejected' must be a string"):
        finetune.finetune("lora", "prefer", base=tiny_base, data=pref, steps=1, progress=False)


def test_head_cannot_generate(tiny_base):
    with pytest.raises(ValueError, match="head"):
        finetune.finetune("head", "instruct", base=tiny_base, steps=1, progress=False)


def test_sft_answers_are_words_of_running_text():
    """The base model's BPE (weights/base) spells "66" after the template's newline as the digits
    "6" "6", and " 66" as one token, the one pre-training read in "He is 66 years old."; the SFT
    data set trains the answer in the running-text spelling (sft.as_word), in the Alpaca and
    the chat template alike, and exact_match hands back the answer without that space."""
    tok = Tokenizer.load(checkpoint.find_base_model() / "tokenizer.json")
    assert len(tok.encode("66")) == 2 and len(tok.encode(" 66")) == 1  # the premise
    alpaca = {"instruction": "What is 40 plus 26?", "input": "", "output": "66"}
    chat = {"messages": [{"role": "user", "content": "What is 40 plus 26?"}, {"role": "assistant", "content": "66"}]}
    for template, ex in (("alpaca", alpaca), ("chat", chat)):
        labels = sft.sft_dataset([ex], tok, 256, template=template)[0]["labels"]
        assert labels[labels != IGNORE_INDEX].tolist() == tok.encode(" 66") + [tok.eos_id]
    assert sft.as_word("66") == " 66" and sft.as_word(" 66") == " 66" and sft.as_word("\n66") == "\n66"
    assert alpaca["output"] == "66"  # the caller's examples are left alone


def test_prefer_trains_and_scores_answers_as_words(tiny_base, monkeypatch):
    """The preference pairs reach PreferenceDataset with chosen and rejected spelled as the SFT
    model learned its answers (" 66"), for training and for the held-out pairs alike."""
    import minituner.data

    seen = []

    class Spy(minituner.data.PreferenceDataset):
        def __init__(self, examples, *args, **kwargs):
            seen.append(list(examples))
            super().__init__(examples, *args, **kwargs)

    monkeypatch.setattr(minituner.data, "PreferenceDataset", Spy)
    finetune.finetune("lora", "prefer", base=tiny_base, steps=1, n_train=4, n_test=11, batch_size=4,
                      progress=False, measure_forgetting=False)
    assert len(seen) == 2 and all(e[k].startswith(" ") for ex in seen for e in ex for k in ("chosen", "rejected"))


# -- prefer --------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["dpo", "orpo"])
def test_cli_prefer_end_to_end(tiny_base, tmp_path, capsys, loss):
    out = tmp_path / loss
    _cli(["--method", "lora", "--task", "prefer", "--loss", loss, "--beta", 0.2, "--base", tiny_base,
          "--steps", 2, *TINY, "--out", out], capsys)
    r = Result.from_json((out / "result.json").read_text())
    assert (r.task, r.metric, r.steps, r.extra["loss"], r.extra["beta"]) == ("prefer", "reward_accuracy", 2, loss, 0.2)
    assert 0.0 <= r.after <= 1.0 and 0.0 <= r.extra["win_rate_vs_start"] <= 1.0
    if loss == "dpo":
        assert r.before is None  # policy = reference: every reward is 0
        assert r.extra["first_loss"] == pytest.approx(math.log(2), abs=1e-6)  # Eq. 7 at theta = theta_ref
    else:
        assert 0.0 <= r.before <= 1.0


def test_prefer_from_an_sft_run(tiny_base, tmp_path):
    """--from a LoRA SFT run: the SFT adapter keeps training and the reference is the SFT
    model (a frozen copy), so DPO's first loss is ln 2 again; from a full SFT run a fresh
    LoRA trains on the SFT weights and disable_adapters gives them back as the reference."""
    for sft_method in ("lora", "full"):
        sft_dir = tmp_path / sft_method
        finetune.finetune(sft_method, "instruct", base=tiny_base, steps=2, n_train=8, n_test=11, batch_size=4,
                          out=sft_dir, progress=False, measure_forgetting=False)
        r = finetune.finetune("lora", "prefer", base=tiny_base, start_from=sft_dir, steps=2, n_train=8,
                              n_test=11, batch_size=4, progress=False, measure_forgetting=False)
        assert r.extra["first_loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert r.extra["start_from"] == str(sft_dir)


def test_prefer_full_uses_precomputed_reference(tiny_base):
    r = finetune.finetune("full", "prefer", base=tiny_base, steps=2, n_train=8, n_test=11, batch_size=4,
                          progress=False, measure_forgetting=False)
    assert r.extra["first_loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_prefer_from_missing_directory_names_the_fix(tiny_base, tmp_path):
    with pytest.raises(FileNotFoundError, match="--out"):
        finetune.finetune("lora", "prefer", base=tiny_base, start_from=tmp_path, steps=1, progress=False)


def test_reward_accuracy_by_hand():
    """DPO: margin = (pc - rc) - (pr - rr): pairs (2-0)-(1-0) > 0 wins, (0-1)-(0-0) < 0 loses, a
    zero margin loses. ORPO: mean log-probs -1/1 > -4/2 wins, -3/1 < -2/1 loses."""
    pol = {"chosen_logps": torch.tensor([2.0, 0.0, 1.0]), "rejected_logps": torch.tensor([1.0, 0.0, 1.0]),
           "chosen_tokens": torch.tensor([1.0, 1.0, 1.0]), "rejected_tokens": torch.tensor([1.0, 1.0, 1.0])}
    ref = {"chosen_logps": torch.tensor([0.0, 1.0, 0.0]), "rejected_logps": torch.tensor([0.0, 0.0, 0.0])}
    assert finetune.reward_accuracy(pol, ref) == pytest.approx(1 / 3)
    orpo = {"chosen_logps": torch.tensor([-1.0, -3.0]), "rejected_logps": torch.tensor([-4.0, -2.0]),
            "chosen_tokens": torch.tensor([1.0, 1.0]), "rejected_tokens": torch.tensor([2.0, 1.0])}
    assert finetune.reward_accuracy(orpo) == pytest.approx(0.5)


def test_balanced_takes_families_in_turn():
    ex = [{"family": f, "i": i} for f in "abc" for i in range(3)]
    assert [e["family"] for e in finetune._balanced(ex, 5)] == list("abcab")


# -- fidelity on the real base model (slow) ------------------------------------------------------
SFT_RUN = dict(n_train=5400, n_test=220, steps=400, batch_size=8, packing=True, lr=1e-3, progress=False,
               measure_forgetting=False)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """Full instruction tuning of the base model in weights/, saved for the preference tests."""
    out = tmp_path_factory.mktemp("sft")
    return finetune.finetune("full", "instruct", out=out, **SFT_RUN), out


@pytest.mark.slow
def test_sft_raises_exact_match_on_seen_families(sft_run):
    """Wei 2022: instruction tuning teaches the model to answer. Target (issue 11): exact match
    on the 9 seen families rises by at least 0.3 over the base model's, which continues the
    prompt as corpus text and scores 0.000 (220 test instructions, 20 per family).

    Measured 2026-12-01 with exactly SFT_RUN (full, 400 steps of 8 packed rows, lr 1e-3, all
    5400 training instructions; `OMP_NUM_THREADS=1 python -c "from minituner import finetune;
    finetune.finetune('full', 'instruct', **SFT_RUN)"`: 446 s wall on the 2 shared cores at
    load ~5, three such runs side by side; `OMP_NUM_THREADS=1 pytest -q tests/test_tasks.py -m
    slow` then took 185 s for this fixture and 135 s for dpo_run at load ~3, so about half of
    the 320 s, ~160 s for both, on 2 idle cores): seen 0.000 -> 0.372, held-out 0.000 ->
    0.075 (counting 0.80, fact 0.65, day_outcome 0.50, yes_no 0.50, past_tense 0.45, extremum
    0.35, arithmetic 0.05, sorting 0.05, reversing 0.00; comparison 0.15, negation 0.00).
    The target holds since answers are trained as words of running text (sft.as_word): the
    same recipe without it gave 0.189 (300 steps, 1800 instructions) and 0.261 (600 steps);
    with it, 1800 instructions give 0.322 at 300 and at 500 steps (overfitting: 8 epochs),
    5400 give 0.278 at 300 steps, 3600 give 0.339 at 400."""
    r, _ = sft_run
    assert r.extra["seen_before"] <= 0.05
    assert r.extra["seen_after"] - r.extra["seen_before"] >= 0.3, r.extra["by_family_after"]


DPO_RUN = dict(n_train=1800, n_test=220, steps=200, batch_size=8, lr=1e-4, beta=0.1, progress=False,
               measure_forgetting=False)


@pytest.fixture(scope="module")
def dpo_run(sft_run):
    """DPO of the whole SFT model above (its log-probs as the reference, precomputed once: no
    second model, no reference forward per step), on the world's preference pairs."""
    _, sft_dir = sft_run
    return finetune.finetune("full", "prefer", loss="dpo", **DPO_RUN, start_from=sft_dir)


@pytest.mark.slow
def test_dpo_from_sft_starts_at_ln2(dpo_run):
    """Rafailov 2023, Eq. 7: at the first step the policy is the reference, so every implicit
    reward is 0 and L = -log sigma(0) = ln 2 (to 1e-6). Measured: 0.6931471825."""
    assert dpo_run.extra["first_loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known gap (issue 11): reward accuracy 0.791 (target > 0.8) "
                   "and judge win rate vs the SFT model 0.470 (target > 0.5): DPO shortens the answers")
def test_dpo_from_sft_learns_the_held_out_pairs(dpo_run):
    """Target (issue 11): reward accuracy on held-out pairs above 0.8 at the end, and the judge
    prefers the DPO model's answers to the SFT model's (win rate above 0.5, ties counting one
    half).

    Measured 2026-12-01 with exactly DPO_RUN from the SFT_RUN model (`OMP_NUM_THREADS=1`, one
    `finetune.finetune('full', 'prefer', loss='dpo', start_from=<SFT_RUN's out>, **DPO_RUN)`:
    401 s wall at load ~5, so ~200 s on 2 idle cores): first loss 0.6931471825, reward
    accuracy on the 220 held-out pairs 0.791, judge win rate vs the SFT model 0.470 (mean
    judge score 0.636 -> 0.518). In the LoRA runs below, the held-out pairs whose rejected
    answer is verbose reach reward accuracy 1.00 and those whose rejected answer is wrong
    0.47-0.56 (chance). THE 0.8 AND 0.5 TARGETS DO NOT HOLD.
    Why: the verbose pairs teach "shorter is better", and the policy stops its own answers
    early (SFT 'Pia b yellow plate.' -> DPO 'Pia b yellow', a list -> ''), after as few as
    20 steps (full, lr 5e-5, 200 pairs: win rate 0.486, judge 0.636 -> 0.582); on wrong pairs the implicit reward does not generalize to new
    prompts, although a 300-step SFT model itself ranks chosen over a wrong answer on 0.62 of them.
    Also measured (reward accuracy / win rate): from SFT_RUN, LoRA r=8 q/v lr 1e-3 200 steps
    0.727 / 0.470, full lr 5e-5 300 steps 2400 pairs 0.777 / 0.470; from a 300-step SFT
    (seen 0.322), LoRA lr 5e-4 100 steps 900 pairs 0.718 / 0.495, LoRA lr 1e-3 200 steps
    0.764 / 0.489, LoRA lr 5e-4 beta 0.5 200 steps 0.764 / 0.493, full lr 5e-5 200 steps
    0.800 / 0.491 (0.8 not exceeded).
    Measured again after the padding-skipping forward (same numbers for DPO_RUN: 0.791 / 0.470),
    from SFT_RUN, full, 1800 pairs, 200 steps unless said: with the chosen answers' NLL
    (rpo_alpha, Pang 2024) alpha 1 lr 1e-4 0.786 / 0.489, alpha 1 beta 0.5 0.795 / 0.491, alpha 2
    lr 5e-5 0.777 / 0.495, alpha 10 0.782 / 0.486, alpha 5 on 5400 pairs for 400 steps 0.782 /
    0.482; IPO beta 0.5 0.795 / 0.489, IPO + NLL 0.795 / 0.459; plain DPO at lr 1e-5 0.764 /
    0.493. The judge's mean score falls in every run (0.636 -> 0.47-0.62), with the NLL term
    too: more training on prompts the SFT model already fit reshuffles its answers to new
    prompts ('12' -> '122', 'yes' -> 'no') more than it corrects them. On pairs built on 5400
    train instructions SFT never saw (World(0).preferences("train", n_per_family=1200) minus
    the first 600 per family, as a JSONL; the same 220 held-out pairs): plain DPO 0.809 / 0.445
    (judge 0.636 -> 0.418), + NLL alpha 1 0.809 / 0.500 (judge unchanged), alpha 1 on all 5400
    for 400 steps 0.800 / 0.489, alpha 3 0.795 / 0.493: around the targets, never past both.
    On-policy pairs (Tajwar et al. 2024), measured the same way: where the SFT model's own greedy
    answer to a training prompt is wrong (1123 of the 1800 DPO_RUN prompts; it is never merely
    verbose), chosen = the reference, rejected = that answer; mixed with the world's pairs and,
    where SFT is right, reference vs a wrong distractor (3600 pairs): plain DPO alone on them
    collapses answers (judge 0.636 -> 0.28); with NLL alpha 1, beta 0.5, lr 5e-5 over seeds 0, 1,
    2: 0.809 / 0.509, 0.805 / 0.489, 0.809 / 0.493 (the same without the on-policy pairs:
    0.777 / 0.498). The changed answers are flips on yes/no, day_outcome and extremum prompts;
    fixed minus broken runs from +4 to -9 by seed, so the win rate sits at 0.5 +- 0.02, noise."""
    assert dpo_run.after > 0.8
    assert dpo_run.extra["win_rate_vs_start"] > 0.5
