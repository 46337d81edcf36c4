"""Plans chosen by measured speed: the timing table (format, measurement, device check), the
plan's ``autocast`` section, and what they do to a model."""

from __future__ import annotations

import json

import pytest
import torch

import raad_kernels as rk
from raad_kernels import timing as TM
from raad_kernels.autocast import autocast_dtype, remove_autocast
from raad_kernels.plan import PlanError

timm = pytest.importorskip("timm")


def tiny_vit(depth=2, dim=64):
    torch.manual_seed(0)
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=dim, depth=depth, num_heads=2,
                             num_classes=10).eval()


def table(**over):
    t = {"device": TM.device_name("cpu"), "threads": torch.get_num_threads(), "batch": 2, "unit": "ms",
         "layers": {"blocks.0.attn": {"2/8": 1.5, "4/8": 1.4, "8/8": 1.0, "16/16": 2.0}},
         "parts": {"teacher": {"fp32": 3.0, "bfloat16": 2.0}}, "rest": 5.0}
    t.update(over)
    return t


PLAN = {"version": 1, "layers": {"blocks.0.attn": {"qk_bits": 8, "pv_bits": 8}},
        "autocast": {"dtype": "bfloat16", "modules": ["blocks.1.mlp"]}, "timing": table()}


# --------------------------------------------------------------------------------------------
# File format
# --------------------------------------------------------------------------------------------

def test_plan_with_and_without_timings_round_trips(tmp_path):
    for plan in (PLAN, {k: v for k, v in PLAN.items() if k not in ("timing", "autocast")}):
        path = tmp_path / "plan.json"
        rk.save_plan(plan, path)
        assert rk.load_plan(path) == rk.load_plan(plan)
        assert ("timing" in json.loads(path.read_text())) == ("timing" in plan)


@pytest.mark.parametrize("over, match", [
    ({"unit": "s"}, "unit must be 'ms'"),
    ({"device": ""}, "'device' must be a non-empty string"),
    ({"threads": 0}, "'threads' must be a positive int"),
    ({"batch": True}, "'batch' must be a positive int"),
    ({"layers": {"a": {"8": 1.0}}}, r"setting '8' is not 'qk_bits/pv_bits'"),
    ({"layers": {"a": {"3/8": 1.0}}}, r"qk_bits must be one of"),
    ({"layers": {"a": {"16/8": 1.0}}}, r"needs pv_bits=16"),
    ({"layers": {"a": {"8/8": -1.0}}}, r"layers\['a'\]\['8/8'\] must be a number of milliseconds"),
    ({"layers": {"a": {"8/8": float("nan")}}}, "must be a number of milliseconds"),
    ({"layers": {"a": {}}}, "must be a non-empty object"),
    ({"parts": {"teacher": {"fp32": "fast"}}}, r"parts\['teacher'\]\['fp32'\]"),
    ({"rest": -2}, "'rest' must be milliseconds"),
    ({"when": "now"}, r"unknown key\(s\) \['when'\]"),
])
def test_bad_timing_tables_name_the_key(over, match):
    with pytest.raises(PlanError, match=match):
        rk.load_plan({**PLAN, "timing": table(**over)})


@pytest.mark.parametrize("spec, match", [
    ({"dtype": "int8", "modules": ["a"]}, "dtype must be one of"),
    ({"dtype": "bfloat16", "modules": "a"}, "modules must be a list of module names"),
    ({"dtype": "bfloat16", "modules": ["a"], "x": 1}, r"unknown key\(s\) \['x'\]"),
    ([1], "must be an object"),
])
def test_bad_autocast_sections(spec, match):
    with pytest.raises(PlanError, match=match):
        rk.load_plan({**PLAN, "autocast": spec})


# --------------------------------------------------------------------------------------------
# The device check
# --------------------------------------------------------------------------------------------

def test_a_table_from_another_device_or_thread_count_is_refused():
    TM.check_device(table(), "cpu")      # measured here: fine
    with pytest.raises(TM.TimingError, match="measured on 'cuda: NVIDIA H100.*not on this device"):
        TM.check_device(table(device="cuda: NVIDIA H100 (sm_90)"), "cpu")
    with pytest.raises(TM.TimingError, match="measured with 64 threads"):
        TM.check_device(table(threads=64), "cpu")


def test_device_name_says_what_the_kernels_dispatch_on():
    name = TM.device_name("cpu")
    assert name.startswith("cpu: ") and "(" in name and name.endswith(")")


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------

