"""External-style networks: torchvision's and timm's architectures, written here.

These are not the repository's curvature-friendly models (``models.MODELS``):
they follow the structure the two libraries give their networks (module
names, block classes, in-place ReLUs shared within a block, subclasses with
their own ``forward``, channels-last permutes, stochastic depth drawn with
``bernoulli_``), so that hfopt is measured on code written the way model zoos
write it.  None of it is copied from torchvision or timm.

* :func:`resnet18`        torchvision ResNet-18 (ImageNet stem: 7x7/2 conv, 3x3/2 max pool)
* :func:`mobilenet_v2`    torchvision MobileNetV2, width 1.0
* :func:`efficientnet_b0` EfficientNet-B0 in timm's block structure (MBConv, SE, DropPath)
* :func:`convnext_stack`  a small ConvNeXt (timm's ``ConvNeXtBlock``/``LayerNorm2d``), 2 stages

They are deliberately not registered in ``models.MODELS``: that registry is the
set of networks built only from layers with exact closed-form rules (its
tests pin the set); import them from ``models.external`` (``EXTERNAL`` maps a
name to the factory).  Every factory takes ``num_classes``; the ones with
random regularisation take their drop rates (the benchmark sets them to 0 so
that hfopt and torch.func differentiate the same function).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["EXTERNAL", "NO_DROP", "DropPath", "LayerNorm2d", "build_external", "resnet18", "mobilenet_v2",
           "efficientnet_b0", "convnext_stack"]


# ============================================================================ shared pieces
def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True) -> Tensor:
    """Stochastic depth per sample, the way timm writes it: one Bernoulli(keep)
    draw per sample into a fresh ``new_empty`` tensor, scaled by ``1/keep``."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(shape).bernoulli_(keep)
    if keep > 0.0 and scale_by_keep:
        mask.div_(keep)
    return x * mask


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (timm): permute to
    channels-last, ``F.layer_norm``, permute back."""

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Round channels to a multiple of ``divisor`` without dropping more than 10%
    (the MobileNet/EfficientNet convention)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


# ============================================================================ ResNet-18 (torchvision)
def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: one in-place ReLU module applied twice, the
    shortcut added in place, ``downsample`` a ``Sequential(conv1x1, BN)``."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    """torchvision's ResNet with BasicBlocks: ImageNet stem, four stages, global pool, ``fc``."""

    def __init__(self, layers: Sequence[int], num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * BasicBlock.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * BasicBlock.expansion, stride),
                                       nn.BatchNorm2d(planes * BasicBlock.expansion))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet18(num_classes: int = 10) -> ResNet:
    """torchvision's ResNet-18 (about 11.2M parameters with 10 classes)."""
    return ResNet([2, 2, 2, 2], num_classes)


# ============================================================================ MobileNetV2 (torchvision)
class ConvBNActivation(nn.Sequential):
    """``Conv2d -> BatchNorm2d -> activation`` as one Sequential (torchvision's
    ``Conv2dNormActivation``): "same" padding ``(k - 1) // 2``, no conv bias."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 activation: Optional[Callable[..., nn.Module]] = nn.ReLU6) -> None:
        layers: List[nn.Module] = [
            nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout)]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)
        self.out_channels = cout


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion (skipped for t = 1), 3x3 depthwise,
    ReLU6 after both, linear 1x1 bottleneck; identity shortcut when the shape
    is kept."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2, got {stride}")
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNActivation(inp, hidden, kernel_size=1))
        layers += [ConvBNActivation(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
                   nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    # t (expansion), c (channels), n (repeats), s (stride of the first repeat)
    SETTINGS = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2],
                [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, round_nearest: int = 8,
                 dropout: float = 0.2) -> None:
        super().__init__()
        input_channel = _make_divisible(32 * width_mult, round_nearest)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: List[nn.Module] = [ConvBNActivation(3, input_channel, stride=2)]
        for t, c, n, s in self.SETTINGS:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(ConvBNActivation(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v2(num_classes: int = 10, dropout: float = 0.2) -> MobileNetV2:
    """torchvision's MobileNetV2, width 1.0 (about 2.2M parameters with 10 classes)."""
    return MobileNetV2(num_classes, dropout=dropout)


