"""Turn a model into the ordered nodes the curvature sweeps walk.

torch.fx traces ``forward`` symbolically.  Modules with a closed-form rule stay
leaves; containers and custom blocks are traced through, so the glue written
in their ``forward`` (skip additions, ``F.relu``, ``view``) becomes nodes of its
own.  A leaf module without a rule is kept whole and later served by the
torch.func fallback.  A model fx cannot trace becomes a single fallback node.
"""
from __future__ import annotations

import contextlib
import itertools
import operator
import weakref
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
from torch import fx, nn
from torch.nn.modules import module as module_hooks

from .rules import has_module_rule
from .rules.shape import TuplePart, returns_tuple


@dataclass(frozen=True)
class Ref:
    """The value of node ``index``."""

    index: int


@dataclass
class Node:
    """One step of the model.

    ``op`` is ``"input"`` (``target``: position in the model's inputs),
    ``"attr"`` (``target``: the tensor a ``get_attr`` reads), ``"module"``
    (``target``: the submodule), ``"function"`` (``target``: the callable;
    methods become ``torch.Tensor.<name>``) or ``"output"``.
    """

    name: str
    op: str
    target: Any
    args: tuple = ()
    kwargs: Optional[dict] = None
    with_hooks: bool = False  # a module node that includes the module's hooks: fallback only
    part: Optional[int] = None  # a module node standing for one piece of the tuple the module returns


@dataclass
class Graph:
    nodes: List[Node]
    output: Ref
    traced: bool  # False: the whole model is one fallback node
    reason: str = ""  # why fx could not trace it


class _Tracer(fx.Tracer):
    """Every module without a rule is traced through (containers, custom
    blocks, a layer calling ``F.linear(x, self.weight)``, torch's own
    ``_WeightNorm``), so that its calls reach their rules, except ``whole``:
    the modules fx could not trace, kept whole for the fallback
    (:func:`_trace_finest`)."""

    def __init__(self, whole: "set[int]"):
        super().__init__()
        self.whole = whole

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return has_module_rule(m) or id(m) in self.whole

    def call_module(self, m: nn.Module, forward, args, kwargs):
        if not (_has_forward_hooks(m) and has_module_rule(m)):
            return super().call_module(m, forward, args, kwargs)
        # A layer with a rule keeps its node, and its hooks are traced around it:
        # torch's own call machinery runs them, with the layer's forward
        # replaced by the node.  A hook that changes values becomes glue nodes
        # (``output * 0.5``); one that only reads (a feature tap) adds none.
        made: list = []

        def node(*a, **k):
            made.append(super(_Tracer, self).call_module(m, forward, a, k))
            return made[-1]

        own = m.__dict__.get("forward")
        m.forward = node
        try:
            return nn.Module._call_impl(m, *args, **kwargs)
        except Exception:
            # A hook fx cannot trace (``tuple(out.shape)``): the layer and its
            # hooks become one node (the one already made, if a forward hook
            # failed) that only the fallback may serve, on the original inputs.
            pre_hooks = m._forward_pre_hooks or module_hooks._global_forward_pre_hooks
            proxy = made[0] if made and not pre_hooks else node(*args, **kwargs)
            proxy.node.meta[WITH_HOOKS] = True
            return proxy
        finally:
            if own is None:
                del m.forward
            else:
                m.forward = own


def _has_forward_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or module_hooks._global_forward_hooks
                or module_hooks._global_forward_pre_hooks)


def _trace_finest(root: nn.Module) -> fx.Graph:
    """fx's trace of ``root`` with the smallest modules it cannot trace kept
    whole.  Each failure is traced back to the module whose forward was running
    (the innermost of fx's module stack), which becomes a leaf, and the trace is
    retried; a failure in the root's own forward is raised.  Modules are traced
    in their context, with the arguments they really get (a list of tensors
    that a module writes into, as HRNet's branches do, traces there and not
    alone)."""
    whole: "set[int]" = set()
    while True:
        tracer = _Tracer(whole)
        try:
            with buffers_untouched(root):
                return tracer.trace(root)
        except Exception:
            culprit = _innermost(tracer, root)
            if culprit is None or id(culprit) in whole:
                raise
            whole.add(id(culprit))


def _innermost(tracer: fx.Tracer, root: nn.Module) -> Optional[nn.Module]:
    """The module whose forward fx was tracing when it failed (None: the root's)."""
    for path, _ in reversed(list(tracer.module_stack.values())):
        if path:
            try:
                return root.get_submodule(path)
            except AttributeError:
                return None
    return None


