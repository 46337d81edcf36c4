"""Pose normalisation (raad.pose): the angle read from the moments, the canonical frame, the map
turned back, the auto decision, and the detector and a run folder with alignment on."""

import json
import math

import numpy as np
import pytest
import torch

from raad import data as D
from raad import pose as P

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def _tensor(u8):
    return (torch.from_numpy(u8).permute(2, 0, 1).float() / 255 - MEAN) / STD


def _samples(category, split, defect, n, size=128):
    """Synthetic images (normalised as the detector sees them) and, for the screw, the angle
    of its axis from the generator's own parameters."""
    imgs, angles = [], []
    for i in range(n):
        u8, _ = D.synth_sample(category, split, defect, i, size=size)
        imgs.append(_tensor(u8))
        if category == "screw":
            base, _ = D._sample_rngs(0, category, split, defect, i)
            angles.append(D._screw_params(base, size)["th"])
    return torch.stack(imgs), torch.tensor(angles)


def _angle_error_deg(a, b):
    return torch.rad2deg((torch.remainder(a - b + math.pi, 2 * math.pi) - math.pi).abs())


@pytest.mark.parametrize("split,defect", [("train", "good"), ("test", "chipped"), ("test", "scratch"),
                                          ("test", "contamination")])
def test_the_axis_read_from_the_moments_is_the_generators(split, defect):
    """The screw's axis (head to tip) within a few degrees of the angle it was drawn at, defects
    included: a broken tip or a stain moves the moments only a little."""
    x, angle = _samples("screw", split, defect, 12)
    err = _angle_error_deg(P.estimate(x).theta, angle)
    assert err.max() < (0.5 if defect == "good" else 4.0), err


def test_a_quarter_turn_of_the_image_turns_the_pose_with_it():
    x, _ = _samples("screw", "train", "good", 6)
    p, q = P.estimate(x), P.estimate(torch.rot90(x, 1, dims=(-2, -1)))
    W = x.shape[-1]
    # rot90 (counter-clockwise as displayed): pixel (x, y) goes to (y, W-1-x), angles lose 90 degrees
    assert torch.allclose(q.cx, p.cy, atol=1e-3) and torch.allclose(q.cy, W - 1 - p.cx, atol=1e-3)
    assert _angle_error_deg(q.theta, p.theta - math.pi / 2).max() < 1e-3


def test_the_canonical_image_has_its_centroid_at_the_centre_and_its_axis_along_x():
    x, _ = _samples("screw", "test", "good", 8)
    pose = P.estimate(x)
    a = P.align(x, pose)
    # the foreground the pose was read from, carried along: its moments are the canonical ones
    w = P.align(P.foreground(x)[:, None], pose)[:, 0]
    yy, xx = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    m0 = w.sum(dim=(1, 2))
    cx, cy = (w * xx).sum(dim=(1, 2)) / m0, (w * yy).sum(dim=(1, 2)) / m0
    assert (cx - 63.5).abs().max() < 0.25 and (cy - 63.5).abs().max() < 0.25
    dx, dy = xx - cx[:, None, None], yy - cy[:, None, None]
    assert ((w * dx * dy).sum(dim=(1, 2)).abs() < 0.01 * (w * dx * dx).sum(dim=(1, 2))).all()
    assert ((w * dx ** 3).sum(dim=(1, 2)) > 0).all()     # the light end along +x
    # read again from the canonical image, the axis is along +x
    assert _angle_error_deg(P.estimate(a).theta, torch.zeros(8)).max() < 2.0
    # every canonical screw covers the same pixels: the foregrounds overlap far more than before
    def overlap(imgs):
        f = P.foreground(imgs) > 0
        return (f.float().mean(0) > 0.5).sum() / f.float().sum(dim=(1, 2)).mean()
    assert overlap(a) > 0.8 > 0.3 > overlap(x)


def test_unalign_undoes_align_where_the_image_was_seen():
    x, _ = _samples("screw", "train", "good", 4)
    pose = P.estimate(x)
    back = P.unalign(P.align(x, pose), pose)
    inner = (slice(None), slice(None), slice(24, 104), slice(24, 104))
    # bilinear twice: a blur, not a displacement (a displacement of one pixel errs ~0.3 here)
    assert (back - x)[inner].abs().mean() < 0.06
    shifted = torch.roll(x, 1, dims=-1)
    assert (shifted - x)[inner].abs().mean() > 2 * (back - x)[inner].abs().mean()


def test_the_pixels_brought_in_from_outside_are_the_background_colour_not_a_mirror():
    x, _ = _samples("screw", "train", "good", 4)
    a = P.align(x, P.estimate(x))
    bg = P.background(x)[0]
    corner = a[..., :3, :3].flatten(2)   # outside the original image in every pose but 0
    turned = P.estimate(x).theta.remainder(math.pi / 2).sub(math.pi / 4).abs() < math.pi / 8
    assert torch.allclose(corner[turned], bg[turned][..., None].expand_as(corner[turned]), atol=1e-4)


@pytest.mark.parametrize("category,expected", [("screw", "on"), ("weave", "off"), ("stone", "off"),
                                               ("pcb", "off")])
def test_auto_aligns_the_object_whose_angle_varies_and_nothing_else(category, expected):
    """Textures have no elongated foreground, the pcb lies at one angle: both stay as they are."""
    x, _ = _samples(category, "train", "good", 24)
    assert P.decide(x)["align"] == expected


@pytest.mark.parametrize("category,is_object", [("screw", True), ("pcb", True), ("weave", False),
                                                ("stone", False)])
