"""The one dispatch point: which backend runs a call.

Each backend is a module exposing ``status() -> BackendStatus``, ``supports(device) -> bool`` and
``attention(q, k, v, **kwargs) -> (out, maps)`` with the signature of
:func:`raad_kernels.torch_backend.attention`. Backends never import one another.

``auto`` on a CUDA device picks, per shape class, the backend that measured fastest on that
device's compute capability in the speed table shipped with the package (``gpu_speed.json``,
written by ``benchmarks/bench_gpu.py`` on a GPU run, only with backends whose GPU tests passed
that run; :mod:`raad_kernels.speed_table`). Where the table has no entry for the device or the
shape class, ``auto`` keeps the fixed order of :func:`_auto_order` (Triton first).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from . import speed_table

BACKENDS = ("cuda", "triton", "cpu", "torch")
_MODULES = {
    "cuda": "raad_kernels.cuda_backend",
    "triton": "raad_kernels.triton",
    "cpu": "raad_kernels.cpu_backend",
    "torch": "raad_kernels.torch_backend",
}
#: ``auto`` picks CUDA on a GPU only after its GPU tests have passed on a real GPU. Until a
#: recorded run flips this, ``auto`` on a GPU uses Triton. The one GPU run so far found test bugs
#: (fixed since, not yet re-run on a GPU; docs/history/kernels.md, "GPU speed").
CUDA_VERIFIED_ON_GPU = False


@dataclass(frozen=True)
class BackendStatus:
    built: bool      # its code (extension, JIT compiler) is importable
    runnable: bool   # this machine can run it now
    reason: str

    def __bool__(self) -> bool:
        return self.runnable


def _module(name: str):
    try:
        return importlib.import_module(_MODULES[name]), None
    except ImportError as e:  # the backend's code or its extension is absent
        return None, f"{name} backend not importable: {e}"


def status(name: str) -> BackendStatus:
    mod, err = _module(name)
    if mod is None:
        return BackendStatus(False, False, err)
    return mod.status()


def backends() -> dict[str, BackendStatus]:
    """For each backend: whether it was built and whether this machine can run it, and why."""
    return {name: status(name) for name in BACKENDS}


def _auto_order(device: torch.device):
    if device.type == "cuda":
        return ("cuda", "triton", "torch") if CUDA_VERIFIED_ON_GPU else ("triton", "cuda", "torch")
    return ("cpu", "torch")


def _usable(name: str, device: torch.device):
    mod, _ = _module(name)
    if mod is not None and mod.status().runnable and mod.supports(device):
        return mod
    return None


def choose(device: torch.device, n_tokens: int, head_dim: int):
    """The backend module ``auto`` runs a (n_tokens, head_dim) call with on ``device``: the
    fastest usable one of the speed table's entry for this device and shape class, else the
    first usable one of :func:`_auto_order`."""
    for name in speed_table.ranking(device, n_tokens, head_dim) or ():
        mod = _usable(name, device)
        if mod is not None:
            return mod
    for name in _auto_order(device):
        mod = _usable(name, device)
        if mod is not None:
            return mod
    raise RuntimeError(f"no backend can run on device {device}")  # torch always can


class _MeasuredAuto:
    """``auto`` on a GPU with a speed-table entry: the backend is chosen per call from the
    shapes (:func:`choose`, cached per shape class). It accepts any ``out`` layout; a backend
    that writes only contiguous outputs (cuda) gets none, and the result is copied in."""

    OUT = "strided"

    def __init__(self, device: torch.device):
        self.device = device
        self._picked: dict = {}

    def attention(self, q, k, v, *, out=None, **kw):
        n, d = max(q.shape[-2], k.shape[-2]), q.shape[-1]
        key = speed_table.shape_class(n, d)
        mod = self._picked.get(key)
        if mod is None:
            mod = self._picked[key] = choose(q.device, n, d)
        layout = getattr(mod, "OUT", None)
        if out is None or layout == "strided" or (layout == "contiguous" and out.is_contiguous()):
            return mod.attention(q, k, v, out=out, **kw)
        res, maps = mod.attention(q, k, v, **kw)
        out.copy_(res)
        return out, maps


_MEASURED: dict = {}


def select(backend: str, device: torch.device):
    """Return the backend module for a call on ``device``; explain why a requested one can't run."""
    if backend == "auto":
        if device.type == "cuda" and speed_table.has_device(device):
            impl = _MEASURED.get(device)
            if impl is None:
                impl = _MEASURED[device] = _MeasuredAuto(device)
            return impl
        for name in _auto_order(device):
            mod, _ = _module(name)
            if mod is not None and mod.status().runnable and mod.supports(device):
                return mod
        raise RuntimeError(f"no backend can run on device {device}")  # torch always can
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    mod, err = _module(backend)
    if mod is None:
        raise RuntimeError(f"backend={backend!r} is not available: {err}")
    st = mod.status()
    if not st.runnable:
        raise RuntimeError(f"backend={backend!r} is not available: {st.reason}")
    if not mod.supports(device):
        raise ValueError(f"backend={backend!r} cannot run tensors on device {device}")
    return mod
