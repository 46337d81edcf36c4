"""Bit plans: which attention module runs at which bits (docs/design.md, "Plan file").

File format, version 1::

    {"version": 1, "avg_bits": 4.0,
     "layers": {"student.blocks.0.attn": {"qk_bits": 2, "pv_bits": 8, "score": 0.12}, ...},
     "linears": {"bits": 8, "under": ["student.blocks"]},
     "autocast": {"dtype": "bfloat16", "modules": ["teacher"]},
     "compile": {"modules": ["teacher"]},
     "timing": {"device": "cpu: ...", "threads": 2, "batch": 8, "unit": "ms",
                "layers": {"student.blocks.0.attn": {"8/8": 10.3, "4/8": 12.4, "16/16": 19.0}},
                "parts": {"teacher": {"fp32": 47.0, "bfloat16": 30.0}}, "rest": 80.0}}

``layers`` maps a module name (as ``model.named_modules()`` spells it) to its bits; ``score``
(HQS) and ``avg_bits`` are optional and carried along untouched. ``linears`` (optional) runs
every ``nn.Linear`` under the listed module-name prefixes (the whole model without ``under``)
as W8A8 :class:`~raad_kernels.linear.QuantLinear`; without it the linears stay float. ``qk_bits`` is 2, 4, 8, or 16
(float); ``pv_bits`` is 8 or 16; ``qk_bits=16`` needs ``pv_bits=16`` (16/16 = the float module).

:func:`quantize_model <raad_kernels.quantize_model>` also takes the plan in short forms, which
:func:`layer_bits` reads: a flat dict ``{name: bits}`` where ``bits`` is an int (``qk_bits``; P·V
then runs at 8, or 16 with 16), a ``(qk_bits, pv_bits)`` pair or a ``{"qk_bits", "pv_bits"}``
dict.

``autocast`` (optional) runs the ``forward`` of each listed module (exact names) under
``torch.autocast`` at ``dtype`` (``bfloat16`` or ``float16``), its outputs cast back to the inputs'
float dtype. ``compile`` (optional) runs each listed module's forward compiled by
``torch.compile`` with inductor's freezing, in inference (:mod:`raad_kernels.compiled`; where
compiling fails, eagerly). ``timing`` (optional) is what the plan was chosen from: milliseconds per batch of
each layer at each ``"qk_bits/pv_bits"`` setting, of other parts at each arithmetic, and of the
rest of a forward, measured on ``device`` (:mod:`raad_kernels.timing`); it is carried along and
never applied.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping

PLAN_VERSION = 1
MODULE_QK_BITS = (2, 4, 8, 16)
MODULE_PV_BITS = (8, 16)
TOP_KEYS = ("version", "avg_bits", "layers", "linears", "autocast", "compile", "timing")
LINEAR_KEYS = ("bits", "under")
LAYER_KEYS = ("qk_bits", "pv_bits", "score")
AUTOCAST_KEYS = ("dtype", "modules")
AUTOCAST_DTYPES = ("bfloat16", "float16")
COMPILE_KEYS = ("modules",)
TIMING_KEYS = ("device", "threads", "batch", "unit", "layers", "parts", "rest")


class PlanError(ValueError):
    """A plan that cannot be read or applied; the message names the source and the key."""


def _where(source) -> str:
    return f"plan {source}" if source else "plan"


def default_pv_bits(qk_bits: int) -> int:
    return 16 if qk_bits == 16 else 8


def check_bits(qk_bits, pv_bits, where: str = "") -> tuple[int, int]:
    """Validate one module's bits; returns them as ints. Raises :class:`PlanError`."""
    pre = f"{where}: " if where else ""
    for name, val, allowed in (("qk_bits", qk_bits, MODULE_QK_BITS), ("pv_bits", pv_bits, MODULE_PV_BITS)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise PlanError(f"{pre}{name} must be an int, one of {allowed}; got {val!r}")
        if val not in allowed:
            raise PlanError(f"{pre}{name} must be one of {allowed}, got {val}")
    if qk_bits == 16 and pv_bits != 16:
        raise PlanError(f"{pre}qk_bits=16 (float) needs pv_bits=16, got pv_bits={pv_bits}")
    return qk_bits, pv_bits


def parse_bits(spec, where: str = "") -> tuple[int, int]:
    """One module's bits from an int, a (qk, pv) pair or a {"qk_bits", "pv_bits"} dict."""
    pre = f"{where}: " if where else ""
    if isinstance(spec, Mapping):
        extra = sorted(set(spec) - set(LAYER_KEYS))
        if extra:
            raise PlanError(f"{pre}unknown key(s) {extra}; allowed: {list(LAYER_KEYS)}")
        if "qk_bits" not in spec:
            raise PlanError(f"{pre}missing 'qk_bits' (one of {MODULE_QK_BITS})")
        qk = spec["qk_bits"]
        pv = spec.get("pv_bits", default_pv_bits(qk) if isinstance(qk, int) else None)
        if "score" in spec:
            s = spec["score"]
            if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float))):
                raise PlanError(f"{pre}score must be a number or null, got {s!r}")
        return check_bits(qk, pv, where)
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise PlanError(f"{pre}a bits pair must be (qk_bits, pv_bits), got {spec!r}")
        return check_bits(spec[0], spec[1], where)
    if isinstance(spec, int) and not isinstance(spec, bool):
        return check_bits(spec, default_pv_bits(spec), where)
    raise PlanError(f"{pre}bits must be an int in {MODULE_QK_BITS}, a (qk_bits, pv_bits) pair or a "
                    f"{{'qk_bits', 'pv_bits'}} dict; got {spec!r}")


