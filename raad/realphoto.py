"""A real-photograph benchmark in the MVTec AD layout: defects drawn onto packaged photographs.

The photographs ship inside packages (scikit-image's ``skimage.data``, scikit-learn's sample
images), so the set is rebuilt offline, byte for byte, from ``(seed, category)``. Each category
is one photograph: training crops come from one region of it and test crops from another,
disjoint, region (16 native pixels apart), each crop resized to
``size`` (default 256, the detector's default resolution). Photometric jitter (brightness,
contrast, a gentle illumination gradient and sensor noise) makes each crop a new exposure.

Defects are of MVTec AD's kinds (:data:`DEFECTS`): scratch, crack, hole, pits, contamination,
stain, burn, dent (a local distortion of the surface), fold, a piece of the pattern rotated in
place, a missing part and a misplaced part. They are drawn at the output resolution on the
photograph's own pixels (a dent warps them, a rotated piece moves them, a stain multiplies
them), in grey on grey photographs.

Masks are exact: the mask is the defect's region (its changed pixels, closed and with holes
filled) and every pixel outside it is bit-identical to the defect-free crop. A draw whose
change is faint against the photograph's own variation around it is redrawn (up to 20 draws,
the most visible kept).

:data:`REAL_CATEGORIES` marks some categories ``held_out``: no detector choice is tuned on them
(report them separately).
"""

from __future__ import annotations

import os
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from . import dataset as D
from .io import atomic_write_text

REAL_VERSION = 1

# a dent or a rotated piece shows on a surface with a pattern or a direction, not in grass
IRREGULAR_DEFECTS = ("scratch", "crack", "hole", "pits", "contamination", "stain", "burn")
TEXTURE_DEFECTS = IRREGULAR_DEFECTS + ("dent", "rotated")
PARTS_DEFECTS = ("scratch", "pits", "contamination", "stain", "dent", "missing", "misplaced")
PRINT_DEFECTS = ("scratch", "contamination", "stain", "fold", "missing", "misplaced")

DEFECTS = {
    "scratch": "a thin curved line, brighter or darker than the surface, of varying strength",
    "crack": "a dark, jagged, branching line",
    "hole": "a dark irregular opening with a lit rim",
    "pits": "a cluster of small dark pits",
    "contamination": "foreign material: a blob of another surface, or a fibre",
    "stain": "a soft-edged patch of changed colour or brightness",
    "burn": "a dark scorched patch with a soft edge and reduced texture",
    "dent": "a local distortion of the surface (the pixels pushed outwards or inwards)",
    "fold": "a crease: the surface displaced across a line, with a shaded edge",
    "rotated": "a piece of the pattern cut out and put back rotated",
    "missing": "a part removed (a coin, a word), filled with the surroundings",
    "misplaced": "a part shifted from its place (a coin, a word)",
}

# Regions are lists of (y0, y1, x0, x1) in the photograph's native pixels; a crop (``crop``
# native pixels) lies wholly inside one region. Surfaces are split into quadrants, training
# crops from two diagonal ones and test crops from the other two (16 px apart), so both see the
# photograph's top and bottom; printed matter is split into a left and a right half. ``turns``:
# each crop (training and test alike) is turned by a random multiple of 90° and maybe mirrored
# ("any": surfaces without a direction) or turned by 0 or 180° ("half": brick courses stay
# upright), so the few hundred native pixels of a photograph show more of their variety.
_Q = 512 // 2
_TRAIN_Q = [(0, _Q - 8, 0, _Q - 8), (_Q + 8, 512, _Q + 8, 512)]
_TEST_Q = [(0, _Q - 8, _Q + 8, 512), (_Q + 8, 512, 0, _Q - 8)]