# ============================================================================ EfficientNet-B0 (timm structure)
class SqueezeExcite(nn.Module):
    """timm's SE: spatial mean, 1x1 reduce conv (bias), SiLU, 1x1 expand conv, sigmoid gate."""

    def __init__(self, in_chs: int, rd_channels: int, act_layer: Callable[..., nn.Module] = nn.SiLU) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(in_chs, rd_channels, 1, bias=True)
        self.act1 = act_layer(inplace=True)
        self.conv_expand = nn.Conv2d(rd_channels, in_chs, 1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.conv_reduce(x_se)
        x_se = self.act1(x_se)
        x_se = self.conv_expand(x_se)
        return x * self.gate(x_se)


class DepthwiseSeparableConv(nn.Module):
    """The first stage's block (expansion 1): depthwise conv, BN, SiLU, SE, 1x1
    projection, BN, and a DropPath'ed identity shortcut when the shape is kept."""

    def __init__(self, in_chs: int, out_chs: int, dw_kernel_size: int = 3, stride: int = 1, se_ratio: float = 0.25,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_dw = nn.Conv2d(in_chs, in_chs, dw_kernel_size, stride, dw_kernel_size // 2, groups=in_chs,
                                 bias=False)
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = nn.SiLU(inplace=True)
        self.se = SqueezeExcite(in_chs, max(1, int(in_chs * se_ratio))) if se_ratio else nn.Identity()
        self.conv_pw = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv_dw(x)))
        x = self.se(x)
        x = self.bn2(self.conv_pw(x))
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class MBConv(nn.Module):
    """timm's ``InvertedResidual`` with SiLU: 1x1 expansion, BN, SiLU, k x k
    depthwise, BN, SiLU, SE (reduced to ``in_chs * se_ratio``), linear 1x1
    projection, BN, DropPath'ed identity shortcut when the shape is kept."""

    def __init__(self, in_chs: int, out_chs: int, dw_kernel_size: int = 3, stride: int = 1, exp_ratio: float = 6.0,
                 se_ratio: float = 0.25, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        mid_chs = _make_divisible(in_chs * exp_ratio)
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_pw = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_chs)
        self.act1 = nn.SiLU(inplace=True)
        self.conv_dw = nn.Conv2d(mid_chs, mid_chs, dw_kernel_size, stride, dw_kernel_size // 2, groups=mid_chs,
                                 bias=False)
        self.bn2 = nn.BatchNorm2d(mid_chs)
        self.act2 = nn.SiLU(inplace=True)
        self.se = SqueezeExcite(mid_chs, max(1, int(in_chs * se_ratio))) if se_ratio else nn.Identity()
        self.conv_pwl = nn.Conv2d(mid_chs, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv_pw(x)))
        x = self.act2(self.bn2(self.conv_dw(x)))
        x = self.se(x)
        x = self.bn3(self.conv_pwl(x))
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class EfficientNet(nn.Module):
    # block type, repeats, kernel, stride, expansion, out channels (timm's "ds_r1_k3_s1_e1_c16_se0.25", ...)
    B0_STAGES = [("ds", 1, 3, 1, 1, 16), ("ir", 2, 3, 2, 6, 24), ("ir", 2, 5, 2, 6, 40), ("ir", 3, 3, 2, 6, 80),
                 ("ir", 3, 5, 1, 6, 112), ("ir", 4, 5, 2, 6, 192), ("ir", 1, 3, 1, 6, 320)]

    def __init__(self, num_classes: int = 1000, stem_size: int = 32, num_features: int = 1280,
                 drop_rate: float = 0.2, drop_path_rate: float = 0.2, stages=None) -> None:
        super().__init__()
        stages = self.B0_STAGES if stages is None else stages
        self.conv_stem = nn.Conv2d(3, stem_size, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_size)
        self.act1 = nn.SiLU(inplace=True)
        total = sum(s[1] for s in stages)
        blocks: List[nn.Module] = []
        cin, idx = stem_size, 0
        for kind, repeats, k, s, e, cout in stages:
            stage: List[nn.Module] = []
            for i in range(repeats):
                dpr = drop_path_rate * idx / total  # linear stochastic-depth schedule over all blocks
                stride = s if i == 0 else 1
                if kind == "ds":
                    stage.append(DepthwiseSeparableConv(cin, cout, k, stride, 0.25, dpr))
                else:
                    stage.append(MBConv(cin, cout, k, stride, e, 0.25, dpr))
                cin, idx = cout, idx + 1
            blocks.append(nn.Sequential(*stage))
        self.blocks = nn.Sequential(*blocks)
        self.conv_head = nn.Conv2d(cin, num_features, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(num_features)
        self.act2 = nn.SiLU(inplace=True)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.drop_rate = drop_rate
        self.classifier = nn.Linear(num_features, num_classes)
        for m in self.modules():  # timm's _init_weight_goog
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                r = 1.0 / math.sqrt(m.weight.size(0))
                nn.init.uniform_(m.weight, -r, r)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv_stem(x)))
        x = self.blocks(x)
        return self.act2(self.bn2(self.conv_head(x)))

    def forward_head(self, x: Tensor) -> Tensor:
        x = self.global_pool(x).flatten(1)
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def efficientnet_b0(num_classes: int = 10, drop_rate: float = 0.2, drop_path_rate: float = 0.2) -> EfficientNet:
    """EfficientNet-B0, the full standard stage table (16 blocks; about 4.0M
    parameters with 10 classes).  A float32 forward at batch 32, 3x64x64 takes
    well under a second on two CPU cores, so no repeats are cut."""
    return EfficientNet(num_classes, drop_rate=drop_rate, drop_path_rate=drop_path_rate)


