"""Ahead-of-time compile of every kernel variant for real GPU targets, with no GPU present.

The interpreter accepts code the compiler rejects (constexpr reassignment, dot shapes, dtype
rules), so the CPU test suite also compiles the kernels to cubin for sm_86 (RTX 30xx) and
sm_90 (H100/H200) through ``triton.compile`` — Triton bundles ``ptxas``. Run as a script (in
a process *without* ``TRITON_INTERPRET=1``)::

    python -m raad_kernels.triton._aot [--arch 86,90] [--quick]

It prints one line per variant with the registers/spills/shared memory the compiler reports.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    raise RuntimeError("raad_kernels.triton._aot must run without TRITON_INTERPRET=1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from . import flash, quantize  # noqa: E402


def _sig(fn, types: dict, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = types.get(name, "i32")
    return sig


def _compile(fn, types, constexprs, arch, num_warps=4, num_stages=2):
    src = ASTSource(fn, _sig(fn, types, constexprs), constexprs=constexprs)
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    md = k.metadata
    return {"shared": md.shared, "regs": getattr(k, "n_regs", None), "spills": getattr(k, "n_spills", None)}


def _ptr(dtype):
    return "*" + dtype


def fwd_variants(quick=False):
    dims = [(32, 32), (64, 64), (128, 128), (256, 256)] if not quick else [(64, 64), (256, 256)]
    for (dpt, dvp), qk, pv, in_dt in itertools.product(
            dims, (8, 4, 2), (8, 16), ("fp16", "bf16", "fp32")):
        if quick and in_dt == "fp32" and qk != 8:
            continue
        yield dict(dpt=dpt, dvp=dvp, qk=qk, pv=pv, dt=in_dt)


def compile_fwd(v, arch, capability, maps=True, mask="bool"):
    dpt, dvp, qk, pv, dt = v["dpt"], v["dvp"], v["qk"], v["pv"], v["dt"]
    bm, bn, nw, ns = flash._gpu_blocks(dpt, dvp, pv, capability)
    types = {
        "Qc": "*i8", "Qs": "*fp32", "Kc": "*i8", "Ks": "*fp32",
        "V": "*i8" if pv == 8 else _ptr(dt), "Vs": "*fp32", "Vm": "*fp32",
        "Mask": "*i8" if mask == "bool" else "*fp32", "Out": _ptr(dt), "Lse": "*fp32",
        "Cls": "*fp32", "Ent": "*fp32", "qk_scale": "fp32",
    }
    cx = dict(QK_BITS=qk, PV_BITS=pv, DPT=dpt, D_EFF=dpt if qk != 2 else max(16, dpt // 2),
              DVP=dvp, HAS_MASK=mask is not None, MASK_BOOL=mask == "bool",
              PV_BF16=dt == "bf16", INTERP=False, WRITE_LSE=maps, WRITE_CLS=maps,
              WRITE_ENT=maps, BLOCK_M=bm, BLOCK_N=bn)
    r = _compile(flash._attn_fwd_kernel, types, cx, arch, nw, ns)
    types_r = {"Qc": "*i8", "Qs": "*fp32", "Kc": "*i8", "Ks": "*fp32", "Mask": types["Mask"],
               "Lse": "*fp32", "Recv": "*fp32", "qk_scale": "fp32"}
    cr = dict(QK_BITS=qk, DPT=dpt, D_EFF=cx["D_EFF"], HAS_MASK=cx["HAS_MASK"],
              MASK_BOOL=cx["MASK_BOOL"], BLOCK_M=bn, BLOCK_N=bm)
    if maps:
        rr = _compile(flash._attn_received_kernel, types_r, cr, arch, nw, ns)
        r["received_regs"] = rr["regs"]
        r["received_spills"] = rr["spills"]
    return (bm, bn, nw, ns), r


def compile_quant(bits, dpt, arch, dt="fp16"):
    d_eff = dpt if dpt > 16 else 16
    types = {"Q": _ptr(dt), "K": _ptr(dt), "Km": "*fp32", "Qc": "*i8" if bits == 8 else "*u8",
             "Kc": "*i8" if bits == 8 else "*u8", "Qs": "*fp32", "Ks": "*fp32", "Grid": "*fp32"}
    cx = dict(BITS=bits, HAS_MEAN=True, LOG2_ROT=int(math.log2(d_eff)) if bits != 8 else 0,
              RSQRT=1.0 / math.sqrt(d_eff), D_EFF=d_eff, DPT=dpt,
              NGRID=8, BLOCK_R=quantize._row_block(dpt), HAS_Q=True)
    r = _compile(quantize._quant_qk_kernel, types, cx, arch)
    types_s = {"K": _ptr(dt), "Km": "*fp32", "V": _ptr(dt), "Vc": "*i8", "Vs": "*fp32", "Vm": "*fp32"}
    cs = dict(HAS_K=True, HAS_V=True, DVP=dpt, BLOCK_N=64, BLOCK_D=min(64, dpt))
    _compile(quantize._column_stats_kernel, types_s, cs, arch)
    return r


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="86,90")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    ok = True
    for arch in (int(x) for x in a.arch.split(",")):
        cap = (arch // 10, arch % 10)
        for bits, dpt in itertools.product((8, 4, 2), (32, 64, 128, 256) if not a.quick else (64, 256)):
            t = time.time()
            try:
                r = compile_quant(bits, dpt, arch)
                print(f"sm_{arch} quant bits={bits} DPT={dpt}: {r} {time.time() - t:.1f}s", flush=True)
            except Exception as e:  # report every failing variant, then fail
                ok = False
                print(f"sm_{arch} quant bits={bits} DPT={dpt}: FAILED {type(e).__name__}: {e}", flush=True)
        for v in fwd_variants(a.quick):
            t = time.time()
            try:
                cfg, r = compile_fwd(v, arch, cap)
                print(f"sm_{arch} fwd {v} cfg={cfg}: {r} {time.time() - t:.1f}s", flush=True)
            except Exception as e:
                ok = False
                print(f"sm_{arch} fwd {v}: FAILED {type(e).__name__}: {str(e)[:2000]}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