@contextlib.contextmanager
def buffers_untouched(model: nn.Module):
    """Inside, every buffer of ``model`` is a copy; outside, the original
    tensors are back, never written: their values, and the version counters
    that show in-place writes (``DatasetOperator`` reads them), are unchanged.
    fx runs the in-place update of a buffer it does not proxy
    (``self.num_batches_tracked.add_(1)`` in a BatchNorm subclass's forward) on
    the real tensor, and the guard runs the model's own forward."""
    saved = [(m, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None]
    for m, name, b in saved:
        m._buffers[name] = b.detach().clone()
    try:
        yield
    finally:
        for m, name, b in saved:
            m._buffers[name] = b




_INPLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                      operator.itruediv: operator.truediv}


def _is_inplace_name(name: str) -> bool:
    return name.endswith("_") and not name.endswith("__")


def _functional(fn: fx.Node, model: nn.Module) -> Tuple[Any, dict, bool]:
    """``(target, kwargs, inplace)`` of a call node, an in-place op replaced by its
    out-of-place twin (rules never write in place, and a fallback must not
    overwrite values other rules cached); ``inplace`` says the op overwrote its
    first argument."""
    kwargs = dict(fn.kwargs)
    if fn.op == "call_module":
        module = model.get_submodule(fn.target)
        # torch.nn's convention (nn.ReLU(inplace=True)); a custom module's flag may mean anything.
        inplace = getattr(module, "inplace", False) is True and type(module).__module__.startswith("torch.nn.")
        return module, kwargs, inplace
    if fn.op == "call_method":
        method = getattr(torch.Tensor, fn.target)
        if _is_inplace_name(fn.target):
            twin = getattr(torch.Tensor, fn.target[:-1], None)
            return (twin if callable(twin) else method), kwargs, True
        return method, kwargs, False
    target = fn.target
    if kwargs.get("inplace") is True:  # F.relu(x, inplace=True): F.* pass it by keyword
        kwargs["inplace"] = False
        return target, kwargs, True
    if target in _INPLACE_OPERATORS:
        return _INPLACE_OPERATORS[target], kwargs, True
    name = getattr(target, "__name__", "")
    if _is_inplace_name(name) and getattr(torch, name, None) is target:  # torch.relu_(x)
        twin = getattr(torch, name[:-1], None)
        return (twin if callable(twin) else target), kwargs, True
    return target, kwargs, False


def _thaw(a: Any) -> Any:
    """fx's immutable lists and dicts as plain ones: a module kept whole gets
    them as arguments, and may write into a list it is given (HRNet's branches
    do ``x[i] = branch(x[i])``)."""
    if isinstance(a, (list, tuple)):
        items = [_thaw(t) for t in a]
        return items if isinstance(a, list) else tuple(items)
    if isinstance(a, dict):
        return {k: _thaw(t) for k, t in a.items()}
    return a


def _convert(model: nn.Module, g: fx.Graph) -> Graph:
    index = {}
    nodes: List[Node] = []
    n_inputs = 0
    # fx records `out.add_(y)` or `F.relu(out, inplace=True)` as a new node, yet
    # later code that reads `out` gets the old node, whose value eagerly was
    # overwritten.  Reads are redirected to the op that last overwrote a value:
    # ``root`` maps an in-place result to the node it overwrote, ``latest`` such
    # a node to its newest version.
    root: dict = {}
    latest: dict = {}

    def ref(a):
        if not isinstance(a, fx.Node):
            return a
        return Ref(index[latest.get(root.get(a, a), a)])

    output = None
    pieces = _tuple_sources(g, model)
    for fn in g.nodes:
        if fn in pieces:
            continue  # each use becomes a node of its own piece, below
        source = fn.args[0] if fn.target is operator.getitem and fn.args else None
        if source in pieces:
            fn_target, fn_kwargs, _ = _functional(source, model)
            args = _thaw(torch.utils._pytree.tree_map(ref, tuple(source.args)))
            kwargs = _thaw(torch.utils._pytree.tree_map(ref, fn_kwargs))
            index[fn] = len(nodes)
            if source.op == "call_module":
                nodes.append(Node(fn.name, "module", fn_target, args, kwargs, part=fn.args[1]))
            else:
                nodes.append(Node(fn.name, "function", TuplePart(fn_target, fn.args[1]), args, kwargs))
            continue
        args = torch.utils._pytree.tree_map(ref, tuple(fn.args))
        inplace = False
        if fn.op == "placeholder":
            node = Node(fn.name, "input", n_inputs)
            n_inputs += 1
        elif fn.op == "get_attr":
            node = Node(fn.name, "attr", _get_attr(model, fn.target))
        elif fn.op in ("call_module", "call_method", "call_function"):
            target, kwargs, inplace = _functional(fn, model)
            kwargs = torch.utils._pytree.tree_map(ref, kwargs)
            node = Node(fn.name, "module" if fn.op == "call_module" else "function", target, _thaw(args),
                        _thaw(kwargs), with_hooks=bool(fn.meta.get(WITH_HOOKS)))
        elif fn.op == "output":
            output = args[0]
            continue
        else:  # pragma: no cover - fx has no other ops
            raise RuntimeError(f"unexpected fx op {fn.op}")
        index[fn] = len(nodes)
        nodes.append(node)
        if inplace and fn.args and isinstance(fn.args[0], fx.Node):
            first = root.get(fn.args[0], fn.args[0])
            root[fn] = first
            latest[first] = fn
    if not isinstance(output, Ref):
        raise TypeError("hfopt: the model must return a single tensor; got a "
                        f"{type(output).__name__} of outputs from its forward")
    return Graph(nodes, output, traced=True)


