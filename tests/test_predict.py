"""raad predict / raad calibrate on a tiny real fit: calibrated threshold, normalised scores,
bad files, --resume after an interruption, runs without a threshold, calibrated overlays."""

import csv
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from raad import data as D
from raad import predict as P
from raad import threshold as T
from raad import viz
from raad.cli import main

TINY = ["--image-size", "64", "--embed-dim", "32", "--depth", "2", "--num-heads", "1",
        "--steps", "4", "--stage2-steps", "2", "--batch-size", "4", "--avg-bits", "4"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    data, run = root / "data", root / "run"
    assert main(["make-data", str(data), "--categories", "weave", "--size", "64", "--n-train", "10",
                 "--n-test-good", "3", "--n-test-defect", "1"]) == 0
    assert main(["fit", str(data), "--out", str(run), "--quiet"] + TINY) == 0
    return data / "weave", run / "weave"


def _rows(out):
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def _config(run):
    return json.loads((run / "config.json").read_text())


def test_fit_calibrates_and_stores_a_threshold(fitted):
    data, run = fitted
    cfg = _config(run)
    assert set(cfg["threshold"]) == {"plan", "fp32"}
    for rec in cfg["threshold"].values():
        # 10 training images: 2 held out (holdout 0.15, at least 2), so a tail fit that says so
        assert rec["n_images"] == 2 and rec["method"] == "gumbel tail fit"
        assert rec["fpr_target"] == 0.01 and rec["min"] < rec["threshold"] < rec["max"]
        assert "held-out normals of the fit" in rec["source"] and "cannot pin" in rec["note"]
    cal = json.loads((run / "calibration.json").read_text())
    assert len(cal["held_out"]) == 2 and all(p.startswith(str((data / "train" / "good").resolve()))
                                             for p in cal["held_out"])
    assert sorted(cal["scores"]["plan"]) == sorted(cal["held_out"])
    assert json.loads((run / "fit_log.json").read_text())["threshold"] == cfg["threshold"]
    assert cfg["fit"]["fpr"] == 0.01
    assert main(["fit", str(data), "--out", "x", "--fpr", "0.7"]) == 2   # refused before any work


def _bad_folder(data, root):
    """Test images in sub-folders, other formats and sizes, and three bad files."""
    src = root / "line"
    shutil.copytree(data / "test", src / "test")
    good = sorted((data / "test" / "good").glob("*.png"))
    with Image.open(good[0]) as im:
        im.convert("RGB").save(src / "photo.jpg", quality=95)
        im.convert("L").resize((300, 200)).save(src / "wide_grey.tif")
    (src / "empty.png").write_bytes(b"")
    (src / "truncated.png").write_bytes(good[1].read_bytes()[:300])
    (src / "garbage.bmp").write_bytes(b"not an image at all" * 10)
    (src / "notes.txt").write_text("not an image")
    (src / ".hidden.png").write_bytes(good[0].read_bytes())
    return src


def test_predict_scores_every_readable_image_and_names_the_bad_ones(fitted, tmp_path, capsys):
    data, run = fitted
    src = _bad_folder(data, tmp_path)
    single = data / "test" / "good" / "000.png"
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["predict", str(run), str(src), str(single), "--out", str(out), "--quiet"]) == 0
    cap = capsys.readouterr()
    rows = _rows(out)
    n_test = len(list((data / "test").rglob("*.png")))
    assert len(rows) == n_test + 5 + 1     # test images, jpg, tif, 3 bad ones; the single file
    bad = {r["key"]: r for r in rows if r["decision"] == "error"}
    assert set(bad) == {"line/empty.png", "line/truncated.png", "line/garbage.bmp"}
    assert "truncated" in bad["line/truncated.png"]["error"]
    for k in bad:
        assert k.split("/")[1] in cap.err       # named in the summary
        assert bad[k]["score"] == "" and bad[k]["overlay"] == ""
    assert "3 unreadable" in cap.out and "notes.txt" in cap.err
    rec = _config(run)["threshold"]["plan"]
    scored = [r for r in rows if r["decision"] != "error"]
    assert {r["key"] for r in scored} >= {"line/photo.jpg", "line/wide_grey.tif", "000.png"}
    for r in scored:
        s = float(r["score"])
        assert r["decision"] == ("fail" if s >= rec["threshold"] else "pass")
        assert float(r["normalized"]) == T.normalize(s, rec)
        assert (float(r["normalized"]) >= 0.5) == (r["decision"] == "fail")
        with Image.open(out / r["overlay"]) as im:   # image and overlay side by side, >= 256 px
            w, h = im.size
        assert w > 2 * 256 and h > 256
    # the same file as a single input and inside the folder: the same score
    by_key = {r["key"]: r for r in rows}
    assert by_key["000.png"]["score"] == by_key["line/test/good/000.png"]["score"]
    # the wide grey image keeps its aspect: overlay 384 x 256 beside the image
    with Image.open(out / by_key["line/wide_grey.tif"]["overlay"]) as im:
        assert im.width > 2 * 384 and im.height > 256
    # the defects fail on this tiny fit, and the JSON lines hold the same records
    assert all(by_key[f"line/test/{d}/000.png"]["decision"] == "fail" for d in ("hole", "stain"))
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [x["key"] for x in lines] == [r["key"] for r in rows]
    assert all(x["score"] is None or repr(x["score"]) == r["score"] for x, r in zip(lines, rows))
    meta = json.loads((out / "predict.json").read_text())
    assert meta["status"] == "done" and meta["summary"]["error"] == 3
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*.tmp"))


