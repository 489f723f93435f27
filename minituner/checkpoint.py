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

`save_hf` writes the other way: a Hugging Face directory (GPT2LMHeadModel, LlamaForCausalLM,
Qwen2ForCausalLM when only q/k/v have biases, or BertModel) that `transformers` loads with no
missing or unexpected weights, so a model or a LoRA adapter (`lora.save_peft`) trained here
runs in transformers/PEFT. Its key mapping is the table above read right to left.

Llama's relatives load as the llama family: Mistral (sliding windows cap block_size) and Qwen2
(qkv_bias=True); Llama's attention_bias and mlp_bias map to bias/qkv_bias and mlp_bias.

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
    """ModelConfig from a Hugging Face config.json dict (model_type gpt2, llama, mistral,
    qwen2 or bert; Mistral and Qwen2 are the llama family, Qwen2 with qkv_bias=True).

    Dropout is not copied (0.0, for reproducible fine-tuning); pass dropout=... to override.
    """
    try:
        return _config_from_hf(hf, overrides)
    except KeyError as e:
        raise CheckpointError(f"the config has no field {e.args[0]!r}, which a {hf.get('model_type')} "
                              "config.json holds; is it a complete Hugging Face config?") from None
    except TypeError as e:
        raise CheckpointError(f"the config has a field of the wrong type or name ({e})") from None


_LLAMA_TYPES = ("llama", "mistral", "qwen2")  # model_types read as family="llama"


def _attention_span(hf: Mapping, max_positions: int) -> int:
    """block_size for a config that may use sliding-window attention (Mistral, Qwen2).

    This model attends to every earlier token. A sliding window of w tokens sees the same
    tokens as long as a sequence is at most w long, so block_size is capped at w: longer
    sequences are refused (a clear error) instead of being computed differently.
    """
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types") or []
    sliding = ("sliding_attention" in layer_types if layer_types
               else hf.get("use_sliding_window", hf.get("model_type") == "mistral"))
    return min(max_positions, window) if sliding and window else max_positions


