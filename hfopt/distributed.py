"""Data-parallel Hessian-free on ``torch.distributed``.

Every rank holds the same parameters and its own shard of the global batch.
The objective is the loss of the concatenated global batch.  For a loss with
``reduction="mean"`` that is the count-weighted mean of the per-rank losses,

    L = sum_r (n_r / N) L_r,        N = sum_r n_r,

so unequal shards are weighted right; for ``reduction="sum"`` it is the plain
sum.  Each rank scales its share (the loss, its gradient, its output Hessian)
by its weight ``n_r / N`` (or 1) before it enters any sweep, and every
parameter-space vector (gradient, ``Gv``, ``Hv``, a backward sweep of the
diagonal estimate) is then a *sum* over ranks: one all-reduce of one flat
buffer per vector (bucketed above :data:`BUCKET_BYTES`).  Scaling before the
sweep, not after, is what makes ``nn.SyncBatchNorm`` exact: its cross-rank
reductions then combine cotangents of the global objective.

Every quantity a decision depends on -- the gradient, each curvature product,
the preconditioner's diagonal, each trial loss -- arrives on every rank as the
same all-reduced bits, so CG, the damping rule, backtracking and the line
search run identically everywhere without further communication, and the
ranks take bit-identical steps (given the same build of torch on the same kind
of device and thread count).

Failures.  Every HF payload carries one extra *status* slot.  A rank whose
local part of a collective step raises still joins that collective, with a
zero payload and status 1; every rank then sees the failure in the reduced
status, the ranks exchange their error messages, the failing rank re-raises
its own exception and the others raise :class:`RankError` naming it, so every
rank abandons the step together (and ``HFOptimizer.step`` restores its state
on each).  A non-finite loss on one shard needs no protocol: it makes the
reduced loss non-finite on every rank, and every rank rejects the step.  What
the protocol cannot cover -- a rank that dies, or fails between collectives
that are not HF's own (``nn.SyncBatchNorm``'s, DDP's buffer broadcast) --
surfaces on the others as the backend's error: at once when the dead rank's
connections close, at the latest after the process group's ``timeout``.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["RankError", "DataParallel", "SingleProcess", "resolve", "operator_group", "unwrap",
           "ddp_gradient_sync_off", "weighted_loss", "BUCKET_BYTES"]

# Largest all-reduce issued at once: DDP's default bucket (25 MiB).  Larger
# payloads go out as several chunks in flight together.
BUCKET_BYTES = 25 * 2 ** 20
_SHARED = "_hfopt_shared_across_ranks"
_EVERYWHERE = "_hfopt_failed_on_every_rank"


class RankError(RuntimeError):
    """Another rank failed in a collective step; this rank abandoned it too."""


def _is_group(obj: Any) -> bool:
    return dist.is_available() and isinstance(obj, dist.ProcessGroup)


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``DistributedDataParallel`` wraps (any other module unchanged)."""
    from torch.nn.parallel import DistributedDataParallel
    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


def reduction_of(loss_fn: Any) -> str:
    """``"mean"`` or ``"sum"``: how the loss combines samples, hence how the
    ranks' losses combine.  A functional loss (no ``reduction`` attribute) is
    taken to be a mean."""
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"hfopt: data-parallel HF needs a loss with reduction 'mean' or 'sum', got "
                         f"{type(loss_fn).__name__}(reduction={reduction!r})")
    return reduction


def count_of(output: Tensor) -> int:
    """Samples on this rank: the batch dimension of the model's output."""
    return int(output.shape[0]) if output.dim() > 0 else 1


