"""Checkpoints: our own format, and Hugging Face GPT-2 / Llama / BERT layouts.

Our format is a directory with two files, written together atomically (a temporary
directory renamed into place, `minituner.files.atomic_directory`), so a crash never leaves a
half-written checkpoint, or new weights beside an old config, behind:

    config.json         ModelConfig.to_dict()
    model.safetensors   the state dict (a tied lm_head is stored once, as tok_emb)

`load_hf` reads a Hugging Face directory (config.json + model.safetensors, or shards listed
in model.safetensors.index.json) or an in-memory state dict, renames its keys to ours and
checks everything before any weight is used: missing keys, unexpected keys and shape
mismatches come back together in ONE `CheckpointError`. Key mapping:

    GPT-2  [transformer.]h.{i}.attn.c_attn   (C, 3C) Conv1D -> transpose, split into q/k/v
           h.{i}.attn.c_proj / mlp.c_fc / mlp.c_proj Conv1D (in, out) -> transpose to (out, in)
    Llama  model.layers.{i}.self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj: same names
    BERT   [bert.]encoder.layer.{i}.attention.self.{query,key,value} -> attn.{q,k,v}_proj ...
           pooler.* and cls.* (heads we do not build) are skipped

Pickle is never read: `.bin`, `.pt`, `.pth`, `.ckpt`, `.pkl` files are refused with the
command that converts them to safetensors. A missing directory, a malformed config.json and a
truncated or empty .safetensors file each raise a `CheckpointError` that names the path.

`find_base_model()` is the one place that knows where the course's base model lives, for
the command line and the notebooks alike (search order in its docstring).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file

from minituner.files import PICKLE_SUFFIXES, atomic_directory, refuse_pickle  # noqa: F401 (re-exported)
from minituner.model import ModelConfig, Transformer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that does not match the model, or a file we refuse to read."""


# -- files ------------------------------------------------------------------------------------
def _refuse_pickle(path: Path) -> None:
    refuse_pickle(path, CheckpointError)


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from `path`; a malformed file raises a CheckpointError naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                              "restore the file from the checkpoint it came with") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not a UTF-8 text file; restore the file from the checkpoint "
                              "it came with") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object; restore the "
                              "file from the checkpoint it came with")
    return data


def read_safetensors_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of one .safetensors file; a truncated, empty or foreign file raises a
    CheckpointError naming it (the Rust reader's own message names no file)."""
    path = Path(path)
    try:
        return load_file(path)
    except OSError:  # missing, unreadable: the OS's own message names the file
        raise
    except Exception as e:  # SafetensorError: header too small, file not fully covered, ...
        size = path.stat().st_size if path.is_file() else 0
        raise CheckpointError(f"{path} ({size:,} bytes) is not a complete safetensors file ({e}); "
                              "it may be truncated by an interrupted copy or download: copy or "
                              "regenerate it") from None


def read_safetensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a directory: model.safetensors, or the shards named by its index."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {d} does not exist; check the path")
    if (d / WEIGHTS_NAME).is_file():
        return read_safetensors_file(d / WEIGHTS_NAME)
    if (d / INDEX_NAME).is_file():
        weight_map = read_json(d / INDEX_NAME).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{d / INDEX_NAME} has no \"weight_map\" object")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = (d / shard).resolve()
            if shard_path.parent != d.resolve():
                raise CheckpointError(f"{INDEX_NAME} names a shard outside {d}: {shard!r}")
            state.update(read_safetensors_file(shard_path))
        return state
    for f in sorted(d.iterdir()):
        _refuse_pickle(f)
    found = sorted(p.name for p in d.iterdir())
    raise CheckpointError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {d} (found: {found})")


# -- loading a state dict into a model, checked ---------------------------------------------------
def _tied(model: Transformer) -> bool:
    return hasattr(model, "lm_head") and model.lm_head.weight is model.tok_emb.weight