REAL_CATEGORIES = {
    "brick": dict(source="skimage:brick", kind="texture (regular)", crop=160,
                  train=_TRAIN_Q, test=_TEST_Q, defects=TEXTURE_DEFECTS, turns="half"),
    "grass": dict(source="skimage:grass", kind="texture (irregular)", crop=160,
                  train=_TRAIN_Q, test=_TEST_Q, defects=IRREGULAR_DEFECTS, turns="any"),
    "gravel": dict(source="skimage:gravel", kind="texture (irregular)", crop=160,
                   train=_TRAIN_Q, test=_TEST_Q, defects=IRREGULAR_DEFECTS, turns="any"),
    "tissue": dict(source="skimage:immunohistochemistry", kind="texture (colour, irregular)",
                   crop=192, train=_TRAIN_Q, test=_TEST_Q, defects=TEXTURE_DEFECTS, turns="any"),
    "coins": dict(source="skimage:coins", kind="parts on a background", crop=128,
                  train=[(0, 144, 0, 184), (159, 303, 200, 384)],
                  test=[(0, 144, 200, 384), (159, 303, 0, 184)], defects=PARTS_DEFECTS),
    "page": dict(source="skimage:page", kind="printed matter", crop=96,
                 train=[(0, 191, 0, 186)], test=[(0, 191, 198, 384)], defects=PRINT_DEFECTS),
    # held out: no detector choice is tuned on these
    "moon": dict(source="skimage:moon", kind="texture (irregular)", crop=160,
                 train=_TRAIN_Q, test=_TEST_Q, defects=IRREGULAR_DEFECTS, turns="any",
                 held_out=True),
    "retina": dict(source="skimage:retina", kind="structure (vessels)", crop=224,
                   train=[(250, 697, 250, 697), (713, 1160, 713, 1160)],
                   test=[(250, 697, 713, 1160), (713, 1160, 250, 697)],
                   defects=TEXTURE_DEFECTS, held_out=True),
    "chalkboard": dict(source="skimage:text", kind="printed matter (handwriting)", crop=96,
                       train=[(0, 172, 0, 216)], test=[(0, 172, 232, 448)], defects=PRINT_DEFECTS,
                       held_out=True),
}

#: the photograph used for foreign material (contamination) in each category: another surface
_FOREIGN = {"brick": "gravel", "grass": "gravel", "gravel": "grass", "tissue": "retina",
            "coins": "grass", "page": "grass", "moon": "brick", "retina": "tissue",
            "chalkboard": "gravel"}

_MIN_CHANGE = 3 / 255      # a pixel changed by less than this (every channel) is unchanged
_VISIBLE = 1.5             # mean change in the mask over the surroundings' luminance std
_DRAWS = 20


def held_out(category: str) -> bool:
    return bool(REAL_CATEGORIES[category].get("held_out", False))


# ------------------------------------------------------------------------------------------------
# Photographs and crops
# ------------------------------------------------------------------------------------------------

def _need_skimage():
    try:
        import skimage.data  # noqa: F401
    except ImportError as e:
        raise D.DataError("the real-photo set needs scikit-image (its photographs ship inside "
                          "it): pip install scikit-image") from e
    return skimage.data


@lru_cache(maxsize=None)
def photograph(category: str) -> np.ndarray:
    """The category's photograph as float32 RGB in [0, 1] (grey photographs repeated ×3)."""
    pkg, name = REAL_CATEGORIES[category]["source"].split(":")
    if pkg == "skimage":
        img = np.asarray(getattr(_need_skimage(), name)())
    else:  # pragma: no cover - every source is skimage today
        raise ValueError(f"unknown photograph source {pkg!r}")
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return img[..., :3].astype(np.float32) / 255.0


def is_grey(category: str) -> bool:
    p = photograph(category)
    return bool(np.array_equal(p[..., 0], p[..., 1]) and np.array_equal(p[..., 1], p[..., 2]))


def _stable_id(name: str) -> int:
    return zlib.crc32(name.encode())


def _rngs(seed: int, category: str, split: str, defect: str, index: int):
    """(crop stream, defect stream): the defect-free crop is the same whatever the defect."""
    ss = np.random.SeedSequence([int(seed), _stable_id(category), _stable_id(split),
                                 _stable_id(defect), int(index)])
    crop_ss, defect_ss = ss.spawn(2)
    return np.random.default_rng(crop_ss), np.random.default_rng(defect_ss)


def _resize(a: np.ndarray, size: int) -> np.ndarray:
    chans = [np.asarray(Image.fromarray(a[..., c], mode="F").resize((size, size), Image.BICUBIC))
             for c in range(a.shape[-1])]
    return np.clip(np.stack(chans, axis=-1), 0.0, 1.0)


