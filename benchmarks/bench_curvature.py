#!/usr/bin/env python
"""Curvature-product benchmark: hfopt's GGN/Hessian operators against autograd and torch.func.

Everything runs in one process on one model and one batch (random data, fixed
seed, train mode, ``CrossEntropyLoss``).  Contenders are timed round-robin: each
repeat runs every contender once (the starting contender rotates from repeat to
repeat), after a warm-up round; the reported time is the median over repeats.
The unit is the eager first-order gradient (``model(x)`` + ``loss.backward()``).

Contenders per model
--------------------
* ``grad``              eager gradient, the 1.00 unit
* ``hf_build_ggn``      ``hfopt.GGN(model, loss, x, y)`` (one forward through the rules)
* ``hf_build_hessian``  ``hfopt.Hessian(...)`` (forward + the first-order sweep it caches)
* ``hf_gv`` / ``hf_hv`` one ``G @ v`` / ``H @ v`` on a prebuilt operator
* ``func_gv``           torch.func GGN: ``jvp`` + output Hessian + ``vjp``, all per product
* ``func_gv_cached``    the same with the ``vjp`` closure built once at the point
* ``func_hv``           torch.func Hessian, forward-over-reverse ``jvp(grad(L))``
* ``ag_hv``             autograd double backward: forward, ``grad(create_graph)``, ``grad``
* ``ag_hv_cached``      the same with the ``create_graph`` gradient built once
* ``ag_gv``             autograd GGN: double-vjp trick for ``Jv``, loss Hessian, ``vjp``
* ``ag_gv_cached``      the same with the forward and the ``J^T u`` graph built once

The "cached" variants are what a careful autograd/torch.func user gets inside
CG, where the point is fixed and only ``v`` changes; hfopt's product times
likewise exclude its build.  Targets are checked against the per-product
("fresh") baselines the brief names, and reported against the cached ones too.

torch.func and train-mode BatchNorm: ``functional_call`` with the module's own
buffers fails under ``jvp``/``vjp`` because the layer updates ``running_mean``
and ``num_batches_tracked`` in place on a captured tensor.  This script passes
*clones of the buffers created inside the function* (the same trick hfopt's
fallback rule uses); the batch statistics, hence the function, are unchanged.

Also measured: each BatchNorm product alone (hfopt's ``BatchNormRule`` against
autograd) and the memory the operator caches against what autograd saves for
one forward.  ``--check`` compares all products in float64 first, ``--profile``
runs torch.profiler over 5 ``G@v`` and 5 ``H@v`` on the first model.

Usage::

    python benchmarks/bench_curvature.py                      # full defaults
    python benchmarks/bench_curvature.py --quick --check      # smoke run
    python benchmarks/bench_curvature.py --models convnet --profile
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.func import functional_call, grad as func_grad, jvp as func_jvp, vjp as func_vjp  # noqa: E402

import hfopt  # noqa: E402
from hfopt.rules import BatchNormRule  # noqa: E402
from hfopt.rules.base import Rule  # noqa: E402
from models import MODELS  # noqa: E402

MiB = 2 ** 20

# ----------------------------------------------------------------------------- targets
# (G@v, H@v) / gradient: issue 12's targets, the ResNets' looser (shortcuts, more
# convolutions per BatchNorm); other models get the plain-convnet pair.
RATIO_TARGETS = {"resnet20_bn": (0.9, 1.3), "resnet8_bn": (0.9, 1.3), "resnet18_bn": (0.9, 1.3),
                 "wrn16_4_bn": (0.9, 1.3)}
DEFAULT_RATIO_TARGETS = (0.65, 0.9)
T_GV_SPEEDUP = 2.5      # G@v >= 2.5x faster than torch.func jvp+vjp
T_HV_SPEEDUP = 2.5      # H@v >= 2.5x faster than autograd double backward
T_BUILD_RATIO = 1.2     # build <= 1.2 x gradient
T_BN_RES_SPEEDUP = 10.0  # BN residual >= 10x faster than autograd at [128,64,32,32]
BN_TARGET_SHAPE = (128, 64, 32, 32)
BN_SHAPES = [(128, 64, 32, 32), (256, 128, 16, 16)]


# ----------------------------------------------------------------------------- models
def convnet(num_classes: int = 10) -> nn.Sequential:
    """Three conv3x3(pad 1)-BN-ReLU-MaxPool2d(2) stages (32, 64, 128 channels), global
    average pool, linear classifier.  Convolutions feeding BN have no bias (the
    repository's convention: BN removes it, it would only add zero curvature)."""
    layers: List[nn.Module] = []
    cin = 3
    for cout in (32, 64, 128):
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                   nn.MaxPool2d(2)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes)]
    return nn.Sequential(*layers)


def build_model(name: str) -> nn.Module:
    if name == "convnet":
        return convnet(num_classes=10)
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r}; choose from convnet, {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes=10)


# ----------------------------------------------------------------------------- helpers
class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def round_robin(self, contenders: Dict[str, Callable], repeats: int, warmup: int = 1,
                    label: str = "", block: int = 1) -> Dict[str, List[float]]:
        """Seconds per call of each contender, interleaved by blocks: a round runs
        each contender ``block`` times back to back, as CG calls a product, and
        times the calls after the block's first (which follows another
        contender).  The first contender of a round rotates so no one always
        runs right after the same neighbour.  ``block=1`` times every call."""
        names = list(contenders)
        for _ in range(warmup):
            for n in names:
                out = contenders[n]()
                self.sync()
                del out
        times: Dict[str, List[float]] = {n: [] for n in names}
        self.cpu = {n: [] for n in names}      # process CPU seconds (all threads) per call
        self.faults = {n: [] for n in names}   # minor page faults per call (fresh large allocations)
        for r in range(repeats):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                fn = contenders[n]
                for call in range(block):
                    self.sync()
                    f0 = _minflt()
                    c0 = time.process_time()
                    t0 = time.perf_counter()
                    out = fn()
                    self.sync()
                    t, c, f = time.perf_counter() - t0, time.process_time() - c0, _minflt() - f0
                    del out
                    if block == 1 or call > 0:
                        times[n].append(t)
                        self.cpu[n].append(c)
                        self.faults[n].append(f)
            if label:
                print(f"  [{label}] repeat {r + 1}/{repeats} done", file=sys.stderr, flush=True)
        return times


