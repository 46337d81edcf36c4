#!/usr/bin/env python3
"""Where a backend's time goes on the GPU: the kernels one call launches (torch.profiler), their
device time, and the host time per call. For the cases where bench_gpu.py shows a backend far
from its kernels' arithmetic (small shapes: launch and Python overhead).

    python benchmarks/profile_gpu.py [--shape B,H,N,D] [--backends cuda,triton] [--bits 8,8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import raad_kernels as rk  # noqa: E402
from raad_kernels.testing import make_qkv  # noqa: E402


def host_ms(fn, reps=50):
    """Host time per call with no synchronisation in between (the launch rate), and with a
    synchronisation after each call (what one call costs end to end)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    t_launch = (time.perf_counter() - t0) / reps
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
        torch.cuda.synchronize()
    return t_launch * 1e3, (time.perf_counter() - t0) / reps * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="8,6,197,64")
    ap.add_argument("--backends", default="cuda,triton")
    ap.add_argument("--bits", default="8,8", help="qk_bits,pv_bits")
    ap.add_argument("--maps", action="store_true")
    args = ap.parse_args()
    b, h, n, d = (int(x) for x in args.shape.split(","))
    qk, pv = (int(x) for x in args.bits.split(","))
    q, k, v = (t.cuda() for t in make_qkv(b, h, n, d, dtype=torch.float16, seed=0))
    from torch.nn.functional import scaled_dot_product_attention as sdpa
    print(f"shape B={b} H={h} N={n} D={d}, qk{qk}/pv{pv}, maps={args.maps}, {torch.cuda.get_device_name()}")
    launch, e2e = host_ms(lambda: sdpa(q, k, v))
    print(f"sdpa fp16: host {launch:.3f} ms/call launched, {e2e:.3f} ms/call synchronised")
    for backend in args.backends.split(","):
        def fn(backend=backend):
            return rk.quant_attention(q, k, v, qk_bits=qk, pv_bits=pv, backend=backend,
                                      return_maps=True if args.maps else None)
        launch, e2e = host_ms(fn)
        print(f"\n== {backend}: host {launch:.3f} ms/call launched, {e2e:.3f} ms/call synchronised")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
