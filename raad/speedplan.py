"""A plan chosen by measured speed (``raad fit --budget fastest|MS``).

On the device the run will score on (``raad fit --device``; training itself runs on the CPU),
at the fit's batch size and real shapes:

1. Parts. The teacher and the autoencoder can run in bf16 (where the hardware has bf16
   arithmetic: AMX or AVX-512 BF16 CPUs, GPUs); the student its blocks' linears at int8 (W8A8)
   or, where bf16 is native, the whole student under bf16 autocast; on a CPU each part may also
   run compiled (:mod:`raad_kernels.compiled`; see :func:`candidates`).
   Each alternative is timed against fp32 and its damage measured as HQS measures a layer's
   (:class:`raad.hqs.Probe`); the parts take the fastest combination whose summed damage stays
   within half the bound (damages add, as HQS assumes for layers; an equal split between the
   parts left a part's share unused while another's was too small).
2. Layers. With the parts so chosen, every attention layer is timed alone on its real inputs at
   Q·Kᵀ 2/4/8 bits (P·V 8) and in float (:func:`raad_kernels.timing.time_layers`); the rest of
   a forward is timed once. The settings come from the exact time/damage Pareto front
   (:func:`raad.hqs.allocate_time`): ``fastest`` takes the fastest whose summed damage stays
   under the rest of the bound, a number of milliseconds the least damage that fits.

The plan records the table (``timing``, with the device's name and thread count) it was chosen
from; ``raad bench`` compares it with what it measures and refuses to claim it on another device.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

import torch

import raad_kernels as rk
from raad_kernels import timing as TM
from raad_kernels.autocast import autocast_modules
from raad_kernels.compiled import compile_modules

from . import hqs

#: where the plan may run the linears at int8: every block of the student (QKV, output
#: projection, MLP); the token embedding, the heads, the autoencoder and the teacher stay float
LINEAR_SCOPE = ("student.blocks",)


def linears_section() -> dict:
    """The plan's W8A8 linears section over :data:`LINEAR_SCOPE`."""
    return {"bits": 8, "under": list(LINEAR_SCOPE)}


