"""`raad ablate`: on the same data and the same float student, compare fp32, uniform int8,
int4 and int2, the HQS plan and a random plan at the same average bits (4, and 3, where some
layers must take int2), each with and without stage 2, and the PatchCore-style baseline (:mod:`raad.baseline`) on the same images at the same
resolution. Writes ablation.md, ablation.json and ablation.png."""

from __future__ import annotations

import copy
import random
from pathlib import Path

from . import data as D
from . import hqs
from .checkpoint import save_json
from .io import atomic_path, atomic_write_text
from .model import ModelConfig
from .score import evaluate
from .train import (FitOptions, deployment_plan, discrepancy_weights, hqs_plan, prepare, quantize_and_finetune,
                    train_float)

KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")


def random_plan(names, avg_bits: float, seed: int, choices=hqs.BIT_CHOICES) -> dict:
    """Random bits with the same total as the HQS allocation can reach under ``avg_bits``."""
    rng = random.Random(seed)
    budget = int(avg_bits * len(names))
    while True:
        bits = [rng.choice(choices) for _ in names]
        if sum(bits) <= budget and sum(bits) >= budget - 2:
            return {"version": 1, "avg_bits": avg_bits,
                    "layers": {n: {"qk_bits": b, "pv_bits": 8} for n, b in zip(names, bits)}}


def uniform_plan(names, bits: int) -> dict:
    return {"version": 1, "avg_bits": float(bits),
            "layers": {n: {"qk_bits": bits, "pv_bits": 8} for n in names}}


def baseline(category, image_size: int, seed: int = 0, show=True) -> dict:
    """The PatchCore-style baseline (:mod:`raad.baseline`) fitted on all of the category's
    training images at the detector's resolution, scored on its test set."""
    from .baseline import PatchCore
    from .train import load_images
    pc = PatchCore(image_size, seed=seed).fit(load_images(list(category.train), image_size, show))
    return evaluate(pc, category, show=show)[0]


def ablate_category(category_dir, cfg: ModelConfig, opts: FitOptions, show=True) -> dict:
    prep = prepare(category_dir, cfg, opts, show)
    train_float(prep, opts, show)
    test = D.validate(category_dir)
    base = prep.det
    rows = {"fp32": evaluate(base, test, show=show)[0], "patchcore": baseline(test, cfg.image_size, opts.seed, show)}
    weights = discrepancy_weights(base, prep.stems, prep.targets)
    names = base.attention_modules()
    hqs_opts = copy.copy(opts)
    hqs_opts.avg_bits, hqs_opts.budget = 4.0, None
    hqs4, scores, _ = hqs_plan(prep, hqs_opts, show)
    # at 3 average bits some layers must take int2, where quantization does damage: which ones
    # is what HQS decides, against a random choice at the same budget
    plans = {
        "int8": uniform_plan(names, 8),
        "int4": uniform_plan(names, 4),
        "int2": uniform_plan(names, 2),
        "HQS@4": hqs4,
        "random@4": random_plan(names, 4.0, opts.seed),
        "HQS@3": deployment_plan(hqs.make_plan(scores, 3.0), hqs_opts),
        "random@3": random_plan(names, 3.0, opts.seed),
    }
    for label, plan in plans.items():
        for stage2 in (False, True):
            det = copy.deepcopy(base)
            prep.det = det
            quantize_and_finetune(prep, det, plan, opts, stage2=stage2, weights=weights, show=show)
            res = evaluate(det, test, show=show)[0]
            res["bits"] = {n: e["qk_bits"] for n, e in plan["layers"].items()}
            rows[f"{label}{' +stage2' if stage2 else ''}"] = res
    prep.det = base
    return rows


def ablate(data_dir, out_dir, cfg: ModelConfig, opts: FitOptions, show=True) -> dict:
    opts.check()
    out = Path(out_dir)
    results = {d.name: ablate_category(d, cfg, opts, show) for d in D.category_dirs(data_dir)}
    table = format_table(results)
    print(table)
    save_json(out / "ablation.json", {c: {k: {m: r.get(m) for m in KEYS + ("bits",)} for k, r in rows.items()}
                                      for c, rows in results.items()})
    atomic_write_text(out / "ablation.md", table + "\n")
    plot(results, out / "ablation.png")
    return results


def _f(x):
    return "n/a" if x is None else f"{x:.3f}"


def format_table(results) -> str:
    lines = ["| category | setting | image AUROC | pixel AUROC | AU-PRO | F1-max |", "|---|---|---|---|---|---|"]
    for c, rows in results.items():
        for k, r in rows.items():
            lines.append(f"| {c} | {k} | " + " | ".join(_f(r.get(m)) for m in KEYS) + " |")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cats = list(results)
    settings = list(next(iter(results.values())))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, metric in zip(axes, ("image_auroc", "aupro")):
        width = 0.8 / max(1, len(cats))
        for i, c in enumerate(cats):
            vals = [results[c][s].get(metric) or 0.0 for s in settings]
            ax.bar([j + i * width for j in range(len(settings))], vals, width, label=c)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(settings))])
        ax.set_xticklabels(settings, rotation=40, ha="right", fontsize=8)
        ax.set_title(metric.replace("_", " "))
        ax.set_ylim(0.5, 1.0)
        ax.grid(axis="y", alpha=0.3)
    # beside the plots, not on them (inside, it hid the last settings' bars)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png", bbox_inches="tight")
    plt.close(fig)
