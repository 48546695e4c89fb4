"""torchvision's ``stochastic_depth`` (``torchvision.ops.StochasticDepth``, used
by its ConvNeXt and EfficientNet) has a closed-form rule, recognised by name.
torchvision itself is not a test dependency: the function is written here as
torchvision writes it, under torchvision's module name, and wrapped for fx as
torchvision wraps it, so the engine sees exactly what it sees in a torchvision
model."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx
from torch import Tensor, nn

from conftest import check_exact, labels, make, randn

CE = nn.CrossEntropyLoss()
pytestmark = pytest.mark.usefixtures("single_thread")


def stochastic_depth(input: Tensor, p: float, mode: str, training: bool = True) -> Tensor:
    if not training or p == 0.0:
        return input
    survival_rate = 1.0 - p
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device).bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return input * noise


stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"
torch.fx.wrap("stochastic_depth")  # torchvision makes it a leaf of fx the same way


class StochasticDepth(nn.Module):
    def __init__(self, p: float, mode: str):
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, input: Tensor) -> Tensor:
        return stochastic_depth(input, self.p, self.mode, self.training)


class Block(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.drop = StochasticDepth(0.4, mode)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x + self.drop(torch.tanh(self.bn(self.conv(x)))))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", ["row", "batch"])
def test_torchvision_stochastic_depth_is_closed_form_and_exact(mode, train):
    model = make(Block(mode)).train(train)
    x, y = randn(6, 3, 4, 4), labels(6, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no unchecked forward
        for seed in (1, 2, 3):  # several masks, some samples dropped
            ops = check_exact(model, CE, x, y, seed=seed, tag="-rules")["ops"]
            assert all(op.fallbacks == [] for op in ops.values())
