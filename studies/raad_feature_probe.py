"""Which features see which defects: a nearest-neighbour probe of the teacher's blocks.

For each EfficientNet-Lite0 block's output (blocks 0-7) (and the image's local mean colour), every cell of a
test image is scored by its distance to the nearest cell of the training images (per-channel
standardised; the bank subsampled to --bank cells), the image by its highest interior cell. The
image AUROC per defect type says how well that representation separates the defect from normal
images with no student at all: an upper-bound check before choosing target blocks.

    python studies/raad_feature_probe.py demo_out/data/weave

Prints one line per representation (and 3x3-pooled variant): channels, grid, image AUROC overall
and per defect type.

``--memory`` asks instead whether a nearest-neighbour memory of fine features could stand beside
the detector: the bank is the training images ``raad fit`` trains on, each representation's
distances are quantile-normalised on the images it holds out (as the detector's maps are), and
block 1 (stride 4), the 3x3-pooled 4x4 mean colour and their maximum are scored; with ``--maps``
(the ``maps.npz`` of ``raad score``) also their mean and maximum with the detector's map:

    python studies/raad_feature_probe.py demo_out/data/weave --memory \
        --maps demo_out/scores_plan/weave/maps.npz

The memory this probe argued for is built (``raad/memory.py``, ``--memory``). The probe scores
each image by its map's maximum inside a border of size/32 pixels, which the detector does not:
its figures run higher than the built detector's (a development fit's weave map, scored both
ways: 0.931 over the whole map, 0.956 without a 4-pixel border).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from raad import data as D
from raad.model import EffNetTeacher
from raad.train import Q_HIGH, Q_LOW, FitOptions, holdout_split


@torch.no_grad()
def representations(teacher: EffNetTeacher, images: torch.Tensor) -> dict:
    out = {"colour/4": F.avg_pool2d(images, 4), "colour/8": F.avg_pool2d(images, 8)}
    h = teacher.act(teacher.bn0(teacher.conv_stem(images)))
    for i, blk in enumerate(teacher.blocks):
        h = blk(h)
        out[f"block{i}"] = h.contiguous()
    return out


def pooled(x: torch.Tensor, pool: int) -> torch.Tensor:
    """``x`` averaged over ``pool``x``pool`` neighbourhoods (same size; no pooling at 1)."""
    return F.avg_pool2d(x, pool, 1, pool // 2, count_include_pad=False) if pool > 1 else x


def nn_distances(bank: torch.Tensor, query: torch.Tensor, keep: int | None = None,
                 gen: torch.Generator | None = None) -> torch.Tensor:
    """Each query cell's distance to its nearest bank cell, per-channel standardised on the
    bank, (B, h, w); ``keep``: subsample the bank to that many cells."""
    mu = bank.mean((0, 2, 3), keepdim=True)
    sd = bank.std((0, 2, 3), keepdim=True) + 1e-6
    c = bank.shape[1]
    cells = ((bank - mu) / sd).permute(0, 2, 3, 1).reshape(-1, c)
    if keep is not None and len(cells) > keep:
        cells = cells[torch.randperm(len(cells), generator=gen)[:keep]]
    q = ((query - mu) / sd).permute(0, 2, 3, 1).reshape(-1, c)
    b, _, h, w = query.shape
    return torch.cat([torch.cdist(part, cells).min(1).values for part in q.split(4096)]).view(b, h, w)


def nn_scores(train: torch.Tensor, test: torch.Tensor, bank: int, gen: torch.Generator) -> np.ndarray:
    d = nn_distances(train, test, bank, gen)
    if d.shape[-2] > 4:  # the border ring carries the zero padding's artefacts
        d = d[:, 1:-1, 1:-1]
    return d.flatten(1).max(1).values.numpy()


def nn_maps(bank: torch.Tensor, query: torch.Tensor, size: int) -> torch.Tensor:
    """:func:`nn_distances` against the whole bank, upsampled to ``size`` pixels."""
    d = nn_distances(bank, query)[:, None]
    return F.interpolate(d, size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def image_scores(maps: torch.Tensor, size: int) -> np.ndarray:
    """The maximum of each map inside a border of size/32 pixels (the padding artefacts)."""
    r = max(1, size // 32)
    return maps[:, r:-r, r:-r].flatten(1).max(1).values.numpy()


def memory_probe(args, cat, items, labels, teacher):
    """The ``--memory`` report (see the module notes)."""
    bank_paths, held_paths = holdout_split(list(cat.train), FitOptions.holdout, args.category)
    bank = representations(teacher, torch.stack([D.load_image(p, args.size) for p in bank_paths]))
    # held-out and test images in one batch: one search of the bank gives both
    queries = representations(teacher, torch.stack([D.load_image(p, args.size) for p in held_paths]
                                                    + [D.load_image(it.path, args.size) for it in items]))
    maps = {}
    for name, pool in (("block1", 1), ("colour/4", 3)):
        held, test = nn_maps(pooled(bank[name], pool), pooled(queries[name], pool), args.size).split(
            [len(held_paths), len(items)])
        lo, hi = torch.quantile(held.flatten()[::5], torch.tensor([Q_LOW, Q_HIGH]))
        maps[f"{name} pool {pool}"] = (test - lo) / (hi - lo)
    memory = torch.maximum(*maps.values())
    maps["memory: max of both"] = memory
    if args.maps:
        z = np.load(args.maps)
        keys = [it.key for it in items]
        missing = [k for k in keys if k not in z.files]
        if missing:
            raise SystemExit(f"--maps {args.maps}: no map for {missing[:3]} (is it this category's maps.npz?)")
        # the detector's maps are 0.1 at its held-out q_high (EfficientAD's scale): x10 matches
        det = 10.0 * torch.stack([torch.from_numpy(np.asarray(z[k], np.float32)) for k in keys])
        det = F.interpolate(det[:, None], size=(args.size, args.size), mode="bilinear", align_corners=False)[:, 0]
        maps["detector"] = det
        maps["mean(detector, memory)"] = 0.5 * (det + memory)
        maps["max(detector, memory)"] = torch.maximum(det, memory)
    for name, m in maps.items():
        print(f"{name:24s} " + "  ".join(f"{k} {v:.3f}" for k, v in
                                         auroc_by_defect(cat, items, labels, image_scores(m, args.size)).items()),
              flush=True)


def auroc_by_defect(cat, items, labels, score) -> dict:
    res = {"all": roc_auc_score(labels, score)}
    for dt in cat.defect_types:
        keep = np.array([it.defect in (dt, "good") for it in items])
        res[dt] = roc_auc_score(labels[keep], score[keep])
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("category", help="a category folder in the MVTec layout")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--bank", type=int, default=20000, help="training cells kept per representation")
    ap.add_argument("--memory", action="store_true",
                    help="score a block-1 + local-colour memory, calibrated on held-out images")
    ap.add_argument("--maps", help="with --memory: the detector's maps.npz (raad score) to combine with")
    args = ap.parse_args(argv)
    cat = D.validate(args.category)
    items = list(cat.test)
    labels = np.array([it.label for it in items])
    teacher = EffNetTeacher(target_blocks=(7,))  # blocks 0-7: strides 2 to 16
    if args.memory:
        return memory_probe(args, cat, items, labels, teacher)
    train = representations(teacher, torch.stack([D.load_image(p, args.size) for p in cat.train]))
    test = representations(teacher, torch.stack([D.load_image(it.path, args.size) for it in items]))
    gen = torch.Generator().manual_seed(0)
    for name in train:
        for pool in (1, 3):
            a, b = pooled(train[name], pool), pooled(test[name], pool)
            res = auroc_by_defect(cat, items, labels, nn_scores(a, b, args.bank, gen))
            print(f"{name:9s} {a.shape[1]:4d} ch {a.shape[-2]:3d}x{a.shape[-1]:<3d} pool {pool}  "
                  + "  ".join(f"{k} {v:.3f}" for k, v in res.items()), flush=True)


if __name__ == "__main__":
    main()
