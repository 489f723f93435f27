"""Training state on disk: resumable checkpoints in safetensors + JSON, never pickle.

A checkpoint is everything that decides the rest of a run, so that resuming gives the same
final weights, bit for bit on the CPU, as never stopping:

    step_00000600/
        model.safetensors       the parameters and buffers (tied weights stored once)
        optimizer.safetensors   the optimizer's per-parameter tensors ("state.<id>.<name>")
        optimizer.json          the rest of optimizer.state_dict(): param_groups and scalars
        rng.safetensors         torch (CPU, every CUDA device) and numpy generator states
        rng.json                python's random state, numpy's position
        trainer_state.json      step, data position (epoch, batch), tokens seen, history, config

`torch.save` would store all of it in one pickle, and loading a pickle runs whatever code it
names; here tensors go to safetensors and everything else to JSON, with tuples and dtypes
tagged so the round trip is exact (`optimizer_state_to_safetensors` and its inverse).

A checkpoint directory is written by `minituner.files.atomic_directory`: the files go to a
temporary sibling, are fsynced, and the directory appears by one rename, complete or not at
all. `latest_checkpoint` only ever sees complete ones.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, load_model, save_file, save_model

from minituner.files import atomic_directory

CHECKPOINT_PREFIX = "step_"  # step_00000600: zero-padded, so names sort by step


# ---------------------------------------------------------------------------- JSON with tuples and dtypes
def _to_json(x):
    if isinstance(x, tuple):
        return {"__tuple__": [_to_json(v) for v in x]}
    if isinstance(x, list):
        return [_to_json(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _to_json(v) for k, v in x.items()}
    if isinstance(x, torch.dtype):
        return {"__dtype__": str(x).removeprefix("torch.")}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"optimizer state holds a {type(x).__name__}, which cannot be stored without pickle")


def _from_json(x):
    if isinstance(x, dict):
        if "__tuple__" in x:
            return tuple(_from_json(v) for v in x["__tuple__"])
        if "__dtype__" in x:
            return getattr(torch, x["__dtype__"])
        return {k: _from_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_json(v) for v in x]
    return x


# ---------------------------------------------------------------------------- optimizer state
def optimizer_state_to_safetensors(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into tensors ("state.<param id>.<name>") and a JSON tree."""
    tensors, meta = {}, {"param_groups": _to_json(state_dict["param_groups"]), "state": {}}
    for pid, st in state_dict["state"].items():
        entry = {}
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = v.detach().cpu().contiguous().clone()
                entry[name] = {"__tensor__": f"state.{pid}.{name}"}
            else:
                entry[name] = _to_json(v)
        meta["state"][str(pid)] = entry
    return tensors, meta


def optimizer_state_from_safetensors(tensors: Mapping[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of `optimizer_state_to_safetensors`: a dict for `optimizer.load_state_dict`."""
    state = {}
    for pid, entry in meta["state"].items():
        state[int(pid)] = {name: (tensors[v["__tensor__"]] if isinstance(v, dict) and "__tensor__" in v
                                  else _from_json(v)) for name, v in entry.items()}
    return {"state": state, "param_groups": _from_json(meta["param_groups"])}


# ---------------------------------------------------------------------------- random number generators
def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """The torch (CPU and every CUDA device), numpy and python generator states, as
    (tensors, JSON): dropout masks and any sampling after a resume continue the same stream."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    meta = {"python": _to_json(random.getstate()), "numpy": [kind, int(pos), int(has_gauss), float(gauss)]}
    return tensors, meta


def set_rng_state(tensors: Mapping[str, torch.Tensor], meta: dict) -> None:
    """Inverse of `rng_state`."""
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len([k for k in tensors if k.startswith("cuda.")]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    random.setstate(_from_json(meta["python"]))
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))


# ---------------------------------------------------------------------------- checkpoints
def _checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints in `root`, oldest first. Temporary directories are hidden
    (".step_...tmp") and never match."""
    return sorted(p for p in root.glob(CHECKPOINT_PREFIX + "*")
                  if p.is_dir() and (p / "trainer_state.json").is_file())


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint (`step_XXXXXXXX`) in the directory, or None."""
    d = Path(checkpoint_dir)
    done = _checkpoints(d) if d.is_dir() else []
    return done[-1] if done else None


def save_checkpoint(checkpoint_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict, keep: int = 2) -> Path:
    """Write `checkpoint_dir/step_<step>` atomically (`files.atomic_directory`); then remove
    the older checkpoints beyond the newest `keep`."""
    if keep < 1:
        raise ValueError(f"keep={keep}: keep at least the checkpoint just written")
    root = Path(checkpoint_dir)
    final = root / f"{CHECKPOINT_PREFIX}{trainer_state['step']:08d}"
    opt_tensors, opt_meta = optimizer_state_to_safetensors(optimizer.state_dict())
    rng_tensors, rng_meta = rng_state()
    with atomic_directory(final) as tmp:
        save_model(model, str(tmp / "model.safetensors"))  # handles tied (shared) weights
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        for name, obj in (("optimizer.json", opt_meta), ("rng.json", rng_meta),
                          ("trainer_state.json", trainer_state)):
            (tmp / name).write_text(json.dumps(obj, indent=1), encoding="utf-8")
    for stale in _checkpoints(root)[:-keep]:
        shutil.rmtree(stale)
    return final


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True) -> dict:
    """Load a checkpoint written by `save_checkpoint` into `model` (and `optimizer`, RNGs);
    returns its trainer_state dict."""
    path = Path(path)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete training checkpoint (no trainer_state.json); "
                                "use latest_checkpoint(dir) to find one")
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing keys {missing[:10]}, "
                         f"unexpected keys {unexpected[:10]}; build the model with the same config and adapters")
    if optimizer is not None:
        meta = json.loads((path / "optimizer.json").read_text(encoding="utf-8"))
        optimizer.load_state_dict(optimizer_state_from_safetensors(load_file(str(path / "optimizer.safetensors")),
                                                                   meta))
    if restore_rng:
        set_rng_state(load_file(str(path / "rng.safetensors")),
                      json.loads((path / "rng.json").read_text(encoding="utf-8")))
    return json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
