"""Flash-style quantized attention forward in Triton, with the attention maps.

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
  sums of the V codes): ``p8 · v = (p8 - 128) · v + 128 · Σ v``, exact in int32. P is
  quantized against the *running* row max (the one flash attention knows when the block is
  processed); when the max later grows, the block's int32 product is rescaled in fp32 with the
  rest of the accumulator. The torch backend quantizes against the final max; the accuracy rule
  covers the difference.
* Masks: boolean (True = attend) or additive, broadcast to (B, H, Nq, Nk) through strides (0 for
  broadcast dims). Keys past Nk get -inf. NaN guards: a row whose every key so far is -inf uses
  0 as the exponent offset (so ``exp2(-inf - 0) = 0``, never ``-inf - -inf``); a fully masked
  row ends with l = 0 and is written as zeros (and -inf lse, zero entropy, zero cls/received).
* Maps in the same pass: ``entropy`` from an online accumulator
  ``E = Σ e_j (t_j - m)`` (rescaled as ``α (E + (m_old - m_new) l)`` when the max moves), so
  ``H = ln l - ln2 · E / l``; ``cls``: the program owning query 0 writes row 0's logits (base 2)
  to the output as it goes, then normalises them in place with its final lse (after a barrier).
  ``received``: a second kernel, one program per key block, streams over the queries and adds
  ``exp2(t - lse)`` using the lse saved by the first pass (O(B·H·N) extra memory).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .. import quant
from ._common import (INTERPRET, LN2, LOG2E, MAX_HEAD_DIM, load_codes, next_pow2, rne_small,
                      round_bf16)
from .quantize import code_width, column_stats, quantize_qk


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _scores(q, qs, Kc, Ks, bh, cols, Nk, Mask, mask_base, rows, Nq, smm, smn,
            QK_BITS: tl.constexpr, DPT: tl.constexpr, BLOCK_N: tl.constexpr,
            HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr):
    """Base-2 logits t [BLOCK_M, BLOCK_N] of the query tile against keys ``cols`` (-inf outside
    the keys and where masked)."""
    k = load_codes(Kc, bh, cols, Nk, BLOCK_N, QK_BITS, DPT)
    ks = tl.load(Ks + bh * Nk + cols, mask=cols < Nk, other=0.0)
    s = tl.dot(q, tl.trans(k), out_dtype=tl.int32)
    t = s.to(tl.float32) * qs[:, None] * ks[None, :]
    if HAS_MASK:
        mptr = Mask + mask_base + rows[:, None] * smm + cols[None, :] * smn
        inb = (rows < Nq)[:, None] & (cols < Nk)[None, :]
        if MASK_BOOL:
            mk = tl.load(mptr, mask=inb, other=1)
            t = tl.where(mk != 0, t, float("-inf"))
        else:
            mk = tl.load(mptr, mask=inb, other=0.0)
            t = t + mk * 1.4426950408889634
    return tl.where((cols < Nk)[None, :], t, float("-inf"))


@triton.jit
def _load_q(Qc, Qs, bh, rows, Nq, qk_scale, BLOCK_M: tl.constexpr, QK_BITS: tl.constexpr,
            DPT: tl.constexpr, D_EFF: tl.constexpr):
    q = load_codes(Qc, bh, rows, Nq, BLOCK_M, QK_BITS, DPT)
    if QK_BITS == 2:
        if D_EFF < DPT:  # padded int2 channels hold code -3: zero them on the Q side
            q = tl.where((tl.arange(0, DPT) < D_EFF)[None, :], q, 0).to(tl.int8)
    qs = tl.load(Qs + bh * Nq + rows, mask=rows < Nq, other=0.0) * qk_scale
    return q, qs


@triton.jit
def _attn_fwd_kernel(Qc, Qs, Kc, Ks, V, Vs, Vm, Mask, Out, Lse, Cls, Ent,
                     qk_scale, Nq, Nk, DV, H, NBLK_M,
                     svb, svh, svn, svd, smb, smh, smm, smn, sob, soh, som, sod,
                     QK_BITS: tl.constexpr, PV_BITS: tl.constexpr, DPT: tl.constexpr,
                     D_EFF: tl.constexpr, DVP: tl.constexpr,
                     HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, PV_BF16: tl.constexpr,
                     INTERP: tl.constexpr, WRITE_LSE: tl.constexpr, WRITE_CLS: tl.constexpr,
                     WRITE_ENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    pid_m = pid % NBLK_M
    bh = (pid // NBLK_M).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    vcols = tl.arange(0, DVP)
    q, qs = _load_q(Qc, Qs, bh, rows, Nq, qk_scale, BLOCK_M, QK_BITS, DPT, D_EFF)
    mask_base = b * smb + h * smh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    e_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DVP], dtype=tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        t = _scores(q, qs, Kc, Ks, bh, cols, Nk, Mask, mask_base, rows, Nq, smm, smn,
                    QK_BITS, DPT, BLOCK_N, HAS_MASK, MASK_BOOL)
        if WRITE_CLS:
            if pid_m == 0:  # raw base-2 logits of query 0; normalised after the loop
                t0 = tl.max(tl.where((rows == 0)[:, None], t, float("-inf")), axis=0)
                tl.store(Cls + bh * Nk + cols, t0, mask=cols < Nk)
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
            vc = tl.load(V + (bh * Nk + cols)[:, None] * DVP + vcols[None, :], mask=kmask, other=0)
            pm = (rne_small(p * 255.0) - 128.0).to(tl.int8)
            pv = tl.dot(pm, vc, out_dtype=tl.int32)
            vsum = tl.sum(vc.to(tl.int32), axis=0)
            acc += (pv + 128 * vsum[None, :]).to(tl.float32)
        else:
            v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + vcols[None, :] * svd,
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
        vs = tl.load(Vs + bh * DVP + vcols)
        vm = tl.load(Vm + bh * DVP + vcols)
        o = acc * (vs * (1.0 / 255.0))[None, :] / l_safe[:, None] \
            + tl.where(has, 1.0, 0.0)[:, None] * vm[None, :]
    else:
        o = acc / l_safe[:, None]
    optr = Out + b * sob + h * soh + rows[:, None] * som + vcols[None, :] * sod
    tl.store(optr, o.to(Out.dtype.element_ty), mask=(rows < Nq)[:, None] & (vcols < DV)[None, :])
    lse = tl.where(has, m_i + tl.log2(l_safe), float("-inf"))
    if WRITE_LSE:
        tl.store(Lse + bh * Nq + rows, lse, mask=rows < Nq)
    if WRITE_ENT:
        ent = tl.where(has, tl.log(l_safe) - 0.6931471805599453 * e_i / l_safe, 0.0)
        tl.store(Ent + bh * Nq + rows, ent, mask=rows < Nq)
    if WRITE_CLS:
        if pid_m == 0:
            tl.debug_barrier()  # this program's raw logits are in Cls
            lse_safe = tl.where(has, lse, float("inf"))
            lse0 = tl.min(tl.where(rows == 0, lse_safe, float("inf")), axis=0)
            for start_n in range(0, Nk, BLOCK_N):
                cols = start_n + tl.arange(0, BLOCK_N)
                t0 = tl.load(Cls + bh * Nk + cols, mask=cols < Nk, other=float("-inf"))
                tl.store(Cls + bh * Nk + cols, tl.exp2(t0 - lse0), mask=cols < Nk)


@triton.jit
def _attn_received_kernel(Qc, Qs, Kc, Ks, Mask, Lse, Recv, qk_scale, Nq, Nk, H, NBLK_N,
                          smb, smh, smm, smn,
                          QK_BITS: tl.constexpr, DPT: tl.constexpr, D_EFF: tl.constexpr,
                          HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """received[j] = mean_i exp2(t_ij - lse_i): one program per key block, streaming queries."""
    pid = tl.program_id(0)
    pid_n = pid % NBLK_N
    bh = (pid // NBLK_N).to(tl.int64)
    mask_base = (bh // H) * smb + (bh % H) * smh
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start_m in range(0, Nq, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q, qs = _load_q(Qc, Qs, bh, rows, Nq, qk_scale, BLOCK_M, QK_BITS, DPT, D_EFF)
        t = _scores(q, qs, Kc, Ks, bh, cols, Nk, Mask, mask_base, rows, Nq, smm, smn,
                    QK_BITS, DPT, BLOCK_N, HAS_MASK, MASK_BOOL)
        lse = tl.load(Lse + bh * Nq + rows, mask=rows < Nq, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)  # fully masked rows add 0
        acc += tl.sum(tl.exp2(t - lse[:, None]), axis=0)
    tl.store(Recv + bh * Nk + cols, acc / Nq, mask=cols < Nk)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------

def _gpu_blocks(dpt: int, dvp: int, pv_bits: int, capability) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for sm_80/86/89/90.

    The int32/fp32 score tile and the fp32 accumulator [BLOCK_M, DVP] live in registers: at
    DVP = 256 the query block drops to 64. sm_86/89 have ~100 KB of shared memory per SM (vs
    164/228 KB on sm_80/90), so they get fewer stages at the large head dims."""
    major, minor = capability
    small_smem = (major, minor) in ((8, 6), (8, 7), (8, 9))
    wide = max(dpt, dvp)
    if wide >= 256:
        return 64, 32 if small_smem else 64, 4, 2
    if wide >= 128:
        return 128, 64, 8, 2 if small_smem else 3
    return 128, 64, 4, 3 if small_smem else 4


