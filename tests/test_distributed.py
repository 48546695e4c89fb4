"""Data-parallel HF on torch.distributed (gloo, CPU, float64).

The ranks are processes started here (tests/distributed_worker.py, one thread
each, a file rendezvous so no port is needed); each scenario starts one process
group and saves what its ranks computed, which the tests below compare.  Every
launch is bounded by a timeout, so a rank left hanging fails the test instead
of the suite.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
import torch.distributed as dist

from conftest import TOL, assert_same_tensors, record, rel_err

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"



def worker_env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", **extra)
    return env


def launch(tmp: Path, scenario: str, world: int, timeout: float = 100.0, **env: str):
    """Start ``world`` ranks of ``scenario``; returns (return codes, outputs, results per rank)."""
    tmp.mkdir(parents=True, exist_ok=True)
    init = tmp / "rendezvous"
    procs = [subprocess.Popen([sys.executable, str(WORKER), scenario, str(r), str(world), str(init), str(tmp)],
                              cwd=ROOT, env=worker_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in range(world)]
    deadline = time.monotonic() + timeout
    outputs: List[str] = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{scenario}: the ranks did not finish within {timeout:.0f} s (a hang)")
    codes = [p.returncode for p in procs]
    results = [torch.load(tmp / f"rank{r}.pt", weights_only=False) if (tmp / f"rank{r}.pt").exists() else None
               for r in range(world)]
    return codes, outputs, results


def run_ok(tmp: Path, scenario: str, world: int, **kw) -> List[Any]:
    codes, outputs, results = launch(tmp, scenario, world, **kw)
    assert codes == [0] * world, "\n".join(f"--- rank {r} (exit {c})\n{o}" for r, (c, o) in
                                          enumerate(zip(codes, outputs)))
    return results


def bitwise(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-rank group for the curvature, optimizer and failure scenarios."""
    results = run_ok(tmp_path_factory.mktemp("two"), "curvature,optimizer,failures", 2, timeout=150.0)
    return {name: [r[name] for r in results] for name in results[0]}


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    results = run_ok(tmp_path_factory.mktemp("three"), "curvature", 3)
    return {name: [r[name] for r in results] for name in results[0]}


@pytest.fixture(params=[2, 3], ids=["2ranks", "3ranks"])
def curvature(request):
    return request.getfixturevalue({2: "two_ranks", 3: "three_ranks"}[request.param])["curvature"]


@pytest.fixture
def optimizer(two_ranks):
    return two_ranks["optimizer"]


# ----------------------------------------------------------------------------- curvature
@pytest.mark.parametrize("case", ["plain", "syncbn_mlp", "syncbn_conv"])
def test_products_equal_single_process_on_the_concatenated_batch(curvature, case):
    ref = curvature[0][case]
    for rank, res in enumerate(curvature):
        res = res[case]
        for kind in ("ggn", "hessian"):
            err = record(f"distributed-{kind}", rel_err(res[kind], ref[f"ref_{kind}"]))
            assert err < TOL, f"rank {rank} {case} {kind}: {err:.3e}"
            assert rel_err(res[f"{kind}_gradient"], ref["ref_gradient"]) < TOL, (rank, case, kind)
            assert abs(float(res[f"{kind}_loss"]) - float(ref["ref_loss"])) < 1e-12
        assert bitwise(res["ggn"], curvature[0][case]["ggn"]), f"rank {rank} differs from rank 0"
    assert rel_err(ref["ggn"], ref["single_ggn"]) < TOL


def test_per_rank_batchnorm_is_the_count_weighted_per_shard_objective(curvature):
    ref = curvature[0]["per_rank_bn"]
    for res in curvature:
        for kind in ("ggn", "hessian"):
            assert rel_err(res["per_rank_bn"][kind], ref[f"ref_{kind}"]) < TOL, kind


def test_diagonal_estimate_sums_the_ranks_samples_before_squaring(curvature):
    ref = curvature[0]["diagonal"]
    assert ref["samples_differ"], "every rank drew the same sample"
    for res in curvature:
        assert rel_err(res["diagonal"]["diag"], ref["ref_diag"]) < TOL
        # The shared generator advances identically: the optimizer state stays equal.
        assert torch.equal(res["diagonal"]["generator"], ref["generator"])


def test_bucketed_all_reduce(curvature):
    for res in curvature:
        b = res["bucketed"]
        assert b["calls_whole"] == 1 and b["calls_chunked"] > 1
        assert rel_err(b["chunked"], b["whole"]) < 1e-15


# ----------------------------------------------------------------------------- optimizer
def test_three_steps_on_two_ranks_equal_one_process(optimizer):
    ref = optimizer[0]["plain_ref"]
    for step in range(3):
        assert bitwise(optimizer[0]["plain"][step], optimizer[1]["plain"][step]), f"ranks differ after step {step}"
        err = rel_err(optimizer[0]["plain"][step], ref[step])
        assert err < 1e-8, f"step {step}: {err:.3e}"
    assert ref[0][0].ne(ref[2][0]).any(), "the steps did not move the parameters"
    for res in optimizer:
        # p.grad holds the global gradient, the same on every rank.
        assert rel_err(res["plain_grad"], optimizer[0]["plain_ref_grad"]) < 1e-10
        diag = res["plain_diag"]
        assert diag["accepted"] and diag["bytes_all_reduced"] > 0 and diag["time_communication"] > 0


