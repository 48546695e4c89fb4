#!/usr/bin/env python
"""One data-parallel HF step at a fixed global batch on 1 and 2 processes (gloo, CPU, 1 thread each),
split into compute and communication, with a cost model for K workers.

    flock /tmp/hfopt-timing.lock python benchmarks/bench_distributed.py

Measured (medians over ``--rounds`` rounds; each round runs the 1-process and the
2-process configuration one after the other, so both see the same machine load):

* the wall time of one HF step (after one warm-up step), per stage, and the
  time rank 0 spent inside HF's all-reduces (``time_communication``: waits for
  the other rank included) and the bytes it all-reduced;
* one SGD step (forward, backward, one gradient all-reduce) at the same batch;
* gloo's all-reduce on this machine: a 1-element buffer (latency) and a
  parameter-sized one (bandwidth), after a barrier.

Modelled (not measured): with ``D`` the step's divisible compute (every stage
but ``time_other``, which each rank repeats: CG's vector arithmetic and
bookkeeping on the whole parameter vector), ``R = time_other``, ``n`` HF
all-reduces of ``S`` bytes each on average and a ring all-reduce

    t_ar(K) = 2 (K - 1) alpha + 2 (K - 1) / K * S / bandwidth,
    T(K)    = D / K + R + n t_ar(K),     r(K) = n t_ar(K) / (D / K + R).

The 2-process measurement checks the model on this machine; the predictions
for 8 and 64 workers use this machine's loopback constants and, separately,
assumed 10 GbE constants.  With ``docs/results/scaling/results.json`` present the
model is scaled to that study's setting (its batch, its mean CG iterations) and
multiplied by its steps to target: an expected time to target for K workers,
HF against SGD -- a projection.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

SCALING = ROOT / "docs" / "results" / "scaling" / "results.json"
OUT = ROOT / "benchmarks" / "results" / "distributed-cpu.json"
# Assumed, not measured: a 10 Gbit/s Ethernet with 25 us per message hop.
ASSUMED_NETWORK = {"alpha": 25e-6, "bandwidth": 1.25e9}
WORKERS = (1, 2, 8, 64)


# ----------------------------------------------------------------------------- one rank
def worker(args: argparse.Namespace) -> None:
    import hfopt
    from models import build_model

    torch.set_num_threads(1)
    rank, world = args.rank, args.world
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{args.init}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=300))
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=10)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((args.batch, 3, 32, 32), generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    x, y = torch.tensor_split(x, world)[rank], torch.tensor_split(y, world)[rank]
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    result: Dict[str, Any] = {"params": sum(p.numel() for p in params)}

    # cg_eps=0: CG runs exactly cg_max_iterations, so both configurations do the same work.
    opt = hfopt.HFOptimizer(params, cg_max_iterations=args.cg, cg_eps=0.0)

    def closure():
        outputs = model(x)
        return loss_fn(outputs, y), outputs

    steps = []
    for i in range(1 + args.steps):
        if world > 1:
            dist.barrier()
        opt.step(closure)
        if i:
            diag = dict(opt.last_step)
            diag["calls"] = opt._dp.calls if world > 1 else 0
            steps.append({k: v for k, v in diag.items() if isinstance(v, (int, float, bool)) or v is None})
    result["hf"] = steps

    def sgd_step() -> float:
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        for p in params:
            p.grad = None
        loss_fn(model(x), y).backward()
        if world > 1:  # what DDP does, as one flat buffer
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
        return time.perf_counter() - t0

    sgd_step()
    result["sgd"] = statistics.median(sgd_step() for _ in range(3))
    if world > 1:
        result["all_reduce"] = {n: _time_all_reduce(n) for n in (1, result["params"])}
        dist.destroy_process_group()
    if rank == 0:
        Path(args.out).write_text(json.dumps(result))


def _time_all_reduce(numel: int, reps: int = 10) -> float:
    buf = torch.zeros(numel)
    dist.all_reduce(buf)
    times = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(buf)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----------------------------------------------------------------------------- driver
def launch(args: argparse.Namespace, world: int) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, __file__, "--worker", "--world", str(world), "--init", str(Path(tmp) / "rdv"),
               "--out", str(out), "--model", args.model, "--batch", str(args.batch), "--cg", str(args.cg),
               "--steps", str(args.steps)]
        procs = [subprocess.Popen(cmd + ["--rank", str(r)], env=env) for r in range(world)]
        codes = [p.wait(timeout=1800) for p in procs]
        if codes != [0] * world:
            raise RuntimeError(f"{world}-process run failed: exit codes {codes}")
        return json.loads(out.read_text())


def median_step(runs: List[Dict[str, Any]]) -> Dict[str, float]:
    steps = [s for r in runs for s in r["hf"]]
    keys = [k for k, v in steps[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: statistics.median(float(s[k]) for s in steps) for k in keys}


def ring(K: int, S: float, alpha: float, bandwidth: float) -> float:
    """Modelled seconds of one ring all-reduce of S bytes over K workers."""
    if K == 1:
        return 0.0
    return 2 * (K - 1) * alpha + 2 * (K - 1) / K * S / bandwidth


def step_model(D: float, R: float, n: float, S: float, K: int, alpha: float, bandwidth: float) -> Dict[str, float]:
    comm = n * ring(K, S, alpha, bandwidth)
    compute = D / K + R
    return {"K": K, "step": compute + comm, "compute": compute, "communication": comm, "ratio": comm / compute,
            "speedup": (D + R) / (compute + comm)}


def projection(one: Dict[str, float], params: int, alpha: float, bandwidth: float,
               network: str, scaling: Path = SCALING) -> Optional[Dict[str, Any]]:
    """Expected time to target on K workers: the scaling study's own measured
    seconds per step (1 process) split by this benchmark's divisible fraction,
    plus the modelled all-reduces, times the study's steps to target."""
    if not scaling.is_file():
        return None
    study = json.loads(scaling.read_text())
    divisible = (one["wall_time"] - one["time_other"]) / one["wall_time"]
    S = 4.0 * params  # float32 parameter-sized vectors
    out: Dict[str, Any] = {"network": network, "divisible_fraction": divisible, "batches": {}}
    for b, runs in study["runs"].items():
        hf, sgd = runs.get("hf"), runs.get("sgd")
        if not (hf and sgd and hf["steps"] and sgd["steps"]):
            continue
        iters = float(hf.get("hf_mean_cg_iterations") or 0.0)
        # Vectors: the gradient, the diagonal, the products (+1: the warm start's);
        # scalars: the operator's build and the trial losses (as in this benchmark's step).
        n_vec, n_scalar = iters + 3, 1 + max(one["evaluations"] - 1, 0)
        hf1, sgd1 = hf["seconds"] / hf["steps"], sgd["seconds"] / sgd["steps"]
        rows = []
        for K in WORKERS:
            hf_step = hf1 * (divisible / K + 1 - divisible) + n_vec * ring(K, S, alpha, bandwidth) \
                + n_scalar * ring(K, 16.0, alpha, bandwidth)
            sgd_step = sgd1 / K + ring(K, S, alpha, bandwidth)
            rows.append({"K": K, "hf_step": hf_step, "sgd_step": sgd_step, "hf_time": hf_step * hf["steps"],
                         "sgd_time": sgd_step * sgd["steps"]})
        out["batches"][b] = {"hf_steps": hf["steps"], "hf_reached": bool(hf["reached"]), "sgd_steps": sgd["steps"],
                             "sgd_reached": bool(sgd["reached"]), "hf_cg_iterations": iters, "rows": rows}
    return out


