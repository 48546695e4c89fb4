#!/usr/bin/env python
"""G@v in float32 against G@v under ``torch.autocast(dtype=bfloat16)``, round-robin
in one process (resnet20_bn, train mode, batch 64 by default), with the relative
error of the bfloat16 product against float64.

Then the float32 error by memory layout: hfopt's operator channels-last and
contiguous, autograd's GGN product on the model and on a channels-last copy of
it, and the error of BatchNorm batch statistics (ATen's fused kernel in both
layouts, ``torch.var_mean``) on a ``[batch, 16, 32, 32]`` tensor.

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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import hfopt  # noqa: E402
from bench_curvature import Baselines  # noqa: E402
from models import MODELS  # noqa: E402


def rel_err(out, exact) -> float:
    return math.sqrt(sum(float(((a.double() - b) ** 2).sum()) for a, b in zip(out, exact))) / \
        math.sqrt(sum(float((b ** 2).sum()) for b in exact))


def layout_errors(model, ce, x, y, v, exact) -> dict:
    """float32 G@v against float64, by layout, for hfopt and for autograd."""
    cl = torch.channels_last
    model_cl = copy.deepcopy(model).to(memory_format=cl)
    errors = {
        "hfopt channels-last": rel_err(hfopt.GGN(model, ce, x, y, channels_last=True) @ v, exact),
        "hfopt contiguous": rel_err(hfopt.GGN(model, ce, x, y, channels_last=False) @ v, exact),
        "autograd contiguous": rel_err(Baselines(model, ce, x, y).ag_gv(v), exact),
        "autograd channels-last copy": rel_err(Baselines(model_cl, ce, x.contiguous(memory_format=cl), y).ag_gv(v),
                                               exact),
    }
    for k, e in errors.items():
        print(f"float32 G@v error, {k:28s} {e:.2e}")
    return errors


def batchnorm_statistics_errors(batch: int, device) -> dict:
    """Relative error of float32 per-channel variances against float64."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(batch, 16, 32, 32, generator=gen) * 3 + 5).to(device)
    exact = x.double().var((0, 2, 3), correction=0)
    out = {}
    for name, t in (("contiguous", x), ("channels-last", x.contiguous(memory_format=torch.channels_last))):
        invstd = torch.native_batch_norm(t, None, None, None, None, True, 0.0, 0.0)[2]
        out[f"ATen fused, {name}"] = float(((invstd.double() ** -2 - exact).norm() / exact.norm()))
        out[f"var_mean, {name}"] = float(((torch.var_mean(t, (0, 2, 3), correction=0)[0].double() - exact).norm()
                                          / exact.norm()))
    for k, e in out.items():
        print(f"BatchNorm variance error [{batch},16,32,32], {k:24s} {e:.2e}")
    return out


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
                errors[k] = err = rel_err(out, exact)
                print(f"{k:>9}: relative error of G@v against float64 {err:.2e}")
    med = {k: statistics.median(t) * 1e3 for k, t in times.items()}
    for k, ms in med.items():
        print(f"{k:>9}: {ms:8.1f} ms per G@v (median of {args.repeats})")
    print(f"{args.dtype}/float32 time ratio: {med[args.dtype] / med['float32']:.2f}")
    by_layout = layout_errors(model, ce, x, y, v, exact)
    bn = batchnorm_statistics_errors(args.batch, dev)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": args.device, "model": args.model, "batch": args.batch, "dtype": args.dtype,
            "ms_per_product": med, "relative_error_vs_float64": errors,
            "float32_error_by_layout": by_layout, "batchnorm_variance_error": bn,
            "time_ratio": med[args.dtype] / med["float32"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
