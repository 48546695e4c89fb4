"""CIFAR ResNets (He et al., 2016, section 4.2) with projection shortcuts."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or 1x1-projection shortcut.

    Where the shape changes, the shortcut is a strided 1x1 convolution with
    BatchNorm (the paper's option B) rather than option A's subsampling and
    zero channel padding, which would need tensor slicing and ``F.pad``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    """A CIFAR ResNet for 3x32x32 inputs: a 3x3 stem and stages of BasicBlocks.

    ``blocks`` is the number of blocks per stage (one int for every stage, or
    one per stage) and ``widths`` the stem's and the stages' channels; the
    first block of every stage after the first halves the resolution.  The
    defaults are ResNet-(6n+2): a 16-channel stem and stages of 16, 32, 64.
    """

    def __init__(self, blocks: int | Sequence[int], num_classes: int = 10,
                 widths: Sequence[int] = (16, 16, 32, 64)) -> None:
        super().__init__()
        stages = len(widths) - 1
        per_stage = [blocks] * stages if isinstance(blocks, int) else list(blocks)
        if len(per_stage) != stages or min(per_stage) < 1:
            raise ValueError(f"blocks must be an int >= 1 or {stages} of them (one per stage), got {blocks!r}")
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        # layer1, layer2, ...: the names (and state_dict keys) of torchvision's ResNets.
        self.num_stages = stages
        for k in range(stages):
            setattr(self, f"layer{k + 1}", self._stage(widths[k], widths[k + 1], per_stage[k], stride=1 if k == 0 else 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # He et al. (2015) initialisation; the paper's ResNets start from it.
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for k in range(self.num_stages):
            out = getattr(self, f"layer{k + 1}")(out)
        return self.fc(torch.flatten(self.pool(out), 1))


class WideBlock(nn.Module):
    """Pre-activation block of a wide ResNet (Zagoruyko & Komodakis, 2016):
    BN-ReLU-conv twice; where the shape changes, a 1x1 projection of the
    pre-activated input is the shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.project = None
        if stride != 1 or in_channels != out_channels:
            self.project = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return out + (x if self.project is None else self.project(a))


class WideResNet(nn.Module):
    """WRN-depth-k for 3x32x32 inputs: (depth - 4) / 6 pre-activation blocks per
    stage, stages of 16k, 32k, 64k channels, without dropout."""

    def __init__(self, depth: int = 16, widen: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"depth must be 6n + 4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        blocks = []
        for k in range(3):
            blocks.append(WideBlock(widths[k], widths[k + 1], stride=1 if k == 0 else 2))
            blocks += [WideBlock(widths[k + 1], widths[k + 1]) for _ in range(n - 1)]
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(widths[-1])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(out), 1))


def resnet8_bn(num_classes: int = 10) -> CifarResNet:
    """ResNet-8: one BasicBlock per stage (about 78k parameters)."""
    return CifarResNet(1, num_classes)


def resnet20_bn(num_classes: int = 10) -> CifarResNet:
    """ResNet-20: three BasicBlocks per stage (about 0.27M parameters)."""
    return CifarResNet(3, num_classes)


def resnet18_bn(num_classes: int = 10) -> CifarResNet:
    """The CIFAR ResNet-18: a 64-channel 3x3 stem (no max pool) and stages of
    two BasicBlocks at 64, 128, 256, 512 channels (about 11.2M parameters)."""
    return CifarResNet(2, num_classes, widths=(64, 64, 128, 256, 512))


def wrn16_4_bn(num_classes: int = 10) -> WideResNet:
    """WRN-16-4: two pre-activation blocks per stage at 64, 128, 256 channels
    (about 2.75M parameters)."""
    return WideResNet(16, 4, num_classes)
