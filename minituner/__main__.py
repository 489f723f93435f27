"""Command line: `python -m minituner [generate|pretrain|finetune] ...` (also installed as `minituner`).

    python -m minituner                          # = generate: the base model writes text
    python -m minituner --prompt "Ada lives in" --temperature 0.8 --top-k 40
    python -m minituner generate --weights DIR   # another model directory
    python -m minituner pretrain --out weights/base --seed 0   # regenerate the base model
    python -m minituner finetune --method adapters --task classify --out runs/adapters

`generate` is the default command: its options work without naming it. Every bad input
(an option out of range, a prompt longer than the context, a device that is not there, a
model directory that is missing, truncated or malformed) ends with ONE line on stderr that
names the fix, and exit status 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys

import torch

COMMANDS = ("generate", "pretrain", "finetune")
DEFAULT_PROMPTS = ("Ada lives in", "On Monday, Ben", "Let me tell you about Cora.")


class UsageError(Exception):
    """A bad input the user can fix; printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the message and where to read more)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every option's default (but not "None" or a flag's False), and keeps the
    epilog's line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


# -- argument types: reject bad values while parsing, with the allowed range -----------------------
def _number(kind: type, low: float | None = None, high: float | None = None, *,
            low_open: bool = False, name: str = "value"):
    def parse(text: str):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not math.isfinite(x) or (low is not None and (x <= low if low_open else x < low)) \
                or (high is not None and x > high):
            lo = "" if low is None else f"{low} <{'' if low_open else '='} "
            hi = "" if high is None else f" <= {high}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: need {lo}{name}{hi}")
        return x
    return parse


