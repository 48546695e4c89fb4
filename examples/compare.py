#!/usr/bin/env python
"""Hessian-free vs SGD with momentum, Adam, SOAP, L-BFGS and K-FAC on one wall-clock budget.

::

    python examples/compare.py                        # digits, ~9 minutes on 2 CPU cores
    python examples/compare.py --data cifar10 --model c3d3_bn --budget 900
    python examples/compare.py --optimizers hf sgd --seeds 0 1 2
    tensorboard --logdir runs/compare-digits          # the runs; the grid is in runs/compare-digits-grid

Protocol
--------
1. Learning-rate grid (first seed only): SGD with momentum 0.9 is trained at
   each of ``--sgd-lrs``, the smallest for ``--grid-budget`` seconds and the
   others for as many steps as it took (equal steps cost equal time on an
   idle machine and keep the choice independent of other load); the rate
   with the best validation accuracy (ties: lowest validation loss) is kept.
   Adam (``--adam-lrs``), SOAP (``--soap-lrs``; ``pytorch_optimizer.SOAP``,
   a second-order peer that preconditions Adam in Shampoo's eigenbasis),
   L-BFGS (``--lbfgs-lrs``; ``torch.optim.LBFGS`` with its strong-Wolfe line
   search, at batch 512) and K-FAC (``--kfac-lrs``; ASDL's, see
   ``examples/kfac.py``) get the same treatment.  Every run but HF's, grid
   points included, warms its learning rate up linearly over the first
   ``--warmup-steps`` steps.  Hessian-free has no learning rate and is not
   tuned.
2. Every optimizer is trained with every seed for ``--budget`` seconds of
   training time (evaluation excluded, see train.py), same model, data split
   and initialisation (the seed fixes the initial weights and the shuffles).
3. Outputs in ``--out``: ``curves.png`` (train loss vs epochs, train loss vs
   seconds, test accuracy vs epochs), ``results.md`` (a table) and
   ``results.json`` (everything, per-epoch histories included).

TensorBoard
-----------
The runs sit side by side in ``--logdir`` (``<optimizer>-s<seed>``), on
train.py's axes: x is training examples seen, "Relative" time is training
seconds.  The grid runs go to the sibling folder ``<logdir>-grid``
(``<optimizer>-lr<lr>``), so that ``tensorboard --logdir <logdir>`` shows the
compared runs only.  ``<logdir>`` itself holds a layout for the Custom
Scalars tab: one chart per quantity (log10 and plain full-pass train loss,
mini-batch loss, validation and test loss and accuracy, training seconds),
each drawing every optimizer, and a section of HF's diagnostics (log10
lambda, rho, actual and predicted reductions, CG iterations, line-search
step, seconds per step).  The full-pass losses have one point per
evaluation; the log10 chart is the one to read with TensorBoard's default
smoothing, which there averages exponents rather than values.

"Train loss" is train.py's: the cross-entropy over the whole training set in
eval mode (BatchNorm statistics re-estimated on the training data) after a
step, an epoch or the run.  HF and L-BFGS, a few steps per epoch, are
evaluated after every step, so their curves are dense enough for smoothing;
SGD, Adam, SOAP and K-FAC, whose epochs cost less than an evaluation, every 5th epoch on digits and
every 2nd on CIFAR-10 (``--first-order-eval-every``).  The "reach" column gives, for each optimizer,
the training seconds and epochs after which its train loss first got at or
below the lowest train loss SGD reached (same seed), at those evaluations.

Hessian-free settings
---------------------
HFOptimizer's defaults with train.py's HF batch of 512, on either data set;
``--hf-args`` adds train.py options for the HF runs.

Timing
------
All runs of a comparison are sequential, in one process.  On digits they use
one torch thread (``--threads``): the 8x8 images gain little from a second
one, and when anything else runs on the machine an oversubscribed second
thread slows these small kernels down by an order of magnitude, which would
make the wall-clock comparison meaningless.  CIFAR-10 uses torch's default.
With the default 45 s per optimizer, six optimizers and 17 x 11.25 s of
learning-rate grid, the digits comparison takes about 9 minutes, evaluations
included.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also puts the repository root on sys.path)
import train  # noqa: E402

DEFAULT_BUDGET = {"digits": 45.0, "cifar10": 600.0}
DEFAULT_SGD_LRS = (1.0, 0.3, 0.1, 0.03, 0.01)
DEFAULT_ADAM_LRS = (3e-3, 1e-3, 3e-4)
DEFAULT_SOAP_LRS = (1e-2, 3e-3, 1e-3)
DEFAULT_LBFGS_LRS = (1.0, 0.3, 0.1)
DEFAULT_KFAC_LRS = (0.01, 0.003, 0.001)
QUICK = {"budget": 2.0, "grid_budget": 0.4}
# SGD/Adam/SOAP epochs take less time than an evaluation pass (20k images on
# CIFAR-10, a few hundred first-order epochs on digits); evaluating every 5th /
# 2nd epoch keeps the evaluation overhead near or below the training time.
FIRST_ORDER_EVAL_EVERY = {"digits": 5, "cifar10": 2}
# HF and L-BFGS take a few steps per epoch while the loss falls decades: one point per epoch is
# too sparse for TensorBoard's default smoothing (0.6) to follow, so they are evaluated every step.
FEW_STEP_EVAL = ["--eval-every-steps", 1]
# One thread on digits: the 8x8 images gain little from intra-op parallelism,
# and an oversubscribed second thread (any other load on the machine) slows
# small kernels down many times over, which would make the timings meaningless.
DEFAULT_THREADS = {"digits": 1, "cifar10": None}
COLORS = {"hf": "tab:red", "sgd": "tab:blue", "adam": "tab:green", "soap": "tab:purple", "lbfgs": "tab:orange",
          "kfac": "tab:brown"}
LABELS = {"hf": "Hessian-free", "sgd": "SGD + momentum", "adam": "Adam", "soap": "SOAP", "lbfgs": "L-BFGS",
          "kfac": "K-FAC"}
# Custom Scalars charts: each draws the matching tag of every run.  The plugin
# matches tags with re.match (anchored at the start only), hence the "$".
LAYOUT = {
    "compare (x: training examples seen)": {
        "log10 train loss (full pass, eval mode)": ["Multiline", [r"^train/log10_epoch_loss$"]],
        "train loss (full pass, eval mode)": ["Multiline", [r"^train/epoch_loss$"]],
        "mini-batch loss (before each step)": ["Multiline", [r"^train/loss$"]],
        "validation loss": ["Multiline", [r"^val/loss$"]],
        "test loss": ["Multiline", [r"^test/loss$"]],
        "validation accuracy": ["Multiline", [r"^val/accuracy$"]],
        "test accuracy": ["Multiline", [r"^test/accuracy$"]],
        "training seconds": ["Multiline", [r"^time/wall$"]],
    },
    "Hessian-free diagnostics (x: training examples seen)": {
        "log10 damping lambda": ["Multiline", [r"^hf/log10_damping$"]],
        "reduction ratio rho": ["Multiline", [r"^hf/rho$"]],
        "reductions (actual, predicted; positive = loss went down)":
            ["Multiline", [r"^hf/actual_reduction$", r"^hf/predicted_reduction$"]],
        "CG iterations": ["Multiline", [r"^hf/cg_iterations$"]],
        "line-search step length": ["Multiline", [r"^hf/line_search_step$"]],
        "seconds per step": ["Multiline", [r"^hf/wall_time$", r"^hf/curvature_time$"]],
    },
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compare.py", description=__doc__.split("\n\n")[0],
        formatter_class=common.HelpFormatter)
    parser.add_argument("--data", choices=train.DATASETS, default="digits", help="data set")
    parser.add_argument("--model", choices=sorted(train.MODELS), default=None,
                        help="default: digits_convnet_bn for digits, c3d3_bn for cifar10")
    parser.add_argument("--data-dir", default=str(common.DEFAULT_DATA_DIR),
                        help="folder holding cifar-10-batches-py (ignored for digits)")
    parser.add_argument("--budget", type=float, default=None,
                        help="training seconds per optimizer and seed (default: 45 for digits, 600 for cifar10)")
    parser.add_argument("--grid-budget", type=float, default=None,
                        help="training seconds of the first (smallest-rate) learning-rate grid point; "
                             "the others get as many steps (default: budget / 4)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="training seeds; every optimizer runs once per seed")
    parser.add_argument("--optimizers", nargs="+", choices=train.OPTIMIZERS, default=list(train.OPTIMIZERS),
                        help="sgd is always included: it sets the reference train loss; soap needs the "
                             "pytorch-optimizer package")
    parser.add_argument("--sgd-lrs", type=float, nargs="+", default=list(DEFAULT_SGD_LRS),
                        help="SGD learning-rate grid")
    parser.add_argument("--adam-lrs", type=float, nargs="+", default=list(DEFAULT_ADAM_LRS),
                        help="Adam learning-rate grid")
    parser.add_argument("--soap-lrs", type=float, nargs="+", default=list(DEFAULT_SOAP_LRS),
                        help="SOAP learning-rate grid")
    parser.add_argument("--lbfgs-lrs", type=float, nargs="+", default=list(DEFAULT_LBFGS_LRS),
                        help="L-BFGS (strong Wolfe) learning-rate grid: its first trial step length")
    parser.add_argument("--kfac-lrs", type=float, nargs="+", default=list(DEFAULT_KFAC_LRS),
                        help="K-FAC (ASDL, SGD with momentum on the preconditioned gradient) learning-rate grid")
    parser.add_argument("--warmup-steps", type=int, default=train.DEFAULT_WARMUP_STEPS, metavar="W",
                        help="steps of linear learning-rate warm-up in every sgd/adam/soap run, grid included")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--first-order-eval-every", type=int, default=None, metavar="EPOCHS",
                        help="evaluate SGD/Adam/SOAP every this many epochs (default: 5 for digits, 2 "
                             "for cifar10), K-FAC too; HF and L-BFGS are evaluated after every step")
    parser.add_argument("--hf-args", default="",
                        help="extra train.py arguments for the HF runs, one quoted string, "
                             "e.g. --hf-args='--damping 10' (default: none, HFOptimizer's defaults)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for every run (default: 1 for digits, whose tiny "
                             "tensors gain little from more, torch's choice for cifar10)")
    parser.add_argument("--logdir", default=None,
                        help="TensorBoard folder of the runs (default: runs/compare-<data>); the "
                             "learning-rate grid goes to <logdir>-grid")
    parser.add_argument("--out", default=None, help="folder for curves.png, results.md, results.json; "
                                                    "default: results/compare-<data>")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny budgets ({QUICK['budget']} s per run, {QUICK['grid_budget']} s per "
                             "grid point) to check that everything runs")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(None if argv is None else [str(a) for a in argv])
    if args.model is None:
        args.model = train.DEFAULT_MODEL[args.data]
    if "sgd" not in args.optimizers:
        args.optimizers.append("sgd")
    # hf first, then sgd, adam, soap, whatever order was given
    args.optimizers = [o for o in train.OPTIMIZERS if o in args.optimizers]
    if args.quick:
        args.budget = QUICK["budget"] if args.budget is None else args.budget
        args.grid_budget = QUICK["grid_budget"] if args.grid_budget is None else args.grid_budget
    if args.budget is None:
        args.budget = DEFAULT_BUDGET[args.data]
    if args.grid_budget is None:
        args.grid_budget = args.budget / 4
    if args.budget <= 0 or args.grid_budget <= 0:
        parser.error("--budget and --grid-budget must be > 0")
    if args.threads is None:
        args.threads = DEFAULT_THREADS[args.data]
    if args.first_order_eval_every is None:
        args.first_order_eval_every = FIRST_ORDER_EVAL_EVERY[args.data]
    if args.first_order_eval_every < 1 or args.warmup_steps < 0:
        parser.error("--first-order-eval-every must be >= 1, --warmup-steps >= 0")
    if args.logdir is None:
        args.logdir = str(Path("runs") / f"compare-{args.data}")
    if args.out is None:
        args.out = str(Path("results") / f"compare-{args.data}")
    return args


# --------------------------------------------------------------------------- running
def _train(args: argparse.Namespace, optimizer: str, seed: int, budget: float, logdir: Path,
           extra: Sequence[str] = ()) -> dict[str, Any]:
    argv = [
        "--optimizer", optimizer, "--data", args.data, "--model", args.model, "--data-dir", args.data_dir,
        "--seed", seed, "--epochs", 10**9, "--time-budget", budget, "--logdir", logdir,
        "--checkpoint-every", 0, "--quiet", *extra,
    ]
    if args.device:
        argv += ["--device", args.device]
    if args.threads:
        argv += ["--threads", args.threads]
    return train.main([str(a) for a in argv])


def _lr_tag(lr: float) -> str:
    return f"{lr:g}"


def grid_logdir(args: argparse.Namespace) -> Path:
    """``<logdir>-grid``: a sibling, so that TensorBoard on ``<logdir>`` shows only the compared runs."""
    logdir = Path(args.logdir)
    return logdir.with_name(logdir.name + "-grid")


def first_order_args(args: argparse.Namespace, optimizer: str, lr: float) -> list:
    """train.py arguments of a run of ``optimizer`` (not hf) at learning rate ``lr``."""
    extra = ["--lr", lr, "--warmup-steps", args.warmup_steps, "--eval-every", args.first_order_eval_every]
    if optimizer == "lbfgs":  # few, costly steps, like HF's: evaluated like HF, after every step
        extra += FEW_STEP_EVAL
    if optimizer in ("sgd", "kfac"):
        extra += ["--momentum", args.momentum]
    return extra


def write_layout(logdir: Path) -> None:
    """The Custom Scalars layout, in ``logdir`` itself: the plugin merges the
    layouts of all runs, and this "run" has no scalars of its own to draw."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(logdir)) as writer:
        writer.add_custom_scalars(LAYOUT)


