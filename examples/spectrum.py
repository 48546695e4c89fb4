#!/usr/bin/env python
"""Curvature spectrum of a model in models/ on CIFAR-10: top eigenvalues, trace, density.

Examples::

    python examples/spectrum.py                                  # fresh c3d3_bn, train-mode BN, Hessian
    python examples/spectrum.py --checkpoint runs/cifar10-c3d3_bn-hf-s0/checkpoint.pt
    python examples/spectrum.py --model resnet20_bn --curvature ggn --bn eval --batches 4

The data are the first ``--batches`` x ``--batch-size`` images of the CIFAR-10
training files in ../shared/data (or ``--data-dir``): one batch by default,
several through :class:`hfopt.DatasetOperator` (the mean of the per-batch
curvatures; in train mode, of the per-batch objectives).  A model comes
fresh (seeded by ``--seed``) or from an ``examples/train.py`` checkpoint,
whose model name it reads.

Printed and written to ``<out>/spectrum.json``: the ``--k`` largest
eigenvalues (relative tolerance ``--tol``), the trace (Hutchinson or Hutch++)
with its standard error, and two condition-number proxies, ``lambda_max / (trace / n)``
(top eigenvalue over the mean eigenvalue) and ``lambda_1 / lambda_k``; the
smallest eigenvalue is no use as a denominator, being zero (GGN) or negative
(Hessian).  ``<out>/density.png`` is the stochastic-Lanczos-quadrature
density on a log scale.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also puts the repository root on sys.path)

import torch  # noqa: E402
from torch import nn  # noqa: E402

import hfopt  # noqa: E402
from hfopt.curvature import GGN_or_Hessian  # noqa: E402
from hfopt.datasets import load_cifar10  # noqa: E402
from models import DEFAULT_INPUT, build_model  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spectrum.py", description=__doc__.split("\n")[0],
                                formatter_class=common.HelpFormatter)
    p.add_argument("--model", choices=sorted(m for m, s in DEFAULT_INPUT.items() if s == (3, 32, 32)),
                   default="c3d3_bn", help="model (ignored with --checkpoint, which names its own)")
    p.add_argument("--checkpoint", default=None, help="an examples/train.py checkpoint.pt to load")
    p.add_argument("--data-dir", default=str(common.DEFAULT_DATA_DIR), help="folder holding cifar-10-batches-py")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=1, help="batches in the data set (DatasetOperator if > 1)")
    p.add_argument("--bn", choices=("train", "eval"), default="train", help="BatchNorm mode")
    p.add_argument("--curvature", choices=("hessian", "ggn"), default="hessian")
    p.add_argument("--k", type=int, default=5, help="top eigenvalues")
    p.add_argument("--tol", type=float, default=1e-3, help="relative tolerance of the eigenvalues")
    p.add_argument("--trace-samples", type=int, default=100, help="products for the trace")
    p.add_argument("--trace-method", choices=("hutchinson", "hutch++"), default="hutchinson",
                   help="trace estimator")
    p.add_argument("--probes", type=int, default=1, help="SLQ probes")
    p.add_argument("--steps", type=int, default=100, help="Lanczos steps per SLQ probe")
    p.add_argument("--seed", type=int, default=0, help="seed of a fresh model and of the probes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="runs/spectrum", help="folder for spectrum.json and density.png")
    return p


def load_model(args: argparse.Namespace) -> tuple[nn.Module, str]:
    if args.checkpoint is None:
        torch.manual_seed(args.seed)
        return build_model(args.model), args.model
    # weights_only: a checkpoint is plain tensors and containers, never code.
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    name = checkpoint["args"]["model"]
    if checkpoint["args"].get("data") != "cifar10":
        raise ValueError(f"{args.checkpoint} was trained on {checkpoint['args'].get('data')!r}, not cifar10")
    model = build_model(name)
    model.load_state_dict(checkpoint["model"])
    return model, name


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Compute and write the spectrum; returns the JSON record."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, name = load_model(args)
    model.train(args.bn == "train")
    images, labels = load_cifar10(args.data_dir, "train").tensors
    n = args.batches * args.batch_size
    if n > len(labels):
        raise ValueError(f"--batches x --batch-size = {n} exceeds the {len(labels)} training images")
    batches = [(images[i:i + args.batch_size], labels[i:i + args.batch_size]) for i in range(0, n, args.batch_size)]
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    if len(batches) == 1:
        op = GGN_or_Hessian(args.curvature)(model, loss_fn, *batches[0])
    else:
        op = hfopt.DatasetOperator(model, loss_fn, batches, curvature=args.curvature)
    top = hfopt.eigenvalues(op, k=args.k, tol=args.tol, seed=args.seed)
    tr = hfopt.trace(op, args.trace_samples, method=args.trace_method, seed=args.seed)
    density = hfopt.spectral_density(op, probes=args.probes, steps=args.steps, seed=args.seed)
    values = top.eigenvalues.tolist()
    mean_eig = tr.estimate / op.numel
    record = {
        "model": name, "checkpoint": args.checkpoint, "curvature": args.curvature, "bn": args.bn,
        "batches": args.batches, "batch_size": args.batch_size, "parameters": op.numel,
        "loss": float(op.loss),
        "top_eigenvalues": values, "eigen_residuals": top.residuals.tolist(), "lanczos_steps": top.iterations,
        "converged": top.converged, "tol": args.tol,
        "trace": tr.estimate, "trace_stderr": tr.stderr, "trace_method": tr.method, "trace_products": tr.products,
        "condition_proxy_top_over_mean": values[0] / mean_eig if mean_eig > 0 else None,
        "condition_proxy_top_over_kth": values[0] / values[-1] if values[-1] > 0 else None,
        "density": {"grid": density.grid.tolist(), "density": density.density.tolist(), "sigma": density.sigma,
                    "probes": density.probes, "steps": density.steps, "nodes": [t.tolist() for t in density.nodes],
                    "weights": [w.tolist() for w in density.weights]},
        "products": top.products + tr.products + density.products,
        "seconds": time.perf_counter() - start,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{name} {args.curvature}, BN {args.bn}, {n} CIFAR-10 images"
    ax = hfopt.plot_density(density, path=str(out / "density.png"), title=title)
    ax.figure.clf()
    common.write_json(out / "spectrum.json", record)
    proxy = record["condition_proxy_top_over_mean"]
    print(f"{title}: {op.numel} parameters, loss {record['loss']:.4f}")
    print(f"top {args.k} eigenvalues ({top.iterations} Lanczos steps, tol {args.tol:g}): "
          + ", ".join(f"{v:.5g}" for v in values))
    print(f"trace ({tr.method}, {tr.products} products): {tr.estimate:.5g} +- {tr.stderr:.2g}")
    print("condition proxies: lambda_max / mean eigenvalue = "
          + (f"{proxy:.4g}" if proxy is not None else "n/a (trace <= 0)")
          + (f", lambda_1 / lambda_{args.k} = {record['condition_proxy_top_over_kth']:.4g}"
             if record["condition_proxy_top_over_kth"] is not None else ""))
    print(f"wrote {out / 'spectrum.json'} and {out / 'density.png'} ({record['seconds']:.1f} s, "
          f"{record['products']} products)")
    return record


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(None if argv is None else [str(a) for a in argv])
    for name in ("batch_size", "batches", "k", "trace_samples", "probes", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.bn == "train" and args.batch_size < 2:
        parser.error("--batch-size must be >= 2 with train-mode BatchNorm")
    return run(args)


if __name__ == "__main__":
    main()
