"""The ``cpu`` backend: fused C++ kernels in ``csrc/cpu`` (extension ``raad_kernels._cpu``)."""

from __future__ import annotations

import torch

from . import _cpu  # ImportError here means: not built


def status():
    from .dispatch import BackendStatus
    if not hasattr(_cpu, "attention"):
        return BackendStatus(True, False, "extension built, fused attention kernel not written yet (issue 3)")
    return BackendStatus(True, True, f"C++ extension, ISA path {_cpu.capabilities()['active_isa']}")


def supports(device: torch.device) -> bool:
    return device.type == "cpu"


def attention(q, k, v, **kwargs):
    raise NotImplementedError("the CPU attention kernel is not written yet (issue 3)")
