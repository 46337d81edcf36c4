"""Fused quantization kernels (the arithmetic of ``raad_kernels.quant``, in Triton).

The attention call (``flash.forward``) uses :func:`_prep_kv_kernel`: one launch for K and V
(K's mean over tokens, then its rows; V's per-channel statistics, then its codes and their
column sums), writing into the call's workspace; Q is quantized inside the attention kernel by
the same row code (:func:`quant_tile`). The row arithmetic: load (any strides, any float dtype)
→ float32 → subtract the K mean → Hadamard rotation (an in-register fast Walsh–Hadamard
butterfly over the zero-padded power-of-two dim) → per-row scale (absmax at int8; at 4/2 bits
the least-squared-error candidate among the absmax and ``min(a·rms, absmax)`` for ``a`` in
``quant.CLIP_GRID``) → round half to even → pack (int4: 2 per byte, int2: 4 per byte,
``quant.pack``'s layout) → store.

:func:`column_stats` and :func:`quantize_qk` are the same arithmetic as standalone launches
(tests and tools use them: quantize_qk is what the fused path's Q codes are compared with).

Code rows are stored ``DPT`` codes wide (``DPT`` = the head-dim tile: a power of two >= 32 and
>= the quantized dim ``d_eff``); codes past ``d_eff`` are written as all-zero bits (code 0 at
int8/int4, code -3 at int2, whose grid has no zero: the attention kernel masks those columns of
Q to zero at int2). The first ``ceil(d_eff / per_byte)`` bytes of a row are byte-for-byte what
``quant.pack`` produces.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import quant
from ._common import INTERPRET, cdiv, next_pow2, per_byte, placeholder, rne, round_to_grid

_GRIDS: dict = {}


def _clip_grid(bits: int, device) -> torch.Tensor:
    key = (bits, str(device))
    if key not in _GRIDS:
        _GRIDS[key] = torch.tensor(quant.CLIP_GRID[bits], dtype=torch.float32, device=device)
    return _GRIDS[key]


# --------------------------------------------------------------------------------------------
# Column statistics: K mean; V mean, scale and codes
# --------------------------------------------------------------------------------------------

@triton.jit
def _k_mean(K, Km, pid, Nk, D, H, skb, skh, skn, skd, NBLK_D,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = pid // NBLK_D
    cols = (pid % NBLK_D) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    base = K + (bh // H).to(tl.int64) * skb + (bh % H).to(tl.int64) * skh
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n0 in range(0, Nk, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        x = tl.load(base + rows[:, None] * skn + cols[None, :] * skd,
                    mask=(rows < Nk)[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x, axis=0)
    tl.store(Km + bh.to(tl.int64) * D + cols, acc / Nk, mask=cmask)


@triton.jit
def _v_quant(V, Vc, Vs, Vm, Vsum, pid, Nk, DV, H, svb, svh, svn, svd, NBLK_D,
             DVP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = pid // NBLK_D
    cols = (pid % NBLK_D) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < DV
    base = V + (bh // H).to(tl.int64) * svb + (bh % H).to(tl.int64) * svh
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n0 in range(0, Nk, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        x = tl.load(base + rows[:, None] * svn + cols[None, :] * svd,
                    mask=(rows < Nk)[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x, axis=0)
    mean = acc / Nk
    amax = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n0 in range(0, Nk, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        m = (rows < Nk)[:, None] & cmask[None, :]
        x = tl.load(base + rows[:, None] * svn + cols[None, :] * svd, mask=m, other=0.0).to(tl.float32)
        dev = tl.where(m, x - mean[None, :], 0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(dev), axis=0))
    scale = amax / 127.0
    scale = tl.where(scale > 0, scale, 1.0)
    smask = cols < DVP
    tl.store(Vs + bh.to(tl.int64) * DVP + cols, scale, mask=smask)
    tl.store(Vm + bh.to(tl.int64) * DVP + cols, mean, mask=smask)
    out = Vc + bh.to(tl.int64) * Nk * DVP
    nblk_n = tl.cdiv(Nk, BLOCK_N)
    sums = Vsum + bh.to(tl.int64) * nblk_n * DVP
    for n0 in range(0, Nk, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        m = (rows < Nk)[:, None] & cmask[None, :]
        x = tl.load(base + rows[:, None] * svn + cols[None, :] * svd, mask=m, other=0.0).to(tl.float32)
        c = rne(tl.div_rn(x - mean[None, :], scale[None, :] + tl.zeros_like(x)))
        c = tl.minimum(tl.maximum(c, -127.0), 127.0)
        c = tl.where(m, c, 0.0)
        tl.store(out + rows[:, None] * DVP + cols[None, :], c.to(tl.int8),
                 mask=(rows < Nk)[:, None] & smask[None, :])
        # Column sums of the codes per block of BLOCK_N keys (the int8 P·V correction term).
        tl.store(sums + (n0 // BLOCK_N) * DVP + cols, tl.sum(c, axis=0).to(tl.int32), mask=smask)


@triton.jit
def _column_stats_kernel(K, Km, V, Vc, Vs, Vm, Vsum, Nk, D, DV, H,
                         skb, skh, skn, skd, svb, svh, svn, svd,
                         N_K_PROGS, NBLK_DK, NBLK_DV,
                         HAS_K: tl.constexpr, HAS_V: tl.constexpr, DVP: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    if HAS_K and HAS_V:
        if pid < N_K_PROGS:
            _k_mean(K, Km, pid, Nk, D, H, skb, skh, skn, skd, NBLK_DK, BLOCK_N, BLOCK_D)
        else:
            _v_quant(V, Vc, Vs, Vm, Vsum, pid - N_K_PROGS, Nk, DV, H, svb, svh, svn, svd,
                     NBLK_DV, DVP, BLOCK_N, BLOCK_D)
    elif HAS_K:
        _k_mean(K, Km, pid, Nk, D, H, skb, skh, skn, skd, NBLK_DK, BLOCK_N, BLOCK_D)
    else:
        _v_quant(V, Vc, Vs, Vm, Vsum, pid, Nk, DV, H, svb, svh, svn, svd, NBLK_DV, DVP,
                 BLOCK_N, BLOCK_D)


def column_stats(k: torch.Tensor | None, v: torch.Tensor | None, dvp: int | None = None,
                 block_n: int = 64):
    """One launch: the K mean over tokens (B, H, D) float32 and/or V's per-channel quantization
    (``quant.prepare_v``): codes (B, H, Nk, dvp) int8 (zero past Dv), scale and mean (B, H, dvp)
    float32 (1 and 0 past Dv), and the column sums of the codes per block of ``block_n`` keys
    (B, H, ceil(Nk / block_n), dvp) int32.
    Returns (k_mean or None, (v_codes, v_scale, v_mean, v_sums) or None)."""
    x = k if k is not None else v
    b, h, nk = x.shape[:3]
    dev = x.device
    bh = b * h
    dummy = placeholder(torch.float32, dev)
    km = vq = None
    widths = []
    if k is not None:
        km = torch.empty(b, h, k.shape[-1], dtype=torch.float32, device=dev)
        widths.append(k.shape[-1])
    if v is not None:
        dvp = dvp or max(16, next_pow2(v.shape[-1]))
        vq = (torch.empty(b, h, nk, dvp, dtype=torch.int8, device=dev),
              torch.empty(b, h, dvp, dtype=torch.float32, device=dev),
              torch.empty(b, h, dvp, dtype=torch.float32, device=dev),
              torch.empty(b, h, cdiv(nk, block_n), dvp, dtype=torch.int32, device=dev))
        widths.append(dvp)
    block_d = min(64, next_pow2(max(widths)))
    nblk_dk = cdiv(k.shape[-1], block_d) if k is not None else 1
    nblk_dv = cdiv(dvp, block_d) if v is not None else 1
    n_k = bh * nblk_dk if k is not None else 0
    n_v = bh * nblk_dv if v is not None else 0
    kk = k if k is not None else v
    vv = v if v is not None else k
    vc, vs, vm, vsum = vq if vq is not None else (
        placeholder(torch.int8, dev), dummy, dummy, placeholder(torch.int32, dev))
    _column_stats_kernel[(n_k + n_v,)](
        kk, km if km is not None else dummy, vv, vc, vs, vm, vsum,
        nk, kk.shape[-1], vv.shape[-1], h, *kk.stride(), *vv.stride(),
        n_k, nblk_dk, nblk_dv,
        HAS_K=k is not None, HAS_V=v is not None, DVP=dvp if v is not None else 16,
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4)
    return km, vq


# --------------------------------------------------------------------------------------------
# Rows of Q and K: smoothing, rotation, scales, rounding, packing
# --------------------------------------------------------------------------------------------

@triton.jit
def _fwht(x, R: tl.constexpr, DPT: tl.constexpr, LOG2_ROT: tl.constexpr):
    """Unnormalised Walsh–Hadamard butterflies h = 1, 2, ..., 2**(LOG2_ROT-1) along dim 1 of an
    [R, DPT] tile: block-diagonal Hadamard of order 2**LOG2_ROT (same op order as quant.fwht)."""
    for s in tl.static_range(LOG2_ROT):
        y = tl.permute(tl.reshape(x, [R, DPT // (2 << s), 2, 1 << s]), [0, 1, 3, 2])
        a, b = tl.split(y)
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), [0, 1, 3, 2]), [R, DPT])
    return x


@triton.jit
def _clip_err(x, valid, clip, BITS: tl.constexpr):
    """Squared error of the rows of ``x`` quantized with top level ``clip`` → (err, scale)."""
    QMAX: tl.constexpr = 7.0 if BITS == 4 else 3.0
    s = tl.div_rn(clip, tl.full(clip.shape, QMAX, tl.float32))
    ss = tl.where(s > 0, s, 1.0)
    e = round_to_grid(tl.div_rn(x, ss[:, None] + tl.zeros_like(x)), BITS) * ss[:, None] - x
    e = tl.where(valid, e, 0.0)
    return tl.sum(e * e, axis=1), s


@triton.jit
def quant_tile(x, Grid, BITS: tl.constexpr, D_EFF: tl.constexpr, DPT: tl.constexpr,
               NGRID: tl.constexpr):
    """Per-row scales and codes of an [R, DPT] float32 tile (already smoothed and rotated; zero
    past the head dim) → (codes as int32, padded past ``D_EFF`` with 0 or -3 at int2; scale).
    Shared by the row kernels and the attention kernel's in-register Q quantization, so both
    produce the same codes."""
    valid = (tl.arange(0, DPT) < D_EFF)[None, :]
    absmax = tl.max(tl.abs(x), axis=1)
    if BITS == 8:
        s = tl.div_rn(absmax, tl.full(absmax.shape, 127.0, tl.float32))
    else:
        rms = tl.sqrt_rn(tl.div_rn(tl.sum(x * x, axis=1), tl.full(absmax.shape, D_EFF, tl.float32)))
        # Candidates as quant.token_scales: the absmax first, then min(a·rms, absmax) over the
        # CLIP_GRID; strict comparison, so ties keep the earlier candidate.
        # A rolled loop: unrolled, the candidates' error tiles overlap and the attention kernel
        # (which runs this on its Q tile) spills.
        best_err, s = _clip_err(x, valid, absmax, BITS)
        for i in range(NGRID):
            err, si = _clip_err(x, valid, tl.minimum(tl.load(Grid + i) * rms, absmax), BITS)
            better = err < best_err
            best_err = tl.where(better, err, best_err)
            s = tl.where(better, si, s)
    TINY: tl.constexpr = 1.1754943508222875e-38 if BITS == 2 else 1.0
    s = tl.where(s > 0, s, TINY)
    PAD: tl.constexpr = -3.0 if BITS == 2 else 0.0
    codes = round_to_grid(tl.div_rn(x, s[:, None] + tl.zeros_like(x)), BITS)
    return tl.where(valid, codes, PAD).to(tl.int32), s


@triton.jit
def store_codes(C, rows, N, codes, BITS: tl.constexpr, DPT: tl.constexpr, R: tl.constexpr):
    """Pack int32 codes [R, DPT] (int4: 2 per byte, int2: 4 per byte, quant.pack's layout) and
    store rows ``rows`` < N of one (batch, head)'s code matrix at ``C`` (int8 or uint8)."""
    rmask = (rows < N)[:, None]
    if BITS == 8:
        tl.store(C + rows[:, None] * DPT + tl.arange(0, DPT)[None, :], codes.to(tl.int8), mask=rmask)
    elif BITS == 4:
        lo, hi = tl.split(tl.reshape(codes & 15, [R, DPT // 2, 2]))
        byte = lo | (hi << 4)
        tl.store(C + rows[:, None] * (DPT // 2) + tl.arange(0, DPT // 2)[None, :],
                 byte.to(C.dtype.element_ty), mask=rmask)
    else:
        u = (codes + 3) >> 1
        even, odd = tl.split(tl.reshape(u, [R, DPT // 4, 2, 2]))  # element 4j + 2a + b
        e0, e2 = tl.split(even)
        e1, e3 = tl.split(odd)
        byte = e0 | (e1 << 2) | (e2 << 4) | (e3 << 6)
        tl.store(C + rows[:, None] * (DPT // 4) + tl.arange(0, DPT // 4)[None, :],
                 byte.to(C.dtype.element_ty), mask=rmask)


@triton.jit
def load_rows(Xb, rows, N, D, sxn, sxd, DPT: tl.constexpr):
    """Rows ``rows`` of one (batch, head) of a float tensor (any strides, any float dtype) as an
    [R, DPT] float32 tile, zero past N and D."""
    cols = tl.arange(0, DPT)
    return tl.load(Xb + rows[:, None] * sxn + cols[None, :] * sxd,
                   mask=(rows < N)[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)


@triton.jit
def rotate_rows(x, LOG2_ROT: tl.constexpr, RSQRT: tl.constexpr, R: tl.constexpr,
                DPT: tl.constexpr):
    if LOG2_ROT > 0:
        x = _fwht(x, R, DPT, LOG2_ROT) * RSQRT
    return x


@triton.jit
def _quant_rows(X, Mean, C, S, Grid, pid, N, D, H, sxb, sxh, sxn, sxd, NBLK,
                BITS: tl.constexpr, HAS_MEAN: tl.constexpr, LOG2_ROT: tl.constexpr,
                RSQRT: tl.constexpr, D_EFF: tl.constexpr, DPT: tl.constexpr,
                NGRID: tl.constexpr, BLOCK_R: tl.constexpr):
    bh = (pid // NBLK).to(tl.int64)
    rows = (pid % NBLK) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, DPT)
    x = load_rows(X + (bh // H) * sxb + (bh % H) * sxh, rows, N, D, sxn, sxd, DPT)
    if HAS_MEAN:
        mu = tl.load(Mean + bh * D + cols, mask=cols < D, other=0.0)
        x = tl.where((cols < D)[None, :], x - mu[None, :], 0.0)
    x = rotate_rows(x, LOG2_ROT, RSQRT, BLOCK_R, DPT)
    codes, s = quant_tile(x, Grid, BITS, D_EFF, DPT, NGRID)
    tl.store(S + bh * N + rows, s, mask=rows < N)
    store_codes(C + bh * N * (DPT * BITS // 8), rows, N, codes, BITS, DPT, BLOCK_R)


@triton.jit
def _quant_qk_kernel(Q, K, Km, Qc, Kc, Qs, Ks, Grid, Nq, Nk, D, H,
                     sqb, sqh, sqn, sqd, skb, skh, skn, skd, NBLK_Q, NBLK_K, N_Q_PROGS,
                     BITS: tl.constexpr, HAS_MEAN: tl.constexpr, LOG2_ROT: tl.constexpr,
                     RSQRT: tl.constexpr, D_EFF: tl.constexpr, DPT: tl.constexpr,
                     NGRID: tl.constexpr, BLOCK_R: tl.constexpr, HAS_Q: tl.constexpr):
    pid = tl.program_id(0)
    if HAS_Q:
        if pid < N_Q_PROGS:
            _quant_rows(Q, Km, Qc, Qs, Grid, pid, Nq, D, H, sqb, sqh, sqn, sqd, NBLK_Q,
                        BITS, False, LOG2_ROT, RSQRT, D_EFF, DPT, NGRID, BLOCK_R)
        else:
            _quant_rows(K, Km, Kc, Ks, Grid, pid - N_Q_PROGS, Nk, D, H, skb, skh, skn, skd,
                        NBLK_K, BITS, HAS_MEAN, LOG2_ROT, RSQRT, D_EFF, DPT, NGRID, BLOCK_R)
    else:
        _quant_rows(K, Km, Kc, Ks, Grid, pid, Nk, D, H, skb, skh, skn, skd, NBLK_K,
                    BITS, HAS_MEAN, LOG2_ROT, RSQRT, D_EFF, DPT, NGRID, BLOCK_R)


def _row_block(dpt: int) -> int:
    if INTERPRET:
        return 64  # fewer, larger numpy steps
    return max(4, min(64, 2048 // dpt))  # ~2K fp32 elements per program tile


def code_width(d: int, rotate: bool) -> tuple[int, int]:
    """(d_eff, dpt): the quantized dim (``quant.padded_dim``) and the head-dim tile the codes
    are stored and multiplied at (a power of two >= 32)."""
    d_eff = quant.padded_dim(d, rotate)
    return d_eff, max(32, next_pow2(d_eff))


def quantize_qk(q: torch.Tensor | None, k: torch.Tensor, bits: int, *, smooth: bool = True,
                rotate: bool | None = None, k_mean: torch.Tensor | None = None):
    """Quantize the rows of Q and K as ``quant.prepare_qk`` does, in one launch.

    Returns ``(q_codes, q_scale, k_codes, k_scale, d_eff, dpt)``: codes (B, H, N, dpt //
    per_byte) (int8 at 8 bits, packed uint8 at 4/2), scales (B, H, N) float32. ``q`` may be None
    (then only K). ``k_mean``: a precomputed K mean (else one is computed when ``smooth``)."""
    if bits not in quant.QK_BITS:
        raise ValueError(f"bits must be one of {quant.QK_BITS}, got {bits!r}")
    if rotate is None:
        rotate = quant.default_rotate(bits)
    b, h, nk, d = k.shape
    d_eff, dpt = code_width(d, rotate)
    dev = k.device
    if smooth and k_mean is None:
        k_mean, _ = column_stats(k, None)
    cdt = torch.int8 if bits == 8 else torch.uint8
    nbytes = dpt // per_byte(bits)
    kc = torch.empty(b, h, nk, nbytes, dtype=cdt, device=dev)
    ks = torch.empty(b, h, nk, dtype=torch.float32, device=dev)
    if q is not None:
        nq = q.shape[2]
        qc = torch.empty(b, h, nq, nbytes, dtype=cdt, device=dev)
        qs = torch.empty(b, h, nq, dtype=torch.float32, device=dev)
    else:
        nq, qc, qs = 1, kc, ks
    block_r = _row_block(dpt)
    nblk_q = cdiv(nq, block_r) if q is not None else 0
    nblk_k = cdiv(nk, block_r)
    log2_rot = (d_eff.bit_length() - 1) if rotate else 0
    grid_t = _clip_grid(bits, dev) if bits != 8 else _clip_grid(4, dev)
    qq = q if q is not None else k
    _quant_qk_kernel[((nblk_q + nblk_k) * b * h,)](
        qq, k, k_mean if smooth else ks, qc, kc, qs, ks, grid_t, nq, nk, d, h,
        *qq.stride(), *k.stride(), max(nblk_q, 1), nblk_k, nblk_q * b * h,
        BITS=bits, HAS_MEAN=bool(smooth), LOG2_ROT=log2_rot,
        RSQRT=1.0 / math.sqrt(d_eff) if rotate else 1.0, D_EFF=d_eff, DPT=dpt,
        NGRID=len(quant.CLIP_GRID.get(bits, (0,))), BLOCK_R=block_r, HAS_Q=q is not None,
        num_warps=4)
    if q is None:
        qc = qs = None
    return qc, qs, kc, ks, d_eff, dpt


# --------------------------------------------------------------------------------------------
# K and V for one attention call, in one launch (the common path of flash.forward)
# --------------------------------------------------------------------------------------------

@triton.jit
def _prep_kv_kernel(K, V, W, Grid, Nk, D, DV, H, skb, skh, skn, skd, svb, svh, svn, svd,
                    CHUNK, NCHUNK, OFF_KS, OFF_VC, OFF_VS, OFF_VM, OFF_VSUM,
                    BITS: tl.constexpr, SMOOTH: tl.constexpr, LOG2_ROT: tl.constexpr,
                    RSQRT: tl.constexpr, D_EFF: tl.constexpr, DPT: tl.constexpr,
                    NGRID: tl.constexpr, BLOCK_R: tl.constexpr, PV8: tl.constexpr,
                    DVP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (batch, head, chunk of CHUNK keys): K's smoothing mean, then the K rows
    of its chunk (codes, scales); at P·V 8 bits, V's per-channel mean and scale, then the V
    codes of its chunk and their column sums per BLOCK_N keys. The column statistics are
    reductions over all keys, so each program of a (batch, head) recomputes them (NCHUNK > 1
    only where B·H alone would leave the GPU idle); that keeps this a single launch.
    Outputs go to the workspace ``W`` (int8) at the given byte offsets (flash.Layout)."""
    NB: tl.constexpr = DPT * BITS // 8
    pid = tl.program_id(0)
    bh = (pid // NCHUNK).to(tl.int64)
    chunk = pid % NCHUNK
    r0 = chunk * CHUNK
    r1 = tl.minimum(r0 + CHUNK, Nk)
    cols = tl.arange(0, DPT)
    Kb = K + (bh // H) * skb + (bh % H) * skh
    if SMOOTH:  # the mean of K over all tokens, per channel
        acc = tl.zeros([DPT], dtype=tl.float32)
        for n0 in range(0, Nk, BLOCK_R):
            acc += tl.sum(load_rows(Kb, n0 + tl.arange(0, BLOCK_R), Nk, D, skn, skd, DPT), axis=0)
        mu = acc / Nk
    Kc = W + bh * Nk * NB
    Ks = (W + OFF_KS).to(tl.pointer_type(tl.float32)) + bh * Nk
    for n0 in range(r0, r1, BLOCK_R):
        rows = n0 + tl.arange(0, BLOCK_R)
        x = load_rows(Kb, rows, Nk, D, skn, skd, DPT)
        if SMOOTH:
            x = tl.where((cols < D)[None, :], x - mu[None, :], 0.0)
        x = rotate_rows(x, LOG2_ROT, RSQRT, BLOCK_R, DPT)
        codes, s = quant_tile(x, Grid, BITS, D_EFF, DPT, NGRID)
        tl.store(Ks + rows, s, mask=rows < r1)
        store_codes(Kc, rows, r1, codes, BITS, DPT, BLOCK_R)
    if PV8:
        Vb = V + (bh // H) * svb + (bh % H) * svh
        Vc = W + OFF_VC + bh * Nk * DVP
        Vs = (W + OFF_VS).to(tl.pointer_type(tl.float32)) + bh * DVP
        Vm = (W + OFF_VM).to(tl.pointer_type(tl.float32)) + bh * DVP
        Vsum = (W + OFF_VSUM).to(tl.pointer_type(tl.int32)) + bh * tl.cdiv(Nk, BLOCK_N) * DVP
        for d0 in tl.static_range(0, DVP, BLOCK_D):
            vcols = d0 + tl.arange(0, BLOCK_D)
            cmask = vcols < DV
            # One pass for the statistics: max |v - mean| = max(vmax - mean, mean - vmin)
            # exactly (float subtraction is monotonic), as quant.prepare_v's absmax.
            vsum = tl.zeros([BLOCK_D], dtype=tl.float32)
            vmax = tl.full([BLOCK_D], float("-inf"), tl.float32)
            vmin = tl.full([BLOCK_D], float("inf"), tl.float32)
            for n0 in range(0, Nk, BLOCK_N):
                rows = n0 + tl.arange(0, BLOCK_N)
                m = (rows < Nk)[:, None] & cmask[None, :]
                x = tl.load(Vb + rows[:, None] * svn + vcols[None, :] * svd, mask=m,
                            other=0.0).to(tl.float32)
                vsum += tl.sum(x, axis=0)
                vmax = tl.maximum(vmax, tl.max(tl.where(m, x, float("-inf")), axis=0))
                vmin = tl.minimum(vmin, tl.min(tl.where(m, x, float("inf")), axis=0))
            mean = vsum / Nk
            amax = tl.where(cmask, tl.maximum(vmax - mean, mean - vmin), 0.0)
            scale = amax / 127.0
            scale = tl.where(scale > 0, scale, 1.0)
            first = (vcols < DVP) & (chunk == 0)  # one program per (batch, head) writes them
            tl.store(Vs + vcols, scale, mask=first)
            tl.store(Vm + vcols, mean, mask=first)
            for n0 in range(r0, r1, BLOCK_N):
                rows = n0 + tl.arange(0, BLOCK_N)
                m = (rows < Nk)[:, None] & cmask[None, :]
                x = tl.load(Vb + rows[:, None] * svn + vcols[None, :] * svd, mask=m,
                            other=0.0).to(tl.float32)
                c = rne(tl.div_rn(x - mean[None, :], scale[None, :] + tl.zeros_like(x)))
                c = tl.where(m, tl.minimum(tl.maximum(c, -127.0), 127.0), 0.0)
                tl.store(Vc + rows[:, None] * DVP + vcols[None, :], c.to(tl.int8),
                         mask=(rows < Nk)[:, None])
                # Column sums of the codes per BLOCK_N keys (the int8 P·V correction term).
                tl.store(Vsum + (n0 // BLOCK_N) * DVP + vcols, tl.sum(c, axis=0).to(tl.int32))
