"""Command line: raad make-data | fit | score | bench | demo | ablate."""

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
                       align=args.align)


def _fit_opts(args):
    from .train import FitOptions
    return FitOptions(steps=args.steps, batch_size=args.batch_size, lr=args.lr, avg_bits=args.avg_bits,
                      stage2_steps=args.stage2_steps, seed=args.seed, device=args.device,
                      linear_bits=args.linear_bits)


def cmd_make_data(args):
    made = D.make_synthetic(args.out, categories=args.categories, seed=args.seed, size=args.size,
                            n_train=args.n_train, n_test_good=args.n_test_good,
                            n_test_defect=args.n_test_defect, overwrite=args.overwrite)
    for p in made:
        print(p)


def cmd_fit(args):
    from .train import fit
    res = fit(args.data_dir, args.out, _model_cfg(args), _fit_opts(args).check(), show=not args.quiet)
    for name, s in res.items():
        print(f"{name}: fitted in {s['seconds']} s -> {Path(args.out) / name}")


def cmd_score(args):
    from .score import score
    res = score(args.run_dir, args.data_dir, args.out, precision=args.precision, show=not args.quiet)
    for name, r in res.items():
        print(f"{name}: image AUROC {_f(r['image_auroc'])}  pixel AUROC {_f(r['pixel_auroc'])}  "
              f"AU-PRO {_f(r['aupro'])}  F1-max {_f(r['f1_max'])}")
    print(f"metrics, maps and overlays in {args.out}")


def cmd_bench(args):
    from .score import bench
    r = bench(args.run_dir, device=args.device, batch=args.batch_size, repeats=args.repeats,
              data_dir=args.data)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"fp32 {r['fp32_images_per_s']:.2f} img/s, plan {r['plan_images_per_s']:.2f} img/s, "
              f"speedup {r['speedup']:.2f}x (rounds {r['speedup_p10_p90'][0]:.2f}-{r['speedup_p10_p90'][1]:.2f}x, "
              f"10th-90th percentile; {r['threads']} threads, batch {r['batch']}, {r['images']})")
        if "attention_only_images_per_s" in r:
            print(f"  the plan's attention alone (linears float): {r['attention_only_images_per_s']:.2f} img/s, "
                  f"{r['attention_only_speedup']:.2f}x")
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
        s.add_argument("--align", default=m.align, choices=POSE_MODES,
                       help="turn each image to one canonical pose (image moments) before the "
                            "detector and its map back: on (objects at any angle), off, auto "
                            "(on for elongated objects whose angle varies in the training images)")
        s.add_argument("--steps", type=int, default=f.steps)
        s.add_argument("--stage2-steps", type=int, default=f.stage2_steps)
        s.add_argument("--batch-size", type=int, default=f.batch_size)
        s.add_argument("--lr", type=float, default=f.lr)
        s.add_argument("--avg-bits", type=float, default=f.avg_bits,
                       help="average Q·Kᵀ bits (2..8), 16 = full precision")
        s.add_argument("--linear-bits", type=int, default=f.linear_bits, choices=(8, 16),
                       help="the student blocks' linear layers in the plan: 8 = int8 weights and "
                            "activations (W8A8), 16 = float")
        s.add_argument("--seed", type=int, default=f.seed)
        s.add_argument("--device", default=f.device)

    s = sub.add_parser("make-data", help="generate synthetic categories in the MVTec AD layout")
    s.add_argument("out")
    s.add_argument("--categories", nargs="*", default=None, help=f"from {sorted(D.SYNTHETIC_CATEGORIES)}")
    made = {k: p.default for k, p in inspect.signature(D.make_synthetic).parameters.items()}
    s.add_argument("--seed", type=int, default=made["seed"])
    s.add_argument("--size", type=int, default=made["size"])
    s.add_argument("--n-train", type=int, default=made["n_train"])
    s.add_argument("--n-test-good", type=int, default=made["n_test_good"])
    s.add_argument("--n-test-defect", type=int, default=made["n_test_defect"],
                   help="test images per defect type")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_make_data)

    s = sub.add_parser("fit", help="train on normal images, score layers (HQS), quantize, fine-tune")
    s.add_argument("data_dir")
    s.add_argument("--out", required=True, help="run folder")
    model_args(s)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_fit)

    s = sub.add_parser("score", help="anomaly maps, metrics.json, maps.npz and overlays for a run")
    s.add_argument("run_dir")
    s.add_argument("data_dir")
    s.add_argument("--out", required=True)
    s.add_argument("--precision", choices=("plan", "fp32"), default="plan")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_score)

    s = sub.add_parser("bench", help="images/s of the plan against the same model in fp32")
    s.add_argument("run_dir")
    from .score import bench
    b = {k: p.default for k, p in inspect.signature(bench).parameters.items()}
    s.add_argument("--device", default=b["device"])
    s.add_argument("--batch-size", type=int, default=b["batch"])
    s.add_argument("--repeats", type=int, default=b["repeats"], help="timed batches per variant (median)")
    s.add_argument("--data", default=None, help="time on this category's test images (default: noise images)")
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
    try:
        args.func(args)
    except (D.DataError, RunError, ValueError, FileNotFoundError) as e:
        print(f"raad {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
