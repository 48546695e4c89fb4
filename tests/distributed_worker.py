"""One rank of a distributed test: ``python tests/distributed_worker.py SCENARIOS RANK WORLD INIT_FILE OUT_DIR``
(SCENARIOS: comma-separated names, run in order in one process group).

Started by tests/test_distributed.py (gloo, CPU, float64, one thread per
rank).  Each scenario computes what the tests compare and saves it to
``OUT_DIR/rank<RANK>.pt``; rank 0 also computes the single-process references
on the concatenated global batch.  Several checks share one process group so
the suite starts few of them.
"""
from __future__ import annotations

import copy
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conftest  # noqa: E402  (autograd references)

import hfopt  # noqa: E402
from hfopt.distributed import RankError  # noqa: E402


# ----------------------------------------------------------------------------- the stand-in
class GlooSyncBatchNorm(nn.SyncBatchNorm):
    """Test-only stand-in for ``nn.SyncBatchNorm``'s forward, whose own forward
    refuses CPU tensors: global batch statistics by differentiable gloo
    all-reduces (two passes), running statistics updated as PyTorch does.  It
    *is* a SyncBatchNorm and declares that its forward computes SyncBatchNorm's,
    so hfopt gives it the cross-rank rule (and checks the outputs agree)."""

    hfopt_same_forward = True

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                self.training, self.momentum, self.eps)
        dims = [0] + list(range(2, x.dim()))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        first = dist_nn.all_reduce(torch.cat([x.sum(dims), x.new_full((1,), x.numel() / x.shape[1])]))
        m = first[-1]
        mean = first[:-1] / m
        centred = x - mean.view(shape)
        var = dist_nn.all_reduce(centred.pow(2).sum(dims)) / m
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        with torch.no_grad():
            k = self.momentum
            self.running_mean.mul_(1 - k).add_(mean.detach(), alpha=k)
            self.running_var.mul_(1 - k).add_(var.detach() * (m / (m - 1)), alpha=k)
            self.num_batches_tracked += 1
        return y


# ----------------------------------------------------------------------------- models and data
def mlp(bn: Any = None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: List[nn.Module] = [nn.Linear(5, 6)]
    if bn is not None:
        layers.append(bn(6))
    layers += [nn.Tanh(), nn.Linear(6, 3)]
    return conftest.make(nn.Sequential(*layers), seed)


def convnet(bn: Any, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return conftest.make(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), bn(3), nn.ReLU(), nn.Flatten(),
                                       nn.Linear(3 * 4 * 4, 3)), seed)


def data(n: int, shape: Sequence[int], seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n,) + tuple(shape), generator=gen), torch.randint(0, 3, (n,), generator=gen)


def shard(t: Tensor, sizes: Sequence[int], rank: int) -> Tensor:
    return t.split(list(sizes))[rank]


