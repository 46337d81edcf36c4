"""CPU backend speed against ``torch.nn.functional.scaled_dot_product_attention`` (docs/design.md,
"Performance protocol"): ratios measured side by side in one process, on the same inputs and the
same thread count (``torch.get_num_threads()``), median of >= 10 timed runs after warm-up, two
input sets alternated.

pytest-benchmark (absolute times, one group per shape):

    .venv/bin/python -m pytest benchmarks/test_bench_cpu.py --benchmark-only

The ratio table (the README's; one command, prints markdown):

    .venv/bin/python -m benchmarks.test_bench_cpu            # or: python benchmarks/test_bench_cpu.py
    .venv/bin/python -m benchmarks.test_bench_cpu --rounds 15 --threads 2 --logit-std 1.0

The per-bit-width table (RAAD student shapes; each qk_bits at pv_bits=8 through the public API
against SDPA fp32, all timed round-robin in one loop):

    .venv/bin/python -m benchmarks.test_bench_cpu --qk-sweep --rounds 15
    .venv/bin/python -m benchmarks.test_bench_cpu --qk-sweep --rounds 9 --threads 1 --cpu-time   # loaded machine

Targets (issue 3; geometric means over the four shapes): int8 >= 2.5× SDPA fp32, int8 >= 1.2×
SDPA bf16, the three maps add <= 15 % to the plain call, int4 and int2 at most 10 % slower than
int8. benchmarks/CPU_NOTES.md gives this CPU's ceilings, which bound what is reachable.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from raad_kernels.testing import make_qkv

#: The shapes of docs/design.md (B, H, N, D): ViT-S/16 at 224 px, at 448 px, patch-8 at 256 px, and N = 4097.
SHAPES = [(8, 6, 197, 64), (4, 6, 785, 64), (1, 12, 1025, 64), (1, 6, 4097, 64)]
MAPS = ["cls", "received", "entropy"]


def _cpu():
    from raad_kernels import _cpu
    if not hasattr(_cpu, "attention"):
        raise RuntimeError("raad_kernels._cpu has no attention kernel: build it first")
    return _cpu


def variants(inputs):
    """name -> callable(i) running on input set i. All take the same fp32 inputs; SDPA bf16 its
    bf16 copies (made once, outside the timing)."""
    ext = _cpu()
    bf = [tuple(t.to(torch.bfloat16) for t in x) for x in inputs]

    def ours(bits, pv=8, maps=()):
        maps = list(maps)
        return lambda i: ext.attention(*inputs[i], bits, pv, None, None, True, None, maps, None, None)

    return {
        "sdpa_fp32": lambda i: F.scaled_dot_product_attention(*inputs[i]),
        "sdpa_bf16": lambda i: F.scaled_dot_product_attention(*bf[i]),
        "int8": ours(8),
        "int8+maps": ours(8, maps=MAPS),
        "int4": ours(4),
        "int2": ours(2),
        "int8/pv16": ours(8, 16),
    }


def make_inputs(shape, sets=2, logit_std=3.0):
    b, h, n, d = shape
    return [make_qkv(b, h, n, d, seed=s, logit_std=logit_std) for s in range(sets)]


def round_robin(fns, rounds=10, warmup=2, clock=time.perf_counter):
    """Median time of each ``fns[name](input_set)``, all timed in the same loop (round-robin),
    alternating the two input sets."""
    for _ in range(warmup):
        for f in fns.values():
            f(0)
            f(1)
    times = {k: [] for k in fns}
    for r in range(rounds):
        for name, f in fns.items():
            t0 = clock()
            f(r % 2)
            times[name].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def time_side_by_side(shape, rounds=10, warmup=2, logit_std=3.0):
    """Median seconds of each variant, all timed in the same loop (round-robin)."""
    return round_robin(variants(make_inputs(shape, logit_std=logit_std)), rounds, warmup)


def geomean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def ratio_table(rounds=10, shapes=SHAPES, logit_std=3.0, out=print):
    """Markdown table of speed ratios per shape plus geometric means; returns the ratios."""
    caps = _cpu().capabilities()
    rows, ratios = [], {k: [] for k in ("fp32", "bf16", "maps", "int4", "int2")}
    for shape in shapes:
        t = time_side_by_side(shape, rounds=rounds, logit_std=logit_std)
        r = {
            "fp32": t["sdpa_fp32"] / t["int8"],
            "bf16": t["sdpa_bf16"] / t["int8"],
            "maps": t["int8+maps"] / t["int8"] - 1.0,
            "int4": t["int4"] / t["int8"] - 1.0,
            "int2": t["int2"] / t["int8"] - 1.0,
        }
        for k in ratios:
            ratios[k].append(r[k] if k in ("fp32", "bf16") else 1.0 + r[k])
        b, h, n, d = shape
        rows.append(f"| {b}×{h}×{n}×{d} | {t['sdpa_fp32'] * 1e3:.1f} | {t['sdpa_bf16'] * 1e3:.1f} | "
                    f"{t['int8'] * 1e3:.1f} | **{r['fp32']:.2f}×** | **{r['bf16']:.2f}×** | "
                    f"{r['maps'] * 100:+.0f} % | {r['int4'] * 100:+.0f} % | {r['int2'] * 100:+.0f} % | "
                    f"{t['int8/pv16'] * 1e3:.1f} |")
    g = {k: geomean(v) for k, v in ratios.items()}
    ok = lambda cond: "met" if cond else "NOT met"
    out(f"CPU backend vs SDPA — kernels: {caps['kernel_isa']}, {torch.get_num_threads()} threads, "
        f"median of {rounds} runs, realistic inputs (make_qkv, logit_std={logit_std})\n")
    out("| B×H×N×D | SDPA fp32 ms | SDPA bf16 ms | int8 ms | int8 vs SDPA fp32 | int8 vs SDPA bf16 | "
        "+ maps | int4 vs int8 | int2 vs int8 | int8/pv16 ms |")
    out("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        out(row)
    out(f"| **geomean** | | | | **{g['fp32']:.2f}×** | **{g['bf16']:.2f}×** | {100 * (g['maps'] - 1):+.0f} % | "
        f"{100 * (g['int4'] - 1):+.0f} % | {100 * (g['int2'] - 1):+.0f} % | |")
    out("")
    out(f"Targets: int8 ≥ 2.5× SDPA fp32: {ok(g['fp32'] >= 2.5)}; int8 ≥ 1.2× SDPA bf16: {ok(g['bf16'] >= 1.2)}; "
        f"maps ≤ +15 %: {ok(g['maps'] <= 1.15)}; int4 ≤ +10 %: {ok(g['int4'] <= 1.10)}; "
        f"int2 ≤ +10 %: {ok(g['int2'] <= 1.10)}  (time ratios: + = slower)")
    return g


# --------------------------------------------------------------------------------------------
# pytest-benchmark
# --------------------------------------------------------------------------------------------

_CACHE = {}


def _inputs(shape):
    if shape not in _CACHE:
        _CACHE.clear()  # keep one shape's inputs alive at a time
        _CACHE[shape] = variants(make_inputs(shape))
    return _CACHE[shape]


@pytest.mark.parametrize("name", ["sdpa_fp32", "sdpa_bf16", "int8", "int8+maps", "int4", "int2", "int8/pv16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_attention_speed(benchmark, shape, name):
    fns = _inputs(shape)
    benchmark.group = "x".join(map(str, shape))
    benchmark.extra_info["threads"] = torch.get_num_threads()
    state = {"i": 0}

    def step():
        state["i"] ^= 1
        fns[name](state["i"])

    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=2)


#: RAAD student shapes (B, H, N, D) of the per-bit-width sweep.
SWEEP_SHAPES = [(8, 2, 1025, 64), (8, 2, 257, 64), (8, 2, 1025, 32)]


def qk_sweep(rounds=15, shapes=SWEEP_SHAPES, logit_std=3.0, warmup=2, cpu_time=False, out=print):
    """SDPA fp32 time / kernel time for qk_bits 8, 4, 2 at pv_bits 8 (``rk.quant_attention``,
    backend "cpu"), timed round-robin in one loop on two alternated input sets; medians.
    ``cpu_time``: the calling thread's CPU time instead of wall time (one thread only: then all
    the work of both runs in the calling thread, and time the machine gives other jobs is not
    counted)."""
    import raad_kernels as rk
    if cpu_time and torch.get_num_threads() != 1:
        raise ValueError("cpu_time needs one thread (--threads 1)")
    clock = time.thread_time if cpu_time else time.perf_counter
    caps = _cpu().capabilities()
    out(f"qk sweep vs SDPA fp32 — kernels: {caps['kernel_isa']}, {torch.get_num_threads()} threads, "
        f"median of {rounds} runs of {'thread CPU time' if cpu_time else 'wall time'}, "
        f"make_qkv(logit_std={logit_std})\n")
    out("| B×H×N×D | SDPA fp32 ms | int8/pv8 | int4/pv8 | int2/pv8 |")
    out("|---|---|---|---|---|")
    res = {}
    for shape in shapes:
        inputs = make_inputs(shape, logit_std=logit_std)
        fns = {"sdpa": lambda i: F.scaled_dot_product_attention(*inputs[i])}
        for bits in (8, 4, 2):
            fns[bits] = (lambda b: lambda i: rk.quant_attention(*inputs[i], qk_bits=b, pv_bits=8, backend="cpu"))(bits)
        med = round_robin(fns, rounds, warmup, clock)
        res[shape] = {b: med["sdpa"] / med[b] for b in (8, 4, 2)}
        b, h, n, d = shape
        out(f"| {b}×{h}×{n}×{d} | {med['sdpa'] * 1e3:.1f} | " +
            " | ".join(f"**{res[shape][bits]:.2f}×** ({med[bits] * 1e3:.1f} ms)" for bits in (8, 4, 2)) + " |")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)")
    ap.add_argument("--logit-std", type=float, default=3.0,
                    help="softmax temperature of the inputs (3: realistic ViT; 1: flat attention)")
    ap.add_argument("--shapes", default=None, help="indices into SHAPES (or SWEEP_SHAPES), e.g. 0,1")
    ap.add_argument("--qk-sweep", action="store_true",
                    help="qk_bits 8/4/2 at pv_bits 8 vs SDPA fp32 on the RAAD student shapes")
    ap.add_argument("--cpu-time", action="store_true",
                    help="with --qk-sweep and --threads 1: time thread CPU time, not wall time")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.qk_sweep:
        shapes = SWEEP_SHAPES if args.shapes is None else [SWEEP_SHAPES[int(i)] for i in args.shapes.split(",")]
        qk_sweep(rounds=args.rounds, shapes=shapes, logit_std=args.logit_std, cpu_time=args.cpu_time)
        return
    shapes = SHAPES if args.shapes is None else [SHAPES[int(i)] for i in args.shapes.split(",")]
    ratio_table(rounds=args.rounds, shapes=shapes, logit_std=args.logit_std)


if __name__ == "__main__":
    main()