def fmt_steps(steps: int, reached: bool) -> str:
    return f"{steps}" if reached else f"> {steps}"


def report(res: Dict[str, Any]) -> str:
    m1, m2 = res["measured"]["1"], res["measured"]["2"]
    lines = [f"HF step, {res['config']['model']}, global batch {res['config']['batch']}, "
             f"{res['config']['cg']} CG iterations, float32, gloo, 1 thread per process "
             f"(median of {res['config']['rounds']} round-robin rounds; 1-minute load average "
             f"{res['config']['load_average'][0]:.1f} before, {res['config']['load_average'][1]:.1f} after, "
             f"on {res['config']['cpu_count']} CPUs):", "",
             "| processes | step (s) | compute (s) | communication (s) | comm share | MB all-reduced/step | "
             "all-reduces/step |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for k, m in (("1", m1), ("2", m2)):
        comp = m["wall_time"] - m["time_communication"]
        lines.append(f"| {k} (measured) | {m['wall_time']:.3f} | {comp:.3f} | {m['time_communication']:.3f} | "
                     f"{m['time_communication'] / m['wall_time']:.1%} | {m['bytes_all_reduced'] / 1e6:.1f} | "
                     f"{m['calls']:.0f} |")
    model2 = res["model"]["this machine's loopback constants"][1]["step"]
    lines.append(f"\nSpeed-up 1 -> 2 processes (measured): {m1['wall_time'] / m2['wall_time']:.2f}x; "
                 f"the model's 2-process step: {model2:.3f} s. "
                 f"SGD step (measured): {res['sgd']['1']:.3f} s on 1, {res['sgd']['2']:.3f} s on 2 processes.")
    ar = res["all_reduce"]
    lines.append(f"gloo all-reduce on this machine (measured, 2 processes): 1 element {ar['latency'] * 1e6:.0f} us, "
                 f"{ar['bytes'] / 1e6:.1f} MB {ar['large'] * 1e3:.1f} ms -> model alpha {ar['alpha'] * 1e6:.0f} us, "
                 f"bandwidth {ar['bandwidth'] / 1e9:.2f} GB/s.")
    mi = res["model_inputs"]
    lines.append(f"Model inputs (from the measurements): D = {mi['D']:.3f} s divisible compute, R = {mi['R']:.3f} s "
                 f"repeated on every rank, n = {mi['n']:.0f} all-reduces of S = {mi['S'] / 1e6:.2f} MB on average.")
    batch = res["config"]["batch"]
    for name, rows in res["model"].items():
        lines += ["", f"MODEL (not measured), {name}: T(K) = D/K + R + n t_ar(K), global batch {batch}", "",
                  "| workers K | samples/worker | step (s) | compute (s) | communication (s) | comm/compute | "
                  "speed-up |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            lines.append(f"| {r['K']} | {batch / r['K']:.3g} | {r['step']:.3f} | {r['compute']:.3f} | "
                         f"{r['communication']:.3f} | {r['ratio']:.3f} | {r['speedup']:.2f}x |")
    for proj in res.get("projection") or []:
        lines += ["", f"PROJECTION (not measured): docs/results/scaling's seconds per step on 1 process, "
                  f"{proj['divisible_fraction']:.1%} of it divided by K (this benchmark's split), plus the "
                  f"modelled all-reduces ({proj['network']}), times its steps to target ('>': not reached, "
                  "a lower bound):", "",
                  "| batch | K | HF step (s) | HF steps | HF time to target (s) | SGD step (s) | SGD steps | "
                  "SGD time to target (s) | first to target |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        wins = []
        for b, info in proj["batches"].items():
            for r in info["rows"]:
                hf_t = ("" if info["hf_reached"] else "> ") + f"{r['hf_time']:.1f}"
                sgd_t = ("" if info["sgd_reached"] else "> ") + f"{r['sgd_time']:.1f}"
                first = first_to_target(r, info)
                if first == "HF":
                    wins.append(f"batch {b}, K = {r['K']}")
                lines.append(f"| {b} | {r['K']} | {r['hf_step']:.3f} | {fmt_steps(info['hf_steps'], info['hf_reached'])}"
                             f" | {hf_t} | {r['sgd_step']:.4f} | {fmt_steps(info['sgd_steps'], info['sgd_reached'])}"
                             f" | {sgd_t} | {first} |")
        lines += ["", "HF first to target at: " + ("; ".join(wins) if wins else "none of these batch sizes and K") + "."]
    return "\n".join(lines)


def first_to_target(row: Dict[str, Any], info: Dict[str, Any]) -> str:
    """'HF', 'SGD' or 'open': a run that did not reach gives only a lower bound on its time."""
    hf, sgd = row["hf_time"], row["sgd_time"]
    if info["hf_reached"] and (hf < sgd if info["sgd_reached"] else hf <= sgd):
        return "HF"
    if info["sgd_reached"] and (sgd < hf if info["hf_reached"] else sgd <= hf):
        return "SGD"
    return "open"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="c3d3_bn")
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--cg", type=int, default=5, help="CG iterations per step")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out-json", default=str(OUT))
    parser.add_argument("--scaling", default=str(SCALING), metavar="PATH",
                        help="results.json of examples/scaling.py whose steps to target are projected")
    parser.add_argument("--from-json", default=None, metavar="PATH",
                        help="re-analyse the measurements saved in PATH instead of measuring")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--init", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        runs = {int(k): v for k, v in saved["runs"].items()}
        config = saved["config"]
    else:
        runs = {1: [], 2: []}
        load_before = os.getloadavg()[0]
        for _ in range(args.rounds):
            for world in (1, 2):
                runs[world].append(launch(args, world))
        config = {"model": args.model, "batch": args.batch, "cg": args.cg, "steps": args.steps,
                  "rounds": args.rounds, "torch": torch.__version__, "cpu_count": os.cpu_count(),
                  "load_average": [load_before, os.getloadavg()[0]]}
    one, two = median_step(runs[1]), median_step(runs[2])
    params = runs[1][0]["params"]
    latency = statistics.median(r["all_reduce"]["1"] for r in runs[2])
    large = statistics.median(r["all_reduce"][str(params)] for r in runs[2])
    # A 2-rank ring: 2 alpha + S / bandwidth.
    alpha, bandwidth = latency / 2, 4.0 * params / max(large - latency, 1e-9)
    D = one["wall_time"] - one["time_other"]
    R = one["time_other"]
    n = two["calls"]
    S = two["bytes_all_reduced"] / max(n, 1)
    res: Dict[str, Any] = {
        "config": config,
        "measured": {"1": one, "2": two},
        "sgd": {"1": statistics.median(r["sgd"] for r in runs[1]), "2": statistics.median(r["sgd"] for r in runs[2])},
        "all_reduce": {"latency": latency, "large": large, "bytes": 4.0 * params, "alpha": alpha,
                       "bandwidth": bandwidth},
        "model_inputs": {"D": D, "R": R, "n": n, "S": S},
        "model": {
            "this machine's loopback constants": [step_model(D, R, n, S, K, alpha, bandwidth) for K in WORKERS],
            "assumed 10 GbE (alpha 25 us, 1.25 GB/s)": [
                step_model(D, R, n, S, K, ASSUMED_NETWORK["alpha"], ASSUMED_NETWORK["bandwidth"]) for K in WORKERS],
        },
        "runs": {str(k): v for k, v in runs.items()},
    }
    proj = [projection(one, params, a, bw, name, Path(args.scaling))
            for name, a, bw in (("this machine's loopback constants", alpha, bandwidth),
                                ("assumed 10 GbE", ASSUMED_NETWORK["alpha"], ASSUMED_NETWORK["bandwidth"]))]
    res["projection"] = [p for p in proj if p is not None]
    text = report(res)
    res["report"] = text
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(res, indent=1))
    print(text)


if __name__ == "__main__":
    main()
