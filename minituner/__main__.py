"""Command line: `python -m minituner [generate|pretrain] ...` (also installed as `minituner`).

    python -m minituner                      # = generate: the bundled base model writes text
    python -m minituner generate --prompt "Ada lives in" --temperature 0.8 --top-k 40
    python -m minituner pretrain --out weights/base --seed 0   # regenerate the base model
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

import torch

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "base"


def _generate(args: argparse.Namespace) -> int:
    from . import checkpoint
    from .tokenizer import Tokenizer

    weights = Path(args.weights)
    if not (weights / "config.json").is_file():
        print(f"error: no base model in {weights} (config.json missing). Regenerate it with "
              f"`python -m minituner pretrain --out {weights}`, or pass --weights DIR.", file=sys.stderr)
        return 2
    model = checkpoint.load(weights, device=args.device)
    tok = Tokenizer.load(weights / "tokenizer.json")
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    for prompt in args.prompt:
        ids = torch.tensor([tok.encode(prompt, add_bos=True)], device=args.device)
        out = model.generate(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, eos_token_id=tok.eos_id, generator=gen)
        print(f"{prompt}\u2192{tok.decode(out[0, ids.shape[1]:].tolist())}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from .pretrain import PretrainConfig, pretrain

    base = PretrainConfig()
    train_cfg = base.train
    overrides = {k: v for k, v in (("max_steps", args.max_steps), ("batch_size", args.batch_size),
                                   ("lr", args.lr)) if v is not None}
    if overrides:
        train_cfg = dataclasses.replace(train_cfg, **overrides)
    config = dataclasses.replace(base, seed=args.seed, n_docs=args.n_docs, train=train_cfg)
    command = "python -m minituner " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    m = pretrain(args.out, config, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                 progress=not args.quiet, command=command)
    h = m["held_out"]
    print(f"wrote {args.out}: held-out perplexity {h['perplexity']:.3f} (unigram {h['unigram_perplexity']:.1f}), "
          f"fact recall {m['fact_recall']['mean']:.3f}, instruction EM "
          f"{m['instruction_exact_match']['exact_match']:.3f}, {m['train_seconds'] / 60:.1f} min training")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minituner", description="minituner: fine-tuning from scratch, in PyTorch.")
    sub = p.add_subparsers(dest="command")
    g = sub.add_parser("generate", help="generate text with the base model (the default command)")
    g.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="model directory (default: weights/base)")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t = sub.add_parser("pretrain", help="pre-train the base model on the world's corpus")
    t.add_argument("--out", default="weights/base", help="output directory (default: weights/base)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--n-docs", type=int, default=None, help="training documents (default: the world's corpus)")
    t.add_argument("--max-steps", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--checkpoint-dir", default=None, help="write resumable checkpoints here")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:  # the bundled default: generate
        args = build_parser().parse_args(["generate", *(argv or [])])
    if args.command == "generate":
        args.prompt = args.prompt or ["Ada lives in", "On Monday, Ben", "Let me tell you about Cora."]
        return _generate(args)
    return _pretrain(args)


if __name__ == "__main__":
    raise SystemExit(main())
