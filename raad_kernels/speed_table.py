"""The measured speed table behind ``backend="auto"`` on CUDA devices (``gpu_speed.json``).

Format 1::

    {"format": 1,
     "devices": {"sm_90": {"device": "NVIDIA H200", "date": "...", "source": "...",
                           "tests_passed": ["cuda", "triton"],
                           "classes": [{"max_tokens": 1025, "head_dim": 64,
                                        "ms": {"cuda": 0.059, "triton": 0.41}}, ...]}}}

A class holds calls with ``max(Nq, Nk) <= max_tokens`` (``null``: any length above the
classes below it) and a head dim of at most ``head_dim`` (64, 128 or 256). ``ms``: the
measured time per call of each backend on that class (int8/int8, the geometric mean over the
benchmark's shapes in the class). A backend may appear only if it is in ``tests_passed`` (its
GPU tests passed on the run that measured it). ``benchmarks/bench_gpu.py --speed-table``
writes this file.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch

#: Where the table ships (package data, see pyproject.toml). Tests point it elsewhere.
TABLE_PATH = Path(__file__).with_name("gpu_speed.json")
FORMAT = 1
#: Token-count classes (max(Nq, Nk) at most this; None: longer) and head-dim classes.
TOKEN_CLASSES = (1025, 4097, None)
HEAD_DIM_CLASSES = (64, 128, 256)
TABLE_BACKENDS = ("cuda", "triton")


class SpeedTableError(ValueError):
    pass


def shape_class(n_tokens: int, head_dim: int) -> tuple:
    """(max_tokens, head_dim) of the class a call falls in."""
    t = next((c for c in TOKEN_CLASSES if c is None or n_tokens <= c), None)
    d = next((c for c in HEAD_DIM_CLASSES if head_dim <= c), HEAD_DIM_CLASSES[-1])
    return t, d


def validate(data, where: str = "gpu_speed.json") -> dict:
    """Check a parsed table; raise SpeedTableError naming the file and the key at fault."""
    def fail(key, msg):
        raise SpeedTableError(f"{where}: {key}: {msg}")
    if not isinstance(data, dict):
        fail("(top level)", "must be a JSON object")
    if data.get("format") != FORMAT:
        fail("format", f"must be {FORMAT}, got {data.get('format')!r}")
    devices = data.get("devices")
    if not isinstance(devices, dict):
        fail("devices", "must be an object keyed by 'sm_XY'")
    for name, entry in devices.items():
        at = f"devices[{name!r}]"
        if not (isinstance(name, str) and name.startswith("sm_") and name[3:].isdigit()):
            fail(at, "device keys are 'sm_' and the compute capability's digits, e.g. 'sm_90'")
        if not isinstance(entry, dict):
            fail(at, "must be an object")
        passed = entry.get("tests_passed")
        if not isinstance(passed, list) or any(b not in TABLE_BACKENDS for b in passed):
            fail(f"{at}.tests_passed", f"must be a list of backends among {TABLE_BACKENDS}")
        classes = entry.get("classes")
        if not isinstance(classes, list):
            fail(f"{at}.classes", "must be a list")
        seen = set()
        for i, c in enumerate(classes):
            cat = f"{at}.classes[{i}]"
            if not isinstance(c, dict):
                fail(cat, "must be an object")
            if c.get("max_tokens") not in TOKEN_CLASSES:
                fail(f"{cat}.max_tokens", f"must be one of {TOKEN_CLASSES} (null: longer)")
            if c.get("head_dim") not in HEAD_DIM_CLASSES:
                fail(f"{cat}.head_dim", f"must be one of {HEAD_DIM_CLASSES}")
            key = (c["max_tokens"], c["head_dim"])
            if key in seen:
                fail(cat, f"class {key} appears twice")
            seen.add(key)
            ms = c.get("ms")
            if not isinstance(ms, dict) or not ms:
                fail(f"{cat}.ms", "must be a non-empty object backend → milliseconds")
            for b, t in ms.items():
                if b not in passed:
                    fail(f"{cat}.ms[{b!r}]", f"backend {b!r} is not in tests_passed {passed}: only "
                         "backends whose GPU tests passed on the measuring run may enter")
                if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
                    fail(f"{cat}.ms[{b!r}]", f"must be a positive number of milliseconds, got {t!r}")
    return data


@functools.lru_cache(maxsize=None)
def _load(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        return {}
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SpeedTableError(f"{p}: not valid JSON: {e}") from None
    validate(data, str(p))
    return {name: {(c["max_tokens"], c["head_dim"]): c["ms"] for c in e["classes"]}
            for name, e in data["devices"].items()}


def table() -> dict:
    """device key → {(max_tokens, head_dim): {backend: ms}} of the shipped table (validated once)."""
    return _load(str(TABLE_PATH))


@functools.lru_cache(maxsize=None)
def _device_key(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def device_key(device: torch.device) -> str:
    return _device_key(device.index if device.index is not None else torch.cuda.current_device())


def has_device(device: torch.device) -> bool:
    return bool(table().get(device_key(device)))


def ranking(device: torch.device, n_tokens: int, head_dim: int):
    """Backends of the table's class for this call, fastest first; None without an entry."""
    ms = table().get(device_key(device), {}).get(shape_class(n_tokens, head_dim))
    if not ms:
        return None
    return tuple(sorted(ms, key=ms.get))
