"""`raad demo` / `make demo`: synthetic data → fit (HQS plan at 4 average bits) → score in fp32
and with the plan → benchmark → a table and a markdown report with heatmaps."""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import data as D
from .checkpoint import save_json
from .io import atomic_write_text
from .model import ModelConfig
from .score import bench, score
from .train import FitOptions, fit

#: every synthetic category (two textures, two objects): the demo shows where the detector is
#: weak as well as where it is strong
DEMO_CATEGORIES = tuple(D.SYNTHETIC_CATEGORIES)
#: the demo fits at 128 px (the synthetic images' own size) to finish in a few minutes on 2
#: cores; `raad fit` defaults to 256 px
DEMO_IMAGE_SIZE = 128


def demo(out="demo_out", steps=None, categories=None, quiet=False) -> dict:
    t0 = time.perf_counter()
    out = Path(out)
    show = not quiet
    cats = list(categories or DEMO_CATEGORIES)
    data_dir = out / "data"
    if not all((data_dir / c).is_dir() for c in cats):
        print(f"[1/4] generating synthetic categories {cats} in {data_dir}")
        D.make_synthetic(data_dir, categories=cats, seed=0, overwrite=True)
    cfg = ModelConfig(image_size=DEMO_IMAGE_SIZE)
    # no compiled parts: compiling each part for each batch shape, in each of the fit, the
    # scoring and the bench, took the 4-category demo from 4 to 8.5 minutes on 2 cores
    opts = FitOptions(steps=steps or FitOptions.steps, compile=False)
    print(f"[2/4] fitting at {cfg.image_size} px ({opts.steps} steps, the fastest plan on this CPU "
          f"within {opts.max_damage:g} damage, no part compiled: `raad fit` may compile them)")
    fits = fit(data_dir, out / "run", cfg, opts, show=show)
    print("[3/4] scoring in fp32 and with the plan")
    rows = {}
    for precision in ("fp32", "plan"):
        # one category at a time, so each has its own folder even when there is only one
        rows[precision] = {c: score(out / "run" / c, data_dir / c, out / f"scores_{precision}" / c,
                                    precision=precision, show=show)[c] for c in cats}
    print("[4/4] benchmarking")
    speed = {c: bench(out / "run" / c, data_dir=data_dir / c) for c in cats}
    table = _table(cats, rows, speed)
    print()
    print(table)
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; report: {out / 'REPORT.md'}")
    report = ["# RAAD demo\n", table, "",
              "Plans, chosen by speed measured on this machine (Q·Kᵀ/P·V bits per student attention "
              "layer, 16/16 = float; the parts under bf16 autocast; the linears at int8 or float):", ""]
    for c in cats:
        plan = json.loads((out / "run" / c / "plan.json").read_text())
        bits = ", ".join(f"{n.split('.')[-2]}: {e['qk_bits']}/{e['pv_bits']}" for n, e in plan["layers"].items())
        bf16 = ", ".join((plan.get("autocast") or {}).get("modules", [])) or "none"
        report.append(f"- {c}: {bits}; bf16: {bf16}; linears {'int8' if plan.get('linears') else 'float'}")
    report += ["", "Heatmaps with the plan, the first test image of each kind (the defect's outline drawn "
               "on it); every image: " + ", ".join(f"[{c}](scores_plan/{c}/report.md)" for c in cats), ""]
    for c in cats:
        report += [f"**{c}**", "", *_examples(out / "scores_plan" / c / "overlays", f"scores_plan/{c}/overlays"), ""]
    atomic_write_text(out / "REPORT.md", "\n".join(report))
    save_json(out / "demo.json", {"fits": {c: {k: v for k, v in f.items() if not k.endswith("_log")}
                                           for c, f in fits.items()},
                                  "bench": speed, "metrics": {p: {c: _core(r) for c, r in rs.items()}
                                                              for p, rs in rows.items()}})
    return {"metrics": rows, "bench": speed}


def _examples(folder: Path, rel: str) -> list[str]:
    """A one-row markdown table: the first overlay of each kind (``<kind>__<n>.png``)."""
    first = {}
    for p in sorted(folder.glob("*.png")):
        first.setdefault(p.name.split("__")[0], p.name)
    if not first:
        return []
    return ["| " + " | ".join(first) + " |", "|" + "---|" * len(first),
            "| " + " | ".join(f"![{k}]({rel}/{n})" for k, n in first.items()) + " |"]


def _core(r):
    return {k: r[k] for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max")}


def _f(x):
    return "n/a" if x is None else f"{x:.3f}"


def _table(cats, rows, speed) -> str:
    lines = ["| category | precision | image AUROC | pixel AUROC | AU-PRO | images/s |",
             "|---|---|---|---|---|---|"]
    for c in cats:
        for p in ("fp32", "plan"):
            r = rows[p][c]
            ips = speed[c]["fp32_images_per_s" if p == "fp32" else "plan_images_per_s"]
            lines.append(f"| {c} | {p} | {_f(r['image_auroc'])} | {_f(r['pixel_auroc'])} | "
                         f"{_f(r['aupro'])} | {ips:.2f} |")
    lines.append("")
    for c in cats:
        b = speed[c]
        part = (f" (its attention alone, everything else fp32: {b['attention_only_speedup']:.2f}x)"
                if "attention_only_speedup" in b else "")
        lo, hi = b["speedup_p10_p90"]
        lines.append(f"- {c}: plan {b['speedup']:.2f}x fp32 images/s (rounds {lo:.2f}-{hi:.2f}x){part}")
    if any(speed[c].get("cpu_int8_dot") is False for c in cats):
        from .score import NO_INT8_DOT_NOTE
        lines.append(f"- note: {NO_INT8_DOT_NOTE}")
    return "\n".join(lines)