def crop_box(category: str, split: str, rng) -> tuple[int, int, int]:
    """(row, column, side) in native pixels of a random crop wholly inside one of the
    ``split``'s regions."""
    spec = REAL_CATEGORIES[category]
    regions = spec["train" if split == "train" else "test"]
    y0, y1, x0, x1 = regions[int(rng.integers(len(regions)))]
    c = spec["crop"]
    return int(rng.integers(y0, y1 - c + 1)), int(rng.integers(x0, x1 - c + 1)), c


def crop(category: str, split: str, rng, size: int) -> np.ndarray:
    """A random crop of the category's ``split`` region, resized to ``size``, with photometric
    jitter (a new exposure of the same surface)."""
    spec = REAL_CATEGORIES[category]
    y, x, c = crop_box(category, split, rng)
    patch = photograph(category)[y:y + c, x:x + c]
    turns = spec.get("turns")
    if turns == "any":
        patch = np.rot90(patch, int(rng.integers(4)))
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
    elif turns == "half" and rng.random() < 0.5:
        patch = patch[::-1, ::-1]
    img = _resize(np.ascontiguousarray(patch), size)
    gain = rng.uniform(0.92, 1.08)
    offset = rng.uniform(-0.03, 0.03)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    light = 1.0 + rng.uniform(0, 0.06) * (np.cos(angle) * xx + np.sin(angle) * yy)
    img = img * gain * light[..., None] + offset
    noise = rng.normal(0, 0.008, (size, size, 1))
    if not is_grey(category):
        noise = noise + rng.normal(0, 0.004, (size, size, 3))
    return np.clip(img + noise, 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Defect drawing: each returns the defective image (float, before masking)
# ------------------------------------------------------------------------------------------------

def _lum(img):
    return img.mean(axis=-1)


def _bezier(rng, S, length, bend=0.35, n=48, margin=24):
    margin = min(margin, S // 4)
    p0 = rng.uniform(margin, S - margin, 2)
    a = rng.uniform(0, 2 * np.pi)
    d = np.array([np.cos(a), np.sin(a)]) * length
    normal = np.array([-d[1], d[0]]) / max(length, 1e-6)
    p2 = p0 + d
    p1 = p0 + d / 2 + normal * rng.uniform(-bend, bend) * length
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def _dist_to_polyline(S, pts):
    """Distance of every pixel to a polyline (pts: (n, 2) as (x, y))."""
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    best = np.full((S, S), np.inf, np.float32)
    for a, b in zip(pts[:-1], pts[1:]):
        ab = b - a
        t = ((xx - a[0]) * ab[0] + (yy - a[1]) * ab[1]) / max(float(ab @ ab), 1e-9)
        t = np.clip(t, 0, 1)
        d = np.hypot(xx - (a[0] + t * ab[0]), yy - (a[1] + t * ab[1]))
        best = np.minimum(best, d)
    return best


def _line_alpha(S, pts, width):
    return np.clip(width / 2 + 0.5 - _dist_to_polyline(S, pts), 0, 1)


def _blob(rng, S, centre, radius, irregular=0.35, soft=1.0):
    """An irregular disk's coverage in [0, 1] (a radius modulated by a few harmonics)."""
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    dx, dy = xx - centre[0], yy - centre[1]
    th = np.arctan2(dy, dx)
    r = np.full_like(th, radius)
    for k in (2, 3, 5):
        r = r * (1 + irregular / k * np.cos(k * th + rng.uniform(0, 2 * np.pi)))
    return np.clip((r - np.hypot(dx, dy)) / soft + 0.5, 0, 1)


def _smooth_noise(rng, S, sigma):
    n = ndimage.gaussian_filter(rng.normal(0, 1, (S, S)), sigma)
    return n / max(float(n.std()), 1e-9)


def _point(rng, S, margin, where=None):
    if where is not None and where.any():
        ys, xs = np.nonzero(where)
        i = int(rng.integers(len(ys)))
        return np.array([xs[i], ys[i]], np.float64)
    margin = min(margin, S // 4)
    return rng.uniform(margin, S - margin, 2)


def _tint(rng, grey):
    """A multiplicative colour for a stain or a burn: grey on grey photographs."""
    if grey:
        return np.full(3, rng.uniform(0.55, 0.8) if rng.random() < 0.7 else rng.uniform(1.2, 1.4))
    hues = np.array([[1.0, 0.8, 0.5], [0.7, 0.85, 1.0], [1.0, 0.65, 0.65], [0.75, 1.0, 0.7]])
    return hues[rng.integers(len(hues))] * rng.uniform(0.7, 0.95)


def _d_scratch(img, rng, ctx):
    S = img.shape[0]
    pts = _bezier(rng, S, rng.uniform(0.2, 0.5) * S)
    a = _line_alpha(S, pts, rng.uniform(1.0, 2.2))
    sign = 1 if rng.random() < 0.6 else -1
    strength = rng.uniform(0.25, 0.5) * (0.6 + 0.4 * _smooth_noise(rng, S, 12).clip(-1, 1))
    return img + (sign * a * strength)[..., None]


def _d_crack(img, rng, ctx):
    S = img.shape[0]
    a = np.zeros((S, S), np.float32)
    p = rng.uniform(0.25 * S, 0.75 * S, 2)
    heading = rng.uniform(0, 2 * np.pi)
    branches = [(p, heading, rng.uniform(0.25, 0.45) * S)]
    while branches:
        p, heading, length = branches.pop()
        pts = [p]
        for _ in range(int(length / 4)):
            heading += rng.normal(0, 0.45)
            p = p + 4 * np.array([np.cos(heading), np.sin(heading)])
            pts.append(p)
            if rng.random() < 0.04 and length > 0.1 * S:
                branches.append((p, heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1),
                                 length * 0.4))
        a = np.maximum(a, _line_alpha(S, np.array(pts), rng.uniform(1.2, 2.4)))
    return img * (1 - rng.uniform(0.55, 0.8) * a)[..., None]


def _d_hole(img, rng, ctx):
    S = img.shape[0]
    c = _point(rng, S, 30, ctx.get("parts"))
    r = rng.uniform(6, 14)
    cov = _blob(rng, S, c, r, irregular=0.25)
    yy, xx = np.mgrid[0:S, 0:S]
    light = np.clip(((xx - c[0]) + (yy - c[1])) / r, -1, 1)          # lit from one side
    rim = _blob(rng, S, c, r + 2.0, irregular=0.0) - _blob(rng, S, c, r - 0.5, irregular=0.0)
    inside = 0.06 + 0.05 * np.clip(_smooth_noise(rng, S, 2), -2, 2)
    out = img * (1 - cov)[..., None] + (cov * inside)[..., None]
    return out + (np.clip(rim, 0, 1) * 0.25 * np.clip(light, 0, 1))[..., None]


def _d_pits(img, rng, ctx):
    S = img.shape[0]
    centre = _point(rng, S, 40, ctx.get("parts"))
    spread = rng.uniform(10, 22)
    dark = np.zeros((S, S), np.float32)
    for _ in range(int(rng.integers(6, 16))):
        c = centre + rng.normal(0, spread, 2)
        dark = np.maximum(dark, _blob(rng, S, c, rng.uniform(1.2, 2.6), irregular=0.2, soft=0.8))
    return img * (1 - rng.uniform(0.45, 0.7) * dark)[..., None]


def _d_contamination(img, rng, ctx):
    S = img.shape[0]
    if rng.random() < 0.4:   # a fibre: a long thin curly dark or light thread
        pts = _bezier(rng, S, rng.uniform(0.3, 0.6) * S, bend=0.8)
        a = _line_alpha(S, pts, rng.uniform(1.0, 1.8))
        col = rng.uniform(0.05, 0.2) if rng.random() < 0.7 else rng.uniform(0.85, 1.0)
        return img * (1 - a)[..., None] + (a * col)[..., None]
    c = _point(rng, S, 30, ctx.get("parts"))
    cov = _blob(rng, S, c, rng.uniform(7, 16), irregular=0.5, soft=1.2)
    foreign = ctx["foreign"]
    shift = rng.uniform(-0.25, 0.25)
    stuff = np.clip(foreign * rng.uniform(0.6, 1.2) + shift, 0, 1)
    if not ctx["grey"]:
        stuff = stuff * _tint(rng, False)
    return img * (1 - cov)[..., None] + stuff * cov[..., None]


def _d_stain(img, rng, ctx):
    S = img.shape[0]
    c = _point(rng, S, 30, ctx.get("parts"))
    cov = ndimage.gaussian_filter(_blob(rng, S, c, rng.uniform(12, 30), irregular=0.6), 3)
    cov = cov * rng.uniform(0.6, 1.0)
    tint = _tint(rng, ctx["grey"])
    return img * (1 - cov[..., None] * (1 - tint))


def _d_burn(img, rng, ctx):
    S = img.shape[0]
    c = _point(rng, S, 30)
    cov = ndimage.gaussian_filter(_blob(rng, S, c, rng.uniform(10, 22), irregular=0.5), 4)
    cov = np.clip(cov * 1.3, 0, 1)
    local = ndimage.gaussian_filter(img, (6, 6, 0))
    flat = img * 0.4 + local * 0.6                                   # the texture burnt away
    char = np.array([0.18, 0.12, 0.08]) if not ctx["grey"] else np.full(3, 0.14)
    burnt = flat * 0.35 + char * 0.5
    return img * (1 - cov[..., None]) + burnt * cov[..., None]


def _warp(img, dx, dy):
    S = img.shape[0]
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float64)
    out = np.empty_like(img)
    for ch in range(img.shape[-1]):
        out[..., ch] = ndimage.map_coordinates(img[..., ch], [yy + dy, xx + dx], order=3,
                                               mode="reflect")
    return out


def _d_dent(img, rng, ctx):
    S = img.shape[0]
    c = _point(rng, S, 40, ctx.get("parts"))
    r = rng.uniform(18, 34)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float64)
    dx, dy = xx - c[0], yy - c[1]
    d = np.hypot(dx, dy)
    w = np.clip(1 - (d / r) ** 2, 0, 1) ** 2
    k = rng.uniform(0.35, 0.6) * (1 if rng.random() < 0.5 else -1)    # pulls in or pushes out
    out = _warp(img, k * w * dx, k * w * dy)
    shade = 1 + 0.2 * w * np.clip((dx + dy) / r, -1, 1)               # a dent catches light
    return out * shade[..., None]


