"""The external-style zoo (tests/external_zoo.py) on CUDA: every model's G@v,
H@v, gradient and output against float64 autograd on the GPU, the same checks
as tests/test_external_zoo.py, plus the forward guard with train-mode dropout
(CUDA's fused dropout kernel) on one model.

    python benchmarks/gpu_external.py [--out results/gpu_external.json]
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

import hfopt  # noqa: E402
from conftest import check_exact  # noqa: E402
from external_zoo import EVAL_MODELS, ZOO  # noqa: E402
from test_external_zoo import fixed_references  # noqa: E402


def _cuda(model, x, y):
    model = model.cuda()
    return model, x.cuda(), y.cuda()


def run(out: Path) -> dict:
    rows = []
    for name in sorted(ZOO):
        for train in ((True, False) if name in EVAL_MODELS else (True,)):
            model, x, y = _cuda(*ZOO[name]())
            model.train(train)
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings(), fixed_references():
                    warnings.simplefilter("ignore")
                    res = check_exact(model, nn.CrossEntropyLoss(), x, y, seed=0)
                rows.append({"model": name, "train": train, "errors": res["errors"],
                             "fallbacks": res["ops"]["ggn"].fallbacks, "ok": True})
            except Exception as exc:  # noqa: BLE001 - reported, not hidden
                rows.append({"model": name, "train": train, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:400]})
            rows[-1]["seconds"] = round(time.perf_counter() - t0, 2)
            print(json.dumps(rows[-1]), flush=True)
    # The guard on CUDA with train-mode dropout: the engine draws F.dropout's mask.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, 10))
    model = model.cuda().train()
    x, y = torch.randn(256, 64, device="cuda"), torch.randint(0, 10, (256,), device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hfopt.GGN(model, nn.CrossEntropyLoss(), x, y)
    guard = {"dropout_guard_warnings": [str(w.message)[:200] for w in caught if "hfopt" in str(w.message)]}
    print(json.dumps(guard))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows, **guard,
              "all_exact": all(r["ok"] for r in rows)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_external.json")
    a = p.parse_args()
    r = run(a.out)
    print("all exact:", r["all_exact"], "on", r["device"])
