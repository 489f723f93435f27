"""Tests for minituner/train.py and minituner/train_state.py: the schedule by hand (per param
group), the loss by hand, resume bit for bit, the NaN guard, overfitting one batch,
gradient-accumulation parity with unequal token and example counts, an oracle classifier's
exact accuracy and loss, host reads per step, optimizer-state serialization round trips,
evaluation parity, and clear errors."""

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

from minituner.data import Collator
from minituner.model import ModelConfig, Transformer
from minituner.train import TrainConfig, TrainingDiverged, evaluate, lr_at, next_token_loss, param_groups, train
from minituner.train_state import (latest_checkpoint, load_checkpoint, optimizer_state_from_safetensors,
                                   optimizer_state_to_safetensors)

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


def test_schedule_scales_each_groups_own_base_lr():
    """ULMFiT-style per-group rates. (a) A caller's SGD with group lrs 1.0 and 0.25: at every
    step group 1 runs at exactly 0.25 x group 0, and group 0 follows the hand values above.
    (b) Groups passed with lr_scale get AdamW at config.lr * lr_scale. AdamW's first step, with
    bias correction m_hat = g and v_hat = g^2, moves each weight by lr_0 * g / (|g| + eps), so
    the largest move in a group is its step-0 rate, lr * scale * 1/W in warmup (W = 2);
    parameters in no group do not move."""
    model = tiny()
    blocks = list(model.blocks)
    opt = torch.optim.SGD([{"params": blocks[0].parameters(), "lr": 1.0},
                           {"params": blocks[1].parameters(), "lr": 0.25}], lr=1.0)
    seen = []
    train(model, lm_data(), quiet(max_steps=6, batch_size=4, lr=1.0, min_lr=0.1, warmup_steps=2), optimizer=opt,
          callback=lambda entry: seen.append([g["lr"] for g in opt.param_groups]))
    assert [a for a, _ in seen] == pytest.approx([0.5, 1.0, 1.0, 0.775, 0.325, 0.1], abs=1e-12)
    assert [b for _, b in seen] == pytest.approx([0.25 * a for a, _ in seen], abs=1e-12)

    model = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = [{"params": model.blocks[0].parameters(), "lr_scale": 1.0},
              {"params": model.blocks[1].parameters(), "lr_scale": 0.25}]
    train(model, lm_data(), quiet(max_steps=1, batch_size=4, lr=1e-2, warmup_steps=2, weight_decay=0.0),
          optimizer=groups)
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    top = {i: max(v for n, v in moved.items() if n.startswith(f"blocks.{i}.")) for i in (0, 1)}
    assert top[0] == pytest.approx(1e-2 / 2, rel=1e-4) and top[1] == pytest.approx(0.25 * 1e-2 / 2, rel=1e-4)
    assert all(v == 0 for n, v in moved.items() if not n.startswith("blocks."))
    # each lr_scale group is split for weight decay like the default groups
    split = param_groups(model, 0.1, [{"params": model.blocks[1].parameters(), "lr": 0.5}])
    assert [(g["weight_decay"], g["lr"]) for g in split] == [(0.1, 0.5), (0.0, 0.5)]
    assert all(p.dim() == 2 for p in split[0]["params"]) and all(p.dim() == 1 for p in split[1]["params"])


def test_epochs_or_max_steps():
    """24 examples in micro-batches of 4 are 6 batches per epoch; with 2 per step, epochs=3 is
    ceil(3 * 6 / 2) = 9 optimizer steps (not the old default's 100); neither given is one epoch
    (3 steps); both given is an error naming which to drop."""
    hist = train(tiny(), lm_data(), quiet(epochs=3, batch_size=4, grad_accum_steps=2))
    assert [h["step"] for h in hist] == list(range(1, 10)) and hist[-1]["epoch"] == 2
    hist = train(tiny(), lm_data(), quiet(batch_size=4, grad_accum_steps=2))
    assert len(hist) == 3 and hist[-1]["epoch"] == 0
    hist = train(tiny(), lm_data(), quiet(epochs=0.5, batch_size=4))
    assert len(hist) == 3
    with pytest.raises(ValueError, match="drop epochs.*drop max_steps"):
        TrainConfig(max_steps=10, epochs=3)


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
    # the newest keep_checkpoints=2, and no temporary directory left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000004"]


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


def _accumulated(data, configs, loss_fn=None, max_steps=2):
    """Final weights and history of SGD runs over the same examples per step."""
    out = []
    for bs, k in configs:
        model = tiny()
        hist = train(model, data, quiet(max_steps=max_steps, batch_size=bs, grad_accum_steps=k, shuffle=False,
                                        grad_clip=None), optimizer=functools.partial(torch.optim.SGD, lr=0.5),
                     loss_fn=loss_fn)
        out.append((model.state_dict(), hist))
    return out


def _assert_same_updates(runs):
    (ref, ref_hist), rest = runs[0], runs[1:]
    moved = max((ref[n] - tiny().state_dict()[n]).abs().max().item() for n in ref)
    assert moved > 1e-3  # the runs really trained
    for weights, hist in rest:
        for n in ref:
            torch.testing.assert_close(weights[n], ref[n], atol=1e-6, rtol=0)
        # the logged loss is the window's weighted mean: the big batch's loss
        assert [h["loss"] for h in hist] == pytest.approx([h["loss"] for h in ref_hist], abs=1e-6)


