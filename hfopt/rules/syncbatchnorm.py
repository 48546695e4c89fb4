"""``nn.SyncBatchNorm`` in train mode: BatchNorm over the global batch.

The statistics are those of all ranks' samples together, so every per-channel
reduction the BatchNorm rule makes -- the mean and variance in the forward
cache, ``<t>`` and ``<xh t>`` in each product -- becomes a sum over all ranks'
values (one all-reduce of ``2C`` numbers) divided by the global count ``M``.
The elementwise passes stay local.  Per-channel *parameter* contributions
(``dgamma``, ``dbeta`` and gamma's residual) come out of these global
reductions already summed over the ranks; each rank keeps its share
``m_local / M`` of them, because the engine sums every parameter-space vector
over the ranks afterwards.

Cotangents entering the rule must be those of the global objective (each rank's
loss scaled by its weight, see :mod:`hfopt.distributed`), which the data-parallel
operators arrange.  The rule is exact: the distributed tests compare it with the
single-process BatchNorm on the concatenated batch.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .batchnorm import BatchNormRule


def _group(module: nn.SyncBatchNorm) -> Any:
    return module.process_group if module.process_group is not None else dist.group.WORLD


def synchronises(module: nn.Module) -> bool:
    """Whether ``module`` is a SyncBatchNorm that normalises across ranks now:
    PyTorch's own condition (train mode, batch statistics, an initialized group
    of more than one rank)."""
    if not isinstance(module, nn.SyncBatchNorm):
        return False
    batch_stats = module.training or module.running_mean is None
    return bool(module.training and batch_stats and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(_group(module)) > 1)


def sync_batchnorm_rule(module: nn.SyncBatchNorm) -> BatchNormRule:
    """The rule for a SyncBatchNorm: the cross-rank rule where it synchronises,
    else the ordinary BatchNorm rule (what the module then computes)."""
    if synchronises(module):
        return SyncBatchNormRule(module.eps, _group(module))
    return BatchNormRule.from_module(module)


class SyncBatchNormRule(BatchNormRule):
    """Train-mode BatchNorm whose statistics span the ranks of ``group``."""

    def __init__(self, eps: float, group: Any):
        super().__init__(eps, batch_stats=True)
        self.group = group

    def _kernels(self, t: Tensor) -> bool:
        return False  # the fused kernels reduce over local values only

    def _all_reduce(self, t: Tensor) -> Tensor:
        dist.all_reduce(t, group=self.group)
        return t

    def _normalize(self, x: Tensor, beta: Optional[Tensor]):
        # Two passes (mean, then centred squares), as exact as the one-process
        # kernel: E[x^2] - mean^2 would cancel in float32.
        local = self.m
        first = self._all_reduce(torch.cat([x.sum(self.dims), x.new_full((1,), float(local))]))
        self.m = int(round(float(first[-1])))
        mean = first[:-1] / self.m
        centred = x - self._c(mean)
        var = self._all_reduce(centred.pow(2).sum(self.dims)) / self.m
        self.invstd = torch.rsqrt(var + self.eps)
        self.share = local / self.m
        return centred * self._c(self.invstd), None

    def _bn_backward(self, t: Tensor, u: Tensor, scale: Optional[Tensor], mask):
        """``scale (t - <t> - u <u t>)`` with global means, and the global sums
        ``sum(t u)``, ``sum(t)``: the local sums in one ATen pass, one all-reduce."""
        _, tu, ts = super()._bn_backward(t, u, None, (False, True, True))
        C = tu.numel()
        tu, ts = self._all_reduce(torch.cat([tu, ts])).split(C)
        out = None
        if mask[0]:
            out = t - self._c(ts / self.m) - u * self._c(tu / self.m)
            if scale is not None:
                out = out * self._c(scale)
        return out, tu, ts

    def vjp(self, g, need_inputs, need_params):
        gx, gp = super().vjp(g, need_inputs, need_params)
        return gx, {k: v * self.share for k, v in gp.items()}

    def coefficients(self, gm, a, stats, dg):
        P, Q, R, S, rgamma = super().coefficients(gm, a, stats, dg)
        return P, Q, R, S, None if rgamma is None else rgamma * self.share
