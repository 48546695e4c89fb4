"""The glue of real models: reshapes, identity, dropout, skip additions,
products, concatenation and other maps that are linear in their tensor input.

``args``/``kwargs`` of a functional call arrive with each tensor replaced by an
:class:`~hfopt.rules.base.Input` marker; :func:`substitute` puts tensors back.
"""
from __future__ import annotations

import operator
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ..compiled import eager_index_add
from .base import Grads, Input, Rule, bind_names, sum_to_shape


def call_any_layout(fn: Callable, *tensors: Any) -> Any:
    """``fn(*tensors)``, retried on contiguous copies if it fails on a tensor the
    engine holds channels-last: a ``view`` written for the model's own
    (contiguous) activations."""
    try:
        return fn(*tensors)
    except RuntimeError:
        if all(not isinstance(t, Tensor) or t.is_contiguous() for t in tensors):
            raise
    return fn(*[t.contiguous() if isinstance(t, Tensor) else t for t in tensors])


def substitute(tree: Any, values: Sequence[Any]) -> Any:
    """Replace every :class:`Input` marker in ``tree`` with ``values[index]``."""
    return pytree.tree_map(lambda a: values[a.index] if isinstance(a, Input) else a, tree)


class ReshapeRule(Rule):
    """Flatten, view, reshape, contiguous, Identity: only the shape changes."""

    def __init__(self, fn: Callable[[Tensor], Tensor] = lambda x: x):
        self.fn = fn

    def forward(self, inputs, params) -> Tensor:
        x = inputs[0]
        y = call_any_layout(self.fn, x)
        self.in_shape, self.out_shape = x.shape, y.shape
        return y

    def jvp(self, din, dparams) -> Tensor:
        return din[0].reshape(self.out_shape)

    def vjp(self, g, need_inputs, need_params) -> Grads:
        return [g.reshape(self.in_shape) if need_inputs[0] else None], {}


class _MaskRule(Rule):
    """``x * mask`` with a mask drawn once, in :meth:`draw`, when the operator is
    built, and held for every product: the operator is the curvature of the
    objective with that mask."""

    @abstractmethod
    def draw(self, x: Tensor) -> Tensor:
        ...

    def forward(self, inputs, params) -> Tensor:
        self.mask = self.draw(inputs[0])
        return inputs[0] * self.mask

    def jvp(self, din, dparams) -> Tensor:
        return din[0] * self.mask

    def vjp(self, g, need_inputs, need_params) -> Grads:
        return [g * self.mask if need_inputs[0] else None], {}


class DropoutRule(_MaskRule):
    """Train-mode dropout: the mask is drawn once, when the operator is built,
    from torch's global generator exactly as ``F.dropout`` draws it on a
    contiguous input (a Bernoulli draw in memory order; on CUDA, out of place,
    ATen's fused ``native_dropout``), and held fixed for every product, so the
    operator is the curvature of the objective with that mask, the one the
    model's own forward draws from the same state.  Eval mode (or p=0) is the
    identity."""

    def __init__(self, p: float, inplace: bool = False):
        self.p, self.inplace = p, inplace

    def draw(self, x: Tensor) -> Tensor:
        if self.p == 1.0:
            return torch.zeros_like(x)
        if x.is_cuda and not self.inplace:  # in place, CUDA draws as the CPU does
            keep = torch.native_dropout(x.contiguous(), self.p, True)[1]
            return keep.to(x.dtype).div_(1 - self.p)
        # In the input's own layout, as F.dropout draws, except the engine's
        # channels-last maps, which the model holds contiguous.
        cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        like = torch.empty(x.shape, dtype=x.dtype, device=x.device) if cl else torch.empty_like(x)
        return like.bernoulli_(1 - self.p).div_(1 - self.p)


class StochasticDepthRule(_MaskRule):
    """torchvision's ``stochastic_depth(x, p, mode)`` in training: ``x`` times a
    mask shaped ``[N, 1, ...]`` ('row': one draw per sample) or ``[1, ...]``
    ('batch'), drawn once when the operator is built exactly as torchvision
    draws it, and held for every product (like :class:`DropoutRule`)."""

    def __init__(self, p: float, mode: str):
        self.p, self.mode = p, mode

    def draw(self, x: Tensor) -> Tensor:
        size = [x.shape[0]] + [1] * (x.dim() - 1) if self.mode == "row" else [1] * x.dim()
        keep = 1.0 - self.p
        mask = torch.empty(size, dtype=x.dtype, device=x.device).bernoulli_(keep)
        return mask.div_(keep) if keep > 0.0 else mask


