"""Files written so that a crash never leaves a torn result, and files never read.

Every writer in minituner goes through the two helpers here:

- `atomic_file(path)`: write to a temporary file beside `path`, fsync it, rename it over
  `path`, fsync the directory. A reader sees the old file or the new one, never half of one,
  and after a power cut the rename has reached the disk.
- `atomic_directory(path)`: the same for a directory of files that belong together (a
  model's config.json and model.safetensors; a training checkpoint). Files go into a
  temporary sibling directory, which replaces `path` in one rename; files already in `path`
  that this write does not produce (a tokenizer.json, a README) are carried over. New weights
  can never sit beside an old config.

Pickle is never read: `refuse_pickle` names the conversion to safetensors instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# Files that only a pickle loader reads (torch.load, pickle.load): refused everywhere.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_pickle(path: str | os.PathLike, error: type[Exception] = ValueError) -> None:
    """Raise `error` if `path` is a pickle file, naming the one-time conversion."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise error(
            f"{path} is a pickle file; minituner never unpickles (it can run arbitrary code). "
            "Convert it to safetensors once, in an environment you trust, e.g. "
            "`transformers`' model.save_pretrained(dir, safe_serialization=True), or "
            "safetensors.torch.save_file(state_dict, 'model.safetensors').")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') contents to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path` (fsynced, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; ours is an ordinary file
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a UTF-8 text file atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces `path` in one rename.

    Entries of an existing `path` that the new directory does not hold are carried over
    (files hard-linked or copied, folders moved), so saving a model into a folder that also
    holds its tokenizer keeps the tokenizer.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    moved: list[str] = []  # folders carried over by rename: put back if anything fails
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                _fsync(f)
        if final.is_dir():
            for old in final.iterdir():
                if (tmp / old.name).exists():
                    continue
                if old.is_dir():
                    os.rename(old, tmp / old.name)
                    moved.append(old.name)
                else:
                    try:
                        os.link(old, tmp / old.name)
                    except OSError:  # no hard links here: copy
                        shutil.copy2(old, tmp / old.name)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        _fsync(tmp)
        if final.exists():
            aside = final.parent / f".{final.name}.old-{os.getpid()}"
            os.rename(final, aside)
            os.rename(tmp, final)
            shutil.rmtree(aside)
        else:
            os.rename(tmp, final)
        _fsync(final.parent)
    except BaseException:
        for name in moved:
            if (tmp / name).exists() and final.is_dir():
                os.rename(tmp / name, final / name)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
