"""backend="auto" on CUDA from the measured speed table (raad_kernels/speed_table.py): the
table's format checks and the selection logic, with fake backends and a table in a temp dir."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from raad_kernels import dispatch, speed_table

ROOT = Path(__file__).resolve().parents[1]


def _table(classes, passed=("cuda", "triton"), key="sm_86"):
    return {"format": 1, "devices": {key: {"device": "test GPU", "tests_passed": list(passed),
                                           "classes": classes}}}


@pytest.fixture
def table_file(tmp_path, monkeypatch):
    """Write a table, point the package at it, and pretend the CUDA device is sm_86."""
    path = tmp_path / "gpu_speed.json"

    def write(data):
        path.write_text(json.dumps(data) if not isinstance(data, str) else data)
        speed_table._load.cache_clear()
        return path
    monkeypatch.setattr(speed_table, "TABLE_PATH", path)
    monkeypatch.setattr(speed_table, "device_key", lambda device: "sm_86")
    monkeypatch.setattr(dispatch, "_MEASURED", {})
    yield write
    speed_table._load.cache_clear()


class _Fake(types.SimpleNamespace):
    def status(self):
        return dispatch.BackendStatus(True, self.runnable, "fake")

    def supports(self, device):
        return True

    def attention(self, q, k, v, out=None, **kw):
        self.calls.append(out)
        res = torch.full((*q.shape[:-1], v.shape[-1]), float(len(self.name)))
        if out is not None:
            out.copy_(res)
            return out, {}
        return res, {}


@pytest.fixture
def fakes(monkeypatch):
    mods = {n: _Fake(name=n, runnable=True, calls=[], OUT=out)
            for n, out in (("cuda", "contiguous"), ("triton", "strided"), ("cpu", "strided"),
                           ("torch", None))}
    monkeypatch.setattr(dispatch, "_module", lambda name: (mods[name], None))
    return mods


CUDA = torch.device("cuda", 0)


def test_shipped_table_is_valid_and_packaged():
    data = json.loads(speed_table.TABLE_PATH.read_text())
    speed_table.validate(data, str(speed_table.TABLE_PATH))
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'raad_kernels\s*=\s*\[[^\]]*"gpu_speed\.json"', pyproject), \
        "gpu_speed.json must be package data in pyproject.toml"


@pytest.mark.parametrize("mutate,key,msg", [
    (lambda d: d.update(format=2), "format", "must be 1"),
    (lambda d: d.update(devices=[]), "devices", "object"),
    (lambda d: d["devices"].update({"ampere": d["devices"].pop("sm_86")}), "devices['ampere']", "sm_"),
    (lambda d: d["devices"]["sm_86"].update(tests_passed=["cuda", "opencl"]), "tests_passed", "list of backends"),
    (lambda d: d["devices"]["sm_86"]["classes"][0].update(max_tokens=2000), "classes[0].max_tokens", "one of"),
    (lambda d: d["devices"]["sm_86"]["classes"][0].update(head_dim=96), "classes[0].head_dim", "one of"),
    (lambda d: d["devices"]["sm_86"]["classes"][0]["ms"].update(cuda=-1.0), "classes[0].ms['cuda']", "positive"),
    (lambda d: d["devices"]["sm_86"]["classes"][0]["ms"].update(cuda="fast"), "classes[0].ms['cuda']", "positive"),
    (lambda d: d["devices"]["sm_86"].update(tests_passed=["triton"]), "classes[0].ms['cuda']", "tests_passed"),
    (lambda d: d["devices"]["sm_86"]["classes"].append(dict(d["devices"]["sm_86"]["classes"][0])),
     "classes[1]", "twice"),
])
def test_format_errors_name_file_and_key(mutate, key, msg, table_file):
    data = _table([{"max_tokens": 1025, "head_dim": 64, "ms": {"cuda": 0.1, "triton": 0.3}}])
    mutate(data)
    path = table_file(data)
    with pytest.raises(speed_table.SpeedTableError) as e:
        speed_table.table()
    text = str(e.value)
    assert str(path) in text and key in text and msg in text, text


def test_bad_json_names_the_file(table_file):
    path = table_file("{not json")
    with pytest.raises(speed_table.SpeedTableError, match=re.escape(str(path))):
        speed_table.table()


def test_shape_classes():
    assert speed_table.shape_class(197, 64) == (1025, 64)
    assert speed_table.shape_class(1025, 40) == (1025, 64)
    assert speed_table.shape_class(1026, 128) == (4097, 128)
    assert speed_table.shape_class(4097, 65) == (4097, 128)
    assert speed_table.shape_class(16385, 256) == (None, 256)


def test_auto_picks_the_measured_fastest_per_class(table_file, fakes):
    table_file(_table([
        {"max_tokens": 1025, "head_dim": 64, "ms": {"cuda": 0.06, "triton": 0.40}},
        {"max_tokens": 4097, "head_dim": 64, "ms": {"cuda": 0.90, "triton": 0.50}},
        {"max_tokens": 1025, "head_dim": 128, "ms": {"triton": 0.30}},
    ], passed=("cuda", "triton")))
    assert dispatch.choose(CUDA, 197, 64) is fakes["cuda"]
    assert dispatch.choose(CUDA, 4097, 64) is fakes["triton"]
    assert dispatch.choose(CUDA, 1025, 128) is fakes["triton"]
    # a class the table lacks: the fixed order (triton first while CUDA is unverified)
    assert dispatch.choose(CUDA, 16385, 64) is fakes[dispatch._auto_order(CUDA)[0]]
    # never a backend the table shows slower than another usable one: the faster one is
    # skipped only when it cannot run, and then the next in speed order
    fakes["cuda"].runnable = False
    assert dispatch.choose(CUDA, 197, 64) is fakes["triton"]


def test_never_slower_over_many_tables(table_file, fakes):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        t = torch.rand(2, generator=g).tolist()
        table_file(_table([{"max_tokens": None, "head_dim": 128, "ms": {"cuda": t[0] + 0.01, "triton": t[1] + 0.01}}]))
        picked = dispatch.choose(CUDA, 9000, 100)
        assert picked is fakes["cuda" if t[0] < t[1] else "triton"]


def test_select_auto_uses_the_table_per_call(table_file, fakes):
    table_file(_table([
        {"max_tokens": 1025, "head_dim": 64, "ms": {"cuda": 0.06, "triton": 0.40}},
        {"max_tokens": 4097, "head_dim": 64, "ms": {"cuda": 0.90, "triton": 0.50}},
    ]))
    impl = dispatch.select("auto", CUDA)
    assert impl.OUT == "strided"
    q = torch.zeros(1, 2, 197, 64)
    o, _ = impl.attention(q, q, q, qk_bits=8, pv_bits=8, scale=0.1)
    assert len(fakes["cuda"].calls) == 1 and (o == 4.0).all()
    q2 = torch.zeros(1, 2, 3000, 64)
    impl.attention(q2, q2, q2, qk_bits=8, pv_bits=8, scale=0.1)
    assert len(fakes["triton"].calls) == 1
    # a non-contiguous out: the contiguous-only backend (cuda) writes its own, copied in
    out = torch.empty(1, 197, 2, 64).transpose(1, 2)
    o, _ = impl.attention(q, q, q, qk_bits=8, pv_bits=8, scale=0.1, out=out)
    assert o is out and fakes["cuda"].calls[-1] is None and (out == 4.0).all()


def test_no_entry_for_the_device_keeps_todays_order(table_file, fakes, monkeypatch):
    table_file(_table([{"max_tokens": 1025, "head_dim": 64, "ms": {"cuda": 0.06}}], key="sm_90"))
    assert not speed_table.has_device(CUDA)
    assert dispatch.select("auto", CUDA) is fakes[dispatch._auto_order(CUDA)[0]]
    assert dispatch.choose(CUDA, 197, 64) is fakes[dispatch._auto_order(CUDA)[0]]


def test_bench_writes_the_table_format(tmp_path):
    """bench_gpu.py's table builder: rows and test results → a valid table, with only the
    backends whose tests passed."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_gpu
    finally:
        sys.path.pop(0)
    rows = [{"shape": [8, 6, 197, 64], "method": "cuda_q8p8", "ms": 0.05},
            {"shape": [8, 6, 197, 64], "method": "triton_q8p8", "ms": 0.4},
            {"shape": [1, 12, 1025, 64], "method": "cuda_q8p8", "ms": 0.08},
            {"shape": [1, 12, 1025, 64], "method": "triton_q8p8", "ms": 0.3},
            {"shape": [1, 12, 4097, 128], "method": "triton_q8p8", "ms": 0.9},
            {"shape": [1, 12, 4097, 128], "method": "cuda_q8p8", "error": "failed"}]
    meta = {"device": "test GPU", "capability": "8.6", "date": "2026-12-07"}
    junit = tmp_path / "t.xml"
    junit.write_text('<testsuites><testsuite name="pytest">'
                     '<testcase classname="tests.test_cuda_backend" name="a"><failure message="x"/></testcase>'
                     '<testcase classname="tests.test_triton_backend" name="b"/>'
                     '<testcase classname="tests.test_triton_backend" name="c"><skipped/></testcase>'
                     '</testsuite></testsuites>')
    passed = bench_gpu.backends_passed(junit)
    assert passed == ["triton"]
    data = bench_gpu.speed_table_from(rows, meta, passed, base={"format": 1, "devices": {}})
    speed_table.validate(data, "written")
    cls = {(c["max_tokens"], c["head_dim"]): c["ms"] for c in data["devices"]["sm_86"]["classes"]}
    assert set(cls) == {(1025, 64), (4097, 128)}
    assert set(cls[(1025, 64)]) == {"triton"}  # cuda failed its tests: left out
    assert cls[(1025, 64)]["triton"] == pytest.approx((0.4 * 0.3) ** 0.5)
    both = bench_gpu.speed_table_from(rows, meta, ["cuda", "triton"], base={"format": 1, "devices": {}})
    assert both["devices"]["sm_86"]["classes"][0]["ms"]["cuda"] == pytest.approx((0.05 * 0.08) ** 0.5)
