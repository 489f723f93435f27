"""Benchmarks: NF4 quantize/dequantize and PagedAdamW against the fastest alternatives installed.

    python -m kernels.bench [--device cpu|cuda] [--size 4096] [--repeats 5]

One table: for a size x size weight in float32 and bfloat16, the median time of `repeats` runs
after one warm-up, the bytes moved per second (input read + output written), that rate as a share
of the machine's copy bandwidth (a same-size tensor copy measured in this run, the ceiling for a
memory-bound op), and the same operation by bitsandbytes and torchao when installed, as the ratio
their time / ours (> 1: ours is faster). torchao's NF4 always double-quantizes its scales, so its
rows include that work. Then one PagedAdamW step against torch.optim.AdamW's on a size x size
parameter, with the page budget above the state size (every page stays resident) and below it
(a quarter of the state: pages move every step). Numbers are as measured; nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from kernels.nf4 import dequantize_nf4, double_quantize, quantize_nf4

Row = dict[str, object]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time in milliseconds of `repeats` calls after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth(size: int, repeats: int, device: torch.device) -> float:
    """GB/s of dst.copy_(src) for a size x size float32 tensor (bytes read + bytes written)."""
    src = torch.randn(size, size, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), repeats, device)
    return 2 * src.numel() * 4 / ms / 1e6


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def quant_rows(size: int, dtype: torch.dtype, repeats: int, device: torch.device, ceiling: float) -> list[Row]:
    """Quantize and dequantize rows for one dtype (ours, then bitsandbytes and torchao ratios)."""
    x = torch.randn(size, size, device=device).to(dtype)
    packed, absmax = quantize_nf4(x)
    q_ms = median_ms(lambda: quantize_nf4(x), repeats, device)
    d_ms = median_ms(lambda: dequantize_nf4(packed, absmax, x.shape, dtype=dtype), repeats, device)
    moved = _nbytes(x, packed, absmax)  # read x, write codes and absmax (and the reverse)
    name = str(dtype).replace("torch.", "")
    rows: list[Row] = []
    for op, ms in (("nf4 quantize", q_ms), ("nf4 dequantize", d_ms)):
        gbs = moved / ms / 1e6
        rows.append({"op": op, "dtype": name, "ms": ms, "GB/s": gbs, "of copy": gbs / ceiling})
    try:
        import bitsandbytes.functional as bnbF

        bq = median_ms(lambda: bnbF.quantize_4bit(x, blocksize=64, quant_type="nf4"), repeats, device)
        bp, state = bnbF.quantize_4bit(x, blocksize=64, quant_type="nf4")
        bd = median_ms(lambda: bnbF.dequantize_4bit(bp, state), repeats, device)
        rows[0]["bitsandbytes"], rows[1]["bitsandbytes"] = bq / q_ms, bd / d_ms
    except ImportError:
        pass
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        tq = median_ms(lambda: to_nf4(x, 64, 256), repeats, device)
        t = to_nf4(x, 64, 256)
        td = median_ms(lambda: t.get_original_weight(), repeats, device)
        ours_dq = median_ms(lambda: double_quantize(quantize_nf4(x)[1]), repeats, device)
        rows[0]["torchao"], rows[1]["torchao"] = tq / ours_dq, td / d_ms
    except (ImportError, AssertionError):  # not installed, or a size its scale blocks reject
        pass
    return rows


def adamw_rows(size: int, repeats: int, device: torch.device) -> list[Row]:
    """One optimizer step on a size x size parameter: torch AdamW, then PagedAdamW at two budgets."""
    from minituner.paged_adamw import PagedAdamW

    def timed(make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]) -> tuple[float, float]:
        """(median step ms, pages brought in per step after the first step)."""
        p = torch.nn.Parameter(torch.randn(size, size, device=device))
        p.grad = torch.randn_like(p)
        opt = make([p])
        opt.step()  # the first step allocates the states (and pages them all in)
        pool = getattr(opt, "pool", None)
        ins = pool.page_ins if pool is not None else 0
        ms = median_ms(opt.step, repeats, device)
        return ms, ((pool.page_ins - ins) / (repeats + 1) if pool is not None else 0.0)

    ref_ms, _ = timed(lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01))
    state = 2 * 4 * size * size
    page = max(16, min(1 << 19, size * size // 16))  # >= 16 pages per state: a budget of 1/4 holds 4 pages
    rows: list[Row] = [{"op": "AdamW step (torch)", "dtype": "float32", "ms": ref_ms}]
    for label, budget in (("budget > state", 2 * state), ("budget = state/4", state // 4)):
        ms, ins = timed(lambda ps, b=budget: PagedAdamW(ps, lr=1e-3, weight_decay=0.01, device_budget_bytes=b, page_numel=page))
        rows.append({
            "op": f"PagedAdamW step, {label}", "dtype": "float32", "ms": ms,
            "torch AdamW": ref_ms / ms, "pages in/step": ins,
        })  # fmt: skip
    return rows


def run(size: int = 4096, repeats: int = 5, device: str | torch.device = "cpu") -> list[Row]:
    """All rows of the table (the copy ceiling first)."""
    device = torch.device(device)
    ceiling = copy_bandwidth(size, repeats, device)
    rows: list[Row] = [{"op": "copy (ceiling)", "dtype": "float32", "GB/s": ceiling, "of copy": 1.0}]
    for dtype in (torch.float32, torch.bfloat16):
        rows += quant_rows(size, dtype, repeats, device, ceiling)
    return rows + adamw_rows(size, repeats, device)


def format_table(rows: list[Row]) -> str:
    cols = ["op", "dtype", "ms", "GB/s", "of copy", "bitsandbytes", "torchao", "torch AdamW", "pages in/step"]
    cols = [c for c in cols if any(c in r for r in rows)]

    def cell(v: object) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.2f}"
        return str(v)

    table = [cols] + [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    lines = ["  ".join(s.ljust(w) for s, w in zip(line, widths)) for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", type=int, default=4096, help="the weight is size x size (default 4096)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per op; the median is shown (>= 1)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.size < 8:
        parser.error("--repeats must be >= 1 and --size >= 8")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch.cuda.is_available() is False; use --device cpu")
    print(f"kernels.bench: {args.size}x{args.size} weight, median of {args.repeats} runs after warm-up, "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print("ratios = their time / ours (> 1: ours faster); torchao quantize is compared with ours + double quant")
    print(format_table(run(args.size, args.repeats, args.device)))


if __name__ == "__main__":
    main()