def _minflt() -> int:
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, AttributeError):  # not on POSIX
        return 0


def med_ms(samples: List[float]) -> float:
    return statistics.median(samples) * 1e3


def rel_err(a: List[Tensor], b: List[Tensor]) -> float:
    num = sum(float(((x - y) ** 2).sum()) for x, y in zip(a, b)) ** 0.5
    den = sum(float((y ** 2).sum()) for y in b) ** 0.5
    return num / max(den, 1e-300)


def status(ok: Optional[bool]) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def _storage(t: Tensor):
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _walk(obj, visit, depth: int = 0, seen_objs: Optional[set] = None) -> None:
    """Tensors reachable from ``obj``: through lists, tuples, dicts and nested rules
    (a fused rule keeps the per-layer rules it was built from, and their caches)."""
    seen_objs = set() if seen_objs is None else seen_objs
    if isinstance(obj, Tensor):
        visit(obj)
        return
    if depth >= 4 or id(obj) in seen_objs:
        return
    seen_objs.add(id(obj))
    if isinstance(obj, (list, tuple)):
        children = obj
    elif isinstance(obj, dict):
        children = obj.values()
    elif isinstance(obj, Rule):
        children = vars(obj).values()
    else:
        return
    for o in children:
        _walk(o, visit, depth + 1, seen_objs)


def state_ptrs(model: nn.Module) -> set:
    """Storages of parameters and buffers: module state, not cached activations."""
    return {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}


def operator_cache_bytes(op: hfopt.CurvatureOperator, exclude: set) -> Dict[str, int]:
    """Unique storages reachable from the rules' attributes in ``op.steps`` (and, listed
    apart, the per-step gradients a Hessian keeps and the loss curvature's tensors)."""
    # Snapshots of parameters/buffers the operator takes at build are module state too:
    # excluded like the parameters themselves, reported apart.
    snaps = {}
    for t in getattr(op, "_copies", {}).values():
        if isinstance(t, Tensor):
            ptr, nbytes = _storage(t)
            snaps[ptr] = nbytes
    exclude = set(exclude) | set(snaps)
    seen: Dict[int, int] = {}
    parts: Dict[str, int] = {"step_gradients": 0, "loss": 0, "parameter_snapshots": sum(snaps.values())}
    by_rule: Dict[str, int] = {}

    def visitor(part, acc):
        def visit(t: Tensor) -> None:
            ptr, nbytes = _storage(t)
            if ptr in exclude or ptr in seen or nbytes == 0:
                return
            seen[ptr] = nbytes
            acc[part] = acc.get(part, 0) + nbytes
        return visit

    # per-step gradients first: rules that cache statistics of g also keep a reference to it
    for step in op.steps:
        if step.gradient is not None:
            visitor("step_gradients", parts)(step.gradient)
    for step in op.steps:
        _walk(step.rule, visitor(type(step.rule).__name__, by_rule))
    _walk([op.output] + list(vars(op.loss_curvature).values()), visitor("loss", parts))
    parts["rules"] = sum(by_rule.values())
    parts["by_rule"] = by_rule
    parts["total"] = sum(seen.values())
    return parts


def autograd_saved_bytes(model: nn.Module, x: Tensor, exclude: set, loss_fn=None, y=None):
    """Unique storages autograd saves for backward during one ``model(x)`` with grad; with
    ``loss_fn``, also (forward, forward + ``grad(create_graph=True)``)."""
    seen: Dict[int, int] = {}

    def pack(t: Tensor):
        ptr, nbytes = _storage(t)
        if ptr not in exclude:
            seen[ptr] = nbytes
        return t

    # The operator is built for model and loss, so the forward compared includes the
    # loss (its log-softmax output and targets), as the operator's cache does.
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
        loss = None if loss_fn is None else loss_fn(out, y)
    fwd = sum(seen.values())
    if loss_fn is None:
        return fwd
    # what an autograd Hessian-vector product keeps: the forward plus the create_graph backward
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        g = torch.autograd.grad(loss, params, create_graph=True)
    del out, loss, g
    return fwd, sum(seen.values())


