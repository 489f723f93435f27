"""Fidelity of LoRA on the course's base model (weights/base): slow, and still run in CI.

Two claims from the papers, checked on the world's day stories through the one recipe
(`finetune.finetune`, 2,000 training stories, 600 test stories, mean pooling, seed 0, 300
steps each at the recipe's learning rate (LoRA's is 1e-3); full fine-tuning's default of 900
steps would take three times as long in CI):

- Hu et al. 2021 (arXiv:2106.09685, Table 4): LoRA reaches full fine-tuning's accuracy while
  training a small fraction of the parameters. Here: r=8 on the four attention projections,
  1.8 % of the base model (2 % at most, the classification head included), within 3 points of
  full fine-tuning.
- Biderman et al. 2024 (arXiv:2405.09673, "LoRA learns less and forgets less"): the base model's
  held-out perplexity on the world's corpus rises less under LoRA than under full fine-tuning;
  and with the adapter disabled it is the base model's, exactly.

Measured (OMP_NUM_THREADS=1 on the shared machine, 300 steps): full fine-tuning 0.845, held-out
perplexity 1.943 -> 6.903; LoRA r=8 at lr 1e-3 0.783, perplexity 1.943 -> 5.066
(disabled: 1.943); LoRA at lr 3e-3: 0.798 but perplexity 1.943 -> 16.32, so a higher learning
rate buys accuracy with forgetting. The 3-point target is NOT met at this budget (6.2 points
at 1e-3, 4.7 at 3e-3): that test is a strict xfail with these numbers, not loosened
(when the target holds, the xfail fails and must be removed).
"""

from __future__ import annotations

import pytest

from minituner import finetune
from minituner.lora import LoRAConfig

FIDELITY = dict(n_train=2000, n_test=600, steps=300, pooling="mean", progress=False, measure_forgetting=True)
LORA = LoRAConfig(r=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))


@pytest.fixture(scope="module")
def full_and_lora():
    """Full fine-tuning (the recipe's lr) and LoRA (lr 1e-3), 300 steps each."""
    # lr 1e-3 (the recipe's): at 3e-3 LoRA is 1.5 points more accurate but forgets MORE than full
    # fine-tuning (perplexity 16.32 vs 6.90), so the Biderman claim holds at 1e-3 only.
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
    assert lora.after >= full.majority + 0.20, msg  # it learned the task (measured 0.783 vs 0.333)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="not met at 300 steps: full 0.845, LoRA r=8 0.783 at lr 1e-3 (0.798 at "
                   "3e-3); needs a longer budget or a better recipe, not yet measured")
def test_lora_reaches_full_fine_tuning_within_three_points(full_and_lora):
    """Hu et al.: LoRA matches full fine-tuning. Target: within 3 points with 1.8 % trained.
    Measured at 300 steps: full 0.845, LoRA 0.783 (lr 1e-3), 0.798 (lr 3e-3)."""
    full, lora = full_and_lora
    assert lora.after >= full.after - 0.03, f"full {full.after:.3f}, lora {lora.after:.3f}"


@pytest.mark.slow
def test_lora_forgets_less_than_full_fine_tuning(full_and_lora):
    """Biderman et al.: LoRA forgets less. Measured at 300 steps: perplexity rise full +4.960
    (1.943 -> 6.903), LoRA r=8 at lr 1e-3 +3.123 (-> 5.066); disabled, exactly the base's 1.943.
    (At lr 3e-3 LoRA rose to 16.32: this claim depends on the learning rate.)"""
    full, lora = full_and_lora
    f, lo = full.forgetting, lora.forgetting
    rise_full = f["perplexity_after"] - f["perplexity_before"]
    rise_lora = lo["perplexity_after"] - lo["perplexity_before"]
    msg = f"perplexity rise: full {rise_full:+.3f}, lora {rise_lora:+.3f} (base {f['perplexity_before']:.3f})"
    assert rise_full > 0, msg  # full fine-tuning forgets something: the comparison means something
    assert rise_lora < rise_full, msg
    assert lo["perplexity_disabled"] == pytest.approx(lo["perplexity_before"], rel=1e-5), msg
