"""Decision thresholds for a target false-alarm rate, and scores normalised around them.

A part fails when its image score (the anomaly map's maximum at the model's resolution, see
:func:`image_scores`) is at or above the threshold. The threshold is set on the image scores of
normal images the detector was not trained on, for a target false-alarm rate ``fpr`` (the share
of normal parts that would fail):

* **Order statistic** (distribution-free), when the images hold at least
  :data:`MIN_EXCEEDANCES` expected false alarms (``n * fpr >= 5``; at 1 %: 500 images): the
  ``(1 - fpr)`` quantile at the Weibull plotting position, i.e. the ``(1 - fpr)(n + 1)``-th
  smallest score, interpolated linearly between neighbours (``numpy.quantile(...,
  method="weibull")``). For scores of exchangeable normal images the chance that a new normal
  image lands above the ``i``-th smallest of ``n`` is ``(n + 1 - i) / (n + 1)`` on average, so this
  threshold's false-alarm rate is ``fpr`` on average, whatever the scores' distribution.
* **Gumbel tail fit**, with fewer images (the held-out normals of a fit: a few to a few dozen),
  where the quantile would lie above every score seen: an image score is the maximum of a
  smoothed map over thousands of pixels, and maxima follow an extreme-value law; a Gumbel
  distribution is fitted by L-moments (Hosking 1990: scale = L-scale / ln 2, location = mean -
  0.5772 * scale; robust in small samples, no optimiser) and its ``1 - fpr`` quantile is the
  threshold. This rests on the model: a few normals cannot *pin* a 1 % rate.

Either way the record says how many images the threshold rests on, how many of them are at or
above it, and the 95 % Clopper-Pearson interval of the false-alarm rate that count shows.
That interval is distribution-free (the number of calibration scores at or above a threshold is
binomial in its true rate): with 4 normals and none above, it is 0-60 %, which says plainly how
little 4 images tell. `raad calibrate RUN FOLDER` refines the threshold from more normal images.

Normalisation (as anomalib's min-max normalisation around the threshold): ``(s - t) / (max -
min) + 0.5`` clipped to [0, 1], with ``min`` the calibration images' lowest score and ``max = 2t
- min``, so the lowest normal maps to 0, the threshold to 0.5, and the scale is symmetric around
it. It is monotone (non-decreasing; strictly inside [0, 1]). The same map colours the heatmaps,
pixel by pixel: the threshold sits at the colour map's middle (see :func:`raad.viz.calibrated_overlay`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

__all__ = ["DEFAULT_FPR", "MIN_EXCEEDANCES", "calibrate", "normalize", "decide", "describe",
           "rates_at", "f1_optimal", "image_scores"]

DEFAULT_FPR = 0.01
#: the order statistic is used when the calibration images hold at least this many expected
#: false alarms (``n * fpr``); below it the Gumbel tail fit
MIN_EXCEEDANCES = 5
CONFIDENCE = 0.95
EULER_GAMMA = 0.5772156649015329


def _check_fpr(fpr: float) -> float:
    fpr = float(fpr)
    if not 0.0 < fpr < 0.5:
        raise ValueError(f"--fpr must be a false-alarm rate between 0 and 0.5 (0.01 = 1 %), got {fpr}")
    return fpr


def _scores(scores) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size < 2:
        raise ValueError(f"a threshold needs the scores of at least 2 normal images, got {s.size}")
    if not np.isfinite(s).all():
        raise ValueError("normal image scores: non-finite values")
    return s


def gumbel_lmoments(scores) -> tuple[float, float]:
    """(location, scale) of a Gumbel distribution fitted to ``scores`` by L-moments."""
    x = np.sort(_scores(scores))
    n = x.size
    b0 = x.mean()
    b1 = float(np.sum(np.arange(n) / (n - 1) * x) / n)
    l2 = 2 * b1 - b0
    scale = max(l2 / math.log(2), 1e-12 * max(1.0, abs(b0)))
    return float(b0 - EULER_GAMMA * scale), float(scale)


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact binomial interval of a rate from ``k`` events in ``n`` trials."""
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def calibrate(scores, fpr: float = DEFAULT_FPR, *, source: str = "") -> dict:
    """The threshold record for a target false-alarm rate ``fpr`` from normal image ``scores``
    (see the module notes for the estimate). JSON-ready: ``threshold``, ``min`` / ``max`` (the
    normalisation), ``fpr_target``, ``method``, ``n_images``, ``exceedances`` (calibration
    scores at or above the threshold), ``fpr_observed`` and ``fpr_interval`` (95 % Clopper-Pearson
    of that count), ``images_for_order_statistic``, ``source``, ``note``."""
    fpr = _check_fpr(fpr)
    s = _scores(scores)
    n = s.size
    if n * fpr >= MIN_EXCEEDANCES:
        method = "order statistic"
        t = float(np.quantile(s, 1.0 - fpr, method="weibull"))
    else:
        method = "gumbel tail fit"
        loc, scale = gumbel_lmoments(s)
        t = float(stats.gumbel_r.ppf(1.0 - fpr, loc=loc, scale=scale))
    lo = float(s.min())
    span = max(t - lo, 1e-9 * max(1.0, abs(t)))
    k = int((s >= t).sum())
    ci = clopper_pearson(k, n)
    need = math.ceil(MIN_EXCEEDANCES / fpr)
    rec = {"threshold": t, "min": t - span, "max": t + span, "fpr_target": fpr, "method": method,
           "n_images": int(n), "exceedances": k, "fpr_observed": k / n,
           "fpr_interval": [ci[0], ci[1]], "images_for_order_statistic": need, "source": source}
    rec["note"] = describe(rec)
    return rec


