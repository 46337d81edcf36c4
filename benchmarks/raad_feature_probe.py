"""Which features see which defects: a nearest-neighbour probe of the teacher's blocks.

For each EfficientNet-Lite0 block's output (blocks 0-7) (and the image's local mean colour), every cell of a
test image is scored by its distance to the nearest cell of the training images (per-channel
standardised; the bank subsampled to --bank cells), the image by its highest interior cell. The
image AUROC per defect type says how well that representation separates the defect from normal
images with no student at all: an upper-bound check before choosing target blocks.

    python benchmarks/raad_feature_probe.py demo_out/data/weave

Prints one line per representation (and 3x3-pooled variant): channels, grid, image AUROC overall
and per defect type.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from raad import data as D
from raad.model import EffNetTeacher


@torch.no_grad()
def representations(teacher: EffNetTeacher, images: torch.Tensor) -> dict:
    out = {"colour/4": F.avg_pool2d(images, 4), "colour/8": F.avg_pool2d(images, 8)}
    h = teacher.act(teacher.bn0(teacher.conv_stem(images)))
    for i, blk in enumerate(teacher.blocks):
        h = blk(h)
        out[f"block{i}"] = h.contiguous()
    return out


def nn_scores(train: torch.Tensor, test: torch.Tensor, bank: int, gen: torch.Generator) -> np.ndarray:
    mu = train.mean((0, 2, 3), keepdim=True)
    sd = train.std((0, 2, 3), keepdim=True) + 1e-6
    c = train.shape[1]
    cells = ((train - mu) / sd).permute(0, 2, 3, 1).reshape(-1, c)
    if len(cells) > bank:
        cells = cells[torch.randperm(len(cells), generator=gen)[:bank]]
    q = ((test - mu) / sd).permute(0, 2, 3, 1).reshape(-1, c)
    b, _, h, w = test.shape
    d = torch.cat([torch.cdist(part, cells).min(1).values for part in q.split(4096)]).view(b, h, w)
    if h > 4:  # the border ring carries the zero padding's artefacts
        d = d[:, 1:-1, 1:-1]
    return d.flatten(1).max(1).values.numpy()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("category", help="a category folder in the MVTec layout")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--bank", type=int, default=20000, help="training cells kept per representation")
    args = ap.parse_args(argv)
    cat = D.validate(args.category)
    items = list(cat.test)
    labels = np.array([it.label for it in items])
    teacher = EffNetTeacher(target_blocks=(7,))  # blocks 0-7: strides 2 to 16
    train = representations(teacher, torch.stack([D.load_image(p, args.size) for p in cat.train]))
    test = representations(teacher, torch.stack([D.load_image(it.path, args.size) for it in items]))
    gen = torch.Generator().manual_seed(0)
    for name in train:
        for pool in (1, 3):
            a, b = train[name], test[name]
            if pool > 1:
                a = F.avg_pool2d(a, pool, 1, pool // 2, count_include_pad=False)
                b = F.avg_pool2d(b, pool, 1, pool // 2, count_include_pad=False)
            score = nn_scores(a, b, args.bank, gen)
            res = {"all": roc_auc_score(labels, score)}
            for dt in cat.defect_types:
                keep = np.array([it.defect in (dt, "good") for it in items])
                res[dt] = roc_auc_score(labels[keep], score[keep])
            print(f"{name:9s} {a.shape[1]:4d} ch {a.shape[-2]:3d}x{a.shape[-1]:<3d} pool {pool}  "
                  + "  ".join(f"{k} {v:.3f}" for k, v in res.items()), flush=True)


if __name__ == "__main__":
    main()
