"""Tests for kernels/blockwise.py: the dynamic 8-bit map and 8-bit blockwise quantization."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minituner.kernels.blockwise import dequantize_blockwise, dynamic_code, quantize_blockwise


def test_dynamic_code_by_hand():
    """Signed map: exponent i = 0 has 2^(0+7-7) = 1 fraction step over [0.1, 1], middle 0.55,
    decade 10^-6, so +-5.5e-7 are the smallest non-zero codes; i = 6 has 64 steps of 0.9/64 in
    decade 1, the largest middle being 1 - 0.9/128 = 0.99297; plus 0 and 1.0 -> 256 values."""
    code = dynamic_code(signed=True)
    assert code.shape == (256,) and bool((code[1:] >= code[:-1]).all())
    nonzero = code[code != 0].abs()
    assert nonzero.min().item() == pytest.approx(5.5e-7)
    assert code[0].item() == pytest.approx(-(1 - 0.9 / 128))
    assert code[-1].item() == 1.0 and code[-2].item() == pytest.approx(1 - 0.9 / 128)
    assert (code == 0).sum() == 1


def test_unsigned_dynamic_code():
    """Unsigned: one more fraction bit per exponent, all values >= 0, zero padding at the bottom."""
    code = dynamic_code(signed=False)
    assert code.shape == (256,) and bool((code >= 0).all()) and code[-1] == 1.0


def test_dynamic_code_equals_bitsandbytes():
    bnbF = pytest.importorskip("bitsandbytes.functional")
    for signed in (True, False):
        assert torch.equal(dynamic_code(signed), bnbF.create_dynamic_map(signed))


def test_quantize_by_hand():
    """Block [2, -1, 0, 0.5] (blocksize 16, padded by zeros): absmax 2, x/2 = [1, -0.5, 0, 0.25];
    1.0 and 0 are codes exactly, so they come back exactly."""
    x = torch.zeros(16)
    x[:4] = torch.tensor([2.0, -1.0, 0.0, 0.5])
    codes, absmax = quantize_blockwise(x, blocksize=16)
    assert absmax.tolist() == [2.0]
    y = dequantize_blockwise(codes, absmax, blocksize=16)
    assert y[0].item() == 2.0 and y[2].item() == 0.0
    code = dynamic_code()
    assert code[int(codes[0])].item() == 1.0


def test_nan_raises_and_empty():
    x = torch.randn(300)
    x[5] = float("nan")
    with pytest.raises(ValueError, match=r"1 NaN/Inf element\(s\) out of 300"):
        quantize_blockwise(x)
    with pytest.raises(ValueError, match="empty"):
        quantize_blockwise(torch.empty(0))
    with pytest.raises(ValueError, match="absmax values"):
        dequantize_blockwise(torch.zeros(300, dtype=torch.uint8), torch.ones(1))


def test_unsorted_or_non_finite_code_raises():
    """Nearest code is found by bisecting the code's midpoints, so an unsorted code would give
    silently wrong indices: with the map reversed, 1.0 would not come back as 1.0. It raises,
    naming the fix; so does a code holding NaN."""
    x = torch.randn(300)
    with pytest.raises(ValueError, match=r"sorted in ascending order.*code.sort\(\).values"):
        quantize_blockwise(x, code=dynamic_code().flip(0))
    shuffled = dynamic_code()[torch.randperm(256, generator=torch.Generator().manual_seed(0))]
    with pytest.raises(ValueError, match="sorted"):
        quantize_blockwise(x, code=shuffled)
    bad = dynamic_code().clone()
    bad[-1] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantize_blockwise(x, code=bad)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 2000),
    blocksize=st.sampled_from([16, 64, 256]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_bound(n, blocksize, dtype, seed):
    """|x - x~| <= absmax_b * max(largest gap / 2, 1 + min code); shape kept, dtype restored.

    The signed map's lowest value is -0.99297, so x = -absmax lands 0.00703 * absmax away, which
    is also (to rounding) half the largest gap, 0.9/64 / 2."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)
    codes, absmax = quantize_blockwise(x, blocksize)
    y = dequantize_blockwise(codes, absmax, blocksize)
    code = dynamic_code()
    half_gap = max(float((code[1:] - code[:-1]).max()) / 2, 1 + float(code[0]))
    bound = absmax.repeat_interleave(blocksize)[:n] * half_gap * (1 + 1e-5)
    assert codes.shape == x.shape and bool(((x.float() - y).abs() <= bound).all())
    assert dequantize_blockwise(codes, absmax, blocksize, dtype=dtype).dtype == dtype


def test_agreement_with_bitsandbytes_cpu_kernel():
    """>= 99% of codes equal bitsandbytes' CPU C++ quantize_blockwise and every other code is a
    neighbour (it divides by absmax and compares float distances instead of midpoints, and sets
    the map's lowest value to -1.0); absmax is identical."""
    bnbF = pytest.importorskip("bitsandbytes.functional")
    x = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0))
    codes, absmax = quantize_blockwise(x, 256)
    ref_codes, state = bnbF.quantize_blockwise(x, code=dynamic_code().clone(), blocksize=256)
    assert torch.equal(absmax, state.absmax)
    diff = (codes.long() - ref_codes.long()).abs()
    assert (diff == 0).float().mean().item() >= 0.99
    assert diff.max().item() <= 1