def validate(plan: Mapping, source=None) -> dict:
    """Check a plan dict in the file format; returns a normalised copy (ints as ints)."""
    where = _where(source)
    if not isinstance(plan, Mapping):
        raise PlanError(f"{where}: must be a JSON object with keys {list(TOP_KEYS)}, got {type(plan).__name__}")
    extra = sorted(set(plan) - set(TOP_KEYS))
    if extra:
        raise PlanError(f"{where}: unknown top-level key(s) {extra}; allowed: {list(TOP_KEYS)}")
    if "version" not in plan:
        raise PlanError(f"{where}: missing 'version' (expected {PLAN_VERSION})")
    if plan["version"] != PLAN_VERSION or isinstance(plan["version"], bool):
        raise PlanError(f"{where}: version must be {PLAN_VERSION}, got {plan['version']!r}")
    out: dict = {"version": PLAN_VERSION}
    if plan.get("avg_bits") is not None:
        ab = plan["avg_bits"]
        if isinstance(ab, bool) or not isinstance(ab, (int, float)) or not math.isfinite(ab) or ab <= 0:
            raise PlanError(f"{where}: avg_bits must be a positive number, got {ab!r}")
        out["avg_bits"] = float(ab)
    if "layers" not in plan:
        raise PlanError(f"{where}: missing 'layers' (an object: module name -> "
                        "{'qk_bits': ..., 'pv_bits': ..., 'score': ...})")
    layers = plan["layers"]
    if not isinstance(layers, Mapping):
        raise PlanError(f"{where}: 'layers' must be an object (module name -> bits), got {type(layers).__name__}")
    out["layers"] = {}
    for name, entry in layers.items():
        key = f"{where}: layers[{name!r}]"
        if not isinstance(name, str):
            raise PlanError(f"{key}: module names must be strings")
        if not isinstance(entry, Mapping):
            raise PlanError(f"{key} must be an object with keys {list(LAYER_KEYS)}, got {entry!r}")
        if "pv_bits" not in entry:
            raise PlanError(f"{key}: missing 'pv_bits' (one of {MODULE_PV_BITS})")
        qk, pv = parse_bits(entry, key)
        e = {"qk_bits": qk, "pv_bits": pv}
        if entry.get("score") is not None:
            e["score"] = float(entry["score"])
        out["layers"][name] = e
    if plan.get("linears") is not None:
        out["linears"] = validate_linears(plan["linears"], where)
    if plan.get("autocast") is not None:
        out["autocast"] = validate_autocast(plan["autocast"], where)
    if plan.get("compile") is not None:
        out["compile"] = validate_compile(plan["compile"], where)
    if plan.get("timing") is not None:
        out["timing"] = validate_timing(plan["timing"], where)
    return out


