"""The ``triton`` backend: Triton JIT kernels (run on the CPU under TRITON_INTERPRET=1)."""

from __future__ import annotations

import torch

import triton  # noqa: F401  ImportError here means: not built


def status():
    from ..dispatch import BackendStatus
    return BackendStatus(True, False, "Triton kernels not written yet (issue 4)")


def supports(device: torch.device) -> bool:
    return device.type == "cuda"


def attention(q, k, v, **kwargs):
    raise NotImplementedError("the Triton kernels are not written yet (issue 4)")
