"""Training and inference throughput of each fine-tuning method, side by side in one run.

Four suites (`--suite`, all by default); in each, the contenders take turns inside every
round (the order alternates), so machine load hits them alike; the median over rounds gives
each one's rate, and the table prints the ratios (median rates, and the median of per-round
ratios, steadier on a shared machine). Tokens are real tokens, never padding.

methods   training tokens/s of every method of the recipe relative to full fine-tuning, on
          the base model of weights/base (or --base) and the same batch of the world's day
          stories, with the recipe's pieces: `finetune.METHODS[m].apply`, a classification
          head, `heads.classification_loss`, the recipe's gradient clipping
          (`TrainConfig.grad_clip`, by global norm) and AdamW over the trainable parameters.
          One step = forward, cross-entropy, backward, clip, AdamW step on B examples.
          The head (feature extraction, Chapter 03) trains in two phases and both count: the
          frozen encoder runs ONCE per example (`heads.extract_features`: no-grad forwards in
          batches of 64 sorted by length, over --extract-batches batches), then the head
          takes E epochs of steps on the cached features, E = the recipe's default steps x
          batch size / the training-set size (600 x 64 / 6000 = 6.4):

              tokens/s(head) = E * tokens / (t_extract + E * t_head_steps)

          Targets (issue 8): adapters >= 1.5x full fine-tuning, head >= 20x. "adapters" is
          Houlsby's placement (two per layer, the recipe's default); "adapters-pfeiffer" has
          one per layer, after the MLP, so backward stops below layer 0's MLP as well.
peft      LoRA ours vs Hugging Face transformers + PEFT on the same model, batch and LoRA
          config: training tokens/s of the causal LM loss (forward, cross-entropy over the
          real tokens, backward, clip, AdamW), target >= 1.2x (issue 9); and inference with
          the LoRA merged into the weights (`lora.merge_and_unload`, as deployed) vs the base
          model without LoRA, target >= 0.98x.
          The Hugging Face model is ours written by `checkpoint.save_hf` and loaded by
          `transformers` (the same weights; its logits equal ours). Two models: the base
          (GPT-2 family; PEFT adapts the fused c_attn, ours q_proj, k_proj, v_proj, both at
          rank r) and a Llama-family model of the same size (random weights; both adapt
          q_proj and v_proj, the same LoRA exactly).
sft       instruction tuning (Chapter 08): tokens/s of LoRA SFT on packed rows
          (`sft.sft_dataset(..., packing=True)`: several examples per row, block-diagonal
          attention) vs the same examples right-padded one per row.
dpo       DPO training steps/s (Chapter 09): ours (`dpo.dpo_step_loss`: chosen and rejected
          in one forward, the reference as the LoRA's base under `disable_adapters`) vs
          TRL's `DPOTrainer` (its own `training_step`: forward, loss, backward; our clip and
          AdamW step after both) on the same tiny model, pairs, batch and LoRA config,
          target >= 1.5x (issue 11).

    python benchmarks/finetune_speed.py                              # CPU, all suites
    python benchmarks/finetune_speed.py --suite methods --threads 1 --rounds 9 --clock cpu
    python benchmarks/finetune_speed.py --device cuda --batch-size 64
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import torch

# minituner is installed (pip install -e .); the checkout is NOT put on sys.path, because its
# top-level kernels/ would shadow Hugging Face's `kernels` package that bitsandbytes imports
from minituner import checkpoint, finetune, heads, protocol, train
from minituner.adapters import AdapterConfig
from minituner.data import IGNORE_INDEX, Collator
from minituner.lora import LoRAConfig, apply_lora, merge_and_unload
from minituner.model import Transformer
from minituner.world import CLASS_NAMES, World

SUITES = ("methods", "peft", "sft", "dpo")
TARGETS = {"adapters": 1.5, "head": 20.0, "lora train": 1.2, "merged": 0.98, "dpo": 1.5}
GRAD_CLIP = train.TrainConfig().grad_clip  # the recipe clips by global norm
INFER_REPEATS = 3  # forwards per timed inference call


# -- timing ----------------------------------------------------------------------------------------
def synced(device: torch.device, fn: Callable[[], object], clock: Callable[[], float]) -> float:
    """Seconds `fn` takes, with the device's queue drained before and after (a benchmark may
    sync the host; a training step may not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = clock()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - t0


