"""Hierarchical Quantization Scoring: a bit-width for every attention layer.

Three levels:

1. Layer scores. Each attention layer is quantized alone (the others stay float) at every
   candidate bit-width, on held-out normal images and on synthetic anomalies pasted into them.
   Its *damage* at b bits is the relative change of the anomaly map plus the relative loss of
   separation between anomalous and normal pixels: what the layer contributes to detection and
   how much quantizing it costs. The *sharpness* of its float attention (1 − mean entropy /
   log N) weighs the damage: sharp, peaked attention carries localisation and is fragile.
2. Allocation. Bits per layer minimise the summed weighted damage under the average-bit budget,
   solved exactly (a multiple-choice knapsack over layers; costs made non-increasing in bits so
   noise cannot make fewer bits look better).
3. Operands. Q·Kᵀ gets the allocated bits; P·V runs at 8 bits in every quantized layer (its
   measured damage at 8 bits is below the Q·Kᵀ noise at int8; ``pv_bits`` stays in the plan so
   a layer can be lifted to 16).

The plan file (docs/design.md, "Plan file") records each layer's bits and score (its share of the total weighted
damage at 2 bits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

BIT_CHOICES = (2, 4, 8)
FLOAT_BITS = 16


def check_avg_bits(avg_bits: float) -> float:
    if isinstance(avg_bits, bool) or not isinstance(avg_bits, (int, float)) or not math.isfinite(avg_bits):
        raise ValueError(f"--avg-bits must be a number, got {avg_bits!r}")
    if avg_bits == FLOAT_BITS:
        return float(avg_bits)
    if not (min(BIT_CHOICES) <= avg_bits <= max(BIT_CHOICES)):
        raise ValueError(f"--avg-bits must be between {min(BIT_CHOICES)} and {max(BIT_CHOICES)}, or "
                         f"{FLOAT_BITS} for full precision; got {avg_bits}")
    return float(avg_bits)


def allocate_bits(costs: dict[str, dict[int, float]], avg_bits: float,
                  choices=BIT_CHOICES) -> dict[str, int]:
    """Bits per layer minimising Σ cost[layer][bits] subject to mean bits ≤ ``avg_bits``.

    Exact dynamic programme over the integer bit total; ties go to the allocation reached first
    when layers are visited in order of decreasing cost at the lowest bit-width (so, at equal
    cost, the higher-scored layer keeps the bits).
    """
    avg_bits = check_avg_bits(avg_bits)
    names = list(costs)
    if not names:
        return {}
    choices = tuple(sorted(choices))
    if avg_bits >= choices[-1]:
        return {n: choices[-1] for n in names}
    for n in names:
        missing = [b for b in choices if b not in costs[n]]
        if missing:
            raise ValueError(f"costs for layer {n!r} lack bit-widths {missing}")
    # non-increasing in bits: more bits never cost more than fewer
    mono = {}
    for n in names:
        best, row = math.inf, {}
        for b in choices:
            best = min(best, float(costs[n][b]))
            row[b] = best
        mono[n] = row
    order = sorted(names, key=lambda n: -mono[n][choices[0]])
    budget = int(math.floor(avg_bits * len(names) + 1e-9))
    # dp[t] = (cost, allocation) with bit total exactly t
    dp = {0: (0.0, ())}
    for n in order:
        nxt = {}
        for t, (c, alloc) in dp.items():
            for b in choices:
                t2 = t + b
                if t2 > budget:
                    continue
                c2 = c + mono[n][b]
                if t2 not in nxt or c2 < nxt[t2][0] - 1e-15:
                    nxt[t2] = (c2, alloc + (b,))
        dp = nxt
    best_t = min(dp, key=lambda t: (dp[t][0], -t))
    return dict(zip(order, dp[best_t][1]))


# ----------------------------------------------------------------------------------------------
# Synthetic anomalies for scoring (normal images in, images with pasted defects + masks out)
# ----------------------------------------------------------------------------------------------

def synthetic_anomalies(images: torch.Tensor, seed: int = 0, grid: int | None = None):
    """CutPaste-style defects: an elliptic patch of another image (or a colour blotch) pasted at
    a random place. Returns (images, masks at ``grid`` resolution as bool)."""
    g = torch.Generator().manual_seed(seed)
    b, _, h, w = images.shape
    out = images.clone()
    masks = torch.zeros(b, 1, h, w)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    for i in range(b):
        ry, rx = (torch.rand(2, generator=g) * 0.12 + 0.05) * torch.tensor([h, w])
        cy, cx = torch.rand(2, generator=g) * torch.tensor([h - 2 * ry, w - 2 * rx]) + torch.stack([ry, rx])
        m = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= 1.0
        if torch.rand(1, generator=g) < 0.5 and b > 1:
            j = (i + 1 + int(torch.randint(b - 1, (1,), generator=g))) % b
            dy, dx = int(torch.randint(-h // 4, h // 4 + 1, (1,), generator=g)), int(torch.randint(-w // 4, w // 4 + 1, (1,), generator=g))
            src = torch.roll(images[j], shifts=(dy, dx), dims=(1, 2))
        else:
            src = images[i] + torch.randn(3, 1, 1, generator=g) * 1.5
        out[i][:, m] = src[:, m]
        masks[i, 0][m] = 1.0
    if grid is not None:
        masks = F.adaptive_avg_pool2d(masks, grid)
    return out, masks[:, 0] > 0.5


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------

@dataclass
class LayerScore:
    name: str
    damage: dict[int, float]          # bits → relative map change + separation loss
    sharpness: float                  # 1 − mean entropy / log N of the float attention
    cost: dict[int, float] = field(default_factory=dict)
    score: float = 0.0                # share of the total weighted damage at the lowest bits


def _separation(m: torch.Tensor, masks: torch.Tensor) -> float:
    """(mean anomalous − mean normal) / std normal of map values."""
    a, n = m[masks], m[~masks]
    if a.numel() == 0 or n.numel() < 2:
        return 0.0
    return float((a.mean() - n.mean()) / n.std().clamp_min(1e-12))


class Probe:
    """The damage of a change to the detector: on held-out normals and synthetic anomalies made
    from them, the relative change of the anomaly map plus the relative loss of separation
    between anomalous and normal pixels, against the float detector's maps."""

    def __init__(self, detector, normals: torch.Tensor, seed: int = 0):
        grid = normals.shape[-1] // detector.cfg.stride
        anomalous, masks = synthetic_anomalies(normals, seed=seed, grid=grid)
        self.batch = torch.cat([normals, anomalous])
        self.masks = torch.cat([torch.zeros_like(masks), masks])
        self.ref = self.maps(detector)
        self.ref_sep = _separation(self.ref, self.masks)
        self.ref_energy = self.ref.pow(2).mean().clamp_min(1e-12)

    @torch.no_grad()
    def maps(self, detector) -> torch.Tensor:
        return detector.combine(*detector.raw_maps(self.batch)).float()

    def damage(self, detector) -> float:
        m = self.maps(detector)
        change = float((m - self.ref).pow(2).mean() / self.ref_energy)
        sep_loss = max(0.0, self.ref_sep - _separation(m, self.masks)) / max(abs(self.ref_sep), 1e-12)
        return change + sep_loss


