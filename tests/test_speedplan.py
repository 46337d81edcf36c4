"""`raad fit --budget`: a plan chosen by measured speed; `raad bench`: the plan's timing table
against what it measures, and the deployment peers in the same rounds."""

import json

import pytest

from raad.cli import main
from raad_kernels import timing as TM

TINY = ["--image-size", "64", "--embed-dim", "32", "--depth", "2", "--num-heads", "1",
        "--steps", "4", "--stage2-steps", "2", "--batch-size", "4"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    data, run = root / "data", root / "run"
    assert main(["make-data", str(data), "--categories", "pcb", "--size", "64", "--n-train", "10",
                 "--n-test-good", "3", "--n-test-defect", "3"]) == 0
    assert main(["fit", str(data), "--out", str(run), "--quiet"] + TINY) == 0   # default: fastest
    return data, run


def test_the_default_plan_is_chosen_by_measured_speed(fitted):
    _, run = fitted
    plan = json.loads((run / "pcb" / "plan.json").read_text())
    t = plan["timing"]
    assert t["device"] == TM.device_name("cpu") and t["batch"] == 4 and t["unit"] == "ms"
    assert set(t["layers"]) == set(plan["layers"]) == {"student.blocks.0.attn", "student.blocks.1.attn"}
    for name, e in plan["layers"].items():      # every chosen setting was measured
        assert set(t["layers"][name]) == {"2/8", "4/8", "8/8", "16/16"}
        assert f"{e['qk_bits']}/{e['pv_bits']}" in t["layers"][name]
    assert set(t["parts"]) >= {"teacher", "student"} and all(
        v["fp32"] > 0 for v in t["parts"].values())
    speed = json.loads((run / "pcb" / "hqs.json").read_text())["speed"]
    assert speed["budget"] == "fastest" and speed["met"]
    assert speed["damage"]["parts"] + speed["damage"]["attention"] <= speed["max_damage"] + 1e-12
    # the parts took the fastest combination whose summed damage is within half the bound
    from raad.speedplan import best_combination
    opts = {p: {a: (r["ms"][a], r["damage"][a]) for a in r["ms"]} for p, r in speed["parts"].items()}
    assert {p: r["chosen"] for p, r in speed["parts"].items()} == best_combination(opts, 0.5 * speed["max_damage"])
    assert speed["damage"]["parts"] <= 0.5 * speed["max_damage"] + 1e-12
    # the chosen parts are in the plan and applied on load
    from raad.checkpoint import load_run
    det, _, _ = load_run(run / "pcb")
    chosen = {p: r["chosen"] for p, r in speed["parts"].items()}
    base = {p: a.removesuffix("+compile") for p, a in chosen.items()}
    assert ("linears" in plan) == (base["student"] == "int8")
    bf = [p for p, a in base.items() if a == "bfloat16"]
    assert plan.get("autocast", {"modules": []})["modules"] == bf
    assert det.raad_report.autocast == (plan.get("autocast") or None)
    # on a CPU every part was also timed compiled (in bf16 where the CPU has it), and the
    # compiled ones chosen are in the plan's compile section and compiled on load
    from raad.speedplan import bf16_fast
    arith = ("bfloat16" if bf16_fast("cpu") else "fp32") + "+compile"
    assert all(arith in r["ms"] and r["damage"][arith] == r["damage"][arith[:-8]] for r in speed["parts"].values())
    compiled = [p for p, a in chosen.items() if a.endswith("+compile")]
    assert plan.get("compile", {"modules": []})["modules"] == compiled == det.raad_report.compiled


def test_parts_take_the_fastest_combination_within_the_bound():
    """Against every combination listed by hand, and where an equal split of the bound between
    the parts would refuse a part that the shared bound admits."""
    import itertools

    from raad.speedplan import best_combination
    opts = {"teacher": {"fp32": (47.0, 0.0), "bfloat16": (35.0, 0.0041)},
            "student": {"fp32": (137.0, 0.0), "int8": (117.0, 1e-5), "bfloat16": (59.0, 9e-5)}}
    # the old rule: each part within 0.005 / 2 = 0.0025 kept the teacher in fp32
    assert best_combination(opts, 0.005) == {"teacher": "bfloat16", "student": "bfloat16"}
    assert best_combination(opts, 0.004) == {"teacher": "fp32", "student": "bfloat16"}
    assert best_combination(opts, 0.0) == {"teacher": "fp32", "student": "fp32"}
    g = __import__("random").Random(0)
    for _ in range(200):
        opts = {p: {a: (g.uniform(1, 50), 0.0 if i == 0 else g.uniform(0, 0.01))
                    for i, a in enumerate(("fp32", "bfloat16", "int8")[:g.randint(1, 3)])}
                for p in ("teacher", "student", "ae")[:g.randint(1, 3)]}
        limit = g.uniform(0, 0.015)
        got = best_combination(opts, limit)
        combos = [dict(zip(opts, c)) for c in itertools.product(*opts.values())]
        ok = [c for c in combos if sum(opts[p][a][1] for p, a in c.items()) <= limit]
        best = min(sum(opts[p][a][0] for p, a in c.items()) for c in ok)
        assert sum(opts[p][a][0] for p, a in got.items()) == best
        assert sum(opts[p][a][1] for p, a in got.items()) <= limit


def test_an_unreachable_budget_gives_the_fastest_plan_and_says_so(fitted, tmp_path, capsys):
    data, _ = fitted
    assert main(["fit", str(data), "--out", str(tmp_path / "r"), "--budget", "0.001"] + TINY) == 0
    assert "not met: the fastest there is" in capsys.readouterr().out
    speed = json.loads((tmp_path / "r" / "pcb" / "hqs.json").read_text())["speed"]
    assert speed["budget"] == 0.001 and not speed["met"]


@pytest.mark.parametrize("args, match", [
    (["--budget", "fastest", "--avg-bits", "4"], "not both"),
    (["--budget", "soon"], "--budget must be 'fastest' or milliseconds"),
    (["--max-damage", "2"], "--max-damage must be a number in"),
])
def test_bad_budget_options_are_refused_before_training(fitted, tmp_path, capsys, args, match):
    data, _ = fitted
    assert main(["fit", str(data), "--out", str(tmp_path / "r")] + TINY + args) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_bench_compares_the_table_with_its_measurement_and_refuses_another_device(fitted, tmp_path):
    import shutil

    from raad.score import bench
    _, run = fitted
    r = bench(run, batch=4, repeats=2)
    pt = r["plan_timing"]
    assert pt["status"] == "same device" and pt["predicted_ms"] > 0 and pt["measured_ms"] > 0
    assert bench(run, batch=2, repeats=1)["plan_timing"]["status"] == "other batch"
    other = tmp_path / "pcb"
    shutil.copytree(run / "pcb", other)
    plan = json.loads((other / "plan.json").read_text())
    plan["timing"]["device"] = "cuda: NVIDIA GeForce RTX 3090 Ti (sm_86)"
    (other / "plan.json").write_text(json.dumps(plan))
    pt = bench(other, batch=4, repeats=1)["plan_timing"]
    assert pt["status"] == "other device" and "RTX 3090 Ti" in pt["note"] and "predicted_ms" not in pt


def test_bench_peers_run_in_the_same_rounds_and_are_checked_against_fp32(fitted, capsys):
    pytest.importorskip("openvino", reason="the bench extra (openvino, nncf) is not installed")
    from raad.peers import default_peers
    PEERS = default_peers("cpu")
    data, run = fitted
    assert main(["bench", str(run), "--json", "--repeats", "2", "--batch-size", "4", "--data",
                 str(data), "--peers"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(r["peers"]) == set(PEERS) == set(r["plan_vs_peers"])
    assert all(v["images_per_s"] > 0 for v in r["peers"].values())
    # the float exports compute what fp32 computes; the lower precisions differ, a little
    assert r["deviation"]["openvino-fp32"] < 1e-4 and r["deviation"]["compile"] < 1e-4
    assert r["deviation"]["compile-networks"] < 1e-4 and 0 < r["deviation"]["compile-networks-bf16"] < 1
    # (the one-line autocast runs the maps' normalisation in bf16 too: on this 4-step model's
    # flat maps that is a large share)
    assert 0 < r["deviation"]["bf16-autocast"] < 1 and 0 < r["deviation"]["openvino-int8"] < 1
    assert set(r["detection"]) >= {"fp32", "plan"} | set(PEERS)
    fp32 = r["detection"]["fp32"]["image_auroc"]
    assert r["detection"]["openvino-fp32"]["image_auroc"] == pytest.approx(fp32, abs=1e-6)


def test_unknown_peers_are_refused(fitted):
    _, run = fitted
    with pytest.raises(SystemExit):
        main(["bench", str(run), "--peers", "tensorrt"])


def test_graphed_detector_is_the_eager_forward_off_the_gpu(fitted):
    import torch

    from raad.checkpoint import load_run
    from raad.graphs import Graphed, graphed
    _, run = fitted
    det, _, _ = load_run(run / "pcb")
    assert graphed(det, "cpu") is det
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(Graphed(det)(x), det(x))


@pytest.mark.gpu
def test_graphed_detector_replays_what_the_eager_forward_computes(fitted):
    """Both precisions captured in CUDA graphs (one per batch shape) give the eager maps; the
    quantized attention's call path must not synchronise with the host for the capture to work."""
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; none is visible on this machine")
    from raad.checkpoint import load_run
    from raad.graphs import Graphed
    _, run = fitted
    for precision in ("fp32", "plan"):
        det, _, _ = load_run(run / "pcb", precision=precision)
        det.to("cuda")
        g = Graphed(det)
        for b in (4, 3):
            x = torch.randn(b, 3, 64, 64, device="cuda")
            with torch.no_grad():
                ref = det(x)
                got, again = g(x), g(x)
            assert g.fallback is None, g.fallback
            torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4)
            assert torch.equal(got, again)
        assert len(g.graphs) == 2
