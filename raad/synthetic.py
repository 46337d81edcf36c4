"""Synthetic categories in the MVTec AD layout, with exact masks: the data of ``raad demo``,
``raad make-data`` and the tests.

Four categories (:data:`SYNTHETIC_CATEGORIES`): two textures (``weave``, ``stone``) and two
objects (``screw`` at any angle, ``pcb`` with components at fixed places and logical defects).
Each category has a parameter sampler and a renderer; pixel defects (scratch, stain, hole,
contamination, crack) are painted over the rendered image, logical ones (chipped, missing,
swapped) change the parameters and render again. :func:`synth_sample` draws one sample,
:func:`make_synthetic` writes whole categories.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage, signal

from .dataset import GOOD, _json, check_generator_args, write_categories, write_samples
from .io import atomic_write_text

__all__ = ["SYNTHETIC_CATEGORIES", "SYNTHETIC_VERSION", "DEFECT_DESCRIPTIONS", "make_synthetic",
           "synth_sample"]

# How a sample is drawn
# ---------------------
#
# Every sample is drawn from its own seed, derived from (seed, category, split, defect, index):
# one stream draws the defect-free sample (its pose, texture, lighting and sensor noise), a second
# independent stream draws the defect. So ``synth_sample(..., apply_defect=False)`` regenerates
# the exact defect-free twin of any defect image. The mask is exactly the set of pixels whose
# value the defect changed: changes below 1.5/255 are snapped back to the defect-free value, so
# every masked pixel differs by at least one grey level after rounding (the sensor noise is the
# same in both), and no pixel outside the mask differs at all.
#
# Visibility: a pixel defect (scratch, hole, stain, contamination, crack) must change its pixels by
# at least ``_VISIBLE`` times the texture's own variation around it (mean RGB change inside the
# mask over the luminance std of the defect-free ring around it), or it is redrawn: a defect no
# inspector could see is no test of a detector. A stain must also stand out from the texture's
# own blotches of its size: its mean colour change against how much the defect-free image's mean
# colour over the stain's footprint varies from place to place, along the stain's colour (a
# matched filter's signal-to-noise ratio), at least ``_STAIN_VISIBLE`` (the first rule alone
# passes stains that are one blotch more on a mottled texture such as stone). When none of 20
# draws passes, the most visible one is kept. Logical defects (missing, swapped, chipped) are
# visible by construction. CHANGELOG.md lists what each ``SYNTHETIC_VERSION`` changed.

SYNTHETIC_VERSION = 3
_SEED_VERSION = 1   # part of every sample's seed: kept while a version change leaves the draws alike
_VISIBLE = 0.75
_STAIN_VISIBLE = 3.0

SYNTHETIC_CATEGORIES: dict[str, dict] = {
    "weave": {"kind": "texture",
              "about": "woven fabric, over/under threads at a random small angle and phase",
              "defects": ("scratch", "hole", "stain", "contamination")},
    "stone": {"kind": "texture",
              "about": "noisy stone-like multi-scale texture with grains",
              "defects": ("crack", "stain", "contamination")},
    "screw": {"kind": "object",
              "about": "a screw at a random angle (0-360 deg) and shift on a metal plate",
              "defects": ("scratch", "contamination", "chipped")},
    "pcb": {"kind": "object",
            "about": "a circuit board with components at fixed places (small shift/rotation)",
            "defects": ("missing", "swapped", "scratch", "contamination")},
}

DEFECT_DESCRIPTIONS = {
    "scratch": "thin curved line, lighter or darker than its surroundings (1-2 px wide)",
    "hole": "small irregular dark hole with a frayed lighter rim",
    "stain": "soft-edged colour blotch of varied size and low contrast",
    "contamination": "foreign particle or fibre of another colour, partly transparent",
    "crack": "thin dark branching crack (random walk)",
    "chipped": "a piece of the screw is missing: broken tip or a bite out of the head",
    "missing": "logical: one component is missing from the board (its bare pads show)",
    "swapped": "logical: two components exchanged places (LED and capacitor, or two resistors "
               "with different colour bands)",
}

_MIN_CHANGE = 1.5 / 255
_NOISE = 1.2 / 255
_LO, _HI = 0.02, 0.98


def _stable_id(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def _sample_rngs(seed: int, category: str, split: str, defect: str, index: int):
    ss = np.random.SeedSequence([int(seed), _stable_id(category), _stable_id(split),
                                 _stable_id(defect), int(index), _SEED_VERSION])
    base, dfx = ss.spawn(2)
    return np.random.default_rng(base), np.random.default_rng(dfx)


def _grid(S: int):
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float64)
    return yy, xx


def _smooth(rng, S: int, sigma: float) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal((S, S)), sigma, mode="wrap")
    return n / (n.std() + 1e-12)


def _polyline_dist(xx, yy, pts: np.ndarray) -> np.ndarray:
    d = np.full(xx.shape, np.inf)
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
        vx, vy = x1 - x0, y1 - y0
        t = np.clip(((xx - x0) * vx + (yy - y0) * vy) / (vx * vx + vy * vy + 1e-12), 0, 1)
        d = np.minimum(d, np.hypot(xx - x0 - t * vx, yy - y0 - t * vy))
    return d


def _bezier(rng, start, length: float, bend: float = 0.3, n: int = 16) -> np.ndarray:
    ang = rng.uniform(0, 2 * np.pi)
    p0 = np.asarray(start, dtype=np.float64)
    p2 = p0 + length * np.array([np.cos(ang), np.sin(ang)])
    perp = np.array([-np.sin(ang), np.cos(ang)])
    c = (p0 + p2) / 2 + perp * bend * length * rng.uniform(-1, 1)
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * c + t ** 2 * p2


def _line_alpha(xx, yy, pts, width: float) -> np.ndarray:
    return np.clip(width / 2 + 0.5 - _polyline_dist(xx, yy, pts), 0, 1)


def _blob_alpha(xx, yy, c, r: float, rng, irregular: float = 0.3, soft: float = 1.0):
    dx, dy = xx - c[0], yy - c[1]
    d, th = np.hypot(dx, dy), np.arctan2(dy, dx)
    rr = np.ones_like(d)
    for k in (2, 3, 5):
        rr += rng.uniform(0, irregular / k * 1.5) * np.cos(k * th + rng.uniform(0, 2 * np.pi))
    return np.clip((r * rr - d) / soft + 0.5, 0, 1), d / (r * rr + 1e-12)


def _light(rng, yy, xx, S, amount: float) -> np.ndarray:
    ang = rng.uniform(0, 2 * np.pi)
    g = ((xx - S / 2) * np.cos(ang) + (yy - S / 2) * np.sin(ang)) / S
    return 1 + amount * 2 * g


def _rect_cov(u, v, cx, cy, hw, hh):
    return np.clip(np.minimum(hw - np.abs(u - cx), hh - np.abs(v - cy)) + 0.5, 0, 1)


def _disk_cov(u, v, cx, cy, r):
    return np.clip(r - np.hypot(u - cx, v - cy) + 0.5, 0, 1)


def _over(img, cov, color):
    cov = cov[..., None]
    return img * (1 - cov) + cov * np.asarray(color, dtype=np.float64)


# --- textures -----------------------------------------------------------------------------------

def _weave_params(rng, S):
    s = S / 128
    p = 8 * s * rng.uniform(0.95, 1.05)
    return {"p": p, "th": np.deg2rad(rng.uniform(-4, 4)), "u0": rng.uniform(0, 2 * p),
            "v0": rng.uniform(0, 2 * p), "ju": rng.normal(0, 0.035, 97),
            "jv": rng.normal(0, 0.035, 97), "fiber": _smooth(rng, S, 0.7 * s) * 0.025,
            "light": rng.uniform(0, 2 * np.pi), "gain": rng.uniform(0.96, 1.04),
            "cw": np.array([0.86, 0.79, 0.63]) * (1 + rng.normal(0, 0.015, 3)),
            "cf": np.array([0.80, 0.74, 0.60]) * (1 + rng.normal(0, 0.015, 3))}


def _weave_render(P, S):
    yy, xx = _grid(S)
    c, sn = np.cos(P["th"]), np.sin(P["th"])
    u = (xx * c + yy * sn + P["u0"]) / P["p"]
    v = (-xx * sn + yy * c + P["v0"]) / P["p"]
    cu, cv = np.floor(u), np.floor(v)
    fu, fv = u - cu, v - cv
    pu, pv = np.sin(np.pi * fu) ** 0.5, np.sin(np.pi * fv) ** 0.5
    warp = 0.38 + 0.45 * pu * (0.8 + 0.2 * np.sin(np.pi * fv)) + P["ju"][cu.astype(int) % 97]
    weft = 0.38 + 0.45 * pv * (0.8 + 0.2 * np.sin(np.pi * fu)) + P["jv"][cv.astype(int) % 97]
    top = ((cu + cv) % 2 == 0)
    inten = np.where(top, warp, weft) + P["fiber"]
    g = ((xx - S / 2) * np.cos(P["light"]) + (yy - S / 2) * np.sin(P["light"])) / S
    inten = inten * (1 + 0.08 * g) * P["gain"]
    col = np.where(top[..., None], P["cw"], P["cf"])
    return col * inten[..., None]


def _stone_params(rng, S):
    s = S / 128
    n = (0.5 * _smooth(rng, S, 6 * s) + 0.35 * _smooth(rng, S, 2 * s)
         + 0.25 * _smooth(rng, S, 0.8 * s))
    n /= n.std()
    sp = rng.random((S, S))
    grains = ndimage.gaussian_filter((sp > 0.985) * 0.5 - (sp < 0.012) * 0.5, 0.6 * s)
    return {"n": n, "grains": grains, "tint": _smooth(rng, S, 10 * s) * 0.02,
            "base": np.array([0.55, 0.52, 0.48]) * rng.uniform(0.95, 1.05)}


def _stone_render(P, S):
    img = P["base"] + (0.075 * P["n"] + P["grains"])[..., None]
    return img + P["tint"][..., None] * np.array([1.0, 0.0, -1.0])


# --- screw --------------------------------------------------------------------------------------

def _screw_params(rng, S):
    s = S / 128
    bg = (np.array([0.30, 0.31, 0.33]) * rng.uniform(0.92, 1.08)
          + (0.03 * _smooth(rng, S, 8 * s) + 0.008 * _smooth(rng, S, 0.6 * s))[..., None])
    yy, xx = _grid(S)
    bg = bg * _light(rng, yy, xx, S, 0.05)[..., None]
    return {"cx": S / 2 + rng.uniform(-0.08, 0.08) * S, "cy": S / 2 + rng.uniform(-0.08, 0.08) * S,
            "th": rng.uniform(0, 2 * np.pi), "L": 0.50 * S * rng.uniform(0.97, 1.03),
            "rh": 0.11 * S, "w": 0.095 * S, "pitch": 0.035 * S, "phase": rng.uniform(0, 2 * np.pi),
            "gain": rng.uniform(0.93, 1.05), "bg": bg, "tip_cut": 0.0, "bite": None}


def _screw_sd(P, xx, yy):
    c, sn = np.cos(P["th"]), np.sin(P["th"])
    a = (xx - P["cx"]) * c + (yy - P["cy"]) * sn
    b = -(xx - P["cx"]) * sn + (yy - P["cy"]) * c
    L, rh, hw0 = P["L"], P["rh"], P["w"] / 2
    ah = -0.5 * (L + rh)                       # head centre on the axis
    a0, a1 = ah + 0.5 * rh, ah + 0.5 * rh + L   # shank start, (intact) tip
    taper = 0.18 * L
    hw = hw0 * np.clip((a1 - a) / taper, 0.25, 1.0)
    sd_shank = np.maximum.reduce([np.abs(b) - hw, a0 - a, a - (a1 - P["tip_cut"])])
    r = np.hypot(a - ah, b)
    sd_head = r - rh
    if P["bite"] is not None:
        ang, br = P["bite"]
        bx, by = ah + rh * np.cos(ang), rh * np.sin(ang)
        sd_head = np.maximum(sd_head, br - np.hypot(a - bx, b - by))
    return a, b, ah, r, hw0, sd_shank, sd_head


def _screw_render(P, S):
    s = S / 128
    yy, xx = _grid(S)
    # soft shadow of the whole screw, offset down-right
    *_, sds, sdh = _screw_sd(P, xx - 1.5 * s, yy - 1.5 * s)
    shadow = ndimage.gaussian_filter(np.clip(0.5 - np.minimum(sds, sdh), 0, 1), 2 * s)
    img = P["bg"] * (1 - 0.3 * shadow)[..., None]
    a, b, ah, r, hw0, sd_shank, sd_head = _screw_sd(P, xx, yy)
    cs, ch = np.clip(0.5 - sd_shank, 0, 1), np.clip(0.5 - sd_head, 0, 1)
    metal = np.array([0.74, 0.74, 0.77]) * P["gain"]
    shank = (0.55 + 0.35 * np.sqrt(np.clip(1 - (b / hw0) ** 2, 0, 1)))
    shank = shank * (0.80 + 0.20 * np.cos(2 * np.pi * (a + 0.35 * b) / P["pitch"] + P["phase"]))
    img = img * (1 - cs[..., None]) + cs[..., None] * metal * shank[..., None]
    rh = P["rh"]
    head = 0.62 + 0.30 * np.clip(1 - (r / rh) ** 2, 0, 1)
    slot = np.clip(0.13 * rh - np.abs(b) + 0.5, 0, 1) * np.clip(0.75 * rh - r + 0.5, 0, 1)
    head = head * (1 - 0.55 * slot)
    img = img * (1 - ch[..., None]) + ch[..., None] * metal * head[..., None]
    return img


def _screw_support(P, S):
    yy, xx = _grid(S)
    *_, sds, sdh = _screw_sd(P, xx, yy)
    return np.minimum(sds, sdh) < -1.0


# --- pcb ----------------------------------------------------------------------------------------

# name, kind, cx, cy, w, h (fractions of the image side; for the round capacitor w is the radius)
_PCB_PARTS = (
    ("U1", "chip", 0.50, 0.36, 0.30, 0.18),
    ("C1", "elcap", 0.20, 0.22, 0.075, 0.0),
    ("D1", "led", 0.80, 0.22, 0.08, 0.065),
    ("C2", "cap", 0.80, 0.43, 0.08, 0.065),
    ("R1", "res_rr", 0.28, 0.70, 0.14, 0.055),
    ("R2", "res_bk", 0.50, 0.70, 0.14, 0.055),
    ("R3", "res_oy", 0.72, 0.70, 0.14, 0.055),
)
_BANDS = {"res_rr": ((0.75, 0.12, 0.10), (0.75, 0.12, 0.10)),
          "res_bk": ((0.40, 0.22, 0.10), (0.08, 0.08, 0.08)),
          "res_oy": ((0.90, 0.50, 0.10), (0.85, 0.78, 0.15))}
_TRACES = (((0.20, 0.30), (0.20, 0.55), (0.28, 0.62)), ((0.36, 0.45), (0.36, 0.58)),
           ((0.64, 0.45), (0.64, 0.58), (0.72, 0.62)), ((0.66, 0.36), (0.74, 0.36), (0.80, 0.30)),
           ((0.80, 0.50), (0.80, 0.56), (0.90, 0.62), (0.90, 0.84)),
           ((0.12, 0.70), (0.12, 0.86), (0.50, 0.86), (0.50, 0.76)))
_VIAS = ((0.12, 0.12), (0.88, 0.12), (0.12, 0.88), (0.88, 0.88), (0.36, 0.58), (0.90, 0.84))
_PAD = (0.70, 0.70, 0.64)


def _pcb_params(rng, S):
    s = S / 128
    return {"dx": rng.uniform(-0.02, 0.02) * S, "dy": rng.uniform(-0.02, 0.02) * S,
            "rot": np.deg2rad(rng.uniform(-1.5, 1.5)), "gain": rng.uniform(0.95, 1.05),
            "tex": 0.012 * _smooth(rng, S, 0.7 * s) + 0.012 * _smooth(rng, S, 5 * s),
            "parts": [[name, kind, True] for name, kind, *_ in _PCB_PARTS]}


def _pcb_coords(P, S):
    yy, xx = _grid(S)
    c, sn = np.cos(P["rot"]), np.sin(P["rot"])
    x0, y0 = xx - S / 2 - P["dx"], yy - S / 2 - P["dy"]
    return x0 * c + y0 * sn + S / 2, -x0 * sn + y0 * c + S / 2   # board pixels


def _pcb_render(P, S):
    U, V = _pcb_coords(P, S)                     # board coordinates, in pixels
    sc = float(S)
    vr_lo, vr_hi, uc_lo, uc_hi = V.min(1), V.max(1), U.min(0), U.max(0)
    img = np.broadcast_to(np.array([0.16, 0.17, 0.16]), (S, S, 3)).copy()

    def paint(cov_fn, box, color):
        """Composite ``color`` with coverage ``cov_fn(U, V)``, computed only on the window of
        pixels whose board coordinates can fall within ``box`` = (u0, u1, v0, v1) + 1 px."""
        u0, u1, v0, v1 = box
        r = np.nonzero((vr_hi >= v0 - 1) & (vr_lo <= v1 + 1))[0]
        c = np.nonzero((uc_hi >= u0 - 1) & (uc_lo <= u1 + 1))[0]
        if len(r) == 0 or len(c) == 0:
            return
        w = (slice(r[0], r[-1] + 1), slice(c[0], c[-1] + 1))
        u, v = U[w], V[w]
        cov = cov_fn(u, v)[..., None]
        col = color(u, v) if callable(color) else np.asarray(color, dtype=np.float64)
        img[w] = img[w] * (1 - cov) + cov * col

    def rect(cx, cy, hw, hh, color):
        paint(lambda u, v: _rect_cov(u, v, cx, cy, hw, hh), (cx - hw, cx + hw, cy - hh, cy + hh),
              color)

    def disk(cx, cy, r, color):
        paint(lambda u, v: _disk_cov(u, v, cx, cy, r), (cx - r, cx + r, cy - r, cy + r), color)

    half = 0.46 * sc
    green = np.array([0.12, 0.40, 0.21]) + P["tex"][..., None] * np.array([0.5, 1.0, 0.6])
    board = _rect_cov(U, V, sc / 2, sc / 2, half, half)[..., None]
    img = img * (1 - board) + board * green
    for tr in _TRACES:
        pts, wd = np.asarray(tr) * sc, 0.022 * sc
        paint(lambda u, v, pts=pts: _line_alpha(u, v, pts, wd),
              (pts[:, 0].min() - wd, pts[:, 0].max() + wd, pts[:, 1].min() - wd,
               pts[:, 1].max() + wd), (0.17, 0.50, 0.27))
    for vx, vy in _VIAS:
        disk(vx * sc, vy * sc, 0.022 * sc, (0.80, 0.68, 0.30))
        disk(vx * sc, vy * sc, 0.010 * sc, (0.10, 0.10, 0.10))

    geom = {name: (cx * sc, cy * sc, w * sc, h * sc) for name, _, cx, cy, w, h in _PCB_PARTS}
    # bare pads (visible only where a part is missing)
    for name, kind, *_ in _PCB_PARTS:
        gx, gy, gw, gh = geom[name]
        if kind == "chip":
            for i in range(5):
                px_ = gx - gw / 2 + gw * (i + 0.5) / 5
                for side in (-1, 1):
                    rect(px_, gy + side * (gh / 2 + 0.02 * sc), 0.018 * sc, 0.025 * sc, _PAD)
        elif kind == "elcap":
            for side in (-1, 1):
                rect(gx + side * 0.04 * sc, gy, 0.02 * sc, 0.025 * sc, _PAD)
        else:
            for side in (-1, 1):
                rect(gx + side * gw * 0.42, gy, 0.025 * sc, gh * 0.55, _PAD)
    for name, kind, present in P["parts"]:
        if not present:
            continue
        gx, gy, gw, gh = geom[name]
        if kind == "chip":
            for i in range(5):
                px_ = gx - gw / 2 + gw * (i + 0.5) / 5
                for side in (-1, 1):
                    rect(px_, gy + side * (gh / 2 + 0.015 * sc), 0.011 * sc, 0.022 * sc,
                         (0.82, 0.82, 0.84))

            def body(u, v, gy=gy, gh=gh):
                shade = 0.10 + 0.04 * (v - gy + gh / 2) / gh
                return np.stack([shade, shade, shade * 1.08], -1)

            rect(gx, gy, gw / 2, gh / 2, body)
            disk(gx - gw * 0.38, gy - gh * 0.25, 0.014 * sc, (0.55, 0.55, 0.55))
        elif kind == "elcap":
            r = gw
            disk(gx, gy, r, (0.16, 0.24, 0.55))
            disk(gx, gy, 0.62 * r, (0.45, 0.50, 0.62))
            paint(lambda u, v: (_rect_cov(u, v, gx - 0.78 * r, gy, 0.12 * r, 0.55 * r)
                                * _disk_cov(u, v, gx, gy, r)),
                  (gx - r, gx + r, gy - r, gy + r), (0.80, 0.82, 0.86))
        elif kind in ("led", "cap"):
            color = (0.80, 0.14, 0.12) if kind == "led" else (0.78, 0.62, 0.25)
            rect(gx, gy, gw / 2, gh / 2, (0.78, 0.78, 0.80))
            rect(gx, gy, gw * 0.34, gh / 2, color)
            if kind == "led":
                disk(gx, gy, 0.018 * sc, (0.95, 0.45, 0.40))
        else:  # resistor
            rect(gx, gy, gw / 2, gh / 2, (0.80, 0.80, 0.82))
            rect(gx, gy, gw * 0.36, gh / 2, (0.78, 0.68, 0.48))
            for frac, col in zip((-0.14, 0.10), _BANDS[kind]):
                rect(gx + frac * gw, gy, 0.055 * gw, gh / 2, col)
    return img * P["gain"]


def _pcb_support(P, S):
    U, V = _pcb_coords(P, S)
    return np.minimum(0.46 * S - np.abs(U - S / 2), 0.46 * S - np.abs(V - S / 2)) > 0.02 * S


_RENDER = {
    "weave": (_weave_params, _weave_render, None),
    "stone": (_stone_params, _stone_render, None),
    "screw": (_screw_params, _screw_render, _screw_support),
    "pcb": (_pcb_params, _pcb_render, _pcb_support),
}


# --- defects ------------------------------------------------------------------------------------

def _pick_point(rng, support: np.ndarray | None, S: int, margin: float):
    if support is None:
        return rng.uniform(margin, S - margin, 2)
    ys, xs = np.nonzero(support)
    i = rng.integers(len(xs))
    return np.array([xs[i], ys[i]], dtype=np.float64) + rng.uniform(-0.5, 0.5, 2)


def _d_scratch(img, rng, S, support, category):
    s = S / 128
    yy, xx = _grid(S)
    pts = _bezier(rng, _pick_point(rng, support, S, 0.1 * S), rng.uniform(0.12, 0.35) * S, 0.3)
    a = _line_alpha(xx, yy, pts, rng.uniform(0.8, 1.8) * s)
    if support is not None:
        a = a * ndimage.gaussian_filter(support.astype(np.float64), 0.5) ** 2
    sign = 1.0 if category in ("screw", "pcb") or rng.random() < 0.5 else -1.0
    return img + (sign * rng.uniform(0.09, 0.25) * a)[..., None]


def _d_stain(img, rng, S, support, category):
    yy, xx = _grid(S)
    r = rng.uniform(0.045, 0.13) * S
    _, rel = _blob_alpha(xx, yy, _pick_point(rng, support, S, 0.15 * S), r, rng, 0.35)
    a = np.exp(-1.5 * rel ** 2)
    a = np.where(a > 0.2, a, 0.0)
    colors = ((0.42, 0.30, 0.18), (0.22, 0.22, 0.24), (0.78, 0.68, 0.30), (0.50, 0.38, 0.42))
    col = np.asarray(colors[rng.integers(len(colors))])
    k = rng.uniform(0.18, 0.6) * a
    return img * (1 - k[..., None]) + k[..., None] * col


def _d_hole(img, rng, S, support, category):
    s = S / 128
    yy, xx = _grid(S)
    c = _pick_point(rng, support, S, 0.1 * S)
    r = rng.uniform(0.022, 0.06) * S
    a, rel = _blob_alpha(xx, yy, c, r, rng, 0.45, soft=0.8 * s)
    rim = np.clip(1 - np.abs(rel - 1.15) * r / (1.2 * s), 0, 1) * (rel > 1.0)
    out = img * (1 + 0.12 * rim[..., None])
    dark = rng.uniform(0.06, 0.16)
    return out * (1 - a[..., None]) + a[..., None] * dark


def _d_contamination(img, rng, S, support, category):
    s = S / 128
    yy, xx = _grid(S)
    c = _pick_point(rng, support, S, 0.1 * S)
    colors = ((0.10, 0.09, 0.08), (0.92, 0.92, 0.90), (0.65, 0.25, 0.15), (0.25, 0.35, 0.65))
    col = np.asarray(colors[rng.integers(len(colors))])
    if rng.random() < 0.5:   # particle
        a, _ = _blob_alpha(xx, yy, c, rng.uniform(0.015, 0.05) * S, rng, 0.5, soft=0.8 * s)
    else:                    # fibre
        pts = _bezier(rng, c, rng.uniform(0.10, 0.28) * S, 0.6, n=24)
        a = _line_alpha(xx, yy, pts, rng.uniform(1.2, 2.4) * s)
    tex = 0.8 + 0.2 * np.clip(_smooth(rng, S, 1.0 * s), -1, 1)
    a = a * rng.uniform(0.55, 0.95) * tex
    return img * (1 - a[..., None]) + a[..., None] * col


def _d_crack(img, rng, S, support, category):
    s = S / 128
    yy, xx = _grid(S)
    step = 2.0 * s

    def walk(p, heading, length):
        pts = [np.asarray(p, dtype=np.float64)]
        for _ in range(max(2, int(length / step))):
            heading += rng.normal(0, 0.35)
            pts.append(pts[-1] + step * np.array([np.cos(heading), np.sin(heading)]))
        return np.asarray(pts)

    main = walk(_pick_point(rng, support, S, 0.15 * S), rng.uniform(0, 2 * np.pi),
                rng.uniform(0.15, 0.4) * S)
    w = rng.uniform(0.8, 1.5) * s
    a = _line_alpha(xx, yy, main, w)
    if rng.random() < 0.5:
        j = rng.integers(1, len(main) - 1)
        d = main[j + 1] - main[j]
        branch = walk(main[j], np.arctan2(d[1], d[0]) + rng.choice([-1, 1]) * rng.uniform(0.4, 0.9),
                      rng.uniform(0.05, 0.15) * S)
        a = np.maximum(a, _line_alpha(xx, yy, branch, w * 0.8))
    k = rng.uniform(0.25, 0.5)
    return img * (1 - k * a[..., None])


def _d_chipped(P, rng, S):
    P = dict(P)
    if rng.random() < 0.5:
        P["tip_cut"] = rng.uniform(0.10, 0.22) * P["L"]
    else:   # a bite out of the head rim, away from the shank (which leaves at angle 0)
        P["bite"] = (rng.uniform(0.6, 2 * np.pi - 0.6), rng.uniform(0.3, 0.5) * P["rh"])
    return P


def _d_missing(P, rng, S):
    P = dict(P)
    parts = [list(p) for p in P["parts"]]
    weights = np.array([0.5 if k == "chip" else 1.0 for _, k, _ in parts])
    parts[rng.choice(len(parts), p=weights / weights.sum())][2] = False
    P["parts"] = parts
    return P


def _d_swapped(P, rng, S):
    P = dict(P)
    parts = [list(p) for p in P["parts"]]
    idx = {name: i for i, (name, _, _) in enumerate(parts)}
    pairs = (("D1", "C2"), ("R1", "R2"), ("R2", "R3"), ("R1", "R3"))
    i, j = (idx[n] for n in pairs[rng.integers(len(pairs))])
    parts[i][1], parts[j][1] = parts[j][1], parts[i][1]
    P["parts"] = parts
    return P


_PIXEL_DEFECTS = {"scratch": _d_scratch, "stain": _d_stain, "hole": _d_hole,
                  "contamination": _d_contamination, "crack": _d_crack}
_PARAM_DEFECTS = {"chipped": _d_chipped, "missing": _d_missing, "swapped": _d_swapped}


def _visibility(out: np.ndarray, clean: np.ndarray, mask: np.ndarray) -> float:
    """Mean RGB change inside ``mask`` over the luminance std of the defect-free ring (6 px)
    around it: how much the defect stands out from the texture's own variation."""
    ring = ndimage.binary_dilation(mask, iterations=6) & ~mask
    texture = clean.mean(axis=-1)[ring].std() if ring.any() else 0.0
    change = np.linalg.norm(out - clean, axis=-1)[mask].mean()
    return float(change / max(texture, 1.0 / 255))


