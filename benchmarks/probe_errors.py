#!/usr/bin/env python3
"""Does a bad argument raise a Python error from each compiled extension, or crash the process?

On the H200 machine of 2026-11-28 (torch 2.11, Python 3.12) one call of the CPU extension with
qk_bits=3 ended its pytest worker with a segmentation fault at the argument check, where this
machine (torch 2.14, Python 3.11) raises ValueError. Each probe runs in its own process; a crash
is reported with its signal (and, where cuda-gdb is on the PATH, a native backtrace).

    python benchmarks/probe_errors.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys

PROBES = {
    "cpu qk_bits=3": "from raad_kernels import _cpu; import torch; x = torch.randn(1, 1, 4, 16); "
                     "_cpu.attention(x, x, x, 3)",
    "cpu dtype float64": "from raad_kernels import _cpu; import torch; x = torch.randn(1, 1, 4, 16).double(); "
                         "_cpu.attention(x, x, x)",
    "cuda cpu tensors": "from raad_kernels import _cuda; import torch; x = torch.randn(1, 1, 4, 16); "
                        "_cuda.attention(x, x, x, 8, 8, 0.25, None, True, False, False, False, False, None)",
}


def main():
    bad = 0
    for name, code in PROBES.items():
        wrapped = ("import faulthandler; faulthandler.enable()\n"
                   f"try:\n    {code}\nexcept ImportError as e:\n    print('not built:', e)\n"
                   "except Exception as e:\n    print('raised', type(e).__name__ + ':', str(e).splitlines()[0][:160])\n"
                   "else:\n    print('NO ERROR RAISED')\n")
        r = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, timeout=120)
        if r.returncode < 0 or r.returncode > 1:
            bad += 1
            print(f"{name}: CRASHED (exit {r.returncode})\n{r.stderr[-3000:]}")
            gdb = shutil.which("cuda-gdb")
            if gdb:
                g = subprocess.run([gdb, "-batch", "-ex", "run", "-ex", "bt 30", "--args", sys.executable, "-c", code],
                                   capture_output=True, text=True, timeout=300)
                print("cuda-gdb backtrace:\n" + g.stdout[-6000:])
        else:
            print(f"{name}: {r.stdout.strip() or r.stderr.strip()[-300:]}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
