"""Blockwise absmax quantization with a codebook, and the dynamic 8-bit map.

Papers: Dettmers 2016, "8-Bit Approximations for Parallelism in Deep Learning" (arXiv
1511.04561) for the dynamic map; Dettmers et al. 2022, "8-bit Optimizers via Block-wise
Quantization" (arXiv 2110.02861) for blockwise absmax quantization.

Blockwise quantization (arXiv 2110.02861, Eq. 1 and its blockwise form): the flat tensor X is
cut into blocks of B elements; block b keeps one float32 scale N_b = max |X_b| and every element
is stored as the index of the nearest value of a codebook Q (sorted, inside [-1, 1]):

    q_i = argmin_j | Q_j - X_i / N_b |        (quantize;  b = block of element i)
    X~_i = Q[q_i] * N_b                        (dequantize)

"Nearest" is decided by the midpoints between neighbouring codes, with a tie going to the lower
code: q_i = #{ j : (Q_j + Q_{j+1}) / 2 < X_i / N_b }. The partial last block gets its own N_b.
X_i / N_b is computed as X_i * (1 / N_b) in float32, the way bitsandbytes' reference backend does,
so codes agree bit for bit.

The dynamic map (arXiv 1511.04561, section 3): an 8-bit float-like type whose bits are
[sign | run of zeros = exponent E | 1 indicator | fraction]. With E leading zeros the value has
the magnitude 10^-E and the remaining bits form a linear fraction in [0.1, 1]; small exponents
leave many fraction bits (fine steps near 1), large ones few (coarse steps near 0). This spends
its 256 codes on relative precision over 7 decades, which suits optimizer states and the
absmax statistics of double quantization.
"""

from __future__ import annotations

import torch

__all__ = [
    "dynamic_code",
    "check_blocksize",
    "check_finite",
    "check_scales",
    "check_code",
    "blockwise_absmax",
    "nearest_code",
    "scale_blocks",
    "quantize_blockwise",
    "dequantize_blockwise",
]