def _config_from_hf(hf: Mapping, overrides: dict) -> ModelConfig:
    mt = hf.get("model_type")
    if mt == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise CheckpointError(f"GPT-2 activation {hf['activation_function']!r} is not supported "
                                  "(this model implements gelu_new, the tanh approximation)")
        if not hf.get("scale_attn_weights", True):
            raise CheckpointError("GPT-2 scale_attn_weights=False is not supported (attention divides by sqrt(D))")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise CheckpointError("GPT-2 options scale_attn_by_inverse_layer_idx / "
                                  "reorder_and_upcast_attn are not supported")
        cfg = dict(family="gpt2", vocab_size=hf["vocab_size"], block_size=hf["n_positions"],
                   n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                   intermediate_size=hf.get("n_inner"), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                   bias=True, tie_embeddings=hf.get("tie_word_embeddings", True))
    elif mt in _LLAMA_TYPES:  # Mistral and Qwen2 are Llama's layout with other defaults
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        if rope_type != "default":
            raise CheckpointError(f"{mt} rope_type {rope_type!r} is not supported (only 'default')")
        if hf.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{mt} hidden_act {hf['hidden_act']!r} is not supported (silu only)")
        if mt == "qwen2":  # biases on q, k, v only (Qwen2Attention), none on o_proj or the MLP
            attention_bias, qkv_bias, mlp_bias = False, True, False
        else:  # LlamaConfig: attention_bias on q, k, v and o; mlp_bias on gate, up, down
            attention_bias = bool(hf.get("attention_bias", False))
            qkv_bias, mlp_bias = attention_bias, bool(hf.get("mlp_bias", False))
        cfg = dict(family="llama", vocab_size=hf["vocab_size"],
                   block_size=_attention_span(hf, hf["max_position_embeddings"]),
                   n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                   n_kv_head=hf.get("num_key_value_heads"), n_embd=hf["hidden_size"],
                   intermediate_size=hf["intermediate_size"], head_dim=hf.get("head_dim"),
                   norm_eps=hf.get("rms_norm_eps", 1e-6),
                   rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                   bias=attention_bias, qkv_bias=qkv_bias, mlp_bias=mlp_bias,
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
        raise CheckpointError(f"model_type {mt!r} is not supported; use a gpt2, llama (or mistral, qwen2) "
                              "or bert checkpoint")
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


# -- writing a Hugging Face directory (the inverse of load_hf) ------------------------------------
# (pattern on our key, HF key template without the model prefix, transform), the rules above read
# right to left. "T": nn.Linear (out, in) -> Conv1D (in, out). GPT-2's q, k, v fuse into c_attn.
_HF_RULES: dict[str, list[tuple[str, str, str | None]]] = {
    "gpt2": [
        (r"tok_emb\.weight", "wte.weight", None),
        (r"pos_emb\.weight", "wpe.weight", None),
        (r"blocks\.(\d+)\.attn_norm\.(weight|bias)", "h.{0}.ln_1.{1}", None),
        (r"blocks\.(\d+)\.attn\.o_proj\.(weight|bias)", "h.{0}.attn.c_proj.{1}", "T"),
        (r"blocks\.(\d+)\.mlp_norm\.(weight|bias)", "h.{0}.ln_2.{1}", None),
        (r"blocks\.(\d+)\.mlp\.fc\.(weight|bias)", "h.{0}.mlp.c_fc.{1}", "T"),
        (r"blocks\.(\d+)\.mlp\.proj\.(weight|bias)", "h.{0}.mlp.c_proj.{1}", "T"),
        (r"norm_f\.(weight|bias)", "ln_f.{0}", None),
    ],
    "llama": [
        (r"tok_emb\.weight", "embed_tokens.weight", None),
        (r"blocks\.(\d+)\.attn\.([qkvo]_proj)\.(weight|bias)", "layers.{0}.self_attn.{1}.{2}", None),
        (r"blocks\.(\d+)\.mlp\.((?:gate|up|down)_proj)\.(weight|bias)", "layers.{0}.mlp.{1}.{2}", None),
        (r"blocks\.(\d+)\.attn_norm\.weight", "layers.{0}.input_layernorm.weight", None),
        (r"blocks\.(\d+)\.mlp_norm\.weight", "layers.{0}.post_attention_layernorm.weight", None),
        (r"norm_f\.weight", "norm.weight", None),
    ],
    "bert": [
        (r"tok_emb\.weight", "embeddings.word_embeddings.weight", None),
        (r"pos_emb\.weight", "embeddings.position_embeddings.weight", None),
        (r"type_emb\.weight", "embeddings.token_type_embeddings.weight", None),
        (r"emb_norm\.(weight|bias)", "embeddings.LayerNorm.{0}", None),
        (r"blocks\.(\d+)\.attn\.q_proj\.(weight|bias)", "encoder.layer.{0}.attention.self.query.{1}", None),
        (r"blocks\.(\d+)\.attn\.k_proj\.(weight|bias)", "encoder.layer.{0}.attention.self.key.{1}", None),
        (r"blocks\.(\d+)\.attn\.v_proj\.(weight|bias)", "encoder.layer.{0}.attention.self.value.{1}", None),
        (r"blocks\.(\d+)\.attn\.o_proj\.(weight|bias)", "encoder.layer.{0}.attention.output.dense.{1}", None),
        (r"blocks\.(\d+)\.attn_norm\.(weight|bias)", "encoder.layer.{0}.attention.output.LayerNorm.{1}", None),
        (r"blocks\.(\d+)\.mlp\.fc\.(weight|bias)", "encoder.layer.{0}.intermediate.dense.{1}", None),
        (r"blocks\.(\d+)\.mlp\.proj\.(weight|bias)", "encoder.layer.{0}.output.dense.{1}", None),
        (r"blocks\.(\d+)\.mlp_norm\.(weight|bias)", "encoder.layer.{0}.output.LayerNorm.{1}", None),
    ],
}
# The Hugging Face class each export is for: its weights carry that class's prefix. BERT is
# written as BertModel (no "bert." prefix, no pooler: BertModel's pooler is a head we do not build).
_HF_CLASS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "bert": "BertModel"}
_HF_WRITE_PREFIX = {"gpt2": "transformer.", "llama": "model.", "bert": ""}
# What each Hugging Face model type computes, as our config's fields: anything else cannot be
# written in its layout (e.g. a gpt2-family model with rope positions).
_HF_ARCH = {
    "gpt2": dict(norm="layernorm", positions="learned", mlp="gelu_tanh", post_norm=False, causal=True,
                 lm_head=True, token_types=False, emb_norm=False, bias=True, qkv_bias=True, mlp_bias=True),
    "llama": dict(norm="rmsnorm", positions="rope", mlp="swiglu", post_norm=False, causal=True,
                  lm_head=True, token_types=False, emb_norm=False),
    "bert": dict(norm="layernorm", positions="learned", mlp="gelu", post_norm=True, causal=False,
                 lm_head=False, token_types=True, emb_norm=True, bias=True, qkv_bias=True, mlp_bias=True),
}


