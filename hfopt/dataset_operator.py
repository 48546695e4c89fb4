"""Curvature of a data set: the mean of per-batch GGN or Hessian operators.

``DatasetOperator(model, loss_fn, batches)`` is ``(1/B) sum_b C_b``, where
``C_b`` is :class:`~hfopt.GGN` or :class:`~hfopt.Hessian` of
``loss_fn(model(x_b), y_b)``, each batch's BatchNorm in the model's mode:

* eval mode: every sample goes through the same fixed function, so with a
  mean-reduced loss and equal batch sizes this is the curvature of the mean
  loss over the whole data set;
* train mode: each batch is normalised by its own statistics, which couple its
  samples, so this is the curvature of the *mean of the per-batch objectives*
  ``(1/B) sum_b L_b`` (the objective that mini-batch training descends), not of
  one forward pass over all the data.

Each product sweeps every batch.  A batch's operator caches what its product
needs (roughly the activations a training forward keeps for its backward), so
the operators of the first batches are kept while their estimated cache stays
within ``max_cache_bytes``; any further batch is rebuilt for each product,
which costs one extra forward per product (plus, for the Hessian, the
first-order sweep the operator caches) and holds only one batch's cache at a
time.  ``max_cache_bytes=0`` rebuilds every batch: least memory, roughly 1.5-2x
the time per product.
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .curvature import CurvatureOperator, FlatOperator, GGN_or_Hessian, Hessian, Vector
from .rules import Rule

Batch = Tuple[object, Tensor]

DEFAULT_MAX_CACHE_BYTES = 2 * 1024 ** 3


def cache_bytes(op: CurvatureOperator) -> int:
    """Bytes held by ``op``'s cache: unique storages reachable from its rules,
    its per-step gradients, its output, its loss curvature and its parameter
    snapshots.  An estimate (it does not see memory a rule hides in objects
    other than tensors, lists, tuples, dicts and nested rules)."""
    seen = {}

    def walk(obj, depth: int = 0) -> None:
        if isinstance(obj, Tensor):
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif depth < 4 and isinstance(obj, (list, tuple)):
            for o in obj:
                walk(o, depth + 1)
        elif depth < 4 and isinstance(obj, dict):
            for o in obj.values():
                walk(o, depth + 1)
        elif depth < 4 and isinstance(obj, Rule):
            walk(list(vars(obj).values()), depth + 1)

    for step in op.steps:
        walk(step.rule)
        walk(step.gradient)
    walk([op.output, list(vars(op.loss_curvature).values()), list(op._copies.values())])
    return sum(seen.values())


class DatasetOperator(FlatOperator):
    """Mean of per-batch :class:`~hfopt.GGN` / :class:`~hfopt.Hessian` operators
    over ``batches`` (a ``DataLoader`` or any iterable of ``(inputs, targets)``);
    see the module docstring for what it is in train and eval mode and for the
    cache.

    Args:
        model, loss_fn: as for :class:`~hfopt.GGN`.
        batches: ``(inputs, targets)`` pairs; ``inputs`` may be a tuple for a
            model with several inputs.  They are taken from the iterable once,
            at construction, and kept, so every product sees the same batches
            (a shuffling ``DataLoader`` would otherwise give a different
            train-mode operator at each product).
        curvature: ``"hessian"`` or ``"ggn"``.
        num_batches: take only the first ``num_batches`` batches.
        max_cache_bytes: keep the operators of the first batches while their
            estimated caches (:func:`cache_bytes`) add up to at most this;
            rebuild the others at every product.
        fuse: passed to every per-batch operator.

    The operator is the curvature at the parameters and buffers it was built
    at: rebuilding a batch after the model changed would mix two points, so a
    product raises ``RuntimeError`` if a parameter, buffer or train/eval mode
    changed since construction.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, batches: Iterable[Batch], *,
                 curvature: str = "hessian", num_batches: Optional[int] = None,
                 max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES, fuse: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"hfopt: model must be an nn.Module, got {type(model).__name__}")
        self.cls = GGN_or_Hessian(curvature)
        self.residuals = self.cls is Hessian
        if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
            raise ValueError(f"hfopt: num_batches must be a positive int or None, got {num_batches!r}")
        if not isinstance(max_cache_bytes, int) or max_cache_bytes < 0:
            raise ValueError(f"hfopt: max_cache_bytes must be an int >= 0, got {max_cache_bytes!r}")
        self.model, self.loss_fn, self.fuse = model, loss_fn, fuse
        self.batches: List[Batch] = self._take(batches, num_batches)
        self._state = self._fingerprint()
        self.max_cache_bytes = max_cache_bytes
        self._ops: List[Optional[CurvatureOperator]] = []
        self.cached_bytes = 0
        losses = []
        for b, (x, y) in enumerate(self.batches):
            op = self.cls(model, loss_fn, x, y, fuse=fuse)
            if b == 0:
                self.params, self.param_names = op.params, op.param_names
            losses.append(op.loss.detach())
            size = cache_bytes(op)
            # Cache a prefix of the batches: simple to reason about, and the
            # operators of later batches are never built while an earlier one is dropped.
            if (not self._ops or self._ops[-1] is not None) and self.cached_bytes + size <= max_cache_bytes:
                self._ops.append(op)
                self.cached_bytes += size
            else:
                self._ops.append(None)
        self.loss = torch.stack(losses).mean()

    @staticmethod
    def _take(batches: Iterable[Batch], num_batches: Optional[int]) -> List[Batch]:
        if isinstance(batches, (Tensor, str, bytes)) or not hasattr(batches, "__iter__"):
            raise TypeError("hfopt: batches must be a DataLoader or an iterable of (inputs, targets) pairs, got "
                            f"{type(batches).__name__}")
        taken: List[Batch] = []
        for i, batch in enumerate(batches):
            if num_batches is not None and i >= num_batches:
                break
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError(f"hfopt: batch {i} must be an (inputs, targets) pair, got "
                                f"{type(batch).__name__}{'' if not isinstance(batch, (tuple, list)) else f' of length {len(batch)}'}")
            taken.append((batch[0], batch[1]))
        if not taken:
            raise ValueError("hfopt: batches yielded no batch")
        return taken

    def _fingerprint(self) -> list:
        # Tensor._version counts in-place writes: an optimizer step or a
        # train-mode forward (running statistics) bumps it.
        return [(t._version, t.data_ptr()) for t in list(self.model.parameters()) + list(self.model.buffers())] + \
            [m.training for m in self.model.modules()]

    @property
    def num_batches(self) -> int:
        return len(self.batches)

    @property
    def cached_batches(self) -> int:
        """How many batch operators are kept (the rest are rebuilt per product)."""
        return sum(op is not None for op in self._ops)

    def _operator(self, b: int) -> CurvatureOperator:
        op = self._ops[b]
        if op is not None:
            return op
        if self._fingerprint() != self._state:
            raise RuntimeError("hfopt: the model's parameters, buffers or train/eval mode changed since this "
                               "DatasetOperator was built; build a new one at the new point")
        x, y = self.batches[b]
        with warnings.catch_warnings():
            # A fallback rule warned when this batch was first built; once is enough.
            warnings.simplefilter("ignore")
            return self.cls(self.model, self.loss_fn, x, y, fuse=self.fuse)

    def matvec(self, v: Sequence[Tensor]) -> Vector:
        """``(1/B) sum_b C_b v`` (a list shaped like the parameters)."""
        v = self._check(v)
        total: Optional[Vector] = None
        for b in range(len(self.batches)):
            part = self._operator(b).matvec(v)
            # The first part is copied: an operator's result may share storage with its cache.
            total = [t.clone() for t in part] if total is None else [t.add_(p) for t, p in zip(total, part)]
        return [t.div_(len(self.batches)) for t in total]

    def gradient(self) -> Vector:
        """Mean of the per-batch gradients (the gradient of the mean of the per-batch objectives)."""
        total: Optional[Vector] = None
        for b in range(len(self.batches)):
            part = self._operator(b).gradient()
            total = part if total is None else [t.add_(p) for t, p in zip(total, part)]
        return [t.div_(len(self.batches)) for t in total]
