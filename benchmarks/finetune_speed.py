"""Training throughput of each fine-tuning method, relative to full fine-tuning on the base model.

Every method trains the base model of weights/base (or --base) on the same batches of the
world's classification task (real day stories, right-padded), with the recipe's own pieces:
`finetune.METHODS[m].apply`, `heads.add_head` / `heads.ClassificationHead`,
`heads.classification_loss`, AdamW over the trainable parameters. Methods take turns inside
each round (the order alternates), so machine load hits them alike; the median over rounds
gives each method's tokens/s, and the table prints it divided by full fine-tuning's.

Definitions (tokens are real tokens, not padding):

  full, adapters   one training step = forward, cross-entropy, backward, AdamW step on a
                   batch of B examples; tokens/s = real tokens of the batch / step time.
  head             feature extraction (Chapter 03) trains in two phases, and both count:
                   the frozen encoder runs ONCE per example (no-grad forwards in batches of
                   64, sorted by length, `heads.extract_features`, over --extract-batches
                   batches), then the head takes its steps on the cached
                   features for E epochs, E = the recipe's default steps x batch size / the
                   task's default training-set size (600 x 64 / 6000 = 6.4 epochs). Per
                   example that costs t_extract + E * t_head_step_per_example and credits
                   E x (the example's tokens), the same accounting as `Result.tokens_per_s`:

      tokens/s(head) = E * tokens / (t_extract(batch) + E * t_head_step(batch))

Targets of issue 8: adapters >= 1.5x full fine-tuning's tokens/s, head >= 20x.

    python benchmarks/finetune_speed.py                       # CPU, all threads
    python benchmarks/finetune_speed.py --threads 1 --rounds 9
    python benchmarks/finetune_speed.py --device cuda --batch-size 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minituner import finetune, heads, protocol  # noqa: E402
from minituner.adapters import AdapterConfig  # noqa: E402
from minituner.data import Collator  # noqa: E402
from minituner.world import CLASS_NAMES, World  # noqa: E402

TARGETS = {"adapters": 1.5, "head": 20.0}  # x full fine-tuning's tokens/s (issue 8)


def synced(device: torch.device, fn: Callable[[], None], clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds `fn` takes, with the device's queue drained before and after (a benchmark may
    sync the host; a training step may not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = clock()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - t0


def trainer(model: torch.nn.Module, batch: dict, lr: float) -> Callable[[], None]:
    """One training step of `model` (with a head) on `batch`: forward, loss, backward, AdamW."""
    opt = torch.optim.AdamW(protocol.trainable_parameters(model), lr=lr)
    model.train()

    def step() -> None:
        loss, _ = heads.classification_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def build(args: argparse.Namespace, device: torch.device, batch: dict, feature_batch: list) -> dict:
    """name -> (trainable %, {phase: step function}) for full, adapters and head."""
    K = len(CLASS_NAMES)
    out = {}
    for name, config in (("full", finetune.FullConfig()),
                         ("adapters", AdapterConfig(placement=args.placement,
                                                    reduction_factor=args.reduction_factor))):
        model, _ = finetune.load_base(args.base)
        model = finetune.METHODS[name].apply(model, config)
        heads.add_head(model, heads.HeadConfig(num_classes=K, pooling=args.pooling))
        model.to(device)
        trainable, total = protocol.count_parameters(model)
        out[name] = (100 * trainable / total, {"step": trainer(model, batch, finetune.METHODS[name].lr)})

    encoder, tok = finetune.load_base(args.base)
    encoder = heads.apply_head(encoder, heads.HeadConfig(num_classes=K, pooling=args.pooling)).to(device)
    trainable, total = protocol.count_parameters(encoder)
    head_opt = torch.optim.AdamW(encoder.head.parameters(), lr=finetune.METHODS["head"].lr)
    hb = finetune.METHODS["head"].batch_size
    feats = torch.randn(hb, encoder.config.n_embd, device=device)  # (B, C): a head step's cost ignores the values
    labels = torch.arange(hb, device=device) % K  # (B,)

    def extract() -> None:  # the encoder over --extract-batches batches of `hb` examples, as the recipe runs it
        heads.extract_features(encoder, feature_batch, args.pooling, batch_size=hb, pad_id=tok.pad_id,
                               progress=False)

    def head_step() -> None:
        loss, _ = heads.feature_loss(encoder.head, {"features": feats, "labels": labels})
        loss.backward()
        head_opt.step()
        head_opt.zero_grad(set_to_none=True)

    out["head"] = (100 * trainable / total, {"extract": extract, "head_step": head_step})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", default=None, help="base model directory; None: weights/base")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); None: torch's choice")
    p.add_argument("--batch-size", type=int, default=finetune.METHODS["full"].batch_size,
                   help="examples per step of full fine-tuning and adapters (the recipe's default)")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--placement", default="houlsby", choices=["houlsby", "pfeiffer"], help="adapters")
    p.add_argument("--reduction-factor", type=int, default=16, help="adapters: m = d / this")
    p.add_argument("--pooling", default="last", choices=list(heads.POOLINGS), help="the head's pooling")
    p.add_argument("--extract-batches", type=int, default=8,
                   help="extraction batches timed per round: extract_features sorts examples by length "
                        "across them, as it does over a whole training set")
    p.add_argument("--n-train", type=int, default=None,
                   help="training-set size that sets the head's epochs; None: the task's (6000)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall time, or this process's CPU time (steadier on a shared CPU machine, with --threads 1)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device; use --device cpu")
    if args.clock == "cpu" and device.type == "cuda":
        raise SystemExit("--clock cpu times the host only; use --clock wall with --device cuda")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    base, tok = finetune.load_base(args.base)
    world = World(0)
    n_train = args.n_train or len(world.classification("train"))
    head = finetune.METHODS["head"]
    epochs = head.steps * head.batch_size / n_train  # E: the recipe's default passes over the data
    examples = world.classification("train", max(args.batch_size, head.batch_size * args.extract_batches))
    ds = finetune.encode(examples, tok, base)
    batch = {k: v.to(device) for k, v in Collator(tok.pad_id)([ds[i] for i in range(args.batch_size)]).items()}
    feature_batch = [ds[i] for i in range(head.batch_size * args.extract_batches)]  # batched by length
    tokens = int(batch["attention_mask"].sum())  # real tokens of a full/adapters batch
    head_tokens = sum(len(x["input_ids"]) for x in feature_batch)  # real tokens of an extraction batch

    methods = build(args, device, batch, feature_batch)
    times: dict[str, dict[str, list[float]]] = {n: {ph: [] for ph in fns} for n, (_, fns) in methods.items()}
    for r in range(args.warmup + args.rounds):
        order = list(methods) if r % 2 == 0 else list(methods)[::-1]  # alternate who goes first
        for name in order:
            for phase, fn in methods[name][1].items():
                dt = synced(device, fn, clock)
                if r >= args.warmup:
                    times[name][phase].append(dt)

    def rate(name: str, i: int | None = None) -> float:
        pick = (lambda ts: statistics.median(ts)) if i is None else (lambda ts: ts[i])
        t = {ph: pick(ts) for ph, ts in times[name].items()}
        if name == "head":  # extraction once per example, E epochs of head steps (see the docstring)
            return epochs * head_tokens / (t["extract"] + epochs * args.extract_batches * t["head_step"])
        return tokens / t["step"]

    tps = {n: rate(n) for n in methods}
    paired = {n: statistics.median(rate(n, i) / rate("full", i) for i in range(args.rounds)) for n in methods}
    n_params = sum(q.numel() for q in base.parameters())
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} base={n_params / 1e6:.2f} M "
          f"params; batch {args.batch_size} ({tokens} real tokens), adapters {args.placement} "
          f"r={args.reduction_factor}, head: extraction of {len(feature_batch)} examples in batches of {head.batch_size} ({head_tokens} tokens) + "
          f"{epochs:.1f} epochs of head steps; {args.rounds} rounds after {args.warmup} warm-up, median, {args.clock} clock")
    print(f"{'method':>9} {'trainable %':>11} {'ms (median)':>24} {'tokens/s':>10} {'x full':>7} "
          f"{'x full, paired':>14} {'target':>7}")
    for name, (pct, _) in methods.items():
        ms = ", ".join(f"{ph} {statistics.median(ts) * 1e3:.1f}" for ph, ts in times[name].items())
        target = f">= {TARGETS[name]:g}x" if name in TARGETS else ""
        print(f"{name:>9} {pct:11.2f} {ms:>24} {tps[name]:10.0f} {tps[name] / tps['full']:6.2f}x "
              f"{paired[name]:13.2f}x {target:>7}")
    print("x full: ratio of median tokens/s; paired: median of per-round ratios (steadier on a shared machine)")


if __name__ == "__main__":
    main()
