"""Per-layer Hessian-backpropagation rules and the table that picks one.

One module per layer family; :func:`module_rule` and :func:`function_rule` map a
module, or a function call seen in a traced ``forward``, to its rule, and
:func:`rule_refusal` decides whether a module's rule may stand for it at all.
Anything else gets :class:`~hfopt.rules.fallback.FallbackRule` (exact, built on
torch.func, slower).
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from .activations import function_activation, function_power, function_prelu, module_activation
from .base import Input, Rule, bind_names
from .batchnorm import BatchNormRule
from .conv import ConvRule
from .conv_transpose import ConvTransposeRule, function_conv_transpose, module_conv_transpose
from .fallback import FallbackRule, call_function, module_function
from .linear import LinearRule
from .moments import function_moments, is_moment
from .normalization import function_normalization, module_normalization
from .pooling import AdaptiveAvgPoolRule, AvgPoolRule, MaxPoolRule, function_pooling, module_pooling
from .resample import function_resample, module_resample
from .functional import ParamsAsInputs, functional_layer_rule
from .shape import (CatRule, DivRule, DropoutRule, IndexRule, PermuteRule, ReduceRule, ReshapeRule, ScaleRule,
                    TuplePart, arithmetic_rule, split_part_rule, stochastic_depth_rule, substitute)
from .syncbatchnorm import SyncBatchNormRule, sync_batchnorm_rule

__all__ = [
    "Rule", "Input", "module_rule", "rule_refusal", "function_rule", "is_metadata_query", "fallback_module_rule",
    "fallback_function_rule",
    "BatchNormRule", "SyncBatchNormRule", "ConvRule", "ConvTransposeRule", "LinearRule", "MaxPoolRule", "AvgPoolRule",
    "AdaptiveAvgPoolRule", "ReshapeRule", "DropoutRule", "PermuteRule", "ReduceRule", "IndexRule", "ScaleRule", "DivRule", "CatRule",
    "ParamsAsInputs", "FallbackRule",
]


# Methods a subclass may define without changing what its torch base computes.
_HARMLESS_OVERRIDES = {"__init__", "__repr__", "extra_repr", "reset_parameters", "reset_running_stats",
                       "__getstate__", "__setstate__", "__deepcopy__", "__init_subclass__", "_get_name",
                       "_load_from_state_dict", "_save_to_state_dict", "__doc__", "__module__", "__qualname__",
                       "__dict__", "__weakref__", "__annotations__", "__slots__", "__firstlineno__",
                       "__static_attributes__"}


def rule_refusal(module: nn.Module) -> Optional[str]:
    """Why no closed-form rule may stand for ``module``, or None.

    The one place that decides it.  A rule is written for a torch class's own
    ``forward``: a subclass that overrides it (or anything else of the base it
    computes with, such as ``_conv_forward``), or a parametrized weight (whose
    rule would read a derived tensor as a constant), computes something else,
    and the engine must trace into it instead.  Hooks are not refused here: the
    tracer records them around the layer (:mod:`hfopt.graph`).

    A subclass whose forward computes its base's by other means (a SyncBatchNorm
    over gloo) may say so with a class attribute ``hfopt_same_forward = True``;
    the engine's output check (:mod:`hfopt.guard`) still holds it to that."""
    if parametrize.is_parametrized(module):
        return f"{type(module).__name__} has parametrized tensors ({', '.join(module.parametrizations)})"
    if _legacy_reparametrization(module):
        return f"{type(module).__name__} recomputes a weight in a pre-hook (weight_norm/spectral_norm)"
    base = next((c for c in type(module).__mro__ if c.__module__.startswith("torch.nn.modules.")), None)
    if base is None:
        return f"{type(module).__name__} is not a torch.nn layer"
    if getattr(type(module), "hfopt_same_forward", False) is True:
        return None  # the class declares its forward computes its base's (the output check still runs)
    for cls in type(module).__mro__:
        if cls is base:
            return None
        changed = sorted(n for n in vars(cls) if n not in _HARMLESS_OVERRIDES and hasattr(base, n))
        if changed:
            return f"{cls.__qualname__} overrides {', '.join(changed)} of {base.__name__}"
    return None


def _legacy_reparametrization(module: nn.Module) -> bool:
    # torch.nn.utils.weight_norm / spectral_norm (the hook forms) assign the
    # weight as a plain attribute in a forward pre-hook.
    return any(type(h).__module__.startswith("torch.nn.utils.") for h in module._forward_pre_hooks.values())