def _d_fold(img, rng, ctx):
    S = img.shape[0]
    pts = _bezier(rng, S, rng.uniform(0.35, 0.7) * S, bend=0.15)
    a, b = pts[0], pts[-1]
    n = np.array([-(b - a)[1], (b - a)[0]])
    n /= max(np.linalg.norm(n), 1e-9)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float64)
    side = (xx - a[0]) * n[0] + (yy - a[1]) * n[1]
    dist = _dist_to_polyline(S, pts)
    along = np.clip(1 - dist / (0.2 * S), 0, 1)                        # fades along the line
    shift = rng.uniform(2.5, 5.0) * np.exp(-np.abs(side) / 10) * along
    out = _warp(img, shift * n[0], shift * n[1])
    crease = np.exp(-(side / 1.5) ** 2) * along
    return out * (1 - 0.35 * crease)[..., None]


def _d_rotated(img, rng, ctx):
    S = img.shape[0]
    c = _point(rng, S, 40)
    r = rng.uniform(14, 28)
    angle = rng.choice([90.0, 180.0, 270.0]) if rng.random() < 0.5 else rng.uniform(30, 150)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float64)
    t = np.deg2rad(angle)
    dx, dy = xx - c[0], yy - c[1]
    sx = c[0] + np.cos(t) * dx - np.sin(t) * dy
    sy = c[1] + np.sin(t) * dx + np.cos(t) * dy
    rot = np.stack([ndimage.map_coordinates(img[..., ch], [sy, sx], order=3, mode="reflect")
                    for ch in range(3)], axis=-1)
    cov = np.clip(r - np.hypot(dx, dy) + 0.5, 0, 1)
    return img * (1 - cov[..., None]) + rot * cov[..., None]


