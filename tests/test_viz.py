"""raad.viz: colour maps, overlays, report grid."""

import sys

import numpy as np
import pytest
from PIL import Image

from raad import viz


@pytest.fixture
def no_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    viz._lut.cache_clear()
    yield
    viz._lut.cache_clear()


def test_colormap_luts():
    for use_mpl in (True, False):
        for name in ("turbo", "jet"):
            lut = viz.colormap_lut(name, use_matplotlib=use_mpl)
            assert lut.shape == (256, 3) and lut.dtype == np.uint8
    pytest.importorskip("matplotlib")
    mpl, own = (viz.colormap_lut("turbo", use_matplotlib=u).astype(int) for u in (True, False))
    assert np.abs(mpl - own).mean() < 10 and np.abs(mpl - own).max() <= 40   # close fallback
    assert viz.colormap_lut("viridis").shape == (256, 3)
    with pytest.raises(ValueError, match="unknown colour map"):
        viz.colormap_lut("nope")


def test_builtin_colormaps_without_matplotlib(no_matplotlib):
    assert viz.colormap_lut("turbo").shape == (256, 3)
    with pytest.raises(ValueError, match="without matplotlib"):
        viz.colormap_lut("viridis")
    out = viz.overlay(np.zeros((4, 4, 3), np.uint8), np.eye(4))
    assert out.size == (4, 4)


def test_colorize_range():
    lut = viz.colormap_lut("jet")
    a = np.array([[0.0, 0.5, 1.0]])
    c = viz.colorize(a, cmap="jet")
    assert c.shape == (1, 3, 3) and c.dtype == np.uint8
    assert (c[0, 0] == lut[0]).all() and (c[0, 2] == lut[255]).all()
    c2 = viz.colorize(a, vmin=0.0, vmax=2.0, cmap="jet")       # fixed range: 1.0 is mid-scale
    assert (c2[0, 2] == lut[128]).all()
    assert (viz.colorize(np.full((2, 2), 3.0)) == viz.colormap_lut()[0]).all()   # constant
    with pytest.raises(ValueError, match="2-D"):
        viz.colorize(np.zeros(3))


def test_overlay_blend_and_contour():
    img = np.full((20, 30, 3), 100, np.uint8)
    amap = np.zeros((10, 15))
    amap[2:6, 3:9] = 1.0                      # half resolution: resized to the image
    mask = np.zeros((20, 30), bool)
    mask[5:15, 5:20] = True
    out = np.asarray(viz.overlay(img, amap, mask, alpha=0.0, contour_color=(255, 0, 0)))
    assert out.shape == (20, 30, 3)
    edge = np.zeros_like(mask)
    edge[5, 5:20] = edge[14, 5:20] = edge[5:15, 5] = edge[5:15, 19] = True
    assert (out[edge] == (255, 0, 0)).all()
    assert (out[~edge] == 100).all()          # alpha 0: the image itself elsewhere
    heat = np.asarray(viz.overlay(img, amap, None, alpha=1.0, vmin=0, vmax=1))
    lut = viz.colormap_lut()
    assert (heat[0, 0] == lut[0]).all() and (heat[8, 10] == lut[255]).all()
    half = np.asarray(viz.overlay(img, amap, None, alpha=0.5, vmin=0, vmax=1))
    assert np.allclose(half[0, 0], np.rint(0.5 * 100 + 0.5 * lut[0].astype(float)), atol=1)
    thick = np.asarray(viz.overlay(img, amap, mask, alpha=0, contour_width=2))
    assert (thick == 255).all(-1).sum() > edge.sum()
    with pytest.raises(ValueError, match="alpha"):
        viz.overlay(img, amap, alpha=2)


def test_overlay_accepts_paths_and_small_masks(tmp_path):
    p = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(p)   # greyscale file
    small_mask = np.zeros((4, 4), bool)
    small_mask[1:3, 1:3] = True
    out = viz.overlay(p, np.random.default_rng(0).random((8, 8)), small_mask)
    assert out.mode == "RGB" and out.size == (8, 8)


def test_save_overlay_and_report(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    paths = []
    for i in range(5):
        p = viz.save_overlay(tmp_path / "overlays" / f"scratch_{i:03d}.png", img,
                             np.random.default_rng(i).random((16, 16)), np.eye(16, dtype=bool))
        with Image.open(p) as im:
            assert im.size == (16, 16)
        paths.append(p)
    assert sorted(x.name for x in (tmp_path / "overlays").iterdir()) == [p.name for p in paths]
    entries = [viz.ReportEntry(paths[0], caption="a <b> & c", score=0.5, label="scratch"),
               {"image": paths[1], "score": 0.25}] + paths[2:]
    html_path, md_path = viz.write_report(tmp_path, entries, title="Demo | run", columns=2,
                                          summary={"image_auroc": 0.9, "aupro": None,
                                                   "per_defect": {"x": {}}})
    html = html_path.read_text()
    md = md_path.read_text()
    assert html.count("<img ") == 5 and "src='overlays/scratch_000.png'" in html
    assert "a &lt;b&gt; &amp; c" in html and "score 0.5" in html
    assert "image_auroc" in html and "0.9000" in html and "n/a" in html
    assert "per_defect" not in html
    assert md.count("![") == 5 and "(overlays/scratch_004.png)" in md
    assert md.startswith("# Demo | run")
    # 5 entries in 2 columns: 3 grid rows after the header and separator rows
    grid = [ln for ln in md.splitlines() if ln.startswith("| ![")]
    assert len(grid) == 3
    assert sorted(x.name for x in tmp_path.iterdir()) == ["overlays", "report.html", "report.md"]
    with pytest.raises(ValueError, match="columns"):
        viz.write_report(tmp_path, entries, columns=0)
