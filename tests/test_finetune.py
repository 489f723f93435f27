"""The fine-tuning recipe (minituner/finetune.py) and `python -m minituner finetune`.

Everything runs on a tiny base model written to a temporary directory (a GPT-2-family
Transformer and a BPE tokenizer trained on a few hundred of the world's texts), so the whole
recipe — load, apply, train, evaluate, forgetting, save — runs in seconds. The slow fidelity
test at the end uses the real base model in weights/.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from minituner import checkpoint, finetune, protocol
from minituner.__main__ import main
from minituner.adapters import AdapterConfig
from minituner.finetune import Result
from minituner.full import FullConfig, discriminative_param_groups, layer_groups
from minituner.model import ModelConfig, Transformer
from minituner.tokenizer import Tokenizer
from minituner.world import World


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny GPT-2-family base model with its tokenizer, in a directory like weights/base."""
    d = tmp_path_factory.mktemp("tiny_base")
    world = World(0)
    texts = [e["text"] for e in world.classification("train", 300)] + world.corpus("train", n_docs=200)
    tok = Tokenizer.train(texts, vocab_size=400)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(family="gpt2", vocab_size=tok.vocab_size, block_size=256,
                                    n_layer=2, n_head=2, n_embd=32))
    checkpoint.save(model, d)
    tok.save(d / "tokenizer.json")
    return d


FAST = dict(n_train=48, n_test=24, batch_size=8, progress=False, measure_forgetting=False)


# -- ULMFiT by hand ---------------------------------------------------------------------------------
def test_layer_groups_cover_every_parameter_once_bottom_up():
    model = Transformer(ModelConfig(family="gpt2", vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=8))
    groups = layer_groups(model)
    assert len(groups) == 3 + 2  # embeddings, three blocks, top
    ids = [id(p) for g in groups for p in g]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each once (tied lm_head too)
    assert any(p is model.tok_emb.weight for p in groups[0])
    assert all(any(p is q for q in groups[1 + i]) for i, b in enumerate(model.blocks) for p in b.parameters())


def test_discriminative_rates_follow_eq_2():
    """eta^{l-1} = eta^l / 2.6: the top group at lr, the one below at lr/2.6, ..., the
    embeddings (4 groups below the top for 3 blocks) at lr / 2.6^4."""
    model = Transformer(ModelConfig(family="gpt2", vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=8))
    groups = discriminative_param_groups(model, lr=1e-3, lr_decay=2.6)
    lrs = sorted((g["lr"] for g in groups), reverse=True)
    assert lrs == pytest.approx([1e-3, 1e-3 / 2.6, 1e-3 / 2.6 ** 2, 1e-3 / 2.6 ** 3, 1e-3 / 2.6 ** 4])
    emb = next(g for g in groups if any(p is model.tok_emb.weight for p in g["params"]))
    assert emb["lr"] == pytest.approx(1e-3 / 2.6 ** 4)


def test_zero_shot_scores_are_conditional_log_probs(tiny_base):
    """score(text, sentence) = log p(text + sentence) - log p(text): the sentence's tokens only,
    checked against evaluate.sequence_scores on the joined texts (float32, 1e-3 nats)."""
    from minituner.evaluate import sequence_scores

    model, tok = finetune.load_base(tiny_base)
    examples = World(0).classification("test", 4)
    verbs = ["It was a bad day.", "It was a good day."]
    got = finetune.zero_shot_scores(model, tok, examples, verbs, batch_size=3)  # batches cut across rows
    joined = sequence_scores(model, tok, [f"{e['text']} {v}" for e in examples for v in verbs]).view(4, 2)
    alone = sequence_scores(model, tok, [e["text"] for e in examples])[:, None]
    assert torch.allclose(got, joined - alone, atol=1e-3)
    assert finetune.zero_shot_accuracy(model, tok, examples, verbs) == pytest.approx(
        float((got.argmax(1) == torch.tensor([e["label"] for e in examples])).float().mean()))


def test_full_config_rejects_a_decay_below_one():
    with pytest.raises(ValueError, match="lr_decay"):
        FullConfig(lr_decay=0.5)


# -- the recipe -------------------------------------------------------------------------------------
def test_result_round_trips_through_json(tiny_base):
    r = finetune.finetune("head", base=tiny_base, steps=5, **FAST)
    back = Result.from_json(r.to_json())
    assert back == r
    assert r.metric == "accuracy" and 0 < r.trainable < r.total
    assert r.trainable == 32 * 3 + 3  # a linear head: C*K + K
    assert r.trainable_pct == pytest.approx(100 * r.trainable / r.total)


