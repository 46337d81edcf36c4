"""`raad score` and `raad bench`: anomaly maps and metrics for a fitted run; speed of the plan
against the same model with float attention."""

from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import data as D
from . import metrics as M
from . import threshold as T
from . import viz
from .checkpoint import load_run, read_config, save_json, stored_threshold
from .graphs import Graphed, graphed
from .io import atomic_save_npz


def run_categories(run_dir) -> list[Path]:
    """A run folder holds one fitted category, or one sub-folder per category."""
    run = Path(run_dir)
    if (run / "config.json").is_file():
        return [run]
    subs = sorted(p for p in run.iterdir() if (p / "config.json").is_file()) if run.is_dir() else []
    if not subs:
        read_config(run)  # raises the clear error (missing folder / not a run)
    return subs


def category_for(run: Path, data_dir, cat_dirs: dict, single_run: bool = True) -> Path:
    """The folder of ``data_dir`` holding the category ``run`` was fitted on; a data folder with
    a single category stands for it when there is a single run."""
    name = read_config(run).get("summary", {}).get("category", run.name)
    if name in cat_dirs:
        return cat_dirs[name]
    if len(cat_dirs) == 1 and single_run:
        only = next(iter(cat_dirs.values()))
        warnings.warn(f"the run {run} was fitted on category {name!r}; scoring the one category folder "
                      f"given, {only.name!r} ({only}): right for a new batch of the same product, "
                      f"meaningless for another product", stacklevel=2)
        return only
    raise D.DataError([(Path(data_dir), f"has no category {name!r} (the run {run} was fitted on it); "
                                        f"found: {sorted(cat_dirs)}")])


@torch.no_grad()
def anomaly_maps(det, items, size, batch=8, show=True, scores: list | None = None, device="cpu"):
    """Maps at each item's mask resolution (its image's size), in item order. ``scores``: a list
    to which each item's image score at the model's resolution (what the decision threshold is
    calibrated on, :func:`raad.threshold.image_scores`) is appended."""
    out = []
    for i in tqdm(range(0, len(items), batch), desc="scoring", disable=not show, leave=False):
        chunk = items[i:i + batch]
        x = torch.stack([D.load_image(it.path, size) for it in chunk]).to(device)
        full = det(x).float().cpu()  # at model resolution; resized per item below
        if scores is not None:
            scores.extend(T.image_scores(full, T.score_sigma(det)).tolist())
        for it, m in zip(chunk, full):
            h, w = D.image_size(it.path)
            if (h, w) != tuple(m.shape):
                m = torch.nn.functional.interpolate(m[None, None], size=(h, w), mode="bilinear",
                                                    align_corners=False)[0, 0]
            out.append(m.numpy().astype(np.float32))
    return out


def evaluate(det, category, show=True, scores: list | None = None, device="cpu"):
    """(metrics dict, items, maps, masks) of ``det`` on a validated category's test set
    (``scores``: see :func:`anomaly_maps`)."""
    items = list(category.test)
    scores = [] if scores is None else scores
    maps = anomaly_maps(det, items, det.cfg.image_size, show=show, scores=scores, device=device)
    masks = [D.load_test_mask(it) for it in items]
    return (M.compute_metrics([it.defect for it in items], scores=scores, maps=maps, masks=masks),
            items, maps, masks)