def load_checked(model: Transformer, state: Mapping[str, torch.Tensor],
                 sources: Mapping[str, str] | None = None, assign: bool = False) -> None:
    """Load `state` into `model` or raise ONE CheckpointError listing every problem.

    `sources` maps our key -> the checkpoint's original key, to name both in messages.
    With assign=True the tensors themselves become the parameters (meta-device models).
    """
    sources = sources or {}
    expected = model.state_dict()
    if _tied(model):
        expected.pop("lm_head.weight")  # stored once, as tok_emb.weight

    def named(k: str) -> str:
        return f"{k!r}" + (f" (checkpoint key {sources[k]!r})" if sources.get(k, k) != k else "")

    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{named(k)}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint does not match {type(model).__name__}({model.config.family}):"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(named(k) for k in unexpected))
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}):\n    " + "\n    ".join(mismatched))
        lines.append("  check that the config matches the checkpoint (family, sizes, vocab).")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(dict(state), strict=False, assign=assign)
    if model.config.family != "bert" and model.config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight  # re-tie after assign


def _build(config: ModelConfig, state: Mapping[str, torch.Tensor], sources=None,
           device=None, dtype: torch.dtype | None = None) -> Transformer:
    """A Transformer holding `state`, built on the meta device (no wasted random init)."""
    with torch.device("meta"):
        model = Transformer(config)
    load_checked(model, state, sources, assign=True)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model.eval()


# -- our own format -------------------------------------------------------------------------------
def save(model: Transformer, directory: str | os.PathLike) -> Path:
    """Write config.json and model.safetensors into `directory` (created), atomically."""
    if not isinstance(getattr(model, "config", None), ModelConfig):
        raise TypeError("save() needs a minituner Transformer (with a ModelConfig in .config)")
    d = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if _tied(model):
        state.pop("lm_head.weight")  # safetensors refuses shared storage; it is tok_emb
    text = json.dumps(model.config.to_dict(), indent=2, sort_keys=True) + "\n"
    with atomic_directory(d) as tmp:  # both files appear together, or neither does
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(text)
    return d


def load(directory: str | os.PathLike, device: str | torch.device | None = None,
         dtype: torch.dtype | None = None) -> Transformer:
    """Inverse of `save`: the same weights, bit for bit (saved dtype unless `dtype`), in eval mode."""
    d = Path(directory)
    if d.is_file():
        _refuse_pickle(d)
        raise CheckpointError(f"load() takes the checkpoint directory, not the file {d}")
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {d} does not exist; check the path")
    if not (d / CONFIG_NAME).is_file():
        raise CheckpointError(f"no {CONFIG_NAME} in {d}; save a model with minituner.checkpoint.save")
    config = _model_config(d / CONFIG_NAME)
    return _build(config, read_safetensors(d), device=device, dtype=dtype)


def _model_config(path: Path) -> ModelConfig:
    """Our config.json as a ModelConfig; wrong fields or values name the file."""
    try:
        return ModelConfig.from_dict(read_json(path))
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path} is not a minituner model config ({e}); write it with "
                              "minituner.checkpoint.save, or load a Hugging Face directory with load_hf") from None


# -- the course's base model ----------------------------------------------------------------------
BASE_MODEL_ENV = "MINITUNER_WEIGHTS"
_PACKAGE_BASE = Path(__file__).resolve().parent / "weights" / "base"  # a wheel's package data
_SOURCE_BASE = Path(__file__).resolve().parent.parent / "weights" / "base"  # a source checkout
PRETRAIN_HINT = "python -m minituner pretrain --out weights/base --seed 0"


