#!/usr/bin/env python
"""How the cost of hfopt's products grows: time and operator memory against
the batch size and the width, next to the eager gradient and what autograd
saves for backward.

Two sweeps, train mode, float32, random CIFAR-shaped data:

* batch: ResNet-20 (``resnet20_bn``) at batch 32, 64, 128, 256, 512;
* width: ResNet-20 with every channel count multiplied by k = 1, 2, 4
  (``CifarResNet(3, widths=(16k, 16k, 32k, 64k))``) at one batch.

At each point the gradient, ``G@v`` and ``H@v`` are timed the way
``bench_curvature.py`` times them (rounds of back-to-back blocks, median of all
but each block's first call), and memory is counted as there: the unique
storages the GGN and Hessian operators cache, against the storages autograd
saves for one forward (and for forward + ``grad(create_graph=True)``, what a
double-backward Hessian product keeps).

The summary fits a power law ``cost ~ size^p`` (least squares in log-log) to
each column and prints the exponents: ``p = 1`` is linear.

Usage::

    python benchmarks/bench_scaling.py                  # both sweeps (about 10 minutes on 2 cores)
    python benchmarks/bench_scaling.py --quick          # small sizes, 1 round
    python benchmarks/bench_scaling.py --sweep batch --batches 32 64 128
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Sequence

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import hfopt  # noqa: E402
from bench_curvature import (Baselines, MiB, Timer, autograd_saved_bytes, operator_cache_bytes,  # noqa: E402
                             state_ptrs)
from models.resnet import CifarResNet  # noqa: E402

COLUMNS = ("grad_ms", "gv_ms", "hv_ms", "ggn_cache_mib", "hessian_cache_mib", "autograd_saved_mib",
           "autograd_create_graph_mib")


def widened_resnet20(k: int) -> nn.Module:
    return CifarResNet(3, 10, widths=(16 * k, 16 * k, 32 * k, 64 * k))


def measure(model: nn.Module, batch: int, args, timer: Timer) -> Dict[str, float]:
    """One point of a sweep: times (ms) and memory (MiB)."""
    torch.manual_seed(args.seed)
    model = model.train()
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    v = [torch.randn(p.shape, generator=gen) for p in model.parameters()]
    loss_fn = nn.CrossEntropyLoss()
    base = Baselines(model, loss_fn, x, y)
    G, H = hfopt.GGN(model, loss_fn, x, y), hfopt.Hessian(model, loss_fn, x, y)
    times = timer.round_robin({"grad": base.ag_grad, "gv": lambda: G @ v, "hv": lambda: H @ v},
                              args.rounds, warmup=1, block=args.block)
    excl = state_ptrs(model)
    saved, saved_2nd = autograd_saved_bytes(model, x, excl, loss_fn, y)
    point = {f"{k}_ms": statistics.median(s) * 1e3 for k, s in times.items()}
    point.update(ggn_cache_mib=operator_cache_bytes(G, excl)["total"] / MiB,
                 hessian_cache_mib=operator_cache_bytes(H, excl)["total"] / MiB,
                 autograd_saved_mib=saved / MiB, autograd_create_graph_mib=saved_2nd / MiB,
                 params=sum(p.numel() for p in model.parameters()),
                 minor_faults_hv=statistics.median(timer.faults["hv"]))
    return point


def exponent(sizes: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log(value) on log(size)."""
    lx, ly = [math.log(s) for s in sizes], [math.log(v) for v in values]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def table(title: str, size_label: str, sizes: List[float], points: List[dict]) -> List[str]:
    head = f"| {size_label} | params | grad ms | G@v ms | H@v ms | G@v / grad | H@v / grad | GGN cache MiB | " \
           "Hessian cache MiB | autograd saved MiB | autograd fwd+create_graph MiB | H@v faults |"
    lines = [f"### {title}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for s, p in zip(sizes, points):
        lines.append(f"| {s:g} | {p['params']:,} | {p['grad_ms']:.0f} | {p['gv_ms']:.0f} | {p['hv_ms']:.0f} | "
                     f"{p['gv_ms'] / p['grad_ms']:.2f} | {p['hv_ms'] / p['grad_ms']:.2f} | "
                     f"{p['ggn_cache_mib']:.1f} | {p['hessian_cache_mib']:.1f} | {p['autograd_saved_mib']:.1f} | "
                     f"{p['autograd_create_graph_mib']:.1f} | {p['minor_faults_hv']:.0f} |")
    if len(sizes) > 1:
        exps = {c: exponent(sizes, [p[c] for p in points]) for c in COLUMNS}
        lines += ["", f"Exponent p of cost ~ {size_label}^p: " +
                  ", ".join(f"{c.rsplit('_', 1)[0]} {e:.2f}" for c, e in exps.items())]
    return lines + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", choices=["batch", "width", "both"], default="both")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default 32 64 128 256 512")
    ap.add_argument("--widths", type=int, nargs="+", default=None, help="channel multipliers k, default 1 2 4")
    ap.add_argument("--width-batch", type=int, default=None, help="batch of the width sweep (default 32)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 2; 1 with --quick)")
    ap.add_argument("--block", type=int, default=2, help="back-to-back calls per round, all but the first timed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="batches 8 16, widths 1 2 at batch 8, 1 round")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling-cpu"),
                    help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    args.batches = args.batches or ([8, 16] if args.quick else [32, 64, 128, 256, 512])
    args.widths = args.widths or ([1, 2] if args.quick else [1, 2, 4])
    args.width_batch = args.width_batch or (8 if args.quick else 32)
    args.rounds = args.rounds or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)
    timer = Timer(torch.device("cpu"))
    result: dict = {"meta": {"torch": torch.__version__, "threads": args.threads, "rounds": args.rounds,
                             "block": args.block, "dtype": "float32", "mode": "train"}}
    md = [f"# Scaling of hfopt's products (CPU, {args.threads} threads, float32, train mode)", ""]
    if args.sweep in ("batch", "both"):
        points = []
        for b in args.batches:
            torch.manual_seed(args.seed)
            points.append(measure(widened_resnet20(1), b, args, timer))
            print(f"batch {b}: {points[-1]}", file=sys.stderr, flush=True)
        result["batch"] = dict(zip(map(str, args.batches), points))
        md += table("ResNet-20 against the batch size", "batch", args.batches, points)
    if args.sweep in ("width", "both"):
        points = []
        for k in args.widths:
            torch.manual_seed(args.seed)
            points.append(measure(widened_resnet20(k), args.width_batch, args, timer))
            print(f"width x{k}: {points[-1]}", file=sys.stderr, flush=True)
        result["width"] = dict(zip(map(str, args.widths), points))
        md += table(f"ResNet-20 with k times the channels, batch {args.width_batch}", "k", args.widths, points)
    text = "\n".join(md)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(text + "\n")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
