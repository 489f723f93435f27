"""Tests for minituner.dpo: DPO's loss by hand (ln 2 at the start, the gradient's signs, cDPO,
hinge, IPO), parity with TRL's DPOTrainer code path, and the reference as disabled adapters."""

import copy
import functools
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minituner.dpo import dpo_loss, dpo_step_loss, reference_logprobs, with_reference_logps
from minituner.logprobs import concatenated_logprobs, sequence_logprobs
from minituner.lora import LoRAConfig, apply_lora
from minituner.model import ModelConfig, Transformer

V = 23
LN2 = math.log(2.0)


def tiny(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(family="gpt2", vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=16,
                      intermediate_size=24)
    return Transformer(cfg).eval()


def pair_batch(seed: int = 0, B: int = 3, T: int = 10, prompt: int = 4) -> dict:
    """A right-padded preference batch like PreferenceDataset + Collator make: shared prompt
    (labels -100), answers of different lengths, padding (mask 0, labels -100)."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(0, V, (B, prompt), generator=g)
    batch = {}
    for side in ("chosen", "rejected"):
        ids = torch.cat([prompt_ids, torch.randint(0, V, (B, T - prompt), generator=g)], 1)
        lengths = torch.randint(prompt + 1, T + 1, (B,), generator=g)
        mask = (torch.arange(T)[None] < lengths[:, None]).long()
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :prompt] = -100
        batch.update({f"{side}_input_ids": ids.masked_fill(mask == 0, 0), f"{side}_labels": labels,
                      f"{side}_attention_mask": mask})
    return batch


def trained_lora(model: Transformer, seed: int = 1) -> Transformer:
    """LoRA with B != 0, so the adapted model differs from its base."""
    model = apply_lora(model, LoRAConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj", "fc")))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


logps = st.lists(st.floats(-60, -0.01), min_size=1, max_size=6)


# ---------------------------------------------------------------------------- by hand
@settings(max_examples=20, deadline=None)
@given(chosen=logps, beta=st.floats(0.01, 2.0), shift=st.floats(-5, 5))
def test_loss_is_ln2_when_the_policy_is_the_reference(chosen, beta, shift):
    """pi_theta = pi_ref gives log-ratios 0, Delta = 0, L = -log sigma(0) = -log(1/2) = ln 2
    for every pair, whatever the log-probs; likewise for cDPO (both terms are ln 2)."""
    pc = torch.tensor(chosen, dtype=torch.float64)
    pr = pc + shift
    for eps in (0.0, 0.2):
        loss, m = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=beta, label_smoothing=eps)
        assert abs(loss.item() - LN2) < 1e-12
    assert m["rewards/margins"].item() == 0 and m["rewards/accuracies"].item() == 0


def test_gradient_pushes_chosen_up_and_rejected_down():
    """dL/d log pi(y_w) = -beta sigma(-beta Delta) / B < 0 and dL/d log pi(y_l) = +beta sigma(-beta Delta) / B
    (Eq. 8): gradient DESCENT raises the chosen log-prob and lowers the rejected one. At
    Delta = 0: magnitude beta / 2 / B exactly. Hinge (inside the margin) and IPO (Delta below
    1/(2 beta)) push the same ways."""
    B, beta = 4, 0.3
    pc = torch.full((B,), -10.0, requires_grad=True)
    pr = torch.full((B,), -12.0, requires_grad=True)
    loss, _ = dpo_loss(pc, pr, pc.detach(), pr.detach(), beta=beta)
    loss.backward()
    torch.testing.assert_close(pc.grad, torch.full((B,), -beta / 2 / B))
    torch.testing.assert_close(pr.grad, torch.full((B,), beta / 2 / B))
    for loss_type in ("hinge", "ipo"):
        pc.grad = pr.grad = None
        dpo_loss(pc, pr, pc.detach(), pr.detach(), beta=beta, loss_type=loss_type)[0].backward()
        assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_values_by_hand_sigmoid_cdpo_hinge_ipo():
    """One pair: policy (-3, -7), reference (-4, -5): log-ratios +1 and -2, Delta = 3, beta = 0.5.
    sigmoid: -log sigma(1.5) = log(1 + e^-1.5); cDPO with eps = 0.1:
    0.9 log(1 + e^-1.5) + 0.1 log(1 + e^1.5) (Mitchell 2023); hinge: max(0, 1 - 1.5) = 0;
    IPO: (3 - 1/(2*0.5))^2 = 4. Rewards: 0.5 and -1, margin 1.5, accuracy 1."""
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    args = (t(-3.0), t(-7.0), t(-4.0), t(-5.0))
    loss, m = dpo_loss(*args, beta=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.5)), abs=1e-12)
    assert (m["rewards/chosen"].item(), m["rewards/rejected"].item()) == (0.5, -1.0)
    assert m["rewards/margins"].item() == 1.5 and m["rewards/accuracies"].item() == 1.0
    cdpo, _ = dpo_loss(*args, beta=0.5, label_smoothing=0.1)
    assert cdpo.item() == pytest.approx(0.9 * math.log1p(math.exp(-1.5)) + 0.1 * math.log1p(math.exp(1.5)), abs=1e-12)
    assert dpo_loss(*args, beta=0.5, loss_type="hinge")[0].item() == 0.0
    assert dpo_loss(*args, beta=0.5, loss_type="ipo")[0].item() == pytest.approx(4.0, abs=1e-12)
    # hinge inside the margin: Delta = 3, beta = 0.1 -> 1 - 0.3 = 0.7
    assert dpo_loss(*args, beta=0.1, loss_type="hinge")[0].item() == pytest.approx(0.7, abs=1e-12)


@settings(max_examples=20, deadline=None)
@given(deltas=st.lists(st.floats(-40, 40), min_size=1, max_size=5), beta=st.floats(0.01, 1.0),
       eps=st.floats(0.0, 0.49))
def test_smoothed_sigmoid_is_the_cdpo_formula(deltas, beta, eps):
    """TRL 1.16's `sigmoid` ignores label_smoothing, and its `robust` is a different loss, so cDPO
    is checked against its formula: L = -(1-eps) log sigma(beta Delta) - eps log sigma(-beta Delta),
    the expected DPO loss when each label is flipped with probability eps."""
    d = torch.tensor(deltas, dtype=torch.float64)
    zero = torch.zeros_like(d)
    loss, _ = dpo_loss(d, zero, zero, zero, beta=beta, label_smoothing=eps)
    expected = (-(1 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def test_bad_arguments_name_the_fix():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="sigmoid"):
        dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, label_smoothing=0.5)
    with pytest.raises(ValueError, match="cDPO"):
        dpo_loss(x, x, x, x, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(x, x, x, torch.zeros(3))


# ---------------------------------------------------------------------------- the reference
def test_disabled_adapters_give_the_untouched_base_models_logprobs():
    """The reference of a LoRA policy is the policy under disable_adapters: its log-probs equal
    those of an untouched copy of the base, exactly, while the policy's own differ."""
    base = tiny()
    untouched = copy.deepcopy(base)
    policy = trained_lora(base)
    batch = pair_batch()
    ref = reference_logprobs(policy, batch)
    with torch.no_grad():
        expected = concatenated_logprobs(untouched, batch)
        own = concatenated_logprobs(policy, batch)
    for k in ("chosen_logps", "rejected_logps"):
        assert torch.equal(ref[k], expected[k])
        assert not torch.allclose(own[k], expected[k], atol=1e-3)  # the adapter does change the model
    assert not ref["chosen_logps"].requires_grad


def test_step_loss_starts_at_ln2_with_a_fresh_lora_and_runs_one_policy_forward():
    """LoRA starts with B = 0, so the policy is its reference and the first loss is ln 2 (up to
    float32 rounding of the two identical forwards). The policy runs chosen and rejected in one
    forward of 2B rows with gradients; the reference in one more without."""
    model = apply_lora(tiny(), LoRAConfig(r=2, target_modules=("q_proj", "v_proj")))
    model.train()
    batch = pair_batch(B=3)
    calls = []
    model.register_forward_hook(lambda m, a, out: calls.append((out.shape[0], torch.is_grad_enabled())))
    loss, metrics = dpo_step_loss(model, batch, beta=0.1)
    assert abs(loss.item() - LN2) < 1e-6
    assert calls == [(6, True), (6, False)]
    assert model.training  # the reference pass restores the mode
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert set(metrics) >= {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                            "logps/chosen", "logps/rejected"}


def test_precomputed_reference_columns_and_a_frozen_reference_give_the_same_loss():
    """Three ways to the reference give one loss: disabled adapters, a frozen copy of the base
    passed as `reference`, and `with_reference_logps` columns computed before training."""
    from minituner.data import Collator
    base = tiny()
    untouched = copy.deepcopy(base)
    policy = trained_lora(base)
    batch = pair_batch(B=4)
    examples = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    cols = with_reference_logps(untouched, examples, Collator(0), batch_size=3)
    assert set(cols[0]) == set(examples[0]) | {"ref_chosen_logps", "ref_rejected_logps"}
    with_cols = Collator(0)(cols)
    for loss_type in ("sigmoid", "ipo"):
        a, _ = dpo_step_loss(policy, batch, loss_type=loss_type)
        b, _ = dpo_step_loss(policy, batch, loss_type=loss_type, reference=untouched)
        c, _ = dpo_step_loss(policy, with_cols, loss_type=loss_type)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="with_reference_logps"):
        dpo_step_loss(untouched, batch)  # no adapters, no reference: it cannot be its own


