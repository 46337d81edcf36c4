"""`raad predict` and `raad calibrate`: score new images and decide, part by part, pass or fail.

``raad predict RUN INPUT... --out DIR`` scores any mix of image files and folders (searched
recursively; every format Pillow reads) with a fitted run and writes, per image, the image score,
its normalised score (the threshold at 0.5, see :mod:`raad.threshold`), the decision and an
overlay (``overlays/``: the image beside its anomaly map coloured on the calibrated scale), and
``predictions.csv`` / ``predictions.jsonl`` for all of them, in input order.

* An image that cannot be read (unreadable, truncated, empty) gets the decision ``error`` and its
  reason; every other image is still scored, and the summary names the bad ones.
* Work is done in chunks of ``batch`` images taken in input order. After each chunk its overlays
  and then its records (a file under ``.parts/``) are written atomically, so an interrupted run
  keeps everything it finished; ``--resume`` skips the images already done (same run, precision
  and threshold; an image file changed since is scored again). A chunk always holds the same
  images, whichever worker or run scores it, so the scores are the same to the last bit on one
  machine whether the run was resumed, single-process or spread over Ray workers (the model's
  batched arithmetic may differ in the last bit between batch compositions, e.g. 1 vs 8 images).
* The image score is the anomaly map's maximum at the model's resolution (the detector's own
  view, whatever the image's size), the one the threshold was calibrated on.

``raad calibrate RUN FOLDER`` scores normal images (the detector must not have been trained on
them: the fit's training images are left out when FOLDER holds them) and sets the threshold
again, pooled with the images it rested on before (``--replace``: these alone).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from . import data as D
from . import threshold as T
from . import viz
from .checkpoint import (PLAN, WEIGHTS, RunError, load_run, read_calibration,
                         read_config, save_json, save_threshold, stored_threshold, threshold_for,
                         threshold_key)
from .io import atomic_write_text

PARTS = ".parts"
META = "predict.json"
CSV_NAME = "predictions.csv"
JSONL_NAME = "predictions.jsonl"
OVERLAYS = "overlays"
COLUMNS = ("image", "key", "score", "normalized", "decision", "overlay", "error")


class BadImage(Exception):
    """An input file that cannot be decoded as an image."""


def readable_extensions() -> frozenset[str]:
    """File extensions of every format Pillow can open (what a folder search picks up)."""
    Image.init()
    return frozenset(e for e, f in Image.registered_extensions().items() if f in Image.OPEN)


def _natural(s: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


@dataclass
class Source:
    """One input image: ``path`` as found (the CSV's ``image``), ``key`` (unique name in the
    outputs), ``overlay`` (its overlay, relative to the output folder)."""

    path: str
    key: str
    overlay: str

    @property
    def abspath(self) -> str:
        return os.path.abspath(self.path)


def _walk(folder: Path, exts: frozenset, exclude: list[Path]) -> tuple[list[Path], list[Path]]:
    """(image files, other files) under ``folder``, hidden files and folders and ``exclude``
    left out, sorted naturally by their relative path."""
    images, other = [], []
    for root, dirs, files in os.walk(folder):
        r = Path(root)
        dirs[:] = [d for d in dirs if not d.startswith(".")
                   and not any((r / d).resolve() == e for e in exclude)]
        for f in files:
            if f.startswith("."):
                continue
            (images if Path(f).suffix.lower() in exts else other).append(r / f)
    key = lambda p: _natural(p.relative_to(folder).as_posix())   # noqa: E731
    return sorted(images, key=key), sorted(other, key=key)


def gather(inputs, exclude=()) -> tuple[list[Source], list[str]]:
    """Input files and folders -> (sources in input order, files skipped for their extension).
    A file named directly is taken whatever its extension; folders are searched recursively
    for :func:`readable_extensions`. The same file twice is taken once. Keys: a file's name, or
    ``<folder name>/<path inside it>``; overlays: ``overlays/<key>`` as PNG."""
    exts = readable_extensions()
    excl = [Path(e).resolve() for e in exclude]
    found: list[tuple[Path, str]] = []
    skipped: list[str] = []
    for inp in inputs:
        p = Path(inp)
        if not p.exists():
            raise FileNotFoundError(f"input {inp}: no such file or folder")
        if p.is_dir():
            images, other = _walk(p, exts, excl)
            base = p.resolve().name or "input"
            found += [(f, f"{base}/{f.relative_to(p).as_posix()}") for f in images]
            skipped += [str(f) for f in other]
        else:
            found.append((p, p.name))
    seen_files, keys, overlays, out = set(), set(), set(), []
    for f, key in found:
        real = f.resolve()
        if real in seen_files:
            continue
        seen_files.add(real)
        k, n = key, 1
        while k in keys:
            n += 1
            stem, dot, ext = key.rpartition(".")
            k = f"{stem}~{n}.{ext}" if dot else f"{key}~{n}"
        keys.add(k)
        ov = f"{OVERLAYS}/{k.rpartition('.')[0] or k}.png"
        if ov in overlays:   # a.png and a.jpg side by side
            ov = f"{OVERLAYS}/{k.replace('.', '_')}.png"
        overlays.add(ov)
        out.append(Source(str(f), k, ov))
    return out, skipped


def read_image(path) -> Image.Image:
    """Decode an image file completely (truncated files fail here, not later) as RGB."""
    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - any decoder failure makes the file unreadable
        raise BadImage(f"cannot read image ({type(e).__name__}: {e})") from None
    if rgb.width < 1 or rgb.height < 1:
        raise BadImage(f"empty image ({rgb.width}x{rgb.height})")
    return rgb


def model_input(img: Image.Image, size: int) -> torch.Tensor:
    """What :func:`raad.data.load_image` makes of a file, from its decoded RGB image."""
    if (img.height, img.width) != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return D.to_tensor(img)


def _stat(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return None


def run_id(run_dir) -> str:
    """A digest of the run's config (its threshold aside: a resume checks that on its own),
    plan and weights: what a resumed prediction must match."""
    h = hashlib.sha256()
    config = {k: v for k, v in read_config(run_dir).items() if k != "threshold"}
    h.update(json.dumps(config, sort_keys=True).encode())
    for name in (PLAN, WEIGHTS):
        p = Path(run_dir) / name
        if p.is_file():
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def single_run(run_dir) -> Path:
    """``run_dir`` as one fitted category; a folder of several is refused, naming them."""
    from .score import run_categories
    runs = run_categories(run_dir)
    if len(runs) > 1:
        names = ", ".join(r.name for r in runs)
        raise RunError(f"{run_dir} holds {len(runs)} fitted categories ({names}): give one of them, "
                       f"e.g. {runs[0]}")
    return runs[0]


# ------------------------------------------------------------------------------------------------
# Scoring a chunk (in this process or on a Ray worker)
# ------------------------------------------------------------------------------------------------

class Scorer:
    """A run's detector ready to score chunks of :class:`Source` dicts into ``out_dir``: the
    records of each chunk are returned and also written under ``out_dir/.parts``."""

    def __init__(self, run_dir, precision, device, out_dir, rec, rid, min_side=256):
        from raad_kernels.allocator import keep_freed_memory
        keep_freed_memory()   # a scoring process (also each Ray worker's)
        self.det, _, _ = load_run(run_dir, precision=precision)
        self.det.to(device)
        self.device, self.out, self.rec, self.rid, self.precision = device, Path(out_dir), rec, rid, precision
        self.min_side = min_side
        self.size = self.det.cfg.image_size

    def record(self, s: dict, **kw) -> dict:
        r = {"image": s["path"], "key": s["key"], "score": None, "normalized": None,
             "decision": "error", "overlay": "", "error": "", "stat": s["stat"], "run_id": self.rid,
             "precision": self.precision}
        r.update(kw)
        return r

    @torch.inference_mode()
    def score_chunk(self, chunk: list[dict]) -> list[dict]:
        images, ok, records = [], [], {}
        for s in chunk:
            s = {**s, "stat": _stat(s["abspath"])}
            try:
                img = read_image(s["abspath"])
            except BadImage as e:
                records[s["key"]] = self.record(s, error=str(e))
                continue
            images.append(img)
            ok.append(s)
        if ok:
            x = torch.stack([model_input(im, self.size) for im in images]).to(self.device)
            maps = self.det(x).float().cpu()
            maps = T.score_maps(maps, T.score_sigma(self.det))   # what the score is the maximum of
            scores = T.image_scores(maps)
            r = self.rec
            for s, img, m, score in zip(ok, images, maps.numpy(), scores):
                score = float(score)
                decision = T.decide(score, r)
                norm = T.normalize(score, r)
                title = f"{decision.upper()}  score {score:.4g} (normalised {norm:.3f})  {s['key']}"
                viz.save_prediction_panel(self.out / s["overlay"], img, m, r["threshold"], r["min"],
                                          r["max"], title=title, min_side=self.min_side)
                records[s["key"]] = self.record(s, score=score, normalized=norm, decision=decision,
                                                overlay=s["overlay"])
        out = [records[s["key"]] for s in chunk]
        write_part(self.out, out)
        return out


def write_part(out_dir: Path, records: list[dict]) -> Path:
    """One chunk's records as a JSON-lines file under ``.parts`` (atomically)."""
    now = time.time_ns()
    for r in records:
        r["written"] = now
    name = f"part-{now}-{uuid.uuid4().hex[:8]}.jsonl"
    return atomic_write_text(Path(out_dir) / PARTS / name,
                             "".join(json.dumps(r, allow_nan=False) + "\n" for r in records))


