"""Helpers shared by the Triton kernels: rounding, bf16 emulation, packed-code loading.

Everything here is written so that it runs both compiled (sm_80/86/90) and under the Triton
interpreter (``TRITON_INTERPRET=1``, numpy on the CPU). Two interpreter gaps shape it:

* ``libdevice`` (``rint``) is an extern call the interpreter cannot run, so round-half-to-even
  is written with ``floor`` (:func:`rne`, exact) or the 1.5·2²³ trick (:func:`rne_small`).
* The interpreter stores bf16 as raw uint16: a bf16 ``tl.dot`` returns garbage and fp32→bf16
  casts truncate. The kernels take an ``INTERPRET`` constexpr and, only then, round to bf16 by
  hand (:func:`round_bf16`) and multiply in fp32. Compiled, they use the native bf16 ``tl.dot``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: Whether the kernels were decorated in interpreter mode (Triton decides at decoration time).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

#: Smallest head-dim tile: ``tl.dot`` on int8 needs K >= 32 on NVIDIA GPUs.
MIN_DIM_TILE = 32
#: Largest head dim the kernels accept (Q/K and V).
MAX_HEAD_DIM = 256


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """Host-side ceil(a / b). (``triton.cdiv`` is a constexpr function in Triton 3.8: a call from
    Python costs several µs, and a GPU call of these kernels is host-bound at ViT sizes.)"""
    return -(-int(a) // int(b))


_PLACEHOLDERS: dict = {}


def placeholder(dtype, device) -> torch.Tensor:
    """A one-element tensor for a pointer argument the kernel does not touch (its constexpr
    switch is off), made once per (dtype, device) instead of once per call."""
    key = (dtype, torch.device(device))
    t = _PLACEHOLDERS.get(key)
    if t is None:
        t = _PLACEHOLDERS[key] = torch.zeros(1, dtype=dtype, device=device)
    return t


def per_byte(bits: int) -> int:
    return 8 // bits


@triton.jit
def rne(x):
    """Round half to even, exactly (same result as ``torch.round``/``rint``) for any float32."""
    r = tl.floor(x)
    f = x - r  # exact
    half = r * 0.5
    odd = tl.floor(half) != half
    up = (f > 0.5) | ((f == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


@triton.jit
def rne_small(x):
    """Round half to even for |x| < 2**22 with two additions (cheap; used for P in [0, 255])."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def round_to_grid(y, BITS: tl.constexpr):
    """Nearest code (as float32) of ``y`` (value / scale) on the grid of ``BITS`` (quant.py)."""
    if BITS == 2:
        c = 2.0 * tl.floor(y * 0.5) + 1.0
        return tl.minimum(tl.maximum(c, -3.0), 3.0)
    else:
        QMAX: tl.constexpr = 127.0 if BITS == 8 else 7.0
        return tl.minimum(tl.maximum(rne(y), -QMAX), QMAX)


@triton.jit
def round_bf16(x):
    """fp32 → nearest bf16 (ties to even), returned as fp32. For finite x (NaN not handled)."""
    b = x.to(tl.int32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
    return b.to(tl.float32, bitcast=True)


@triton.jit
def load_codes(C, rows, N, R: tl.constexpr, BITS: tl.constexpr, DPT: tl.constexpr):
    """Load rows ``rows`` of one (batch, head)'s packed code matrix (N, DPT // per_byte) at
    ``C`` (a scalar pointer: 64-bit base, 32-bit tile offsets), unpacked to int8 codes [R, DPT]
    in natural channel order. Rows >= N read as zero bytes.

    int4: two's-complement nibbles, element 2j in the low nibble of byte j (sign-extended with an
    arithmetic shift pair). int2: element 4j+i at bits 2i..2i+1 of byte j, code = 2u - 3.
    The byte planes are put back in order with ``join`` + ``reshape`` (row-major interleave)."""
    PER: tl.constexpr = 8 // BITS
    NB: tl.constexpr = DPT // PER
    ptrs = C + rows[:, None] * NB + tl.arange(0, NB)[None, :]
    b = tl.load(ptrs, mask=(rows < N)[:, None], other=0)  # int8 view of the storage
    if BITS == 8:
        return b
    elif BITS == 4:
        lo = (b << 4) >> 4
        hi = b >> 4
        return tl.reshape(tl.join(lo, hi), [R, DPT]).to(tl.int8)
    else:
        c0 = (b & 3) * 2 - 3
        c1 = ((b >> 2) & 3) * 2 - 3
        c2 = ((b >> 4) & 3) * 2 - 3
        c3 = ((b >> 6) & 3) * 2 - 3
        # join(join(c0, c2), join(c1, c3))[..., i, j] = c[2i + j]: row-major is c0 c1 c2 c3.
        return tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), [R, DPT]).to(tl.int8)
