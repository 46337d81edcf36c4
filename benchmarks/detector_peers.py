"""The detector against what a user would deploy instead, in one command (``make bench``).

    python benchmarks/detector_peers.py OUT [--categories brick coins] [--repeats 20]
                                            [raad fit options]

For each category of the real-photo set (built in OUT/data when missing): fit with `raad fit`'s
defaults (kept in OUT/run; a second call re-benchmarks them), then ``raad bench --peers --data``:
fp32 eager, the plan, bf16 autocast, ``torch.compile`` and the networks exported to OpenVINO
(fp32, default precision, NNCF INT8), timed round-robin in one process on the same 8 test images
and threads, each variant's maps checked against fp32 and scored on the category's test set.
Writes OUT/peers.json and OUT/peers.md (named by CPU and date).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

from raad import realphoto as R
from raad.checkpoint import save_json
from raad.cli import _fit_opts, _model_cfg, build_parser
from raad.io import atomic_write_text
from raad.peers import PEERS, default_peers
from raad.score import bench
from raad.train import fit_category
from raad_kernels.timing import device_name

ORDER = ("fp32", "plan") + PEERS


def table(results: dict) -> str:
    lines = []
    for cat, r in results.items():
        ms = {"fp32": 1e3 * r["batch"] / r["fp32_images_per_s"], "plan": 1e3 * r["batch"] / r["plan_images_per_s"]}
        ms.update({k: 1e3 * r["batch"] / v["images_per_s"] for k, v in r.get("peers", {}).items()})
        lines += [f"**{cat}** ({r['images']}, batch {r['batch']}, {r['threads']} threads, median of "
                  f"{r['repeats']} rounds)", "",
                  "| variant | ms per batch | plan's speed / variant's | max map deviation | image AUROC | AU-PRO |",
                  "|---|---|---|---|---|---|"]
        for k in ORDER:
            if k not in ms:
                continue
            ratio = {"fp32": r["speedup"], "plan": 1.0}.get(k, r.get("plan_vs_peers", {}).get(k))
            det = r.get("detection", {}).get(k, {})
            dev = 0.0 if k == "fp32" else r["deviation"].get(k)
            lines.append(f"| {k} | {ms[k]:.1f} | {ratio:.2f}x | {dev:.2g} | "
                         f"{det.get('image_auroc', float('nan')):.3f} | {det.get('aupro', float('nan')):.3f} |")
        pt = r["plan_timing"]
        lines += ["", f"Plan: {json.dumps(r['plan_bits'])}, linears {r['plan_linears']}; "
                      + (f"its timing table predicted {pt['predicted_ms']:.1f} ms, measured {pt['measured_ms']:.1f} ms."
                         if pt["status"] == "same device" else pt["note"]), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--categories", nargs="*", default=["brick", "coins"])
    p.add_argument("--data", default=None, help="an existing real-photo set (default: OUT/data, built when missing)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--peers", nargs="*", default=list(default_peers("cpu")), choices=PEERS)
    p.add_argument("--quiet", action="store_true")
    args, rest = p.parse_known_args(argv)
    fit_args = build_parser().parse_args(["fit", "DATA", "--out", "RUN", *rest])
    out = Path(args.out)
    data = Path(args.data) if args.data else out / "data"
    missing = [c for c in args.categories if not (data / c).is_dir()]
    if missing:
        R.make_real(data, categories=missing)
    results = {}
    for c in args.categories:
        run = out / "run" / c
        if not (run / "config.json").is_file():
            fit_category(data / c, run, _model_cfg(fit_args), _fit_opts(fit_args).check(), show=not args.quiet)
        results[c] = bench(run, repeats=args.repeats, data_dir=data / c, peers=args.peers)
        print(table({c: results[c]}), flush=True)
    meta = {"date": datetime.date.today().isoformat(), "device": device_name("cpu"),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "command": "python benchmarks/detector_peers.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    try:
        import openvino
        meta["openvino"] = openvino.__version__
    except ImportError:
        pass
    save_json(out / "peers.json", {"meta": meta, "results": results})
    atomic_write_text(out / "peers.md", f"# The detector against its deployment peers\n\n{meta['date']}, "
                                        f"{meta['device']}, {meta['threads']} threads, torch {meta['torch']}"
                                        f"{', OpenVINO ' + meta['openvino'] if 'openvino' in meta else ''}. "
                                        f"`{meta['command']}`\n\n" + table(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
