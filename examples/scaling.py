#!/usr/bin/env python
"""Steps, epochs and seconds to a target train loss as a function of the batch size.

::

    python examples/scaling.py                            # CIFAR-10 / c3d3_bn, batches 128 512 2048
    python examples/scaling.py --batch-sizes 256 1024 4096 --target 0.3 --optimizers hf sgd
    python examples/scaling.py --data digits --quick      # seconds-long smoke run

Large batches are the regime where second-order methods are supposed to win:
a first-order method's steps to a target stop shrinking once the batch passes
its critical size, while a curvature-aware step should keep using the extra
examples.  The figure of interest is HF's steps over SGD's at batch >= 2048
(the claim under test: at most 1/5).

Protocol
--------
1. Data: the train/validation split of ``common.load_data`` (data seed 0;
   CIFAR-10 here is ``data_batch_1``, 9,000 training and 1,000 validation
   images), optionally cut to the first ``--train-samples`` /
   ``--val-samples`` of each (the splits are already in random order).
2. For every batch size B, in turn:

   a. Learning rates (SGD with momentum 0.9, Adam, SOAP): every rate of the
      contender's grid is trained for ``--tune-steps`` steps at batch B,
      with the warm-up below, and the rate with the lowest validation loss
      at the end is kept (a diverged run counts as infinite loss; ties go to
      the smaller rate).  The grids (``--sgd-lrs`` ...) are given for batch
      128 and multiplied by ``(B / 128) ** --lr-scaling`` (square-root
      scaling by default), so they follow the optimum as B grows; a choice
      at the edge of a grid is flagged.  Hessian-free has no learning rate:
      it runs ``HFOptimizer(model.parameters())`` with its defaults, the
      same at every batch size (``--hf-option`` adds keywords, again the
      same everywhere).
   b. Every contender trains from the same initial weights (``--seed``) on
      the same shuffles until its full train loss is at or below
      ``--target``, or it has seen ``--max-epochs`` epochs, or spent
      ``--budget`` training seconds, or diverged.

3. Learning rates warm up linearly from ``lr / W`` to ``lr`` over the first
   W = ``--warmup-steps`` steps and stay constant afterwards: a constant rate
   keeps "steps to target" a property of the optimizer, not of a decay
   schedule tuned to a horizon.  SOAP runs without weight decay, like the
   others.
4. Batches are drawn without replacement from a per-epoch shuffle; the
   incomplete last batch of an epoch is dropped, so every step sees exactly
   B examples and epochs = steps * B / N.
5. "Train loss" is train.py's: cross-entropy over the whole training set in
   eval mode, after re-estimating the BatchNorm statistics on
   ``--precise-bn`` training samples in a copy of the model.  It is measured
   at the start and after the first step at which another
   ``--eval-every-examples`` examples have been seen, so the resolution of
   "examples to target" does not depend on B (for B larger than the
   interval: every step).  Steps, epochs and seconds to target are those at
   the first such measurement at or below the target; seconds are training
   time only (evaluation excluded).  A run that stops first is "not
   reached", and its count at the stop is a lower bound.

Outputs in ``--out``: ``scaling.png`` (log-log steps and seconds to target
against B; open markers: not reached, drawn at the count where the run
stopped), ``results.md`` (tables, the HF / SGD step ratio per batch size and
the verdict on the claim) and ``results.json`` (everything: configuration,
tuning grids, per-run histories, HF's per-step diagnostics).

Cost
----
A full default run is meant for a GPU.  On the project's 2-core CPU (one
thread: about 1.6 ms per image for a training step, 1.2 ms per image for an
evaluation forward, so 16 s per train-loss measurement; one HF curvature
product costs about a training step on the curvature batch) the tuning
alone takes about 45 minutes, most of it at batch 2048, and the whole run
takes roughly 3-7 hours, depending on how many CG iterations HF's stopping
rule allows at the full-batch curvature.  ``--quick`` takes seconds on
digits and about a minute on CIFAR-10.  A CPU run that still spans 128 to
2048 and fits in about 25 minutes (HF with a capped CG and a 512-sample
curvature batch, a looser target)::

    python examples/scaling.py --optimizers hf sgd --train-samples 4096 --val-samples 500 \\
        --target 1.0 --tune-steps 20 --max-epochs 30 --budget 240 --precise-bn 2048 \\
        --hf-option cg_max_iterations=50 --hf-option curvature_batch=512 --threads 1
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also puts the repository root on sys.path)
import train  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from models import build_model  # noqa: E402

CONTENDERS = ("hf", "sgd", "adam", "soap", "lbfgs", "kfac")
LABELS = {"hf": "Hessian-free", "sgd": "SGD + momentum", "adam": "Adam", "soap": "SOAP", "lbfgs": "L-BFGS",
          "kfac": "K-FAC"}
COLORS = {"hf": "tab:red", "sgd": "tab:blue", "adam": "tab:green", "soap": "tab:purple", "lbfgs": "tab:orange",
          "kfac": "tab:brown"}
MARKERS = {"hf": "o", "sgd": "s", "adam": "^", "soap": "D", "lbfgs": "v", "kfac": "P"}
# The learning-rate grids are stated for this batch size and scaled from it.
REFERENCE_BATCH = 128
DEFAULT_LRS = {"sgd": (0.03, 0.1, 0.3), "adam": (3e-4, 1e-3, 3e-3), "soap": (1e-3, 3e-3, 1e-2),
               "lbfgs": (0.1, 0.3, 1.0), "kfac": (1e-3, 3e-3, 1e-2)}
# L-BFGS's rate is the first trial step of its strong-Wolfe line search, a fraction of
# the quasi-Newton step: it does not grow with the batch as a gradient step's does.
UNSCALED = ("lbfgs",)
# The claims under test: at batch >= CLAIM_BATCH, HF needs at most these fractions of each peer's steps.
CLAIM_BATCH, CLAIM_RATIO = 2048, 0.2
CLAIM_RATIOS = {"sgd": CLAIM_RATIO, "adam": 1 / 3, "soap": 1 / 3}
# Past the critical batch size, doubling the batch cuts the steps by less than 2 ** -0.5 (30%).
CRITICAL_EXPONENT = 0.5
# --quick: enough of everything to exercise every code path in seconds.
QUICK = {
    "batch_sizes": [16, 32, 64], "train_samples": 256, "val_samples": 256, "target": 2.0,
    "tune_steps": 3, "warmup_steps": 2, "max_epochs": 2.0, "budget": 5.0,
    "eval_every_examples": 32, "precise_bn": 256, "hf_option": ["cg_max_iterations=10"],
}


# --------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scaling.py", description=__doc__.split("\n\n")[0], formatter_class=common.HelpFormatter)
    parser.add_argument("--data", choices=train.DATASETS, default="cifar10", help="data set")
    parser.add_argument("--model", choices=sorted(train.MODELS), default=None,
                        help="default: c3d3_bn for cifar10, digits_convnet_bn for digits")
    parser.add_argument("--data-dir", default=str(common.DEFAULT_DATA_DIR),
                        help="folder holding cifar-10-batches-py (ignored for digits)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512, 2048], help="batch sizes")
    parser.add_argument("--optimizers", nargs="+", choices=CONTENDERS, default=list(CONTENDERS),
                        help="contenders; soap is skipped with a note if pytorch_optimizer is missing")
    parser.add_argument("--target", type=float, default=0.5, help="full train loss to reach")
    parser.add_argument("--eval-every-examples", type=int, default=4096, metavar="N",
                        help="measure the full train loss after every N training examples")
    parser.add_argument("--max-epochs", type=float, default=100.0, help="epochs per run at most")
    parser.add_argument("--budget", type=float, default=3600.0, help="training seconds per run at most")
    parser.add_argument("--train-samples", type=int, default=None, metavar="N",
                        help="train on the first N samples of the training split (default: all)")
    parser.add_argument("--val-samples", type=int, default=None, metavar="N",
                        help="tune on the first N samples of the validation split (default: all)")
    parser.add_argument("--tune-steps", type=int, default=50, help="steps per learning-rate grid point")
    parser.add_argument("--warmup-steps", type=int, default=10, help="linear learning-rate warm-up steps")
    parser.add_argument("--lr-scaling", type=float, default=0.5, metavar="POWER",
                        help=f"grids are for batch {REFERENCE_BATCH}, multiplied by (B/{REFERENCE_BATCH})**POWER")
    for name in ("sgd", "adam", "soap", "lbfgs", "kfac"):
        parser.add_argument(f"--{name}-lrs", type=float, nargs="+", default=list(DEFAULT_LRS[name]),
                            help=f"{LABELS[name]} learning-rate grid at batch {REFERENCE_BATCH}")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--hf-option", action="append", default=None, metavar="KEY=VALUE",
                        help="extra HFOptimizer keyword (VALUE a Python literal), the same at every batch "
                             "size; repeatable (default: none; --quick: cg_max_iterations=10)")
    parser.add_argument("--precise-bn", type=int, default=4096, metavar="N",
                        help="re-estimate BatchNorm statistics on N training samples before each "
                             "measurement (0: use the running statistics)")
    parser.add_argument("--eval-batch-size", type=int, default=1024, help="batch size of evaluation passes")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and shuffles")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=str(Path("results") / "scaling"),
                        help="folder for scaling.png, results.md, results.json")
    parser.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                        help="run nothing: combine the results.json of runs of one study split over "
                             "processes by --optimizers into --out")
    parser.add_argument("--quick", action="store_true",
                        help="seconds-long smoke run: batches 16 32 64, 256 samples, target 2.0, tiny budgets "
                             "(explicit options still win)")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if "--quick" in argv:
        # Quick values become the defaults, so options given explicitly still override them.
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    args.model = args.model or train.DEFAULT_MODEL[args.data]
    args.hf_option = args.hf_option or []
    args.optimizers = [o for o in CONTENDERS if o in args.optimizers]
    args.batch_sizes = sorted(set(args.batch_sizes))
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _validate(parser, args)
    return args


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    positive = ("eval_every_examples", "tune_steps", "warmup_steps", "eval_batch_size")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.batch_sizes) < 2:
        parser.error("--batch-sizes must be >= 2 (train-mode BatchNorm needs two samples)")
    if args.max_epochs <= 0 or args.budget <= 0 or args.precise_bn < 0:
        parser.error("--max-epochs and --budget must be > 0, --precise-bn >= 0")
    for name in ("train_samples", "val_samples", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        common.parse_hf_options(args.hf_option)
    except ValueError as err:
        parser.error(str(err))


def soap_available() -> bool:
    try:
        train.load_soap()
    except ImportError:
        return False
    return True


def kfac_available() -> bool:
    import kfac

    try:
        kfac.load_asdl()
    except ImportError:
        return False
    return True


def _package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- data
def _head(dataset: TensorDataset, n: Optional[int], device: torch.device) -> TensorDataset:
    return TensorDataset(*(t[:n].to(device) for t in dataset.tensors))


def prepare_data(args: argparse.Namespace) -> dict[str, Any]:
    """Train and validation sets on the device, cut to ``--train-samples``/``--val-samples``."""
    data = common.load_data(args.data, args.data_dir)
    device = torch.device(args.device)
    train_set = _head(data["train"], args.train_samples, device)
    too_small = [b for b in args.batch_sizes if b > len(train_set)]
    if too_small:
        raise SystemExit(f"batch sizes {too_small} exceed the {len(train_set)} training samples")
    return {"train": train_set, "val": _head(data["val"], args.val_samples, device),
            "num_classes": data["num_classes"]}


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches of exactly ``batch_size``, epoch after epoch, each epoch freshly shuffled."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


# --------------------------------------------------------------------------- one run
def make_optimizer(name: str, model: nn.Module, lr: Optional[float], args: argparse.Namespace
                   ) -> torch.optim.Optimizer:
    if name == "hf":
        import hfopt

        return hfopt.HFOptimizer(model.parameters(), **common.parse_hf_options(args.hf_option))
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == "lbfgs":
        return torch.optim.LBFGS(model.parameters(), lr=lr, line_search_fn="strong_wolfe")
    if name == "kfac":
        from kfac import KFAC

        return KFAC(model, lr=lr, momentum=args.momentum)  # type: ignore[return-value]
    return train.load_soap()(model.parameters(), lr=lr, weight_decay=0.0)


class Run:
    """One contender at one batch size and rate: the model, its optimizer and the counters."""

    def __init__(self, args: argparse.Namespace, data: dict[str, Any], name: str, batch_size: int,
                 lr: Optional[float]) -> None:
        self.args, self.data, self.name, self.batch_size, self.lr = args, data, name, batch_size, lr
        self.device = torch.device(args.device)
        torch.manual_seed(args.seed)  # the same initial weights for every run
        self.model = build_model(args.model, num_classes=data["num_classes"]).to(self.device).train()
        self.loss_fn = nn.CrossEntropyLoss()
        self.optimizer = make_optimizer(name, self.model, lr, args)
        self.batches = batches(len(data["train"]), batch_size, torch.Generator().manual_seed(args.seed))
        self.steps, self.seconds, self.loss, self.closure_calls = 0, 0.0, math.nan, 0
        self.log: list[dict[str, Any]] = []  # per step: the batch loss, plus HF's diagnostics

    @property
    def epochs(self) -> float:
        return self.steps * self.batch_size / len(self.data["train"])

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _warm_up(self) -> None:
        if self.lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = common.warmup_lr(self.lr, self.args.warmup_steps, self.steps + 1)

    def _closure(self, x: torch.Tensor, y: torch.Tensor):
        if self.name == "hf":
            def closure():
                outputs = self.model(x)
                return self.loss_fn(outputs, y), outputs  # HF differentiates itself
        else:
            def closure():
                self.closure_calls += 1  # L-BFGS calls it up to 25 times per step
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.loss_fn(self.model(x), y)
                loss.backward()
                return loss
        return closure

    def step(self) -> float:
        """One timed optimizer step; returns the mini-batch loss before it."""
        self._sync()
        start = time.perf_counter()
        index = next(self.batches).to(self.device)
        x, y = self.data["train"].tensors[0][index], self.data["train"].tensors[1][index]
        self._warm_up()
        if self.name == "kfac":  # ASDL runs its own forward and backward (examples/kfac.py)
            self.loss = float(self.optimizer.step_batch(self.model, self.loss_fn, x, y)[0])
        else:
            self.loss = float(self.optimizer.step(self._closure(x, y)).detach())
        self._sync()
        self.seconds += time.perf_counter() - start
        self.steps += 1
        self.log.append({**self._hf_diagnostics(), "loss": self.loss})
        return self.loss

    def _hf_diagnostics(self) -> dict[str, Any]:
        if self.name != "hf":
            return {}
        # Only plain values: the set of diagnostics is HFOptimizer's to change.
        info = getattr(self.optimizer, "last_step", None) or {}
        return {k: v for k, v in info.items() if v is None or isinstance(v, (bool, int, float, str))}

    def measure(self, split: str) -> dict[str, Any]:
        """Eval-mode loss and accuracy on ``split``, BatchNorm statistics re-estimated on train data."""
        model = self.model
        if self.args.precise_bn:
            model = train.precise_bn_copy(self.model, self.data["train"], self.args.precise_bn,
                                          self.args.eval_batch_size, self.args.seed)
        loss, accuracy = train.evaluate(model, self.data[split], self.args.eval_batch_size)
        return {"step": self.steps, "examples": self.steps * self.batch_size, "epoch": self.epochs,
                "time": self.seconds, f"{split}_loss": loss, f"{split}_accuracy": accuracy}

    def stop_reason(self, max_steps: Optional[int] = None) -> Optional[str]:
        if not math.isfinite(self.loss):
            return "diverged" if self.steps else None
        if max_steps is not None and self.steps >= max_steps:
            return "max_steps"
        if self.epochs + 1e-9 >= self.args.max_epochs:
            return "max_epochs"
        if self.seconds >= self.args.budget:
            return "budget"
        return None


# --------------------------------------------------------------------------- tuning
def lr_grid(args: argparse.Namespace, name: str, batch_size: int) -> list[float]:
    base = getattr(args, f"{name}_lrs")
    factor = 1.0 if name in UNSCALED else (batch_size / REFERENCE_BATCH) ** args.lr_scaling
    return sorted(float(f"{lr * factor:.3g}") for lr in base)


def tune(args: argparse.Namespace, data: dict[str, Any], name: str, batch_size: int) -> dict[str, Any]:
    """Train every rate of the grid for ``--tune-steps`` steps; keep the lowest validation loss.
    A one-rate grid is a choice already made: nothing is trained."""
    grid = lr_grid(args, name, batch_size)
    if len(grid) == 1:
        return {"lr": grid[0], "at_edge": False, "points": []}
    points = []
    for lr in grid:
        run = Run(args, data, name, batch_size, lr)
        while run.stop_reason(args.tune_steps) is None:
            run.step()
        diverged = not math.isfinite(run.loss)
        record = {"val_loss": math.inf, "val_accuracy": math.nan} if diverged else run.measure("val")
        points.append({"lr": lr, "val_loss": record["val_loss"], "val_accuracy": record["val_accuracy"],
                       "steps": run.steps, "seconds": run.seconds})
        print(f"[tune] B={batch_size} {name} lr={lr:g}: val loss {record['val_loss']:.4f} after "
              f"{run.steps} steps ({run.seconds:.1f} s)", flush=True)
    best = min(points, key=lambda p: (p["val_loss"], p["lr"]))
    edge = len(points) > 2 and best["lr"] in (points[0]["lr"], points[-1]["lr"])
    if edge:
        print(f"[tune] note: B={batch_size} {name} chose lr {best['lr']:g} at the edge of its grid", flush=True)
    return {"lr": best["lr"], "at_edge": edge, "points": points}


# --------------------------------------------------------------------------- to target
def run_to_target(args: argparse.Namespace, data: dict[str, Any], name: str, batch_size: int,
                  lr: Optional[float]) -> dict[str, Any]:
    """Train until the full train loss reaches ``--target`` or a limit; return the outcome."""
    run = Run(args, data, name, batch_size, lr)
    history = [run.measure("train")]
    next_eval = args.eval_every_examples
    reached = history[0] if history[0]["train_loss"] <= args.target else None
    while reached is None and run.stop_reason() is None:
        run.step()
        if run.steps * batch_size >= next_eval or run.stop_reason() is not None:
            while next_eval <= run.steps * batch_size:
                next_eval += args.eval_every_examples
            history.append(run.measure("train"))
            print(_progress(run, history[-1]), flush=True)
            if history[-1]["train_loss"] <= args.target:
                reached = history[-1]
    outcome = {
        "lr": lr, "reached": reached is not None, "stop_reason": "target" if reached else run.stop_reason(),
        "steps": (reached or history[-1])["step"], "epochs": (reached or history[-1])["epoch"],
        "seconds": (reached or history[-1])["time"], "final_train_loss": history[-1]["train_loss"],
        "history": history, "step_log": run.log,
    }
    if name == "lbfgs":
        outcome["closure_calls"] = run.closure_calls
    if name == "hf":
        outcome["hf_rejected_steps"] = sum(not r.get("accepted", True) for r in run.log)
        outcome["hf_mean_cg_iterations"] = sum(r.get("cg_iterations") or 0 for r in run.log) / max(run.steps, 1)
    return outcome


def _progress(run: Run, record: dict[str, Any]) -> str:
    """One line per measurement, with HF's damping, rho and CG iterations of the last step."""
    line = (f"  B={run.batch_size} {run.name} step {run.steps}: train loss {record['train_loss']:.4f}, "
            f"{run.seconds:.1f} s")
    last = run.log[-1] if run.log else {}
    if run.name == "hf" and last:
        line += (f"; lambda {last.get('damping', math.nan):.3g}, rho {last.get('rho', math.nan):.3g}, "
                 f"CG {last.get('cg_iterations')} ({last.get('cg_stop_reason')}), "
                 f"step length {last.get('line_search_step', math.nan):.3g}")
    return line