def _tuple_sources(g: fx.Graph, model: nn.Module) -> set:
    """Calls that return a tuple of tensors (``x.chunk(2, 1)``, ``torch.split``,
    a module kept whole that returns a list, as HRNet's branches do) whose every
    use takes one piece by a constant index.  Each piece becomes a node of its
    own (``TuplePart(target, k)``, or a module node with ``part=k``): the
    engine's values are single tensors."""
    out = set()
    for fn in g.nodes:
        if fn.op not in ("call_method", "call_function", "call_module") or not fn.users:
            continue
        if not all(u.op == "call_function" and u.target is operator.getitem and u.args[0] is fn
                   and isinstance(u.args[1], int) for u in fn.users):
            continue
        target, _, inplace = _functional(fn, model)
        if fn.op == "call_module":
            if not has_module_rule(target):  # a rule's module returns a tensor: x[k] indexes it
                out.add(fn)
        elif not inplace and returns_tuple(target):
            out.add(fn)
    return out


def _get_attr(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _whole_model(model: nn.Module, n_inputs: int) -> Graph:
    nodes = [Node(f"input{i}", "input", i) for i in range(n_inputs)]
    nodes.append(Node("model", "module", model, tuple(Ref(i) for i in range(n_inputs)), {}))
    return Graph(nodes, Ref(n_inputs), traced=False)


# fx node meta key: a layer node that stands for the layer's call with its hooks.
WITH_HOOKS = "hfopt_with_hooks"


class _Root(nn.Module):
    """Holds a model whose own call has hooks, so that fx traces the call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):  # fx makes one placeholder per named argument, none for *args
        return self.model(x)


_CACHE: "weakref.WeakKeyDictionary[nn.Module, Tuple[Any, Graph]]" = weakref.WeakKeyDictionary()


def signature(model: nn.Module) -> tuple:
    # A traced forward may have branched on a container's `training` flag.  The
    # graph's "attr" nodes hold the tensors a get_attr read: a parameter or
    # buffer re-assigned since (model.scale = nn.Parameter(...)) must not be
    # served from the cache, or its directions would silently be dropped.
    # Hooks are traced into the graph: adding or removing one changes it.
    modules = tuple((name, id(m), m.training, tuple(m._forward_pre_hooks), tuple(m._forward_hooks))
                    for name, m in model.named_modules())
    modules += (tuple(module_hooks._global_forward_pre_hooks), tuple(module_hooks._global_forward_hooks))
    tensors = tuple((name, id(t)) for name, t in itertools.chain(model.named_parameters(), model.named_buffers()))
    return modules + tensors


def trace(model: nn.Module, n_inputs: int = 1) -> Graph:
    """The graph of ``model`` (cached while the module tree is unchanged)."""
    sig = signature(model)
    hit = _CACHE.get(model)
    if hit is not None and hit[0] == sig and (hit[1].traced or
                                               sum(n.op == "input" for n in hit[1].nodes) == n_inputs):
        return hit[1]
    hooked = _has_forward_hooks(model)
    if has_module_rule(model) and not hooked:
        graph = _whole_model(model, 1)
        graph.traced = True  # a single supported layer: its rule is exact, no fallback
        return graph  # not cached: see below
    # fx calls the root's forward, not the module: its hooks would be skipped.
    root = _Root(model) if hooked else model
    try:
        if hooked and n_inputs != 1:
            raise TypeError("hooks on a model that takes several inputs are run by the fallback")
        traced = _trace_finest(root)
    except Exception as exc:  # fx refuses data-dependent control flow and more
        graph = _whole_model(model, n_inputs)
        graph.reason = f"{type(exc).__name__}: {exc}"
        # Not cached: a whole-model graph holds the model itself, and a cache
        # value referencing its own weak key keeps the model alive forever.
        return graph
    graph = _convert(root, traced)
    _CACHE[model] = (sig, graph)
    return graph