def _device(name: str) -> torch.device:
    """A device that exists on this machine, or a UsageError naming one that does."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device name; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: this torch build ({torch.__version__}) sees no CUDA GPU; "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here; "
                             f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError):
            raise UsageError(f"--device {name} is not available here; use --device cpu") from None
    return device


# -- generate ---------------------------------------------------------------------------------------
def _generate(args: argparse.Namespace) -> int:
    from . import checkpoint
    from .tokenizer import Tokenizer

    device = _device(args.device)
    weights = checkpoint.find_base_model(args.weights)
    try:
        tok = Tokenizer.load(weights)  # the directory: it names a missing or malformed tokenizer.json
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None
    model = checkpoint.load(weights, device=device)
    if not model.config.causal:
        raise UsageError(f"{weights} holds a {model.config.family} model, which cannot generate text; "
                         "pass --weights with a gpt2 or llama model directory")
    block = model.config.block_size
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    encoded = [tok.encode(p, add_bos=True) for p in prompts]
    for prompt, ids in zip(prompts, encoded):  # check every prompt before generating any text
        if len(ids) >= block:
            shown = prompt if len(prompt) <= 30 else prompt[:27] + "..."
            raise UsageError(f"the prompt {shown!r} is {len(ids)} tokens; the model's context "
                             f"holds {block} (prompt and new tokens together): shorten the prompt")
        if len(ids) + args.max_new_tokens > block:
            raise UsageError(f"--max-new-tokens {args.max_new_tokens} with a {len(ids)}-token prompt "
                             f"exceeds the model's context of {block} tokens: use --max-new-tokens "
                             f"{block - len(ids)} or less")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for prompt, ids in zip(prompts, encoded):
        x = torch.tensor([ids], device=device)  # (1, T)
        out = model.generate(x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, eos_token_id=tok.eos_id, generator=gen)  # (1, T + N)
        print(f"{prompt}\u2192{tok.decode(out[0, len(ids):].tolist())}")
    return 0


# -- pretrain ---------------------------------------------------------------------------------------
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


# -- finetune ---------------------------------------------------------------------------------------
def _finetune(args: argparse.Namespace) -> int:
    from .finetune import cli

    return cli(args)


# -- the parser -------------------------------------------------------------------------------------
WEIGHTS_HELP = """model directory (config.json, model.safetensors, tokenizer.json). Unset, the
base model is looked up in this order: $MINITUNER_WEIGHTS; the copy installed with the package
(minituner/weights/base); weights/base in the source checkout"""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="minituner", formatter_class=_Formatter,
                usage="minituner [generate] [options]  |  minituner pretrain [options]  |  "
                      "minituner finetune [options]",
                description="minituner: fine-tuning from scratch, in PyTorch. Without a command, "
                            "`minituner [options]` runs `generate` with those options.")
    sub = p.add_subparsers(dest="command", metavar="{generate,pretrain,finetune}")
    g = sub.add_parser("generate", prog="minituner generate", help="generate text with the base model (the default command)",
                       formatter_class=_Formatter, description="Continue prompts with a model: "
                       "greedy at temperature 0, sampled otherwise.")
    g.add_argument("--weights", default=None, metavar="DIR", help=WEIGHTS_HELP)
    g.add_argument("--prompt", action="append", metavar="TEXT",
                   help=f"a prompt (repeatable); default: {', '.join(map(repr, DEFAULT_PROMPTS))}")
    g.add_argument("--max-new-tokens", type=_number(int, 0, name="N"), default=48, metavar="N",
                   help="tokens to generate per prompt (prompt + N must fit the model's context)")
    g.add_argument("--temperature", type=_number(float, 0, name="T"), default=0.0, metavar="T",
                   help="0 = greedy; higher = more random")
    g.add_argument("--top-k", type=_number(int, 1, name="K"), default=None, metavar="K",
                   help="sample among the K most likely tokens")
    g.add_argument("--top-p", type=_number(float, 0, 1, low_open=True, name="P"), default=None, metavar="P",
                   help="sample among the most likely tokens whose probabilities sum to P")
    g.add_argument("--seed", type=int, default=0, help="random seed of the sampler")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:N or mps")
    t = sub.add_parser("pretrain", prog="minituner pretrain", help="pre-train the base model on the world's corpus (about 36 min "
                       "on 2 CPU cores)", formatter_class=_Formatter)
    t.add_argument("--out", default="weights/base", help="output directory")
    t.add_argument("--seed", type=int, default=0, help="seed of the world, the tokenizer's corpus, "
                   "the initial weights and the data order")
    t.add_argument("--n-docs", type=_number(int, 1, name="N"), default=None, metavar="N",
                   help="training documents (default: the world's corpus)")
    t.add_argument("--max-steps", type=_number(int, 1, name="N"), default=None, metavar="N",
                   help="optimizer steps (default: the recipe's)")
    t.add_argument("--batch-size", type=_number(int, 1, name="B"), default=None, metavar="B",
                   help="sequences per step (default: the recipe's)")
    t.add_argument("--lr", type=_number(float, 0, low_open=True, name="LR"), default=None,
                   help="peak learning rate (default: the recipe's)")
    t.add_argument("--checkpoint-dir", default=None, help="write resumable checkpoints here")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    from .finetune import add_arguments

    f = sub.add_parser("finetune", prog="minituner finetune", help="fine-tune the base model with one method and measure it",
                       formatter_class=_Formatter, description="The one fine-tuning recipe: apply a "
                       "method to the base model, train, evaluate before/after, measure forgetting, "
                       "memory and speed; prints the result row and writes result.json with --out.")
    add_arguments(f, _number)
    p.epilog = "the default command, generate:\n\n" + g.format_help().rstrip("\n")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["generate", *argv]  # the default command takes its options unnamed
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .data import DataError
    from .finetune import OptionError

    try:
        run = {"generate": _generate, "pretrain": _pretrain, "finetune": _finetune}[args.command]
        return run(args)
    except (UsageError, OptionError, CheckpointError, DataError, OSError) as e:  # OSError: a file we may not read or write
        print(f"minituner: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line
        return 2
    except KeyboardInterrupt:
        print("minituner: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
