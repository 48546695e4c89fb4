#!/usr/bin/env python
"""External-style models: hfopt's G@v and H@v against the gradient and torch.func.

Four networks written in torchvision's and timm's structure (``models/external.py``):
ResNet-18 (ImageNet stem), MobileNetV2, EfficientNet-B0 (MBConv, SE, SiLU) and a
two-stage ConvNeXt (depthwise 7x7, channels-last LayerNorm, GELU, layer scale).
One process, one batch per model: float32, train mode (BatchNorm on batch
statistics), random ``3 x size x size`` inputs and labels from a fixed seed,
``CrossEntropyLoss``.  Dropout and drop-path rates are set to 0: train-mode masks
are random, and hfopt and torch.func must differentiate the same function.

Contenders per model (the timing protocol of ``bench_curvature.py``, whose
``Timer`` is reused: round-robin blocks of ``--block`` back-to-back calls per
contender, the block's first call untimed, the starting contender rotating
from round to round after one warm-up round, medians over ``--rounds``):

* ``grad``              eager gradient, ``zero_grad()`` + ``model(x)`` + ``loss.backward()``: the 1.00 unit
* ``hf_build_ggn``      ``hfopt.GGN(model, loss, x, y)``
* ``hf_build_hessian``  ``hfopt.Hessian(model, loss, x, y)``
* ``hf_gv`` / ``hf_hv`` one ``G @ v`` / ``H @ v`` on an operator built once
* ``func_gv``           torch.func GGN per product: ``jvp`` of the model in its
                        parameters, output Hessian by ``jvp(grad(loss))``, ``vjp``
* ``func_gv_cached``    (info) the same with the ``vjp`` closure built once
* ``func_hv``           torch.func Hessian, forward-over-reverse ``jvp(grad(L))``

torch.func and train-mode BatchNorm: ``functional_call`` under ``jvp``/``vjp``
refuses the in-place running-statistics update, so torch.func runs on a deep
copy of the model passed through ``torch.func.replace_all_batch_norm_modules_``
(running statistics removed; a train-mode layer then normalizes with the batch
statistics, as the original does: the same function).

Checked once per model before timing: hfopt's ``G@v`` and ``H@v`` against
torch.func's in float32 (relative error), and ``op.fallbacks`` (layers without a
closed-form rule, which run through hfopt's torch.func fallback).  ``--check64``
also measures both float32 products against a float64 torch.func product:
where both are far from it, the difference is float32 rounding amplified by the
problem's conditioning (a train-mode BatchNorm over few values per channel),
not a disagreement about the function.

Targets: hfopt faster than torch.func for both products on every model;
``G@v <= 1.0 x gradient`` on ResNet-18; hfopt >= 2x faster than torch.func for
both products on every model without fallbacks.

Usage::

    python benchmarks/bench_external.py                                  # 4 models, batch 32, 64x64
    python benchmarks/bench_external.py --models resnet18 --rounds 3
    python benchmarks/bench_external.py --models convnext_stack --batch 2 --size 32 --rounds 1 --block 2
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.func import functional_call, replace_all_batch_norm_modules_  # noqa: E402

import hfopt  # noqa: E402
from bench_curvature import Baselines, Timer, code_version, med_ms, rel_err, status  # noqa: E402
from models.external import EXTERNAL, build_external  # noqa: E402

DEFAULT_MODELS = "resnet18,mobilenet_v2,efficientnet_b0,convnext_stack"
T_GV_RATIO = {"resnet18": 1.0}   # G@v / gradient, where the issue sets one
T_FASTER = 1.0                   # hfopt / torch.func speed-up on every model, both products
T_FASTER_RULED = 2.0             # ... on models where every layer has a rule
AGREE_F32 = 1e-3                 # float32 agreement of hfopt and torch.func products (informational)


# ----------------------------------------------------------------------------- torch.func
class FuncBaseline(Baselines):
    """``bench_curvature``'s torch.func products at ``(model, x, y)``, on a copy of
    the model whose BatchNorm layers keep no running statistics (these models'
    BatchNorm subclasses and in-place updates are not cloned away as there)."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor):
        super().__init__(model, loss_fn, x, y)
        self.fmodel = replace_all_batch_norm_modules_(copy.deepcopy(model)).train(model.training)

    def f(self, P: Dict[str, Tensor]) -> Tensor:
        return functional_call(self.fmodel, P, (self.x,))

    def release(self) -> None:
        """Drop the cached vjp closure (its saved activations) before the next model."""
        self.__dict__.pop("_fz", None)
        self.__dict__.pop("_fvjp", None)


