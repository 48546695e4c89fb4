#!/usr/bin/env python
"""G@v in float32 against G@v under ``torch.autocast(dtype=bfloat16)``, round-robin
in one process (resnet20_bn, train mode, batch 64 by default), with the relative
error of the bfloat16 product against float64.

    python benchmarks/bench_mixed_precision.py [--device cpu|cuda] [--model resnet20_bn] [--batch 64] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import hfopt  # noqa: E402
from models import MODELS  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="resnet20_bn", choices=sorted(MODELS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--size", type=int, default=32, help="image side (default 32)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev, low = torch.device(args.device), getattr(torch, args.dtype)
    model = MODELS[args.model]().float().train().to(dev)
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    ce = nn.CrossEntropyLoss()
    v = [torch.randn_like(p) for p in model.parameters()]
    ops = {"float32": hfopt.GGN(model, ce, x, y)}
    with torch.autocast(args.device, dtype=low):
        ops[args.dtype] = hfopt.GGN(model, ce, x, y)
    exact = hfopt.GGN(copy.deepcopy(model).double(), ce, x.double(), y) @ [t.double() for t in v]
    times = {k: [] for k in ops}
    errors = {}
    names = list(ops)
    for r in range(args.repeats + 1):  # the first round warms up
        for k in (names if r % 2 == 0 else names[::-1]):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = ops[k] @ v
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if r:
                times[k].append(time.perf_counter() - t0)
            if r == 1:
                err = math.sqrt(sum(float(((a.double() - b) ** 2).sum()) for a, b in zip(out, exact))) / \
                    math.sqrt(sum(float((b ** 2).sum()) for b in exact))
                errors[k] = err
                print(f"{k:>9}: relative error of G@v against float64 {err:.2e}")
    med = {k: statistics.median(t) * 1e3 for k, t in times.items()}
    for k, ms in med.items():
        print(f"{k:>9}: {ms:8.1f} ms per G@v (median of {args.repeats})")
    print(f"{args.dtype}/float32 time ratio: {med[args.dtype] / med['float32']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": args.device, "model": args.model, "batch": args.batch, "dtype": args.dtype,
            "ms_per_product": med, "relative_error_vs_float64": errors,
            "time_ratio": med[args.dtype] / med["float32"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
