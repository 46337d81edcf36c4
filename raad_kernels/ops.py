"""``torch.library`` custom ops, so compiled graphs hold the attention as one opaque node.

* ``raad::quant_attention(q, k, v, attn_mask, qk_bits, pv_bits, scale, smooth_k, rotate,
  backend, with_maps) -> (out, cls, received, entropy)``: :func:`raad_kernels.quant_attention`
  (inference; the selected backend). The three maps always come back; when ``with_maps`` is
  False they are empty (0,) float32 tensors and nothing is computed for them.
* ``raad::attention_maps(q, k, attn_mask, scale) -> (cls, received, entropy)``: the maps of float
  attention (float32, chunked, never N×N) for modules running at 16/16 bits.

Both have fake (meta) implementations, so ``torch.compile(fullgraph=True)`` traces through a
:class:`~raad_kernels.nn.QuantAttention` without a graph break, and ``torch.jit.trace`` records
them as single ops. The ops carry no autograd formula: gradient-requiring calls never reach them.
:func:`attention` (the entry :class:`QuantAttention` uses) sends those to
:func:`raad_kernels.quant_attention`, whose training path is the differentiable fake
quantization of :mod:`raad_kernels.fake_quant`; under ``torch.compile`` that path is ordinary
PyTorch, which AOTAutograd differentiates like the rest of the model.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .api import quant_attention
from .reference import MAP_NAMES, MapAccumulator, mask_to_bias, query_chunk, softmax_chunk, safe_denominator

#: Bit settings that mean "float": the module runs SDPA on the float module's arithmetic.
FLOAT_BITS = 16


def _no_autocast(device: torch.device):
    # Custom ops fall through autocast, so without this the backend's exact float32 integer
    # products would be recast to bf16/fp16 inside an autocast region.
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _empty_map(q: Tensor) -> Tensor:
    return q.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("raad::quant_attention", mutates_args=())
def _quant_attention_op(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], qk_bits: int,
                        pv_bits: int, scale: float, smooth_k: bool, rotate: Optional[bool],
                        backend: str, with_maps: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with torch.no_grad(), _no_autocast(q.device):
        r = quant_attention(q, k, v, qk_bits=qk_bits, pv_bits=pv_bits, scale=scale, attn_mask=attn_mask,
                            smooth_k=smooth_k, backend=backend, rotate=rotate,
                            return_maps=MAP_NAMES if with_maps else None, out=_sdpa_layout(q, v))
    if not with_maps:
        return r, _empty_map(q), _empty_map(q), _empty_map(q)
    out, maps = r
    return out, *(maps[n].contiguous() for n in MAP_NAMES)


def _sdpa_layout(q: Tensor, v: Tensor) -> Tensor:
    """An empty (B, H, Nq, Dv) output in SDPA's memory layout, (B, Nq, H, Dv): the modules'
    ``o.transpose(1, 2).reshape(B, Nq, H·Dv)`` is then a view, not a copy per layer. The fake
    below promises the same strides."""
    b, h, nq, _ = q.shape
    return q.new_empty((b, nq, h, v.shape[-1])).transpose(1, 2)


@_quant_attention_op.register_fake
def _(q, k, v, attn_mask, qk_bits, pv_bits, scale, smooth_k, rotate, backend, with_maps):
    b, h, nq, _ = q.shape
    nk = k.shape[-2]
    out = _sdpa_layout(q, v)
    if not with_maps:
        return out, _empty_map(q), _empty_map(q), _empty_map(q)
    f32 = dict(dtype=torch.float32)
    return out, q.new_empty((b, h, nk), **f32), q.new_empty((b, h, nk), **f32), q.new_empty((b, h, nq), **f32)


@torch.library.custom_op("raad::attention_maps", mutates_args=())
def _attention_maps_op(q: Tensor, k: Tensor, attn_mask: Optional[Tensor],
                       scale: float) -> tuple[Tensor, Tensor, Tensor]:
    with torch.no_grad(), _no_autocast(q.device):
        b, h, nq, _ = q.shape
        nk = k.shape[-2]
        qf, kt = q.float(), k.float().transpose(-1, -2)
        bias = mask_to_bias(attn_mask, (b, h, nq, nk), torch.float32)
        acc = MapAccumulator(MAP_NAMES, b, h, nq, nk, q.device)
        step = query_chunk(b, h, nk)
        for i0 in range(0, nq, step):
            i1 = min(nq, i0 + step)
            s = (qf[:, :, i0:i1] @ kt) * scale
            if bias is not None:
                s = s + bias[:, :, i0:i1]
            p, _, l = softmax_chunk(s)
            acc.add(i0, p / safe_denominator(l))
        maps = acc.result()
    return tuple(maps[n].contiguous() for n in MAP_NAMES)


@_attention_maps_op.register_fake
def _(q, k, attn_mask, scale):
    b, h, nq, _ = q.shape
    nk = k.shape[-2]
    f32 = dict(dtype=torch.float32)
    return q.new_empty((b, h, nk), **f32), q.new_empty((b, h, nk), **f32), q.new_empty((b, h, nq), **f32)


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def attention(q: Tensor, k: Tensor, v: Tensor, *, qk_bits: int, pv_bits: int, scale: float | None = None,
              attn_mask: Tensor | None = None, smooth_k: bool = True, rotate: bool | None = None,
              backend: str = "auto", return_maps: bool = False, dropout_p: float = 0.0):
    """One attention call of a :class:`~raad_kernels.nn.QuantAttention` → (out, maps or None).

    * 16/16 bits: float SDPA (with the float module's dropout), maps from ``raad::attention_maps``;
    * gradients required (and not tracing): :func:`raad_kernels.quant_attention`, whose training
      path is the fake quantization (maps detached);
    * otherwise: the ``raad::quant_attention`` op. Attention dropout is not applied on the
      quantized paths.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if qk_bits == FLOAT_BITS:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
        if not return_maps:
            return out, None
        cls, received, entropy = torch.ops.raad.attention_maps(q.detach(), k.detach(), attn_mask, float(scale))
        return out, {"cls": cls, "received": received, "entropy": entropy}
    if _needs_grad(q, k, v) and not torch.jit.is_tracing():
        r = quant_attention(q, k, v, qk_bits=qk_bits, pv_bits=pv_bits, scale=float(scale), attn_mask=attn_mask,
                            smooth_k=smooth_k, backend=backend, rotate=rotate,
                            return_maps=MAP_NAMES if return_maps else None)
        if not return_maps:
            return r, None
        out, maps = r
        return out, {n: m.detach() for n, m in maps.items()}
    out, cls, received, entropy = torch.ops.raad.quant_attention(
        q, k, v, attn_mask, qk_bits, pv_bits, float(scale), smooth_k, rotate, backend, bool(return_maps))
    if not return_maps:
        return out, None
    return out, {"cls": cls, "received": received, "entropy": entropy}
