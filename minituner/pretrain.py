"""Pre-training the course's base model on the world's corpus (Radford et al. 2019).

The base model every chapter fine-tunes is trained here, from scratch, with the next-token
objective of `minituner.train` on the corpus of `minituner.world`:

    L(theta) = -1/N sum_t log p_theta(x_t | x_<t)                 (LM objective, GPT-2 Eq. 1)

One command regenerates it, with everything it needs derived from one seed:

    python -m minituner pretrain --out weights/base --seed 0

    World(seed).corpus --Tokenizer.train--> byte-level BPE (vocab 2048)
         |                                       |
         +---- pack <bos> doc <eos> ... ---------+--> blocks of T tokens --> train()
                                                                               |
    weights/base/: config.json  model.safetensors  tokenizer.json  history.json
                   metrics.json (the numbers below)  README.md (the model card)

What the card reports, and why: held-out loss and perplexity beside an add-one unigram
baseline's (has it learned the language?), fact recall against chance (does it know the
world?), and exact match on the instruction test split (it must NOT follow instructions
yet: that is what instruction tuning, chapter 08, adds).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint
from .data import PackedLMDataset, pack_documents
from .evaluate import fact_recall, instruction_exact_match, unigram_baseline
from .files import write_text
from .model import ModelConfig, Transformer
from .tokenizer import Tokenizer
from .train import TrainConfig, evaluate, train
from .world import World

# The two bounds the base model meets, stated here once, written into metrics.json and the
# model card, and checked from there by tests/test_base_model.py and notebook 01:
# - it has learned the language: its held-out perplexity is below the add-one unigram
#   baseline's divided by UNIGRAM_RATIO_BOUND;
# - it does not follow the instruction format before chapter 08: its exact match on the
#   instruction test split is below INSTRUCTION_EM_BOUND.
UNIGRAM_RATIO_BOUND = 10.0
INSTRUCTION_EM_BOUND = 0.10
SAMPLE_PROMPTS = ("Ada lives in", "Let me tell you about Ben.", "On Monday, Cora",
                  '"Where do you live, Eli?" asked Finn.')


@dataclass(frozen=True)
class PretrainConfig:
    seed: int = 0  # the world, the tokenizer's corpus, the initial weights and the data order
    n_docs: int | None = None  # training documents (None: the world's default corpus)
    vocab_size: int = 2048  # byte-level BPE vocabulary, special tokens included
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        family="gpt2", vocab_size=2048, block_size=256, n_layer=4, n_head=4, n_embd=256))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=1200, batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=60, weight_decay=0.1,
        grad_clip=1.0, eval_every=200, eval_batches=16, seed=0))
    checkpoint_every: int = 200  # steps between resumable checkpoints (when a checkpoint_dir is given)

    def to_dict(self) -> dict:
        return {"seed": self.seed, "n_docs": self.n_docs, "vocab_size": self.vocab_size,
                "model": self.model.to_dict(), "train": self.train.to_dict()}


def _machine() -> str:
    load = ", load average %.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return (f"{platform.machine()}, {os.cpu_count()} logical CPUs{load}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}")


def build_data(config: PretrainConfig) -> tuple[Tokenizer, PackedLMDataset, PackedLMDataset, World]:
    """The world, its tokenizer (trained on the training corpus only) and packed LM blocks."""
    world = World(config.seed)
    train_docs = world.corpus("train", n_docs=config.n_docs)
    val_docs = world.corpus("val")
    tok = Tokenizer.train(train_docs, vocab_size=config.vocab_size)
    T = config.model.block_size
    train_ds = PackedLMDataset(pack_documents(train_docs, tok), T)
    val_ds = PackedLMDataset(pack_documents(val_docs, tok), T)
    return tok, train_ds, val_ds, world


def held_out(model: Transformer, train_ds: PackedLMDataset, val_ds: PackedLMDataset,
             vocab_size: int) -> dict:
    """Held-out loss/perplexity of the model and of the unigram baseline, on the same targets."""
    model_eval = evaluate(model, val_ds, batch_size=16)
    T = val_ds.block_size
    targets = val_ds.ids[: len(val_ds) * T].view(-1, T)[:, 1:]  # (N_blocks, T-1) as the model sees them
    uni = unigram_baseline(train_ds.ids, targets, vocab_size)
    return {"loss": model_eval["loss"], "perplexity": model_eval["perplexity"],
            "tokens": int(model_eval["num_tokens"]),
            "unigram_loss": uni["loss"], "unigram_perplexity": uni["perplexity"]}


def samples(model: Transformer, tok: Tokenizer, seed: int, max_new_tokens: int = 40) -> list[dict]:
    """Greedy and sampled (T=0.8, top-k 40) continuations of a few prompts."""
    model.eval()
    out = []
    gen = torch.Generator().manual_seed(seed)
    for p in SAMPLE_PROMPTS:
        ids = torch.tensor([tok.encode(p, add_bos=True)])
        greedy = model.generate(ids, max_new_tokens, eos_token_id=tok.eos_id)
        sampled = model.generate(ids, max_new_tokens, temperature=0.8, top_k=40,
                                 eos_token_id=tok.eos_id, generator=gen)
        out.append({"prompt": p, "greedy": tok.decode(greedy[0, ids.shape[1]:].tolist()),
                    "sampled": tok.decode(sampled[0, ids.shape[1]:].tolist())})
    return out


def measure(model: Transformer, tok: Tokenizer, world: World, train_ds, val_ds, seed: int,
            progress: bool = True) -> dict:
    """Every number of the model card."""
    test = world.instructions("test")
    em = instruction_exact_match(model, tok, test, progress=progress)
    return {
        "held_out": held_out(model, train_ds, val_ds, tok.vocab_size),
        "fact_recall": fact_recall(model, tok, world),
        "instruction_exact_match": {k: em[k] for k in ("exact_match", "n", "seen", "held_out", "by_family")},
        "unigram_ratio_bound": UNIGRAM_RATIO_BOUND,
        "instruction_em_bound": INSTRUCTION_EM_BOUND,
        "samples": samples(model, tok, seed),
    }


def pretrain(out_dir: str | os.PathLike = "weights/base", config: PretrainConfig | None = None, *,
             checkpoint_dir: str | os.PathLike | None = None, resume: bool = False,
             progress: bool = True, command: str | None = None) -> dict:
    """Train the base model and write it, its tokenizer, history, metrics and model card to
    `out_dir`. Checkpoints (for `resume`) go to `checkpoint_dir` when given."""
    config = config or PretrainConfig()
    t0 = time.time()
    torch.manual_seed(config.seed)
    tok, train_ds, val_ds, world = build_data(config)
    # BPE stops merging when no pair is frequent enough, so the vocabulary can come out
    # smaller than asked: the embedding table is sized to the tokenizer actually trained.
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=tok.vocab_size))
    model = Transformer(config.model)
    tcfg = TrainConfig.from_dict({**config.train.to_dict(), "progress": progress,
                                  "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None,
                                  "checkpoint_every": config.checkpoint_every if checkpoint_dir else None,
                                  "resume": resume, "seed": config.seed})
    history = train(model, train_ds, tcfg, eval_data=val_ds)
    train_seconds = time.time() - t0
    metrics = measure(model, tok, world, train_ds, val_ds, config.seed, progress=progress)
    steps = history[-1]["step"] if history else 0  # history steps count from 1
    metrics.update({
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens_seen": steps * tcfg.batch_size * tcfg.grad_accum_steps * config.model.block_size,
        "train_tokens": train_ds.ids.numel(), "val_tokens": val_ds.ids.numel(),
        "train_seconds": train_seconds, "total_seconds": time.time() - t0, "machine": _machine(),
        "command": command or f"python -m minituner pretrain --out {out_dir} --seed {config.seed}",
        "config": config.to_dict(),
    })
    out = Path(out_dir)
    checkpoint.save(model, out)
    tok.save(out / "tokenizer.json")
    write_text(out / "history.json", json.dumps(history, indent=1) + "\n")
    write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_text(out / "README.md", model_card(metrics))
    return metrics


def model_card(m: dict) -> str:
    """The model card (README.md of weights/base) from the measured numbers."""
    mc, tc, h = m["config"]["model"], m["config"]["train"], m["held_out"]
    facts = m["fact_recall"]
    em = m["instruction_exact_match"]
    fact_rows = "\n".join(f"| {k} | {v['accuracy']:.3f} | {v['chance']:.3f} |"
                          for k, v in facts.items() if k != "mean")
    fam_rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in em["by_family"].items())
    sample_rows = "\n".join(f"- **{s['prompt']}** → greedy: {s['greedy']!r}; sampled: {s['sampled']!r}"
                            for s in m["samples"])
    return f"""# minituner base model