@pytest.mark.parametrize("method", ["full", "head", "adapters", "lora"])
def test_each_method_trains_only_its_part(tiny_base, method):
    base, _ = finetune.load_base(tiny_base)
    out = finetune.run(method, base=tiny_base, steps=3, **FAST)
    model = out.model
    changed = {n for n, p in model.named_parameters()
               if n in dict(base.named_parameters()) and not torch.equal(p, dict(base.named_parameters())[n])}
    if method == "full":
        assert changed and any(n.startswith("blocks.0") for n in changed)
    else:  # the base's own tensors never move
        assert changed == set()
    assert out.result.history and all(math.isfinite(h["loss"]) for h in out.result.history)


def test_gradual_unfreezing_trains_the_top_first(tiny_base):
    """Stage 1 of ULMFiT's gradual unfreezing trains only the top group: with as many steps
    as one stage, the embeddings and blocks stay exactly where they were."""
    base, _ = finetune.load_base(tiny_base)
    n_groups = len(layer_groups(base))
    out = finetune.run("full", base=tiny_base, config=FullConfig(gradual_unfreezing=True),
                       steps=n_groups, **FAST)  # one step per stage
    stages = [h["stage"] for h in out.result.history]
    assert stages == list(range(1, n_groups + 1))
    out1 = finetune.run("full", base=tiny_base, config=FullConfig(gradual_unfreezing=True),
                        steps=1, **FAST)  # max(1, 1 // groups) = 1 step per stage: all stages
    assert len(out1.result.history) == n_groups
    assert out1.result.steps == n_groups  # the steps taken, not the 1 asked for


def test_adapters_disabled_give_back_the_base_measures(tiny_base):
    r = finetune.finetune("adapters", base=tiny_base, steps=3, n_train=48, n_test=24, batch_size=8,
                          progress=False)
    f = r.forgetting
    assert f["perplexity_disabled"] == f["perplexity_before"]  # exactly: no weight of the base moved
    assert f["fact_recall_disabled"] == f["fact_recall_before"]
    assert r.before is not None and 0 <= r.before <= 1


def test_prompt_tuning_measures_forgetting_with_room_for_its_virtual_tokens(tiny_base):
    """A soft prompt's n virtual tokens take positions, so held-out blocks of the full context
    (256) no longer fit; every perplexity of the run reads blocks of 256 - n tokens, so disabled
    equals before exactly."""
    from minituner.prompt import PromptConfig

    r = finetune.finetune("prompt", base=tiny_base, config=PromptConfig(num_virtual_tokens=5), steps=2,
                          n_train=48, n_test=24, batch_size=8, progress=False)
    f = r.forgetting
    assert f["perplexity_disabled"] == f["perplexity_before"] and math.isfinite(f["perplexity_after"])


def test_saved_adapter_reloads_onto_a_fresh_base(tiny_base, tmp_path):
    out = finetune.run("adapters", base=tiny_base, steps=3, out=tmp_path / "run", **FAST)
    assert Result.from_json((tmp_path / "run" / "result.json").read_text()) == out.result
    fresh, tok = finetune.load_base(tiny_base)
    fresh = protocol.load_adapter(fresh, tmp_path / "run")
    ids = torch.tensor([tok.encode("It was Monday in Ashford.", add_bos=True)])
    with torch.no_grad():
        assert torch.equal(finetune.heads.classify(fresh.eval(), ids), finetune.heads.classify(out.model, ids))


def test_unknown_method_or_wrong_config_is_a_clear_error(tiny_base):
    with pytest.raises(ValueError, match="choose one of"):
        finetune.finetune("nope", base=tiny_base)
    with pytest.raises(TypeError, match="AdapterConfig"):
        finetune.finetune("adapters", base=tiny_base, config=FullConfig(), **FAST)