def stochastic_depth_rule(target: Callable, args: tuple, kwargs: dict) -> Optional[Rule]:
    """The rule of torchvision's ``stochastic_depth`` (a leaf of fx: torchvision
    wraps it), recognised by name so that torchvision need not be imported."""
    if getattr(target, "__module__", None) != "torchvision.ops.stochastic_depth" or \
            getattr(target, "__name__", None) != "stochastic_depth":
        return None
    bound = bind_names(("input", "p", "mode", "training"), args, kwargs)
    if bound is None:
        return None
    p, mode, training = bound.get("p"), bound.get("mode"), bound.get("training", True)
    if not isinstance(p, (int, float)) or mode not in ("row", "batch") or not isinstance(training, bool):
        return None
    return StochasticDepthRule(float(p), mode) if training and p > 0 else ReshapeRule()


class PermuteRule(Rule):
    """``permute``/``transpose``/``movedim``: the transposed product is the inverse permutation."""

    def __init__(self, dims: Optional[Sequence[int]] = None, swap: Optional[Tuple[int, int]] = None,
                 move: Optional[Tuple[Any, Any]] = None):
        self.dims, self.swap, self.move = dims, swap, move

    def forward(self, inputs, params) -> Tensor:
        x = inputs[0]
        if self.swap is not None:
            return x.transpose(*self.swap)
        n = x.dim()
        if self.move is not None:
            # The permutation movedim makes, read off a meta tensor with distinct sizes.
            probe = torch.empty(tuple(range(2, n + 2)), device="meta").movedim(*self.move)
            self.dims = [size - 2 for size in probe.shape]
        self.inverse = [0] * n
        for i, d in enumerate(self.dims):
            self.inverse[d % n] = i
        return x.permute(self.dims)

    def _apply(self, t: Tensor, inverse: bool) -> Tensor:
        if self.swap is not None:
            return t.transpose(*self.swap)
        return t.permute(self.inverse if inverse else self.dims)

    def jvp(self, din, dparams) -> Tensor:
        return self._apply(din[0], inverse=False)

    def vjp(self, g, need_inputs, need_params) -> Grads:
        return [self._apply(g, inverse=True) if need_inputs[0] else None], {}


class ReduceRule(Rule):
    """``sum``/``mean`` over some dimensions (all when ``dims`` is None): the
    transposed product broadcasts the cotangent back, divided by the count for a
    mean."""

    def __init__(self, mean: bool, dims: Optional[Sequence[int]], keepdim: bool, dtype: Optional[torch.dtype]):
        self.mean, self.dims, self.keepdim, self.dtype = mean, dims, keepdim, dtype

    def _reduce(self, t: Tensor) -> Tensor:
        dims = list(range(t.dim())) if self.dims is None else list(self.dims)
        if self.mean:
            return t.mean(dims, keepdim=self.keepdim, dtype=self.dtype)
        return t.sum(dims, keepdim=self.keepdim, dtype=self.dtype)

    def forward(self, inputs, params) -> Tensor:
        x = inputs[0]
        self.in_shape, self.in_dtype = x.shape, x.dtype
        n = max(x.dim(), 1)
        dims = range(x.dim()) if self.dims is None else self.dims
        self.reduced = sorted({d % n for d in dims})
        count = 1
        for d in self.reduced:
            count *= x.shape[d] if x.dim() else 1
        self.count = count
        return self._reduce(x)

    def jvp(self, din, dparams) -> Tensor:
        return self._reduce(din[0])

    def vjp(self, g, need_inputs, need_params) -> Grads:
        if not need_inputs[0]:
            return [None], {}
        if not self.keepdim and len(self.in_shape):
            for d in self.reduced:  # ascending, so each index is already final
                g = g.unsqueeze(d)
        g = g.to(self.in_dtype)
        # Materialised: an expanded view has overlapping memory, which a later
        # in-place accumulation could not take.
        out = g.expand(self.in_shape)
        return [out / self.count if self.mean else out.contiguous()], {}


def _basic_index(index: Any) -> bool:
    """Only ints, slices, None and Ellipsis: ``x[index]`` is a view and
    ``out[index] = g`` its exact transpose."""
    leaves = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (int, slice, type(None), type(Ellipsis))) and not isinstance(i, bool)
               for i in leaves)


