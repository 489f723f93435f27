"""Tests for kernels/nf4.py: codebooks, NF4 blockwise quantization, double quantization."""

import math
from statistics import NormalDist

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minituner.kernels import nf4_fast
from minituner.kernels.blockwise import dynamic_code
from minituner.kernels.nf4 import (
    FP4_CODE,
    INT4_CODE,
    NF4_CODE,
    bits_per_parameter,
    dequantize_4bit,
    dequantize_nf4,
    double_dequantize,
    double_quantize,
    nf4_code,
    quantize_4bit,
    quantize_nf4,
)

# The 16 NF4 values published with QLoRA (bitsandbytes' get_4bit_type("nf4") / appendix E).
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


def reference_quantize(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[list[int], list[float]]:
    """Slow, obviously right reference: a Python loop per element, nearest code by midpoints.

    x / absmax is rounded to float32 as the kernel does: times the float32 reciprocal in full
    blocks, a float32 division in the partial last block.
    """
    f32 = torch.float32
    flat = x.reshape(-1).float()
    mids = ((code[:-1] + code[1:]) / 2).tolist()
    idx, absmax = [], []
    for start in range(0, flat.numel(), blocksize):
        block = flat[start : start + blocksize]
        a = torch.tensor(max(abs(v) for v in block.tolist()), dtype=f32)
        absmax.append(float(a))
        for v in block:
            if block.numel() == blocksize:
                s = float(v * (1.0 / a))
            else:
                s = float(v / a)
            idx.append(sum(1 for m in mids if m < s))  # ties -> lower code
    return idx, absmax


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:n]


# ----------------------------------------------------------------------------- codebooks
def test_nf4_code_matches_published_values():
    """Eq. 4 of arXiv 2305.14314: quantiles of N(0,1), 8 positive, 7 negative, exact zero."""
    derived = nf4_code()
    assert torch.allclose(derived, torch.tensor(PUBLISHED_NF4), atol=1e-7, rtol=0)
    assert torch.equal(NF4_CODE, derived)
    assert (derived > 0).sum() == 8 and (derived < 0).sum() == 7 and (derived == 0).sum() == 1


def quantile_levels(offset: float, count: int) -> list[float]:
    """`count` evenly spaced probabilities from `offset` towards 1/2 (linspace(offset, 0.5, count + 1)[:-1])."""
    return [offset - (offset - 0.5) * i / count for i in range(count)]


def test_nf4_code_by_hand():
    """NF4 from Python's own float64 normal quantile (statistics.NormalDist, not torch's ndtri):
    one quantile per level, p_i = 0.9677083 - i * (0.9677083 - 0.5) / 8 for the 8 positive
    values and / 7 for the 7 negative ones, divided by the largest, Q(0.9677083) = 1.8481.
    E.g. p_1 = 0.90924476, Q(p_1) = 1.3360, 1.3360 / 1.8481 = 0.72296 = NF4_CODE[14].
    Agrees with the code under test to float32 rounding (2e-7; the code spaces p on a float32 grid)."""
    Q = NormalDist().inv_cdf
    top = Q(0.9677083)
    assert top == pytest.approx(1.8481, abs=1e-4)
    positive = [Q(p) / top for p in quantile_levels(0.9677083, 8)]  # 1.0, 0.72296, ..., 0.0796
    negative = [-Q(p) / top for p in quantile_levels(0.9677083, 7)]  # -1.0, ..., -0.0911
    expected = sorted(negative + [0.0] + positive)
    assert positive[1] == pytest.approx(0.72296, abs=1e-5)
    assert NF4_CODE.tolist() == pytest.approx(expected, abs=2e-7)
    assert PUBLISHED_NF4 == pytest.approx(expected, abs=2e-7)


def test_nf4_is_one_quantile_per_level_not_the_eq4_average():
    """The docstring's claim: NF4_CODE takes one quantile per level (bitsandbytes' rule), not the
    average of two adjacent quantiles of Eq. 4. On the same levels the average would give a
    second-largest code of (Q(p_1) + Q(p_2)) / (Q(p_0) + Q(p_1)) = 0.746, the table has 0.723."""
    Q = NormalDist().inv_cdf
    p = quantile_levels(0.9677083, 8) + [0.5]
    one = [Q(v) / Q(p[0]) for v in p[:-1]]
    average = [(Q(p[i]) + Q(p[i + 1])) / (Q(p[0]) + Q(p[1])) for i in range(8)]
    assert NF4_CODE[8:].flip(0).tolist() == pytest.approx(one, abs=2e-7)
    assert average[1] == pytest.approx(0.7461, abs=1e-4)
    assert abs(NF4_CODE[14].item() - average[1]) > 0.02