def interleaved(fns: dict[str, Callable[[], object]], args: argparse.Namespace,
                device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each function over --rounds rounds after --warmup, taking turns
    within a round and alternating who goes first."""
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(args.warmup + args.rounds):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for name in order:
            dt = synced(device, fns[name], clock)
            if r >= args.warmup:
                times[name].append(dt)
    return times


def ratios(work: dict[str, float], times: dict[str, list[float]], against: str) -> dict[str, tuple[float, float, float]]:
    """name -> (rate, x against (ratio of medians), x against paired (median of per-round ratios))
    for rates = work[name] / seconds."""
    rate = {n: work[n] / statistics.median(ts) for n, ts in times.items()}
    out = {}
    for n, ts in times.items():
        paired = statistics.median((work[n] / t) / (work[against] / t0) for t, t0 in zip(ts, times[against]))
        out[n] = (rate[n], rate[n] / rate[against], paired)
    return out


def print_table(title: str, rows: list[tuple], header: tuple) -> None:
    print(f"\n{title}")
    cells = [header] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def target(name: str) -> str:
    return f">= {TARGETS[name]:g}x" if name in TARGETS else ""


# -- a training step -------------------------------------------------------------------------------
def trainer(model: torch.nn.Module, batch: dict | list[dict], lr: float, loss_fn: Callable) -> Callable[[], None]:
    """Training steps of `model` as the recipe takes them: loss, backward, clip by global norm,
    AdamW; one step on `batch`, or one on each batch of a list."""
    params = list(protocol.trainable_parameters(model))
    opt = torch.optim.AdamW(params, lr=lr)
    batches = batch if isinstance(batch, list) else [batch]
    model.train()

    def step() -> None:
        for b in batches:
            out = loss_fn(model, b)
            loss = out[0] if isinstance(out, tuple) else out
            loss.backward()
            train._scale_and_clip_([p.grad for p in params if p.grad is not None], None, GRAD_CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def world_batch(tok, model, n: int, device: torch.device, offset: int = 0) -> tuple[dict, list]:
    """The first n day stories after `offset`, encoded as the recipe does, right-padded."""
    examples = World(0).classification("train", offset + n)[offset:]
    ds = finetune.encode(examples, tok, model)
    items = [ds[i] for i in range(len(ds))]
    return {k: v.to(device) for k, v in Collator(tok.pad_id)(items).items()}, items


# -- suite 1: every method vs full fine-tuning -----------------------------------------------------
def methods_suite(args: argparse.Namespace, device: torch.device) -> None:
    base, tok = finetune.load_base(args.base)
    K = len(CLASS_NAMES)
    head = finetune.METHODS["head"]
    n_train = args.n_train or len(World(0).classification("train"))
    epochs = head.steps * head.batch_size / n_train  # E: the recipe's default passes over the data
    batch, _ = world_batch(tok, base, args.batch_size, device)
    _, feature_items = world_batch(tok, base, head.batch_size * args.extract_batches, device)
    tokens = int(batch["attention_mask"].sum())  # real tokens of a training batch
    head_tokens = sum(len(x["input_ids"]) for x in feature_items)  # real tokens of the extraction

    configs = {"full": finetune.FullConfig()}
    for placement in args.placement:  # Houlsby (the recipe's default) is the row with the target
        name = "adapters" if placement == "houlsby" else f"adapters-{placement}"
        configs[name] = AdapterConfig(placement=placement, reduction_factor=args.reduction_factor)
    configs["lora"] = LoRAConfig(r=args.r)
    for name in ("prefix", "prompt"):  # the registry's config defaults
        configs[name] = finetune.METHODS[name].config_class()()
    fns, pct = {}, {}
    for name, config in configs.items():
        method = finetune.METHODS[name.split("-")[0]]  # "adapters-pfeiffer" is method "adapters"
        model, _ = finetune.load_base(args.base)
        model = method.apply(model, config)
        heads.add_head(model, heads.HeadConfig(num_classes=K, pooling=args.pooling))
        model.to(device)
        trainable, total = protocol.count_parameters(model)
        pct[name] = 100 * trainable / total
        fns[name] = trainer(model, batch, method.lr, heads.classification_loss)

    encoder = heads.apply_head(copy.deepcopy(base), heads.HeadConfig(num_classes=K, pooling=args.pooling)).to(device)
    trainable, total = protocol.count_parameters(encoder)
    pct["head"] = 100 * trainable / total
    head_opt = torch.optim.AdamW(encoder.head.parameters(), lr=head.lr)
    feats = torch.randn(head.batch_size, encoder.config.n_embd, device=device)  # (B, C): values do not matter
    labels = torch.arange(head.batch_size, device=device) % K  # (B,)

    def extract() -> None:  # the encoder over --extract-batches batches, as the recipe runs it
        heads.extract_features(encoder, feature_items, args.pooling, batch_size=head.batch_size,
                               pad_id=tok.pad_id, progress=False)

    def head_step() -> None:
        loss, _ = heads.feature_loss(encoder.head, {"features": feats, "labels": labels})
        loss.backward()
        head_opt.step()
        head_opt.zero_grad(set_to_none=True)

    fns["head extract"], fns["head step"] = extract, head_step
    times = interleaved(fns, args, device)
    # the head's time per round: one extraction + E epochs of steps over the extracted examples
    steps_per_epoch = args.extract_batches
    times["head"] = [te + epochs * steps_per_epoch * ts for te, ts in zip(times.pop("head extract"),
                                                                         times.pop("head step"))]
    work = {n: tokens for n in configs} | {"head": epochs * head_tokens}
    r = ratios(work, times, "full")
    n_params = sum(q.numel() for q in base.parameters())
    print(f"\n[methods] base {n_params / 1e6:.2f} M params; batch {args.batch_size} ({tokens} real tokens); "
          f"adapters {'/'.join(args.placement)} r={args.reduction_factor}; lora r={args.r} on q_proj, v_proj; "
          f"prefix/prompt: the registry's defaults; head: extraction of {len(feature_items)} examples "
          f"({head_tokens} tokens) + {epochs:.1f} epochs of head steps")
    rows = [(n, f"{pct[n]:.2f}", f"{statistics.median(times[n]) * 1e3:.1f}", f"{r[n][0]:.0f}",
             f"{r[n][1]:.2f}x", f"{r[n][2]:.2f}x", target(n)) for n in times]
    print_table("training tokens/s x full fine-tuning", rows,
                ("method", "trainable %", "ms (median)", "tokens/s", "x full", "x full, paired", "target"))


# -- suite 2: LoRA ours vs transformers + PEFT; merged inference vs the base -----------------------
def lm_loss_ours(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return train.next_token_loss(model, batch)[0]  # mean over real next tokens


def lm_loss_hf(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)  # (B, T)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss


def same_size_llama(base: Transformer) -> Transformer:
    """A Llama-family model with the base model's sizes (random weights)."""
    c = base.config
    config = type(c)(family="llama", vocab_size=c.vocab_size, block_size=c.block_size, n_layer=c.n_layer,
                     n_head=c.n_head, n_embd=c.n_embd, intermediate_size=c.intermediate_size)
    torch.manual_seed(0)
    return Transformer(config)


def peft_suite(args: argparse.Namespace, device: torch.device) -> None:
    try:
        import peft
        import transformers
    except ImportError as e:
        print(f"\n[peft] skipped: {e.name} is not installed (pip install transformers peft)")
        return
    transformers.logging.set_verbosity_error()
    base, tok = finetune.load_base(args.base)
    batch, _ = world_batch(tok, base, args.batch_size, device)
    batch = {k: batch[k] for k in ("input_ids", "attention_mask")}  # language modelling: no class labels
    tokens = int(batch["attention_mask"].sum())
    rows = []
    for label, model in (("gpt2 (weights/base)", base), ("llama (same size)", same_size_llama(base))):
        ours_targets = ("q_proj", "k_proj", "v_proj") if model.config.family == "gpt2" else ("q_proj", "v_proj")
        hf_targets = ["c_attn"] if model.config.family == "gpt2" else ["q_proj", "v_proj"]
        with tempfile.TemporaryDirectory() as d:
            checkpoint.save_hf(model, d)
            hf = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa").to(device)
        hf = peft.get_peft_model(hf, peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                                                     target_modules=hf_targets))
        ours = apply_lora(copy.deepcopy(model), LoRAConfig(r=args.r, alpha=2 * args.r,
                                                          target_modules=ours_targets)).to(device)
        plain = copy.deepcopy(model).to(device).eval()
        merged = copy.deepcopy(ours)
        with torch.no_grad():  # a trained-looking LoRA: B != 0, so merging changes the weights
            for n, p in merged.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.02)
        merged = merge_and_unload(merged).eval()  # W0 + ΔW in plain nn.Linear layers, as deployed

        def infer(m: torch.nn.Module, repeats: int = INFER_REPEATS) -> Callable[[], None]:
            @torch.no_grad()
            def forwards() -> None:  # a few forwards per timing: one is short enough to be noisy
                for _ in range(repeats):
                    m(batch["input_ids"], attention_mask=batch["attention_mask"])
            return forwards

        # two matches, each interleaved on its own: an inference timed right after a training
        # step of the other match would run on caches that step just flushed, and with four
        # contenders taking turns the base model would always follow itself at a round's edge
        times = interleaved({"ours": trainer(ours, batch, 1e-3, lm_loss_ours),
                             "peft": trainer(hf, batch, 1e-3, lm_loss_hf)}, args, device)
        times |= interleaved({"merged": infer(merged), "base": infer(plain)}, args, device)
        train_r = ratios({"ours": tokens, "peft": tokens}, {k: times[k] for k in ("ours", "peft")}, "peft")
        infer_r = ratios({"merged": INFER_REPEATS * tokens, "base": INFER_REPEATS * tokens}, {k: times[k] for k in ("merged", "base")}, "base")
        rows.append((label, "lora train: ours / transformers+peft", f"{train_r['ours'][0]:.0f}",
                     f"{train_r['peft'][0]:.0f}", f"{train_r['ours'][1]:.2f}x", f"{train_r['ours'][2]:.2f}x",
                     target("lora train")))
        rows.append((label, "inference: merged LoRA / base", f"{infer_r['merged'][0]:.0f}",
                     f"{infer_r['base'][0]:.0f}", f"{infer_r['merged'][1]:.2f}x", f"{infer_r['merged'][2]:.2f}x",
                     target("merged")))
    print(f"\n[peft] transformers {transformers.__version__}, peft {peft.__version__}; batch {args.batch_size} "
          f"({tokens} real tokens); LoRA r={args.r}, alpha={2 * args.r}; gpt2: ours q,k,v_proj vs PEFT's c_attn "
          f"(q,k,v fused, one A); llama: q_proj, v_proj on both")
    print_table("tokens/s, side by side", rows, ("model", "what", "tokens/s", "vs tokens/s", "ratio",
                                                  "ratio, paired", "target"))


