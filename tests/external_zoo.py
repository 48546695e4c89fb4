"""Small float64 models written the way torchvision and timm write their blocks.

Each block below is written here in the style of the library it is named after
(subclasses with an overridden ``forward``, ``x.chunk``/``torch.split`` glue,
shape arithmetic in ``forward``, in-place ops, hooks, parametrizations). None of
it is copied from those libraries. The point is to run hfopt on the code
patterns real model zoos use, not only on the repository's own models.

``ZOO`` maps a name to a factory returning ``(model, x, y)``: a float64 model
with randomized BatchNorm state and randomized affine parameters, a batch of 4
inputs (mostly ``3 x 16 x 16``) and class labels for ``CLASSES`` outputs.
Models come back in train mode; the harness sets the mode.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conftest import labels, make, randn
from models.external import BasicBlock  # torchvision's BasicBlock, written once in models/

N, CIN, HW, CLASSES = 4, 3, 16, 5


# ========== helpers
def randomize_affine(model: nn.Module, seed: int = 7) -> nn.Module:
    """Non-trivial weights for the non-BatchNorm norms, PReLU slopes and layer
    scales (``make`` only randomizes BatchNorm)."""
    gen = torch.Generator().manual_seed(seed)
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, norms) and not isinstance(m, nn.modules.batchnorm._BatchNorm):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen, dtype=m.weight.dtype))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype))
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=gen,
                                                           dtype=m.running_mean.dtype))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen,
                                                         dtype=m.running_var.dtype))
            if isinstance(m, nn.PReLU):
                m.weight.copy_(0.25 + 0.1 * torch.randn(m.weight.shape, generator=gen, dtype=m.weight.dtype))
            if isinstance(m, (ConvNeXtBlock,)):
                m.gamma.copy_(0.5 * torch.randn(m.gamma.shape, generator=gen, dtype=m.gamma.dtype))
    return model


def build(model: nn.Module, *, x: Optional[Tensor] = None, classes: int = CLASSES, seed: int = 0):
    torch.manual_seed(seed)  # nothing below draws; weights come from the constructor
    model = randomize_affine(make(model, seed))
    if x is None:
        x = randn(N, CIN, HW, HW, seed=seed)
    return model, x, labels(x.shape[0], classes)


def _seeded(fn: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """Construct under a fixed seed: the factories return the same weights every call."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return fn()