def _fill(img, region, sigma):
    """The region filled from its surroundings (normalised convolution, the scale doubled until
    every pixel is reached), as a missing part."""
    keep = (~region).astype(np.float64)
    out = img.copy()
    todo = region.copy()
    while todo.any():
        num = ndimage.gaussian_filter(img * keep[..., None], (sigma, sigma, 0))
        den = ndimage.gaussian_filter(keep, sigma)
        ok = todo & (den > 0.05)
        out[ok] = num[ok] / den[ok][:, None]
        todo &= ~ok
        sigma *= 2
    return out


def _pick_part(rng, ctx, min_area=60):
    """A part (a coin, a word) wholly inside the image: its boolean region, or None."""
    labels = ctx.get("part_labels")
    if labels is None:
        return None
    S = labels.shape[0]
    ids = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None or sl[0].start < 6 or sl[1].start < 6 or sl[0].stop > S - 6 or sl[1].stop > S - 6:
            continue
        if (labels[sl] == i).sum() >= min_area:
            ids.append(i)
    if not ids:
        return None
    return ndimage.binary_dilation(labels == ids[int(rng.integers(len(ids)))], iterations=3)


def _d_missing(img, rng, ctx):
    region = _pick_part(rng, ctx)
    if region is None:   # no whole part in view: a patch of the surface worn away
        S = img.shape[0]
        region = _blob(rng, S, _point(rng, S, 30), rng.uniform(8, 16)) > 0.5
    return _fill(img, region, 4.0)


