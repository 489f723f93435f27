"""The fast paths behind kernels/nf4.py: the same bytes and values, fewer passes over memory.

Read kernels/nf4.py first: it states the math (nearest code by midpoints, nibble packing,
X~ = Q[q] * N_b) in the few lines a student can follow, and dispatches here. Everything in this
file computes exactly what those lines compute (tests/test_nf4.py checks equal bytes and equal
values over shapes, dtypes, blocksizes and values at every midpoint); it only does it faster on
a CPU, in eager torch, with no Python loop over elements or blocks.

Quantize: a lookup keyed by the float's top 22 bits instead of a binary search.
    bucketize (a binary search over the 15 midpoints per element) costs more than the rest of
    quantization together. A float32 is a sign bit and a magnitude that orders like an integer,
    so the floats that share their top 22 bits (sign, 8 exponent bits, 13 mantissa bits) form
    one short interval of relative width 2^-13. A 4 MiB table gives each interval its code, read
    by one index_select keyed by s.view(int32) >> 10. The few intervals that hold a midpoint are
    flagged (+128 on the code); only their elements (~0.02% of N(0, 1) weights) are decided
    exactly, by comparing s with the midpoint. The flags are found 8 codes at a time, by reading
    the uint8 codes as int64 words and masking the flag bit of all 8 bytes at once.

Dequantize: whole bytes, two at a time, in cache-sized chunks.
    Two packed bytes read as one uint16 word index a 65536-entry table of their four float32
    codes (complex128 is only a 16-byte carrier, so one index_select writes four elements),
    then one multiply by absmax writes the output. Chunks of 512K elements keep the indices and
    codes in small reused buffers instead of full-size temporaries, each of which would cost a
    fresh, page-fault-bound allocation on every call.

On a shared 2-core CPU each extra parallel op can wait a scheduler slice for its second thread,
so both paths keep the number of ops and of fresh large buffers small.
"""

from __future__ import annotations

import torch

from .blockwise import blockwise_absmax, nearest_code

__all__ = ["quantize_codes", "dequantize_codes"]

_KEY_BITS = 22  # a float32's top 22 bits: sign, 8 exponent bits, 13 mantissa bits
_KEY_SHIFT = 32 - _KEY_BITS
_AMBIGUOUS = 128  # flag bit in the quantize table: a midpoint lies inside this key's interval
_FLAG_WORD = int.from_bytes(bytes([_AMBIGUOUS] * 8), "little", signed=True)  # the flag in 8 bytes
_CHUNK_ELEMENTS = 1 << 19  # dequantize works on 512K elements (2 MiB of float32 codes) at a time