# ----------------------------------------------------------------------------- baselines
class Baselines:
    """Curvature products by autograd and torch.func at one point ``(model, x, y)``."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor):
        self.model, self.loss_fn, self.x, self.y = model, loss_fn, x, y
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.P = {n: p.detach() for n, p in named}
        self.buffers = dict(model.named_buffers())

    # -- torch.func -------------------------------------------------------------------
    def f(self, P: Dict[str, Tensor]) -> Tensor:
        # Buffers cloned inside the function: train-mode BN writes its running stats in
        # place, which torch.func refuses on captured tensors (and the real buffers
        # must not see).  The output depends on the batch statistics only.
        state = {k: b.clone() for k, b in self.buffers.items()}
        state.update(P)
        return functional_call(self.model, state, (self.x,))

    def L(self, P: Dict[str, Tensor]) -> Tensor:
        return self.loss_fn(self.f(P), self.y)

    def _out_hvp(self, z: Tensor, u: Tensor) -> Tensor:
        return func_jvp(func_grad(lambda o: self.loss_fn(o, self.y)), (z,), (u,))[1]

    def _as_dict(self, v: List[Tensor]) -> Dict[str, Tensor]:
        return dict(zip(self.names, v))

    def _as_list(self, d: Dict[str, Tensor]) -> List[Tensor]:
        return [d[n] for n in self.names]

    def func_gv(self, v: List[Tensor]) -> List[Tensor]:
        V = self._as_dict(v)
        z, Jv = func_jvp(self.f, (self.P,), (V,))
        _, vjp_fn = func_vjp(self.f, self.P)
        return self._as_list(vjp_fn(self._out_hvp(z.detach(), Jv))[0])

    def prepare_func_gv_cached(self) -> None:
        self._fz, self._fvjp = func_vjp(self.f, self.P)

    def func_gv_cached(self, v: List[Tensor]) -> List[Tensor]:
        _, Jv = func_jvp(self.f, (self.P,), (self._as_dict(v),))
        return self._as_list(self._fvjp(self._out_hvp(self._fz, Jv))[0])

    def func_hv(self, v: List[Tensor]) -> List[Tensor]:
        return self._as_list(func_jvp(func_grad(self.L), (self.P,), (self._as_dict(v),))[1])

    # -- autograd ---------------------------------------------------------------------
    def ag_grad(self) -> Tensor:
        for p in self.params:
            p.grad = None
        with torch.enable_grad():
            loss = self.loss_fn(self.model(self.x), self.y)
            loss.backward()
        return loss.detach()

    def ag_hv(self, v: List[Tensor]) -> List[Tensor]:
        with torch.enable_grad():
            loss = self.loss_fn(self.model(self.x), self.y)
            g = torch.autograd.grad(loss, self.params, create_graph=True)
            return list(torch.autograd.grad(g, self.params, v))

    def prepare_ag_hv_cached(self) -> None:
        with torch.enable_grad():
            loss = self.loss_fn(self.model(self.x), self.y)
            self._g = torch.autograd.grad(loss, self.params, create_graph=True)

    def ag_hv_cached(self, v: List[Tensor]) -> List[Tensor]:
        with torch.enable_grad():
            return list(torch.autograd.grad(self._g, self.params, v, retain_graph=True))

    def _ggn_graph(self):
        z = self.model(self.x)
        u = torch.zeros_like(z, requires_grad=True)
        jtu = torch.autograd.grad(z, self.params, u, create_graph=True)  # J^T u, linear in u
        zz = z.detach().requires_grad_(True)
        gz = torch.autograd.grad(self.loss_fn(zz, self.y), zz, create_graph=True)[0]
        return z, u, jtu, zz, gz

    def _ggn_product(self, graph, v: List[Tensor], retain: bool) -> List[Tensor]:
        z, u, jtu, zz, gz = graph
        jv = torch.autograd.grad(jtu, u, v, retain_graph=True)[0]            # double-vjp trick: J v
        hjv = torch.autograd.grad(gz, zz, jv, retain_graph=retain)[0]        # loss Hessian
        return list(torch.autograd.grad(z, self.params, hjv, retain_graph=retain))  # J^T (.)

    def ag_gv(self, v: List[Tensor]) -> List[Tensor]:
        with torch.enable_grad():
            return self._ggn_product(self._ggn_graph(), v, retain=False)

    def prepare_ag_gv_cached(self) -> None:
        with torch.enable_grad():
            self._ggn = self._ggn_graph()

    def ag_gv_cached(self, v: List[Tensor]) -> List[Tensor]:
        with torch.enable_grad():
            return self._ggn_product(self._ggn, v, retain=True)

    def release(self) -> None:
        for k in ("_fz", "_fvjp", "_g", "_ggn"):
            self.__dict__.pop(k, None)


# ----------------------------------------------------------------------------- per model
def setup(name: str, args, device: torch.device):
    """Model (train mode), loss, batch and a direction, all from ``args.seed``."""
    torch.manual_seed(args.seed)
    model = build_model(name).to(device).train()
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    x = torch.randn(args.batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    v = [torch.randn(p.shape, generator=gen).to(device) for p in model.parameters() if p.requires_grad]
    return model, nn.CrossEntropyLoss(), x, y, v


def bench_model(name: str, args, device: torch.device, timer: Timer) -> dict:
    model, loss_fn, x, y, v = setup(name, args, device)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)

    base = Baselines(model, loss_fn, x, y)
    # The eager gradient of a channels-last copy: what the engine's internal
    # layout would give a user who converted the model (a second, info unit).
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    base_cl = Baselines(model_cl, loss_fn, x.contiguous(memory_format=torch.channels_last), y)
    G = hfopt.GGN(model, loss_fn, x, y)
    H = hfopt.Hessian(model, loss_fn, x, y)
    fallbacks = sorted(set(G.fallbacks))
    n_steps = len(G.steps)
    channels_last = G.channels_last
    base.prepare_func_gv_cached()
    base.prepare_ag_hv_cached()
    base.prepare_ag_gv_cached()
    compile_s = {}
    if args.compile:
        # Compiled once per process; the compile time is reported, not timed.
        Gc = hfopt.GGN(model, loss_fn, x, y, compile=True)
        Hc = hfopt.Hessian(model, loss_fn, x, y, compile=True)
        for key, op in (("hf_gv_compiled", Gc), ("hf_hv_compiled", Hc)):
            t0 = time.perf_counter()
            op @ v
            compile_s[key] = time.perf_counter() - t0
            print(f"  [{name}] {key}: first call (compilation) {compile_s[key]:.1f} s", file=sys.stderr, flush=True)
        if hfopt.compiled.compile_failure():
            raise SystemExit(f"--compile: compilation failed ({hfopt.compiled.compile_failure()})")

    contenders: Dict[str, Callable] = {
        "grad": base.ag_grad,
        "grad_channels_last": base_cl.ag_grad,
        "hf_build_ggn": lambda: hfopt.GGN(model, loss_fn, x, y),
        "hf_build_hessian": lambda: hfopt.Hessian(model, loss_fn, x, y),
        "hf_gv": lambda: G @ v,
        "hf_hv": lambda: H @ v,
        **({"hf_gv_compiled": lambda: Gc @ v, "hf_hv_compiled": lambda: Hc @ v} if args.compile else {}),
        "func_gv": lambda: base.func_gv(v),
        "func_gv_cached": lambda: base.func_gv_cached(v),
        "func_hv": lambda: base.func_hv(v),
        "ag_hv": lambda: base.ag_hv(v),
        "ag_hv_cached": lambda: base.ag_hv_cached(v),
        "ag_gv": lambda: base.ag_gv(v),
        "ag_gv_cached": lambda: base.ag_gv_cached(v),
    }
    print(f"\n[{name}] {n_params:,} parameters, {len(G.steps)} rule steps; timing {len(contenders)} "
          f"contenders x {args.repeats} repeats ...", file=sys.stderr, flush=True)
    times = timer.round_robin(contenders, args.repeats, warmup=args.warmup, label=name, block=args.block)
    cpu, faults = timer.cpu, timer.faults
    base.release()
    ms = {k: med_ms(s) for k, s in times.items()}
    unit = ms["grad"]

    # memory: operator caches (after one product, so lazily cached tensors count) vs autograd
    excl = state_ptrs(model)
    G @ v
    H @ v
    mem_g = operator_cache_bytes(G, excl)
    mem_h = operator_cache_bytes(H, excl)
    saved, saved_2nd = autograd_saved_bytes(model, x, excl, loss_fn, y)
    del G, H

    def tgt(key, label, ok, target, value):
        return {"key": key, "label": label, "target": target, "value": value, "pass": ok}

    t_gv, t_hv = RATIO_TARGETS.get(name, DEFAULT_RATIO_TARGETS)
    cl = ms["grad_channels_last"]
    sp_gv = ms["func_gv"] / ms["hf_gv"]
    sp_gv_c = ms["func_gv_cached"] / ms["hf_gv"]
    sp_hv = ms["ag_hv"] / ms["hf_hv"]
    sp_hv_c = ms["ag_hv_cached"] / ms["hf_hv"]
    targets = [
        tgt("gv_ratio", "G@v / gradient", ms["hf_gv"] / unit <= t_gv, f"<= {t_gv:.2f}x",
            ms["hf_gv"] / unit),
        tgt("gv_ratio_cl", "  (info) G@v / channels-last gradient", ms["hf_gv"] / cl <= t_gv, f"<= {t_gv:.2f}x",
            ms["hf_gv"] / cl),
        tgt("gv_vs_func", "G@v speedup vs torch.func jvp+vjp", sp_gv >= T_GV_SPEEDUP, f">= {T_GV_SPEEDUP}x", sp_gv),
        tgt("gv_vs_func_cached", "  (info) vs torch.func jvp + cached vjp", sp_gv_c >= T_GV_SPEEDUP,
            f">= {T_GV_SPEEDUP}x", sp_gv_c),
        tgt("hv_ratio", "H@v / gradient", ms["hf_hv"] / unit <= t_hv, f"<= {t_hv:.2f}x",
            ms["hf_hv"] / unit),
        tgt("hv_ratio_cl", "  (info) H@v / channels-last gradient", ms["hf_hv"] / cl <= t_hv, f"<= {t_hv:.2f}x",
            ms["hf_hv"] / cl),
        tgt("hv_vs_autograd", "H@v speedup vs autograd double backward", sp_hv >= T_HV_SPEEDUP,
            f">= {T_HV_SPEEDUP}x", sp_hv),
        tgt("hv_vs_autograd_cached", "  (info) vs double backward, cached grad graph", sp_hv_c >= T_HV_SPEEDUP,
            f">= {T_HV_SPEEDUP}x", sp_hv_c),
        tgt("build_ggn", "GGN build / gradient", ms["hf_build_ggn"] / unit <= T_BUILD_RATIO,
            f"<= {T_BUILD_RATIO:.2f}x", ms["hf_build_ggn"] / unit),
        tgt("build_hessian", "Hessian build / gradient", ms["hf_build_hessian"] / unit <= T_BUILD_RATIO,
            f"<= {T_BUILD_RATIO:.2f}x", ms["hf_build_hessian"] / unit),
        tgt("mem_ggn", "GGN cache / autograd saved", mem_g["total"] <= saved, "<= 1.00x", mem_g["total"] / saved),
        tgt("mem_hessian", "  (info) Hessian cache / autograd saved", mem_h["total"] <= saved, "<= 1.00x",
            mem_h["total"] / saved),
        tgt("mem_hessian_2nd", "  (info) Hessian cache / autograd fwd+create_graph", mem_h["total"] <= saved_2nd,
            "<= 1.00x", mem_h["total"] / saved_2nd),
    ]
    if args.compile:
        targets += [
            tgt("gv_ratio_compiled", "G@v, compile=True / gradient", ms["hf_gv_compiled"] / unit <= t_gv,
                f"<= {t_gv:.2f}x", ms["hf_gv_compiled"] / unit),
            tgt("hv_ratio_compiled", "H@v, compile=True / gradient", ms["hf_hv_compiled"] / unit <= t_hv,
                f"<= {t_hv:.2f}x", ms["hf_hv_compiled"] / unit),
            tgt("gv_vs_func_compiled", "G@v, compile=True, speedup vs torch.func",
                ms["func_gv"] / ms["hf_gv_compiled"] >= T_GV_SPEEDUP, f">= {T_GV_SPEEDUP}x",
                ms["func_gv"] / ms["hf_gv_compiled"]),
            tgt("hv_vs_autograd_compiled", "H@v, compile=True, speedup vs double backward",
                ms["ag_hv"] / ms["hf_hv_compiled"] >= T_HV_SPEEDUP, f">= {T_HV_SPEEDUP}x",
                ms["ag_hv"] / ms["hf_hv_compiled"]),
        ]
    return {
        "params": n_params,
        "steps": n_steps,
        "compile_seconds": compile_s,
        "channels_last": channels_last,
        "fallbacks": fallbacks,
        "times_ms": {k: {"median": ms[k], "ratio": ms[k] / unit, "min": min(times[k]) * 1e3,
                         "samples": [t * 1e3 for t in times[k]], "cpu_median": med_ms(cpu[k]),
                         "minor_faults_median": statistics.median(faults[k])}
                     for k in times},
        "memory_bytes": {"hf_ggn": mem_g, "hf_hessian": mem_h, "autograd_saved": saved,
                         "autograd_saved_create_graph": saved_2nd},
        "targets": targets,
    }


ROWS = [
    ("grad", "gradient: forward + loss.backward()", None),
    ("grad_channels_last", "gradient, channels-last model copy", None),
    ("hf_build_ggn", "hfopt GGN build", "build_ggn"),
    ("hf_build_hessian", "hfopt Hessian build", "build_hessian"),
    ("hf_gv", "hfopt G@v", "gv_ratio"),
    ("hf_hv", "hfopt H@v", "hv_ratio"),
    ("hf_gv_compiled", "hfopt G@v, compile=True", "gv_ratio_compiled"),
    ("hf_hv_compiled", "hfopt H@v, compile=True", "hv_ratio_compiled"),
    ("func_gv", "torch.func GGN  jvp + vjp", None),
    ("func_gv_cached", "torch.func GGN  jvp + cached vjp", None),
    ("func_hv", "torch.func H    fwd-over-rev", None),
    ("ag_gv", "autograd GGN    double-vjp + vjp", None),
    ("ag_gv_cached", "autograd GGN    cached graph", None),
    ("ag_hv", "autograd H      double backward", None),
    ("ag_hv_cached", "autograd H      cached grad graph", None),
]


def print_model(name: str, r: dict, args, device) -> None:
    t = r["times_ms"]
    tg = {x["key"]: x for x in r["targets"]}
    print(f"\n=== {name}: batch {args.batch}x3x32x32 float32, {device.type}, {torch.get_num_threads()} threads, "
          f"{r['params']:,} params, {r['steps']} rule steps, engine layout "
          f"{'channels-last' if r['channels_last'] else 'contiguous'}"
          + (f", FALLBACKS: {r['fallbacks']}" if r["fallbacks"] else "") + " ===")
    print(f"{'contender':40s} {'median ms':>10s} {'x grad':>8s}   {'target':>10s}  {'status':6s} "
          f"{'cpu ms':>8s} {'cpu x':>6s} {'faults':>7s}")
    for key, label, tkey in ROWS:
        if key not in t:  # the compiled rows without --compile
            continue
        line = f"{label:40s} {t[key]['median']:10.1f} {t[key]['ratio']:8.2f}"
        line += (f"   {tg[tkey]['target']:>10s}  {status(tg[tkey]['pass']):6s}" if tkey else " " * 21)
        line += f" {t[key]['cpu_median']:8.1f} {t[key]['cpu_median'] / t['grad']['cpu_median']:6.2f} " \
                f"{t[key]['minor_faults_median']:7.0f}"
        print(line)
    for key in ("gv_ratio_cl", "hv_ratio_cl", "gv_vs_func", "gv_vs_func_cached", "hv_vs_autograd",
                "hv_vs_autograd_cached", "gv_vs_func_compiled", "hv_vs_autograd_compiled"):
        if key not in tg:
            continue
        x = tg[key]
        print(f"{x['label']:49s} {x['value']:8.2f}x  {x['target']:>10s}  {status(x['pass'])}")
    m = r["memory_bytes"]
    print(f"{'memory: autograd saved for one forward':40s} {m['autograd_saved'] / MiB:8.2f} MiB")
    print(f"{'memory: autograd saved, fwd + create_graph':40s} {m['autograd_saved_create_graph'] / MiB:8.2f} MiB "
          f"(Hessian cache / this = {tg['mem_hessian_2nd']['value']:.2f}x)")
    for k, key, lab in (("hf_ggn", "mem_ggn", "memory: hfopt GGN cache"),
                        ("hf_hessian", "mem_hessian", "memory: hfopt Hessian cache")):
        x = tg[key]
        extra = "  [" + ", ".join(f"{rn} {b / MiB:.1f}" for rn, b in
                                  sorted(m[k]["by_rule"].items(), key=lambda kv: -kv[1]))
        extra += f", step gradients {m[k]['step_gradients'] / MiB:.1f}]"
        if m[k].get("parameter_snapshots"):
            extra += f" (+{m[k]['parameter_snapshots'] / MiB:.1f} MiB parameter snapshots, not counted)"
        print(f"{lab:40s} {m[k]['total'] / MiB:8.2f} MiB {x['value']:6.3f}x   {x['target']:>8s}  "
              f"{status(x['pass'])}{extra}")


# ----------------------------------------------------------------------------- BatchNorm alone
class BNCase:
    """One BatchNorm2d call at ``shape``: hfopt's rule and an autograd graph of it."""

    def __init__(self, shape, device, dtype=torch.float32, seed: int = 0):
        gen = torch.Generator(device="cpu").manual_seed(seed)

        def rnd(*s):
            return torch.randn(*s, generator=gen, dtype=dtype).to(device)

        C = shape[1]
        self.bn = nn.BatchNorm2d(C).to(device=device, dtype=dtype).train()
        with torch.no_grad():
            self.bn.weight.copy_(1 + 0.5 * rnd(C))
            self.bn.bias.copy_(0.1 * rnd(C))
        self.x = 2 + 3 * rnd(*shape)
        self.dx, self.g, self.h = rnd(*shape), rnd(*shape), rnd(*shape)
        self.dg, self.db = rnd(C), rnd(C)
        bn = self.bn
        # hfopt, as the engine builds it
        self.rule = BatchNormRule.from_module(bn)
        self.rule.setup([True], ("weight", "bias"))
        with torch.no_grad():
            self.rule.forward([self.x], {"weight": bn.weight, "bias": bn.bias})
        # autograd: one forward graph, shared by every product
        self.w, self.b = bn.weight, bn.bias
        self.xa = self.x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            self.ya = bn(self.xa)
            self.u = torch.zeros_like(self.ya, requires_grad=True)

    # hfopt
    def hf_jvp(self):
        return self.rule.jvp([self.dx], {"weight": self.dg, "bias": self.db})

    def hf_vjp(self):
        return self.rule.vjp(self.g, [True], ("weight", "bias"))

    def hf_residual(self):
        return self.rule.residual(self.g, [self.dx], {"weight": self.dg}, [True], ("weight",))

    def hf_hessian_vjp(self):
        return self.rule.hessian_vjp(self.h, self.g, [self.dx], {"weight": self.dg, "bias": self.db}, [True],
                                     ("weight", "bias"))

    # autograd
    def _jtu(self):
        return torch.autograd.grad(self.ya, (self.xa, self.w, self.b), self.u, create_graph=True)

    def ag_jvp(self, jtu=None):
        with torch.enable_grad():
            jtu = self._jtu() if jtu is None else jtu
            return torch.autograd.grad(jtu, self.u, (self.dx, self.dg, self.db), retain_graph=True)[0]

    def ag_vjp(self):
        with torch.enable_grad():
            return torch.autograd.grad(self.ya, (self.xa, self.w, self.b), self.g, retain_graph=True)

    def _gphi(self):
        # grad of phi = <g, y> w.r.t. (x, gamma), kept differentiable
        return torch.autograd.grad(self.ya, (self.xa, self.w), self.g, create_graph=True)

    def ag_residual(self, gphi=None):
        with torch.enable_grad():
            gphi = self._gphi() if gphi is None else gphi
            return torch.autograd.grad(gphi, (self.xa, self.w), (self.dx, self.dg), retain_graph=True)

    def ag_hessian_vjp(self, gphi=None):
        with torch.enable_grad():
            gphi = self._gphi() if gphi is None else gphi
            return torch.autograd.grad([self.ya, *gphi], (self.xa, self.w, self.b), [self.h, self.dx, self.dg],
                                       retain_graph=True)

    def prepare_cached(self):
        with torch.enable_grad():
            self.jtu_c = self._jtu()
            self.gphi_c = self._gphi()


