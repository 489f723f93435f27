"""Full fine-tuning, the ULMFiT way (Howard & Ruder 2018, arXiv:1801.06146).

Every parameter trains, with a classification head on the pooled hidden state. ULMFiT adds
two options that protect what pre-training learned in the lower layers:

- discriminative fine-tuning (Eq. 2): each layer group l gets its own learning rate,
      theta_t^l = theta_{t-1}^l - eta^l * grad_{theta^l} J(theta),   eta^{l-1} = eta^l / 2.6,
  so the top (the head) moves fastest and the embeddings slowest;
- gradual unfreezing (Sec. 3.3): first only the top group trains, then one more group below
  it joins at each stage, until every layer trains.

    group:   [embeddings]  [block 0]  ...  [block L-1]  [final norm, head]
    rate:    eta / 2.6^(L+1)  ...         eta / 2.6       eta
    stage 1:                                               trains
    stage 2:                                  trains       trains      ...

The recipe (`minituner.finetune`) runs the stages; this file holds the pieces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from . import protocol


@dataclass(frozen=True)
class FullConfig:
    """Full fine-tuning: every parameter trains (Howard & Ruder 2018)."""

    lr_decay: float | None = None  # discriminative rates, Eq. 2: eta^{l-1} = eta^l / lr_decay (2.6)
    gradual_unfreezing: bool = False  # Sec. 3.3: unfreeze one layer group per stage, top first

    def __post_init__(self) -> None:
        if self.lr_decay is not None and not self.lr_decay >= 1.0:
            raise ValueError(f"lr_decay={self.lr_decay} must be >= 1 (ULMFiT uses 2.6) or None")


def apply_full(model: nn.Module, config: FullConfig | None = None) -> nn.Module:
    """Make every parameter trainable (the whole model is the 'adapter')."""
    for p in model.parameters():
        p.requires_grad_(True)
    protocol.mark_applied(model, "full", config or FullConfig())
    return model


def layer_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """Parameters bottom-up: [embeddings], block 0, ..., block L-1, [final norm, head].

    A tied lm_head is the embedding; parameters outside these groups join the top group."""
    seen: set[int] = set()

    def take(modules) -> list[nn.Parameter]:
        out = []
        for m in modules:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    emb = take(getattr(model, n) for n in ("tok_emb", "pos_emb", "type_emb", "emb_norm") if hasattr(model, n))
    blocks = [take([b]) for b in model.blocks]
    top = take(m for m in model.children())  # norm_f, lm_head, head, anything else
    return [emb, *blocks, top]


def discriminative_param_groups(model: nn.Module, lr: float, lr_decay: float,
                                weight_decay: float = 0.0) -> list[dict]:
    """ULMFiT Eq. 2: the top group at `lr`, each group below at the rate above / lr_decay."""
    groups = layer_groups(model)
    out = []
    for depth, params in enumerate(reversed(groups)):  # depth 0 = top
        params = [p for p in params if p.requires_grad]
        if params:
            out.append({"params": params, "lr": lr / lr_decay ** depth,  # eta^{l-1} = eta^l / 2.6
                        "weight_decay": weight_decay, "name": f"group{len(groups) - 1 - depth}"})
    return out


def unfreeze_top(model: nn.Module, k: int) -> None:
    """Gradual unfreezing, stage k (Sec. 3.3): only the top k layer groups train."""
    groups = layer_groups(model)
    for i, params in enumerate(groups):
        for p in params:
            p.requires_grad_(i >= len(groups) - k)