def test_round_robin_interleaves_and_takes_medians(monkeypatch):
    calls = []
    clock = iter(range(1000))
    monkeypatch.setattr(TM.time, "perf_counter", lambda: next(clock) * 1e-3)  # 1 ms per tick
    out = TM.round_robin({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                         repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4              # every setting once per round, warm-up included
    assert out == pytest.approx({"a": 1.0, "b": 1.0})   # one tick between each start and stop
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        TM.round_robin({"a": lambda: None}, repeats=0)


def test_time_layers_times_every_layer_at_every_setting_and_restores_bits():
    m = rk.quantize_model(tiny_vit(depth=3), 4)
    m.blocks[1].attn.set_bits(2, 8)
    x = torch.randn(2, 3, 32, 32)
    names = [f"blocks.{i}.attn" for i in range(3)]
    t = TM.time_layers(m, names, lambda: m(x), repeats=2)
    assert set(t) == set(names)
    for n in names:
        assert set(t[n]) == set(TM.SETTINGS) and all(v > 0 for v in t[n].values())
    assert t[names[0]] == t[names[2]]           # same shapes: timed once, shared
    assert (m.blocks[1].attn.qk_bits, m.blocks[1].attn.pv_bits) == (2, 8)
    assert (m.blocks[0].attn.qk_bits, m.blocks[0].attn.pv_bits) == (4, 8)
    with pytest.raises(TypeError, match="is not a QuantAttention"):
        TM.time_layers(m, ["blocks.0.mlp"], lambda: m(x))


def test_a_module_inside_autocast_is_timed_inside_autocast(monkeypatch):
    m = rk.quantize_model(tiny_vit(depth=1), 8)
    seen = []
    real = type(m.blocks[0].attn).forward

    def spy(self, *a, **k):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(self, *a, **k)
    monkeypatch.setattr(type(m.blocks[0].attn), "forward", spy)
    x = torch.randn(2, 3, 32, 32)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(x)
    TM.time_layers(m, ["blocks.0.attn"], run, settings=("8/8",), repeats=1)
    assert seen and all(seen)


# --------------------------------------------------------------------------------------------
# The autocast section applied
# --------------------------------------------------------------------------------------------

def test_autocast_section_runs_the_module_in_bf16_and_hands_back_fp32():
    ref = tiny_vit()
    m = tiny_vit()
    state = set(m.state_dict())
    x = torch.randn(2, 3, 32, 32)
    inner = []
    m.blocks[1].mlp.fc1.register_forward_hook(lambda mod, a, out: inner.append(out.dtype))
    rk.quantize_model(m, {"version": 1, "layers": {}, "autocast": {"dtype": "bfloat16", "modules": ["blocks.1.mlp"]}})
    assert autocast_dtype(m.blocks[1].mlp) == "bfloat16" and autocast_dtype(m.blocks[0].mlp) is None
    with torch.no_grad():
        y, y_ref = m(x), ref(x)
        out_mlp = m.blocks[1].mlp(torch.randn(2, 17, 64))
    assert inner[0] == torch.bfloat16 and out_mlp.dtype == torch.float32 and y.dtype == torch.float32
    err = float((y - y_ref).abs().max() / y_ref.abs().max())
    assert 0 < err < 0.05                           # bf16 rounding, no more
    assert set(m.state_dict()) == state             # the weights' names are unchanged
    assert m.raad_report.plan()["autocast"] == {"dtype": "bfloat16", "modules": ["blocks.1.mlp"]}
    remove_autocast(m.blocks[1].mlp)
    with torch.no_grad():
        assert torch.equal(m(x), y_ref)


def test_a_deep_copy_of_an_autocast_module_runs_its_own_weights():
    import copy
    m = tiny_vit()
    rk.quantize_model(m, {"version": 1, "layers": {}, "autocast": {"dtype": "bfloat16", "modules": ["blocks.1.mlp"]}})
    twin = copy.deepcopy(m)
    with torch.no_grad():
        twin.blocks[1].mlp.fc2.bias.fill_(0.0)
        twin.blocks[1].mlp.fc2.weight.fill_(0.0)
        x = torch.randn(2, 17, 64)
        assert torch.equal(twin.blocks[1].mlp(x), torch.zeros_like(x))   # the copy's zeroed weights
        assert m.blocks[1].mlp(x).abs().max() > 0                         # the original untouched


def test_autocast_naming_a_missing_module_changes_nothing():
    m = tiny_vit()
    with pytest.raises(PlanError, match=r"autocast names module\(s\) \['blocks.9.mlp'\].*nearest"):
        rk.quantize_model(m, {"version": 1, "layers": {"blocks.0.attn": {"qk_bits": 4, "pv_bits": 8}},
                              "autocast": {"dtype": "bfloat16", "modules": ["blocks.9.mlp"]}})
    assert not isinstance(m.blocks[0].attn, rk.QuantAttention)