def test_fp4_and_int4_codes():
    """E2M1 magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6} / 6; Int4 k/7; both sorted, in [-1, 1]."""
    assert FP4_CODE[8:].tolist() == pytest.approx([0, 1 / 12, 1 / 6, 1 / 4, 1 / 3, 1 / 2, 2 / 3, 1])
    assert torch.equal(FP4_CODE[:8], -FP4_CODE[8:].flip(0))
    assert INT4_CODE[8:].tolist() == pytest.approx([k / 7 for k in range(8)])
    for code in (NF4_CODE, FP4_CODE, INT4_CODE):
        assert code.shape == (16,) and bool((code[1:] >= code[:-1]).all())


# ----------------------------------------------------------------------------- layout and math
def test_packing_by_hand():
    """x = [1, -1, 0.5, 0] in one block: absmax 1, codes [15, 0, 12, 7] -> bytes 0xF0, 0xC7.

    0.5 lies between codes 12 (0.44071) and 13 (0.56262), whose midpoint 0.50166 is above 0.5,
    so 0.5 takes code 12; 0 is code 7. Bytes: (15 << 4) | 0 = 0xF0 and (12 << 4) | 7 = 0xC7.
    """
    packed, absmax = quantize_nf4(torch.tensor([1.0, -1.0, 0.5, 0.0]), blocksize=16)
    assert packed.tolist() == [0xF0, 0xC7]
    assert absmax.tolist() == [1.0]


