"""The fine-feature memory (raad.memory): its searches against brute force, the coreset's
definition, calibration, the layout test, and the memory inside a fitted detector."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raad import memory as M
from raad.model import Detector, ModelConfig


def _brute_coreset(x, n, first):
    idx = [first]
    for _ in range(n - 1):
        d = torch.cdist(x.double(), x[idx].double()).min(1).values
        idx.append(int(d.argmax()))
    return idx


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 60), k=st.integers(1, 12), c=st.integers(1, 7), seed=st.integers(0, 1000))
def test_greedy_coreset_is_farthest_point_selection(n, k, c, seed):
    x = torch.randn(n, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    idx = M.greedy_coreset(x, k, seed)
    if k >= n:
        assert idx.tolist() == list(range(n))
        return
    assert idx.tolist() == _brute_coreset(x, k, int(idx[0]))
    assert len(set(idx.tolist())) == k  # farthest points are never picked twice


def test_coreset_keeps_a_rare_cluster_a_random_sample_would_drop():
    g = torch.Generator().manual_seed(0)
    common = torch.randn(5000, 4, generator=g)
    rare = torch.randn(5, 4, generator=g) * 0.1 + 20.0
    x = torch.cat([common, rare])
    kept = x[M.greedy_coreset(x, 50)]
    assert (kept[:, 0] > 10).any()
    assert torch.cdist(rare, kept).min(1).values.max() < 1.0


@pytest.mark.parametrize("h,w,r", [(1, 1, 2), (5, 7, 1), (6, 3, 2), (9, 9, 0)])
def test_local_sq_distance_matches_a_loop_over_the_window(h, w, r):
    g = torch.Generator().manual_seed(h * 100 + w * 10 + r)
    q = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64)
    bank = torch.randn(4, 3, h, w, generator=g, dtype=torch.float64)
    ref = torch.full((2, h, w), float("nan"), dtype=torch.float64)
    for bi in range(2):
        for i in range(h):
            for j in range(w):
                ys, xs = slice(max(0, i - r), i + r + 1), slice(max(0, j - r), j + r + 1)
                cand = bank[:, :, ys, xs].permute(0, 2, 3, 1).reshape(-1, 3)
                ref[bi, i, j] = (cand - q[bi, :, i, j]).pow(2).sum(1).min()
    out = M.local_sq_distance(q, bank, r)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, ref, rtol=1e-9, atol=1e-9)


def _feats(x):
    return {"fine": x, "colour": x[:, :3], "lines": x[:, 1:]}


def _channels(c):
    """The memory's channels for feature maps of ``c`` channels under :func:`_feats`."""
    return {"fine": c, "colour": 3, "lines": c - 1}


def _textured(n, g, h=12):
    return torch.randn(n, 5, h, h, generator=g)


@pytest.mark.parametrize("mode", ["global", "local"])
def test_memory_calibrates_on_normals_and_flags_a_foreign_patch(mode):
    g = torch.Generator().manual_seed(1)
    bank, held, test = _textured(30, g), _textured(10, g), _textured(4, g)
    mem = M.FeatureMemory(mode, 30 * 144, _channels(5))
    mem.build(_feats(bank))
    mem.calibrate(_feats(held), 0.9, 0.995)
    # calibrated: each held-out map sits at 0.1 at its q_high (interior and ring separately)
    for normal in mem.maps(_feats(held)).values():
        assert normal.shape == (10, 12, 12)
        for part in (normal[:, 1:-1, 1:-1], normal[:, M._ring(normal)]):
            assert abs(float(torch.quantile(part.flatten(), 0.995)) - 0.1) < 0.02
    assert torch.equal(mem(_feats(held)), torch.stack(list(mem.maps(_feats(held)).values())).amax(0))
    test[1, :, 5:7, 5:7] += 6.0
    m = mem(_feats(test))
    assert m[1, 5:7, 5:7].min() > 3 * m[0].max()
    assert int(m[1].flatten().argmax()) in {5 * 12 + 5, 5 * 12 + 6, 6 * 12 + 5, 6 * 12 + 6}


