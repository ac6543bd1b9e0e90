"""Torch-only re-implementations of torchvision classification models, for ONNX graph tests.

torchvision cannot be installed here, so this module mirrors the module structure (attribute
names included) and the forward computation of ``torchvision.models`` closely enough that the
ONNX exports have the same graph structure as exports of the real models: same block kinds,
activations, squeeze-excitation, LayerNorm placements, residual / projection shortcuts.
Stochastic depth and dropout are identities in eval mode, as in torchvision.

Every builder's default arguments give the true architecture. To make tests cheap, the CNN
builders take ``width_mult`` (scales channel counts, rounded to multiples of 8 and of the group
width; depthwise convs keep ``groups == channels``) and ``vit_b_16`` takes ``image_size``,
``hidden_dim``, ``mlp_dim``, ``num_heads`` and ``num_layers``. Shrinking never changes the CNNs' depth or block
structure (the cheap ViT keeps 4 of its 12 identical encoder layers: ``EXPECTED_SMALL``): whether a block has a residual connection, a projection shortcut or an expansion
conv is decided from the nominal (width 1.0) channel counts, exactly as torchvision decides it
for the default model, so rounding at small widths cannot add or remove a shortcut.

``python tests/zoo.py`` runs a self-check: residual/projection counts from the module tree
against ``EXPECTED``, and a forward pass of every cheap variant.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
    "regnet_x_400mf", "convnext_tiny", "vit_b_16", "BUILDERS", "EXPECTED", "SMALL_KW",
    "INPUT_SIZE", "export", "count_residual_blocks", "EXPECTED_SMALL",
]


# --------------------------------------------------------------------------------------------
# shared helpers (torchvision/ops/misc.py, torchvision/ops/stochastic_depth.py, models/_utils.py)
# --------------------------------------------------------------------------------------------

def _make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """torchvision.models._utils._make_divisible."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:  # make sure that round down does not go down by more than 10%
        new_v += divisor
    return new_v


def _ch(channels: int, width_mult: float, divisor: int = 8) -> int:
    """Scaled channel count; identity for width_mult == 1 and channels % divisor == 0."""
    return _make_divisible(channels * width_mult, divisor)


class Conv2dNormActivation(nn.Sequential):
    """torchvision.ops.misc.Conv2dNormActivation: Conv2d [+ norm] [+ activation]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: Optional[int] = None, groups: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = nn.BatchNorm2d,
                 activation_layer: Optional[Callable[..., nn.Module]] = nn.ReLU,
                 dilation: int = 1, inplace: Optional[bool] = True,
                 bias: Optional[bool] = None) -> None:
        if padding is None:
            padding = (kernel_size - 1) // 2 * dilation
        if bias is None:
            bias = norm_layer is None
        layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                                             dilation=dilation, groups=groups, bias=bias)]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if activation_layer is not None:
            params = {} if inplace is None else {"inplace": inplace}
            layers.append(activation_layer(**params))
        super().__init__(*layers)
        self.out_channels = out_channels


class SqueezeExcitation(nn.Module):
    """torchvision.ops.misc.SqueezeExcitation: x * sigma(fc2(delta(fc1(avgpool(x)))))."""

    def __init__(self, input_channels: int, squeeze_channels: int,
                 activation: Callable[..., nn.Module] = nn.ReLU,
                 scale_activation: Callable[..., nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def forward(self, input: Tensor) -> Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(input)))))
        return scale * input


class StochasticDepth(nn.Module):
    """torchvision.ops.stochastic_depth.StochasticDepth (identity in eval mode)."""

    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return input
        survival_rate = 1.0 - self.p
        size = [input.shape[0]] + [1] * (input.ndim - 1) if self.mode == "row" else [1] * input.ndim
        noise = torch.empty(size, dtype=input.dtype, device=input.device).bernoulli_(survival_rate)
        if survival_rate > 0.0:
            noise.div_(survival_rate)
        return input * noise


class Permute(nn.Module):
    """torchvision.ops.misc.Permute."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return torch.permute(x, self.dims)


