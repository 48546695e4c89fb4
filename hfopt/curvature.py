"""Gauss-Newton and Hessian operators from per-layer rules.

Building an operator runs the model's forward once through the rules (under
``no_grad``, without touching parameters or buffers) and caches what each rule
needs.  A product ``v -> Bv`` is then

1. a forward sweep of Jacobian-vector products (Pearlmutter's R-operator),
2. the loss's output Hessian applied to the output direction,
3. a backward sweep of transposed-Jacobian products; for the Hessian each rule
   also adds its residual: its second derivative contracted with the gradient
   that reached its output (computed once, at build, by the same rules).

``GGN`` drops the residuals, ``Hessian`` keeps them.  Vectors are lists of
tensors shaped like the model's trainable parameters, in ``model.parameters()``
order.

``compile=True`` runs every product through ``torch.compile``
(:mod:`hfopt.compiled`), falling back to eager products, with a warning, where
it cannot compile.

``channels_last`` (default None: automatic, see :func:`_channels_last`) holds
2-D convolutions and what flows between them in channels-last layout inside
the engine; the model, its inputs and the results keep their own layout.

With ``process_group=`` the operator is the curvature of the global batch
spread over the group's ranks (:mod:`hfopt.distributed`): each rank passes its
own shard, and every product, gradient and diagonal estimate is a collective
that all ranks must call in the same order.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules import module as module_hooks
from torch.utils import _pytree as pytree

from . import compiled, distributed, guard
from .graph import Graph, Ref, trace
from .losses import loss_curvature
from .rules import (Input, ParamsAsInputs, Rule, fallback_function_rule, fallback_module_rule, function_rule, is_metadata_query,
                    module_rule)
from .rules.base import add_optional
from .rules.activations import ReLURule
from .rules.batchnorm import BatchNormRule
from .rules.fallback import FallbackRule
from .rules.conv import ConvRule
from .rules.fused import BNReLUMaxPoolRule, DataConvBNReLUMaxPoolRule, ReLUMaxPoolRule
from .rules.pooling import MaxPoolRule
from .rules.shape import call_any_layout, substitute

Vector = List[Tensor]


@dataclass
class _Step:
    node: int                       # index of the graph node this step computes
    rule: Rule
    refs: List[Optional[int]]       # node index behind each Input marker (None: literal constant)
    active: List[bool]              # which inputs carry a direction
    params: Dict[str, int]          # parameter name -> position in the flat parameter list
    residual: bool = False          # Hessian only: the rule has a non-zero residual here
    gradient: Optional[Tensor] = field(default=None, repr=False)  # dLoss/dOutput of this step


class FlatOperator(ABC):
    """The linear-operator face shared by every hfopt curvature operator:
    products on parameter-shaped lists (:meth:`matvec`, ``@``) and on flat
    vectors (:meth:`matvec_flat`), and a SciPy view.  Subclasses set
    ``params`` and ``param_names`` and implement :meth:`matvec`."""

    params: List[Tensor]
    param_names: List[str]

    @abstractmethod
    def matvec(self, v: Sequence[Tensor]) -> Vector:
        """The curvature times ``v`` (a list shaped like the parameters)."""

    def __matmul__(self, v: Sequence[Tensor]) -> Vector:
        return self.matvec(v)

    def matvec_flat(self, vec: Tensor) -> Tensor:
        """:meth:`matvec` on one flat vector (parameters concatenated in order)."""
        if not isinstance(vec, Tensor) or vec.dim() != 1 or vec.numel() != self.numel:
            raise ValueError(f"hfopt: a flat vector must be a 1-D tensor of {self.numel} elements, got "
                             f"{tuple(vec.shape) if isinstance(vec, Tensor) else type(vec).__name__}")
        return torch.cat([t.reshape(-1) for t in self.matvec(self.unflatten(vec))])

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def unflatten(self, vec: Tensor) -> Vector:
        """Split a flat vector into parameter-shaped pieces (dtype and device of the parameters)."""
        out, k = [], 0
        for p in self.params:
            out.append(vec[k:k + p.numel()].view(p.shape).to(dtype=p.dtype, device=p.device))
            k += p.numel()
        return out

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` on flat float64 vectors."""
        from scipy.sparse.linalg import LinearOperator

        def mv(x: np.ndarray) -> np.ndarray:
            flat = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float64).reshape(-1))
            return self.matvec_flat(flat).detach().cpu().to(torch.float64).numpy()

        n = self.numel
        return LinearOperator((n, n), matvec=mv, rmatvec=mv, dtype=np.float64)

    def _check(self, v: Sequence[Tensor]) -> Vector:
        if isinstance(v, Tensor) or not isinstance(v, (list, tuple)):
            raise TypeError(f"hfopt: v must be a list of tensors shaped like the {len(self.params)} trainable "
                            f"parameters, got {type(v).__name__} (use matvec_flat for a flat vector)")
        if len(v) != len(self.params):
            # Name the first parameter left without an entry (or the last one
            # matched when v is too long): the mismatch is usually a frozen or
            # forgotten parameter.
            if len(v) < len(self.params):
                where = f"no entry for parameter '{self.param_names[len(v)]}'"
            else:
                where = f"the last trainable parameter is '{self.param_names[-1]}'"
            raise ValueError(f"hfopt: v has {len(v)} tensors but the model has {len(self.params)} trainable "
                             f"parameters ({where}); v must follow the trainable parameters in "
                             "model.parameters() order")
        for name, p, t in zip(self.param_names, self.params, v):
            if not isinstance(t, Tensor):
                raise TypeError(f"hfopt: v entry for parameter '{name}' is a {type(t).__name__}, not a tensor")
            if t.shape != p.shape:
                raise ValueError(f"hfopt: v entry for parameter '{name}' has shape {tuple(t.shape)}, "
                                 f"expected {tuple(p.shape)}")
            if t.dtype != p.dtype:
                raise ValueError(f"hfopt: v entry for parameter '{name}' has dtype {t.dtype}, expected {p.dtype}")
            if t.device != p.device:
                raise ValueError(f"hfopt: v entry for parameter '{name}' is on {t.device}, expected {p.device}")
        return [t.detach() for t in v]