class GlobalPoolHead(nn.Module):
    """``adaptive_avg_pool2d -> flatten -> Linear`` (torchvision's classifiers)."""

    def __init__(self, cin: int, classes: int = CLASSES, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.fc(self.dropout(x))


# ========== 1. timm BatchNormAct2d
class BatchNormAct2d(nn.BatchNorm2d):
    """timm's norm + activation in one layer: a BatchNorm2d whose forward is overridden."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 apply_act=True, act_layer=nn.ReLU, drop_layer=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer() if apply_act else nn.Identity()

    def forward(self, x):
        # Written out the way timm does it, num_batches_tracked bump included.
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:
                    exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, bn_training, exponential_average_factor, self.eps)
        x = self.drop(x)
        x = self.act(x)
        return x


class SqueezeExciteTimm(nn.Module):
    """timm's EfficientNet SE: reduce conv, act, expand conv, gate."""

    def __init__(self, in_chs, rd_chs, act_layer=nn.SiLU, gate_layer=nn.Sigmoid):
        super().__init__()
        self.conv_reduce = nn.Conv2d(in_chs, rd_chs, 1, bias=True)
        self.act1 = act_layer()
        self.conv_expand = nn.Conv2d(rd_chs, in_chs, 1, bias=True)
        self.gate = gate_layer()

    def forward(self, x):
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.conv_reduce(x_se)
        x_se = self.act1(x_se)
        x_se = self.conv_expand(x_se)
        return x * self.gate(x_se)


class InvertedResidualEff(nn.Module):
    """timm's EfficientNet InvertedResidual (MBConv) with BatchNormAct2d."""

    def __init__(self, in_chs, out_chs, exp_ratio=2.0, act_layer=nn.SiLU, se_ratio=0.25):
        super().__init__()
        mid = int(in_chs * exp_ratio)
        self.has_skip = in_chs == out_chs
        self.conv_pw = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.bn1 = BatchNormAct2d(mid, act_layer=act_layer)
        self.conv_dw = nn.Conv2d(mid, mid, 3, padding=1, groups=mid, bias=False)
        self.bn2 = BatchNormAct2d(mid, act_layer=act_layer)
        self.se = SqueezeExciteTimm(mid, max(1, int(in_chs * se_ratio)), act_layer=act_layer)
        self.conv_pwl = nn.Conv2d(mid, out_chs, 1, bias=False)
        self.bn3 = BatchNormAct2d(out_chs, apply_act=False)

    def forward(self, x):
        shortcut = x
        x = self.conv_pw(x)
        x = self.bn1(x)
        x = self.conv_dw(x)
        x = self.bn2(x)
        x = self.se(x)
        x = self.conv_pwl(x)
        x = self.bn3(x)
        if self.has_skip:
            x = x + shortcut
        return x


class EfficientNetTiny(nn.Module):
    def __init__(self, act_layer=nn.SiLU, classes=CLASSES):
        super().__init__()
        self.conv_stem = nn.Conv2d(CIN, 6, 3, stride=2, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(6, act_layer=act_layer)
        self.blocks = nn.Sequential(InvertedResidualEff(6, 6, act_layer=act_layer),
                                    InvertedResidualEff(6, 8, act_layer=act_layer))
        self.conv_head = nn.Conv2d(8, 12, 1, bias=False)
        self.bn2 = BatchNormAct2d(12, act_layer=act_layer)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(12, classes)

    def forward(self, x):
        x = self.bn1(self.conv_stem(x))
        x = self.blocks(x)
        x = self.bn2(self.conv_head(x))
        return self.classifier(self.flatten(self.global_pool(x)))


class BNActConvNet(nn.Module):
    """A plain conv stack whose every norm is a BatchNormAct2d with ReLU."""

    def __init__(self, classes=CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(CIN, 6, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(6, act_layer=nn.ReLU)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False)
        self.bn2 = BatchNormAct2d(8, act_layer=nn.ReLU)
        self.head = GlobalPoolHead(8, classes)

    def forward(self, x):
        return self.head(self.bn2(self.conv2(self.bn1(self.conv1(x)))))


# ========== 2. weight standardization
def get_padding(kernel_size: int, stride: int = 1, dilation: int = 1) -> int:
    return ((stride - 1) + dilation * (kernel_size - 1)) // 2


class StdConv2d(nn.Conv2d):
    """timm's weight-standardized conv: the weight standardized per output
    channel by a train-mode F.batch_norm without running statistics."""

    def __init__(self, in_channel, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1,
                 bias=False, eps=1e-6):
        if padding is None:
            padding = get_padding(kernel_size, stride, dilation)
        super().__init__(in_channel, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias)
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None,
            training=True, momentum=0., eps=self.eps).reshape_as(self.weight)
        x = F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return x


class StdConv2dBiT(nn.Conv2d):
    """Big Transfer's weight standardization: var_mean over (in, kh, kw)."""

    def forward(self, x):
        w = self.weight
        v, m = torch.var_mean(w, dim=[1, 2, 3], keepdim=True, unbiased=False)
        w = (w - m) / torch.sqrt(v + 1e-10)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConvNet(nn.Module):
    def __init__(self, conv=StdConv2d, classes=CLASSES):
        super().__init__()
        if conv is StdConv2d:
            self.stem = conv(CIN, 6, 3, stride=1)
            self.conv2 = conv(6, 8, 3, stride=2, bias=True)
        else:
            self.stem = conv(CIN, 6, 3, padding=1, bias=False)
            self.conv2 = conv(6, 8, 3, stride=2, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(6)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = GlobalPoolHead(8, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.stem(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x)


# ========== 3. TF 'same' padding
def get_same_padding(x: int, kernel_size: int, stride: int, dilation: int) -> int:
    return max((math.ceil(x / stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - x, 0)


def pad_same(x, kernel_size: List[int], stride: List[int], dilation: List[int] = (1, 1), value: float = 0):
    ih, iw = x.size()[-2:]
    pad_h = get_same_padding(ih, kernel_size[0], stride[0], dilation[0])
    pad_w = get_same_padding(iw, kernel_size[1], stride[1], dilation[1])
    x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=value)
    return x


class Conv2dSame(nn.Conv2d):
    """TensorFlow-like 'SAME' padding: the asymmetric pad computed from the input's size."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)

    def forward(self, x):
        x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class TfSameNet(nn.Module):
    def __init__(self, classes=CLASSES):
        super().__init__()
        self.conv_stem = Conv2dSame(CIN, 6, 3, stride=2, bias=False)   # 16 -> 8, pads (0, 1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv_dw = Conv2dSame(6, 6, 4, stride=1, groups=6)          # even kernel: pads (1, 2)
        self.bn2 = nn.BatchNorm2d(6)
        self.head = GlobalPoolHead(6, classes)

    def forward(self, x):
        x = F.silu(self.bn1(self.conv_stem(x)))
        x = F.silu(self.bn2(self.conv_dw(x)))
        return self.head(x)


# ========== 4. MobileNetV2 (torchvision)
class ConvBNReLU6(nn.Sequential):
    """torchvision's Conv2dNormActivation with ReLU6, an nn.Sequential subclass."""

    def __init__(self, cin, cout, kernel_size=3, stride=1, groups=1):
        padding = (kernel_size - 1) // 2
        super().__init__(nn.Conv2d(cin, cout, kernel_size, stride, padding, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidualV2(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden_dim, kernel_size=1))
        layers.extend([ConvBNReLU6(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
                       nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
                       nn.BatchNorm2d(oup)])
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2Tiny(nn.Module):
    def __init__(self, classes=CLASSES):
        super().__init__()
        self.features = nn.Sequential(ConvBNReLU6(CIN, 8, stride=2),
                                      InvertedResidualV2(8, 8, 1, expand_ratio=1),
                                      InvertedResidualV2(8, 8, 1, expand_ratio=2),
                                      InvertedResidualV2(8, 12, 2, expand_ratio=2),
                                      ConvBNReLU6(12, 16, kernel_size=1))
        self.classifier = nn.Sequential(nn.Dropout(p=0.2), nn.Linear(16, classes))

    def forward(self, x):
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


# ========== 5. SE: MobileNetV3 / EfficientNet / RegNet
class SqueezeExcitation(nn.Module):
    """torchvision's SqueezeExcitation: scale = gate(fc2(act(fc1(avgpool(x))))); scale * x."""

    def __init__(self, input_channels, squeeze_channels, activation=nn.ReLU, scale_activation=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def _scale(self, input: Tensor) -> Tensor:
        scale = self.avgpool(input)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return self.scale_activation(scale)

    def forward(self, input: Tensor) -> Tensor:
        scale = self._scale(input)
        return scale * input


class ConvNormAct(nn.Sequential):
    def __init__(self, cin, cout, kernel_size=3, stride=1, groups=1, act=nn.Hardswish):
        layers = [nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
                  nn.BatchNorm2d(cout, eps=0.001, momentum=0.01)]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


class InvertedResidualV3(nn.Module):
    def __init__(self, cin, exp, cout, stride, use_se, act):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        layers: List[nn.Module] = []
        if exp != cin:
            layers.append(ConvNormAct(cin, exp, 1, act=act))
        layers.append(ConvNormAct(exp, exp, 3, stride=stride, groups=exp, act=act))
        if use_se:
            layers.append(SqueezeExcitation(exp, max(1, exp // 4), scale_activation=nn.Hardsigmoid))
        layers.append(ConvNormAct(exp, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, input):
        result = self.block(input)
        if self.use_res_connect:
            result += input
        return result


class MobileNetV3Tiny(nn.Module):
    def __init__(self, classes=CLASSES):
        super().__init__()
        self.features = nn.Sequential(ConvNormAct(CIN, 8, 3, stride=2, act=nn.Hardswish),
                                      InvertedResidualV3(8, 8, 8, 1, True, nn.ReLU),
                                      InvertedResidualV3(8, 16, 8, 1, True, nn.Hardswish),
                                      InvertedResidualV3(8, 16, 12, 2, False, nn.Hardswish),
                                      ConvNormAct(12, 16, 1, act=nn.Hardswish))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(16, 12), nn.Hardswish(inplace=True),
                                        nn.Dropout(p=0.2, inplace=True), nn.Linear(12, classes))

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class ResBottleneckBlockY(nn.Module):
    """torchvision RegNetY block: 1x1 -> grouped 3x3 -> SE(ReLU, Sigmoid) -> 1x1, projection."""

    def __init__(self, w_in, w_out, stride, group_width=4, bottleneck_multiplier=1.0, se_ratio=0.25):
        super().__init__()
        w_b = int(round(w_out * bottleneck_multiplier))
        g = w_b // group_width
        self.proj = None
        if w_in != w_out or stride != 1:
            self.proj = nn.Sequential(nn.Conv2d(w_in, w_out, 1, stride, bias=False), nn.BatchNorm2d(w_out))
        layers = {"a": ConvNormAct(w_in, w_b, 1, act=nn.ReLU),
                  "b": ConvNormAct(w_b, w_b, 3, stride=stride, groups=g, act=nn.ReLU),
                  "se": SqueezeExcitation(w_b, max(1, int(round(se_ratio * w_in))), activation=nn.ReLU),
                  "c": ConvNormAct(w_b, w_out, 1, act=None)}
        self.f = nn.Sequential()
        for k, v in layers.items():
            self.f.add_module(k, v)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x):
        if self.proj is not None:
            x = self.proj(x) + self.f(x)
        else:
            x = x + self.f(x)
        return self.activation(x)


class RegNetYTiny(nn.Module):
    def __init__(self, classes=CLASSES):
        super().__init__()
        self.stem = ConvNormAct(CIN, 8, 3, stride=2, act=nn.ReLU)
        self.trunk_output = nn.Sequential(ResBottleneckBlockY(8, 8, 1), ResBottleneckBlockY(8, 12, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(12, classes)

    def forward(self, x):
        x = self.trunk_output(self.stem(x))
        x = self.avgpool(x)
        x = x.flatten(start_dim=1)
        return self.fc(x)


# ========== 6. ShuffleNetV2
def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    x = x.view(batchsize, num_channels, height, width)
    return x


class ShuffleUnit(nn.Module):
    def __init__(self, inp, oup, stride):
        super().__init__()
        self.stride = stride
        branch_features = oup // 2
        if self.stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp),
                nn.Conv2d(inp, branch_features, 1, 1, 0, bias=False), nn.BatchNorm2d(branch_features),
                nn.ReLU(inplace=True))
        else:
            self.branch1 = nn.Sequential()
        cin2 = inp if self.stride > 1 else branch_features
        self.branch2 = nn.Sequential(
            nn.Conv2d(cin2, branch_features, 1, 1, 0, bias=False), nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
            nn.Conv2d(branch_features, branch_features, 3, self.stride, 1, groups=branch_features, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.Conv2d(branch_features, branch_features, 1, 1, 0, bias=False), nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        out = channel_shuffle(out, 2)
        return out


class ShuffleNetV2Tiny(nn.Module):
    def __init__(self, classes=CLASSES):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(CIN, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.stage2 = nn.Sequential(ShuffleUnit(8, 12, 2), ShuffleUnit(12, 12, 1))
        self.conv5 = nn.Sequential(nn.Conv2d(12, 16, 1, 1, 0, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.conv5(self.stage2(self.conv1(x)))
        x = x.mean([2, 3])  # globalpool
        return self.fc(x)


# ========== 7. ResNeSt split attention
class RadixSoftmax(nn.Module):
    def __init__(self, radix, cardinality):
        super().__init__()
        self.radix = radix
        self.cardinality = cardinality

    def forward(self, x):
        batch = x.size(0)
        if self.radix > 1:
            x = x.view(batch, self.cardinality, self.radix, -1).transpose(1, 2)
            x = F.softmax(x, dim=1)
            x = x.reshape(batch, -1)
        else:
            x = torch.sigmoid(x)
        return x


class SplitAttnConv2d(nn.Module):
    """ResNeSt's SplAtConv2d: radix groups from torch.split, summed, pooled,
    fc convs, a softmax over the radix dim, then the weighted sum of the splits."""

    def __init__(self, in_channels, channels, kernel_size=3, padding=1, radix=2, reduction_factor=4):
        super().__init__()
        inter_channels = max(in_channels * radix // reduction_factor, 4)
        self.radix = radix
        self.channels = channels
        self.conv = nn.Conv2d(in_channels, channels * radix, kernel_size, 1, padding, groups=radix, bias=False)
        self.bn0 = nn.BatchNorm2d(channels * radix)
        self.relu = nn.ReLU(inplace=True)
        self.fc1 = nn.Conv2d(channels, inter_channels, 1)
        self.bn1 = nn.BatchNorm2d(inter_channels)
        self.fc2 = nn.Conv2d(inter_channels, channels * radix, 1)
        self.rsoftmax = RadixSoftmax(radix, 1)

    def forward(self, x):
        x = self.conv(x)
        x = self.bn0(x)
        x = self.relu(x)
        batch, rchannel = x.shape[:2]
        # The original iterates the tuple (sum(splited), zip(...)); fx cannot
        # iterate a traced tuple, so it is indexed per radix group here.
        splits = torch.split(x, rchannel // self.radix, dim=1)
        splited = [splits[i] for i in range(self.radix)]
        gap = splited[0]
        for s in splited[1:]:
            gap = gap + s
        gap = F.adaptive_avg_pool2d(gap, 1)
        gap = self.fc1(gap)
        gap = self.bn1(gap)
        gap = self.relu(gap)
        atten = self.fc2(gap)
        atten = self.rsoftmax(atten).view(batch, -1, 1, 1)
        attens = torch.split(atten, rchannel // self.radix, dim=1)
        out = attens[0] * splited[0]
        for i in range(1, self.radix):
            out = out + attens[i] * splited[i]
        return out.contiguous()


class ResNeStTiny(nn.Module):
    def __init__(self, classes=CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(CIN, 12, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.splat = SplitAttnConv2d(12, 12, radix=2)
        self.splat3 = SplitAttnConv2d(12, 6, radix=3)
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.splat3(self.splat(x) + x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ========== 8. ConvNeXt
def drop_path(x, drop_prob: float = 0., training: bool = False, scale_by_keep: bool = True):
    if drop_prob == 0. or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0., scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm over the channels of an NCHW tensor."""

    def __init__(self, num_channels, eps=1e-6, affine=True):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim, drop_path=0.2, layer_scale_init_value=1e-6, kernel_size=3):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        x = self.norm(x)
        x = self.pwconv1(x)
        x = self.act(x)
        x = self.pwconv2(x)
        x = x * self.gamma
        x = x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        x = shortcut + self.drop_path(x)
        return x


class ConvNeXtTiny(nn.Module):
    def __init__(self, classes=CLASSES, drop_path=0.2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(CIN, 6, 4, stride=4), LayerNorm2d(6))
        self.stage1 = ConvNeXtBlock(6, drop_path=drop_path)
        self.downsample = nn.Sequential(LayerNorm2d(6), nn.Conv2d(6, 8, 2, stride=2))
        self.stage2 = ConvNeXtBlock(8, drop_path=drop_path)
        self.norm_pre = nn.Identity()
        self.head_norm = LayerNorm2d(8)
        self.head_fc = nn.Linear(8, classes)

    def forward(self, x):
        x = self.stage2(self.downsample(self.stage1(self.stem(x))))
        x = self.norm_pre(x)
        x = x.mean((2, 3), keepdim=True)
        x = self.head_norm(x)
        x = x.flatten(1)
        return self.head_fc(x)


# ========== 9. GhostNet
class GhostModule(nn.Module):
    def __init__(self, in_chs, out_chs, kernel_size=1, ratio=2, dw_size=3, stride=1, use_act=True):
        super().__init__()
        self.out_chs = out_chs
        init_chs = math.ceil(out_chs / ratio)
        new_chs = init_chs * (ratio - 1)
        self.primary_conv = nn.Sequential(
            nn.Conv2d(in_chs, init_chs, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(init_chs),
            nn.ReLU(inplace=True) if use_act else nn.Identity())
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init_chs, new_chs, dw_size, 1, dw_size // 2, groups=init_chs, bias=False),
            nn.BatchNorm2d(new_chs),
            nn.ReLU(inplace=True) if use_act else nn.Identity())

    def forward(self, x):
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        out = torch.cat([x1, x2], dim=1)
        return out[:, :self.out_chs, :, :]


class GhostBottleneck(nn.Module):
    def __init__(self, in_chs, mid_chs, out_chs, stride=1):
        super().__init__()
        self.stride = stride
        self.ghost1 = GhostModule(in_chs, mid_chs, use_act=True)
        if self.stride > 1:
            self.conv_dw = nn.Conv2d(mid_chs, mid_chs, 3, stride, 1, groups=mid_chs, bias=False)
            self.bn_dw = nn.BatchNorm2d(mid_chs)
        else:
            self.conv_dw = None
            self.bn_dw = None
        self.se = SqueezeExciteTimm(mid_chs, 4, act_layer=nn.ReLU, gate_layer=nn.Hardsigmoid)
        self.ghost2 = GhostModule(mid_chs, out_chs, use_act=False)
        if in_chs == out_chs and self.stride == 1:
            self.shortcut = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, in_chs, 3, stride, 1, groups=in_chs, bias=False), nn.BatchNorm2d(in_chs),
                nn.Conv2d(in_chs, out_chs, 1, 1, 0, bias=False), nn.BatchNorm2d(out_chs))

    def forward(self, x):
        shortcut = x
        x = self.ghost1(x)
        if self.conv_dw is not None:
            x = self.conv_dw(x)
            x = self.bn_dw(x)
        x = self.se(x)
        x = self.ghost2(x)
        x += self.shortcut(shortcut)
        return x


class GhostNetTiny(nn.Module):
    def __init__(self, classes=CLASSES):
        super().__init__()
        self.conv_stem = nn.Conv2d(CIN, 6, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.act1 = nn.ReLU(inplace=True)
        self.blocks = nn.Sequential(GhostBottleneck(6, 10, 7, stride=1),   # odd widths: the slice cuts
                                    GhostBottleneck(7, 12, 8, stride=2))
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_head = nn.Conv2d(8, 12, 1, bias=True)
        self.act2 = nn.ReLU(inplace=True)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(12, classes)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv_stem(x)))
        x = self.blocks(x)
        x = self.act2(self.conv_head(self.global_pool(x)))
        return self.classifier(self.flatten(x))


# ========== 10. HRNet fusion
class HRFusionNet(nn.Module):
    def __init__(self, mode="nearest", classes=CLASSES):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(CIN, 6, 3, 1, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(inplace=True))
        self.branch_hi = nn.Sequential(nn.Conv2d(6, 6, 3, 1, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(inplace=True))
        self.transition_lo = nn.Sequential(nn.Conv2d(6, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8),
                                           nn.ReLU(inplace=True))
        self.branch_lo = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        up = nn.Upsample(scale_factor=2, mode=mode) if mode == "nearest" else \
            nn.Upsample(scale_factor=2, mode=mode, align_corners=False)
        self.fuse_lo_to_hi = nn.Sequential(nn.Conv2d(8, 6, 1, 1, 0, bias=False), nn.BatchNorm2d(6), up)
        self.fuse_hi_to_lo = nn.Sequential(nn.Conv2d(6, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8))
        self.fuse_act = nn.ReLU(inplace=False)
        self.fc = nn.Linear(6 + 8, classes)

    def forward(self, x):
        x = self.stem(x)
        x_lo = self.transition_lo(x)
        x_hi = self.branch_hi(x)
        x_lo = self.branch_lo(x_lo)
        y_hi = self.fuse_act(x_hi + self.fuse_lo_to_hi(x_lo))
        y_lo = self.fuse_act(self.fuse_hi_to_lo(x_hi) + x_lo)
        pooled = torch.cat([y_hi.mean((2, 3)), y_lo.mean((2, 3))], dim=1)
        return self.fc(pooled)


# ========== 11. parametrized weights
class WeightNormConvNet(nn.Module):
    def __init__(self, legacy: bool = False, classes=CLASSES):
        super().__init__()
        wn = torch.nn.utils.weight_norm if legacy else torch.nn.utils.parametrizations.weight_norm
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the legacy hook form is deprecated
            self.conv1 = wn(nn.Conv2d(CIN, 6, 3, padding=1))
            self.fc = wn(nn.Linear(8, classes))
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ========== 12. hooks
class SmallConvNet(nn.Module):
    def __init__(self, classes=CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(CIN, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def hooks_changing_values() -> nn.Module:
    m = SmallConvNet()
    m.conv1.register_forward_hook(lambda mod, inp, out: out * 0.5)
    m.bn2.register_forward_pre_hook(lambda mod, inp: (inp[0] + 1,))
    return m


def hooks_keeping_values() -> nn.Module:
    m = SmallConvNet()
    m.seen_shapes = []  # a plain attribute: appended to by the hooks

    def record(mod, inp, out):
        m.seen_shapes.append(tuple(out.detach().shape))

    def look(mod, inp):
        m.seen_shapes.append(("pre", tuple(inp[0].shape)))

    m.conv2.register_forward_hook(record)
    m.bn1.register_forward_pre_hook(look)
    return m


# ========== 13. untraceable classifier head
class DynamicHead(nn.Module):
    """timm-ClassifierHead-like: pools and flattens only when it must (fx cannot
    branch on a traced shape). Holds its Linear as a child, like timm's head."""

    def __init__(self, cin, classes=CLASSES):
        super().__init__()
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        if x.shape[-1] > 1:
            x = F.adaptive_avg_pool2d(x, 1)
        if x.dim() == 4:
            x = x.flatten(1)
        return self.fc(x)


class DynamicHeadLeaf(nn.Module):
    """The same head holding its weight directly: a childless untraceable module."""

    def __init__(self, cin, classes=CLASSES):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, cin) / math.sqrt(cin))
        self.bias = nn.Parameter(torch.zeros(classes))

    def forward(self, x):
        if x.shape[-1] > 1:
            x = F.adaptive_avg_pool2d(x, 1)
        if x.dim() == 4:
            x = x.flatten(1)
        return F.linear(x, self.weight, self.bias)


class UntraceableHeadNet(nn.Module):
    def __init__(self, head=DynamicHead, classes=CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(CIN, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = head(8, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x)


# ========== 14. other norms, decoder, activations, padding
class GroupNormBlock(nn.Module):
    """ResNet BasicBlock with GroupNorm (as in BiT / detection backbones)."""

    def __init__(self, cin, cout, stride=1, groups=2):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.gn1 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.gn2 = nn.GroupNorm(groups, cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(groups, cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        return F.relu(out + identity)


class GroupNormResNet(nn.Module):
    def __init__(self, classes=CLASSES):
        super().__init__()
        self.stem = nn.Conv2d(CIN, 6, 3, 1, 1, bias=False)
        self.gn = nn.GroupNorm(3, 6)
        self.block1 = GroupNormBlock(6, 6)
        self.block2 = GroupNormBlock(6, 8, stride=2)
        self.head = GlobalPoolHead(8, classes)

    def forward(self, x):
        return self.head(self.block2(self.block1(F.relu(self.gn(self.stem(x))))))


class InstanceNormNet(nn.Module):
    def __init__(self, classes=CLASSES, track=False):
        super().__init__()
        self.conv1 = nn.Conv2d(CIN, 6, 3, 1, 1)
        self.in1 = nn.InstanceNorm2d(6, affine=True, track_running_stats=track)
        self.conv2 = nn.Conv2d(6, 8, 3, 2, 1)
        self.in2 = nn.InstanceNorm2d(8, affine=False)
        self.head = GlobalPoolHead(8, classes)

    def forward(self, x):
        x = F.relu(self.in1(self.conv1(x)))
        x = F.leaky_relu(self.in2(self.conv2(x)), 0.2)
        return self.head(x)


class UNetStep(nn.Module):
    """One encoder/decoder step: down conv, ConvTranspose2d up, concat skip."""

    def __init__(self, classes=CLASSES):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(CIN, 6, 3, 1, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(inplace=True))
        self.down = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU(inplace=True))
        self.up = nn.ConvTranspose2d(8, 6, kernel_size=2, stride=2)
        self.up_odd = nn.ConvTranspose2d(8, 4, kernel_size=3, stride=2, padding=1, output_padding=1, bias=False)
        self.dec = nn.Sequential(nn.Conv2d(6 + 6 + 4, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8),
                                 nn.ReLU(inplace=True))
        self.head = GlobalPoolHead(8, classes)

    def forward(self, x):
        e = self.enc(x)
        d = self.down(e)
        u = torch.cat([e, self.up(d), self.up_odd(d)], dim=1)
        return self.head(self.dec(u))


class SmoothActNet(nn.Module):
    def __init__(self, classes=CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(CIN, 6, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.act1 = nn.Mish()
        self.conv2 = nn.Conv2d(6, 6, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.act2 = nn.Softplus(beta=2.0)
        self.conv3 = nn.Conv2d(6, 8, 3, 1, 1)
        self.act3 = nn.PReLU(num_parameters=8)
        self.act4 = nn.PReLU()
        self.head = GlobalPoolHead(8, classes)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act4(self.act3(self.conv3(x)) - 0.1)
        return self.head(x)


class ReflectPadNet(nn.Module):
    def __init__(self, classes=CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(CIN, 6, 3, 1, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, 2, 1, bias=False, padding_mode="reflect")
        self.bn2 = nn.BatchNorm2d(8)
        self.head = GlobalPoolHead(8, classes)

    def forward(self, x):
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x)


# ========== 15. torchvision classics
def conv3x3(in_planes, out_planes, stride=1, groups=1, dilation=1):
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=dilation, groups=groups, bias=False,
                     dilation=dilation)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class TVBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class TVResNet(nn.Module):
    def __init__(self, classes=CLASSES):
        super().__init__()
        self.inplanes = 8
        self.conv1 = nn.Conv2d(CIN, 8, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(TVBottleneck, 3, 1, stride=1, groups=2, base_width=64)  # 8 -> 12
        self.layer2 = self._make_layer(BasicBlock, 10, 2, stride=2)                         # 12 -> 10
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(10, classes)

    def _make_layer(self, block, planes, blocks, stride=1, **kw):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, **kw)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, **kw))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


class _DenseLayer(nn.Module):
    def __init__(self, num_input_features, growth_rate, bn_size, drop_rate=0.0):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, 1, 1, bias=False)
        self.drop_rate = float(drop_rate)

    def bn_function(self, inputs: List[Tensor]) -> Tensor:
        concated_features = torch.cat(inputs, 1)
        return self.conv1(self.relu1(self.norm1(concated_features)))

    def forward(self, input):
        prev_features = [input] if isinstance(input, Tensor) else input
        bottleneck_output = self.bn_function(prev_features)
        new_features = self.conv2(self.relu2(self.norm2(bottleneck_output)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class _DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers, num_input_features, bn_size, growth_rate):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}",
                            _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size))

    def forward(self, init_features):
        features = [init_features]
        for name, layer in self.items():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features, num_output_features):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, 1, 1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNetTiny(nn.Module):
    def __init__(self, classes=CLASSES, growth_rate=4, bn_size=2):
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(CIN, 6, 3, 1, 1, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(6))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.features.add_module("denseblock1", _DenseBlock(2, 6, bn_size, growth_rate))
        self.features.add_module("transition1", _Transition(6 + 2 * growth_rate, 7))
        self.features.add_module("denseblock2", _DenseBlock(2, 7, bn_size, growth_rate))
        self.features.add_module("norm5", nn.BatchNorm2d(7 + 2 * growth_rate))
        self.classifier = nn.Linear(7 + 2 * growth_rate, classes)

    def forward(self, x):
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)


class BasicConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x)
        return F.relu(x, inplace=True)


class Inception(nn.Module):
    def __init__(self, in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj):
        super().__init__()
        self.branch1 = BasicConv2d(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(BasicConv2d(in_channels, ch3x3red, kernel_size=1),
                                     BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(in_channels, ch5x5red, kernel_size=1),
                                     BasicConv2d(ch5x5red, ch5x5, kernel_size=3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
                                     BasicConv2d(in_channels, pool_proj, kernel_size=1))

    def _forward(self, x):
        return [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]

    def forward(self, x):
        outputs = self._forward(x)
        return torch.cat(outputs, 1)


class GoogLeNetTiny(nn.Module):
    def __init__(self, classes=CLASSES):
        super().__init__()
        self.conv1 = BasicConv2d(CIN, 8, kernel_size=3, stride=2, padding=1)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception3a = Inception(8, 4, 3, 4, 2, 3, 3)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=0.2)
        self.fc = nn.Linear(14, classes)

    def forward(self, x):
        x = self.maxpool1(self.conv1(x))
        x = self.inception3a(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


# ========== registry
def _factory(ctor: Callable[[], nn.Module]) -> Callable[[], Tuple[nn.Module, Tensor, Tensor]]:
    def f():
        return build(_seeded(ctor))
    f.__name__ = getattr(ctor, "__name__", "factory")
    return f


ZOO: Dict[str, Callable[[], Tuple[nn.Module, Tensor, Tensor]]] = {
    # 1. timm BatchNormAct2d (+ 5b: EfficientNet SE with sigmoid/SiLU)
    "timm_bnact_relu": _factory(BNActConvNet),
    "timm_efficientnet_bnact_silu_se": _factory(EfficientNetTiny),
    # 2. weight standardization
    "timm_stdconv2d": _factory(lambda: StdConvNet(StdConv2d)),
    "bit_stdconv2d_var_mean": _factory(lambda: StdConvNet(StdConv2dBiT)),
    # 3. TF 'same' padding
    "timm_conv2d_same": _factory(TfSameNet),
    # 4. MobileNetV2
    "tv_mobilenet_v2": _factory(MobileNetV2Tiny),
    # 5. SE variants
    "tv_mobilenet_v3_hardswish_se": _factory(MobileNetV3Tiny),
    "tv_regnety_se_relu": _factory(RegNetYTiny),
    # 6. ShuffleNetV2
    "tv_shufflenet_v2": _factory(ShuffleNetV2Tiny),
    # 7. ResNeSt
    "resnest_split_attention": _factory(ResNeStTiny),
    # 8. ConvNeXt
    "convnext_droppath_layernorm2d": _factory(ConvNeXtTiny),
    # 9. GhostNet
    "timm_ghostnet": _factory(GhostNetTiny),
    # 10. HRNet fusion
    "hrnet_fusion_nearest": _factory(lambda: HRFusionNet("nearest")),
    "hrnet_fusion_bilinear": _factory(lambda: HRFusionNet("bilinear")),
    # 11. parametrizations
    "weight_norm_parametrization": _factory(lambda: WeightNormConvNet(legacy=False)),
    "weight_norm_legacy_hook": _factory(lambda: WeightNormConvNet(legacy=True)),
    # 12. hooks
    "hooks_value_changing": _factory(hooks_changing_values),
    "hooks_value_keeping": _factory(hooks_keeping_values),
    # 13. untraceable head
    "untraceable_head": _factory(lambda: UntraceableHeadNet(DynamicHead)),
    "untraceable_head_leaf": _factory(lambda: UntraceableHeadNet(DynamicHeadLeaf)),
    # 14. other norms, decoder, activations, padding
    "groupnorm_resnet": _factory(GroupNormResNet),
    "instancenorm": _factory(InstanceNormNet),
    "instancenorm_running_stats": _factory(lambda: InstanceNormNet(track=True)),
    "unet_convtranspose": _factory(UNetStep),
    "mish_softplus_prelu": _factory(SmoothActNet),
    "reflect_pad": _factory(ReflectPadNet),
    # 15. torchvision classics
    "tv_resnet_basic_bottleneck": _factory(TVResNet),
    "tv_densenet": _factory(DenseNetTiny),
    "tv_googlenet_inception": _factory(GoogLeNetTiny),
}

# Checked in eval mode too (BatchNorm on running statistics, Dropout/DropPath off).
EVAL_MODELS = ["timm_bnact_relu", "timm_efficientnet_bnact_silu_se", "timm_stdconv2d", "timm_conv2d_same",
               "tv_mobilenet_v2", "tv_mobilenet_v3_hardswish_se", "tv_shufflenet_v2", "resnest_split_attention",
               "convnext_droppath_layernorm2d", "hooks_value_changing", "untraceable_head",
               "instancenorm_running_stats", "tv_resnet_basic_bottleneck", "tv_densenet"]

# Qualified name of the module inside each model that fx cannot trace.
UNTRACEABLE_MODULES = {"untraceable_head": "head", "untraceable_head_leaf": "head"}
