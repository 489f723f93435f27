"""Benchmark: NF4 quantize/dequantize against the fastest alternatives installed.

    python -m minituner.kernels.bench [--device cpu|cuda] [--size 4096] [--repeats 5] [--threads N]

One table: for a size x size weight in float32 and bfloat16, the median time of `repeats` runs
after one warm-up (ours and the alternatives timed in turn within each round, so they share the
background load), the bytes moved per second (input read + output written), that rate as a share
of the machine's copy bandwidth (a same-size tensor copy measured in this run, the ceiling for a
memory-bound op), and the same operation by bitsandbytes and torchao when installed, as the ratio
their time / ours: above 1 ours is faster (2.00: theirs takes twice as long), below 1 theirs is.
A column that is missing says why under the table (e.g. "torchao: not installed"). torchao's NF4
always double-quantizes its scales, so its quantize ratio is against ours + double_quantize.
Numbers are as measured; nothing is asserted. The paged optimizer has its own benchmark,
benchmarks/optimizer_speed.py (kernels/ never imports minituner's modules).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from .nf4 import dequantize_nf4, double_quantize, quantize_nf4

Row = dict[str, object]
RATIO_LEGEND = "bitsandbytes, torchao = their time / ours: above 1 ours is faster (2.00: theirs takes twice as long)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = _CLOCKS["wall"]  # --clock: "cpu" counts this process's CPU seconds, not the waits


def interleaved_ms(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median ms of each function, timed in turn within every round (one warm-up round first).

    Interleaving puts ours and the alternative under the same background load, which on a
    shared machine moves far more between rounds than between neighbouring calls. With
    `--clock cpu --threads 1` the time is this process's CPU time, which other processes on a
    loaded machine barely change (they still share the caches and the memory bandwidth).
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            _sync(device)
            start = _clock()
            fn()
            _sync(device)
            if round_:  # round 0 is the warm-up
                times[name].append((_clock() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def copy_bandwidth(size: int, repeats: int, device: torch.device) -> float:
    """GB/s of dst.copy_(src) for a size x size float32 tensor (bytes read + bytes written)."""
    src = torch.randn(size, size, device=device)
    dst = torch.empty_like(src)
    ms = interleaved_ms({"copy": lambda: dst.copy_(src)}, repeats, device)["copy"]
    return 2 * src.numel() * 4 / ms / 1e6


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def quant_fns(x: torch.Tensor) -> tuple[dict[str, Callable[[], object]], list[str]]:
    """The functions timed for one weight: ours ("q", "d") and each alternative that runs here,
    plus one line per alternative that does not, saying why (its column stays empty)."""
    packed, absmax = quantize_nf4(x)
    fns: dict[str, Callable[[], object]] = {
        "q": lambda: quantize_nf4(x),
        "d": lambda: dequantize_nf4(packed, absmax, x.shape, dtype=x.dtype),
    }
    notes = []
    try:
        import bitsandbytes.functional as bnbF
    except ImportError:
        notes.append("bitsandbytes: not installed (pip install bitsandbytes)")
    else:
        bp, state = bnbF.quantize_4bit(x, blocksize=64, quant_type="nf4")
        fns["bnb q"] = lambda: bnbF.quantize_4bit(x, blocksize=64, quant_type="nf4")
        fns["bnb d"] = lambda: bnbF.dequantize_4bit(bp, state)
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError:
        notes.append("torchao: not installed (pip install torchao)")
    else:
        try:
            t = to_nf4(x, 64, 256)
        except AssertionError as e:  # its scale blocks reject some sizes
            notes.append(f"torchao: to_nf4 rejects a {tuple(x.shape)} weight ({e or 'AssertionError'})")
        else:
            fns["ao q"] = lambda: to_nf4(x, 64, 256)
            fns["ao d"] = lambda: t.get_original_weight()
            fns["q+dq"] = lambda: double_quantize(quantize_nf4(x)[1])  # torchao always double-quantizes
    return fns, notes


def quant_rows(
    size: int, dtype: torch.dtype, repeats: int, device: torch.device, ceiling: float
) -> tuple[list[Row], list[str]]:
    """Quantize and dequantize rows for one dtype (ours, then bitsandbytes and torchao ratios)."""
    x = torch.randn(size, size, device=device).to(dtype)
    fns, notes = quant_fns(x)
    ms = interleaved_ms(fns, repeats, device)
    packed, absmax = quantize_nf4(x)
    moved = nbytes(x, packed, absmax)  # read x, write codes and absmax (and the reverse)
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
    return rows, notes


def run(size: int = 4096, repeats: int = 5, device: str | torch.device = "cpu") -> tuple[list[Row], list[str]]:
    """All rows of the table (the copy ceiling first) and the notes on missing columns."""
    device = torch.device(device)
    ceiling = copy_bandwidth(size, repeats, device)
    rows: list[Row] = [{"op": "copy (ceiling)", "dtype": "float32", "GB/s": ceiling, "of copy": 1.0}]
    notes: list[str] = []
    for dtype in (torch.float32, torch.bfloat16):
        more, why = quant_rows(size, dtype, repeats, device, ceiling)
        rows += more
        notes += [n for n in why if n not in notes]
    return rows, notes


def format_table(rows: list[Row], cols: list[str] | None = None) -> str:
    """Rows as aligned text columns; `cols` (default: every key, in first-seen order) are shown."""
    if cols is None:
        cols = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v: object) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.2f}" if v == 0 or abs(v) >= 0.01 else f"{v:.1e}"  # small values keep a digit
        return str(v)

    table = [cols] + [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    lines = ["  ".join(s.ljust(w) for s, w in zip(line, widths)) for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def bench_parser(description: str, size: int, what: str, repeats_help: str) -> argparse.ArgumentParser:
    """The options every speed benchmark shares (--device, --size, --repeats, --threads)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                        help="where to run (cuda when there is one)")
    parser.add_argument("--size", type=int, default=size, help=f"the {what} is size x size")
    parser.add_argument("--repeats", type=int, default=5, help=repeats_help)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads; None keeps torch's choice")
    parser.add_argument("--clock", default="wall", choices=sorted(_CLOCKS),
                        help="wall: elapsed time; cpu: this process's CPU time (steadier on a loaded machine "
                             "with --threads 1; counts every thread's time, spinning included)")
    return parser


def parse_bench_args(parser: argparse.ArgumentParser, argv: list[str] | None, min_size: int) -> argparse.Namespace:
    """Parse, check the shared options (one-line errors) and apply --threads."""
    global _clock
    args = parser.parse_args(argv)
    _clock = _CLOCKS[args.clock]
    if args.clock == "cpu" and args.device == "cuda":
        parser.error("--clock cpu measures the host, not the GPU: use the wall clock with --device cuda")
    if args.repeats < 1 or args.size < min_size:
        parser.error(f"--repeats must be >= 1 and --size >= {min_size}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch.cuda.is_available() is False; use --device cpu")
    return args


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__.splitlines()[0], 4096, "weight", "timed runs per op; the median is shown (>= 1)")
    args = parse_bench_args(parser, argv, min_size=8)
    print(f"kernels.bench: {args.size}x{args.size} weight, median of {args.repeats} runs after warm-up, "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    rows, notes = run(args.size, args.repeats, args.device)
    cols = ["op", "dtype", "ms", "GB/s", "of copy", "bitsandbytes", "torchao"]
    print(format_table(rows, [c for c in cols if any(c in r for r in rows)]))
    print(RATIO_LEGEND + "; torchao quantize is compared with ours + double quantization")
    for note in notes:
        print("missing column, " + note)


if __name__ == "__main__":
    main()