BN_PRODUCTS = ["jvp", "vjp", "residual", "hessian_vjp"]


def bench_batchnorm(args, device, timer: Timer) -> dict:
    out = {}
    for shape in BN_SHAPES:
        case = BNCase(shape, device, seed=args.seed)
        case.prepare_cached()
        contenders = {
            "hf_jvp": case.hf_jvp, "ag_jvp": case.ag_jvp, "ag_jvp_cached": lambda: case.ag_jvp(case.jtu_c),
            "hf_vjp": case.hf_vjp, "ag_vjp": case.ag_vjp, "ag_vjp_cached": case.ag_vjp,
            "hf_residual": case.hf_residual, "ag_residual": case.ag_residual,
            "ag_residual_cached": lambda: case.ag_residual(case.gphi_c),
            "hf_hessian_vjp": case.hf_hessian_vjp, "ag_hessian_vjp": case.ag_hessian_vjp,
            "ag_hessian_vjp_cached": lambda: case.ag_hessian_vjp(case.gphi_c),
        }
        del contenders["ag_vjp_cached"]  # a VJP has nothing to cache beyond the forward graph
        print(f"\n[batchnorm {list(shape)}] timing {len(contenders)} contenders x {args.bn_repeats} repeats ...",
              file=sys.stderr, flush=True)
        times = timer.round_robin(contenders, args.bn_repeats, warmup=args.warmup, label=f"bn {list(shape)}")
        ms = {k: med_ms(s) for k, s in times.items()}
        faults = {k: statistics.median(f) for k, f in timer.faults.items()}
        rows = {}
        for p in BN_PRODUCTS:
            hf, ag = ms[f"hf_{p}"], ms[f"ag_{p}"]
            agc = ms.get(f"ag_{p}_cached")
            rows[p] = {"hf_ms": hf, "autograd_ms": ag, "autograd_cached_ms": agc,
                       "speedup": ag / hf, "speedup_cached": None if agc is None else agc / hf,
                       "hf_minor_faults": faults[f"hf_{p}"], "autograd_minor_faults": faults[f"ag_{p}"]}
        out["x".join(map(str, shape))] = {"shape": list(shape), "products": rows,
                                          "samples_ms": {k: [t * 1e3 for t in s] for k, s in times.items()}}
        del case
    key = "x".join(map(str, BN_TARGET_SHAPE))
    res = out[key]["products"]["residual"]
    out["target"] = {"label": f"BN residual speedup vs autograd at {list(BN_TARGET_SHAPE)}",
                     "target": f">= {T_BN_RES_SPEEDUP:g}x", "value": res["speedup"],
                     "pass": res["speedup"] >= T_BN_RES_SPEEDUP,
                     "value_cached": res["speedup_cached"],
                     "pass_cached": res["speedup_cached"] >= T_BN_RES_SPEEDUP}
    return out


