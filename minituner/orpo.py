"""ORPO: odds-ratio preference optimization, SFT and preference in one stage (Chapter 09).

Paper
-----
- Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference
  Model", arXiv:2403.07691.
- Maechler 2012, "Accurately Computing log(1 - exp(-|a|))" (the log1mexp used below).

ORPO needs no reference model: it adds to the usual SFT loss on the chosen answer a term that
makes the chosen answer's ODDS larger than the rejected one's. With the length-normalized
likelihood P(y|x) = exp( (1/m) sum_t log P(y_t | x, y_<t) ):

    odds(y | x) = P(y|x) / (1 - P(y|x))                                         (Eq. 4)
    L_OR  = - log sigma( log( odds(y_w|x) / odds(y_l|x) ) )                      (Eq. 7)
    L_ORPO = E[ L_SFT + lambda * L_OR ]                                          (Eq. 6)

(lambda is called `beta`, as in TRL). On log-probs lp = log P (a mean over the answer's tokens),

    log odds = lp - log(1 - exp(lp)) = lp - log1mexp(lp)

and log1mexp must be computed with care: for lp near 0 (a confident model), 1 - exp(lp)
cancels catastrophically, and for very negative lp, exp(lp) underflows. Maechler's rule:

    log1mexp(x) = log(-expm1(x))     for -ln 2 < x < 0    (expm1 is exact near 0)
                = log1p(-exp(x))     for x <= -ln 2        (log1p is exact near 0)

At equal chosen and rejected log-probs the log odds ratio is 0 and L_OR = -log(1/2) = ln 2.
L_SFT is the chosen answer's mean negative log-likelihood per token (Eq. 2), per pair.
`orpo_step_loss` is the `loss_fn(model, batch)` for the training loop (one forward pass over
chosen and rejected; no reference model, no `disable_adapters`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minituner.logprobs import concatenated_logprobs

LN2 = math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate over the whole range (Maechler 2012). Computed in
    float32 at least (float64 stays float64). x = 0 exactly (a certain answer) is moved to the
    smallest negative normal float, so the result is finite (about -87 in float32)."""
    x = x if x.dtype == torch.float64 else x.float()
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)  # log(1 - e^0) = -inf otherwise
    # each branch sees only inputs where it is finite: torch.where's unused branch still gets a
    # zero gradient, and 0 * inf = NaN (log1p(-exp(x)) at x = -1e-12 is log(0) in float32)
    near_zero = torch.log(-torch.expm1(x.clamp(min=-LN2)))  # -ln 2 < x < 0
    far = torch.log1p(-torch.exp(x.clamp(max=-LN2)))  # x <= -ln 2
    return torch.where(x > -LN2, near_zero, far)


def orpo_loss(chosen_logps_mean: torch.Tensor, rejected_logps_mean: torch.Tensor,
              chosen_nll: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, dict]:
    """ORPO's loss L_SFT + beta * L_OR (batch mean) and metrics.

    `chosen_logps_mean`, `rejected_logps_mean` (B,): per-sequence MEAN log-probs of the answers;
    `chosen_nll`: the SFT loss, per sequence (B,) or already averaged (a 0-dim tensor).
    Metrics (0-dim, detached), with TRL's names: `nll_loss`, `or_loss` (mean L_OR),
    `log_odds_ratio` (mean log sigma(log odds ratio)), `log_odds_chosen` (mean log odds ratio),
    `rewards/chosen`, `rewards/rejected` (beta times the mean log-probs), `rewards/margins`,
    `rewards/accuracies`.
    """
    if not beta >= 0:
        raise ValueError(f"beta={beta} (ORPO's lambda, the weight of the odds-ratio term) must be >= 0")
    if chosen_logps_mean.shape != rejected_logps_mean.shape or chosen_logps_mean.dim() != 1:
        raise ValueError(f"chosen and rejected mean log-probs must both be (B,), got "
                         f"{tuple(chosen_logps_mean.shape)} and {tuple(rejected_logps_mean.shape)}")
    if chosen_nll.dim() > 1 or (chosen_nll.dim() == 1 and chosen_nll.shape != chosen_logps_mean.shape):
        raise ValueError(f"chosen_nll must be per sequence (B,) = {tuple(chosen_logps_mean.shape)} or a "
                         f"0-dim mean, got {tuple(chosen_nll.shape)}")
    lw, ll = chosen_logps_mean.float(), rejected_logps_mean.float()  # (B,) log P(y_w|x), log P(y_l|x)
    log_odds = (lw - log1mexp(lw)) - (ll - log1mexp(ll))  # (B,) log odds(y_w) - log odds(y_l), Eq. 4
    log_sig = F.logsigmoid(log_odds)  # (B,)
    or_loss = -log_sig  # (B,) L_OR, Eq. 7
    nll = chosen_nll.float().mean()  # L_SFT, Eq. 2
    loss = nll + beta * or_loss.mean()  # Eq. 6
    chosen_rewards, rejected_rewards = beta * lw.detach(), beta * ll.detach()
    metrics = {
        "nll_loss": nll.detach(),
        "or_loss": or_loss.detach().mean(),
        "log_odds_ratio": log_sig.detach().mean(),
        "log_odds_chosen": log_odds.detach().mean(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
    }
    return loss, metrics


def orpo_step_loss(model: nn.Module, batch: dict[str, torch.Tensor], beta: float = 0.1, *,
                   pad_id: int = 0, chunk_size: int | None = None) -> tuple[torch.Tensor, dict]:
    """`loss_fn(model, batch)` for `train.train` (bind beta with functools.partial): ORPO on a
    preference batch, chosen and rejected in one forward pass, no reference model. L_SFT is
    each chosen answer's mean token NLL (the prompt carries no loss), averaged over the pairs,
    so the unit of the mean is a pair. (TRL's ORPOTrainer takes its NLL over the prompt and
    the answer, pooled over the batch's tokens; `orpo_loss` accepts either.)"""
    out = concatenated_logprobs(model, batch, pad_id=pad_id, chunk_size=chunk_size)
    chosen_mean = out["chosen_logps"] / out["chosen_tokens"].clamp(min=1)  # (B,)
    rejected_mean = out["rejected_logps"] / out["rejected_tokens"].clamp(min=1)  # (B,)
    return orpo_loss(chosen_mean, rejected_mean, -chosen_mean, beta)  # L_SFT = -mean log P(y_w|x)
