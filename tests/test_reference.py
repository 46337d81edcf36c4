"""Float64 reference and maps: equal to the naive N×N formulas, chunking changes nothing."""

import math

import pytest
import torch

from raad_kernels import reference
from raad_kernels.reference import attention_reference


def _naive(q, k, v, scale, bias=None):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    p = torch.softmax(s, dim=-1)
    maps = {"cls": p[:, :, 0, :], "received": p.mean(dim=-2),
            "entropy": -(p * torch.log(p.clamp_min(1e-300))).sum(-1)}
    return p @ v.double(), maps


@pytest.mark.parametrize("nq,nk", [(1, 1), (1, 9), (17, 5), (50, 50), (197, 130)])
def test_maps_equal_softmax_row_column_mean_and_entropy(nq, nk):
    g = torch.Generator().manual_seed(nq * 1000 + nk)
    q = torch.randn(2, 3, nq, 24, generator=g) * 2
    k = torch.randn(2, 3, nk, 24, generator=g)
    v = torch.randn(2, 3, nk, 16, generator=g)
    out, maps = attention_reference(q, k, v, return_maps=("cls", "received", "entropy"))
    want, want_maps = _naive(q, k, v, 1 / math.sqrt(24))
    assert out.dtype == torch.float64 and torch.allclose(out, want, atol=1e-12)
    for name in ("cls", "received", "entropy"):
        assert maps[name].dtype == torch.float32
        assert torch.allclose(maps[name].double(), want_maps[name], atol=1e-6), name
    assert torch.allclose(maps["cls"].sum(-1), torch.ones(2, 3), atol=1e-5)
    assert torch.allclose(maps["received"].sum(-1), torch.ones(2, 3), atol=1e-5)


def test_chunking_changes_nothing(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 70, 8, generator=g) for _ in range(3))
    whole, wmaps = attention_reference(q, k, v, return_maps=("cls", "received", "entropy"))
    monkeypatch.setattr(reference, "_CHUNK_ELEMS", 2 * 70 * 3)  # 3 query rows per chunk
    assert reference.query_chunk(1, 2, 70) == 3
    chunked, cmaps = attention_reference(q, k, v, return_maps=("cls", "received", "entropy"))
    assert torch.allclose(whole, chunked, atol=1e-12)
    for n in wmaps:
        assert torch.allclose(wmaps[n], cmaps[n], atol=1e-6)


def test_masks_bool_and_additive_and_fully_masked_rows():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g) for _ in range(3))
    keep = torch.rand(1, 1, 6, 6, generator=g) > 0.4
    keep[..., 2, :] = False  # query 2 sees nothing
    keep[..., 0, 0] = True
    out, maps = attention_reference(q, k, v, attn_mask=keep, return_maps=("received", "entropy"))
    bias = torch.where(keep, 0.0, -math.inf).double()
    want, _ = _naive(q, k, v, 1 / math.sqrt(8), bias)
    rows = [i for i in range(6) if i != 2]
    assert torch.allclose(out[:, :, rows], want[:, :, rows], atol=1e-12)
    assert (out[:, :, 2] == 0).all() and torch.isfinite(out).all()
    assert (maps["entropy"][:, :, 2] == 0).all()
    additive = torch.where(keep, 0.0, -math.inf)
    out2, _ = attention_reference(q, k, v, attn_mask=additive)
    assert torch.equal(out, out2)