def describe(rec: dict) -> str:
    """One sentence on how ``rec``'s threshold was estimated and what it rests on."""
    pct = lambda v: f"{100 * v:.3g} %"   # noqa: E731
    lo, hi = rec["fpr_interval"]
    base = (f"{rec['n_images']} normal images, {rec['exceedances']} at or above the threshold "
            f"(the false-alarm rate they show: {pct(rec['fpr_observed'])}, 95 % interval "
            f"{pct(lo)}-{pct(hi)})")
    if rec["method"] == "order statistic":
        return f"the {pct(1 - rec['fpr_target'])} quantile of {base}"
    return (f"a Gumbel tail fit's {pct(1 - rec['fpr_target'])} quantile: {base} cannot pin a "
            f"{pct(rec['fpr_target'])} rate; `raad calibrate RUN FOLDER` with at least "
            f"{rec['images_for_order_statistic']} normal images measures it")


def normalize(scores, rec: dict):
    """Scores (any shape; a map too) on the calibrated scale: the threshold at 0.5, clipped to
    [0, 1]. A float in gives a float out."""
    s = np.asarray(scores, dtype=np.float64)
    out = np.clip((s - rec["threshold"]) / (rec["max"] - rec["min"]) + 0.5, 0.0, 1.0)
    return float(out) if out.ndim == 0 else out


def decide(score: float, rec: dict) -> str:
    """"fail" at or above the threshold, else "pass"."""
    return "fail" if score >= rec["threshold"] else "pass"


def rates_at(scores, labels, threshold: float) -> dict:
    """False-alarm rate (normals at or above ``threshold``) and miss rate (anomalous images
    below it), with their counts and 95 % intervals; ``None`` where a class is absent."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    out = {}
    for name, sel, hit in (("fpr", ~y, s >= threshold), ("miss_rate", y, s < threshold)):
        n = int(sel.sum())
        k = int((hit & sel).sum())
        out[name] = k / n if n else None
        out[f"{name}_count"] = [k, n]
        out[f"{name}_interval"] = list(clopper_pearson(k, n)) if n else None
    return out


def f1_optimal(scores, labels) -> dict | None:
    """The threshold of largest F1 (fail at or above it) with its F1, precision and recall;
    ``None`` without anomalous images."""
    from sklearn.metrics import precision_recall_curve
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(int)
    if not y.any():
        return None
    p, r, t = precision_recall_curve(y, s)
    p, r = p[:-1], r[:-1]   # the last point has no threshold
    denom = p + r
    f1 = np.divide(2 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)
    i = int(np.argmax(f1))
    return {"threshold": float(t[i]), "f1": float(f1[i]), "precision": float(p[i]), "recall": float(r[i])}


def score_maps(maps, sigma: float = 0.0):
    """The maps an image score is the maximum of: ``maps`` ((B, H, W) tensor or array, at the
    model's resolution) after a Gaussian blur of ``sigma`` pixels (the detector's
    :func:`score_sigma`), as a float tensor. The calibrated overlays show these, so that what
    they mark at or above the threshold is what decided."""
    import torch
    from .model import gaussian_blur
    m = torch.as_tensor(maps).detach().float()
    if sigma > 0:
        m = gaussian_blur(m[:, None], sigma)[:, 0]
    return m


def image_scores(maps, sigma: float = 0.0) -> np.ndarray:
    """Image scores: each map's maximum after a Gaussian blur of ``sigma`` pixels (see
    :func:`score_maps`)."""
    return score_maps(maps, sigma).flatten(1).amax(dim=1).cpu().numpy().astype(np.float64)


def score_sigma(det) -> float:
    """The blur (px) of a detector's image score; 0 (the plain maximum) for a model without one
    (the PatchCore baseline)."""
    return float(getattr(det.cfg, "image_score_sigma", 0.0))
