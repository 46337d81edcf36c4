"""``quant_attention``: argument checking, then one call into the selected backend."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from . import dispatch
from .quant import PV_BITS, QK_BITS
from .reference import MAP_NAMES

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_bits(name: str, value, allowed):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, one of {allowed}; got {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value}")


def _writes_into(impl, out) -> bool:
    """Whether backend ``impl`` writes the result into ``out`` itself, by the layouts it declares
    (``OUT``): "strided" (cpu, triton: any strides with contiguous channels) or "contiguous"
    (cuda); a backend without ``OUT`` (torch) never does, and its result is copied in."""
    layout = getattr(impl, "OUT", None)
    return out is not None and (layout == "strided" or (layout == "contiguous" and out.is_contiguous()))


def _check_out(out, q, v, training: bool):
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if training:
        raise ValueError("out= is for inference: q, k or v requires grad (the training path returns a "
                         "new tensor for autograd)")
    want = (q.shape[0], q.shape[1], q.shape[2], v.shape[-1])
    if tuple(out.shape) != want:
        raise ValueError(f"out must have shape (B, H, Nq, Dv) = {want}, got {tuple(out.shape)}")
    if out.dtype != q.dtype or out.device != q.device:
        raise TypeError(f"out must have q's dtype and device ({q.dtype}, {q.device}), got "
                        f"({out.dtype}, {out.device})")
    if out.stride(-1) != 1 and out.shape[-1] > 1:
        raise ValueError(f"out's channels (last dim) must be contiguous, got strides {tuple(out.stride())}")


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, N, D) like SDPA, got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; allowed: float32, float16, bfloat16")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise ValueError("q, k, v must share batch and head dims (B, H), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share the head dim D, got {q.shape[-1]} and {k.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same number of tokens, got {k.shape[-2]} and {v.shape[-2]}")
    for name, n in (("q", q.shape[-2]), ("k", k.shape[-2])):
        if n < 1:
            raise ValueError(f"{name} needs at least one token (N >= 1), got N = {n}")
    if q.shape[-1] < 1 or v.shape[-1] < 1:
        raise ValueError("head dims must be >= 1")


def _check_mask(attn_mask, q, k):
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and attn_mask.dtype not in FLOAT_DTYPES:
        raise TypeError(f"attn_mask must be bool (True = attend) or a float additive mask, got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask is on {attn_mask.device}, q on {q.device}")
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    try:
        torch.broadcast_shapes(attn_mask.shape, target)
    except RuntimeError:
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                         f"(B, H, Nq, Nk) = {target}") from None
    if attn_mask.dim() > 4:
        raise ValueError(f"attn_mask must have at most 4 dims, got {attn_mask.dim()}")


def _normalise_maps(return_maps) -> tuple[str, ...]:
    if return_maps is None or return_maps is False:
        return ()
    if return_maps is True:
        return MAP_NAMES
    if isinstance(return_maps, str):
        return_maps = (return_maps,)
    if not isinstance(return_maps, Iterable):
        raise TypeError(f"return_maps must be a tuple of names from {MAP_NAMES}, True or None")
    names = tuple(return_maps)
    for n in names:
        if n not in MAP_NAMES:
            raise ValueError(f"return_maps: unknown map {n!r}; allowed: {MAP_NAMES}")
    if len(set(names)) != len(names):
        raise ValueError(f"return_maps lists a map twice: {names}")
    return names


def quant_attention(q, k, v, qk_bits: int = 8, pv_bits: int = 8, scale: float | None = None,
                    attn_mask: torch.Tensor | None = None, smooth_k: bool = True,
                    backend: str = "auto", return_maps=None, rotate: bool | None = None,
                    out: torch.Tensor | None = None):
    """Attention with Q·Kᵀ at ``qk_bits`` (2, 4, 8) and P·V at ``pv_bits`` (8, 16).

    ``q, k, v``: (B, H, N, D) as for SDPA; ``v`` may have its own head dim. ``attn_mask``: bool
    (True = attend) or additive float, broadcastable to (B, H, Nq, Nk). ``return_maps``: names
    from ``("cls", "received", "entropy")`` (or True for all) → returns ``(out, maps)``.
    ``rotate`` (None = on at 4/2 bits, off at 8) toggles the Hadamard rotation.
    ``out``: optional (B, H, Nq, Dv) tensor of q's dtype and device to write the result into (any
    strides with contiguous channels, e.g. SDPA's layout ``torch.empty(B, Nq, H, Dv).transpose(1,
    2)``, whose ``out.transpose(1, 2).reshape(B, Nq, -1)`` is then a view); inference only. The
    cpu, cuda and triton backends write into it directly, the torch backend's result is copied in.
    Rows whose keys are all masked come out as zeros.
    """
    _check_qkv(q, k, v)
    _check_bits("qk_bits", qk_bits, QK_BITS)
    _check_bits("pv_bits", pv_bits, PV_BITS)
    _check_mask(attn_mask, q, k)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    elif not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    if not isinstance(smooth_k, bool):
        raise TypeError(f"smooth_k must be a bool, got {type(smooth_k).__name__}")
    if rotate is not None and not isinstance(rotate, bool):
        raise TypeError(f"rotate must be a bool or None, got {type(rotate).__name__}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    maps = _normalise_maps(return_maps)
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if out is not None:
        _check_out(out, q, v, training)

    if training:
        # Training path: differentiable fake quantization of the same arithmetic (STE).
        from . import fake_quant
        out, got = fake_quant.attention(q, k, v, qk_bits=qk_bits, pv_bits=pv_bits, scale=float(scale),
                                        attn_mask=attn_mask, smooth_k=smooth_k, rotate=rotate,
                                        return_maps=maps)
        return (out, got) if maps else out

    impl = dispatch.select(backend, q.device)
    kw = {"out": out} if _writes_into(impl, out) else {}
    res, got = impl.attention(q, k, v, qk_bits=qk_bits, pv_bits=pv_bits, scale=float(scale),
                              attn_mask=attn_mask, smooth_k=smooth_k, rotate=rotate,
                              return_maps=maps, **kw)
    if out is not None and res.data_ptr() != out.data_ptr():
        res = out.copy_(res)
    return (res, got) if maps else res
