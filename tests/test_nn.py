"""Drop-in QuantAttention on every supported architecture (random weights, tiny configs).

Each architecture is built small, its attention sharpened to a trained ViT's temperature (with
outlier channels and a K offset) so quantization is actually exercised, then quantized with
``raad_kernels.quantize_model``. Checks: parameters shared, 16/16 reproduces the float module,
the docs/design.md accuracy rule on every attention call and the logits' cosine against float64,
maps against the float64 reference, state_dict interchange, gradients through the training path,
inference_mode / autocast / jit.trace / torch.compile.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import raad_kernels as rk
from raad_kernels import nn as rknn
from raad_kernels import ops
from raad_kernels.plan import PlanError
from raad_kernels.reference import attention_reference
from raad_kernels.testing import COS_FLOOR, check_accuracy, error

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")

# --------------------------------------------------------------------------------------------
# Architectures: name -> (build() -> float model in eval mode, input shape, attention count)
# --------------------------------------------------------------------------------------------

SMALL = dict(pretrained=False, embed_dim=64, depth=2, num_heads=2, num_classes=10)


def _timm(name, **kw):
    return lambda: timm.create_model(name, **{**SMALL, **kw})


def _tv_vit():
    from torchvision.models.vision_transformer import VisionTransformer
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64,
                              mlp_dim=128, num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.1)   # torchvision starts the head at zero
    return model


def _hf(model_cls, config_cls, **kw):
    def build():
        cfg = config_cls(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                         num_labels=10, **kw)
        cfg._attn_implementation = "eager"
        return _HFLogits(model_cls(cfg))
    return build


class _HFLogits(nn.Module):
    """HF models return an output object; tests want the logits tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, head_mask=None):
        return self.model(pixel_values=x, head_mask=head_mask).logits


def _hf_vit():
    from transformers import ViTConfig, ViTForImageClassification
    return _hf(ViTForImageClassification, ViTConfig, image_size=32, patch_size=8)()


def _hf_deit():
    from transformers import DeiTConfig, DeiTForImageClassification
    return _hf(DeiTForImageClassification, DeiTConfig, image_size=32, patch_size=8)()


def _hf_dinov2():
    from transformers import Dinov2Config, Dinov2ForImageClassification
    return _hf(Dinov2ForImageClassification, Dinov2Config, image_size=56, patch_size=14)()


def _hf_dinov2_reg():
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersForImageClassification
    return _hf(Dinov2WithRegistersForImageClassification, Dinov2WithRegistersConfig, image_size=56,
               patch_size=14, num_register_tokens=4)()


