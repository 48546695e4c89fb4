"""nn.Linear / F.linear: ``y = x W^T + b``.

The only second derivative is the mixed input-weight one: ``d2y/dx dW`` is a
constant, so the residual is ``g dW`` towards the input and ``g^T dx`` towards
the weight.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .base import Grads, Rule


class LinearRule(Rule):
    param_names = ("weight", "bias")

    @classmethod
    def from_module(cls, module: nn.Linear) -> "LinearRule":
        return cls()

    def forward(self, inputs: Sequence[Tensor], params: Mapping[str, Optional[Tensor]]) -> Tensor:
        x = inputs[0]
        self.weight = params["weight"]
        self.has_bias = params.get("bias") is not None
        # x is needed for the weight's products only.
        self.x = x if "weight" in self.trainable else None
        self.in_shape = x.shape
        return torch.nn.functional.linear(x, self.weight, params.get("bias"))

    def jvp(self, din: Sequence[Optional[Tensor]], dparams: Mapping[str, Tensor]) -> Tensor:
        out = None
        if din[0] is not None:
            out = din[0].matmul(self.weight.t())
        dw = dparams.get("weight")
        if dw is not None:
            t = self.x.matmul(dw.t())
            out = t if out is None else out.add_(t)
        db = dparams.get("bias")
        if db is not None:
            out = db.expand(*self.in_shape[:-1], db.shape[0]).clone() if out is None else out.add_(db)
        return out

    def vjp(self, g: Tensor, need_inputs: Sequence[bool], need_params: Sequence[str]) -> Grads:
        gx = g.matmul(self.weight) if need_inputs[0] else None
        gp = {}
        if "weight" in need_params:
            gp["weight"] = g.reshape(-1, g.shape[-1]).t().matmul(self.x.reshape(-1, self.x.shape[-1]))
        if "bias" in need_params:
            gp["bias"] = g.reshape(-1, g.shape[-1]).sum(0)
        return [gx], gp

    def has_residual(self) -> bool:
        return "weight" in self.trainable and self.active[0]

    def residual(self, g, din, dparams, need_inputs, need_params) -> Grads:
        dw = dparams.get("weight")
        rx = g.matmul(dw) if (need_inputs[0] and dw is not None) else None
        rp = {}
        if "weight" in need_params and din[0] is not None:
            rp["weight"] = g.reshape(-1, g.shape[-1]).t().matmul(din[0].reshape(-1, din[0].shape[-1]))
        return [rx], rp
