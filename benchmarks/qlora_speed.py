"""QLoRA's cost in time: a 4-bit layer under LoRA against bitsandbytes + PEFT and against float.

Two tables, every alternative timed in turn within each round after a warm-up round
(kernels/bench.interleaved_ms: they share the machine's background load), medians shown:

1. One layer, forward + backward, size x size (default 4096 x 4096), --tokens rows of input
   (x requires grad, as inside a model), LoRA r=16 on top:
     ours    LoRALinear(NF4Linear) from minituner.qlora (NF4 + double quantization)
     bnb     bitsandbytes' Linear4bit (nf4, compress_statistics) + PEFT's LoRA (get_peft_model)
     float   LoRALinear(nn.Linear) in the same dtype (the overhead of 4 bits over none)
   "bnb / ours" above 1: ours is faster (target of issue 10: >= 1.0x).
2. Training tokens/s on the base model (weights/base) for QLoRA vs LoRA: the recipe's model
   (apply, classification head), a batch of the world's day stories, loss + backward + AdamW.

Numbers are as measured on this machine; nothing is asserted.

    python benchmarks/qlora_speed.py                       # CPU, torch's threads
    python benchmarks/qlora_speed.py --threads 1 --size 2048 --repeats 3
    python benchmarks/qlora_speed.py --threads 1 --clock cpu         # on a loaded machine
    python benchmarks/qlora_speed.py --device cuda --tokens 4096
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from minituner.kernels.bench import (
    bench_parser,
    format_table,
    interleaved_ms,
    parse_bench_args,
)
from torch import nn

# minituner is installed; the checkout is not put on sys.path (its kernels/ would shadow Hugging
# Face's `kernels` package, and bitsandbytes would lose its CPU 4-bit kernel)
from minituner import finetune, heads, protocol
from minituner.data import Collator
from minituner.lora import LoRAConfig, LoRALinear
from minituner.qlora import NF4Linear, QLoRAConfig
from minituner.world import CLASS_NAMES, World


def fwd_bwd(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        layer(x).sum().backward()  # dE/dX and dE/dA, dE/dB
        x.grad = None
        layer.zero_grad(set_to_none=True)
    return run


def layer_fns(size: int, tokens: int, r: int, dtype: torch.dtype, device: torch.device) -> tuple[dict, list[str]]:
    """name -> forward+backward of a size x size layer with LoRA r on top; and notes on what is missing."""
    torch.manual_seed(0)
    linear = nn.Linear(size, size, bias=False, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(tokens, size, device=device, dtype=dtype, requires_grad=True)
    cfg = LoRAConfig(r=r, alpha=2 * r)
    fns, notes = {}, []
    ours = LoRALinear(NF4Linear.from_linear(linear, compute_dtype=dtype), cfg)
    fns["ours (NF4+DQ)"] = fwd_bwd(ours, x)
    try:
        import bitsandbytes as bnb
        import peft

        q = bnb.nn.Linear4bit(size, size, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
        q.weight = bnb.nn.Params4bit(linear.weight.detach().float().cpu(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
        q = q.to(device)  # quantizes on the way

        class Wrap(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.proj = q

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.proj(x)

        model = peft.get_peft_model(Wrap(), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]))
        fns["bnb Linear4bit + PEFT"] = fwd_bwd(model, x)
    except Exception as e:  # noqa: BLE001  (not installed, or no 4-bit support here: say why)
        notes.append(f"bitsandbytes + PEFT: {type(e).__name__}: {e}"[:200])
    fns["float nn.Linear + LoRA"] = fwd_bwd(LoRALinear(linear, cfg), x)
    return fns, notes


def training_fns(batch_size: int, device: torch.device) -> tuple[dict, int]:
    """name -> one training step of the recipe's model (QLoRA or LoRA + head); real tokens of the batch."""
    fns = {}
    for name, config in (("qlora", QLoRAConfig()), ("lora", LoRAConfig())):
        model, tok = finetune.load_base()
        model = finetune.METHODS[name].apply(model, config)
        heads.add_head(model, heads.HeadConfig(num_classes=len(CLASS_NAMES)))
        model.to(device).train()
        ds = finetune.encode(World(0).classification("train", batch_size), tok, model)
        batch = {k: v.to(device) for k, v in Collator(tok.pad_id)([ds[i] for i in range(len(ds))]).items()}
        opt = torch.optim.AdamW(protocol.trainable_parameters(model), lr=1e-3)

        def step(model=model, batch=batch, opt=opt) -> None:
            loss, _ = heads.classification_loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fns[name] = step
    return fns, int(batch["attention_mask"].sum())


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__.splitlines()[0], 4096, "layer's weight", "timed rounds; the median is shown (>= 1)")
    parser.add_argument("--tokens", type=int, default=256, help="rows of the layer's input (batch x time)")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank on the layer")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="compute dtypes of the layer")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per training step (table 2)")
    parser.add_argument("--skip-training", action="store_true", help="only the layer table")
    args = parse_bench_args(parser, argv, min_size=64)
    device = torch.device(args.device)
    print(f"qlora_speed: {args.size}x{args.size} layer, {args.tokens} tokens, LoRA r={args.r}, median of "
          f"{args.repeats} rounds after warm-up, device {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    rows, notes = [], []
    for name in args.dtypes:
        dtype = getattr(torch, name)
        fns, why = layer_fns(args.size, args.tokens, args.r, dtype, device)
        notes += [n for n in why if n not in notes]
        ms = interleaved_ms(fns, args.repeats, device)
        ours = ms["ours (NF4+DQ)"]
        for label, t in ms.items():
            rows.append({"layer": label, "dtype": name, "ms": t, "x ours": t / ours})
    print(format_table(rows))
    print("x ours = its time / ours: above 1 ours is faster (bnb: target >= 1.0); "
          "float's below 1 is the overhead of dequantizing 4 bits")
    for n in notes:
        print("missing row, " + n)
    if args.skip_training:
        return
    fns, tokens = training_fns(args.batch_size, device)
    t0 = time.perf_counter()
    ms = interleaved_ms(fns, args.repeats, device)
    rows = [{"method": n, "ms/step": t, "tokens/s": tokens / t * 1e3, "x lora": ms["lora"] / t} for n, t in ms.items()]
    print(f"\ntraining on the base model, batch {args.batch_size} ({tokens} real tokens), "
          f"{time.perf_counter() - t0:.0f} s")
    print(format_table(rows))
    print("x lora = LoRA's step time / QLoRA's: below 1, QLoRA is slower (it dequantizes every layer twice a step)")


if __name__ == "__main__":
    main()
