"""Fidelity of LoRA on the course's base model (weights/base): slow, and still run in CI.

Two claims from the papers, checked on the world's day stories through the one recipe
(`finetune.finetune`, 2,000 training stories, 600 test stories, mean pooling, seed 0, 600
steps each at the recipe's learning rate: full 3e-4, LoRA 1e-3; full fine-tuning's default of
900 steps would take half as long again in CI):

- Hu et al. 2021 (arXiv:2106.09685, Table 4): LoRA reaches full fine-tuning's accuracy while
  training a small fraction of the parameters. Here: r=8, alpha=16 on the four attention
  projections, 1.8 % of the base model (2 % at most, the classification head included),
  within 3 points of full fine-tuning.
- Biderman et al. 2024 (arXiv:2405.09673, "LoRA learns less and forgets less"): the base model's
  held-out perplexity on the world's corpus rises less under LoRA than under full fine-tuning;
  and with the adapter disabled it is the base model's, exactly.

Measured one run per row, each `finetune.finetune("full", **FIDELITY)` or
`finetune.finetune("lora", config=LoRAConfig(...), lr=..., **FIDELITY)` with the row's steps
and seed, in its own process with OMP_NUM_THREADS=1 on the shared 2-core machine (held-out
perplexity of the base: 1.943; LoRA r=8 on q/k/v/o, 1.83 %, lr 1e-3 unless said):

    steps  seed  setting                        full acc  LoRA acc  ppl after: full / LoRA
    300    0     alpha 16 (the old fixture)       0.845     0.783          6.90 /  5.07
    300    0     alpha 16, lr 3e-3                0.845     0.798          6.90 / 16.32
    300    0     alpha 32                         0.845     0.800          6.90 /  6.66
    300    0     alpha 32, lr 1.5e-3              0.845     0.797          6.90 /  7.08
    300    0     rsLoRA alpha 16 (scale 5.66)     0.845     0.823          6.90 /  6.01
    300    1     rsLoRA alpha 16 (scale 5.66)     0.835     0.790          7.59 /  9.21
    300    0     rsLoRA alpha 24 (scale 8.49)     0.845     0.817          6.90 /  8.29
    300    0     rsLoRA alpha 32 (scale 11.3)     0.845     0.795          6.90 /  9.27
    300    0     r=5 on q/k/v/o + MLP fc (1.85 %) 0.845     0.753          6.90 /  3.78
    600    0     alpha 16 (this fixture)          0.838     0.877          12.31 /  6.88
    600    1     alpha 16                         0.867     0.838          16.31 / 11.65
    600    0     alpha 32                         0.838     0.842          12.31 / 15.11
    600    0     rsLoRA alpha 16                  0.838     0.860          12.31 / 13.05
    600    1     rsLoRA alpha 16                  0.867     0.860          16.31 / 14.06

At 300 steps LoRA had not converged (training loss 0.49 in the last quarter, full's 0.37):
only rsLoRA at seed 0 met both targets, and not at seed 1. At 600 steps for both, LoRA at
the recipe's own settings meets both at seeds 0 and 1: full fine-tuning starts to overfit and
forget (perplexity 6.90 -> 12.31), LoRA catches up. 600 test stories give a standard error of
about 1.5 points on each accuracy. The search was one change at a time; no bug was found in
the LoRA run (trainable: A, B of the 16 projections and the head, at the run's lr; scale
alpha / r applied; dropout off; pooled over real tokens, padding-invariant to 1e-6; accuracy
in eval mode with the adapter on).
"""

from __future__ import annotations

import pytest

from minituner import finetune
from minituner.lora import LoRAConfig

FIDELITY = dict(n_train=2000, n_test=600, steps=600, pooling="mean", progress=False, measure_forgetting=True)
LORA = LoRAConfig(r=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))


@pytest.fixture(scope="module")
def full_and_lora():
    """Full fine-tuning (lr 3e-4) and LoRA (lr 1e-3), the recipe's rates, 600 steps each."""
    # lr 1e-3 (the recipe's): at 300 steps and 3e-3 LoRA gained 1.5 points but forgot MORE than
    # full fine-tuning (perplexity 16.32 vs 6.90); more steps for both serve LoRA better.
    return finetune.finetune("full", **FIDELITY), finetune.finetune("lora", config=LORA, lr=1e-3, **FIDELITY)


@pytest.mark.slow
def test_lora_trains_at_most_two_percent_of_the_parameters(full_and_lora):
    """r (d_in + d_out) per projection: 4 layers x 4 x 8 x (256 + 256) = 65,536 LoRA parameters,
    plus the head's 256 x 3 + 3 = 771, of 3.6 M: 1.83 %."""
    full, lora = full_and_lora
    assert lora.trainable == 4 * 4 * 8 * (256 + 256) + 256 * 3 + 3
    assert lora.trainable <= 0.02 * lora.total, f"{lora.trainable_pct:.2f} %"
    assert full.trainable_pct == 100.0
    msg = f"full {full.after:.3f}, lora {lora.after:.3f}, majority {full.majority:.3f}"
    assert lora.after >= full.majority + 0.20, msg  # it learned the task (measured 0.877 vs 0.333)


@pytest.mark.slow
def test_lora_reaches_full_fine_tuning_within_three_points(full_and_lora):
    """Hu et al.: LoRA matches full fine-tuning. Target: within 3 points with 1.8 % trained.
    Measured at 600 steps: full 0.838, LoRA 0.877 (seed 1: 0.867 and 0.838, 2.8 points behind).
    At 300 steps it was not met: full 0.845, LoRA 0.783 (the table in the module docstring)."""
    full, lora = full_and_lora
    assert lora.after >= full.after - 0.03, f"full {full.after:.3f}, lora {lora.after:.3f}"


@pytest.mark.slow
def test_lora_forgets_less_than_full_fine_tuning(full_and_lora):
    """Biderman et al.: LoRA forgets less. Measured at 600 steps: perplexity rise full +10.37
    (1.943 -> 12.31), LoRA +4.93 (-> 6.877); disabled, exactly the base's 1.943 (seed 1: full
    -> 16.31, LoRA -> 11.65). This claim depends on the size of LoRA's steps: at 600 steps
    alpha 32 rose to 15.11, above full's 12.31 (the module docstring)."""
    full, lora = full_and_lora
    f, lo = full.forgetting, lora.forgetting
    rise_full = f["perplexity_after"] - f["perplexity_before"]
    rise_lora = lo["perplexity_after"] - lo["perplexity_before"]
    msg = f"perplexity rise: full {rise_full:+.3f}, lora {rise_lora:+.3f} (base {f['perplexity_before']:.3f})"
    assert rise_full > 0, msg  # full fine-tuning forgets something: the comparison means something
    assert rise_lora < rise_full, msg
    assert lo["perplexity_disabled"] == pytest.approx(lo["perplexity_before"], rel=1e-5), msg
