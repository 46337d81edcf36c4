#!/usr/bin/env python3
"""GPU speed and accuracy table: raad-kernels' cuda and triton backends against SDPA (flash)
fp16/bf16 and, when importable, SageAttention 1.0.6. Run by benchmarks/gpu_check.sh.

Protocol (docs/design.md, "Performance protocol"): every method is timed in the same loop on the same inputs (interleaved,
one sample per method per round), median of >= 10 timed samples after warm-up, inputs rotated
through several copies when they would sit in L2, torch.cuda.Event timing. Accuracy per row:
cosine and relative L2 of the output against float64 attention on the same inputs.

    python benchmarks/bench_gpu.py --out DIR [--budget SECONDS] [--quick]
        [--tests-junit gpu_tests.xml --speed-table DIR/gpu_speed.json]

Writes DIR/gpu_results.json and DIR/gpu_results.md after every shape, so a run cut short by
its time budget still leaves the rows it finished. With ``--speed-table``, also the speed table
``backend="auto"`` reads (raad_kernels/speed_table.py's format): the shipped table with this
device's entry replaced, from the int8/int8 rows, holding only the backends whose GPU tests
passed in the pytest run whose JUnit XML ``--tests-junit`` names (none without it).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import statistics
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import raad_kernels as rk  # noqa: E402
from raad_kernels.reference import attention_reference  # noqa: E402
from raad_kernels.testing import error  # noqa: E402

# The shapes of docs/design.md (ViT-S/16 at 224 and 448 px, patch-8 at 256 px, N=4097) and N=16385.
SHAPES = [(8, 6, 197), (4, 6, 785), (1, 12, 1025), (1, 12, 4097), (1, 12, 16385)]
HEAD_DIMS = (64, 128)
QUICK_SHAPES = [(8, 6, 197), (1, 12, 4097)]

# (name, backend, qk_bits, pv_bits, maps)
QUANT_METHODS = [
    ("q8p8", 8, 8, False),
    ("q8p16", 8, 16, False),
    ("q4p8", 4, 8, False),
    ("q2p8", 2, 8, False),
    ("q8p8+maps", 8, 8, True),
]


def make_inputs(b, h, n, d, seed, device):
    """raad_kernels.testing.make_qkv's recipe (outlier channels in Q and K, a per-channel K
    offset, logits at a ViT temperature) without its N×N calibration, which would not fit at
    N=16385: the logit spread is measured on a sample of rows and keys."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g).to(device)
    k = torch.randn(b, h, n, d, generator=g).to(device)
    v = torch.randn(b, h, n, d, generator=g).to(device)
    idx = torch.randperm(d, generator=g)[:3].to(device)
    q[..., idx] *= 8.0
    k[..., idx] *= 8.0
    ks = k - k.mean(-2, keepdim=True)
    s = (q[:, :, :256].double() @ ks[:, :, :1024].double().transpose(-1, -2)) / math.sqrt(d)
    q = q * float(3.0 / s.std().item())
    k = k + 4.0 * k.std() * torch.randn(1, h, 1, d, generator=g).to(device)
    return q, k, v


