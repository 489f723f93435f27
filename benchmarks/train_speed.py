"""Training throughput: minituner's Transformer and training loop, against transformers' GPT-2.

Both models are built from the same hyper-parameters with random weights (nothing is
downloaded), dropout 0, and trained on the same random batch (B x T tokens, default 8 x 256)
with the same step: forward, next-token cross-entropy on the logits, backward, AdamW step.
Steps alternate between the two models (ours, theirs, ours, ...) so that machine load hits
both alike; after warm-up, the median time per step gives tokens/s, and the ratio
ours / transformers is printed (>= 1.0x means ours is at least as fast), both as a ratio of
medians and as the median of per-round ratios (more robust on a shared machine).

    python benchmarks/train_speed.py                      # CPU, ~10 M parameters
    python benchmarks/train_speed.py --device cuda --steps 20
    python benchmarks/train_speed.py --models minituner   # just our model, no transformers

`--mode loop` times the whole loop, `minituner.train.train` (batching, warmup+cosine,
gradient accumulation, clipping, the NaN guard, history), not a bare step: steps/s of
`train(model, data, TrainConfig(max_steps=--steps, ...))` per round, median over rounds.
With `--baseline DIR` it also times DIR/minituner/train.py (e.g. a `git worktree` of an
older commit) in alternating rounds and prints ours / baseline. On a shared CPU machine,
`--clock cpu` (this process's CPU time, with `--threads 1`) is much steadier than wall time:

    git worktree add /tmp/old HEAD
    python benchmarks/train_speed.py --mode loop --baseline /tmp/old --clock cpu --threads 1 \
        --n-layer 2 --n-embd 128 --n-head 4 --seq 64 --vocab 512 --accum 2 --steps 10 --rounds 9
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minituner.model import ModelConfig, Transformer  # noqa: E402


def ours(args: argparse.Namespace) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(family="gpt2", vocab_size=args.vocab, block_size=args.seq, n_layer=args.n_layer,
                                   n_head=args.n_head, n_embd=args.n_embd, dropout=0.0))


def build(args: argparse.Namespace, device: torch.device) -> dict[str, torch.nn.Module]:
    models = {"minituner": ours(args).to(device)}
    if "transformers" not in args.models:
        return models
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.n_embd, n_layer=args.n_layer,
                        n_head=args.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                        bos_token_id=args.vocab - 1, eos_token_id=args.vocab - 1)
    hf_cfg._attn_implementation = args.hf_attn
    models["transformers"] = GPT2LMHeadModel(hf_cfg).to(device)
    return models


def logits_of(name: str, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids) if name == "minituner" else model(input_ids=ids, use_cache=False).logits  # (B, T, V)


def load_train_module(checkout: Path):
    """`minituner/train.py` of another checkout, imported under its own name."""
    path = checkout / "minituner" / "train.py"
    if not path.is_file():
        raise SystemExit(f"--baseline {checkout}: no {path}")
    spec = importlib.util.spec_from_file_location("baseline_train", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def time_loop(args: argparse.Namespace, device: torch.device) -> None:
    """Steps/s of the whole training loop; ours and a baseline's in alternating rounds."""
    from minituner import train as ours_train

    loops = {"minituner": ours_train}
    if args.baseline:
        loops["baseline"] = load_train_module(Path(args.baseline).resolve())
    model0 = ours(args).to(device)
    models = {k: copy.deepcopy(model0) for k in loops}
    g = torch.Generator().manual_seed(0)
    n = args.batch * args.accum * args.steps
    data = {"input_ids": torch.randint(0, args.vocab, (n, args.seq), generator=g)}  # (N, T)

    def run(name: str) -> float:
        mod = loops[name]
        cfg = mod.TrainConfig(max_steps=args.steps, batch_size=args.batch, grad_accum_steps=args.accum,
                              lr=1e-4, grad_clip=1.0, progress=False, log_every=args.log_every, seed=0)
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        mod.train(models[name], data, cfg)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return args.steps / (clock() - t0)

    rates: dict[str, list[float]] = {k: [] for k in loops}
    for i in range(args.warmup + args.rounds):
        for name in (list(loops) if i % 2 == 0 else list(loops)[::-1]):  # alternate who goes first
            r = run(name)
            if i >= args.warmup:
                rates[name].append(r)
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"params={sum(p.numel() for p in model0.parameters()) / 1e6:.2f} M batch={args.batch}x{args.seq} "
          f"accum={args.accum} log_every={args.log_every} clock={args.clock}; {args.rounds} rounds of train(max_steps={args.steps})")
    for name, rs in rates.items():
        where = f" ({args.baseline})" if name == "baseline" else ""
        print(f"{name:>10}{where}: median {statistics.median(rs):8.2f} steps/s  "
              f"(min {min(rs):.2f}, max {max(rs):.2f})")
    if args.baseline:
        paired = statistics.median(o / b for o, b in zip(rates["minituner"], rates["baseline"]))
        print(f"ratio minituner / baseline steps/s: {paired:.3f}x (median of per-round ratios)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", default="step", choices=["step", "loop"],
                   help="step: one bare training step per model; loop: the whole minituner.train.train loop")
    p.add_argument("--models", default="minituner,transformers",
                   help="step mode: comma-separated models to time (minituner, transformers)")
    p.add_argument("--baseline", default=None, help="loop mode: a checkout whose minituner/train.py to time too")
    p.add_argument("--batch", type=int, default=8, help="sequences per (micro-)batch")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size V")
    p.add_argument("--n-layer", type=int, default=6, help="transformer blocks")
    p.add_argument("--n-head", type=int, default=8, help="attention heads H")
    p.add_argument("--n-embd", type=int, default=320, help="channels C")
    p.add_argument("--steps", type=int, default=9,
                   help="step mode: timed steps per model (median reported); loop mode: optimizer steps per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (step mode) or rounds (loop mode) first")
    p.add_argument("--rounds", type=int, default=5, help="loop mode: timed rounds per loop (median reported)")
    p.add_argument("--accum", type=int, default=1, help="loop mode: gradient accumulation micro-batches")
    p.add_argument("--log-every", type=int, default=1, help="loop mode: TrainConfig.log_every")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="loop mode: wall time, or this process's CPU time (steadier on a shared CPU machine)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"], help="transformers' attention")
    args = p.parse_args()
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not set(args.models) <= {"minituner", "transformers"} or "minituner" not in args.models:
        raise SystemExit(f"--models {args.models}: choose minituner, optionally with transformers")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.mode == "loop":
        return time_loop(args, device)
    models = build(args, device)
    n_params = {k: sum(q.numel() for q in m.parameters()) for k, m in models.items()}
    if len(set(n_params.values())) != 1:
        raise SystemExit(f"the two models differ in size: {n_params}")
    if not 5e6 <= n_params["minituner"] <= 20e6:
        print(f"note: {n_params['minituner'] / 1e6:.1f} M parameters is outside the 5-20 M range this comparison is meant for (a small GPT-2)")
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)  # (B, T)
    tokens = args.batch * args.seq

    def step(name: str) -> float:
        model, opt = models[name], opts[name]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = logits_of(name, model, ids)  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, args.vocab), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(args.warmup + args.steps):
        order = list(models) if i % 2 == 0 else list(models)[::-1]  # alternate who goes first
        for name in order:
            dt = step(name)
            if i >= args.warmup:
                times[name].append(dt)

    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"params={n_params['minituner'] / 1e6:.2f} M ({', '.join(models)}) batch={args.batch}x{args.seq} "
          f"layers={args.n_layer} heads={args.n_head} C={args.n_embd} V={args.vocab} "
          f"steps={args.steps} (after {args.warmup} warm-up), transformers attention={args.hf_attn}")
    tps = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        tps[name] = tokens / med
        print(f"{name:>13}: median {med * 1e3:8.1f} ms/step  {tps[name]:10.0f} tokens/s  "
              f"(min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f} ms)")
    if "transformers" not in times:
        return
    # each round times both models back to back, so a per-round ratio sees the same machine load
    paired = statistics.median(t / o for o, t in zip(times["minituner"], times["transformers"]))
    print(f"ratio minituner / transformers: {tps['minituner'] / tps['transformers']:.3f}x "
          f"(ratio of medians); {paired:.3f}x (median of per-round ratios)")


if __name__ == "__main__":
    main()
