"""The ``cpu`` backend: fused C++ kernels in ``csrc/cpu`` (extension ``raad_kernels._cpu``).

One fused kernel per (batch, head, query tile of 32 rows), OpenMP over all of them with
``torch.get_num_threads()`` threads. K and V are quantized once per (batch, head) (smoothing,
Hadamard rotation, per-token scales, packed int4/int2 codes); each tile quantizes its queries,
computes integer Q·Kᵀ, an online fp32 softmax (base-2 polynomial exp) and P·V at 8 bits
(unsigned P, scale 1/255, per-channel V) or 16 bits, and writes the output in the input dtype.
The maps come from the same pass (``entropy`` from online sums; ``cls`` and ``received`` from a
per-tile fp16 cache of the probabilities and the saved per-block maxima): extra memory is
O(B·H·N), never N×N.

Kernel paths, chosen at run time from the CPU (``raad_kernels._cpu.capabilities()``):
``avx512`` (AVX-512 VNNI ``vpdpbusd``; also used on AMX CPUs), ``avx2`` (``vpmaddubsw`` with the
sign trick; fp32-FMA P·V that skips zero probabilities) and ``portable`` (plain C++). The
environment variable ``RAAD_CPU_ISA=portable|avx2|avx512`` forces a lower path. On AMD Zen the
``avx2`` int2 Q·Kᵀ at head dims padded to >= 64 runs on bit planes with scalar ``popcnt`` (the
same integer scores); ``RAAD_CPU_INT2=packed|planes`` overrides that choice (read per call).

Inputs: float32, float16 or bfloat16, any strides (non-contiguous views are read in place, not
copied), head dims of any size (tuned for 16..256), any Nq, Nk >= 1, an optional bool or additive
float ``attn_mask`` broadcastable to (B, H, Nq, Nk) (read through its broadcast strides).
"""

from __future__ import annotations

import math

import torch

from . import _cpu  # ImportError here means: not built


def status():
    from .dispatch import BackendStatus
    if not hasattr(_cpu, "attention"):
        return BackendStatus(True, False, "extension built without the fused attention kernel (rebuild it)")
    caps = _cpu.capabilities()
    return BackendStatus(True, True, f"C++ extension, kernels: {caps['kernel_isa']} (CPU best: {caps['best_isa']})")


def supports(device: torch.device) -> bool:
    return torch.device(device).type == "cpu"


#: the ``out`` layouts attention() writes into: any strides with contiguous channels
OUT = "strided"


def attention(q, k, v, *, qk_bits: int, pv_bits: int, scale: float, attn_mask=None,
              smooth_k: bool = True, rotate: bool | None = None, return_maps=(), out=None, isa=None):
    """Quantized attention on validated (B, H, N, D) CPU inputs → (out in q.dtype, maps).

    ``out``: optional preallocated (B, H, Nq, Dv) tensor of q's dtype to write into, any strides
    with contiguous channels: e.g. ``torch.empty(B, Nq, H, Dv).transpose(1, 2)``, SDPA's layout,
    whose ``out.transpose(1, 2).reshape(B, Nq, -1)`` is a view. Without it: contiguous.
    ``isa``: force a kernel path ("portable", "avx2", "avx512", "amx"); default: the best the CPU has
    (capped by ``RAAD_CPU_ISA``).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return _cpu.attention(q, k, v, qk_bits, pv_bits, float(scale), attn_mask, bool(smooth_k), rotate,
                          list(return_maps or ()), out, isa)


def capabilities() -> dict:
    """CPU features seen at run time and the kernel path in use."""
    return dict(_cpu.capabilities())