def print_batchnorm(r: dict) -> None:
    print("\n=== BatchNorm2d products alone, train mode (float32): hfopt BatchNormRule vs autograd ===")
    print("autograd: JVP by double-vjp, VJP by autograd.grad, residual = grad of <grad(<g,y>), d>; "
          "'cached' keeps the first, v-independent grad graph")
    print(f"{'shape':18s} {'product':12s} {'hfopt ms':>9s} {'autograd ms':>12s} {'speedup':>8s} "
          f"{'cached ms':>10s} {'speedup':>8s} {'faults hf/ag':>14s}")
    for key, v in r.items():
        if key == "target":
            continue
        for p, row in v["products"].items():
            c_ms = "-" if row["autograd_cached_ms"] is None else f"{row['autograd_cached_ms']:.2f}"
            c_sp = "-" if row["speedup_cached"] is None else f"{row['speedup_cached']:.1f}x"
            print(f"{str(v['shape']):18s} {p:12s} {row['hf_ms']:9.2f} {row['autograd_ms']:12.2f} "
                  f"{row['speedup']:7.1f}x {c_ms:>10s} {c_sp:>8s} "
                  f"{row['hf_minor_faults']:>6.0f}/{row['autograd_minor_faults']:<7.0f}")
    t = r["target"]
    print(f"{t['label']}: {t['value']:.1f}x (target {t['target']}) {status(t['pass'])}; "
          f"vs cached-graph autograd {t['value_cached']:.1f}x {status(t['pass_cached'])}")


