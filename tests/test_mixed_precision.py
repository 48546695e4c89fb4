"""Products under ``torch.autocast``: the rules run in the autocast dtype
(bfloat16 on the CPU and the GPU, float16 on the GPU), the loss's output
derivatives and the results in the parameters' float32, so CG and its dot
products stay in float32.  Errors are measured against float64."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import hfopt

CE = nn.CrossEntropyLoss()


def _setup(device="cpu"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Tanh(),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).float().to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 8, 8, generator=g, dtype=torch.float32).to(device)
    y = torch.randint(0, 5, (16,), generator=g).to(device)
    v = [torch.randn(p.shape, generator=g, dtype=torch.float32).to(device) for p in model.parameters()]
    return model, x, y, v


def _rel(a, b) -> float:
    num = math.sqrt(sum(float(((p.double() - q.double()) ** 2).sum()) for p, q in zip(a, b)))
    return num / math.sqrt(sum(float((q.double() ** 2).sum()) for q in b))


def _check(device: str, dtype: torch.dtype, tol: float):
    model, x, y, v = _setup(device)
    ref_model = copy.deepcopy(model).double()
    before = copy.deepcopy(model.state_dict())
    for cls in (hfopt.GGN, hfopt.Hessian):
        want = cls(ref_model, CE, x.double(), y) @ [t.double() for t in v]
        with torch.autocast(device, dtype=dtype):
            op = cls(model, CE, x, y)
            got = op @ v
            grad = op.gradient()
        assert op.compute_dtype == dtype and op.output.dtype == dtype
        assert all(t.dtype == torch.float32 for t in got + grad)
        assert _rel(got, want) < tol
        assert _rel(grad, cls(ref_model, CE, x.double(), y).gradient()) < tol
        # Outside autocast the same operator still runs in its build's dtype.
        assert _rel(op @ v, got) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.values()))


def test_bfloat16_autocast_on_cpu():
    _check("cpu", torch.bfloat16, tol=0.1)  # 8 mantissa bits: about 2e-2 (GGN) and 4e-2 (Hessian) here


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_autocast_on_cuda(dtype, tol):
    _check("cuda", dtype, tol)


def test_without_autocast_the_products_are_float32_exact():
    model, x, y, v = _setup()
    op = hfopt.GGN(model, CE, x, y)
    assert op.compute_dtype is None
    want = hfopt.GGN(copy.deepcopy(model).double(), CE, x.double(), y) @ [t.double() for t in v]
    assert _rel(op @ v, want) < 1e-5


def test_hf_step_under_autocast_solves_in_float32():
    model, x, y, _ = _setup()
    # bfloat16 is emulated on CPUs without AVX512-BF16/AMX: few, short solves.
    opt = hfopt.HFOptimizer(model.parameters(), cg_max_iterations=8)

    def closure():
        outputs = model(x)
        return CE(outputs, y), outputs

    losses = []
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(float(opt.step(closure)))
        assert opt.last_step["engine"] == "rules"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < losses[0]