def _init_cnn(model: nn.Module, linear_std: Optional[float] = 0.01) -> None:
    """The kaiming-normal / ones / zeros init shared by the torchvision CNNs."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------
# ResNet (torchvision/models/resnet.py)
# --------------------------------------------------------------------------------------------

def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
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
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        width = planes  # groups=1, base_width=64
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)  # stride on the 3x3 (ResNet V1.5)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, block: type, layers: list[int], num_classes: int = 1000,
                 width_mult: float = 1.0) -> None:
        super().__init__()
        self._wm = width_mult
        self.inplanes = _ch(64, width_mult)
        self._nominal_inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block: type, planes_nominal: int, blocks: int, stride: int = 1) -> nn.Sequential:
        planes = _ch(planes_nominal, self._wm)
        downsample = None
        # decided on nominal widths, as torchvision does for the real model
        if stride != 1 or self._nominal_inplanes != planes_nominal * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        self._nominal_inplanes = planes_nominal * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(num_classes: int = 1000, width_mult: float = 1.0, **kw) -> nn.Module:
    """ResNet-18, mirrors torchvision/models/resnet.py (BasicBlock, layers [2, 2, 2, 2])."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, width_mult, **kw)


def resnet34(num_classes: int = 1000, width_mult: float = 1.0, **kw) -> nn.Module:
    """ResNet-34, mirrors torchvision/models/resnet.py (BasicBlock, layers [3, 4, 6, 3])."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, width_mult, **kw)


def resnet50(num_classes: int = 1000, width_mult: float = 1.0, **kw) -> nn.Module:
    """ResNet-50 (V1.5), mirrors torchvision/models/resnet.py (Bottleneck, layers [3, 4, 6, 3])."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, width_mult, **kw)


# --------------------------------------------------------------------------------------------
# MobileNetV2 (torchvision/models/mobilenetv2.py)
# --------------------------------------------------------------------------------------------

