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

Dequantize: a byte-indexed table that stays in L1, in cache-sized chunks.
    Each packed byte indexes a 256-entry table of its two float32 codes (complex64 is only an
    8-byte carrier, so one index_select writes two elements); the 2 KiB table stays in the L1
    cache, where a 65536-entry table of byte pairs (1 MiB) missed it on random words and was
    slower despite half the lookups. One multiply by absmax then writes the output: straight into
    it for float32; for a narrower dtype in place in the float32 chunk, then one converting copy
    (a multiply that casts to bfloat16 on the fly costs about twice as much). Chunks of 128K
    elements per thread keep the indices and codes in small reused buffers (512 KiB of codes per
    core, in L2) instead of full-size temporaries, each of which would cost a fresh,
    page-fault-bound allocation on every call. A CUDA device takes the whole tensor as one chunk
    (its caching allocator reuses memory, and every extra launch costs microseconds).

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
_CHUNK_ELEMENTS = 1 << 17  # dequantize works on 128K elements (512 KiB of float32 codes) at a time

_quantize_tables: dict[tuple[tuple[float, ...], torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
_byte_tables: dict[tuple[tuple[float, ...], torch.device], torch.Tensor] = {}


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


def _byte_table(code: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(256,) complex64: the two float32 code values held by every packed byte.

    A byte b holds two 4-bit codes, the first element in the high nibble: entry b keeps
    (code[b >> 4], code[b & 15]) in element order.
    """
    key = (tuple(code.tolist()), device)
    if key not in _byte_tables:
        b = torch.arange(256)
        table = torch.stack([code[b >> 4], code[b & 15]], dim=1)  # (256, 2) float32, in order
        _byte_tables[key] = table.view(torch.complex64).view(-1).to(device)
    return _byte_tables[key]


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
    packed: torch.Tensor, absmax: torch.Tensor, n: int, code: torch.Tensor, blocksize: int, dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """X~ = Q[q] * N_b as nf4.dequantize_4bit's reference lines: (n,) of dtype, float32 math.

    `out`: a contiguous flat buffer of `dtype` with at least 2 * ceil(n/2) elements to write
    into (nf4.dequantize_4bit checks it); the result is a view of it.
    """
    table = _byte_table(code, packed.device)  # (256,) two float32 codes per entry
    flat = packed.reshape(-1)  # (ceil(n/2),) bytes
    absmax = absmax.to(torch.float32)
    if out is None:
        out = torch.empty(2 * flat.numel(), dtype=dtype, device=packed.device)  # (n or n + 1,)
    else:
        out = out[: 2 * flat.numel()]
    if packed.device.type == "cpu":  # each thread's share of a chunk stays in its core's cache
        chunk = blocksize * max(1, _CHUNK_ELEMENTS * torch.get_num_threads() // blocksize)
    else:  # CUDA: one pass; its caching allocator reuses memory and every launch costs microseconds
        chunk = out.numel()
    idx = torch.empty(min(chunk, out.numel()) // 2, dtype=torch.int32, device=packed.device)
    codes = torch.empty(idx.numel() * 2, dtype=torch.float32, device=packed.device)
    for start in range(0, out.numel(), chunk):  # a few large chunks, never a loop over blocks
        stop = min(start + chunk, out.numel())
        i = idx[: (stop - start) // 2]
        i.copy_(flat[start // 2 : stop // 2])  # (chunk/2,) uint8 -> int32 index
        q = codes[: stop - start]  # (chunk,) float32
        torch.index_select(table, 0, i, out=q.view(torch.complex64))  # Q[q], 2 elements per byte
        o = out[start:stop] if dtype == torch.float32 else q  # float32: write the output directly
        full = max(0, min(stop, n - n % blocksize) - start)  # elements of whole blocks here
        torch.mul(q[:full].view(-1, blocksize), absmax[start // blocksize : (start + full) // blocksize, None],
                  out=o[:full].view(-1, blocksize))  # X~ = Q[q] * N_b in float32  # fmt: skip
        tail = max(0, min(stop, n) - start - full)  # the partial last block, if it is in this chunk
        if tail:
            torch.mul(q[full : full + tail], absmax[-1], out=o[full : full + tail])
        if o is q:
            out[start:stop].copy_(q)  # rounded once to dtype
    return out[:n]