def find_base_model(weights: str | os.PathLike | None = None) -> Path:
    """The directory of the course's base model (config.json, model.safetensors, tokenizer.json).

    Search order, first match wins:
      1. `weights`, when given (the command line's --weights DIR);
      2. the environment variable MINITUNER_WEIGHTS;
      3. the copy installed with the package (`pip install .` ships weights/base as
         minituner/weights/base);
      4. weights/base in the source checkout minituner is imported from (`pip install -e .`).
    A directory named by 1 or 2 must hold the model: there is no silent fallback to another.
    """
    named = weights if weights is not None else os.environ.get(BASE_MODEL_ENV) or None
    if named is not None:
        d = Path(named).expanduser()
        source = "--weights" if weights is not None else f"${BASE_MODEL_ENV}"
        if not d.is_dir():
            raise CheckpointError(f"{source} {d} does not exist; check the path (the base model "
                                  f"ships with minituner: leave {source} unset to use it)")
        if not (d / CONFIG_NAME).is_file():
            found = sorted(p.name for p in d.iterdir())[:10]
            raise CheckpointError(f"{source} {d} holds no {CONFIG_NAME} (found: {found}); check the path, "
                                  "it must be a model directory such as weights/base")
        return d
    for d in (_PACKAGE_BASE, _SOURCE_BASE):
        if (d / CONFIG_NAME).is_file():
            return d
    raise CheckpointError(f"no base model found (looked in {_PACKAGE_BASE} and {_SOURCE_BASE}); "
                          "reinstall minituner from a checkout that has weights/base, pass --weights DIR, "
                          f"or regenerate it (about 36 minutes on 2 CPU cores): {PRETRAIN_HINT}")