def test_ipo_step_loss_uses_length_averaged_logprobs():
    """IPO's Delta is over log-probs divided by each answer's completion-token count, for the
    policy and the reference alike (TRL's normalization)."""
    base = tiny()
    untouched = copy.deepcopy(base)
    policy = trained_lora(base)
    batch = pair_batch(B=3)
    loss, _ = dpo_step_loss(policy, batch, beta=0.2, loss_type="ipo", reference=untouched)
    with torch.no_grad():
        p, r = concatenated_logprobs(policy, batch), concatenated_logprobs(untouched, batch)
    nc, nr = p["chosen_tokens"], p["rejected_tokens"]
    delta = (p["chosen_logps"] - r["chosen_logps"]) / nc - (p["rejected_logps"] - r["rejected_logps"]) / nr
    torch.testing.assert_close(loss.detach(), ((delta - 1 / 0.4) ** 2).mean(), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- parity with TRL
def _trl_dpo(model, inputs, beta: float, loss_type: str | list, ref_model=None, loss_weights=None):
    """TRL 1.16's own DPOTrainer._compute_loss, with the trainer built minimally: the attributes
    its __init__ sets from a real DPOConfig, a single-process accelerator stand-in."""
    trl = pytest.importorskip("trl")
    assert trl.__version__.startswith("1.16"), trl.__version__
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir="unused", beta=beta, loss_type=loss_type if isinstance(loss_type, list) else [loss_type],
                     loss_weights=loss_weights, report_to=[], use_cpu=True, bf16=False,
                     precompute_ref_log_probs=ref_model is None)
    trainer = object.__new__(DPOTrainer)
    identity = lambda x: x  # noqa: E731 (one process: gathering is the identity)
    trainer.__dict__.update(
        args=args, model=model, ref_model=ref_model, beta=args.beta, loss_types=args.loss_type,
        loss_weights=args.loss_weights or [1.0] * len(args.loss_type), ld_alpha=args.ld_alpha,
        f_divergence_type=args.f_divergence_type, f_alpha_divergence_coef=args.f_alpha_divergence_coef,
        label_smoothing=args.label_smoothing, use_weighting=args.use_weighting,
        precompute_ref_logps=args.precompute_ref_log_probs, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity,
                                    unwrap_model=identity))
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    mode = "train" if model.training else "eval"
    return loss, {k: v[-1] for k, v in trainer._metrics[mode].items()}