# ----------------------------------------------------------------------------- --check
def run_check(name: str, args, device) -> dict:
    """float64: hfopt's products vs autograd (and torch.func vs autograd) on one model,
    and each BatchNormRule product vs autograd."""
    torch.manual_seed(args.seed)
    model = build_model(name).to(device=device, dtype=torch.float64).train()
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    n = 16
    x = torch.randn(n, 3, 32, 32, generator=gen, dtype=torch.float64).to(device)
    y = torch.randint(0, 10, (n,), generator=gen).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    v = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device) for p in params]
    base = Baselines(model, loss_fn, x, y)
    G = hfopt.GGN(model, loss_fn, x, y)
    H = hfopt.Hessian(model, loss_fn, x, y)
    ag_gv, ag_hv = base.ag_gv(v), base.ag_hv(v)
    with torch.enable_grad():
        ag_g = list(torch.autograd.grad(loss_fn(model(x), y), params))
    errs = {
        "hfopt G@v vs autograd GGN": rel_err(G @ v, ag_gv),
        "hfopt H@v vs autograd double backward": rel_err(H @ v, ag_hv),
        "hfopt gradient vs autograd": rel_err(H.gradient(), ag_g),
        "torch.func GGN vs autograd GGN": rel_err(base.func_gv(v), ag_gv),
        "torch.func fwd-over-rev H vs autograd": rel_err(base.func_hv(v), ag_hv),
        "G@v vs H@v (GGN != Hessian expected)": rel_err(G @ v, ag_hv),
    }
    base.prepare_func_gv_cached()
    base.prepare_ag_gv_cached()
    base.prepare_ag_hv_cached()
    errs["torch.func cached GGN vs autograd GGN"] = rel_err(base.func_gv_cached(v), ag_gv)
    errs["autograd cached GGN vs autograd GGN"] = rel_err(base.ag_gv_cached(v), ag_gv)
    errs["autograd cached H vs autograd H"] = rel_err(base.ag_hv_cached(v), ag_hv)
    base.release()
    c = BNCase((8, 6, 5, 7), device, dtype=torch.float64, seed=args.seed)
    (gx,), gp = c.hf_vjp()
    (rx,), rp = c.hf_residual()
    (hx,), hp = c.hf_hessian_vjp()
    ar = c.ag_residual()
    ah = c.ag_hessian_vjp()
    errs["BN rule jvp vs autograd"] = rel_err([c.hf_jvp()], [c.ag_jvp()])
    errs["BN rule vjp vs autograd"] = rel_err([gx, gp["weight"], gp["bias"]], list(c.ag_vjp()))
    errs["BN rule residual vs autograd"] = rel_err([rx, rp["weight"]], list(ar))
    errs["BN rule hessian_vjp vs autograd"] = rel_err([hx, hp["weight"], hp["bias"]], list(ah))
    print(f"\n=== --check: float64, {name}, batch {n}, train mode: relative errors ===")
    ok = True
    for k, e in errs.items():
        expect_diff = "expected" in k
        good = e > 1e-3 if expect_diff else e < 1e-9
        ok &= good
        print(f"  {k:45s} {e:10.3e}  {'ok' if good else 'FAIL'}")
    print(f"  check {'passed' if ok else 'FAILED'}")
    return {"model": name, "batch": n, "rel_err": errs, "ok": ok}


