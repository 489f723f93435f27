"""Tests for minituner/train.py: the schedule by hand, the loss by hand, resume bit for bit,
the NaN guard, overfitting one batch, gradient-accumulation parity, optimizer-state
serialization round trips, evaluation parity, and clear errors."""

from __future__ import annotations

import functools
import hashlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minituner.model import ModelConfig, Transformer
from minituner.train import (TrainConfig, TrainingDiverged, default_collate, evaluate, latest_checkpoint,
                             load_checkpoint, lr_at, next_token_loss, optimizer_state_from_safetensors,
                             optimizer_state_to_safetensors, param_groups, train)

V = 48


def tiny(dropout: float = 0.0, seed: int = 0, family: str = "gpt2") -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(family=family, vocab_size=V, block_size=32, n_layer=2, n_head=2,
                                   n_embd=32, dropout=dropout))


def lm_data(n: int = 24, T: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, V, (n, T), generator=g)}


def quiet(**kw) -> TrainConfig:
    return TrainConfig(progress=False, **kw)


# ------------------------------------------------------------------ math by hand
def test_schedule_values_by_hand():
    """lr=1, min_lr=0.1, W=2 warmup steps, S=6 steps. Warmup: lr_s = (s+1)/W -> 0.5, 1.0.
    Cosine over s=2..5 with p=(s-2)/3: lr = 0.1 + 0.45 (1 + cos(pi p)) ->
    p=0: 1.0; p=1/3: 0.1 + 0.45*1.5 = 0.775; p=2/3: 0.1 + 0.45*0.5 = 0.325; p=1: 0.1."""
    got = [lr_at(s, lr=1.0, min_lr=0.1, warmup_steps=2, max_steps=6) for s in range(6)]
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.775, 0.325, 0.1], abs=1e-12)
    # no warmup: the first step runs at the peak; the trainer logs the same values
    assert lr_at(0, lr=3e-4, min_lr=0.0, warmup_steps=0, max_steps=10) == pytest.approx(3e-4)
    hist = train(tiny(), lm_data(), quiet(max_steps=6, batch_size=4, lr=1.0, min_lr=0.1, warmup_steps=2),
                 optimizer=functools.partial(torch.optim.SGD, lr=1.0))
    assert [h["lr"] for h in hist] == pytest.approx([0.5, 1.0, 1.0, 0.775, 0.325, 0.1], abs=1e-12)


def test_next_token_loss_by_hand():
    """A model that outputs all-zero logits predicts uniformly: every target costs ln V, so the
    mean is exactly ln V whatever is ignored. With logit +a on the right token, the per-token
    loss is ln(e^a + V - 1) - a; labels -100 and padded positions must not count."""

    class Fixed(nn.Module):
        def __init__(self, a: float):
            super().__init__()
            self.a = a
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, input_ids, attention_mask=None):
            # put logit a on the token that follows each position (reads the future on purpose)
            nxt = torch.roll(input_ids, -1, dims=1)  # (B, T)
            return self.a * F.one_hot(nxt, V).float() + self.w  # (B, T, V)

    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    loss, m = next_token_loss(Fixed(0.0), {"input_ids": ids})
    assert loss.item() == pytest.approx(math.log(V), rel=1e-6) and int(m["num_tokens"]) == 6
    a = 2.0
    per_token = math.log(math.exp(a) + V - 1) - a
    labels = ids.clone()
    labels[0, 1:] = -100  # row 0 has no targets left
    loss, m = next_token_loss(Fixed(a), {"input_ids": ids, "labels": labels})
    assert loss.item() == pytest.approx(per_token, rel=1e-6) and int(m["num_tokens"]) == 3
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])  # row 0 pads: 1 target there, 3 in row 1
    loss, m = next_token_loss(Fixed(a), {"input_ids": ids, "attention_mask": mask})
    assert loss.item() == pytest.approx(per_token, rel=1e-6) and int(m["num_tokens"]) == 4


# ------------------------------------------------------------------ resume and the NaN guard
def _crashing(at_call: int):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt("simulated crash")
        return next_token_loss(model, batch)

    return loss_fn