# -- suite 3: SFT packing --------------------------------------------------------------------------
def sft_suite(args: argparse.Namespace, device: torch.device) -> None:
    from minituner import sft

    base, tok = finetune.load_base(args.base)
    world = World(0)
    examples = world.instructions("train")[:: max(1, len(world.instructions("train")) // args.sft_examples)]
    examples = examples[:args.sft_examples]
    T = base.config.block_size
    padded = sft.sft_dataset(examples, tok, T)
    packed = sft.sft_dataset(examples, tok, T, packing=True)
    collate = Collator(tok.pad_id)
    fns, work = {}, {}
    for name, ds in (("padded", padded), ("packed", packed)):
        model = apply_lora(copy.deepcopy(base), LoRAConfig(r=args.r)).to(device)
        batches = [{k: v.to(device) for k, v in collate([ds[j] for j in range(i, min(i + args.batch_size, len(ds)))]).items()}
                   for i in range(0, len(ds), args.batch_size)]
        fns[name] = trainer(model, batches, 1e-3, sft.sft_loss)  # one pass over all the examples
        work[name] = sum(len(ds[i]["input_ids"]) for i in range(len(ds)))  # real tokens
    times = interleaved(fns, args, device)
    r = ratios(work, times, "padded")
    print(f"\n[sft] {len(examples)} instruction examples, LoRA r={args.r}, batches of {args.batch_size} rows; "
          f"padded: {len(padded)} rows; packed: {len(packed)} rows of <= {T} tokens ({packed.fill:.0%} full)")
    rows = [(n, f"{statistics.median(times[n]) * 1e3:.0f}", f"{r[n][0]:.0f}", f"{r[n][1]:.2f}x", f"{r[n][2]:.2f}x")
            for n in times]
    print_table("one pass over the examples", rows, ("rows", "ms (median)", "tokens/s", "x padded", "x padded, paired"))


# -- suite 4: DPO ours vs TRL ----------------------------------------------------------------------
def dpo_suite(args: argparse.Namespace, device: torch.device) -> None:
    try:
        import datasets
        import peft
        import transformers
        import trl
    except ImportError as e:
        print(f"\n[dpo] skipped: {e.name} is not installed (pip install trl peft transformers datasets)")
        return
    from minituner.data import PreferenceDataset
    from minituner.dpo import dpo_step_loss

    transformers.logging.set_verbosity_error()
    base, tok = finetune.load_base(args.base)
    pairs = World(0).preferences("train")[:args.batch_size]
    ds = PreferenceDataset(pairs, tok, max_length=base.config.block_size)
    batch = {k: v.to(device) for k, v in Collator(tok.pad_id)([ds[i] for i in range(len(ds))]).items()}
    ours = apply_lora(copy.deepcopy(base), LoRAConfig(r=args.r, alpha=2 * args.r,
                                                      target_modules=("q_proj", "k_proj", "v_proj"))).to(device)
    ours_step = trainer(ours, batch, 1e-3, functools.partial(dpo_step_loss, beta=0.1, pad_id=tok.pad_id))

    with tempfile.TemporaryDirectory() as d:
        checkpoint.save_hf(base, d, tokenizer=tok)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa")
        hf_tok = transformers.AutoTokenizer.from_pretrained(d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = trl.DPOConfig(output_dir=os.path.join(d, "trl"), per_device_train_batch_size=args.batch_size,
                                   beta=0.1, learning_rate=1e-3, max_steps=1, report_to=[], logging_steps=10 ** 9,
                                   save_strategy="no", use_cpu=device.type == "cpu", dataloader_num_workers=0,
                                   remove_unused_columns=False)
            trainer_ = trl.DPOTrainer(model=hf, args=config, processing_class=hf_tok,
                                      train_dataset=datasets.Dataset.from_list(
                                          [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs]),
                                      peft_config=peft.LoraConfig(r=args.r, lora_alpha=2 * args.r,
                                                                  target_modules=["c_attn"], lora_dropout=0.0))
    theirs = trainer_.model.to(device)
    trainer_.current_gradient_accumulation_steps = 1  # Trainer.train() sets it before its first step
    inputs = next(iter(trainer_.get_train_dataloader()))  # TRL's own collated batch of the same pairs
    params = [p for p in theirs.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def trl_step() -> None:
        trainer_.training_step(theirs, inputs)  # forward (policy + reference), DPO loss, backward
        train._scale_and_clip_([p.grad for p in params if p.grad is not None], None, GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)

    print("\n[dpo] TRL's batch:", {k: tuple(v.shape) for k, v in inputs.items() if torch.is_tensor(v)},
          "ours:", {k: tuple(v.shape) for k, v in batch.items()})
    times = interleaved({"ours": ours_step, "trl": trl_step}, args, device)
    r = ratios({"ours": 1, "trl": 1}, times, "trl")
    print(f"\n[dpo] trl {trl.__version__}; {len(pairs)} pairs per step, LoRA r={args.r} (ours q_proj, k_proj, v_proj; "
          f"TRL's PEFT c_attn: q, k, v fused, one A), beta 0.1, sigmoid loss")
    rows = [(n, f"{statistics.median(times[n]) * 1e3:.1f}", f"{r[n][0]:.2f}", f"{r[n][1]:.2f}x", f"{r[n][2]:.2f}x",
             target("dpo") if n == "ours" else "") for n in times]
    print_table("DPO training steps/s", rows, ("trainer", "ms (median)", "steps/s", "x TRL", "x TRL, paired", "target"))


# -- the command line ------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--suite", nargs="+", default=list(SUITES), choices=SUITES, help="what to measure")
    p.add_argument("--base", default=None, help="base model directory; None: weights/base")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); None: torch's choice")
    p.add_argument("--batch-size", type=int, default=finetune.METHODS["full"].batch_size,
                   help="examples (or pairs, or rows) per step (the recipe's default)")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--placement", nargs="+", default=["houlsby", "pfeiffer"], choices=["houlsby", "pfeiffer"],
                   help="adapters: one row per placement (houlsby: 2 per layer, the recipe's default; "
                        "pfeiffer: 1, after the MLP)")
    p.add_argument("--reduction-factor", type=int, default=16, help="adapters: m = d / this")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (alpha = 2r)")
    p.add_argument("--pooling", default="last", choices=list(heads.POOLINGS), help="the head's pooling")
    p.add_argument("--extract-batches", type=int, default=8,
                   help="extraction batches timed per round: extract_features sorts examples by length "
                        "across them, as it does over a whole training set")
    p.add_argument("--n-train", type=int, default=None,
                   help="training-set size that sets the head's epochs; None: the task's (6000)")
    p.add_argument("--sft-examples", type=int, default=128, help="sft: instruction examples per pass")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall time, or this process's CPU time (steadier on a shared CPU machine, with --threads 1)")
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error("--rounds and --batch-size must be >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device; use --device cpu")
    if args.clock == "cpu" and device.type == "cuda":
        p.error("--clock cpu times the host only; use --clock wall with --device cuda")
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}; {args.rounds} rounds "
          f"after {args.warmup} warm-up, median, {args.clock} clock")
    suites = {"methods": methods_suite, "peft": peft_suite, "sft": sft_suite, "dpo": dpo_suite}
    for name in SUITES:
        if name in args.suite:
            suites[name](args, device)
    print("\nratio: of median rates; paired: median of per-round ratios (steadier on a shared machine)")


if __name__ == "__main__":
    main()