def score_category(run_dir, category_dir, out_dir, precision="plan", backend="auto", overlays=True,
                   show=True, device="cpu") -> dict:
    det, config, plan = load_run(run_dir, precision=precision, backend=backend)
    # on a GPU, the forward replayed from CUDA graphs (raad.graphs)
    det = graphed(det.to(device), device)
    scores: list = []
    result, items, maps, masks = evaluate(det, D.validate(category_dir), show=show, scores=scores,
                                          device=device)
    if getattr(det, "fallback", None):
        result["cuda_graph"] = f"not used: {det.fallback}"
    result["precision"] = precision
    result["plan"] = None if precision == "fp32" or plan is None else plan
    rec = stored_threshold(config, precision, plan)
    result["decision"] = decision_metrics(scores, [it.label for it in items], rec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_npz(out / "maps.npz", {it.key: m for it, m in zip(items, maps)})
    save_json(out / "metrics.json", result)
    if overlays:
        write_overlays(out, items, maps, masks, show=show, threshold=rec, scores=scores,
                       sigma=T.score_sigma(det) / det.cfg.image_size)
    return result


def decision_metrics(scores, labels, rec: dict | None) -> dict:
    """The decision at the run's stored threshold on a labelled set (false-alarm and miss rates,
    with counts and 95 % intervals) and the F1-optimal threshold; image scores at the model's
    resolution, as the threshold was calibrated."""
    best = T.f1_optimal(scores, labels)
    if best is not None and rec is not None:
        best["normalized"] = T.normalize(best["threshold"], rec)
    return {"image_score": "the anomaly map's maximum at the model's resolution, after a blur of "
                           "the model's score_sigma",
            "stored": None if rec is None else {k: rec[k] for k in
                                                ("threshold", "fpr_target", "method", "n_images",
                                                 "fpr_interval", "source")},
            "at_stored": None if rec is None else T.rates_at(scores, labels, rec["threshold"]),
            "f1_optimal": best}


def write_overlays(out: Path, items, maps, masks, show=True, threshold: dict | None = None,
                   scores=None, sigma: float = 0.0):
    """One heatmap overlay per test image and a report page. With the run's ``threshold``
    record: the image beside its map coloured on the calibrated scale (the threshold at the
    colour map's middle, :func:`raad.viz.prediction_panel`), at the image's own resolution (at
    least 256 px), blurred as the image score is (``sigma``: the score's blur as a share of the
    map's height) so that what it marks at or above the threshold is what decided. Without (a
    run fitted before thresholds): one colour range shared by the set (the normal images'
    median up to the overall maximum)."""
    if threshold is None:
        good = [m for it, m in zip(items, maps) if it.label == 0]
        vmin = float(np.percentile(np.concatenate([m.ravel() for m in good]), 50)) if good else 0.0
        vmax = float(max(m.max() for m in maps))
    entries = []
    for i, (it, m, mk) in enumerate(tqdm(list(zip(items, maps, masks)), desc="overlays",
                                         disable=not show, leave=False)):
        path = out / "overlays" / it.key.replace("/", "__").rsplit(".", 1)[0]
        path = path.with_suffix(".png")
        image = D.open_rgb(it.path)
        s = scores[i] if scores is not None else float(m.max())
        if threshold is None:
            viz.save_overlay(path, image, m, mk if it.label else None, vmin=vmin, vmax=vmax)
        else:
            title = f"{T.decide(s, threshold).upper()}  score {s:.4g} ({T.normalize(s, threshold):.3f})  {it.key}"
            shown = T.score_maps(m[None], sigma * m.shape[0])[0].numpy() if sigma > 0 else m
            viz.save_prediction_panel(path, image, shown, threshold["threshold"], threshold["min"],
                                      threshold["max"], mk if it.label else None, title=title)
        entries.append(viz.ReportEntry(path, it.key, s, it.defect))
    viz.write_report(out, entries, title=f"RAAD anomaly maps: {items[0].path.parents[2].name if items else ''}")


def score(run_dir, data_dir, out_dir, precision="plan", backend="auto", show=True, device="cpu") -> dict:
    """Score every fitted category of ``run_dir`` on its test set in ``data_dir``."""
    runs = run_categories(run_dir)
    cat_dirs = {p.name: p for p in D.category_dirs(data_dir)}
    results = {}
    for run in runs:
        cat = category_for(run, data_dir, cat_dirs, single_run=len(runs) == 1)
        sub = Path(out_dir) / cat.name if len(runs) > 1 else Path(out_dir)
        results[cat.name] = score_category(run, cat, sub, precision, backend, show=show, device=device)
    if len(results) > 1:
        summary = {"mean": M.mean_metrics(results), "categories": {k: {kk: v[kk] for kk in
                   ("image_auroc", "pixel_auroc", "aupro", "f1_max")} for k, v in results.items()}}
        save_json(Path(out_dir) / "metrics.json", summary)
    return results


# ----------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------

def _warm_up(variants: dict, x):
    for det in variants.values():
        det(x)


def _sync(x: torch.Tensor) -> None:
    """Wait for the GPU's queued work (its kernels run asynchronously; a CPU clock read after a
    launch alone would time the launch)."""
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def _wall(det, x) -> float:
    """Seconds of one forward of ``det`` on ``x``, queued GPU work included."""
    _sync(x)
    t0 = time.perf_counter()
    det(x)
    _sync(x)
    return time.perf_counter() - t0


def _timed(det, x) -> float:   # the headline rounds' clock (tests replace it)
    return _wall(det, x)


#: the detector's modules whose time `raad bench` reports apart (forward hooks); the rest of a
#: forward is the teacher, pose normalisation and the maps' combination, resizing and smoothing
PARTS = {"student": "student", "autoencoder": "ae", "memory": "memory"}


def _part_times(det, x, rounds: int) -> dict:
    """Median seconds per forward of ``det`` on ``x`` in each of :data:`PARTS` (the ones it has),
    and in the rest, over ``rounds`` forwards timed with forward hooks (kept apart from the
    headline rounds, whose clock they would touch)."""
    spent: dict = {}
    hooks = []
    for name, attr in PARTS.items():
        mod = getattr(det, attr, None)
        if mod is None:
            continue

        def start(m, args, name=name):
            _sync(x)
            spent[name] = spent.get(name, 0.0) - time.perf_counter()

        def stop(m, args, out, name=name):
            _sync(x)
            spent[name] += time.perf_counter()
        hooks += [mod.register_forward_pre_hook(start), mod.register_forward_hook(stop)]
    rows = []
    try:
        for _ in range(rounds):
            spent.clear()
            total = _wall(det, x)
            rows.append({**spent, "rest": total - sum(spent.values())})
    finally:
        for h in hooks:
            h.remove()
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


#: printed by `raad bench` and `raad demo` where the CPU has no int8 dot-product instruction
NO_INT8_DOT_NOTE = ("this CPU has no int8 dot-product instruction (AVX-512 VNNI or AMX): its int8 "
                    "arithmetic is no faster than fp32 FMAs, so the plan cannot beat fp32 here; it "
                    "pays on CPUs with VNNI and on GPUs")


def cpu_int8_dot(device) -> bool | None:
    """Whether ``device`` is a CPU with an int8 dot-product instruction the kernels use (AVX-512
    VNNI or AMX); None for other devices or without the CPU extension."""
    from raad_kernels.linear import cpu_int8_dot as has_int8_dot
    return has_int8_dot() if torch.device(device).type == "cpu" else None


def bench(run_dir, device="cpu", batch=8, repeats=30, backend="auto", data_dir=None, peers=(),
          graph: bool | None = None) -> dict:
    """Images/s of the run's model in fp32 and with its plan, timed alternately in one process on
    the same images (median of ``repeats`` batches each); ``speedup`` is the median over the
    rounds of fp32 time / plan time (each round times every variant once, back to back), and
    ``speedup_p10_p90`` the 10th and 90th percentiles of those ratios; ``parts_ms``: for fp32 and
    the plan, the milliseconds per batch spent in the student, the autoencoder and the memory, and
    in the rest (teacher, pose, the maps' post-processing), from separate rounds. When
    the plan also runs linears at int8 or parts in bf16, the plan's attention alone (everything
    else, the memory's search included, fp32) is timed in the same loop, so the share of each
    part of the plan is visible (``attention_only_images_per_s``).

    ``data_dir``: a category folder (or a folder of them) whose first ``batch`` test images are
    used; without it, a fixed batch of Gaussian-noise images (attention on noise is flatter than
    on real images, which matters to the kernels' zero skipping).

    ``peers`` (names from :data:`raad.peers.PEERS`): what a user would deploy instead, built from
    the same run and timed in the same rounds; for every variant, ``deviation`` is the largest
    difference of its maps from fp32's on the timed batch relative to fp32's largest value, and
    with ``data_dir`` every variant is scored on the category's test set (``detection``).
    ``plan_timing``: what the plan's own timing table (measured at fit time) predicted for a
    batch, or why it cannot be compared here (measured on another device or thread count).

    ``graph`` (default: on a GPU): the headline rounds replay each torch variant's forward from
    CUDA graphs (:mod:`raad.graphs`), so they compare kernels, not Python; ``cuda_graph`` says
    which variants were captured and why any was not."""
    from raad_kernels.allocator import keep_freed_memory
    allocator = keep_freed_memory()   # every variant in this process alike
    run = run_categories(run_dir)[0]
    fp32, _, _ = load_run(run, precision="fp32")
    quant, _, plan = load_run(run, precision="plan", backend=backend)
    if plan is None:
        raise ValueError(f"{run}: this run has no plan (fitted with --avg-bits 16): nothing to compare")
    variants = {"fp32": fp32, "plan": quant}
    if plan.get("linears") or plan.get("autocast"):
        attn_only, _, _ = load_run(run, precision="fp32")
        import raad_kernels as rk
        rk.quantize_model(attn_only, {"version": 1, "layers": plan["layers"]}, backend=backend)
        variants["attention_only"] = attn_only
    for det in variants.values():
        det.to(device)
    size = fp32.cfg.image_size
    if data_dir is not None:
        cat = category_for(run, data_dir, {p.name: p for p in D.category_dirs(data_dir)})
        items = list(D.validate(cat).test)[:batch]
        x = torch.stack([D.load_image(it.path, size) for it in items])
        source = f"{len(items)} test images of {cat.name}"
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, size, size, generator=g)
        source = "Gaussian noise"
    x = x.to(device)
    n = len(x)
    if peers:
        from . import peers as P
        calib = None
        if data_dir is not None:
            from .train import load_images
            calib = load_images(list(D.validate(cat).train)[:32], size, show=False)
        variants.update(P.build(fp32, list(peers), x.cpu(), calib, device))
    graph = torch.device(device).type == "cuda" if graph is None else graph
    runners = {k: (Graphed(det) if graph and k != "compile" and not k.startswith("openvino") else det)
               for k, det in variants.items()}
    times = {k: [] for k in variants}
    with torch.inference_mode():
        _warm_up(runners, x)
        for _ in range(repeats):  # alternate, so drift in machine load hits all alike
            for k, det in runners.items():
                times[k].append(_timed(det, x))
        parts = {k: _part_times(variants[k], x, max(3, repeats // 3)) for k in ("fp32", "plan")}
    ips = {k: n / statistics.median(t) for k, t in times.items()}

    def ratios(k):  # per-round ratios of neighbouring runs: load that drifts cancels out
        return [f / q for f, q in zip(times["fp32"], times[k])]

    def paired(k):
        return round(statistics.median(ratios(k)), 3)
    # a shared host's load moves the ratio itself: the spread over the rounds shows it
    spread = [round(float(v), 3) for v in np.percentile(ratios("plan"), [10, 90])]
    out = {"fp32_images_per_s": round(ips["fp32"], 3), "plan_images_per_s": round(ips["plan"], 3),
           "speedup": paired("plan"), "speedup_p10_p90": spread}
    if "attention_only" in ips:
        out["attention_only_images_per_s"] = round(ips["attention_only"], 3)
        out["attention_only_speedup"] = paired("attention_only")
    if peers:
        out["peers"] = {k: {"images_per_s": round(ips[k], 3), "speedup": paired(k)} for k in peers}
        out["plan_vs_peers"] = {k: round(statistics.median(
            [p / q for p, q in zip(times[k], times["plan"])]), 3) for k in peers}
    with torch.inference_mode():
        ref = fp32(x)
        out["deviation"] = {k: float((det(x).float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
                            for k, det in variants.items() if k != "fp32"}
    if data_dir is not None:
        test = D.validate(cat)
        out["detection"] = {k: {m: v for m, v in evaluate(det, test, show=False, device=device)[0].items()
                                if m in ("image_auroc", "aupro")} for k, det in runners.items()}
    if graph:
        out["cuda_graph"] = {k: (r.fallback and f"not used: {r.fallback}") or "captured"
                             for k, r in runners.items() if isinstance(r, Graphed)}
    out["plan_timing"] = plan_timing(plan, device, statistics.median(times["plan"]) * 1e3, n)
    out.update({"batch": n, "repeats": repeats, "device": device, "cpu_int8_dot": cpu_int8_dot(device),
                "threads": torch.get_num_threads(), "image_size": size, "images": source, "allocator": allocator,
                "plan_bits": {n_: e["qk_bits"] for n_, e in plan["layers"].items()},
                "plan_linears": plan.get("linears"),
                "parts_ms": {k: {p: round(1e3 * v, 3) for p, v in d.items()} for k, d in parts.items()}})
    return out


def plan_timing(plan: dict, device, measured_ms: float, batch: int) -> dict:
    """The plan's timing table against this bench: its prediction for a batch beside what was
    measured, or why the table does not hold here."""
    from raad_kernels import timing as TM
    table = plan.get("timing")
    if not table:
        return {"status": "none", "note": "the plan was chosen by bits (--avg-bits): it has no timings"}
    try:
        TM.check_device(table, device)
    except TM.TimingError as e:
        return {"status": "other device", "note": str(e)}
    if table["batch"] != batch:
        return {"status": "other batch", "note": f"the plan's timings are for batches of {table['batch']}, "
                                                 f"this bench ran {batch}"}
    predicted = table["rest"] + sum(table["layers"][n][f"{e['qk_bits']}/{e['pv_bits']}"]
                                    for n, e in plan["layers"].items() if n in table["layers"])
    return {"status": "same device", "predicted_ms": round(predicted, 3), "measured_ms": round(measured_ms, 3)}
