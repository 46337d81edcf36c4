"""HQS: exact bit allocation under the average-bit budget, scores, plan format."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from raad import hqs


def _brute(costs, avg_bits, choices=hqs.BIT_CHOICES):
    names = list(costs)
    best = None
    for combo in itertools.product(choices, repeat=len(names)):
        if sum(combo) > avg_bits * len(names) + 1e-9:
            continue
        c = sum(min(costs[n][b2] for b2 in choices if b2 <= b) for n, b in zip(names, combo))
        if best is None or c < best - 1e-12:
            best = c
    return best


@given(n=st.integers(1, 6), avg=st.sampled_from([2.0, 2.5, 3.0, 4.0, 5.5, 6.0, 8.0]),
       seed=st.integers(0, 10_000))
@settings(max_examples=60, deadline=None)
def test_allocation_is_optimal_and_within_budget(n, avg, seed):
    g = torch.Generator().manual_seed(seed)
    costs = {f"l{i}": {b: float(torch.rand(1, generator=g)) * (10 - b) for b in hqs.BIT_CHOICES}
             for i in range(n)}
    bits = hqs.allocate_bits(costs, avg)
    assert set(bits) == set(costs)
    assert sum(bits.values()) <= avg * n + 1e-9
    got = sum(min(costs[k][b2] for b2 in hqs.BIT_CHOICES if b2 <= b) for k, b in bits.items())
    assert got == pytest.approx(_brute(costs, avg), abs=1e-9)


def test_more_bits_where_the_score_is_high():
    costs = {"calm": {2: 0.01, 4: 0.005, 8: 0.0}, "sharp": {2: 1.0, 4: 0.2, 8: 0.0},
             "mid": {2: 0.3, 4: 0.1, 8: 0.0}, "flat": {2: 0.02, 4: 0.01, 8: 0.0}}
    bits = hqs.allocate_bits(costs, 4.0)
    assert bits["sharp"] == 8 and bits["calm"] == 2 and bits["flat"] == 2
    assert sum(bits.values()) <= 16


def test_noisy_costs_never_give_fewer_bits_a_lower_cost():
    # measured noise says 4 bits hurt more than 2: implausible, so 4 counts as no worse than 2,
    # and at equal cost the budget is spent
    bits = hqs.allocate_bits({"a": {2: 0.5, 4: 0.6, 8: 1.0}}, 4.0)
    assert bits == {"a": 4}


@pytest.mark.parametrize("bad", [1.0, 9.0, 12, float("nan"), "4"])
def test_avg_bits_outside_range_is_refused(bad):
    with pytest.raises(ValueError, match="avg-bits"):
        hqs.allocate_bits({"a": {2: 1, 4: 1, 8: 1}}, bad)


def test_full_precision_plan():
    scores = [hqs.LayerScore("student.blocks.0.attn", {2: 1.0, 4: 0.5, 8: 0.1}, 0.3)]
    plan = hqs.make_plan(scores, 16)
    assert plan["layers"]["student.blocks.0.attn"]["qk_bits"] == 16


def test_synthetic_anomalies_have_masks_where_pixels_changed():
    x = torch.randn(4, 3, 64, 64)
    y, m = hqs.synthetic_anomalies(x, seed=1)
    changed = (y != x).any(dim=1)
    assert m.shape == (4, 64, 64) and m.any(dim=(1, 2)).all()
    assert not (changed & ~m).any()
    y2, m2 = hqs.synthetic_anomalies(x, seed=1)
    assert torch.equal(y, y2) and torch.equal(m, m2)
    _, mg = hqs.synthetic_anomalies(x, seed=1, grid=16)
    assert mg.shape == (4, 16, 16)


# ----------------------------------------------------------------------------------------------
# Allocation under a budget in time
# ----------------------------------------------------------------------------------------------

SETTINGS = ("2/8", "4/8", "8/8", "16/16")


def _random_case(n, seed):
    g = torch.Generator().manual_seed(seed)
    costs = {f"l{i}": {s: float(torch.rand(1, generator=g)) * 0.01 for s in SETTINGS} for i in range(n)}
    for c in costs.values():
        c["16/16"] = 0.0
    times = {f"l{i}": {s: float(torch.rand(1, generator=g)) * 10 + 1 for s in SETTINGS} for i in range(n)}
    return costs, times


def _all_plans(costs, times):
    names = list(costs)
    for combo in itertools.product(SETTINGS, repeat=len(names)):
        yield (sum(times[n][s] for n, s in zip(names, combo)), sum(costs[n][s] for n, s in zip(names, combo)),
               dict(zip(names, combo)))


@given(n=st.integers(1, 4), seed=st.integers(0, 10_000), frac=st.floats(0.0, 1.2))
@settings(max_examples=60, deadline=None)
def test_time_budget_gives_the_least_damage_that_fits(n, seed, frac):
    costs, times = _random_case(n, seed)
    plans = list(_all_plans(costs, times))
    fastest = min(p[0] for p in plans)
    slowest = max(p[0] for p in plans)
    rest = 3.0
    budget = rest + fastest + frac * (slowest - fastest)
    alloc, ms, dmg, met = hqs.allocate_time(costs, times, budget, rest_ms=rest)
    fits = [p for p in plans if rest + p[0] <= budget]
    assert met == bool(fits)
    if fits:
        assert dmg == pytest.approx(min(p[1] for p in fits), abs=1e-12)
        assert ms <= budget + 1e-9
    assert ms == pytest.approx(rest + sum(times[k][s] for k, s in alloc.items()))
    assert dmg == pytest.approx(sum(costs[k][s] for k, s in alloc.items()), abs=1e-12)


@given(n=st.integers(1, 4), seed=st.integers(0, 10_000), bound=st.sampled_from([0.0, 0.002, 0.01, 0.05]))
@settings(max_examples=60, deadline=None)
def test_fastest_is_the_fastest_plan_within_the_damage_bound(n, seed, bound):
    costs, times = _random_case(n, seed)
    plans = [p for p in _all_plans(costs, times) if p[1] <= bound + 1e-15]
    alloc, ms, dmg, met = hqs.allocate_time(costs, times, "fastest", max_damage=bound)
    assert met and dmg <= bound + 1e-12         # all float (damage 0) always fits
    assert ms == pytest.approx(min(p[0] for p in plans))


def test_an_unreachable_budget_gives_the_fastest_plan_and_says_so():
    costs, times = _random_case(3, 1)
    alloc, ms, dmg, met = hqs.allocate_time(costs, times, 0.5, rest_ms=10.0)
    assert not met
    assert ms == pytest.approx(10.0 + sum(min(t.values()) for t in times.values()))


def test_where_quantizing_is_slower_the_layer_stays_float():
    costs = {"a": {"2/8": 1e-4, "4/8": 1e-5, "8/8": 1e-6, "16/16": 0.0}}
    times = {"a": {"2/8": 12.0, "4/8": 12.0, "8/8": 11.0, "16/16": 10.0}}
    assert hqs.allocate_time(costs, times, "fastest")[0] == {"a": "16/16"}
    times["a"]["8/8"] = 5.0                     # int8 faster: taken, int4 never (slower, worse)
    assert hqs.allocate_time(costs, times, "fastest")[0] == {"a": "8/8"}


@pytest.mark.parametrize("bad", ["fast", -1, 0, float("inf"), None, "nan"])
def test_bad_budgets_are_refused(bad):
    with pytest.raises(ValueError, match="--budget must be 'fastest' or milliseconds"):
        hqs.check_budget(bad)


def test_setting_costs_are_monotone_and_float_is_free():
    s = hqs.LayerScore("a", {2: 0.1, 4: 0.001, 8: 0.01}, 0.0, {2: 0.1, 4: 0.001, 8: 0.01})
    assert hqs.setting_costs(s) == {"2/8": 0.1, "4/8": 0.001, "8/8": 0.001, "16/16": 0.0}