def _config(dpt, dvp, pv_bits, device, block_m, block_n):
    if INTERPRET:
        return block_m or 64, block_n or 64, 4, 1
    bm, bn, nw, ns = _gpu_blocks(dpt, dvp, pv_bits, torch.cuda.get_device_capability(device))
    if os.environ.get("RAAD_TRITON_BLOCKS"):  # "BM,BN,warps,stages" for tuning sessions
        bm, bn, nw, ns = (int(x) for x in os.environ["RAAD_TRITON_BLOCKS"].split(","))
    return block_m or bm, block_n or bn, nw, ns


# --------------------------------------------------------------------------------------------
# Python entry point
# --------------------------------------------------------------------------------------------

def _mask_args(attn_mask, shape, device):
    """(tensor, strides, is_bool) of the mask broadcast to ``shape`` through strides."""
    if attn_mask is None:
        return torch.empty(1, dtype=torch.float32, device=device), (0, 0, 0, 0), False
    if attn_mask.dtype == torch.bool:
        m = attn_mask.view(torch.int8) if attn_mask.dim() > 0 else attn_mask.to(torch.int8)
        is_bool = True
    else:
        m = attn_mask.to(torch.float32)  # as reference.mask_to_bias (on the un-broadcast mask)
        is_bool = False
    m = m.expand(shape)
    return m, tuple(m.stride()), is_bool


