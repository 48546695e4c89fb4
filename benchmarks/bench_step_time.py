#!/usr/bin/env python
"""Where an HFOptimizer step's time goes, on real CIFAR-10 with c3d3_bn.

Runs ``--steps`` HF steps with ``HFOptimizer``'s defaults (or ``--hf-option``
overrides) on successive ``--batch``-image slices of the CIFAR-10 training
split, and prints each step's split of ``last_step["wall_time"]`` into
``time_gradient``, ``time_build``, ``time_products``, ``time_preconditioner``,
``time_evaluations`` and ``time_other``, then the shares summed over all steps
but the first (warm-up).  The issue-8 targets: build + products +
preconditioner >= 85% of the wall time, trial evaluations <= 10%.

    python benchmarks/bench_step_time.py                      # batch 512, 6 steps, 2 threads
    python benchmarks/bench_step_time.py --hf-option curvature_batch=128 --hf-option cg_max_iterations=50
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import common  # noqa: E402
import hfopt  # noqa: E402
from models import build_model  # noqa: E402

KEYS = ("time_gradient", "time_build", "time_products", "time_preconditioner", "time_evaluations", "time_other")
CURVATURE = ("time_build", "time_products", "time_preconditioner")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(common.DEFAULT_DATA_DIR))
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hf-option", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = common.load_data("cifar10", args.data_dir, 0)["train"].tensors
    if len(x) < args.batch * args.steps:
        raise SystemExit(f"{len(x)} training images: too few for {args.steps} batches of {args.batch}")
    model = build_model("c3d3_bn", num_classes=10).train()
    opt = hfopt.HFOptimizer(model.parameters(), **common.parse_hf_options(args.hf_option))
    ce = nn.CrossEntropyLoss()
    total = dict.fromkeys(KEYS, 0.0)
    wall = 0.0
    for t in range(args.steps):
        xb, yb = x[t * args.batch:(t + 1) * args.batch], y[t * args.batch:(t + 1) * args.batch]

        def closure():
            outputs = model(xb)
            return ce(outputs, yb), outputs

        opt.step(closure)
        s = opt.last_step
        print(f"step {t}: loss {s['loss_before']:.3f}, rho {s['rho']:.2f}, CG {s['cg_iterations']}, "
              f"evaluations {s['evaluations']}, {s['wall_time']:.2f} s: "
              + ", ".join(f"{k[5:]} {s[k] / s['wall_time']:.0%}" for k in KEYS), flush=True)
        if t > 0:
            wall += s["wall_time"]
            for k in KEYS:
                total[k] += s[k]
    if wall:
        print(f"steps 1-{args.steps - 1}, {wall / (args.steps - 1):.2f} s per step: "
              + ", ".join(f"{k[5:]} {total[k] / wall:.1%}" for k in KEYS)
              + f"; curvature (build + products + preconditioner) {sum(total[k] for k in CURVATURE) / wall:.1%}")


if __name__ == "__main__":
    main()