class IndexRule(Rule):
    """``x[index]`` (slicing, integer, boolean or tensor indexing).  Basic
    indexing transposes by assignment into zeros; advanced indexing gathers, so
    its transpose scatters with accumulation over the positions it read
    (repeated indices add up), from a position map taken at build."""

    def __init__(self, index: Any):
        self.index = index

    def forward(self, inputs, params) -> Tensor:
        x = inputs[0]
        index = substitute(self.index, inputs)
        self.in_shape = x.shape
        self.basic = _basic_index(index)
        self.value_index = index
        if not self.basic:
            self.positions = torch.arange(x.numel(), device=x.device).view(x.shape)[index]
        return x[index]

    def jvp(self, din, dparams) -> Tensor:
        return din[0][self.value_index]

    def vjp(self, g, need_inputs, need_params) -> Grads:
        gin: list = [None] * len(need_inputs)
        if not need_inputs[0]:
            return gin, {}
        if self.basic:
            out = g.new_zeros(self.in_shape)
            out[self.value_index] = g
        else:
            out = eager_index_add(g.new_zeros(self.in_shape.numel()), 0, self.positions.reshape(-1), g.reshape(-1))
            out = out.view(self.in_shape)
        gin[0] = out
        return gin, {}


class ScaleRule(Rule):
    """``-x`` and ``x / c`` for a number ``c``: a constant scale."""

    def __init__(self, scale: float = 1.0, divisor: Optional[float] = None):
        self.scale, self.divisor = scale, divisor

    def _apply(self, t: Tensor) -> Tensor:
        return t / self.divisor if self.divisor is not None else t * self.scale

    def forward(self, inputs, params) -> Tensor:
        return self._apply(inputs[0])

    def jvp(self, din, dparams) -> Tensor:
        return self._apply(din[0])

    def vjp(self, g, need_inputs, need_params) -> Grads:
        return [self._apply(g) if need_inputs[0] else None], {}


class _TwoOperands(Rule):
    """Shared by ``a * b`` and ``a / b``: either operand is a tensor marker or a
    number; cotangents are summed back to each tensor operand's shape (its
    broadcast), and added where both operands are the same input (``x * x``)."""

    def __init__(self, a: Any, b: Any):
        self.a, self.b = a, b

    def _bind(self, inputs) -> None:
        self.va, self.vb = substitute(self.a, inputs), substitute(self.b, inputs)
        self.shapes = {w.index: v.shape for w, v in ((self.a, self.va), (self.b, self.vb)) if isinstance(w, Input)}

    def _d(self, which, din):
        return din[which.index] if isinstance(which, Input) else None

    def _scatter(self, need_inputs, ga, gb) -> list:
        gin: list = [None] * len(need_inputs)
        for which, t in ((self.a, ga), (self.b, gb)):
            if isinstance(which, Input) and need_inputs[which.index] and t is not None:
                t = sum_to_shape(t, self.shapes[which.index])
                i = which.index
                gin[i] = t if gin[i] is None else gin[i] + t
        return gin


class DivRule(_TwoOperands):
    """``a / b`` with tensors or numbers.  With ``y = a / b``: ``dy = da / b -
    y db / b``; the residual has the mixed term ``-g db / b^2`` towards ``a``
    and ``-g da / b^2 + 2 g y db / b^2`` towards ``b``."""

    def forward(self, inputs, params) -> Tensor:
        self._bind(inputs)
        self.y = self.va / self.vb
        return self.y

    def jvp(self, din, dparams) -> Tensor:
        da, db = self._d(self.a, din), self._d(self.b, din)
        out = None if da is None else da / self.vb
        if db is not None:
            t = -self.y * db / self.vb
            out = t if out is None else out + t
        return out.expand(self.y.shape) if out.shape != self.y.shape else out

    def vjp(self, g, need_inputs, need_params) -> Grads:
        gb = -g * self.y / self.vb if isinstance(self.b, Input) and need_inputs[self.b.index] else None
        ga = g / self.vb if isinstance(self.a, Input) and need_inputs[self.a.index] else None
        return self._scatter(need_inputs, ga, gb), {}

    def has_residual(self) -> bool:
        return isinstance(self.b, Input) and self.active[self.b.index]

    def residual(self, g, din, dparams, need_inputs, need_params) -> Grads:
        da, db = self._d(self.a, din), self._d(self.b, din)
        b2 = self.vb * self.vb
        ra = None if db is None else -g * db / b2
        rb = None
        if da is not None:
            rb = -g * da / b2
        if db is not None:
            t = 2 * g * self.y * db / b2
            rb = t if rb is None else rb + t
        return self._scatter(need_inputs, ra, rb), {}


