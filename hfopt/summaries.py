"""TensorBoard records of a Hessian-free step's diagnostics.

One function, shared by ``HFOptimizer(writer=...)`` and the examples, so that a
step is logged the same way whoever owns the x-axis: the optimizer logs at its
own step counter, ``examples/train.py`` at the number of training examples seen
with ``walltime`` set to its training clock.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

__all__ = ["log_step"]

# Diagnostics that are words, not numbers: logged as text, and as a 0/1 scalar
# per value so that a chart shows when they happen.
TEXT_KEYS = ("cg_stop_reason", "rejected", "engine")


def log_step(writer: Any, diagnostics: Dict[str, Any], global_step: int, walltime: Optional[float] = None,
             prefix: str = "hf/") -> None:
    """Write one step's ``diagnostics`` (``HFOptimizer.last_step``) to ``writer``.

    Numbers and booleans become scalars ``<prefix><key>``; a non-finite value
    (a NaN rho) is written as NaN rather than dropped, and also counted in
    ``<prefix>non_finite/<key>`` so that it is visible on a chart.  The word
    diagnostics become text records and indicator scalars
    ``<prefix>cg_stop/<reason>`` and ``<prefix>rejected_step``.  lambda is
    also logged as ``<prefix>log10_damping``: it spans decades, which a
    linear axis flattens into zero.
    """
    for key, value in diagnostics.items():
        if key in TEXT_KEYS:
            continue
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)):
            continue
        writer.add_scalar(f"{prefix}{key}", float(value), global_step, walltime=walltime)
        if not math.isfinite(value):
            writer.add_scalar(f"{prefix}non_finite/{key}", 1.0, global_step, walltime=walltime)
    damping = diagnostics.get("damping")
    if isinstance(damping, (int, float)) and math.isfinite(damping) and damping > 0:
        writer.add_scalar(f"{prefix}log10_damping", math.log10(damping), global_step, walltime=walltime)
    reason = diagnostics.get("cg_stop_reason")
    if reason is not None:
        writer.add_scalar(f"{prefix}cg_stop/{reason}", 1.0, global_step, walltime=walltime)
    rejected = diagnostics.get("rejected")
    writer.add_scalar(f"{prefix}rejected_step", 0.0 if rejected is None else 1.0, global_step, walltime=walltime)
    add_text = getattr(writer, "add_text", None)
    if callable(add_text):
        words = [f"{k}: {diagnostics.get(k)}" for k in TEXT_KEYS if diagnostics.get(k) is not None]
        if words:
            add_text(f"{prefix}step", "; ".join(words), global_step, walltime=walltime)
