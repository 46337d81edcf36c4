"""A small quant_attention on each available backend, with its accuracy against float64.

``python -m raad_kernels.demo`` (``make kernel-demo``).
"""

from __future__ import annotations

import time

import torch

from . import backends, quant_attention
from .reference import attention_reference
from .testing import error, make_qkv


def main():
    print("raad-kernels backends:")
    status = backends()
    for name, st in status.items():
        print(f"  {name:7s} built={st.built!s:5s} runnable={st.runnable!s:5s} {st.reason}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = make_qkv(2, 6, 197, 64, device=device, seed=0)  # ViT-S/16 at 224 px, 2 images
    ref = attention_reference(q, k, v)[0]
    print(f"\nViT-S/16 attention (B=2, H=6, N=197, D=64) on {device}, error against float64:")
    print(f"  {'backend':8s} {'QK':>4s} {'PV':>4s} {'cos':>9s} {'rel L2':>8s} {'ms':>8s}")
    for name, st in status.items():
        if not st.runnable:
            continue
        for qk_bits in (8, 4, 2):
            for pv_bits in (8, 16):
                try:
                    t0 = time.perf_counter()
                    out = quant_attention(q, k, v, qk_bits=qk_bits, pv_bits=pv_bits, backend=name)
                    ms = (time.perf_counter() - t0) * 1e3
                except (RuntimeError, ValueError) as e:  # e.g. a backend that can't take this device
                    print(f"  {name:8s} skipped: {e}")
                    break
                e = error(out, ref)
                print(f"  {name:8s} {qk_bits:4d} {pv_bits:4d} {e.cos:9.6f} {e.rel_l2:8.5f} {ms:8.2f}")


if __name__ == "__main__":
    main()