def read_parts(out_dir) -> dict[str, dict]:
    """key -> the latest record written under ``.parts`` (a part file is complete or absent)."""
    latest: dict[str, dict] = {}
    folder = Path(out_dir) / PARTS
    if not folder.is_dir():
        return latest
    for p in folder.glob("part-*.jsonl"):
        for line in p.read_text().splitlines():
            r = json.loads(line)
            if r["key"] not in latest or r["written"] >= latest[r["key"]]["written"]:
                latest[r["key"]] = r
    return latest


# ------------------------------------------------------------------------------------------------
# predictions.csv / .jsonl
# ------------------------------------------------------------------------------------------------

def _csv_value(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)   # shortest round-trip form: the score to the last bit
    return str(v)


def write_predictions(out_dir: Path, records: list[dict]) -> tuple[Path, Path]:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in records:
        w.writerow([_csv_value(r[c]) for c in COLUMNS])
    csv_path = atomic_write_text(out_dir / CSV_NAME, buf.getvalue())
    jsonl = "".join(json.dumps({c: r[c] for c in COLUMNS}, allow_nan=False) + "\n" for r in records)
    return csv_path, atomic_write_text(out_dir / JSONL_NAME, jsonl)


# ------------------------------------------------------------------------------------------------
# raad predict
# ------------------------------------------------------------------------------------------------