class CurvatureOperator(FlatOperator):
    """Base of :class:`GGN` and :class:`Hessian`; see the module docstring."""

    residuals = False

    def __init__(self, model: nn.Module, loss_fn: Callable, inputs, targets, *, fuse: bool = True,
                 channels_last: Optional[bool] = None, compile: bool = False,
                 process_group: Optional[Any] = None, verify: Union[bool, Tensor] = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"hfopt: model must be an nn.Module, got {type(model).__name__}")
        model = distributed.unwrap(model)  # DistributedDataParallel: its module
        self._dp = distributed.operator_group(model, process_group)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"hfopt: {type(model).__name__} has no trainable parameters "
                             "(none with requires_grad=True); there is no curvature to compute")
        _check_dtypes(named)
        self.model = model
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self._index = {id(p): i for i, p in enumerate(self.params)}
        inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        _check_inputs(inputs, self.params[0])
        self.graph: Graph = trace(model, len(inputs))
        self.fallbacks: List[str] = []
        self.fuse = fuse
        if not isinstance(compile, bool):
            raise TypeError(f"hfopt: compile must be True or False, got {type(compile).__name__}")
        self.compile = compile
        self._copies: Dict[int, Tensor] = {}
        self._live: Dict[int, int] = {}  # id(copy) -> id(parameter)
        self._device_type = self.params[0].device.type
        self.compute_dtype: Optional[torch.dtype] = _autocast_dtype(self._device_type, self.params[0].dtype)
        self.channels_last = _channels_last(channels_last, self._device_type,
                                            self.compute_dtype or self.params[0].dtype)
        if not isinstance(verify, (bool, Tensor)):
            raise TypeError(f"hfopt: verify must be True, False or the model's output tensor, got "
                            f"{type(verify).__name__}")
        state = guard.rng_state(list(inputs) + self.params)
        with torch.no_grad(), self._exact_dtypes():
            try:
                output = self._forward(inputs)
                self.output = output
                if verify is not False:
                    with self._autocast_as_built():
                        guard.check_forward(self, inputs, state, None if verify is True else verify)
                # The loss and its output derivatives in the parameters' precision.
                self.loss_curvature: Any = loss_curvature(loss_fn, self._to_params_dtype(output), targets)
            except Exception as exc:
                if self._dp is not None:  # the other ranks wait in the all-reduce of weighted_loss
                    self._dp.share_failure(exc, 2, self.params[0])
                raise
            if self._dp is not None:
                # This rank's share of the global objective; its value is the global loss.
                self.loss_curvature = distributed.weighted_loss(self._dp, self.loss_curvature, loss_fn,
                                                                self.params[0])
        self.loss = self.loss_curvature.value
        self._gradient: Optional[Vector] = None   # this rank's share
        self._global_gradient: Optional[Vector] = None
        if self.residuals:
            self._gradient = self._first_order()

    # ---------------------------------------------------------------- precision
    def _exact_dtypes(self):
        """Autocast off inside the engine: with a compute dtype the rules run
        on tensors cast to it, so that every op of a rule sees one dtype."""
        return torch.autocast(self._device_type, enabled=False)

    def _autocast_as_built(self):
        """The caller's autocast state, in which the model's own forward runs."""
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self._device_type, dtype=self.compute_dtype)

    def _compute(self, t):
        """``t`` in the compute dtype (floating tensors only; others unchanged)."""
        if self.compute_dtype is None or not isinstance(t, Tensor) or not t.is_floating_point():
            return t
        return t.to(self.compute_dtype)

    def _layout(self, t: Tensor) -> Tensor:
        """A direction in the layout the convolution rules hold their weights in:
        converted once per product, not once per rule method."""
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last and t.dim() == 4 else t

    def _to_params_dtype(self, t: Tensor) -> Tensor:
        return t if self.compute_dtype is None else t.to(self.params[0].dtype)

    # ---------------------------------------------------------------- forward
    def _forward(self, inputs: tuple, record: Optional[Dict[int, Tensor]] = None) -> Tensor:
        """Run the graph through the rules, caching what the products need;
        ``record`` (the guard's diagnosis) collects the value of every module node."""
        nodes = self.graph.nodes
        values: List = [None] * len(nodes)
        active = [False] * len(nodes)
        self._param_nodes: Dict[int, int] = {}
        self.steps: List[_Step] = []
        last_use = self._last_use()
        for i, node in enumerate(nodes):
            if node.op == "input":
                if node.target >= len(inputs):
                    raise ValueError(f"hfopt: the model's forward takes more inputs than the {len(inputs)} given")
                values[i] = self._compute(inputs[node.target])
            elif node.op == "attr":
                values[i] = self._frozen(node.target)
                idx = self._index.get(id(node.target))
                if idx is not None:
                    active[i] = True
                    self._param_nodes[i] = idx
            else:
                values[i] = self._call(i, node, values, active)
                if record is not None and node.op == "module":
                    record[i] = values[i]
            for j in last_use.get(i, ()):  # rules cache what they need; drop the rest
                values[j] = None
        out = values[self.graph.output.index]
        if not isinstance(out, Tensor):
            raise TypeError(f"hfopt: the model must return a tensor, got {type(out).__name__}")
        self._output_active = active[self.graph.output.index]
        if self.fuse:
            self._fuse()
        self._last_step = self._last_step_use()
        return out

    def _frozen(self, t):
        """A copy of parameter or buffer ``t`` taken at build: the operator is the
        curvature at that point, whatever training does to ``t`` afterwards."""
        if not isinstance(t, Tensor):
            return t
        copy = self._copies.get(id(t))
        if copy is None:
            copy = self._copies[id(t)] = self._compute(t.detach().clone())
            self._live[id(copy)] = id(t)
        return copy

    def _last_use(self) -> Dict[int, List[int]]:
        """node -> nodes whose values are no longer needed after it ran."""
        last: Dict[int, int] = {}
        for i, node in enumerate(self.graph.nodes):
            for leaf in pytree.tree_leaves((node.args, node.kwargs or {})):
                if isinstance(leaf, Ref):
                    last[leaf.index] = i
        last.pop(self.graph.output.index, None)
        out: Dict[int, List[int]] = {}
        for j, i in last.items():
            out.setdefault(i, []).append(j)
        return out

    def _call(self, i: int, node, values: list, active: list):
        tensors: List[Tensor] = []
        refs: List[Optional[int]] = []
        act: List[bool] = []

        def mark(a):
            if isinstance(a, Ref):
                v = values[a.index]
                if not isinstance(v, Tensor):
                    return v
                refs.append(a.index)
                act.append(active[a.index])
            elif isinstance(a, Tensor):
                v = self._compute(a)
                refs.append(None)
                act.append(False)
            else:
                return a
            tensors.append(v)
            return Input(len(tensors) - 1)

        args = pytree.tree_map(mark, node.args)
        kwargs = pytree.tree_map(mark, node.kwargs or {})
        fallback = False
        if node.op == "module":
            module = node.target
            # A whole-model node (fx could not trace the model) stands for the
            # model's full call, hooks included: only the fallback runs that.
            single = len(args) == 1 and isinstance(args[0], Input) and not kwargs and node.part is None
            rule = module_rule(module) if single and self.graph.traced else None
            if rule is not None and node.with_hooks and not _hooks_only_read(module, rule, tensors[0], act,
                                                                               self._frozen):
                rule = None
            if rule is None:
                rule, fallback = fallback_module_rule(module, args, kwargs, node.part), True
                params = {n: self._frozen(p) for n, p in module.named_parameters()}
            else:
                params = {n: self._frozen(getattr(module, n, None)) for n in rule.param_names}
        else:
            params = {}
            rule = function_rule(node.target, args, kwargs, tensors, act) if tensors else None
            if rule is None:
                # Constant glue runs as written: calls on constants, and metadata
                # queries (x.size(0), x.shape) even of a tensor that carries a
                # direction; they return numbers, which the fallback cannot take.
                if not any(act) or is_metadata_query(node.target, args):
                    return call_any_layout(lambda *t: node.target(*substitute(args, t), **substitute(kwargs, t)),
                                           *tensors)
                rule, fallback = fallback_function_rule(node.target, args, kwargs), True
        trainable = {n: self._index[self._live[id(p)]] for n, p in params.items()
                     if p is not None and self._live.get(id(p)) in self._index}
        conv = rule.inner if isinstance(rule, ParamsAsInputs) else rule
        if isinstance(conv, ConvRule):
            conv.channels_last = self.channels_last
        rule.setup(act, tuple(trainable))
        out = rule.forward(tensors, params)
        if fallback and not out.is_floating_point():
            return out  # integer results (argmax, the indices of max(dim)) carry no direction: constants
        if any(act) or trainable:
            active[i] = True
            self.steps.append(_Step(i, rule, refs, act, trainable))
            if fallback:
                if self._dp is None:  # a fallback holding collectives: each probe would be one more
                    rule.probe(second_order=self.residuals)
                self._note_fallback(node, rule)
        return out

    def _note_fallback(self, node, rule: FallbackRule) -> None:
        where = node.name if self.graph.traced else f"{type(self.model).__name__} (fx could not trace it: " \
                                                    f"{self.graph.reason})"
        self.fallbacks.append(f"{where}: {rule.label}")
        warnings.warn(f"hfopt: no closed-form curvature rule for {rule.label}; using the torch.func fallback "
                      "for it (exact, slower)", stacklevel=5)  # the caller of GGN(...)/Hessian(...)

    def _fuse(self) -> None:
        """Replace runs ``Conv(data) -> BatchNorm -> ReLU -> MaxPool``,
        ``BatchNorm -> ReLU -> MaxPool`` and ``ReLU -> MaxPool`` whose
        intermediate values feed nothing else by one fused rule
        (:mod:`hfopt.rules.fused`)."""
        uses: Dict[int, int] = {}
        for step in self.steps:
            for r in step.refs:
                if r is not None:
                    uses[r] = uses.get(r, 0) + 1
        by_node = {step.node: step for step in self.steps}

        def producer(step: _Step, cls: type) -> Optional[_Step]:
            if len(step.refs) != 1 or not step.active[0]:
                return None
            prev = by_node.get(step.refs[0])
            if prev is None or type(prev.rule) is not cls or uses.get(prev.node) != 1 \
                    or prev.node == self.graph.output.index:
                return None
            return prev

        def producer_conv_on_data(bn: _Step) -> Optional[_Step]:
            """A convolution of the data (no direction) feeding a train-mode BatchNorm."""
            rule = bn.rule
            if not (rule.batch_stats and rule.xh is not None and len(bn.refs) == 1):
                return None
            prev = by_node.get(bn.refs[0])
            if prev is None or type(prev.rule) is not ConvRule or uses.get(prev.node) != 1 or any(prev.active):
                return None
            conv = prev.rule
            if "weight" not in prev.params or conv.groups != 1 or conv.dim not in (1, 2):
                return None
            return prev

        removed = set()
        for step in self.steps:
            # The fused rules index [N, C, positions]: batched inputs only (an
            # unbatched [C, H, W] map would be read as N=C, C=H).
            if type(step.rule) is not MaxPoolRule or step.rule.idx.dim() != 4:
                continue
            relu = producer(step, ReLURule)
            if relu is None:
                continue
            bn = producer(relu, BatchNormRule)
            conv = producer_conv_on_data(bn) if bn is not None else None
            if conv is not None:
                step.rule = DataConvBNReLUMaxPoolRule(conv.rule, bn.rule, relu.rule, step.rule)
                step.refs, step.active = conv.refs, conv.active
                step.params = {**{f"conv.{n}": i for n, i in conv.params.items()},
                               **{f"bn.{n}": i for n, i in bn.params.items()}}
                removed.update((relu.node, bn.node, conv.node))
            elif bn is not None:
                step.rule = BNReLUMaxPoolRule(bn.rule, relu.rule, step.rule)
                step.refs, step.active, step.params = bn.refs, bn.active, bn.params
                removed.update((relu.node, bn.node))
            else:
                step.rule = ReLUMaxPoolRule(relu.rule, step.rule)
                step.refs, step.active = relu.refs, relu.active
                removed.add(relu.node)
        self.steps = [step for step in self.steps if step.node not in removed]

    def _last_step_use(self) -> Dict[int, int]:
        last: Dict[int, int] = {}
        for k, step in enumerate(self.steps):
            for r in step.refs:
                if r is not None:
                    last[r] = k
        return last

    # ---------------------------------------------------------------- sweeps
    def _jvp_sweep(self, v: Vector, keep: bool) -> Dict[int, Optional[Tensor]]:
        dirs: Dict[int, Optional[Tensor]] = {i: v[idx] for i, idx in self._param_nodes.items()}
        out_node = self.graph.output.index
        for k, step in enumerate(self.steps):
            din = [dirs.get(r) if (r is not None and a) else None for r, a in zip(step.refs, step.active)]
            dpar = {n: v[idx] for n, idx in step.params.items()}
            dirs[step.node] = step.rule.jvp(din, dpar) if (dpar or any(d is not None for d in din)) else None
            if not keep:
                for r in step.refs:
                    if r is not None and r != out_node and self._last_step.get(r) == k:
                        dirs.pop(r, None)
        return dirs

    def _backward_sweep(self, h_out: Tensor, dirs: Optional[Dict[int, Optional[Tensor]]],
                        v: Optional[Vector], store_gradients: bool = False) -> Vector:
        cot: Dict[int, Tensor] = {self.graph.output.index: h_out}
        grads: List[Optional[Tensor]] = [None] * len(self.params)
        for step in reversed(self.steps):
            h = cot.pop(step.node, None)
            need_par = tuple(step.params)
            if store_gradients and step.residual and h is not None:
                step.gradient = h
            if dirs is not None and step.residual:
                din = [dirs.get(r) if (r is not None and a) else None for r, a in zip(step.refs, step.active)]
                dpar = {n: v[idx] for n, idx in step.params.items()}
                gin, gpar = step.rule.hessian_vjp(h, step.gradient, din, dpar, step.active, need_par)
            elif h is None:
                continue
            else:
                gin, gpar = step.rule.vjp(h, step.active, need_par)
            for r, a, t in zip(step.refs, step.active, gin):
                if a and t is not None:
                    cot[r] = add_optional(cot.get(r), t)
            for n, t in gpar.items():
                idx = step.params[n]
                grads[idx] = add_optional(grads[idx], t)
        for i, idx in self._param_nodes.items():
            if i in cot:
                grads[idx] = add_optional(grads[idx], cot[i])
        # Channels-last weight cotangents leave in the parameters' own layout.
        return [torch.zeros_like(p) if g is None else g.reshape(p.shape).to(p.dtype).contiguous()
                for p, g in zip(self.params, grads)]

    def _first_order(self) -> Vector:
        for step in self.steps:
            step.residual = step.rule.has_residual()
        if not self._output_active:
            return [torch.zeros_like(p) for p in self.params]
        with torch.no_grad(), self._exact_dtypes():
            grads = self._backward_sweep(self._compute(self.loss_curvature.grad()), None, None, store_gradients=True)
        for step in self.steps:
            # A step whose output never reaches the loss (a dead branch) has a
            # zero gradient, hence a zero residual: nothing to add, nothing to store.
            if step.residual and step.gradient is None:
                step.residual = False
        return grads

    # ---------------------------------------------------------------- public
    def gradient(self) -> Vector:
        """dLoss/dParameters at the cached point, by the same rules."""
        if self._global_gradient is None:
            self._global_gradient = self._sum_over_ranks(self._local_gradient)
        return [g.clone() for g in self._global_gradient]

    def _local_gradient(self) -> Vector:
        if self._gradient is None:
            if not self._output_active:
                self._gradient = [torch.zeros_like(p) for p in self.params]
            else:
                with torch.no_grad(), self._exact_dtypes():
                    self._gradient = self._backward_sweep(self._compute(self.loss_curvature.grad()), None, None)
        return self._gradient

    def _sum_over_ranks(self, compute: Callable[[], Vector]) -> Vector:
        """``compute()``, summed over the ranks (one flat all-reduce) when data-parallel."""
        return compute() if self._dp is None else self._dp.sum_vectors(compute, self.params)

    def matvec(self, v: Sequence[Tensor]) -> Vector:
        """The curvature times ``v`` (a list shaped like the parameters)."""
        return self._product(self._check(v), self.residuals)

    def _product(self, v: Vector, residuals: bool) -> Vector:
        if not self._output_active:
            return [torch.zeros_like(p) for p in self.params]
        return self._sum_over_ranks(lambda: self._local_product(v, residuals))

    def _local_product(self, v: Vector, residuals: bool) -> Vector:
        if self.compile:
            return compiled.product(_sweeps, self, v, residuals)
        return _sweeps(self, v, residuals)

    def diagonal_estimate(self, samples: int = 1, generator: Optional[torch.Generator] = None) -> Vector:
        """Unbiased estimate of the Gauss-Newton diagonal from ``samples`` backward
        sweeps of ``s ~ H_out^{1/2}`` (Monte-Carlo Gauss-Newton): non-negative,
        one backward sweep per sample, defined with train-mode BatchNorm where
        per-example gradients are not.  Losses without a closed form use
        Hutchinson's ``v * (G v)`` (may be negative: clamp before use)."""
        if samples < 1:
            raise ValueError(f"hfopt: samples must be >= 1, got {samples}")
        total = [torch.zeros_like(p) for p in self.params]
        if not self._output_active:
            return total
        # Data-parallel: each rank samples its shard independently and the
        # ranks' sweeps are summed *before* squaring, as one process would.
        own = generator if self._dp is None else self._dp.rank_generator(generator, self.params[0].device)
        with torch.no_grad(), self._exact_dtypes():
            for _ in range(samples):
                if self.loss_curvature.closed_form:
                    s = self._compute(self.loss_curvature.sample_sqrt(own))
                    contrib = [g * g for g in self._sum_over_ranks(lambda: self._backward_sweep(s, None, None))]
                else:
                    v = [torch.randint(0, 2, p.shape, generator=generator, device=p.device).to(p.dtype) * 2 - 1
                         for p in self.params]
                    contrib = [a * b for a, b in zip(v, self._product(v, residuals=False))]
                for t, c in zip(total, contrib):
                    t.add_(c)
        return [t / samples for t in total]

