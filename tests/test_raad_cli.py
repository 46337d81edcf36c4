"""RAAD end to end on tiny synthetic data through the CLI, and the run folder's refusals."""

import json
import shutil

import numpy as np
import pytest

from raad.cli import main

TINY = ["--image-size", "64", "--embed-dim", "32", "--depth", "2", "--num-heads", "1",
        "--steps", "4", "--stage2-steps", "2", "--batch-size", "4", "--avg-bits", "4"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("raad")
    data, run = root / "data", root / "run"
    assert main(["make-data", str(data), "--categories", "pcb", "--size", "64", "--n-train", "10",
                 "--n-test-good", "3", "--n-test-defect", "2"]) == 0
    assert main(["fit", str(data), "--out", str(run), "--quiet"] + TINY) == 0
    return data, run


def test_fit_writes_a_complete_run_folder(fitted):
    _, run = fitted
    cat = run / "pcb"
    for f in ("weights.safetensors", "config.json", "plan.json", "hqs.json", "fit_log.json"):
        assert (cat / f).is_file(), f
    plan = json.loads((cat / "plan.json").read_text())
    assert plan["version"] == 1 and plan["avg_bits"] == 4.0
    assert set(plan["layers"]) == {"student.blocks.0.attn", "student.blocks.1.attn"}
    bits = [e["qk_bits"] for e in plan["layers"].values()]
    assert sum(bits) <= 4 * len(bits) and all(e["pv_bits"] == 8 for e in plan["layers"].values())
    # --linear-bits 8 (the default): the student blocks' linears run W8A8 under the plan
    assert plan["linears"] == {"bits": 8, "under": ["student.blocks"]}
    assert not list(cat.glob("*.tmp*")), "no temporary files left behind"


def test_plan_runs_the_student_linears_at_int8_and_fp32_keeps_them_float(fitted):
    from raad.checkpoint import load_run
    from raad_kernels.linear import QuantLinear
    _, run = fitted
    quant, _, _ = load_run(run / "pcb", precision="plan")
    names = [n for n, m in quant.named_modules() if isinstance(m, QuantLinear)]
    assert names and all(n.startswith("student.blocks.") for n in names)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"qkv", "proj", "fc1", "fc2"}
    fp32, _, _ = load_run(run / "pcb", precision="fp32")
    assert not any(isinstance(m, QuantLinear) for m in fp32.modules())


def test_linear_bits_16_keeps_the_linears_float(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["make-data", str(data), "--categories", "weave", "--size", "64", "--n-train", "6",
                 "--n-test-good", "1", "--n-test-defect", "1"]) == 0
    assert main(["fit", str(data), "--out", str(run), "--quiet", "--linear-bits", "16"] + TINY) == 0
    plan = json.loads((run / "weave" / "plan.json").read_text())
    assert "linears" not in plan and plan["layers"]
    with pytest.raises(SystemExit):
        main(["fit", str(data), "--out", str(run), "--linear-bits", "4"])