# ============================================================================ ConvNeXt (timm structure)
class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv, permute to channels-last, LayerNorm, Linear 4x, GELU,
    Linear, layer scale ``gamma``, permute back, DropPath, residual."""

    def __init__(self, dim: int, drop_path: float = 0.0, ls_init_value: float = 0.1, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio * dim)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim)) if ls_init_value > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.conv_dw(x)
        x = x.permute(0, 2, 3, 1)
        x = self.norm(x)
        x = self.mlp(x)
        if self.gamma is not None:
            x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return self.drop_path(x) + shortcut


class ConvNeXtStage(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, depth: int, drop_path_rates: Sequence[float],
                 ls_init_value: float) -> None:
        super().__init__()
        if in_chs != out_chs:
            self.downsample = nn.Sequential(LayerNorm2d(in_chs), nn.Conv2d(in_chs, out_chs, kernel_size=2, stride=2))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[ConvNeXtBlock(out_chs, drop_path_rates[j], ls_init_value)
                                      for j in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXt(nn.Module):
    """Patchify stem (4x4/4 conv + LayerNorm2d), stages of ConvNeXt blocks with
    LayerNorm2d + 2x2/2 conv downsampling between them, and timm's norm head:
    global average pool, LayerNorm2d, flatten, Linear."""

    def __init__(self, num_classes: int = 1000, depths: Sequence[int] = (3, 3, 9, 3),
                 dims: Sequence[int] = (96, 192, 384, 768), drop_path_rate: float = 0.0,
                 ls_init_value: float = 0.1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0]))
        total = sum(depths)
        rates = [drop_path_rate * i / max(1, total - 1) for i in range(total)]
        stages, cin, k = [], dims[0], 0
        for i, (d, c) in enumerate(zip(depths, dims)):
            stages.append(ConvNeXtStage(cin, c, d, rates[k:k + d], ls_init_value))
            cin, k = c, k + d
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential()
        self.head.add_module("global_pool", nn.AdaptiveAvgPool2d(1))
        self.head.add_module("norm", LayerNorm2d(cin))
        self.head.add_module("flatten", nn.Flatten(1))
        self.head.add_module("fc", nn.Linear(cin, num_classes))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)))


def convnext_stack(num_classes: int = 10, depth: Sequence[int] = (2, 2), dims: Sequence[int] = (48, 96),
                   drop_path_rate: float = 0.1, ls_init_value: float = 0.1) -> ConvNeXt:
    """A two-stage ConvNeXt (blocks 2+2 at 48 and 96 channels by default).  The
    layer scale starts at 0.1 rather than timm's 1e-6, so that the blocks'
    curvature is not negligible next to the shortcut's."""
    return ConvNeXt(num_classes, depth, dims, drop_path_rate, ls_init_value)


EXTERNAL: Dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "mobilenet_v2": mobilenet_v2,
    "efficientnet_b0": efficientnet_b0,
    "convnext_stack": convnext_stack,
}

# Keyword arguments that switch each factory's random regularisation off (the
# benchmark's setting: a deterministic function that hfopt and torch.func both see).
NO_DROP: Dict[str, dict] = {
    "resnet18": {},
    "mobilenet_v2": {"dropout": 0.0},
    "efficientnet_b0": {"drop_rate": 0.0, "drop_path_rate": 0.0},
    "convnext_stack": {"drop_path_rate": 0.0},
}


def build_external(name: str, num_classes: int = 10, drop: bool = True) -> nn.Module:
    """``EXTERNAL[name](num_classes)``; ``drop=False`` sets every dropout and drop-path rate to 0."""
    if name not in EXTERNAL:
        raise ValueError(f"unknown external model {name!r}; choose one of {sorted(EXTERNAL)}")
    return EXTERNAL[name](num_classes=num_classes, **({} if drop else NO_DROP[name]))
