"""Tests for minituner.orpo: log1mexp over the whole range, ORPO's loss by hand (ln 2 at equal
log-probs, odds by hand, the gradient's signs), and parity with TRL's ORPOTrainer code path."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minituner.logprobs import sequence_logprobs
from minituner.lora import LoRAConfig, apply_lora
from minituner.orpo import log1mexp, orpo_loss, orpo_step_loss

LN2 = math.log(2.0)


# ---------------------------------------------------------------------------- log1mexp
def test_log1mexp_is_finite_and_accurate_from_minus_1e_12_to_minus_1e4():
    """In float32, relative error at most 4e-7 (a few float32 ulps) against the exact value
    (mpmath, 40 digits) at the float32 inputs, for x from -1e-12 to -1e4 (where the exact
    value is below 1e-30 in size, x < -69, an absolute error under 1e-35). The naive
    log(1 - exp(x)) fails both ends: -inf at x = -1e-12 (exp rounds to 1) and a relative
    error of ~1e-3 at -1e-4, while log1p(-exp(x)) alone loses everything near 0."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    x = -torch.logspace(-12, 4, 3001, dtype=torch.float64).float()  # (N,) float32 inputs
    got = log1mexp(x)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    exact = torch.tensor([float(mpmath.log(-mpmath.expm1(mpmath.mpf(float(v))))) for v in x], dtype=torch.float64)
    normal = exact.abs() >= 1e-30  # float32's exp loses bits as it nears its smallest normal, 1.2e-38
    rel = ((got.double() - exact).abs() / exact.abs())[normal].max().item()
    assert (got.double() - exact)[~normal].abs().max() < 1e-35
    assert rel < 4e-7, rel
    naive = torch.log(1 - torch.exp(x))
    assert not torch.isfinite(naive[0]) and ((naive.double() - exact).abs() / exact.abs())[normal].nan_to_num(nan=1.0).max() > 1e-4


def test_log1mexp_float64_stays_float64_and_zero_is_finite():
    x = torch.tensor([-1e-300, -1e-12, -0.5, -LN2, -1.0, -800.0], dtype=torch.float64)
    got = log1mexp(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got[1:5], torch.log(-torch.expm1(x[1:5])), rtol=1e-15, atol=0)
    assert got[-1].item() == -math.exp(-800.0)  # = -0.0 in float64 underflow: log1p(-tiny) ~ -tiny
    assert torch.isfinite(log1mexp(torch.zeros(3))).all()  # a certain answer (log-prob 0) stays finite


# ---------------------------------------------------------------------------- the loss by hand
@settings(max_examples=20, deadline=None)
@given(lp=st.lists(st.floats(-30, -1e-6), min_size=1, max_size=6), nll=st.floats(0, 10), beta=st.floats(0, 2))
def test_odds_ratio_term_is_ln2_at_equal_logprobs(lp, nll, beta):
    """Equal chosen and rejected log-probs: equal odds, log odds ratio 0, L_OR = -log sigma(0) = ln 2;
    so L = L_SFT + beta ln 2."""
    x = torch.tensor(lp)
    loss, m = orpo_loss(x, x.clone(), torch.tensor(nll), beta=beta)
    assert abs(m["or_loss"].item() - LN2) < 1e-6 and m["log_odds_chosen"].item() == 0
    assert abs(loss.item() - (nll + beta * LN2)) < 1e-5


def test_odds_by_hand():
    """P(y_w) = 1/2 -> odds 1; P(y_l) = 1/5 -> odds 1/4. Odds ratio 4, log 4; L_OR = -log sigma(log 4)
    = -log(4/5) = log(5/4). With chosen_nll (2, 4) and beta = 0.5: L = 3 + 0.5 log(5/4)."""
    lw, ll = torch.tensor([math.log(0.5)] * 2), torch.tensor([math.log(0.2)] * 2)
    loss, m = orpo_loss(lw, ll, torch.tensor([2.0, 4.0]), beta=0.5)
    assert m["log_odds_chosen"].item() == pytest.approx(math.log(4), abs=1e-6)
    assert m["or_loss"].item() == pytest.approx(math.log(1.25), abs=1e-6)
    assert loss.item() == pytest.approx(3 + 0.5 * math.log(1.25), abs=1e-6)
    assert m["rewards/accuracies"].item() == 1.0


def test_gradient_raises_chosen_and_lowers_rejected_and_stays_finite_at_the_extremes():
    """d L_OR / d lw < 0 and d L_OR / d ll > 0 (no SFT term here); at log-probs -1e-12 (almost
    certain) and -1e4, loss and gradients are finite. (TRL 1.16's log1mexp, a torch.where over
    both branches, gives a NaN gradient at -1e-12: the unused log1p(-exp(x)) is log(0) there.)"""
    lw = torch.tensor([-1.0, -1e-12, -1e4, -0.3], requires_grad=True)
    ll = torch.tensor([-2.0, -5.0, -1e-12, -1e4], requires_grad=True)
    loss, _ = orpo_loss(lw, ll, torch.tensor(0.0), beta=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lw.grad).all() and torch.isfinite(ll.grad).all()
    assert lw.grad[0] < 0 and ll.grad[0] > 0 and lw.grad[1] <= 0 and ll.grad[2] >= 0


