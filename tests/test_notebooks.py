"""Execute every chapter notebook top to bottom on the CPU.

Each notebook in notebooks/ is found by glob, so a new chapter is tested the moment it
lands. A cell that raises fails the test; a notebook slower than its limit fails too (the
course promises each chapter runs in a few minutes on a laptop CPU: 5 minutes on 2 cores).
The kernel starts in an empty temporary directory, not in notebooks/, so no notebook depends
on where it is started: the base model is found by `minituner.checkpoint.find_base_model()`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
# Per-cell and per-notebook limits, in seconds. A chapter that needs longer is too slow
# for the course's promise and should be made smaller, not given more time.
CELL_TIMEOUT = int(os.environ.get("MINITUNER_NB_CELL_TIMEOUT", "300"))
NOTEBOOK_TIMEOUT = int(os.environ.get("MINITUNER_NB_TIMEOUT", "300"))


def test_notebooks_exist() -> None:
    """The course has at least one chapter, and every chapter is named NN_title.ipynb."""
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"
    strays = [p.name for p in NOTEBOOK_DIR.glob("*.ipynb") if p not in NOTEBOOKS]
    assert not strays, f"notebooks must be named NN_title.ipynb: {strays}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    import time

    monkeypatch.delenv("MINITUNER_WEIGHTS", raising=False)  # the kernel finds the model itself
    nb = nbformat.read(path, as_version=4)
    deadline = time.monotonic() + NOTEBOOK_TIMEOUT

    def remaining(cell) -> int:
        # The notebook's limit is enforced by nbclient itself: each cell may use at most
        # what is left of the notebook's budget, so a slow chapter stops with
        # CellTimeoutError instead of hanging CI.
        return max(1, min(CELL_TIMEOUT, int(deadline - time.monotonic())))

    client = nbclient.NotebookClient(
        nb,
        timeout_func=remaining,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's cwd: not notebooks/
    )
    client.execute()  # raises CellExecutionError naming the cell on any error
