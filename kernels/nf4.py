"""4-bit NormalFloat (NF4), FP4 (E2M1) and Int4 blockwise quantization, and double quantization.

Paper: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv 2305.14314).

NF4 (section 3, Eq. 4). Pre-trained weights are roughly N(0, sigma); after dividing a block by its
absmax they live in [-1, 1]. A k-bit quantile quantizer gives each of the 2^k codes the same
probability mass under N(0, 1); the paper writes each code as the average of two adjacent quantiles

    q_i = 1/2 * ( Q_X( i / (2^k + 1) ) + Q_X( (i + 1) / (2^k + 1) ) )      (Eq. 4)

with Q_X the quantile function of N(0, 1). Which rule the code follows: not Eq. 4's average, but
the rule of bitsandbytes' create_normal_map, which produced the published NF4 table (QLoRA's
appendix E): ONE quantile per level, at probabilities evenly spaced from an offset down to 1/2.
Why: NF4 is a storage format. The weights are stored as indices into these 16 values, so a
checkpoint means what it means only with the exact table every NF4 implementation and checkpoint
uses; the average of adjacent quantiles gives other values (its second-largest code would be
0.746, the table's is 0.723) and so different bytes. Zero must be exactly representable (padding
and zero weights), so NF4 is asymmetric: 2^(k-1) = 8 levels for the positive half, 2^(k-1) - 1 = 7
for the negative half, both halves share the exact 0, and the union is normalized into [-1, 1].
Q_X(1) is infinite, so the outermost level sits at 1 - delta, delta = 1/2 (1/30 + 1/32), the mean
of the two half-steps 1/(2*15) and 1/(2*16); bitsandbytes rounds it to 0.9677083 and so do we,
which reproduces the published table bit for bit (the unrounded value moves codes by up to 3e-7).

    positive:  Q_X(linspace(0.9677083, 0.5, 9)[:-1])        8 values, largest ~ 1.848
    negative: -Q_X(linspace(0.9677083, 0.5, 8)[:-1])        7 values
    NF4 = sort(negative U {0} U positive) / max              16 values in [-1, 1]

Blockwise absmax quantization with these codes (arXiv 2305.14314, Eq. 1, blocksize 64):

    X^NF4_i = argmin_j | NF4_j - X_i / absmax(X_b) |,    X~_i = NF4[X^NF4_i] * absmax(X_b)

Two 4-bit indices share one byte, the first element in the high nibble (bitsandbytes' layout):

    byte = (q_0 << 4) | q_1        n elements -> ceil(n / 2) bytes (+ one float32 per block)

Double quantization (section 3, Eq. 6): the float32 absmax values c2 (one per 64 weights, 0.5 bit
per parameter) are themselves quantized: their mean is subtracted (they are all positive, so this
centres them for a symmetric code) and the rest is quantized blockwise to 8 bits with the signed
dynamic map in blocks of 256, which keeps one float32 c1 per 256 absmax values:

    bits / parameter = 4 + 32/64 = 4.5                              (plain)
                     = 4 + 8/64 + 32/(64 * 256) ~= 4.127           (double quantization)

FP4 here is E2M1 (1 sign, 2 exponent, 1 mantissa bit; values 0, 0.5, 1, 1.5, 2, 3, 4, 6 as in
the OCP MX format) divided by 6. bitsandbytes' "fp4" differs: it uses a bias-2 layout whose
smallest non-zero value is 0.0625/12 ~= 0.0052 and stores codes in bit-pattern order. Int4 is the
symmetric integer grid k/7, k = -7..7 (with +0 and -0, as bitsandbytes' "int4" table).

bitsandbytes' CPU path and ours. bitsandbytes 0.50 quantizes 4-bit on the CPU with pure torch
(midpoints + bucketize), which we match exactly. Its 8-bit `quantize_blockwise` on the CPU, used
for double quantization, is a C++ routine (csrc/cpu_ops.cpp quantize_cpu, common.cpp
quantize_block) that takes a lookup shortcut: (1) it overwrites the first entry of the shared
dynamic map with -1.0 (the map's true minimum is -0.99297) so its table-driven binary search
(BinSearch "Direct2", a uniform-grid lookup table plus one correction) covers [-1, 1], and that
mutated map is then also used to dequantize; (2) it divides by absmax instead of multiplying by
the reciprocal; (3) it picks between the two neighbours by comparing float distances
|v - Q_j| < |v - Q_{j+1}| rather than the midpoint. (1) moves every value in [-1, -0.986] to code
0; (2) and (3) change near-ties by one code. Our double_quantize follows the midpoint rule of
bitsandbytes' reference (torch) backend; the tests measure >= 99% agreement with the C++ codes.

The lesson and the fast path. quantize_4bit and dequantize_4bit below hold the math in a few
readable lines (absmax, scale, nearest code by midpoints, pack; unpack, look up, scale). By default
they dispatch to kernels/nf4_fast.py, which computes the same bytes and values with lookup tables
and fewer passes over memory (5-6x faster than those lines on one CPU thread, 2048 x 2048);
`fast=False` runs the readable lines, and tests/test_nf4.py checks that both give identical results.
"""