def _describe(name: str, batch_size: int, outcome: dict[str, Any]) -> str:
    status = "reached" if outcome["reached"] else f"NOT reached ({outcome['stop_reason']})"
    return (f"[run] B={batch_size} {name}: {status} at {outcome['steps']} steps, {outcome['epochs']:.2f} "
            f"epochs, {outcome['seconds']:.1f} s; train loss {outcome['final_train_loss']:.4f}")


# --------------------------------------------------------------------------- the ratio
def step_ratio(hf: dict[str, Any], peer: dict[str, Any]) -> dict[str, Any]:
    """HF steps / a peer's steps to target: exact, an upper bound (only HF reached), a lower
    bound (only the peer reached) or unknown (neither)."""
    if not (hf["reached"] or peer["reached"]):
        return {"value": None, "kind": "unknown"}
    kind = "exact" if hf["reached"] and peer["reached"] else ("upper" if hf["reached"] else "lower")
    return {"value": hf["steps"] / max(peer["steps"], 1), "kind": kind}


def format_ratio(ratio: dict[str, Any]) -> str:
    if ratio["value"] is None:
        return "n/a (neither reached)"
    prefix = {"exact": "", "upper": "< ", "lower": "> "}[ratio["kind"]]
    return f"{prefix}{ratio['value']:.3g}"


