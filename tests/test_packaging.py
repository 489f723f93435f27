"""Packaging: the installed import names collide with nothing on PyPI.

The folder `kernels/` is installed as `minituner.kernels` (pyproject's package-dir), because
the top-level name `kernels` belongs to Hugging Face's kernel hub, which transformers,
bitsandbytes and trl try to import. Run from outside the checkout, so the source folder is
not on sys.path.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_kernels_import_as_minituner_kernels(tmp_path):
    origin = _run("import minituner.kernels.nf4 as m; print(m.__file__)", tmp_path)
    assert Path(origin).name == "nf4.py"


def test_installed_minituner_provides_no_top_level_kernels(tmp_path):
    code = "import importlib.util; s = importlib.util.find_spec('kernels'); print(s.origin if s else '')"
    origin = _run(code, tmp_path)
    if origin:  # someone installed Hugging Face's `kernels`: it must be theirs, not our folder
        assert not Path(origin).resolve().is_relative_to(REPO / "kernels"), origin
    files = importlib.metadata.files("minituner") or []
    top = {str(f).split("/")[0] for f in files}
    assert "kernels" not in top, f"minituner installs a top-level 'kernels': {sorted(top)}"
