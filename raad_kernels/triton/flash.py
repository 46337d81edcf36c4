"""Flash-style quantized attention forward in Triton, with the attention maps.

A call is two launches (host time, not GPU time, bounds a ViT-sized call): the K/V preparation
(``quantize._prep_kv_kernel``: K smoothing, rotation, codes and scales; V's per-channel codes),
then this attention kernel, which quantizes its own Q rows with the same code (``quant_tile``;
int8 in registers, int4/int2 a few rows at a time through its rows of the workspace). ``cls``
and ``received`` add a third. What a call needs besides its outputs is one int8 workspace tensor
(:class:`Layout`); what depends only on the shapes is cached per shape (:class:`_Plan`).

One program owns ``BLOCK_M`` queries of one (batch, head) and streams over the keys in blocks
of ``BLOCK_N`` (online softmax in base 2: ``scale · log2(e)`` is folded into the Q scale):

* Q·Kᵀ: ``tl.dot`` on int8 codes → int32, times ``s_q[i] · s_k[j]``. int4/int2 codes are read
  packed and unpacked in registers with shifts (``_common.load_codes``): arithmetic-shift pairs
  for the two's-complement nibbles, ``2u - 3`` for the int2 fields, interleaved back into
  channel order with ``join`` + ``reshape``. Head dims are tiled at ``DPT`` (a power of two
  >= 32: int8 ``tl.dot`` needs K >= 32); padded channels hold code 0 (int8/int4) or are masked
  to 0 in Q (int2, whose grid has no zero).
* P·V at 16 bits: P (fp32, in [0, 1]) → fp16 (bf16 for bf16 inputs), V → the same, ``tl.dot``
  with fp32 accumulation.
* P·V at 8 bits: P → ``p8 = round(255 · P)`` in [0, 255] (unsigned, scale 1/255) and V → int8
  per-channel codes (``quant.prepare_v``). ``tl.dot`` needs both operands int8, so the kernel
  multiplies ``(p8 - 128)`` (exactly int8) and adds back ``128 · Σ_j v[j]`` (the block's column
  sums of the V codes, written per BLOCK_N keys by the V quantization pass, so the V tile goes
  straight to the dot): ``p8 · v = (p8 - 128) · v + 128 · Σ v``, exact in int32. P is
  quantized against the *running* row max (the one flash attention knows when the block is
  processed); when the max later grows, the block's int32 product is rescaled in fp32 with the
  rest of the accumulator. The torch backend quantizes against the final max; the accuracy rule
  covers the difference.
* Masks: boolean (True = attend) or additive, broadcast to (B, H, Nq, Nk) through strides (0 for
  broadcast dims). A mask that is the same for every query (key padding) is read as one vector
  per key block; a general one as a tile (which costs registers: the pipeliner keeps the next
  tile's addresses live). Keys past Nk get -inf. NaN guards: a row whose every key so far is -inf uses
  0 as the exponent offset (so ``exp2(-inf - 0) = 0``, never ``-inf - -inf``); a fully masked
  row ends with l = 0 and is written as zeros (and -inf lse, zero entropy, zero cls/received).
* ``entropy`` in the same pass, from an online accumulator ``E = Σ e_j (t_j - m)`` (rescaled as
  ``α (E + (m_old - m_new) l)`` when the max moves), so ``H = ln l - ln2 · E / l`` (+2 registers).
* ``cls`` and ``received``: a second kernel (:func:`_attn_colmaps_kernel`), one program per
  key block, from the log-sum-exp the first pass saves (O(B·H·N) extra memory): cls from one
  16-query tile, received streaming over all query blocks. (cls inside the main pass, by the
  program owning query 0, would cost every program the registers — the kernel is compiled once
  for all of them — and push D = 128 into spills; the tile here costs one small dot per key
  block.)
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import quant
from ._common import (INTERPRET, LOG2E, MAX_HEAD_DIM, cdiv, load_codes, next_pow2, placeholder, rne_small,
                      round_bf16)
from .quantize import (_clip_grid, _prep_kv_kernel, _row_block, code_width, load_rows, quant_tile,
                       rotate_rows, store_codes)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _scores(q, qs, Kb, Ksb, cols, Nk, Mb, rows, Nq, smm, smn,
            QK_BITS: tl.constexpr, DPT: tl.constexpr, BLOCK_N: tl.constexpr,
            HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr):
    """Base-2 logits t [BLOCK_M, BLOCK_N] of the query tile against keys ``cols`` (-inf outside
    the keys and where masked). ``Kb``, ``Ksb``, ``Mb``: this (batch, head)'s base pointers."""
    k = load_codes(Kb, cols, Nk, BLOCK_N, QK_BITS, DPT)
    ks = tl.load(Ksb + cols, mask=cols < Nk, other=0.0)
    s = tl.dot(q, tl.trans(k), out_dtype=tl.int32)
    t = s.to(tl.float32) * qs[:, None] * ks[None, :]
    if HAS_MASK == 1:  # per-key mask (broadcast over queries): one [BLOCK_N] vector
        if MASK_BOOL:
            mk = tl.load(Mb + cols * smn, mask=cols < Nk, other=1)
            t = tl.where((mk != 0)[None, :], t, float("-inf"))
        else:
            mk = tl.load(Mb + cols * smn, mask=cols < Nk, other=0.0)
            t = t + (mk * 1.4426950408889634)[None, :]
    elif HAS_MASK == 2:  # general (Nq, Nk) mask: a [BLOCK_M, BLOCK_N] tile
        mptr = Mb + rows[:, None] * smm + cols[None, :] * smn
        inb = (rows < Nq)[:, None] & (cols < Nk)[None, :]
        if MASK_BOOL:
            mk = tl.load(mptr, mask=inb, other=1)
            t = tl.where(mk != 0, t, float("-inf"))
        else:
            mk = tl.load(mptr, mask=inb, other=0.0)
            t = t + mk * 1.4426950408889634
    return tl.where((cols < Nk)[None, :], t, float("-inf"))