def hf_model_type(config: ModelConfig) -> str:
    """The Hugging Face model_type that computes exactly what `config` does, or a CheckpointError
    naming the field no Hugging Face layout of its family can express."""
    fam = config.family
    wrong = [f"{k}={getattr(config, k)!r} (the {fam} layout has {v!r})"
             for k, v in _HF_ARCH[fam].items() if getattr(config, k) != v]
    if fam != "llama" and config.n_kv_head != config.n_head:
        wrong.append(f"n_kv_head={config.n_kv_head} (grouped-query attention needs the llama layout)")
    if fam != "llama" and config.head_dim * config.n_head != config.n_embd:
        wrong.append(f"head_dim={config.head_dim} (the {fam} layout has n_embd / n_head)")
    if fam == "llama" and config.qkv_bias != config.bias:
        if not (config.qkv_bias and not config.bias and not config.mlp_bias):
            wrong.append(f"qkv_bias={config.qkv_bias} with bias={config.bias}, mlp_bias={config.mlp_bias} "
                         "(Llama biases q, k, v and o together; Qwen2 biases q, k, v only)")
        else:
            return "qwen2"
    if wrong:
        raise CheckpointError("save_hf cannot write this model in a Hugging Face layout: " + "; ".join(wrong))
    return fam


def hf_config(config: ModelConfig, tokenizer=None) -> dict:
    """The Hugging Face config.json dict for `config` (the inverse of `config_from_hf`), with
    bos/eos/pad ids from `tokenizer` (a minituner Tokenizer) when given, else null."""
    mt = hf_model_type(config)
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    c, p = config, config.dropout
    if mt == "gpt2":
        fields_ = dict(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                       n_head=c.n_head, n_inner=None if c.intermediate_size == 4 * c.n_embd else c.intermediate_size,
                       activation_function="gelu_new", layer_norm_epsilon=c.norm_eps, resid_pdrop=p,
                       embd_pdrop=p, attn_pdrop=p, scale_attn_weights=True, tie_word_embeddings=c.tie_embeddings)
    elif mt in ("llama", "qwen2"):
        fields_ = dict(vocab_size=c.vocab_size, max_position_embeddings=c.block_size, hidden_size=c.n_embd,
                       num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                       head_dim=c.head_dim, intermediate_size=c.intermediate_size, hidden_act="silu",
                       rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                       rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                       attention_dropout=p, tie_word_embeddings=c.tie_embeddings)
        if mt == "llama":
            fields_.update(attention_bias=c.bias, mlp_bias=c.mlp_bias)
        else:
            fields_.update(use_sliding_window=False, sliding_window=None)
    else:
        fields_ = dict(vocab_size=c.vocab_size, max_position_embeddings=c.block_size, hidden_size=c.n_embd,
                       num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                       intermediate_size=c.intermediate_size, hidden_act="gelu", layer_norm_eps=c.norm_eps,
                       type_vocab_size=c.type_vocab_size, hidden_dropout_prob=p, attention_probs_dropout_prob=p,
                       position_embedding_type="absolute")
    return {"architectures": [_HF_CLASS[mt]], "model_type": mt, **fields_, **ids}