@pytest.mark.parametrize("precision", ["plan", "fp32"])
def test_score_writes_metrics_maps_and_overlays(fitted, tmp_path, precision):
    data, run = fitted
    out = tmp_path / "scores"
    assert main(["score", str(run), str(data), "--out", str(out), "--precision", precision, "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "per_defect"):
        assert k in m
    assert set(m["per_defect"]) == {"missing", "swapped", "scratch", "contamination"}
    maps = np.load(out / "maps.npz")
    assert "good/000.png" in maps.files and "missing/000.png" in maps.files
    assert maps["missing/000.png"].shape == (64, 64) and np.isfinite(maps["missing/000.png"]).all()
    assert len(list((out / "overlays").glob("*.png"))) == len(maps.files)
    assert (m["plan"] is None) == (precision == "fp32")


def test_scoring_a_folder_of_another_name_warns_and_scores_it(fitted, tmp_path):
    """A single run scored on a data folder whose one category has another name (a new batch of
    the same product, say) is scored, with a warning naming both: the name cannot tell a new
    batch from another product."""
    data, run = fitted
    batch = tmp_path / "data2" / "pcb_batch2"
    shutil.copytree(data / "pcb", batch)
    out = tmp_path / "scores"
    with pytest.warns(UserWarning, match="fitted on category 'pcb'.*'pcb_batch2'"):
        assert main(["score", str(run), str(batch.parent), "--out", str(out), "--quiet"]) == 0
    ref = tmp_path / "ref"
    assert main(["score", str(run), str(data), "--out", str(ref), "--quiet"]) == 0
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (out, ref))
    assert got["image_auroc"] == want["image_auroc"] and got["aupro"] == want["aupro"]


def test_a_memory_run_saves_loads_and_scores(fitted, tmp_path):
    """``--memory auto`` resolves to a mode at fit time; the run folder records it, reloads to the
    same maps and scores."""
    import torch

    from raad.checkpoint import load_run
    from raad.data import load_image
    data, _ = fitted
    run = tmp_path / "run"
    assert main(["fit", str(data), "--out", str(run), "--quiet", "--memory", "auto"] + TINY) == 0
    config = json.loads((run / "pcb" / "config.json").read_text())
    chosen = json.loads((run / "pcb" / "fit_log.json").read_text())["memory"]
    assert config["model"]["memory"] == chosen["mode"] in ("global", "local")
    assert config["model"]["memory_size"] == chosen["size"] >= 1
    det, _, _ = load_run(run / "pcb", precision="fp32")
    again, _, _ = load_run(run / "pcb", precision="fp32")
    q = det.memory.fine_q
    assert det.memory.mode == chosen["mode"] and (q[:, 1] > q[:, 0]).all()
    x = torch.stack([load_image(p, 64) for p in sorted((data / "pcb" / "test" / "missing").glob("*.png"))])
    with torch.no_grad():
        assert torch.equal(det(x), again(x))
        assert not torch.allclose(det(x), det(x, branch="student"))
    out = tmp_path / "scores"
    assert main(["score", str(run), str(data), "--out", str(out), "--quiet"]) == 0
    assert "image_auroc" in json.loads((out / "metrics.json").read_text())


def test_bench_prints_one_json_line(fitted, capsys):
    _, run = fitted
    capsys.readouterr()
    assert main(["bench", str(run), "--json", "--repeats", "2", "--batch-size", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert r["fp32_images_per_s"] > 0 and r["plan_images_per_s"] > 0
    assert r["speedup"] > 0 and r["attention_only_speedup"] > 0
    # where the time goes: the fitted pcb has a student, an autoencoder and a memory; the rest
    # (teacher, maps) is what the forward took beyond them
    for k in ("fp32", "plan"):
        assert set(r["parts_ms"][k]) == {"student", "autoencoder", "memory", "rest"}
        assert all(v > 0 for v in r["parts_ms"][k].values())
    # the plan has W8A8 linears: its attention alone is timed in the same loop
    assert r["plan_linears"] == {"bits": 8, "under": ["student.blocks"]}
    from raad_kernels._cpu import capabilities
    caps = capabilities()
    assert r["cpu_int8_dot"] is bool(caps["avx512vnni"] or caps["amx_int8"])
    # the text form says so where the CPU cannot gain from int8
    assert main(["bench", str(run), "--repeats", "1", "--batch-size", "2"]) == 0
    assert ("no int8 dot-product instruction" in capsys.readouterr().out) is not r["cpu_int8_dot"]


def test_bench_speedup_is_the_median_of_paired_rounds(fitted, monkeypatch):
    """Each round times fp32, plan and attention-only back to back; the speedup is the median of
    the rounds' ratios, so a load spike that slows one round does not decide it."""
    import raad.score as S
    _, run = fitted
    # rounds of (fp32, plan, attention only); the machine slowed down for the last two rounds,
    # and the plan's second run landed in a quiet moment
    seq = iter([1.0, 0.5, 1.0, 4.0, 0.5, 4.0, 4.0, 2.0, 4.0])
    monkeypatch.setattr(S, "_timed", lambda det, x: next(seq))
    monkeypatch.setattr(S, "_warm_up", lambda variants, x: None)
    r = S.bench(run / "pcb", repeats=3, batch=2)
    assert r["speedup"] == 2.0                     # round ratios 2, 8, 2 (medians alone: 4 / 0.5 = 8)
    assert r["speedup_p10_p90"] == [2.0, pytest.approx(6.8)]   # linear percentiles of 2, 2, 8
    assert set(r["parts_ms"]) == {"fp32", "plan"}           # timed apart, on the real clock
    assert r["attention_only_speedup"] == 1.0      # round ratios 1, 1, 1
    assert r["fp32_images_per_s"] == pytest.approx(2 / 4.0) and r["plan_images_per_s"] == pytest.approx(2 / 0.5)


def test_bench_on_real_test_images(fitted, capsys, tmp_path):
    data, run = fitted
    capsys.readouterr()
    assert main(["bench", str(run), "--json", "--repeats", "2", "--batch-size", "3", "--data", str(data)]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["images"] == "3 test images of pcb" and r["batch"] == 3
    # a data folder without the run's category is refused, naming what it has
    other = tmp_path / "other"
    assert main(["make-data", str(other), "--categories", "weave", "--size", "64", "--n-train", "2",
                 "--n-test-good", "1", "--n-test-defect", "1"]) == 0
    (other / "stone").mkdir()  # two categories: no fallback to "the only one"
    shutil.copytree(other / "weave", other / "stone", dirs_exist_ok=True)
    capsys.readouterr()
    assert main(["bench", str(run), "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert "has no category 'pcb'" in err and "weave" in err


def test_damaged_weights_are_refused(fitted, tmp_path, capsys):
    data, run = fitted
    bad = tmp_path / "run"
    shutil.copytree(run, bad)
    w = bad / "pcb" / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    assert main(["score", str(bad), str(data), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "weights.safetensors" in err and "damaged" in err
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_run_from_another_version_is_refused(fitted, tmp_path, capsys):
    data, run = fitted
    old = tmp_path / "run"
    shutil.copytree(run, old)
    cfg = old / "pcb" / "config.json"
    c = json.loads(cfg.read_text())
    c["version"] = 0
    cfg.write_text(json.dumps(c))
    assert main(["score", str(old), str(data), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "version 0" in capsys.readouterr().err


def test_missing_data_folder_gives_a_clear_message(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "nope"), "--out", str(tmp_path / "run"), "--quiet"] + TINY) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "does not exist" in err
    assert not (tmp_path / "run").exists()


def test_broken_training_image_stops_before_anything_is_written(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["make-data", str(data), "--categories", "weave", "--size", "64", "--n-train", "6",
                 "--n-test-good", "1", "--n-test-defect", "1"]) == 0
    victim = sorted((data / "weave" / "train" / "good").glob("*.png"))[3]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated PNG
    assert main(["fit", str(data), "--out", str(tmp_path / "run"), "--quiet"] + TINY) == 2
    err = capsys.readouterr().err
    assert victim.name in err
    assert not (tmp_path / "run").exists()


def test_cli_defaults_are_the_library_defaults():
    """`raad fit` without options trains exactly what `raad demo` and the Python API train."""
    from raad.cli import build_parser
    from raad.model import ModelConfig
    from raad.train import FitOptions
    for command in ("fit", "ablate"):
        a = build_parser().parse_args([command, "data", "--out", "run"])
        f, m = FitOptions(), ModelConfig()
        assert (a.lr, a.steps, a.stage2_steps, a.batch_size, a.avg_bits, a.seed) == \
            (f.lr, f.steps, f.stage2_steps, f.batch_size, f.avg_bits, f.seed)
        assert (a.image_size, a.stride, a.embed_dim, a.depth, a.num_heads, a.teacher, a.memory,
                a.memory_size, a.align, a.autoencoder) == \
            (m.image_size, m.stride, m.embed_dim, m.depth, m.num_heads, m.teacher, m.memory,
             m.memory_size, m.align, m.autoencoder)
    # `raad make-data` writes what `raad demo` and make_synthetic write
    import inspect

    import raad.data as D
    from raad.cli import make_data_call
    from raad.realphoto import make_real
    for argv, lib_fn in ((["make-data", "out"], D.make_synthetic),
                         (["make-data", "out", "--real"], make_real)):
        gen, kwargs = make_data_call(build_parser().parse_args(argv))
        assert gen is lib_fn
        lib = inspect.signature(lib_fn).parameters
        for name in ("seed", "size", "n_train", "n_test_good", "n_test_defect"):
            assert kwargs.get(name, lib[name].default) == lib[name].default, name


def test_demo_writes_table_report_and_heatmaps(tmp_path, monkeypatch, capsys):
    """`raad demo` end to end, shrunk (tiny model, a few steps, one category)."""
    import functools
    import re

    import raad.demo as demo_mod
    from raad.model import ModelConfig
    from raad.train import FitOptions

    monkeypatch.setattr(demo_mod, "ModelConfig", functools.partial(
        ModelConfig, embed_dim=32, depth=2, num_heads=1))
    monkeypatch.setattr(demo_mod, "DEMO_IMAGE_SIZE", 64)
    monkeypatch.setattr(demo_mod, "FitOptions", functools.partial(FitOptions, stage2_steps=2, batch_size=4))
    out = tmp_path / "demo"
    res = demo_mod.demo(out, steps=3, categories=["pcb"], quiet=True)
    assert res["bench"]["pcb"]["speedup"] > 0
    report = (out / "REPORT.md").read_text()
    assert re.search(r"\| pcb \| fp32 \| [0-9.]+ \|", report) and re.search(r"\| pcb \| plan \| [0-9.]+ \|", report)
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(images) == 5  # good + 4 defect types
    for rel in images:
        assert (out / rel).is_file(), rel
    assert json.loads((out / "demo.json").read_text())["bench"]["pcb"]["images"].startswith("8 test images")
    # where the CPU has no int8 dot-product instruction, the report says the plan cannot win here
    assert ("no int8 dot-product instruction" in report) is (res["bench"]["pcb"]["cpu_int8_dot"] is False)


def test_ablate_writes_table_json_and_plot(fitted, tmp_path):
    """`raad ablate` end to end on the tiny data: every setting, with and without stage 2, in
    the markdown table, the JSON and the plot; the quantized rows carry their bits."""
    data, _ = fitted
    out = tmp_path / "ablation"
    assert main(["ablate", str(data), "--out", str(out), "--quiet"] + TINY) == 0
    settings = ["fp32", "patchcore"] + [f"{p}{s}" for p in ("int8", "int4", "int2", "HQS@4", "random@4",
                                                            "HQS@3", "random@3")
                                         for s in ("", " +stage2")]
    res = json.loads((out / "ablation.json").read_text())
    assert list(res) == ["pcb"] and list(res["pcb"]) == settings
    for name, row in res["pcb"].items():
        assert 0.0 <= row["image_auroc"] <= 1.0 and 0.0 <= row["aupro"] <= 1.0, name
        assert (row.get("bits") is None) == (name in ("fp32", "patchcore"))
    assert set(res["pcb"]["int4"]["bits"].values()) == {4}
    for k in ("HQS@3", "random@3"):   # the same budget: 3 bits on average, so some int2
        bits = list(res["pcb"][k]["bits"].values())
        assert sum(bits) <= 3 * len(bits) and 2 in bits, k
    table = (out / "ablation.md").read_text().splitlines()
    assert len(table) == 2 + len(settings) and all(f"| pcb | {s} |" in "\n".join(table) for s in settings)
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
