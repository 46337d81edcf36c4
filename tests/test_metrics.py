"""raad.metrics against hand-computed values and brute-force reference implementations."""

import itertools
import json
import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from raad import metrics as M


# ------------------------------------------------------------------------------------------------
# Brute-force references (deliberately independent of the implementation: no sorting tricks, no
# scipy labelling, no sklearn)
# ------------------------------------------------------------------------------------------------

def _components8(mask: np.ndarray) -> list[np.ndarray]:
    """Connected components of a bool mask with 8-connectivity, by flood fill."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    for y0, x0 in itertools.product(range(h), range(w)):
        if not mask[y0, x0] or seen[y0, x0]:
            continue
        comp = np.zeros_like(mask, dtype=bool)
        stack = [(y0, x0)]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            comp[y, x] = True
            for dy, dx in itertools.product((-1, 0, 1), repeat=2):
                yy, xx = y + dy, x + dx
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
        comps.append(comp)
    return comps


def brute_aupro(maps, masks, max_fpr=0.3):
    regions = [(i, r) for i, g in enumerate(masks) for r in _components8(g)]
    n_neg = sum(int((~g).sum()) for g in masks)
    thresholds = sorted({float(v) for m in maps for v in m.ravel()}, reverse=True)
    xs, ys = [0.0], [0.0]
    for t in thresholds:   # every distinct threshold: predicted anomalous = score >= t
        fp = sum(int(((m >= t) & ~g).sum()) for m, g in zip(maps, masks))
        pro = np.mean([((maps[i] >= t) & r).sum() / r.sum() for i, r in regions])
        xs.append(fp / n_neg)
        ys.append(pro)
    area = 0.0
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 >= max_fpr:
            break
        if x1 <= max_fpr:
            area += (x1 - x0) * (y0 + y1) / 2
        else:   # the segment crossing max_fpr, interpolated linearly there
            y = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            area += (max_fpr - x0) * (y0 + y) / 2
            break
    return area / max_fpr


def brute_f1max(scores, labels):
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = int((pred & labels).sum())
        fp = int((pred & ~labels).sum())
        fn = int((~pred & labels).sum())
        if tp:
            best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def brute_auroc(scores, labels):
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = scores[labels], scores[~labels]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (pos.size * neg.size)


# ------------------------------------------------------------------------------------------------
# Hand-computed cases
# ------------------------------------------------------------------------------------------------

def test_image_auroc_hand():
    # pairs (positive, negative): 0.35>0.1 yes, 0.35>0.4 no, 0.8>0.1 yes, 0.8>0.4 yes -> 3/4
    assert M.image_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert M.image_auroc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)   # a tie counts one half
    assert M.image_auroc([0.1, 0.2, 0.3], [0, 1, 1]) == pytest.approx(1.0)
    assert M.image_auroc([0.3, 0.2, 0.1], [0, 1, 1]) == pytest.approx(0.0)


def test_f1_max_hand():
    # t=0.8: P=1 R=1/2 F1=2/3; t=0.4: P=1/2 R=1/2 F1=1/2; t=0.35: P=2/3 R=1 F1=0.8;
    # t=0.1: P=1/2 R=1 F1=2/3 -> max 0.8
    assert M.f1_max([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.8)


def _tiny_case():
    # image A: one region of 2 pixels joined only diagonally (one region with 8-connectivity)
    mask_a = np.array([[1, 0, 0],
                       [0, 1, 0]], bool)
    map_a = np.array([[0.9, 0.1, 0.2],
                      [0.3, 0.3, 0.4]])
    # image B: one region of 1 pixel
    mask_b = np.array([[0, 0, 0],
                       [0, 0, 1]], bool)
    map_b = np.array([[0.0, 0.6, 0.0],
                      [0.0, 0.0, 0.7]])
    return [map_a, map_b], [mask_a, mask_b]


def test_aupro_hand():
    maps, masks = _tiny_case()
    # Regions: R1 = A's diagonal pair (2 px), R2 = B's pixel. Defect-free pixels: 4 + 5 = 9.
    # Descending thresholds -> (FPR, PRO):
    #   +inf: (0, 0)
    #   0.9 : R1 1/2 covered          -> (0,   (1/2 + 0)/2 = 0.25)
    #   0.7 : R2 covered              -> (0,   (1/2 + 1)/2 = 0.75)
    #   0.6 : 1 false positive (B)    -> (1/9, 0.75)
    #   0.4 : 2 false positives       -> (2/9, 0.75)
    #   0.3 : A's (1,0) is a FP and A's (1,1) completes R1 -> (3/9, 1.0)   <- crosses 0.3
    # Area to 0.3: [0,1/9] 0.75/9 = 0.0833333 ; [1/9,2/9] 0.75/9 = 0.0833333 ;
    #   at 0.3 the segment (2/9,0.75)-(3/9,1) is at 0.75 + 0.25*(0.3-2/9)*9 = 0.925,
    #   [2/9,0.3] (0.75+0.925)/2*(0.3-2/9) = 0.8375*0.0777778 = 0.0651389
    #   total 0.2318056 ; / 0.3 = 0.7726852
    expected = (0.75 / 9 + 0.75 / 9 + (0.75 + 0.925) / 2 * (0.3 - 2 / 9)) / 0.3
    assert expected == pytest.approx(0.7726852, abs=1e-7)
    assert M.aupro(maps, masks) == pytest.approx(expected, abs=1e-12)
    assert brute_aupro(maps, masks) == pytest.approx(expected, abs=1e-12)
    fpr, pro, thr = M.pro_curve(maps, masks)
    assert fpr[:6] == pytest.approx([0, 0, 0, 1 / 9, 2 / 9, 3 / 9])
    assert pro[:6] == pytest.approx([0, 0.25, 0.75, 0.75, 0.75, 1.0])
    assert thr[1:6] == pytest.approx([0.9, 0.7, 0.6, 0.4, 0.3])
    assert fpr[-1] == 1 and pro[-1] == 1


def test_aupro_uses_8_connectivity():
    maps, masks = _tiny_case()
    # with 4-connectivity A's diagonal pair would be two regions: PRO at 0.9 would be 1/3
    fpr, pro, _ = M.pro_curve(maps, masks)
    assert pro[1] == pytest.approx(0.25)


def test_pixel_auroc_hand():
    maps = [np.array([[0.1, 0.9]]), np.array([[0.2, 0.3]])]
    masks = [np.array([[0, 1]], bool), None]
    # positive 0.9 beats all three negatives
    assert M.pixel_auroc(maps, masks) == pytest.approx(1.0)
    masks = [np.array([[0, 1]], bool), np.array([[1, 0]], bool)]
    # positives 0.9, 0.2; negatives 0.1, 0.3 -> 0.9 wins 2, 0.2 wins 1 -> 3/4
    assert M.pixel_auroc(maps, masks) == pytest.approx(0.75)


# ------------------------------------------------------------------------------------------------
# Randomised comparisons with the brute-force references
# ------------------------------------------------------------------------------------------------

@st.composite
def pixel_cases(draw):
    n = draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 6)), draw(st.integers(2, 6))
    levels = draw(st.integers(2, 12))   # few levels -> many ties
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    maps = [rng.integers(0, levels, (h, w)) / levels for _ in range(n)]
    masks = [rng.random((h, w)) < draw(st.floats(0.05, 0.6)) for _ in range(n)]
    return maps, masks


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pixel_cases(), st.sampled_from([0.3, 0.05, 1.0]))
def test_aupro_matches_brute_force(case, max_fpr):
    maps, masks = case
    assume(any(g.any() for g in masks) and not all(g.all() for g in masks))
    assert M.aupro(maps, masks, max_fpr) == pytest.approx(brute_aupro(maps, masks, max_fpr),
                                                         abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(pixel_cases())
def test_pixel_metrics_match_brute_force(case):
    maps, masks = case
    s = np.concatenate([m.ravel() for m in maps])
    g = np.concatenate([m.ravel() for m in masks])
    assume(g.any() and not g.all())
    assert M.pixel_auroc(maps, masks) == pytest.approx(brute_auroc(s, g), abs=1e-12)
    assert M.pixel_f1_max(maps, masks) == pytest.approx(brute_f1max(s, g), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=2, max_size=25))
def test_image_metrics_match_brute_force(pairs):
    s = np.array([p[0] for p in pairs], float) / 6
    y = np.array([p[1] for p in pairs], int)
    assume(0 < y.sum() < len(y))
    assert M.image_auroc(s, y) == pytest.approx(brute_auroc(s, y), abs=1e-12)
    assert M.f1_max(s, y) == pytest.approx(brute_f1max(s, y), abs=1e-12)


# ------------------------------------------------------------------------------------------------
# Perfect / inverted predictors, degenerate cases, errors
# ------------------------------------------------------------------------------------------------

def _random_masks(rng, n=5, h=12, w=10):
    masks = [np.zeros((h, w), bool) for _ in range(n)]
    for g in masks[: n // 2 + 1]:
        y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
        g[y:y + 3, x:x + rng.integers(1, 4)] = True
    return masks


def test_perfect_and_inverted_predictors():
    rng = np.random.default_rng(0)
    masks = _random_masks(rng)
    perfect = [g.astype(float) for g in masks]
    inverted = [1.0 - m for m in perfect]
    assert M.aupro(perfect, masks) == pytest.approx(1.0)
    assert M.pixel_auroc(perfect, masks) == pytest.approx(1.0)
    assert M.pixel_f1_max(perfect, masks) == pytest.approx(1.0)
    assert M.aupro(inverted, masks) == pytest.approx(0.0, abs=1e-12)
    assert M.pixel_auroc(inverted, masks) == pytest.approx(0.0)
    labels = np.array([int(g.any()) for g in masks])
    assert M.image_auroc(labels * 1.0, labels) == 1.0
    assert M.image_auroc(-labels * 1.0, labels) == 0.0
    assert M.f1_max(labels * 1.0, labels) == 1.0
    # a noisy but perfectly ranked map: still perfect
    noisy = [np.where(g, 0.6 + 0.4 * rng.random(g.shape), 0.5 * rng.random(g.shape))
             for g in masks]
    assert M.aupro(noisy, masks) == pytest.approx(1.0)


def test_degenerate_cases_are_nan():
    assert math.isnan(M.image_auroc([0.1, 0.2], [0, 0]))   # no anomalies
    assert math.isnan(M.image_auroc([0.1, 0.2], [1, 1]))   # no normals
    assert math.isnan(M.f1_max([0.1, 0.2], [0, 0]))
    assert M.f1_max([0.1, 0.2], [1, 1]) == 1.0              # no normals: predicting all = F1 1
    empty = [np.zeros((3, 3), bool)]
    full = [np.ones((3, 3), bool)]
    m = [np.random.default_rng(0).random((3, 3))]
    assert math.isnan(M.aupro(m, empty)) and math.isnan(M.pixel_auroc(m, empty))
    assert math.isnan(M.aupro(m, full)) and math.isnan(M.pixel_auroc(m, full))
    assert math.isnan(M.pixel_f1_max(m, empty))
    with pytest.raises(ValueError, match="defect region"):
        M.pro_curve(m, empty)


@pytest.mark.parametrize("call, match", [
    (lambda: M.image_auroc([0.1, 0.2, 0.3], [0, 1]), "labels has 2"),
    (lambda: M.image_auroc([], []), "empty"),
    (lambda: M.image_auroc([0.1, float("nan")], [0, 1]), "non-finite"),
    (lambda: M.image_auroc([0.1, 0.2], [0, 2]), "0 .normal. or 1"),
    (lambda: M.aupro([np.zeros((2, 2))], [np.zeros((2, 3), bool)]), "mask resolution"),
    (lambda: M.aupro([np.zeros(4)], [np.zeros(4, bool)]), "2-D"),
    (lambda: M.aupro([np.zeros((2, 2))], [np.zeros((2, 2), bool)] * 2), "masks has 2"),
    (lambda: M.aupro([np.zeros((2, 2))], [np.eye(2, dtype=bool)], max_fpr=0), "max_fpr"),
    (lambda: M.compute_metrics(["good", "scratch"], [0.1]), "scores has 1"),
    (lambda: M.compute_metrics(["good", "scratch"], maps=[np.zeros((2, 2))] * 2,
                               masks=[None, None]), r"masks\[1\] is None"),
    (lambda: M.compute_metrics(["good"], maps=[np.zeros((2, 2))]), "masks are needed"),
    (lambda: M.compute_metrics(["good", "x"]), "give scores, maps"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------------------------------------
# compute_metrics / mean_metrics
# ------------------------------------------------------------------------------------------------

def test_compute_metrics_structure_and_per_defect():
    rng = np.random.default_rng(1)
    defects = ["good"] * 4 + ["scratch"] * 3 + ["hole"] * 2
    masks, maps = [], []
    for d in defects:
        g = np.zeros((8, 9), bool)
        if d != "good":
            y, x = rng.integers(0, 6, 2)
            g[y:y + 2, x:x + 3] = True
        masks.append(g if d != "good" else None)
        noise = rng.random(g.shape) * 0.5
        # scratch: perfectly localised; hole: inverted (its pixels get low scores)
        maps.append(noise + (0.6 * g if d == "scratch" else -0.5 * g))
    res = M.compute_metrics(defects, maps=maps, masks=masks)
    json.dumps(res, allow_nan=False)   # ready for metrics.json
    assert set(M.METRIC_KEYS) <= set(res)
    assert res["n_images"] == 9 and res["n_good"] == 4 and res["n_defect"] == 5
    assert sorted(res["per_defect"]) == ["hole", "scratch"]
    sc, ho = res["per_defect"]["scratch"], res["per_defect"]["hole"]
    assert sc["n_images"] == 7 and sc["n_defect"] == 3
    assert sc["aupro"] == pytest.approx(1.0) and sc["pixel_auroc"] == pytest.approx(1.0)
    assert ho["aupro"] == pytest.approx(0.0) and ho["pixel_auroc"] < 0.05
    # the per-defect block equals computing the metrics on that subset directly
    idx = [i for i, d in enumerate(defects) if d in ("good", "hole")]
    sub_masks = [masks[i] for i in idx]
    assert ho["aupro"] == pytest.approx(M.aupro([maps[i] for i in idx], sub_masks))
    scores = [m.max() for m in maps]
    assert res["image_auroc"] == pytest.approx(
        M.image_auroc(scores, [int(d != "good") for d in defects]))
    assert res["f1_max"] == pytest.approx(M.f1_max(scores, [int(d != "good") for d in defects]))


def test_compute_metrics_nan_becomes_none():
    # only good images: every metric is undefined -> None; no per-defect blocks
    res = M.compute_metrics(["good", "good"], [0.1, 0.2], maps=[np.zeros((2, 2))] * 2,
                            masks=[None, None])
    assert all(res[k] is None for k in M.METRIC_KEYS)
    assert res["per_defect"] == {}
    # no good images: image AUROC undefined, pixel metrics fine
    g = np.array([[1, 0], [0, 0]], bool)
    res = M.compute_metrics(["x"], maps=[g * 1.0], masks=[g])
    assert res["image_auroc"] is None and res["pixel_auroc"] == pytest.approx(1.0)
    json.dumps(res, allow_nan=False)


def test_compute_metrics_scores_only():
    res = M.compute_metrics(["good", "good", "a", "b"], [0.1, 0.2, 0.9, 0.15])
    assert res["image_auroc"] == pytest.approx(0.75)
    assert res["pixel_auroc"] is None and res["aupro"] is None
    assert res["per_defect"]["a"]["image_auroc"] == 1.0
    assert res["per_defect"]["b"]["image_auroc"] == 0.5


def test_mean_metrics():
    a = {"image_auroc": 0.8, "pixel_auroc": 0.9, "aupro": None, "f1_max": 0.5,
         "pixel_f1_max": 0.2}
    b = {"image_auroc": 0.6, "pixel_auroc": 0.7, "aupro": None, "f1_max": 0.7,
         "pixel_f1_max": None}
    m = M.mean_metrics({"x": a, "y": b})
    assert m["image_auroc"] == pytest.approx(0.7) and m["pixel_auroc"] == pytest.approx(0.8)
    assert m["aupro"] is None and m["pixel_f1_max"] == pytest.approx(0.2)
    assert m["n_categories"] == 2
    assert M.mean_metrics([a, b]) == m


def test_aupro_is_fast_on_100_images_of_256():
    rng = np.random.default_rng(0)
    masks = []
    for i in range(100):
        g = np.zeros((256, 256), bool)
        if i >= 40:
            for _ in range(rng.integers(1, 4)):
                y, x = rng.integers(0, 220, 2)
                g[y:y + rng.integers(4, 36), x:x + rng.integers(4, 36)] = True
        masks.append(g)
    maps = [(rng.random((256, 256)) + g).astype(np.float32) for g in masks]
    t = time.perf_counter()
    v = M.aupro(maps, masks)
    elapsed = time.perf_counter() - t
    assert 0.5 < v <= 1.0
    assert elapsed < 30, f"AU-PRO on 100 images of 256x256 took {elapsed:.1f} s"


@settings(max_examples=40, deadline=None)
@given(pixel_cases())
def test_pixel_metrics_match_sklearn(case):
    from sklearn.metrics import precision_recall_curve, roc_auc_score

    maps, masks = case
    s = np.concatenate([m.ravel() for m in maps])
    g = np.concatenate([m.ravel() for m in masks])
    assume(g.any() and not g.all())
    assert M.pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(g, s), abs=1e-12)
    p, r, _ = precision_recall_curve(g, s)
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0)
    assert M.pixel_f1_max(maps, masks) == pytest.approx(f1.max(), abs=1e-12)


def test_per_defect_blocks_reuse_the_sort_correctly():
    rng = np.random.default_rng(3)
    defects = ["good", "a", "good", "b", "a", "b", "good"]
    masks = [None if d == "good" else rng.random((5, 6)) < 0.3 for d in defects]
    for i, d in enumerate(defects):
        if d != "good" and not masks[i].any():
            masks[i][0, 0] = True
    maps = [rng.integers(0, 5, (5, 6)) / 5 for _ in defects]
    res = M.compute_metrics(defects, maps=maps, masks=masks)
    for d in ("a", "b"):
        idx = [i for i, x in enumerate(defects) if x in (d, "good")]
        mm, gg = [maps[i] for i in idx], [masks[i] for i in idx]
        gg0 = [np.zeros((5, 6), bool) if g is None else g for g in gg]
        block = res["per_defect"][d]
        assert block["aupro"] == pytest.approx(brute_aupro(mm, gg0), abs=1e-12)
        s = np.concatenate([m.ravel() for m in mm])
        g = np.concatenate([m.ravel() for m in gg0])
        assert block["pixel_auroc"] == pytest.approx(brute_auroc(s, g), abs=1e-12)
        assert block["pixel_f1_max"] == pytest.approx(brute_f1max(s, g), abs=1e-12)