# ----------------------------------------------------------------------------- --profile
def _label_rules(op: hfopt.CurvatureOperator) -> None:
    """Wrap each rule's products in record_function ``hf::<Rule>.<method>`` (outermost call
    only, so base-class hessian_vjp -> vjp is not counted twice)."""
    from torch.profiler import record_function

    for step in op.steps:
        rule = step.rule
        depth = [0]
        for meth in ("jvp", "vjp", "residual", "hessian_vjp"):
            orig = getattr(rule, meth)
            label = f"hf::{type(rule).__name__}.{meth}"

            def wrapped(*a, _orig=orig, _label=label, _depth=depth, **kw):
                if _depth[0]:
                    return _orig(*a, **kw)
                _depth[0] += 1
                try:
                    with record_function(_label):
                        return _orig(*a, **kw)
                finally:
                    _depth[0] -= 1

            setattr(rule, meth, wrapped)
    lc = op.loss_curvature
    hvp = lc.hvp

    def lhvp(u, _hvp=hvp):
        with record_function("hf::loss.hvp"):
            return _hvp(u)

    lc.hvp = lhvp


_DENSE_OPS = ("convolution", "mkldnn_conv", "addmm", "aten::mm", "aten::bmm", "aten::matmul")


def _dense_ms(events) -> float:
    """Self CPU ms in convolution / matmul kernels (the MAC-bound part)."""
    return sum(e.self_cpu_time_total for e in events if any(k in e.key for k in _DENSE_OPS)) / 1e3


