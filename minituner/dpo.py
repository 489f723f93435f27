"""DPO: direct preference optimization, a preference loss with no reward model (Chapter 09).

Papers
------
- Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
  Reward Model", arXiv:2305.18290.
- Mitchell 2023, "A note on DPO with noisy preferences" (conservative DPO, cDPO).
- Zhao et al. 2023, "SLiC-HF", arXiv:2305.10425 (the hinge loss).
- Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences" (IPO), arXiv:2310.12036.
- Pang et al. 2024, "Iterative Reasoning Preference Optimization", arXiv:2404.19733, Eq. 3
  (DPO + NLL, TRL's `rpo_alpha`).

For a prompt x with a chosen answer y_w and a rejected one y_l, the policy pi_theta and a
frozen reference pi_ref (the model DPO starts from) define each answer's implicit reward,
beta times its log-ratio, and DPO fits the Bradley-Terry model of the preference:

    r(y) = beta * log( pi_theta(y | x) / pi_ref(y | x) )                        (Eq. 5)
    Delta = log pi_theta(y_w|x) - log pi_ref(y_w|x) - log pi_theta(y_l|x) + log pi_ref(y_l|x)
    L_DPO = - E[ log sigma(beta * Delta) ]                                       (Eq. 7)

At the start the policy IS the reference: Delta = 0 and L = -log(1/2) = ln 2 exactly. The
gradient (Eq. 8) is beta * sigma(-beta Delta) * (grad log pi(y_w) - grad log pi(y_l)): up on
the chosen answer, down on the rejected one, weighted by how wrong the implicit reward is.

`loss_type` picks the function of beta * Delta (per pair, then the batch mean):

    sigmoid  -(1 - eps) log sigma(beta Delta) - eps log sigma(-beta Delta)   (eps = label_smoothing: cDPO)
    hinge    max(0, 1 - beta Delta)                                          (SLiC)
    ipo      (Delta - 1 / (2 beta))^2, Delta from LENGTH-AVERAGED log-probs  (IPO Eq. 17, tau = beta)

DPO alone may lower the chosen answer's likelihood too, as long as the rejected one falls
faster; Pang et al. add the chosen answer's negative log-likelihood per token (`rpo_alpha`):

    L = L_DPO + alpha * ( -sum_w log pi_theta(y_w | x) / sum_w |y_w| )             (Pang Eq. 3)

The reference costs no second model when the policy is an adapter (LoRA, adapters, prefix):
the same weights under `protocol.disable_adapters(model)` ARE the base model. When the whole
model is fine-tuned, its reference log-probs are computed once, before training, and travel
with the data (`with_reference_logps`). `dpo_step_loss` is the `loss_fn(model, batch)` the
training loop calls: chosen and rejected in one forward pass (`logprobs.concatenated_logprobs`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minituner.logprobs import concatenated_logprobs
from minituner.protocol import Injected, disable_adapters

LOSS_TYPES = ("sigmoid", "hinge", "ipo")
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


# ---------------------------------------------------------------------------- the loss on log-probs
def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """DPO loss (batch mean) and metrics from per-sequence log-probs, each (B,).

    For `loss_type="ipo"` pass length-averaged log-probs (sum / number of completion tokens),
    as TRL does. Metrics (0-dim tensors, detached, on the device): `rewards/chosen`,
    `rewards/rejected` (beta times the log-ratios, batch means), `rewards/margins`,
    `rewards/accuracies` (fraction of pairs whose chosen reward is higher).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}; choose one of {LOSS_TYPES}")
    if not beta > 0:
        raise ValueError(f"beta={beta} must be > 0 (the strength of the pull toward the reference)")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 0.5): the assumed "
                         "fraction of flipped preference labels")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to loss_type='sigmoid' (cDPO), not {loss_type!r}")
    shapes = {tuple(t.shape) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"dpo_loss needs four per-sequence tensors of one shape (B,), got {sorted(shapes)}")
    chosen_logratios = policy_chosen - ref_chosen  # (B,) log pi/pi_ref (y_w)
    rejected_logratios = policy_rejected - ref_rejected  # (B,) log pi/pi_ref (y_l)
    delta = chosen_logratios - rejected_logratios  # (B,) Delta
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)  # Eq. 7
        if label_smoothing:  # cDPO: the label is flipped with probability eps
            losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)  # SLiC: max(0, 1 - beta Delta)
    else:
        losses = (delta - 1 / (2 * beta)) ** 2  # IPO Eq. 17: regress Delta onto 1 / (2 tau)
    chosen_rewards = beta * chosen_logratios.detach()  # Eq. 5, per pair
    rejected_rewards = beta * rejected_logratios.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
    }
    return losses.mean(), metrics