def _d_misplaced(img, rng, ctx):
    region = _pick_part(rng, ctx)
    if region is None:
        return _d_rotated(img, rng, ctx)
    v = rng.uniform(6, 14) * np.array([np.cos(a := rng.uniform(0, 2 * np.pi)), np.sin(a)])
    hole = _fill(img, region, 4.0)
    moved = ndimage.shift(region.astype(np.float64), (v[1], v[0]), order=1) > 0.5
    part = np.stack([ndimage.shift(img[..., ch], (v[1], v[0]), order=3, mode="reflect")
                     for ch in range(3)], axis=-1)
    return np.where(moved[..., None], part, hole)


_DRAW = {"scratch": _d_scratch, "crack": _d_crack, "hole": _d_hole, "pits": _d_pits,
         "contamination": _d_contamination, "stain": _d_stain, "burn": _d_burn, "dent": _d_dent,
         "fold": _d_fold, "rotated": _d_rotated, "missing": _d_missing, "misplaced": _d_misplaced}
assert set(_DRAW) == set(DEFECTS)


def _parts(category: str, img: np.ndarray):
    """Labelled parts (coins, words) of a crop, for the part defects; None for surfaces."""
    kind = REAL_CATEGORIES[category]["kind"]
    lum = ndimage.gaussian_filter(_lum(img), 1.0)
    if kind.startswith("parts"):
        from skimage.filters import threshold_otsu
        fg = ndimage.binary_fill_holes(lum > threshold_otsu(lum))
        fg = ndimage.binary_opening(fg, iterations=2)
    elif kind.startswith("printed"):
        from skimage.filters import threshold_otsu
        local = ndimage.uniform_filter(lum, 31)
        ink = lum < local - 0.08 if category == "page" else np.abs(lum - local) > 0.08
        fg = ndimage.binary_dilation(ink, structure=np.ones((3, 9), bool))   # letters -> words
    else:
        return None
    labels, _ = ndimage.label(fg)
    return labels


def _visibility(out, clean, mask):
    ring = ndimage.binary_dilation(mask, iterations=6) & ~mask
    texture = _lum(clean)[ring].std() if ring.any() else 0.0
    change = np.abs(out - clean).max(axis=-1)[mask].mean()
    return float(change / max(texture, 1.0 / 255))