def claim_verdict(ratios: dict[int, dict[str, Any]], bound: float = CLAIM_RATIO) -> str:
    """Whether HF needs at most ``bound`` of a peer's steps at every batch >= CLAIM_BATCH."""
    relevant = {b: r for b, r in ratios.items() if b >= CLAIM_BATCH}
    if not relevant:
        return f"not tested: no batch size >= {CLAIM_BATCH} with both contenders"
    verdicts = []
    for b, r in sorted(relevant.items()):
        v = r["value"]
        holds = v is not None and v <= bound and r["kind"] in ("exact", "upper")
        fails = v is not None and v > bound and r["kind"] in ("exact", "lower")
        verdicts.append((b, "holds" if holds else "fails" if fails else "undetermined"))
    overall = ("holds" if all(v == "holds" for _, v in verdicts)
               else "fails" if any(v == "fails" for _, v in verdicts) else "undetermined")
    detail = ", ".join(f"B={b}: {v}" for b, v in verdicts)
    return f"{overall} ({detail})"


def all_ratios(runs: dict[int, dict[str, Any]], names: Sequence[str]) -> dict[str, dict[int, dict[str, Any]]]:
    """HF's step ratio to every other contender, per batch size where both ran."""
    if "hf" not in names:
        return {}
    return {peer: {b: step_ratio(runs[b]["hf"], runs[b][peer]) for b in sorted(runs)
                   if "hf" in runs[b] and peer in runs[b]} for peer in names if peer != "hf"}