@triton.jit
def _load_q(Qb, Qsb, rows, Nq, qk_scale, BLOCK_M: tl.constexpr, QK_BITS: tl.constexpr,
            DPT: tl.constexpr, D_EFF: tl.constexpr):
    q = load_codes(Qb, rows, Nq, BLOCK_M, QK_BITS, DPT)
    if QK_BITS == 2:
        if D_EFF < DPT:  # padded int2 channels hold code -3: zero them on the Q side
            q = tl.where((tl.arange(0, DPT) < D_EFF)[None, :], q, 0).to(tl.int8)
    qs = tl.load(Qsb + rows, mask=rows < Nq, other=0.0) * qk_scale
    return q, qs


@triton.jit
def _attn_fwd_kernel(Q, W, V, Mask, Out, Ent, Grid,
                     qk_scale, Nq, Nk, D, DV, H,
                     sqb, sqh, sqn, sqd, svb, svh, svn, svd, smb, smh, smm, smn, sob, soh, som, sod,
                     OFF_KS, OFF_VC, OFF_VS, OFF_VM, OFF_VSUM, OFF_QC, OFF_QS, OFF_LSE,
                     QK_BITS: tl.constexpr, PV_BITS: tl.constexpr, DPT: tl.constexpr,
                     D_EFF: tl.constexpr, DVP: tl.constexpr, LOG2_ROT: tl.constexpr,
                     RSQRT: tl.constexpr, NGRID: tl.constexpr, Q_STAGED: tl.constexpr,
                     SUB_M: tl.constexpr,
                     HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, PV_BF16: tl.constexpr,
                     INTERP: tl.constexpr, WRITE_LSE: tl.constexpr, WRITE_ENT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    NB: tl.constexpr = DPT * QK_BITS // 8  # bytes per code row
    pid = tl.program_id(0)
    nblk_m = tl.cdiv(Nq, BLOCK_M)
    pid_m = pid % nblk_m
    bh = (pid // nblk_m).to(tl.int64)  # 64-bit scalar bases, 32-bit offsets inside a head
    b = bh // H
    h = bh % H
    Kb = W + bh * Nk * NB  # K codes and scales, V codes/sums: written by quantize._prep_kv_kernel
    Ksb = (W + OFF_KS).to(tl.pointer_type(tl.float32)) + bh * Nk
    Mb = Mask + b * smb + h * smh
    if PV_BITS == 8:
        Vb = W + OFF_VC + bh * Nk * DVP
        Vsb = (W + OFF_VSUM).to(tl.pointer_type(tl.int32)) + bh * tl.cdiv(Nk, BLOCK_N) * DVP
    else:
        Vb = V + b * svb + h * svh
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    vcols = tl.arange(0, DVP)
    Qcb = W + OFF_QC + bh * Nq * NB
    Qsb = (W + OFF_QS).to(tl.pointer_type(tl.float32)) + bh * Nq
    Qb = Q + b * sqb + h * sqh
    # Q is quantized here by the row kernel's code (quant_tile), so the codes are the same.
    if Q_STAGED:
        # SUB_M rows at a time, the codes staged through this program's rows of the workspace
        # (L2) and read back after a barrier: rotating and clip-searching the whole [BLOCK_M,
        # DPT] tile in registers costs ~90 registers more than the loop below needs (sm_86).
        for r0 in range(0, BLOCK_M, SUB_M):
            srows = pid_m * BLOCK_M + r0 + tl.arange(0, SUB_M)
            x = rotate_rows(load_rows(Qb, srows, Nq, D, sqn, sqd, DPT), LOG2_ROT, RSQRT, SUB_M, DPT)
            sc, ss = quant_tile(x, Grid, QK_BITS, D_EFF, DPT, NGRID)
            store_codes(Qcb, srows, Nq, sc, QK_BITS, DPT, SUB_M)
            tl.store(Qsb + srows, ss, mask=srows < Nq)
        tl.debug_barrier()  # the block's stores are visible to all its threads after this
        q, qs = _load_q(Qcb, Qsb, rows, Nq, qk_scale, BLOCK_M, QK_BITS, DPT, D_EFF)
    else:  # int8: absmax scales only, cheap in registers
        x = rotate_rows(load_rows(Qb, rows, Nq, D, sqn, sqd, DPT), LOG2_ROT, RSQRT, BLOCK_M, DPT)
        qcodes, s = quant_tile(x, Grid, QK_BITS, D_EFF, DPT, NGRID)
        if WRITE_LSE:  # the column-maps pass reads Q's codes and scales
            store_codes(Qcb, rows, Nq, qcodes, QK_BITS, DPT, BLOCK_M)
            tl.store(Qsb + rows, s, mask=rows < Nq)
        if QK_BITS == 2:
            if D_EFF < DPT:  # padded int2 channels hold code -3: zero them on the Q side
                qcodes = tl.where((tl.arange(0, DPT) < D_EFF)[None, :], qcodes, 0)
        q = qcodes.to(tl.int8)
        qs = tl.where(rows < Nq, s, 0.0) * qk_scale

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    e_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DVP], dtype=tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        t = _scores(q, qs, Kb, Ksb, cols, Nk, Mb, rows, Nq, smm, smn,
                    QK_BITS, DPT, BLOCK_N, HAS_MASK, MASK_BOOL)
        m_new = tl.maximum(m_i, tl.max(t, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(t - m_use[:, None])
        if WRITE_ENT:
            pt = p * tl.where(p > 0, t - m_use[:, None], 0.0)  # 0·(-inf) never formed
            shift = tl.where(m_i == float("-inf"), 0.0, m_i - m_use)
            e_i = alpha * (e_i + shift * l_i) + tl.sum(pt, axis=1)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        kmask = (cols < Nk)[:, None]
        if PV_BITS == 8:
            vc = tl.load(Vb + cols[:, None] * DVP + vcols[None, :], mask=kmask, other=0)
            pm = (tl.minimum(rne_small(p * 255.0), 255.0) - 128.0).to(tl.int8)  # exactly int8
            pv = tl.dot(pm, vc, out_dtype=tl.int32)
            vsum = tl.load(Vsb + (start_n // BLOCK_N) * DVP + vcols)  # Σ_j v[j], precomputed
            acc += (pv + 128 * vsum[None, :]).to(tl.float32)
        else:
            v = tl.load(Vb + cols[:, None] * svn + vcols[None, :] * svd,
                        mask=kmask & (vcols < DV)[None, :], other=0.0)
            if PV_BF16:
                if INTERP:  # the interpreter has no bf16 dot: bf16-rounded values, fp32 products
                    acc += tl.dot(round_bf16(p), v.to(tl.float32), input_precision="ieee")
                else:
                    acc += tl.dot(p.to(tl.bfloat16), v.to(tl.bfloat16))
            else:
                acc += tl.dot(p.to(tl.float16), v.to(tl.float16))
        m_i = m_new

    has = l_i > 0
    l_safe = tl.where(has, l_i, 1.0)
    if PV_BITS == 8:
        vs = tl.load((W + OFF_VS).to(tl.pointer_type(tl.float32)) + bh * DVP + vcols)
        vm = tl.load((W + OFF_VM).to(tl.pointer_type(tl.float32)) + bh * DVP + vcols)
        o = acc * (vs * (1.0 / 255.0))[None, :] / l_safe[:, None] \
            + tl.where(has, 1.0, 0.0)[:, None] * vm[None, :]
    else:
        o = acc / l_safe[:, None]
    optr = Out + b * sob + h * soh + rows[:, None] * som + vcols[None, :] * sod
    tl.store(optr, o.to(Out.dtype.element_ty), mask=(rows < Nq)[:, None] & (vcols < DV)[None, :])
    lse = tl.where(has, m_i + tl.log2(l_safe), float("-inf"))
    if WRITE_LSE:
        tl.store((W + OFF_LSE).to(tl.pointer_type(tl.float32)) + bh * Nq + rows, lse, mask=rows < Nq)
    if WRITE_ENT:
        ent = tl.where(has, tl.log(l_safe) - 0.6931471805599453 * e_i / l_safe, 0.0)
        tl.store(Ent + bh * Nq + rows, ent, mask=rows < Nq)


@triton.jit
def _attn_colmaps_kernel(W, Mask, Cls, Recv, qk_scale, Nq, Nk, H, smb, smh, smm, smn,
                         OFF_KS, OFF_QC, OFF_QS, OFF_LSE,
                         QK_BITS: tl.constexpr, DPT: tl.constexpr, D_EFF: tl.constexpr,
                         HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                         WRITE_CLS: tl.constexpr, WRITE_RECV: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per-key maps from the saved lse, one program per key block:
    cls[j] = exp2(t_0j - lse_0) (from a 16-query tile) and received[j] = mean_i exp2(t_ij - lse_i)
    (streaming over all query blocks)."""
    NB: tl.constexpr = DPT * QK_BITS // 8
    pid = tl.program_id(0)
    nblk_n = tl.cdiv(Nk, BLOCK_N)
    pid_n = pid % nblk_n
    bh = (pid // nblk_n).to(tl.int64)
    Mb = Mask + (bh // H) * smb + (bh % H) * smh
    Qb = W + OFF_QC + bh * Nq * NB
    Qsb = (W + OFF_QS).to(tl.pointer_type(tl.float32)) + bh * Nq
    Kb = W + bh * Nk * NB
    Ksb = (W + OFF_KS).to(tl.pointer_type(tl.float32)) + bh * Nk
    Lb = (W + OFF_LSE).to(tl.pointer_type(tl.float32)) + bh * Nq
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if WRITE_CLS:
        rows0 = tl.arange(0, 16)
        q0, qs0 = _load_q(Qb, Qsb, rows0, Nq, qk_scale, 16, QK_BITS, DPT, D_EFF)
        t0 = _scores(q0, qs0, Kb, Ksb, cols, Nk, Mb, rows0, Nq, smm, smn,
                     QK_BITS, DPT, BLOCK_N, HAS_MASK, MASK_BOOL)
        lse0 = tl.load(Lb + rows0, mask=rows0 < Nq, other=float("inf"))
        lse0 = tl.where(lse0 == float("-inf"), float("inf"), lse0)  # fully masked: zeros
        tl.store(Cls + bh * Nk + cols[None, :] + 0 * rows0[:, None], tl.exp2(t0 - lse0[:, None]),
                 mask=(rows0 == 0)[:, None] & (cols < Nk)[None, :])
    if WRITE_RECV:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start_m in range(0, Nq, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            q, qs = _load_q(Qb, Qsb, rows, Nq, qk_scale, BLOCK_M, QK_BITS, DPT, D_EFF)
            t = _scores(q, qs, Kb, Ksb, cols, Nk, Mb, rows, Nq, smm, smn,
                        QK_BITS, DPT, BLOCK_N, HAS_MASK, MASK_BOOL)
            lse = tl.load(Lb + rows, mask=rows < Nq, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse)  # fully masked rows add 0
            acc += tl.sum(tl.exp2(t - lse[:, None]), axis=0)
        tl.store(Recv + bh * Nk + cols, acc / Nq, mask=cols < Nk)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------

def _gpu_blocks(dpt: int, dvp: int, pv_bits: int, capability, general_mask: bool = False
                ) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for sm_80/86/89/90.

    Chosen from ahead-of-time compiles (``python -m raad_kernels.triton._aot``: registers and
    spills as the cubin reports them), not from timings: no GPU was available when these were
    set. The picks fit the per-block shared memory (99 KB on sm_86/89) and compile for
    int8/int4/int2 × P·V 8/16 × fp16/bf16/fp32 with the entropy map and a mask without
    register spills on the common path (8-56 bytes with a general mask or fp32 at P·V 16,
    sm_86, D <= 128). sm_86/89
    (~100 KB shared memory: RTX 30xx/40xx) get 64-row tiles; sm_80/90 128-row tiles with 8
    warps up to D = 128. A general (Nq, Nk) mask tile costs ~80 registers (the pipeliner keeps
    the next tile's addresses live), so it gets narrower key blocks at D >= 128.
    ``RAAD_TRITON_BLOCKS=BM,BN,warps,stages`` overrides this for tuning on a real GPU."""
    major, minor = capability
    big_smem = (major, minor) in ((8, 0), (9, 0)) or major >= 10
    wide = max(dpt, dvp)
    if wide >= 256:  # 64×64 needs ~105 KB of shared memory: over sm_86/89's 99 KB per block
        return (64, 32, 8, 2) if general_mask or not big_smem else (64, 64, 8, 2)
    if wide >= 128:
        if general_mask:
            return 64, 32, 8, 2
        return (128, 64, 8, 3) if big_smem else (64, 64, 8, 2)
    return (128, 64, 8, 3) if big_smem else (64, 64, 4, 3)


def _config(dpt, dvp, pv_bits, device, block_m, block_n, general_mask=False):
    if INTERPRET:
        return block_m or 64, block_n or 64, 4, 1
    bm, bn, nw, ns = _gpu_blocks(dpt, dvp, pv_bits, torch.cuda.get_device_capability(device),
                                 general_mask)
    if os.environ.get("RAAD_TRITON_BLOCKS"):  # "BM,BN,warps,stages" for tuning sessions
        bm, bn, nw, ns = (int(x) for x in os.environ["RAAD_TRITON_BLOCKS"].split(","))
    return block_m or bm, block_n or bn, nw, ns


#: Opt-in autotuning of the forward kernel (RAAD_TRITON_AUTOTUNE=1, GPU only, P·V at 16 bits:
#: at 8 bits the V column sums are laid out per BLOCK_N before the kernel runs). Off by
#: default: every new (Nq, Nk, bits, head dim) combination would compile and time all the
#: configs on its first call, which a model with a per-layer bit plan pays once per layer shape.
_AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in ((128, 64, 4, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3),
                         (64, 128, 4, 2), (128, 32, 4, 3), (64, 32, 4, 2))
]
_fwd_tuned = None


def _autotuned_fwd():
    global _fwd_tuned
    if _fwd_tuned is None:
        _fwd_tuned = triton.autotune(
            configs=_AUTOTUNE_CONFIGS,
            key=["Nq", "Nk", "QK_BITS", "PV_BITS", "DPT", "DVP", "HAS_MASK", "WRITE_ENT"],
        )(_attn_fwd_kernel)
    return _fwd_tuned


# --------------------------------------------------------------------------------------------
# Python entry point
# --------------------------------------------------------------------------------------------

def _mask_args(attn_mask, shape, device):
    """(tensor, strides, is_bool) of the mask broadcast to ``shape`` through strides."""
    if attn_mask is None:
        return placeholder(torch.float32, device), (0, 0, 0, 0), False
    if attn_mask.dtype == torch.bool:
        m = attn_mask.view(torch.int8) if attn_mask.dim() > 0 else attn_mask.to(torch.int8)
        is_bool = True
    else:
        m = attn_mask.to(torch.float32)  # as reference.mask_to_bias (on the un-broadcast mask)
        is_bool = False
    m = m.expand(shape)
    return m, tuple(m.stride()), is_bool


class Layout(NamedTuple):
    """Byte offsets of the sections of one call's workspace (one int8 tensor, so a call
    allocates it once and the kernels take one pointer): K codes (at 0) and scales; at P·V 8
    bits V's codes, scales, means and column sums per BLOCK_N keys; with ``cls``/``received``
    Q's codes and scales and the log-sum-exp. Sections start on 128-byte boundaries."""
    ks: int
    vc: int
    vs: int
    vm: int
    vsum: int
    qc: int
    qs: int
    lse: int
    total: int


def layout(bh, nq, nk, nb, dvp, block_n, pv8, q_codes, colmaps) -> Layout:
    sizes = [bh * nk * nb, bh * nk * 4]
    sizes += [bh * nk * dvp, bh * dvp * 4, bh * dvp * 4, bh * cdiv(nk, block_n) * dvp * 4] if pv8 else [0] * 4
    sizes += [bh * nq * nb, bh * nq * 4] if q_codes or colmaps else [0] * 2
    sizes += [bh * nq * 4] if colmaps else [0]
    offs, off = [], 0
    for n in sizes:
        offs.append(off)
        off += cdiv(n, 128) * 128
    return Layout(*offs[1:], max(off, 128))


def workspace_views(ws, lay: Layout, b, h, nq, nk, nb, dvp, block_n, qk_bits):
    """Tensor views of a workspace's sections (for tests): name → tensor."""
    cdt = torch.int8 if qk_bits == 8 else torch.uint8

    def sec(start, n, dtype, shape):
        return ws[start:start + n * dtype.itemsize].view(dtype).view(*shape)
    nblk = cdiv(nk, block_n)
    views = {"k_codes": sec(0, b * h * nk * nb, cdt, (b, h, nk, nb)),
             "k_scale": sec(lay.ks, b * h * nk, torch.float32, (b, h, nk)),
             "q_codes": sec(lay.qc, b * h * nq * nb, cdt, (b, h, nq, nb)),
             "q_scale": sec(lay.qs, b * h * nq, torch.float32, (b, h, nq)),
             "lse": sec(lay.lse, b * h * nq, torch.float32, (b, h, nq))}
    if lay.vsum == lay.vc:  # P·V at 16 bits: no V sections
        return views
    return {**views, "v_codes": sec(lay.vc, b * h * nk * dvp, torch.int8, (b, h, nk, dvp)),
            "v_scale": sec(lay.vs, b * h * dvp, torch.float32, (b, h, dvp)),
            "v_mean": sec(lay.vm, b * h * dvp, torch.float32, (b, h, dvp)),
            "v_sums": sec(lay.vsum, b * h * nblk * dvp, torch.int32, (b, h, nblk, dvp))}


#: Programs per (batch, head) of the K/V preparation when set (tests); else 1 under the
#: interpreter and :func:`_kv_chunks`' choice on a GPU.
FORCE_CHUNKS: int | None = None


@functools.lru_cache(maxsize=None)
def _sm_count(index) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _kv_chunks(bh, nk, device, unit):
    """(keys per program, programs per (batch, head)) of the K/V preparation: one program per
    (batch, head) unless that leaves most SMs idle (the column statistics are then read again
    by every chunk's program, cheap next to the attention at those lengths)."""
    if FORCE_CHUNKS:
        n = FORCE_CHUNKS
    elif INTERPRET:
        n = 1
    else:
        n = max(1, min(cdiv(nk, 512), cdiv(2 * _sm_count(device.index or 0), bh)))
    chunk = cdiv(cdiv(nk, n), unit) * unit
    return chunk, cdiv(nk, chunk)


def _sub_rows(dpt: int, block_m: int) -> int:
    """Rows of Q quantized at a time at int4/int2 (~1K elements: no more registers than the
    attention loop needs, from the sm_86 compiles of ``_aot``)."""
    return min(block_m, max(4, 1024 // dpt))


class _Plan(NamedTuple):
    """Everything about a call that depends only on its shapes and options (cached)."""
    lay: Layout
    prep_grid: tuple
    prep_args: tuple  # CHUNK, NCHUNK, offsets
    prep_consts: dict
    grid: tuple
    offs: tuple
    consts: dict
    colmaps: tuple | None  # (grid, consts) of the column-maps pass
    grid_t: torch.Tensor
    dummy: torch.Tensor  # for pointer arguments a call does not use


_PLANS: dict = {}


def _plan(key, b, h, nq, nk, d, dv, dtype, dev, qk_bits, pv_bits, smooth_k, rotate, maps,
          mask_kind, mask_bool, block_m, block_n) -> _Plan:
    d_eff, dpt = code_width(d, rotate)
    dvp = max(16, next_pow2(dv))
    nb = dpt * qk_bits // 8
    bm, bn, nw, ns = _config(dpt, dvp, pv_bits, dev, block_m, block_n, mask_kind == 2)
    if pv_bits == 8:
        bn = max(bn, 32)  # K of the int8 P·V dot
    col_maps = "cls" in maps or "received" in maps
    staged = qk_bits != 8 or col_maps  # with cls/received the codes go to the workspace anyway
    lay = layout(b * h, nq, nk, nb, dvp, bn, pv_bits == 8, staged, col_maps)
    block_r = _row_block(dpt)
    chunk, nchunk = _kv_chunks(b * h, nk, dev, max(bn, block_r))
    log2_rot = (d_eff.bit_length() - 1) if rotate else 0
    rot = dict(LOG2_ROT=log2_rot, RSQRT=1.0 / math.sqrt(d_eff) if rotate else 1.0, D_EFF=d_eff,
               DPT=dpt, NGRID=len(quant.CLIP_GRID.get(qk_bits, (0,))))
    prep_consts = dict(BITS=qk_bits, SMOOTH=bool(smooth_k), **rot, BLOCK_R=block_r,
                       PV8=pv_bits == 8, DVP=dvp, BLOCK_N=bn, BLOCK_D=min(64, dvp), num_warps=4)
    consts = dict(QK_BITS=qk_bits, PV_BITS=pv_bits, DVP=dvp, **rot, Q_STAGED=staged,
                  SUB_M=_sub_rows(dpt, bm),
                  HAS_MASK=mask_kind, MASK_BOOL=mask_bool,
                  PV_BF16=dtype == torch.bfloat16, INTERP=INTERPRET,
                  WRITE_LSE=col_maps, WRITE_ENT="entropy" in maps)
    autotune = (not INTERPRET and block_m is None and block_n is None
                and os.environ.get("RAAD_TRITON_AUTOTUNE") == "1" and pv_bits == 16)
    if autotune:
        grid = lambda meta: (cdiv(nq, meta["BLOCK_M"]) * b * h,)  # noqa: E731
    else:
        grid = (cdiv(nq, bm) * b * h,)
        consts.update(BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns)
    colmaps = None
    if col_maps:
        # Transposed roles: a key block per program, query blocks streamed.
        rbm, rbn = (bn, bm) if block_m is None and block_n is None else (bm, bn)
        rbn = max(rbn, 16)
        colmaps = ((cdiv(nk, rbn) * b * h,),
                   dict(QK_BITS=qk_bits, DPT=dpt, D_EFF=d_eff, HAS_MASK=mask_kind,
                        MASK_BOOL=mask_bool, WRITE_CLS="cls" in maps, WRITE_RECV="received" in maps,
                        BLOCK_M=rbm, BLOCK_N=rbn, num_warps=nw, num_stages=ns))
    grid_t = _clip_grid(qk_bits if qk_bits != 8 else 4, dev)
    if len(_PLANS) > 512:  # a model has a handful of shapes; this only bounds a pathological caller
        _PLANS.clear()
    p = _PLANS[key] = _Plan(lay, ((b * h * nchunk),), (chunk, nchunk, *lay[:5]), prep_consts,
                            grid, tuple(lay[:8]), consts, colmaps, grid_t,
                            placeholder(torch.float32, dev))
    return p


def forward(q, k, v, *, qk_bits: int, pv_bits: int, scale: float, attn_mask=None,
            smooth_k: bool = True, rotate: bool | None = None, return_maps=(), out=None,
            maps_out=None, block_m: int | None = None, block_n: int | None = None, debug=None):
    """Quantized attention; see the module docstring. Two launches (K/V preparation, then
    attention with Q quantized in registers), a third for ``cls``/``received``. No host
    synchronisation; everything it allocates comes from torch's allocator (CUDA-graph safe
    once the shape has been called outside the capture: the first call compiles and plans).

    ``out`` / ``maps_out`` (dict name → tensor): preallocated outputs (tests poison them);
    ``block_m``/``block_n`` override the tile sizes (tests use small ones to exercise many
    blocks); ``debug``: a dict that receives the workspace's sections (tests)."""
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[3]
    if d > MAX_HEAD_DIM or dv > MAX_HEAD_DIM:
        raise ValueError(f"the triton backend supports head dims up to {MAX_HEAD_DIM}; "
                         f"got D = {d} (q, k) and Dv = {dv} (v)")
    if rotate is None:
        rotate = quant.default_rotate(qk_bits)
    dev = q.device
    maps = tuple(return_maps or ())
    if debug is not None and "cls" not in maps and "received" not in maps:
        maps += ("received",)  # so Q's codes are written to the workspace
    if attn_mask is None:
        mask_t, smb, smh, smm, smn, mask_bool, mask_kind = None, 0, 0, 0, 0, False, 0
    else:
        mask_t, (smb, smh, smm, smn), mask_bool = _mask_args(attn_mask, (b, h, nq, nk), dev)
        # 1: per key (the same for every query: key padding), a vector per key block;
        # 2: a general (Nq, Nk) mask, a tile per block.
        mask_kind = 1 if smm == 0 or nq == 1 else 2
    key = (q.shape, nk, dv, q.dtype, dev, qk_bits, pv_bits, smooth_k, rotate, maps, mask_kind,
           mask_bool, block_m, block_n)
    plan = _PLANS.get(key) or _plan(key, b, h, nq, nk, d, dv, q.dtype, dev, qk_bits, pv_bits,
                                    smooth_k, rotate, maps, mask_kind, mask_bool, block_m, block_n)
    dummy = plan.dummy
    if mask_t is None:
        mask_t = dummy

    if out is None:
        out = torch.empty(b, h, nq, dv, dtype=q.dtype, device=dev)
    elif out.shape != (b, h, nq, dv) or out.dtype != q.dtype or out.device != dev:
        raise ValueError(f"out must be a ({b}, {h}, {nq}, {dv}) {q.dtype} tensor on {dev}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    maps_out = dict(maps_out or {})
    for name, t in maps_out.items():
        want = (b, h, nq) if name == "entropy" else (b, h, nk)
        if t.shape != want or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"maps_out[{name!r}] must be a contiguous float32 {want} tensor")
    for name in maps:
        if name not in maps_out:
            shape = (b, h, nq) if name == "entropy" else (b, h, nk)
            maps_out[name] = torch.empty(shape, dtype=torch.float32, device=dev)
    ws = torch.empty(plan.lay.total, dtype=torch.int8, device=dev)

    _prep_kv_kernel[plan.prep_grid](k, v, ws, plan.grid_t, nk, d, dv, h, *k.stride(), *v.stride(),
                                    *plan.prep_args, **plan.prep_consts)
    kernel = _autotuned_fwd() if callable(plan.grid) else _attn_fwd_kernel
    kernel[plan.grid](q, ws, v, mask_t, out, maps_out.get("entropy", dummy), plan.grid_t,
                      float(scale) * LOG2E, nq, nk, d, dv, h, *q.stride(), *v.stride(),
                      smb, smh, smm, smn, *out.stride(), *plan.offs, **plan.consts)
    if plan.colmaps is not None:
        cgrid, cconsts = plan.colmaps
        _attn_colmaps_kernel[cgrid](
            ws, mask_t, maps_out.get("cls", dummy), maps_out.get("received", dummy),
            float(scale) * LOG2E, nq, nk, h, smb, smh, smm, smn,
            plan.lay.ks, plan.lay.qc, plan.lay.qs, plan.lay.lse, **cconsts)
    if debug is not None:
        dpt = plan.prep_consts["DPT"]
        debug.update(workspace_views(ws, plan.lay, b, h, nq, nk, dpt * qk_bits // 8,
                                     plan.prep_consts["DVP"], plan.prep_consts["BLOCK_N"], qk_bits))
    return out, {name: maps_out[name] for name in tuple(return_maps or ())}
