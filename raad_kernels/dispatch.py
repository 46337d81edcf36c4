"""The one dispatch point: which backend runs a call.

Each backend is a module exposing ``status() -> BackendStatus``, ``supports(device) -> bool`` and
``attention(q, k, v, **kwargs) -> (out, maps)`` with the signature of
:func:`raad_kernels.torch_backend.attention`. Backends never import one another.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

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


def select(backend: str, device: torch.device):
    """Return the backend module for a call on ``device``; explain why a requested one can't run."""
    if backend == "auto":
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
