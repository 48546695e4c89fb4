"""Real torchvision and timm models through hfopt: each model's G@v, H@v and
gradient against float64 autograd (reverse-over-reverse), fallbacks, and what
the engine refused.  Random weights, BatchNorm in train mode, dropout-like
layers in eval mode, batch 4 at 3x64x64, 10 classes.

    python benchmarks/real_models.py [--models a,b] [--size 64]

Needs torchvision and timm (not dependencies of hfopt).  PyPI's torchvision
wheel is a CUDA build: beside a CPU torch its C ops cannot load, and importing
it fails on the missing ``torchvision::nms`` schema; ``--define-tv-ops``
declares the two schemas first (the model definitions are pure Python and never
call the C ops).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

TORCHVISION = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "densenet121", "googlenet",
               "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5", "shufflenet_v2_x0_5", "efficientnet_b0",
               "regnet_x_400mf", "regnet_y_400mf", "convnext_tiny", "squeezenet1_1", "alexnet", "vgg11_bn"]
TIMM = ["resnet18d", "seresnext26d_32x4d", "dla34", "efficientnet_b0", "tf_efficientnet_b0", "mobilenetv3_small_050",
        "ghostnet_050", "regnety_002", "dpn68", "resnest14d", "resnetv2_50x1_bit", "nfnet_l0", "convnext_atto",
        "hrnet_w18_small", "mixnet_s", "cspresnet50", "rexnet_100", "inception_v3", "xception41"]


SEED = 0


def _define_tv_ops() -> None:
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _define_tv_ops.lib = lib  # keep the library alive


def _build(source: str, name: str) -> nn.Module:
    if source == "torchvision":
        import torchvision.models as tvm
        kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
        return getattr(tvm, name)(num_classes=10, **kwargs)
    import timm
    return timm.create_model(name, pretrained=False, num_classes=10)


def _dropout_eval(model: nn.Module) -> None:
    for m in model.modules():
        if "drop" in type(m).__name__.lower() or "stochasticdepth" in type(m).__name__.lower():
            m.eval()


def check(source: str, name: str, size: int) -> dict:
    import hfopt
    from conftest import rand_vec, ref_ggnvp, ref_grad, ref_hvp, rel_err
    from test_external_zoo import reference_fixes  # autograd's own gaps (hardsigmoid, _weight_norm)
    torch.manual_seed(0)
    model = _build(source, name).double().train()
    _dropout_eval(model)
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    y = torch.randint(0, 10, (4,))
    loss = nn.CrossEntropyLoss()
    row = {"source": source, "model": name, "params": sum(p.numel() for p in model.parameters())}
    t0 = time.perf_counter()
    try:
        # Functional dropout in a forward (timm's heads: F.dropout(x, training=self.training))
        # stays random: every build and reference draws its masks from the same seed.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(SEED)
            G = hfopt.GGN(model, loss, x, y)
            torch.manual_seed(SEED)
            H = hfopt.Hessian(model, loss, x, y)
        v = rand_vec(model, seed=1)
        gv, hv, grad = G @ v, H @ v, G.gradient()
        with reference_fixes():
            row["ggn"] = rel_err(gv, ref_ggnvp(model, loss, x, y, v, seed=SEED))
            row["hessian"] = rel_err(hv, ref_hvp(model, loss, x, y, v, seed=SEED))
            row["gradient"] = rel_err(grad, ref_grad(model, loss, x, y, seed=SEED))
        row["fallbacks"] = sorted({f.split(": ", 1)[-1] for f in G.fallbacks})
        row["outcome"] = "exact" if max(row["ggn"], row["hessian"], row["gradient"]) < 1e-10 else "WRONG"
    except Exception as exc:  # noqa: BLE001 - the outcome is the report
        row["outcome"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="", help="comma-separated source:name (default: all listed)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--define-tv-ops", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "real_models.json")
    a = p.parse_args(argv)
    if a.define_tv_ops:
        _define_tv_ops()
    todo = [tuple(s.split(":", 1)) for s in a.models.split(",") if s] or \
        [("torchvision", n) for n in TORCHVISION] + [("timm", n) for n in TIMM]
    torch.set_num_threads(2)
    rows = []
    for source, name in todo:
        rows.append(check(source, name, a.size))
        r = rows[-1]
        print(f"{source:12s} {name:22s} {r['outcome'][:70]:70s} "
              f"G {r.get('ggn', float('nan')):.1e} H {r.get('hessian', float('nan')):.1e} "
              f"fallbacks {','.join(r.get('fallbacks', [])) or 'none'} ({r['seconds']} s)", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rows, indent=1))
    print(markdown(rows))
    return rows


def markdown(rows: list) -> str:
    """The README's table of a run."""
    lines = ["| library | model | parameters | G@v error | H@v error | gradient error | fallbacks | outcome |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        errs = [f"{r[k]:.1e}" if k in r else "" for k in ("ggn", "hessian", "gradient")]
        lines.append(f"| {r['source']} | `{r['model']}` | {r['params']:,} | {' | '.join(errs)} | "
                     f"{', '.join(r.get('fallbacks', [])) or 'none'} | {r['outcome'][:80]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