def validate_autocast(spec, where: str = "plan") -> dict:
    """The plan's ``autocast`` section: ``{"dtype": "bfloat16", "modules": [module names]}``."""
    key = f"{where}: autocast"
    _section(spec, key, AUTOCAST_KEYS, "an object {'dtype': 'bfloat16', 'modules': [...]}")
    if spec.get("dtype") not in AUTOCAST_DTYPES:
        raise PlanError(f"{key}: dtype must be one of {list(AUTOCAST_DTYPES)}, got {spec.get('dtype')!r}")
    return {"dtype": spec["dtype"], "modules": _names(spec.get("modules"), f"{key}: modules", "module names")}


def validate_compile(spec, where: str = "plan") -> dict:
    """The plan's ``compile`` section: ``{"modules": [module names]}``."""
    key = f"{where}: compile"
    _section(spec, key, COMPILE_KEYS, "an object {'modules': [...]}")
    return {"modules": _names(spec.get("modules"), f"{key}: modules", "module names")}


def _section(spec, key: str, allowed, shape: str) -> None:
    """A plan section must be an object with only the ``allowed`` keys."""
    if not isinstance(spec, Mapping):
        raise PlanError(f"{key} must be {shape}, got {spec!r}")
    extra = sorted(set(spec) - set(allowed))
    if extra:
        raise PlanError(f"{key}: unknown key(s) {extra}; allowed: {list(allowed)}")


def _names(value, key: str, what: str) -> list:
    """A list of strings (module names or prefixes)."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise PlanError(f"{key} must be a list of {what}, got {value!r}")
    return list(value)


def _ms(value, key: str, what: str = "a number of milliseconds >= 0") -> float:
    """A number of milliseconds: finite and >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise PlanError(f"{key} must be {what}, got {value!r}")
    return float(value)


def _ms_table(table, key: str) -> dict:
    """{setting: milliseconds} with positive finite numbers."""
    if not isinstance(table, Mapping) or not table:
        raise PlanError(f"{key} must be a non-empty object setting -> milliseconds, got {table!r}")
    return {str(setting): _ms(ms, f"{key}[{setting!r}]") for setting, ms in table.items()}


def validate_timing(spec, where: str = "plan") -> dict:
    """The plan's ``timing`` section (see the module notes); layer settings are ``"qk/pv"``
    with bits a module may run at."""
    key = f"{where}: timing"
    _section(spec, key, TIMING_KEYS, f"an object with keys {list(TIMING_KEYS)}")
    for k in ("device", "unit"):
        if not isinstance(spec.get(k), str) or not spec[k]:
            raise PlanError(f"{key}: {k!r} must be a non-empty string, got {spec.get(k)!r}")
    if spec["unit"] != "ms":
        raise PlanError(f"{key}: unit must be 'ms', got {spec['unit']!r}")
    for k in ("threads", "batch"):
        v = spec.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PlanError(f"{key}: {k!r} must be a positive int, got {v!r}")
    out = {k: spec[k] for k in ("device", "threads", "batch", "unit")}
    layers = spec.get("layers")
    if not isinstance(layers, Mapping):
        raise PlanError(f"{key}: 'layers' must be an object (module name -> {{'qk/pv': ms}}), got {layers!r}")
    out["layers"] = {}
    for name, table in layers.items():
        t = _ms_table(table, f"{key}: layers[{name!r}]")
        for setting in t:
            qk, _, pv = setting.partition("/")
            if not (qk.isdigit() and pv.isdigit()):
                raise PlanError(f"{key}: layers[{name!r}]: setting {setting!r} is not 'qk_bits/pv_bits'")
            check_bits(int(qk), int(pv), f"{key}: layers[{name!r}][{setting!r}]")
        out["layers"][name] = t
    parts = spec.get("parts") or {}
    if not isinstance(parts, Mapping):
        raise PlanError(f"{key}: 'parts' must be an object (part -> {{arithmetic: ms}}), got {parts!r}")
    out["parts"] = {name: _ms_table(t, f"{key}: parts[{name!r}]") for name, t in parts.items()}
    out["rest"] = _ms(spec.get("rest", 0.0), f"{key}: 'rest'", "milliseconds >= 0")
    return out


