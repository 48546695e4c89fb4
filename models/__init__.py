"""BatchNorm networks built only from layers that hfopt's curvature engine supports exactly.

Every network is made of ``Conv2d`` (integer padding, zero padding mode),
``BatchNorm1d/2d``, ``ReLU``, max/average/adaptive-average pooling,
``Flatten``, ``Linear``, ``Identity`` and ``Sequential`` containers, plus
``F.relu``, ``torch.flatten`` and residual additions in ``forward``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .convnets import allcnnc_bn, c3d3_bn, digits_convnet_bn
from .mlp import mlp_bn
from .resnet import BasicBlock, CifarResNet, WideBlock, WideResNet, resnet8_bn, resnet18_bn, resnet20_bn, wrn16_4_bn

MODELS: dict[str, Callable[..., nn.Module]] = {
    "c3d3_bn": c3d3_bn,
    "allcnnc_bn": allcnnc_bn,
    "resnet8_bn": resnet8_bn,
    "resnet20_bn": resnet20_bn,
    "resnet18_bn": resnet18_bn,
    "wrn16_4_bn": wrn16_4_bn,
    "digits_convnet_bn": digits_convnet_bn,
    "mlp_bn": mlp_bn,
}

# Per-sample input shape (C, H, W) each model is designed for; mlp_bn's default
# ``in_features=64`` is a flattened 1x8x8 digit.
DEFAULT_INPUT: dict[str, tuple[int, int, int]] = {
    "c3d3_bn": (3, 32, 32),
    "allcnnc_bn": (3, 32, 32),
    "resnet8_bn": (3, 32, 32),
    "resnet20_bn": (3, 32, 32),
    "resnet18_bn": (3, 32, 32),
    "wrn16_4_bn": (3, 32, 32),
    "digits_convnet_bn": (1, 8, 8),
    "mlp_bn": (1, 8, 8),
}


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """Construct the registered model ``name``; raises ``ValueError`` listing the known names."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](num_classes=num_classes)


__all__ = [
    "BasicBlock",
    "CifarResNet",
    "DEFAULT_INPUT",
    "MODELS",
    "allcnnc_bn",
    "build_model",
    "c3d3_bn",
    "digits_convnet_bn",
    "mlp_bn",
    "resnet18_bn",
    "resnet20_bn",
    "resnet8_bn",
    "WideBlock",
    "WideResNet",
    "wrn16_4_bn",
]
