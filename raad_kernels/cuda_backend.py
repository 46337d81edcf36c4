"""The ``cuda`` backend: CUDA C++ kernels in ``csrc/cuda`` (extension ``raad_kernels._cuda``).

Per call: K smoothing, Hadamard rotation and per-token quantization of Q and K in one fused
kernel (packed int8/int4/int2 codes), V per channel (int8) or as fp16/bf16, then one flash-style
kernel: integer ``mma.sync`` for Q·Kᵀ (int4 natively on sm_80/86/89), online softmax, P·V with
unsigned 8-bit P (u8·s8 mma) or 16-bit P (fp16/bf16 mma, fp32 accumulation). ``entropy`` comes
from the same pass; ``cls`` and ``received`` from a second pass over the keys with the saved
log-sum-exp. Head dims up to 256; masks (bool or additive) broadcast by strides.
"""

from __future__ import annotations

import functools

import torch

from . import _cuda  # ImportError here means: not built
from . import quant

#: Largest q/k and v head dim the kernels take (head dims are padded to 64, 128 or 256).
MAX_HEAD_DIM = 256
#: mma.sync with int8 operands needs Ampere (sm_80) or newer.
MIN_CAPABILITY = (8, 0)


def status():
    from .dispatch import BackendStatus
    if not hasattr(_cuda, "attention"):
        return BackendStatus(True, False, "extension built without the attention kernels: rebuild it")
    if not torch.cuda.is_available():
        return BackendStatus(True, False, "extension built; no CUDA GPU visible")
    runnable, reason = _device_status(torch.cuda.current_device())
    return BackendStatus(True, runnable, reason)


@functools.lru_cache(maxsize=None)
def _device_status(index: int):
    """(runnable, reason) for one device; cached, since dispatch asks on every call."""
    name = torch.cuda.get_device_name(index)
    cap = torch.cuda.get_device_capability(index)
    if cap < MIN_CAPABILITY:
        return False, f"{name} is sm_{cap[0]}{cap[1]}; the kernels need sm_80 or newer"
    with torch.cuda.device(index):
        binary = _cuda.kernel_binary_version()
    if binary <= 0:
        return False, (f"the extension has no machine code for {name} (sm_{cap[0]}{cap[1]}); "
                       "rebuild with TORCH_CUDA_ARCH_LIST including it")
    return True, f"CUDA extension on {name} (sm_{cap[0]}{cap[1]}, running sm_{binary} code)"


def supports(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_status(index)[0]


#: the ``out`` layouts attention() writes into: the extension takes only a contiguous one
#: (csrc/bindings/cuda_bindings.cpp checks it); raad_kernels.quant_attention copies into any other
OUT = "contiguous"


def attention(q, k, v, *, qk_bits: int, pv_bits: int, scale: float, attn_mask=None,
              smooth_k: bool = True, rotate: bool | None = None, return_maps=(), out=None):
    """Quantized attention on validated (B, H, N, D) CUDA tensors → (out in q.dtype, maps).

    ``out`` (optional, contiguous, q's dtype and shape (B, H, Nq, Dv)) is written in place; tests
    poison it first to prove every element is written.
    """
    for name, t in (("q", q), ("v", v)):
        if t.shape[-1] > MAX_HEAD_DIM:
            raise ValueError(f"backend='cuda' supports head dims up to {MAX_HEAD_DIM}; "
                             f"{name} has D = {t.shape[-1]}")
    if rotate is None:
        rotate = quant.default_rotate(qk_bits)
    names = tuple(return_maps or ())
    o, cls, received, entropy = _cuda.attention(
        q, k, v, int(qk_bits), int(pv_bits), float(scale), attn_mask, bool(smooth_k), bool(rotate),
        "cls" in names, "received" in names, "entropy" in names, out)
    got = {"cls": cls, "received": received, "entropy": entropy}
    return o, {n: got[n] for n in names}
