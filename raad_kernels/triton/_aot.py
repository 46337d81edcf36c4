"""Ahead-of-time compile of every kernel variant for real GPU targets, with no GPU present.

The interpreter accepts code the compiler rejects (constexpr reassignment, dot shapes, dtype
rules), so the CPU test suite also compiles the kernels to cubin for sm_86 (RTX 30xx) and
sm_90 (H100/H200) through ``triton.compile`` — Triton bundles ``ptxas``. Run as a script (in
a process *without* ``TRITON_INTERPRET=1``)::

    python -m raad_kernels.triton._aot [--arch 86,90] [--quick]

It prints one line per variant (all maps requested; a key-padding mask "keys" or a general
(Nq, Nk) boolean mask "bool") with the registers / spill stack / shared memory of the cubin,
and a WARNING line for each variant that spills registers.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import re
import subprocess
import sys
import tempfile
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


#: Integer arguments Triton's launcher would typically specialize as 1 (unit inner strides)
#: or see as multiples of 16 (outer strides of contiguous (B, H, N, D) tensors with D % 16 == 0).
_ONE = {"svd", "sod", "smn", "sqd", "skd"}
_DIV16 = {"svb", "svh", "svn", "sob", "soh", "som", "sqb", "sqh", "sqn", "skb", "skh", "skn",
          # workspace offsets: sections start on 128-byte boundaries (flash.layout)
          "OFF_KS", "OFF_VC", "OFF_VS", "OFF_VM", "OFF_VSUM", "OFF_QC", "OFF_QS", "OFF_LSE", "CHUNK"}


def _compile(fn, types, constexprs, arch, num_warps=4, num_stages=2):
    """As the JIT would at launch: pointers 16-byte aligned, unit strides specialized to 1,
    outer strides divisible by 16 (this is what lets loads vectorize and pipeline)."""
    constexprs = dict(constexprs)
    for name in fn.arg_names:
        if name in _ONE and name not in constexprs:
            constexprs[name] = 1
    sig = _sig(fn, types, constexprs)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name].startswith("*") or name in _DIV16}
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    return {"shared": k.metadata.shared, **_cubin_stats(k.asm["cubin"])}


def _cubin_stats(cubin: bytes) -> dict:
    """Registers and spill bytes of the cubin Triton built (cuobjdump -res-usage)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    return {"regs": int(regs.group(1)) if regs else None,
            "stack": int(stack.group(1)) if stack else None,
            "local": int(local.group(1)) if local else None}


