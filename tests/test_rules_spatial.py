"""Spatial layers against float64 autograd: interpolation (``nn.Upsample``,
``F.interpolate``), padding (the padding modules, ``F.pad``), transposed
convolutions and 3-d / adaptive max pooling, in module and functional form,
alone behind ``Conv -> [BatchNorm] -> Tanh`` (so their input carries a direction
and the residuals upstream enter the Hessian) and inside HRNet- and
U-Net-style models.

Every model is also built and applied under :func:`forbid_autograd`, with
warnings as errors: closed-form rules only, no fallback.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hfopt
from autograd_guard import forbid_autograd
from conftest import check_exact, labels, make, rand_vec, randn
from hfopt.rules import Input, function_rule, module_rule
from hfopt.rules.conv_transpose import ConvTransposeRule
from hfopt.rules.pooling import AdaptiveMaxPoolRule, MaxPool3dRule, MaxPoolRule
from hfopt.rules.resample import InterpolateRule, PadRule

CE = nn.CrossEntropyLoss()
pytestmark = pytest.mark.usefixtures("single_thread")

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
# [N, C, spatial...] inputs per spatial dimension: tiny, odd sizes.
_SHAPES = {1: (3, 2, 7), 2: (3, 2, 5, 4), 3: (2, 2, 3, 4, 4)}


class Fn(nn.Module):
    """A functional call in a traced ``forward``."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def around(layer: nn.Module, dim: int = 2, bn: bool = False, act=nn.Tanh) -> tuple:
    """``Conv -> [BatchNorm] -> act -> layer -> Flatten -> Linear`` with its input and labels."""
    shape = _SHAPES[dim]
    body = [_CONV[dim](shape[1], 3, 3, padding=1), *([_BN[dim](3)] if bn else []), act(), layer, nn.Flatten()]
    with torch.no_grad():
        n = nn.Sequential(*body)(torch.zeros(2, *shape[1:])).shape[1]
    return nn.Sequential(*body, nn.Linear(n, 3)), randn(*shape), labels(shape[0], 3)


def _closed_form_run(model, x, y, **kw) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warning fails here
        with forbid_autograd() as guard:
            for cls in (hfopt.GGN, hfopt.Hessian):
                op = cls(model, CE, x, y, **kw)
                op @ rand_vec(model, seed=3)
                op.gradient()
                assert op.fallbacks == [], op.fallbacks
    assert sum(guard.calls.values()) == 0, guard.calls


def _run(model, x, y, **kw) -> None:
    model = make(model)
    _closed_form_run(model, x, y, **kw)
    result = check_exact(model, CE, x, y, tag="-spatial", **kw)
    for op in result["ops"].values():
        assert op.fallbacks == []


# ----------------------------------------------------------------------------- interpolation
def interpolate_cases():
    up = nn.Upsample
    cases = {
        "nearest-x2": (up(scale_factor=2), 2),
        "nearest-1.7": (up(scale_factor=1.7), 2),  # placed by the scale, not the size ratio
        "nearest-size": (up(size=(7, 9)), 2),
        "nearest-recompute": (up(scale_factor=1.7, recompute_scale_factor=True), 2),
        "nearest-exact": (up(scale_factor=(1.6, 2.3), mode="nearest-exact"), 2),
        "bilinear-x2": (up(scale_factor=2, mode="bilinear"), 2),
        "bilinear-align": (up(scale_factor=(1.5, 2.3), mode="bilinear", align_corners=True), 2),
        "bilinear-size": (up(size=(8, 3), mode="bilinear", align_corners=False), 2),
        "bilinear-down-recompute": (up(scale_factor=0.6, mode="bilinear", recompute_scale_factor=True), 2),
        "bicubic": (up(scale_factor=1.5, mode="bicubic", align_corners=False), 2),
        "area-scale": (up(scale_factor=0.5, mode="area"), 2),
        "area-size": (up(size=(3, 3), mode="area"), 2),
        "UpsamplingNearest2d": (nn.UpsamplingNearest2d(scale_factor=2), 2),
        "UpsamplingBilinear2d": (nn.UpsamplingBilinear2d(size=(7, 6)), 2),
        "1d-nearest": (up(scale_factor=2.5), 1),
        "1d-linear-align": (up(scale_factor=1.5, mode="linear", align_corners=True), 1),
        "1d-linear-size": (up(size=11, mode="linear"), 1),
        "1d-nearest-exact": (up(scale_factor=1.4, mode="nearest-exact"), 1),
        "1d-area": (up(size=4, mode="area"), 1),
        "3d-nearest": (up(scale_factor=(1, 2, 1.5)), 3),
        "3d-trilinear": (up(scale_factor=1.5, mode="trilinear"), 3),
        "3d-trilinear-align-size": (up(size=(4, 5, 3), mode="trilinear", align_corners=True), 3),
        "3d-nearest-exact": (up(scale_factor=2, mode="nearest-exact"), 3),
        "3d-area": (up(size=(2, 2, 3), mode="area"), 3),
        "F-bilinear": (Fn(lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)), 2),
        "F-nearest-size": (Fn(lambda x: F.interpolate(x, size=(6, 7))), 2),
        "F-nearest-recompute": (Fn(lambda x: F.interpolate(x, scale_factor=1.7, recompute_scale_factor=True)), 2),
        "F-positional-bilinear-align": (Fn(lambda x: F.interpolate(x, None, 1.5, "bilinear", True)), 2),
        "F-1d-linear": (Fn(lambda x: F.interpolate(x, scale_factor=1.3, mode="linear")), 1),
        "F-3d-trilinear": (Fn(lambda x: F.interpolate(x, size=(4, 6, 5), mode="trilinear")), 3),
    }
    return cases


