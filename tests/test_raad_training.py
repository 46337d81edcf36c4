"""Training on windows of the token grid, the fit's stage timings, and a short fit at the default
256 px on a real-photo category (the resolution inspection uses)."""

from __future__ import annotations

import json

import pytest
import torch

from raad.model import Detector, ModelConfig
from raad.train import FULL_SHARE, WINDOW, train

SMALL = dict(embed_dim=32, depth=2, num_heads=1, autoencoder="off", memory="off", align="off")


def test_a_window_gets_its_slice_of_the_position_embeddings():
    torch.manual_seed(0)
    st = Detector(ModelConfig(image_size=256, **SMALL)).eval().student
    with torch.no_grad():
        st.pos_embed.normal_()          # distinct embeddings everywhere
        x = torch.randn(2, 24, 64, 64)
        full = st._pos_embed(st.patch_embed(x))                       # (B, 1 + 32·32, C)
        with st.window_at((4, 6)):
            win = st._pos_embed(st.patch_embed(x[..., 8:40, 12:44]))  # tokens 4..19 × 6..21
        assert st._window is None                                     # reset on leaving
        grid = full[:, 1:].reshape(2, 32, 32, -1)[:, 4:20, 6:22]
        # the window's border tokens see zero padding instead of their neighbours; inside, equal
        torch.testing.assert_close(win[:, 1:].reshape(2, 16, 16, -1)[:, 1:-1, 1:-1], grid[:, 1:-1, 1:-1])
        torch.testing.assert_close(win[:, 0], full[:, 0])
        with pytest.raises(ValueError, match="outside the 32x32 grid"):
            with st.window_at((20, 0)):
                st._pos_embed(st.patch_embed(x[..., :32, :32]))


def _count_grids(det):
    seen = []
    det.student.patch_embed.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape[1:3])))
    return seen


@pytest.mark.parametrize("image_size, steps", [(256, 8), (128, 4), (256, 10)])
def test_training_windows_then_whole_grid(image_size, steps):
    """On grids wider than WINDOW the first steps see windows, the last FULL_SHARE the whole
    grid; at 128 px (16 tokens) every step sees the whole grid. steps=10 once divided by zero in
    the learning-rate schedule."""
    torch.manual_seed(0)
    det = Detector(ModelConfig(image_size=image_size, **SMALL))
    g = image_size // 8
    stems, targets = torch.randn(4, 24, 2 * g, 2 * g), torch.randn(4, 40, g, g)
    seen = _count_grids(det)
    log = train(det, stems, targets, steps, 1e-3, 2, 0, list(det.student.parameters()), show=False)
    windowed = int(steps * (1 - FULL_SHARE)) if g > WINDOW else 0
    assert seen == [(WINDOW, WINDOW)] * windowed + [(g, g)] * (steps - windowed)
    assert all(torch.isfinite(torch.tensor(r["loss_st"])) for r in log)


def test_short_fit_at_256_px_on_real_photographs(tmp_path):
    """`raad fit` at the default resolution on a real-photo category, then `raad score`: the
    run folder, the stage timings in the fit log, and metrics for every defect type."""
    pytest.importorskip("skimage")
    from raad.cli import main
    data, run, scores = tmp_path / "data", tmp_path / "run", tmp_path / "scores"
    assert main(["make-data", str(data), "--real", "--categories", "brick", "--n-train", "10",
                 "--n-test-good", "3", "--n-test-defect", "1"]) == 0
    assert ModelConfig().image_size == 256
    assert main(["fit", str(data / "brick"), "--out", str(run), "--quiet", "--embed-dim", "32",
                 "--depth", "2", "--num-heads", "1", "--steps", "4", "--stage2-steps", "2",
                 "--batch-size", "4", "--memory-size", "256"]) == 0
    run = run / "brick"          # one run folder per category
    log = json.loads((run / "fit_log.json").read_text())
    assert set(log["stage_seconds"]) == {"prepare", "train", "hqs", "quantize_stage2"}
    assert all(v >= 0 for v in log["stage_seconds"].values())
    cfg = json.loads((run / "config.json").read_text())["model"]
    assert cfg["image_size"] == 256
    assert main(["score", str(run), str(data / "brick"), "--out", str(scores), "--quiet"]) == 0
    metrics = json.loads((scores / "metrics.json").read_text())
    assert 0.0 <= metrics["image_auroc"] <= 1.0
    assert set(metrics["per_defect"]) == set(json.loads((data / "brick" / "meta.json").read_text())["defects"])