# ----------------------------------------------------------------------------- per model
def setup(name: str, args):
    """Model (train mode, float32, no dropout / drop path), loss, batch, direction."""
    torch.manual_seed(args.seed)
    model = build_external(name, num_classes=10, drop=False).float().train()
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    v = [torch.randn(p.shape, generator=gen) for p in model.parameters() if p.requires_grad]
    return model, nn.CrossEntropyLoss(), x, y, v


def bench_model(name: str, args, timer: Timer) -> dict:
    model, loss_fn, x, y, v = setup(name, args)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    try:
        G = hfopt.GGN(model, loss_fn, x, y)
        H = hfopt.Hessian(model, loss_fn, x, y)
    except Exception as exc:  # noqa: BLE001 - reported per model; the others still run
        print(f"  [{name}] hfopt could not build its operators: {type(exc).__name__}: {exc}", file=sys.stderr)
        return {"params": n_params, "error": f"{type(exc).__name__}: {exc}"}
    fallbacks = sorted(set(G.fallbacks) | set(H.fallbacks))
    func = FuncBaseline(model, loss_fn, x, y)

    # apples to apples: the same products, once, in float32
    agree = {"gv": rel_err(G @ v, func.func_gv(v)), "hv": rel_err(H @ v, func.func_hv(v))}
    print(f"  [{name}] float32 hfopt vs torch.func: G@v rel err {agree['gv']:.2e}, H@v rel err {agree['hv']:.2e}; "
          f"fallbacks: {fallbacks or 'none'}", file=sys.stderr, flush=True)
    if args.check64:
        # How far each float32 product is from the float64 one: rounding amplified by the
        # problem's conditioning (both far) or one of the two less accurate (one far).
        m64 = copy.deepcopy(model).double()
        f64 = FuncBaseline(m64, loss_fn, x.double(), y)
        v64 = [t.double() for t in v]
        ref = {"gv": f64.func_gv(v64), "hv": f64.func_hv(v64)}
        del m64, f64

        def d(vec):
            return [t.double() for t in vec]

        agree.update({"hf_gv_vs_f64": rel_err(d(G @ v), ref["gv"]),
                      "func_gv_vs_f64": rel_err(d(func.func_gv(v)), ref["gv"]),
                      "hf_hv_vs_f64": rel_err(d(H @ v), ref["hv"]),
                      "func_hv_vs_f64": rel_err(d(func.func_hv(v)), ref["hv"])})
        del ref
        print(f"  [{name}] against float64 torch.func: G@v hfopt {agree['hf_gv_vs_f64']:.2e}, torch.func "
              f"{agree['func_gv_vs_f64']:.2e}; H@v hfopt {agree['hf_hv_vs_f64']:.2e}, torch.func "
              f"{agree['func_hv_vs_f64']:.2e}", file=sys.stderr, flush=True)

    def grad() -> None:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()

    func.prepare_func_gv_cached()
    contenders: Dict[str, Callable] = {
        "grad": grad,
        "hf_build_ggn": lambda: hfopt.GGN(model, loss_fn, x, y),
        "hf_build_hessian": lambda: hfopt.Hessian(model, loss_fn, x, y),
        "hf_gv": lambda: G @ v,
        "hf_hv": lambda: H @ v,
        "func_gv": lambda: func.func_gv(v),
        "func_gv_cached": lambda: func.func_gv_cached(v),
        "func_hv": lambda: func.func_hv(v),
    }
    print(f"  [{name}] {n_params:,} parameters, {len(G.steps)} rule steps; timing {len(contenders)} contenders x "
          f"{args.rounds} rounds of {args.block} ...", file=sys.stderr, flush=True)
    times = timer.round_robin(contenders, args.rounds, warmup=args.warmup, label=name, block=args.block)
    cpu = timer.cpu
    func.release()
    model.zero_grad(set_to_none=True)
    ms = {k: med_ms(s) for k, s in times.items()}
    unit = ms["grad"]
    speed = {"gv": ms["func_gv"] / ms["hf_gv"], "gv_cached": ms["func_gv_cached"] / ms["hf_gv"],
             "hv": ms["func_hv"] / ms["hf_hv"]}

    def tgt(key, label, value, target, ok):
        return {"key": key, "label": label, "value": value, "target": target, "pass": ok}

    targets = [
        tgt("gv_vs_func", "G@v faster than torch.func", speed["gv"], f"> {T_FASTER:.1f}x", speed["gv"] > T_FASTER),
        tgt("hv_vs_func", "H@v faster than torch.func", speed["hv"], f"> {T_FASTER:.1f}x", speed["hv"] > T_FASTER),
    ]
    if not fallbacks:
        targets += [
            tgt("gv_vs_func_ruled", "G@v vs torch.func, every layer ruled", speed["gv"], f">= {T_FASTER_RULED:.1f}x",
                speed["gv"] >= T_FASTER_RULED),
            tgt("hv_vs_func_ruled", "H@v vs torch.func, every layer ruled", speed["hv"], f">= {T_FASTER_RULED:.1f}x",
                speed["hv"] >= T_FASTER_RULED),
        ]
    if name in T_GV_RATIO:
        t = T_GV_RATIO[name]
        targets.append(tgt("gv_ratio", "G@v / gradient", ms["hf_gv"] / unit, f"<= {t:.1f}x", ms["hf_gv"] / unit <= t))
    return {
        "params": n_params,
        "steps": len(G.steps),
        "channels_last": G.channels_last,
        "fallbacks": fallbacks,
        "agreement_f32": agree,
        "speedup_vs_func": speed,
        "times_ms": {k: {"median": ms[k], "ratio": ms[k] / unit, "min": min(times[k]) * 1e3,
                         "samples": [t * 1e3 for t in times[k]], "cpu_median": med_ms(cpu[k])} for k in times},
        "targets": targets,
    }