def test_ranks_stay_bitwise_equal_and_share_one_state(optimizer):
    a, b = optimizer
    for step in range(3):
        assert bitwise(a["defaults"][step], b["defaults"][step]), step
    assert_same_tensors(a["defaults_state"], b["defaults_state"])


def test_resume_from_rank_zero_checkpoint_is_bitwise(optimizer):
    for res in optimizer:
        assert bitwise(res["resumed"][0], optimizer[0]["defaults"][2])


def test_ddp_model_gradient_reduced_exactly_once(optimizer):
    """Unequal shards (5 and 7): had DDP averaged the gradient as well, the
    count-weighted sum would be off; the comm hook would have been called."""
    ref = optimizer[0]["plain_ref"]
    for res in optimizer:
        assert res["ddp_engine"] == "rules"
        assert res["ddp_hook_calls"] == 0
        for step in range(3):
            assert rel_err(res["ddp"][step], ref[step]) < 1e-8
        assert rel_err(res["ddp_grad"], optimizer[0]["plain_ref_grad"]) < 1e-10
    assert bitwise(optimizer[0]["ddp"][2], optimizer[1]["ddp"][2])


def test_ddp_closure_calling_backward_is_reduced_once(optimizer):
    ref = optimizer[0]["plain_ref"]
    for res in optimizer:
        assert res["ddp_backward_hook_calls"] == 0
        for step in range(3):
            assert rel_err(res["ddp_backward"][step], ref[step]) < 1e-8, step
    assert bitwise(optimizer[0]["ddp_backward"][2], optimizer[1]["ddp_backward"][2])


def test_ddp_reducer_stays_off_while_hf_runs_the_closure(optimizer):
    """A closure calling backward() inside HF's first call must not have DDP
    average the gradient that HF then sums over the ranks."""
    for res in optimizer:
        assert res["guard_inside_calls"] == 0 and res["guard_outside_calls"] > 0
        assert bitwise(res["guard_grad"], res["guard_own_grad"])
    assert not bitwise(optimizer[0]["guard_grad"], optimizer[1]["guard_grad"]), "the shards' gradients were averaged"


def test_syncbatchnorm_steps_are_the_global_batch_steps(optimizer):
    ref = optimizer[0]["syncbn_ref"]
    for res in optimizer:
        assert res["syncbn_engine"] == "rules"
        for step in range(2):
            assert rel_err(res["syncbn"][step], ref[step]) < 1e-8, step
    assert bitwise(optimizer[0]["syncbn"][1], optimizer[1]["syncbn"][1])


# ----------------------------------------------------------------------------- failures
def test_failures_reach_every_rank_and_leave_state_alone(two_ranks):
    a, b = two_ranks["failures"]
    for res in (a, b):
        assert "non-finite" in res["nan"]["rejected"]
        assert bitwise(res["nan"]["params"], res["start"]) and res["nan"]["step"] == 0
        for stage in ("raise_first_call", "raise_trial", "raise_step_build"):
            assert bitwise(res[stage]["params"], res["start"]), stage
            assert res[stage]["state_equal"], stage
        assert res["after"]["accepted"]
    assert bitwise(a["after"]["params"], b["after"]["params"])
    for stage in ("raise_first_call", "raise_trial", "raise_step_build", "raise_build"):
        assert b[stage]["error"] in ("ValueError", "RuntimeError"), (stage, b[stage])
        assert a[stage]["error"] == "RankError", (stage, a[stage])
        assert "rank 1" in a[stage]["message"], a[stage]["message"]
    assert "bad input on this shard" in a["raise_first_call"]["message"]


def test_a_dead_rank_ends_the_others_wait(tmp_path):
    codes, outputs, results = launch(tmp_path, "dead_rank", 2, timeout=60.0, HFOPT_TEST_PG_TIMEOUT="20")
    assert codes == [0, 17], outputs
    survivor = results[0]["dead_rank"]
    assert survivor["error"] is not None, "rank 0 finished a step its peer never joined"
    assert survivor["seconds"] < 30, survivor


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.device_count() >= 2 and dist.is_nccl_available()),
                    reason="the real nn.SyncBatchNorm refuses CPU tensors: needs 2 CUDA devices and NCCL")
def test_real_syncbatchnorm_on_cuda(tmp_path):
    a, b = (r["cuda_syncbn"] for r in run_ok(tmp_path, "cuda_syncbn", 2, timeout=150.0))
    for res in (a, b):
        for kind in ("ggn", "hessian"):
            assert rel_err(res[kind], a[f"ref_{kind}"]) < TOL, kind
        assert rel_err(res["step"], a["ref_step"]) < 1e-8
    assert bitwise(a["step"], b["step"])


# ----------------------------------------------------------------------------- torchrun
def test_torchrun_train_example_logs_from_rank_zero_only(tmp_path):
    logdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "examples" / "train.py"), "--distributed", "--max-steps", "2", "--cg-max-iterations", "5",
           "--precise-bn", "256", "--threads", "1", "--logdir", str(logdir)]
    try:
        done = subprocess.run(cmd, cwd=tmp_path, env=worker_env(), capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail("torchrun did not finish within 150 s")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    summaries = [line for line in done.stdout.splitlines() if line.startswith("summary ")]
    assert len(summaries) == 1, out
    assert '"steps": 2' in summaries[0]
    assert len([line for line in done.stdout.splitlines() if line.startswith("epoch ")]) == 1, out
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 1
    assert (logdir / "checkpoint.pt").is_file()
