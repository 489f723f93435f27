"""4-bit NormalFloat (NF4), FP4 (E2M1) and Int4 blockwise quantization, and double quantization.

Paper: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv 2305.14314).

NF4 (section 3, Eq. 4). Pre-trained weights are roughly N(0, sigma); after dividing a block by its
absmax they live in [-1, 1]. A k-bit quantile quantizer gives each of the 2^k codes the same
probability mass under N(0, 1):

    q_i = 1/2 * ( Q_X( i / (2^k + 1) ) + Q_X( (i + 1) / (2^k + 1) ) )      (Eq. 4)

with Q_X the quantile function of N(0, 1). Zero must be exactly representable (padding and
zero weights), so NF4 is asymmetric: 2^(k-1) = 8 quantiles for the positive half, 2^(k-1) - 1 = 7
for the negative half, both halves share the exact 0, and the union is normalized into [-1, 1].
The outermost quantile is taken at the offset 1 - delta, delta = 1/2 (1/30 + 1/32), the mean of
the two half-steps 1/(2*15) and 1/(2*16); bitsandbytes rounds it to 0.9677083 and so do we, which
reproduces the published table bit for bit (the unrounded value moves codes by up to 3e-7).

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

Speed (CPU, eager torch, no Python loop over elements). Quantization does not bucketize every
element (a binary search costs more than the rest together). A float32 is a sign bit and a
magnitude that orders like an integer, so the floats sharing their top 22 bits form one short
interval; a 4 MiB table gives each interval its code, read with one index_select keyed by
s.view(int32) >> 10. The few intervals that hold a midpoint are flagged in the table, and only
their elements (~0.02% of N(0, 1) weights) are decided exactly by comparing s with the midpoint.
Dequantization looks up whole bytes, two at a time: two packed bytes read as one uint16 word
index a 65536-entry table of their four float32 codes, then one in-place multiply by absmax.
On a shared 2-core CPU each extra parallel op can wait a scheduler slice for its second thread,
so both paths keep the number of ops and of fresh large buffers small.
"""

from __future__ import annotations

import math

import torch

from .blockwise import (
    blockwise_absmax,
    check_blocksize,
    check_finite,
    dequantize_blockwise,
    dynamic_code,
    nearest_code,
    quantize_blockwise,
)

