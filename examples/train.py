#!/usr/bin/env python
"""Train a BatchNorm network on digits or CIFAR-10 with Hessian-free, SGD, Adam or SOAP.

Examples::

    python examples/train.py                                   # HF, digits, digits_convnet_bn
    python examples/train.py --optimizer sgd --lr 0.1 --epochs 30
    python examples/train.py --optimizer soap --epochs 30   # needs pip install -e ".[examples]"
    python examples/train.py --data cifar10 --model c3d3_bn --optimizer hf \\
        --time-budget 600
    python examples/train.py --optimizer hf --epochs 40 --resume  # continue a run
    torchrun --nproc_per_node=2 examples/train.py --distributed   # data-parallel over 2 ranks
    tensorboard --logdir runs

What is measured
----------------
The x-axis of every TensorBoard record is the number of training examples
seen so far, so that runs with different batch sizes (HF at 512, SGD at 128)
line up.  A record that describes the model (a loss, an accuracy) sits at the
examples the model had been trained on; a record that describes a step (its
learning rate, its time, HF's diagnostics) at the examples seen once the step
is done.  Every record's ``walltime`` is the *training clock*: the run's
first start plus the training seconds so far (saved in the checkpoint, so a
resumed run continues it), which makes TensorBoard's "Relative" axis training
seconds, evaluation excluded, and its "Wall" axis a compressed timeline.
(Relative counts from each chart's first point: x = 0 for the records of
the model and for ``time/wall``, but the end of the first step for
``train/lr`` and ``hf/*``, whose Relative is short by that step's time.)

* ``train/loss``, ``train/accuracy`` (per step): the mini-batch loss and
  accuracy *before* the step, in train mode, at the examples seen before
  that batch.
* ``train/epoch_loss``, ``train/epoch_accuracy`` (per evaluation): one full
  pass over the training set in eval mode.  This is the "train loss" of the
  summary and of compare.py: it is the objective at the current parameters,
  so it is comparable between optimizers with different batch sizes, unlike
  a running mean over an epoch of pre-step batch losses (logged too, as
  ``train/epoch_running_loss``).
* ``val/*``, ``test/*`` (per evaluation): the same pass over the validation
  and test sets.  The evaluations are the initial model (x = 0), the end of
  every ``--eval-every`` K-th epoch (K > 1 for fast first-order runs whose
  epochs cost less than the evaluation), after every ``--eval-every-steps``
  N-th step if N > 0 (HF and L-BFGS in compare.py: a few steps per epoch,
  where one point per epoch is too sparse for TensorBoard's smoothing to
  follow a loss that falls decades), and the end of the run, also when
  it stopped mid-epoch (``--max-steps``, ``--time-budget``), so every curve
  ends where the run did.
* Eval mode needs BatchNorm population statistics.  The running averages
  (momentum 0.1, one update per training forward) are still dominated by
  their initial values after the few dozen steps HF takes, which inflates
  HF's eval-mode loss several-fold.  So, before every evaluation, a *copy*
  of the model re-estimates them on ``--precise-bn`` (default 4096) training
  samples ("precise BN"); training itself is untouched.  ``--precise-bn 0``
  evaluates with the running averages.
* ``train/lr`` (per step, sgd/adam/soap): the learning rate of the step,
  which rises linearly over the first ``--warmup-steps`` steps.
* ``time/wall`` (per step, and 0 at x = 0) and ``time/epoch_wall`` (per
  evaluation): training seconds so far, excluding evaluation, checkpointing
  and start-up.
* ``hf/*`` (per HF step): every diagnostic of the step, written by
  :func:`hfopt.summaries.log_step` (a NaN rho is logged as NaN, and the
  reasons CG stopped or a step was rejected as text and 0/1 indicators).
* ``summary/final`` (text, in the Text tab): the end-of-run numbers as a
  table.  They are not scalars: one-point charts would only crowd the
  scalar dashboards, and the curves above already end at the same values.

The summary (printed as one JSON line and returned by :func:`main`) has the
final ``train_loss``/``train_accuracy`` (the eval-mode pass above),
``val_accuracy``, ``best_val_accuracy``, ``test_accuracy``, ``epochs``
(fractional), ``steps``, ``seconds`` (training time of the whole run, resumed
parts included), ``wall_seconds`` (this invocation, evaluation included),
``stop_reason`` and the per-evaluation ``history``.

Batch sizes: 128 for SGD, Adam and SOAP; 512 for HF, which takes few
expensive steps and whose curvature (and CG's solution) is only as good as
the batch it is estimated on, and for L-BFGS, a full-batch method.  Unset HF
options keep HFOptimizer's defaults.

K-FAC is ASDL's (``examples/kfac.py``; the optional ``asdfghjkl`` package):
the Kronecker-factored Fisher preconditions the gradient, refreshed every step
with damping 1e-3, and SGD with ``--momentum`` takes the step.

L-BFGS is ``torch.optim.LBFGS`` with ``line_search_fn="strong_wolfe"`` and
torch's other defaults: one step runs up to 20 iterations on its batch (up to
25 closure calls), each in train mode, so BatchNorm's running statistics move
at every call, as they do for any user of it.

Learning rates (sgd 0.1, adam 1e-3, soap 3e-3 unless ``--lr``) rise linearly
from lr/W to lr over the first W = ``--warmup-steps`` (default 20) steps;
step k's rate depends only on k, so resuming keeps it.  SOAP is
``pytorch_optimizer.SOAP``, a Shampoo-preconditioned Adam from the optional
``pytorch-optimizer`` package (``pip install -e ".[examples]"``); its weight
decay is decoupled, and ``--weight-decay`` (default 0) replaces its own
default of 0.01 so that all optimizers start from the same objective.

Threads: ``--threads`` sets torch's CPU threads.  On a machine with other
load, oversubscribed threads can slow small models down several times;
``--threads 1`` is then often the fastest choice.

Data-parallel (``--distributed``)
---------------------------------
Under ``torchrun`` every rank draws the same shuffled global batch of
``--batch-size`` samples and trains on its own contiguous part of it
(``tensor_split``: parts differ by at most one sample).  The model is wrapped
in ``DistributedDataParallel``; HF reduces the gradient and every curvature
product itself (see hfopt.distributed), SGD/Adam/SOAP rely on DDP's gradient
averaging.  BatchNorm normalises per rank (DDP's default).  The logged batch
loss and accuracy are those of the global batch; TensorBoard records,
checkpoints, progress and the summary come from rank 0 only.  Backend: gloo on
CPU, NCCL on CUDA (one GPU per rank, ``LOCAL_RANK``).

Checkpoints and resuming
------------------------
``<logdir>/checkpoint.pt`` is written after every ``--checkpoint-every``
epochs and when the run ends, also mid-epoch.  It holds the model, optimizer,
counters, elapsed training time, the history, the RNG states of
torch/numpy/python, and the data loader generator's state at the start of
the current epoch together with the number of batches already taken from
it.  ``--resume`` restores all of it, so a resumed run produces bit-for-bit the
same parameters and losses as an uninterrupted one (on the same device and
thread count), also after a crash or a SIGKILL in mid-epoch: it goes on from
the last checkpoint (tests/test_checkpoints.py kills runs to check this).
``--epochs``, ``--max-steps`` and ``--time-budget`` count the whole run,
resumed parts included, and may be raised when resuming.

A checkpoint is written atomically: to a temporary file in the same folder,
flushed to disk (fsync), then renamed over the old one with ``os.replace``, so
a crash leaves the old checkpoint or the new one, never a torn file (a
process killed while saving may leave its ``.checkpoint.pt.<pid>.tmp``, which
is never read: delete it).  Before
it, the TensorBoard writer is flushed, so a killed run loses none of the
records up to the checkpoint (a record still queued in the writer's thread
would die with the process); the resumed run purges what the killed one
logged after the checkpoint.  (The killed run's mini-batch loss and accuracy
of the batch after the checkpoint sit at the checkpoint's own x, which the
purge keeps: they may show twice, with the same value.)  ``--resume`` loads
with ``torch.load(weights_only=True)``, which runs no code from the file,
after checking the archive's CRCs (which ``torch.load`` does not).  A
checkpoint that is truncated, corrupted, not a checkpoint, from another
version of train.py or from other settings is refused: train.py exits with
status 1 and a one-line error naming the file and what to do; it never starts
afresh over it.  Without ``--resume`` an existing checkpoint is replaced by
the new run's; with ``--resume`` and no checkpoint the run starts from scratch.

The training loop is deterministic: every RNG is seeded from ``--seed``, and
the loader (``num_workers=0``) draws each epoch's shuffle from its own seeded
``torch.Generator``.  The train/val/test split depends only on ``--data-seed``
(default 0), so runs with different ``--seed`` see the same splits.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import random
import signal
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also puts the repository root on sys.path)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Sampler, TensorDataset  # noqa: E402
from tqdm import tqdm  # noqa: E402

from models import DEFAULT_INPUT, MODELS, build_model  # noqa: E402

OPTIMIZERS = ("hf", "sgd", "adam", "soap", "lbfgs", "kfac")
DATASETS = ("digits", "cifar10")
DEFAULT_MODEL = {"digits": "digits_convnet_bn", "cifar10": "c3d3_bn"}
# HF takes few, expensive steps whose curvature estimate improves with the
# batch, so it gets bigger batches than the first-order methods.
DEFAULT_BATCH_SIZE = {"hf": 512, "sgd": 128, "adam": 128, "soap": 128, "lbfgs": 512, "kfac": 128}
DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3, "soap": 3e-3, "lbfgs": 1.0, "kfac": 3e-3}
# A linear warm-up keeps the first steps, taken with Adam/SOAP's still empty
# moment estimates or SGD's large initial gradients, from throwing the
# network far off; 20 steps are two epochs on digits, 6% of one on CIFAR-10.
DEFAULT_WARMUP_STEPS = 20
CHECKPOINT_NAME = "checkpoint.pt"
# 2: counts training examples (the TensorBoard x-axis) and the training clock.
CHECKPOINT_VERSION = 2
# Arguments that define the training trajectory; --resume refuses to change them.
TRAJECTORY_ARGS = (
    "optimizer", "data", "model", "data_seed", "batch_size", "lr", "warmup_steps", "momentum",
    "weight_decay", "seed", "curvature", "damping", "cg_max_iterations", "curvature_batch", "hf_option",
    "precise_bn",
)


# --------------------------------------------------------------------------- arguments
def _count_or_fraction(text: str):
    """``"128"`` -> 128 (samples), ``"0.25"`` -> 0.25 (fraction of the batch)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train a BatchNorm network with Hessian-free optimization, SGD, Adam, SOAP, L-BFGS or K-FAC.",
        formatter_class=common.HelpFormatter,
    )
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="hf", help="optimizer")
    parser.add_argument("--data", choices=DATASETS, default="digits", help="data set")
    parser.add_argument("--model", choices=sorted(MODELS), default=None,
                        help="default: digits_convnet_bn for digits, c3d3_bn for cifar10")
    parser.add_argument("--data-dir", default=str(common.DEFAULT_DATA_DIR),
                        help="folder holding cifar-10-batches-py (ignored for digits)")
    parser.add_argument("--data-seed", type=int, default=0,
                        help="seed of the train/val/test split (independent of --seed)")
    parser.add_argument("--epochs", type=int, default=20, help="total epochs")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many optimizer steps in total")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="stop once this many seconds of training (evaluation excluded) have elapsed")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: 512 for hf and lbfgs, 128 for sgd, adam, soap and kfac")
    parser.add_argument("--eval-batch-size", type=int, default=1024, help="batch size of evaluation passes")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate of sgd/adam/soap/lbfgs/kfac; default 0.1 for sgd, 1e-3 for adam, "
                             "3e-3 for soap, 1 for lbfgs (its first trial step, which the strong-Wolfe "
                             "line search then adjusts), 3e-3 for kfac")
    parser.add_argument("--warmup-steps", type=int, default=None, metavar="W",
                        help="sgd/adam/soap/lbfgs/kfac: raise the learning rate linearly from lr/W to lr over "
                             f"the first W steps (default {DEFAULT_WARMUP_STEPS}; 0: no warm-up)")
    parser.add_argument("--momentum", type=float, default=0.9, help="momentum of sgd, and of kfac's SGD")
    parser.add_argument("--weight-decay", type=float, default=0.0,
                        help="L2 penalty (sgd/adam: their weight_decay; soap: its decoupled "
                             "weight_decay; hf: HFOptimizer's weight_decay)")
    hf = parser.add_argument_group("Hessian-free options (unset ones keep HFOptimizer's defaults)")
    hf.add_argument("--curvature", choices=("ggn", "hessian"), default=None,
                    help="curvature matrix (HFOptimizer default: ggn)")
    hf.add_argument("--damping", type=float, default=None, help="initial Tikhonov damping (default 1.0)")
    hf.add_argument("--cg-max-iterations", type=int, default=None, help="CG iteration cap (default 250)")
    hf.add_argument("--curvature-batch", type=_count_or_fraction, default=None,
                    help="samples (int) or fraction (float in (0, 1]) of each batch used for "
                         "curvature products (default: the whole batch)")
    hf.add_argument("--hf-option", action="append", default=[], metavar="KEY=VALUE",
                    help="any other HFOptimizer keyword, VALUE as a Python literal; repeatable")
    parser.add_argument("--precise-bn", type=int, default=4096, metavar="N",
                        help="before each evaluation re-estimate the BatchNorm statistics on N training "
                             "samples, in a copy of the model (0: use the running statistics)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights, shuffles and HF sampling")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, one per core); on a busy "
                             "machine 1 can be several times faster than oversubscribed cores")
    parser.add_argument("--logdir", default=None,
                        help="TensorBoard and checkpoint folder; default runs/<data>-<model>-<optimizer>-s<seed>")
    parser.add_argument("--resume", action="store_true",
                        help="continue from <logdir>/checkpoint.pt (starts fresh if there is none; "
                             "refuses, with exit status 1, one it cannot read)")
    parser.add_argument("--eval-every", type=int, default=1, metavar="EPOCHS",
                        help="evaluate every this many epochs (and at the end of the run)")
    parser.add_argument("--eval-every-steps", type=int, default=0, metavar="STEPS",
                        help="also evaluate after every this many steps, mid-epoch too (0: only at epoch ends); "
                             "for few-step optimizers, whose per-epoch curves are too sparse to smooth")
    parser.add_argument("--checkpoint-every", type=int, default=1, metavar="EPOCHS",
                        help="checkpoint every this many epochs (0: only at the end)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    parser.add_argument("--distributed", action="store_true",
                        help="data-parallel over the ranks torchrun starts (see the module docstring)")
    sharp = parser.add_argument_group("sharpness (examples/sharpness.py)")
    sharp.add_argument("--sharpness-every", type=int, default=0, metavar="N",
                       help="every N steps (and at the start) log the top Hessian and GGN eigenvalues "
                            "to TensorBoard (sharpness/*); 0: never")
    sharp.add_argument("--sharpness-samples", type=int, default=512,
                       help="fixed training samples (the first of the split) the eigenvalues are taken on")
    sharp.add_argument("--sharpness-batch-size", type=int, default=None,
                       help="batches of the sharpness samples (default: --batch-size)")
    sharp.add_argument("--sharpness-tol", type=float, default=1e-3, help="relative tolerance of the eigenvalues")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(None if argv is None else [str(a) for a in argv])
    if args.model is None:
        args.model = DEFAULT_MODEL[args.data]
    if args.batch_size is None:
        args.batch_size = DEFAULT_BATCH_SIZE[args.optimizer]
    if args.optimizer == "hf":
        if args.lr is not None or args.warmup_steps is not None:
            parser.error("--lr and --warmup-steps are for sgd/adam/soap; HF has no learning rate")
    else:
        if args.lr is None:
            args.lr = DEFAULT_LR[args.optimizer]
        if args.warmup_steps is None:
            args.warmup_steps = DEFAULT_WARMUP_STEPS
        if args.warmup_steps < 0:
            parser.error("--warmup-steps must be >= 0")
    if args.optimizer == "lbfgs" and args.weight_decay:
        parser.error("--weight-decay: torch.optim.LBFGS has no weight decay")
    if args.optimizer == "kfac":
        if args.distributed:
            parser.error("--distributed: ASDL's K-FAC does not take a DistributedDataParallel model")
        try:
            import kfac

            kfac.load_asdl()
        except ImportError as err:
            parser.error(str(err))
    if args.optimizer == "soap":
        try:
            load_soap()
        except ImportError as err:
            parser.error(str(err))
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.distributed and "RANK" not in os.environ:
        parser.error("--distributed needs the ranks' environment that torchrun sets (RANK, WORLD_SIZE, ...): "
                     "torchrun --nproc_per_node=K examples/train.py --distributed ...")
    if args.logdir is None:
        args.logdir = str(Path("runs") / f"{args.data}-{args.model}-{args.optimizer}-s{args.seed}")
    for name in ("batch_size", "eval_batch_size", "eval_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.epochs < 0 or (args.max_steps is not None and args.max_steps < 0) or args.eval_every_steps < 0:
        parser.error("--epochs, --max-steps and --eval-every-steps must be >= 0")
    if args.sharpness_every < 0 or args.sharpness_samples < 2 or not 0 < args.sharpness_tol < 1:
        parser.error("--sharpness-every must be >= 0, --sharpness-samples >= 2, --sharpness-tol in (0, 1)")
    if args.sharpness_batch_size is None:
        args.sharpness_batch_size = args.batch_size
    if args.sharpness_batch_size < 2:
        parser.error("--sharpness-batch-size must be >= 2 (train-mode BatchNorm needs two samples)")
    if args.checkpoint_every < 0 or args.precise_bn < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--checkpoint-every and --precise-bn must be >= 0, --threads >= 1")
    try:
        hf_options(args)
    except ValueError as err:
        parser.error(str(err))
    expected = DEFAULT_INPUT.get(args.model)
    shape = {"digits": (1, 8, 8), "cifar10": (3, 32, 32)}[args.data]
    if expected is not None and tuple(expected) != shape:
        parser.error(f"model {args.model} expects {expected} inputs, but {args.data} images are {shape}; "
                     f"try --model {DEFAULT_MODEL[args.data]}")
    return args


def hf_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for HFOptimizer: the explicit flags that were set plus --hf-option pairs."""
    options: dict[str, Any] = {}
    for name in ("curvature", "damping", "cg_max_iterations", "curvature_batch"):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    options["weight_decay"] = args.weight_decay
    options.update(common.parse_hf_options(args.hf_option))
    return options


# --------------------------------------------------------------------------- data
class EpochBatches(Sampler):
    """Yields one epoch of shuffled index batches per iteration.

    The permutation is drawn from ``generator`` when iteration starts; the
    first ``skip`` batches of it are then passed over (used once, to resume
    mid-epoch).  A final batch of a single sample is dropped, because
    BatchNorm cannot normalise one sample in train mode.
    """

    def __init__(self, num_samples: int, batch_size: int, generator: torch.Generator):
        super().__init__()
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.generator = generator
        self.skip = 0

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (1 if rest > 1 else 0)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.num_samples, generator=self.generator).tolist()
        skip, self.skip = self.skip, 0
        for b in range(skip, len(self)):
            yield order[b * self.batch_size:(b + 1) * self.batch_size]


def on_device(dataset: TensorDataset, device: torch.device) -> TensorDataset:
    return TensorDataset(*(t.to(device) for t in dataset.tensors))


class Ranks:
    """This process's place among the data-parallel ranks (one rank when not distributed)."""

    def __init__(self, args: argparse.Namespace):
        self.enabled = args.distributed
        self.rank, self.size = 0, 1
        if self.enabled:
            import torch.distributed as dist

            cuda = torch.device(args.device).type == "cuda"
            if cuda:
                args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                torch.cuda.set_device(torch.device(args.device))
            dist.init_process_group("nccl" if cuda else "gloo")
            self.rank, self.size = dist.get_rank(), dist.get_world_size()

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of a global batch."""
        return torch.tensor_split(t, self.size)[self.rank] if self.enabled else t

    def wrap(self, model: nn.Module) -> nn.Module:
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def batch_totals(self, loss: float, correct: int, count: int) -> tuple[float, int]:
        """Mean loss and number correct over the global batch."""
        if not self.enabled:
            return loss, correct
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([loss * count, float(correct), float(count)], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t[0] / t[2]), int(round(float(t[1])))

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.destroy_process_group()


class NullWriter:
    """What ranks other than 0 log to: nothing."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def add_text(self, *args: Any, **kwargs: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- randomness
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Global RNG states in types that ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(cached)),
        "python": (version, list(internal), gauss_next),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# --------------------------------------------------------------------------- model / optimizer