from __future__ import annotations

import math

import torch

from . import nf4_fast
from .blockwise import (
    blockwise_absmax,
    check_blocksize,
    check_code,
    check_finite,
    check_scales,
    dequantize_blockwise,
    dynamic_code,
    nearest_code,
    quantize_blockwise,
    scale_blocks,
)

__all__ = [
    "NF4_OFFSET",
    "nf4_code",
    "fp4_code",
    "int4_code",
    "NF4_CODE",
    "FP4_CODE",
    "INT4_CODE",
    "pack_nibbles",
    "unpack_nibbles",
    "quantize_4bit",
    "dequantize_4bit",
    "quantize_nf4",
    "dequantize_nf4",
    "double_quantize",
    "double_dequantize",
    "bits_per_parameter",
]

NF4_OFFSET = 0.9677083  # 1 - delta, delta = (1/30 + 1/32) / 2, rounded as in bitsandbytes


# ----------------------------------------------------------------------------- codebooks
def nf4_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 values: one quantile of N(0, 1) per level (bitsandbytes' rule, not the average of
    two adjacent quantiles of arXiv 2305.14314, Eq. 4; the module docstring says why)."""
    # quantile levels on a float32 grid, evaluated in float64 (torch.special.ndtri = Q_X)
    pos_p = torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1].double()  # 8 levels
    neg_p = torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1].double()  # 7 levels
    positive = torch.special.ndtri(pos_p).float()  # Q_X(p): 8 positive values, 1.848 .. 0.1456
    negative = (-torch.special.ndtri(neg_p)).float()  # -Q_X(p): 7 negative values
    values = torch.cat([negative, torch.zeros(1), positive]).sort().values  # exact zero shared
    return values / values.max()  # normalize into [-1, 1]


def fp4_code() -> torch.Tensor:
    """E2M1 magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6} with both signs, / 6, sorted (16 values)."""
    exponent = torch.arange(4, dtype=torch.float32).repeat_interleave(2)  # e = 0,0,1,1,2,2,3,3
    mantissa = torch.tensor([0.0, 1.0]).repeat(4)  # m = 0,1,0,1,...
    # subnormal (e = 0): m * 0.5 ; normal: 2^(e-1) * (1 + m/2)
    mag = torch.where(exponent == 0, mantissa * 0.5, 2 ** (exponent - 1) * (1 + mantissa / 2))
    return torch.cat([-mag.flip(0), mag]) / 6.0  # (-6..-0, +0..6) / 6


def int4_code() -> torch.Tensor:
    """Symmetric Int4: k / 7 for k = -7 .. 7, zero twice (-0 and +0), 16 values."""
    k = torch.arange(8, dtype=torch.float32)
    return torch.cat([-k.flip(0), k]) / 7.0


NF4_CODE = nf4_code()  # (16,) float32, equal to bitsandbytes' table bit for bit
FP4_CODE = fp4_code()  # (16,) float32, sorted
INT4_CODE = int4_code()  # (16,) float32, sorted


def _check_code(code: torch.Tensor) -> torch.Tensor:
    """The code as (16,) float32 on the CPU (tables are keyed by its values), checked sorted."""
    code = code.detach().to("cpu", torch.float32).reshape(-1)
    if code.numel() != 16:
        raise ValueError(f"a 4-bit code has 16 values (e.g. NF4_CODE, FP4_CODE, INT4_CODE), got {code.numel()}")
    check_code(code)
    return code


# ----------------------------------------------------------------------------- nibble packing
def pack_nibbles(q: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """(n,) uint8 codes 0..15 -> ceil(n/2) bytes, byte = (q_0 << 4) | q_1 (first element high).

    An odd n is padded by one `pad` code (quantize_4bit pads with the code of 0.0).
    """
    if q.numel() % 2:
        q = torch.cat([q, q.new_full((1,), pad)])
    pairs = q.view(-1, 2)  # (ceil(n/2), 2)
    return torch.add(pairs[:, 1], pairs[:, 0], alpha=16)  # q_0 * 16 + q_1 = (q_0 << 4) | q_1, one op


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """ceil(n/2) bytes -> (n,) uint8 codes: the high nibble first, then the low nibble."""
    return torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], dim=1).view(-1)[:n]  # (n,)


# ----------------------------------------------------------------------------- 4-bit quantization
def quantize_4bit(
    x: torch.Tensor, code: torch.Tensor, blocksize: int = 64, *, fast: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax 4-bit quantization of any float tensor with a sorted 16-value code.

    Returns (packed uint8 of ceil(n/2) bytes, first element in the high nibble; absmax float32
    of ceil(n/blocksize) blocks, a partial last block with its own absmax). `fast=False` runs the
    reference lines below; the default computes the same bytes by table lookup (nf4_fast.py).
    """
    check_blocksize(blocksize)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"quantize_4bit expects a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if x.numel() == 0:
        raise ValueError("quantize_4bit: the input is empty; pass a tensor with at least one element")
    code = _check_code(code)  # (16,) on the CPU
    flat = x.detach().reshape(-1)  # (n,)
    if fast:
        q, absmax = nf4_fast.quantize_codes(flat, code, blocksize)  # the same codes, faster
    else:
        absmax = blockwise_absmax(flat, blocksize)  # (nb,) N_b = max |X_b|
        s = scale_blocks(flat, absmax, blocksize)  # (n,) X_i / N_b in [-1, 1], float32
        q = nearest_code(s, code.to(s.device)).to(torch.uint8)  # (n,) argmin_j |Q_j - X_i / N_b|
    check_finite(flat, absmax, "quantize_4bit")  # a block holds NaN/Inf iff its absmax is not finite
    return pack_nibbles(q, pad=int(nearest_code(torch.zeros(1), code))), absmax


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    code: torch.Tensor,
    blocksize: int = 64,
    dtype: torch.dtype = torch.float32,
    *,
    fast: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """X~ = code[q] * absmax per block, reshaped to `shape`, computed in float32, cast to dtype.

    `fast=False` runs the reference lines below; the default computes the same values by
    looking up each packed byte's two codes in a 256-entry table, in cache-sized chunks (nf4_fast.py).
    `out`: a contiguous 1-D buffer of `dtype` on the codes' device with at least 2 * ceil(n/2)
    elements, written in place (the result is a view of it): a buffer reused from call to call
    saves the fresh allocation, whose page faults cost about half the time of the whole
    dequantization of a 4096 x 4096 weight on a CPU.
    """
    check_blocksize(blocksize)
    if packed.dtype != torch.uint8:
        raise TypeError(f"dequantize_4bit expects uint8 packed codes, got {packed.dtype}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    n = math.prod(shape)
    nb = -(-n // blocksize)
    if packed.numel() != -(-n // 2) or absmax.numel() != nb:
        raise ValueError(
            f"shape {tuple(shape)} needs {-(-n // 2)} packed bytes and {nb} absmax values "
            f"(blocksize {blocksize}), got {packed.numel()} and {absmax.numel()}"
        )
    check_scales(absmax, "dequantize_4bit")
    if out is not None and (out.dtype != dtype or out.dim() != 1 or not out.is_contiguous()
                            or out.numel() < 2 * packed.numel() or out.device != packed.device):
        raise ValueError(f"out must be a contiguous 1-D {dtype} tensor on {packed.device} with at least "
                         f"{2 * packed.numel()} elements, got {out.dtype} {tuple(out.shape)} on {out.device}")
    code = _check_code(code)  # (16,) on the CPU
    absmax = absmax.to(torch.float32)
    if fast:
        return nf4_fast.dequantize_codes(packed, absmax, n, code, blocksize, dtype, out).view(shape)
    q = unpack_nibbles(packed, n).long()  # (n,) code indices
    values = code.to(packed.device)[q]  # (n,) Q[q_i], float32
    full = n - n % blocksize
    values[:full].view(-1, blocksize).mul_(absmax[: full // blocksize, None])  # X~_i = Q[q_i] * N_b
    values[full:].mul_(absmax[-1])  # the partial last block (if any) with its own N_b
    if out is not None:
        return out[:n].copy_(values).view(shape)
    return values.to(dtype).view(shape)


def quantize_nf4(x: torch.Tensor, blocksize: int = 64, *, fast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 blockwise quantization: (packed uint8 ceil(n/2), absmax float32 ceil(n/blocksize))."""
    return quantize_4bit(x, NF4_CODE, blocksize, fast=fast)


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    blocksize: int = 64,
    dtype: torch.dtype = torch.float32,
    *,
    fast: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of quantize_nf4 (up to the quantization error), as `dtype` with `shape`."""
    return dequantize_4bit(packed, absmax, shape, NF4_CODE, blocksize, dtype, fast=fast, out=out)


# ----------------------------------------------------------------------------- double quantization
def double_quantize(
    absmax: torch.Tensor, blocksize: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize the absmax statistics c2 to 8 bits (arXiv 2305.14314, Eq. 6).

    Returns (codes uint8 like absmax, c1 float32 per block of `blocksize`, offset float32 scalar):
    offset = mean(c2); codes, c1 = blockwise dynamic-map quantization of c2 - offset.
    """
    if absmax.dtype != torch.float32:
        raise TypeError(f"double_quantize expects the float32 absmax from quantize_nf4, got {absmax.dtype}")
    offset = absmax.mean()  # c2 are all > 0: centre them for the signed map
    codes, c1 = quantize_blockwise(absmax - offset, blocksize, dynamic_code(signed=True))
    return codes, c1, offset


def double_dequantize(
    codes: torch.Tensor, c1: torch.Tensor, offset: torch.Tensor | float, blocksize: int = 256
) -> torch.Tensor:
    """c2~ = dynamic[codes] * c1 + offset, float32 (the inverse of double_quantize)."""
    return dequantize_blockwise(codes, c1, blocksize, dynamic_code(signed=True)) + offset


def bits_per_parameter(blocksize: int = 64, double_quant: bool = True, n: int = 1 << 20) -> float:
    """Storage bits per weight, measured from the tensors quantize_nf4 / double_quantize store.

    Formula beside it: 4 + 32/blocksize (plain), 4 + 8/blocksize + 32/(blocksize * 256) + 32/n
    (double quantization; the last term is the single float32 offset).
    """
    check_blocksize(blocksize)
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    packed, absmax = quantize_nf4(x, blocksize)
    stored = [packed, absmax]
    if double_quant:
        stored = [packed, *double_quantize(absmax)]  # absmax replaced by codes, c1, offset
    return sum(t.numel() * t.element_size() * 8 for t in stored) / n
