"""Anomaly-detection metrics: image AUROC, pixel AUROC, AU-PRO, F1-max (image and pixel level).

Conventions
-----------
- Higher score = more anomalous. A pixel/image is predicted anomalous at threshold ``t`` when its
  score is ``>= t``; every distinct score is a threshold.
- Pixel metrics use every pixel of every test image at mask resolution: anomaly maps must have
  the shape of their masks (resize maps, never masks). Normal images have all-False masks.
- **AU-PRO** (Bergmann et al., MVTec AD, IJCV 2021): the defect regions are the connected
  components of every ground-truth mask with 8-connectivity (3x3 structure). At a threshold,
  PRO = mean over all regions (of all images) of the fraction of the region's pixels predicted
  anomalous; FPR = fraction of all defect-free pixels of all test images (normal and anomalous
  ones) predicted anomalous. The PRO-over-FPR curve through every distinct threshold, starting at
  (0, 0), is integrated with the trapezoid rule up to FPR 0.3 (the last segment linearly
  interpolated at 0.3) and divided by 0.3, as in the MVTec AD reference code.
- **F1-max**: the largest F1 over all thresholds (``2PR / (P + R)``, 0 where P + R = 0).

Computation: image-level metrics use scikit-learn (``roc_auc_score``, ``precision_recall_curve``).
Pixel-level metrics (pixel AUROC, pixel F1-max, AU-PRO) come from one sort of all pixels by
score: cumulative true/false-positive counts and per-region coverage at the end of each group of
equal scores give every point of the ROC, PR and PRO curves (the same values scikit-learn gives,
which the tests check). :func:`compute_metrics` sorts once and reuses the order for every
per-defect block (selecting a subset keeps the order). Cost: one ``argsort`` of all pixels, about
20 bytes of memory per pixel.

Degenerate cases return ``nan`` (never an exception): AUROC with only one class (no defects or
no normals); AU-PRO without any defect region or without any defect-free pixel; F1-max without
positives (without negatives it is well defined: 1). Malformed input (empty, lengths or shapes
that differ, non-finite scores, labels not 0/1) raises ``ValueError`` naming the argument.
:func:`compute_metrics` returns a dict ready for ``metrics.json`` in which ``nan`` is ``None``.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

__all__ = [
    "METRIC_KEYS", "image_auroc", "f1_max", "pixel_auroc", "pixel_f1_max", "pro_curve",
    "aupro", "trapezoid", "compute_metrics", "mean_metrics",
]

GOOD = "good"
#: the metric keys of each block of :func:`compute_metrics`
METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "pixel_f1_max")
_EIGHT = np.ones((3, 3), dtype=bool)


# ------------------------------------------------------------------------------------------------
# Input checks
# ------------------------------------------------------------------------------------------------

def _float_array(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == object:
        raise ValueError(f"{name}: expected numbers, got objects")
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    if a.size and not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))[0]
        raise ValueError(f"{name}: non-finite value at index {tuple(int(i) for i in bad)}")
    return a


def _scores_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = _float_array(scores, "scores").reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.size == 0:
        raise ValueError("scores: empty")
    if s.shape != y.shape:
        raise ValueError(f"scores has {s.size} values but labels has {y.size}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 (normal) or 1 (anomalous), got {np.unique(y)[:10]}")
    return s, y.astype(np.int8)


def _pixel_lists(maps, masks) -> tuple[list[np.ndarray], list[np.ndarray]]:
    maps = [maps[i] for i in range(len(maps))]
    if len(maps) == 0:
        raise ValueError("maps: empty")
    if masks is None:
        masks = [None] * len(maps)
    masks = [masks[i] for i in range(len(masks))]
    if len(masks) != len(maps):
        raise ValueError(f"maps has {len(maps)} entries but masks has {len(masks)}")
    out_m, out_g = [], []
    for i, (m, g) in enumerate(zip(maps, masks)):
        m = _float_array(m, f"maps[{i}]")
        if m.ndim != 2:
            raise ValueError(f"maps[{i}]: expected a 2-D map (H, W), got shape {m.shape}")
        g = np.zeros(m.shape, dtype=bool) if g is None else np.asarray(g).astype(bool, copy=False)
        if g.shape != m.shape:
            raise ValueError(f"maps[{i}] has shape {m.shape} but its mask {g.shape}: maps must "
                             f"be at mask resolution")
        out_m.append(m)
        out_g.append(g)
    return out_m, out_g


def _flat(maps: list[np.ndarray], masks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    dtype = np.result_type(*[m.dtype for m in maps])
    s = np.concatenate([m.ravel() for m in maps]).astype(dtype, copy=False)
    g = np.concatenate([g.ravel() for g in masks])
    return s, g


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------

def _auroc(s: np.ndarray, y: np.ndarray) -> float:
    if y.min() == y.max():
        return math.nan
    return float(roc_auc_score(y, s))


def _f1max(s: np.ndarray, y: np.ndarray) -> float:
    if not y.any():
        return math.nan
    p, r, _ = precision_recall_curve(y, s)
    denom = p + r
    f1 = np.divide(2 * p * r, denom, out=np.zeros_like(denom, dtype=np.float64), where=denom > 0)
    return float(f1.max())


def image_auroc(scores, labels) -> float:
    """AUROC of image scores against labels (1 = anomalous); nan with only one class."""
    return _auroc(*_scores_labels(scores, labels))


def f1_max(scores, labels) -> float:
    """Largest F1 over all thresholds; nan without positives."""
    return _f1max(*_scores_labels(scores, labels))


class _PixelSweep:
    """All pixels of a set of images sorted once by decreasing score; the pixel metrics of any
    subset of the images come from one pass over the selected pixels (selection keeps the order,
    so per-defect blocks need no new sort). Per distinct score (the end of each group of equal
    scores) the cumulative true/false positive counts and PRO give every curve point at once.
    """

    def __init__(self, maps: list[np.ndarray], masks: list[np.ndarray]):
        self.n_images = len(maps)
        region_size, self.n_regions = [], np.zeros(len(masks), dtype=np.int64)
        for i, g in enumerate(masks):
            lab, k = ndimage.label(g, structure=_EIGHT)
            self.n_regions[i] = k
            sizes = np.bincount(lab.ravel()).astype(np.int64)
            sizes[0] = 0
            region_size.append(sizes[lab.ravel()].astype(np.int32 if g.size < 2**31 else np.int64))
        s, g = _flat(maps, masks)
        img = np.repeat(np.arange(len(maps), dtype=np.int32), [m.size for m in maps])
        order = np.argsort(s)[::-1]   # ties need no order: only each tie group's end is used
        self.s = s[order]
        self.g = g[order]
        self.img = img[order]
        self.rsize = np.concatenate(region_size)[order]

    def curves(self, images: Sequence[int] | None = None) -> dict:
        if images is None:
            s, g, rs, n_reg = self.s, self.g, self.rsize, int(self.n_regions.sum())
        else:
            images = np.asarray(images, dtype=np.int64)
            member = np.zeros(self.n_images, dtype=bool)
            member[images] = True
            sel = member[self.img]
            s, g, rs = self.s[sel], self.g[sel], self.rsize[sel]
            n_reg = int(self.n_regions[np.unique(images)].sum())
        keep = np.ones(s.size, dtype=bool)
        keep[:-1] = s[1:] != s[:-1]
        tp = np.cumsum(g, dtype=np.int64)[keep]
        fp = np.arange(1, s.size + 1, dtype=np.int64)[keep] - tp
        out = {"thr": s[keep].astype(np.float64), "tp": tp, "fp": fp, "n_regions": n_reg}
        if n_reg:
            w = np.zeros(s.size, dtype=np.float64)
            np.divide(1.0, rs, out=w, where=g)
            out["pro"] = np.cumsum(w)[keep] / n_reg
        return out


def _sweep_auroc(c: dict) -> float:
    P, N = int(c["tp"][-1]), int(c["fp"][-1])
    if P == 0 or N == 0:
        return math.nan
    return trapezoid(np.concatenate([[0.0], c["fp"] / N]), np.concatenate([[0.0], c["tp"] / P]))


def _sweep_f1max(c: dict) -> float:
    P = int(c["tp"][-1])
    if P == 0:
        return math.nan
    return float(np.max(2 * c["tp"] / (c["tp"] + c["fp"] + P)))


def _sweep_pro(c: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    N = int(c["fp"][-1])
    if c["n_regions"] == 0:
        raise ValueError("AU-PRO needs at least one defect region (all masks are empty)")
    if N == 0:
        raise ValueError("AU-PRO needs defect-free pixels (every pixel is a defect)")
    fpr = np.concatenate([[0.0], c["fp"] / N])
    pro = np.concatenate([[0.0], np.clip(c["pro"], 0.0, 1.0)])
    thr = np.concatenate([[np.inf], c["thr"]])
    fpr[-1] = pro[-1] = 1.0   # every pixel predicted anomalous (removes rounding in the sums)
    return fpr, pro, thr


def _sweep_aupro(c: dict, max_fpr: float) -> float:
    if c["n_regions"] == 0 or int(c["fp"][-1]) == 0:
        return math.nan
    fpr, pro, _ = _sweep_pro(c)
    return trapezoid(fpr, pro, max_fpr) / max_fpr


def _check_max_fpr(max_fpr: float) -> None:
    if not 0 < max_fpr <= 1:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")


def pixel_auroc(maps, masks) -> float:
    """AUROC over all pixels of all images (maps at mask resolution; a ``None`` mask = normal);
    nan without defect pixels or without defect-free pixels."""
    return _sweep_auroc(_PixelSweep(*_pixel_lists(maps, masks)).curves())


def pixel_f1_max(maps, masks) -> float:
    """F1-max over all pixels of all images; nan without defect pixels."""
    return _sweep_f1max(_PixelSweep(*_pixel_lists(maps, masks)).curves())


def pro_curve(maps, masks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The PRO curve: ``(fpr, pro, thresholds)``, one point per distinct score in decreasing
    score order, starting at (0, 0) (threshold +inf) and ending at (1, 1).

    Raises ``ValueError`` when there is no defect region or no defect-free pixel.
    """
    return _sweep_pro(_PixelSweep(*_pixel_lists(maps, masks)).curves())


