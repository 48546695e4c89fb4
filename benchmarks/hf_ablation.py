#!/usr/bin/env python
"""Which HFOptimizer settings make each step worth more at large batch: steps to target per setting.

    python benchmarks/hf_ablation.py                       # every setting below, 2 at a time
    python benchmarks/hf_ablation.py --only defaults cb512-cg50-lambda0.01 --jobs 1
    python benchmarks/hf_ablation.py --collect             # the table from the runs already made

Every setting is one ``examples/scaling.py`` run of HF alone, in its own
process with one thread (steps to target do not depend on timing, so two runs
may share the machine): CIFAR-10 ``data_batch_1``, c3d3_bn, the first
``--train-samples`` training images, batch ``--batch``, full-train loss (eval
mode, BatchNorm statistics re-estimated on 2048 images) measured after every
step, until it reaches ``--target`` or ``--max-epochs`` pass.  Each setting is
HFOptimizer's defaults plus the keywords listed for it.

Outputs in ``--out``: one folder per setting (scaling.py's results.json,
results.md, log) and ``ablation.md``, the table: steps to target, seconds,
mean CG iterations, the final lambda, the lowest rho of an accepted step (a
negative one would be an accepted step that made the batch loss worse) and the
last train loss over the best one reached (late divergence shows as > 2).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]

# The faster configuration, the base of the damping ablations: CG capped at 50 iterations
# on a 512-sample curvature batch.
FAST = {"curvature_batch": 512, "cg_max_iterations": 50}
# name -> HFOptimizer keywords added to the defaults (the defaults as they are in hfopt today).
SETTINGS: Dict[str, Dict[str, Any]] = {
    "defaults": {},
    "cb512-cg50": dict(FAST),
    "cb512-cg50-lambda0.1": {**FAST, "damping": 0.1},
    "cb512-cg50-lambda0.01": {**FAST, "damping": 0.01},
    "cb512-cg50-hessian": {**FAST, "curvature": "hessian"},
    "cb512-cg50-no-warm-start": {**FAST, "warm_start": 0.0},
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME", help=f"settings: {', '.join(SETTINGS)}")
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--train-samples", type=int, default=8192)
    parser.add_argument("--target", type=float, default=1.1)
    parser.add_argument("--max-epochs", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=1500.0, help="training seconds per setting at most")
    parser.add_argument("--jobs", type=int, default=2, help="settings run at once, one thread each")
    parser.add_argument("--collect", action="store_true",
                        help="run nothing: tabulate the settings' results already in --out")
    parser.add_argument("--out", default="results/hf_ablation")
    parser.add_argument("--data-dir", default=None)
    return parser


def command(name: str, args: argparse.Namespace) -> List[str]:
    options = [f"{k}={v!r}" for k, v in SETTINGS[name].items()]
    cmd = [sys.executable, str(ROOT / "examples" / "scaling.py"), "--optimizers", "hf", "--batch-sizes",
           str(args.batch), "--train-samples", str(args.train_samples), "--target", str(args.target),
           "--eval-every-examples", str(args.batch), "--precise-bn", "2048", "--max-epochs", str(args.max_epochs),
           "--budget", str(args.budget), "--threads", "1", "--seed", str(args.seed), "--out", str(folder(name, args))]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    for option in options:
        cmd += ["--hf-option", option]
    return cmd


def folder(name: str, args: argparse.Namespace) -> Path:
    return Path(args.out) / name


def collect(name: str, args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    path = folder(name, args) / "results.json"
    return json.loads(path.read_text())["runs"][str(args.batch)]["hf"] if path.is_file() else None


def run(name: str, args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    out = folder(name, args)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.txt", "w") as log:
        done = subprocess.run(command(name, args), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode != 0:
        print(f"{name}: failed (exit {done.returncode}), see {out / 'log.txt'}", flush=True)
        return None
    outcome = json.loads((out / "results.json").read_text())["runs"][str(args.batch)]["hf"]
    print(f"{name}: {'reached' if outcome['reached'] else 'NOT reached'} in {outcome['steps']} steps", flush=True)
    return outcome


STEP_LINE = re.compile(r"step (\d+): train loss ([\d.]+), ([\d.]+) s; lambda ([\d.e+-]+), rho ([\d.e+-]+|nan), "
                       r"CG (\d+) \((\w+)\), step length ([\d.e+-]+)")


def stopped_early(name: str, args: argparse.Namespace) -> str:
    """A run stopped by hand before it wrote results.json: what its log shows."""
    path = folder(name, args) / "log.txt"
    steps = [m.groups() for m in STEP_LINE.finditer(path.read_text())] if path.is_file() else []
    if not steps:
        return "not run"
    declined = sum(float(s[7]) == 0 for s in steps)
    rhos = ", ".join(s[4] for s in steps)
    return (f"stopped by hand after {len(steps)} steps: train loss {steps[-1][1]}, {declined} declined, "
            f"rho {rhos}, CG stop {steps[-1][6]}")


def summary(name: str, outcome: Optional[Dict[str, Any]], args: argparse.Namespace) -> str:
    options = ", ".join(f"{k}={v!r}" for k, v in SETTINGS[name].items()) or "-"
    if outcome is None:
        return f"| {name} | {options} | {stopped_early(name, args)} | | | | | |"
    log = outcome["step_log"]
    losses = [h["train_loss"] for h in outcome["history"]]
    accepted = [r["rho"] for r in log if r.get("accepted") and r.get("rho") is not None]
    lowest_rho = min(accepted) if accepted else math.nan
    finite = [v for v in losses if v is not None and math.isfinite(v)]
    last_over_best = losses[-1] / min(finite) if finite and losses[-1] else math.nan
    steps = str(outcome["steps"]) if outcome["reached"] else f"> {outcome['steps']}"
    return (f"| {name} | {options} | {steps} | {outcome['seconds']:.0f} | "
            f"{outcome.get('hf_mean_cg_iterations', math.nan):.1f} | {log[-1].get('damping_next', math.nan):.3g} | "
            f"{lowest_rho:.2f} | {last_over_best:.2f} |")


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    names = args.only or list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    if args.collect:
        outcomes = {n: collect(n, args) for n in names}
    else:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            outcomes = dict(zip(names, pool.map(lambda n: run(n, args), names)))
    lines = [f"# HF at batch {args.batch}: steps to full-train loss {args.target:g}", "",
             f"CIFAR-10 data_batch_1, c3d3_bn, {args.train_samples} training images, seed {args.seed}; "
             "HFOptimizer's defaults plus the keywords shown; one thread per run.", "",
             "| setting | keywords | steps | seconds | mean CG its | final lambda | lowest accepted rho "
             "| last / best loss |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [summary(n, outcomes[n], args) for n in names]
    text = "\n".join(lines) + "\n"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "ablation.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