class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int,
                 use_res_connect: bool) -> None:
        super().__init__()
        self.stride = stride
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = use_res_connect  # stride == 1 and inp == oup (nominal widths)
        layers: list[nn.Module] = []
        if expand_ratio != 1:  # pw
            layers.append(Conv2dNormActivation(inp, hidden_dim, kernel_size=1, activation_layer=nn.ReLU6))
        layers += [
            # dw
            Conv2dNormActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim,
                                 activation_layer=nn.ReLU6),
            # pw-linear
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup
        self._is_cn = stride > 1

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        setting = [  # t, c, n, s
            [1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2],
            [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1],
        ]
        input_channel, nominal_in = _ch(32, width_mult), 32
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult), 8)
        features: list[nn.Module] = [
            Conv2dNormActivation(3, input_channel, stride=2, activation_layer=nn.ReLU6)]
        for t, c, n, s in setting:
            output_channel = _ch(c, width_mult)
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(InvertedResidual(input_channel, output_channel, stride, t,
                                                 use_res_connect=stride == 1 and nominal_in == c))
                input_channel, nominal_in = output_channel, c
        features.append(Conv2dNormActivation(input_channel, self.last_channel, kernel_size=1,
                                             activation_layer=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        _init_cnn(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0, **kw) -> nn.Module:
    """MobileNetV2, mirrors torchvision/models/mobilenetv2.py (ReLU6 inverted residuals)."""
    return MobileNetV2(num_classes, width_mult, **kw)


# --------------------------------------------------------------------------------------------
# MobileNetV3 (torchvision/models/mobilenetv3.py)
# --------------------------------------------------------------------------------------------

class InvertedResidualV3(nn.Module):
    """torchvision.models.mobilenetv3.InvertedResidual."""

    def __init__(self, cin: int, kernel: int, cexp: int, cout: int, use_se: bool, use_hs: bool,
                 stride: int, norm_layer: Callable[..., nn.Module], has_expand: bool,
                 use_res_connect: bool) -> None:
        super().__init__()
        self.use_res_connect = use_res_connect
        act = nn.Hardswish if use_hs else nn.ReLU
        layers: list[nn.Module] = []
        if has_expand:  # expand
            layers.append(Conv2dNormActivation(cin, cexp, kernel_size=1, norm_layer=norm_layer,
                                               activation_layer=act))
        layers.append(Conv2dNormActivation(cexp, cexp, kernel_size=kernel, stride=stride, groups=cexp,
                                           norm_layer=norm_layer, activation_layer=act))  # depthwise
        if use_se:
            layers.append(SqueezeExcitation(cexp, _make_divisible(cexp // 4, 8),
                                            scale_activation=nn.Hardsigmoid))
        layers.append(Conv2dNormActivation(cexp, cout, kernel_size=1, norm_layer=norm_layer,
                                           activation_layer=None))  # project
        self.block = nn.Sequential(*layers)
        self.out_channels = cout
        self._is_cn = stride > 1

    def forward(self, input: Tensor) -> Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result += input
        return result


class MobileNetV3(nn.Module):
    def __init__(self, setting: list[tuple], last_channel: int, num_classes: int = 1000,
                 width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
        adj = partial(_ch, width_mult=width_mult)
        layers: list[nn.Module] = [Conv2dNormActivation(3, adj(setting[0][0]), kernel_size=3, stride=2,
                                                        norm_layer=norm_layer,
                                                        activation_layer=nn.Hardswish)]
        for cin, k, cexp, cout, se, act, s in setting:
            layers.append(InvertedResidualV3(
                adj(cin), k, adj(cexp), adj(cout), se, act == "HS", s, norm_layer,
                has_expand=cexp != cin, use_res_connect=s == 1 and cin == cout))
        last_in = adj(setting[-1][3])
        last_out = 6 * last_in
        layers.append(Conv2dNormActivation(last_in, last_out, kernel_size=1, norm_layer=norm_layer,
                                           activation_layer=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last_channel = adj(last_channel)
        self.classifier = nn.Sequential(
            nn.Linear(last_out, last_channel), nn.Hardswish(inplace=True),
            nn.Dropout(p=dropout, inplace=True), nn.Linear(last_channel, num_classes))
        _init_cnn(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v3_small(num_classes: int = 1000, width_mult: float = 1.0, **kw) -> nn.Module:
    """MobileNetV3-Small, mirrors torchvision/models/mobilenetv3.py (Hardswish, SE w/ Hardsigmoid)."""
    setting = [  # input_c, kernel, expanded_c, out_c, use_se, activation, stride (dilation 1)
        (16, 3, 16, 16, True, "RE", 2),
        (16, 3, 72, 24, False, "RE", 2),
        (24, 3, 88, 24, False, "RE", 1),
        (24, 5, 96, 40, True, "HS", 2),
        (40, 5, 240, 40, True, "HS", 1),
        (40, 5, 240, 40, True, "HS", 1),
        (40, 5, 120, 48, True, "HS", 1),
        (48, 5, 144, 48, True, "HS", 1),
        (48, 5, 288, 96, True, "HS", 2),
        (96, 5, 576, 96, True, "HS", 1),
        (96, 5, 576, 96, True, "HS", 1),
    ]
    return MobileNetV3(setting, 1024, num_classes, width_mult, **kw)


# --------------------------------------------------------------------------------------------
# EfficientNet-B0 (torchvision/models/efficientnet.py)
# --------------------------------------------------------------------------------------------

class MBConv(nn.Module):
    def __init__(self, expand_ratio: float, kernel: int, stride: int, cin: int, cout: int,
                 stochastic_depth_prob: float, use_res_connect: bool) -> None:
        super().__init__()
        self.use_res_connect = use_res_connect  # stride == 1 and cin == cout (nominal widths)
        act = nn.SiLU
        layers: list[nn.Module] = []
        expanded = _make_divisible(cin * expand_ratio, 8)
        if expand_ratio != 1:  # expand (torchvision: expanded_channels != input_channels)
            layers.append(Conv2dNormActivation(cin, expanded, kernel_size=1, activation_layer=act))
        layers.append(Conv2dNormActivation(expanded, expanded, kernel_size=kernel, stride=stride,
                                           groups=expanded, activation_layer=act))  # depthwise
        layers.append(SqueezeExcitation(expanded, max(1, cin // 4),
                                        activation=partial(nn.SiLU, inplace=True)))
        layers.append(Conv2dNormActivation(expanded, cout, kernel_size=1, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")
        self.out_channels = cout

    def forward(self, input: Tensor) -> Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += input
        return result


class EfficientNet(nn.Module):
    def __init__(self, setting: list[tuple], dropout: float, stochastic_depth_prob: float = 0.2,
                 num_classes: int = 1000, width_mult: float = 1.0) -> None:
        super().__init__()
        adj = partial(_ch, width_mult=width_mult)
        layers: list[nn.Module] = [Conv2dNormActivation(3, adj(setting[0][3]), kernel_size=3, stride=2,
                                                        activation_layer=nn.SiLU)]
        total = sum(s[5] for s in setting)
        block_id = 0
        for t, k, s, cin, cout, n in setting:
            stage: list[nn.Module] = []
            for i in range(n):
                bin_, bs = (cin, s) if i == 0 else (cout, 1)
                sd_prob = stochastic_depth_prob * float(block_id) / total
                stage.append(MBConv(t, k, bs, adj(bin_), adj(cout), sd_prob,
                                    use_res_connect=bs == 1 and bin_ == cout))
                block_id += 1
            layers.append(nn.Sequential(*stage))
        last_in = adj(setting[-1][4])
        last_out = 4 * last_in
        layers.append(Conv2dNormActivation(last_in, last_out, kernel_size=1, activation_layer=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True), nn.Linear(last_out, num_classes))
        _init_cnn(self, linear_std=None)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                r = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -r, r)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def efficientnet_b0(num_classes: int = 1000, width_mult: float = 1.0, **kw) -> nn.Module:
    """EfficientNet-B0, mirrors torchvision/models/efficientnet.py (MBConv + SE, SiLU)."""
    setting = [  # expand_ratio, kernel, stride, input_c, out_c, num_layers
        (1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
        (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1),
    ]
    return EfficientNet(setting, kw.pop("dropout", 0.2), num_classes=num_classes,
                        width_mult=width_mult, **kw)


# --------------------------------------------------------------------------------------------
# RegNetX-400MF (torchvision/models/regnet.py)
# --------------------------------------------------------------------------------------------

class BottleneckTransform(nn.Sequential):
    """1x1, 3x3 grouped (no SE for RegNetX), 1x1."""

    def __init__(self, width_in: int, width_out: int, stride: int, group_width: int,
                 bottleneck_multiplier: float = 1.0) -> None:
        w_b = int(round(width_out * bottleneck_multiplier))
        g = w_b // group_width
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["a"] = Conv2dNormActivation(width_in, w_b, kernel_size=1, stride=1)
        layers["b"] = Conv2dNormActivation(w_b, w_b, kernel_size=3, stride=stride, groups=g)
        layers["c"] = Conv2dNormActivation(w_b, width_out, kernel_size=1, stride=1, activation_layer=None)
        super().__init__(layers)


class ResBottleneckBlock(nn.Module):
    """x + F(x) (or proj(x) + F(x) when the shape changes), then ReLU."""

    def __init__(self, width_in: int, width_out: int, stride: int, group_width: int,
                 should_proj: bool) -> None:
        super().__init__()
        self.proj = None
        if should_proj:  # (width_in != width_out) or (stride != 1), on nominal widths
            self.proj = Conv2dNormActivation(width_in, width_out, kernel_size=1, stride=stride,
                                             activation_layer=None)
        self.f = BottleneckTransform(width_in, width_out, stride, group_width)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.proj is not None:
            x = self.proj(x) + self.f(x)
        else:
            x = x + self.f(x)
        return self.activation(x)


class AnyStage(nn.Sequential):
    def __init__(self, width_in: int, width_out: int, stride: int, depth: int, group_width: int,
                 first_proj: bool, stage_index: int) -> None:
        super().__init__()
        for i in range(depth):
            self.add_module(f"block{stage_index}-{i}", ResBottleneckBlock(
                width_in if i == 0 else width_out, width_out, stride if i == 0 else 1, group_width,
                should_proj=first_proj if i == 0 else False))


def _regnet_stage_params(depth: int, w_0: int, w_a: float, w_m: float, group_width: int
                         ) -> tuple[list[int], list[int], list[int]]:
    """BlockParams.from_init_params (+ _adjust_widths_groups_compatibilty), bottleneck 1.0."""
    widths_cont = torch.arange(depth) * w_a + w_0
    block_capacity = torch.round(torch.log(widths_cont / w_0) / math.log(w_m))
    block_widths = (torch.round(torch.divide(w_0 * torch.pow(w_m, block_capacity), 8)) * 8).int().tolist()
    split_helper = zip(block_widths + [0], [0] + block_widths, block_widths + [0], [0] + block_widths)
    splits = [w != wp or r != rp for w, wp, r, rp in split_helper]
    stage_widths = [w for w, t in zip(block_widths, splits[:-1]) if t]
    stage_depths = torch.diff(torch.tensor([d for d, t in enumerate(splits) if t])).int().tolist()
    group_widths = [min(group_width, w) for w in stage_widths]
    stage_widths = [_make_divisible(w, g) for w, g in zip(stage_widths, group_widths)]
    return stage_depths, stage_widths, group_widths


class RegNet(nn.Module):
    def __init__(self, depth: int, w_0: int, w_a: float, w_m: float, group_width: int,
                 num_classes: int = 1000, stem_width: int = 32, width_mult: float = 1.0) -> None:
        super().__init__()
        depths, widths, gws = _regnet_stage_params(depth, w_0, w_a, w_m, group_width)
        self.stem = Conv2dNormActivation(3, _ch(stem_width, width_mult), kernel_size=3, stride=2)  # SimpleStemIN
        current, nominal = _ch(stem_width, width_mult), stem_width
        blocks = []
        for i, (w, d, gw) in enumerate(zip(widths, depths, gws)):
            gw_s = gw if width_mult == 1.0 else max(8, _ch(gw, width_mult))
            w_s = _make_divisible(w * width_mult, math.lcm(8, gw_s))
            stride = 2  # BlockParams: STRIDE for every stage
            blocks.append((f"block{i + 1}", AnyStage(current, w_s, stride, d, gw_s,
                                                     first_proj=nominal != w or stride != 1,
                                                     stage_index=i + 1)))
            current, nominal = w_s, w
        self.trunk_output = nn.Sequential(OrderedDict(blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(current, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.trunk_output(self.stem(x))
        x = self.avgpool(x)
        x = x.flatten(start_dim=1)
        return self.fc(x)


def regnet_x_400mf(num_classes: int = 1000, width_mult: float = 1.0, **kw) -> nn.Module:
    """RegNetX-400MF, mirrors torchvision/models/regnet.py (depth=22, w_0=24, w_a=24.48,
    w_m=2.54, group_width=16; every stage has stride 2, so each stage opens with a projection)."""
    return RegNet(22, 24, 24.48, 2.54, 16, num_classes=num_classes, width_mult=width_mult, **kw)


# --------------------------------------------------------------------------------------------
# ConvNeXt-Tiny (torchvision/models/convnext.py)
# --------------------------------------------------------------------------------------------

class LayerNorm2d(nn.LayerNorm):
    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    def __init__(self, dim: int, layer_scale: float, stochastic_depth_prob: float) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim, bias=True),
            nn.GELU(),
            nn.Linear(4 * dim, dim, bias=True),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")

    def forward(self, input: Tensor) -> Tensor:
        result = self.layer_scale * self.block(input)
        result = self.stochastic_depth(result)
        result += input
        return result


class ConvNeXt(nn.Module):
    def __init__(self, setting: list[tuple], stochastic_depth_prob: float = 0.0,
                 layer_scale: float = 1e-6, num_classes: int = 1000, width_mult: float = 1.0) -> None:
        super().__init__()
        norm_layer = partial(LayerNorm2d, eps=1e-6)
        adj = partial(_ch, width_mult=width_mult)
        layers: list[nn.Module] = [Conv2dNormActivation(3, adj(setting[0][0]), kernel_size=4, stride=4,
                                                        padding=0, norm_layer=norm_layer,
                                                        activation_layer=None, bias=True)]
        total = sum(s[2] for s in setting)
        block_id = 0
        for cin, cout, n in setting:
            stage = []
            for _ in range(n):
                sd_prob = stochastic_depth_prob * block_id / (total - 1.0)
                stage.append(CNBlock(adj(cin), layer_scale, sd_prob))
                block_id += 1
            layers.append(nn.Sequential(*stage))
            if cout is not None:  # downsampling
                layers.append(nn.Sequential(norm_layer(adj(cin)),
                                            nn.Conv2d(adj(cin), adj(cout), kernel_size=2, stride=2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last = adj(setting[-1][1] if setting[-1][1] is not None else setting[-1][0])
        self.classifier = nn.Sequential(norm_layer(last), nn.Flatten(1), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)))


def convnext_tiny(num_classes: int = 1000, width_mult: float = 1.0, **kw) -> nn.Module:
    """ConvNeXt-Tiny, mirrors torchvision/models/convnext.py (LayerNorm2d via permutes,
    layer scale, stochastic depth 0.1)."""
    setting = [(96, 192, 3), (192, 384, 3), (384, 768, 9), (768, None, 3)]
    return ConvNeXt(setting, kw.pop("stochastic_depth_prob", 0.1), num_classes=num_classes,
                    width_mult=width_mult, **kw)


# --------------------------------------------------------------------------------------------
# ViT-B/16 (torchvision/models/vision_transformer.py)
# --------------------------------------------------------------------------------------------

class MLPBlock(nn.Sequential):
    """torchvision MLPBlock == ops.misc.MLP(in, [mlp, in], GELU): Linear, GELU, Dropout, Linear, Dropout."""

    def __init__(self, in_dim: int, mlp_dim: int, dropout: float) -> None:
        super().__init__(nn.Linear(in_dim, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(mlp_dim, in_dim), nn.Dropout(dropout))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)


class EncoderBlock(nn.Module):
    def __init__(self, num_heads: int, hidden_dim: int, mlp_dim: int, dropout: float,
                 attention_dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.ln_1 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(hidden_dim, num_heads, dropout=attention_dropout,
                                                    batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.mlp = MLPBlock(hidden_dim, mlp_dim, dropout)

    def forward(self, input: Tensor) -> Tensor:
        torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x)
        x = x + input
        y = self.ln_2(x)
        y = self.mlp(y)
        return x + y


class Encoder(nn.Module):
    def __init__(self, seq_length: int, num_layers: int, num_heads: int, hidden_dim: int,
                 mlp_dim: int, dropout: float, attention_dropout: float) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(num_heads, hidden_dim, mlp_dim, dropout, attention_dropout))
            for i in range(num_layers)))
        self.ln = nn.LayerNorm(hidden_dim, eps=1e-6)

    def forward(self, input: Tensor) -> Tensor:
        torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
        input = input + self.pos_embedding
        return self.ln(self.layers(self.dropout(input)))


class VisionTransformer(nn.Module):
    def __init__(self, image_size: int, patch_size: int, num_layers: int, num_heads: int,
                 hidden_dim: int, mlp_dim: int, dropout: float = 0.0, attention_dropout: float = 0.0,
                 num_classes: int = 1000) -> None:
        super().__init__()
        torch._assert(image_size % patch_size == 0, "Input shape indivisible by patch size!")
        self.image_size, self.patch_size = image_size, patch_size
        self.hidden_dim, self.mlp_dim = hidden_dim, mlp_dim
        self.conv_proj = nn.Conv2d(3, hidden_dim, kernel_size=patch_size, stride=patch_size)
        seq_length = (image_size // patch_size) ** 2 + 1  # + class token
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.encoder = Encoder(seq_length, num_layers, num_heads, hidden_dim, mlp_dim, dropout,
                               attention_dropout)
        self.seq_length = seq_length
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(hidden_dim, num_classes)))
        fan_in = 3 * patch_size * patch_size
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)
        nn.init.zeros_(self.heads.head.weight)
        nn.init.zeros_(self.heads.head.bias)

    def _process_input(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        p = self.patch_size
        torch._assert(h == self.image_size, f"Wrong image height! Expected {self.image_size} but got {h}!")
        torch._assert(w == self.image_size, f"Wrong image width! Expected {self.image_size} but got {w}!")
        n_h, n_w = h // p, w // p
        x = self.conv_proj(x)                            # (n, hidden_dim, n_h, n_w)
        x = x.reshape(n, self.hidden_dim, n_h * n_w)     # (n, hidden_dim, n_h * n_w)
        return x.permute(0, 2, 1)                        # (n, seq, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self._process_input(x)
        n = x.shape[0]
        batch_class_token = self.class_token.expand(n, -1, -1)
        x = torch.cat([batch_class_token, x], dim=1)
        x = self.encoder(x)
        x = x[:, 0]  # class token
        return self.heads(x)


def vit_b_16(num_classes: int = 1000, image_size: int = 224, hidden_dim: int = 768,
             mlp_dim: int = 3072, num_heads: int = 12, num_layers: int = 12, **kw) -> nn.Module:
    """ViT-B/16, mirrors torchvision/models/vision_transformer.py (12 pre-LN encoder blocks with
    nn.MultiheadAttention, class token, learned positional embedding)."""
    return VisionTransformer(image_size=image_size, patch_size=16, num_layers=num_layers, num_heads=num_heads,
                             hidden_dim=hidden_dim, mlp_dim=mlp_dim, num_classes=num_classes, **kw)


# --------------------------------------------------------------------------------------------
# registry, expectations, cheap variants
# --------------------------------------------------------------------------------------------

BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3_small": mobilenet_v3_small,
    "efficientnet_b0": efficientnet_b0,
    "regnet_x_400mf": regnet_x_400mf,
    "convnext_tiny": convnext_tiny,
    "vit_b_16": vit_b_16,
}

# (residual blocks, of which with a projection (1x1 conv + BN) shortcut instead of identity)
EXPECTED: dict[str, tuple[int, int]] = {
    "resnet18": (8, 3),             # 2+2+2+2 BasicBlocks; layer2/3/4 open with stride 2 -> downsample
    "resnet34": (16, 3),            # 3+4+6+3 BasicBlocks; layer1 keeps 64 ch, layer2/3/4 project
    "resnet50": (16, 4),            # 3+4+6+3 Bottlenecks; layer1 also projects (64 -> 256 ch)
    "mobilenet_v2": (10, 0),        # stride-1 & in==out blocks: 1+2+3+2+2 (24,32,64,96,160 stages)
    "mobilenet_v3_small": (6, 0),   # blocks 3, 5, 6, 8, 10, 11 of 11 (stride 1, in == out)
    "efficientnet_b0": (9, 0),      # MBConv repeats: 1+1+2+2+3 (24,40,80,112,192 stages)
    "regnet_x_400mf": (22, 4),      # stage depths 1+2+7+12, every block residual; stage openers project
    "convnext_tiny": (18, 0),       # 3+3+9+3 CNBlocks, identity shortcut (downsampling is outside)
    "vit_b_16": (24, 0),            # 12 encoder blocks x (attention + MLP) residual adds
}

# "num_params" of the torchvision weights' metadata (default-kwargs models, 1000 classes)
_TORCHVISION_NUM_PARAMS: dict[str, int] = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
    "mobilenet_v2": 3_504_872, "mobilenet_v3_small": 2_542_856, "efficientnet_b0": 5_288_548,
    "regnet_x_400mf": 5_495_976, "convnext_tiny": 28_589_128, "vit_b_16": 86_567_656,
}

SMALL_KW: dict[str, dict] = {
    **{name: {"width_mult": 0.25} for name in BUILDERS if name != "vit_b_16"},
    # 0.5 halves the group width (16 -> 8) and so keeps RegNet's groups per stage (2, 4, 10, 25);
    # at 0.25 the 8-channel first stage would collapse to groups=1.
    "regnet_x_400mf": {"width_mult": 0.5},
    # 4 of the 12 identical encoder layers: the graph pattern is the same, the exports and rewrites a third as long
    "vit_b_16": {"image_size": 32, "hidden_dim": 64, "mlp_dim": 128, "num_heads": 4, "num_layers": 4},
}
EXPECTED_SMALL: dict[str, tuple[int, int]] = {**EXPECTED, "vit_b_16": (8, 0)}  # the SMALL_KW variants

# Their dynamo exports (dynamic batch) add no graph pattern the default run's others lack (resnet18 stands for the
# plain ResNets, the TorchScript export for MobileNetV3) and cost some 15 s each: analysed and pruned with -m slow.
DYNAMO_SLOW = frozenset({"resnet34", "resnet50", "mobilenet_v3_small"})


def name_exporter_params(exporters: tuple[str, ...] = ("torchscript", "dynamo")) -> list:
    """(name, exporter) pytest params for every architecture, those of DYNAMO_SLOW with dynamo marked slow."""
    import pytest

    return [pytest.param(n, e, marks=pytest.mark.slow) if e == "dynamo" and n in DYNAMO_SLOW else pytest.param(n, e)
            for n in sorted(EXPECTED) for e in exporters]


INPUT_SIZE: dict[str, int] = {
    **{name: 64 for name in BUILDERS if name != "vit_b_16"},
    "vit_b_16": 32,
}


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give constant-initialised tensors random values (keeps the architecture), so exports look
    like trained models: no two initializers equal, every path of the graph exercised."""
    g = torch.Generator().manual_seed(seed)

    def rnd(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return torch.rand(t.shape, generator=g) * (hi - lo) + lo

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(rnd(m.running_mean, -0.1, 0.1))
                m.running_var.copy_(rnd(m.running_var, 0.5, 1.5))
                m.weight.copy_(rnd(m.weight, 0.5, 1.5))
                m.bias.copy_(rnd(m.bias, -0.1, 0.1))
            elif isinstance(m, nn.LayerNorm):
                m.weight.copy_(rnd(m.weight, 0.5, 1.5))
                m.bias.copy_(rnd(m.bias, -0.1, 0.1))
        for name, p in model.named_parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):  # zeros / constants
                scale = 0.5 if name.endswith("layer_scale") else 0.05
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def count_residual_blocks(model: nn.Module) -> tuple[int, int]:
    """(residual connections, projection shortcuts) found by walking the module tree."""
    n = proj = 0
    for m in model.modules():
        if isinstance(m, (BasicBlock, Bottleneck)):
            n += 1
            proj += m.downsample is not None
        elif isinstance(m, ResBottleneckBlock):
            n += 1
            proj += m.proj is not None
        elif isinstance(m, (InvertedResidual, InvertedResidualV3, MBConv)):
            n += bool(m.use_res_connect)
        elif isinstance(m, CNBlock):
            n += 1
        elif isinstance(m, EncoderBlock):
            n += 2  # x = attn(ln_1(x)) + x; x + mlp(ln_2(x))
    return n, proj


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------

_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "torch._export", "torch.fx",
                  "torch._subclasses", "onnxscript", "torch.utils._sympy")


@contextlib.contextmanager
def _quiet():
    """Silence warnings, prints and log chatter of the exporters."""
    saved = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    try:
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def export(model: nn.Module, path: str | Path, exporter: str, input_size: int,
           opset: int | None = None, static_batch: int | None = None) -> Path:
    """Export ``model`` (eval mode) to a single self-contained ONNX file with input "input"
    (dynamic batch, 3 x input_size x input_size) and output "logits" (dynamic batch); with
    ``static_batch``, both have that batch size fixed in the graph (what TensorRT pipelines export).

    exporter: "torchscript" (torch.onnx.export(dynamo=False), default opset 17) or
    "dynamo" (torch.onnx.export(dynamo=True), default opset 18).
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    # batch 2 for the example: torch.export specialises sizes 0/1, and both exporters then
    # treat the batch axis as symbolic.
    x = torch.randn(static_batch or 2, 3, input_size, input_size)
    with _quiet():
        if exporter == "torchscript":
            torch.onnx.export(
                model, (x,), str(path), dynamo=False, opset_version=opset or 17,
                input_names=["input"], output_names=["logits"], verbose=False,
                dynamic_axes=None if static_batch else {"input": {0: "batch"}, "logits": {0: "batch"}},
            )
        elif exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(
                model, (x,), str(path), dynamo=True, opset_version=opset or 18,
                input_names=["input"], output_names=["logits"], verbose=False,
                dynamic_shapes=None if static_batch else ({0: batch},), external_data=False, report=False,
                verify=False, optimize=True,
            )
        else:
            raise ValueError(f"unknown exporter {exporter!r} (expected 'torchscript' or 'dynamo')")
    # guarantee one self-contained file (weights embedded, no external data)
    proto = onnx.load(str(path), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        proto = onnx.load(str(path))  # pulls the external data in
        locations = {e.value for t in external for e in t.external_data if e.key == "location"}
        onnx.save_model(proto, str(path), save_as_external_data=False)
        for loc in locations:
            (path.parent / loc).unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------------------------
# self-check
# --------------------------------------------------------------------------------------------

if __name__ == "__main__":
    torch.manual_seed(0)
    ok = True
    for name, builder in BUILDERS.items():
        full_model = builder()
        full = count_residual_blocks(full_model)
        nparams = sum(p.numel() for p in full_model.parameters())
        small_model = builder(**SMALL_KW[name]).eval()
        small = count_residual_blocks(small_model)
        with torch.no_grad():
            out = small_model(torch.randn(2, 3, INPUT_SIZE[name], INPUT_SIZE[name]))
        good = (full == EXPECTED[name] and small == EXPECTED_SMALL[name] and tuple(out.shape) == (2, 1000)
                and nparams == _TORCHVISION_NUM_PARAMS[name])
        ok &= good
        print(f"{name:20s} expected={EXPECTED[name]} full={full} small={small} "
              f"params={nparams:,} (torchvision {_TORCHVISION_NUM_PARAMS[name]:,}) "
              f"out={tuple(out.shape)} {'OK' if good else 'MISMATCH'}")
    assert ok, "zoo self-check failed"
    print("all OK")