def test_tie_goes_to_lower_code():
    """A value exactly on a midpoint takes the lower code (x / absmax == (Q_12 + Q_13) / 2)."""
    mid = float((NF4_CODE[12] + NF4_CODE[13]) / 2)
    packed, _ = quantize_nf4(torch.tensor([1.0, mid] + [0.0] * 14), blocksize=16)
    assert unpack(packed, 2).tolist() == [15, 12]


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("shape,blocksize", [((7, 13), 16), ((3, 50), 64), ((1,), 64), ((2, 257), 128)])
def test_matches_reference_loop(shape, blocksize, fast):
    """Codes and absmax equal a per-element Python reference, incl. odd sizes and a partial block,
    on the readable path (fast=False) and on the table-lookup path."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    packed, absmax = quantize_nf4(x, blocksize, fast=fast)
    idx, ref_absmax = reference_quantize(x, NF4_CODE, blocksize)
    assert packed.numel() == math.ceil(x.numel() / 2)
    assert absmax.numel() == math.ceil(x.numel() / blocksize)
    assert unpack(packed, x.numel()).tolist() == idx
    assert absmax.tolist() == pytest.approx(ref_absmax, rel=0, abs=0)


def test_fast_path_equals_bucketize_on_many_values():
    """The top-22-bit lookup plus exact fix-up equals bucketize on midpoints, for all 3 codebooks.

    Besides random blocks, blocks of absmax 1 (so X_i / N_b = X_i exactly) hold every midpoint,
    its two float32 neighbours and their negatives: the values a lookup is most likely to get wrong.
    """
    x = torch.randn(64 * 4096, generator=torch.Generator().manual_seed(2))
    x[:64] = torch.linspace(-1, 1, 64)  # a block that hits values near every midpoint
    for code in (NF4_CODE, FP4_CODE, INT4_CODE):
        mids = (code[:-1] + code[1:]) / 2  # (15,)
        up, down = torch.full_like(mids, 2.0), torch.full_like(mids, -2.0)
        near = torch.cat([mids, torch.nextafter(mids, up), torch.nextafter(mids, down)])  # (45,)
        edge = torch.cat([near, -near, torch.tensor([-1.0, 0.0])])  # (92,)
        rows = torch.cat([edge, torch.zeros(126 - edge.numel())]).view(2, 63)
        x[64:192] = torch.cat([torch.ones(2, 1), rows], dim=1).view(-1)  # blocks 1, 2 start with 1.0: N_b = 1
        packed, absmax = quantize_4bit(x, code, 64)
        s = x.view(-1, 64) * (1.0 / absmax)[:, None]
        ref = torch.bucketize(s.reshape(-1), (code[:-1] + code[1:]) / 2)
        assert torch.equal(unpack(packed, x.numel()).long(), ref)


def test_zero_blocks_and_dtypes():
    """All-zero blocks dequantize to exact zeros without NaN; every float dtype is preserved."""
    x = torch.zeros(3, 64)
    x[1] = torch.randn(64)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        packed, absmax = quantize_nf4(x.to(dtype))
        y = dequantize_nf4(packed, absmax, x.shape, dtype=dtype)
        assert y.dtype == dtype and y.shape == x.shape
        assert not torch.isnan(y).any() and torch.equal(y[0], torch.zeros(64, dtype=dtype))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf_raise_with_count(bad):
    x = torch.randn(10, 10)
    x[0, 0] = bad
    x[3, 7] = bad
    with pytest.raises(ValueError, match=r"2 NaN/Inf element\(s\) out of 100"):
        quantize_nf4(x)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_dequantize_rejects_non_finite_scales(bad, fast):
    """A NaN/Inf absmax (a corrupted checkpoint, a bad double dequantization) raises, naming the
    fix, instead of returning a block of NaN/Inf weights."""
    packed, absmax = quantize_nf4(torch.randn(300))
    absmax[2] = bad
    with pytest.raises(ValueError, match=r"NaN/Inf block scales.*quantize the weights again.*\(1 of 5 scales\)"):
        dequantize_nf4(packed, absmax, (300,), fast=fast)


def test_unsorted_4bit_code_raises():
    with pytest.raises(ValueError, match="sorted in ascending order"):
        quantize_4bit(torch.randn(64), NF4_CODE.flip(0))
    with pytest.raises(ValueError, match="16 values"):
        quantize_4bit(torch.randn(64), NF4_CODE[:15])


def test_bad_arguments():
    with pytest.raises(ValueError, match="power of two"):
        quantize_nf4(torch.randn(64), blocksize=48)
    with pytest.raises(TypeError, match="floating-point"):
        quantize_nf4(torch.arange(64))
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.empty(0))
    packed, absmax = quantize_nf4(torch.randn(100))
    with pytest.raises(ValueError, match="packed bytes"):
        dequantize_nf4(packed, absmax, (101, 2))


# ----------------------------------------------------------------------------- fast path == lesson
def edge_values(code: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Values a lookup is most likely to get wrong, in `dtype`: every midpoint between codes as
    close as `dtype` gets, its neighbours in `dtype` on both sides, their negatives, +-0, +-1."""
    mids = ((code[:-1] + code[1:]) / 2).to(dtype)  # (15,)
    up, down = torch.full_like(mids, 2.0), torch.full_like(mids, -2.0)
    near = torch.cat([mids, torch.nextafter(mids, up), torch.nextafter(mids, down)])  # (45,)
    signed = torch.tensor([0.0, -0.0, 1.0, -1.0], dtype=dtype)
    return torch.cat([near, -near, signed])  # (94,)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 600),
    blocksize=st.sampled_from([16, 32, 64, 128, 256]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    out_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    scale=st.sampled_from([1.0, 0.125, 0.7, 13.0]),
    edge_share=st.sampled_from([0.0, 0.3, 0.9]),
    code_name=st.sampled_from(["nf4", "fp4", "int4"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fast_path_equals_readable_path(n, blocksize, dtype, out_dtype, scale, edge_share, code_name, seed):
    """quantize_4bit's table lookup (nf4_fast.py) gives the same bytes and absmax as the readable
    lines (fast=False), and the chunked word-table dequantize the same values as code[q] * absmax:
    odd sizes, partial last blocks, every input and output dtype, zero blocks, and blocks whose
    absmax is `scale` holding values at and next to every midpoint (times `scale`: a power of two
    keeps X_i / N_b exactly on the midpoint, 0.7 and 13 land next to it after rounding)."""
    code = {"nf4": NF4_CODE, "fp4": FP4_CODE, "int4": INT4_CODE}[code_name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * scale
    edge = edge_values(code, torch.float32) * scale  # float32 candidates, rounded to dtype below
    k = int(edge_share * n)
    x[torch.randint(n, (k,), generator=g)] = edge[torch.randint(edge.numel(), (k,), generator=g)]
    x[::blocksize] = scale  # each block's absmax is `scale` (up to the edges' -scale)
    if n > blocksize and seed % 3 == 0:
        x[blocksize : 2 * blocksize] = 0.0  # a zero block
    x = x.to(dtype)
    if dtype != torch.float32:  # edges as close to the midpoints as this dtype can get
        dedge = edge_values(code, dtype) * scale
        x[torch.randint(n, (k,), generator=g)] = dedge[torch.randint(dedge.numel(), (k,), generator=g)]
    packed, absmax = quantize_4bit(x, code, blocksize)
    ref_packed, ref_absmax = quantize_4bit(x, code, blocksize, fast=False)
    assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax)
    y = dequantize_4bit(packed, absmax, x.shape, code, blocksize, out_dtype)
    ref_y = dequantize_4bit(packed, absmax, x.shape, code, blocksize, out_dtype, fast=False)
    assert torch.equal(y, ref_y) and y.dtype == out_dtype


# ----------------------------------------------------------------------------- invariants
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 700),
    blocksize=st.sampled_from([16, 32, 64, 128]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31 - 1),
    code_name=st.sampled_from(["nf4", "fp4", "int4"]),
)
def test_round_trip_error_bound(n, blocksize, dtype, scale, seed, code_name):
    """|x - x~| <= absmax_b * (largest gap between neighbouring codes) / 2, per element.

    Checked on the float32 dequantization (the bound is about the code, not the output rounding);
    shapes and dtypes round-trip.
    """
    code = {"nf4": NF4_CODE, "fp4": FP4_CODE, "int4": INT4_CODE}[code_name]
    x = (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)
    packed, absmax = quantize_4bit(x, code, blocksize)
    y = dequantize_4bit(packed, absmax, x.shape, code, blocksize)
    half_gap = float((code[1:] - code[:-1]).max()) / 2
    per_elem = absmax.repeat_interleave(blocksize)[:n]
    err = (x.float() - y).abs()
    assert bool((err <= per_elem * half_gap * (1 + 1e-6) + 1e-30).all())
    assert dequantize_4bit(packed, absmax, x.shape, code, blocksize, dtype=dtype).dtype == dtype


# ----------------------------------------------------------------------------- QLoRA's ordering
def test_mae_ordering_on_normal_weights():
    """Mean absolute error on N(0, 1): NF4 < FP4 < Int4; NF4's at blocksize 64 ~= 0.0728.

    0.072792 is the value bitsandbytes' own test_4bit_quant expects for NF4, blocksize 64.
    """
    x = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    mae = {}
    for name, code in (("nf4", NF4_CODE), ("fp4", FP4_CODE), ("int4", INT4_CODE)):
        packed, absmax = quantize_4bit(x, code, 64)
        mae[name] = (dequantize_4bit(packed, absmax, x.shape, code, 64) - x).abs().mean().item()
    assert mae["nf4"] < mae["fp4"] < mae["int4"], mae
    assert mae["nf4"] == pytest.approx(0.0728, abs=1e-3)


# ----------------------------------------------------------------------------- double quantization
def test_bits_per_parameter():
    """4 + 32/64 = 4.5 exactly; with DQ 4 + 8/64 + 32/(64*256) + 32/n, n = 2^20: 4.12698."""
    assert bits_per_parameter(64, double_quant=False) == 4.5
    assert bits_per_parameter(64, double_quant=True) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / 2**20)
    assert bits_per_parameter(64, double_quant=True) == pytest.approx(4.127, abs=1e-3)


