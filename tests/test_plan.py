"""Bit plans: the JSON file format, its errors, the short forms, and applying plans to a model."""

from __future__ import annotations

import json
import os

import pytest
import torch

import raad_kernels as rk
from raad_kernels import plan as P
from raad_kernels.plan import PlanError

timm = pytest.importorskip("timm")

GOOD = {"version": 1, "avg_bits": 4.0,
        "layers": {"student.blocks.0.attn": {"qk_bits": 2, "pv_bits": 8, "score": 0.12},
                   "student.blocks.1.attn": {"qk_bits": 8, "pv_bits": 16}}}


def tiny_vit(depth=2):
    torch.manual_seed(0)
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=depth, num_heads=2, num_classes=10).eval()


def write(path, data):
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


# --------------------------------------------------------------------------------------------
# File format
# --------------------------------------------------------------------------------------------

def test_save_load_roundtrip_is_atomic(tmp_path):
    path = tmp_path / "plan.json"
    assert rk.save_plan(GOOD, path) == str(path)
    assert rk.load_plan(path) == GOOD
    assert json.loads(path.read_text()) == GOOD
    assert os.listdir(tmp_path) == ["plan.json"]   # no temporary file left behind
    rk.save_plan({"a.attn": 4}, path, avg_bits=4)    # overwrite, short form
    assert rk.load_plan(str(path)) == {"version": 1, "avg_bits": 4.0,
                                       "layers": {"a.attn": {"qk_bits": 4, "pv_bits": 8}}}


def test_save_failure_leaves_old_file(tmp_path, monkeypatch):
    path = tmp_path / "plan.json"
    rk.save_plan(GOOD, path)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        rk.save_plan({"x": 2}, path)
    assert rk.load_plan(path) == GOOD and os.listdir(tmp_path) == ["plan.json"]


@pytest.mark.parametrize("data, match", [
    ("{not json", r"not valid JSON \(.* line 1"),
    ([1, 2], "must be a JSON object"),
    ({"layers": {}}, "missing 'version'"),
    ({"version": 2, "layers": {}}, "version must be 1, got 2"),
    ({"version": 1}, "missing 'layers'"),
    ({"version": 1, "layers": []}, "'layers' must be an object"),
    ({"version": 1, "layers": {}, "extra": 1}, r"unknown top-level key\(s\) \['extra'\]; allowed"),
    ({"version": 1, "avg_bits": -1, "layers": {}}, "avg_bits must be a positive number"),
    ({"version": 1, "layers": {"b.attn": 4}}, r"layers\['b.attn'\] must be an object"),
    ({"version": 1, "layers": {"b.attn": {"qk_bits": 4}}}, r"layers\['b.attn'\]: missing 'pv_bits'"),
    ({"version": 1, "layers": {"b.attn": {"qk_bits": 3, "pv_bits": 8}}},
     r"layers\['b.attn'\]: qk_bits must be one of \(2, 4, 8, 16\), got 3"),
    ({"version": 1, "layers": {"b.attn": {"qk_bits": 4, "pv_bits": 4}}}, r"pv_bits must be one of \(8, 16\), got 4"),
    ({"version": 1, "layers": {"b.attn": {"qk_bits": 16, "pv_bits": 8}}}, "qk_bits=16 .float. needs pv_bits=16"),
    ({"version": 1, "layers": {"b.attn": {"qk_bits": "4", "pv_bits": 8}}}, "qk_bits must be an int"),
    ({"version": 1, "layers": {"b.attn": {"qk_bits": 4, "pv_bits": 8, "qkbits": 2}}},
     r"unknown key\(s\) \['qkbits'\]; allowed: \['qk_bits', 'pv_bits', 'score'\]"),
    ({"version": 1, "layers": {"b.attn": {"qk_bits": 4, "pv_bits": 8, "score": "high"}}}, "score must be a number"),
])
def test_bad_files_name_file_key_and_allowed_values(tmp_path, data, match):
    path = write(tmp_path / "bad.json", data)
    with pytest.raises(PlanError, match=match) as e:
        rk.load_plan(path)
    assert path in str(e.value)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="plan file not found: /nonexistent/plan.json"):
        rk.load_plan("/nonexistent/plan.json")