# ----------------------------------------------------------------------------- report
def print_table(result: dict, args) -> None:
    print(f"\n=== external-style models: batch {args.batch}x3x{args.size}x{args.size} float32, train-mode BN, "
          f"dropout / drop path 0, CrossEntropyLoss, cpu, {torch.get_num_threads()} threads; "
          f"median ms of {args.rounds} rounds x {args.block - 1 if args.block > 1 else 1} timed calls ===")
    print("torch.func runs on a deep copy passed through torch.func.replace_all_batch_norm_modules_ "
          "(no running stats; same batch-statistics function)")
    hdr = (f"{'model':16s} {'params':>10s} {'grad':>8s} {'G@v':>8s} {'x grad':>6s} {'H@v':>8s} {'x grad':>6s} "
           f"{'fn G@v':>8s} {'fn H@v':>8s} {'G spd':>6s} {'H spd':>6s} {'bld G':>6s} {'bld H':>6s} "
           f"{'err G':>8s} {'err H':>8s}  fallbacks")
    print(hdr)
    for n, r in result["models"].items():
        if "error" in r:
            print(f"{n:16s} {r['params']:>10,d}  ERROR: {r['error'][:200]}")
            continue
        t = r["times_ms"]
        print(f"{n:16s} {r['params']:>10,d} {t['grad']['median']:8.1f} {t['hf_gv']['median']:8.1f} "
              f"{t['hf_gv']['ratio']:6.2f} {t['hf_hv']['median']:8.1f} {t['hf_hv']['ratio']:6.2f} "
              f"{t['func_gv']['median']:8.1f} {t['func_hv']['median']:8.1f} "
              f"{r['speedup_vs_func']['gv']:5.2f}x {r['speedup_vs_func']['hv']:5.2f}x "
              f"{t['hf_build_ggn']['ratio']:6.2f} {t['hf_build_hessian']['ratio']:6.2f} "
              f"{r['agreement_f32']['gv']:8.1e} {r['agreement_f32']['hv']:8.1e}  "
              f"{', '.join(r['fallbacks']) if r['fallbacks'] else 'none'}")
    print("(ms: medians; 'x grad': / gradient; 'fn': torch.func per product; 'spd': torch.func time / hfopt time; "
          "'bld': operator build / gradient; 'err': float32 relative difference hfopt vs torch.func)")
    info = [(n, r) for n, r in result["models"].items() if "error" not in r]
    if info and args.check64:
        print("(info) float32 relative error against float64 torch.func, hfopt / torch.func: " + ", ".join(
            f"{n} G@v {a['hf_gv_vs_f64']:.1e} / {a['func_gv_vs_f64']:.1e}, H@v {a['hf_hv_vs_f64']:.1e} / "
            f"{a['func_hv_vs_f64']:.1e}" for n, a in ((n, r["agreement_f32"]) for n, r in info)))
    if info:
        print("(info) torch.func G@v with its vjp closure cached at the point: " + ", ".join(
            f"{n} {r['times_ms']['func_gv_cached']['median']:.1f} ms (hfopt {r['speedup_vs_func']['gv_cached']:.2f}x)"
            for n, r in info))

    print("\n=== targets ===")
    met = total = 0
    for n, r in result["models"].items():
        if "error" in r:
            print(f"  {n:16s} {'(no operator built)':48s} MISS")
            total += 1
            continue
        for t in r["targets"]:
            total += 1
            met += bool(t["pass"])
            print(f"  {n:16s} {t['label']:40s} {t['value']:7.2f}x  {t['target']:>9s}  {status(t['pass'])}")
    print(f"{met}/{total} targets met")
    result["summary"] = {"met": met, "total": total}