def _blob_visibility(out: np.ndarray, clean: np.ndarray, mask: np.ndarray) -> float:
    """The mean colour change inside ``mask`` over the spread, from place to place, of the
    defect-free image's mean colour over a footprint of the mask's shape (projected on the
    change's colour direction): a stain's contrast against the texture's own blotches."""
    ys, xs = np.nonzero(mask)
    kernel = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1][::-1, ::-1].astype(np.float64)
    kernel /= kernel.sum()
    delta = (out - clean)[mask].mean(axis=0)
    u = delta / max(float(np.linalg.norm(delta)), 1e-12)
    mode = "valid" if min(kernel.shape) <= clean.shape[0] // 2 else "same"
    along = signal.fftconvolve(clean @ u, kernel, mode=mode)
    return float(np.linalg.norm(delta) / max(along.std(), 1.0 / 255))


def _defect_visibility(defect: str, out: np.ndarray, clean: np.ndarray, mask: np.ndarray) -> float:
    """How far a pixel defect clears the visibility rules, as a multiple of the threshold
    (>= 1: visible; see the section comment)."""
    vis = _visibility(out, clean, mask) / _VISIBLE
    if defect == "stain":
        vis = min(vis, _blob_visibility(out, clean, mask) / _STAIN_VISIBLE)
    return vis


