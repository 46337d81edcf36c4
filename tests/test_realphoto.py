"""The real-photo benchmark builder: exact masks, disjoint train/test regions, determinism, the
MVTec layout it writes, and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("skimage", reason="the real-photo set's photographs ship in scikit-image")

from raad import data as D  # noqa: E402
from raad import realphoto as R  # noqa: E402

SIZE = 96   # small crops keep the tests quick; the drawing code is the same at any size


def _intersects(a, b) -> bool:
    return a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]


@pytest.mark.parametrize("category", list(R.REAL_CATEGORIES))
def test_regions_are_disjoint_and_hold_a_crop(category):
    spec = R.REAL_CATEGORIES[category]
    h, w = R.photograph(category).shape[:2]
    for a in spec["train"]:
        for b in spec["test"]:
            assert not _intersects(a, b), (a, b)
    for r in spec["train"] + spec["test"]:
        y0, y1, x0, x1 = r
        assert 0 <= y0 and y1 <= h and 0 <= x0 and x1 <= w, r
        assert y1 - y0 >= spec["crop"] and x1 - x0 >= spec["crop"], r
    assert set(spec["defects"]) <= set(R.DEFECTS)


@pytest.mark.parametrize("category", ["brick", "coins", "page"])
def test_crops_stay_inside_their_split(category):
    """Every crop box lies wholly inside a region of its own split, so no native pixel of a
    training crop is ever in a test crop."""
    rng = np.random.default_rng(0)
    spec = R.REAL_CATEGORIES[category]
    for split, other in (("train", "test"), ("test", "train")):
        for _ in range(200):
            y, x, c = R.crop_box(category, split, rng)
            box = (y, y + c, x, x + c)
            assert any(r[0] <= box[0] and box[1] <= r[1] and r[2] <= box[2] and box[3] <= r[3]
                       for r in spec[split]), box
            assert not any(_intersects(box, r) for r in spec[other]), box


@pytest.mark.parametrize("category", ["gravel", "tissue", "coins", "page"])
def test_masks_are_exact(category):
    """Outside the mask every pixel equals the defect-free twin; the mask covers what changed,
    is not a speck, and the defect is visible (it changes the pixels inside it)."""
    for defect in R.REAL_CATEGORIES[category]["defects"]:
        img, mask = R.real_sample(category, "test", defect, 1, size=SIZE)
        clean, none = R.real_sample(category, "test", defect, 1, size=SIZE, apply_defect=False)
        assert img.dtype == np.uint8 and img.shape == (SIZE, SIZE, 3)
        assert not none.any()
        changed = (img != clean).any(axis=-1)
        assert not (changed & ~mask).any(), f"{defect}: pixels changed outside the mask"
        assert mask.sum() >= 12, defect
        # most of the mask really changed (it is the changed region, closed and filled)
        assert changed[mask].mean() > 0.5, (defect, changed[mask].mean())
        if R.is_grey(category):
            assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all(), defect


def test_good_samples_are_crops_of_the_photograph_and_deterministic():
    a, ma = R.real_sample("brick", "train", "good", 3, size=SIZE)
    b, mb = R.real_sample("brick", "train", "good", 3, size=SIZE)
    c, _ = R.real_sample("brick", "train", "good", 4, size=SIZE)
    d, _ = R.real_sample("brick", "train", "good", 3, size=SIZE, seed=1)
    assert np.array_equal(a, b) and not ma.any() and not mb.any()
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    e, me = R.real_sample("brick", "test", "hole", 0, size=SIZE)
    f, mf = R.real_sample("brick", "test", "hole", 0, size=SIZE)
    assert np.array_equal(e, f) and np.array_equal(me, mf) and me.any()


def test_make_real_writes_a_valid_category_byte_for_byte(tmp_path):
    kw = dict(categories=["coins"], n_train=3, n_test_good=2, n_test_defect=1, size=SIZE, show=False)
    (cat_dir,) = R.make_real(tmp_path / "a", **kw)
    R.make_real(tmp_path / "b", **kw)
    cat = D.validate(cat_dir)
    assert len(cat.train) == 3
    assert sorted(cat.defect_types) == sorted(R.REAL_CATEGORIES["coins"]["defects"])
    meta = json.loads((cat_dir / "meta.json").read_text())
    assert meta["held_out"] is False and meta["size"] == SIZE and meta["photograph"] == "skimage:coins"
    files = sorted(p.relative_to(cat_dir) for p in cat_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b" / "coins")
                           for p in (tmp_path / "b" / "coins").rglob("*") if p.is_file())
    for f in files:
        assert (cat_dir / f).read_bytes() == (tmp_path / "b" / "coins" / f).read_bytes(), f
    # a mask is the changed region of its image (0/255, over the threshold inside)
    for item in cat.test:
        if item.label:
            m = D.load_test_mask(item)
            assert m.any() and m.shape == (SIZE, SIZE)


def test_held_out_categories_are_marked():
    held = [c for c in R.REAL_CATEGORIES if R.held_out(c)]
    assert len(held) >= 2 and len(R.REAL_CATEGORIES) - len(held) >= 6
    kinds = {R.REAL_CATEGORIES[c]["kind"] for c in R.REAL_CATEGORIES if not R.held_out(c)}
    assert any(k.startswith("texture") for k in kinds) and sum(not k.startswith("texture") for k in kinds) >= 2


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(D.DataError, match="unknown real-photo category"):
        R.make_real(tmp_path, categories=["carpet"], show=False)
    with pytest.raises(D.DataError, match="size must be at least 96"):
        R.make_real(tmp_path, categories=["brick"], size=32, show=False)
    with pytest.raises(ValueError, match="has no defect"):
        R.real_sample("page", "test", "crack", 0)
    with pytest.raises(ValueError, match="split must be"):
        R.real_sample("page", "train", "stain", 0)
    R.make_real(tmp_path, categories=["page"], n_train=2, n_test_good=1, n_test_defect=1, size=96,
                show=False)
    before = sorted(p.name for p in (tmp_path / "page" / "train" / "good").iterdir())
    with pytest.raises(D.DataError, match="already exists"):
        R.make_real(tmp_path, categories=["page"], n_train=2, size=96, show=False)
    assert sorted(p.name for p in (tmp_path / "page" / "train" / "good").iterdir()) == before


def test_cli_make_data_real(tmp_path, capsys):
    from raad.cli import main
    assert main(["make-data", str(tmp_path), "--real", "--categories", "chalkboard", "--n-train", "2",
                 "--n-test-good", "1", "--n-test-defect", "1", "--size", "96"]) == 0
    assert (tmp_path / "chalkboard" / "meta.json").is_file()
    assert json.loads((tmp_path / "chalkboard" / "meta.json").read_text())["held_out"] is True
    assert main(["make-data", str(tmp_path / "x"), "--real", "--categories", "carpet"]) == 2
    assert "unknown real-photo category" in capsys.readouterr().err
