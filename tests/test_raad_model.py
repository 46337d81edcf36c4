"""The detector's shapes and the plan reaching every attention layer, for both teachers."""

import warnings

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