@pytest.mark.parametrize("name", list(interpolate_cases()))
def test_interpolate(name):
    layer, dim = interpolate_cases()[name]
    _run(*around(layer, dim, bn=name.endswith("x2")))


# ----------------------------------------------------------------------------- padding
def pad_cases():
    return {
        "ZeroPad1d": (nn.ZeroPad1d(2), 1),
        "ZeroPad2d": (nn.ZeroPad2d((1, 2, 0, 1)), 2),
        "ZeroPad2d-crop": (nn.ZeroPad2d((-1, 2, 1, -1)), 2),
        "ZeroPad3d": (nn.ZeroPad3d((1, 0, 0, 1, 1, 1)), 3),
        "ConstantPad1d": (nn.ConstantPad1d((2, 1), -0.3), 1),
        "ConstantPad2d": (nn.ConstantPad2d(1, 0.7), 2),
        "ConstantPad3d": (nn.ConstantPad3d(1, 0.5), 3),
        "ReflectionPad1d": (nn.ReflectionPad1d((2, 1)), 1),
        "ReflectionPad2d": (nn.ReflectionPad2d((1, 2, 2, 1)), 2),
        "ReflectionPad3d": (nn.ReflectionPad3d(1), 3),
        "ReplicationPad1d": (nn.ReplicationPad1d((1, 3)), 1),
        "ReplicationPad2d": (nn.ReplicationPad2d((2, 0, 1, 2)), 2),
        "ReplicationPad3d": (nn.ReplicationPad3d((1, 1, 0, 2, 1, 0)), 3),
        "CircularPad1d": (nn.CircularPad1d((2, 1)), 1),
        "CircularPad2d": (nn.CircularPad2d((1, 2, 0, 1)), 2),
        "CircularPad3d": (nn.CircularPad3d(1), 3),
        "F-reflect": (Fn(lambda x: F.pad(x, (1, 1, 2, 0), mode="reflect")), 2),
        "F-constant-crop-value": (Fn(lambda x: F.pad(x, (1, -1, 0, 2), value=0.5)), 2),
        "F-constant-channels": (Fn(lambda x: F.pad(x, (0, 0, 0, 0, 1, 2))), 2),
        "F-replicate": (Fn(lambda x: F.pad(x, (2, 1, 1, 1), "replicate")), 2),
        "F-circular": (Fn(lambda x: F.pad(x, (1, 1, 1, 1), "circular")), 2),
        "F-1d-reflect": (Fn(lambda x: F.pad(x, (3, 2), "reflect")), 1),
        "F-3d-replicate": (Fn(lambda x: F.pad(x, (1, 0, 1, 0, 0, 1), mode="replicate")), 3),
    }


@pytest.mark.parametrize("name", list(pad_cases()))
def test_pad(name):
    layer, dim = pad_cases()[name]
    _run(*around(layer, dim, bn=name.startswith("Reflection")))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_conv_padding_modes(mode):
    """A Conv2d with a padding mode is traced into: its F.pad, then F.conv2d."""
    _run(*around(nn.Conv2d(3, 4, 3, padding=(1, 2), padding_mode=mode), 2))