def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def load_sage():
    try:
        import sageattention
        from sageattention import sageattn
    except Exception as e:  # noqa: BLE001 - any import failure means: not available
        return None, None, f"not importable: {type(e).__name__}: {e}"
    version = getattr(sageattention, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as _v
            version = _v("sageattention")
        except Exception:  # noqa: BLE001
            version = "unknown"

    def call(q, k, v):
        try:
            return sageattn(q, k, v, tensor_layout="HND", is_causal=False)
        except TypeError:
            return sageattn(q, k, v, is_causal=False)

    return call, version, None


def time_methods(methods, inputs, reps, warmup, budget_s):
    """Interleaved timing: each round times every method once (``inner`` calls between two
    events, sized so one sample lasts >= ~1 ms). Returns name → list of ms per call."""
    names = list(methods)
    inner = {}
    for name in names:  # warm-up (and compile/autotune), then size the inner loop
        fn = methods[name]
        for i in range(warmup):
            fn(*inputs[i % len(inputs)])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(*inputs[0])
        torch.cuda.synchronize()
        est = (time.perf_counter() - t0) * 1e3
        inner[name] = max(1, min(50, int(math.ceil(1.0 / max(est, 1e-3)))))
    samples = {n: [] for n in names}
    start = time.perf_counter()
    r = 0
    for r in range(reps):
        for name in names:
            fn = methods[name]
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for i in range(inner[name]):
                fn(*inputs[(r * inner[name] + i) % len(inputs)])
            e1.record()
            e1.synchronize()
            samples[name].append(e0.elapsed_time(e1) / inner[name])
        if r + 1 >= 10 and time.perf_counter() - start > budget_s:
            break
    return samples


def run(args):
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 50 << 20) or (50 << 20)
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    sage, sage_version, sage_why = load_sage()
    status = {n: (s.runnable, s.reason) for n, s in rk.backends().items()}
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(dev),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(dev))),
        "sm_count": props.multi_processor_count,
        "l2_bytes": l2,
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "triton": triton_version,
        "sageattention": sage_version,
        "sageattention_note": sage_why,
        "backends": {n: {"runnable": r, "reason": why} for n, (r, why) in status.items()},
        "protocol": "median of >= 10 interleaved samples after warm-up, torch.cuda.Event; accuracy vs float64",
    }
    rows, targets = [], []
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    complete = True
    todo = [(b, h, n, d) for d in HEAD_DIMS for (b, h, n) in shapes]
    for i, (b, h, n, d) in enumerate(todo):
        left = args.budget - (time.perf_counter() - t_start)
        if left < 15:
            complete = False
            rows.append({"shape": [b, h, n, d], "method": "-", "error": "skipped: time budget spent"})
            continue
        # an equal share of what is left for the timing loop (compiles and the float64
        # reference take part of each share too), so every shape gets its turn
        share = (left - 10) / (len(todo) - i)
        shape_rows = bench_shape(b, h, n, d, dev, l2, sage, status, args, max(3.0, min(0.6 * share, 60)))
        rows += shape_rows
        targets += check_targets(shape_rows, (b, h, n, d), sage is not None)
        write(out_dir, meta, rows, targets, complete=False)
        if args.speed_table:  # after every shape too: a run cut short still leaves its table
            write_speed_table(args.speed_table, rows, meta, args.tests_junit)
    write(out_dir, meta, rows, targets, complete=complete)
    print((out_dir / "gpu_results.md").read_text())


def bench_shape(b, h, n, d, dev, l2, sage, status, args, budget_s):
    shape = [b, h, n, d]
    print(f"--- B={b} H={h} N={n} D={d}", flush=True)
    q32, k32, v32 = make_inputs(b, h, n, d, seed=n + d, device=dev)
    ref = attention_reference(q32, k32, v32)[0]
    per_copy = 3 * q32.numel() * 2
    copies = max(1, min(8, math.ceil(2 * l2 / per_copy)))
    ins = {}
    for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        base = (q32.to(dt), k32.to(dt), v32.to(dt))
        ins[name] = [base] + [tuple(t.clone() for t in base) for _ in range(copies - 1)]

    methods, accuracy, errors = {}, {}, {}

    def add(name, fn, dtype="fp16"):
        try:
            o = fn(*ins[dtype][0])
            o = o[0] if isinstance(o, tuple) else o
            torch.cuda.synchronize()
            e = error(o.float(), ref)
            accuracy[name] = (e.cos, e.rel_l2)
            methods[name] = (fn, dtype)
        except Exception as ex:  # noqa: BLE001 - record and go on
            errors[name] = f"{type(ex).__name__}: {ex}".splitlines()[0][:300]
            traceback.print_exc()

    add("sdpa_fp16", sdpa_flash, "fp16")
    add("sdpa_bf16", sdpa_flash, "bf16")
    for backend in ("cuda", "triton"):
        if not status.get(backend, (False, ""))[0]:
            errors[f"{backend}"] = f"backend not runnable: {status.get(backend, (False, '?'))[1]}"
            continue
        for tag, qk, pv, maps in QUANT_METHODS:
            if args.quick and tag not in ("q8p8", "q8p8+maps", "q4p8"):
                continue

            def fn(q, k, v, qk=qk, pv=pv, maps=maps, backend=backend):
                return rk.quant_attention(q, k, v, qk_bits=qk, pv_bits=pv, backend=backend,
                                          return_maps=True if maps else None)
            add(f"{backend}_{tag}", fn, "fp16")
    if sage is not None:
        add("sage_fp16", sage, "fp16")

    # time per input dtype group, all methods interleaved in one loop
    samples = {}
    flat = {name: (lambda *a, fn=fn: fn(*a)) for name, (fn, _) in methods.items()}
    groups = {}
    for name, (_, dt) in methods.items():
        groups.setdefault(dt, []).append(name)
    for dt, names in groups.items():
        try:
            samples.update(time_methods({n: flat[n] for n in names}, ins[dt], args.reps, args.warmup,
                                        budget_s / max(1, len(groups))))
        except Exception as ex:  # noqa: BLE001
            for n in names:
                errors[n] = f"timing failed: {type(ex).__name__}: {ex}"
    base = statistics.median(samples["sdpa_fp16"]) if "sdpa_fp16" in samples else None
    rows = []
    for name in list(methods) + [n for n in errors if n not in methods]:
        row = {"shape": shape, "method": name}
        if name in samples:
            ms = statistics.median(samples[name])
            row.update(ms=ms, samples=len(samples[name]),
                       speedup_vs_sdpa_fp16=(base / ms) if base else None)
        if name in accuracy:
            row.update(cos=accuracy[name][0], rel_l2=accuracy[name][1])
        if name in errors:
            row["error"] = errors[name]
        rows.append(row)
        print(f"  {name:18s} {row.get('ms', float('nan')):9.4f} ms  x{row.get('speedup_vs_sdpa_fp16') or float('nan'):5.2f}"
              f"  cos={row.get('cos', float('nan')):.6f} rel={row.get('rel_l2', float('nan')):.5f} {row.get('error', '')}",
              flush=True)
    ins.clear()  # free the inputs before the next shape (the closures above hold the names)
    ref = None
    torch.cuda.empty_cache()
    return rows


