#!/usr/bin/env python3
"""Host (Python) time per call of the triton backend with its kernels replaced by no-ops: the
part of a call's cost that is ours, not Triton's launcher's nor the GPU's. Runs anywhere (the
interpreter is selected only to import the kernels without a GPU; nothing is launched).

On the H200 (2026-11-28) a call at 8×6×197×64 took 0.27 ms of host time for 36 µs of kernels
(benchmarks/results/gpu_check_2026-11-28_h200.md), so this is what bounds the backend at ViT
sizes together with Triton's own launch cost.

    python benchmarks/host_overhead.py [--shape 8,6,197,64] [--calls 500]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import raad_kernels as rk  # noqa: E402
from raad_kernels.testing import make_qkv  # noqa: E402
from raad_kernels.triton import flash, quantize  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="8,6,197,64")
    ap.add_argument("--calls", type=int, default=500)
    args = ap.parse_args()
    for mod in (flash, quantize):
        for name in dir(mod):
            if name.endswith("_kernel"):
                setattr(mod, name, _NoLaunch())
    b, h, n, d = (int(x) for x in args.shape.split(","))
    q, k, v = make_qkv(b, h, n, d)
    for maps, label in ((None, "plain"), (True, "all maps")):
        def call():
            return rk.quant_attention(q, k, v, qk_bits=8, pv_bits=8, backend="triton", return_maps=maps)
        for _ in range(20):
            call()
        t0 = time.perf_counter()
        for _ in range(args.calls):
            call()
        print(f"{label}: {(time.perf_counter() - t0) / args.calls * 1e6:.1f} µs of host time per call")


if __name__ == "__main__":
    main()