def test_calibration_floors_a_collapsed_spread():
    # one channel densely covered by the bank: every held-out cell lies almost on a bank cell,
    # so q_high - q_low would be ~0 and a cell a fifth of a standard deviation past the training
    # range would score far above a real defect; the floor keeps it modest
    g = torch.Generator().manual_seed(3)
    def feats(x):
        return {"fine": x, "colour": x.expand(-1, 3, -1, -1).contiguous(), "lines": x}
    mem = M.FeatureMemory("global", 2000, {"fine": 1, "colour": 3, "lines": 1})
    mem.build(feats(torch.randn(40, 1, 8, 8, generator=g)))
    mem.calibrate(feats(torch.randn(10, 1, 8, 8, generator=g)), 0.9, 0.995)
    for rep, channels in (("fine", 1), ("colour", 3)):
        q = getattr(mem, f"{rep}_q")
        assert torch.all(q[:, 1] - q[:, 0] >= M.SPREAD_FLOOR * channels ** 0.5 - 1e-6), rep
    edge = torch.randn(1, 1, 8, 8, generator=g) * 0 + float(mem.fine_bank.max()) / float(mem.fine_white) \
        + float(mem.fine_mean) + 0.2
    assert float(mem.maps(feats(edge))["fine"].max()) < 1.0


def test_global_memory_with_every_cell_finds_its_own_images_at_zero():
    g = torch.Generator().manual_seed(2)
    bank = _textured(3, g, h=5)
    mem = M.FeatureMemory("global", 75, _channels(5))   # every fine cell kept
    mem.build(_feats(bank))
    own = mem.distances(_feats(bank))["fine"]
    fresh = mem.distances(_feats(_textured(3, g, h=5)))["fine"]
    # float32 |q|^2 + |b|^2 - 2 q.b: zero up to rounding (1e-3 here), against O(1) for new cells
    assert own.max() < 0.01 * fresh.median()
    with pytest.raises(ValueError, match="75 cells"):
        M.FeatureMemory("global", 76, _channels(5)).build(_feats(bank))


def test_layout_ratio_tells_a_fixed_layout_from_parts_anywhere():
    """Fixed layout: every image is the same board, slightly noisy: a cell is about as close to
    the training cells at its place as to any. Parts anywhere: each image's cells are shuffled,
    so its own place holds something else in most training images."""
    g = torch.Generator().manual_seed(3)
    board = torch.randn(1, 3, 16, 16, generator=g)
    fixed = board + 0.05 * torch.randn(40, 3, 16, 16, generator=g)
    held = board + 0.05 * torch.randn(6, 3, 16, 16, generator=g)
    r_fixed = M.layout_ratio({"colour": fixed}, {"colour": held}, radius=2)

    def shuffled(x):
        flat = x.flatten(2)
        perm = torch.stack([torch.randperm(256, generator=g) for _ in range(len(x))])
        return torch.gather(flat, 2, perm[:, None].expand(-1, 3, -1)).view_as(x)
    r_free = M.layout_ratio({"colour": shuffled(fixed)}, {"colour": shuffled(held)}, radius=2)
    assert r_fixed < 1.3 < M.FIXED_LAYOUT_RATIO < r_free


def test_local_memory_charges_for_a_cell_found_elsewhere():
    """In ``local`` mode a query cell that matches a training cell exactly, but ``k`` cells away
    from it, is at distance ``place * k``; at its own place, at zero."""
    g = torch.Generator().manual_seed(5)
    bank = torch.randn(1, 4, 6, 6, generator=g)
    moved = torch.roll(bank, shifts=2, dims=-1)        # every column two cells to the right
    for place in (0.5, 2.0):
        mem = M.FeatureMemory("local", 36, _channels(4), place=place)
        mem.build(_feats(bank))
        at_home = mem.distances(_feats(bank))["fine"]
        away = mem.distances(_feats(moved))["fine"][0, :, 2:]   # columns that moved by 2
        assert at_home.max() < 1e-2
        # the nearest may be another cell closer by than the moved one: never farther than it
        assert (away <= 2 * place + 1e-3).all() and away.mean() > 0.5 * place
    # line cells are searched anywhere, in local mode too
    assert mem.lines_bank.shape == (36, 3) and mem.fine_bank.shape == (36, 4 + 2)
    assert mem.distances(_feats(moved))["lines"].max() < 1e-2
    glob = M.FeatureMemory("global", 36, _channels(4))
    glob.build(_feats(bank))
    assert glob.distances(_feats(moved))["fine"].max() < 1e-2   # global: anywhere is fine


