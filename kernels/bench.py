"""Benchmarks: NF4 quantize/dequantize and PagedAdamW against the fastest alternatives installed.

    python -m minituner.kernels.bench [--device cpu|cuda] [--size 4096] [--repeats 5] [--threads N]

One table: for a size x size weight in float32 and bfloat16, the median time of `repeats` runs
after one warm-up (ours and the alternatives timed in turn within each round, so they share the
background load), the bytes moved per second (input read + output written), that rate as a share
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

from .nf4 import dequantize_nf4, double_quantize, quantize_nf4

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


def interleaved_ms(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median ms of each function, timed in turn within every round (one warm-up round first).

    Interleaving puts ours and the alternative under the same background load, which on a
    shared machine moves far more between rounds than between neighbouring calls.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if round_:  # round 0 is the warm-up
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def quant_rows(size: int, dtype: torch.dtype, repeats: int, device: torch.device, ceiling: float) -> list[Row]:
    """Quantize and dequantize rows for one dtype (ours, then bitsandbytes and torchao ratios)."""
    x = torch.randn(size, size, device=device).to(dtype)
    packed, absmax = quantize_nf4(x)
    fns: dict[str, Callable[[], object]] = {
        "q": lambda: quantize_nf4(x),
        "d": lambda: dequantize_nf4(packed, absmax, x.shape, dtype=dtype),
    }
    try:
        import bitsandbytes.functional as bnbF

        bp, state = bnbF.quantize_4bit(x, blocksize=64, quant_type="nf4")
        fns["bnb q"] = lambda: bnbF.quantize_4bit(x, blocksize=64, quant_type="nf4")
        fns["bnb d"] = lambda: bnbF.dequantize_4bit(bp, state)
    except ImportError:
        pass
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        t = to_nf4(x, 64, 256)
        fns["ao q"] = lambda: to_nf4(x, 64, 256)
        fns["ao d"] = lambda: t.get_original_weight()
        fns["q+dq"] = lambda: double_quantize(quantize_nf4(x)[1])  # torchao always double-quantizes
    except (ImportError, AssertionError):  # not installed, or a size its scale blocks reject
        pass
    ms = interleaved_ms(fns, repeats, device)
    moved = _nbytes(x, packed, absmax)  # read x, write codes and absmax (and the reverse)
    name = str(dtype).replace("torch.", "")
    rows: list[Row] = []
    for op, key in (("nf4 quantize", "q"), ("nf4 dequantize", "d")):
        gbs = moved / ms[key] / 1e6
        row: Row = {"op": op, "dtype": name, "ms": ms[key], "GB/s": gbs, "of copy": gbs / ceiling}
        if f"bnb {key}" in ms:
            row["bitsandbytes"] = ms[f"bnb {key}"] / ms[key]
        if f"ao {key}" in ms:
            row["torchao"] = ms[f"ao {key}"] / ms["q+dq" if key == "q" else key]
        rows.append(row)
    return rows


def adamw_rows(size: int, repeats: int, device: torch.device) -> list[Row]:
    """One optimizer step on a size x size parameter: torch AdamW, then PagedAdamW at two budgets.

    The three optimizers step in turn within each round (each on its own parameter).
    """
    from minituner.paged_adamw import PagedAdamW

    state = 2 * 4 * size * size
    page = max(16, min(1 << 19, size * size // 16))  # >= 16 pages per state: a budget of 1/4 holds 4 pages
    makers: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
        "AdamW step (torch)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01),
    }
    for label, budget in (("budget > state", 2 * state), ("budget = state/4", state // 4)):
        makers[f"PagedAdamW step, {label}"] = lambda ps, b=budget: PagedAdamW(
            ps, lr=1e-3, weight_decay=0.01, device_budget_bytes=b, page_numel=page
        )
    opts: dict[str, torch.optim.Optimizer] = {}
    for name, make in makers.items():
        p = torch.nn.Parameter(torch.randn(size, size, device=device))
        p.grad = torch.randn_like(p)
        opts[name] = make([p])
        opts[name].step()  # the first step allocates the states (and pages them all in)
    pools = {name: getattr(opt, "pool", None) for name, opt in opts.items()}
    ins_before = {name: pool.page_ins for name, pool in pools.items() if pool is not None}
    ms = interleaved_ms({name: opt.step for name, opt in opts.items()}, repeats, device)
    ref_ms = ms["AdamW step (torch)"]
    rows: list[Row] = []
    for name, pool in pools.items():
        row: Row = {"op": name, "dtype": "float32", "ms": ms[name]}
        if pool is not None:  # pages brought in per step after the first step (warm-up included)
            row["torch AdamW"] = ref_ms / ms[name]
            row["pages in/step"] = (pool.page_ins - ins_before[name]) / (repeats + 1)
        rows.append(row)
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
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.size < 8:
        parser.error("--repeats must be >= 1 and --size >= 8")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch.cuda.is_available() is False; use --device cpu")
    print(f"kernels.bench: {args.size}x{args.size} weight, median of {args.repeats} runs after warm-up, "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print("ratios = their time / ours (> 1: ours faster); torchao quantize is compared with ours + double quant")
    print(format_table(run(args.size, args.repeats, args.device)))


if __name__ == "__main__":
    main()