def test_the_layout_keeps_the_autoencoder_for_objects_and_drops_it_on_textures(category, is_object):
    """``autoencoder`` auto follows the foreground test; on and off are kept as given, and the
    align choice is resolved by the same reading."""
    from raad.model import ModelConfig
    from raad.train import resolve_layout
    x, _ = _samples(category, "train", "good", 24)
    cfg, read = resolve_layout(ModelConfig(), x)
    assert read["object"] is is_object and read["align"] == P.decide(x)["align"] == cfg.align
    assert cfg.autoencoder == read["autoencoder"] == ("on" if is_object else "off")
    for fixed in ("on", "off"):
        cfg, read = resolve_layout(ModelConfig(autoencoder=fixed, align="off"), x)
        assert cfg.autoencoder == read["autoencoder"] == fixed and cfg.align == "off"
    assert resolve_layout(ModelConfig(autoencoder="on", align="on"), x) == (
        ModelConfig(autoencoder="on", align="on"), {"align": "on", "autoencoder": "on"})   # nothing read


def test_a_detector_without_the_autoencoder_has_no_such_branch():
    from raad.model import Detector, ModelConfig
    small = dict(image_size=64, embed_dim=32, depth=1, num_heads=1, memory="off")
    with pytest.raises(ValueError, match="--autoencoder"):
        Detector(ModelConfig(autoencoder="maybe", **small))
    det = Detector(ModelConfig(autoencoder="off", **small)).eval()
    assert det.ae is None and det.student.out_head.out_features == det.teacher.target_channels
    assert Detector(ModelConfig(autoencoder="auto", **small)).ae is not None   # unfitted: built
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(det(x), det(x, branch="student"))
    with pytest.raises(ValueError, match="no autoencoder.*'off'"):
        det(x, branch="autoencoder")


def test_spread_of_angles():
    assert P.spread_deg(torch.full((10,), 1.3)) < 1e-3
    assert P.spread_deg(torch.linspace(0, 2 * math.pi, 101)[:-1]) > 100


def test_an_aligned_detector_maps_a_turned_image_as_the_turned_map():
    """With alignment on, a quarter turn of the input gives the quarter-turned map: the canonical
    images are the same, so the map is turned back correctly (a wrong inverse would misplace
    it). Without alignment the (untrained) detector's map is not equivariant."""
    from raad.model import Detector, ModelConfig
    torch.manual_seed(0)
    x, _ = _samples("screw", "test", "chipped", 2, size=64)
    xr = torch.rot90(x, 1, dims=(-2, -1))
    for align in ("on", "off"):
        det = Detector(ModelConfig(image_size=64, embed_dim=32, depth=1, num_heads=1, memory="off",
                                   align=align, smooth_sigma=0)).eval()
        with torch.no_grad():
            m, mr = det(x), det(xr)
        err = (torch.rot90(m, 1, dims=(-2, -1)) - mr)[:, 8:-8, 8:-8].abs().mean() / m.abs().mean()
        if align == "on":
            assert err < 0.05, err
        else:
            assert err > 0.1, err


def test_align_mode_is_checked():
    from raad.model import Detector, ModelConfig
    with pytest.raises(ValueError, match="--align"):
        Detector(ModelConfig(image_size=64, align="yes"))


def test_an_aligned_run_records_its_choice_reloads_and_scores(tmp_path):
    """``--align auto`` on the screw resolves to on; the run records it, reloads to the same
    maps, and `raad score` writes maps in the images' own pose."""
    from raad.checkpoint import load_run
    from raad.cli import main
    data, run, out = tmp_path / "data", tmp_path / "run", tmp_path / "out"
    assert main(["make-data", str(data), "--categories", "screw", "--size", "64", "--n-train", "12",
                 "--n-test-good", "2", "--n-test-defect", "1"]) == 0
    tiny = ["--image-size", "64", "--embed-dim", "32", "--depth", "1", "--num-heads", "1",
            "--steps", "3", "--stage2-steps", "1", "--batch-size", "4", "--memory", "off"]
    assert main(["fit", str(data), "--out", str(run), "--quiet"] + tiny) == 0
    config = json.loads((run / "screw" / "config.json").read_text())
    chosen = json.loads((run / "screw" / "fit_log.json").read_text())["layout"]
    assert config["model"]["align"] == chosen["align"] == "on"
    assert config["model"]["autoencoder"] == chosen["autoencoder"] == "on" and chosen["object"]   # an object
    assert chosen["foreground"] >= P.MIN_FOREGROUND and chosen["elongation"] >= P.MIN_ELONGATION and chosen["spread_deg"] >= P.MIN_SPREAD_DEG
    det, _, _ = load_run(run / "screw", precision="fp32")
    again, _, _ = load_run(run / "screw", precision="fp32")
    assert det.cfg.align == "on"
    x = torch.stack([D.load_image(p, 64) for p in sorted((data / "screw" / "test").glob("*/*.png"))])
    with torch.no_grad():
        assert torch.equal(det(x), again(x))
    assert main(["score", str(run), str(data), "--out", str(out), "--quiet", "--precision", "fp32"]) == 0
    maps = np.load(out / "maps.npz")
    assert "chipped/000.png" in maps.files and np.isfinite(maps["chipped/000.png"]).all()
    # off stays off: nothing is turned
    assert main(["fit", str(data), "--out", str(tmp_path / "run_off"), "--quiet", "--align", "off"] + tiny) == 0
    assert json.loads((tmp_path / "run_off" / "screw" / "config.json").read_text())["model"]["align"] == "off"