def all_claims(ratios: dict[str, dict[int, dict[str, Any]]]) -> dict[str, str]:
    return {peer: claim_verdict(r, CLAIM_RATIOS[peer]) for peer, r in ratios.items() if peer in CLAIM_RATIOS}


def critical_batch(outcomes: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Where growing the batch stops paying in steps.

    Between successive batch sizes B1 < B2 the local exponent is
    a = log(S1 / S2) / log(B2 / B1): 1 when the steps fall as fast as the
    batch grows (perfect scaling), 0 when they do not fall at all.  The
    critical batch size is the last B up to which every step kept a >=
    CRITICAL_EXPONENT (doubling the batch still cut the steps by at least
    2 ** -CRITICAL_EXPONENT, about 30%).  Only reached targets count; a
    segment ending in a run that did not reach is unknown, and stops the
    search.  None when even the first segment scales worse."""
    sizes = sorted(outcomes)
    exponents: dict[int, Optional[float]] = {}
    for b1, b2 in zip(sizes, sizes[1:]):
        o1, o2 = outcomes[b1], outcomes[b2]
        known = o1["reached"] and o2["reached"] and o1["steps"] > 0 and o2["steps"] > 0
        exponents[b2] = math.log(o1["steps"] / o2["steps"]) / math.log(b2 / b1) if known else None
    critical: Optional[int] = None
    for b1, b2 in zip(sizes, sizes[1:]):
        a = exponents[b2]
        if a is None:
            return {"exponents": exponents, "critical": critical, "at_least": False}
        if a < CRITICAL_EXPONENT:
            return {"exponents": exponents, "critical": critical or b1, "at_least": False}
        critical = b2
    return {"exponents": exponents, "critical": critical, "at_least": critical is not None}


def format_critical(c: dict[str, Any]) -> str:
    if c["critical"] is None:
        return "unknown"
    return f">= {c['critical']} (scales to the largest batch tried)" if c["at_least"] else str(c["critical"])


# --------------------------------------------------------------------------- reporting
def _cell(outcome: dict[str, Any], key: str, fmt: str) -> str:
    text = format(outcome[key], fmt)
    return text if outcome["reached"] else f"> {text} (not reached)"


def _budgets(cfg: dict[str, Any]) -> str:
    budgets = cfg.get("budgets")
    if not budgets or len({tuple(b) for b in budgets.values()}) == 1:
        return f"{cfg['budget']:g}"
    return ", ".join(f"{'/'.join(f'{x:g}' for x in budgets[n])} ({LABELS[n]})" for n in cfg["optimizers"])


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    cfg = report["config"]
    lines = [
        f"# {cfg['data']} / {cfg['model']}: steps to train loss {cfg['target']:g} vs batch size", "",
        f"{cfg['train_samples']} training samples; full train loss (eval mode, BatchNorm statistics "
        f"re-estimated) every {cfg['eval_every_examples']} examples; at most {cfg['max_epochs']:g} epochs "
        f"or {_budgets(cfg)} training seconds per run; SGD/Adam/SOAP/L-BFGS/K-FAC rates tuned per batch size on "
        f"{cfg['val_samples']} validation samples ({cfg['tune_steps']} steps per rate, lowest validation "
        f"loss), {cfg['warmup_steps']}-step linear warm-up; HF: HFOptimizer defaults"
        + (f" plus {', '.join(cfg['hf_option'])}" if cfg["hf_option"] else "")
        + f". Seed {cfg['seed']}, device {cfg['device']}, torch threads: {cfg['threads']} on "
        f"{cfg['cpu_count']} CPUs, torch {cfg['torch']}.", "",
        "| batch | contender | lr | steps | epochs | seconds | final train loss | stopped by |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for b, runs in report["runs"].items():
        for name, o in runs.items():
            lr = "-" if o["lr"] is None else f"{o['lr']:g}" + (" (grid edge)" if report["tuning"][b][name]
                                                               ["at_edge"] else "")
            lines.append(f"| {b} | {LABELS[name]} | {lr} | {_cell(o, 'steps', 'd')} | {_cell(o, 'epochs', '.2f')} "
                         f"| {_cell(o, 'seconds', '.1f')} | {o['final_train_loss']:.4f} | {o['stop_reason']} |")
    lines += _ratio_lines(report) + _tuning_lines(report)
    lines += ["", f"Total wall-clock time: {report['total_seconds']:.0f} s.", ""]
    path.write_text("\n".join(lines))


def _ratio_lines(report: dict[str, Any]) -> list[str]:
    names = report["config"]["optimizers"]
    sizes = list(report["runs"])
    lines = ["", "Steps to target (> : not reached, the count at the stop):", "",
             "| batch | " + " | ".join(LABELS[n] for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for b in sizes:
        cells = [(str(o["steps"]) if o["reached"] else f"> {o['steps']}") if (o := report["runs"][b].get(n))
                 else "-" for n in names]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    crit = report["critical"]
    lines.append("| critical batch | " + " | ".join(format_critical(crit[n]) for n in names) + " |")
    lines += ["", f"Local exponent a = log(S1/S2) / log(B2/B1) between successive batch sizes (1: steps fall "
                  f"as fast as the batch grows; the critical batch is the last one reached with every "
                  f"a >= {CRITICAL_EXPONENT:g}):", "",
              "| batch | " + " | ".join(LABELS[n] for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for b in sizes[1:]:
        cells = [("-" if crit[n]["exponents"].get(b) is None else f"{crit[n]['exponents'][b]:.2f}") for n in names]
        lines.append(f"| {sizes[sizes.index(b) - 1]} -> {b} | " + " | ".join(cells) + " |")
    if not report["ratios"]:
        return lines + ["", "HF step ratios: not computed (needs hf and a peer)."]
    peers = list(report["ratios"])
    lines += ["", "HF steps / each peer's steps to target (< : only HF reached, an upper bound; > : only "
                  "the peer reached, a lower bound):", "",
              "| batch | " + " | ".join(f"HF / {LABELS[p]}" for p in peers) + " |", "|---" * (len(peers) + 1) + "|"]
    for b in sizes:
        cells = [format_ratio(report["ratios"][p][b]) if b in report["ratios"][p] else "-" for p in peers]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines.append("")
    for peer, verdict in report["claims"].items():
        lines.append(f"Claim \"at batch >= {CLAIM_BATCH}, HF needs at most 1/{round(1 / CLAIM_RATIOS[peer])} of "
                     f"{LABELS[peer]}'s steps\": {verdict}.")
    return lines


def _tuning_lines(report: dict[str, Any]) -> list[str]:
    lines = ["", "Learning-rate tuning (validation loss after the tuning steps; chosen in bold):", "",
             "| batch | contender | lr: val loss |", "| --- | --- | --- |"]
    for b, tuned in report["tuning"].items():
        for name, t in tuned.items():
            if t["points"]:
                cells = ", ".join((f"**{p['lr']:g}: {p['val_loss']:.4f}**" if p["lr"] == t["lr"]
                                   else f"{p['lr']:g}: {p['val_loss']:.4f}") for p in t["points"])
                lines.append(f"| {b} | {LABELS[name]} | {cells} |")
    return lines


def plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    cfg = report["config"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for name in cfg["optimizers"]:
        # A merged or interrupted study need not hold every contender at every batch size.
        outcomes = [(int(b), runs[name]) for b, runs in report["runs"].items() if name in runs]
        style = dict(color=COLORS[name], marker=MARKERS[name], ms=7)
        for ax, key in zip(axes, ("steps", "seconds")):
            # A count of 0 (the initial model was already at the target) has no place on a log axis.
            done = [(b, o[key]) for b, o in outcomes if o["reached"] and o[key] > 0]
            capped = [(b, o[key]) for b, o in outcomes if not o["reached"] and o[key] > 0]
            if done:
                ax.plot(*zip(*done), label=LABELS[name], **style)
            if capped:
                ax.plot(*zip(*capped), ls="none", mfc="none", label=None if done else LABELS[name], **style)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax, what in zip(axes, ("steps", "training seconds")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(cfg["batch_sizes"])
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)  # shown when the values span less than a decade
        ax.set_xlabel("batch size")
        ax.set_ylabel(f"{what} to target")
        ax.set_title(f"{what} to train loss {cfg['target']:g}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=9)
    fig.suptitle(f"{cfg['data']} / {cfg['model']}, {cfg['train_samples']} training samples, seed {cfg['seed']}; "
                 "open markers: target not reached, drawn at the stop (a lower bound)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def _config(args: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    config = {k: v for k, v in vars(args).items()}
    config.update(train_samples=len(data["train"]), val_samples=len(data["val"]),
                  threads=torch.get_num_threads(), cpu_count=os.cpu_count(), torch=torch.__version__,
                  python=platform.python_version(), pytorch_optimizer=_package_version("pytorch_optimizer"),
                  asdfghjkl=_package_version("asdfghjkl"),
                  lr_grids={b: {n: lr_grid(args, n, b) for n in args.optimizers if n != "hf"}
                            for b in args.batch_sizes})
    return config


def _drop_unavailable(args: argparse.Namespace) -> None:
    if "soap" in args.optimizers and not soap_available():
        print("note: pytorch_optimizer is not installed; skipping SOAP", flush=True)
        args.optimizers.remove("soap")
    if "kfac" in args.optimizers and not kfac_available():
        print("note: asdfghjkl (ASDL) is not installed; skipping K-FAC", flush=True)
        args.optimizers.remove("kfac")
    if "hf" in args.optimizers and not common.hf_available():
        raise SystemExit("this hfopt has no HFOptimizer; pass --optimizers sgd adam soap")


def run_batch_size(args: argparse.Namespace, data: dict[str, Any], batch_size: int
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tune the first-order rates at ``batch_size``, then run every contender to the target."""
    tuning, runs = {}, {}
    for name in args.optimizers:
        tuning[name] = {"lr": None, "at_edge": False, "points": []} if name == "hf" else \
            tune(args, data, name, batch_size)
        runs[name] = run_to_target(args, data, name, batch_size, tuning[name]["lr"])
        print(_describe(name, batch_size, runs[name]), flush=True)
    return tuning, runs


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the study; returns the report that is also written to results.json."""
    started = time.perf_counter()
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out))
    if args.threads:
        torch.set_num_threads(args.threads)
    _drop_unavailable(args)
    data = prepare_data(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"scaling {', '.join(args.optimizers)} on {args.data}/{args.model} ({len(data['train'])} samples), "
          f"batch sizes {args.batch_sizes}, target train loss {args.target:g}", flush=True)
    tuning, runs = {}, {}
    for b in args.batch_sizes:
        tuning[b], runs[b] = run_batch_size(args, data, b)
        # Written after every batch size: an interrupted study keeps the sizes it finished.
        report = {"config": _config(args, data), "tuning": tuning, "runs": runs,
                  "complete": b == args.batch_sizes[-1], "total_seconds": time.perf_counter() - started}
        finish(report, out)
    return report


def finish(report: dict[str, Any], out: Path) -> dict[str, Any]:
    """Ratios, claims and critical batch sizes of ``report``'s runs; write results.json/.md and the PNG."""
    names, runs = report["config"]["optimizers"], report["runs"]
    report["ratios"] = all_ratios(runs, names)
    report["claims"] = all_claims(report["ratios"])
    report["critical"] = {n: critical_batch({b: r[n] for b, r in runs.items() if n in r}) for n in names}
    for peer, ratios in report["ratios"].items():
        for b, r in ratios.items():
            print(f"[ratio] B={b}: HF steps / {LABELS[peer]} steps = {format_ratio(r)}", flush=True)
    common.write_json(out / "results.json", report)
    write_markdown(out / "results.md", report)
    plot(out / "scaling.png", report)
    for peer, verdict in report["claims"].items():
        print(f"claim vs {LABELS[peer]}: {verdict}", flush=True)
    print(f"wrote {out / 'scaling.png'}, {out / 'results.md'}, {out / 'results.json'}", flush=True)
    return report


def merge(folders: Sequence[str], out: Path) -> dict[str, Any]:
    """One report from runs of the same study split over processes (``--optimizers`` differing):
    their configurations must agree except for the contenders."""
    import json

    parts = [json.loads((Path(f) / "results.json").read_text()) for f in folders]
    # Each process may cover its own batch sizes and cap its runs differently (an L-BFGS step
    # costs 25 closure calls; an HF step at the whole batch, a hundred gradient-sized products).
    skip = {"optimizers", "out", "lr_grids", "merge", "budget", "budgets", "batch_sizes"}
    first = {k: v for k, v in parts[0]["config"].items() if k not in skip}
    for folder, part in zip(folders[1:], parts[1:]):
        other = {k: v for k, v in part["config"].items() if k not in skip}
        differ = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        if differ:
            raise SystemExit(f"--merge: {folder} was run with other settings ({', '.join(differ)})")
    config = dict(parts[0]["config"])
    config["optimizers"] = [n for n in CONTENDERS if any(n in p["config"]["optimizers"] for p in parts)]
    budgets: dict[str, set] = {}
    for part in parts:
        for n in part["config"]["optimizers"]:
            budgets.setdefault(n, set()).add(part["config"]["budget"])
    config["budgets"] = {n: sorted(b) for n, b in budgets.items()}
    config["budget"] = max(max(b) for b in budgets.values())
    config["batch_sizes"] = sorted({int(b) for part in parts for b in part["runs"]})
    runs: dict[int, dict[str, Any]] = {}
    tuning: dict[int, dict[str, Any]] = {}
    for part in parts:
        for b, r in part["runs"].items():
            clash = set(r) & set(runs.get(int(b), {}))
            if clash:
                raise SystemExit(f"--merge: {', '.join(sorted(clash))} at batch {b} appears in two folders")
            runs.setdefault(int(b), {}).update(r)
            tuning.setdefault(int(b), {}).update(part["tuning"][b])
    # Contender order within each batch size, as in a single run.
    runs = {b: {n: runs[b][n] for n in config["optimizers"] if n in runs[b]} for b in sorted(runs)}
    report = {"config": config, "tuning": tuning, "runs": runs, "merged_from": list(folders),
              "total_seconds": sum(p["total_seconds"] for p in parts)}
    out.mkdir(parents=True, exist_ok=True)
    return finish(report, out)


if __name__ == "__main__":
    main()