def _prepare_out(out: Path, resume: bool, overwrite: bool, meta_now: dict) -> dict:
    """Check (and with ``overwrite`` clear) the output folder; returns the earlier meta when
    resuming."""
    meta_path = out / META
    has_parts = (out / PARTS).is_dir() and any((out / PARTS).glob("part-*.jsonl"))
    if overwrite:
        for name in (PARTS, OVERLAYS):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (META, CSV_NAME, JSONL_NAME):
            (out / name).unlink(missing_ok=True)
        return {}
    if not has_parts:
        return {}
    old = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if not resume:
        raise ValueError(f"{out} already holds predictions ({meta_path.name}, {PARTS}/): pass --resume "
                         f"to keep them and score only the images not done yet, or --overwrite to "
                         f"score everything again")
    for k, what in (("run_id", "another run (or the run was fitted again)"),
                    ("precision", "another --precision"),
                    ("threshold", "another threshold (`raad calibrate` changed it)")):
        if old and old.get(k) != meta_now[k]:
            raise ValueError(f"{out}: its predictions were made with {what}; --resume would mix them: "
                             f"use --overwrite, or another --out")
    return old


def predict(run_dir, inputs, out_dir, *, precision: str = "plan", batch: int = 8, device: str = "cpu",
            resume: bool = False, overwrite: bool = False, ray: str | None = None,
            workers: int | None = None, ray_cpus: float = 1, ray_gpus: float | None = None,
            show: bool = True) -> dict:
    """Score ``inputs`` (files and folders) with the run in ``run_dir`` into ``out_dir`` (see the
    module notes). ``ray``: None for this process, else a Ray address ("" or "local": a local
    Ray). Returns the summary that ``predict.json`` also holds."""
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    if precision not in ("plan", "fp32"):
        raise ValueError(f"--precision must be 'plan' or 'fp32', got {precision!r}")
    if not inputs:
        raise ValueError("give at least one image file or folder to predict")
    run = single_run(run_dir).resolve()
    config = read_config(run)
    plan = True if (run / PLAN).is_file() else None
    rec = threshold_for(run, config, precision, plan)
    out = Path(out_dir)
    sources, skipped = gather(inputs, exclude=[out])
    if not sources:
        raise FileNotFoundError(f"no images found in {', '.join(map(str, inputs))} (looked for the "
                                f"formats Pillow reads: .png, .jpg, .bmp, .tif, .webp, ...)")
    meta = {"run": str(run), "run_id": run_id(run), "precision": precision,
            "threshold_key": threshold_key(precision, plan), "threshold": rec, "batch": batch,
            "device": device, "inputs": [str(i) for i in inputs]}
    old = _prepare_out(out, resume, overwrite, meta)
    if old.get("batch") and old["batch"] != batch:
        # the chunks must hold the same images as before for the scores to be bitwise the same
        meta["batch"] = batch = int(old["batch"])
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / META, {**meta, "status": "running"})

    done = {}
    if resume:
        journal = read_parts(out)
        for s in sources:
            r = journal.get(s.key)
            if r and r["image"] == s.path and r["stat"] == _stat(s.abspath) \
                    and r["run_id"] == meta["run_id"] and r["precision"] == precision:
                done[s.key] = r
    specs = [{**asdict(s), "abspath": s.abspath} for s in sources]
    chunks = [specs[i:i + batch] for i in range(0, len(specs), batch)]
    todo = [c for c in chunks if any(s["key"] not in done for s in c)]
    n_todo = sum(len(c) for c in todo)
    kwargs = dict(run_dir=str(run), precision=precision, device=device, out_dir=str(out.resolve()),
                  rec=rec, rid=meta["run_id"])
    t0 = time.perf_counter()
    t_first = None   # when the first chunk came back: the start-up (model, workers) is before it
    new: dict[str, dict] = {}
    bar = tqdm(total=n_todo, desc="predicting", unit="img", disable=not show or not n_todo,
               dynamic_ncols=True)
    try:
        if ray is None:
            scorer = Scorer(**kwargs) if todo else None
            for c in todo:
                for r in scorer.score_chunk(c):
                    new[r["key"]] = r
                bar.update(len(c))
                t_first = t_first or (time.perf_counter(), len(new))
        else:
            from .scaleout import predict_chunks
            for recs in predict_chunks(todo, kwargs, address=ray, workers=workers, cpus=ray_cpus,
                                       gpus=ray_gpus, show=show):
                for r in recs:
                    new[r["key"]] = r
                bar.update(len(recs))
                t_first = t_first or (time.perf_counter(), len(new))
    finally:
        bar.close()
    t_end = time.perf_counter()
    seconds = t_end - t0
    # images/s once running: the chunks after the first over the time after it
    steady = (len(new) - t_first[1]) / (t_end - t_first[0]) if t_first and t_end > t_first[0] \
        and len(new) > t_first[1] else None
    records = [new.get(s.key) or done[s.key] for s in sources]
    csv_path, jsonl_path = write_predictions(out, records)
    errors = [(r["image"], r["error"]) for r in records if r["decision"] == "error"]
    scored = sum(1 for r in new.values() if r["decision"] != "error")
    summary = {"images": len(records),
               "pass": sum(r["decision"] == "pass" for r in records),
               "fail": sum(r["decision"] == "fail" for r in records),
               "error": len(errors), "errors": [{"image": p, "error": e} for p, e in errors],
               "skipped_not_images": skipped, "resumed": len(records) - len(new) if resume else 0,
               "scored_now": len(new), "seconds": round(seconds, 2),
               "images_per_s": round(scored / seconds, 3) if scored and seconds > 0 else None,
               "startup_s": None if t_first is None else round(t_first[0] - t0, 2),
               "images_per_s_running": None if steady is None else round(steady, 3),
               "workers": "this process" if ray is None else f"ray ({ray or 'local'})",
               "csv": str(csv_path), "jsonl": str(jsonl_path)}
    save_json(out / META, {**meta, "status": "done", "summary": summary})
    return summary


