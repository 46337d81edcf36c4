"""Fit one detector variant (float student, no plan) and report each branch's detection.

The experiments behind the README's "tried" list: every figure there that names a setting was
measured with this script on a `raad make-data` category, e.g.

    python studies/raad_variant.py demo_out/data/weave lr=1e-3 steps=150 --seed 1

``key=value`` pairs set ModelConfig or FitOptions fields (Python literals: ``target_blocks=(3,4)``).
Prints one JSON line: fit seconds and, for the student map, the autoencoder map and both
combined, image AUROC, pixel AUROC, AU-PRO and the image AUROC per defect type.
"""

from __future__ import annotations

import argparse
import ast
import json
import time

from raad import data as D
from raad.model import ModelConfig
from raad.score import evaluate
from raad.train import FitOptions, prepare, train_float


def apply_overrides(pairs, cfg: ModelConfig, opts: FitOptions) -> dict:
    """``key=value`` strings onto the ModelConfig / FitOptions fields of that name."""
    done = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise SystemExit(f"override {pair!r}: expected key=value")
        target = cfg if key in ModelConfig.__dataclass_fields__ else opts
        if key not in type(target).__dataclass_fields__:
            known = sorted(ModelConfig.__dataclass_fields__) + sorted(FitOptions.__dataclass_fields__)
            raise SystemExit(f"override {key!r}: not a ModelConfig or FitOptions field; known: {known}")
        current = getattr(target, key)
        value = text if isinstance(current, str) else ast.literal_eval(text)
        setattr(target, key, type(current)(value) if current is not None else value)
        done[key] = getattr(target, key)
    return done


class _Branch:
    """The detector seen through one branch (what `evaluate` calls)."""

    def __init__(self, det, branch):
        self.det, self.branch, self.cfg = det, branch, det.cfg

    def __call__(self, x):
        return self.det(x, branch=self.branch)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("category", help="a category folder in the MVTec layout")
    ap.add_argument("overrides", nargs="*", help="ModelConfig / FitOptions field=value")
    ap.add_argument("--seed", type=int, default=0, help="training seed (FitOptions.seed)")
    args = ap.parse_args(argv)
    cfg, opts = ModelConfig(), FitOptions(avg_bits=16, seed=args.seed)
    set_ = apply_overrides(args.overrides, cfg, opts)
    t0 = time.perf_counter()
    prep = prepare(args.category, cfg, opts, show=False)
    train_float(prep, opts, show=False)
    out = {"category": prep.category, "seed": opts.seed, "overrides": set_,
           "fit_s": round(time.perf_counter() - t0, 1)}
    category = D.validate(args.category)
    branches = (("student", "autoencoder", "both") if prep.det.ae is not None else ("student", "both")) + (
        ("memory",) if prep.det.memory is not None else ())
    for branch in branches:  # evaluate() runs without autograd
        r = evaluate(_Branch(prep.det, branch), category, show=False)[0]
        out[branch] = {"image_auroc": round(r["image_auroc"], 3), "pixel_auroc": round(r["pixel_auroc"], 3),
                       "aupro": round(r["aupro"], 3),
                       **{d: round(v["image_auroc"], 3) for d, v in r["per_defect"].items()}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
