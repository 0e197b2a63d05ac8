"""ResNet-18/34/50/101 backbones for matting, written in the project (no torchvision).

Differences from the ImageNet ResNet (He et al., 2016):

* the stem's 3x3/2 max-pool is **removed** (METHOD.md §1). Its down-sampling moves into
  ``layer1``, whose first block is strided (stride 2 in its 3x3 conv and its 1x1 projection
  shortcut), so the feature pyramid keeps the classic strides 2/4/8/16/32 and the classic
  cost, but the stride-2 → stride-4 step is learned instead of a fixed max;
* every channel count is multiplied by ``width`` (``scaled_channels``); ×0.5 is the
  real-time student, ×0.25 the tiny test network.

Feature levels returned by :meth:`ResNetBackbone.forward` (``C(c)`` = ``round(c * width)``;
``e`` = 1 for BasicBlock (R18/R34), 4 for Bottleneck (R50/R101)):

=====  ===========  ======  =============
level  module       stride  channels
=====  ===========  ======  =============
0      stem         2       C(64)
1      layer1       4       C(64)·e
2      layer2       8       C(128)·e
3      layer3       16      C(256)·e
4      layer4       32      C(512)·e
=====  ===========  ======  =============

``feature_strides`` and ``feature_channels`` hold these numbers for the decoder. With
BasicBlocks the strided first block of layer1 adds a 1x1 projection shortcut (C(64)² + BN)
that torchvision's ResNet-18/34 do not have; Bottleneck layer1 has one anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNetBackbone",
    "RESNET_LAYOUTS",
    "scaled_channels",
]


def scaled_channels(channels: int, width: float) -> int:
    """``max(1, round(channels * width))``: the width multiplier applied to one channel count."""
    return max(1, int(round(channels * width)))


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34). Output channels = ``planes``."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = conv3x3(in_ch, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 → 3x3 (strided) → 1x1 with a residual (ResNet-50/101, "v1.5": stride on the 3x3).

    Output channels = ``planes * 4``.
    """

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = conv1x1(in_ch, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_ch)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


@dataclass(frozen=True)
class ResNetLayout:
    block: type[nn.Module]
    blocks_per_stage: tuple[int, int, int, int]


RESNET_LAYOUTS: dict[int, ResNetLayout] = {
    18: ResNetLayout(BasicBlock, (2, 2, 2, 2)),
    34: ResNetLayout(BasicBlock, (3, 4, 6, 3)),
    50: ResNetLayout(Bottleneck, (3, 4, 6, 3)),
    101: ResNetLayout(Bottleneck, (3, 4, 23, 3)),
}


class ResNetBackbone(nn.Module):
    """ResNet encoder without the stem max-pool; returns 5 feature maps (see module doc).

    Args:
        depth: 18, 34, 50 or 101.
        width: channel multiplier (> 0) applied to every convolution.
        in_channels: input channels (3 for RGB).

    Shapes: ``x`` (N, in_channels, H, W) with H, W divisible by 32 →
    list of 5 tensors (N, feature_channels[i], H / feature_strides[i], W / feature_strides[i]).
    """

    def __init__(self, depth: int = 18, width: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()
        if depth not in RESNET_LAYOUTS:
            raise ValueError(f"ResNet depth {depth!r} is not supported; choose from {sorted(RESNET_LAYOUTS)}")
        if not width > 0:
            raise ValueError(f"width multiplier must be > 0, got {width!r}")
        layout = RESNET_LAYOUTS[depth]
        block = layout.block
        expansion = block.expansion  # type: ignore[attr-defined]
        self.depth = depth
        self.width = float(width)

        stem_ch = scaled_channels(64, width)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_ch, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(stem_ch),
            nn.ReLU(inplace=True),
        )  # no max-pool (METHOD.md §1)

        planes = [scaled_channels(c, width) for c in (64, 128, 256, 512)]
        strides = (2, 2, 2, 2)  # layer1 strided: it replaces the removed max-pool
        in_ch = stem_ch
        stages = []
        for n_blocks, p, s in zip(layout.blocks_per_stage, planes, strides):
            blocks = [block(in_ch, p, s)]
            in_ch = p * expansion
            blocks += [block(in_ch, p, 1) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        self.feature_channels: tuple[int, ...] = (stem_ch, *(p * expansion for p in planes))
        self.feature_strides: tuple[int, ...] = (2, 4, 8, 16, 32)
        self.output_stride = 32
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f0 = self.stem(x)
        f1 = self.layer1(f0)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return [f0, f1, f2, f3, f4]