A small {mc['family'].upper()}-family transformer pre-trained from scratch on the synthetic
world of `minituner/world.py` (seed {m['config']['seed']}). It is the starting point of every
chapter. It speaks the world's language and knows its facts, but has never seen the
instruction format: following instructions is what chapter 08 teaches it.

Regenerate it (to within float noise) with:

    {m['command']}

## Configuration

| | |
|---|---|
| family | {mc['family']} (LayerNorm, learned positions, GELU, tied embeddings) |
| layers x heads x width | {mc['n_layer']} x {mc['n_head']} x {mc['n_embd']} |
| context (block_size) | {mc['block_size']} tokens |
| vocabulary | {mc['vocab_size']} (byte-level BPE trained on the training corpus) |
| parameters | {m['parameters']:,} |
| training corpus | {m['train_tokens']:,} tokens ({m['val_tokens']:,} held out) |
| tokens seen | {m['tokens_seen']:,} ({tc['max_steps']} steps x {tc['batch_size']} x {mc['block_size']}) |
| optimizer | AdamW, lr {tc['lr']} → {tc['min_lr']} (warmup {tc['warmup_steps']}, cosine), weight decay {tc['weight_decay']}, clip {tc['grad_clip']} |
| wall time | {m['train_seconds'] / 60:.1f} min training, {m['total_seconds'] / 60:.1f} min in all |
| machine | {m['machine']} |

## Held-out language modelling

| model | loss (nats/token) | perplexity |
|---|---|---|
| unigram baseline (add-one) | {h['unigram_loss']:.4f} | {h['unigram_perplexity']:.2f} |
| this model | {h['loss']:.4f} | {h['perplexity']:.3f} |

Measured on {h['tokens']:,} held-out target tokens. The loss curve is in `history.json`.
Bound stated for the tests: perplexity < unigram perplexity / {m['unigram_ratio_bound']:g}.

## Does it know the world? (fact recall)

Each person's attribute is chosen among all candidate values by the log-probability of one
sentence ("Ada lives in Ashford."); accuracy over the {facts['town']['n']} people.

| attribute | accuracy | chance |
|---|---|---|
{fact_rows}
| **mean** | **{facts['mean']:.3f}** | |

## It does not follow instructions yet

Greedy exact match on the world's instruction test split (Alpaca prompt format,
{em['n']} examples): **{em['exact_match']:.3f}** (seen families {em['seen']:.3f}, held-out
families {em['held_out']:.3f}). Bound stated for the tests: exact match < {m['instruction_em_bound']}.

| family | exact match |
|---|---|
{fam_rows}

## Samples

{sample_rows}
"""