def lr_grid(args: argparse.Namespace, optimizer: str, lrs: Sequence[float]) -> tuple[float, list[dict]]:
    """Train briefly at every rate; return the chosen rate and each grid point's outcome.

    The smallest rate, which is the least likely to diverge, runs first, for
    ``--grid-budget`` seconds; every other rate then gets exactly as many
    steps.  Equal step counts cost equal time on an idle machine, and unlike
    equal seconds they keep the choice independent of other load on it.
    """
    points = []
    steps = None
    for lr in sorted(lrs):
        extra = first_order_args(args, optimizer, lr)
        budget = args.grid_budget
        if steps is not None:  # the time limit is only a safety net here
            extra += ["--max-steps", steps]
            budget = 4 * args.grid_budget
        logdir = grid_logdir(args) / f"{optimizer}-lr{_lr_tag(lr)}"
        summary = _train(args, optimizer, args.seeds[0], budget, logdir, extra)
        if steps is None:
            steps = max(summary["steps"], 1)
        history = summary["history"]
        val_losses = [r["val_loss"] for r in history if math.isfinite(r["val_loss"])]
        points.append({
            "lr": lr, "best_val_accuracy": summary["best_val_accuracy"],
            "min_val_loss": min(val_losses) if val_losses else math.inf,
            "final_train_loss": summary["train_loss"], "epochs": summary["epochs"], "steps": summary["steps"],
            "seconds": summary["seconds"], "stop_reason": summary["stop_reason"],
        })
        print(f"[grid] {optimizer} lr={_lr_tag(lr)}: best val acc {summary['best_val_accuracy']:.4f}, "
              f"min val loss {points[-1]['min_val_loss']:.4f}, {summary['steps']} steps "
              f"({summary['epochs']:.1f} epochs) in {summary['seconds']:.1f} s", flush=True)
    best = max(points, key=lambda p: (p["best_val_accuracy"], -p["min_val_loss"]))
    if len(points) > 2 and best["lr"] in (min(lrs), max(lrs)):
        print(f"[grid] note: the best {optimizer} rate {_lr_tag(best['lr'])} is at the edge of the grid; "
              "a wider grid might find a better one", flush=True)
    return best["lr"], points