def load_soap() -> type:
    """``pytorch_optimizer.SOAP``, imported only when asked for: it is an optional extra."""
    try:
        from pytorch_optimizer import SOAP
    except ImportError as err:
        raise ImportError('--optimizer soap needs the pytorch-optimizer package: '
                          'pip install -e ".[examples]" (or pip install pytorch-optimizer)') from err
    return SOAP


def make_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                               weight_decay=args.weight_decay)
    if args.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if args.optimizer == "soap":
        return load_soap()(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if args.optimizer == "kfac":
        from kfac import KFAC

        return KFAC(model, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)  # type: ignore[return-value]
    if args.optimizer == "lbfgs":
        # torch's own quasi-Newton method as a user would run it: its defaults (20 iterations
        # and up to 25 closure calls per step, history 100) with the strong-Wolfe line search.
        return torch.optim.LBFGS(model.parameters(), lr=args.lr, line_search_fn="strong_wolfe")
    import hfopt

    if not hasattr(hfopt, "HFOptimizer"):
        raise RuntimeError("this hfopt has no HFOptimizer; use --optimizer sgd or adam")
    options = hf_options(args)
    # HF's own sampling (the preconditioner's diagonal estimate) follows --seed
    # too, when this HFOptimizer takes a seed.
    if "seed" in inspect.signature(hfopt.HFOptimizer).parameters:
        options.setdefault("seed", args.seed)
    # No writer: train.py logs the diagnostics itself, on its own x-axis and clock.
    return hfopt.HFOptimizer(model.parameters(), **options)


def learning_rate(args: argparse.Namespace, step: int) -> float:
    """The learning rate of the ``step``-th step (1-based) of a first-order run."""
    return common.warmup_lr(args.lr, args.warmup_steps, step)


def train_step(optimizer, hessian_free: bool, model: nn.Module, loss_fn: nn.Module,
               x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """One optimizer step; returns the batch loss and number correct before the step."""
    if hasattr(optimizer, "step_batch"):  # K-FAC runs its own forward and backward (examples/kfac.py)
        loss, outputs = optimizer.step_batch(model, loss_fn, x, y)
        return float(loss), 0 if outputs is None else int((outputs.argmax(dim=1) == y).sum())
    first: dict[str, torch.Tensor] = {}

    if hessian_free:
        def closure():
            outputs = model(x)
            loss = loss_fn(outputs, y)
            if not first:  # HF's first call is at the current parameters
                first["loss"], first["outputs"] = loss.detach(), outputs.detach()
            return loss, outputs
    else:
        def closure():
            optimizer.zero_grad(set_to_none=True)
            outputs = model(x)
            loss = loss_fn(outputs, y)
            loss.backward()
            if not first:
                first["loss"], first["outputs"] = loss.detach(), outputs.detach()
            return loss

    optimizer.step(closure)
    correct = int((first["outputs"].argmax(dim=1) == y).sum())
    return float(first["loss"]), correct


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over ``dataset`` in eval mode."""
    was_training = model.training
    model.eval()
    inputs, targets = dataset.tensors
    total, correct = 0.0, 0
    for start in range(0, len(targets), batch_size):
        out = model(inputs[start:start + batch_size])
        y = targets[start:start + batch_size]
        total += float(F.cross_entropy(out.float(), y, reduction="sum"))
        correct += int((out.argmax(dim=1) == y).sum())
    model.train(was_training)
    n = max(len(targets), 1)
    return total / n, correct / n


@torch.no_grad()
def precise_bn_copy(model: nn.Module, train_set: TensorDataset, samples: int, batch_size: int,
                    generator_seed: int) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are re-estimated
    (cumulative average) on ``samples`` training samples; ``model`` is untouched."""
    clone = copy.deepcopy(model)
    norms = [m for m in clone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return clone
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    clone.train()
    inputs = train_set.tensors[0]
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(generator_seed))
    order = order[:samples].to(inputs.device)
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        if len(index) > 1:
            clone(inputs[index])
    return clone


# --------------------------------------------------------------------------- checkpoints
class CheckpointError(ValueError):
    """A checkpoint that ``--resume`` cannot continue from; the message names the file and the way out."""


# What a train.py checkpoint holds; anything without all of it is not one.
CHECKPOINT_KEYS = ("version", "args", "model", "optimizer", "state", "loader_generator", "rng")
_START_AFRESH = "delete it (or run without --resume) to start this run from scratch"


def _one_line(err: Exception, limit: int = 200) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically: a crash at any point leaves the previous
    checkpoint or the new one, never a mixture.  The temporary file sits next to ``path``
    (``os.replace`` is atomic only within one file system) and is gone if the save fails."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; Windows cannot open a folder)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path``, or a :class:`CheckpointError` saying why it cannot be resumed."""
    unreadable = f"cannot resume from {path}: it is not a readable train.py checkpoint"
    try:
        # torch.load does not check the archive's CRCs: a flipped bit in a tensor would load silently.
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
        if bad_member is not None:
            raise ValueError(f"member {bad_member} fails its CRC check")
        # weights_only: a checkpoint is plain tensors and containers, so loading one
        # never runs code from the file.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises anything from EOFError to UnicodeDecodeError here
        raise CheckpointError(f"{unreadable} ({_one_line(err)}; truncated or corrupted?); "
                              f"{_START_AFRESH}") from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{unreadable} (it holds a {type(checkpoint).__name__}); {_START_AFRESH}")
    if checkpoint.get("version", CHECKPOINT_VERSION) != CHECKPOINT_VERSION:
        raise CheckpointError(f"cannot resume from {path}: it was written by another version of train.py "
                              f"(checkpoint version {checkpoint['version']!r}, this one reads "
                              f"{CHECKPOINT_VERSION}); resume it with the train.py that wrote it, or "
                              f"{_START_AFRESH}")
    if (not set(CHECKPOINT_KEYS) <= checkpoint.keys() or not isinstance(checkpoint["args"], dict)
            or not isinstance(checkpoint["state"], dict)):
        raise CheckpointError(f"{unreadable} (it holds no {', '.join(CHECKPOINT_KEYS)}); {_START_AFRESH}")
    return checkpoint


def check_resumable(saved: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    current = vars(args)
    changed = [f"--{k.replace('_', '-')}: {saved.get(k)!r} -> {current.get(k)!r}"
               for k in TRAJECTORY_ARGS if saved.get(k) != current.get(k)]
    if changed:
        raise CheckpointError(f"cannot resume {path} with different settings: " + "; ".join(changed)
                              + "; resume with the settings it was written with, or pass another --logdir")


# --------------------------------------------------------------------------- training
def final_text(args: argparse.Namespace, record: dict[str, Any], stop_reason: str) -> str:
    """The end-of-run evaluation as a Markdown table, for TensorBoard's Text tab."""
    setting = f"batch {args.batch_size}" + ("" if args.optimizer == "hf" else f", lr {args.lr:g}")
    lines = [
        f"**{args.optimizer}** ({setting}): {record['epoch']:.2f} epochs, {record['step']} steps, "
        f"{record['examples']} examples, {record['time']:.1f} training seconds; stop reason: {stop_reason}.",
        "",
        "| split | loss | accuracy |",
        "| --- | --- | --- |",
    ]
    for split, name in (("train", "train (full pass)"), ("val", "validation"), ("test", "test")):
        lines.append(f"| {name} | {record[f'{split}_loss']:.6g} | {record[f'{split}_accuracy']:.4f} |")
    return "\n".join(lines)


def _printable(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in summary.items() if k != "history"}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train as configured by ``args`` (see :func:`parse_args`) and return the summary."""
    wall_start = time.perf_counter()
    ranks = Ranks(args)
    device = torch.device(args.device)
    logdir = Path(args.logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = logdir / CHECKPOINT_NAME
    show = not args.quiet and ranks.leader

    checkpoint = None
    if args.resume:
        if checkpoint_path.exists():
            checkpoint = load_checkpoint(checkpoint_path)
            check_resumable(checkpoint["args"], args, checkpoint_path)
        elif show:
            print(f"no checkpoint in {logdir}; starting from scratch", file=sys.stderr)
    elif checkpoint_path.is_file() and show:
        print(f"replacing the run in {logdir} (pass --resume to continue it instead)", file=sys.stderr)

    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False

    data = common.load_data(args.data, args.data_dir, args.data_seed)
    train_set, val_set, test_set = (on_device(data[k], device) for k in ("train", "val", "test"))
    model = build_model(args.model, num_classes=data["num_classes"]).to(device)
    model.train()
    loss_fn = nn.CrossEntropyLoss()

    optimizer = make_optimizer(args, model)
    trained = ranks.wrap(model)  # what the steps run; evaluation and checkpoints use the bare model
    hessian_free = args.optimizer == "hf"
    if hessian_free:
        from hfopt.summaries import log_step
    sharpness = None
    if args.sharpness_every:
        from sharpness import SharpnessLogger

        sharpness = SharpnessLogger(args.sharpness_every, train_set, args.sharpness_samples,
                                    args.sharpness_batch_size, args.sharpness_tol)

    generator = torch.Generator().manual_seed(args.seed)
    batches = EpochBatches(len(train_set), args.batch_size, generator)
    if len(batches) == 0:
        raise ValueError(f"the training set has {len(train_set)} samples: too few for a batch")
    loader = DataLoader(train_set, sampler=batches, batch_size=None, num_workers=0)
    steps_per_epoch = len(batches)

    state: dict[str, Any] = {
        "epoch": 0,               # completed epochs
        "batch_in_epoch": 0,      # batches of the current epoch already trained on
        "global_step": 0,
        "examples": 0,            # training examples seen: TensorBoard's x-axis
        "train_time": 0.0,
        # Epoch time of the run's first start: TensorBoard walltimes are this
        # plus train_time, a clock that skips evaluation and pauses between resumes.
        "run_start_walltime": time.time(),
        "history": [],            # one record per evaluation (epoch 0 = initial model)
        "running": {"loss": 0.0, "correct": 0, "count": 0},
        "hf": {"steps": 0, "rejected": 0, "cg_iterations": 0, "curvature_products": 0},
    }
    loader_state = generator.get_state()  # generator state at the start of the current epoch
    if checkpoint is not None:
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            state.update(checkpoint["state"])
            # An end-of-run evaluation off the --eval-every schedule (e.g. mid-epoch)
            # is not part of an uninterrupted run.
            state["history"] = [r for r in state["history"] if not r["off_schedule"]]
            loader_state = checkpoint["loader_generator"]
            generator.set_state(loader_state)
            set_rng_state(checkpoint["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"cannot resume from {checkpoint_path}: its contents do not fit this run "
                                  f"({_one_line(err)}); {_START_AFRESH}") from err

    from torch.utils.tensorboard import SummaryWriter

    # Opened only now, so that a refused checkpoint leaves the folder untouched.
    # purge_step hides what a previous (crashed or overwritten) run logged
    # after the point this run starts from; the records at that very point
    # (the checkpoint's evaluation) were written before the checkpoint and stay.
    purge_step = int(state["examples"]) + 1 if checkpoint else 0
    writer = SummaryWriter(log_dir=str(logdir), purge_step=purge_step) if ranks.leader else NullWriter()

    def clock() -> float:
        return state["run_start_walltime"] + state["train_time"]

    def evaluate_all(off_schedule: bool) -> dict[str, Any]:
        eval_model = model
        if args.precise_bn:
            eval_model = precise_bn_copy(model, train_set, args.precise_bn, args.eval_batch_size,
                                         args.seed)
        train_loss, train_acc = evaluate(eval_model, train_set, args.eval_batch_size)
        val_loss, val_acc = evaluate(eval_model, val_set, args.eval_batch_size)
        test_loss, test_acc = evaluate(eval_model, test_set, args.eval_batch_size)
        running = state["running"]
        count = running["count"]
        return {
            "epoch": state["epoch"] + state["batch_in_epoch"] / steps_per_epoch,
            "step": state["global_step"],
            "examples": state["examples"],
            "time": state["train_time"],
            "train_loss": train_loss, "train_accuracy": train_acc,
            "running_loss": running["loss"] / count if count else math.nan,
            "running_accuracy": running["correct"] / count if count else math.nan,
            "val_loss": val_loss, "val_accuracy": val_acc,
            "test_loss": test_loss, "test_accuracy": test_acc,
            "off_schedule": off_schedule,
        }

    def log_evaluation(record: dict[str, Any]) -> None:
        x, walltime = record["examples"], state["run_start_walltime"] + record["time"]
        writer.add_scalar("train/epoch_loss", record["train_loss"], x, walltime=walltime)
        if record["train_loss"] > 0:
            # Losses span decades by the end of a run: TensorBoard's smoothing (an average of
            # the last few points) then reports the older, larger values on a linear scale.
            writer.add_scalar("train/log10_epoch_loss", math.log10(record["train_loss"]), x, walltime=walltime)
        writer.add_scalar("train/epoch_accuracy", record["train_accuracy"], x, walltime=walltime)
        for split in ("val", "test"):
            writer.add_scalar(f"{split}/loss", record[f"{split}_loss"], x, walltime=walltime)
            writer.add_scalar(f"{split}/accuracy", record[f"{split}_accuracy"], x, walltime=walltime)
        writer.add_scalar("time/epoch_wall", record["time"], x, walltime=walltime)
        if show and not record["off_schedule"]:
            tqdm.write(f"epoch {state['epoch']:4d}  step {record['step']:6d}  {record['time']:8.1f}s  "
                       f"train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f}  "
                       f"val acc {record['val_accuracy']:.4f}  test acc {record['test_accuracy']:.4f}")

    def record_evaluation(off_schedule: bool = False) -> dict[str, Any]:
        record = evaluate_all(off_schedule)
        state["history"].append(record)
        log_evaluation(record)
        return record

    def log_running() -> None:
        running = state["running"]
        if running["count"]:
            x, walltime = state["examples"], clock()
            writer.add_scalar("train/epoch_running_loss", running["loss"] / running["count"], x,
                              walltime=walltime)
            writer.add_scalar("train/epoch_running_accuracy", running["correct"] / running["count"], x,
                              walltime=walltime)

    def checkpoint_now() -> None:
        if not ranks.leader:  # every rank holds the same parameters and optimizer state
            return
        # Records up to the checkpoint must survive a crash after it: a resumed run purges only later ones.
        writer.flush()
        save_checkpoint(checkpoint_path, {
            "version": CHECKPOINT_VERSION,
            "args": {k: v for k, v in vars(args).items()},
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "state": state,
            "loader_generator": loader_state,
            "rng": rng_state(),
        })

    if not state["history"]:
        record_evaluation()
        # TensorBoard's Relative axis counts from a chart's first point: let the clock's chart start at 0.
        writer.add_scalar("time/wall", 0.0, 0, walltime=clock())
        if sharpness is not None:
            sharpness.log(writer, model, loss_fn, 0, clock(), None if hessian_free else learning_rate(args, 1))

    def steps_due() -> bool:
        return bool(args.eval_every_steps) and state["global_step"] % args.eval_every_steps == 0

    def limit_reached() -> Optional[str]:
        if args.max_steps is not None and state["global_step"] >= args.max_steps:
            return "max_steps"
        if args.time_budget is not None and state["train_time"] >= args.time_budget:
            return "time_budget"
        return None

    # Test-only (tests/test_checkpoints.py): die by SIGKILL, with no clean-up, right after this step.
    sigkill_at_step = int(os.environ.get("HFOPT_TRAIN_SIGKILL_AT_STEP", "0")) or None
    planned = args.epochs * steps_per_epoch
    if args.max_steps is not None:
        planned = min(planned, args.max_steps)
    bar = tqdm(total=planned, initial=min(state["global_step"], planned), unit="step",
               disable=not (show and sys.stderr.isatty()), dynamic_ncols=True, leave=False)
    stop_reason = "epochs"
    while state["epoch"] < args.epochs:
        reason = limit_reached()
        if reason:
            stop_reason = reason
            break
        loader_state = generator.get_state()  # the permutation is drawn on the first batch
        batches.skip = state["batch_in_epoch"]
        batch_iter = iter(loader)
        running = state["running"]
        while state["batch_in_epoch"] < steps_per_epoch:
            examples_before, walltime_before = state["examples"], clock()
            start = time.perf_counter()
            x, y = next(batch_iter)
            if not hessian_free:
                # From the step count alone, not a scheduler's state, so resuming keeps it.
                lr = learning_rate(args, state["global_step"] + 1)
                for group in optimizer.param_groups:
                    group["lr"] = lr
            xl, yl = ranks.local(x), ranks.local(y)
            loss, correct = train_step(optimizer, hessian_free, trained, loss_fn, xl, yl)
            loss, correct = ranks.batch_totals(loss, correct, len(yl))
            state["train_time"] += time.perf_counter() - start
            state["global_step"] += 1
            state["batch_in_epoch"] += 1
            state["examples"] += len(y)
            running["loss"] += loss * len(y)
            running["correct"] += correct
            running["count"] += len(y)
            # The batch loss is the model's before the step; what the step did, after it.
            writer.add_scalar("train/loss", loss, examples_before, walltime=walltime_before)
            writer.add_scalar("train/accuracy", correct / len(y), examples_before, walltime=walltime_before)
            examples, walltime = state["examples"], clock()
            writer.add_scalar("time/wall", state["train_time"], examples, walltime=walltime)
            if hessian_free:
                info = getattr(optimizer, "last_step", None) or {}
                log_step(writer, info, global_step=examples, walltime=walltime)
                state["hf"]["steps"] += 1
                state["hf"]["rejected"] += int(not info.get("accepted", True))
                state["hf"]["cg_iterations"] += int(info.get("cg_iterations", 0) or 0)
                state["hf"]["curvature_products"] += int(info.get("curvature_products", 0) or 0)
            else:
                writer.add_scalar("train/lr", lr, examples, walltime=walltime)
            if sharpness is not None and sharpness.due(state["global_step"]):
                # After the step and outside the training clock; it changes neither the model nor the RNG.
                sharpness.log(writer, model, loss_fn, examples, walltime, None if hessian_free else lr)
            bar.update(1)
            bar.set_postfix(epoch=state["epoch"] + 1, loss=f"{loss:.4f}", refresh=False)
            if steps_due() and state["batch_in_epoch"] < steps_per_epoch:
                record_evaluation()
            if state["global_step"] == sigkill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            if not math.isfinite(loss):
                stop_reason = "diverged"
                break
            reason = limit_reached()
            if reason:
                stop_reason = reason
                break
        if state["batch_in_epoch"] == steps_per_epoch:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
            log_running()
            if state["epoch"] % args.eval_every == 0 or state["epoch"] == args.epochs or steps_due():
                record_evaluation()
            state["running"] = {"loss": 0.0, "correct": 0, "count": 0}
            loader_state = generator.get_state()
            if args.checkpoint_every and state["epoch"] % args.checkpoint_every == 0:
                checkpoint_now()
        if stop_reason != "epochs":
            break
    bar.close()

    last = state["history"][-1]
    if last["step"] != state["global_step"] or last["off_schedule"]:
        last = record_evaluation(off_schedule=True)
    writer.add_text("summary/final", final_text(args, last, stop_reason), state["examples"], walltime=clock())
    checkpoint_now()
    writer.close()

    history = state["history"]
    summary: dict[str, Any] = {
        "optimizer": args.optimizer, "model": args.model, "data": args.data, "seed": args.seed,
        "batch_size": args.batch_size, "lr": args.lr if args.optimizer != "hf" else None,
        "epochs": last["epoch"], "steps": state["global_step"], "seconds": state["train_time"],
        "wall_seconds": time.perf_counter() - wall_start,
        "initial_train_loss": history[0]["train_loss"],
        "train_loss": last["train_loss"], "train_accuracy": last["train_accuracy"],
        "val_loss": last["val_loss"], "val_accuracy": last["val_accuracy"],
        "best_val_accuracy": max(r["val_accuracy"] for r in history),
        "test_loss": last["test_loss"], "test_accuracy": last["test_accuracy"],
        "stop_reason": stop_reason, "logdir": str(logdir),
    }
    if hessian_free:
        hf_stats = state["hf"]
        summary["hf_steps_rejected"] = hf_stats["rejected"]
        summary["hf_mean_cg_iterations"] = hf_stats["cg_iterations"] / max(hf_stats["steps"], 1)
        info = getattr(optimizer, "last_step", None) or {}
        if "damping" in info:
            summary["hf_final_damping"] = float(info["damping"])
    if ranks.leader:
        print("summary " + json.dumps(common.to_jsonable(_printable(summary))))
    summary["history"] = history
    ranks.close()
    return summary


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Command-line entry point; ``argv`` defaults to ``sys.argv[1:]``. Returns the summary dict."""
    return run(parse_args(argv))


if __name__ == "__main__":
    try:
        main()
    except CheckpointError as err:  # a file to delete or a setting to fix, not a bug: no traceback
        sys.exit(f"train.py: error: {err}")
