"""The PatchCore-style baseline: its distances against a brute-force search, its coreset, its
maps' shape, and that it finds a pasted defect."""

from __future__ import annotations

import pytest
import torch

from raad.baseline import CORESET, PatchCore


@pytest.fixture(scope="module")
def textures():
    g = torch.Generator().manual_seed(0)
    # a smooth random texture (ImageNet-normalised range), 6 training images and 2 test ones
    base = torch.randn(8, 3, 16, 16, generator=g)
    x = torch.nn.functional.interpolate(base, size=(96, 96), mode="bilinear", align_corners=False)
    return x[:6].contiguous(), x[6:].contiguous()


def test_scores_are_distances_to_the_nearest_kept_cell(textures):
    train, test = textures
    pc = PatchCore(96, seed=0).fit(train)
    cells = len(train) * (96 // 8) ** 2
    assert len(pc.bank) == round(CORESET * cells)
    f = pc.features(test)
    q = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).double()
    ref = torch.cdist(q, pc.bank.double()).min(1).values.float().reshape(2, 1, 12, 12)
    ref_map = torch.nn.functional.interpolate(ref, size=(96, 96), mode="bilinear", align_corners=False)
    from raad.model import gaussian_blur
    expected = gaussian_blur(ref_map, 4.0)[:, 0]
    got = pc(test)
    assert got.shape == (2, 96, 96)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)


def test_training_cells_score_lower_than_a_pasted_defect(textures):
    train, _ = textures
    pc = PatchCore(96, coreset=1.0).fit(train)     # every training cell kept: distance 0 on them
    assert float(pc(train[:1]).max()) < 0.1    # up to the float32 search's rounding of |q|² - 2q·b + |b|²
    bad = train[:1].clone()
    bad[..., 40:56, 40:56] = 3.0                    # a bright square
    m = pc(bad)[0]
    assert float(m[40:56, 40:56].mean()) > 3 * float(m[:16, :16].mean())   # (wide receptive fields)


def test_scoring_before_fitting_is_refused():
    with pytest.raises(RuntimeError, match="fit"):
        PatchCore(64)(torch.zeros(1, 3, 64, 64))