def test_bad_shapes_name_the_fix():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="chosen_nll"):
        orpo_loss(x, x, torch.zeros(2))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        orpo_loss(x, torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="beta"):
        orpo_loss(x, x, x, beta=-1.0)


def test_step_loss_is_mean_nll_plus_beta_times_the_odds_term():
    """orpo_step_loss = mean over pairs of the chosen answer's per-token NLL + beta * L_OR, from
    one concatenated forward; no reference pass (one forward hook call)."""
    from test_dpo import pair_batch, tiny
    model = apply_lora(tiny(), LoRAConfig(r=2))
    batch = pair_batch(B=3)
    calls = []
    model.register_forward_hook(lambda m, a, out: calls.append(out.shape[0]))
    loss, m = orpo_step_loss(model, batch, beta=0.25)
    assert calls == [6]
    with torch.no_grad():
        lw = sequence_logprobs(model(batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"]),
                               batch["chosen_labels"], average=True)
        ll = sequence_logprobs(model(batch["rejected_input_ids"], attention_mask=batch["rejected_attention_mask"]),
                               batch["rejected_labels"], average=True)
    log_odds = (lw - torch.log1p(-torch.exp(lw))) - (ll - torch.log1p(-torch.exp(ll)))
    expected = (-lw).mean() - 0.25 * F.logsigmoid(log_odds).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- parity with TRL
def _trl_orpo(beta: float):
    """TRL's ORPOTrainer with the attributes its code paths read, built minimally."""
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOTrainer

    trainer = object.__new__(ORPOTrainer)
    identity = lambda x: x  # noqa: E731 (one process)
    trainer.__dict__.update(beta=beta, is_encoder_decoder=False, padding_value=0, aux_loss_enabled=False,
                            accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=identity))
    return trainer


def test_equals_trl_odds_ratio_loss_on_fixed_tensors():
    """TRL's ORPO loss is nll - mean(beta * log sigma(log odds)); its odds_ratio_loss on the same
    mean log-probs, with the same NLL, gives our loss and metrics within 1e-6, including log-probs
    near 0 and very negative."""
    trainer = _trl_orpo(beta=0.1)
    g = torch.Generator().manual_seed(0)
    lw = torch.cat([-3 * torch.rand(6, generator=g), torch.tensor([-1e-7, -50.0])])
    ll = torch.cat([-3 * torch.rand(6, generator=g), torch.tensor([-40.0, -1e-6])])
    nll = torch.tensor(1.7)
    losses, chosen_r, rejected_r, log_odds_ratio, log_odds_chosen = trainer.odds_ratio_loss(lw, ll)
    loss, m = orpo_loss(lw, ll, nll, beta=0.1)
    assert abs(loss.item() - (nll - losses.mean()).item()) < 1e-6
    assert abs(m["log_odds_ratio"].item() - log_odds_ratio.item()) < 1e-6
    assert abs(m["log_odds_chosen"].item() - log_odds_chosen.item()) < 1e-6
    assert abs(m["rewards/chosen"].item() - chosen_r.mean().item()) < 1e-6
    assert abs(m["rewards/rejected"].item() - rejected_r.mean().item()) < 1e-6


def test_equals_trl_orpo_trainer_on_a_tiny_models_log_probs():
    """TRL's get_batch_loss_metrics (its concatenated forward, mean log-probs, NLL over the
    chosen prompt + answer) on a tiny transformers GPT-2 vs. orpo_loss on the same model's
    logits: our sequence_logprobs (average=True) and that NLL, within 1e-6."""
    pytest.importorskip("trl")
    from test_dpo import pair_batch
    from test_logprobs import tiny_hf_gpt2

    model, batch, beta = tiny_hf_gpt2(seed=2), pair_batch(seed=4, B=3, T=11), 0.1
    trainer = _trl_orpo(beta)
    with torch.no_grad():
        trl_loss, trl_m = trainer.get_batch_loss_metrics(model, batch)
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        logits = model(ids, attention_mask=mask).logits  # (2B, T, V)
        lw, ll = sequence_logprobs(logits, labels, average=True).chunk(2)
        B = lw.numel()
        full = ids[:B].masked_fill(mask[:B] == 0, -100)  # TRL's NLL: the chosen prompt + answer
        nll = F.cross_entropy(logits[:B, :-1].reshape(-1, logits.size(-1)), full[:, 1:].reshape(-1))
        loss, m = orpo_loss(lw, ll, nll, beta=beta)
    assert abs(loss.item() - trl_loss.item()) < 1e-6
    for k in ("log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected", "rewards/accuracies"):
        assert abs(m[k].item() - trl_m[k]) < 1e-6, k
