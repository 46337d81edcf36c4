"""Differentiable fake quantization of the ``torch`` backend's arithmetic (the training path).

Same scheme as :mod:`raad_kernels.torch_backend` (docs/design.md, "Quantization scheme"): K smoothing,
Hadamard rotation, per-token scales with the same clipping search, the same integer grids,
unsigned 8-bit P with scale 1/255 and per-channel int8 V (or 16-bit P·V operands). The forward
value equals the torch backend's output up to float32 rounding; every rounding step uses a
straight-through estimator (the value of the quantized tensor, the gradient of identity), the
matmuls run in float32 and the softmax goes through autograd. Scales are chosen without
gradient (they are a function of the data, not a parameter).

Used by :func:`raad_kernels.quant_attention` whenever autograd is recording and q, k or v
requires grad: stage-2 fine-tuning of a quantized model trains through it. It holds the full
(B, H, Nq, Nk) probabilities (autograd needs them anyway); inference never comes here.
"""

from __future__ import annotations

import contextlib

import torch

from . import quant
from .reference import MapAccumulator, mask_to_bias, safe_denominator


def ste(x: torch.Tensor, x_quantized: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: the value of ``x_quantized``, the gradient of identity in ``x``."""
    return x + (x_quantized - x).detach()


def _cpu_row_quantizer():
    """``raad_kernels._cpu.quantize_rows`` (the CPU kernels' Q/K quantizer), or None without
    the extension."""
    try:
        from . import _cpu
    except ImportError:
        return None
    return getattr(_cpu, "quantize_rows", None)


_ROW_QUANTIZER = _cpu_row_quantizer()
#: False: always the torch specification's scale search (the tests compare the two)
USE_CPU_QUANTIZER = True


def quantized_rows(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The quantized–dequantized value of the rows (last dim) of float32 ``x``, without gradient.
    On the CPU, with the extension built, from its row quantizer: the same scale search as
    :func:`quant.token_scales` in one pass per row instead of ~7 tensor passes per clipping
    candidate; its scales equal the specification's up to float rounding of the RMS."""
    with torch.no_grad():
        # not while torch.compile traces: the pybind call is opaque to Dynamo (a graph break),
        # and the compiled graph fuses the specification's passes anyway
        if (USE_CPU_QUANTIZER and _ROW_QUANTIZER is not None and x.device.type == "cpu"
                and x.dtype == torch.float32 and x.numel() > 0 and not torch.compiler.is_compiling()):
            codes, scale = _ROW_QUANTIZER(x.reshape(-1, x.shape[-1]), bits)
            return (codes.float() * scale[:, None]).view(x.shape)
        scale = quant.token_scales(x, bits)[..., None]
        return quant._round_to_grid(x / scale, bits) * scale


def fake_quantize_rows(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize–dequantize rows (last dim) of float32 ``x`` at ``bits`` with per-row scales."""
    return ste(x, quantized_rows(x, bits))


def fake_quantize_v(v: torch.Tensor):
    """V per channel, centred on its token mean (as :func:`quant.prepare_v`) → (centred V fake-
    quantized, mean)."""
    mean = v.mean(dim=-2, keepdim=True)
    vs = v - mean
    with torch.no_grad():
        scale = vs.abs().amax(dim=-2, keepdim=True) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        vq = torch.round(vs / scale).clamp_(-127, 127) * scale
    return ste(vs, vq), mean


def _no_autocast(device: torch.device):
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def attention(q, k, v, *, qk_bits: int, pv_bits: int, scale: float, attn_mask=None,
              smooth_k: bool = True, rotate: bool | None = None, return_maps=()):
    """Differentiable quantized attention on validated (B, H, N, D) inputs → (out in q.dtype,
    maps). Maps are computed without gradient (they are observations, not a training signal)."""
    with _no_autocast(q.device):
        return _attention(q, k, v, qk_bits, pv_bits, scale, attn_mask, smooth_k, rotate, return_maps)


def _attention(q, k, v, qk_bits, pv_bits, scale, attn_mask, smooth, rotate, return_maps):
    b, h, nq, _ = q.shape
    nk = k.shape[-2]
    if rotate is None:
        rotate = quant.default_rotate(qk_bits)
    qf, kf = q.float(), k.float()
    if smooth:
        kf = quant.smooth_k(kf)
    if rotate:
        qf, kf = quant.rotate(qf), quant.rotate(kf)
    s = (fake_quantize_rows(qf, qk_bits) @ fake_quantize_rows(kf, qk_bits).transpose(-1, -2)) * scale
    bias = mask_to_bias(attn_mask, (b, h, nq, nk), torch.float32)
    if bias is not None:
        s = s + bias

    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)                      # unnormalised, in [0, 1]; masked keys are exactly 0
    l = p.sum(dim=-1, keepdim=True)
    denom = safe_denominator(l)

    if pv_bits == 8:
        with torch.no_grad():
            pq = quant.quantize_probs(p) * quant.P_SCALE
        vs, mean = fake_quantize_v(v.float())
        out = (ste(p, pq) @ vs) / denom + torch.where(l > 0, 1.0, 0.0) * mean
    else:
        half = quant.pv_half_dtype(q.dtype)
        out = (p.to(half).float() @ v.to(half).float()) / denom

    maps = {}
    if return_maps:
        with torch.no_grad():
            acc = MapAccumulator(return_maps, b, h, nq, nk, q.device)
            acc.add(0, p / denom)
            maps = acc.result()
    return out.to(q.dtype), maps