def trapezoid(x: np.ndarray, y: np.ndarray, x_max: float | None = None) -> float:
    """Area under ``y(x)`` (``x`` non-decreasing) by the trapezoid rule, up to ``x_max`` with the
    segment crossing ``x_max`` linearly interpolated there."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x_max is None:
        return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))
    i = int(np.searchsorted(x, x_max, side="right"))   # x[:i] <= x_max
    area = float(np.sum((x[1:i] - x[:i - 1]) * (y[1:i] + y[:i - 1]) / 2)) if i > 1 else 0.0
    if 0 < i < len(x) and x[i - 1] < x_max:
        y_at = y[i - 1] + (y[i] - y[i - 1]) * (x_max - x[i - 1]) / (x[i] - x[i - 1])
        area += (x_max - x[i - 1]) * (y[i - 1] + y_at) / 2
    return area


def aupro(maps, masks, max_fpr: float = 0.3) -> float:
    """Normalised area under the PRO curve up to FPR ``max_fpr`` (in [0, 1]; 1 = perfect).

    nan when there is no defect region or no defect-free pixel.
    """
    _check_max_fpr(max_fpr)
    return _sweep_aupro(_PixelSweep(*_pixel_lists(maps, masks)).curves(), max_fpr)


# ------------------------------------------------------------------------------------------------
# All metrics of one category
# ------------------------------------------------------------------------------------------------

def _none_if_nan(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def compute_metrics(defects: Sequence[str], scores=None, maps=None, masks=None, *,
                    max_fpr: float = 0.3) -> dict:
    """All metrics of one category, overall and per defect type, ready for ``metrics.json``.

    ``defects``: each test image's defect type (``"good"`` = normal; label = defect != good).
    ``scores``: image scores (default: each map's maximum). ``maps``: anomaly maps (H, W) at
    mask resolution (optional; without them the pixel metrics are ``None``). ``masks``: bool
    masks, ``None`` allowed for good images (all False).

    Returns ``{"image_auroc", "pixel_auroc", "aupro", "f1_max", "pixel_f1_max", "n_images",
    "n_good", "n_defect", "per_defect": {type: {same metric keys, "n_images", "n_defect"}}}``;
    a defect type's block uses its own images together with all good images. Undefined values
    (see the module notes) are ``None``.
    """
    defects = [str(d) for d in defects]
    n = len(defects)
    if n == 0:
        raise ValueError("defects: no test images")
    labels = np.array([0 if d == GOOD else 1 for d in defects], dtype=np.int8)
    if maps is not None:
        if len(maps) != n:
            raise ValueError(f"maps has {len(maps)} entries but defects has {n}")
        if masks is None:
            raise ValueError("masks are needed with maps (None entries allowed for good images)")
        if len(masks) != n:
            raise ValueError(f"masks has {len(masks)} entries but defects has {n}")
        for i, (d, g) in enumerate(zip(defects, masks)):
            if g is None and d != GOOD:
                raise ValueError(f"masks[{i}] is None but the image has defect type {d!r}")
        maps, masks = _pixel_lists(maps, masks)
    if scores is None:
        if maps is None:
            raise ValueError("give scores, maps, or both")
        scores = np.array([float(m.max()) for m in maps])
    s, _ = _scores_labels(scores, labels)
    if s.size != n:
        raise ValueError(f"scores has {s.size} values but defects has {n}")

    _check_max_fpr(max_fpr)
    sweep = _PixelSweep(maps, masks) if maps is not None else None

    def block(idx: np.ndarray) -> dict:
        out = {"image_auroc": _none_if_nan(_auroc(s[idx], labels[idx])),
               "pixel_auroc": None, "aupro": None,
               "f1_max": _none_if_nan(_f1max(s[idx], labels[idx])),
               "pixel_f1_max": None}
        if sweep is not None:
            c = sweep.curves(None if idx.size == n else idx)
            out["pixel_auroc"] = _none_if_nan(_sweep_auroc(c))
            out["aupro"] = _none_if_nan(_sweep_aupro(c, max_fpr))
            out["pixel_f1_max"] = _none_if_nan(_sweep_f1max(c))
        return out

    result = block(np.arange(n))
    result.update(n_images=n, n_good=int((labels == 0).sum()), n_defect=int(labels.sum()))
    good = np.flatnonzero(labels == 0)
    per = {}
    for d in sorted(set(defects) - {GOOD}):
        own = np.flatnonzero(np.array(defects) == d)
        b = block(np.concatenate([own, good]))
        b.update(n_images=int(own.size + good.size), n_defect=int(own.size))
        per[d] = b
    result["per_defect"] = per
    return result


def mean_metrics(per_category: Mapping[str, Mapping] | Sequence[Mapping]) -> dict:
    """Mean of each metric over categories (``None`` values skipped; ``None`` if all are).

    Takes ``{category: compute_metrics(...)}`` or a list of such dicts; returns the metric keys
    plus ``n_categories``.
    """
    blocks = list(per_category.values()) if isinstance(per_category, Mapping) else list(per_category)
    out: dict = {}
    for k in METRIC_KEYS:
        vals = [b[k] for b in blocks if b.get(k) is not None]
        out[k] = float(np.mean(vals)) if vals else None
    out["n_categories"] = len(blocks)
    return out