def module_rule(module: nn.Module) -> Optional[Rule]:
    """The closed-form rule for ``module(x)``, or None (no rule, or one that may
    not stand for it: :func:`rule_refusal`)."""
    if rule_refusal(module) is not None:
        return None
    if isinstance(module, nn.Linear):
        return LinearRule.from_module(module)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and ConvRule.supports(module):
        return ConvRule.from_module(module)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        return BatchNormRule.from_module(module)
    if isinstance(module, nn.SyncBatchNorm):
        return sync_batchnorm_rule(module)
    if isinstance(module, nn.Flatten):
        start, end = module.start_dim, module.end_dim
        return ReshapeRule(lambda x: x.flatten(start, end))
    if isinstance(module, nn.Identity):
        return ReshapeRule()
    if isinstance(module, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)):
        if not module.training or module.p == 0:
            return ReshapeRule()
        return DropoutRule(module.p, module.inplace) if type(module) is nn.Dropout else None
    return module_activation(module) or module_pooling(module) or module_normalization(module) or \
        module_resample(module) or module_conv_transpose(module)


def has_module_rule(module: nn.Module) -> bool:
    return module_rule(module) is not None


def fallback_module_rule(module: nn.Module, args: tuple, kwargs: dict, part: Optional[int] = None) -> FallbackRule:
    """The fallback for ``module(*args, **kwargs)`` (``[part]`` of its result when given)."""
    names = [n for n, p in module.named_parameters()]
    fn = module_function(module, args, kwargs)
    if part is None:
        return FallbackRule(fn, names, type(module).__name__)
    return FallbackRule(lambda inputs, params: fn(inputs, params)[part], names, f"{type(module).__name__}[{part}]")


def fallback_function_rule(target: Callable, args: tuple, kwargs: dict) -> FallbackRule:
    return FallbackRule(call_function(target, args, kwargs), (), _name(target))


def _name(target: Any) -> str:
    return getattr(target, "__name__", None) or repr(target)


# Maps that only change the shape, squeeze/unsqueeze included: the transpose reshapes back.
_RESHAPES = {torch.flatten, torch.Tensor.flatten, torch.reshape, torch.Tensor.reshape, torch.Tensor.view,
             torch.Tensor.contiguous, torch.Tensor.clone, torch.clone, torch.squeeze, torch.Tensor.squeeze, torch.unsqueeze, torch.Tensor.unsqueeze}
_RESHAPES_AS = {torch.Tensor.reshape_as, torch.Tensor.view_as}
_PERMUTES = {torch.Tensor.permute, torch.permute}
_TRANSPOSES = {torch.transpose, torch.Tensor.transpose}
_MOVEDIMS = {torch.movedim, torch.Tensor.movedim, torch.moveaxis, torch.Tensor.moveaxis}
_REDUCTIONS = {torch.mean: True, torch.Tensor.mean: True, torch.sum: False, torch.Tensor.sum: False}
_NEGATIONS = {operator.neg, torch.neg, torch.Tensor.neg, torch.Tensor.__neg__}
_DIVISIONS = {operator.truediv, operator.itruediv, torch.div, torch.Tensor.div, torch.Tensor.div_,
              torch.true_divide, torch.Tensor.__truediv__}


# Queries of a tensor's metadata: their results are numbers (sizes, dims, dtypes),
# never a direction, even when the tensor queried carries one (x.size(0) in
# x.view(x.size(0), -1)).
_METADATA_METHODS = {torch.Tensor.size, torch.Tensor.dim, torch.Tensor.ndimension, torch.Tensor.numel,
                     torch.Tensor.nelement, torch.numel, torch.Tensor.is_contiguous, torch.Tensor.get_device}
_METADATA_ATTRS = {"shape", "ndim", "dtype", "device", "layout", "is_cuda", "requires_grad"}


# Calls whose result never carries a direction though they read a tensor that
# does: detached copies, new tensors shaped like it, and random draws (timm's DropPath builds its
# mask as ``x.new_empty(shape).bernoulli_(keep)``).
_CONSTRUCTORS = {torch.Tensor.new_empty, torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_full,
                 torch.Tensor.new_tensor, torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
                 torch.rand_like, torch.randn_like, torch.randint_like, torch.bernoulli, torch.Tensor.bernoulli,
                 torch.Tensor.detach, torch.detach}


def is_metadata_query(target: Callable, args: tuple) -> bool:
    """Whether ``target(*args)`` only reads metadata (``x.size(3)``, ``x.shape``)
    or builds a constant from it (``x.new_empty(n)``): constant glue that runs
    as written."""
    try:
        if target in _METADATA_METHODS or target in _CONSTRUCTORS:
            return True
    except TypeError:  # unhashable target
        return False
    return target is getattr and len(args) == 2 and args[1] in _METADATA_ATTRS


def _single_input(args: tuple) -> bool:
    return len(args) >= 1 and isinstance(args[0], Input) and not any(
        isinstance(a, Input) for a in torch.utils._pytree.tree_leaves(args[1:]))


