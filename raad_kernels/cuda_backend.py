"""The ``cuda`` backend: CUDA C++ kernels in ``csrc/cuda`` (extension ``raad_kernels._cuda``)."""

from __future__ import annotations

import torch

from . import _cuda  # ImportError here means: not built


def status():
    from .dispatch import BackendStatus
    if not hasattr(_cuda, "attention"):
        return BackendStatus(True, False, "extension built, attention kernels not written yet (issue 4)")
    if not torch.cuda.is_available():
        return BackendStatus(True, False, "extension built; no CUDA GPU visible")
    return BackendStatus(True, True, f"CUDA extension on {torch.cuda.get_device_name()}")


def supports(device: torch.device) -> bool:
    return device.type == "cuda"


def attention(q, k, v, **kwargs):
    raise NotImplementedError("the CUDA attention kernels are not written yet (issue 4)")
