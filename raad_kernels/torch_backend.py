"""The ``torch`` backend: the quantized attention of docs/design.md written plainly in PyTorch.

This is the executable specification. Every fast backend is tested against it, so it favours
clarity over speed: integer products are done as exact float32 matmuls (|Σ| < 2**24 for head
dims up to 512 at int8) and the queries are walked in chunks so the N×N matrix never exists.
"""

from __future__ import annotations

import torch

from . import quant
from .reference import chunked_attention, mask_to_bias, safe_denominator as _safe


def status():
    from .dispatch import BackendStatus
    return BackendStatus(built=True, runnable=True, reason="pure PyTorch, always available")


def supports(device: torch.device) -> bool:
    return True


def attention(q, k, v, *, qk_bits: int, pv_bits: int, scale: float, attn_mask=None,
              smooth_k: bool = True, rotate: bool | None = None, return_maps=()):
    """Quantized attention on validated (B, H, N, D) inputs → (out in q.dtype, maps)."""
    b, h, nq, _ = q.shape
    nk = k.shape[-2]

    # Q·Kᵀ: per-token int codes, exact integer dot products, scales applied to the int32 sums.
    qk = quant.prepare_qk(q, k, qk_bits, smooth=smooth_k, rotate_qk=rotate)
    q_codes, k_codes_t = qk.q_codes.float(), qk.k_codes.float().transpose(-1, -2)
    row_scale = qk.q_scale * scale                      # (B, H, Nq)
    bias = mask_to_bias(attn_mask, (b, h, nq, nk), torch.float32)

    def scores(i0, i1):
        s_int = q_codes[:, :, i0:i1] @ k_codes_t        # exact int32 values held in float32
        s = s_int * row_scale[:, :, i0:i1, None] * qk.k_scale[:, :, None, :]
        return s if bias is None else s + bias[:, :, i0:i1]

    # P·V: unsigned 8-bit P (scale 1/255) × per-channel int8 V, or 16-bit operands; fp32 sums.
    if pv_bits == 8:
        vq = quant.prepare_v(v)
        v_codes = vq.codes.float()
        out_scale = (vq.scale * quant.P_SCALE)[:, :, None, :]

        def pv(p, l, i0, i1):
            acc = quant.quantize_probs(p) @ v_codes
            return acc * out_scale / _safe(l) + torch.where(l > 0, 1.0, 0.0) * vq.mean[:, :, None, :]
    else:
        half = quant.pv_half_dtype(q.dtype)
        v_half = v.to(half).float()

        def pv(p, l, i0, i1):
            return (p.to(half).float() @ v_half) / _safe(l)

    out = torch.empty(b, h, nq, v.shape[-1], dtype=torch.float32, device=q.device)
    out, maps = chunked_attention(nq, (b, h, nk), q.device, scores, pv, out, return_maps)
    return out.to(q.dtype), maps