def function_rule(target: Callable, args: tuple, kwargs: dict, values: Sequence[Tensor] = (),
                  active: Sequence[bool] = ()) -> Optional[Rule]:
    """The closed-form rule for a functional call ``target(*args, **kwargs)``
    (tensors already replaced by :class:`Input` markers; ``values`` and
    ``active`` are those tensors and whether each carries a direction), or None."""
    try:
        hash(target)
    except TypeError:  # unhashable target
        return None
    if is_moment(target):
        return function_moments(target, args, kwargs)
    if isinstance(target, TuplePart):
        return split_part_rule(target, args, kwargs)
    if target in _RESHAPES_AS and len(args) == 2 and not kwargs and isinstance(args[0], Input) \
            and isinstance(args[1], Input):
        shape = values[args[1].index].shape  # only the other tensor's shape is read
        return ReshapeRule(lambda x: x.reshape(shape))
    for family in (functional_layer_rule, function_normalization, function_resample, function_conv_transpose):
        rule = family(target, args, kwargs, values, active)
        if rule is not None:
            return rule
    rule = _glue_rule(target, args, kwargs)
    if rule is not None:
        return rule
    kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}  # rules never write in place
    if not _single_input(args):
        return function_prelu(target, args, kwargs) or _remaining_rule(target, args, kwargs)
    rule = function_activation(target, args, kwargs, values) or function_power(target, args, kwargs) or \
        function_pooling(target, args, kwargs)
    if rule is not None:
        return rule
    if target in _RESHAPES:
        rest, kw = args[1:], kwargs
        return ReshapeRule(lambda x: target(x, *rest, **kw))
    return _remaining_rule(target, args, kwargs)


def _remaining_rule(target: Callable, args: tuple, kwargs: dict) -> Optional[Rule]:
    """``torch.cat``, stochastic depth, ``F.dropout`` and ``+``/``-``/``*``."""
    if target is torch.cat and args and isinstance(args[0], (list, tuple)):
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        return CatRule(args[0], dim)
    rule = stochastic_depth_rule(target, args, kwargs) if _single_input(args) else None
    if rule is not None:
        return rule
    if target in (F.dropout,) and _single_input(args):
        p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
        training = args[2] if len(args) > 2 else kwargs.get("training", True)
        inplace = bool(args[3]) if len(args) > 3 else False
        return DropoutRule(p, inplace) if training and p > 0 else ReshapeRule()
    return arithmetic_rule(target, args, kwargs)


def _glue_rule(target: Callable, args: tuple, kwargs: dict) -> Optional[Rule]:
    """Closed forms of the linear glue: permute/transpose, sum/mean, indexing,
    negation and division."""
    if target is operator.getitem and len(args) == 2 and isinstance(args[0], Input) and not kwargs:
        return IndexRule(args[1])
    if target in _DIVISIONS and len(args) == 2 and not (set(kwargs) - {"rounding_mode"}) \
            and kwargs.get("rounding_mode") is None:
        a, b = args
        if isinstance(b, (int, float)) and not isinstance(b, bool) and isinstance(a, Input):
            return ScaleRule(divisor=b)
        return DivRule(a, b)
    if not _single_input(args):
        return None
    rest = args[1:]
    if target in _NEGATIONS and not rest and not kwargs:
        return ScaleRule(-1.0)
    if target in _PERMUTES:
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else kwargs.get("dims", rest)
        return PermuteRule(dims=tuple(dims)) if all(isinstance(d, int) for d in dims) else None
    if target in _TRANSPOSES:
        bound = _bind_dims(rest, kwargs, ("dim0", "dim1"))
        return PermuteRule(swap=bound) if bound is not None and all(isinstance(d, int) for d in bound) else None
    if target in _MOVEDIMS:
        bound = _bind_dims(rest, kwargs, ("source", "destination"))
        return PermuteRule(move=bound) if bound is not None else None
    if target in _REDUCTIONS:
        return _reduce_rule(_REDUCTIONS[target], rest, kwargs)
    return None


def _bind_dims(rest: tuple, kwargs: dict, names: Tuple[str, ...]) -> Optional[tuple]:
    values = bind_names(names, rest, kwargs)
    return tuple(values[n] for n in names) if values is not None and len(values) == len(names) else None


def _reduce_rule(mean: bool, rest: tuple, kwargs: dict) -> Optional[Rule]:
    names = ("dim", "keepdim")
    if len(rest) > 2 or set(kwargs) - {"dim", "keepdim", "dtype"}:
        return None
    given = dict(zip(names, rest))
    if any(k in given for k in kwargs):
        return None
    given.update(kwargs)
    dim = given.get("dim")
    dims = None if dim is None else (tuple(dim) if isinstance(dim, (tuple, list)) else (dim,))
    if dims is not None and not all(isinstance(d, int) for d in dims):
        return None  # named dimensions
    if dims == ():  # torch reads an empty dim list as "all dimensions"
        dims = None
    return ReduceRule(mean, dims, bool(given.get("keepdim", False)), given.get("dtype"))
