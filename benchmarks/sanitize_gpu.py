#!/usr/bin/env python3
"""One small call of every CUDA kernel instantiation, for compute-sanitizer (memcheck, racecheck).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python benchmarks/sanitize_gpu.py [--triton]

Covers the forward kernel for each Q·Kᵀ bit-width (8, 4, 2) × P·V mode (int8 with float32
inputs, fp16 with float16 inputs, bf16 with bfloat16 inputs) × head-dim bucket (64, 128, 256),
the maps kernel for each bit-width × bucket, the quantizers, and the mask path. Shapes are small
and ragged (Nq = 70, Nk = 90: a partial query tile and a partial key block).

``--triton`` adds the Triton backend's kernels (K/V preparation, attention with Q quantized
inside, the column maps) for each Q·Kᵀ bit-width × P·V mode at D = 64 and 128 (and a ragged
D = 40), one general mask, and a long key sequence prepared by several programs per head.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raad_kernels import cuda_backend  # noqa: E402
from raad_kernels.testing import make_qkv  # noqa: E402

PV = {8: torch.float32, 16: torch.float16}


def main():
    assert torch.cuda.is_available(), "needs a GPU"
    n_calls = 0
    for d, rotate in ((64, False), (100, False), (200, True)):  # buckets 64, 128, 256
        for qk_bits in (8, 4, 2):
            for pv_bits, dtype in ((8, torch.float32), (16, torch.float16), (16, torch.bfloat16)):
                q, k, v = (t.cuda() for t in make_qkv(1, 2, 70, d, nk=90, dtype=dtype, seed=d + qk_bits))
                maps = ("cls", "received", "entropy") if dtype != torch.bfloat16 else ()
                out, got = cuda_backend.attention(q, k, v, qk_bits=qk_bits, pv_bits=pv_bits, scale=d ** -0.5,
                                                  rotate=rotate, return_maps=maps)
                torch.cuda.synchronize()
                assert torch.isfinite(out).all(), (d, qk_bits, pv_bits, dtype)
                n_calls += 1
    q, k, v = (t.cuda() for t in make_qkv(2, 2, 70, 64, nk=90, seed=1))
    mask = torch.rand(2, 1, 70, 90, device="cuda") > 0.2
    mask[..., 0] = True
    out, _ = cuda_backend.attention(q, k, v, qk_bits=4, pv_bits=8, scale=0.125, attn_mask=mask,
                                    return_maps=("received",))
    torch.cuda.synchronize()
    n_calls += 1
    if "--triton" in sys.argv[1:]:
        n_calls += triton_calls()
    print(f"sanitize_gpu: {n_calls} calls finished")


def triton_calls() -> int:
    import raad_kernels.triton as tb
    n = 0
    for d in (40, 64, 128):
        for qk_bits in (8, 4, 2):
            for pv_bits in (8, 16):
                q, k, v = (t.cuda() for t in make_qkv(1, 2, 70, d, nk=90, dtype=torch.float16, seed=d + qk_bits))
                maps = ("cls", "received", "entropy") if pv_bits == 8 else ("entropy",)
                out, _ = tb.attention(q, k, v, qk_bits=qk_bits, pv_bits=pv_bits, scale=d ** -0.5,
                                      return_maps=maps)
                torch.cuda.synchronize()
                assert torch.isfinite(out).all(), ("triton", d, qk_bits, pv_bits)
                n += 1
    q, k, v = (t.cuda() for t in make_qkv(1, 1, 70, 64, nk=1500, dtype=torch.float16, seed=2))
    mask = torch.rand(70, 1500, device="cuda") > 0.2
    for qk_bits in (8, 4):
        out, _ = tb.attention(q, k, v, qk_bits=qk_bits, pv_bits=8, scale=0.125, attn_mask=mask,
                              return_maps=("received",))
        torch.cuda.synchronize()
        n += 1
    return n


if __name__ == "__main__":
    main()
