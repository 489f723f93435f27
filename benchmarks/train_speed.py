"""Training throughput: minituner's Transformer against the same-size GPT-2 from transformers.

Both models are built from the same hyper-parameters with random weights (nothing is
downloaded), dropout 0, and trained on the same random batch (B x T tokens, default 8 x 256)
with the same step: forward, next-token cross-entropy on the logits, backward, AdamW step.
Steps alternate between the two models (ours, theirs, ours, ...) so that machine load hits
both alike; after warm-up, the median time per step gives tokens/s, and the ratio
ours / transformers is printed (>= 1.0x means ours is at least as fast), both as a ratio of
medians and as the median of per-round ratios (more robust on a shared machine).

    python benchmarks/train_speed.py                      # CPU, ~10 M parameters
    python benchmarks/train_speed.py --device cuda --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minituner.model import ModelConfig, Transformer  # noqa: E402


def build(args: argparse.Namespace, device: torch.device) -> dict[str, torch.nn.Module]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    ours = Transformer(ModelConfig(family="gpt2", vocab_size=args.vocab, block_size=args.seq, n_layer=args.n_layer,
                                   n_head=args.n_head, n_embd=args.n_embd, dropout=0.0))
    hf_cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.n_embd, n_layer=args.n_layer,
                        n_head=args.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                        bos_token_id=args.vocab - 1, eos_token_id=args.vocab - 1)
    hf_cfg._attn_implementation = args.hf_attn
    theirs = GPT2LMHeadModel(hf_cfg)
    return {"minituner": ours.to(device), "transformers": theirs.to(device)}


def logits_of(name: str, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids) if name == "minituner" else model(input_ids=ids, use_cache=False).logits  # (B, T, V)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--n-embd", type=int, default=320)
    p.add_argument("--steps", type=int, default=9, help="timed steps per model (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"], help="transformers' attention")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = build(args, device)
    n_params = {k: sum(q.numel() for q in m.parameters()) for k, m in models.items()}
    if len(set(n_params.values())) != 1:
        raise SystemExit(f"the two models differ in size: {n_params}")
    if not 5e6 <= n_params["minituner"] <= 20e6:
        print(f"note: {n_params['minituner'] / 1e6:.1f} M parameters is outside the 5-20 M range of the issue")
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
          f"params={n_params['minituner'] / 1e6:.2f} M (both) batch={args.batch}x{args.seq} "
          f"layers={args.n_layer} heads={args.n_head} C={args.n_embd} V={args.vocab} "
          f"steps={args.steps} (after {args.warmup} warm-up), transformers attention={args.hf_attn}")
    tps = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        tps[name] = tokens / med
        print(f"{name:>13}: median {med * 1e3:8.1f} ms/step  {tps[name]:10.0f} tokens/s  "
              f"(min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f} ms)")
    # each round times both models back to back, so a per-round ratio sees the same machine load
    paired = statistics.median(t / o for o, t in zip(times["minituner"], times["transformers"]))
    print(f"ratio minituner / transformers: {tps['minituner'] / tps['transformers']:.3f}x "
          f"(ratio of medians); {paired:.3f}x (median of per-round ratios)")


if __name__ == "__main__":
    main()
