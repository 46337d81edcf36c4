"""Which fine features should the memory search? Variants scored inside a fitted detector.

The detector's map is the mean of its student map and its memory's map (``raad.memory``: the
largest of a block-1 map, a local-colour map and a line map). This script keeps a fitted run's
student map, colour map and line map and swaps the fine representation for variants built from
the same teacher:

* ``b1`` (the built memory), ``b2``, ``b1+b2``, and 3×3-pooled versions (PatchCore's "locally
  aware" features);
* ``b2+b4up``: block 2 with block 4 (the student's targets) upsampled beside it;
* ``x2 ...``: the teacher run on the image upsampled 2× (block 2 at stride 2, pooled to stride 4,
  and block 4 at stride 4), which sees thin cracks better and costs about 4× the teacher's time.

Each variant's distances (whitened cells, as the built memory's) are quantile-normalised on the
run's held-out normal images, combined with the colour and line maps, averaged with the student
map, smoothed as
the detector smooths, and scored with ``raad.metrics`` (image AUROC, pixel AUROC, AU-PRO, per
defect type). The ``b1`` line reproduces the detector's own figures on textures.

Limits: every variant searches globally and the maps stay in the canonical pose, so the figures
hold for runs with a global memory and no pose normalisation (the textures): a local memory's
place channels (pcb) and a screw's turned-back maps are not reproduced here.

    python studies/raad_memory_variants.py DEMO_OUT/run/stone DEMO_OUT/data/stone
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from raad import data as D
from raad import memory as M
from raad import metrics as MET
from raad.checkpoint import load_run
from raad.model import gaussian_blur
from raad.train import Q_HIGH, Q_LOW, holdout_split, load_images
from raad_feature_probe import pooled, representations   # beside this script in studies/


def teacher_blocks(teacher, images: torch.Tensor, upscale: int = 1) -> dict:
    """{block index: (B, C, h, w)} for the teacher's blocks on ``images`` (upscaled first), from
    the feature probe's :func:`representations`."""
    if upscale != 1:
        images = F.interpolate(images, scale_factor=upscale, mode="bilinear", align_corners=False)
    return {int(k[5:]): v for k, v in representations(teacher, images).items() if k.startswith("block")}


def memory_map(bank, held, test, size: int = 2048, pool: int = 1) -> torch.Tensor:
    """Nearest-neighbour distances of ``test`` cells to a greedy coreset of ``bank`` cells,
    whitened on the bank (raad.memory.whitening), 0 at the held-out Q_LOW quantile and 0.1 at
    Q_HIGH."""
    bank, held, test = (pooled(z, pool) for z in (bank, held, test))
    mu, white = bank.mean((0, 2, 3), keepdim=True), M.whitening(bank)
    cells = M._cells(bank - mu) @ white
    coreset = cells[M.greedy_coreset(cells, min(size, len(cells)))]

    def dist(q):
        c = M._cells(q - mu) @ white
        d = torch.cat([torch.cdist(p, coreset).min(1).values for p in c.split(8192)])
        return d.view(q.shape[0], *q.shape[-2:])
    lo, hi = torch.quantile(dist(held).flatten(), torch.tensor([Q_LOW, Q_HIGH]))
    return 0.1 * (dist(test) - lo) / (hi - lo)


def resize(m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(m[:, None], size=like.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a fitted run folder of one category (raad fit --out RUN/CATEGORY)")
    ap.add_argument("category", help="the category folder it was fitted on")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    det = load_run(args.run, precision="fp32")[0]
    cat = D.validate(args.category)
    size = det.cfg.image_size
    train_paths, held_paths = holdout_split(list(cat.train), 0.15, args.category)
    imgs, held = load_images(train_paths, size, False), load_images(held_paths, size, False)
    items = list(cat.test)
    test = torch.stack([D.load_image(it.path, size) for it in items])
    imgs, held, test = (torch.cat([det.canonical(x)[0] for x in t.split(32)]) for t in (imgs, held, test))
    masks = [D.load_test_mask(it) for it in items]
    defects = [it.defect for it in items]

    def report(name, m):
        m = gaussian_blur(resize(m, torch.empty(1, size, size))[:, None], det.cfg.smooth_sigma)[:, 0]
        r = MET.compute_metrics(defects, maps=list(m.numpy()), masks=masks)
        per = "  ".join(f"{k} {v['image_auroc']:.3f}/{v['aupro']:.3f}" for k, v in r["per_defect"].items())
        print(f"{name:28s} image {r['image_auroc']:.3f}  pixel {r['pixel_auroc']:.3f}  "
              f"AU-PRO {r['aupro']:.3f}   {per}", flush=True)

    st, ae = det.raw_maps(test)[:2]
    student = det.combine(st, ae, None)
    colour = memory_map(*(M.colour_cells(x) for x in (imgs, held, test)), size=256)
    lines = memory_map(*(M.line_cells(x) for x in (imgs, held, test)))
    B, H, T = (teacher_blocks(det.teacher, x) for x in (imgs, held, test))
    B2, H2, T2 = (teacher_blocks(det.teacher, x, upscale=2) for x in (imgs, held, test))
    cat12 = lambda R: torch.cat([R[1], R[2]], 1)
    with_b4 = lambda R: torch.cat([R[2], F.interpolate(R[4], size=R[2].shape[-2:], mode="bilinear",
                                                       align_corners=False)], 1)
    variants = {
        "b1 (built)": lambda: memory_map(B[1], H[1], T[1]),
        "b2": lambda: memory_map(B[2], H[2], T[2]),
        "b1 pool 3": lambda: memory_map(B[1], H[1], T[1], pool=3),
        "b1+b2": lambda: memory_map(cat12(B), cat12(H), cat12(T)),
        "b2+b4up": lambda: memory_map(with_b4(B), with_b4(H), with_b4(T)),
        "x2 b2 (stride 2)": lambda: memory_map(B2[2], H2[2], T2[2], size=4096),
        "x2 b2 pooled to stride 4": lambda: memory_map(*(F.avg_pool2d(z[2], 2) for z in (B2, H2, T2))),
        "x2 b4 (stride 4)": lambda: memory_map(B2[4], H2[4], T2[4]),
    }
    report("student map alone", student)
    for name, make in variants.items():
        fine = make()
        memory = torch.stack([fine, resize(colour, fine), resize(lines, fine)]).amax(0)
        report(name + " + colour + lines", memory)
        report(name + " + colour + lines + student", 0.5 * (resize(student, memory) + memory))


if __name__ == "__main__":
    main()