# ----------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated, of {', '.join(EXTERNAL)}")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds, median reported (default 5)")
    ap.add_argument("--block", type=int, default=3,
                    help="calls of one contender back to back per round; all but the first are timed "
                         "(default 3; 1 times every call)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check64", action="store_true",
                    help="also compare both float32 products with a float64 torch.func product (untimed)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "external.json"), help="JSON output path")
    args = ap.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [n for n in names if n not in EXTERNAL]
    if unknown or not names:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {', '.join(EXTERNAL)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    timer = Timer(torch.device("cpu"))
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "code": code_version(),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "device": "cpu", "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "batch": args.batch, "size": args.size, "rounds": args.rounds, "block": args.block, "warmup": args.warmup,
        "seed": args.seed, "dtype": "float32", "loss": "CrossEntropyLoss", "mode": "train",
        "dropout": "rates set to 0 (dropout, drop path)",
        "torch_func_bn": "deep copy through torch.func.replace_all_batch_norm_modules_",
    }
    print(f"hfopt {hfopt.__version__} (git {meta['code'].get('git_head', '?')}"
          f"{', hfopt/ modified' if meta['code'].get('hfopt_dirty') else ''}) external-model benchmark: torch "
          f"{torch.__version__}, cpu, {torch.get_num_threads()} threads, batch {args.batch}, {args.size}x{args.size}, "
          f"{args.rounds} rounds of {args.block} back-to-back calls (+{args.warmup} warm-up); dropout and drop-path "
          "rates 0 (deterministic functions), BatchNorm in train mode")
    load = meta["loadavg_start"]
    if load and os.cpu_count() and load[0] > 0.25 * os.cpu_count():
        print(f"WARNING: load average {load[0]:.2f} on {os.cpu_count()} CPUs: other processes compete for the cores; "
              "absolute times will be inflated and noisy")
    result: dict = {"meta": meta, "models": {}}
    t0 = time.perf_counter()
    for n in names:
        result["models"][n] = bench_model(n, args, timer)
    print_table(result, args)
    meta["seconds"] = time.perf_counter() - t0
    meta["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
