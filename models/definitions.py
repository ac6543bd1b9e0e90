"""Torch definitions of the reference models (CIFAR-10, 32x32 inputs).

- ResNet-20 / ResNet-56: He et al. 2016 ("Deep Residual Learning", section 4.2), 3 stages of
  16/32/64 channels, n basic blocks per stage (depth 6n+2). Downsampling blocks use a 1x1
  projection shortcut with BatchNorm (option B), which is also what the SLP seed's code uses.
- MobileNetV2: Sandler et al. 2018, inverted residuals with ReLU6, width multiplier as given, for
  32x32 inputs: the stem at stride 1, every other stride as on ImageNet (feature maps 32, 16, 8, 4, 2).
  Making the 24-channel stage stride 1 as well (the other common CIFAR layout) costs 3.2x the
  training time on 2 CPU cores (0.58 against 0.18 s per batch of 128 at width 0.5), too much for
  the 90-minute training budget.
- ViT: Dosovitskiy et al. 2021 ("An Image is Worth 16x16 Words"), shrunk for 32x32 inputs and a one-hour CPU
  budget: 4x4 patches (64 tokens), width 128, 6 pre-LayerNorm encoder layers of 4 heads with a 256-wide MLP,
  learned position embeddings, mean of the tokens into the classifier (no class token). Attention is written
  out (Linear, MatMul, Softmax) so that both torch exporters give plain ONNX operators.

These definitions are only needed to train and export; onnxprune itself never imports them.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("CIFAR ResNet depth must be 6n+2")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        layers: list[nn.Module] = []
        in_ch = 16
        for stage, ch in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(in_ch, ch, stride))
                in_ch = ch
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)  # each block starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(20, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(56, num_classes)


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_ch * expand
        self.use_res = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(in_ch, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class CifarMobileNetV2(nn.Module):
    # (expansion t, channels c, repeats n, stride s), as on ImageNet; only the stem's stride is made 1.
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, width: float = 1.0, num_classes: int = 10) -> None:
        super().__init__()
        in_ch = _make_divisible(32 * width)
        last = _make_divisible(1280 * max(1.0, width))
        features: list[nn.Module] = [nn.Conv2d(3, in_ch, 3, 1, 1, bias=False), nn.BatchNorm2d(in_ch), nn.ReLU6(inplace=True)]
        for t, c, n, s in self.SETTINGS:
            out_ch = _make_divisible(c * width)
            for i in range(n):
                features.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        features += [nn.Conv2d(in_ch, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(self.pool(x), 1))


def mobilenetv2(width: float = 0.5, num_classes: int = 10) -> CifarMobileNetV2:
    return CifarMobileNetV2(width, num_classes)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class EncoderLayer(nn.Module):
    """Pre-LN: x + attention(LN(x)), then x + MLP(LN(x)): two residual blocks."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CifarViT(nn.Module):
    def __init__(self, patch: int = 4, dim: int = 128, depth: int = 6, heads: int = 4, mlp: int = 256,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, (32 // patch) ** 2, dim))
        self.layers = nn.Sequential(*[EncoderLayer(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.layers(x)).mean(dim=1))


def vit(num_classes: int = 10) -> CifarViT:
    return CifarViT(num_classes=num_classes)


MODELS = {"resnet20": resnet20, "resnet56": resnet56, "mobilenetv2": mobilenetv2, "vit": vit}
# Trained with AdamW (transformers do not train well with SGD); the CNNs with SGD + Nesterov momentum.
OPTIMIZERS = {"vit": "adamw"}
