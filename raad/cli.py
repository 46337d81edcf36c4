"""Command line: raad make-data | fit | score | predict | calibrate | bench | demo | ablate."""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

from . import data as D
from .checkpoint import RunError


def _model_cfg(args):
    from .model import ModelConfig
    return ModelConfig(image_size=args.image_size, teacher=args.teacher, stride=args.stride,
                       embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads,
                       autoencoder="off" if args.no_ae else args.autoencoder, memory=args.memory, memory_size=args.memory_size,
                       memory_region=args.memory_region, align=args.align)


def _fit_opts(args):
    from .train import FitOptions
    return FitOptions(steps=args.steps, batch_size=args.batch_size, lr=args.lr, avg_bits=args.avg_bits,
                      budget=args.budget, max_damage=args.max_damage,
                      stage2_steps=args.stage2_steps, seed=args.seed, device=args.device,
                      linear_bits=args.linear_bits, compile=args.compile, **({"fpr": args.fpr} if "fpr" in args else {}))


def make_data_call(args):
    """(generator, keyword arguments) for ``raad make-data``: the synthetic generator, or with
    ``--real`` the real-photo set; options left out take the generator's own defaults."""
    if args.real:
        from .realphoto import make_real as gen
    else:
        gen = D.make_synthetic
    kwargs = {k: getattr(args, k) for k in ("seed", "size", "n_train", "n_test_good", "n_test_defect")
              if getattr(args, k) is not None}
    return gen, dict(kwargs, categories=args.categories, overwrite=args.overwrite)


def cmd_make_data(args):
    gen, kwargs = make_data_call(args)
    for p in gen(args.out, **kwargs):
        print(p)


def cmd_fit(args):
    if args.ray is not None:
        from .scaleout import fit_on_ray
        res = fit_on_ray(args.data_dir, args.out, _model_cfg(args), _fit_opts(args), address=args.ray,
                         cpus=args.ray_cpus, gpus=args.ray_gpus, show=not args.quiet)
        failed = {k: v["error"] for k, v in res.items() if "error" in v}
        if failed:
            print(f"raad fit: {len(failed)} of {len(res)} categories failed: "
                  + "; ".join(f"{k}: {v}" for k, v in failed.items()), file=sys.stderr)
            return 1
        return 0
    from .train import fit
    res = fit(args.data_dir, args.out, _model_cfg(args), _fit_opts(args).check(), show=not args.quiet)
    for name, s in res.items():
        stages = ", ".join(f"{k} {v} s" for k, v in s.get("stage_seconds", {}).items())
        print(f"{name}: fitted in {s['seconds']} s ({stages}) -> {Path(args.out) / name}")
        if s.get("speed_plan"):
            print("  " + speed_line(s["speed_plan"]))


def speed_line(r: dict) -> str:
    """One line on a plan chosen by measured speed (raad.speedplan's report)."""
    parts = ", ".join(f"{k} {v['chosen']}" for k, v in r["parts"].items())
    goal = "fastest" if r["budget"] == "fastest" else f"{r['budget']:g} ms"
    return (f"plan by measured speed ({goal}{'' if r['met'] else ', not met: the fastest there is'}): "
            f"predicted {r['predicted_ms']:.1f} ms per batch against {r['float_ms']:.1f} ms with float "
            f"attention; {parts}; damage {r['damage']['parts'] + r['damage']['attention']:.2g}")


