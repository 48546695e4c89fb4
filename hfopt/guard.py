"""The engine's forward must be the model's: the guard behind the rule table.

A rule stands for a layer only where the layer computes what the rule assumes
(:func:`hfopt.rules.rule_refusal`), and hooks are traced around their layer
(:mod:`hfopt.graph`).  Anything those checks miss (a forward that reads a global,
a layer whose class lies about what it computes) shows up here: the output the
engine computed from its rules must be the model's own output on the same
inputs.

* Cost: one extra forward of the model, under ``no_grad``, once per model,
  module structure (parameters, hooks, train/eval flags) and input shape; the
  verdict is cached.  ``HFOptimizer`` first compares with the outputs its
  closure already computed, which is free.
* The model's forward runs with its buffers restored afterwards (a train-mode
  BatchNorm updates its running statistics) and with torch's generators replayed
  from the state the engine's own forward started from, so train-mode dropout
  draws the same masks.  Forward hooks therefore run once more (a feature tap
  records one more entry).
* A mismatch raises :class:`ForwardMismatchError` naming the first layer whose
  output differs between the two forwards.  A model whose own forward is not
  reproducible from the generators' state cannot be checked: that is warned.
"""
from __future__ import annotations

import warnings
import weakref
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .graph import buffers_untouched, signature

# Relative max-abs agreement the two forwards must reach: they differ only by
# rounding (another reduction order for batch statistics, a channels-last
# kernel), while a rule standing for the wrong computation is off by O(1).
# float64 is not held tighter than 1e-6: CUDA's fused weight-norm kernel alone
# differs from the written-out formula by 4e-8 (measured on an H200).
_TOLERANCE = {torch.float64: 1e-6, torch.float32: 2e-3}
_LOW_PRECISION_TOLERANCE = 5e-2

_VERIFIED: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


class ForwardMismatchError(RuntimeError):
    """The engine's forward does not reproduce the model's output."""


RngState = Tuple[List[int], Tensor, List[Tensor]]


def rng_state(tensors: List[Any]) -> RngState:
    """The CPU generator's state and that of every CUDA device among ``tensors``."""
    devices = sorted({t.device.index or 0 for t in tensors if isinstance(t, Tensor) and t.device.type == "cuda"})
    return devices, torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


@contextmanager
def replayed(state: RngState):
    """torch's generators set to ``state`` inside, left as they were outside."""
    devices, cpu, cuda = state
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(cpu)
        for d, s in zip(devices, cuda):
            torch.cuda.set_rng_state(s, d)
        yield


def check_forward(op: Any, inputs: tuple, state: RngState, reference: Optional[Tensor] = None) -> None:
    """Raise :class:`ForwardMismatchError` unless ``op.output`` is ``model(*inputs)``
    (see the module docstring); ``reference``, when given, is that output
    already computed by the caller."""
    key = (signature(op.model), tuple((tuple(t.shape), t.dtype, t.device) if isinstance(t, Tensor) else repr(t)
                                      for t in inputs), op.channels_last, op.compute_dtype)
    done = _VERIFIED.setdefault(op.model, set())
    if key in done:
        return
    tol = _tolerance(op.compute_dtype or op.output.dtype)
    if not op.graph.traced or (reference is not None and _error(op.output, reference) <= tol):
        done.add(key)  # a whole-model fallback node runs the model itself
        return
    ref = _model_forward(op.model, inputs, state)
    if _error(op.output, ref) <= tol:
        done.add(key)
        return
    if _error(_model_forward(op.model, inputs, state), ref) > tol:
        warnings.warn(f"hfopt: {type(op.model).__name__}'s forward gives another output each time from the same "
                      "random state; the engine's forward could not be checked against it", stacklevel=4)
        done.add(key)
        return
    message, culprit = _diagnosis(op, inputs, state, ref, tol)
    if isinstance(culprit, _RANDOM_LAYERS):
        # Dropout draws in memory order: where the model's own activations are
        # laid out otherwise than the engine's, the two draw other masks, and
        # the outputs cannot be compared.
        warnings.warn(f"hfopt: the engine's forward of {type(op.model).__name__} could not be checked: it draws "
                      f"another mask than the model's {type(culprit).__name__} (a layout difference)", stacklevel=4)
        done.add(key)
        return
    raise ForwardMismatchError(message)


_RANDOM_LAYERS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
                  nn.RReLU)


def _tolerance(dtype: torch.dtype) -> float:
    return _TOLERANCE.get(dtype, _LOW_PRECISION_TOLERANCE)


def _error(ours: Tensor, theirs: Any) -> float:
    """Relative max-abs difference (inf where shapes or NaN patterns differ)."""
    if not isinstance(theirs, Tensor) or ours.shape != theirs.shape:
        return float("inf")
    a, b = ours.detach().to(torch.float64), theirs.detach().to(device=ours.device, dtype=torch.float64)
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return float("inf")
    a, b = a[~nan], b[~nan]
    if a.numel() == 0:
        return 0.0
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


def _model_forward(model: nn.Module, inputs: tuple, state: RngState,
                   seen: Optional[Dict[int, List[Any]]] = None) -> Any:
    """``model(*inputs)`` without a trace on the model: buffers restored, the
    generators replayed from ``state``.  ``seen`` collects each module's output,
    as its forward returned it, by call."""
    handles = []
    if seen is not None:
        for m in model.modules():
            handles.append(m.register_forward_hook(
                lambda mod, args, out: seen[id(mod)].append(out.detach().clone() if isinstance(out, Tensor) else out),
                prepend=True))  # before the user's hooks: the layer's own output
    try:
        with torch.no_grad(), replayed(state), buffers_untouched(model):
            return model(*inputs)
    finally:
        for h in handles:
            h.remove()


def _diagnosis(op: Any, inputs: tuple, state: RngState, ref: Any, tol: float) -> Tuple[str, Optional[nn.Module]]:
    """The message, and the first layer whose output differs (None if every
    layer kept whole agrees)."""
    seen: Dict[int, List[Any]] = defaultdict(list)
    _model_forward(op.model, inputs, state, seen)
    ours: Dict[int, Tensor] = {}
    with replayed(state):
        op._forward(inputs, record=ours)
    names = {id(m): n or type(m).__name__ for n, m in op.model.named_modules()}
    calls: Dict[int, int] = defaultdict(int)
    agreed = None
    total = _error(op.output, ref)
    head = (f"hfopt: the engine's forward of {type(op.model).__name__} does not reproduce the model's output "
            f"(relative error {total:.2e}); its curvature would be wrong.  ")
    for i, value in sorted(ours.items()):
        module = op.graph.nodes[i].target
        k = calls[id(module)]
        calls[id(module)] += 1
        theirs = seen[id(module)][k] if k < len(seen[id(module)]) else None
        where = f"'{names.get(id(module), type(module).__name__)}' ({type(module).__name__})"
        err = _error(value, theirs)
        if err > tol:
            since = f"the last that agrees is {agreed}, so the two forwards part between them" if agreed else \
                "it is the first layer the engine kept whole, so the two forwards part at or before it"
            return head + (f"The first layer whose output differs is {where} (by {err:.2e}); {since}. A custom "
                           "forward, a hook or a subclass there computes something the engine did not see; "
                           "report it, or pass verify=False to skip this check at your own risk"), module
        agreed = where
    return head + ("Every layer the engine kept whole agrees; the difference comes from code traced between them "
                   f"(the last layer that agrees is {agreed}).  Pass verify=False to skip this check at your own "
                   "risk"), None
