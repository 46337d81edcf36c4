"""Run folders: weights (safetensors), config.json, plan.json, written atomically; refused with a
clear message when they are from another format version or damaged.

The decision threshold (``raad fit`` calibrates it on the held-out normals, ``raad calibrate``
refines it; see :mod:`raad.threshold`) is config.json's ``threshold`` section, one record per
precision ("plan", "fp32"), and calibration.json keeps the normal images' scores it rests on.
Both are optional: a run fitted before thresholds existed loads as before, and `raad predict`
asks for `raad calibrate RUN FOLDER` (:func:`threshold_for`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .io import atomic_path, atomic_write_text

RUN_FORMAT = "raad-run"
RUN_VERSION = 10  # 2: stride-8 student, block-4 targets, normalised stem input (s_mean, s_std);
#                 3: per-position autoencoder map normalisation (ae_pos); 4: student border ring (st_pos);
#                 5: fine-feature memory (memory.*, config memory / memory_size / memory_radius);
#                 6: pose normalisation (config align); 7: config autoencoder (on | off | auto)
#                 replaces use_ae; 8: memory line cells (memory.lines_*, searched without place
#                 channels), every representation whitened (memory.*_white replaces memory.*_std);
#                 9: config score_sigma (the image score blurs the map first); 8 is still read,
#                 as score_sigma 0 (the plain maximum it was fitted and calibrated with);
#                 10: config memory_region (memory.region_*); 8 and 9 are read as memory_region 0
READ_VERSIONS = (8, 9, 10)
WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
PLAN = "plan.json"
CALIBRATION = "calibration.json"


class RunError(ValueError):
    """A run folder that cannot be used; the message names the file and what is wrong."""


def save_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def save_run(run_dir, detector, *, fit: dict, plan: dict | None, extra: dict | None = None) -> Path:
    """Write weights, config and plan. Each file is replaced atomically; config.json goes last,
    so a folder whose config exists has all its files."""
    from safetensors.torch import save_file
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in detector.trainable_state_dict().items()}
    with atomic_path(run / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    if plan is not None:
        save_json(run / PLAN, plan)
    elif (run / PLAN).exists():
        os.remove(run / PLAN)
    config = {"format": RUN_FORMAT, "version": RUN_VERSION, "model": detector.cfg.to_dict(), "fit": fit}
    config.update(extra or {})
    save_json(run / CONFIG, config)
    return run


def read_config(run_dir) -> dict:
    run = Path(run_dir)
    if not run.is_dir():
        raise RunError(f"run folder {run} does not exist (create one with `raad fit DATA_DIR --out {run}`)")
    path = run / CONFIG
    if not path.is_file():
        raise RunError(f"{path}: missing: {run} is not a finished run folder (was `raad fit` interrupted?)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: damaged, not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != RUN_FORMAT:
        raise RunError(f"{path}: not a RAAD run config (format {config.get('format') if isinstance(config, dict) else None!r})")
    if config.get("version") not in READ_VERSIONS:
        raise RunError(f"{path}: run format version {config.get('version')!r}; this raad reads versions "
                       f"{', '.join(map(str, READ_VERSIONS))}. Fit the model again with this version.")
    if config["version"] == 8 and isinstance(config.get("model"), dict):
        config["model"].setdefault("score_sigma", 0.0)
    if config["version"] in (8, 9) and isinstance(config.get("model"), dict):
        config["model"].setdefault("memory_region", 0)
    return config


def load_run(run_dir, *, precision: str = "plan", backend: str = "auto"):
    """Rebuild the detector of a run folder. ``precision``: "plan" applies plan.json (when the
    run has one), "fp32" keeps every attention in float. Returns (detector, config, plan)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    import raad_kernels as rk

    from .model import Detector, ModelConfig

    if precision not in ("plan", "fp32"):
        raise ValueError(f"--precision must be 'plan' or 'fp32', got {precision!r}")
    run = Path(run_dir)
    config = read_config(run)
    try:
        cfg = ModelConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise RunError(f"{run / CONFIG}: bad 'model' section: {e}") from None
    det = Detector(cfg)
    wpath = run / WEIGHTS
    if not wpath.is_file():
        raise RunError(f"{wpath}: missing")
    try:
        state = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise RunError(f"{wpath}: damaged weights file ({e})") from None
    expected = det.trainable_state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise RunError(f"{wpath}: does not match the model in {CONFIG}: missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise RunError(f"{wpath}: tensor {k} has shape {tuple(v.shape)}, the model wants {tuple(expected[k].shape)}")
    det.load_state_dict(state, strict=False)
    det.eval()
    plan = None
    ppath = run / PLAN
    if ppath.is_file():
        try:
            plan = rk.load_plan(ppath)
        except ValueError as e:
            raise RunError(str(e)) from None
    if precision == "plan" and plan is not None:
        rk.quantize_model(det, plan, backend=backend)
        if det.memory is not None:   # the plan runs the memory's fine search at int8 too
            det.memory.int8 = True
    return det, config, plan


def threshold_key(precision: str, plan) -> str:
    """Which stored threshold a model loaded at ``precision`` uses: "plan" when the plan is
    applied, else "fp32" (a run without a plan runs float either way)."""
    return "plan" if precision == "plan" and plan is not None else "fp32"


def stored_threshold(config: dict, precision: str, plan) -> dict | None:
    """The run's threshold record for ``precision`` (see :func:`threshold_key`), or None."""
    rec = (config.get("threshold") or {}).get(threshold_key(precision, plan))
    return rec if isinstance(rec, dict) and "threshold" in rec else None


def threshold_for(run_dir, config: dict, precision: str, plan) -> dict:
    """:func:`stored_threshold`, or a :class:`RunError` that says how to get one."""
    rec = stored_threshold(config, precision, plan)
    if rec is None:
        run = Path(run_dir)
        raise RunError(f"{run / CONFIG}: no decision threshold for precision "
                       f"{threshold_key(precision, plan)!r} (the run was fitted before `raad fit` "
                       f"calibrated one): run `raad calibrate {run} FOLDER` with a folder of normal "
                       f"images the detector was not trained on")
    return rec


def read_calibration(run_dir) -> dict:
    """calibration.json of a run ({} when it has none)."""
    path = Path(run_dir) / CALIBRATION
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: damaged, not valid JSON ({e})") from None


def save_threshold(run_dir, thresholds: dict, calibration: dict) -> None:
    """Store ``thresholds`` ({precision: record}) in config.json and the ``calibration`` it rests
    on in calibration.json, each atomically (calibration.json first)."""
    run = Path(run_dir)
    config = read_config(run)
    save_json(run / CALIBRATION, calibration)
    config["threshold"] = thresholds
    save_json(run / CONFIG, config)