def cmd_score(args):
    from .score import score
    res = score(args.run_dir, args.data_dir, args.out, precision=args.precision, show=not args.quiet,
                device=args.device)
    for name, r in res.items():
        print(f"{name}: image AUROC {_f(r['image_auroc'])}  pixel AUROC {_f(r['pixel_auroc'])}  "
              f"AU-PRO {_f(r['aupro'])}  F1-max {_f(r['f1_max'])}")
        d = r.get("decision") or {}
        at, best = d.get("at_stored"), d.get("f1_optimal")
        parts = []
        if at:
            parts.append(f"stored threshold {d['stored']['threshold']:.4g} "
                         f"({100 * d['stored']['fpr_target']:.3g} % false alarms targeted): "
                         + ", ".join(f"{what} {_pct(at[k])} ({at[k + '_count'][0]}/{at[k + '_count'][1]})"
                                     for k, what in (("fpr", "false alarms"), ("miss_rate", "misses"))
                                     if at[k] is not None))
        else:
            parts.append("no stored threshold (run `raad calibrate RUN FOLDER`)")
        if best:
            parts.append(f"F1-optimal threshold {best['threshold']:.4g} (F1 {best['f1']:.3f})")
        print("  " + "; ".join(parts))
    print(f"metrics, maps and overlays in {args.out}")


def _pct(x):
    return f"{100 * x:.3g} %"


def cmd_predict(args):
    from .predict import predict
    try:
        s = predict(args.run_dir, args.inputs, args.out, precision=args.precision, batch=args.batch,
                    device=args.device, resume=args.resume, overwrite=args.overwrite, ray=args.ray,
                    workers=args.workers, ray_cpus=args.ray_cpus, ray_gpus=args.ray_gpus,
                    show=not args.quiet)
    except KeyboardInterrupt:
        print(f"raad predict: interrupted; the images finished are kept in {args.out}: run the same "
              f"command with --resume to score the rest", file=sys.stderr)
        return 130
    rate = f", {s['images_per_s']:.2f} images/s" if s["images_per_s"] else ""
    resumed = f" ({s['resumed']} done before, kept)" if s["resumed"] else ""
    print(f"{s['images']} images{resumed}: {s['fail']} fail, {s['pass']} pass, {s['error']} unreadable "
          f"({s['seconds']:.1f} s{rate}) -> {s['csv']}")
    for e in s["errors"]:
        print(f"  unreadable: {e['image']}: {e['error']}", file=sys.stderr)
    if s["skipped_not_images"]:
        print(f"  {len(s['skipped_not_images'])} files skipped, not images by their extension "
              f"(e.g. {s['skipped_not_images'][0]})", file=sys.stderr)
    return 0


def cmd_calibrate(args):
    from .predict import calibrate_folder
    r = calibrate_folder(args.run_dir, args.folders, fpr=args.fpr, replace=args.replace,
                         device=args.device, batch=args.batch, show=not args.quiet)
    for p, e in r["bad"]:
        print(f"  unreadable, left out: {p}: {e}", file=sys.stderr)
    if r["left_out_training"]:
        print(f"  {r['left_out_training']} of the images trained the detector: left out", file=sys.stderr)
    for prec, t in r["thresholds"].items():
        print(f"{prec}: threshold {t['threshold']:.4g} for {_pct(t['fpr_target'])} false alarms: {t['note']}")
        old = r["previous"].get(prec)
        if old:
            lo, hi = old["fpr_interval"]
            print(f"  the previous threshold {old['threshold']:.4g} flagged {_pct(old['fpr'])} of the "
                  f"{old['fpr_count'][1]} new images (95 % interval {_pct(lo)}-{_pct(hi)})")
    return 0


