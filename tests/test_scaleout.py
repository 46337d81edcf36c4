"""raad fit --ray and raad predict --ray on a real local Ray (2 CPUs): the sequential results,
a failing category reported while the others finish, and the message without Ray."""

import json
import shutil
import sys

import pytest
import torch

from raad import data as D
from raad.cli import main

ray = pytest.importorskip("ray", reason="ray is an optional extra (pip install 'ray[data]')")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")   # Ray Data's own settings

TINY = ["--image-size", "64", "--embed-dim", "32", "--depth", "2", "--num-heads", "1",
        "--steps", "4", "--stage2-steps", "2", "--batch-size", "4", "--avg-bits", "4"]


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (its start takes seconds); the CLI finds it running."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def fits(local_ray, tmp_path_factory):
    """Two categories fitted one after the other in this process (torch on 1 thread, as a Ray
    task with 1 CPU runs), then all three with --ray, the third with a truncated image."""
    root = tmp_path_factory.mktemp("scaleout")
    data = root / "data"
    D.make_synthetic(data, categories=["weave", "stone"], size=64, n_train=8, n_test_good=2,
                     n_test_defect=1)
    shutil.copytree(data / "weave", data / "broken")
    victim = sorted((data / "broken" / "train" / "good").glob("*.png"))[3]
    victim.write_bytes(victim.read_bytes()[:200])
    seq = root / "seq"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for c in ("weave", "stone"):
            assert main(["fit", str(data / c), "--out", str(seq), "--quiet"] + TINY) == 0
    finally:
        torch.set_num_threads(threads)
    return data, seq, root / "ray"


def test_fit_on_ray_gives_the_sequential_fits_and_reports_the_failing_category(fits, capsys):
    data, seq, on_ray = fits
    capsys.readouterr()
    rc = main(["fit", str(data), "--out", str(on_ray), "--quiet", "--ray", "--ray-cpus", "1"] + TINY)
    out, err = capsys.readouterr()
    assert rc == 1                                      # one category failed ...
    assert "broken: FAILED" in out and "train/good/003.png" in out and "truncated" in out
    assert "1 of 3 categories failed" in err and "broken" in err
    assert not (on_ray / "broken" / "config.json").exists()
    for c in ("weave", "stone"):                         # ... the others finished, as sequential
        assert f"{c}: fitted in" in out
        for f in ("weights.safetensors", "plan.json", "calibration.json"):
            assert (on_ray / c / f).read_bytes() == (seq / c / f).read_bytes(), (c, f)
        got, want = (json.loads((d / c / "config.json").read_text()) for d in (on_ray, seq))
        assert got["threshold"] == want["threshold"] and got["model"] == want["model"]


def test_predict_on_ray_writes_the_sequential_outputs(fits, tmp_path, capsys):
    data, seq, _ = fits
    images = tmp_path / "images"
    shutil.copytree(data / "weave" / "test", images)
    (images / "empty.png").write_bytes(b"")
    outs = {}
    for how, extra in (("single", []), ("ray", ["--ray", "--workers", "2"])):
        outs[how] = tmp_path / how
        capsys.readouterr()
        assert main(["predict", str(seq / "weave"), str(images), "--out", str(outs[how]), "--batch", "2",
                     "--quiet"] + extra) == 0
        assert "1 unreadable" in capsys.readouterr().out
    a, b = outs["single"], outs["ray"]
    assert (a / "predictions.csv").read_bytes() == (b / "predictions.csv").read_bytes()
    assert (a / "predictions.jsonl").read_bytes() == (b / "predictions.jsonl").read_bytes()
    rows = (a / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + len(list(images.rglob("*.png")))
    for png in (a / "overlays").rglob("*.png"):
        assert png.read_bytes() == (b / png.relative_to(a)).read_bytes()
    meta = json.loads((b / "predict.json").read_text())
    assert meta["summary"]["workers"].startswith("ray")
    # one part file per chunk of 2 images, each written by the worker that scored it
    assert len(list((b / ".parts").glob("part-*.jsonl"))) == -(-(len(rows) - 1) // 2)


def test_ray_missing_says_how_to_install_it(fits, tmp_path, monkeypatch, capsys):
    data, seq, _ = fits
    monkeypatch.setitem(sys.modules, "ray", None)   # import ray -> ImportError
    assert main(["predict", str(seq / "weave"), str(data / "weave" / "test"), "--out",
                 str(tmp_path / "o"), "--ray", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--ray needs Ray" in err and "pip install 'ray[data]" in err
    assert main(["fit", str(data / "weave"), "--out", str(tmp_path / "r"), "--ray", "--quiet"] + TINY) == 2
    assert "pip install" in capsys.readouterr().err
