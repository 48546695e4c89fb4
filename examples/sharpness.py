"""Sharpness logging for ``examples/train.py --sharpness-every N``.

Every N optimizer steps (and at the initial model) the top eigenvalue of the
Hessian and of the GGN of the training objective, at the current parameters,
goes to TensorBoard as ``sharpness/hessian_top`` and ``sharpness/ggn_top``:
the sharpness curve of edge-of-stability studies (Cohen et al., 2021), whose
reference line ``2 / lr`` is logged as ``sharpness/two_over_lr`` for
sgd/adam/soap.

The eigenvalues are taken on a fixed set of training samples (the first
``samples`` of the training split, the same for every optimizer and every
step, so the curve shows the model changing, not the batch), split into
batches of ``batch_size`` and averaged with :class:`hfopt.DatasetOperator`,
with BatchNorm in the model's mode (train mode while training: the curvature
of the objective the optimizer descends).  Measuring is side-effect free: the
operators never write to parameters or BatchNorm buffers, and Lanczos draws
its start vector from a private generator, so torch's global RNG stream, and
with it the training run, is the same with and without ``--sharpness-every``.
Under ``--distributed`` every rank measures the same samples on its own copy of
the model (the parameters are equal on all ranks), and rank 0 logs.
"""
from __future__ import annotations

import time
from typing import Optional

from torch import nn
from torch.utils.data import TensorDataset

import hfopt


class SharpnessLogger:
    """Logs the top Hessian and GGN eigenvalues every ``every`` steps."""

    def __init__(self, every: int, train_set: TensorDataset, samples: int, batch_size: int, tol: float):
        inputs, targets = train_set.tensors
        samples = min(samples, len(targets))
        self.every, self.tol = every, tol
        self.batches = [(inputs[i:i + batch_size], targets[i:i + batch_size])
                        for i in range(0, samples, batch_size) if min(batch_size, samples - i) > 1]
        if not self.batches:
            raise ValueError(f"--sharpness-samples {samples} leaves no batch of two or more samples")
        self.seconds = 0.0  # time spent measuring, kept out of the training clock

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def measure(self, model: nn.Module, loss_fn: nn.Module) -> dict[str, float]:
        """Top eigenvalue of the Hessian and of the GGN at the model's current point."""
        start = time.perf_counter()
        out: dict[str, float] = {}
        for kind in ("hessian", "ggn"):
            op = hfopt.DatasetOperator(model, loss_fn, self.batches, curvature=kind)
            res = hfopt.eigenvalues(op, k=1, tol=self.tol, progress=False)
            out[f"{kind}_top"] = float(res.eigenvalues[0])
            out[f"{kind}_products"] = res.products
        self.seconds += time.perf_counter() - start
        return out

    def log(self, writer, model: nn.Module, loss_fn: nn.Module, examples: int, walltime: float,
            lr: Optional[float]) -> dict[str, float]:
        values = self.measure(model, loss_fn)
        writer.add_scalar("sharpness/hessian_top", values["hessian_top"], examples, walltime=walltime)
        writer.add_scalar("sharpness/ggn_top", values["ggn_top"], examples, walltime=walltime)
        if lr:
            writer.add_scalar("sharpness/two_over_lr", 2.0 / lr, examples, walltime=walltime)
        return values

