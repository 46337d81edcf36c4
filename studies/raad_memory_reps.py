"""What each of the memory's representations and its whitening bring, inside a fitted detector.

Rebuilds a fitted run's memory from its own training split (the same held-out images calibrate
it) with one thing changed, keeps its student (and autoencoder) maps, and scores each variant
on the category's test set with ``raad.score.evaluate`` (float search):

* ``built``: the run's memory as ``raad fit`` builds it (fine, colour and line cells, whitened);
* ``no lines``: fine and colour only;
* ``standardised``: every representation scaled per channel instead of whitened;
* ``no lines, standardised``: the memory before 2026-12-05.

    python studies/raad_memory_reps.py RUN/CATEGORY DATA/CATEGORY

prints one line per variant: image AUROC, pixel AUROC, AU-PRO, then image AUROC / AU-PRO per
defect type. README "Results" quotes it for stone and weave.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch

from raad import data as D
from raad import memory as M
from raad import train as T
from raad.checkpoint import load_run
from raad.score import evaluate


def _standardised(x: torch.Tensor) -> torch.Tensor:
    return torch.diag(x.std((0, 2, 3)).clamp_min(1e-6).reciprocal())


@contextlib.contextmanager
def variant(lines: bool, whiten: bool):
    reps, white = M.FeatureMemory.REPS, M.whitening
    M.FeatureMemory.REPS = reps if lines else tuple(r for r in reps if r != "lines")
    M.whitening = white if whiten else _standardised
    try:
        yield
    finally:
        M.FeatureMemory.REPS, M.whitening = reps, white


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a fitted run folder of one category (raad fit --out RUN/CATEGORY)")
    ap.add_argument("category", help="the category folder it was fitted on")
    ap.add_argument("--holdout", type=float, default=T.FitOptions.holdout)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    det = load_run(args.run, precision="fp32")[0]
    if det.memory is None:
        raise SystemExit(f"{args.run} has no memory (fitted with --memory off)")
    size = det.cfg.image_size
    train_paths, held_paths = T.holdout_split(list(D.validate(args.category, need_test=False).train),
                                              args.holdout, Path(args.category) / "train" / "good")
    images, normals = (T.canonical_images(det, T.load_images(p, size, False)) for p in (train_paths, held_paths))
    test = D.validate(args.category)
    for name, lines, whiten in (("built", True, True), ("no lines", False, True),
                                ("standardised", True, False), ("no lines, standardised", False, False)):
        with variant(lines, whiten):
            T.build_memory(det, images, normals, seed=0)
            r = evaluate(det, test, show=False)[0]
        per = "  ".join(f"{k} {v['image_auroc']:.3f}/{v['aupro']:.3f}" for k, v in r["per_defect"].items())
        print(f"{name:24s} image {r['image_auroc']:.3f}  pixel {r['pixel_auroc']:.3f}  AU-PRO {r['aupro']:.3f}"
              f"   {per}", flush=True)


if __name__ == "__main__":
    main()
