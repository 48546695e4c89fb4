"""benchmarks/bench_external.py on tiny settings, and hfopt's exactness on the
external-style models it times (``models/external.py``).

* The smoke run times a few calls of every contender on a small model and checks
  the JSON's structure and that hfopt's float32 products agree with torch.func's.
* The float64 checks build each of the four networks at batch 2 and compare the
  GGN and Hessian products with autograd (``conftest.check_exact``), first as
  the benchmark runs them (dropout and drop path off), then with their random
  regularisation on (masks drawn from one seed for hfopt and the reference).

Inputs are 64x64, not 32x32: at 32x32 the last stages of ResNet-18, MobileNetV2
and EfficientNet-B0 are 1x1, and a train-mode BatchNorm over 2 samples x 1 pixel
normalises two nearly equal numbers; torch's own forward then loses 4 digits
in float64 (the engine's forward guard rightly refuses to vouch for it), and in
float32 a channels-last copy of the model disagrees with the model by 20%.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "benchmarks", ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import bench_external  # noqa: E402
from conftest import check_exact, labels, randn, randomize_bn  # noqa: E402
from models.external import EXTERNAL, NO_DROP, build_external  # noqa: E402

CONTENDERS = {"grad", "hf_build_ggn", "hf_build_hessian", "hf_gv", "hf_hv", "func_gv", "func_gv_cached", "func_hv"}


@pytest.fixture(autouse=True)
def restore_threads_and_dtype():
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)


def test_tiny_run(tmp_path: Path, monkeypatch):
    """ConvNeXt (no BatchNorm, well conditioned at batch 2) at 32x32: a few seconds.
    ResNet-18, MobileNetV2 and EfficientNet-B0 are left to the float64 checks below:
    at batch 2 their float32 products stray from float64 by up to 1e-2 (a train-mode
    BatchNorm over few values, a ReLU6 kink flipped by rounding), which a 1e-3
    agreement bound would test instead of the benchmark."""
    out = tmp_path / "external.json"
    name = "convnext_stack"
    monkeypatch.setitem(bench_external.T_GV_RATIO, name, 1.0)  # ResNet-18's target, exercised here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a missing rule warns; fallbacks are reported in the JSON
        rc = bench_external.main(["--models", name, "--batch", "2", "--size", "32", "--rounds", "1",
                                  "--block", "2", "--threads", "1", "--check64", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    meta = result["meta"]
    assert (meta["batch"], meta["size"], meta["rounds"], meta["block"], meta["dtype"]) == (2, 32, 1, 2, "float32")
    assert set(result["models"]) == {name}
    r = result["models"][name]
    assert "error" not in r, r.get("error")
    assert r["params"] == sum(p.numel() for p in build_external(name).parameters())
    assert set(r["times_ms"]) == CONTENDERS
    assert all(t["median"] > 0 and len(t["samples"]) == 1 for t in r["times_ms"].values())
    assert r["times_ms"]["grad"]["ratio"] == pytest.approx(1.0)
    assert isinstance(r["fallbacks"], list)
    # float32: the same products up to rounding, and both close to float64
    agree = r["agreement_f32"]
    assert agree["gv"] < 1e-3 and agree["hv"] < 1e-3, agree
    assert max(agree[k] for k in ("hf_gv_vs_f64", "hf_hv_vs_f64", "func_gv_vs_f64", "func_hv_vs_f64")) < 1e-3, agree
    keys = {t["key"] for t in r["targets"]}
    assert {"gv_vs_func", "hv_vs_func", "gv_ratio"} <= keys
    assert ("gv_vs_func_ruled" in keys) == ("hv_vs_func_ruled" in keys) == (not r["fallbacks"])
    assert all(isinstance(t["pass"], bool) for t in r["targets"])
    assert result["summary"]["total"] == len(r["targets"])


def test_unknown_model():
    with pytest.raises(SystemExit):
        bench_external.main(["--models", "vgg16"])


def _float64(name: str, drop: bool):
    torch.manual_seed(0)
    model = randomize_bn(build_external(name, num_classes=5, drop=drop).double(), seed=1).train()
    return model, randn(2, 3, 64, 64, seed=2), labels(2, 5, seed=3)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXTERNAL))
def test_exact_float64(name, single_thread):
    """As benchmarked: no dropout / drop path, BatchNorm in train mode."""
    model, x, y = _float64(name, drop=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallbacks are allowed here; wrong numbers are not
        check_exact(model, torch.nn.CrossEntropyLoss(), x, y, tag=f"[external {name}]")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(n for n in EXTERNAL if NO_DROP[n]))
def test_exact_float64_with_dropout(name, single_thread):
    """Dropout and timm-style drop path on: hfopt's build and every reference
    forward draw their masks from the same seed."""
    model, x, y = _float64(name, drop=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_exact(model, torch.nn.CrossEntropyLoss(), x, y, seed=0, tag=f"[external {name} drop]")