def validate_linears(spec, where: str = "plan") -> dict:
    """The plan's ``linears`` section: ``{"bits": 8, "under": [module-name prefixes]}``."""
    from .linear import LINEAR_BITS
    key = f"{where}: linears"
    _section(spec, key, LINEAR_KEYS, "an object {'bits': 8, 'under': [...]}")
    bits = spec.get("bits")
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in LINEAR_BITS:
        raise PlanError(f"{key}: bits must be one of {LINEAR_BITS}, got {bits!r}")
    out = {"bits": bits}
    if spec.get("under") is not None:
        out["under"] = _names(spec["under"], f"{key}: under", "module-name prefixes")
    return out


def is_file_format(plan) -> bool:
    return isinstance(plan, Mapping) and ("layers" in plan or "version" in plan)


def load_plan(source) -> dict:
    """Read and validate a plan: a path to a JSON file, or a dict (file format or the flat
    ``{name: bits}`` form). Returns the file-format dict."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"plan file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise PlanError(f"plan {path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        return validate(data, path)
    if is_file_format(source):
        return validate(source)
    if isinstance(source, Mapping):
        layers = {}
        for name, spec in source.items():
            if not isinstance(name, str):
                raise PlanError(f"plan: module names must be strings, got {name!r}")
            qk, pv = parse_bits(spec, f"plan[{name!r}]")
            layers[name] = {"qk_bits": qk, "pv_bits": pv}
            if isinstance(spec, Mapping) and spec.get("score") is not None:
                layers[name]["score"] = float(spec["score"])
        return {"version": PLAN_VERSION, "layers": layers}
    raise TypeError(f"a plan must be a path to a JSON file or a dict, got {type(source).__name__}")


def layer_bits(source) -> dict[str, tuple[int, int]]:
    """``{module name: (qk_bits, pv_bits)}`` from any plan :func:`load_plan` reads."""
    return {n: (e["qk_bits"], e["pv_bits"]) for n, e in load_plan(source)["layers"].items()}


def save_plan(plan, path, *, avg_bits: float | None = None) -> str:
    """Write a plan (file-format dict, flat dict, or a model/report with ``raad_report``) as
    JSON, atomically (temporary file in the same folder, then ``os.replace``). Returns the path."""
    report = getattr(plan, "raad_report", plan)
    if hasattr(report, "plan") and callable(report.plan):
        plan = report.plan()
    data = load_plan(plan)
    if avg_bits is not None:
        data["avg_bits"] = float(avg_bits)
    data = validate({k: data[k] for k in TOP_KEYS if k in data})
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".plan-", suffix=".json.tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def named_modules(model, names: Iterable[str], where: str) -> dict:
    """{name: module} for each of ``names`` (exact module names of ``model``, "" for the model);
    every missing one refused at once, with the nearest names (``where`` starts the message)."""
    all_names = dict(model.named_modules())
    missing = [n for n in names if n not in all_names]
    if missing:
        raise PlanError("\n".join(f"{where}: names module {n!r}, which the model does not have; nearest "
                                  f"names: {', '.join(nearest_names(n, all_names)) or '(none)'}" for n in missing))
    return {n: all_names[n] for n in names}


def nearest_names(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Closest module names to ``name`` (difflib), for error messages."""
    cands = list(candidates)
    close = difflib.get_close_matches(name, cands, n=n, cutoff=0.5)
    if not close:
        close = difflib.get_close_matches(name, cands, n=n, cutoff=0.0)
    return close


def unknown_name_error(name: str, attention_names: Iterable[str], all_names: Iterable[str], source=None) -> PlanError:
    att = list(attention_names)
    near = nearest_names(name, att) or nearest_names(name, all_names)
    hint = ", ".join(near) if near else "(the model has no attention module this package can swap)"
    return PlanError(f"{_where(source)}: names module {name!r}, which the model does not have; "
                     f"nearest names: {hint}")
