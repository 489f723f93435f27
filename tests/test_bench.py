"""Tests for kernels/bench.py on a tiny weight: the table is complete and consistent (no timing asserts)."""

import pytest

from minituner.kernels import bench


def test_bench_functions_on_tiny_size(capsys):
    rows = bench.run(size=32, repeats=1, device="cpu")
    ops = [r["op"] for r in rows]
    assert ops[0] == "copy (ceiling)"
    assert ops.count("nf4 quantize") == 2 and ops.count("nf4 dequantize") == 2  # float32, bfloat16
    assert {r["dtype"] for r in rows if r["op"].startswith("nf4")} == {"float32", "bfloat16"}
    assert all(r["ms"] > 0 for r in rows if "ms" in r)
    paged = [r for r in rows if r["op"].startswith("PagedAdamW")]
    assert len(paged) == 2
    # above the state size nothing moves after the first step; at a quarter of it pages do
    assert paged[0]["pages in/step"] == 0 and paged[1]["pages in/step"] > 0
    table = bench.format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "GB/s" in table


def test_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0"])