ARCHS = {
    # timm Attention (fused qkv): ViT, DeiT (distilled), DINO (ViT-S/16 layout, no head), DINOv2
    # (patch 14, LayerScale), DINOv2 with registers, qk-norm
    "timm-vit": (_timm("vit_small_patch16_224", img_size=32, patch_size=8), 32),
    "timm-deit": (_timm("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8), 32),
    "timm-dino": (_timm("vit_small_patch16_224", img_size=32, patch_size=8, num_classes=0), 32),
    "timm-dinov2": (_timm("vit_small_patch14_dinov2", img_size=56), 56),
    "timm-dinov2-reg": (_timm("vit_small_patch14_reg4_dinov2", img_size=56), 56),
    "timm-qknorm": (_timm("vit_small_patch16_224", img_size=32, patch_size=8, qk_norm=True), 32),
    # separate q/k/v: EVA-02 (EvaAttention, RoPE) and AttentionRope with grouped K/V heads
    "timm-eva-sep": (_timm("eva02_tiny_patch14_224", img_size=56, qkv_fused=False), 56),
    "timm-rope-gqa": (_timm("eva02_tiny_patch14_224", img_size=56, attn_type="rope", qkv_fused=False,
                            num_kv_heads=1), 56),
    # torchvision VisionTransformer (EncoderBlock.self_attention = nn.MultiheadAttention)
    "tv-vit": (_tv_vit, 32),
    # Hugging Face transformers
    "hf-vit": (_hf_vit, 32),
    "hf-deit": (_hf_deit, 32),
    "hf-dinov2": (_hf_dinov2, 56),
    "hf-dinov2-reg": (_hf_dinov2_reg, 56),
}
EXPECTED_CLASS = {
    "timm-vit": "Attention", "timm-deit": "Attention", "timm-dino": "Attention", "timm-dinov2": "Attention",
    "timm-dinov2-reg": "Attention", "timm-qknorm": "Attention", "timm-eva-sep": "EvaAttention",
    "timm-rope-gqa": "AttentionRope", "tv-vit": "MultiheadAttention", "hf-vit": "ViTAttention",
    "hf-deit": "DeiTAttention", "hf-dinov2": "Dinov2Attention", "hf-dinov2-reg": "Dinov2WithRegistersAttention",
}
DEPTH = 2


def _weights(m):
    """(q weight, k weight, k bias or None, (q_norm weight, k_norm weight) or None, heads,
    kv heads, head dim) of a float attention module, as views that can be edited in place."""
    if isinstance(m, nn.MultiheadAttention):
        e = m.embed_dim
        return (m.in_proj_weight[:e], m.in_proj_weight[e:2 * e], m.in_proj_bias[e:2 * e], None,
                m.num_heads, m.num_heads, m.head_dim)
    if hasattr(m, "output") and hasattr(m, "attention"):   # HF
        sa = m.attention
        h = sa.num_attention_heads
        return sa.query.weight, sa.key.weight, sa.key.bias, None, h, h, sa.attention_head_size
    h = m.num_heads
    hkv = getattr(m, "num_kv_heads", None) or h
    if getattr(m.q_norm, "weight", None) is not None:   # qk-norm: scale and offset after the norm
        return None, None, m.k_norm.bias, (m.q_norm.weight, m.k_norm.weight), h, hkv, m.head_dim
    if getattr(m, "qkv", None) is not None:
        d = m.qkv.weight.shape[0] // 3
        kb = m.qkv.bias[d:2 * d] if m.qkv.bias is not None else None
        return m.qkv.weight[:d], m.qkv.weight[d:2 * d], kb, None, h, hkv, m.head_dim
    return m.q_proj.weight, m.k_proj.weight, m.k_proj.bias, None, h, hkv, m.head_dim


def _rows(heads, d, idx):
    return (torch.arange(heads)[:, None] * d + idx[None, :]).flatten()


@torch.no_grad()
def sharpen(model, size, seed=0, logit_std=3.0, n_outliers=3, outlier_gain=8.0, k_offset=4.0):
    """Give random attention the statistics of a trained ViT's, as ``raad_kernels.testing.make_qkv``
    draws them: a few outlier channels shared by Q and K, logits (after K smoothing) with a
    spread of ``logit_std``, and a per-channel K offset of ``k_offset`` standard deviations."""
    g = torch.Generator().manual_seed(seed)
    mods = rknn._classify(model)[0]
    for m in mods.values():
        wq, wk, kb, norms, h, hkv, d = _weights(m)
        idx = torch.randperm(d, generator=g)[:n_outliers]
        if norms is not None:
            for w in norms:
                w[idx] *= outlier_gain
        else:
            wq[_rows(h, d, idx)] *= outlier_gain
            wk[_rows(hkv, d, idx)] *= outlier_gain
    # measure the logit spread and K's scale of each module on a forward pass, then rescale Q
    probe = copy.deepcopy(model)
    rk.quantize_model(probe, 16)
    stats, real = {}, ops.attention

    def rec(q, k, v, **kw):
        scale = kw["scale"] or q.shape[-1] ** -0.5
        ks = k - k.mean(-2, keepdim=True)
        stats[len(stats)] = ((q @ ks.transpose(-1, -2) * scale).std().item(), ks.std().item())
        return real(q, k, v, **kw)
    ops.attention = rec
    try:
        probe(torch.randn(2, 3, size, size, generator=g))
    finally:
        ops.attention = real
    for i, m in enumerate(mods.values()):
        wq, wk, kb, norms, h, hkv, d = _weights(m)
        s_std, k_std = stats[i]
        (norms[0] if norms is not None else wq).mul_(logit_std / s_std)
        if kb is not None:
            kb.add_(k_offset * k_std * torch.randn(kb.shape, generator=g))
    return model


def build(arch, seed=0, sharp=True):
    torch.manual_seed(seed)
    factory, size = ARCHS[arch]
    model = factory().eval()
    with torch.no_grad():   # LayerScale as trained (timm starts DINOv2's at 1e-5, muting attention)
        for m in model.modules():
            if type(m).__name__ == "LayerScale":
                m.gamma.fill_(0.5)
    if sharp:
        sharpen(model, size, seed)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


def attention_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, rk.QuantAttention)}


