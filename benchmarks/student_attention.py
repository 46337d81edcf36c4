"""The RAAD student's attention at 256 px (8×2×1025×64 by default) on this CPU: this package's
kernels at each setting against SDPA fp32 and bf16 on the same tensors, one process,
round-robin, median milliseconds per call.

    python benchmarks/student_attention.py [--shape B H N D] [--repeats 10]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from raad_kernels import quant_attention
from raad_kernels.timing import device_name, round_robin


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", nargs=4, type=int, default=[8, 2, 1025, 64], metavar=("B", "H", "N", "D"))
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*args.shape, generator=g) for _ in range(3))
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    fns = {"SDPA fp32": lambda: F.scaled_dot_product_attention(q, k, v),
           "SDPA bf16": lambda: F.scaled_dot_product_attention(qb, kb, vb)}
    for qk, pv in ((8, 8), (4, 8), (2, 8), (8, 16)):
        fns[f"int{qk}, P·V {pv}"] = lambda qk=qk, pv=pv: quant_attention(q, k, v, qk_bits=qk, pv_bits=pv)
    with torch.inference_mode():
        ms = round_robin(fns, repeats=args.repeats, warmup=2)
    print(f"{device_name()}, {torch.get_num_threads()} threads, shape {'x'.join(map(str, args.shape))}, "
          f"median of {args.repeats}")
    print("| " + " | ".join(ms) + " |\n|" + "---|" * len(ms) + "\n| " + " | ".join(f"{v:.1f}" for v in ms.values()) + " |")


if __name__ == "__main__":
    main()
