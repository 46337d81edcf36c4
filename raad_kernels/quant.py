"""Quantization core: the arithmetic every backend implements (docs/design.md, "Quantization scheme").

Conventions, shared by all backends:

* A quantized row is ``x ≈ scale * code`` with one float32 ``scale`` per token (row) and integer
  ``code`` on the grid of its bit-width:

  ====  ==========================  ==========================================
  bits  codes                       clipping
  ====  ==========================  ==========================================
  8     integers in [-127, 127]     row absmax
  4     integers in [-7, 7]         absmax or min(absmax, a·rms), searched per row
  2     odd integers {-3,-1,1,3}    absmax or min(absmax, a·rms), searched per row
  ====  ==========================  ==========================================

  The int2 grid has no zero, so all four levels carry information; as integers the codes are
  odd, so ``code_q · code_k`` stays an exact integer dot product and the scale is half a step.
* Low-bit clipping: the top level sits at the row's absmax or at ``a · rms(row)`` (never above
  the absmax) for ``a`` in :data:`CLIP_GRID`, whichever of these candidates gives the row the
  least squared quantization error (the absmax first; ties keep the earlier candidate).
* Rounding is round-half-to-even (``torch.round``, ``nearbyint``, ``rint``).
* Packing (int4/int2 in memory): little-endian within a byte, element ``i`` at bit
  ``bits * (i % per_byte)``. int4 stores the two's-complement nibble; int2 stores
  ``(code + 3) / 2`` in {0, 1, 2, 3}. A row is padded to whole bytes; padding is never read back.
* K smoothing subtracts the per-(batch, head, channel) mean of K over tokens (softmax-invariant).
* Rotation multiplies Q and K by the same orthonormal Sylvester–Hadamard matrix over the head
  dimension, zero-padded to the next power of two (``padded_dim``). Q·Kᵀ is unchanged exactly;
  outlier channels are spread over all channels. On by default at 4 and 2 bits, off at 8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

QK_BITS = (2, 4, 8)
PV_BITS = (8, 16)

#: Largest code magnitude per bit-width.
QMAX = {8: 127, 4: 7, 2: 3}
#: Clipping multiples of the row RMS searched at 4 and 2 bits (int8 always clips at absmax).
CLIP_GRID = {
    4: (2.0, 2.25, 2.5, 2.75, 3.0, 3.5, 4.0, 5.0),
    2: (1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0),
}
#: Fixed scale of the unsigned 8-bit probabilities in P·V (P is in [0, 1]).
P_SCALE = 1.0 / 255.0


def default_rotate(qk_bits: int) -> bool:
    """Rotation is needed at 4 and 2 bits; at 8 bits per-token scales alone pass."""
    return qk_bits < 8


def padded_dim(d: int, rotate: bool) -> int:
    """Head dim after rotation padding: the next power of two (unchanged without rotation)."""
    return 1 << max(0, (d - 1).bit_length()) if rotate else d


# --------------------------------------------------------------------------------------------
# Smoothing and rotation
# --------------------------------------------------------------------------------------------

def smooth_k(k: torch.Tensor) -> torch.Tensor:
    """Subtract the mean over tokens per (batch, head, channel). Adds a per-query constant to
    every score of a row, which softmax ignores."""
    return k - k.mean(dim=-2, keepdim=True)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh–Hadamard transform over the last dim (a power of two)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two last dim, got {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(*lead, n) * (1.0 / math.sqrt(n))).to(x.dtype)


def hadamard_matrix(n: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """Orthonormal Sylvester–Hadamard matrix of order n (power of two); ``fwht(x) == x @ H``."""
    return fwht(torch.eye(n, dtype=dtype, device=device))


def rotate(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad the last dim to a power of two and apply the orthonormal Hadamard transform."""
    d = x.shape[-1]
    dp = padded_dim(d, True)
    if dp != d:
        x = torch.nn.functional.pad(x, (0, dp - d))
    return fwht(x)


# --------------------------------------------------------------------------------------------
# Per-token quantization
# --------------------------------------------------------------------------------------------