def test_bad_memory_settings_are_refused():
    with pytest.raises(ValueError, match="--memory must be one of"):
        Detector(ModelConfig(image_size=64, embed_dim=32, depth=1, num_heads=1, memory="nearest"))
    vit = dict(image_size=64, embed_dim=32, depth=1, num_heads=1, teacher="timm:vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="EfficientNet-Lite0 block 1"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random ViT weights
        Detector(ModelConfig(**vit, memory="global"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert Detector(ModelConfig(**vit, memory="auto")).memory is None  # the default: off there
    with pytest.raises(ValueError, match="once fitted"):
        M.FeatureMemory("auto", 4, _channels(2))


def test_memory_branch_and_combination_in_the_detector():
    """``branch="memory"`` is the memory's map; "both" is the mean of the detector's map
    (upsampled to the memory's grid) and the memory's, before upsampling and smoothing."""
    from raad.train import build_memory
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=64, embed_dim=32, depth=1, num_heads=1, memory="global",
                      memory_size=200, smooth_sigma=0.0)
    det = Detector(cfg).eval()
    g = torch.Generator().manual_seed(4)
    images, normals = torch.randn(6, 3, 64, 64, generator=g), torch.randn(3, 3, 64, 64, generator=g)
    info = build_memory(det, images, normals)
    assert info == {"mode": "global", "size": 200, "layout_ratio": None}   # 6 x 256 cells, 200 kept
    det.set_memory("global", 150)
    assert cfg.memory_size == 200 and det.cfg.memory_size == 150, "the caller's config stays as it was"
    build_memory(det, images, normals)
    assert det.cfg.memory == "global" and det.memory.fine_bank.shape == (150, 24)
    assert det.memory.colour_bank.shape == (150 // 8, 3)
    assert det.memory.lines_bank.shape == (150, M.LINE_ORIENTATIONS)
    x = torch.randn(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        st, ae, mem = det.raw_maps(x, memory=True)
        assert mem.shape == (2, 16, 16)
        both = det.combine(st, ae, mem)
        det_only = det.combine(st, ae)
        up = torch.nn.functional.interpolate(det_only[:, None], size=(16, 16), mode="bilinear",
                                             align_corners=False)[:, 0]
        assert torch.allclose(both, 0.5 * (up + mem), atol=1e-6)
        m = det(x, branch="memory")
        assert m.shape == (2, 64, 64)
        assert torch.allclose(m, torch.nn.functional.interpolate(mem[:, None], size=(64, 64), mode="bilinear",
                                                                 align_corners=False)[:, 0], atol=1e-6)
    lone = Detector(ModelConfig(image_size=64, embed_dim=32, depth=1, num_heads=1)).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="no memory"):
        lone(x, branch="memory")


def test_auto_memory_picks_local_for_a_board_and_global_for_a_screw(tmp_path):
    """The layout test on the generator's pcb (parts at fixed places) and screw (any angle)."""
    from raad import data as D
    from raad.train import FitOptions, prepare
    D.make_synthetic(tmp_path, categories=["pcb", "screw"], n_train=24, n_test_good=0,
                     n_test_defect=0, size=64)
    cfg = ModelConfig(image_size=64, embed_dim=32, depth=1, num_heads=1, memory="auto")
    chosen = {c: prepare(tmp_path / c, cfg, FitOptions(), show=False).memory for c in ("pcb", "screw")}
    assert chosen["pcb"]["mode"] == "local" and chosen["pcb"]["size"] == 2048
    assert chosen["screw"]["mode"] == "global"
    assert chosen["pcb"]["layout_ratio"] < M.FIXED_LAYOUT_RATIO < chosen["screw"]["layout_ratio"]
    assert np.isfinite([chosen["pcb"]["layout_ratio"], chosen["screw"]["layout_ratio"]]).all()


@pytest.mark.parametrize("mode", ["global", "local"])
def test_int8_search_is_close_to_the_float_search_in_both_modes(mode):
    """The plan's int8 fine search (``memory.int8``) against the float search of the same memory,
    on a 32×32 grid like the detector's at 128 px. In ``local`` mode the place channels reach 31
    cells; the int8 search centres them (distances are shift-invariant), or the one bank scale
    they set would quantize the standardised features 3.7× more coarsely."""
    g = torch.Generator().manual_seed(7)
    bank, test = _textured(12, g, h=32), _textured(3, g, h=32)
    test[:, :, 10:14, 10:14] += 3.0   # a foreign patch, far from every normal cell
    mem = M.FeatureMemory(mode, 2048, _channels(5))
    mem.build(_feats(bank))
    exact = mem.distances(_feats(test))["fine"]
    mem.int8 = True
    coded = mem.distances(_feats(test))["fine"]
    assert torch.isfinite(coded).all() and not torch.equal(coded, exact)   # the int8 path ran
    rel = (coded - exact).abs() / exact.clamp_min(1e-6)
    far = exact > exact.quantile(0.95)
    # measured (seeds 7, 8): global 3.3 % median, 1.3 % on the farthest 5 %; local 6.4 %, 2.6 %
    # (the place channels still set the scale: ±15.5 against the features' ±4); uncentred 28 %, 7.8 %
    assert rel.median() < 0.1 and rel[far].median() < 0.04
    shift = mem._place_shift(mem.fine_bank)
    if mode == "local":
        assert shift[-2:].tolist() == [15.5, 15.5] and not shift[:-2].any()
        # without the shift (the places at 0..31) the same search is clearly worse
        cells = mem._cells("fine", test)
        plain = M.NN.nearest_sq_distance_int8(cells, mem.fine_bank).sqrt().view_as(exact)
        assert ((plain - exact).abs() / exact.clamp_min(1e-6)).median() > 2 * rel.median()
    else:
        assert not shift.any()


def _texture_image(n, size, g):
    """ImageNet-normalised images of smooth noise (a texture with no thin lines)."""
    x = torch.randn(n, 3, size // 4, size // 4, generator=g)
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)


def test_line_cells_match_the_second_derivative_of_a_quadratic():
    """On f = a·x² + b·x·y + c·y² the second derivative across direction θ (across: v = (−sin θ,
    cos θ)) is 2a·sin²θ − 2b·sinθ·cosθ + 2c·cos²θ everywhere: the line cells are its magnitudes
    over the 8 directions, sorted, in every interior cell."""
    a, b, c = 0.003, -0.002, 0.0015
    ax = torch.arange(64, dtype=torch.float64)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    f = a * (xx - 30) ** 2 + b * (xx - 30) * (yy - 33) + c * (yy - 33) ** 2
    std = torch.tensor(M.IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    image = f.expand(1, 3, 64, 64) / std          # its luminance (image × std, mean of RGB) is f
    cells = M.line_cells(image)
    th = torch.arange(M.LINE_ORIENTATIONS, dtype=torch.float64) * torch.pi / M.LINE_ORIENTATIONS
    s_, c_ = torch.sin(th), torch.cos(th)
    want = (2 * a * s_ ** 2 - 2 * b * s_ * c_ + 2 * c * c_ ** 2).abs().sort(descending=True).values
    inner = cells[0, :, 2:-2, 2:-2]   # away from the reflected border
    assert torch.allclose(inner, want.view(-1, 1, 1).expand_as(inner), rtol=1e-9, atol=1e-12)


def test_line_cells_see_a_thin_line_at_any_angle_and_of_either_polarity():
    g = torch.Generator().manual_seed(11)
    base = 0.2 * _texture_image(1, 64, g)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    line = (((yy - 20) - 0.4 * (xx - 10)).abs() < 0.6).float()    # a 1-px line, slope 0.4
    image = base - 1.5 * line
    cells = M.line_cells(image)
    assert cells.shape == (1, M.LINE_ORIENTATIONS, 16, 16)
    assert (cells[:, :-1] >= cells[:, 1:]).all()   # sorted, largest first
    on = torch.nn.functional.max_pool2d(line[None, None], 4)[0, 0] > 0
    assert cells[0, 0][on].median() > 4 * cells[0, 0][~on].median()
    # the same cells for the image turned by 90° (the directions map onto each other), and for
    # a bright line instead of a dark one (the image negated)
    turned = M.line_cells(torch.rot90(image, 1, (-2, -1)))
    assert torch.allclose(turned, torch.rot90(cells, 1, (-2, -1)), atol=1e-5)
    assert torch.allclose(M.line_cells(-image), cells, atol=1e-6)
    # nothing on a constant or a linear ramp (away from the border, where the reflection folds it)
    flat = torch.ones(1, 3, 64, 64) * 0.3 + 0.01 * xx
    assert M.line_cells(flat)[..., 2:-2, 2:-2].abs().max() < 1e-6


def test_whitening_gives_unit_covariance_and_floors_a_direction_that_never_varies():
    g = torch.Generator().manual_seed(12)
    mix = torch.tensor([[3.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.2, -0.3, 0.8]], dtype=torch.float64)
    z = torch.randn(4, 3, 30, 30, generator=g, dtype=torch.float64)
    x = torch.einsum("ij,bjhw->bihw", mix, z)
    w = M.whitening(x)
    assert torch.allclose(w, w.T)
    cells = M._cells(x - x.mean((0, 2, 3), keepdim=True)) @ w
    assert torch.allclose(torch.cov(cells.T), torch.eye(3, dtype=torch.float64), atol=1e-6)
    # a copy of a channel leaves a direction with no variance: floored, not scaled without bound
    dup = torch.cat([x, x[:, :1]], 1)
    w = M.whitening(dup)
    assert torch.isfinite(w).all()
    top = torch.linalg.eigvalsh(torch.cov(M._cells(dup).T)).max()
    assert torch.linalg.eigvalsh(w).max() <= (M.WHITEN_FLOOR * top).rsqrt() * (1 + 1e-6)


@pytest.mark.parametrize("window", [4, 12, 20])
def test_region_cells_are_the_mean_colour_and_texture_around_each_cell(window):
    from raad.data import IMAGENET_STD
    g = torch.Generator().manual_seed(window)
    image = torch.randn(2, 3, 32, 24, generator=g, dtype=torch.float64)
    out = M.region_cells(image, window)
    assert out.shape == (2, 4, 8, 6)
    x = image * torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    grey = x.mean(1)
    half = (window - 4) // 2
    for i, j in [(0, 0), (3, 2), (7, 5), (4, 0)]:
        ys = slice(max(0, 4 * i - half), 4 * i + 4 + half)     # the window, cut at the border
        xs = slice(max(0, 4 * j - half), 4 * j + 4 + half)
        ref_mean = x[:, :, ys, xs].mean((2, 3))
        ref_std = grey[:, ys, xs].flatten(1).std(1, unbiased=False)
        assert torch.allclose(out[:, :3, i, j], ref_mean, atol=1e-12)
        assert torch.allclose(out[:, 3, i, j], ref_std, atol=1e-9)
    for bad in (6, 16):
        with pytest.raises(ValueError, match="odd number of 4-pixel cells"):
            M.region_cells(image, bad)


def test_region_cells_flag_a_soft_dark_patch_in_a_grainy_texture():
    # grain whose own dark specks (4 px) are as dark as the patch: the colour cells (12 px) see
    # specks everywhere; a 32 px patch of reduced brightness and texture stands out in the region
    # cells' memory
    g = torch.Generator().manual_seed(5)
    def grain(n):
        return torch.nn.functional.interpolate(torch.randn(n, 1, 16, 16, generator=g), scale_factor=4,
                                               mode="nearest").expand(-1, 3, -1, -1).contiguous()
    train, held, test = grain(20), grain(6), grain(2)
    test[1, :, 16:48, 16:48] = 0.4 * test[1, :, 16:48, 16:48] - 1.0
    def feats(x):
        return {"fine": M.colour_cells(x), "colour": M.colour_cells(x), "region": M.region_cells(x, 20)}
    mem = M.FeatureMemory("global", 400, {"fine": 3, "colour": 3, "region": 4})
    mem.build(feats(train))
    mem.calibrate(feats(held), 0.9, 0.995)
    region = mem.maps(feats(test))["region"]
    assert region[1, 6:10, 6:10].min() > 2 * region[0].max()