# ----------------------------------------------------------------------------- the dynamic map
def dynamic_code(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The dynamic quantization map (arXiv 1511.04561), 2**total_bits sorted float32 values.

    Built step by step, equal to bitsandbytes' ``create_dynamic_map`` value for value:
    for each exponent i = 0 .. max_exponent_bits-1 the fraction bits left over give
    2**(i + non_sign_bits - max_exponent_bits) (signed) linear steps over [0.1, 1]; the code
    uses the middle of each step, scaled by the decade 10**(i - (max_exponent_bits - 1)).
    Zero and 1.0 complete the map (for signed=True its lowest value is -0.99297, not -1).
    """
    if total_bits < 2 or not 1 <= max_exponent_bits <= total_bits - 1:
        raise ValueError(
            f"dynamic_code needs total_bits >= 2 and 1 <= max_exponent_bits <= total_bits-1, "
            f"got total_bits={total_bits}, max_exponent_bits={max_exponent_bits}"
        )
    non_sign_bits = total_bits - 1
    values: list[torch.Tensor] = []
    for i in range(max_exponent_bits):  # one decade per exponent (a loop over <= 7 exponents)
        # fraction bits left once i exponent zeros and the indicator bit are spent
        frac_bits = i + non_sign_bits - max_exponent_bits + (0 if signed else 1)
        edges = torch.linspace(0.1, 1, 2**frac_bits + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0  # middle of each linear fraction step
        decade = 10 ** (-(max_exponent_bits - 1) + i)  # magnitude 10^-E of this exponent
        values.append(decade * means)
        if signed:
            values.append(-decade * means)
    # exponent all zero and no indicator bit: a few extra linear values in the last decade
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1
    if extra > 0:
        edges = torch.linspace(0.1, 1, extra + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        decade = 10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)
        values.append(decade * means)
        if signed:
            values.append(-decade * means)
    values.append(torch.tensor([0.0, 1.0]))
    code = torch.cat(values)
    if code.numel() > 2**total_bits:
        raise ValueError(f"dynamic_code: {code.numel()} values do not fit {total_bits} bits")
    # unused codes (unsigned maps) are padded with zeros, as in bitsandbytes
    code = torch.cat([code, torch.zeros(2**total_bits - code.numel())])
    return code.sort().values


# ----------------------------------------------------------------------------- shared parts
def check_blocksize(blocksize: int) -> None:
    """Raise ValueError unless blocksize is a power of two >= 16."""
    if not isinstance(blocksize, int) or blocksize < 16 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two >= 16 (e.g. 64 or 256), got {blocksize!r}")


def check_finite(x: torch.Tensor, absmax: torch.Tensor, name: str) -> None:
    """Raise ValueError naming how many elements of x are NaN/Inf (found through absmax).

    A block's absmax is NaN or Inf exactly when the block holds a NaN or an Inf, and max()
    propagates NaN, so one reduction over the small absmax tensor decides; the count is taken
    only on the error path.
    """
    if not bool(torch.isfinite(absmax.max())):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"{name}: the input has {bad} NaN/Inf element(s) out of {x.numel()}; "
            "replace or clip them first (e.g. torch.nan_to_num) before quantizing"
        )


def check_scales(absmax: torch.Tensor, name: str) -> None:
    """Raise ValueError if a block scale N_b is NaN or Inf: every element of its block would be.

    Bad scales come from a corrupted checkpoint or from arithmetic gone wrong upstream (e.g. a
    double-dequantized absmax); caught here they never become a silent wrong weight. On the CPU
    the check is one reduction over the small absmax tensor (aminmax: 10x faster than isfinite on
    every element). On an accelerator a Python raise
    would need a host sync in every forward of a quantized layer (no host sync inside a training
    step), so the check is queued on the device (torch._assert_async): a bad scale stops the run
    at the next synchronization instead.
    """
    ok = torch.isfinite(torch.stack(absmax.aminmax())).all()  # NaN propagates; +-Inf is an extreme
    message = (
        f"{name}: absmax holds NaN/Inf block scales; the quantized tensor or its checkpoint is "
        "corrupted: quantize the weights again from finite values (or reload an intact checkpoint)"
    )
    if absmax.device.type != "cpu":
        torch._assert_async(ok, message)
    elif not bool(ok):
        bad = int((~torch.isfinite(absmax)).sum())
        raise ValueError(f"{message} ({bad} of {absmax.numel()} scales)")


def check_code(code: torch.Tensor) -> None:
    """Raise ValueError unless the codebook is finite and sorted (nearest code uses its midpoints)."""
    if not bool(torch.isfinite(code).all()):
        raise ValueError("the codebook holds NaN/Inf values; pass finite values (e.g. dynamic_code())")
    if not bool((code[1:] >= code[:-1]).all()):
        raise ValueError(
            "the codebook must be sorted in ascending order (nearest code is found by bisecting its "
            "midpoints); pass code.sort().values and use the same sorted code to dequantize"
        )


def blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """N_b = max |X_b| per block of a flat tensor as float32 (nb,); the last block may be partial."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)  # (nb_full, B)
    hi, lo = blocks.amax(dim=1), blocks.amin(dim=1)  # two reductions: twice as fast as aminmax on CPU
    absmax = torch.maximum(hi, lo.neg()).float()  # max |x| = max(max x, -min x), exact
    if full < n:  # the partial last block gets its own absmax
        absmax = torch.cat([absmax, flat[full:].abs().max().float().view(1)])
    return absmax


def nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code for values in [-1, 1]: #{midpoints < value} (ties -> lower)."""
    mids = (code[:-1] + code[1:]) / 2  # (len(code)-1,) decision boundaries, float32
    return torch.bucketize(scaled, mids.to(scaled.device), out_int32=True)


def scale_blocks(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """X_i / N_b in float32: full blocks by a multiply with 1/N_b, the tail block by a division."""
    n = flat.numel()
    full = n - n % blocksize
    inv = 1.0 / absmax[: full // blocksize].clamp(min=1e-38)  # zero blocks scale to zero, not NaN
    out = torch.empty(n, dtype=torch.float32, device=flat.device)
    torch.mul(flat[:full].view(-1, blocksize), inv[:, None], out=out[:full].view(-1, blocksize))
    if full < n:
        out[full:] = flat[full:].float() / absmax[-1].clamp(min=1e-38)
    return out


# ----------------------------------------------------------------------------- 8-bit blockwise
def quantize_blockwise(
    x: torch.Tensor, blocksize: int = 256, code: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x blockwise to 8-bit indices into `code` (default: the signed dynamic map).

    Returns (codes uint8 with x's shape, absmax float32 of ceil(n / blocksize) blocks).
    """
    check_blocksize(blocksize)
    if not x.is_floating_point():
        raise TypeError(f"quantize_blockwise expects a floating-point tensor, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError("quantize_blockwise: the input is empty; pass a tensor with at least one element")
    code = dynamic_code(True) if code is None else code.to(device=x.device, dtype=torch.float32).reshape(-1)
    if code.numel() > 256:
        raise ValueError(f"an 8-bit code has at most 256 values, got {code.numel()}")
    check_code(code)
    flat = x.reshape(-1)
    absmax = blockwise_absmax(flat, blocksize)  # (nb,)
    check_finite(flat, absmax, "quantize_blockwise")
    idx = nearest_code(scale_blocks(flat, absmax, blocksize), code.to(x.device))  # (n,) int32
    return idx.to(torch.uint8).view(x.shape), absmax


def dequantize_blockwise(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int = 256,
    code: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """X~_i = Q[q_i] * N_b, computed in float32 and cast once to `dtype`; keeps codes' shape."""
    check_blocksize(blocksize)
    if codes.dtype != torch.uint8:
        raise TypeError(f"dequantize_blockwise expects uint8 codes, got {codes.dtype}")
    n = codes.numel()
    nb = -(-n // blocksize)
    if absmax.numel() != nb:
        raise ValueError(f"{n} codes in blocks of {blocksize} need {nb} absmax values, got {absmax.numel()}")
    code = dynamic_code(True) if code is None else code.to(torch.float32)
    code = code.to(codes.device)
    vals = code[codes.reshape(-1).long()]  # (n,) float32 codebook lookup Q[q_i]
    full = n - n % blocksize
    vals[:full].view(-1, blocksize).mul_(absmax[: full // blocksize].float()[:, None])  # * N_b
    if full < n:
        vals[full:].mul_(absmax[-1].float())
    return vals.to(dtype).view(codes.shape)