__all__ = [
    "NF4_OFFSET",
    "nf4_code",
    "fp4_code",
    "int4_code",
    "NF4_CODE",
    "FP4_CODE",
    "INT4_CODE",
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
    """The 16 NF4 values, derived from quantiles of N(0, 1) (arXiv 2305.14314, Eq. 4)."""
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

_KEY_BITS = 22  # a float32's top 22 bits: sign, 8 exponent bits, 13 mantissa bits
_KEY_SHIFT = 32 - _KEY_BITS
_AMBIGUOUS = 128  # flag bit in the quantize table: a midpoint lies inside this key's interval
_FLAG_WORD = int.from_bytes(bytes([_AMBIGUOUS] * 8), "little", signed=True)  # the flag in 8 bytes
_quantize_tables: dict[tuple[tuple[float, ...], torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
_word_tables: dict[tuple[tuple[float, ...], torch.device], torch.Tensor] = {}


def _check_code(code: torch.Tensor) -> torch.Tensor:
    code = code.detach().to(torch.float32).reshape(-1)
    if code.numel() != 16 or not bool((code[1:] >= code[:-1]).all()):
        raise ValueError("a 4-bit code must be 16 sorted float values (e.g. NF4_CODE, FP4_CODE, INT4_CODE)")
    return code


def _quantize_table(code: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(table, mids): table[key] = code index of every float whose top 22 bits are `key`.

    A float32 is a sign bit and a magnitude that orders like an integer, so the floats sharing
    their top 22 bits form one interval [lo, hi] (relative width 2^-13). Where that interval
    holds a midpoint, its two ends take different codes: the entry is then the lower code
    + 128 (ambiguous), and those few elements (~0.02% of N(0, 1) weights) are decided exactly.
    """
    key = (tuple(code.tolist()), device)
    if key not in _quantize_tables:
        mids = (code[:-1] + code[1:]) / 2  # (15,) float32 decision boundaries
        keys = torch.arange(1 << _KEY_BITS, dtype=torch.int32) << _KEY_SHIFT  # low bits zero
        ends = torch.stack([keys, keys | ((1 << _KEY_SHIFT) - 1)]).view(torch.float32)  # (2, 2^22)
        idx = nearest_code(ends, code)  # (2, 2^22) code of both ends of every interval
        lower, upper = idx.amin(0), idx.amax(0)  # negative floats: the ends swap
        ambiguous = (upper > lower) & ends.isfinite().all(0)  # Inf/NaN keys never occur (checked)
        assert bool((upper - lower <= 1)[ambiguous].all()), "an interval holds at most one midpoint"
        table = (lower + _AMBIGUOUS * ambiguous).to(torch.uint8)  # (2^22,)
        _quantize_tables[key] = (table.to(device), mids.to(device))
    return _quantize_tables[key]


def _word_table(code: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(65536,) complex128: the four float32 code values held by every pair of packed bytes.

    Two packed bytes read as one uint16 word w hold four 4-bit codes (high nibble first in each
    byte). Entry w keeps their four float32 values in element order; complex128 serves only
    as a 16-byte carrier, so one index_select writes four output elements per word.
    """
    key = (tuple(code.tolist()), device)
    if key not in _word_tables:
        b = torch.arange(256)
        pairs = torch.cartesian_prod(b, b).to(torch.uint8)  # (65536, 2) every (byte 0, byte 1)
        words = pairs.view(torch.uint16).view(-1).to(torch.int64)  # the word each pair reads as here
        nibbles = torch.stack([pairs >> 4, pairs & 15], dim=2).view(-1, 4).long()  # (65536, 4) in order
        table = torch.empty(1 << 16, 4)
        table[words] = code[nibbles]  # (65536, 4) float32
        _word_tables[key] = table.view(torch.complex128).view(-1).to(device)
    return _word_tables[key]


# ----------------------------------------------------------------------------- 4-bit quantization
def _resolve_ambiguous(
    codes: torch.Tensor, flat: torch.Tensor, inv: torch.Tensor, mids: torch.Tensor, blocksize: int
) -> None:
    """Decide the flagged codes exactly, in place: lower code + (X_i / N_b > midpoint).

    Flags are the top bit of a byte, so the scan reads 8 codes at a time as one int64 word; only
    the few words with a flag (~0.2% for N(0, 1) weights) are opened. Gathers use index_select /
    index_copy_, which are much cheaper than advanced indexing on a large tensor.
    """
    hit = torch.nonzero(codes.view(torch.int64) & _FLAG_WORD).view(-1)  # (w,) words with a flag
    near = codes.view(-1, 8).index_select(0, hit)  # (w, 8) the codes of those words
    row, col = torch.nonzero(near >= _AMBIGUOUS).unbind(1)  # (k,) each; ~0.02% of all elements
    amb = hit.index_select(0, row) * 8 + col  # (k,) element index
    flagged = near.view(-1).index_select(0, row * 8 + col).long()  # (k,)
    lower = flagged - _AMBIGUOUS  # the code below the midpoint inside the interval
    s_exact = flat.index_select(0, amb).float() * inv.index_select(0, amb // blocksize)  # X_i / N_b
    upper = s_exact > mids.index_select(0, lower)  # ties -> lower
    codes.index_copy_(0, amb, (lower + upper).to(torch.uint8))


def quantize_4bit(
    x: torch.Tensor, code: torch.Tensor, blocksize: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax 4-bit quantization of any float tensor with a sorted 16-value code.

    Returns (packed uint8 of ceil(n/2) bytes, first element in the high nibble; absmax float32
    of ceil(n/blocksize) blocks, a partial last block with its own absmax).
    """
    check_blocksize(blocksize)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"quantize_4bit expects a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if x.numel() == 0:
        raise ValueError("quantize_4bit: the input is empty; pass a tensor with at least one element")
    code = _check_code(code)
    flat = x.detach().reshape(-1)  # (n,)
    n = flat.numel()
    full = n - n % blocksize
    wide = flat if flat.dtype == torch.float32 else flat.float()  # (n,) float32, one copy if needed
    absmax = blockwise_absmax(wide, blocksize)  # (nb,) N_b = max |X_b|
    check_finite(wide, absmax, "quantize_4bit")
    table, mids = _quantize_table(code, flat.device)
    zero_code = int(nearest_code(torch.zeros(1), code))  # pads the last byte of an odd n
    codes = torch.empty(-(-n // 8) * 8, dtype=torch.uint8, device=flat.device)  # whole 8-byte words
    codes[n:] = zero_code
    if full < n:  # partial last block: its own absmax, X_i / N_b by division (bitsandbytes)
        s_tail = wide[full:] / absmax[-1].clamp(min=1e-38)
        codes[full:n] = nearest_code(s_tail, code.to(flat.device)).to(torch.uint8)
    if full:
        inv = absmax[: full // blocksize].clamp(min=1e-38).reciprocal_()  # 1 / N_b; zero block -> 0 codes
        s = wide[:full] if wide is not flat else torch.empty_like(wide[:full])  # in place in our copy
        torch.mul(wide[:full].view(-1, blocksize), inv[:, None], out=s.view(-1, blocksize))  # X_i / N_b
        key = s.view(torch.int32)  # the float's bits: top 22 bits = its interval, in place
        key.bitwise_right_shift_(_KEY_SHIFT).bitwise_and_((1 << _KEY_BITS) - 1)
        torch.index_select(table, 0, key, out=codes[:full])  # code per key (+128: ambiguous)
        _resolve_ambiguous(codes, flat, inv, mids, blocksize)
    pairs = codes[: n + n % 2].view(-1, 2)  # (ceil(n/2), 2)
    packed = torch.add(pairs[:, 1], pairs[:, 0], alpha=16)  # (q_0 << 4) | q_1: first element high
    return packed, absmax


_CHUNK_ELEMENTS = 1 << 19  # dequantize works on 512K elements (2 MiB of float32 codes) at a time


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    code: torch.Tensor,
    blocksize: int = 64,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """X~ = code[q] * absmax per block, reshaped to `shape`, computed in float32, cast to dtype."""
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
    code = _check_code(code)
    table = _word_table(code, packed.device)  # (65536,) four float32 codes per entry
    flat = packed.reshape(-1)  # (ceil(n/2),) bytes
    if flat.numel() % 2 or flat.storage_offset() % 2:  # read as whole, aligned 16-bit words
        flat = torch.cat([flat, flat.new_zeros(flat.numel() % 2)])
    words = flat.view(torch.uint16)  # (W,) two packed bytes per word, W = bytes/2
    absmax = absmax.to(torch.float32)
    out = torch.empty(4 * words.numel(), dtype=dtype, device=packed.device)  # (>= n,)
    # Work in chunks of whole blocks that stay in cache: the int32 indices and the codes Q[q]
    # live in small reused buffers, and the output is written once, by the multiply, instead
    # of full-size temporaries that cost a fresh, page-fault-bound allocation on every call.
    chunk = max(_CHUNK_ELEMENTS, blocksize)  # elements, a multiple of blocksize (both powers of 2)
    idx = torch.empty(min(chunk, out.numel()) // 4, dtype=torch.int32, device=packed.device)
    codes = torch.empty(idx.numel() * 4, dtype=torch.float32, device=packed.device)
    for start in range(0, out.numel(), chunk):  # a few large chunks, never a loop over blocks
        stop = min(start + chunk, out.numel())
        i = idx[: (stop - start) // 4]
        i.copy_(words[start // 4: stop // 4])  # (chunk/4,) uint16 -> int32 index
        q = codes[: stop - start]  # (chunk,) float32
        torch.index_select(table, 0, i, out=q.view(torch.complex128))  # Q[q], 4 elements per word
        o = out[start:stop]
        full = max(0, min(stop, n - n % blocksize) - start)  # elements of whole blocks here
        torch.mul(q[:full].view(-1, blocksize), absmax[start // blocksize: (start + full) // blocksize, None],
                  out=o[:full].view(-1, blocksize))  # X~ = Q[q] * N_b in float32, rounded once to dtype
        tail = max(0, min(stop, n) - start - full)  # the partial last block, if it is in this chunk
        if tail:
            torch.mul(q[full:full + tail], absmax[-1], out=o[full:full + tail])
    return out[:n].view(shape)


def quantize_nf4(x: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 blockwise quantization: (packed uint8 ceil(n/2), absmax float32 ceil(n/blocksize))."""
    return quantize_4bit(x, NF4_CODE, blocksize)


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    blocksize: int = 64,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of quantize_nf4 (up to the quantization error), as `dtype` with `shape`."""
    return dequantize_4bit(packed, absmax, shape, NF4_CODE, blocksize, dtype)


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