def reach(history: list[dict], target: float) -> Optional[dict[str, float]]:
    record = common.first_reaching(history, "train_loss", target)
    if record is None:
        return None
    return {"seconds": record["time"], "epochs": record["epoch"]}


# --------------------------------------------------------------------------- reporting
def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float], digits: int = 4, style: str = "f") -> str:
    mean, std = _mean_std(values)
    if math.isnan(mean):
        return "n/a"
    text = f"{mean:.{digits}{style}}"
    return text + (f" ± {std:.{digits}{style}}" if len(values) > 1 else "")


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    cfg = report["config"]
    n_seeds = len(cfg["seeds"])
    lines = [
        f"# {cfg['data']} / {cfg['model']}: Hessian-free vs first-order optimizers",
        "",
        f"Budget {cfg['budget']:g} s of training per optimizer and seed (evaluation excluded); "
        f"seeds {', '.join(map(str, cfg['seeds']))}"
        + (" (mean ± std over seeds)" if n_seeds > 1 else "") + f"; device {cfg['device']}, "
        f"{cfg['threads']} torch threads on {cfg['cpu_count']} CPUs, torch {cfg['torch']}.",
        "Train loss: cross-entropy over the whole training set in eval mode (BatchNorm statistics "
        "re-estimated on training data), evaluated after every step for HF and L-BFGS, at the end of every "
        f"{_every(cfg['first_order_eval_every'])}epoch for the others, and at the end of the run. "
        "Reach: training seconds / epochs until the train loss first got at or below "
        "the lowest train loss SGD reached with the same seed.",
        "",
        "| optimizer | settings | final train loss | best val acc | test acc | epochs | seconds "
        "| reach SGD's best train loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in cfg["optimizers"]:
        runs = report["runs"][name]
        reached = [r["reach"] for r in runs if r["reach"] is not None]
        if not reached:
            reach_text = "not reached"
        else:
            reach_text = (f"{_fmt([r['seconds'] for r in reached], 1)} s / "
                          f"{_fmt([r['epochs'] for r in reached], 1)} epochs")
            if len(reached) < len(runs):
                reach_text += f" ({len(reached)}/{len(runs)} seeds; others not reached)"
        lines.append(
            f"| {LABELS[name]} | {report['settings'][name]} "
            f"| {_fmt([r['train_loss'] for r in runs], 4, 'e' if _small(runs) else 'f')} "
            f"| {_fmt([r['best_val_accuracy'] for r in runs])} "
            f"| {_fmt([r['test_accuracy'] for r in runs])} "
            f"| {_fmt([r['epochs'] for r in runs], 1)} "
            f"| {_fmt([r['seconds'] for r in runs], 1)} | {reach_text} |")
    for name, grid in report["grids"].items():
        chosen = report["chosen_lr"][name]
        lrs = [p["lr"] for p in grid]
        edge = ", at the edge of the grid" if len(grid) > 2 and chosen in (min(lrs), max(lrs)) else ""
        lines += ["", f"Learning-rate grid for {LABELS[name]} (seed {cfg['seeds'][0]}; the smallest rate "
                      f"for {cfg['grid_budget']:g} s, the others for as many steps; "
                      f"chosen: {_lr_tag(chosen)}{edge}):", "",
                  "| lr | best val acc | min val loss | final train loss | steps | epochs | seconds |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for p in grid:
            lines.append(f"| {_lr_tag(p['lr'])} | {p['best_val_accuracy']:.4f} | {p['min_val_loss']:.4f} "
                         f"| {p['final_train_loss']:.4g} | {p['steps']} | {p['epochs']:.1f} "
                         f"| {p['seconds']:.1f} |")
    lines += ["", f"Total wall-clock time of this comparison: {report['total_seconds']:.0f} s.", ""]
    path.write_text("\n".join(lines))


def _every(k: int) -> str:
    """The ordinal in "every 5th epoch", with its space; empty for 1 ("every epoch")."""
    return "" if k == 1 else (f"{k}th " if k > 3 else {2: "2nd ", 3: "3rd "}[k])


def _small(runs: list[dict]) -> bool:
    return any(0 < r["train_loss"] < 1e-3 for r in runs if math.isfinite(r["train_loss"]))


def plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    for name in report["config"]["optimizers"]:
        for i, run in enumerate(report["runs"][name]):
            history = [r for r in run["history"] if math.isfinite(r["train_loss"])]
            epochs = [r["epoch"] for r in history]
            label = f"{LABELS[name]} ({report['settings'][name]})" if i == 0 else None
            style = dict(color=COLORS[name], alpha=0.9 if i == 0 else 0.5, marker="." if len(history) < 60 else None)
            axes[0].plot(epochs, [r["train_loss"] for r in history], label=label, **style)
            axes[1].plot([r["time"] for r in history], [r["train_loss"] for r in history], label=label, **style)
            axes[2].plot(epochs, [r["test_accuracy"] for r in history], label=label, **style)
    sgd_best = [run["sgd_best_train_loss"] for run in report["runs"]["sgd"]]
    for ax in axes[:2]:
        ax.set_yscale("log")
        ax.set_ylabel("train loss (full pass, eval mode)")
        ax.axhline(min(sgd_best), color=COLORS["sgd"], lw=0.8, ls=":")
    for ax in (axes[0], axes[2]):
        ax.set_xscale("symlog", linthresh=1.0)  # linear up to one epoch, logarithmic beyond
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.set_xlabel("epochs")
    axes[1].set_xlabel("training seconds")
    axes[2].set_ylabel("test accuracy")
    later = [r["test_accuracy"] for runs in report["runs"].values() for run in runs
             for r in run["history"] if r["epoch"] > 0 and math.isfinite(r["test_accuracy"])]
    if later:  # zoom in on the trained models; the initial accuracy is off the scale
        axes[2].set_ylim(max(0.0, min(later) - 0.02), min(1.0, max(later) + 0.02))
    for ax in axes:
        ax.set_xlim(left=0.0)
    cfg = report["config"]
    axes[0].set_title("train loss vs epochs")
    axes[1].set_title("train loss vs time")
    axes[2].set_title("test accuracy vs epochs")
    handles, labels = axes[0].get_legend_handles_labels()
    # Three labels per row: six optimizers' settings do not fit the figure's width on one.
    rows = math.ceil(len(labels) / 3)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=9, frameon=False)
    fig.suptitle(f"{cfg['data']} / {cfg['model']}, {cfg['budget']:g} s per optimizer, "
                 f"seed{'s' if len(cfg['seeds']) > 1 else ''} {', '.join(map(str, cfg['seeds']))}")
    fig.tight_layout(rect=(0, 0.05 * rows + 0.01, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the comparison; returns the report that is also written to results.json."""
    args = parse_args(argv)
    started = time.perf_counter()
    if "hf" in args.optimizers and not common.hf_available():
        raise SystemExit("this hfopt has no HFOptimizer; pass --optimizers sgd adam soap")
    if "soap" in args.optimizers:
        try:
            train.load_soap()
        except ImportError as err:  # fail now, not after the other optimizers' grids
            raise SystemExit(f"{err}; or leave soap out of --optimizers") from err
    if "kfac" in args.optimizers:
        import kfac

        try:
            kfac.load_asdl()
        except ImportError as err:
            raise SystemExit(f"{err}; or leave kfac out of --optimizers") from err
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = args.device or ("cuda" if train.torch.cuda.is_available() else "cpu")
    logdir = Path(args.logdir)
    if (logdir / "grid").is_dir():
        print(f"note: {logdir / 'grid'} holds grid runs of an older compare.py, which TensorBoard shows "
              f"among the compared runs; the grid now goes to {grid_logdir(args)}", flush=True)
    write_layout(logdir)
    print(f"comparing {', '.join(args.optimizers)} on {args.data}/{args.model}: {args.budget:g} s per run, "
          f"seeds {args.seeds}, lr grid {args.grid_budget:g} s per point", flush=True)

    chosen: dict[str, float] = {}
    grids: dict[str, list[dict]] = {}
    for name, lrs in (("sgd", args.sgd_lrs), ("adam", args.adam_lrs), ("soap", args.soap_lrs),
                      ("lbfgs", args.lbfgs_lrs), ("kfac", args.kfac_lrs)):
        if name in args.optimizers:
            chosen[name], grids[name] = lr_grid(args, name, lrs)
            print(f"[grid] {name}: chose lr {_lr_tag(chosen[name])}", flush=True)

    hf_extra = shlex.split(args.hf_args)
    warmup = f" ({args.warmup_steps} warm-up steps)" if args.warmup_steps else ""
    settings = {
        "hf": "batch 512" + (f", {args.hf_args}" if args.hf_args else ", HFOptimizer defaults"),
        "sgd": f"lr {_lr_tag(chosen.get('sgd', math.nan))}{warmup}, momentum {args.momentum:g}, batch 128",
        "adam": f"lr {_lr_tag(chosen.get('adam', math.nan))}{warmup}, batch 128",
        "soap": f"lr {_lr_tag(chosen.get('soap', math.nan))}{warmup}, batch 128",
        "lbfgs": f"lr {_lr_tag(chosen.get('lbfgs', math.nan))}{warmup}, strong Wolfe, batch 512",
        "kfac": f"lr {_lr_tag(chosen.get('kfac', math.nan))}{warmup}, momentum {args.momentum:g}, batch 128",
    }
    runs: dict[str, list[dict]] = {name: [] for name in args.optimizers}
    for seed in args.seeds:
        for name in args.optimizers:
            extra = [*FEW_STEP_EVAL, *hf_extra] if name == "hf" else first_order_args(args, name, chosen[name])
            summary = _train(args, name, seed, args.budget, logdir / f"{name}-s{seed}", extra)
            runs[name].append(summary)
            print(f"[run] {name} seed {seed}: train loss {summary['train_loss']:.4g}, "
                  f"test acc {summary['test_accuracy']:.4f}, {summary['epochs']:.1f} epochs, "
                  f"{summary['steps']} steps in {summary['seconds']:.1f} s", flush=True)

    for i, seed in enumerate(args.seeds):
        target = min(r["train_loss"] for r in runs["sgd"][i]["history"] if math.isfinite(r["train_loss"]))
        for name in args.optimizers:
            runs[name][i]["sgd_best_train_loss"] = target
            runs[name][i]["reach"] = reach(runs[name][i]["history"], target)

    report = {
        "config": {
            "data": args.data, "model": args.model, "budget": args.budget, "grid_budget": args.grid_budget,
            "seeds": args.seeds, "optimizers": args.optimizers, "hf_args": args.hf_args,
            "first_order_eval_every": args.first_order_eval_every, "sgd_lrs": args.sgd_lrs,
            "adam_lrs": args.adam_lrs, "soap_lrs": args.soap_lrs, "lbfgs_lrs": args.lbfgs_lrs, "kfac_lrs": args.kfac_lrs,
            "warmup_steps": args.warmup_steps,
            "momentum": args.momentum,
            "device": device, "threads": train.torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "torch": train.torch.__version__,
            "python": platform.python_version(), "quick": args.quick, "logdir": args.logdir,
            "grid_logdir": str(grid_logdir(args)),
        },
        "settings": settings,
        "chosen_lr": chosen,
        "grids": grids,
        "runs": runs,
        "total_seconds": time.perf_counter() - started,
    }
    common.write_json(out / "results.json", report)
    write_markdown(out / "results.md", report)
    plot(out / "curves.png", report)
    print((out / "results.md").read_text())
    print(f"wrote {out / 'curves.png'}, {out / 'results.md'}, {out / 'results.json'}; "
          f"TensorBoard: tensorboard --logdir {args.logdir} (grid runs: --logdir {grid_logdir(args)})",
          flush=True)
    return report


if __name__ == "__main__":
    main()
