"""``compile=True``: curvature products through ``torch.compile``.

The whole product (both sweeps and the loss's output Hessian) is one function
of the operator, compiled once per process for each operator class and kind
of product.  TorchInductor fuses the elementwise work of the rules (BatchNorm's
per-channel passes, ReLU masks, the residual sums) and plans buffer reuse
within the graph; convolutions stay ATen's (oneDNN or cuDNN) kernels.  A new
operator of the same model and batch shape reuses the compiled code: dynamo
guards on shapes, dtypes and the rules' settings, not on the operator object.

Scatters stay ATen's (:func:`eager_scatter_add`, :func:`eager_index_add`,
opaque custom operators inside the graph): inductor would lower them to
atomic adds, which are not deterministic.

Where compilation is impossible (no ``torch.compile``, no C++ compiler for
inductor's CPU code, a backend failure) the operator warns once, with the
reason, and computes its products eagerly: the same products, one
compilation attempt per process.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

Vector = List[Tensor]

_COMPILED: Dict[Callable, Callable] = {}
_FAILED: Optional[str] = None  # why compilation failed in this process, once it has


def _opaque(name: str, fn: Callable) -> Callable:
    """``fn(out, dim, index, src)`` (in place on ``out``) as a custom operator
    when this torch has ``torch.library.custom_op``: dynamo keeps it in the
    graph as one opaque call, so a scatter inside the sweeps' loops breaks
    neither the graph nor the loop, and inductor runs ATen's kernel for it."""
    custom_op = getattr(torch.library, "custom_op", None)
    if custom_op is None:  # torch < 2.4: compiled graphs include the scatter
        return fn

    def impl(out: Tensor, dim: int, index: Tensor, src: Tensor) -> None:
        fn(out, dim, index, src)

    return custom_op(f"hfopt::{name}", impl, mutates_args=("out",))


def _scatter_add(out: Tensor, dim: int, index: Tensor, src: Tensor) -> None:
    out.scatter_add_(dim, index, src)


def _index_add(out: Tensor, dim: int, index: Tensor, src: Tensor) -> None:
    out.index_add_(dim, index, src)


_SCATTER_ADD = _opaque("scatter_add_", _scatter_add)
_INDEX_ADD = _opaque("index_add_", _index_add)


def eager_scatter_add(out: Tensor, dim: int, index: Tensor, src: Tensor) -> Tensor:
    """``out.scatter_add_(dim, index, src)``, kept out of inductor's code."""
    _SCATTER_ADD(out, dim, index, src)
    return out


def eager_index_add(out: Tensor, dim: int, index: Tensor, src: Tensor) -> Tensor:
    """``out.index_add_(dim, index, src)``, kept out of inductor's code."""
    _INDEX_ADD(out, dim, index, src)
    return out


def compile_failure() -> Optional[str]:
    """Why ``compile=True`` fell back to eager products in this process (None: it did not)."""
    return _FAILED


def product(sweeps: Callable, op, v: Vector, residuals: bool) -> Vector:
    """``sweeps(op, v, residuals)`` compiled, or eager once compilation has failed."""
    global _FAILED
    if _FAILED is None:
        try:
            return _compiled(sweeps)(op, v, residuals)
        except Exception as exc:
            if not _is_compile_failure(exc):  # an error of the product itself: eager raises it too
                raise
            _FAILED = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            warnings.warn(f"hfopt: compile=True could not compile the curvature products ({_FAILED}); "
                          "computing them eagerly", stacklevel=4)
    return sweeps(op, v, residuals)


class CompileUnavailable(RuntimeError):
    """This torch cannot compile at all."""


def _is_compile_failure(exc: Exception) -> bool:
    return isinstance(exc, CompileUnavailable) or type(exc).__module__.startswith(("torch._dynamo", "torch._inductor"))


def _compiled(sweeps: Callable) -> Callable:
    fn = _COMPILED.get(sweeps)
    if fn is None:
        if not hasattr(torch, "compile"):
            raise CompileUnavailable(f"torch {torch.__version__} has no torch.compile")
        # dynamic=False: one graph per batch shape, which HF keeps fixed; a
        # symbolic batch size would cost compile time and fusion for nothing.
        fn = _COMPILED[sweeps] = torch.compile(sweeps, dynamic=False)
    return fn
