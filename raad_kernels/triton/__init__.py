"""The ``triton`` backend: Triton JIT kernels (run on the CPU under TRITON_INTERPRET=1).

Modules: :mod:`.quantize` (fused smoothing / rotation / scales / packing, V per-channel
quantization), :mod:`.flash` (flash forward with int8/int4/int2 Q·Kᵀ, int8 or 16-bit P·V,
the ``entropy`` map in the same pass, ``cls`` and ``received`` in a second pass over the keys
that uses the saved log-sum-exp), :mod:`._aot` (compiles every kernel variant for sm_86/sm_90
without a GPU: ``python -m raad_kernels.triton._aot``).
"""

from __future__ import annotations

import functools

import torch

import triton  # noqa: F401  ImportError here means: not built

from ._common import INTERPRET


@functools.cache  # fixed once the kernels are imported; asked on every call by the dispatcher
def status():
    from ..dispatch import BackendStatus
    if INTERPRET:
        return BackendStatus(True, True, f"Triton {triton.__version__} interpreter "
                             "(TRITON_INTERPRET=1 when the kernels were imported): CPU tensors, "
                             "correct but slow")
    if torch.cuda.is_available():
        return BackendStatus(True, True, f"Triton {triton.__version__} on CUDA "
                             f"({torch.cuda.get_device_name()})")
    return BackendStatus(True, False, f"Triton {triton.__version__} is installed but there is no "
                         "CUDA GPU and TRITON_INTERPRET was not '1' when the kernels were imported")


def supports(device: torch.device) -> bool:
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if INTERPRET:  # the interpreter runs on host memory (it copies CUDA tensors over and back)
        return device.type in ("cpu", "cuda")
    return device.type == "cuda"


#: the ``out`` layouts attention() writes into: any strides (the kernel takes out's strides)
OUT = "strided"


def attention(q, k, v, *, qk_bits: int, pv_bits: int, scale: float, attn_mask=None,
              smooth_k: bool = True, rotate: bool | None = None, return_maps=(), out=None):
    """Quantized attention on validated (B, H, N, D) inputs → (out in q.dtype, maps).
    ``out``: optional preallocated (B, H, Nq, Dv) tensor of q's dtype to write into."""
    dev = q.device
    if not supports(dev):
        raise ValueError(f"the triton backend cannot run tensors on device {dev} "
                         f"({status().reason})")
    forward = _forward()
    kw = dict(qk_bits=qk_bits, pv_bits=pv_bits, scale=scale, attn_mask=attn_mask,
              smooth_k=smooth_k, rotate=rotate, return_maps=return_maps, out=out)
    if dev.type == "cuda" and not INTERPRET and dev.index is not None \
            and dev.index != torch.cuda.current_device():
        with torch.cuda.device(dev):  # launch on the tensors' GPU, not the current one
            return forward(q, k, v, **kw)
    return forward(q, k, v, **kw)


@functools.cache
def _forward():  # imported on first use (the kernels compile lazily anyway), then cached
    from .flash import forward
    return forward