# -- Hugging Face configs -------------------------------------------------------------------------
def config_from_hf(hf: Mapping, **overrides) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict (model_type gpt2, llama or bert).

    Dropout is not copied (0.0, for reproducible fine-tuning); pass dropout=... to override.
    """
    try:
        return _config_from_hf(hf, overrides)
    except KeyError as e:
        raise CheckpointError(f"the config has no field {e.args[0]!r}, which a {hf.get('model_type')} "
                              "config.json holds; is it a complete Hugging Face config?") from None
    except TypeError as e:
        raise CheckpointError(f"the config has a field of the wrong type or name ({e})") from None


def _config_from_hf(hf: Mapping, overrides: dict) -> ModelConfig:
    mt = hf.get("model_type")
    if mt == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise CheckpointError(f"GPT-2 activation {hf['activation_function']!r} is not supported "
                                  "(this model implements gelu_new, the tanh approximation)")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise CheckpointError("GPT-2 options scale_attn_by_inverse_layer_idx / "
                                  "reorder_and_upcast_attn are not supported")
        cfg = dict(family="gpt2", vocab_size=hf["vocab_size"], block_size=hf["n_positions"],
                   n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                   intermediate_size=hf.get("n_inner"), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                   bias=True, tie_embeddings=hf.get("tie_word_embeddings", True))
    elif mt == "llama":
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        if rope_type != "default":
            raise CheckpointError(f"Llama rope_type {rope_type!r} is not supported (only 'default')")
        if hf.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"Llama hidden_act {hf['hidden_act']!r} is not supported (silu only)")
        if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
            raise CheckpointError("attention_bias and mlp_bias differ; minituner has one bias flag")
        cfg = dict(family="llama", vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
                   n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                   n_kv_head=hf.get("num_key_value_heads"), n_embd=hf["hidden_size"],
                   intermediate_size=hf["intermediate_size"], head_dim=hf.get("head_dim"),
                   norm_eps=hf.get("rms_norm_eps", 1e-6),
                   rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                   bias=bool(hf.get("attention_bias", False)),
                   tie_embeddings=hf.get("tie_word_embeddings", False))
    elif mt == "bert":
        if hf.get("hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"BERT hidden_act {hf['hidden_act']!r} is not supported (gelu only)")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError("only absolute position embeddings are supported for BERT")
        cfg = dict(family="bert", vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
                   n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                   n_embd=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
                   norm_eps=hf.get("layer_norm_eps", 1e-12), type_vocab_size=hf.get("type_vocab_size", 2),
                   bias=True)
    else:
        raise CheckpointError(f"model_type {mt!r} is not supported; use a gpt2, llama or bert checkpoint")
    cfg.update(overrides)
    return ModelConfig(**cfg)


# -- Hugging Face key mapping ---------------------------------------------------------------------
# (pattern on the HF key with its model prefix removed, our key template, transform)
# transform: None = copy, "T" = Conv1D (in, out) -> Linear (out, in), "qkv" = GPT-2 fused split.
_RULES: dict[str, list[tuple[str, str, str | None]]] = {
    "gpt2": [
        (r"wte\.weight", "tok_emb.weight", None),
        (r"wpe\.weight", "pos_emb.weight", None),
        (r"h\.(\d+)\.ln_1\.(weight|bias)", "blocks.{0}.attn_norm.{1}", None),
        (r"h\.(\d+)\.attn\.c_attn\.(weight|bias)", "blocks.{0}.attn.{{}}_proj.{1}", "qkv"),
        (r"h\.(\d+)\.attn\.c_proj\.(weight|bias)", "blocks.{0}.attn.o_proj.{1}", "T"),
        (r"h\.(\d+)\.ln_2\.(weight|bias)", "blocks.{0}.mlp_norm.{1}", None),
        (r"h\.(\d+)\.mlp\.c_fc\.(weight|bias)", "blocks.{0}.mlp.fc.{1}", "T"),
        (r"h\.(\d+)\.mlp\.c_proj\.(weight|bias)", "blocks.{0}.mlp.proj.{1}", "T"),
        (r"ln_f\.(weight|bias)", "norm_f.{0}", None),
        (r"lm_head\.weight", "lm_head.weight", None),
    ],
    "llama": [
        (r"embed_tokens\.weight", "tok_emb.weight", None),
        (r"layers\.(\d+)\.self_attn\.([qkvo]_proj)\.(weight|bias)", "blocks.{0}.attn.{1}.{2}", None),
        (r"layers\.(\d+)\.mlp\.((?:gate|up|down)_proj)\.(weight|bias)", "blocks.{0}.mlp.{1}.{2}", None),
        (r"layers\.(\d+)\.input_layernorm\.weight", "blocks.{0}.attn_norm.weight", None),
        (r"layers\.(\d+)\.post_attention_layernorm\.weight", "blocks.{0}.mlp_norm.weight", None),
        (r"norm\.weight", "norm_f.weight", None),
        (r"lm_head\.weight", "lm_head.weight", None),
    ],
    "bert": [
        (r"embeddings\.word_embeddings\.weight", "tok_emb.weight", None),
        (r"embeddings\.position_embeddings\.weight", "pos_emb.weight", None),
        (r"embeddings\.token_type_embeddings\.weight", "type_emb.weight", None),
        (r"embeddings\.LayerNorm\.(weight|bias)", "emb_norm.{0}", None),
        (r"encoder\.layer\.(\d+)\.attention\.self\.query\.(weight|bias)", "blocks.{0}.attn.q_proj.{1}", None),
        (r"encoder\.layer\.(\d+)\.attention\.self\.key\.(weight|bias)", "blocks.{0}.attn.k_proj.{1}", None),
        (r"encoder\.layer\.(\d+)\.attention\.self\.value\.(weight|bias)", "blocks.{0}.attn.v_proj.{1}", None),
        (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", "blocks.{0}.attn.o_proj.{1}", None),
        (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(weight|bias)", "blocks.{0}.attn_norm.{1}", None),
        (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", "blocks.{0}.mlp.fc.{1}", None),
        (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", "blocks.{0}.mlp.proj.{1}", None),
        (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.(weight|bias)", "blocks.{0}.mlp_norm.{1}", None),
    ],
}
_PREFIX = {"gpt2": "transformer.", "llama": "model.", "bert": "bert."}
# buffers and heads present in HF files that this model does not have
_SKIP = {
    "gpt2": r"h\.\d+\.attn\.(bias|masked_bias)",
    "llama": r"(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",
    "bert": r"embeddings\.position_ids|pooler\..*|cls\..*",
}


def convert_hf_state_dict(hf_state: Mapping[str, torch.Tensor], config: ModelConfig
                          ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """HF tensors -> (our state dict, our key -> HF key). Unknown keys pass through unchanged,
    so `load_checked` reports them as unexpected together with everything else."""
    fam = config.family
    rules = [(re.compile(p), t, tr) for p, t, tr in _RULES[fam]]
    state, sources = {}, {}
    for hf_key, w in hf_state.items():
        key = hf_key[len(_PREFIX[fam]):] if hf_key.startswith(_PREFIX[fam]) else hf_key
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))
        if re.fullmatch(_SKIP[fam], key):
            continue
        if fam != "bert" and config.tie_embeddings and key == "lm_head.weight":
            continue  # the tied head is tok_emb
        for pattern, template, transform in rules:
            m = pattern.fullmatch(key)
            if m is None:
                continue
            ours = template.format(*m.groups())
            if transform == "T" and w.dim() == 2:
                w = w.t()  # Conv1D stores (in, out); nn.Linear wants (out, in)
            if transform == "qkv" and w.shape[-1] % 3 == 0:
                if w.dim() == 2:
                    w = w.t()  # Conv1D (C, 3C) -> (3C, C)
                for name, part in zip("qkv", w.chunk(3, dim=0)):  # fused c_attn -> q, k, v
                    state[ours.format(name)], sources[ours.format(name)] = part, hf_key
                break
            state[ours], sources[ours] = w, hf_key
            break
        else:
            state[hf_key], sources[hf_key] = w, hf_key
    return state, sources


def load_hf(source: str | os.PathLike | Mapping[str, torch.Tensor], family: str | None = None,
            config: ModelConfig | Mapping | None = None, *, device: str | torch.device | None = None,
            dtype: torch.dtype | None = torch.float32) -> Transformer:
    """A Transformer from a Hugging Face GPT-2 / Llama / BERT checkpoint, in eval mode.

    source: a directory (config.json + safetensors, single or sharded), a .safetensors file
    (config.json next to it, or `config`), or a state dict (then `config` is required).
    config: a ModelConfig, or a HF config dict; by default the directory's config.json.
    family: optional check that the checkpoint is the family you expect.
    dtype: float32 by default (HF files are often bf16/fp16); None keeps the stored dtypes.
    """
    hf_config = None
    if isinstance(source, Mapping):
        if config is None:
            raise CheckpointError("load_hf(state_dict) needs config= (a ModelConfig or a HF config dict)")
        state = dict(source)
    else:
        path = Path(source)
        _refuse_pickle(path)
        if path.is_file():
            if path.suffix != ".safetensors":
                raise CheckpointError(f"{path} is not a .safetensors file")
            state, path = read_safetensors_file(path), path.parent
        elif path.is_dir():
            state = read_safetensors(path)
        else:
            raise CheckpointError(f"{path} does not exist")
        if config is None:
            if not (path / CONFIG_NAME).is_file():
                raise CheckpointError(f"no {CONFIG_NAME} in {path}; pass config=")
            hf_config = read_json(path / CONFIG_NAME)
    if config is None:
        try:
            config = config_from_hf(hf_config)
        except CheckpointError as e:
            raise CheckpointError(f"{path / CONFIG_NAME}: {e}") from None
    elif not isinstance(config, ModelConfig):
        config = config_from_hf(config)
    if family is not None and family != config.family:
        raise CheckpointError(f"expected a {family} checkpoint, the config says {config.family}")
    ours, sources = convert_hf_state_dict(state, config)
    return _build(config, ours, sources, device=device, dtype=dtype)
