"""raad_kernels.lines: the CPU kernel and the torch specification against a float64 brute force
(numpy and scipy, written from the docstring, not from the torch code)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import signal

from raad_kernels import lines as L

KERNEL = pytest.mark.skipif(L._FUSED_KERNEL is None, reason="the CPU extension is not built")


def _brute(grey, taps_x, taps_y, steer, cell, pool):
    g, tx, ty, s = (np.asarray(t, dtype=np.float64) for t in (grey, taps_x, taps_y, steer))
    b, h, w = g.shape
    r = tx.shape[1] // 2
    ch, cw, half = h // cell, w // cell, pool // 2
    out = np.full((b, len(s), ch, cw), np.nan)
    for i in range(b):
        p = np.pad(g[i], r, mode="reflect")
        f = np.stack([signal.correlate2d(p, np.outer(ty[c], tx[c]), mode="valid") for c in range(3)])
        across = np.abs(np.einsum("oc,chw->ohw", s, f))
        cells = across.reshape(len(s), ch, cell, cw, cell).mean((2, 4))
        for y in range(ch):
            for x in range(cw):
                block = cells[:, max(0, y - half):y + half + 1, max(0, x - half):x + half + 1]
                out[i, :, y, x] = np.sort(block.mean((1, 2)))[::-1]
    return out


def _case(b, h, w, k, o, seed, offset=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    grey = torch.randn(b, h, w, generator=g) * scale + offset
    grey[:, :, w // 3] += 4 * scale                      # a bright line and a dark one
    grey[:, h // 2, :] -= 3 * scale
    taps_x, taps_y = torch.randn(3, k, generator=g), torch.randn(3, k, generator=g)
    taps_x -= taps_x.mean(1, keepdim=True)               # derivative-like: no response to a constant
    steer = torch.randn(o, 3, generator=g)
    return grey, taps_x, taps_y, steer


def _tolerance(grey, taps_x, taps_y, steer):
    """float32 rounding of the filter sums, relative to what they add up (not to the result)"""
    return 1e-5 * float(grey.abs().max()) * float(taps_x.abs().sum(1).max() * taps_y.abs().sum(1).max()) \
        * float(steer.abs().sum(1).max())


shapes = dict(b=st.integers(1, 3), ch=st.integers(1, 9), cw=st.integers(1, 9), k=st.sampled_from([3, 5, 7]),
              o=st.integers(1, 9), cell=st.sampled_from([1, 2, 4]), pool=st.sampled_from([1, 3, 5]),
              seed=st.integers(0, 10**6))


def _fits(ch, cw, cell, k):
    return ch * cell > k // 2 and cw * cell > k // 2


@settings(max_examples=25, deadline=None)
@given(**shapes)
def test_reference_matches_brute_force(b, ch, cw, k, o, cell, pool, seed):
    if not _fits(ch, cw, cell, k):
        return
    case = _case(b, ch * cell, cw * cell, k, o, seed)
    ref = _brute(*case, cell, pool)
    out = L.line_cells_reference(*(t.double() for t in case), cell=cell, pool=pool)
    assert np.allclose(out.numpy(), ref, rtol=1e-10, atol=1e-10)


@KERNEL
@settings(max_examples=60, deadline=None)
@given(**shapes, offset=st.sampled_from([0.0, 50.0]), scale=st.sampled_from([1.0, 1e-3, 30.0]))
def test_kernel_matches_brute_force_on_ragged_shapes(b, ch, cw, k, o, cell, pool, seed, offset, scale):
    """B = 1, one cell, non-square images, odd and even cell counts, a cell of one pixel, no
    pooling, taps longer than the image is wide in cells, a large constant offset (which the
    taps must cancel in float32) and small and large scales; the output poisoned first."""
    if not _fits(ch, cw, cell, k):
        return
    case = _case(b, ch * cell, cw * cell, k, o, seed, offset, scale)
    ref = _brute(*case, cell, pool)
    out = torch.full((b, o, ch, cw), float("nan"))
    got = L.line_cells(*case, cell=cell, pool=pool, out=out)
    assert got is out and torch.isfinite(out).all(), "every element written"
    assert np.allclose(out.numpy(), ref, rtol=1e-4, atol=_tolerance(*case))


@KERNEL
def test_kernel_on_the_memory_s_shape_and_filters_against_the_torch_path(monkeypatch):
    """What raad.memory runs: 8 images of 128×128 (ImageNet-normalised textures), its own filters."""
    from raad import memory as M
    g = torch.Generator().manual_seed(3)
    image = torch.nn.functional.interpolate(torch.randn(8, 3, 32, 32, generator=g), size=(128, 128),
                                            mode="bicubic", align_corners=False)
    image[:, :, 40, 10:90] -= 2.0   # a crack
    fused = M.line_cells(image)
    monkeypatch.setenv("RAAD_LINES_FUSED", "0")
    spec = M.line_cells(image)
    exact = M.line_cells(image.double())
    assert fused.shape == (8, M.LINE_ORIENTATIONS, 32, 32) and fused.dtype == torch.float32
    err_fused, err_spec = ((x.double() - exact).abs().max() for x in (fused, spec))
    assert err_fused <= 1e-5 * exact.abs().max() and err_fused <= 4 * err_spec + 1e-7


def test_torch_path_is_the_reference_when_switched_off(monkeypatch):
    case = _case(2, 12, 16, 5, 8, seed=1)
    monkeypatch.setenv("RAAD_LINES_FUSED", "0")
    assert torch.equal(L.line_cells(*case), L.line_cells_reference(*case))


def test_bad_arguments_name_what_is_wrong():
    grey, tx, ty, steer = _case(1, 8, 8, 3, 4, seed=0)
    with pytest.raises(ValueError, match="grey must be"):
        L.line_cells(grey[0], tx, ty, steer)
    with pytest.raises(ValueError, match="K odd"):
        L.line_cells(grey, tx[:, :2], ty[:, :2], steer)
    with pytest.raises(ValueError, match="steer must be"):
        L.line_cells(grey, tx, ty, steer[:, :2])
    with pytest.raises(ValueError, match="multiples of cell=3"):
        L.line_cells(grey, tx, ty, steer, cell=3)
    with pytest.raises(ValueError, match="pool odd"):
        L.line_cells(grey, tx, ty, steer, pool=2)
    with pytest.raises(ValueError, match="out must be"):
        L.line_cells(grey, tx, ty, steer, out=torch.empty(1, 4, 3, 2))