def cmd_bench(args):
    from .peers import default_peers
    from .score import bench
    r = bench(args.run_dir, device=args.device, batch=args.batch_size, repeats=args.repeats,
              data_dir=args.data,
              peers=() if args.peers is None else (args.peers or default_peers(args.device)),
              graph=False if args.no_graph else None)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"fp32 {r['fp32_images_per_s']:.2f} img/s, plan {r['plan_images_per_s']:.2f} img/s, "
              f"speedup {r['speedup']:.2f}x (rounds {r['speedup_p10_p90'][0]:.2f}-{r['speedup_p10_p90'][1]:.2f}x, "
              f"10th-90th percentile; {r['threads']} threads, batch {r['batch']}, {r['images']})")
        if "attention_only_images_per_s" in r:
            print(f"  the plan's attention alone (everything else fp32): {r['attention_only_images_per_s']:.2f} img/s, "
                  f"{r['attention_only_speedup']:.2f}x")
        for k, v in r.get("peers", {}).items():
            print(f"  {k}: {v['images_per_s']:.2f} img/s, {v['speedup']:.2f}x fp32; the plan is "
                  f"{r['plan_vs_peers'][k]:.2f}x its speed")
        if r.get("deviation"):
            print("  largest map difference from fp32 (share of fp32's largest value): " + ", ".join(
                f"{k} {v:.2g}" for k, v in r["deviation"].items()))
        for k, v in (r.get("detection") or {}).items():
            print(f"  {k}: image AUROC {_f(v['image_auroc'])}, AU-PRO {_f(v['aupro'])}")
        pt = r["plan_timing"]
        if pt["status"] == "same device":
            print(f"  the plan's timing table predicted {pt['predicted_ms']:.1f} ms per batch; measured "
                  f"{pt['measured_ms']:.1f} ms")
        else:
            print(f"  the plan's timings: {pt['note']}")
        print("  where a batch's time goes (ms): " + "; ".join(
            f"{k} " + ", ".join(f"{p} {v:.1f}" for p, v in d.items()) for k, d in r["parts_ms"].items()))
        if r["cpu_int8_dot"] is False:
            from .score import NO_INT8_DOT_NOTE
            print(f"  note: {NO_INT8_DOT_NOTE}")


def cmd_demo(args):
    from .demo import demo
    demo(args.out, steps=args.steps, categories=args.categories, quiet=args.quiet)


def cmd_ablate(args):
    from .ablate import ablate
    ablate(args.data_dir, args.out, _model_cfg(args), _fit_opts(args), show=not args.quiet)


def _f(x):
    return "n/a" if x is None else f"{x:.3f}"