_quantize_tables: dict[tuple[tuple[float, ...], torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
_word_tables: dict[tuple[tuple[float, ...], torch.device], torch.Tensor] = {}


# ----------------------------------------------------------------------------- lookup tables
def _quantize_table(code: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(table, mids): table[key] = code index of every float whose top 22 bits are `key`.

    Where an interval holds a midpoint, its two ends take different codes: the entry is then the
    lower code + 128 (ambiguous), decided exactly later by _resolve_ambiguous.
    """
    key = (tuple(code.tolist()), device)
    if key not in _quantize_tables:
        mids = (code[:-1] + code[1:]) / 2  # (15,) float32 decision boundaries
        keys = torch.arange(1 << _KEY_BITS, dtype=torch.int32) << _KEY_SHIFT  # low bits zero
        ends = torch.stack([keys, keys | ((1 << _KEY_SHIFT) - 1)]).view(torch.float32)  # (2, 2^22)
        idx = nearest_code(ends, code)  # (2, 2^22) code of both ends of every interval
        lower, upper = idx.amin(0), idx.amax(0)  # negative floats: the ends swap
        ambiguous = (upper > lower) & ends.isfinite().all(0)  # Inf/NaN keys: the caller raises
        assert bool((upper - lower <= 1)[ambiguous].all()), "an interval holds at most one midpoint"
        table = (lower + _AMBIGUOUS * ambiguous).to(torch.uint8)  # (2^22,)
        _quantize_tables[key] = (table.to(device), mids.to(device))
    return _quantize_tables[key]


def _word_table(code: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(65536,) complex128: the four float32 code values held by every pair of packed bytes.

    Two packed bytes read as one uint16 word w hold four 4-bit codes (high nibble first in each
    byte). Entry w keeps their four float32 values in element order.
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


# ----------------------------------------------------------------------------- quantize
def _resolve_ambiguous(
    codes: torch.Tensor, flat: torch.Tensor, inv: torch.Tensor, mids: torch.Tensor, blocksize: int
) -> None:
    """Decide the flagged codes exactly, in place: lower code + (X_i / N_b > midpoint).

    Only the few int64 words with a flag (~0.2% for N(0, 1) weights) are opened. Gathers use
    index_select / index_copy_, which are much cheaper than advanced indexing on a large tensor.
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


def quantize_codes(flat: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes and absmax of nf4.quantize_4bit's reference lines, computed by table lookup.

    flat: (n,) floating tensor; code: (16,) sorted float32. Returns (codes uint8 of n + n % 2
    elements, an odd n padded by the code of 0.0; absmax float32 (nb,)). NaN/Inf give
    meaningless codes and a non-finite absmax: the caller checks absmax and raises.
    """
    n = flat.numel()
    full = n - n % blocksize
    wide = flat if flat.dtype == torch.float32 else flat.float()  # (n,) float32, one copy if needed
    absmax = blockwise_absmax(wide, blocksize)  # (nb,) N_b = max |X_b|
    table, mids = _quantize_table(code, flat.device)
    codes = torch.empty(-(-n // 8) * 8, dtype=torch.uint8, device=flat.device)  # whole 8-byte words
    codes[n:] = int(nearest_code(torch.zeros(1), code))  # the pad: code of 0.0
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
    return codes[: n + n % 2], absmax


# ----------------------------------------------------------------------------- dequantize
def dequantize_codes(
    packed: torch.Tensor, absmax: torch.Tensor, n: int, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    """X~ = Q[q] * N_b as nf4.dequantize_4bit's reference lines: (n,) of dtype, float32 math."""
    table = _word_table(code, packed.device)  # (65536,) four float32 codes per entry
    flat = packed.reshape(-1)  # (ceil(n/2),) bytes
    if flat.numel() % 2 or flat.storage_offset() % 2:  # read as whole, aligned 16-bit words
        flat = torch.cat([flat, flat.new_zeros(flat.numel() % 2)])
    words = flat.view(torch.uint16)  # (W,) two packed bytes per word, W = bytes/2
    absmax = absmax.to(torch.float32)
    out = torch.empty(4 * words.numel(), dtype=dtype, device=packed.device)  # (>= n,)
    chunk = max(_CHUNK_ELEMENTS, blocksize)  # elements, a multiple of blocksize (both powers of 2)
    idx = torch.empty(min(chunk, out.numel()) // 4, dtype=torch.int32, device=packed.device)
    codes = torch.empty(idx.numel() * 4, dtype=torch.float32, device=packed.device)
    for start in range(0, out.numel(), chunk):  # a few large chunks, never a loop over blocks
        stop = min(start + chunk, out.numel())
        i = idx[: (stop - start) // 4]
        i.copy_(words[start // 4 : stop // 4])  # (chunk/4,) uint16 -> int32 index
        q = codes[: stop - start]  # (chunk,) float32
        torch.index_select(table, 0, i, out=q.view(torch.complex128))  # Q[q], 4 elements per word
        o = out[start:stop]
        full = max(0, min(stop, n - n % blocksize) - start)  # elements of whole blocks here
        torch.mul(q[:full].view(-1, blocksize), absmax[start // blocksize : (start + full) // blocksize, None],
                  out=o[:full].view(-1, blocksize))  # X~ = Q[q] * N_b in float32, rounded once to dtype  # fmt: skip
        tail = max(0, min(stop, n) - start - full)  # the partial last block, if it is in this chunk
        if tail:
            torch.mul(q[full : full + tail], absmax[-1], out=o[full : full + tail])
    return out[:n]
