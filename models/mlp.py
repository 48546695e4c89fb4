"""Fully connected BatchNorm network."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def mlp_bn(
    in_features: int = 64, hidden: Sequence[int] = (128, 64), num_classes: int = 10
) -> nn.Sequential:
    """Flatten, then ``Linear -> BatchNorm1d -> ReLU`` per hidden width, then a linear classifier.

    Hidden linear layers have no bias because the BatchNorm after them would
    cancel it. The default ``in_features=64`` fits flattened 1x8x8 digits.
    """
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for out in hidden:
        layers += [nn.Linear(width, out, bias=False), nn.BatchNorm1d(out), nn.ReLU()]
        width = out
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
