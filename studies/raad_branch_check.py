"""Can synthetic defects on held-out normals tell which branches of the map help?

Fits the float detector once (defaults) and prints one JSON line: per branch, the pixel and image
AUROC on CutPaste defects (raad.hqs.synthetic_anomalies, seeds 0 and 1) pasted into the held-out
normals, then image AUROC / pixel AUROC / AU-PRO on the real test set, and the map without the
autoencoder ("no_ae"). The README's "tried" list quotes it:

    python studies/raad_branch_check.py DEMO_OUT/data/stone
"""
import json
import sys
import time

import numpy as np
import torch

from raad import data as D
from raad import hqs
from raad import metrics as MT
from raad.model import ModelConfig
from raad.score import evaluate
from raad.train import FitOptions, prepare, train_float
from raad_variant import _Branch

cat_dir = sys.argv[1]
cfg, opts = ModelConfig(autoencoder="on"), FitOptions(avg_bits=16, seed=0)
t0 = time.perf_counter()
prep = prepare(cat_dir, cfg, opts, show=False)
train_float(prep, opts, show=False)
det = prep.det
out = {"category": prep.category, "fit_s": round(time.perf_counter() - t0, 1)}
syn = {}
with torch.no_grad():
    for seed in (0, 1):
        an, masks = hqs.synthetic_anomalies(prep.normals, seed=seed)
        for br in ("student", "autoencoder", "memory", "both"):
            mn = det(prep.normals, branch=br); ma = det(an, branch=br)
            # pixel AUROC: anomalous pixels of synthetic vs all pixels of normals
            s = np.concatenate([ma[masks].numpy(), mn.flatten().numpy()])
            y = np.concatenate([np.ones(int(masks.sum())), np.zeros(mn.numel())])
            img = MT.image_auroc(np.concatenate([ma.flatten(1).amax(1).numpy(), mn.flatten(1).amax(1).numpy()]),
                                 np.concatenate([np.ones(len(ma)), np.zeros(len(mn))]))
            syn.setdefault(br, []).append((MT._auroc(s, y), img))
out["synthetic"] = {br: [round(float(np.mean([v[0] for v in vals])), 3), round(float(np.mean([v[1] for v in vals])), 3)] for br, vals in syn.items()}
category = D.validate(cat_dir)
for br in ("student", "autoencoder", "memory", "both"):
    r = evaluate(_Branch(det, br), category, show=False)[0]
    out[br] = [round(r["image_auroc"], 3), round(r["pixel_auroc"], 3), round(r["aupro"], 3)]
ae = det.ae; det.ae = None
r = evaluate(_Branch(det, "both"), category, show=False)[0]; det.ae = ae
out["no_ae"] = [round(r["image_auroc"], 3), round(r["pixel_auroc"], 3), round(r["aupro"], 3)]
print(json.dumps(out), flush=True)
