"""raad_kernels.compiled: a plan's ``compile`` section (torch.compile with inductor's freezing)."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import raad_kernels as rk
from raad_kernels import compiled as C
from raad_kernels.plan import PlanError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x, scale: float = 1.0):
        return self.head(torch.relu(self.conv(x))) * scale


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_forward_computes_the_eager_one_in_inference_and_trains_eagerly():
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        ref = net(x, scale=0.5)
    assert C.compile_modules(net, [""]) == [""] and C.is_compiled(net)
    before = _graphs()
    with torch.no_grad():
        got = net(x, scale=0.5)
    assert _graphs() > before                     # it compiled a graph ...
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)     # ... that computes the same
    # with gradients on, or in training mode, the eager forward runs (freezing is for inference)
    before = _graphs()
    net.train()
    y = net(x)
    y.sum().backward()
    assert net.conv.weight.grad is not None and _graphs() == before
    C.remove_compiled(net)
    assert not C.is_compiled(net) and "forward" not in net.__dict__


def test_more_modules_of_one_class_than_dynamos_cache_holds_are_all_compiled():
    """torch.compile keeps at most 8 graphs per code object and runs the frame eagerly past that,
    silently; each compiled module gets a frame of its own, so each of twelve gets its own graph
    (sharing the class's frame, they gave one)."""
    x = torch.randn(1, 3, 8, 8)
    before = _graphs()
    for _ in range(12):
        net = Net().eval()
        C.compile_modules(net, [""])
        with torch.no_grad():
            net(x)
    assert _graphs() - before == 12


def test_a_deep_copy_compiles_its_own_weights():
    torch.manual_seed(0)
    net = Net().eval()
    C.compile_modules(net, [""])
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin.head.bias += 1.0
        x = torch.randn(1, 3, 8, 8)
        assert torch.allclose(twin(x), net(x) + 1.0, atol=1e-5)
    assert twin.forward.module is twin


def test_a_failing_compile_warns_once_and_runs_eagerly(monkeypatch):
    net = Net().eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        ref = net(x)
    # no C++ compiler where inductor looks for one: the first compiled call fails for real
    monkeypatch.setattr(C, "OPTIONS", {"freezing": True, "cpp.cxx": ("/nonexistent/c++",)})
    C.compile_modules(net, [""])
    with torch.no_grad(), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = net(x)
        again = net(x)
    assert torch.equal(out, ref) and torch.equal(again, ref)
    msgs = [str(m.message) for m in w if "raad-kernels: compiling" in str(m.message)]
    assert len(msgs) == 1 and "runs eagerly" in msgs[0]
    assert C.compile_failed(net)


def test_options_torch_compile_refuses_warn_when_applied(monkeypatch):
    monkeypatch.setattr(C, "OPTIONS", {"no_such_inductor_option": 1})
    net = Net().eval()
    with pytest.warns(UserWarning, match="compiling <root> failed.*runs eagerly"):
        C.compile_modules(net, [""])
    with torch.no_grad():
        x = torch.randn(1, 3, 8, 8)
        assert torch.equal(net(x), net.forward.eager(x))


def test_a_bad_input_is_the_eager_error_and_keeps_the_compiled_path():
    net = Net().eval()
    C.compile_modules(net, [""])
    with torch.no_grad():
        net(torch.randn(1, 3, 8, 8))
        with pytest.raises(RuntimeError):
            net(torch.randn(1, 5, 8, 8))        # 5 channels: the convolution's own error
    assert C.compile_failed(net) is None


def test_plan_compile_section_is_validated_and_applied():
    from raad.model import Detector, ModelConfig
    det = Detector(ModelConfig(image_size=64, embed_dim=32, depth=1, num_heads=1, memory="off")).eval()
    layers = {n: {"qk_bits": 16, "pv_bits": 16} for n in det.attention_modules()}
    with pytest.raises(PlanError, match=r"compile: unknown key\(s\) \['dtype'\]"):
        rk.quantize_model(det, {"version": 1, "layers": layers, "compile": {"modules": ["teacher"], "dtype": "x"}})
    with pytest.raises(PlanError, match="compile: modules must be a list of module names"):
        rk.quantize_model(det, {"version": 1, "layers": layers, "compile": {"modules": "teacher"}})
    with pytest.raises(PlanError, match="compile names module.*'teachr'.*nearest: teacher"):
        rk.quantize_model(det, {"version": 1, "layers": layers, "compile": {"modules": ["teachr"]}})
    assert not C.is_compiled(det.teacher)     # a refused plan changed nothing
    plan = {"version": 1, "layers": layers, "autocast": {"dtype": "bfloat16", "modules": ["teacher"]},
            "compile": {"modules": ["teacher"]}}
    rk.quantize_model(det, plan)
    rk.quantize_model(det, plan)              # applied twice: still one wrapper, around the autocast
    assert C.is_compiled(det.teacher) and not isinstance(det.teacher.forward.eager, C._CompiledForward)
    assert det.raad_report.compiled == ["teacher"] and det.raad_report.plan()["compile"] == {"modules": ["teacher"]}
    assert "compiled: teacher" in str(det.raad_report)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = det(x)
    C.remove_compiled(det.teacher)
    with torch.no_grad():
        ref = det(x)
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
