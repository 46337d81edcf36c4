#!/usr/bin/env python3
"""Host time per call of the triton backend, and kernel launches per call.

Without a GPU (default): the kernels are replaced by no-ops that count their launches, so what
is timed is our own Python work per call (the interpreter is selected only to import the kernels;
nothing runs). Triton's launcher is not part of it.

With ``--gpu`` (a CUDA machine): real calls. Host time per call = wall clock of a loop of calls
issued back to back (fewer launches than the GPU's launch queue holds, so the loop does not wait
for the GPU), GPU time per call = CUDA events around the same loop; launches per call counted
with Triton's launch hook in a separate pass. SDPA fp16 is measured the same way for reference.
The target on the GPU: at most 25 µs of host time per call on the common path.

On the H200 (2026-11-28), before the fused kernels, a call at 8×6×197×64 took 0.27 ms of host
time for 36 µs of kernels (benchmarks/results/gpu_check_2026-11-28_h200.md).

    python benchmarks/host_overhead.py [--shape 8,6,197,64] [--calls 500]
    python benchmarks/host_overhead.py --gpu [--out host_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_US = 25.0
CASES = (("plain", None), ("entropy", ("entropy",)), ("all maps", True))


class _NoLaunch:
    def __init__(self, name, counts):
        self.name, self.counts = name, counts

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counts.append(self.name)
        return launch


def cpu_main(args):
    os.environ["TRITON_INTERPRET"] = "1"
    import raad_kernels as rk
    from raad_kernels.testing import make_qkv
    from raad_kernels.triton import flash, quantize
    counts = []
    for mod in (flash, quantize):
        for name in dir(mod):
            if name.endswith("_kernel"):
                setattr(mod, name, _NoLaunch(name, counts))
    b, h, n, d = (int(x) for x in args.shape.split(","))
    q, k, v = make_qkv(b, h, n, d)
    for label, maps in CASES:
        def call():
            return rk.quant_attention(q, k, v, qk_bits=8, pv_bits=8, backend="triton", return_maps=maps)
        for _ in range(20):
            call()
        counts.clear()
        call()
        launches = len(counts)
        t0 = time.perf_counter()
        for _ in range(args.calls):
            call()
        us = (time.perf_counter() - t0) / args.calls * 1e6
        print(f"{label}: {us:.1f} µs of our host time per call (kernels not launched), "
              f"{launches} launches per call")


def _time_gpu(fn, calls):
    """(host µs per call, GPU µs per call) of ``calls`` back-to-back calls."""
    import torch
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    e1.record()
    e1.synchronize()
    return host, e0.elapsed_time(e1) / calls * 1e3


def _count_launches(fn):
    import triton
    hooks = triton.knobs.runtime.launch_enter_hook
    names = []

    def hook(metadata):  # a LazyDict of the launch's metadata
        try:
            names.append(metadata.get()["name"])
        except Exception:  # noqa: BLE001 - a count without a name still counts
            names.append("?")
    hooks.add(hook)
    try:
        fn()
    finally:
        hooks.remove(hook)
    return names


def gpu_main(args):
    import torch
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    import raad_kernels as rk
    from raad_kernels.testing import make_qkv
    if not torch.cuda.is_available():
        sys.exit("host_overhead.py --gpu needs a CUDA GPU")
    b, h, n, d = (int(x) for x in args.shape.split(","))
    q, k, v = (t.cuda() for t in make_qkv(b, h, n, d, dtype=torch.float16, seed=0))
    # at most ~1000 launches in flight (the launch queue): the loop then measures the host
    calls = min(args.calls, 300)
    res = {"device": torch.cuda.get_device_name(), "shape": [b, h, n, d], "calls": calls,
           "target_host_us": TARGET_US, "rows": []}
    host, gpu = _time_gpu(lambda: sdpa(q, k, v), calls)
    res["rows"].append({"method": "sdpa_fp16", "host_us": host, "gpu_us": gpu})
    print(f"sdpa fp16: host {host:.1f} µs/call, GPU {gpu:.1f} µs/call")
    for backend in args.backends.split(","):
        for label, maps in CASES:
            def fn(backend=backend, maps=maps):
                return rk.quant_attention(q, k, v, qk_bits=8, pv_bits=8, backend=backend, return_maps=maps)
            try:
                host, gpu = _time_gpu(fn, calls)
                launches = _count_launches(fn) if backend == "triton" else None
            except Exception as e:  # noqa: BLE001 - record and go on
                res["rows"].append({"method": f"{backend} {label}", "error": f"{type(e).__name__}: {e}"[:300]})
                print(f"{backend} {label}: FAILED {type(e).__name__}: {e}")
                continue
            row = {"method": f"{backend} {label}", "host_us": host, "gpu_us": gpu,
                   "launches": len(launches) if launches is not None else None,
                   "kernels": launches}
            if backend == "triton" and maps is None:
                row["target_met"] = host <= TARGET_US
            res["rows"].append(row)
            print(f"{backend} {label}: host {host:.1f} µs/call, GPU {gpu:.1f} µs/call"
                  + (f", {len(launches)} launches {launches}" if launches is not None else "")
                  + (f"; target <= {TARGET_US:.0f} µs host: {'met' if row['target_met'] else 'NOT met'}"
                     if "target_met" in row else ""))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="8,6,197,64")
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--gpu", action="store_true", help="real calls on a CUDA GPU")
    ap.add_argument("--backends", default="triton,cuda,auto", help="with --gpu")
    ap.add_argument("--out", default=None, help="with --gpu: write the rows as JSON here")
    args = ap.parse_args()
    gpu_main(args) if args.gpu else cpu_main(args)


if __name__ == "__main__":
    main()