def synth_sample(category: str, split: str, defect: str, index: int, *, seed: int = 0,
                 size: int = 128, apply_defect: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic sample: ``(image uint8 (S, S, 3), mask bool (S, S))``.

    The sample is fixed by ``(seed, category, split, defect, index)``. ``apply_defect=False``
    gives its defect-free twin (same pose, texture, lighting and noise; empty mask). The mask is
    exactly the set of pixels the defect changed (see the section comment in the source).
    """
    if category not in SYNTHETIC_CATEGORIES:
        raise ValueError(f"unknown synthetic category {category!r}; known: "
                         f"{sorted(SYNTHETIC_CATEGORIES)}")
    if defect != GOOD and defect not in SYNTHETIC_CATEGORIES[category]["defects"]:
        raise ValueError(f"category {category!r} has no defect {defect!r}; it has "
                         f"{list(SYNTHETIC_CATEGORIES[category]['defects'])}")
    if split not in ("train", "test") or (split == "train" and defect != GOOD):
        raise ValueError(f"split must be 'train' (defect 'good' only) or 'test', got "
                         f"split={split!r} defect={defect!r}")
    S = int(size)
    base, drng = _sample_rngs(seed, category, split, defect, index)
    make_params, render, support_fn = _RENDER[category]
    P = make_params(base, S)
    clean = np.clip(render(P, S), _LO, _HI)
    noise = base.normal(0, _NOISE, (S, S, 1)) + base.normal(0, _NOISE / 2, (S, S, 3))
    img = clean
    mask = np.zeros((S, S), dtype=bool)
    if defect != GOOD and apply_defect:
        support = support_fn(P, S) if support_fn is not None else None
        min_px = max(8, int(0.001 * S * S))
        best = None
        for _ in range(20):   # redraw (from the defect stream) a defect too small or too faint
            if defect in _PARAM_DEFECTS:
                out = render(_PARAM_DEFECTS[defect](P, drng, S), S)
            else:
                out = _PIXEL_DEFECTS[defect](clean, drng, S, support, category)
            out = np.clip(out, _LO, _HI)
            change = np.abs(out - clean).max(axis=-1)
            mask = change >= _MIN_CHANGE
            if mask.sum() < min_px:
                continue
            vis = np.inf if defect in _PARAM_DEFECTS else _defect_visibility(defect, out, clean, mask)
            if best is None or vis > best[0]:
                best = (vis, out, mask)
            if vis >= 1.0:
                break
        if best is not None:  # else: the last draw (too small after 20 tries; never seen)
            _, out, mask = best
        img = np.where(mask[..., None], out, clean)
    u8 = np.clip(np.rint((img + noise) * 255), 0, 255).astype(np.uint8)
    return u8, mask


def make_synthetic(out_root: str | os.PathLike, categories: Sequence[str] | None = None,
                   seed: int = 0, n_train: int = 60, n_test_good: int = 20,
                   n_test_defect: int = 10, size: int = 128, *,
                   overwrite: bool = False) -> list[Path]:
    """Write synthetic categories in the MVTec layout under ``out_root``; return their folders.

    Categories (:data:`SYNTHETIC_CATEGORIES`): ``weave`` and ``stone`` (textures), ``screw``
    (object at a random angle and shift) and ``pcb`` (board with components at fixed places;
    logical defects ``missing`` and ``swapped``). Per category: ``n_train`` training images,
    ``n_test_good`` normal test images and ``n_test_defect`` images per defect type, each
    ``size`` x ``size`` RGB PNG, with 0/255 masks that are exactly the changed pixels, and a
    ``meta.json`` describing them. Same arguments -> byte-identical files (on one platform).
    Each category is built in a hidden temporary folder inside ``out_root`` (every file written
    atomically) and renamed into place; an existing category folder is an error unless
    ``overwrite``.
    """
    out_root = Path(out_root)
    cats = list(SYNTHETIC_CATEGORIES) if categories is None else list(categories)
    check_generator_args("synthetic", SYNTHETIC_CATEGORIES, cats, n_train, n_test_good, n_test_defect,
                         size, 32, seed)

    def fill(cat: str, folder: Path) -> None:
        spec = SYNTHETIC_CATEGORIES[cat]
        counts = write_samples(folder, spec["defects"], (n_train, n_test_good, n_test_defect),
                               lambda split, defect, i: synth_sample(cat, split, defect, i, seed=seed,
                                                                     size=size))
        atomic_write_text(folder / "meta.json", _json({
            "category": cat, "kind": spec["kind"], "about": spec["about"],
            "generator": "raad.data.make_synthetic", "version": SYNTHETIC_VERSION,
            "seed": int(seed), "size": int(size), "counts": counts,
            "defects": {d: DEFECT_DESCRIPTIONS[d] for d in spec["defects"]},
            "mask_rule": "mask = exactly the pixels the defect changed (0/255 PNG)"}))
    return write_categories(out_root, cats, overwrite, fill)