def _ptxas_stats(ptx: str, arch: int) -> dict:
    """Registers and spill bytes as ptxas reports them (-v) for the kernel's PTX."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-v", f"-arch=sm_{arch}{suffix}", src, "-o", os.path.join(d, "k.o")],
                           capture_output=True, text=True)
    text = r.stdout + r.stderr
    regs = re.search(r"Used (\d+) registers", text)
    st = re.search(r"(\d+) bytes spill stores", text)
    return {"regs": int(regs.group(1)) if regs else None, "spill_bytes": int(st.group(1)) if st else None}


def _ptr(dtype):
    return "*" + dtype


#: Largest shared memory one block may use (opt-in), bytes.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def fwd_variants(quick=False, dims=None):
    if dims is None:
        dims = [32, 64, 128, 256] if not quick else [64, 128, 256]
    dims = [(d, d) for d in dims]
    for (dpt, dvp), qk, pv, in_dt in itertools.product(
            dims, (8, 4, 2), (8, 16), ("fp16", "bf16", "fp32")):
        if quick and in_dt == "fp32" and qk != 8:
            continue
        yield dict(dpt=dpt, dvp=dvp, qk=qk, pv=pv, dt=in_dt)


def compile_fwd(v, arch, capability, maps=True, mask="bool", cfg=None, received=True):
    dpt, dvp, qk, pv, dt = v["dpt"], v["dvp"], v["qk"], v["pv"], v["dt"]
    bm, bn, nw, ns = cfg or flash._gpu_blocks(dpt, dvp, pv, capability, mask == "bool")
    types = {
        "Q": _ptr(dt), "W": "*i8", "V": _ptr(dt), "Grid": "*fp32",
        "Mask": "*i8" if mask in ("bool", "keys") else "*fp32", "Out": _ptr(dt),
        "Ent": "*fp32", "qk_scale": "fp32",
    }
    d_eff = dpt if qk != 2 else max(16, dpt // 2)  # int2: a padded tail masked on the Q side
    cx = dict(QK_BITS=qk, PV_BITS=pv, DPT=dpt, D_EFF=d_eff, DVP=dvp,
              LOG2_ROT=int(math.log2(d_eff)) if qk != 8 else 0, RSQRT=1.0 / math.sqrt(d_eff),
              NGRID=8, Q_STAGED=qk != 8 or bool(maps), SUB_M=flash._sub_rows(dpt, bm),
              HAS_MASK={None: 0, "keys": 1}.get(mask, 2), MASK_BOOL=mask in ("bool", "keys"),
              PV_BF16=dt == "bf16", INTERP=False, WRITE_LSE=bool(maps),
              WRITE_ENT=maps["entropy"] if isinstance(maps, dict) else maps,
              BLOCK_M=bm, BLOCK_N=bn)
    maps = bool(maps) and received
    r = _compile(flash._attn_fwd_kernel, types, cx, arch, nw, ns)
    types_r = {"W": "*i8", "Mask": types["Mask"], "Cls": "*fp32", "Recv": "*fp32", "qk_scale": "fp32"}
    cr = dict(QK_BITS=qk, DPT=dpt, D_EFF=cx["D_EFF"], HAS_MASK=cx["HAS_MASK"],
              MASK_BOOL=cx["MASK_BOOL"], WRITE_CLS=True, WRITE_RECV=True, BLOCK_M=bn, BLOCK_N=bm)
    if maps:
        rr = _compile(flash._attn_colmaps_kernel, types_r, cr, arch, nw, ns)
        r["received"] = rr
    return (bm, bn, nw, ns), r


def compile_quant(bits, dpt, arch, dt="fp16"):
    d_eff = dpt if dpt > 16 else 16
    types = {"Q": _ptr(dt), "K": _ptr(dt), "Km": "*fp32", "Qc": "*i8" if bits == 8 else "*u8",
             "Kc": "*i8" if bits == 8 else "*u8", "Qs": "*fp32", "Ks": "*fp32", "Grid": "*fp32"}
    cx = dict(BITS=bits, HAS_MEAN=True, LOG2_ROT=int(math.log2(d_eff)) if bits != 8 else 0,
              RSQRT=1.0 / math.sqrt(d_eff), D_EFF=d_eff, DPT=dpt,
              NGRID=8, BLOCK_R=quantize._row_block(dpt), HAS_Q=True)
    r = _compile(quantize._quant_qk_kernel, types, cx, arch)
    types_s = {"K": _ptr(dt), "Km": "*fp32", "V": _ptr(dt), "Vc": "*i8", "Vs": "*fp32", "Vm": "*fp32",
               "Vsum": "*i32"}
    cs = dict(HAS_K=True, HAS_V=True, DVP=dpt, BLOCK_N=64, BLOCK_D=min(64, dpt))
    _compile(quantize._column_stats_kernel, types_s, cs, arch)
    # the K/V preparation of flash.forward (one launch per call)
    types_p = {"K": _ptr(dt), "V": _ptr(dt), "W": "*i8", "Grid": "*fp32"}
    cp = dict(BITS=bits, SMOOTH=True, LOG2_ROT=cx["LOG2_ROT"], RSQRT=cx["RSQRT"], D_EFF=d_eff,
              DPT=dpt, NGRID=8, BLOCK_R=quantize._row_block(dpt), PV8=True, DVP=dpt, BLOCK_N=64,
              BLOCK_D=min(64, dpt))
    r["prep_kv"] = _compile(quantize._prep_kv_kernel, types_p, cp, arch)
    return r


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="86,90")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dims", default=None, help="head-dim tiles, e.g. 64,256")
    a = ap.parse_args(argv)
    ok = True
    for arch in (int(x) for x in a.arch.split(",")):
        cap = (arch // 10, arch % 10)
        qdims = [int(x) for x in a.dims.split(",")] if a.dims else (
            (32, 64, 128, 256) if not a.quick else (64, 256))
        for bits, dpt in itertools.product((8, 4, 2), qdims):
            t = time.time()
            try:
                r = compile_quant(bits, dpt, arch)
                print(f"sm_{arch} quant bits={bits} DPT={dpt}: {r} {time.time() - t:.1f}s", flush=True)
            except Exception as e:  # report every failing variant, then fail
                ok = False
                print(f"sm_{arch} quant bits={bits} DPT={dpt}: FAILED {type(e).__name__}: {e}", flush=True)
        dims = [int(x) for x in a.dims.split(",")] if a.dims else None
        for v, mask in itertools.product(fwd_variants(a.quick, dims), ("keys", "bool")):
            t = time.time()
            v = dict(v, mask=mask)
            try:
                cfg, r = compile_fwd(v, arch, cap, mask=mask)
                print(f"sm_{arch} fwd {v} cfg={cfg}: {r} {time.time() - t:.1f}s", flush=True)
            except Exception as e:
                ok = False
                print(f"sm_{arch} fwd {v}: FAILED {type(e).__name__}: {str(e)[:2000]}", flush=True)
                continue
            for x in (r, r.get("received", {})):
                if x and x["shared"] > SMEM_LIMIT.get(arch, 101376):
                    ok = False
                    print(f"sm_{arch} fwd {v}: ERROR {x['shared']} bytes of shared memory > "
                          f"{SMEM_LIMIT.get(arch, 101376)}", flush=True)
            spills = [x.get("stack") for x in (r, r.get("received", {})) if x.get("stack")]
            if spills:
                print(f"sm_{arch} fwd {v}: WARNING register spills (stack bytes {spills})", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