def real_sample(category: str, split: str, defect: str, index: int, *, seed: int = 0,
                size: int = 256, apply_defect: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One sample: ``(image uint8 (S, S, 3), mask bool (S, S))``, fixed by its arguments.
    ``apply_defect=False``: its defect-free twin (the same crop and exposure, empty mask)."""
    if category not in REAL_CATEGORIES:
        raise ValueError(f"unknown real-photo category {category!r}; known: {list(REAL_CATEGORIES)}")
    spec = REAL_CATEGORIES[category]
    if defect != D.GOOD and defect not in spec["defects"]:
        raise ValueError(f"category {category!r} has no defect {defect!r}; it has {list(spec['defects'])}")
    if split not in ("train", "test") or (split == "train" and defect != D.GOOD):
        raise ValueError(f"split must be 'train' (defect 'good' only) or 'test', got "
                         f"split={split!r} defect={defect!r}")
    crop_rng, drng = _rngs(seed, category, split, defect, index)
    clean = crop(category, split, crop_rng, int(size))
    clean_u8 = np.rint(clean * 255).astype(np.uint8)
    mask = np.zeros(clean.shape[:2], bool)
    if defect == D.GOOD or not apply_defect:
        return clean_u8, mask
    grey = is_grey(category)
    ctx = {"grey": grey}
    if defect == "contamination":   # another photograph's surface, from a stream of its own
        frng = np.random.default_rng([int(seed), _stable_id(category), 7, int(index)])
        ctx["foreign"] = crop(_FOREIGN[category], "train", frng, int(size))
    labels = _parts(category, clean)
    if labels is not None:
        ctx["part_labels"] = labels
        ctx["parts"] = ndimage.binary_erosion(labels > 0, iterations=4)
    best = None
    for _ in range(_DRAWS):
        out = _DRAW[defect](clean.astype(np.float64), drng, ctx)
        if grey:
            out = np.repeat(out.mean(axis=-1, keepdims=True), 3, axis=-1)
        out_u8 = np.rint(np.clip(out, 0, 1) * 255).astype(np.uint8)
        changed = (np.abs(out_u8.astype(np.int16) - clean_u8).max(axis=-1) >= round(_MIN_CHANGE * 255))
        m = ndimage.binary_fill_holes(ndimage.binary_closing(changed, iterations=2)) & \
            ndimage.binary_dilation(changed, iterations=2) | changed
        if m.sum() < 12:
            continue
        vis = _visibility(out_u8 / 255.0, clean_u8 / 255.0, m)
        if best is None or vis > best[0]:
            best = (vis, out_u8, m)
        if vis >= _VISIBLE:
            break
    if best is None:   # pragma: no cover - every defect changes more than 12 pixels
        raise RuntimeError(f"{category}/{defect}/{index}: no draw changed the image")
    _, out_u8, mask = best
    img = np.where(mask[..., None], out_u8, clean_u8)
    return img, mask


def make_real(out_root: str | os.PathLike, categories: Sequence[str] | None = None,
              seed: int = 0, n_train: int = 60, n_test_good: int = 20, n_test_defect: int = 6,
              size: int = 256, *, overwrite: bool = False, show: bool = True) -> list[Path]:
    """Write real-photo categories in the MVTec layout under ``out_root``; return their folders.

    Per category: ``n_train`` training crops, ``n_test_good`` normal test crops and
    ``n_test_defect`` crops per defect type, ``size`` × ``size`` RGB PNG, 0/255 masks, and a
    ``meta.json`` (source photograph, regions, defects, ``held_out``). Same arguments ->
    byte-identical files. Each category is built in a temporary folder and renamed into place;
    an existing category folder is an error unless ``overwrite``.
    """
    from tqdm.auto import tqdm

    out_root = Path(out_root)
    cats = list(REAL_CATEGORIES) if categories is None else list(categories)
    D.check_generator_args("real-photo", REAL_CATEGORIES, cats, n_train, n_test_good, n_test_defect,
                           size, 96, seed)
    _need_skimage()

    def fill(cat: str, folder: Path) -> None:
        spec = REAL_CATEGORIES[cat]
        n = n_train + n_test_good + n_test_defect * len(spec["defects"])
        with tqdm(total=n, desc=f"real photos: {cat}", disable=not show, leave=False) as bar:
            counts = D.write_samples(folder, spec["defects"], (n_train, n_test_good, n_test_defect),
                                     lambda split, defect, i: real_sample(cat, split, defect, i,
                                                                          seed=seed, size=size),
                                     progress=bar.update)
        atomic_write_text(folder / "meta.json", D._json({
            "category": cat, "kind": spec["kind"], "held_out": held_out(cat),
            "generator": "raad.realphoto.make_real", "version": REAL_VERSION,
            "photograph": spec["source"], "crop_native_px": spec["crop"],
            "train_regions_yx": [list(r) for r in spec["train"]],
            "test_regions_yx": [list(r) for r in spec["test"]],
            "seed": int(seed), "size": int(size), "counts": counts,
            "defects": {d: DEFECTS[d] for d in spec["defects"]},
            "mask_rule": "mask = the defect's region (its changed pixels, closed, holes "
                         "filled); every pixel outside it equals the defect-free crop"}))
    return D.write_categories(out_root, cats, overwrite, fill)