class AddRule(Rule):
    """``a + alpha * b`` (also ``-``, in-place ``+=``), broadcasting included."""

    def __init__(self, a: Any, b: Any, alpha: float = 1.0):
        self.a, self.b, self.alpha = a, b, alpha

    def forward(self, inputs, params) -> Tensor:
        a, b = substitute(self.a, inputs), substitute(self.b, inputs)
        self.shapes = {}
        for which in (self.a, self.b):
            if isinstance(which, Input):
                self.shapes[which.index] = inputs[which.index].shape
        out = a + self.alpha * b if self.alpha != 1.0 else a + b
        self.out_shape = out.shape
        return out

    def _terms(self):
        yield self.a, 1.0
        yield self.b, self.alpha

    def jvp(self, din, dparams) -> Tensor:
        out = None
        for which, scale in self._terms():
            if isinstance(which, Input) and din[which.index] is not None:
                t = din[which.index] if scale == 1.0 else din[which.index] * scale
                out = t if out is None else out + t
        return out.expand(self.out_shape) if out.shape != self.out_shape else out

    def vjp(self, g, need_inputs, need_params) -> Grads:
        gin: list = [None] * len(need_inputs)
        for which, scale in self._terms():
            if isinstance(which, Input) and need_inputs[which.index]:
                t = sum_to_shape(g, self.shapes[which.index])
                t = t if scale == 1.0 else t * scale
                i = which.index
                gin[i] = t if gin[i] is None else gin[i] + t  # x + x
        return gin, {}


class MulRule(_TwoOperands):
    """``a * b``: bilinear, so the residual is ``g * db`` towards ``a`` and
    ``g * da`` towards ``b``."""

    def forward(self, inputs, params) -> Tensor:
        self._bind(inputs)
        out = self.va * self.vb
        self.out_shape = out.shape
        return out

    def jvp(self, din, dparams) -> Tensor:
        da, db = self._d(self.a, din), self._d(self.b, din)
        out = None
        if da is not None:
            out = da * self.vb
        if db is not None:
            t = self.va * db
            out = t if out is None else out + t
        return out.expand(self.out_shape) if out.shape != self.out_shape else out

    def vjp(self, g, need_inputs, need_params) -> Grads:
        return self._scatter(need_inputs, g * self.vb, g * self.va), {}

    def has_residual(self) -> bool:
        return isinstance(self.a, Input) and isinstance(self.b, Input) and \
            self.active[self.a.index] and self.active[self.b.index]

    def residual(self, g, din, dparams, need_inputs, need_params) -> Grads:
        da, db = self._d(self.a, din), self._d(self.b, din)
        ra = None if db is None else g * db
        rb = None if da is None else g * da
        return self._scatter(need_inputs, ra, rb), {}


class CatRule(Rule):
    def __init__(self, tensors: Sequence[Any], dim: int = 0):
        self.tensors, self.dim = list(tensors), dim

    def forward(self, inputs, params) -> Tensor:
        parts = [substitute(t, inputs) for t in self.tensors]
        self.sizes = [p.shape[self.dim] for p in parts]
        self.parts_shapes = [p.shape for p in parts]
        self.like = parts[0]
        return torch.cat(parts, self.dim)

    def jvp(self, din, dparams) -> Tensor:
        parts = []
        for t, shape in zip(self.tensors, self.parts_shapes):
            d = din[t.index] if isinstance(t, Input) else None
            parts.append(d if d is not None else self.like.new_zeros(shape))
        return torch.cat(parts, self.dim)

    def vjp(self, g, need_inputs, need_params) -> Grads:
        gin: list = [None] * len(need_inputs)
        for t, piece in zip(self.tensors, torch.split(g, self.sizes, self.dim)):
            if isinstance(t, Input) and need_inputs[t.index]:
                gin[t.index] = piece if gin[t.index] is None else gin[t.index] + piece
        return gin, {}


ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__}
SUB_FUNCTIONS = {operator.sub, operator.isub, torch.sub, torch.Tensor.sub, torch.Tensor.sub_}
MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul, torch.Tensor.mul, torch.Tensor.mul_}