def test_grad_accumulation_equals_big_batch_with_unequal_token_counts():
    """Parity: k micro-batches give the update of one batch of all their target tokens, when
    the micro-batches hold very different numbers of them (prompts of 0..10 of 12 positions
    masked, as in SFT): sum_i n_i L_i / sum_i n_i = the big batch's token mean. Averaging
    the micro-batch means instead (the old loop) weights a token of a short answer more.
    SGD keeps the update linear in the gradient; 1e-6 covers float32 summation order."""
    data = lm_data(n=8, T=12)
    prompt = torch.tensor([1, 10, 3, 11, 0, 6, 9, 2])  # masked prompt length per example
    data["labels"] = data["input_ids"].masked_fill(torch.arange(12) < prompt[:, None], -100)
    _assert_same_updates(_accumulated(data, ((8, 1), (4, 2), (2, 4))))


def test_grad_accumulation_of_per_example_means():
    """A loss without num_tokens is a mean over examples (classification, DPO per pair), and
    the window weights each micro-batch by its examples: 10 examples as micro-batches of
    4, 4 and 2 give the update of one batch of 10 (mean-of-means would weight the last two
    examples 5/3 times more)."""
    g = torch.Generator().manual_seed(4)
    data = {"input_ids": torch.randint(0, V, (10, 6), generator=g), "y": torch.randint(0, V, (10,), generator=g)}

    def last_token_class(m, b):
        return F.cross_entropy(m(b["input_ids"])[:, -1], b["y"])  # (B, V) -> mean over examples

    _assert_same_updates(_accumulated(data, ((10, 1), (4, 3)), loss_fn=last_token_class))


def test_at_most_one_host_read_per_step(monkeypatch):
    """No host sync inside a step: count the device-to-host reads (item, tolist, float, int,
    bool of a tensor) made by train.py itself. 5 steps of 4 micro-batches, logged only at the
    end: one finiteness flag per step, and at the logged last step the values plus the token
    count, so 5 + 1 reads. The old loop read each micro-batch's loss and token count and the
    gradient norm: 45."""
    import sys
    import minituner.train as train_module
    reads = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **kw):
            if sys._getframe(1).f_code.co_filename == train_module.__file__:
                reads.append(sys._getframe(1).f_code.co_name)
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    hist = train(tiny(), lm_data(n=40), quiet(max_steps=5, batch_size=2, grad_accum_steps=4, log_every=100),
                 optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    assert len(hist) == 1 and len(reads) == 6, reads


def test_seeded_runs_are_deterministic():
    """Same seed, same result bit for bit (dropout masks and data order come from it); another
    seed gives another result, so the first assertion is not vacuous."""
    a, b, c = tiny(dropout=0.2), tiny(dropout=0.2), tiny(dropout=0.2)
    for m, seed in ((a, 11), (b, 11), (c, 12)):
        train(m, lm_data(), quiet(max_steps=4, batch_size=4, seed=seed))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


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


class Oracle(nn.Module):
    """A classifier whose answer is written in the input: it predicts class input_ids[:, 0]
    with logit margin a (logits [a, 0] or [0, a]). The bias b starts at 0 so the loss has a
    gradient but does not change the answers of the first step."""

    def __init__(self, a: float = 2.0):
        super().__init__()
        self.a, self.b = a, nn.Parameter(torch.zeros(2))

    def forward(self, input_ids, attention_mask=None):
        return self.a * F.one_hot(input_ids[:, 0], 2).float() + self.b  # (B, 2)


def test_oracle_classifier_exact_accuracy_loss_and_tokens():
    """10 examples, micro-batches of 4, 4, 2 in one step (shuffle off, 3 accumulated): the
    oracle is right on examples 0-3 and 8-9 and wrong on 4-7. By hand: accuracy 6/10 = 0.6
    (the mean of the micro-batch accuracies would be (1 + 0 + 1)/3); cross-entropy of a right
    answer with margin a is ln(1 + e^-a), of a wrong one ln(1 + e^a), so the loss is
    (6 ln(1 + e^-a) + 4 ln(1 + e^a)) / 10. The examples are ragged (lengths 1 + i mod 3), so
    the Collator pads them and "tokens" counts real tokens: sum of the lengths = 19."""
    right = [True] * 4 + [False] * 4 + [True] * 2
    labels = [i % 2 for i in range(10)]
    examples = [{"input_ids": torch.tensor([y if ok else 1 - y] + [7] * (i % 3)), "label": torch.tensor(y)}
                for i, (y, ok) in enumerate(zip(labels, right))]

    def cls_loss(m, b):
        logits = m(b["input_ids"], attention_mask=b["attention_mask"])  # (B, 2)
        return F.cross_entropy(logits, b["label"]), {"accuracy": (logits.argmax(-1) == b["label"]).float().mean()}

    a = 2.0
    logged = []
    hist = train(Oracle(a), examples, quiet(max_steps=1, batch_size=4, grad_accum_steps=3, shuffle=False),
                 loss_fn=cls_loss, collate_fn=Collator(pad_id=0), callback=logged.append)
    assert logged == hist and len(hist) == 1
    assert hist[0]["accuracy"] == pytest.approx(0.6, abs=1e-6)
    assert hist[0]["loss"] == pytest.approx((6 * math.log1p(math.exp(-a)) + 4 * math.log1p(math.exp(a))) / 10,
                                            abs=1e-6)
    assert hist[0]["tokens"] == sum(1 + i % 3 for i in range(10))
    with pytest.raises(ValueError, match=r"Collator\(tokenizer.pad_id\)"):
        train(Oracle(a), examples, quiet(max_steps=1, batch_size=4), loss_fn=cls_loss)


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match="lr > 0"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
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
