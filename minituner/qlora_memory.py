"""Where fine-tuning memory goes, in bytes per parameter: full, LoRA, QLoRA (Chapter 07).

Paper: Dettmers et al. 2023, "QLoRA" (arXiv:2305.14314): 16-bit full fine-tuning of a 65B
model needs > 780 GB of GPU memory; QLoRA fine-tunes it in < 48 GB (abstract, section 1).
780 GB is 12 bytes per parameter x 65e9: 16-bit weights and gradients, 32-bit Adam m and v.

A model of N weights: Q of them in the linear layers QLoRA quantizes, O = N - Q others
(embeddings, norms, biases, a kept lm_head), and L LoRA parameters added on top. Activations
are not counted (they depend on batch and length, and gradient checkpointing cuts them).

    method                  weights                      gradients   optimizer (AdamW m, v)
    full, fp32 AdamW        4 N                          4 N         8 N
    LoRA, bf16 base         2 N + 2 L                    2 L         4 L   (torch keeps m, v in the bf16 dtype)
    QLoRA, NF4 + DQ         4.127/8 Q + c O + 4 L        4 L         8 L   (PagedAdamW: fp32 m, v, paged)

c = bytes of the compute dtype (4 for float32 on a CPU, 2 for the paper's bf16); 4.127 bits =
4 + 8/64 + 32/(64*256) per quantized weight (kernels/nf4.bits_per_parameter). `measure` takes
one training step of each method on a model and reads protocol.memory_bytes; `formula` gives
the same bytes from the counts alone, so `table` can put the measurement beside the formula and
extrapolate it to LLaMA-7B and -65B shapes. `peak_rss` runs one step of LoRA or QLoRA (both in bf16,
with AdamW) in a fresh process and reports its peak resident memory, which backs the accounting
on a CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from minituner import protocol
from minituner.lora import LoRAConfig, apply_lora
from minituner.paged_adamw import PagedAdamW
from minituner.qlora import NF4Linear, QLoRAConfig, apply_qlora, load_quantized

NF4_DQ_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4.127 bits per quantized weight
METHODS = ("full", "lora", "qlora")
PAPER_GB = {65e9: {"full": 780.0, "qlora": 48.0}}  # > 780 GB (16-bit full), < 48 GB (QLoRA)


@dataclass(frozen=True)
class Counts:
    quantized: int  # Q: weights of the linear layers QLoRA quantizes
    other: int  # O: every other parameter (embeddings, norms, biases, kept lm_head)
    lora: int  # L: LoRA's A and B

    @property
    def total(self) -> int:
        return self.quantized + self.other


def counts(model: nn.Module, config: QLoRAConfig | None = None) -> Counts:
    """Q, O, L of a float model under `config` (default QLoRAConfig(); measured on a quantized copy)."""
    import copy

    m = apply_qlora(copy.deepcopy(model), config)
    q = sum(x.quantized_numel for x in m.modules() if isinstance(x, NF4Linear))
    lora = sum(p.numel() for p in protocol.trainable_parameters(m))
    return Counts(q, protocol.count_parameters(m)[1] - q - lora, lora)


def llama_counts(n_embd: int, n_layer: int, intermediate: int, vocab: int = 32000, r: int = 64,
                 all_linear: bool = True) -> Counts:
    """Q, O, L of a LLaMA (untied embeddings and lm_head kept in float, RMSNorm weights),
    LoRA of rank r on every linear layer (the paper's setting) or on q, v only."""
    C, I = n_embd, intermediate
    q = n_layer * (4 * C * C + 3 * C * I)
    other = 2 * vocab * C + (2 * n_layer + 1) * C
    per_layer = 4 * r * 2 * C + 3 * r * (C + I) if all_linear else 2 * r * 2 * C
    return Counts(q, other, n_layer * per_layer)


LLAMA = {7e9: llama_counts(4096, 32, 11008), 65e9: llama_counts(8192, 80, 22016)}


def formula(c: Counts, compute_bytes: int = 4) -> dict[str, dict[str, float]]:
    """Bytes of weights, gradients, optimizer states per method (the module docstring's table)."""
    N, Q, O, L = c.total, c.quantized, c.other, c.lora
    return {
        "full": {"weights": 4 * N, "gradients": 4 * N, "optimizer": 8 * N},
        "lora": {"weights": 2 * N + 2 * L, "gradients": 2 * L, "optimizer": 4 * L},
        "qlora": {"weights": NF4_DQ_BITS / 8 * Q + compute_bytes * O + 4 * L, "gradients": 4 * L,
                  "optimizer": 8 * L},
    }


def _step(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    """One training step on a stand-in loss (the sum of squares of the outputs)."""
    model(ids).float().square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(model_factory, config: QLoRAConfig | None = None, seq_len: int = 16) -> dict[str, dict]:
    """protocol.memory_bytes after one step of each method on a fresh model from `model_factory`
    (a float32 Transformer): full (AdamW), LoRA on the model cast to bf16 (AdamW), QLoRA (PagedAdamW)."""
    config = config or QLoRAConfig()
    lora_cfg = config.lora_config()
    out = {}
    for method in METHODS:
        model = model_factory()
        if method == "full":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        elif method == "lora":
            apply_lora(model.to(torch.bfloat16), lora_cfg)
            opt = torch.optim.AdamW(protocol.trainable_parameters(model), lr=1e-5)
        else:
            apply_qlora(model, config)
            opt = PagedAdamW(protocol.trainable_parameters(model), lr=1e-5)
        ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
        _step(model, opt, ids)
        out[method] = protocol.memory_bytes(model, opt)
    return out


def table(measured: dict[str, dict], c: Counts, compute_bytes: int = 4) -> list[dict]:
    """Rows: per method, measured bytes per base weight beside the formula's, and the formula at
    LLaMA-7B and -65B shapes (LoRA r=64 on every linear layer, QLoRA's float parts in bf16), in GB
    of weights + gradients + optimizer, beside the paper's 65B figures (its "full" is 16-bit)."""
    rows = []
    here = formula(c, compute_bytes)
    big = {n: formula(cn, 2) for n, cn in LLAMA.items()}
    for method in METHODS:
        m, f = measured[method], here[method]
        row = {"method": method}
        for k in ("weights", "gradients", "optimizer"):
            row[f"{k} B/param"] = m[k] / c.total  # per weight of the base model (LoRA's extra excluded)
            row[f"{k} formula"] = f[k] / c.total
        for n, fn in big.items():
            row[f"{n / 1e9:.0f}B GB"] = sum(fn[method].values()) / 1e9
        row["paper 65B GB"] = PAPER_GB[65e9].get(method)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- peak resident memory
def _peak_mib() -> float:
    """This process's peak resident memory, MiB: VmHWM (Linux; getrusage's ru_maxrss would carry
    the parent's peak across fork + exec), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_child(method: str, directory: str, batch: int, seq_len: int) -> dict:
    """In this (fresh) process: load the model, one LoRA or QLoRA step; peak RSS in MiB."""
    from minituner import checkpoint

    start = _peak_mib()  # torch imported: the floor
    if method == "qlora":  # NF4 codes straight from the file: no float weight ever exists
        model = load_quantized(Path(directory) / "qlora")
        apply_lora(model, LoRAConfig(), types=(NF4Linear,))  # A, B in the layers' compute dtype (bf16)
    else:
        model = checkpoint.load(Path(directory) / "bf16")
        apply_lora(model, LoRAConfig())
    opt = torch.optim.AdamW(protocol.trainable_parameters(model), lr=1e-5)  # both: the same small state
    loaded = _peak_mib()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len))
    _step(model, opt, ids)
    peak = _peak_mib()
    return {"method": method, "start_MiB": start, "loaded_MiB": loaded, "peak_MiB": peak}


def prepare_rss(model: nn.Module, directory: str | Path) -> Path:
    """Write `model` as a bf16 checkpoint and as NF4 + DQ with bf16 compute (its other tensors in
    bf16 too), for `peak_rss`: both steps then compute in bf16 and differ in the base weights only."""
    from minituner import checkpoint
    from minituner.qlora import quantize_model, save_quantized

    d = Path(directory)
    checkpoint.save(model.to(torch.bfloat16), d / "bf16")
    save_quantized(quantize_model(model, compute_dtype=torch.bfloat16), d / "qlora")
    return d


def peak_rss(method: str, directory: str | Path, batch: int = 4, seq_len: int = 64) -> dict:
    """Peak resident memory of one `method` step ("lora" or "qlora") in a fresh Python process."""
    d = Path(directory).resolve()
    cmd = [sys.executable, "-m", "minituner.qlora_memory", method, str(d), str(batch), str(seq_len)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=d)  # not the checkout's cwd
    if done.returncode:
        raise RuntimeError(f"peak_rss child failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":  # the child of peak_rss
    p = argparse.ArgumentParser(description="one LoRA/QLoRA step; prints its peak RSS as JSON")
    p.add_argument("method", choices=("lora", "qlora"))
    p.add_argument("directory")
    p.add_argument("batch", type=int)
    p.add_argument("seq_len", type=int)
    a = p.parse_args()
    print(json.dumps(_rss_child(a.method, a.directory, a.batch, a.seq_len)))
