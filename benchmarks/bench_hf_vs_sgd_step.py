#!/usr/bin/env python
"""One HFOptimizer step against one SGD step on the same batch (synthetic
CIFAR-shaped data, train mode), timed alternately in one process: the price of
an HF step in SGD steps.

    python benchmarks/bench_hf_vs_sgd_step.py --device cuda --model resnet20_bn --batch 512 --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import hfopt  # noqa: E402
from models import MODELS  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="resnet20_bn", choices=sorted(MODELS))
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--size", type=int, default=32, help="image side (default 32)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    ce = nn.CrossEntropyLoss()
    models = {k: MODELS[args.model]().to(device).train() for k in ("hf", "sgd")}
    hf = hfopt.HFOptimizer(models["hf"].parameters())
    sgd = torch.optim.SGD(models["sgd"].parameters(), lr=0.05, momentum=0.9)

    def hf_step():
        def closure():
            outputs = models["hf"](x)
            return ce(outputs, y), outputs
        hf.step(closure)

    def sgd_step():
        sgd.zero_grad()
        ce(models["sgd"](x), y).backward()
        sgd.step()

    steps = {"hf": hf_step, "sgd": sgd_step}
    times = {k: [] for k in steps}
    for r in range(args.repeats + 1):  # round 0 warms up
        for k in (("hf", "sgd") if r % 2 else ("sgd", "hf")):
            _sync(device)
            t0 = time.perf_counter()
            steps[k]()
            _sync(device)
            if r:
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "model": args.model,
              "batch": args.batch, "hf_step_s": med["hf"], "sgd_step_s": med["sgd"],
              "hf_over_sgd": med["hf"] / med["sgd"], "hf_last_step": {
                  k: v for k, v in hf.last_step.items() if isinstance(v, (int, float, str, type(None)))}}
    print(f"{args.model} batch {args.batch} on {result['device']}: HF step {med['hf'] * 1e3:.1f} ms, "
          f"SGD step {med['sgd'] * 1e3:.1f} ms, ratio {result['hf_over_sgd']:.1f} "
          f"({hf.last_step['curvature_products']} curvature products in the last HF step)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