def test_resume_is_bit_for_bit(tmp_path):
    """Interrupt at loss call 13 (step 7: 2 micro-batches per step), resume in a fresh model and
    optimizer from the step-6 checkpoint: final weights, optimizer state and history equal the
    uninterrupted run exactly. Covers dropout RNG, epoch boundaries (3 batches per epoch),
    warmup+cosine, weight decay and accumulation."""
    cfg = dict(max_steps=8, batch_size=8, grad_accum_steps=2, lr=3e-3, warmup_steps=3, min_lr=3e-4,
               weight_decay=0.1, checkpoint_every=3, seed=5)
    data = lm_data()
    ref = tiny(dropout=0.1)
    ref_hist = train(ref, data, quiet(checkpoint_dir=str(tmp_path / "a"), **cfg))

    crashed = tiny(dropout=0.1)
    with pytest.raises(KeyboardInterrupt):
        train(crashed, data, quiet(checkpoint_dir=str(tmp_path / "b"), **cfg), loss_fn=_crashing(13))
    assert latest_checkpoint(tmp_path / "b").name == "step_00000006"
    torch.manual_seed(123)  # the resumed process starts from an unrelated RNG state and init
    fresh = tiny(dropout=0.1, seed=99)
    hist = train(fresh, data, quiet(checkpoint_dir=str(tmp_path / "b"), resume=True, **cfg))

    for (name, p), q in zip(ref.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(p, q), name
    assert [h["loss"] for h in hist] == [h["loss"] for h in ref_hist]
    a = load_checkpoint(latest_checkpoint(tmp_path / "a"), tiny(), restore_rng=False)
    b = load_checkpoint(latest_checkpoint(tmp_path / "b"), tiny(), restore_rng=False)
    # 8 steps x 2 micro-batches = 16 batches of an epoch of 3: epoch 5 (0-based), batch 1 done
    assert (a["step"], a["epoch"], a["batch_in_epoch"]) == (b["step"], b["epoch"], b["batch_in_epoch"]) == (8, 5, 1)
    ta = (latest_checkpoint(tmp_path / "a") / "optimizer.safetensors").read_bytes()
    tb = (latest_checkpoint(tmp_path / "b") / "optimizer.safetensors").read_bytes()
    assert ta == tb
    # only the newest `keep_checkpoints` (2) remain, and no temporary directory
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["step_00000006", "step_00000008"]


def _digest(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


def test_nan_guard_stops_and_keeps_last_checkpoint(tmp_path):
    """A loss that turns NaN at step 5 stops training with TrainingDiverged naming step 5 and
    the fixes; the step-4 checkpoint is byte-for-byte what it was before the NaN, and the model
    was not updated on step 5 (its weights equal the checkpoint's)."""
    model = tiny()
    snapshot = {}

    def loss_fn(m, batch):
        loss, metrics = next_token_loss(m, batch)
        step = len(snapshot.setdefault("calls", [])) + 1
        snapshot["calls"].append(step)
        if step == 5:
            snapshot["digest"] = _digest(latest_checkpoint(tmp_path))
            return loss * float("nan"), metrics
        return loss, metrics

    with pytest.raises(TrainingDiverged, match=r"step 5.*(?i:learning rate).*grad_clip") as info:
        train(model, lm_data(), quiet(max_steps=10, batch_size=4, checkpoint_dir=str(tmp_path), checkpoint_every=2),
              loss_fn=loss_fn)
    assert info.value.step == 5
    last = latest_checkpoint(tmp_path)
    assert last.name == "step_00000004" and _digest(last) == snapshot["digest"]
    restored = tiny(seed=7)
    load_checkpoint(last, restored, restore_rng=False)
    for (name, p), q in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(p, q), name
    assert all(p.grad is None for p in model.parameters())
    assert not list(tmp_path.glob(".tmp-*"))


def test_inf_gradient_is_caught():
    """A finite loss with an infinite gradient (d/dx of sqrt at 0) also stops training."""
    model = tiny()
    before = [p.detach().clone() for p in model.parameters()]

    def loss_fn(m, batch):
        return torch.sqrt(m(batch["input_ids"]).sum() * 0.0)  # value 0, gradient inf

    with pytest.raises(TrainingDiverged, match="gradient norm"):
        train(model, lm_data(), quiet(max_steps=3, batch_size=4), loss_fn=loss_fn)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ------------------------------------------------------------------ learning
@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_overfits_one_batch(family):
    """One batch of 4 random sequences (T=16, V=48). At init the logits are near zero, so the
    loss is close to ln V = 3.87 (uniform prediction). Any predictor that ignores context can do
    no better than the batch's empirical unigram entropy H1 (about ln V, a bit less from sampling
    noise). The sequences are random, so only memorizing them with context beats H1; we demand
    the loss fall below H1 / 4 (under one nat), which no context-free predictor can reach."""
    data = lm_data(n=4, T=16, seed=3)
    counts = torch.bincount(data["input_ids"][:, 1:].reshape(-1), minlength=V).float()
    p = counts / counts.sum()
    h1 = float(-(p[p > 0] * p[p > 0].log()).sum())  # unigram entropy of the targets
    model = tiny(family=family)
    hist = train(model, data, quiet(max_steps=40, batch_size=4, lr=1e-2, warmup_steps=5, grad_clip=1.0))
    assert abs(hist[0]["loss"] - math.log(V)) < 0.3
    assert hist[-1]["loss"] < h1 / 4, (hist[-1]["loss"], h1)


def test_grad_accumulation_equals_big_batch():
    """Parity: 2 micro-batches of 4 (loss/2 each) give the same update as one batch of 8, with
    equal-length unpadded sequences so the two means coincide. SGD keeps the update linear in the
    gradient; tolerance 1e-6 covers float32 summation order."""
    data = lm_data(n=16, T=12)
    runs = {}
    for bs, k in ((8, 1), (4, 2), (2, 4)):
        model = tiny()
        train(model, data, quiet(max_steps=3, batch_size=bs, grad_accum_steps=k, shuffle=False, grad_clip=None),
              optimizer=functools.partial(torch.optim.SGD, lr=0.5))
        runs[k] = model.state_dict()
    moved = max((runs[1][n] - tiny().state_dict()[n]).abs().max().item() for n in runs[1])
    assert moved > 1e-3  # the runs really trained
    for k in (2, 4):
        for n in runs[1]:
            torch.testing.assert_close(runs[k][n], runs[1][n], atol=1e-6, rtol=0)


def test_seeded_runs_are_deterministic():
    a, b = tiny(dropout=0.2), tiny(dropout=0.2)
    for m in (a, b):
        train(m, lm_data(), quiet(max_steps=4, batch_size=4, seed=11))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ------------------------------------------------------------------ optimizer groups and state
def test_weight_decay_groups():
    """Decay only matrices of Linear layers: not biases, norm gains, or (tied) embeddings."""
    model = tiny()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    for p in decay["params"]:
        assert p.dim() == 2 and "emb" not in names[id(p)], names[id(p)]
    for p in no_decay["params"]:
        assert p.dim() == 1 or "emb" in names[id(p)], names[id(p)]
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, 0.1)


def _stepped(opt_cls, shapes, **kw) -> torch.optim.Optimizer:
    params = [nn.Parameter(torch.randn(*s)) for s in shapes]
    opt = opt_cls([{"params": params[:1]}, {"params": params[1:], "lr": 0.05}], **kw)
    for _ in range(2):
        sum((p ** 2).sum() for p in params).backward()
        opt.step()
    return opt


@settings(max_examples=20)
@given(st.lists(st.lists(st.integers(1, 4), min_size=1, max_size=3), min_size=2, max_size=4),
       st.sampled_from(["adamw", "sgd", "adam_amsgrad"]))
def test_optimizer_state_round_trip(shapes, kind):
    """For any parameter shapes and these optimizers, state_dict -> safetensors tensors + JSON ->
    state_dict is exact: same tensors, same scalars, tuples stay tuples."""
    cls, kw = {"adamw": (torch.optim.AdamW, {"lr": 0.1, "betas": (0.8, 0.9)}),
               "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
               "adam_amsgrad": (torch.optim.Adam, {"lr": 0.1, "amsgrad": True})}[kind]
    sd = _stepped(cls, shapes, **kw).state_dict()
    tensors, meta = optimizer_state_to_safetensors(sd)
    import json
    back = optimizer_state_from_safetensors(tensors, json.loads(json.dumps(meta)))
    assert back["param_groups"] == sd["param_groups"]
    assert back["state"].keys() == sd["state"].keys()
    for pid, st_ in sd["state"].items():
        assert back["state"][pid].keys() == st_.keys()
        for k, v in st_.items():
            assert torch.equal(back["state"][pid][k], v) if isinstance(v, torch.Tensor) else back["state"][pid][k] == v


# ------------------------------------------------------------------ evaluation and history
def test_evaluate_matches_whole_set_nll_and_history_has_eval():
    """evaluate() weights batches by target tokens, so its loss equals the cross-entropy of the
    whole set at once (float32, 1e-5); perplexity = exp(loss). Eval entries appear every
    eval_every steps and at the end."""
    model = tiny()
    data = {"input_ids": lm_data(n=10, T=12)["input_ids"],
            "attention_mask": (torch.arange(12) < torch.tensor([12, 5, 9, 12, 3, 7, 12, 12, 4, 8])[:, None]).long()}
    ev = evaluate(model, data, batch_size=3)
    with torch.no_grad():
        logits = model(data["input_ids"], attention_mask=data["attention_mask"])
    targets = data["input_ids"][:, 1:].masked_fill(data["attention_mask"][:, 1:] == 0, -100)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, V), targets.reshape(-1), ignore_index=-100).item()
    assert ev["loss"] == pytest.approx(ref, abs=1e-5)
    assert ev["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)
    assert ev["num_tokens"] == int((targets != -100).sum())
    hist = train(model, lm_data(), quiet(max_steps=5, batch_size=4, eval_every=2), eval_data=data)
    assert [h["step"] for h in hist if "eval_loss" in h] == [2, 4, 5]
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= hist[0].keys()


def test_custom_loss_metrics_and_collate():
    """A classification loss_fn returning (loss, metrics) on variable-length examples padded by
    the default collate: metrics land in the history; padding adds an attention mask and
    labels are padded with -100."""
    batch = default_collate([{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([1, 2, 3])},
                             {"input_ids": torch.tensor([4]), "labels": torch.tensor([4])}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]

    examples = [{"input_ids": torch.randint(0, V, (3 + i % 4,)), "label": torch.tensor(i % 2)} for i in range(12)]
    model = tiny()
    head = nn.Linear(V, 2)
    model.add_module("cls_head", head)

    def cls_loss(m, b):
        logits = m.cls_head(m(b["input_ids"], attention_mask=b["attention_mask"])[:, 0])  # (B, 2)
        return F.cross_entropy(logits, b["label"]), {"accuracy": (logits.argmax(-1) == b["label"]).float().mean()}

    hist = train(model, examples, quiet(max_steps=3, batch_size=4), loss_fn=cls_loss)
    assert all(0.0 <= h["accuracy"] <= 1.0 for h in hist) and len(hist) == 3


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match="lr > 0"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=None)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        TrainConfig(checkpoint_every=5)
    with pytest.raises(ValueError, match="grad_clip"):
        TrainConfig(grad_clip=0.0)
    with pytest.raises(ValueError, match="empty"):
        train(tiny(), {"input_ids": torch.zeros(0, 4, dtype=torch.long)}, quiet(max_steps=1))
    with pytest.raises(TypeError, match="TrainConfig"):
        train(tiny(), lm_data(), {"max_steps": 1})
    with pytest.raises(TypeError, match="scalar"):
        train(tiny(), lm_data(), quiet(max_steps=1), loss_fn=lambda m, b: m(b["input_ids"]))
    train(tiny(), lm_data(), quiet(max_steps=2, batch_size=4, checkpoint_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="resume=True"):
        train(tiny(), lm_data(), quiet(max_steps=2, batch_size=4, checkpoint_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="data order changed"):
        train(tiny(), lm_data(), quiet(max_steps=4, batch_size=2, checkpoint_dir=str(tmp_path), resume=True))
    assert TrainConfig.from_dict(quiet(max_steps=3).to_dict()) == quiet(max_steps=3)
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"max_step": 3})
