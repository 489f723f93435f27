"""Tests for kernels/bench.py and benchmarks/optimizer_speed.py on tiny sizes.

No timing is asserted: the tests check that what the tables report is consistent with the sizes
(bytes moved, ratios), that the timed functions compute the right thing, and that a missing
column says why.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minituner.kernels import bench
from minituner.kernels.nf4 import dequantize_nf4, double_quantize, quantize_nf4

OPTIMIZER_SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "optimizer_speed.py"


def without(monkeypatch, *modules: str) -> None:
    """Make `import m` raise ImportError for each module, as if it were not installed."""
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


def test_bench_rows_are_consistent_with_the_sizes(monkeypatch):
    """A 32 x 32 weight moves 32*32*4 + 512 + 16*4 = 4672 bytes in float32 (input, codes, one
    float32 absmax per 64 values) and 32*32*2 + 512 + 64 = 2624 in bfloat16, so GB/s * ms * 1e6
    gives those bytes back; 'of copy' is GB/s over the copy row's GB/s."""
    without(monkeypatch, "bitsandbytes", "bitsandbytes.functional", "torchao")
    rows, _ = bench.run(size=32, repeats=1, device="cpu")
    assert rows[0]["op"] == "copy (ceiling)" and rows[0]["of copy"] == 1.0
    ceiling = rows[0]["GB/s"]
    moved = {"float32": 4672, "bfloat16": 2624}
    nf4 = [r for r in rows if r["op"].startswith("nf4")]
    assert sorted((r["op"], r["dtype"]) for r in nf4) == sorted(
        (op, dt) for op in ("nf4 quantize", "nf4 dequantize") for dt in ("float32", "bfloat16")
    )
    for r in nf4:
        assert r["GB/s"] * r["ms"] * 1e6 == pytest.approx(moved[r["dtype"]], rel=1e-9)
        assert r["of copy"] == pytest.approx(r["GB/s"] / ceiling, rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_timed_functions_compute_the_right_thing(dtype):
    """What the bench times is NF4 itself: its quantize returns the readable path's bytes, its
    dequantize the readable path's values, and every alternative it times runs and returns."""
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)).to(dtype)
    fns, _ = bench.quant_fns(x)
    packed, absmax = quantize_nf4(x, fast=False)
    q_packed, q_absmax = fns["q"]()
    assert torch.equal(q_packed, packed) and torch.equal(q_absmax, absmax)
    assert torch.equal(fns["d"](), dequantize_nf4(packed, absmax, x.shape, dtype=dtype, fast=False))
    if "q+dq" in fns:
        assert all(torch.equal(a, b) for a, b in zip(fns["q+dq"](), double_quantize(absmax)))
    for name, fn in fns.items():
        assert fn() is not None, name


def test_missing_columns_say_why(monkeypatch, capsys):
    """Without bitsandbytes and torchao their columns are absent and the output says why; the
    legend says what a ratio above 1 means."""
    without(monkeypatch, "bitsandbytes", "bitsandbytes.functional", "torchao")
    rows, notes = bench.run(size=16, repeats=1)
    assert not any("bitsandbytes" in r or "torchao" in r for r in rows)
    assert notes == ["bitsandbytes: not installed (pip install bitsandbytes)", "torchao: not installed (pip install torchao)"]
    bench.main(["--size", "16", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "missing column, bitsandbytes: not installed" in out and "missing column, torchao: not installed" in out
    assert "above 1 ours is faster" in out


def test_bitsandbytes_column_is_their_time_over_ours():
    pytest.importorskip("bitsandbytes.functional", reason="the bitsandbytes column needs bitsandbytes")
    rows, notes = bench.run(size=32, repeats=1)
    assert not any(n.startswith("bitsandbytes") for n in notes)
    assert all(r["bitsandbytes"] > 0 for r in rows if r["op"].startswith("nf4"))


def test_cli_rejects_bad_arguments_and_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0"])
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    assert "(default: 4096)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- optimizer_speed
def load_optimizer_speed():
    spec = importlib.util.spec_from_file_location("optimizer_speed", OPTIMIZER_SPEED)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("tensors", [1, 4])
def test_optimizer_speed_rows(capsys, tensors):
    """The paged optimizers take the same steps as torch AdamW on the same parameters (max
    |dtheta| at float32 rounding); above the state size no page moves after the first step; at a
    quarter of it LRU pages in every page each step and "newest" fewer; AdamW/ours is the faster
    torch AdamW's (fused or not) time over ours."""
    speed = load_optimizer_speed()
    rows = speed.run(size=32, repeats=2, device="cpu", tensors=tensors)
    ms = {r["op"]: r["ms"] for r in rows}
    paged = {r["op"]: r for r in rows if r["op"].startswith("PagedAdamW")}
    assert [r["op"] for r in rows][0] == speed.TORCH and list(paged) == list(speed.PAGED)
    for r in paged.values():
        assert r["max |dtheta|"] <= 1e-6
        assert r["AdamW/ours"] == pytest.approx(min(ms[speed.TORCH], ms[speed.FUSED]) / r["ms"], rel=1e-9)
    resident = [r for name, r in paged.items() if "budget > state" in name]
    assert all(r["pages in/step"] == 0 for r in resident)
    lru, newest = paged["PagedAdamW, budget = state/4, lru"], paged["PagedAdamW, budget = state/4, newest"]
    assert lru["pages in/step"] == lru["pages"] and 0 < newest["pages in/step"] < lru["pages"]
    with pytest.raises(SystemExit):
        speed.main(["--help"])
    assert "(default: 2048)" in capsys.readouterr().out


def test_optimizer_speed_cli_rejects_bad_arguments():
    speed = load_optimizer_speed()
    for argv in (["--tensors", "0"], ["--size", "8", "--tensors", "5"]):
        with pytest.raises(SystemExit):
            speed.main(argv)


# ----------------------------------------------------------------------------- the CUDA check
CUDA_CHECK = OPTIMIZER_SPEED.parent / "cuda_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure without CUDA")
def test_benchmarks_refuse_cuda_clearly_without_it(capsys):
    """--device cuda on a machine without CUDA: both benchmarks stop at argument parsing with a
    one-line error that names the fix, before any work."""
    for main in (bench.main, load_optimizer_speed().main):
        with pytest.raises(SystemExit) as exit_:
            main(["--device", "cuda"])
        assert exit_.value.code == 2
        assert "torch.cuda.is_available() is False; use --device cpu" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the script would run the checks")
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_cuda_check_script_parses_and_says_why_it_cannot_run():
    """benchmarks/cuda_check.sh is valid bash; without CUDA it exits 2 and says so, and with an
    interpreter lacking torch it says to activate the environment."""
    assert subprocess.run(["bash", "-n", str(CUDA_CHECK)], capture_output=True).returncode == 0
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(CUDA_CHECK)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "no CUDA device here" in done.stderr
    env["PYTHON"] = "/bin/false"
    done = subprocess.run(["bash", str(CUDA_CHECK)], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2 and "cannot import torch and minituner" in done.stderr