# ------------------------------------------------------------------------------------------------
# Calibration: the fit's hook and raad calibrate
# ------------------------------------------------------------------------------------------------

@torch.inference_mode()
def score_paths(det, paths, batch: int = 8, device: str = "cpu", show: bool = True,
                desc: str = "scoring normals") -> tuple[dict[str, float], list[tuple[str, str]]]:
    """Image scores of ``paths`` ({path: score}) and the unreadable ones ([(path, reason)])."""
    scores, bad = {}, []
    size = det.cfg.image_size
    paths = [str(p) for p in paths]
    for i in tqdm(range(0, len(paths), batch), desc=desc, disable=not show, leave=False):
        xs, ok = [], []
        for p in paths[i:i + batch]:
            try:
                xs.append(model_input(read_image(p), size))
                ok.append(p)
            except BadImage as e:
                bad.append((p, str(e)))
        if ok:
            s = T.image_scores(det(torch.stack(xs).to(device)).float(), T.score_sigma(det))
            scores.update(zip(ok, map(float, s)))
    return scores, bad


def calibrate_run(run_dir, paths, *, fpr: float | None = None, replace: bool = False,
                  source: str = "", train_dir=None, held_out=None, device: str = "cpu",
                  batch: int = 8, show: bool = True) -> dict:
    """Score the normal images ``paths`` with the run (each precision it has), pool them with
    the images its threshold rested on before (unless ``replace``), calibrate for ``fpr``
    (default: the stored target, else 1 %) and store the result in the run. ``train_dir`` and
    ``held_out`` (the fit's hook): the fit's training folder and the images it held out; later
    calls leave out the training images among ``paths``.

    Returns {"thresholds": {precision: record}, "previous": {precision: the old threshold's
    false-alarm rate on these images}, "bad": [(path, reason)], "left_out_training": n,
    "images": n}."""
    run = Path(run_dir)
    config = read_config(run)
    has_plan = (run / PLAN).is_file()
    cal = read_calibration(run)
    if replace:   # the scores go; what the fit trained on is still known
        cal = {k: v for k, v in cal.items() if k in ("train_dir", "held_out")}
    files = []
    seen = set()
    for p in paths:
        r = str(Path(p).resolve())
        if r not in seen:
            seen.add(r)
            files.append(r)
    left_out = 0
    if train_dir is not None:
        cal = {"train_dir": str(Path(train_dir).resolve()),
               "held_out": [str(Path(p).resolve()) for p in held_out or []], "sources": [],
               "scores": {}}
    elif cal.get("train_dir"):
        tdir, held = Path(cal["train_dir"]), set(cal.get("held_out", []))
        keep = [f for f in files if f in held or Path(f).parent != tdir]
        left_out = len(files) - len(keep)
        files = keep
    if not files:
        raise ValueError("no normal images to calibrate on"
                         + (f" ({left_out} given were the fit's training images, left out: the "
                            f"detector has seen them)" if left_out else ""))
    cal.setdefault("scores", {})
    cal.setdefault("sources", [])
    pools, previous, bad = {}, {}, []
    for prec in (["plan"] if has_plan else []) + ["fp32"]:
        det, _, _ = load_run(run, precision=prec)
        det.to(device)
        todo = [f for f in files if f not in {b for b, _ in bad}]
        scores, b = score_paths(det, todo, batch, device, show, desc=f"scoring normals ({prec})")
        bad += b
        if not scores:
            raise ValueError(f"none of the {len(files)} images could be read: "
                             + "; ".join(f"{p}: {e}" for p, e in bad[:5]))
        old = stored_threshold(config, prec, True if prec == "plan" else None)
        if old is not None:
            previous[prec] = {"threshold": old["threshold"],
                              **T.rates_at(list(scores.values()), [0] * len(scores), old["threshold"])}
        cal["scores"][prec] = pools[prec] = {**cal["scores"].get(prec, {}), **scores}
        if fpr is None:
            fpr = (old or {}).get("fpr_target", T.DEFAULT_FPR)
    cal["sources"].append({"source": source, "images": len(files) - len(bad)})
    what = "; ".join(f"{s['images']} {s['source']}" for s in cal["sources"])
    thresholds = {k: T.calibrate(list(pool.values()), fpr, source=what) for k, pool in pools.items()}
    save_threshold(run, thresholds, cal)
    return {"thresholds": thresholds, "previous": previous, "bad": bad, "left_out_training": left_out,
            "images": len(files) - len(bad)}


def calibrate_fit(run_dir, category_dir, opts, show: bool = True) -> dict:
    """The fit's hook: the threshold from the held-out normals (the same split as the fit's)."""
    from .train import holdout_split
    good = Path(category_dir) / "train" / D.GOOD
    cat = D.load_category(category_dir, check=False, need_test=False)
    _, held = holdout_split(list(cat.train), opts.holdout, good)
    res = calibrate_run(run_dir, held, fpr=getattr(opts, "fpr", None), replace=True,
                        source="held-out normals of the fit", train_dir=good, held_out=held,
                        device=opts.device, batch=opts.batch_size, show=show)
    return res["thresholds"]


def calibrate_folder(run_dir, folders, *, fpr=None, replace=False, device="cpu", batch=8,
                     show=True) -> dict:
    """`raad calibrate RUN FOLDER...`: every image under ``folders`` taken as normal."""
    run = single_run(run_dir)
    sources, _ = gather(folders)
    if not sources:
        raise FileNotFoundError(f"no images found in {', '.join(map(str, folders))}")
    names = ", ".join(str(f) for f in folders)
    return calibrate_run(run, [s.path for s in sources], fpr=fpr, replace=replace,
                         source=f"normal images from {names}", device=device, batch=batch, show=show)