def bf16_fast(device) -> bool:
    """Whether ``device`` does bf16 arithmetic natively (a bf16 matmul faster than fp32 there)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        from raad_kernels._cpu import capabilities
        caps = capabilities()
        return bool(caps.get("amx_bf16") or caps.get("avx512bf16"))
    except ImportError:
        return False


@dataclass
class PartChoice:
    name: str
    chosen: str
    ms: dict[str, float] = field(default_factory=dict)
    damage: dict[str, float] = field(default_factory=dict)


#: the suffix of an arithmetic whose part also runs compiled (raad_kernels.compiled)
COMPILED = "+compile"


def _apply(det, part: str, arith: str):
    """``det`` (a copy) with ``part`` at ``arith`` (``"bfloat16+compile"``: bf16, compiled)."""
    base = arith.removesuffix(COMPILED)
    if base == "bfloat16":
        autocast_modules(det, "bfloat16", [part])
    elif base == "int8":
        rk.quantize_linears(det, 8, under=list(LINEAR_SCOPE))
    if arith.endswith(COMPILED):
        compile_modules(det, [part])
    return det


def _call(det, part: str, x: torch.Tensor):
    """One forward of ``part`` alone on batch ``x`` (inputs as the detector gives them)."""
    g = (x.shape[-2] // det.cfg.stride, x.shape[-1] // det.cfg.stride)
    if part == "teacher":
        return lambda: det.teacher(x, g, fine=det.memory is not None)
    stem = det.teacher_features(x)[0]
    if part == "ae":
        return lambda: det.ae(stem)
    return lambda: det.student(stem)     # its attention float (16/16)


def candidates(det, opts) -> dict[str, tuple[str, ...]]:
    """Arithmetic each part may run at on ``opts.device`` (fp32 first); on a CPU also compiled
    (``+compile``: inductor with freezing fuses and pre-packs what torch runs op by op), in bf16
    where the CPU has bf16 arithmetic, else in fp32 (one compiled candidate per part: each
    compile costs seconds of the fit; the int8 linears are this package's kernels, which it does
    not compile)."""
    out = {}
    bf16 = bf16_fast(opts.device)
    out["teacher"] = ("fp32", "bfloat16") if bf16 else ("fp32",)
    if det.ae is not None:
        out["ae"] = ("fp32", "bfloat16") if bf16 else ("fp32",)
    # the student: its blocks' linears at int8 (W8A8), or the whole student under bf16 autocast
    # (linears in bf16; its attention then sees bf16 inputs, and float layers run SDPA in bf16)
    out["student"] = ("fp32",) + (("int8",) if opts.linear_bits == 8 else ()) + (("bfloat16",) if bf16 else ())
    if torch.device(opts.device).type == "cpu" and opts.compile:
        out = {p: a + (("bfloat16" if bf16 else "fp32") + COMPILED,) for p, a in out.items()}
    return out


def best_combination(options: dict[str, dict[str, tuple[float, float]]], limit: float) -> dict[str, str]:
    """{part: arithmetic}: of every combination of ``options`` ({part: {arithmetic: (ms,
    damage)}}, each part's first arithmetic the exact one), the fastest whose summed damage is at
    most ``limit`` (ties: the least damage); every part exact when none fits. Exhaustive: three
    parts of at most three arithmetics each."""
    parts = list(options)
    best, key = {p: next(iter(options[p])) for p in parts}, None
    for combo in itertools.product(*(options[p].items() for p in parts)):
        ms = sum(v[0] for _, v in combo)
        dmg = sum(v[1] for _, v in combo)
        if dmg <= limit + 1e-15 and (key is None or (ms, dmg) < key):
            best, key = {p: a for p, (a, _) in zip(parts, combo)}, (ms, dmg)
    return best


def choose_parts(det, probe: hqs.Probe, x: torch.Tensor, opts, max_damage: float,
                 repeats: int = 7) -> list[PartChoice]:
    """The parts' arithmetic: the fastest combination whose summed damage stays within half of
    ``max_damage`` (the other half is the attention layers'); see the module notes."""
    cands = candidates(det, opts)
    measured = {}
    for part, ariths in cands.items():
        variants = {a: _apply(copy.deepcopy(det), part, a) for a in ariths}
        # the damage where the detector was trained, the time on the device it will score on; a
        # compiled part's damage is its arithmetic's (compiling changes the rounding, not the
        # arithmetic: 0.0039 against 0.0041 for the bf16 teacher at 256 px, and measuring it
        # would compile it once more, at the probe's batch)
        dmg = {a: (0.0 if a == "fp32" else probe.damage(v)) for a, v in variants.items()
               if not a.endswith(COMPILED)}
        dmg.update({a: dmg[a.removesuffix(COMPILED)] for a in ariths if a.endswith(COMPILED)})
        # timed as scoring runs them: in eval mode (a compiled part runs eagerly in training
        # mode, and the fit's detector is in it)
        on_dev = {a: copy.deepcopy(v).to(opts.device).eval() for a, v in variants.items()}
        calls = {a: _call(v, part, x) for a, v in on_dev.items()}
        if part == "student":
            # each arithmetic timed with its attention in float and at 8/8 too, the faster kept:
            # the layers' settings are chosen afterwards, and float attention alone would charge
            # the int8 linears with fp32 SDPA while bf16 gets bf16 SDPA (compiled: float only)
            calls.update({f"{a} 8/8": _call(_attention_at(copy.deepcopy(v), 8), part, x)
                          for a, v in on_dev.items() if not a.endswith(COMPILED)})
        with torch.inference_mode():
            ms = TM.round_robin(calls, repeats=repeats, warmup=2, device=opts.device)
        # a compiled candidate counts only if its compiled form is what was timed
        ran = {a for a in ariths if not a.endswith(COMPILED)
               or getattr(on_dev[a].get_submodule(part).forward, "compiled_calls", 0) > 0}
        measured[part] = {a: (min(ms[a], ms.get(f"{a} 8/8", ms[a])), dmg[a]) for a in ariths if a in ran}
    chosen = best_combination(measured, 0.5 * max_damage)
    return [PartChoice(part, chosen[part], {a: round(v[0], 3) for a, v in m.items()},
                       {a: float(v[1]) for a, v in m.items()}) for part, m in measured.items()]


def _attention_at(det, bits: int):
    """``det`` with every student attention layer at Q·Kᵀ ``bits``, P·V 8 (in place)."""
    for name in det.attention_modules():
        if name.startswith("student."):
            det.get_submodule(name).set_bits(bits, 8)
    return det


def parts_plan(parts: list[PartChoice]) -> dict:
    """The plan sections (``linears``, ``autocast``, ``compile``) the chosen parts need."""
    out = {}
    base = {p.name: p.chosen.removesuffix(COMPILED) for p in parts}
    bf = [n for n, a in base.items() if a == "bfloat16"]
    if bf:
        out["autocast"] = {"dtype": "bfloat16", "modules": bf}
    if any(a == "int8" for a in base.values()):
        out["linears"] = linears_section()
    compiled = [p.name for p in parts if p.chosen.endswith(COMPILED)]
    if compiled:
        out["compile"] = {"modules": compiled}
    return out


def timing_batch(normals: torch.Tensor, batch: int) -> torch.Tensor:
    """``batch`` held-out images (repeated when there are fewer)."""
    reps = -(-batch // len(normals))
    return torch.cat([normals] * reps)[:batch]


def budget_plan(det, mods: dict, scores: list[hqs.LayerScore], normals: torch.Tensor, opts,
                repeats: int = 7) -> tuple[dict, dict]:
    """(plan, report) for ``det`` (float, attention as QuantAttention at 16/16) under
    ``opts.budget``. The report holds the parts' and layers' measurements and the prediction."""
    budget = hqs.check_budget(opts.budget)
    max_damage = opts.max_damage
    device = opts.device
    probe = hqs.Probe(det, normals, opts.seed)
    x = timing_batch(normals, opts.batch_size).to(device)
    parts = choose_parts(det, probe, x, opts, max_damage, repeats)
    sections = parts_plan(parts)
    # the layers and the whole forward timed with the parts eager (the layers' inputs are
    # captured by hooks); what compiling the chosen parts saved, as their timings measured it,
    # comes off the rest
    trial = copy.deepcopy(det).to(device).eval()
    rk.quantize_model(trial, {"version": 1, "layers": {n: {"qk_bits": 16, "pv_bits": 16} for n in mods},
                              **{k: v for k, v in sections.items() if k != "compile"}})
    if trial.memory is not None:
        trial.memory.int8 = True    # the plan's memory search (as raad.checkpoint.load_run sets it)
    names = list(mods)
    settings = [TM.setting(b, 8) for b in sorted(hqs.BIT_CHOICES)] + [hqs.FLOAT_SETTING]
    layers = TM.time_layers(trial, names, lambda: trial(x), settings, repeats=repeats, device=device)
    with torch.inference_mode():
        whole = TM.round_robin({"float": lambda: trial(x)}, repeats=repeats, device=device)["float"]
    saved = sum(p.ms[p.chosen.removesuffix(COMPILED)] - p.ms[p.chosen] for p in parts if p.chosen.endswith(COMPILED))
    rest = max(0.0, whole - saved - sum(layers[n][hqs.FLOAT_SETTING] for n in names))
    costs = {s.name: hqs.setting_costs(s) for s in scores}
    spent = sum(p.damage[p.chosen] for p in parts)
    alloc, predicted, damage, met = hqs.allocate_time(costs, layers, budget, rest_ms=rest,
                                                      max_damage=max(0.0, max_damage - spent))
    by_name = {s.name: s for s in scores}
    plan_layers = {}
    for n in names:
        qk, pv = TM.parse_setting(alloc[n])
        plan_layers[n] = {"qk_bits": qk, "pv_bits": pv, "score": round(by_name[n].score, 6)}
    table = {"device": TM.device_name(device), "threads": torch.get_num_threads(), "batch": len(x),
             "unit": "ms", "layers": layers,
             "parts": {p.name: p.ms for p in parts}, "rest": round(rest, 3)}
    plan = {"version": 1, "layers": plan_layers, **sections, "timing": table}
    report = {"budget": budget, "max_damage": max_damage, "met": met,
              "predicted_ms": round(predicted, 3), "float_ms": round(whole - saved, 3),
              "damage": {"parts": spent, "attention": damage},
              "parts": {p.name: {"chosen": p.chosen, "ms": p.ms, "damage": p.damage} for p in parts}}
    return plan, report