@torch.no_grad()
def score_layers(detector, quant_modules: dict, normals: torch.Tensor, seed: int = 0,
                 choices=BIT_CHOICES, progress=None) -> list[LayerScore]:
    """Score each layer of ``quant_modules`` ({name: QuantAttention}, all at 16/16 on entry).

    ``normals``: held-out normal images (ImageNet-normalised); synthetic anomalies are made from
    them. Returns one :class:`LayerScore` per layer, in the order given.
    """
    # float pass, with attention maps for sharpness
    for m in quant_modules.values():
        m.keep_maps = True
    probe = Probe(detector, normals, seed)
    sharp = {}
    for name, m in quant_modules.items():
        ent = m.maps["entropy"]
        n_keys = m.maps["received"].shape[-1]
        sharp[name] = float(1.0 - ent.mean() / math.log(n_keys)) if n_keys > 1 else 0.0
        m.keep_maps = False
        m.maps = None

    scores = []
    steps = [(name, b) for name in quant_modules for b in choices]
    it = progress(steps) if progress else steps
    damage = {name: {} for name in quant_modules}
    for name, b in it:
        mod = quant_modules[name]
        mod.set_bits(b, 8)
        damage[name][b] = probe.damage(detector)
        mod.set_bits(FLOAT_BITS, FLOAT_BITS)
    for name in quant_modules:
        w = 1.0 + sharp[name]
        scores.append(LayerScore(name, damage[name], sharp[name], {b: w * d for b, d in damage[name].items()}))
    total = sum(s.cost[min(choices)] for s in scores) or 1.0
    for s in scores:
        s.score = s.cost[min(choices)] / total
    return scores


# ----------------------------------------------------------------------------------------------
# Allocation under a budget in time
# ----------------------------------------------------------------------------------------------