def check_targets(rows, shape, have_sage):
    """The issue's targets, evaluated per shape where they apply."""
    by = {r["method"]: r for r in rows if "ms" in r}
    b, h, n, d = shape
    out = []
    for backend in ("cuda", "triton"):
        m = by.get(f"{backend}_q8p8")
        if m is None or "sdpa_fp16" not in by:
            continue
        sp = m["speedup_vs_sdpa_fp16"]
        if n >= 4097:
            out.append({"shape": list(shape), "target": f"{backend} int8 >= 1.5x SDPA fp16 (N >= 4097)",
                        "value": sp, "met": sp >= 1.5})
        elif n == 1025:
            out.append({"shape": list(shape), "target": f"{backend} int8 >= SDPA fp16 (N = 1025)",
                        "value": sp, "met": sp >= 1.0})
        mm = by.get(f"{backend}_q8p8+maps")
        if mm is not None:
            ov = mm["ms"] / m["ms"] - 1
            out.append({"shape": list(shape), "target": f"{backend} maps add <= 15%", "value": ov, "met": ov <= 0.15})
        s = by.get("sage_fp16")
        if have_sage and s is not None:
            faster = m["ms"] <= s["ms"]
            acc = m.get("rel_l2", 1) <= s.get("rel_l2", 0) * 1.0001
            out.append({"shape": list(shape), "target": f"{backend} int8 >= SageAttention speed at <= its error",
                        "value": s["ms"] / m["ms"], "met": bool(faster and acc)})
    return out