def test_predict_refuses_what_it_cannot_do(fitted, tmp_path, capsys):
    data, run = fitted
    assert main(["predict", str(run), str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(run), str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no images found" in capsys.readouterr().err
    both = tmp_path / "runs"
    for name in ("a", "b"):
        shutil.copytree(run, both / name)
    assert main(["predict", str(both), str(data / "test"), "--out", str(tmp_path / "o")]) == 2
    assert "holds 2 fitted categories" in capsys.readouterr().err
    old = tmp_path / "old"
    shutil.copytree(run, old)
    c = _config(old)
    c["version"] = 0
    (old / "config.json").write_text(json.dumps(c))
    assert main(["predict", str(old), str(data / "test"), "--out", str(tmp_path / "o")]) == 2
    assert "version 0" in capsys.readouterr().err


def test_resume_after_an_interruption_keeps_the_work_and_the_scores(fitted, tmp_path, monkeypatch, capsys):
    data, run = fitted
    src = data / "test"
    n = len(list(src.rglob("*.png")))
    ref = tmp_path / "ref"
    assert main(["predict", str(run), str(src), "--out", str(ref), "--batch", "2", "--quiet"]) == 0

    out = tmp_path / "out"
    real = P.Scorer.score_chunk
    calls = []

    def interrupted(self, chunk):
        calls.append(len(chunk))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, chunk)
    monkeypatch.setattr(P.Scorer, "score_chunk", interrupted)
    assert main(["predict", str(run), str(src), "--out", str(out), "--batch", "2", "--quiet"]) == 130
    assert "--resume" in capsys.readouterr().err
    monkeypatch.setattr(P.Scorer, "score_chunk", real)
    assert len(list((out / ".parts").glob("part-*.jsonl"))) == 2
    assert len(list((out / "overlays").rglob("*.png"))) == 4
    assert not (out / "predictions.csv").exists() and not list(out.rglob("*.tmp"))

    assert main(["predict", str(run), str(src), "--out", str(out), "--batch", "2", "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["predict", str(run), str(src), "--out", str(out), "--resume", "--quiet"]) == 0
    assert "4 done before, kept" in capsys.readouterr().out
    meta = json.loads((out / "predict.json").read_text())
    assert meta["summary"]["scored_now"] == n - 4 and meta["batch"] == 2   # the chunks of the first run
    assert (out / "predictions.csv").read_bytes() == (ref / "predictions.csv").read_bytes()

    # a file that changed since is scored again (with its chunk), the rest kept
    first = sorted((src / "contamination").glob("*.png"))[0]
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    assert main(["predict", str(run), str(src), "--out", str(out), "--resume", "--quiet"]) == 0
    assert json.loads((out / "predict.json").read_text())["summary"]["scored_now"] == 2
    # another precision cannot be resumed into the same folder; --overwrite starts again
    assert main(["predict", str(run), str(src), "--out", str(out), "--resume", "--precision", "fp32"]) == 2
    assert "another --precision" in capsys.readouterr().err
    assert main(["predict", str(run), str(src), "--out", str(out), "--overwrite", "--precision", "fp32",
                 "--quiet"]) == 0
    rows = _rows(out)
    assert len(rows) == n and rows[0]["score"] != _rows(ref)[0]["score"]
    # nor after `raad calibrate` moved the threshold (the normalised scores and decisions)
    mine = tmp_path / "run"
    shutil.copytree(run, mine)
    out2 = tmp_path / "out2"
    assert main(["predict", str(mine), str(src), "--out", str(out2), "--quiet"]) == 0
    assert main(["calibrate", str(mine), str(src / "good"), "--fpr", "0.2", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["predict", str(mine), str(src), "--out", str(out2), "--resume", "--quiet"]) == 2
    assert "another threshold" in capsys.readouterr().err


def test_a_run_without_a_threshold_asks_for_calibrate_and_score_still_works(fitted, tmp_path, capsys):
    """Runs fitted before thresholds existed: predict refuses with the command to run, score
    works (its overlays on the old shared range), and `raad calibrate` makes predict work."""
    data, run = fitted
    old = tmp_path / "old"
    shutil.copytree(run, old)
    c = _config(old)
    del c["threshold"]
    (old / "config.json").write_text(json.dumps(c))
    (old / "calibration.json").unlink()
    assert main(["predict", str(old), str(data / "test"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no decision threshold" in err and f"raad calibrate {old}" in err
    assert main(["score", str(old), str(data.parent), "--out", str(tmp_path / "s"), "--quiet"]) == 0
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert m["decision"]["stored"] is None and m["decision"]["f1_optimal"]["f1"] > 0
    with Image.open(next((tmp_path / "s" / "overlays").glob("*.png"))) as im:
        assert im.size == (64, 64)

    normals = tmp_path / "normals"
    D.make_synthetic(normals, categories=["weave"], seed=3, size=64, n_train=6, n_test_good=0,
                     n_test_defect=0)
    capsys.readouterr()
    assert main(["calibrate", str(old), str(normals / "weave" / "train"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "plan: threshold" in out and "fp32: threshold" in out and "6 normal images" in out
    assert main(["predict", str(old), str(data / "test"), "--out", str(tmp_path / "o"), "--quiet"]) == 0


def test_calibrate_leaves_out_training_images_and_pools_by_default(fitted, tmp_path, capsys):
    data, run = fitted
    mine = tmp_path / "run"
    shutil.copytree(run, mine)
    capsys.readouterr()
    assert main(["calibrate", str(mine), str(data / "train" / "good"), "--quiet"]) == 0
    assert "8 of the images trained the detector: left out" in capsys.readouterr().err
    assert _config(mine)["threshold"]["plan"]["n_images"] == 2   # the held-out two, again
    normals = tmp_path / "normals"
    D.make_synthetic(normals, categories=["weave"], seed=4, size=64, n_train=5, n_test_good=0,
                     n_test_defect=0)
    assert main(["calibrate", str(mine), str(normals), "--quiet", "--fpr", "0.05"]) == 0
    rec = _config(mine)["threshold"]["plan"]
    assert rec["n_images"] == 7 and rec["fpr_target"] == 0.05   # pooled with the held-out two
    assert main(["calibrate", str(mine), str(normals), "--quiet", "--replace"]) == 0
    rec = _config(mine)["threshold"]["plan"]
    assert rec["n_images"] == 5 and rec["fpr_target"] == 0.05   # the stored target is kept
    assert main(["calibrate", str(mine), str(data / "train" / "good" / "001.png")]) == 2   # 000 is held out
    assert "training images" in capsys.readouterr().err


def test_false_alarm_rate_on_new_normals_is_within_its_binomial_error(fitted, tmp_path):
    """Calibrated for 20 % false alarms on 100 normal images of the synthetic category (the
    order statistic), the threshold fails k of 100 other normal images, where k follows the
    beta-binomial law of a Weibull-position quantile (the binomial error of the new count
    together with the calibration's own): k must lie in its central 99.5 % (about 6-37). A
    high rate keeps the interval narrow enough to fail: a threshold at the calibration images'
    maximum would fail about 1, one at their median about 50."""
    data, run = fitted
    mine = tmp_path / "run"
    shutil.copytree(run, mine)
    normals = tmp_path / "normals"
    D.make_synthetic(normals, categories=["weave"], seed=11, size=64, n_train=100, n_test_good=100,
                     n_test_defect=0)
    fpr, n1, n2 = 0.2, 100, 100
    assert main(["calibrate", str(mine), str(normals / "weave" / "train"), "--fpr", str(fpr),
                 "--replace", "--quiet"]) == 0
    rec = _config(mine)["threshold"]["plan"]
    assert rec["method"] == "order statistic" and rec["n_images"] == n1
    assert rec["exceedances"] == 20   # 100 - floor(0.8 * 101) calibration images at or above it
    out = tmp_path / "out"
    assert main(["predict", str(mine), str(normals / "weave" / "test" / "good"), "--out", str(out),
                 "--quiet", "--batch", "16"]) == 0
    rows = _rows(out)
    assert len(rows) == n2
    k = sum(r["decision"] == "fail" for r in rows)
    law = stats.betabinom(n2, fpr * (n1 + 1), (1 - fpr) * (n1 + 1))
    lo, hi = law.ppf(0.0025), law.ppf(0.9975)
    assert lo <= k <= hi, (k, lo, hi)


def test_score_reports_the_stored_and_the_f1_optimal_threshold(fitted, tmp_path, capsys):
    data, run = fitted
    out = tmp_path / "scores"
    capsys.readouterr()
    assert main(["score", str(run), str(data.parent), "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "stored threshold" in text and "false alarms" in text and "F1-optimal threshold" in text
    d = json.loads((out / "metrics.json").read_text())["decision"]
    rec = _config(run)["threshold"]["plan"]
    assert d["stored"]["threshold"] == rec["threshold"]
    assert d["at_stored"]["fpr_count"][1] == 3 and d["at_stored"]["miss_rate_count"][1] == 4
    best = d["f1_optimal"]
    assert 0 < best["f1"] <= 1 and best["normalized"] == T.normalize(best["threshold"], rec)
    # the overlays: the image beside its calibrated map, at least 256 px
    pngs = sorted((out / "overlays").glob("*.png"))
    assert len(pngs) == 7
    with Image.open(pngs[0]) as im:
        assert im.width > 512 and im.height > 256


def test_calibrated_overlay_shows_what_is_above_the_threshold_and_nothing_of_a_normal_map():
    img = np.full((32, 48, 3), 120, np.uint8)
    amap = np.zeros((32, 48))
    amap[10:20, 10:20] = 2.0                            # above the threshold 1.0
    t, lo, hi = 1.0, 0.0, 2.0
    over = np.asarray(viz.calibrated_overlay(img, amap, t, lo, hi, outline=None, min_side=64))
    assert over.shape == (64, 96, 3)                    # scaled up: shorter side 64
    assert (over[:16] == 120).all()                     # below fade: the image itself
    lut = viz.colormap_lut()
    hot = over[30, 30].astype(float)
    assert np.allclose(hot, 0.4 * 120 + 0.6 * lut[255], atol=1)   # alpha 0.6 at level 1
    normal = np.asarray(viz.calibrated_overlay(img, np.full((32, 48), 0.4), t, lo, hi, min_side=32))
    assert (normal == 120).all()                        # a normal map (level 0.2 < fade 0.25) shows nothing
    near = np.asarray(viz.calibrated_overlay(img, np.full((32, 48), 0.9), t, lo, hi, min_side=32))
    assert (near != 120).any() and np.abs(near.astype(int) - 120).max() < 100   # a faint tint
    mask = np.zeros((32, 48), bool)
    mask[5:10, 30:40] = True
    m = np.asarray(viz.calibrated_overlay(img, amap, t, lo, hi, mask, min_side=32))
    assert (m == (255, 0, 255)).all(-1).sum() > 0 and (m == (255, 255, 255)).all(-1).sum() > 0
    panel = viz.prediction_panel(img, amap, t, lo, hi, title="FAIL", min_side=64)
    assert panel.width > 2 * 96 and panel.height > 64
    with pytest.raises(ValueError, match="vmin < threshold < vmax"):
        viz.calibrated_levels(amap, 1.0, 1.0, 2.0)
    buf = io.BytesIO()
    panel.save(buf, format="PNG")
    assert buf.getvalue()[:4] == b"\x89PNG"
