"""The command line, as a newcomer meets it (minituner/__main__.py).

The main job runs with no arguments and from any directory; its options work without naming
the default command; --help shows the defaults and where the base model is looked up. Every
bad input ends with exactly ONE line on stderr that names the fix, a non-zero exit status, and
no traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minituner.__main__ import main
from minituner.checkpoint import find_base_model

BASE = find_base_model()


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    """main(argv) as the shell would see it: exit status, stdout, stderr."""
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse exits on usage errors and --help
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, *argv: str) -> str:
    code, out, err = run_main(capsys, *argv)
    assert code not in (0, None), (argv, out, err)
    assert "Traceback" not in err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("minituner"), (argv, err)
    assert out == "", (argv, out)
    return lines[0]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A copy of the base model's three files, to damage one at a time."""
    d = tmp_path / "model"
    d.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(BASE / f, d / f)
    return d


# -- the main job -------------------------------------------------------------------------------------
def test_default_command_from_another_directory(tmp_path):
    """`python -m minituner` with no arguments generates, wherever it is started."""
    done = subprocess.run([sys.executable, "-m", "minituner", "--max-new-tokens", "8"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().split("\n")
    assert len(lines) == 3 and lines[0].startswith("Ada lives in\u2192 ")


def test_default_command_takes_its_options_unnamed(capsys):
    """`minituner --prompt X` is `minituner generate --prompt X` (greedy: the same text)."""
    code, out, err = run_main(capsys, "--prompt", "Ada lives in", "--max-new-tokens", "6")
    assert code == 0, err
    assert out == run_main(capsys, "generate", "--prompt", "Ada lives in", "--max-new-tokens", "6")[1]
    assert out.startswith("Ada lives in\u2192") and out.count("\n") == 1


def test_sampling_options_are_used_and_seeded(capsys):
    """Sampled text differs from greedy, and one seed gives one text."""
    args = ("--prompt", "On Monday, Ben", "--max-new-tokens", "8")
    greedy = run_main(capsys, *args)[1]
    a = run_main(capsys, *args, "--temperature", "1.5", "--top-k", "50", "--seed", "1")[1]
    b = run_main(capsys, *args, "--temperature", "1.5", "--top-k", "50", "--seed", "1")[1]
    assert a == b and a != greedy


def test_help_shows_defaults_and_the_weights_search_order(capsys):
    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    assert "(default: 48)" in out and "(default: 0.0)" in out  # generate's options, at the top level
    assert "MINITUNER_WEIGHTS" in out and "minituner/weights/base" in out and "source checkout" in out
    assert "pretrain" in out
    assert "(default: weights/base)" in run_main(capsys, "pretrain", "--help")[1]


# -- every bad input: one line naming the fix ---------------------------------------------------------
@pytest.mark.parametrize("argv, fix", [
    (("--max-new-tokens", "-1"), r"--max-new-tokens: -1 is out of range: need 0 <= N"),
    (("--max-new-tokens", "1000"), r"exceeds the model's context of 256 tokens: use --max-new-tokens 2\d\d or less"),
    (("--max-new-tokens", "ten"), r"--max-new-tokens: 'ten' is not an integer"),
    (("--temperature", "-0.5"), r"--temperature: -0.5 is out of range: need 0 <= T"),
    (("--temperature", "nan"), r"--temperature: nan is out of range"),
    (("--temperature", "inf"), r"--temperature: inf is out of range"),
    (("--top-k", "0"), r"--top-k: 0 is out of range: need 1 <= K"),
    (("--top-p", "0"), r"--top-p: 0 is out of range: need 0 < P <= 1"),
    (("--top-p", "1.5"), r"--top-p: 1.5 is out of range: need 0 < P <= 1"),
    (("--device", "tpu9"), r"--device 'tpu9' is not a device name; use cpu"),
    (("--colour", "red"), r"unrecognized arguments: --colour red \(see `minituner --help`\)"),
    (("pretrain", "--max-steps", "0"), r"--max-steps: 0 is out of range: need 1 <= N"),
])
def test_bad_option_values(capsys, argv, fix):
    import re

    assert re.search(fix, one_line_error(capsys, *argv))


def test_prompt_longer_than_the_context(capsys):
    line = one_line_error(capsys, "--prompt", "Ada lives in Ashford. " * 100)
    assert "tokens; the model's context holds 256" in line and "shorten the prompt" in line


def test_device_that_is_not_there(capsys):
    """--device cuda on a CPU build (or a GPU index past the last one on a GPU machine)."""
    name = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    line = one_line_error(capsys, "--device", name)
    assert f"--device {name}" in line and ("use --device cpu" in line or "use cuda:0" in line)


def test_mistyped_weights_path_says_check_the_path(capsys, tmp_path):
    """A typo is not a reason for a 36-minute pre-training: the message says check the path."""
    line = one_line_error(capsys, "--weights", str(tmp_path / "wieghts/base"))
    assert "does not exist; check the path" in line and "pretrain" not in line
    line = one_line_error(capsys, "--weights", str(tmp_path))
    assert "holds no config.json" in line and "check the path" in line


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_damaged_weights_name_the_file(capsys, model_dir, damage):
    f = model_dir / "model.safetensors"
    f.write_bytes(b"" if damage == "empty" else f.read_bytes()[:100_000])
    line = one_line_error(capsys, "--weights", str(model_dir))
    assert f"{f} (" in line and "is not a complete safetensors file" in line


def test_pickle_only_weights_are_refused(capsys, model_dir, monkeypatch):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    (model_dir / "model.safetensors").unlink()
    (model_dir / "pytorch_model.bin").write_bytes(b"\x80\x04not read")
    line = one_line_error(capsys, "--weights", str(model_dir))
    assert "pytorch_model.bin is a pickle file" in line and "Convert it to safetensors" in line


def test_missing_tokenizer(capsys, model_dir):
    (model_dir / "tokenizer.json").unlink()
    line = one_line_error(capsys, "--weights", str(model_dir))
    assert f"no tokenizer.json in {model_dir}" in line


def test_malformed_tokenizer(capsys, model_dir):
    (model_dir / "tokenizer.json").write_text('{"model": ')
    line = one_line_error(capsys, "--weights", str(model_dir))
    assert f"{model_dir / 'tokenizer.json'} is not a valid tokenizer.json" in line


@pytest.mark.parametrize("text, problem", [
    ('{"family": "gpt2",', "is not valid JSON (line 1"),
    (json.dumps({"family": "gpt2", "layers": 4}), "is not a minituner model config"),
])
def test_malformed_config(capsys, model_dir, text, problem):
    (model_dir / "config.json").write_text(text)
    line = one_line_error(capsys, "--weights", str(model_dir))
    assert f"{model_dir / 'config.json'} {problem}" in line


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    """The same through `python -m minituner` itself: exit status 2, one line on stderr."""
    done = subprocess.run([sys.executable, "-m", "minituner", "--weights", str(tmp_path / "nope")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr


@pytest.mark.slow
def test_non_editable_install_runs_the_main_job(tmp_path):
    """`pip install .` (not editable) ships weights/base inside the package, so the main job runs
    outside a checkout. Built from a copy of the sources (nothing is written into the checkout),
    offline (no build isolation), installed with --target, run from an unrelated directory."""
    pytest.importorskip("setuptools")
    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(repo / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("minituner", "kernels", "weights"):
        shutil.copytree(repo / name, src / name, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheels = tmp_path / "wheels"
    done = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (wheel,) = wheels.glob("minituner-*.whl")
    site = tmp_path / "site"
    done = subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (site / "minituner" / "weights" / "base" / "model.safetensors").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MINITUNER_WEIGHTS"}
    env["PYTHONPATH"] = str(site)  # ahead of the checkout's editable install
    code = "import minituner, minituner.checkpoint as c; print(minituner.__file__); print(c.find_base_model())"
    done = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    module, weights = done.stdout.split()
    assert Path(module).is_relative_to(site) and Path(weights) == site / "minituner" / "weights" / "base"
    done = subprocess.run([sys.executable, "-m", "minituner", "--max-new-tokens", "4"], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Ada lives in\u2192")
