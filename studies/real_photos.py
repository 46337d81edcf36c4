"""The real-photo benchmark in one command: build the set, fit the detector on each category,
score it in fp32 and with its plan, fit and score the PatchCore-style baseline on the same
images, and write the tables (per category and per defect type; held-out categories apart).

    python studies/real_photos.py OUT [--categories ...] [raad fit options, e.g. --image-size 128]

OUT/data holds the set (built by ``raad make-data --real`` when missing), OUT/run the fitted
runs, OUT/real_photos.{json,md} the results. Fitting runs are kept: a second call with the same
OUT re-scores them (``--refit`` fits again).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from raad import data as D
from raad import realphoto as R
from raad.baseline import PatchCore
from raad.checkpoint import load_run, save_json
from raad.cli import _fit_opts, _model_cfg, build_parser
from raad.io import atomic_write_text
from raad.score import evaluate
from raad.train import fit_category, load_images

KEYS = ("image_auroc", "pixel_auroc", "aupro")


def baseline_row(cat_dir: Path, image_size: int, show: bool) -> dict:
    cat = D.validate(cat_dir)
    t = time.perf_counter()
    pc = PatchCore(image_size).fit(load_images(list(cat.train), image_size, show))
    fit_s = time.perf_counter() - t
    res = evaluate(pc, cat, show=show)[0]
    res["fit_seconds"] = round(fit_s, 1)
    return res


def run(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--categories", nargs="*", default=None)
    p.add_argument("--data", default=None, help="an existing set (default: OUT/data, built when missing)")
    p.add_argument("--refit", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args, rest = p.parse_known_args(argv)
    # the detector's options are `raad fit`'s, with its defaults
    fit_args = build_parser().parse_args(["fit", "DATA", "--out", "RUN", *rest])
    show = not args.quiet
    out = Path(args.out)
    data = Path(args.data) if args.data else out / "data"
    cats = args.categories or list(R.REAL_CATEGORIES)
    missing = [c for c in cats if not (data / c).is_dir()]
    if missing:
        R.make_real(data, missing, show=show)
    cfg, opts = _model_cfg(fit_args), _fit_opts(fit_args).check()
    results = {}
    for c in cats:
        run_dir = out / "run" / c
        row = {"held_out": R.held_out(c)}
        if args.refit or not (run_dir / "config.json").is_file():
            row["fit"] = {k: v for k, v in fit_category(data / c, run_dir, cfg, opts, show).items()
                          if not k.endswith("_log")}
        else:
            row["fit"] = json.loads((run_dir / "fit_log.json").read_text())
            row["fit"] = {k: v for k, v in row["fit"].items() if not k.endswith("_log")}
        cat = D.validate(data / c)
        for precision in ("fp32", "plan"):
            det = load_run(run_dir, precision=precision)[0]
            row[precision] = evaluate(det, cat, show=show)[0]
        row["patchcore"] = baseline_row(data / c, cfg.image_size, show)
        results[c] = row
        print(f"{c}: " + "  ".join(f"{k} {row[k]['image_auroc']:.3f}/{row[k]['aupro']:.3f}"
                                   for k in ("fp32", "plan", "patchcore")), flush=True)
    torch_threads = torch.get_num_threads()
    report = {"settings": {"model": cfg.to_dict(), "fit": asdict(opts),
                           "threads": torch_threads, "set_version": R.REAL_VERSION},
              "categories": results}
    save_json(out / "real_photos.json", report)
    md = format_tables(results)
    atomic_write_text(out / "real_photos.md", md)
    print(md)
    return report


def _f(x):
    return "n/a" if x is None else f"{x:.3f}"


def format_tables(results: dict) -> str:
    lines = []
    for held in (False, True):
        cats = [c for c, r in results.items() if r["held_out"] == held]
        if not cats:
            continue
        lines += [f"### {'Held-out categories (no choice tuned on them)' if held else 'Categories'}",
                  "", "| category | fit s | fp32 image AUROC / AU-PRO | plan | PatchCore baseline |",
                  "|---|---|---|---|---|"]
        means = {k: [0.0, 0.0] for k in ("fp32", "plan", "patchcore")}
        for c in cats:
            r = results[c]
            cells = []
            for k in means:
                means[k][0] += r[k]["image_auroc"] / len(cats)
                means[k][1] += r[k]["aupro"] / len(cats)
                cells.append(f"{_f(r[k]['image_auroc'])} / {_f(r[k]['aupro'])}")
            lines.append(f"| {c} | {r['fit'].get('seconds', 'n/a')} | " + " | ".join(cells) + " |")
        lines.append("| **mean** | | " + " | ".join(f"**{a:.3f} / {b:.3f}**" for a, b in means.values()) + " |")
        lines.append("")
    lines += ["### Per defect type (image AUROC / AU-PRO: plan | PatchCore)", "",
              "| category | " + " | ".join(sorted(R.DEFECTS)) + " |",
              "|---|" + "---|" * len(R.DEFECTS)]
    for c, r in results.items():
        cells = []
        for d in sorted(R.DEFECTS):
            a, b = r["plan"]["per_defect"].get(d), r["patchcore"]["per_defect"].get(d)
            cells.append("" if a is None else f"{_f(a['image_auroc'])}/{_f(a['aupro'])} \\| "
                                              f"{_f(b['image_auroc'])}/{_f(b['aupro'])}")
        lines.append(f"| {c}{' (held out)' if r['held_out'] else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run(sys.argv[1:])