def arithmetic_rule(target: Callable, args: tuple, kwargs: dict) -> Optional[Rule]:
    """Rule for a call of ``+``, ``-`` or ``*`` on at most two operands."""
    if len(args) != 2 or set(kwargs) - {"alpha"}:
        return None
    a, b = args
    alpha = kwargs.get("alpha", 1.0)
    if target in ADD_FUNCTIONS:
        return AddRule(a, b, alpha)
    if target in SUB_FUNCTIONS:
        return AddRule(a, b, -alpha)
    if target in MUL_FUNCTIONS and not kwargs:
        return MulRule(a, b)
    return None


@dataclass(frozen=True)
class TuplePart:
    """``fn(*args, **kwargs)[index]``: one piece of a call that returns a tuple,
    a node of its own in the graph (:func:`hfopt.graph._tuple_sources`)."""

    fn: Callable
    index: int

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)[self.index]

    @property
    def __name__(self) -> str:
        return f"{getattr(self.fn, '__name__', repr(self.fn))}(...)[{self.index}]"


# Calls whose result is a tuple of tensors.  Rewriting ``fn(x)[k]`` as a
# TuplePart is exact for any of them; the splits below have closed forms, the
# rest (var_mean, sort, topk, ...) reach the declared fallback one piece at a time.
_SPLITS = {torch.chunk: ("chunks",), torch.Tensor.chunk: ("chunks",),
           torch.split: ("split_size_or_sections",), torch.Tensor.split: ("split_size",),
           torch.tensor_split: ("indices_or_sections",), torch.Tensor.tensor_split: ("indices_or_sections",),
           torch.Tensor.split_with_sizes: ("split_sizes",), torch.unbind: (), torch.Tensor.unbind: ()}
_TUPLE_RETURNING = set(_SPLITS) | {
    torch.var_mean, torch.std_mean, torch.max, torch.Tensor.max, torch.min, torch.Tensor.min, torch.sort,
    torch.Tensor.sort, torch.topk, torch.Tensor.topk, torch.aminmax, torch.Tensor.aminmax, torch.median,
    torch.Tensor.median, torch.kthvalue, torch.Tensor.kthvalue, torch.mode, torch.Tensor.mode, torch.cummax,
    torch.Tensor.cummax, torch.cummin, torch.Tensor.cummin, torch.frexp, torch.Tensor.frexp}


def returns_tuple(target: Any) -> bool:
    try:
        return target in _TUPLE_RETURNING
    except TypeError:  # unhashable target
        return False


class SplitPartRule(Rule):
    """One piece of ``chunk``/``split``/``tensor_split``/``unbind``: a narrow
    (``unbind``: a select) of ``x`` along ``dim``.  Linear; the transposed
    product writes the cotangent into zeros at the piece's place."""

    def __init__(self, part: TuplePart, rest: tuple, dim: int):
        self.part, self.rest, self.dim = part, rest, dim
        self.select = part.fn in (torch.unbind, torch.Tensor.unbind)

    def forward(self, inputs, params) -> Tensor:
        x = inputs[0]
        pieces = self.part.fn(x, *self.rest, dim=self.dim)
        sizes = [1 if self.select else p.shape[self.dim] for p in pieces]
        self.start, self.length = sum(sizes[:self.part.index]), sizes[self.part.index]
        self.in_shape = x.shape
        return pieces[self.part.index]

    def _take(self, t: Tensor) -> Tensor:
        return t.select(self.dim, self.start) if self.select else t.narrow(self.dim, self.start, self.length)

    def jvp(self, din, dparams) -> Tensor:
        return self._take(din[0])

    def vjp(self, g, need_inputs, need_params) -> Grads:
        if not need_inputs[0]:
            return [None], {}
        out = g.new_zeros(self.in_shape)
        self._take(out).copy_(g)
        return [out], {}


def split_part_rule(part: TuplePart, args: tuple, kwargs: dict) -> Optional[Rule]:
    """The rule of ``TuplePart(split-like, k)(x, ...)``, or None."""
    names = _SPLITS.get(part.fn)
    if names is None or not args or not isinstance(args[0], Input):
        return None
    rest = args[1:]
    if len(rest) > len(names) + 1 or set(kwargs) - {"dim"}:
        return None
    dim = rest[len(names)] if len(rest) > len(names) else kwargs.get("dim", 0)
    rest = rest[:len(names)]
    if any(isinstance(a, Input) for a in pytree.tree_leaves(rest)) or not isinstance(dim, int):
        return None  # split sizes given as a tensor
    return SplitPartRule(part, rest, dim)
