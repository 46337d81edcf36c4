"""Float64 attention and its maps: the ground truth every backend's error is measured against.

Both this reference and the ``torch`` backend walk the queries in chunks, so neither ever holds
more than ``chunk × Nk`` probabilities per (batch, head): the N×N matrix never exists.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

MAP_NAMES = ("cls", "received", "entropy")
#: Probabilities held at once per call (elements), bounding the memory of the chunked loops.
_CHUNK_ELEMS = 1 << 24


def query_chunk(b: int, h: int, nk: int) -> int:
    return max(1, _CHUNK_ELEMS // max(1, b * h * nk))


def mask_to_bias(attn_mask: torch.Tensor | None, shape, dtype) -> torch.Tensor | None:
    """Boolean mask (True = attend, as SDPA) or additive float mask → additive bias broadcast to
    ``shape`` (B, H, Nq, Nk), as a view (no copy)."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        bias = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device)
        bias = bias.masked_fill(~attn_mask, -math.inf)
    else:
        bias = attn_mask.to(dtype)
    return bias.expand(shape)


def safe_denominator(l: torch.Tensor) -> torch.Tensor:
    """Row sums with fully masked rows (l = 0) mapped to 1, so those rows come out as zeros."""
    return torch.where(l > 0, l, torch.ones_like(l))


def softmax_chunk(scores: torch.Tensor):
    """Row-stable exponentials of a score chunk: (p = exp(s - m) in [0, 1], row max m, row sum l).

    A row whose every key is masked (-inf) gets p = 0, l = 0; callers write zeros there.
    """
    m = scores.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(scores - m)
    return p, m, p.sum(dim=-1, keepdim=True)


class MapAccumulator:
    """Collects the requested maps chunk by chunk from normalised probabilities."""

    def __init__(self, names, b, h, nq, nk, device):
        self.names = tuple(names)
        f32 = dict(dtype=torch.float32, device=device)
        self.maps = {}
        if "cls" in self.names:
            self.maps["cls"] = torch.empty(b, h, nk, **f32)
        if "received" in self.names:
            self.acc = torch.zeros(b, h, nk, dtype=torch.float64, device=device)
        if "entropy" in self.names:
            self.maps["entropy"] = torch.empty(b, h, nq, **f32)
        self.nq = nq

    def add(self, start: int, probs: torch.Tensor):
        """``probs``: normalised (B, H, chunk, Nk) rows for queries ``start:start+chunk``."""
        if not self.names:
            return
        if start == 0 and "cls" in self.maps:
            self.maps["cls"].copy_(probs[:, :, 0, :])
        if "received" in self.names:
            self.acc += probs.sum(dim=-2, dtype=torch.float64)
        if "entropy" in self.names:
            ent = -torch.special.xlogy(probs, probs).sum(dim=-1)
            self.maps["entropy"][:, :, start:start + probs.shape[-2]] = ent

    def result(self) -> dict:
        if "received" in self.names:
            self.maps["received"] = (self.acc / self.nq).float()
        return {n: self.maps[n] for n in self.names}


def chunked_attention(nq: int, shape, device, scores_fn: Callable, pv_fn: Callable, out,
                      map_names=()):
    """Run softmax attention query-chunk by query-chunk.

    ``scores_fn(i0, i1)`` → (B, H, i1-i0, Nk) scores (mask included); ``pv_fn(p, l, i0, i1)`` →
    the normalised output rows given unnormalised probabilities and row sums. Writes ``out``.
    """
    b, h, nk = shape
    acc = MapAccumulator(map_names, b, h, nq, nk, device)
    step = query_chunk(b, h, nk)
    for i0 in range(0, nq, step):
        i1 = min(nq, i0 + step)
        p, _, l = softmax_chunk(scores_fn(i0, i1))
        out[:, :, i0:i1] = pv_fn(p, l, i0, i1)
        if acc.names:
            acc.add(i0, (p / safe_denominator(l)).float())
    return out, acc.result()


def attention_reference(q, k, v, scale=None, attn_mask=None, return_maps=()):
    """Exact attention in float64. Returns (out float64, maps dict of float32).

    ``return_maps``: names from MAP_NAMES, or True for all of them."""
    return_maps = MAP_NAMES if return_maps is True else tuple(return_maps or ())
    q64, k64, v64 = q.double(), k.double(), v.double()
    b, h, nq, d = q.shape
    nk = k.shape[-2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    bias = mask_to_bias(attn_mask, (b, h, nq, nk), torch.float64)

    def scores(i0, i1):
        s = (q64[:, :, i0:i1] @ k64.transpose(-1, -2)) * scale
        return s if bias is None else s + bias[:, :, i0:i1]

    def pv(p, l, i0, i1):
        return (p @ v64) / safe_denominator(l)

    out = torch.empty(b, h, nq, v.shape[-1], dtype=torch.float64, device=q.device)
    return chunked_attention(nq, (b, h, nk), q.device, scores, pv, out, return_maps)