@dataclass(frozen=True)
class Shard:
    """This rank's part of the global batch: ``count`` samples here, ``total``
    on all ranks (known once the counts are reduced).  For a mean the local
    loss is multiplied by ``count`` before the ranks' shares are summed and the
    sum divided by ``total``; a sum is summed as it is."""

    count: int
    mean: bool
    total: int = 0

    @property
    def scale(self) -> float:
        return float(self.count) if self.mean else 1.0

    @property
    def denominator(self) -> float:
        return float(self.total) if self.mean else 1.0

    @property
    def weight(self) -> float:
        """``n_r / N`` (mean) or 1 (sum): this rank's weight in the global objective."""
        return self.scale / self.denominator

    def scaled(self, loss: Tensor) -> Tensor:
        return loss * self.scale if self.mean else loss

    def scaled_gradient(self, grads: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
        """The gradient of the scaled loss from that of the loss (what a closure's
        own ``backward()`` left)."""
        if not self.mean:
            return list(grads)
        return [None if g is None else g * self.scale for g in grads]


# ----------------------------------------------------------------------------- DDP
@contextmanager
def ddp_gradient_sync_off() -> Iterator[None]:
    """While active, every ``DistributedDataParallel`` called runs as under its
    own ``no_sync()``: its reducer neither prepares nor performs a gradient
    all-reduce.  HF takes its gradient with ``torch.autograd.grad``, which never
    reaches the accumulator hooks DDP's reducer waits for, so a reducer left
    armed would fail the next forward ("Expected to have finished reduction in
    the prior iteration"); and a closure that calls ``backward()`` would have
    DDP average the gradient before HF sums it again.  With the reducer off,
    the gradient is reduced exactly once, by HF."""
    from torch.nn.parallel import DistributedDataParallel
    touched: List[Any] = []

    def pre(module: nn.Module, args: tuple) -> None:
        # A global pre-hook runs before DDP's forward reads the flag.
        if isinstance(module, DistributedDataParallel) and module.require_backward_grad_sync:
            module.require_backward_grad_sync = False
            touched.append(module)

    handle = nn.modules.module.register_module_forward_pre_hook(pre)
    try:
        yield
    finally:
        handle.remove()
        for module in touched:
            module.require_backward_grad_sync = True


# ----------------------------------------------------------------------------- collectives
class DataParallel:
    """HF's collectives over one process group, with the failure protocol of
    the module docstring and counters of the time and bytes spent in them."""

    def __init__(self, group: Any, bucket_bytes: int = BUCKET_BYTES):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.bucket_bytes = bucket_bytes
        self.seconds = 0.0    # in HF's all-reduces since the last begin_step()
        self.bytes = 0        # payload bytes this rank sent into them
        self.calls = 0

    def __repr__(self) -> str:
        return f"DataParallel(rank={self.rank}, size={self.size})"

    # -- counters --------------------------------------------------------------------
    def begin_step(self) -> None:
        self.seconds, self.bytes, self.calls = 0.0, 0, 0

    def step_counters(self) -> Dict[str, float]:
        return {"time_communication": self.seconds, "bytes_all_reduced": self.bytes}

    # -- the primitive ---------------------------------------------------------------------
    def _all_reduce_(self, buf: Tensor) -> None:
        """Sum ``buf`` over the ranks in place: one call, or one per bucket with
        all buckets in flight together."""
        t0 = time.perf_counter()
        step = max(1, self.bucket_bytes // buf.element_size())
        if buf.numel() <= step:
            dist.all_reduce(buf, group=self.group)
            self.calls += 1
        else:
            works = [dist.all_reduce(chunk, group=self.group, async_op=True) for chunk in buf.split(step)]
            for work in works:
                work.wait()
            self.calls += len(works)
        self.bytes += buf.numel() * buf.element_size()
        self.seconds += time.perf_counter() - t0

    def _sum(self, payload: Tensor, failure: Optional[BaseException]) -> Tensor:
        """``payload`` summed over the ranks, or every rank raises if any failed."""
        buf = torch.cat([payload.reshape(-1), payload.new_full((1,), 1.0 if failure is not None else 0.0)])
        self._all_reduce_(buf)
        if float(buf[-1]) != 0.0:
            self._raise_shared(failure)
        return buf[:-1]

    def _raise_shared(self, failure: Optional[BaseException]) -> None:
        mine = None if failure is None else f"{type(failure).__name__}: {failure}"
        messages: List[Any] = [None] * self.size
        dist.all_gather_object(messages, (self.rank, mine), group=self.group)
        if failure is not None:
            _mark_shared(failure, everywhere=all(m is not None for _, m in messages))
            raise failure
        failed = "; ".join(f"rank {r}: {m}" for r, m in messages if m is not None)
        error = RankError(f"hfopt: another rank failed in this step ({failed}); every rank abandons the step")
        _mark_shared(error)
        raise error

    def sum_flat(self, compute: Callable[[], Tensor], like: Tensor) -> Tensor:
        """``compute()`` (a flat tensor shaped like ``like``) summed over the ranks.
        A rank whose ``compute`` raises joins the all-reduce with status 1."""
        try:
            local, failure = compute(), None
        except Exception as exc:  # noqa: BLE001 -- every failure must reach the other ranks
            if _is_shared(exc):
                raise
            local, failure = torch.zeros_like(like), exc
        return self._sum(local.reshape(-1), failure)

    def sum_vectors(self, compute: Callable[[], Sequence[Tensor]], like: Sequence[Tensor]) -> List[Tensor]:
        """A parameter-shaped list summed over the ranks: one flat buffer."""
        template = torch.cat([t.reshape(-1) for t in like]) if like else torch.zeros(0)
        out = self.sum_flat(lambda: torch.cat([t.reshape(-1) for t in compute()]), template)
        return [piece.view_as(t) for piece, t in zip(out.split([t.numel() for t in like]), like)]

    def share_failure(self, exc: BaseException, size: int, like: Tensor) -> None:
        """Called on a rank whose local part raised ``exc`` before it reached the
        collective of ``size`` elements (``like``'s dtype and device) that the other
        ranks are waiting in: joins it with status 1 and raises."""
        if not isinstance(exc, Exception) or _is_shared(exc):
            return  # KeyboardInterrupt and the like end the process; a shared failure was agreed already
        self._sum(like.new_zeros(size), exc)

    # -- the optimizer's reductions -----------------------------------------------------------
    def shard(self, outputs: Tensor, loss_module: Any) -> Shard:
        return Shard(count_of(outputs), reduction_of(loss_module) == "mean")

    @staticmethod
    def gradient_size(params: Sequence[Tensor]) -> int:
        return 2 + sum(p.numel() for p in params)

    def sum_loss_and_gradient(self, loss: Tensor, grads: Sequence[Optional[Tensor]], params: Sequence[Tensor],
                              shard: Shard) -> Tuple[float, List[Tensor], Shard]:
        """Global loss and gradient from this rank's scaled loss and the gradient
        of that scaled loss: one all-reduce of ``[scale * loss, count, gradient]``."""
        like = params[0].detach()
        head = torch.stack([shard.scaled(loss.detach().reshape(())).to(like), like.new_tensor(float(shard.count))])
        flat = torch.cat([head] + [(torch.zeros_like(p) if g is None else g.detach()).reshape(-1)
                                   for p, g in zip(params, grads)])
        out = self._sum(flat, None)
        shard = Shard(shard.count, shard.mean, int(round(float(out[1]))))
        if shard.mean:
            out = out / shard.denominator
        pieces = out[2:].split([p.numel() for p in params])
        return float(out[0]), [g.view_as(p) for g, p in zip(pieces, params)], shard

    def sum_loss(self, compute: Callable[[], Tensor], shard: Shard, like: Tensor) -> float:
        """A trial loss of the global batch: one all-reduce of a scalar."""
        out = self.sum_flat(lambda: shard.scaled(compute().detach().reshape(())).to(like).reshape(1),
                            like.new_zeros(1))
        return float(out[0]) / shard.denominator

    def summed_operator(self, op: Any, shard: Shard) -> "_SummedOperator":
        return _SummedOperator(op, self, shard.weight)

    def rank_generator(self, generator: Optional[torch.Generator], device: torch.device) -> torch.Generator:
        """A generator of this rank's own for sampling over its shard, drawn from
        the shared ``generator``: the shared state advances identically on every
        rank (so the optimizer state stays equal), while the ranks' samples stay
        independent (equal samples on all shards would bias the estimate)."""
        seed = int(torch.randint(0, 2 ** 62, (), generator=generator,
                                 device=generator.device if generator is not None else "cpu"))
        local = torch.Generator(device=device)
        local.manual_seed((seed + 0x9E3779B97F4A7C15 * self.rank) % 2 ** 63)
        return local


class SingleProcess:
    """The same interface for one process: no collectives, nothing scaled."""

    group = None
    size, rank = 1, 0

    def begin_step(self) -> None:
        pass

    def step_counters(self) -> Dict[str, float]:
        return {}  # nothing is communicated: no counters to report

    def shard(self, outputs: Tensor, loss_module: Any) -> Shard:
        return Shard(count_of(outputs), False, count_of(outputs))

    @staticmethod
    def gradient_size(params: Sequence[Tensor]) -> int:
        return 0

    def sum_loss_and_gradient(self, loss: Tensor, grads: Sequence[Optional[Tensor]], params: Sequence[Tensor],
                              shard: Shard) -> Tuple[float, List[Optional[Tensor]], Shard]:
        return float(loss.detach()), list(grads), shard

    def share_failure(self, exc: BaseException, size: int, like: Tensor) -> None:
        pass

    def sum_loss(self, compute: Callable[[], Tensor], shard: Shard, like: Tensor) -> float:
        return float(compute())

    def summed_operator(self, op: Any, shard: Shard) -> Any:
        return op


class _SummedOperator:
    """The autograd path's local product, weighted and summed over the ranks."""

    def __init__(self, op: Any, dp: DataParallel, weight: float):
        self.op, self.dp, self.weight = op, dp, weight

    def matvec_flat(self, v: Tensor) -> Tensor:
        return self.dp.sum_flat(lambda: self.op.matvec_flat(v) * self.weight, v)


def _mark_shared(exc: BaseException, everywhere: bool = False) -> None:
    try:
        setattr(exc, _SHARED, True)
        setattr(exc, _EVERYWHERE, everywhere)
    except AttributeError:  # an exception type without a __dict__
        pass


def _is_shared(exc: BaseException) -> bool:
    return isinstance(exc, RankError) or getattr(exc, _SHARED, False)


def partial_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure the ranks agreed on that some ranks did not
    have: they cannot fall back to another path on their own, only abandon the
    step together.  (A failure on every rank leaves each its own error.)"""
    return _is_shared(exc) and not getattr(exc, _EVERYWHERE, False)


# ----------------------------------------------------------------------------- resolving groups
ProcessGroupArg = Union[None, bool, Any]


def resolve(process_group: ProcessGroupArg) -> Union[DataParallel, SingleProcess]:
    """The optimizer's ``process_group`` argument: ``None`` -- data-parallel over
    the default group when one of more than one rank is initialized; a
    ``ProcessGroup`` -- over that group; ``False`` -- one process, whatever is
    initialized."""
    if process_group is None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return DataParallel(dist.group.WORLD)
        return SingleProcess()
    if process_group is False:
        return SingleProcess()
    return _explicit(process_group, "process_group")


def _explicit(process_group: Any, name: str) -> Union[DataParallel, SingleProcess]:
    if not _is_group(process_group):
        raise TypeError(f"hfopt: {name} must be a torch.distributed ProcessGroup (e.g. "
                        f"torch.distributed.group.WORLD), None or False, got {type(process_group).__name__}")
    if not dist.is_initialized():
        raise ValueError(f"hfopt: {name} was given but torch.distributed is not initialized "
                         "(call torch.distributed.init_process_group first)")
    group = DataParallel(process_group)
    return group if group.size > 1 else SingleProcess()


def operator_group(model: nn.Module, process_group: Any) -> Optional[DataParallel]:
    """The curvature operators' ``process_group``: ``None`` (one process), a
    ``ProcessGroup`` or a :class:`DataParallel` (an optimizer's).  A model whose SyncBatchNorm layers synchronise across ranks has no
    single-process curvature, so it needs a group."""
    if isinstance(process_group, DataParallel):  # the optimizer's own: its counters include the operator's
        return process_group
    dp = None if process_group is None else _explicit(process_group, "process_group")
    dp = dp if isinstance(dp, DataParallel) else None
    if dp is None:
        from .rules.syncbatchnorm import synchronises
        for name, module in model.named_modules():
            if synchronises(module):
                raise ValueError(f"hfopt: SyncBatchNorm layer '{name}' normalises with statistics of all ranks; "
                                 "pass process_group= (e.g. torch.distributed.group.WORLD) so the curvature "
                                 "is that of the global batch")
    return dp


# ----------------------------------------------------------------------------- the operators' loss
class WeightedLoss:
    """A rank's :class:`~hfopt.losses.LossCurvature` scaled by its weight in the
    global objective; ``value`` is the loss of the global batch."""

    def __init__(self, inner: Any, weight: float, value: Tensor):
        self.inner, self.weight, self.value = inner, weight, value
        self.output = inner.output
        self.closed_form = inner.closed_form

    def grad(self) -> Tensor:
        return self.inner.grad() * self.weight

    def hvp(self, u: Tensor) -> Tensor:
        return self.inner.hvp(u) * self.weight

    def sample_sqrt(self, generator: Optional[torch.Generator] = None) -> Tensor:
        return self.inner.sample_sqrt(generator) * math.sqrt(self.weight)


def weighted_loss(dp: DataParallel, inner: Any, loss_fn: Any, like: Tensor) -> WeightedLoss:
    """This rank's LossCurvature ``inner`` as its share of the global objective:
    one all-reduce of ``[scale * loss, count]`` in ``like``'s dtype and device
    (what a failing rank sends too, see :meth:`DataParallel.share_failure`)."""
    shard = Shard(count_of(inner.output), reduction_of(loss_fn) == "mean")
    payload = torch.stack([shard.scaled(inner.value.detach()).to(like), like.new_tensor(float(shard.count))])
    out = dp._sum(payload, None)
    shard = Shard(shard.count, shard.mean, int(round(float(out[1]))))
    return WeightedLoss(inner, shard.weight, (out[0] / shard.denominator).reshape(()))