def closure_for(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> Callable:
    def closure():
        outputs = model(x)
        return loss_fn(outputs, y), outputs
    return closure


def params_of(model: nn.Module) -> List[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ----------------------------------------------------------------------------- scenarios
def curvature(rank: int, world: int) -> Dict[str, Any]:
    """GGN/Hessian products, gradient and loss, BN-free, SyncBN rule and per-rank BN."""
    sizes = {2: [5, 7], 3: [3, 5, 4]}[world]
    n = sum(sizes)
    loss_fn = nn.CrossEntropyLoss()
    group = dist.group.WORLD
    out: Dict[str, Any] = {}
    cases = {
        "plain": (lambda: mlp(None), lambda: mlp(None), (5,)),
        "syncbn_mlp": (lambda: mlp(GlooSyncBatchNorm), lambda: mlp(nn.BatchNorm1d), (5,)),
        "syncbn_conv": (lambda: convnet(GlooSyncBatchNorm), lambda: convnet(nn.BatchNorm2d), (2, 4, 4)),
    }
    for name, (build, build_ref, shape) in cases.items():
        model, ref = build(), build_ref()
        x, y = data(n, shape)
        xl, yl = shard(x, sizes, rank), shard(y, sizes, rank)
        v = conftest.rand_vec(model, seed=7)
        res: Dict[str, Any] = {}
        for kind, cls in (("ggn", hfopt.GGN), ("hessian", hfopt.Hessian)):
            op = cls(model, loss_fn, xl, yl, process_group=group)
            res[kind] = op @ v
            res[f"{kind}_loss"] = op.loss.clone()
            res[f"{kind}_gradient"] = op.gradient()
        if rank == 0:
            res["ref_ggn"] = conftest.ref_ggnvp(ref, loss_fn, x, y, v)
            res["ref_hessian"] = conftest.ref_hvp(ref, loss_fn, x, y, v)
            res["ref_gradient"] = conftest.ref_grad(ref, loss_fn, x, y)
            res["ref_loss"] = conftest.ref_loss_output(ref, loss_fn, x, y)[0]
            res["single_ggn"] = hfopt.GGN(ref, loss_fn, x, y) @ v
        out[name] = res
    # Per-rank BatchNorm: the count-weighted mean of the per-shard batch objectives.
    model = mlp(nn.BatchNorm1d)
    x, y = data(n, (5,))
    v = conftest.rand_vec(model, seed=7)
    res = {kind: cls(model, loss_fn, shard(x, sizes, rank), shard(y, sizes, rank), process_group=group) @ v
           for kind, cls in (("ggn", hfopt.GGN), ("hessian", hfopt.Hessian))}
    if rank == 0:
        for kind, ref_fn in (("ggn", conftest.ref_ggnvp), ("hessian", conftest.ref_hvp)):
            parts = [ref_fn(model, loss_fn, shard(x, sizes, r), shard(y, sizes, r), v) for r in range(world)]
            res[f"ref_{kind}"] = [sum(sizes[r] / n * parts[r][i] for r in range(world)) for i in range(len(v))]
    out["per_rank_bn"] = res
    out["diagonal"] = diagonal(rank, sizes)
    out["bucketed"] = bucketed(rank, sizes)
    return out


def diagonal(rank: int, sizes: Sequence[int]) -> Dict[str, Any]:
    """The Monte-Carlo diagonal: each rank's sample, summed over ranks before
    squaring, equals one process's estimate from the concatenated samples."""
    n = sum(sizes)
    loss_fn = nn.CrossEntropyLoss()
    model, ref = mlp(GlooSyncBatchNorm), mlp(nn.BatchNorm1d)
    x, y = data(n, (5,))
    op = hfopt.GGN(model, loss_fn, shard(x, sizes, rank), shard(y, sizes, rank), process_group=dist.group.WORLD)
    drawn: List[Tensor] = []
    inner = op.loss_curvature.inner
    sample = inner.sample_sqrt

    def recording(generator=None):
        s = sample(generator)
        drawn.append(s)
        return s

    inner.sample_sqrt = recording
    gen = torch.Generator().manual_seed(3)
    diag = op.diagonal_estimate(1, gen)
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, drawn[0])
    res: Dict[str, Any] = {"diag": diag, "generator": gen.get_state()}
    if rank == 0:
        # A one-process mean over n samples weights each sample's output Hessian by 1/n;
        # rank r's sample is for its own mean (1/n_r): scale by sqrt(n_r / n).
        s = torch.cat([g * (sizes[r] / n) ** 0.5 for r, g in enumerate(gathered)])
        with conftest.preserved_state(ref):
            z = ref(x)
            js = torch.autograd.grad(z, list(ref.parameters()), s)
        res["ref_diag"] = [t * t for t in js]
        res["samples_differ"] = not torch.equal(gathered[0][:3], gathered[1][:3])
    return res


def bucketed(rank: int, sizes: Sequence[int]) -> Dict[str, Any]:
    """A product through 16-byte buckets equals the one-buffer product."""
    n = sum(sizes)
    model = mlp(None)
    x, y = data(n, (5,))
    op = hfopt.GGN(model, nn.CrossEntropyLoss(), shard(x, sizes, rank), shard(y, sizes, rank),
                   process_group=dist.group.WORLD)
    v = conftest.rand_vec(model, seed=9)
    start = op._dp.calls
    whole = op @ v
    calls_whole = op._dp.calls - start
    op._dp.bucket_bytes = 16
    before = op._dp.calls
    chunked = op @ v
    return {"whole": whole, "chunked": chunked, "calls_whole": calls_whole, "calls_chunked": op._dp.calls - before}


def optimizer(rank: int, world: int) -> Dict[str, Any]:
    """HF steps on 2 ranks against one process on the concatenated batch."""
    sizes = [5, 7]
    n = sum(sizes)
    loss_fn = nn.CrossEntropyLoss()
    x, y = data(n, (5,))
    xl, yl = shard(x, sizes, rank), shard(y, sizes, rank)
    exact = dict(preconditioner=False, cg_max_iterations=20, damping=0.5)
    out: Dict[str, Any] = {}

    def run(model: nn.Module, opt: hfopt.HFOptimizer, steps: int, xs, ys, net=None) -> List[List[Tensor]]:
        trail = []
        for _ in range(steps):
            opt.step(closure_for(model, loss_fn, xs, ys))
            trail.append(params_of(net or model))
        return trail

    # 1. BN-free, exact options: the 2-rank trajectory is the one-process one.
    model = mlp(None)
    opt = hfopt.HFOptimizer(model.parameters(), **exact)
    out["plain"] = run(model, opt, 3, xl, yl)
    out["plain_diag"] = {k: opt.last_step[k] for k in ("accepted", "time_communication", "bytes_all_reduced")}
    out["plain_grad"] = [p.grad.clone() for p in model.parameters()]
    if rank == 0:
        ref = mlp(None)
        ref_opt = hfopt.HFOptimizer(ref.parameters(), process_group=False, **exact)
        ref_grads = []
        trail = []
        for _ in range(3):
            ref_opt.step(closure_for(ref, loss_fn, x, y))
            trail.append(params_of(ref))
            ref_grads.append([p.grad.clone() for p in ref.parameters()])
        out["plain_ref"], out["plain_ref_grad"] = trail, ref_grads[-1]

    # 2. Defaults (preconditioner sampling, warm starts): the ranks stay bitwise equal,
    #    and so do their optimizer states.
    model = mlp(None)
    opt = hfopt.HFOptimizer(model.parameters(), cg_max_iterations=20)
    out["defaults"] = run(model, opt, 3, xl, yl)
    out["defaults_state"] = opt.state_dict()

    # 3. Save on rank 0 after 2 steps, load on every rank, resume: bitwise the uninterrupted run.
    model = mlp(None)
    opt = hfopt.HFOptimizer(model.parameters(), cg_max_iterations=20)
    run(model, opt, 2, xl, yl)
    path = Path(os.environ["HFOPT_TEST_OUT"]) / "checkpoint.pt"
    if rank == 0:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    dist.barrier()
    saved = torch.load(path, weights_only=False)
    model = mlp(None, seed=5)  # different weights: all of them must come from the checkpoint
    model.load_state_dict(saved["model"])
    opt = hfopt.HFOptimizer(model.parameters(), cg_max_iterations=20)
    opt.load_state_dict(saved["optimizer"])
    out["resumed"] = run(model, opt, 1, xl, yl)

    # 4. DDP: the engine follows ddp.module and DDP's reducer never runs.
    from torch.nn.parallel import DistributedDataParallel as DDP
    net = mlp(None)
    ddp = DDP(net)
    hook_calls = [0]

    def counting_hook(state, bucket):
        hook_calls[0] += 1
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    ddp.register_comm_hook(None, counting_hook)
    opt = hfopt.HFOptimizer(ddp.parameters(), **exact)
    out["ddp"] = run(ddp, opt, 3, xl, yl, net=net)
    out["ddp_engine"] = opt.last_step["engine"]
    out["ddp_grad"] = [p.grad.clone() for p in net.parameters()]
    out["ddp_hook_calls"] = hook_calls[0]

    # 5a. A torch.optim-style closure that calls backward() itself, on the DDP model.
    net = mlp(None)
    ddp = DDP(net)
    hook_calls[0] = 0
    ddp.register_comm_hook(None, counting_hook)
    opt = hfopt.HFOptimizer(ddp.parameters(), **exact)

    def backward_closure():
        opt.zero_grad()
        loss = loss_fn(ddp(xl), yl)
        loss.backward()
        return loss

    trail = []
    for _ in range(3):
        opt.step(backward_closure)
        trail.append(params_of(net))
    out["ddp_backward"], out["ddp_backward_hook_calls"] = trail, hook_calls[0]

    # 5b. What keeps a closure that calls backward() reduced once: inside
    #    ddp_gradient_sync_off DDP's reducer does not run and p.grad stays this rank's own.
    net = mlp(None)
    ddp = DDP(net)
    hook_calls[0] = 0
    ddp.register_comm_hook(None, counting_hook)
    with hfopt.distributed.ddp_gradient_sync_off():
        loss_fn(ddp(xl), yl).backward()
    out["guard_inside_calls"] = hook_calls[0]
    out["guard_grad"] = [p.grad.clone() for p in net.parameters()]
    out["guard_own_grad"] = list(torch.autograd.grad(loss_fn(net(xl), yl), list(net.parameters())))
    loss_fn(ddp(xl), yl).backward()
    out["guard_outside_calls"] = hook_calls[0]

    # 6. SyncBatchNorm (stand-in): HF on the global batch's BatchNorm objective.
    model = mlp(GlooSyncBatchNorm)
    opt = hfopt.HFOptimizer(model.parameters(), **exact)
    out["syncbn"] = run(model, opt, 2, xl, yl)
    out["syncbn_engine"] = opt.last_step["engine"]
    if rank == 0:
        ref = mlp(nn.BatchNorm1d)
        ref_opt = hfopt.HFOptimizer(ref.parameters(), process_group=False, **exact)
        out["syncbn_ref"] = run(ref, ref_opt, 2, x, y)
    return out


def failures(rank: int, world: int) -> Dict[str, Any]:
    """A non-finite shard, a raising rank (first call, trial, operator build)."""
    sizes = [6, 6]
    loss_fn = nn.CrossEntropyLoss()
    x, y = data(sum(sizes), (5,))
    xl, yl = shard(x, sizes, rank), shard(y, sizes, rank)
    model = mlp(None)
    opt = hfopt.HFOptimizer(model.parameters(), cg_max_iterations=10)
    out: Dict[str, Any] = {"start": params_of(model)}

    # 1. NaN inputs on rank 1 only: every rank rejects the step together.
    bad = xl.clone()
    if rank == 1:
        bad[0, 0] = float("nan")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(closure_for(model, loss_fn, bad, yl))
    out["nan"] = {"rejected": opt.last_step["rejected"], "params": params_of(model), "step": opt.state["hf"]["step"]}

    # 2. Rank 1's closure raises (a bad input): rank 1 gets its error, rank 0 a RankError naming it.
    def raising(stage_calls: int):
        calls = [0]

        def closure():
            calls[0] += 1
            if rank == 1 and calls[0] == stage_calls:
                raise ValueError("bad input on this shard")
            outputs = model(xl)
            return loss_fn(outputs, yl), outputs
        return closure

    def failing_trials(module, args):
        # Trial evaluations run without gradients (the first call with them).
        if rank == 1 and not torch.is_grad_enabled():
            raise ValueError("bad input on this shard in a trial evaluation")

    state_before = opt.state_dict()
    for name, closure in (("raise_first_call", raising(1)), ("raise_trial", closure_for(model, loss_fn, xl, yl))):
        hook = model[0].register_forward_pre_hook(failing_trials) if name == "raise_trial" else None
        t0 = time.perf_counter()
        try:
            opt.step(closure)
            out[name] = {"error": None}
        except Exception as exc:  # noqa: BLE001 -- recorded for the test
            out[name] = {"error": type(exc).__name__, "message": str(exc), "seconds": time.perf_counter() - t0}
        finally:
            if hook is not None:
                hook.remove()
        out[name]["params"] = params_of(model)
        out[name]["state_equal"] = _optimizer_states_equal(opt.state_dict(), state_before)

    # 3. Rank 1's curvature operator fails to build inside a step: no rank falls back alone.
    forward = hfopt.curvature.CurvatureOperator._forward
    if rank == 1:
        def failing(self, inputs):
            raise ValueError("rule failed on this shard")
        hfopt.curvature.CurvatureOperator._forward = failing
    try:
        opt.step(closure_for(model, loss_fn, xl, yl))
        out["raise_step_build"] = {"error": None}
    except Exception as exc:  # noqa: BLE001
        out["raise_step_build"] = {"error": type(exc).__name__, "message": str(exc)}
    finally:
        hfopt.curvature.CurvatureOperator._forward = forward
    out["raise_step_build"]["params"] = params_of(model)
    out["raise_step_build"]["state_equal"] = _optimizer_states_equal(opt.state_dict(), state_before)

    # 4. A raising operator build (wrong feature count on rank 1).
    xb = torch.randn(4, 7) if rank == 1 else xl
    try:
        hfopt.GGN(model, loss_fn, xb, yl[:len(xb)], process_group=dist.group.WORLD)
        out["raise_build"] = {"error": None}
    except Exception as exc:  # noqa: BLE001
        out["raise_build"] = {"error": type(exc).__name__, "message": str(exc)}

    # 5. Afterwards the ranks still step together.
    opt.step(closure_for(model, loss_fn, xl, yl))
    out["after"] = {"accepted": opt.last_step["accepted"], "params": params_of(model)}
    return out


def dead_rank(rank: int, world: int) -> Dict[str, Any]:
    """Rank 1 dies inside its closure; rank 0 must get an error, not hang."""
    loss_fn = nn.CrossEntropyLoss()
    x, y = data(8, (5,))
    model = mlp(None)
    opt = hfopt.HFOptimizer(model.parameters(), cg_max_iterations=10)

    def closure():
        if rank == 1:
            os._exit(17)
        outputs = model(x)
        return loss_fn(outputs, y), outputs

    t0 = time.perf_counter()
    try:
        opt.step(closure)
        return {"error": None, "seconds": time.perf_counter() - t0}
    except Exception as exc:  # noqa: BLE001
        return {"error": type(exc).__name__, "message": str(exc)[:300], "seconds": time.perf_counter() - t0}


def cuda_syncbn(rank: int, world: int) -> Dict[str, Any]:
    """The real nn.SyncBatchNorm (NCCL, one GPU per rank): products and one HF
    step against one process with BatchNorm on the concatenated batch."""
    dev = torch.device("cuda", rank)
    sizes = [5, 7]
    n = sum(sizes)
    loss_fn = nn.CrossEntropyLoss()
    model, ref = convnet(nn.SyncBatchNorm).to(dev), convnet(nn.BatchNorm2d).to(dev)
    x, y = (t.to(dev) for t in data(n, (2, 4, 4)))
    xl, yl = shard(x, sizes, rank), shard(y, sizes, rank)
    v = [t.to(dev) for t in conftest.rand_vec(model, seed=7)]
    res: Dict[str, Any] = {}
    for kind, cls in (("ggn", hfopt.GGN), ("hessian", hfopt.Hessian)):
        res[kind] = [t.cpu() for t in cls(model, loss_fn, xl, yl, process_group=dist.group.WORLD) @ v]
    exact = dict(preconditioner=False, cg_max_iterations=10, damping=0.5)
    opt = hfopt.HFOptimizer(model.parameters(), **exact)
    opt.step(closure_for(model, loss_fn, xl, yl))
    res["step"] = [p.cpu() for p in params_of(model)]
    if rank == 0:
        res["ref_ggn"] = [t.cpu() for t in conftest.ref_ggnvp(ref, loss_fn, x, y, v)]
        res["ref_hessian"] = [t.cpu() for t in conftest.ref_hvp(ref, loss_fn, x, y, v)]
        ref_opt = hfopt.HFOptimizer(ref.parameters(), process_group=False, **exact)
        ref_opt.step(closure_for(ref, loss_fn, x, y))
        res["ref_step"] = [p.cpu() for p in params_of(ref)]
    return res


def _optimizer_states_equal(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """Equal optimizer state dicts, where a per-parameter entry that is an empty
    dict counts as absent (reading a warm start creates one)."""
    def strip(sd):
        return {**sd, "state": {k: v for k, v in sd["state"].items() if v != {}}}
    return _states_equal(strip(a), strip(b))


def _states_equal(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_states_equal(p, q) for p, q in zip(a, b))
    return a == b


SCENARIOS = {"curvature": curvature, "optimizer": optimizer, "failures": failures, "dead_rank": dead_rank,
             "cuda_syncbn": cuda_syncbn}


def main() -> None:
    scenario, rank, world, init_file, out_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], \
        Path(sys.argv[5])
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    timeout = timedelta(seconds=float(os.environ.get("HFOPT_TEST_PG_TIMEOUT", "60")))
    cuda = scenario.startswith("cuda_")
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timeout)
    os.environ["HFOPT_TEST_OUT"] = str(out_dir)
    try:
        # Several scenarios in one process group: starting groups is the slow part.
        result = {name: SCENARIOS[name](rank, world) for name in scenario.split(",")}
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
    torch.save(result, out_dir / f"rank{rank}.pt")
    # No destroy_process_group barrier: a rank whose peer died must still exit.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
