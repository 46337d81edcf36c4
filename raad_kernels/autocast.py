"""Modules whose forward runs under ``torch.autocast`` (a plan's ``autocast`` section).

A plan may run a whole sub-network in bf16 where the hardware does bf16 faster than fp32
(AMX or AVX-512 BF16 CPUs, GPUs) and a measurement at fit time found the damage small. The
module's ``forward`` is wrapped on the instance (its state dict is unchanged) and its floating
outputs are cast back to the input's float dtype, so the modules around it see what they saw.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import nn

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_MARK = "_raad_autocast"


def _first_float(args) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a
        if isinstance(a, (list, tuple)):
            t = _first_float(a)
            if t is not None:
                return t
    return None


def _cast_back(out, dtype: torch.dtype, low: torch.dtype):
    if isinstance(out, torch.Tensor):
        return out.to(dtype) if out.dtype == low else out
    if isinstance(out, tuple):
        return tuple(_cast_back(o, dtype, low) for o in out)
    if isinstance(out, list):
        return [_cast_back(o, dtype, low) for o in out]
    if isinstance(out, dict):
        return {k: _cast_back(v, dtype, low) for k, v in out.items()}
    return out


class _AutocastForward:
    """The module's forward under autocast. A class holding its forward rather than a closure:
    a deep copy of the module (``copy.deepcopy``) then runs the copy's own forward, not the
    original's."""

    def __init__(self, forward, low: torch.dtype):
        self.forward, self.low = forward, low
        functools.update_wrapper(self, forward, updated=())

    def __call__(self, *args, **kwargs):
        ref = _first_float(list(args) + list(kwargs.values()))
        if ref is None:
            return self.forward(*args, **kwargs)
        with torch.autocast(ref.device.type, dtype=self.low):
            out = self.forward(*args, **kwargs)
        return _cast_back(out, ref.dtype, self.low)


def autocast_modules(model: nn.Module, dtype: str, modules: Iterable[str], where: str = "autocast") -> list[str]:
    """Run each named module of ``model`` (exact names, "" for the model) under autocast at
    ``dtype`` ("bfloat16" or "float16"). Every name is checked before any module changes.
    Returns the names."""
    from .plan import PlanError, named_modules
    if dtype not in DTYPES:
        raise PlanError(f"{where}: dtype must be one of {list(DTYPES)}, got {dtype!r}")
    names = list(modules)
    for m in named_modules(model, names, where).values():
        remove_autocast(m)
        m.forward = _AutocastForward(m.forward, DTYPES[dtype])
        setattr(m, _MARK, dtype)
    return names


def remove_autocast(module: nn.Module) -> None:
    """Undo :func:`autocast_modules` on one module (nothing if it was not wrapped)."""
    if getattr(module, _MARK, None) is not None:
        del module.forward   # the instance attribute; the class's forward shows through again
        setattr(module, _MARK, None)


def autocast_dtype(module: nn.Module) -> str | None:
    """The dtype ``module`` runs under autocast at, or None."""
    return getattr(module, _MARK, None)