def _sweeps(op: CurvatureOperator, v: Vector, residuals: bool) -> Vector:
    """One product: the JVP sweep, the loss's output Hessian, the transposed
    sweep (with the residuals for the Hessian).  A function of the operator, so
    that ``compile=True`` compiles it once for every operator of a model."""
    with torch.no_grad(), op._exact_dtypes():
        v = [op._layout(op._compute(t)) for t in v]
        dirs = op._jvp_sweep(v, keep=residuals)
        d_out = dirs.get(op.graph.output.index)
        if d_out is None:
            d_out = torch.zeros_like(op.output)
        u = op.loss_curvature.hvp(op._to_params_dtype(d_out))
        return op._backward_sweep(op._compute(u), dirs if residuals else None, v)


def _hooks_only_read(module: nn.Module, rule: Rule, x: Tensor, active: List[bool], frozen: Callable) -> bool:
    """Whether the hooks of ``module`` (ones fx could not trace) leave its values
    alone at this point: each is called once, on the engine's input and on the
    output of a copy of ``rule``, and must return None.  A hook that returns a
    value makes the layer and its hooks one fallback node."""
    probe = copy.copy(rule)
    probe.setup(active, ())
    y = probe.forward([x], {n: frozen(getattr(module, n, None)) for n in rule.param_names})
    pre = list(module_hooks._global_forward_pre_hooks.values()) + list(module._forward_pre_hooks.values())
    post = list(module_hooks._global_forward_hooks.values()) + list(module._forward_hooks.values())
    if module._forward_pre_hooks_with_kwargs or module._forward_hooks_with_kwargs:
        return False
    return all(h(module, (x,)) is None for h in pre) and all(h(module, (x,), y) is None for h in post)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has one flag per device kind
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _autocast_dtype(device_type: str, param_dtype: torch.dtype) -> Optional[torch.dtype]:
    """The dtype the products run in: the active ``torch.autocast`` dtype for
    the parameters' device when one is enabled at build, else None (the
    parameters' own)."""
    if not _autocast_enabled(device_type):
        return None
    if hasattr(torch, "get_autocast_dtype"):
        dtype = torch.get_autocast_dtype(device_type)
    else:  # torch < 2.4
        dtype = torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()
    return None if dtype == param_dtype else dtype