FLOAT_SETTING = "16/16"
#: ``--budget fastest`` takes the fastest plan whose summed weighted damage stays under this
#: (the damage is a relative change of the map plus a relative loss of separation: 0.01 is 1 %)
MAX_DAMAGE = 0.01


def check_budget(budget) -> str | float:
    """``"fastest"`` or a positive number of milliseconds per batch."""
    if budget == "fastest":
        return budget
    try:
        ms = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"--budget must be 'fastest' or milliseconds per batch (a number > 0), "
                         f"got {budget!r}") from None
    if not math.isfinite(ms) or ms <= 0:
        raise ValueError(f"--budget must be 'fastest' or milliseconds per batch (a number > 0), got {budget!r}")
    return ms


def setting_costs(score: LayerScore) -> dict[str, float]:
    """A layer's weighted damage per ``"qk/pv"`` setting: its scores at P·V 8 bits, float at 0;
    made non-increasing in Q·Kᵀ bits (noise cannot make fewer bits look better)."""
    out, best = {}, math.inf
    for b in sorted(score.cost):
        best = min(best, float(score.cost[b]))
        out[f"{b}/8"] = best
    out[FLOAT_SETTING] = 0.0
    return out


def pareto_plans(costs: dict[str, dict[str, float]], times: dict[str, dict[str, float]]):
    """Every allocation not beaten in both time and damage by another, as (ms, damage,
    {layer: setting}) sorted by time (exact: a multiple-choice knapsack's Pareto front). Only
    the settings a layer has both a cost and a time for are considered."""
    front = [(0.0, 0.0, ())]
    names = list(costs)
    for n in names:
        opts = [s for s in costs[n] if s in times.get(n, {})]
        if not opts:
            raise ValueError(f"layer {n!r}: no setting has both a damage and a time "
                             f"(damage for {sorted(costs[n])}, times for {sorted(times.get(n, {}))})")
        cand = sorted(((t + times[n][s], c + costs[n][s], a + (s,)) for t, c, a in front for s in opts),
                      key=lambda p: (p[0], p[1]))
        front, best = [], math.inf
        for p in cand:
            if p[1] < best - 1e-15:
                front.append(p)
                best = p[1]
    return [(t, c, dict(zip(names, a))) for t, c, a in front]


def allocate_time(costs: dict[str, dict[str, float]], times: dict[str, dict[str, float]],
                  budget, rest_ms: float = 0.0, max_damage: float = MAX_DAMAGE):
    """Settings per layer: with ``budget`` "fastest", the fastest allocation whose summed damage
    is at most ``max_damage``; with a number of milliseconds, the least damage whose time
    (``rest_ms`` plus the layers') fits in it, or the fastest there is when none fits. Returns
    ({layer: setting}, predicted ms, damage, whether the budget was met)."""
    budget = check_budget(budget)
    front = pareto_plans(costs, times)
    if budget == "fastest":
        t, c, alloc = next(p for p in front if p[1] <= max_damage + 1e-15) if any(
            p[1] <= max_damage + 1e-15 for p in front) else front[-1]
        return alloc, rest_ms + t, c, c <= max_damage + 1e-15
    fits = [p for p in front if rest_ms + p[0] <= budget]
    t, c, alloc = fits[-1] if fits else front[0]
    return alloc, rest_ms + t, c, bool(fits)


def make_plan(scores: list[LayerScore], avg_bits: float, pv_bits: int = 8) -> dict:
    """The plan file (docs/design.md, "Plan file") for these scores under the budget."""
    avg_bits = check_avg_bits(avg_bits)
    if avg_bits == FLOAT_BITS:
        layers = {s.name: {"qk_bits": FLOAT_BITS, "pv_bits": FLOAT_BITS, "score": round(s.score, 6)}
                  for s in scores}
    else:
        bits = allocate_bits({s.name: s.cost for s in scores}, avg_bits)
        layers = {s.name: {"qk_bits": bits[s.name], "pv_bits": pv_bits, "score": round(s.score, 6)}
                  for s in scores}
    return {"version": 1, "avg_bits": avg_bits, "layers": layers}


def details(scores: list[LayerScore]) -> dict:
    """Everything HQS measured, per layer (written as hqs.json beside plan.json)."""
    return {s.name: {"score": s.score, "sharpness": s.sharpness,
                     "damage": {str(b): d for b, d in s.damage.items()},
                     "weighted_cost": {str(b): c for b, c in s.cost.items()}} for s in scores}