class Capture:
    """Records (q, k, v, mask, scale, out) of every attention call through raad_kernels.ops."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = ops.attention

        def rec(q, k, v, **kw):
            out, maps = real(q, k, v, **kw)
            self.calls.append(dict(q=q.detach(), k=k.detach(), v=v.detach(), out=out.detach(), maps=maps, **kw))
            return out, maps
        monkeypatch.setattr(ops, "attention", rec)


def cos(a, b):
    return F.cosine_similarity(a.detach().double().flatten(), b.detach().double().flatten(), dim=0).item()


#: Backend of the tests that check values: the executable specification (``auto`` has its own test).
BACKEND = "torch"
#: Logits cosine against float64 after two quantized blocks, per Q·Kᵀ bit-width.
LOGITS_COS = {8: 0.999, 4: 0.98, 2: 0.90}

# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_swap_shares_parameters(arch):
    model, x = build(arch, sharp=False)
    floats = dict(rknn._classify(model)[0])
    assert len(floats) == DEPTH and all(type(m).__name__ == EXPECTED_CLASS[arch] for m in floats.values())
    params = {n: dict(m.named_parameters()) for n, m in floats.items()}
    out = rk.quantize_model(model, 8, backend=BACKEND)
    assert out is model
    swapped = attention_modules(model)
    assert set(swapped) == set(floats)
    rep = model.raad_report
    assert [e.name for e in rep.swapped] == list(floats) and not rep.unswappable and not rep.kept_float
    for name, qa in swapped.items():
        assert (qa.qk_bits, qa.pv_bits) == (8, 8)
        for pname, p in params[name].items():
            assert qa.get_parameter(pname) is p, f"{name}.{pname} was copied, not shared"
        assert set(dict(qa.named_parameters())) == set(params[name])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_16bit_reproduces_float(arch):
    model, x = build(arch)
    with torch.no_grad():
        ref = model(x)
        q = rk.quantize_model(model, 16)
        out = q(x)
    assert all(m.qk_bits == 16 for m in attention_modules(q).values())
    assert (out - ref).abs().max().item() <= 2e-6 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_accuracy_uniform(arch, bits, monkeypatch):
    model, x = build(arch)
    ref_model = copy.deepcopy(model).double()
    with torch.no_grad():
        ref = ref_model(x.double())
        q = rk.quantize_model(model, bits, backend=BACKEND)
        cap = Capture(monkeypatch)
        out = q(x)
    assert len(cap.calls) == DEPTH
    for c in cap.calls:   # docs/design.md accuracy rule on each attention product
        assert c["qk_bits"] == bits and c["pv_bits"] == 8
        ref_att = attention_reference(c["q"], c["k"], c["v"], scale=c["scale"], attn_mask=c.get("attn_mask"))[0]
        emu = rk.quant_attention(c["q"], c["k"], c["v"], bits, 8, scale=c["scale"], attn_mask=c.get("attn_mask"),
                                 backend=BACKEND)
        check_accuracy(c["out"], emu, ref_att, bits, what=f"{arch} int{bits}")
    c = cos(out, ref)
    assert c >= LOGITS_COS[bits], f"{arch} int{bits}: logits cos {c:.5f} < {LOGITS_COS[bits]}"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_accuracy_mixed_plan(arch):
    model, x = build(arch)
    names = list(rknn._classify(model)[0])
    ref_model = copy.deepcopy(model).double()
    plan = {"version": 1, "avg_bits": 5.0,
            "layers": {names[0]: {"qk_bits": 2, "pv_bits": 8, "score": 0.1},
                       names[1]: {"qk_bits": 8, "pv_bits": 16, "score": 0.9}}}
    with torch.no_grad():
        ref = ref_model(x.double())
        rk.quantize_model(model, plan, backend=BACKEND)
        out = model(x)
    mods = attention_modules(model)
    assert (mods[names[0]].qk_bits, mods[names[0]].pv_bits) == (2, 8)
    assert (mods[names[1]].qk_bits, mods[names[1]].pv_bits) == (8, 16)
    assert [e.score for e in model.raad_report.swapped] == [0.1, 0.9]
    assert cos(out, ref) >= LOGITS_COS[2]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_maps_match_reference(arch, monkeypatch):
    model, x = build(arch)
    rk.quantize_model(model, {n: (4, 8) for n in rknn._classify(model)[0]}, backend=BACKEND)
    mods = attention_modules(model)
    assert all(m.maps is None and m.keep_maps is False for m in mods.values())
    for m in mods.values():
        m.keep_maps = True
    cap = Capture(monkeypatch)
    with torch.no_grad():
        model(x)
    for c, (name, m) in zip(cap.calls, mods.items()):
        b, h, n = c["q"].shape[:3]
        maps = m.maps
        assert maps["cls"].shape == (b, h, c["k"].shape[2]) and maps["entropy"].shape == (b, h, n)
        ref = attention_reference(c["q"], c["k"], c["v"], scale=c["scale"], attn_mask=c.get("attn_mask"),
                                  return_maps=("cls", "received", "entropy"))[1]
        emu = rk.quant_attention(c["q"], c["k"], c["v"], 4, 8, scale=c["scale"], backend="torch",
                                 attn_mask=c.get("attn_mask"), return_maps=True)[1]
        for key in ("cls", "received", "entropy"):
            assert maps[key].dtype == torch.float32
            torch.testing.assert_close(maps[key], emu[key], rtol=1e-5, atol=1e-6)
            assert cos(maps[key], ref[key]) >= COS_FLOOR[4], f"{name} map {key}"
        assert error(maps["entropy"], ref["entropy"]).rel_l2 < 0.1
    # off again: nothing is computed or kept
    for m in mods.values():
        m.keep_maps, m.maps = False, None
    with torch.no_grad():
        model(x)
    assert all(m.maps is None for m in mods.values())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_16bit_maps(arch, monkeypatch):
    model, x = build(arch)
    rk.quantize_model(model, 16)
    for m in attention_modules(model).values():
        m.keep_maps = True
    cap = Capture(monkeypatch)
    with torch.no_grad():
        model(x)
    for c, m in zip(cap.calls, attention_modules(model).values()):
        ref = attention_reference(c["q"], c["k"], c["v"], scale=c["scale"], attn_mask=c.get("attn_mask"),
                                  return_maps=True)[1]
        for key in ("cls", "received", "entropy"):
            torch.testing.assert_close(m.maps[key], ref[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_state_dict_interchange(arch):
    model, x = build(arch, seed=0)
    fresh, _ = build(arch, seed=7, sharp=False)   # same architecture, other weights
    float_sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)
    rk.quantize_model(model, 4, backend=BACKEND)
    qsd = model.state_dict()
    assert list(qsd) == list(float_sd)
    fresh.load_state_dict(qsd, strict=True)          # quantized -> float
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref, rtol=0, atol=0)
    qfresh = rk.quantize_model(build(arch, seed=3, sharp=False)[0], 4, backend=BACKEND)
    qfresh.load_state_dict(float_sd, strict=True)     # float -> quantized
    with torch.no_grad():
        torch.testing.assert_close(qfresh(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_gradients_flow(arch):
    model, x = build(arch)
    ref_model = copy.deepcopy(model).double().train()
    rk.quantize_model(model, 8, backend=BACKEND)
    model.train()
    out = model(x)
    assert out.grad_fn is not None
    out.pow(2).sum().backward()
    ref_model(x.double()).pow(2).sum().backward()
    ref_params = dict(ref_model.named_parameters())
    big = max(p.grad.abs().max().item() for p in ref_params.values() if p.grad is not None)
    for name, qa in attention_modules(model).items():
        for pname, p in qa.named_parameters():
            full = f"{name}.{pname}"
            assert p.grad is not None and torch.isfinite(p.grad).all(), full
            g_ref = ref_params[full].grad
            if g_ref.abs().max() > 1e-4 * big:   # (K's bias gets no gradient: softmax ignores it)
                assert cos(p.grad, g_ref) > 0.99, f"{full}: STE grad cos {cos(p.grad, g_ref):.4f}"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_inference_mode_and_autocast(arch):
    model, x = build(arch)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_dtype = model(x).dtype   # the float model's output dtype under autocast
    rk.quantize_model(model, 8, backend=BACKEND)
    with torch.no_grad():
        q_out = model(x)
    with torch.inference_mode():
        out = model(x)
    torch.testing.assert_close(out, q_out, rtol=0, atol=0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == ref_dtype
    assert cos(out, ref) > 0.99


# --------------------------------------------------------------------------------------------
# Architecture-specific behaviour
# --------------------------------------------------------------------------------------------

def test_timm_attn_mask_and_causal():
    model, x = build("timm-vit")
    attn = model.blocks[0].attn
    tokens = torch.randn(2, 17, 64)
    mask = torch.rand(2, 1, 17, 17) > 0.3
    mask[..., 0] = True
    with torch.no_grad():
        ref_mask, ref_causal = attn(tokens, attn_mask=mask), attn(tokens, is_causal=True)
        qa = rk.QuantAttention.from_module(attn, 16, 16, backend=BACKEND)
        torch.testing.assert_close(qa(tokens, attn_mask=mask), ref_mask, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(qa(tokens, is_causal=True), ref_causal, rtol=1e-5, atol=1e-6)
        qa.set_bits(8)
        assert cos(qa(tokens, attn_mask=mask), ref_mask) > 0.999


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")   # torch's, on the float reference
@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_masks_layouts_and_cross_attention(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=batch_first, kdim=48, vdim=40).eval()
    L, S, B = 9, 13, 3
    shape = (lambda n, e: (B, n, e)) if batch_first else (lambda n, e: (n, B, e))
    q, k, v = torch.randn(shape(L, 64)), torch.randn(shape(S, 48)), torch.randn(shape(S, 40))
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[:, -3:] = True
    am = torch.randn(L, S)
    with torch.no_grad():
        ref = mha(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=False)[0]
        ref_w = mha(q, k, v, key_padding_mask=kpm, need_weights=True)
        qa = rk.QuantAttention.from_module(mha, 16, 16, backend=BACKEND)
        torch.testing.assert_close(qa(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=False)[0], ref,
                                   rtol=1e-5, atol=1e-6)
        out_w = qa(q, k, v, key_padding_mask=kpm, need_weights=True)   # float path keeps the weights
        torch.testing.assert_close(out_w[0], ref_w[0])
        torch.testing.assert_close(out_w[1], ref_w[1])
        # unbatched input
        ub = (q[0] if batch_first else q[:, 0]), (k[0] if batch_first else k[:, 0]), (v[0] if batch_first else v[:, 0])
        torch.testing.assert_close(qa(*ub, need_weights=False)[0], mha(*ub, need_weights=False)[0], rtol=1e-5, atol=1e-6)
        qa.set_bits(8, 8)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            out, w = qa(q, k, v, key_padding_mask=kpm, attn_mask=am)
        assert w is None and cos(out, ref) > 0.999


def test_mha_unsupported_configs_are_listed():
    class WindowAttention(nn.Module):   # an attention class this package does not know
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):
            return x

    class PatchedAttention(timm.layers.Attention):   # a supported class, but its own forward
        def forward(self, x, attn_mask=None):
            return x

    model = nn.ModuleDict({
        "ok": nn.MultiheadAttention(16, 2, batch_first=True),
        "patched": PatchedAttention(16, 2),
        "bias_kv": nn.MultiheadAttention(16, 2, add_bias_kv=True),
        "zero": nn.MultiheadAttention(16, 2, add_zero_attn=True),
        "window": WindowAttention(),
    })
    with pytest.warns(UserWarning, match="could not be swapped"):
        rk.quantize_model(model, 4)
    rep = model.raad_report
    assert [e.name for e in rep.swapped] == ["ok"]
    unsw = {n: why for n, _, why in rep.unswappable}
    assert set(unsw) == {"patched", "bias_kv", "zero", "window"}
    assert "add_bias_kv" in unsw["bias_kv"] and "add_zero_attn" in unsw["zero"]
    assert "subclasses timm.layers.attention.Attention with its own forward" in unsw["patched"]
    assert "UNSWAPPABLE" in str(rep) and "window" in str(rep)
    with pytest.raises(PlanError, match="cannot be swapped"):
        rk.quantize_model(model, {"bias_kv": 4})
    with pytest.raises(TypeError, match="not a supported attention module"):
        rk.QuantAttention.from_module(model["window"])
    with pytest.raises(ValueError, match="cannot take over .*add_bias_kv"):
        rk.QuantAttention.from_module(model["bias_kv"])


def test_transformer_encoder_layer_fast_path_does_not_bypass():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 2, 128, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 11, 64)
    with torch.inference_mode():
        ref = layer(x)
    rk.quantize_model(layer, 2, backend=BACKEND)
    layer.self_attn.keep_maps = True
    with torch.inference_mode():
        out = layer(x)
    assert layer.self_attn.maps is not None, "the fused encoder fast path bypassed QuantAttention"
    assert 0.9 < cos(out, ref) < 1.0


def test_hf_head_mask_and_inner_name():
    model, x = build("hf-vit")
    head_mask = torch.tensor([[1.0, 0.0], [0.5, 1.0]])   # (layers, heads)
    with torch.no_grad():
        ref = model(x, head_mask=head_mask)
        rk.quantize_model(model, 16)
        torch.testing.assert_close(model(x, head_mask=head_mask), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(PlanError, match="part of the attention module 'model.vit.encoder.layer.0.attention'"):
        rk.quantize_model(model, {"model.vit.encoder.layer.0.attention.attention": 4})


def test_from_module_and_set_bits_validation():
    model, x = build("timm-vit", sharp=False)
    attn = model.blocks[0].attn
    with pytest.raises(ValueError, match="qk_bits must be one of"):
        rk.QuantAttention.from_module(attn, qk_bits=3)
    with pytest.raises(ValueError, match="pv_bits must be one of"):
        rk.QuantAttention.from_module(attn, qk_bits=8, pv_bits=4)
    with pytest.raises(ValueError, match="qk_bits=16 .float. needs pv_bits=16"):
        rk.QuantAttention.from_module(attn, qk_bits=16, pv_bits=8)
    with pytest.raises(ValueError, match="backend must be"):
        rk.QuantAttention.from_module(attn, backend="gpu")
    qa = rk.QuantAttention.from_module(attn, 4, 8)
    with pytest.raises(TypeError, match="already a QuantAttention"):
        rk.QuantAttention.from_module(qa)
    assert qa.to_float() is attn and "qk_bits=4" in repr(qa)


def test_requantize_and_filter_fn():
    model, x = build("timm-vit")
    rk.quantize_model(model, 8, filter_fn=lambda name, m: name.startswith("blocks.0"))
    assert list(attention_modules(model)) == ["blocks.0.attn"]
    assert model.raad_report.kept_float == [("blocks.1.attn", "timm.layers.attention.Attention",
                                             "excluded by filter_fn")]
    rk.quantize_model(model, lambda name, m: (2, 16) if name.endswith("1.attn") else None)
    mods = attention_modules(model)
    assert (mods["blocks.0.attn"].qk_bits, mods["blocks.1.attn"].qk_bits, mods["blocks.1.attn"].pv_bits) == (8, 2, 16)
    rk.quantize_model(model, 4)   # applied again: every module at 4 bits
    assert all(m.qk_bits == 4 for m in attention_modules(model).values())


def test_shared_module_swapped_everywhere_and_root():
    attn = nn.MultiheadAttention(16, 2, batch_first=True)
    holder = nn.ModuleDict({"a": attn, "b": attn})
    rk.quantize_model(holder, 8)
    assert isinstance(holder["a"], rk.QuantAttention) and holder["a"] is holder["b"]
    root = rk.quantize_model(nn.MultiheadAttention(16, 2), 4)
    assert isinstance(root, rk.QuantAttention) and root.raad_report.swapped[0].name == ""


def test_verbose_prints_report(capsys):
    model, _ = build("timm-vit", sharp=False)
    rk.quantize_model(model, {"blocks.1.attn": 2}, verbose=True)
    text = capsys.readouterr().out
    assert "swapped     blocks.1.attn" in text and "qk_bits=2 pv_bits=8" in text
    assert "float       blocks.0.attn" in text and "not named in the plan" in text


def test_backend_auto_follows_rule(monkeypatch):
    """Whatever backend ``auto`` picks on this machine follows the rule against the emulation."""
    model, x = build("timm-dinov2-reg")
    rk.quantize_model(model, 4, backend="auto")
    cap = Capture(monkeypatch)
    with torch.no_grad():
        model(x)
    for c in cap.calls:
        ref = attention_reference(c["q"], c["k"], c["v"], scale=c["scale"])[0]
        emu = rk.quant_attention(c["q"], c["k"], c["v"], 4, 8, scale=c["scale"], backend=BACKEND)
        check_accuracy(c["out"], emu, ref, 4, what="auto")


# --------------------------------------------------------------------------------------------
# Tracing and compilation
# --------------------------------------------------------------------------------------------

def test_jit_trace_records_the_op():
    model, x = build("timm-vit")
    rk.quantize_model(model, 4, backend=BACKEND)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model(x)
        traced = torch.jit.trace(model, x)
        kinds = [n.kind() for n in traced.inlined_graph.nodes()]
        assert kinds.count("raad::quant_attention") == DEPTH
        torch.testing.assert_close(traced(x), ref, rtol=0, atol=0)
        model.blocks[0].attn.keep_maps = True
        with pytest.raises(RuntimeError, match="keep_maps=True .* torch.jit.trace"):
            torch.jit.trace(model, x)


def test_custom_ops_fake_impls():
    q, k, v = (torch.randn(2, 3, 7, 16) for _ in range(3))
    torch.library.opcheck(torch.ops.raad.quant_attention.default, (q, k, v, None, 4, 8, 0.25, True, None, "torch", True))
    torch.library.opcheck(torch.ops.raad.quant_attention.default, (q, k, v[..., :8], None, 8, 16, 0.25, True, False, "torch", False))
    torch.library.opcheck(torch.ops.raad.attention_maps.default, (q, k, None, 0.25))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    """Inductor, fullgraph (no graph break) on a tiny timm ViT, with and without maps; and the
    training path (fake quantization) compiled with aot_eager and differentiated."""
    torch._dynamo.reset()
    model, x = build("timm-vit")
    rk.quantize_model(model, 4, backend=BACKEND)
    with torch.no_grad():
        ref = model(x)
        model.blocks[1].attn.keep_maps = True
        compiled = torch.compile(model, fullgraph=True)
        out = compiled(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    maps = model.blocks[1].attn.maps
    assert maps is not None and maps["cls"].shape == (2, 2, 17)

    torch._dynamo.reset()
    train_model, _ = build("timm-vit")
    rk.quantize_model(train_model, 4, backend=BACKEND)
    train_model.train()
    eager_loss = train_model(x).pow(2).sum()
    eager_loss.backward()
    eager_grad = train_model.blocks[0].attn.qkv.weight.grad.clone()
    train_model.zero_grad()
    loss = torch.compile(train_model, fullgraph=True, backend="aot_eager")(x).pow(2).sum()
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(train_model.blocks[0].attn.qkv.weight.grad, eager_grad, rtol=1e-4, atol=1e-5)


def test_torch_export_records_the_op():
    model, x = build("timm-vit")
    rk.quantize_model(model, 4, backend=BACKEND)
    with torch.no_grad():   # under grad mode, export would capture the training (fake-quant) graph
        ep = torch.export.export(model, (x,))
        kinds = [str(n.target) for n in ep.graph.nodes]
        assert kinds.count("raad.quant_attention.default") == DEPTH
        torch.testing.assert_close(ep.module()(x), model(x), rtol=0, atol=0)