def test_double_quant_round_trip():
    """Dequantized absmax is within half a dynamic-map step of the truth; NF4 output barely moves."""
    x = torch.randn(512, 300, generator=torch.Generator().manual_seed(3))
    packed, absmax = quantize_nf4(x)
    codes, c1, offset = double_quantize(absmax)
    assert codes.dtype == torch.uint8 and codes.shape == absmax.shape and c1.numel() == math.ceil(absmax.numel() / 256)
    restored = double_dequantize(codes, c1, offset)
    gap = float((dynamic_code()[1:] - dynamic_code()[:-1]).max()) / 2
    assert bool(((restored - absmax).abs() <= c1.repeat_interleave(256)[: absmax.numel()] * gap + 1e-6).all())
    y = dequantize_nf4(packed, restored, x.shape)
    assert (y - x).abs().mean().item() < 0.075


# ----------------------------------------------------------------------------- bitsandbytes parity
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(33, 70), (5, 129), (2, 3, 64), (1000,)])
def test_bitsandbytes_parity(dtype, shape):
    """Bytes and absmax equal bitsandbytes 0.50's CPU quantize_4bit exactly; dequantization equal
    in float32 and within one unit in the last place in bfloat16/float16 (shapes with an even last
    dimension, which take bitsandbytes' native C++ dequantize_4bit)."""
    bnbF = pytest.importorskip("bitsandbytes.functional")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    packed, absmax = quantize_nf4(x, 64)
    ref_packed, state = bnbF.quantize_4bit(x, blocksize=64, quant_type="nf4")
    assert torch.equal(packed, ref_packed.reshape(-1))
    assert torch.equal(absmax, state.absmax)
    if shape[-1] % 2 == 0:
        ours = dequantize_nf4(packed, absmax, shape, dtype=dtype)
        ref = bnbF.dequantize_4bit(ref_packed, state).reshape(shape)  # it returns (1, n) for 1-D
        if dtype == torch.float32:
            assert torch.equal(ours, ref)
        else:
            ulp = torch.finfo(dtype).eps * ref.float().abs().clamp(min=torch.finfo(dtype).tiny)
            assert bool(((ours.float() - ref.float()).abs() <= ulp).all())


