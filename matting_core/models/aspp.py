"""Atrous Spatial Pyramid Pooling (DeepLabv3, Chen et al. 2017), written export-safely.

Branches, each producing ``out_channels`` maps at the input's resolution:

* 1x1 conv + BN + ReLU;
* one 3x3 conv + BN + ReLU per dilation rate in ``rates``;
* image pooling: global mean over (H, W) via ``x.mean(dim=(2, 3), keepdim=True)``, 1x1 conv
  (with bias, no BN: BN over a 1x1 map fails at batch size 1 in training) + ReLU, then
  ``expand_as`` back to (H, W). No ``AdaptiveAvgPool2d`` and no size-dependent interpolate,
  so ONNX export keeps H and W dynamic.

The concatenation is projected by 1x1 conv + BN + ReLU to ``out_channels``.

Rates (project choice, params ``aspp_rates``): (3, 6, 9) at output stride 32. DeepLabv3 uses
(6, 12, 18) at output stride 16 and doubles them at stride 8; halving them for stride 32
keeps the same field of view in image pixels (±96…±288 px). A 512-px input gives a 16x16
map there, so rate 9 still has taps inside the map; at small training crops (128–320 px,
4–10 px maps) the larger rates mostly see the zero padding, as in DeepLab.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ASPP"]


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """ASPP: (N, in_channels, h, w) → (N, out_channels, h, w)."""

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int] = (3, 6, 9)) -> None:
        super().__init__()
        rates = tuple(int(r) for r in rates)
        if any(r < 1 for r in rates):
            raise ValueError(f"ASPP rates must be >= 1, got {rates}")
        self.rates = rates
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, out_channels, 1)]
            + [_conv_bn_relu(in_channels, out_channels, 3, r) for r in rates]
        )
        self.image_pool = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=True), nn.ReLU(inplace=True))
        self.project = _conv_bn_relu(out_channels * (len(rates) + 2), out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        pooled = self.image_pool(x.mean(dim=(2, 3), keepdim=True))
        outs.append(pooled.expand_as(outs[0]))
        return self.project(torch.cat(outs, dim=1))