def write(out_dir, meta, rows, targets, complete):
    data = dict(meta, complete=complete, rows=rows, targets=targets)
    (out_dir / "gpu_results.json").write_text(json.dumps(data, indent=1))
    lines = [f"# raad-kernels GPU results ({meta['date']})", "",
             f"Device: {meta['device']} (sm_{meta['capability'].replace('.', '')}, {meta['sm_count']} SMs); "
             f"torch {meta['torch']} (CUDA {meta['cuda_runtime']}), triton {meta['triton']}, "
             f"SageAttention {meta['sageattention'] or 'absent'}"
             + (f" ({meta['sageattention_note']})" if meta.get("sageattention_note") else "") + ".",
             "", f"Protocol: {meta['protocol']}." + ("" if complete else " **Incomplete run.**"), "",
             "| B | H | N | D | method | ms | × SDPA fp16 | cos | rel L2 | note |",
             "|---|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        b, h, n, d = r["shape"]

        def f(key, fmt):
            v = r.get(key)
            return format(v, fmt) if isinstance(v, (int, float)) else ""
        lines.append(f"| {b} | {h} | {n} | {d} | {r['method']} | {f('ms', '.4f')} | {f('speedup_vs_sdpa_fp16', '.2f')} "
                     f"| {f('cos', '.6f')} | {f('rel_l2', '.5f')} | {r.get('error', '')} |")
    if targets:
        lines += ["", "## Targets", "", "| shape | target | value | met |", "|---|---|---:|---|"]
        for t in targets:
            lines.append(f"| {'×'.join(map(str, t['shape']))} | {t['target']} | {t['value']:.3f} | "
                         f"{'yes' if t['met'] else '**no**'} |")
    (out_dir / "gpu_results.md").write_text("\n".join(lines) + "\n")


#: the test file whose GPU run decides whether a backend may enter the speed table
BACKEND_TESTS = {"cuda": "test_cuda_backend", "triton": "test_triton_backend"}


def backends_passed(junit) -> list:
    """Backends whose test file ran (at least one test not skipped) with no failure or error,
    from a pytest JUnit XML file."""
    if junit is None or not Path(junit).exists():
        return []
    ran = {b: 0 for b in BACKEND_TESTS}
    bad = set()
    for case in ET.parse(junit).iter("testcase"):
        parts = (case.get("classname") or "").split(".")
        for backend, module in BACKEND_TESTS.items():
            if module not in parts:
                continue
            if case.find("failure") is not None or case.find("error") is not None:
                bad.add(backend)
            elif case.find("skipped") is None:
                ran[backend] += 1
    return [b for b in BACKEND_TESTS if ran[b] and b not in bad]


def speed_table_from(rows, meta, passed, base) -> dict:
    """The speed table (format 1) with this device's entry from the int8/int8 rows: per shape
    class, each passing backend's geometric-mean time over the class's shapes."""
    from raad_kernels import speed_table as st
    per = {}
    for r in rows:
        backend, _, tag = r["method"].partition("_")
        if tag != "q8p8" or backend not in passed or not isinstance(r.get("ms"), (int, float)):
            continue
        b, h, n, d = r["shape"]
        per.setdefault(st.shape_class(n, d), {}).setdefault(backend, []).append(r["ms"])
    classes = [{"max_tokens": t, "head_dim": d,
                "ms": {b: math.exp(statistics.fmean(math.log(x) for x in xs)) for b, xs in sorted(ms.items())},
                "shapes_measured": max(len(xs) for xs in ms.values())}
               for (t, d), ms in sorted(per.items(), key=lambda kv: (kv[0][0] or 1 << 40, kv[0][1]))]
    data = json.loads(json.dumps(base))
    data.setdefault("format", st.FORMAT)
    data.setdefault("devices", {})
    key = "sm_" + meta["capability"].replace(".", "")
    data["devices"].pop(key, None)
    if classes:
        data["devices"][key] = {"device": meta["device"], "date": meta["date"],
                                "source": "benchmarks/bench_gpu.py (int8/int8 rows, CUDA events)",
                                "tests_passed": list(passed), "classes": classes}
    return st.validate(data, "speed table being written")


def write_speed_table(path, rows, meta, junit):
    from raad_kernels import speed_table as st
    passed = backends_passed(junit)
    base = json.loads(st.TABLE_PATH.read_text()) if st.TABLE_PATH.exists() else {"format": st.FORMAT, "devices": {}}
    data = speed_table_from(rows, meta, passed, base)
    Path(path).write_text(json.dumps(data, indent=1) + "\n")
    print(f"speed table → {path}: backends with passing GPU tests {passed or 'none'}; "
          f"{len(data['devices'].get('sm_' + meta['capability'].replace('.', ''), {}).get('classes', []))} classes")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for gpu_results.json / gpu_results.md")
    ap.add_argument("--budget", type=float, default=200.0, help="seconds for the whole table")
    ap.add_argument("--reps", type=int, default=15, help="timed samples per method (>= 10)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="two shapes, three quantized configs")
    ap.add_argument("--speed-table", default=None, help="write the auto-dispatch speed table here")
    ap.add_argument("--tests-junit", default=None,
                    help="JUnit XML of the GPU test run: which backends may enter the speed table")
    args = ap.parse_args()
    args.reps = max(10, args.reps)
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU")
    run(args)


if __name__ == "__main__":
    main()
