"""Plain (non-residual) BatchNorm convolutional networks.

Convolutions and linear layers that feed straight into a BatchNorm layer are
built with ``bias=False``: BatchNorm subtracts the batch mean, so such a bias
would have zero gradient and a zero row/column in every curvature matrix,
which only wastes conjugate-gradient work in a Hessian-free optimizer.
"""

from __future__ import annotations

from torch import nn


def _pool_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _conv_bn_relu(
    in_channels: int, out_channels: int, kernel: int, stride: int = 1, padding: int = 0
) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


def _linear_bn_relu(in_features: int, out_features: int) -> list[nn.Module]:
    return [
        nn.Linear(in_features, out_features, bias=False),
        nn.BatchNorm1d(out_features),
        nn.ReLU(),
    ]


def c3d3_bn(num_classes: int = 10) -> nn.Sequential:
    """DeepOBS' CIFAR-10 "3c3d" network with BatchNorm after every hidden layer.

    Expects 3x32x32 inputs. DeepOBS pools 3x3 with stride 2 and TensorFlow's
    "same" padding; ``padding=1`` gives the same output sizes (28->14, 12->6,
    6->3), with pooling windows shifted by one pixel relative to TensorFlow's.
    """
    side = 32
    side = _pool_out(side - 4, 3, 2, 1)  # valid 5x5 conv, then pool
    side = _pool_out(side - 2, 3, 2, 1)  # valid 3x3 conv, then pool
    side = _pool_out(side, 3, 2, 1)  # size-preserving 3x3 conv, then pool
    return nn.Sequential(
        *_conv_bn_relu(3, 64, 5),
        nn.MaxPool2d(3, stride=2, padding=1),
        *_conv_bn_relu(64, 96, 3),
        nn.MaxPool2d(3, stride=2, padding=1),
        *_conv_bn_relu(96, 128, 3, padding=1),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Flatten(),
        *_linear_bn_relu(128 * side * side, 512),
        *_linear_bn_relu(512, 256),
        nn.Linear(256, num_classes),
    )


def allcnnc_bn(num_classes: int = 10) -> nn.Sequential:
    """All-CNN-C (Springenberg et al., 2015) for 3x32x32 inputs.

    Dropout is left out: Hessian-free steps need the gradient and every
    curvature-vector product to see the same deterministic function. BatchNorm
    follows every convolution except the classifier convolution,
    whose class scores are averaged over the remaining 6x6 positions.
    """
    return nn.Sequential(
        *_conv_bn_relu(3, 96, 3, padding=1),
        *_conv_bn_relu(96, 96, 3, padding=1),
        *_conv_bn_relu(96, 96, 3, stride=2, padding=1),
        *_conv_bn_relu(96, 192, 3, padding=1),
        *_conv_bn_relu(192, 192, 3, padding=1),
        *_conv_bn_relu(192, 192, 3, stride=2, padding=1),
        *_conv_bn_relu(192, 192, 3),
        *_conv_bn_relu(192, 192, 1),
        nn.Conv2d(192, num_classes, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def digits_convnet_bn(num_classes: int = 10) -> nn.Sequential:
    """Small BatchNorm convnet for 1x8x8 images (scikit-learn's digits).

    About 38k parameters, so a full Hessian-free epoch over the ~1,400
    training digits takes seconds on a laptop CPU.
    """
    return nn.Sequential(
        *_conv_bn_relu(1, 16, 3, padding=1),
        *_conv_bn_relu(16, 32, 3, padding=1),
        nn.MaxPool2d(2),
        nn.Flatten(),
        *_linear_bn_relu(32 * 4 * 4, 64),
        nn.Linear(64, num_classes),
    )