class _FixedLogProbs(torch.nn.Module):
    """Stands in for a model patched with TRL's fused LM head: returns given per-token log-probs."""

    def __init__(self, per_token: torch.Tensor):
        super().__init__()
        self.per_token = per_token

    def forward(self, input_ids=None, labels=None, **kwargs):
        lp = self.per_token.masked_fill(labels[:, 1:] == -100, 0.0)  # the fused head zeroes ignored positions
        zeros = torch.zeros_like(lp)
        return SimpleNamespace(log_probs=lp, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_equals_trl_dpo_trainer_on_fixed_tensors(loss_type):
    """Fixed per-token log-probs and precomputed reference log-probs through TRL's code path;
    ours gets the same numbers as per-sequence sums (means for IPO). Loss and reward metrics
    within 1e-6."""
    B, T, beta = 4, 9, 0.2
    g = torch.Generator().manual_seed(0)
    per_token = -3 * torch.rand(2 * B, T - 1, generator=g)  # (2B, T-1)
    completion = torch.zeros(2 * B, T, dtype=torch.long)
    for i, (start, end) in enumerate([(3, 9), (4, 7), (2, 9), (5, 8)] * 2):
        completion[i, start:end] = 1
    ref = -30 * torch.rand(2 * B, generator=g)
    inputs = {"input_ids": torch.randint(0, V, (2 * B, T), generator=g),
              "attention_mask": torch.ones(2 * B, T, dtype=torch.long), "completion_mask": completion,
              "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    trl_loss, trl_m = _trl_dpo(_FixedLogProbs(per_token), inputs, beta, loss_type)
    mask = completion[:, 1:].float()
    sums, n = (per_token * mask).sum(1), mask.sum(1)
    pc, pr, rc, rr = sums[:B], sums[B:], ref[:B], ref[B:]
    if loss_type == "ipo":
        pc, pr, rc, rr = pc / n[:B], pr / n[B:], rc / n[:B], rr / n[B:]
    loss, m = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type)
    assert abs(loss.item() - trl_loss.item()) < 1e-6
    if loss_type != "ipo":  # TRL's reward metrics are over sums
        for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert abs(m[k].item() - trl_m[k]) < 1e-6, k


def test_rpo_adds_the_chosen_nll_per_token_and_equals_trl_sigmoid_plus_sft():
    """DPO + alpha * NLL (Pang 2024, Eq. 3). TRL 1.16 writes it loss_type=["sigmoid", "sft"],
    loss_weights=[1, alpha]: its "sft" term is the mean of the chosen answers' per-token
    log-probs over ALL the batch's chosen tokens (not a mean of per-answer means). Fixed
    tensors through TRL's code path, within 1e-6; then dpo_step_loss on a tiny model adds
    exactly alpha times -sum(chosen log-probs) / sum(chosen tokens)."""
    B, T, beta, alpha = 4, 9, 0.2, 0.7
    g = torch.Generator().manual_seed(1)
    per_token = -3 * torch.rand(2 * B, T - 1, generator=g)  # (2B, T-1)
    completion = torch.zeros(2 * B, T, dtype=torch.long)
    for i, (start, end) in enumerate([(3, 9), (4, 7), (2, 9), (5, 8)] * 2):  # unequal answer lengths
        completion[i, start:end] = 1
    ref = -30 * torch.rand(2 * B, generator=g)
    inputs = {"input_ids": torch.randint(0, V, (2 * B, T), generator=g),
              "attention_mask": torch.ones(2 * B, T, dtype=torch.long), "completion_mask": completion,
              "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    trl_loss, _ = _trl_dpo(_FixedLogProbs(per_token), inputs, beta, ["sigmoid", "sft"], loss_weights=[1.0, alpha])
    mask = completion[:, 1:].float()
    sums, n = (per_token * mask).sum(1), mask.sum(1)
    dpo, _ = dpo_loss(sums[:B], sums[B:], ref[:B], ref[B:], beta=beta)
    nll = -sums[:B].sum() / n[:B].sum()  # per token over the batch's chosen tokens
    assert abs((dpo + alpha * nll).item() - trl_loss.item()) < 1e-6

    base = tiny()
    policy, batch = trained_lora(base), pair_batch(B=3)
    plain, _ = dpo_step_loss(policy, batch, beta=beta)
    with_nll, m = dpo_step_loss(policy, batch, beta=beta, rpo_alpha=alpha)
    with torch.no_grad():
        p = concatenated_logprobs(policy, batch)
    want = -p["chosen_logps"].sum() / p["chosen_tokens"].sum()
    torch.testing.assert_close(m["nll_loss"], want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(with_nll.detach(), plain.detach() + alpha * want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="rpo_alpha must be >= 0"):
        dpo_step_loss(policy, batch, rpo_alpha=-1.0)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_equals_trl_dpo_trainer_on_a_tiny_models_log_probs(loss_type):
    """A tiny transformers GPT-2 as policy and another as reference, TRL's fused-head forward on
    one (2B, T) batch, vs. ours: sequence_logprobs on the same models' logits, then dpo_loss.
    Within 1e-6: the per-sequence sums agree to their float32 last bits (~2e-6 at 20 nats;
    TRL sums its tiles in another order), and beta = 0.1 scales that down in the loss; IPO's
    loss at beta = 0.1 would be ~25, whose float32 last bit is already 2e-6, so it uses 0.5."""
    pytest.importorskip("trl")
    from test_logprobs import tiny_hf_gpt2
    from trl.trainer.utils import add_fused_lm_head

    policy, reference = tiny_hf_gpt2(seed=0), tiny_hf_gpt2(seed=1)
    batch = pair_batch(seed=3, B=3, T=11)
    beta = 0.5 if loss_type == "ipo" else 0.1  # IPO's loss is (1/(2 beta))^2 at the start: 1 here, not 25
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    with torch.no_grad():
        ours = {}
        for name, model in (("policy", policy), ("ref", reference)):
            logits = model(ids, attention_mask=mask).logits
            ours[name] = sequence_logprobs(logits, labels, average=loss_type == "ipo").chunk(2)
        loss, m = dpo_loss(*ours["policy"], *ours["ref"], beta=beta, loss_type=loss_type)
        add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
        add_fused_lm_head(reference)
        inputs = {"input_ids": ids, "attention_mask": mask, "completion_mask": (labels != -100).long()}
        trl_loss, trl_m = _trl_dpo(policy, inputs, beta, loss_type, ref_model=reference)
    assert abs(loss.item() - trl_loss.item()) < 1e-6
    if loss_type != "ipo":
        assert abs(m["rewards/margins"].item() - trl_m["rewards/margins"]) < 1e-6


def test_step_loss_plugs_into_train():
    """dpo_step_loss through train.train: a few steps on one batch raise the reward accuracy's
    margin above 0 (the loss falls below ln 2)."""
    from minituner.data import Collator
    from minituner.train import TrainConfig, train
    model = apply_lora(tiny(), LoRAConfig(r=4, target_modules=("q_proj", "v_proj", "fc", "proj")))
    batch = pair_batch(B=4)
    data = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    history = train(model, data, TrainConfig(max_steps=15, batch_size=4, lr=1e-2, warmup_steps=0, progress=False),
                    loss_fn=functools.partial(dpo_step_loss, beta=0.5), collate_fn=Collator(0))
    losses = [h["loss"] for h in history]
    assert abs(losses[0] - LN2) < 1e-5 and losses[-1] < 0.5
