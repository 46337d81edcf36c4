"""Measured speed of each attention layer at each setting, on the device a model will run on.

Bits are a proxy for speed that holds on some hardware and not on others (a CPU runs int4
Q·Kᵀ on the same int8 dot-product instructions as int8, plus unpacking; sm_86 runs int4
``mma`` at twice the int8 rate; Hopper has no int4 ``mma``). A plan chosen for speed is chosen
from times measured where the model will run: :func:`time_layers` captures each attention
module's real inputs from one forward of the model, then times the module alone at every setting,
round-robin (every setting once per round, so drift in the machine's load hits all alike), and
keeps the median. The table names the device (:func:`device_name`); :func:`check_device`
refuses to use one measured elsewhere.
"""

from __future__ import annotations

import functools
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

#: the settings a layer is timed at by default: Q·Kᵀ bits / P·V bits ("16/16" = float)
SETTINGS = ("2/8", "4/8", "8/8", "16/16")


class TimingError(ValueError):
    """A timing table that cannot be used here (measured on another device, or malformed)."""


def setting(qk_bits: int, pv_bits: int) -> str:
    return f"{qk_bits}/{pv_bits}"


def parse_setting(s: str) -> tuple[int, int]:
    qk, _, pv = s.partition("/")
    return int(qk), int(pv)


@functools.lru_cache(maxsize=None)
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_isa() -> str:
    try:
        from ._cpu import capabilities
        caps = capabilities()
    except ImportError:
        return torch.backends.cpu.get_cpu_capability()
    have = [k for k in ("amx_int8", "amx_bf16", "avx512vnni", "avx512bf16", "avx512f", "avx2") if caps.get(k)]
    return "+".join(have) or "no AVX2"


def device_name(device="cpu") -> str:
    """What a timing table was measured on: the CPU's model and the instructions the kernels
    dispatch on, or the GPU's name and compute capability. Thread counts are kept apart."""
    device = torch.device(device)
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        cc = torch.cuda.get_device_capability(idx)
        return f"cuda: {torch.cuda.get_device_name(idx)} (sm_{cc[0]}{cc[1]})"
    return f"cpu: {_cpu_model()} ({_cpu_isa()})"


def check_device(timing: Mapping, device="cpu", threads: int | None = None) -> None:
    """Raise :class:`TimingError` unless ``timing`` was measured on ``device`` (and, for a CPU,
    with ``threads`` threads: the default is torch's current count)."""
    here = device_name(device)
    if timing.get("device") != here:
        raise TimingError(f"the plan's timings were measured on {timing.get('device')!r}, not on this "
                          f"device ({here!r}): they say nothing about speed here; fit again here, or "
                          f"use a plan chosen by bits (--avg-bits)")
    if torch.device(device).type == "cpu":
        threads = torch.get_num_threads() if threads is None else threads
        if timing.get("threads") != threads:
            raise TimingError(f"the plan's timings were measured with {timing.get('threads')} threads, "
                              f"this process runs {threads}: they do not hold here")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def round_robin(fns: Mapping[str, Callable[[], object]], repeats: int = 5, warmup: int = 1,
                device="cpu") -> dict[str, float]:
    """Median milliseconds of each callable, timed round-robin (``warmup`` untimed rounds)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for k, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                times[k].append(1e3 * (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in times.items()}


def _autocast_now(args) -> torch.dtype | None:
    """The autocast dtype in force for the device of the first tensor in ``args``, or None."""
    t = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if t is None or not torch.is_autocast_enabled(t.device.type):
        return None
    return torch.get_autocast_dtype(t.device.type)


def capture_inputs(model: nn.Module, names: Iterable[str], run: Callable[[], object]) -> dict:
    """{name: (args, kwargs, autocast dtype or None)} of each named module's first call during
    ``run()`` (a module inside an autocast region is timed inside one)."""
    seen: dict = {}
    hooks = []
    mods = dict(model.named_modules())
    for n in names:
        def grab(m, args, kwargs, n=n):
            seen.setdefault(n, (tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                                dict(kwargs), _autocast_now(args)))
        hooks.append(mods[n].register_forward_pre_hook(grab, with_kwargs=True))
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in names if n not in seen]
    if missing:
        raise RuntimeError(f"modules {missing} were not called by the forward used for timing")
    return seen


def time_layers(model: nn.Module, names: Iterable[str], run: Callable[[], object],
                settings: Iterable[str] = SETTINGS, repeats: int = 5, device="cpu") -> dict[str, dict[str, float]]:
    """{layer: {setting: ms}} for the named :class:`~raad_kernels.QuantAttention` modules of
    ``model``, each timed alone on the inputs it receives in ``run()`` (one forward of the
    model). Layers with the same class, configuration and input shapes are timed once and share
    the figures (a ViT's blocks usually are). Every layer is left at the bits it had."""
    from .nn import QuantAttention
    names = list(names)
    settings = list(settings)
    mods = dict(model.named_modules())
    for n in names:
        if not isinstance(mods.get(n), QuantAttention):
            raise TypeError(f"{n!r} is not a QuantAttention module (quantize_model swaps them in)")
    inputs = capture_inputs(model, names, run)
    groups: dict = {}
    for n in names:
        args, kwargs, low = inputs[n]
        m = mods[n]
        key = (type(m._float_module), m.smooth_k, m.rotate, m.backend, low,
               tuple((tuple(a.shape), a.dtype) for a in args if isinstance(a, torch.Tensor)))
        groups.setdefault(key, []).append(n)
    table: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for members in groups.values():
            first = members[0]
            m = mods[first]
            args, kwargs, low = inputs[first]
            was = (m.qk_bits, m.pv_bits)
            dev = next(a for a in args if isinstance(a, torch.Tensor)).device.type

            def at(s, m=m, args=args, kwargs=kwargs, low=low, dev=dev):
                qk, pv = parse_setting(s)

                def call():
                    m.set_bits(qk, pv)
                    with torch.autocast(dev, dtype=low or torch.bfloat16, enabled=low is not None):
                        return m(*args, **kwargs)
                return call
            try:
                ms = round_robin({s: at(s) for s in settings}, repeats=repeats, device=device)
            finally:
                m.set_bits(*was)
            for n in members:
                table[n] = {s: round(v, 4) for s, v in ms.items()}
    return table