def test_bitsandbytes_double_quant_agreement():
    """>= 99% of our double-quantized codes equal bitsandbytes' CPU codes (its C++ path overwrites
    the map's -0.99297 with -1.0, divides instead of multiplying by 1/absmax and compares float
    distances instead of midpoints; see kernels/nf4.py)."""
    bnbF = pytest.importorskip("bitsandbytes.functional")
    x = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(5))
    _, absmax = quantize_nf4(x)
    codes, c1, offset = double_quantize(absmax)
    _, state = bnbF.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.allclose(offset, state.offset)
    assert torch.allclose(c1, state.state2.absmax)
    agree = (codes == state.absmax).float().mean().item()
    assert agree >= 0.99, agree


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,blocksize", [(1001, 16), (64 * 9 + 7, 64), (4096 * 3 + 1, 128)])
def test_dequantize_chunks_agree_with_one_pass(monkeypatch, dtype, n, blocksize):
    """Dequantize works chunk by chunk; tiny chunks (one block each, many chunks, a partial
    last block in the last chunk) give exactly what one chunk over the whole tensor gives,
    and that equals code[q] * absmax computed elementwise in float32, rounded once."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    packed, absmax = quantize_nf4(x, blocksize)
    q = unpack(packed, n).long()  # (n,) code indices
    ref = (NF4_CODE[q] * absmax.repeat_interleave(blocksize)[:n]).to(dtype)  # elementwise
    monkeypatch.setattr(nf4_fast, "_CHUNK_ELEMENTS", 1 << 30)
    whole = dequantize_nf4(packed, absmax, (n,), blocksize, dtype)
    monkeypatch.setattr(nf4_fast, "_CHUNK_ELEMENTS", 4)  # clamped up to one block per chunk
    chunked = dequantize_nf4(packed, absmax, (n,), blocksize, dtype)
    assert torch.equal(whole, ref) and torch.equal(chunked, ref)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [64 * 5, 64 * 5 + 3])
def test_dequantize_into_a_reused_buffer(dtype, fast, n):
    """`out=`: the values of a fresh dequantization, written into (a prefix of) a larger buffer
    that the next call overwrites; a buffer of the wrong dtype, size or layout is refused."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    packed, absmax = quantize_nf4(x, 64)
    buf = torch.full((2 * n + 10,), float("nan"), dtype=dtype)
    got = dequantize_nf4(packed, absmax, (n,), 64, dtype, fast=fast, out=buf)
    assert torch.equal(got, dequantize_nf4(packed, absmax, (n,), 64, dtype, fast=fast))
    assert got.data_ptr() == buf.data_ptr()
    for bad in (torch.empty(n - 1, dtype=dtype), torch.empty(2 * n, dtype=torch.float16),
                torch.empty(2 * n + 2, dtype=dtype)[::2]):
        with pytest.raises(ValueError, match="out must be a contiguous 1-D"):
            dequantize_nf4(packed, absmax, (n,), 64, dtype, fast=fast, out=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_gives_the_cpu_bytes_and_values(dtype, fast):
    """The kernels are device-agnostic torch: on CUDA, quantize gives the CPU's bytes and absmax
    (odd size, a partial last block) and dequantize the CPU's values, on the device."""
    x = torch.randn(257, 129, generator=torch.Generator().manual_seed(3)).to(dtype)
    packed, absmax = quantize_nf4(x, fast=fast)
    cuda_packed, cuda_absmax = quantize_nf4(x.cuda(), fast=fast)
    assert cuda_packed.is_cuda and torch.equal(cuda_packed.cpu(), packed) and torch.equal(cuda_absmax.cpu(), absmax)
    y = dequantize_nf4(cuda_packed, cuda_absmax, x.shape, dtype=dtype, fast=fast)
    assert y.is_cuda and torch.equal(y.cpu(), dequantize_nf4(packed, absmax, x.shape, dtype=dtype))
    codes, c1, offset = double_quantize(cuda_absmax)
    ref = double_quantize(absmax)
    assert torch.equal(codes.cpu(), ref[0]) and torch.allclose(c1.cpu(), ref[1]) and torch.allclose(offset.cpu(), ref[2])
