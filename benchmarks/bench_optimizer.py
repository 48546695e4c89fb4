#!/usr/bin/env python
"""HFOptimizer on c3d3_bn: time per step, and loss against SGD with momentum.

Two measurements, both float32, train mode, ``CrossEntropyLoss``:

1. **Time per HF step** on ``models.MODELS["c3d3_bn"]`` with one batch of
   ``--batch`` random 3x32x32 inputs and random labels (fixed seed): after
   ``--warmup`` untimed steps, ``--timed`` steps are timed; reported are the
   median ``last_step["wall_time"]``, the share spent building the curvature
   operator and in curvature products (``curvature_time / wall_time``), CG
   iterations and closure evaluations per step.

2. **Loss after ``--steps`` steps** of HF and of ``torch.optim.SGD(lr=0.05,
   momentum=0.9)`` on real CIFAR-10: the first ``--batch * --batches`` training
   images, cut into ``--batches`` fixed batches that both optimizers visit in
   the same order (step t uses batch t mod batches), from the same initial
   weights.  Reported: the mean train-mode loss over those batches after the
   last step (measured on a copy, so nothing is changed), the eval-mode loss
   with the running statistics, the training accuracy, the wall time (without
   the evaluations), and the subset loss every ``--eval-every`` steps.

HF options are the defaults except ``cg_max_iterations`` (``--cg-max``,
default 50; Martens' 250 would make a CPU step several times longer).  With
``--hf-steps`` smaller than ``--steps``, HF stops early and the report says so.

Usage::

    python benchmarks/bench_optimizer.py                          # 50 steps each
    python benchmarks/bench_optimizer.py --hf-steps 20            # HF cut short
    python benchmarks/bench_optimizer.py --timed 3 --steps 0      # timing only
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hfopt  # noqa: E402
from hfopt.datasets import load_cifar10  # noqa: E402
from models import MODELS  # noqa: E402


def closure_for(model, loss_fn, x, y):
    def closure():
        outputs = model(x)
        return loss_fn(outputs, y), outputs
    return closure


def new_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS["c3d3_bn"]().float()


def time_steps(args) -> dict:
    model = new_model(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    opt = hfopt.HFOptimizer(model.parameters(), cg_max_iterations=args.cg_max)
    closure = closure_for(model, nn.CrossEntropyLoss(), x, y)
    rows = []
    for k in range(args.warmup + args.timed):
        opt.step(closure)
        s = opt.last_step
        row = {key: s[key] for key in ("wall_time", "curvature_time", "cg_iterations", "curvature_products",
                                       "evaluations", "loss_before", "damping", "engine")}
        if k >= args.warmup:
            rows.append(row)
        print(f"  timing step {k}{' (warm-up)' if k < args.warmup else ''}: {row['wall_time']:.2f} s, "
              f"curvature {row['curvature_time']:.2f} s, CG {row['cg_iterations']}, "
              f"evaluations {row['evaluations']}", flush=True)
    wall = [r["wall_time"] for r in rows]
    share = [r["curvature_time"] / r["wall_time"] for r in rows]
    per_product = [r["curvature_time"] / max(r["curvature_products"], 1) for r in rows]
    return dict(step_seconds_median=statistics.median(wall), step_seconds=wall,
                curvature_share_median=statistics.median(share),
                seconds_per_curvature_product_median=statistics.median(per_product),
                cg_iterations=[r["cg_iterations"] for r in rows], evaluations=[r["evaluations"] for r in rows],
                engine=rows[0]["engine"])


@torch.no_grad()
def evaluate(model, batches, loss_fn) -> dict:
    probe = copy.deepcopy(model)  # train-mode forwards would move the running statistics
    probe.train()
    train_loss = sum(float(loss_fn(probe(x), y)) for x, y in batches) / len(batches)
    correct = sum(int((probe(x).argmax(1) == y).sum()) for x, y in batches)
    probe.eval()
    eval_loss = sum(float(loss_fn(probe(x), y)) for x, y in batches) / len(batches)
    n = sum(len(y) for _, y in batches)
    return dict(train_mode_loss=train_loss, eval_mode_loss=eval_loss, train_mode_accuracy=correct / n)


def compare(args) -> dict:
    data = load_cifar10(args.data)
    n = args.batch * args.batches
    xs, ys = data.tensors[0][:n], data.tensors[1][:n]
    batches = [(xs[i:i + args.batch], ys[i:i + args.batch]) for i in range(0, n, args.batch)]
    loss_fn = nn.CrossEntropyLoss()
    init = new_model(args.seed).state_dict()
    start = evaluate(_with(init), batches, loss_fn)
    print(f"  initial: {start}", flush=True)
    out = {"initial": start}

    # HF
    model = _with(init)
    opt = hfopt.HFOptimizer(model.parameters(), cg_max_iterations=args.cg_max)
    t0 = time.perf_counter()
    hf_losses, hf_curve, eval_time = [], {}, 0.0
    hf_steps = args.steps if args.hf_steps is None else args.hf_steps
    for t in range(hf_steps):
        x, y = batches[t % len(batches)]
        hf_losses.append(float(opt.step(closure_for(model, loss_fn, x, y))))
        s = opt.last_step
        print(f"  HF step {t + 1}: batch loss {hf_losses[-1]:.4f} -> {s['loss_after']:.4f}, "
              f"lambda {s['damping']:.3g}, CG {s['cg_iterations']}, rho {s['rho']:.3f}, "
              f"step {s['line_search_step']:.3f}, {s['wall_time']:.1f} s", flush=True)
        if args.eval_every and (t + 1) % args.eval_every == 0:
            e0 = time.perf_counter()
            hf_curve[t + 1] = evaluate(model, batches, loss_fn)["train_mode_loss"]
            eval_time += time.perf_counter() - e0
            print(f"  HF after {t + 1} steps: train-mode loss on the subset {hf_curve[t + 1]:.4f}", flush=True)
    hf_time = time.perf_counter() - t0 - eval_time
    out["hf"] = dict(steps=hf_steps, seconds=hf_time, batch_losses=hf_losses, subset_loss_curve=hf_curve,
                     **evaluate(model, batches, loss_fn))

    # SGD with momentum, the same batches in the same order, the same start
    model = _with(init)
    sgd = torch.optim.SGD(model.parameters(), lr=args.sgd_lr, momentum=0.9)
    t0 = time.perf_counter()
    sgd_losses, checkpoints, sgd_curve, eval_time = [], {}, {}, 0.0
    for t in range(args.steps):
        x, y = batches[t % len(batches)]
        sgd.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        sgd.step()
        sgd_losses.append(float(loss.detach()))
        e0 = time.perf_counter()
        if t + 1 == hf_steps and hf_steps < args.steps:
            checkpoints[hf_steps] = evaluate(model, batches, loss_fn)
        if args.eval_every and (t + 1) % args.eval_every == 0:
            sgd_curve[t + 1] = evaluate(model, batches, loss_fn)["train_mode_loss"]
        eval_time += time.perf_counter() - e0
    sgd_time = time.perf_counter() - t0 - eval_time
    out["sgd"] = dict(steps=args.steps, seconds=sgd_time, batch_losses=sgd_losses, subset_loss_curve=sgd_curve,
                      **evaluate(model, batches, loss_fn))
    if checkpoints:
        out["sgd_at_hf_steps"] = checkpoints[hf_steps]
    return out


def _with(state) -> nn.Module:
    model = MODELS["c3d3_bn"]().float()
    model.load_state_dict(state)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="/work/shared/data/cifar-10-batches-py")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batches", type=int, default=10, help="CIFAR-10 batches cycled through (first batch*k images)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--hf-steps", type=int, default=None, help="HF steps if fewer than --steps")
    p.add_argument("--cg-max", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=10, help="subset loss every N steps (0: only at the end)")
    p.add_argument("--sgd-lr", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timed", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {load:.1f}; HF defaults except cg_max_iterations={args.cg_max}", flush=True)
    results = {"args": vars(args), "threads": torch.get_num_threads(), "load_average": load}
    if args.timed > 0:
        print(f"[1] time per HF step, c3d3_bn, batch {args.batch} random 3x32x32", flush=True)
        results["timing"] = t = time_steps(args)
        print(f"HF step time: {t['step_seconds_median']:.2f} s (median of {args.timed}); curvature share "
              f"{100 * t['curvature_share_median']:.0f}% (curvature_time / wall_time); "
              f"{t['seconds_per_curvature_product_median'] * 1e3:.0f} ms per curvature product; "
              f"engine {t['engine']}", flush=True)
    if args.steps > 0:
        print(f"[2] {args.steps} steps on the first {args.batch * args.batches} CIFAR-10 images "
              f"({args.batches} batches of {args.batch})", flush=True)
        results["comparison"] = c = compare(args)
        hf, sgd = c["hf"], c["sgd"]
        print(f"HF  after {hf['steps']} steps: train-mode loss {hf['train_mode_loss']:.4f}, eval-mode loss "
              f"{hf['eval_mode_loss']:.4f}, accuracy {hf['train_mode_accuracy']:.3f}, {hf['seconds']:.0f} s")
        if "sgd_at_hf_steps" in c:
            s = c["sgd_at_hf_steps"]
            print(f"SGD after {hf['steps']} steps: train-mode loss {s['train_mode_loss']:.4f}, eval-mode loss "
                  f"{s['eval_mode_loss']:.4f}, accuracy {s['train_mode_accuracy']:.3f}")
        print(f"SGD after {sgd['steps']} steps: train-mode loss {sgd['train_mode_loss']:.4f}, eval-mode loss "
              f"{sgd['eval_mode_loss']:.4f}, accuracy {sgd['train_mode_accuracy']:.3f}, {sgd['seconds']:.1f} s")
        if hf["subset_loss_curve"] or sgd["subset_loss_curve"]:
            steps = sorted(set(hf["subset_loss_curve"]) | set(sgd["subset_loss_curve"]))
            print("train-mode loss on the subset by step: " + ", ".join(
                f"{k}: HF {hf['subset_loss_curve'].get(k, float('nan')):.3f} / SGD "
                f"{sgd['subset_loss_curve'].get(k, float('nan')):.3f}" for k in steps))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