def build_parser():
    p = argparse.ArgumentParser(prog="raad", description="RAAD: anomaly detection with hierarchically quantized attention")
    sub = p.add_subparsers(dest="command", required=True)
    from .train import FitOptions

    def ray_args(s, what):
        s.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help=f"{what}; ADDRESS: a Ray cluster (auto, HOST:6379, ray://HOST:10001); "
                            "without it RAY_ADDRESS, else a local Ray (needs the optional ray extra)")
        s.add_argument("--ray-cpus", type=float, default=1, help="with --ray: CPUs per task or worker")
        s.add_argument("--ray-gpus", type=float, default=None,
                       help="with --ray: GPUs per task or worker (default: 1 with --device cuda, else 0)")

    def model_args(s):
        # defaults come from the dataclasses, so the CLI, `raad demo` and the Python API agree
        from .memory import MODES as MEMORY_MODES
        from .model import AE_MODES, ModelConfig
        from .pose import MODES as POSE_MODES
        from .train import FitOptions
        m, f = ModelConfig(), FitOptions()
        s.add_argument("--teacher", default=m.teacher, help="effnet-lite0, or timm:NAME[@CHECKPOINT] (weights: CHECKPOINT, else the local Hugging Face cache)")
        s.add_argument("--image-size", type=int, default=m.image_size)
        s.add_argument("--stride", type=int, default=m.stride, choices=(4, 8),
                       help="image pixels per student token (the maps' resolution)")
        s.add_argument("--embed-dim", type=int, default=m.embed_dim)
        s.add_argument("--depth", type=int, default=m.depth)
        s.add_argument("--num-heads", type=int, default=m.num_heads)
        s.add_argument("--autoencoder", default=m.autoencoder, choices=AE_MODES,
                       help="the autoencoder branch (global anomalies: missing or misplaced parts): "
                            "on, off, auto (on for objects, off for textures, read from the "
                            "training images)")
        s.add_argument("--no-ae", action="store_true", help="the same as --autoencoder off")
        s.add_argument("--memory", default=m.memory, choices=MEMORY_MODES,
                       help="nearest-neighbour memory of fine features beside the student: global "
                            "(textures, objects in any pose), local (fixed layouts: the search "
                            "weighs each cell's place), auto (chosen from the training images), off")
        s.add_argument("--memory-size", type=int, default=m.memory_size,
                       help="training cells the memory keeps (greedy coreset)")
        s.add_argument("--memory-region", type=int, default=m.memory_region, metavar="PX",
                       help="the memory's region cells: mean colour and texture over PX pixels "
                            "around each cell (soft stains, burns); 4, 12, 20, ... (an odd number of "
                            "4-pixel cells), 0 for none")
        s.add_argument("--align", default=m.align, choices=POSE_MODES,
                       help="turn each image to one canonical pose (image moments) before the "
                            "detector and its map back: on (objects at any angle), off, auto "
                            "(on for elongated objects whose angle varies in the training images)")
        s.add_argument("--steps", type=int, default=f.steps)
        s.add_argument("--stage2-steps", type=int, default=f.stage2_steps)
        s.add_argument("--batch-size", type=int, default=f.batch_size)
        s.add_argument("--lr", type=float, default=f.lr)
        s.add_argument("--budget", default=None,
                       help="the plan by measured speed on this device (the default, 'fastest'): "
                            "'fastest' = the fastest plan whose damage stays under --max-damage; "
                            "a number = the least damage within that many ms per batch")
        s.add_argument("--max-damage", type=float, default=f.max_damage,
                       help="the damage --budget fastest allows (relative change of the held-out "
                            "anomaly maps plus loss of separation; 0.01 = 1 %%)")
        s.add_argument("--avg-bits", type=float, default=f.avg_bits,
                       help="the plan by bits instead (the paper's setting): average Q·Kᵀ bits "
                            "(2..8); 16 = no plan, full precision")
        s.add_argument("--linear-bits", type=int, default=f.linear_bits, choices=(8, 16),
                       help="the student blocks' linear layers in the plan: 8 = int8 weights and "
                            "activations (W8A8), 16 = float")
        s.add_argument("--no-compile", dest="compile", action="store_false",
                       help="a plan by measured speed never compiles a part (torch.compile needs a C++ "
                            "compiler where the run scores)")
        s.add_argument("--seed", type=int, default=f.seed)
        s.add_argument("--device", default=f.device,
                       help="the device the run will score on (cpu or cuda): the plan is timed and the "
                            "decision threshold set there; training runs on the CPU")

    s = sub.add_parser("make-data", help="generate categories in the MVTec AD layout: synthetic, or "
                                         "defects drawn on packaged real photographs (--real)")
    s.add_argument("out")
    s.add_argument("--real", action="store_true",
                   help="the real-photo set (raad.realphoto): photographs that ship in scikit-image, "
                        "train and test crops from disjoint regions, defects of MVTec's kinds")
    from .realphoto import REAL_CATEGORIES
    s.add_argument("--categories", nargs="*", default=None,
                   help=f"synthetic: {sorted(D.SYNTHETIC_CATEGORIES)}; --real: {list(REAL_CATEGORIES)}")
    syn = {k: p.default for k, p in inspect.signature(D.make_synthetic).parameters.items()}
    from .realphoto import make_real
    real = {k: p.default for k, p in inspect.signature(make_real).parameters.items()}

    def dflt(k):
        return f"default {syn[k]}, with --real {real[k]}"
    s.add_argument("--seed", type=int, default=None, help=dflt("seed"))
    s.add_argument("--size", type=int, default=None, help=dflt("size"))
    s.add_argument("--n-train", type=int, default=None, help=dflt("n_train"))
    s.add_argument("--n-test-good", type=int, default=None, help=dflt("n_test_good"))
    s.add_argument("--n-test-defect", type=int, default=None,
                   help="test images per defect type, " + dflt("n_test_defect"))
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_make_data)

    s = sub.add_parser("fit", help="train on normal images, score layers (HQS), quantize, fine-tune")
    s.add_argument("data_dir")
    s.add_argument("--out", required=True, help="run folder")
    model_args(s)
    s.add_argument("--fpr", type=float, default=FitOptions().fpr,
                   help="the decision threshold's target false-alarm rate, calibrated on the "
                        "held-out normal images (default 0.01 = 1 %%)")
    ray_args(s, "fit each category as its own Ray task")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_fit)

    s = sub.add_parser("score", help="anomaly maps, metrics.json, maps.npz and overlays for a run")
    s.add_argument("run_dir")
    s.add_argument("data_dir")
    s.add_argument("--out", required=True)
    s.add_argument("--precision", choices=("plan", "fp32"), default="plan")
    s.add_argument("--device", default="cpu", help="cpu or cuda (on a GPU the forward is replayed from CUDA graphs)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_score)

    s = sub.add_parser("predict", help="score new images: score, normalised score, pass/fail, overlay; "
                                      "predictions.csv and .jsonl")
    s.add_argument("run_dir", help="a fitted category's run folder")
    s.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and folders (searched recursively)")
    s.add_argument("--out", required=True)
    s.add_argument("--precision", choices=("plan", "fp32"), default="plan")
    s.add_argument("--batch", type=int, default=8, help="images per forward (and per chunk of work)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--resume", action="store_true", help="keep the images an earlier run into --out finished")
    s.add_argument("--overwrite", action="store_true", help="replace the predictions already in --out")
    ray_args(s, "spread the images over Ray workers (Ray Data)")
    s.add_argument("--workers", type=int, default=None,
                   help="with --ray: scoring actors (default: as many as the cluster's CPUs hold)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("calibrate", help="set a run's decision threshold again from normal images")
    s.add_argument("run_dir")
    s.add_argument("folders", nargs="+", metavar="FOLDER",
                   help="normal images the detector was not trained on (files or folders)")
    s.add_argument("--fpr", type=float, default=None,
                   help="target false-alarm rate (default: the run's current target)")
    s.add_argument("--replace", action="store_true",
                   help="calibrate on these images alone (default: pooled with the earlier ones)")
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--device", default="cpu")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("bench", help="images/s of the plan against the same model in fp32")
    s.add_argument("run_dir")
    from .score import bench
    b = {k: p.default for k, p in inspect.signature(bench).parameters.items()}
    s.add_argument("--device", default=b["device"])
    s.add_argument("--batch-size", type=int, default=b["batch"])
    s.add_argument("--repeats", type=int, default=b["repeats"], help="timed batches per variant (median)")
    s.add_argument("--data", default=None, help="time on this category's test images (default: noise images)")
    from .peers import PEERS
    s.add_argument("--peers", nargs="*", default=None, choices=PEERS, metavar="PEER",
                   help=f"also time what a user would deploy instead, in the same rounds: "
                        f"{', '.join(PEERS)} (when none is named: OpenVINO's and bf16 autocast on a "
                        f"CPU, fp16 and bf16 autocast on a GPU, and torch.compile; OpenVINO needs "
                        f"the bench extra)")
    s.add_argument("--no-graph", action="store_true",
                   help="on a GPU, time the eager forwards instead of CUDA-graph replays")
    s.add_argument("--json", action="store_true", help="print one JSON line")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("demo", help="generate data, fit, score and benchmark (a few minutes on 2 cores)")
    s.add_argument("--out", default="demo_out")
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--categories", nargs="*", default=None)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("ablate", help="fp32 / int8 / int4 / HQS / random plans, with and without stage 2")
    s.add_argument("data_dir")
    s.add_argument("--out", required=True)
    model_args(s)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_ablate)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from raad_kernels.allocator import keep_freed_memory
    keep_freed_memory()   # every command allocates activations at inspection resolution
    try:
        return args.func(args) or 0
    except (D.DataError, RunError, ValueError, FileNotFoundError) as e:
        print(f"raad {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