# ----------------------------------------------------------------------------- pooling
def pool_cases():
    return {
        "MaxPool3d-2": (nn.MaxPool3d(2), 3),
        "MaxPool3d-3s2-pad-ceil": (nn.MaxPool3d(3, stride=2, padding=1, ceil_mode=True), 3),
        "MaxPool3d-dilation": (nn.MaxPool3d((1, 2, 2), stride=1, dilation=(1, 2, 1)), 3),
        "AvgPool3d-2": (nn.AvgPool3d(2), 3),
        "AvgPool3d-3s2-pad-ceil-noinclude": (nn.AvgPool3d(3, stride=2, padding=1, ceil_mode=True,
                                                          count_include_pad=False), 3),
        "AvgPool3d-divisor": (nn.AvgPool3d(2, divisor_override=3), 3),
        "AdaptiveAvgPool3d": (nn.AdaptiveAvgPool3d((2, None, 3)), 3),
        "AdaptiveAvgPool3d-1": (nn.AdaptiveAvgPool3d(1), 3),
        "AdaptiveMaxPool3d": (nn.AdaptiveMaxPool3d((2, 3, 3)), 3),
        "AdaptiveMaxPool1d-overlap": (nn.AdaptiveMaxPool1d(4), 1),
        "AdaptiveMaxPool2d": (nn.AdaptiveMaxPool2d((3, None)), 2),
        "AdaptiveMaxPool2d-1": (nn.AdaptiveMaxPool2d(1), 2),
        "F-max_pool3d": (Fn(lambda x: F.max_pool3d(x, 2, 1)), 3),
        "F-avg_pool3d": (Fn(lambda x: F.avg_pool3d(x, 2, ceil_mode=True)), 3),
        "F-adaptive_avg_pool3d": (Fn(lambda x: F.adaptive_avg_pool3d(x, (1, 2, 2))), 3),
        "F-adaptive_max_pool1d": (Fn(lambda x: F.adaptive_max_pool1d(x, 3)), 1),
        "F-adaptive_max_pool2d": (Fn(lambda x: F.adaptive_max_pool2d(x, output_size=(2, 3))), 2),
        "F-adaptive_max_pool3d": (Fn(lambda x: F.adaptive_max_pool3d(x, 2)), 3),
    }


@pytest.mark.parametrize("name", list(pool_cases()))
def test_pool(name):
    layer, dim = pool_cases()[name]
    _run(*around(layer, dim, bn=name.startswith("MaxPool3d-2")))


@pytest.mark.parametrize("layer,dim", [(nn.MaxPool3d(2), 3), (nn.AdaptiveMaxPool2d(3), 2),
                                       (nn.AdaptiveMaxPool1d(4), 1)], ids=["max3d", "adaptive2d", "adaptive1d"])
def test_max_pool_after_batchnorm_relu(layer, dim):
    """Ties among ReLU's zeros pick autograd's argmax; a 3-d max pool after
    BatchNorm -> ReLU is not taken for the 2-d fused rules."""
    model, x, y = around(layer, dim, bn=True, act=nn.ReLU)
    _run(model, x, y)
    op = hfopt.Hessian(make(model), CE, x, y)
    assert not any(type(s.rule) is MaxPoolRule for s in op.steps)


# ----------------------------------------------------------------------------- transposed convolutions
class FunctionalConvT(nn.Module):
    """``F.conv_transpose2d`` with the module's parameters, or (``squash``) with
    a weight computed from them, which then carries a direction of its own."""

    def __init__(self, squash: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 2, 3, 3) * 0.4)
        self.bias = nn.Parameter(torch.randn(2) * 0.1)
        self.squash = squash

    def forward(self, x):
        w = torch.tanh(self.weight) if self.squash else self.weight
        return F.conv_transpose2d(x, w, self.bias, stride=2, padding=1, output_padding=1)


def conv_transpose_cases():
    return {
        "1d-s2-outpad": (nn.ConvTranspose1d(3, 4, 3, stride=2, padding=1, output_padding=1), 1),
        "1d-dilation-nobias": (nn.ConvTranspose1d(3, 2, 2, stride=3, dilation=2, bias=False), 1),
        "2d-s2-outpad": (nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1), 2),
        "2d-k2s2-nobias": (nn.ConvTranspose2d(3, 4, 2, stride=2, bias=False), 2),
        "2d-groups-dilation": (nn.ConvTranspose2d(3, 6, 3, padding=1, groups=3, dilation=2), 2),
        "2d-asymmetric": (nn.ConvTranspose2d(3, 2, (2, 3), stride=(2, 1), padding=(0, 1), output_padding=(1, 0)), 2),
        "3d-outpad": (nn.ConvTranspose3d(3, 2, 3, stride=(1, 2, 2), padding=1, output_padding=(0, 1, 1)), 3),
        "F-conv_transpose2d": (FunctionalConvT(), 2),
        "F-conv_transpose2d-weight-direction": (FunctionalConvT(squash=True), 2),
    }


