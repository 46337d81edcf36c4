"""raad.threshold: the threshold for a target false-alarm rate, its interval, the normalisation."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from raad import threshold as T
from raad import viz


def _true_fprs(dist, n, fpr, trials, seed=0):
    rng = np.random.default_rng(seed)
    out, covered, methods = [], 0, set()
    for _ in range(trials):
        r = T.calibrate(dist.rvs(n, random_state=rng), fpr)
        f = float(dist.sf(r["threshold"]))
        out.append(f)
        covered += r["fpr_interval"][0] <= f <= r["fpr_interval"][1]
        methods.add(r["method"])
    return np.array(out), covered / trials, methods


@pytest.mark.parametrize("dist", [stats.lognorm(0.5), stats.norm(3, 2)], ids=["lognormal", "normal"])
def test_order_statistic_hits_the_target_rate_on_average_whatever_the_distribution(dist):
    """With n * fpr >= 5 the threshold is the (1 - fpr)(n + 1)-th order statistic: its true
    false-alarm rate is fpr on average for any continuous distribution, and the Clopper-Pearson
    interval of the calibration count covers it (at least nominally often)."""
    n, fpr, trials = 200, 0.05, 800
    f, cover, methods = _true_fprs(dist, n, fpr, trials)
    assert methods == {"order statistic"}
    # the true rate of a Weibull-position quantile is Beta(fpr (n+1), (1-fpr)(n+1)): its mean is fpr
    sd_mean = stats.beta(fpr * (n + 1), (1 - fpr) * (n + 1)).std() / math.sqrt(trials)
    assert abs(f.mean() - fpr) < 4 * sd_mean
    assert cover >= 0.93


def test_gumbel_tail_fit_with_few_normals():
    """Fewer normals than 5 / fpr: a Gumbel fit by L-moments, median-unbiased on Gumbel data,
    and the record says it cannot pin the rate (a wide interval, the images needed)."""
    dist = stats.gumbel_r(loc=1.0, scale=0.2)
    f, cover, methods = _true_fprs(dist, 20, 0.01, 600, seed=1)
    assert methods == {"gumbel tail fit"}
    assert 0.007 < np.median(f) < 0.014
    assert cover >= 0.95
    r = T.calibrate(dist.rvs(4, random_state=np.random.default_rng(2)), 0.01)
    assert r["n_images"] == 4 and r["exceedances"] == 0 and r["fpr_observed"] == 0.0
    assert r["fpr_interval"][0] == 0.0 and r["fpr_interval"][1] == pytest.approx(1 - 0.025 ** 0.25)
    assert r["images_for_order_statistic"] == 500
    assert "cannot pin a 1 % rate" in r["note"] and "raad calibrate" in r["note"]
    json.dumps(r, allow_nan=False)   # stored in config.json as is


def test_the_method_switches_at_five_expected_false_alarms():
    s = np.random.default_rng(0).normal(size=600)
    assert T.calibrate(s[:499], 0.01)["method"] == "gumbel tail fit"
    r = T.calibrate(s[:500], 0.01)
    assert r["method"] == "order statistic"
    assert r["threshold"] == pytest.approx(np.quantile(s[:500], 0.99, method="weibull"))
    assert r["exceedances"] == int((s[:500] >= r["threshold"]).sum()) == 5


def test_normalisation_maps_the_threshold_to_one_half_monotonically():
    s = np.array([0.2, 0.3, 0.35, 0.5, 0.41, 0.33])
    r = T.calibrate(s, 0.1)
    t = r["threshold"]
    assert T.normalize(t, r) == 0.5 and isinstance(T.normalize(t, r), float)
    assert T.normalize(s.min(), r) == pytest.approx(0.0, abs=1e-12)   # the lowest normal
    assert T.normalize(2 * t - s.min(), r) == pytest.approx(1.0)
    grid = np.linspace(-1, 3, 401)
    n = T.normalize(grid, r)
    assert n.shape == grid.shape and (np.diff(n) >= 0).all() and n.min() == 0 and n.max() == 1
    inside = (n > 0) & (n < 1)
    assert (np.diff(n[inside]) > 0).all()   # strictly increasing inside [0, 1]
    # as anomalib: (s - t) / (max - min) + 0.5, clipped
    assert np.allclose(n, np.clip((grid - t) / (r["max"] - r["min"]) + 0.5, 0, 1))
    assert T.decide(t, r) == "fail" and T.decide(np.nextafter(t, -1), r) == "pass"
    # the overlays' colour scale is the same map, pixel by pixel
    assert np.allclose(viz.calibrated_levels(grid, t, r["min"], r["max"]), n)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        T.calibrate([1.0], 0.01)
    with pytest.raises(ValueError, match="non-finite"):
        T.calibrate([1.0, np.nan, 2.0], 0.01)
    for bad in (0.0, 0.5, -0.1, 1.0):
        with pytest.raises(ValueError, match="--fpr"):
            T.calibrate([1.0, 2.0, 3.0], bad)
    r = T.calibrate(np.ones(10), 0.01)   # constant scores: a threshold all the same
    assert r["threshold"] >= 1.0 and r["max"] > r["min"]


def test_rates_at_and_f1_optimal():
    scores = [0.1, 0.2, 0.3, 0.4, 0.8, 0.9, 0.35]
    labels = [0, 0, 0, 0, 1, 1, 1]
    r = T.rates_at(scores, labels, 0.3)
    assert r["fpr"] == 0.5 and r["fpr_count"] == [2, 4]        # 0.3 and 0.4 fail
    assert r["miss_rate"] == 0.0 and r["miss_rate_count"] == [0, 3]
    lo, hi = r["fpr_interval"]
    assert lo < 0.5 < hi
    best = T.f1_optimal(scores, labels)
    # at 0.35 all 3 are found with one false alarm (0.4): F1 6/7, above 0.8's 2 of 3 without any
    assert best["threshold"] == 0.35 and best["f1"] == pytest.approx(6 / 7)
    assert best["precision"] == 0.75 and best["recall"] == 1.0
    assert T.f1_optimal([0.1, 0.2], [0, 0]) is None
    assert T.rates_at([0.1, 0.2], [0, 0], 0.15)["miss_rate"] is None
