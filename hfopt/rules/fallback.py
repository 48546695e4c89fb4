"""The generic rule: exact products of any layer from torch.func.

Used, with a warning naming the type, for a module or function no closed-form
rule covers.  JVP is forward mode, the transposed product reverse mode, and the
residual reverse-over-reverse (forward-over-reverse through train-mode
BatchNorm returns a wrong mixed term in some torch versions).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .base import Grads, Rule
from .shape import substitute


def module_function(module: nn.Module, args: tuple, kwargs: dict) -> Callable:
    """``f(inputs, params)`` calling ``module`` functionally.  Buffers are cloned
    inside the call: a train-mode BatchNorm updates them in place, which the
    module's real buffers must not see and torch.func refuses on captured ones."""
    buffers = {k: b.detach().clone() for k, b in module.named_buffers()}  # the state at build
    # An in-place module (nn.Hardswish(inplace=True)) would overwrite the input
    # the rule caches and differentiates at: it gets a copy.
    inplace = getattr(module, "inplace", False) is True

    def f(inputs: Sequence[Tensor], params: Mapping[str, Tensor]) -> Tensor:
        state = {k: b.clone() for k, b in buffers.items()}
        state.update(params)
        if inplace:
            inputs = [t.clone() for t in inputs]
        return torch.func.functional_call(module, state, substitute(args, inputs), substitute(kwargs, inputs))

    return f


def call_function(target: Callable, args: tuple, kwargs: dict) -> Callable:
    def f(inputs: Sequence[Tensor], params: Mapping[str, Tensor]) -> Tensor:
        return target(*substitute(args, inputs), **substitute(kwargs, inputs))

    return f


class UnsupportedLayerError(RuntimeError):
    """A layer served by the fallback lacks a derivative the products need."""


# (label, input shapes and dtypes, second order): fallbacks already probed.
_PROBED: set = set()


class FallbackRule(Rule):
    def __init__(self, fn: Callable, param_names: Sequence[str], label: str):
        self.fn = fn
        self.param_names = tuple(param_names)
        self.label = label

    def forward(self, inputs, params) -> Tensor:
        self.inputs = list(inputs)
        self.params = dict(params)
        self.diff_in = [i for i, a in enumerate(self.active) if a]
        self.diff_par = [n for n in self.param_names if n in self.trainable]
        self._vjp = None
        self._g = None
        # A random layer (nn.Dropout2d or RReLU in training, noise in a custom
        # forward) must draw the same numbers in every re-evaluation below as in
        # this forward, which drew them from the global generators in the
        # model's own order: remember their state here, replay it in _call.
        devices = sorted({t.device.index or 0 for t in list(self.inputs) + list(self.params.values())
                          if isinstance(t, Tensor) and t.device.type == "cuda"})
        self._rng = (devices, torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices])
        out = self.fn([t.contiguous() if isinstance(t, Tensor) else t for t in self.inputs], self.params)
        if not isinstance(out, Tensor):
            raise TypeError(f"hfopt: {self.label} returned {type(out).__name__}; only single-tensor outputs are supported")
        return out

    def probe(self, second_order: bool) -> None:
        """Apply every product this operator will need once, at the build point,
        so that a derivative torch lacks (``hardsigmoid_backward`` has no forward
        derivative in some versions) raises here, naming the layer, and never
        from inside a product.  Done once per layer type and input shape."""
        key = (self.label, second_order, tuple((tuple(t.shape), t.dtype, t.device.type) for t in self._primals()))
        if key in _PROBED:
            return
        din = [torch.ones_like(t) if i in self.diff_in else None for i, t in enumerate(self.inputs)]
        dpar = {n: torch.ones_like(self.params[n]) for n in self.diff_par}
        need_in, need_par = [i in self.diff_in for i in range(len(self.inputs))], tuple(self.diff_par)
        try:
            out = self.jvp(din, dpar)
            self.vjp(torch.ones_like(out), need_in, need_par)
            if second_order:
                self.residual(torch.ones_like(out), din, dpar, need_in, need_par)
        except (RuntimeError, NotImplementedError) as exc:
            order = "twice (the Hessian's residual)" if second_order else "(forward and reverse mode)"
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnsupportedLayerError(
                f"hfopt: {self.label} has no closed-form rule, and torch cannot differentiate it {order} for the "
                f"fallback: {reason}") from exc
        finally:
            self._vjp = None  # the probe's reverse graph is not the products'
        _PROBED.add(key)

    def _of_diff(self, *diff: Tensor) -> Tensor:
        """The layer as a function of its differentiable arguments alone."""
        inputs = list(self.inputs)
        params = dict(self.params)
        k = len(self.diff_in)
        for i, t in zip(self.diff_in, diff[:k]):
            inputs[i] = t
        params.update(zip(self.diff_par, diff[k:]))
        return self._call(inputs, params)

    def _call(self, inputs, params) -> Tensor:
        """``fn`` with the random draws of the forward (the global generators are
        left as they were)."""
        devices, cpu, cuda = self._rng
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(cpu)
            for d, state in zip(devices, cuda):
                torch.cuda.set_rng_state(state, d)
            # The layer's own code may view() its input: give it the layout it
            # was written for, not the engine's channels-last one.
            return self.fn([t.contiguous() if isinstance(t, Tensor) else t for t in inputs], params)

    def _primals(self) -> List[Tensor]:
        return [self.inputs[i] for i in self.diff_in] + [self.params[n] for n in self.diff_par]

    def _tangents(self, din, dparams) -> List[Tensor]:
        prim = self._primals()
        ds = [din[i] for i in self.diff_in] + [dparams.get(n) for n in self.diff_par]
        return [torch.zeros_like(p) if d is None else d for p, d in zip(prim, ds)]

    def _split(self, grads: Sequence[Tensor], need_inputs, need_params) -> Grads:
        k = len(self.diff_in)
        gin: List[Optional[Tensor]] = [None] * len(self.inputs)
        for i, t in zip(self.diff_in, grads[:k]):
            if need_inputs[i]:
                gin[i] = t
        gp: Dict[str, Tensor] = {n: t for n, t in zip(self.diff_par, grads[k:]) if n in need_params}
        return gin, gp

    def jvp(self, din, dparams) -> Tensor:
        with torch.enable_grad():
            return torch.func.jvp(self._of_diff, tuple(self._primals()), tuple(self._tangents(din, dparams)))[1]

    def vjp(self, g, need_inputs, need_params) -> Grads:
        if self._vjp is None:
            with torch.enable_grad():
                _, self._vjp = torch.func.vjp(self._of_diff, *self._primals())
        with torch.enable_grad():
            return self._split(self._vjp(g), need_inputs, need_params)

    def has_residual(self) -> bool:
        return bool(self.diff_in or self.diff_par)

    def residual(self, g, din, dparams, need_inputs, need_params) -> Grads:
        def grad_phi(*p):
            return torch.func.vjp(self._of_diff, *p)[1](g)

        with torch.enable_grad():
            _, second = torch.func.vjp(grad_phi, *self._primals())
            return self._split(second(tuple(self._tangents(din, dparams))), need_inputs, need_params)
