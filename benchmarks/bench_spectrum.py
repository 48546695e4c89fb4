#!/usr/bin/env python
"""Hessian spectra side by side: hfopt against PyHessian and hessian-eigenthings.

    pip install -e ".[bench]"      # pyhessian, hessian-eigenthings (install them with --no-deps
                                    # if pip would otherwise replace the CPU build of torch)
    flock /tmp/hfopt-timing.lock python benchmarks/bench_spectrum.py \\
        --models c3d3_bn --batches 1 --modes eval,train --tasks top1,top5,trace

One process.  Per scenario (model, data = the first 128 x B CIFAR-10 training
images in B batches, BatchNorm mode; float32, CrossEntropyLoss) each task runs
on every tool, the order rotating between repeats, and the median time per
tool is reported, construction of the operator or of the peer's object
included.  Tasks:

* ``top1``, ``top5``: the largest Hessian eigenvalues at relative tolerance
  ``--tol`` (1e-3).  hfopt: :func:`hfopt.eigenvalues` (Lanczos; ``hfopt-eigsh``
  is SciPy's ARPACK on ``to_scipy()``, the alternative it was chosen over).
  PyHessian: ``hessian.eigenvalues(top_n, tol)``, deflated power iteration,
  tol on the change of the estimate.  hessian-eigenthings: its ``lanczos``
  with ``max_iter`` = the Lanczos steps hfopt needed (its default, ``2k``
  steps, does not converge: shown as ``eigenthings-default``, value only).
* ``trace``: 100 Rademacher probes.  hfopt: Hutchinson (the peers' method) and
  Hutch++ (its default); PyHessian ``trace(maxIter=100)`` with its early stop
  disabled; hessian-eigenthings ``trace(method="hutchinson")``.

With ``--repeats`` above 1 the products and values are the last round's (PyHessian
starts from an unseeded random vector, so its count varies), products/s is
that count over the median time.

Before each peer run the parameters, buffers and train/eval mode are
snapshotted; whether the run changed them is reported, then they are restored.
BatchNorm's running statistics are first set by a pass over 1024 other
training images, so eval mode is a meaningful function.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import hfopt  # noqa: E402
from hfopt.datasets import load_cifar10  # noqa: E402
from models import build_model  # noqa: E402

TASKS = ("top1", "top5", "trace")
TOOLS = ("hfopt", "hfopt-eigsh", "pyhessian", "eigenthings")
CE = nn.CrossEntropyLoss()


# --------------------------------------------------------------------------- setup
def make_model(name: str, images: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = None  # cumulative average over the calibration pass
    model.train()
    with torch.no_grad():
        for i in range(0, len(images), 128):
            model(images[i:i + 128])
    for m in norms:
        m.momentum = 0.1
    return model


def state_of(model: nn.Module) -> dict:
    return {"tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "modes": [m.training for m in model.modules()]}


def restore(model: nn.Module, state: dict) -> Dict[str, bool]:
    """Put ``state`` back; report what the run had changed."""
    now = model.state_dict()
    changed_buffers = [k for k, v in state["tensors"].items() if not torch.equal(now[k], v)]
    mode_changed = [m.training for m in model.modules()] != state["modes"]
    with torch.no_grad():
        model.load_state_dict(state["tensors"])
    for m, mode in zip(model.modules(), state["modes"]):
        m.training = mode
    model.zero_grad(set_to_none=True)
    return {"state_changed": bool(changed_buffers), "changed": changed_buffers[:3], "mode_changed": mode_changed}


# --------------------------------------------------------------------------- tools
class Counter:
    def __init__(self):
        self.n = 0


def run_hfopt(model, batches, task, tol, steps_out: dict, method="lanczos"):
    op = hfopt.Hessian(model, CE, *batches[0]) if len(batches) == 1 else \
        hfopt.DatasetOperator(model, CE, batches, curvature="hessian")
    if task == "trace":
        hutch = hfopt.trace(op, 100, method="hutchinson", progress=False)
        return {"values": [hutch.estimate], "stderr": hutch.stderr, "products": hutch.products}
    k = 1 if task == "top1" else 5
    res = hfopt.eigenvalues(op, k=k, tol=tol, method=method, progress=False)
    if method == "lanczos":
        steps_out[task] = res.iterations
    return {"values": res.eigenvalues.tolist(), "products": res.products, "converged": res.converged}


def run_hfopt_hutchpp(model, batches, task, tol, steps_out):
    op = hfopt.Hessian(model, CE, *batches[0]) if len(batches) == 1 else \
        hfopt.DatasetOperator(model, CE, batches, curvature="hessian")
    res = hfopt.trace(op, 100, method="hutch++", progress=False)
    return {"values": [res.estimate], "stderr": res.stderr, "products": res.products}


def run_pyhessian(model, batches, task, tol, steps_out):
    import importlib

    ph = importlib.import_module("pyhessian.hessian")  # the package re-exports the class under the module's name

    count = Counter()
    plain, loader = ph.hessian_vector_product, ph.hessian.dataloader_hv_product

    def counted(*a, **kw):
        count.n += 1
        return plain(*a, **kw)

    def counted_loader(self, v):
        count.n += 1
        return loader(self, v)

    ph.hessian_vector_product, ph.hessian.dataloader_hv_product = counted, counted_loader
    try:
        if len(batches) == 1:
            h = ph.hessian(model, CE, data=batches[0], cuda=False)
        else:
            h = ph.hessian(model, CE, dataloader=batches, cuda=False)
        if task == "trace":
            values = h.trace(maxIter=100, tol=-math.inf)  # never stops early: 100 probes like the others
            return {"values": [float(sum(values) / len(values))],
                    "stderr": statistics.stdev(values) / math.sqrt(len(values)), "products": count.n}
        vals, _ = h.eigenvalues(maxIter=100, tol=tol, top_n=1 if task == "top1" else 5)
        return {"values": sorted([float(v) for v in vals], reverse=True), "products": count.n}
    finally:
        ph.hessian_vector_product, ph.hessian.dataloader_hv_product = plain, loader


def eigenthings_operator(model, batches, count: Counter):
    import hessian_eigenthings as he

    op = he.HessianOperator(model, batches, he.supervised_loss(CE))
    matvec = op.matvec

    def counted(v):
        count.n += 1
        return matvec(v)

    op.matvec = counted
    return op


def run_eigenthings(model, batches, task, tol, steps_out, default=False):
    import hessian_eigenthings as he

    count = Counter()
    op = eigenthings_operator(model, batches, count)
    if task == "trace":
        res = he.trace(op, num_matvecs=100, method="hutchinson", seed=0)
        return {"values": [res.estimate], "stderr": res.stderr, "products": count.n}
    k = 1 if task == "top1" else 5
    # Same Krylov dimension as hfopt needed; the default (2k steps) is run apart.
    max_iter = None if default else max(steps_out.get(task, 2 * k), k + 1)
    res = he.lanczos(op, k=k, max_iter=max_iter, tol=tol, which="LA", seed=0)
    return {"values": sorted(res.eigenvalues.tolist(), reverse=True), "products": count.n,
            "converged": bool(res.converged.all())}


def contenders(tools, task) -> Dict[str, Callable]:
    out: Dict[str, Callable] = {}
    for tool in tools:
        if tool == "hfopt":
            out["hfopt"] = run_hfopt
            if task == "trace":
                out["hfopt-hutch++"] = run_hfopt_hutchpp
        elif tool == "hfopt-eigsh":
            if task != "trace":
                out["hfopt-eigsh"] = lambda *a: run_hfopt(*a, method="eigsh")
        elif tool == "pyhessian":
            out["pyhessian"] = run_pyhessian
        elif tool == "eigenthings":
            out["eigenthings"] = run_eigenthings
    return out


# --------------------------------------------------------------------------- running
def scenario(name, n_batches, mode, args, images, labels, calib):
    model = make_model(name, calib)
    model.train(mode == "train")
    batches = [(images[i * 128:(i + 1) * 128], labels[i * 128:(i + 1) * 128]) for i in range(n_batches)]
    rows = []
    for task in args.tasks:
        steps: dict = {}
        # hfopt first, untimed: it sets the Krylov dimension hessian-eigenthings is given.
        if "eigenthings" in args.tools and task != "trace":
            run_hfopt(model, batches, task, args.tol, steps)
        tools = contenders(args.tools, task)
        times: Dict[str, List[float]] = {t: [] for t in tools}
        results: Dict[str, dict] = {}
        names = list(tools)
        for r in range(args.repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for tool in order:
                before = state_of(model)
                t0 = time.perf_counter()
                out = tools[tool](model, batches, task, args.tol, steps)
                times[tool].append(time.perf_counter() - t0)
                out.update(restore(model, before))
                results[tool] = out
                print(f"  {name} x{n_batches} {mode} {task} {tool}: {times[tool][-1]:.2f} s, "
                      f"{out['products']} products, {out['values'][:5]}",
                      flush=True)
        if "eigenthings" in args.tools and task != "trace":
            before = state_of(model)
            out = run_eigenthings(model, batches, task, args.tol, steps, default=True)
            out.update(restore(model, before))
            results["eigenthings-default"] = out
            times["eigenthings-default"] = [math.nan]
        base = statistics.median(times["hfopt"]) if "hfopt" in times else math.nan
        ref = results.get("hfopt", {}).get("values")
        for tool, out in results.items():
            t = statistics.median(times[tool])
            agree = None
            if ref is not None:
                n = min(len(ref), len(out["values"]))
                agree = max(abs(a - b) / abs(b) for a, b in zip(out["values"][:n], ref[:n]))
            rows.append({"model": name, "batches": n_batches, "bn": mode, "task": task, "tool": tool,
                         "values": out["values"], "stderr": out.get("stderr"), "seconds": t,
                         "samples": times[tool], "products": out["products"],
                         "products_per_s": out["products"] / t if t == t and t > 0 else None,
                         "rel_diff_vs_hfopt": agree, "time_vs_hfopt": t / base if base == base else None,
                         "converged": out.get("converged"), "state_changed": out["state_changed"],
                         "changed": out["changed"], "mode_changed": out["mode_changed"]})
    return rows


def fmt(x, spec):
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(rows, command: str) -> str:
    lines = [f"Command: `{command}`", "",
             "| model | data | BN | task | tool | value | time (s) | products | products/s | "
             "rel. diff vs hfopt | time / hfopt | buffers changed | mode changed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["task"] == "trace":
            value = f"{r['values'][0]:.4g} ± {r['stderr']:.2g}"
        else:
            value = ", ".join(f"{v:.4f}" for v in r["values"][:5])
        lines.append(f"| {r['model']} | {r['batches']}x128 | {r['bn']} | {r['task']} | {r['tool']} | {value} | "
                     f"{fmt(r['seconds'], '.2f')} | {r['products']} | {fmt(r['products_per_s'], '.2f')} | "
                     f"{fmt(r['rel_diff_vs_hfopt'], '.1e')} | {fmt(r['time_vs_hfopt'], '.2f')} | "
                     f"{'yes' if r['state_changed'] else 'no'} | {'yes' if r['mode_changed'] else 'no'} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="c3d3_bn,resnet20_bn")
    p.add_argument("--batches", default="1,4", help="comma-separated data-set sizes, in batches of 128")
    p.add_argument("--modes", default="eval,train")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--tools", default=",".join(TOOLS))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "spectrum"))
    args = p.parse_args(argv)
    for key, allowed in (("tasks", TASKS), ("tools", TOOLS), ("modes", ("eval", "train"))):
        setattr(args, key, [s for s in getattr(args, key).split(",") if s])
        bad = [s for s in getattr(args, key) if s not in allowed]
        if bad:
            p.error(f"--{key}: unknown {bad}; choose from {allowed}")
    args.models = [s for s in args.models.split(",") if s]
    args.batches = [int(s) for s in args.batches.split(",") if s]
    if args.repeats < 1 or any(b < 1 or b > 8 for b in args.batches):
        p.error("--repeats must be >= 1 and each of --batches in 1..8")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_cifar10(args.data_dir, "train")
    images, labels = data.tensors
    calib = images[2048:3072]
    rows = []
    for name in args.models:
        for n_batches in args.batches:
            for mode in args.modes:
                rows += scenario(name, n_batches, mode, args, images, labels, calib)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_spectrum.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"command": command, "torch": torch.__version__, "threads": args.threads, "tol": args.tol,
            "repeats": args.repeats, "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, command))
    print(markdown(rows, command))


if __name__ == "__main__":
    main()