def _channels_last(asked: Optional[bool], device_type: str, dtype: torch.dtype) -> bool:
    """Whether 2-D convolutions run channels-last (:mod:`hfopt.rules.conv`).
    ``None`` picks it for float32 and bfloat16 on the CPU, where oneDNN was
    measured faster; not for float64 (no oneDNN kernel), and not on CUDA, where
    the fused Triton BatchNorm kernels read ``[N, C, M]``-contiguous tensors and
    would copy channels-last ones."""
    if asked is not None:
        if not isinstance(asked, bool):
            raise TypeError(f"hfopt: channels_last must be True, False or None, got {type(asked).__name__}")
        return asked
    return device_type == "cpu" and dtype in (torch.float32, torch.bfloat16)


def _check_dtypes(named: List) -> None:
    for name, p in named:
        if p.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"hfopt: parameter '{name}' is {p.dtype}; curvature products need float32 or float64 "
                            "parameters (convert the model with model.float())")


def _check_inputs(inputs: tuple, param: Tensor) -> None:
    """Floating-point inputs must match the parameters' dtype and device:
    otherwise the first layer fails deep inside a rule with an ATen message."""
    for k, t in enumerate(inputs):
        if not isinstance(t, Tensor):
            continue
        if t.device != param.device:
            raise ValueError(f"hfopt: input {k} is on {t.device}, the model's parameters on {param.device}")
        if t.is_floating_point() and t.dtype != param.dtype:
            raise ValueError(f"hfopt: input {k} has dtype {t.dtype}, the model's parameters {param.dtype}; convert "
                             "one of them")


class GGN(CurvatureOperator):
    """Generalized Gauss-Newton ``J^T H_out J`` of ``loss_fn(model(inputs), targets)``."""

    residuals = False


class Hessian(CurvatureOperator):
    """The full Hessian of ``loss_fn(model(inputs), targets)`` w.r.t. the parameters."""

    residuals = True


def GGN_or_Hessian(kind: str) -> type:
    """``"ggn"`` -> :class:`GGN`, ``"hessian"`` -> :class:`Hessian`."""
    if kind == "ggn":
        return GGN
    if kind == "hessian":
        return Hessian
    raise ValueError(f"hfopt: curvature must be 'ggn' or 'hessian', got {kind!r}")


Operator = Union[GGN, Hessian]