def test_short_forms():
    assert P.layer_bits({"a": 4, "b": (2, 16), "c": {"qk_bits": 8}, "d": 16, "e": [8, 8]}) == {
        "a": (4, 8), "b": (2, 16), "c": (8, 8), "d": (16, 16), "e": (8, 8)}
    with pytest.raises(PlanError, match=r"plan\['a'\]: bits must be an int"):
        P.layer_bits({"a": "4"})
    with pytest.raises(PlanError, match="a bits pair must be"):
        P.layer_bits({"a": (2, 8, 8)})
    with pytest.raises(TypeError, match="a plan must be a path to a JSON file or a dict"):
        rk.load_plan(4)


# --------------------------------------------------------------------------------------------
# Applying plans
# --------------------------------------------------------------------------------------------

def bits_of(model):
    return {n: (m.qk_bits, m.pv_bits) for n, m in model.named_modules() if isinstance(m, rk.QuantAttention)}


def test_plan_saved_loaded_and_applied_again(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    model = rk.quantize_model(tiny_vit(3), {"blocks.0.attn": 2, "blocks.2.attn": {"qk_bits": 4, "pv_bits": 16}},
                              backend="torch")
    assert bits_of(model) == {"blocks.0.attn": (2, 8), "blocks.2.attn": (4, 16)}
    path = rk.save_plan(model, tmp_path / "plan.json", avg_bits=3.0)   # the model's report → file
    saved = rk.load_plan(path)
    assert saved["avg_bits"] == 3.0 and list(saved["layers"]) == ["blocks.0.attn", "blocks.2.attn"]
    fresh = rk.quantize_model(tiny_vit(3), path, backend="torch")
    assert bits_of(fresh) == bits_of(model)
    assert [n for n, _, _ in fresh.raad_report.kept_float] == ["blocks.1.attn"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    again = rk.quantize_model(model, path, backend="torch")   # applied to the quantized model again
    assert again is model and bits_of(model) == bits_of(fresh)


def test_design_format_dict_with_scores():
    model = tiny_vit()
    rk.quantize_model(model, {"version": 1, "layers": {"blocks.0.attn": {"qk_bits": 4, "pv_bits": 8, "score": 0.5}}})
    assert model.raad_report.plan() == {"version": 1, "layers": {"blocks.0.attn": {"qk_bits": 4, "pv_bits": 8,
                                                                                    "score": 0.5}}}


def test_unknown_module_lists_nearest_names(tmp_path):
    model = tiny_vit()
    with pytest.raises(PlanError, match=r"'blocks.0.atn', which the model does not have; nearest names: "
                                        r"blocks.0.attn"):
        rk.quantize_model(model, {"blocks.0.atn": 4})
    path = write(tmp_path / "p.json", {"version": 1, "layers": {"student.blocks.1.attn": {"qk_bits": 4, "pv_bits": 8}}})
    with pytest.raises(PlanError, match=f"plan {path}: names module 'student.blocks.1.attn'.*blocks.1.attn"):
        rk.quantize_model(model, path)
    with pytest.raises(PlanError, match=r"'blocks.0.mlp' is a Mlp, not an attention module; nearest attention "
                                        r"modules: blocks.0.attn"):
        rk.quantize_model(model, {"blocks.0.mlp": 4})
    with pytest.raises(PlanError, match="part of the attention module 'blocks.1.attn'"):
        rk.quantize_model(model, {"blocks.1.attn.qkv": 4})
    assert not bits_of(model)   # a refused plan changes nothing


def test_plan_types():
    with pytest.raises(TypeError, match="plan must be an int, a dict"):
        rk.quantize_model(tiny_vit(), 4.0)
    with pytest.raises(TypeError, match="got a bool"):
        rk.quantize_model(tiny_vit(), True)
    with pytest.raises(PlanError, match="plan: qk_bits must be one of"):
        rk.quantize_model(tiny_vit(), 3)
    with pytest.raises(PlanError, match=r"plan\('blocks.0.attn'\): qk_bits must be one of"):
        rk.quantize_model(tiny_vit(), lambda name, m: 5)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        rk.quantize_model("vit", 4)