# ---------------------------------------------------------------------------- the reference
@torch.no_grad()
def reference_logprobs(model: nn.Module, batch: dict[str, torch.Tensor], *, pad_id: int = 0,
                       chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    """`concatenated_logprobs` of the base model: `model` with its adapters disabled, no
    gradients. For a fully fine-tuned policy pass a frozen copy of the base instead (or
    precompute with `with_reference_logps`)."""
    was_training = model.training
    model.eval()  # the reference is evaluated without dropout, like TRL's
    try:
        with disable_adapters(model):
            return concatenated_logprobs(model, batch, pad_id=pad_id, chunk_size=chunk_size)
    finally:
        model.train(was_training)


@torch.no_grad()
def with_reference_logps(model: nn.Module, examples, collate_fn, batch_size: int = 8,
                         chunk_size: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Each example of a preference data set with `ref_chosen_logps` and `ref_rejected_logps`
    (0-dim float32, sums over the completion) added: the reference computed once, before a
    fully fine-tuned policy starts to move (TRL's `precompute_ref_log_probs`). `model` is
    the reference (the base); its adapters, if any, are disabled. Examples keep their order."""
    items = [examples[i] for i in range(len(examples))]
    if not items:
        raise ValueError("with_reference_logps got an empty data set")
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        batch = {k: v.to(device) for k, v in collate_fn(chunk).items()}
        ref = reference_logprobs(model, batch, chunk_size=chunk_size)
        for j, ex in enumerate(chunk):
            out.append({**ex, "ref_chosen_logps": ref["chosen_logps"][j].cpu(),
                        "ref_rejected_logps": ref["rejected_logps"][j].cpu()})
    return out


# ---------------------------------------------------------------------------- the training step
def dpo_step_loss(model: nn.Module, batch: dict[str, torch.Tensor], beta: float = 0.1,
                  loss_type: str = "sigmoid", label_smoothing: float = 0.0, *,
                  reference: nn.Module | None = None, pad_id: int = 0,
                  chunk_size: int | None = None, rpo_alpha: float | None = None) -> tuple[torch.Tensor, dict]:
    """`loss_fn(model, batch)` for `train.train` (bind the hyper-parameters with
    functools.partial): DPO's batch-mean loss over the preference pairs and its metrics.

    The policy runs chosen and rejected in one forward pass. The reference log-probs come
    from, in this order: the batch's `ref_chosen_logps`/`ref_rejected_logps` (B,) columns
    (`with_reference_logps`), else `reference` (a frozen model) under no_grad, else `model`
    itself under `disable_adapters` (the adapter's base: no second copy of the weights).
    Metrics add `logps/chosen`, `logps/rejected` (policy sums, batch means). `rpo_alpha`
    adds alpha times the chosen answers' NLL per token (Pang Eq. 3; metric `nll_loss`).
    """
    if rpo_alpha is not None and rpo_alpha < 0:
        raise ValueError(f"rpo_alpha must be >= 0 (or None: plain DPO), got {rpo_alpha}")
    policy = concatenated_logprobs(model, batch, pad_id=pad_id, chunk_size=chunk_size)
    if all(k in batch for k in REF_KEYS):
        ref_chosen, ref_rejected = (batch[k].float() for k in REF_KEYS)  # (B,), precomputed
    else:
        if reference is None and not _has_adapters(model):
            raise ValueError("dpo_step_loss: the model has no adapters to disable, so it cannot be its "
                             "own reference; pass reference=<a frozen copy of the base>, or precompute "
                             "the columns with minituner.dpo.with_reference_logps")
        ref = (reference_logprobs(model, batch, pad_id=pad_id, chunk_size=chunk_size) if reference is None
               else _frozen_logprobs(reference, batch, pad_id, chunk_size))
        ref_chosen, ref_rejected = ref["chosen_logps"], ref["rejected_logps"]
    pc, pr = policy["chosen_logps"], policy["rejected_logps"]
    if loss_type == "ipo":  # IPO on length-averaged log-probs: divide policy and reference alike
        nc, nr = policy["chosen_tokens"].clamp(min=1), policy["rejected_tokens"].clamp(min=1)
        pc, pr, ref_chosen, ref_rejected = pc / nc, pr / nr, ref_chosen / nc, ref_rejected / nr
    loss, metrics = dpo_loss(pc, pr, ref_chosen, ref_rejected, beta, loss_type, label_smoothing)
    if rpo_alpha is not None:  # NLL of the chosen answers, per token over the batch (Pang Eq. 3)
        nll = -policy["chosen_logps"].sum() / policy["chosen_tokens"].sum().clamp(min=1)
        loss = loss + rpo_alpha * nll
        metrics["nll_loss"] = nll.detach()
    metrics["logps/chosen"] = policy["chosen_logps"].detach().mean()
    metrics["logps/rejected"] = policy["rejected_logps"].detach().mean()
    return loss, metrics


def _has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, Injected) for m in model.modules())


@torch.no_grad()
def _frozen_logprobs(reference: nn.Module, batch, pad_id: int, chunk_size: int | None) -> dict:
    was_training = reference.training
    reference.eval()
    try:
        return concatenated_logprobs(reference, batch, pad_id=pad_id, chunk_size=chunk_size)
    finally:
        reference.train(was_training)
