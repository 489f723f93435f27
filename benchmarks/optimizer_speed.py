"""Optimizer step time: PagedAdamW against torch.optim.AdamW, on one tensor or on many.

The optimizers each step their own copy of the same parameters and gradients: torch's AdamW
(default and fused=True, the fastest AdamW torch has on the CPU), then PagedAdamW with a page
budget above the state size (every page stays resident after the first step; fused kernel and
the readable per-term update) and with a quarter of it under both eviction policies (pages move
every step). They step in turn within each round, so they share the machine's background load;
the median step time is shown, with

    AdamW/ours     the faster torch AdamW's time / PagedAdamW's: above 1 PagedAdamW is faster,
                   below 1 it is slower (0.50: a paged step takes twice as long as torch's)
    pages in/step  pages brought to the device per step after the first (0 when all fit); of the
                   state's `pages`: LRU pages in all of them, "newest" all but the budget's kept set
    max |dtheta|   the largest difference from torch AdamW's parameters after the same steps:
                   the paged optimizer must take the same steps, so this stays ~1e-7

Two tables: one size x size parameter, and the same number of elements split into `--tensors`
parameters (a small model's many weights: per-tensor overheads show there).

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
PAGED = {  # label -> (budget as a share of the state, PagedAdamW keyword arguments)
    "PagedAdamW, budget > state": (2.0, {}),
    "PagedAdamW, budget > state, per-term": (2.0, {"fused": False}),
    "PagedAdamW, budget = state/4, lru": (0.25, {"policy": "lru"}),
    "PagedAdamW, budget = state/4, newest": (0.25, {"policy": "newest"}),
}


def make_optimizers(size: int, device: torch.device, tensors: int = 1) -> dict[str, torch.optim.Optimizer]:
    """torch AdamW and the PagedAdamW variants, each on its own copy of the same parameters + gradients:
    `tensors` parameters of size * size // tensors elements each."""
    numel = size * size // tensors
    state = 2 * 4 * numel * tensors  # m and v in float32
    page = max(16, min(1 << 19, numel * tensors // 16))  # >= 16 pages per state: a quarter holds 4 pages
    makers: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
        TORCH: lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01),
        FUSED: lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True),
    }
    for label, (share, kwargs) in PAGED.items():
        makers[label] = lambda ps, b=int(share * state), kw=kwargs: PagedAdamW(
            ps, lr=1e-3, weight_decay=0.01, device_budget_bytes=b, page_numel=page, **kw
        )
    g = torch.Generator().manual_seed(0)
    theta = [torch.randn(numel, generator=g) for _ in range(tensors)]
    grad = [torch.randn(numel, generator=g) for _ in range(tensors)]
    opts = {}
    for name, make in makers.items():
        ps = [torch.nn.Parameter(t.to(device, copy=True)) for t in theta]
        for p, gr in zip(ps, grad):
            p.grad = gr.to(device, copy=True)
        opts[name] = make(ps)
    return opts


def run(size: int = 2048, repeats: int = 5, device: str | torch.device = "cpu", tensors: int = 1) -> list[Row]:
    """One row per optimizer: median step time, ratio to torch AdamW, pages moved, parameter difference."""
    device = torch.device(device)
    opts = make_optimizers(size, device, tensors)
    for opt in opts.values():
        opt.step()  # the first step allocates the states (and pages them all in)
    pools = {name: getattr(opt, "pool", None) for name, opt in opts.items()}
    ins_before = {name: pool.page_ins for name, pool in pools.items() if pool is not None}
    ms = interleaved_ms({name: opt.step for name, opt in opts.items()}, repeats, device)
    theta = {name: opt.param_groups[0]["params"] for name, opt in opts.items()}
    rows: list[Row] = []
    for name, pool in pools.items():
        row: Row = {"op": name, "ms": ms[name]}
        if pool is not None:
            row["AdamW/ours"] = min(ms[TORCH], ms[FUSED]) / ms[name]  # against torch's fastest
            row["pages"] = pool.num_pages
            row["pages in/step"] = (pool.page_ins - ins_before[name]) / (repeats + 1)  # warm-up round included
            row["max |dtheta|"] = max((a - b).abs().max().item() for a, b in zip(theta[name], theta[TORCH]))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__.splitlines()[0], 2048, "parameter", "timed steps per optimizer; the median is shown")
    parser.add_argument("--tensors", type=int, default=50, help="the second table splits the elements into this many parameters")
    args = parse_bench_args(parser, argv, min_size=4)
    if not 1 <= args.tensors <= args.size * args.size // 16:
        parser.error("--tensors must be >= 1 and leave >= 16 elements per tensor")
    for tensors in (1, args.tensors):
        numel = args.size * args.size // tensors
        print(f"optimizer_speed: {tensors} parameter(s) of {numel} elements, median of {args.repeats} steps after "
              f"warm-up, device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
        print(format_table(run(args.size, args.repeats, args.device, tensors)))
    print("AdamW/ours = the faster torch AdamW's step time (fused or not) / PagedAdamW's: above 1 PagedAdamW is faster, below 1 slower")


if __name__ == "__main__":
    main()