# -- the command line -------------------------------------------------------------------------------
def test_cli_end_to_end(tiny_base, tmp_path, capsys):
    rc = main(["finetune", "--method", "adapters", "--task", "classify", "--base", str(tiny_base),
               "--steps", "20", "--n-train", "64", "--n-test", "32", "--batch-size", "8",
               "--out", str(tmp_path / "out"), "--quiet", "--no-forgetting"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| adapters |" in printed
    result = Result.from_json((tmp_path / "out" / "result.json").read_text())
    assert result.steps == 20 and result.n_train == 64 and result.n_test == 32
    assert (tmp_path / "out" / "adapter.safetensors").is_file()


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_cli_lora_options_reach_the_config(method):
    """--r, --alpha, --target-modules and --rslora become the LoRA config the run applies."""
    import argparse

    parser = argparse.ArgumentParser()
    finetune.add_arguments(parser)
    args = parser.parse_args(["--method", method, "--r", "4", "--alpha", "8", "--target-modules", "q_proj",
                              "k_proj", "--rslora"])
    config = finetune.config_from_args(args)
    assert (config.r, config.alpha, config.target_modules, config.use_rslora) == (4, 8, ("q_proj", "k_proj"), True)
    assert finetune.config_from_args(parser.parse_args(["--method", method])).use_rslora is False


@pytest.mark.parametrize("argv, names", [
    (["--task", "classify", "--loss", "orpo", "--beta", "0.5"], ["loss='orpo'", "beta=0.5", "prefer only"]),
    (["--task", "instruct", "--rpo-alpha", "1", "--from", "somewhere"], ["rpo_alpha=1.0", "start_from='somewhere'"]),
    (["--task", "prefer", "--packing"], ["packing=True", "instruct only"]),
    (["--task", "instruct", "--pooling", "mean"], ["pooling='mean'", "classify only"]),
    (["--method", "lora", "--placement", "pfeiffer"], ["--placement (adapters only)"]),
    (["--method", "adapters", "--r", "4", "--gradual-unfreezing"], ["--r (lora/qlora only)", "--gradual-unfreezing (full only)"]),
    (["--method", "head", "--task", "instruct"], ["method 'head'"]),
    (["--task", "prefer", "--loss", "orpo", "--rpo-alpha", "1"], ["rpo_alpha=1.0", "--loss orpo has none"]),
    (["--task", "prefer", "--eval-data", "mine.jsonl"], ["eval_data='mine.jsonl' is read only with data"]),
])
def test_cli_refuses_options_the_run_would_ignore(argv, names, capsys):
    """An option of another task or method is an error that names it, in one line, before any
    work; it used to be dropped silently (a run that was not the one asked for)."""
    rc = main(["finetune", *argv, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for name in names:
        assert name in err, err


def test_run_refuses_task_options_the_task_would_ignore():
    with pytest.raises(ValueError, match=r"task 'classify' does not use beta=0.5 \(prefer only\)"):
        finetune.run("adapters", "classify", beta=0.5)
    with pytest.raises(ValueError, match="does not use packing=True"):
        finetune.run("lora", "prefer", packing=True)


def test_cli_config_that_does_not_fit_the_model_is_one_line(tiny_base, capsys):
    rc = main(["finetune", "--method", "adapters", "--base", str(tiny_base), "--reduction-factor", "4096",
               "--no-forgetting", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "reduction_factor=4096" in err and "Traceback" not in err, err


def test_cli_trains_on_the_users_jsonl(tiny_base, tmp_path, capsys):
    rows = [{"text": f"the sky is {c} today number {i}", "label": c}
            for i in range(30) for c in ("blue", "grey")]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(["finetune", "--method", "head", "--base", str(tiny_base), "--data", str(data),
               "--steps", "5", "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 0
    r = Result.from_json((tmp_path / "o" / "result.json").read_text())
    assert r.n_train == 48 and r.n_test == 12 and r.before is None  # every fifth line held out


def test_cli_bad_jsonl_line_names_file_line_and_field(tiny_base, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "a fine line", "label": "x"}\n{"text": "no label here"}\n')
    rc = main(["finetune", "--method", "head", "--base", str(tiny_base), "--data", str(data), "--quiet"])
    assert rc != 0
    err = capsys.readouterr().err
    assert f"{data}:2" in err and "label" in err and "Traceback" not in err


# -- fidelity on the real base model (slow) ---------------------------------------------------------
FIDELITY = dict(n_train=2000, n_test=600, pooling="mean", progress=False, measure_forgetting=False)


# Houlsby's adapters as the paper trains them (Sec. 2.1: "we also train the layer normalization
# parameters"): without the norms the adapters reach 0.823-0.850, a 1-4 point gap to full.
HOULSBY = AdapterConfig(placement="houlsby", reduction_factor=16, train_layernorms=True)


@pytest.fixture(scope="module")
def full_and_adapters():
    return (finetune.finetune("full", **FIDELITY),
            finetune.finetune("adapters", config=HOULSBY, **FIDELITY))


@pytest.mark.slow
def test_adapters_and_full_fine_tuning_beat_the_majority_class(full_and_adapters):
    """On the world's day stories (2,000 training examples, mean pooling, the recipe's
    defaults: 900 steps, seed 0), full fine-tuning and Houlsby adapters at reduction factor 16
    (with the layer norms trained, as Houlsby does) both beat the majority class by at least
    20 points, the adapters with under 5% of the trainable parameters (2.01%). Measured (one
    thread): full 0.862, adapters 0.912, majority 0.333."""
    full, adapters = full_and_adapters
    msg = f"full {full.after:.3f}, adapters {adapters.after:.3f}, majority {full.majority:.3f}"
    assert adapters.trainable < 0.05 * full.trainable, msg
    assert min(full.after, adapters.after) >= full.majority + 0.20, msg


@pytest.mark.slow
def test_adapters_come_close_to_full_fine_tuning(full_and_adapters):
    """Houlsby adapters at reduction 16 come within 3 points of full fine-tuning's accuracy
    with 2.01% of the parameters (Houlsby 2019: 80.0 vs 80.4 GLUE with 3.6%). Measured at the
    recipe's 900 steps, one thread, adapters with the layer norms trained: seed 0 full 0.862,
    adapters 0.912; seed 1 full 0.853, adapters 0.915. Without the norms (the adapters alone,
    1.88%): seed 0 0.823 (2 threads) to 0.845 (1 thread), seed 1 0.850: a 1-4 point gap."""
    full, adapters = full_and_adapters
    assert adapters.after >= full.after - 0.03, f"full {full.after:.3f}, adapters {adapters.after:.3f}"


def test_prefer_on_a_full_sft_run_saves_a_model_that_loads_back(tiny_base, tmp_path):
    """DPO with LoRA from a full SFT run (--from): --out holds the new LoRA and, in start/, the
    SFT weights it was trained on, so loading --out onto the plain base model is the trained
    model (the LoRA alone on the plain base would be another model, silently)."""
    finetune.finetune("full", "instruct", base=tiny_base, steps=2, n_train=8, n_test=11, batch_size=4,
                      out=tmp_path / "sft", progress=False, measure_forgetting=False)
    run = finetune.run("lora", "prefer", base=tiny_base, start_from=tmp_path / "sft", steps=2, n_train=8,
                       n_test=11, batch_size=4, lr=1e-2, out=tmp_path / "dpo", progress=False,
                       measure_forgetting=False)
    assert (tmp_path / "dpo" / "start" / "adapter.safetensors").is_file()
    back = protocol.load_adapter(finetune.load_base(tiny_base)[0], tmp_path / "dpo").eval()
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        assert torch.equal(back(x), run.model(x))
    again = finetune.finetune("lora", "prefer", base=tiny_base, start_from=tmp_path / "dpo", steps=1, n_train=8,
                              n_test=11, batch_size=4, progress=False, measure_forgetting=False)
    assert again.extra["first_loss"] == pytest.approx(math.log(2), abs=1e-6)  # it continues from there


def test_cli_rpo_alpha_reaches_the_dpo_loss(tiny_base, tmp_path):
    """--rpo-alpha adds the chosen answers' NLL to DPO (Pang 2024): the first step's loss is
    ln 2 plus alpha times a positive NLL, and result.json records alpha; ORPO refuses it (it
    has its own NLL term)."""
    rc = main(["finetune", "--method", "lora", "--task", "prefer", "--base", str(tiny_base), "--steps", "1",
               "--n-train", "8", "--n-test", "11", "--batch-size", "4", "--rpo-alpha", "0.5",
               "--out", str(tmp_path / "o"), "--quiet", "--no-forgetting"])
    assert rc == 0
    r = Result.from_json((tmp_path / "o" / "result.json").read_text())
    assert r.extra["rpo_alpha"] == 0.5 and r.extra["first_loss"] > math.log(2) + 0.1
    with pytest.raises(ValueError, match="ORPO has its own NLL"):
        finetune.finetune("lora", "prefer", base=tiny_base, loss="orpo", rpo_alpha=0.5, steps=1, n_train=8,
                          n_test=11, progress=False, measure_forgetting=False)