def _round_to_grid(y: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest code (as float) for values already divided by the scale."""
    if bits == 2:  # nearest odd integer, clamped to {-3, -1, 1, 3}
        return (2.0 * torch.floor(y * 0.5) + 1.0).clamp_(-3.0, 3.0)
    q = QMAX[bits]
    return torch.round(y).clamp_(-q, q)


def token_scales(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row float32 scale for ``x`` (float32, rows on the last dim) at ``bits``.

    8 bits: absmax / 127. 4 and 2 bits: of the absmax and the clipping multiples of the RMS in
    CLIP_GRID (capped at the absmax), the one with the least squared error. An all-zero row gets a positive scale (1, or the
    smallest normal float at int2, whose grid has no zero) so nothing divides by zero.
    """
    x = x.float()
    absmax = x.abs().amax(dim=-1)
    qmax = QMAX[bits]
    if bits == 8:
        scale = absmax / qmax
    else:
        rms = x.pow(2).mean(dim=-1).sqrt()
        best_err = None
        scale = None
        clips = [absmax] + [torch.minimum(a * rms, absmax) for a in CLIP_GRID[bits]]
        for clip in clips:
            s = clip / qmax
            s_safe = torch.where(s > 0, s, torch.ones_like(s))
            err = (_round_to_grid(x / s_safe[..., None], bits) * s_safe[..., None] - x).pow(2).sum(-1)
            if best_err is None:
                best_err, scale = err, s
            else:
                better = err < best_err  # strict: ties keep the earlier candidate
                best_err = torch.where(better, err, best_err)
                scale = torch.where(better, s, scale)
    tiny = torch.finfo(torch.float32).tiny
    return torch.where(scale > 0, scale, torch.full_like(scale, tiny if bits == 2 else 1.0))


def quantize(x: torch.Tensor, bits: int, scale: torch.Tensor | None = None):
    """Quantize rows of ``x`` → (int8 codes, float32 per-row scales)."""
    if bits not in QK_BITS:
        raise ValueError(f"bits must be one of {QK_BITS}, got {bits!r}")
    x = x.float()
    if scale is None:
        scale = token_scales(x, bits)
    codes = _round_to_grid(x / scale[..., None], bits).to(torch.int8)
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale[..., None]


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------

def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack int8 codes along the last dim: int8 → unchanged, int4 → 2 per byte, int2 → 4 per byte.
    Returns uint8 for 4 and 2 bits."""
    if bits == 8:
        return codes
    per = 8 // bits
    d = codes.shape[-1]
    pad = (-d) % per
    c = codes.to(torch.int16)
    if bits == 4:
        c = c & 0xF
    elif bits == 2:
        c = (c + 3) >> 1
    else:
        raise ValueError(f"bits must be one of {QK_BITS}, got {bits!r}")
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.view(*c.shape[:-1], -1, per)
    out = torch.zeros(c.shape[:-1], dtype=torch.int16, device=codes.device)
    for i in range(per):
        out |= c[..., i] << (bits * i)
    return out.to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int8 codes with last dim ``d``."""
    if bits == 8:
        return packed[..., :d]
    per = 8 // bits
    p = packed.to(torch.int16)
    mask = (1 << bits) - 1
    parts = [(p >> (bits * i)) & mask for i in range(per)]
    c = torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], -1)[..., :d]
    if bits == 4:
        c = torch.where(c >= 8, c - 16, c)
    else:
        c = 2 * c - 3
    return c.to(torch.int8)


# --------------------------------------------------------------------------------------------
# Q/K preparation: the whole pre-processing of the score product
# --------------------------------------------------------------------------------------------

@dataclass
class QuantizedQK:
    """Integer codes (unpacked, int8, last dim ``dim``) and per-token float32 scales."""

    q_codes: torch.Tensor  # (B, H, Nq, dim)
    q_scale: torch.Tensor  # (B, H, Nq)
    k_codes: torch.Tensor  # (B, H, Nk, dim)
    k_scale: torch.Tensor  # (B, H, Nk)
    bits: int
    dim: int  # head dim after rotation padding


def prepare_qk(q: torch.Tensor, k: torch.Tensor, bits: int, *, smooth: bool = True,
               rotate_qk: bool | None = None) -> QuantizedQK:
    """Smoothing → rotation → per-token quantization of Q and K (float32 arithmetic)."""
    if rotate_qk is None:
        rotate_qk = default_rotate(bits)
    q = q.float()
    k = k.float()
    if smooth:
        k = smooth_k(k)
    if rotate_qk:
        q, k = rotate(q), rotate(k)
    qc, qs = quantize(q, bits)
    kc, ks = quantize(k, bits)
    return QuantizedQK(qc, qs, kc, ks, bits, q.shape[-1])


@dataclass
class QuantizedV:
    """int8 V per channel, after subtracting the per-channel token mean (added back to the
    output: normalised probabilities sum to one)."""

    codes: torch.Tensor  # (B, H, Nk, Dv) int8
    scale: torch.Tensor  # (B, H, Dv) float32
    mean: torch.Tensor   # (B, H, Dv) float32


def prepare_v(v: torch.Tensor) -> QuantizedV:
    v = v.float()
    mean = v.mean(dim=-2)
    vs = v - mean[..., None, :]
    scale = vs.abs().amax(dim=-2) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(vs / scale[..., None, :]).clamp_(-127, 127).to(torch.int8)
    return QuantizedV(codes, scale, mean)


def quantize_probs(p: torch.Tensor) -> torch.Tensor:
    """Unnormalised probabilities in [0, 1] → unsigned 8-bit codes (as float), scale 1/255."""
    return torch.round(p * 255.0)


def pv_half_dtype(dtype: torch.dtype) -> torch.dtype:
    """16-bit operand type of P·V: bf16 for bf16 inputs, fp16 otherwise (more mantissa for P)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