def forward(q, k, v, *, qk_bits: int, pv_bits: int, scale: float, attn_mask=None,
            smooth_k: bool = True, rotate: bool | None = None, return_maps=(), out=None,
            maps_out=None, block_m: int | None = None, block_n: int | None = None):
    """Quantized attention; see the module docstring. ``out`` / ``maps_out`` (dict name →
    tensor): preallocated outputs (tests poison them); ``block_m``/``block_n`` override the
    tile sizes (tests use small ones to exercise many blocks)."""
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[3]
    if d > MAX_HEAD_DIM or dv > MAX_HEAD_DIM:
        raise ValueError(f"the triton backend supports head dims up to {MAX_HEAD_DIM}; "
                         f"got D = {d} (q, k) and Dv = {dv} (v)")
    if rotate is None:
        rotate = quant.default_rotate(qk_bits)
    dev = q.device
    maps = tuple(return_maps or ())
    d_eff, dpt = code_width(d, rotate)
    dvp = max(16, next_pow2(dv))
    bm, bn, nw, ns = _config(dpt, dvp, pv_bits, dev, block_m, block_n)
    if pv_bits == 8:
        bn = max(bn, 32)  # K of the int8 P·V dot

    # Preparation: at most two launches (column statistics; Q/K rows).
    k_mean, vq = (None, None)
    if smooth_k or pv_bits == 8:
        k_mean, vq = column_stats(k if smooth_k else None, v if pv_bits == 8 else None, dvp)
    qc, qsc, kc, ksc, _, _ = quantize_qk(q, k, qk_bits, smooth=smooth_k, rotate=rotate,
                                         k_mean=k_mean)
    qc, kc = qc.view(torch.int8), kc.view(torch.int8)

    if out is None:
        out = torch.empty(b, h, nq, dv, dtype=q.dtype, device=dev)
    maps_out = dict(maps_out or {})
    f32 = dict(dtype=torch.float32, device=dev)
    for name, shape in (("cls", (b, h, nk)), ("received", (b, h, nk)), ("entropy", (b, h, nq))):
        if name in maps and name not in maps_out:
            maps_out[name] = torch.empty(*shape, **f32)
    dummy = torch.empty(1, **f32)
    lse = torch.empty(b, h, nq, **f32) if "received" in maps else dummy
    mask_t, (smb, smh, smm, smn), mask_bool = _mask_args(attn_mask, (b, h, nq, nk), dev)

    if pv_bits == 8:
        v_arg, vs_arg, vm_arg = vq
        sv = (0, 0, 0, 0)
    else:
        v_arg, vs_arg, vm_arg = v, dummy, dummy
        sv = v.stride()
    qk_scale = float(scale) * LOG2E
    nblk_m = triton.cdiv(nq, bm)
    _attn_fwd_kernel[(nblk_m * b * h,)](
        qc, qsc, kc, ksc, v_arg, vs_arg, vm_arg, mask_t, out, lse,
        maps_out.get("cls", dummy), maps_out.get("entropy", dummy),
        qk_scale, nq, nk, dv, h, nblk_m, *sv, smb, smh, smm, smn, *out.stride(),
        QK_BITS=qk_bits, PV_BITS=pv_bits, DPT=dpt, D_EFF=d_eff, DVP=dvp,
        HAS_MASK=attn_mask is not None, MASK_BOOL=mask_bool,
        PV_BF16=q.dtype == torch.bfloat16, INTERP=INTERPRET,
        WRITE_LSE="received" in maps, WRITE_CLS="cls" in maps, WRITE_ENT="entropy" in maps,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns)
    if "received" in maps:
        # Transposed roles: a key block per program, query blocks streamed.
        rbm, rbn = (bn, bm) if block_m is None and block_n is None else (bm, bn)
        rbn = max(rbn, 16)
        nblk_n = triton.cdiv(nk, rbn)
        _attn_received_kernel[(nblk_n * b * h,)](
            qc, qsc, kc, ksc, mask_t, lse, maps_out["received"], qk_scale, nq, nk, h, nblk_n,
            smb, smh, smm, smn,
            QK_BITS=qk_bits, DPT=dpt, D_EFF=d_eff, HAS_MASK=attn_mask is not None,
            MASK_BOOL=mask_bool, BLOCK_M=rbm, BLOCK_N=rbn, num_warps=nw, num_stages=ns)
    return out, {name: maps_out[name] for name in maps}
