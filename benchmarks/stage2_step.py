"""Time a stage-2 (fake-quant) training step of a fitted run, with the CPU row quantizer and with
the torch specification's scale search, alternating in one process (the host's load hits both).

    python benchmarks/stage2_step.py RUN_DIR/CATEGORY [--rounds 4] [--steps 5]

Prints ms per step for each path, per round, and the median ratio. The teacher's features of Gaussian-noise
images: the step's cost does not depend on the values."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from raad.checkpoint import load_run
from raad.train import student_losses
from raad_kernels import fake_quant


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)
    det, _, _ = load_run(args.run, precision="plan")
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, det.cfg.image_size, det.cfg.image_size, generator=gen)
    stem, target = det.teacher_features(images)   # the student's real input and target shapes
    opt = torch.optim.Adam(det.student.parameters(), lr=1e-5)
    det.student.train()

    def step():
        loss = sum(student_losses(det, stem, target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    times = {True: [], False: []}
    for _ in range(args.rounds):
        for fast in (True, False):
            fake_quant.USE_CPU_QUANTIZER = fast
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[fast].append((time.perf_counter() - t0) / args.steps * 1e3)
    print("row quantizer ms/step:", " ".join(f"{t:.0f}" for t in times[True]))
    print("torch search  ms/step:", " ".join(f"{t:.0f}" for t in times[False]))
    print(f"median ratio (torch / row quantizer): "
          f"{statistics.median(b / a for a, b in zip(times[True], times[False])):.2f}")


if __name__ == "__main__":
    main()