def run_profile(name: str, args, device) -> dict:
    from torch.profiler import ProfilerActivity, profile, record_function

    model, loss_fn, x, y, v = setup(name, args, device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = {}
    for kind, cls in (("G@v", hfopt.GGN), ("H@v", hfopt.Hessian)):
        op = cls(model, loss_fn, x, y)
        _label_rules(op)
        for _ in range(2):
            op @ v
        with profile(activities=acts) as prof:
            for _ in range(5):
                with record_function(f"hf::product {kind}"):
                    op @ v
                if device.type == "cuda":
                    torch.cuda.synchronize()
        ka = prof.key_averages()
        ops = [e for e in ka if not e.key.startswith("hf::")]
        ops.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
        total_self = sum(e.self_cpu_time_total for e in ka)
        print(f"\n=== --profile {name}: 5 x {kind}, batch {args.batch}; top-20 ops by self CPU time ===")
        print(f"{'op':42s} {'self CPU ms':>11s} {'%':>6s} {'calls':>6s} {'ms/product':>10s}")
        top = []
        for e in ops[:20]:
            sc = e.self_cpu_time_total / 1e3
            top.append({"op": e.key, "self_cpu_ms": sc, "calls": e.count})
            print(f"{e.key[:42]:42s} {sc:11.2f} {100 * e.self_cpu_time_total / total_self:6.1f} {e.count:6d} "
                  f"{sc / 5:10.2f}")
        rules = [e for e in ka if e.key.startswith("hf::") and not e.key.startswith("hf::product")]
        rules.sort(key=lambda e: e.cpu_time_total, reverse=True)
        prod = [e for e in ka if e.key.startswith("hf::product")][0]
        ptotal = prod.cpu_time_total / 1e3
        in_rules = sum(e.cpu_time_total for e in rules) / 1e3
        print(f"--- where the {kind} time goes, by rule (inclusive CPU ms over 5 products; "
              f"total {ptotal:.1f} ms = {ptotal / 5:.1f} ms/product under the profiler) ---")
        by_rule = []
        for e in rules:
            t = e.cpu_time_total / 1e3
            by_rule.append({"rule": e.key[4:], "cpu_ms": t, "calls": e.count})
            print(f"  {e.key[4:]:34s} {t:9.2f} ms {100 * t / ptotal:5.1f}%  calls {e.count}")
        eng = ptotal - in_rules
        print(f"  {'engine (outside rules)':34s} {eng:9.2f} ms {100 * eng / ptotal:5.1f}%")
        dense = _dense_ms(ops)
        print(f"--- conv/matmul kernels: {dense / 5:.1f} ms/product ({100 * dense / ptotal:.0f}%), everything else "
              f"{(ptotal - dense) / 5:.1f} ms/product ---")
        if device.type == "cuda":
            try:
                print(ka.table(sort_by="self_device_time_total", row_limit=20))
            except Exception as exc:  # noqa: BLE001 - older profilers name the column differently
                print(f"(no device table: {exc})")
        out[kind] = {"top_ops": top, "by_rule": by_rule, "total_ms": ptotal, "dense_ms": dense}
        del op
    # references: the unit (eager gradient) and the two builds, op by op
    base = Baselines(model, loss_fn, x, y)
    refs = {"grad": ("gradient (the unit)", base.ag_grad),
            "build_ggn": ("GGN build", lambda: hfopt.GGN(model, loss_fn, x, y)),
            "build_hessian": ("Hessian build", lambda: hfopt.Hessian(model, loss_fn, x, y))}
    for key, (label, fn) in refs.items():
        for _ in range(2):
            fn()
        with profile(activities=acts) as prof:
            for _ in range(5):
                with record_function("hf::product ref"):
                    out_ = fn()
                del out_
        ka = prof.key_averages()
        total = [e for e in ka if e.key == "hf::product ref"][0].cpu_time_total / 1e3
        ops = sorted((e for e in ka if not e.key.startswith("hf::")), key=lambda e: e.self_cpu_time_total,
                     reverse=True)
        print(f"\n=== --profile {name}: 5 x {label}, {total / 5:.1f} ms each under the profiler; "
              "top-12 ops by self CPU time ===")
        top = []
        for e in ops[:12]:
            sc = e.self_cpu_time_total / 1e3
            top.append({"op": e.key, "self_cpu_ms": sc, "calls": e.count})
            print(f"{e.key[:42]:42s} {sc:11.2f} {100 * sc / total:6.1f} {e.count:6d} {sc / 5:10.2f}")
        dense = _dense_ms(ops)
        print(f"--- conv/matmul kernels: {dense / 5:.1f} ms/call ({100 * dense / total:.0f}%), everything else "
              f"{(total - dense) / 5:.1f} ms/call ---")
        out[key] = {"top_ops": top, "total_ms": total, "dense_ms": dense}
    return out


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="c3d3_bn,resnet20_bn,convnet",
                    help="comma-separated: convnet (defined here) or any of models.MODELS")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 128; 32 with --quick)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed rounds, median reported (default 7; 3 with --quick)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    ap.add_argument("--block", type=int, default=None,
                    help="calls of one contender back to back per round, as CG makes them; all but the "
                         "first are timed (default 3; 2 with --quick; 1: every call timed, pure round-robin)")
    ap.add_argument("--bn-repeats", type=int, default=None, help="rounds for the BatchNorm micro-benchmark "
                    "(default: --repeats)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: leave torch's default); 1 is steadier on a loaded machine")
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 32, 3 repeats")
    ap.add_argument("--check", action="store_true", help="float64 agreement of all products with autograd first")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler over 5 G@v and 5 H@v on the first model: top-20 ops by self CPU time")
    ap.add_argument("--profile-only", action="store_true", help="only --check/--profile, no timing table")
    ap.add_argument("--skip-bn", action="store_true", help="skip the BatchNorm micro-benchmark")
    ap.add_argument("--compile", action="store_true",
                    help="also time compile=True operators (torch.compile; compilation reported, not timed)")
    ap.add_argument("--json", default=None, help="output path (default benchmarks/results/curvature-<device>.json)")
    args = ap.parse_args(argv)
    args.batch = args.batch or (32 if args.quick else 128)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.block = args.block or (2 if args.quick else 3)
    args.bn_repeats = args.bn_repeats or args.repeats
    if args.profile_only:
        args.profile = True
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    device = torch.device(args.device)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    for n in names:
        build_model(n)  # fail early on unknown names
    timer = Timer(device)
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "code": code_version(),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "batch": args.batch, "repeats": args.repeats, "block": args.block, "warmup": args.warmup,
        "seed": args.seed,
        "quick": args.quick, "compile": args.compile, "dtype": "float32", "loss": "CrossEntropyLoss", "mode": "train",
        "torch_func_bn": "functional_call with buffer clones created inside the function",
    }
    print(f"hfopt {hfopt.__version__} (git {meta['code'].get('git_head', '?')}"
          f"{', hfopt/ modified' if meta['code'].get('hfopt_dirty') else ''}, sources "
          f"{meta['code']['hfopt_sources_sha256']}) curvature benchmark: torch {torch.__version__}, {args.device}, "
          f"{torch.get_num_threads()} threads, batch {args.batch}, {args.repeats} rounds of {args.block} back-to-back calls "
          f"(+{args.warmup} warm-up)")
    load = meta["loadavg_start"]
    if load and os.cpu_count() and load[0] > 0.25 * os.cpu_count():
        print(f"WARNING: load average {load[0]:.2f} on {os.cpu_count()} CPUs: other processes compete for the "
              "cores; absolute times will be inflated and noisy (ratios less so, thanks to round-robin)")
    result: dict = {"meta": meta, "models": {}}
    if args.check:
        result["check"] = run_check(names[0], args, device)
    if args.profile:
        result["profile"] = {"model": names[0], **run_profile(names[0], args, device)}
    if not args.profile_only:
        for n in names:
            result["models"][n] = bench_model(n, args, device, timer)
            print_model(n, result["models"][n], args, device)
        if not args.skip_bn:
            result["batchnorm"] = bench_batchnorm(args, device, timer)
            print_batchnorm(result["batchnorm"])
        print_summary(result)
    meta["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    path = Path(args.json) if args.json else ROOT / "benchmarks" / "results" / f"curvature-{args.device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}")
    return 0


def code_version() -> dict:
    """The library version the numbers belong to: git HEAD, whether hfopt/ has local
    changes, and a hash of hfopt's sources as imported."""
    import hashlib
    import subprocess

    h = hashlib.sha256()
    for f in sorted(Path(hfopt.__file__).parent.rglob("*.py")):
        h.update(f.relative_to(ROOT).as_posix().encode())
        h.update(f.read_bytes())
    out = {"hfopt_sources_sha256": h.hexdigest()[:16]}
    try:
        out["git_head"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                         text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "hfopt"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        out["hfopt_dirty"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def print_summary(result: dict) -> None:
    print("\n=== targets (ratios are time / gradient time of the same model) ===")
    header = [n for n in result["models"]]
    keys = [t["key"] for t in next(iter(result["models"].values()))["targets"]] if header else []
    print(f"{'target':50s}" + "".join(f"{n:>22s}" for n in header))
    passed = total = 0
    for k in keys:
        first = next(t for t in result["models"][header[0]]["targets"] if t["key"] == k)
        line = f"{first['label'] + ' ' + first['target']:50s}"
        for n in header:
            t = next(t for t in result["models"][n]["targets"] if t["key"] == k)
            line += f"{t['value']:>15.2f} {status(t['pass']):>6s}"
            if "(info)" not in t["label"]:
                total += 1
                passed += bool(t["pass"])
        print(line)
    if "batchnorm" in result:
        t = result["batchnorm"]["target"]
        print(f"{t['label'] + ' ' + t['target']:50s}{t['value']:>15.2f} {status(t['pass']):>6s}")
        total += 1
        passed += bool(t["pass"])
    print(f"{passed}/{total} targets met ('(info)' rows compare against stronger, cached baselines and are "
          "not counted)")


if __name__ == "__main__":
    sys.exit(main())
