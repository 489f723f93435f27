"""Optimizer step time: PagedAdamW against torch.optim.AdamW on one size x size parameter.

Three optimizers, each on its own copy of the same parameter and gradient: torch's AdamW, then
PagedAdamW with a page budget above the state size (every page stays resident after the first
step) and with a quarter of it (pages move every step). They step in turn within each round, so
they share the machine's background load; the median step time is shown, with

    AdamW/ours     torch AdamW's time / PagedAdamW's: above 1 PagedAdamW is faster, below 1 it is
                   slower (0.50: a paged step takes twice as long as torch's)
    pages in/step  pages brought to the device per step after the first (0 when all fit)
    max |dtheta|   the largest difference from torch AdamW's parameter after the same steps:
                   the paged optimizer must take the same steps, so this stays ~1e-7

    python benchmarks/optimizer_speed.py                     # CPU, 2048 x 2048
    python benchmarks/optimizer_speed.py --device cuda --size 8192

Numbers are as measured; nothing is asserted.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from minituner.kernels.bench import bench_parser, format_table, interleaved_ms, parse_bench_args
from minituner.paged_adamw import PagedAdamW

Row = dict[str, object]
TORCH = "AdamW step (torch)"
FUSED = "AdamW step (torch, fused)"  # the fastest AdamW torch has on the CPU


def make_optimizers(size: int, device: torch.device) -> dict[str, torch.optim.Optimizer]:
    """torch AdamW and PagedAdamW at two budgets, each on its own copy of one parameter + gradient."""
    state = 2 * 4 * size * size  # m and v in float32
    page = max(16, min(1 << 19, size * size // 16))  # >= 16 pages per state: a budget of 1/4 holds 4 pages
    makers: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
        TORCH: lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01),
        FUSED: lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True),
    }
    for label, budget in (("budget > state", 2 * state), ("budget = state/4", state // 4)):
        makers[f"PagedAdamW step, {label}"] = lambda ps, b=budget: PagedAdamW(
            ps, lr=1e-3, weight_decay=0.01, device_budget_bytes=b, page_numel=page
        )
    g = torch.Generator().manual_seed(0)
    theta, grad = torch.randn(size, size, generator=g), torch.randn(size, size, generator=g)
    opts = {}
    for name, make in makers.items():
        p = torch.nn.Parameter(theta.to(device, copy=True))
        p.grad = grad.to(device, copy=True)
        opts[name] = make([p])
    return opts


def run(size: int = 2048, repeats: int = 5, device: str | torch.device = "cpu") -> list[Row]:
    """One row per optimizer: median step time, ratio to torch AdamW, pages moved, parameter difference."""
    device = torch.device(device)
    opts = make_optimizers(size, device)
    for opt in opts.values():
        opt.step()  # the first step allocates the states (and pages them all in)
    pools = {name: getattr(opt, "pool", None) for name, opt in opts.items()}
    ins_before = {name: pool.page_ins for name, pool in pools.items() if pool is not None}
    ms = interleaved_ms({name: opt.step for name, opt in opts.items()}, repeats, device)
    theta = {name: opt.param_groups[0]["params"][0] for name, opt in opts.items()}
    rows: list[Row] = []
    for name, pool in pools.items():
        row: Row = {"op": name, "ms": ms[name]}
        if pool is not None:
            row["AdamW/ours"] = min(ms[TORCH], ms[FUSED]) / ms[name]  # against torch's fastest
            row["pages in/step"] = (pool.page_ins - ins_before[name]) / (repeats + 1)  # warm-up round included
            row["max |dtheta|"] = (theta[name] - theta[TORCH]).abs().max().item()
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__.splitlines()[0], 2048, "parameter", "timed steps per optimizer; the median is shown")
    args = parse_bench_args(parser, argv, min_size=4)
    print(f"optimizer_speed: {args.size}x{args.size} parameter, median of {args.repeats} steps after warm-up, "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print(format_table(run(args.size, args.repeats, args.device)))
    print("AdamW/ours = the faster torch AdamW's step time (fused or not) / PagedAdamW's: above 1 PagedAdamW is faster, below 1 slower")


if __name__ == "__main__":
    main()