def test_image_score_blurs_the_map_before_its_maximum():
    from raad import threshold as T
    from raad.model import gaussian_blur
    maps = torch.zeros(2, 64, 64)
    maps[0, 10, 10] = 1.0                 # one sharp peak
    maps[1, 30:42, 30:42] = 0.5           # a defect's area, half as high
    assert T.image_scores(maps).tolist() == [1.0, 0.5]
    s = T.image_scores(maps, 4.0)
    assert s[1] > s[0]                    # blurred, the area outranks the peak
    ref = gaussian_blur(maps[:, None], 4.0)[:, 0].flatten(1).amax(1).double().numpy()
    assert s.tolist() == pytest.approx(ref.tolist(), rel=1e-6)
    assert ModelConfig(image_size=256).image_score_sigma == 4.0
    assert ModelConfig(image_size=128, score_sigma=0).image_score_sigma == 0.0


def test_format_8_runs_keep_the_plain_maximum(tmp_path):
    """A run fitted before score_sigma (format 8) loads with the plain maximum it was calibrated
    with; a new run records its blur."""
    from raad.checkpoint import load_run, save_run
    det = Detector(ModelConfig(image_size=64, **SMALL))
    save_run(tmp_path / "new", det, fit={}, plan=None)
    cfg = json.loads((tmp_path / "new" / "config.json").read_text())
    assert cfg["version"] == 10 and cfg["model"]["score_sigma"] is None
    assert load_run(tmp_path / "new")[0].cfg.image_score_sigma == 1.0
    cfg["version"] = 8
    del cfg["model"]["score_sigma"]
    (tmp_path / "new" / "config.json").write_text(json.dumps(cfg))
    assert load_run(tmp_path / "new")[0].cfg.image_score_sigma == 0.0


@pytest.mark.parametrize("version", [8, 9])
def test_runs_before_format_10_load_without_region_cells(tmp_path, version):
    """A memory fitted before the region cells (formats 8, 9) has no region buffers: it loads as
    memory_region 0 and keeps its three representations; a new run records its region and saves
    the region bank."""
    from raad import memory as M
    from raad.checkpoint import load_run, save_run
    det = Detector(ModelConfig(image_size=64, **dict(SMALL, memory="global", memory_size=64)))
    feats = M.representations(torch.randn(2, det.teacher.fine_channels, 16, 16), torch.randn(2, 3, 64, 64),
                              det.cfg.memory_region)
    det.memory.build(feats)
    save_run(tmp_path / "new", det, fit={}, plan=None)
    loaded = load_run(tmp_path / "new")[0]
    assert loaded.memory.reps == ("fine", "colour", "lines", "region")
    assert torch.equal(loaded.memory.region_bank, det.memory.region_bank)

    old = Detector(ModelConfig(image_size=64, **dict(SMALL, memory="global", memory_size=64, memory_region=0)))
    save_run(tmp_path / "old", old, fit={}, plan=None)
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    cfg["version"] = version
    del cfg["model"]["memory_region"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(cfg))
    back = load_run(tmp_path / "old")[0]
    assert back.cfg.memory_region == 0 and back.memory.reps == ("fine", "colour", "lines")
    with torch.no_grad():
        assert back(torch.randn(1, 3, 64, 64)).shape == (1, 64, 64)


@pytest.mark.parametrize("region", [10, 16, -4])
def test_memory_region_must_be_an_odd_number_of_cells(region):
    with pytest.raises(ValueError, match="--memory-region must be 0 or an odd number of 4-pixel cells"):
        Detector(ModelConfig(image_size=64, **dict(SMALL, memory_region=region)))