def to_hf_state_dict(state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> Hugging Face tensor names and layouts (inverse of `convert_hf_state_dict`).

    GPT-2: q, k, v (C, C) each are stacked into (3C, C) and transposed to c_attn's Conv1D (C, 3C);
    every other Linear is transposed too. A tied lm_head is not written (it is the embedding).
    """
    fam, prefix = config.family, _HF_WRITE_PREFIX[config.family]
    rules = [(re.compile(p), t, tr) for p, t, tr in _HF_RULES[fam]]
    out: dict[str, torch.Tensor] = {}
    for key, w in state.items():
        if key == "lm_head.weight":
            if not config.tie_embeddings:
                out["lm_head.weight"] = w  # the head sits outside the model prefix
            continue
        if fam == "gpt2" and (m := re.fullmatch(r"blocks\.(\d+)\.attn\.([qkv])_proj\.(weight|bias)", key)):
            if m.group(2) != "q":
                continue  # k and v are written with q, as one fused tensor
            parts = [state[f"blocks.{m.group(1)}.attn.{n}_proj.{m.group(3)}"] for n in "qkv"]
            fused = torch.cat(parts, dim=0)  # (3C, C) or (3C,)
            out[f"{prefix}h.{m.group(1)}.attn.c_attn.{m.group(3)}"] = fused.t() if fused.dim() == 2 else fused  # (C, 3C)
            continue
        for pattern, template, transform in rules:
            if (m := pattern.fullmatch(key)) is not None:
                out[prefix + template.format(*m.groups())] = w.t() if transform == "T" and w.dim() == 2 else w
                break
        else:
            raise CheckpointError(f"no Hugging Face {fam} name for our key {key!r}")
    return {k: v.contiguous() for k, v in out.items()}


def _plain_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights, checked to be exactly a base Transformer's (no injected modules)."""
    if not isinstance(getattr(model, "config", None), ModelConfig):
        raise TypeError("save_hf() needs a minituner Transformer (with a ModelConfig in .config)")
    with torch.device("meta"):
        expected = set(Transformer(model.config).state_dict())
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
    if extra or missing:
        raise CheckpointError(
            f"save_hf writes a plain {model.config.family} model, but this one has injected modules "
            f"(e.g. {(extra or missing)[:3]}): save the base model without them and the technique "
            "separately (LoRA: minituner.lora.save_peft, which PEFT loads on this export)")
    return state


def _tokenizer_config(tokenizer, config: ModelConfig) -> dict:
    """tokenizer_config.json for transformers' PreTrainedTokenizerFast over our tokenizer.json."""
    names = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id, "pad_token": tokenizer.pad_id}
    out = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.block_size,
           "clean_up_tokenization_spaces": False}
    out.update({k: tokenizer.id_to_token(i) for k, i in names.items() if i is not None})
    for k, tok in (("unk_token", "[UNK]"), ("cls_token", "[CLS]"), ("sep_token", "[SEP]"), ("mask_token", "[MASK]")):
        if tokenizer.backend.token_to_id(tok) is not None:  # WordPiece (BERT) files
            out[k] = tok
    return out


def save_hf(model: Transformer, directory: str | os.PathLike, family: str | None = None,
            tokenizer=None, *, overwrite: bool = False) -> Path:
    """Write `model` as a Hugging Face directory that `transformers` loads with no missing or
    unexpected weights, atomically (all files appear together, or none do):

        config.json              model_type gpt2 / llama / qwen2 / bert, bos/eos/pad ids
        model.safetensors        GPT2LMHeadModel / LlamaForCausalLM / Qwen2ForCausalLM / BertModel
        generation_config.json   (causal LMs with a tokenizer) the same bos/eos/pad ids
        tokenizer.json, tokenizer_config.json   (with a tokenizer) for AutoTokenizer

    family: optional check that the model is the family you expect (as in `load_hf`).
    tokenizer: a minituner Tokenizer, or the path of a tokenizer.json / a directory holding one.
    overwrite: a directory that already holds files is refused unless True; then the files
    listed above are replaced and any others in it are kept (as `save_pretrained` does).
    BERT is written as BertModel without a pooler: load it with
    `AutoModel.from_pretrained(dir, add_pooling_layer=False)`.
    """
    state = _plain_state(model)
    config = model.config
    if family is not None and family != config.family:
        raise CheckpointError(f"expected a {family} model, this one is {config.family}")
    if tokenizer is not None and not hasattr(tokenizer, "bos_id"):
        from minituner.tokenizer import Tokenizer  # checkpoint does not need tokenizers otherwise
        tokenizer = Tokenizer.load(tokenizer)
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                              f"{config.vocab_size}; pass the tokenizer the model was trained with")
    hf = hf_config(config, tokenizer)  # raises before anything is written
    hf["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    tensors = to_hf_state_dict(state, config)
    d = Path(directory)
    if d.is_file() or (d.is_dir() and any(d.iterdir()) and not overwrite):
        found = sorted(p.name for p in d.iterdir())[:10] if d.is_dir() else "a file"
        raise CheckpointError(f"{d} already exists and is not empty (holds {found}); pass overwrite=True to "
                              "replace the model files in it, or choose a new directory")
    with atomic_directory(d) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.backend.save(str(tmp / "tokenizer.json"))
            tok_cfg = _tokenizer_config(tokenizer, config)
            (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8")
            if config.lm_head:
                gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
                (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    return d