# channels-last is a 2-d layout: the other cases run contiguous only.
_CONV_T_RUNS = [(name, cl) for name, (_, dim) in conv_transpose_cases().items()
                for cl in ((False, True) if dim == 2 else (False,))]


@pytest.mark.parametrize("name,channels_last", _CONV_T_RUNS,
                         ids=[f"{n}-{'channels-last' if cl else 'contiguous'}" for n, cl in _CONV_T_RUNS])
def test_conv_transpose(name, channels_last):
    layer, dim = conv_transpose_cases()[name]
    _run(*around(layer, dim, bn=name.startswith("2d-s2")), channels_last=channels_last)


# ----------------------------------------------------------------------------- composite models
class HRFusion(nn.Module):
    """HRNet-style fusion: a stride-2 branch, upsampled x2 bilinearly, added to
    the full-resolution branch."""

    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.high = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())
        self.low = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.Conv2d(4, 3, 1, bias=False), nn.BatchNorm2d(3))
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.head = nn.Linear(3 * 6 * 6, 3)

    def forward(self, x):
        h, low = self.high(x), self.low(x)
        if self.functional:  # sized like the other branch, the usual HRNet call
            u = F.interpolate(low, size=h.shape[-2:], mode="bilinear", align_corners=False)
        else:
            u = self.up(low)
        return self.head(torch.relu(h + u).flatten(1))


class TinyUNet(nn.Module):
    """One U-Net level: max-pool down, ConvTranspose2d (with output_padding) up,
    concatenated with the skip connection."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())
        self.down = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.up = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1)
        self.dec = nn.Sequential(nn.Conv2d(6, 3, 3, padding=1), nn.Tanh())
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        skip = self.enc(x)
        d = self.dec(torch.cat([skip, self.up(self.down(skip))], 1))
        return self.head(F.adaptive_avg_pool2d(d, 1).flatten(1))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_hrnet_fusion(functional, train):
    _run(HRFusion(functional).train(train), randn(4, 2, 6, 6), labels(4, 3))


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_unet(train, channels_last):
    _run(TinyUNet().train(train), randn(3, 2, 8, 8), labels(3, 3), channels_last=channels_last)


@pytest.mark.parametrize("layer", [nn.Upsample(scale_factor=2, mode="bilinear"), nn.Upsample(size=(3, 2), mode="area"),
                                   nn.ReflectionPad2d(1), nn.CircularPad2d((1, 0, 2, 1)), nn.AdaptiveMaxPool2d(3)],
                         ids=["bilinear", "area", "reflect", "circular", "adaptive-max"])
def test_channels_last_inputs(layer):
    """The engine hands these rules channels-last activations and directions."""
    _run(*around(layer, 2, bn=True), channels_last=True)


# ----------------------------------------------------------------------------- lookups
def test_lookups():
    x = Input(0)
    assert type(module_rule(nn.ConvTranspose2d(2, 3, 3))) is ConvTransposeRule
    assert type(module_rule(nn.Upsample(scale_factor=2))) is InterpolateRule
    assert type(module_rule(nn.ReplicationPad3d(1))) is PadRule
    assert type(module_rule(nn.MaxPool3d(2))) is MaxPool3dRule
    assert type(module_rule(nn.AdaptiveMaxPool2d(2))) is AdaptiveMaxPoolRule
    # A pair of outputs, or an interpolation without a closed form: no rule.
    assert module_rule(nn.MaxPool3d(2, return_indices=True)) is None
    assert module_rule(nn.AdaptiveMaxPool1d(2, return_indices=True)) is None
    t = torch.zeros(1, 1, 4, 4)
    assert function_rule(F.interpolate, (x,), {"scale_factor": 2, "mode": "bilinear", "antialias": True},
                         [t], [True]) is None
    assert function_rule(F.adaptive_max_pool2d, (x, 2), {"return_indices": True}, [t], [True]) is None
    assert function_rule(F.max_pool3d, (x, 2), {"return_indices": True}, [t], [True]) is None
    assert function_rule(F.pad, (x, (1, 1)), {"mode": "reflect"}, [t], [True]) is not None
    assert function_rule(F.conv_transpose2d, (x, Input(1)), {}, [t, torch.zeros(1, 2, 3, 3)],
                         [True, True]) is not None
