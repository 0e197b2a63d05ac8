"""U-Net matting network on a ResNet backbone (METHOD.md §1).

Data flow (``C(c)`` = ``round(c * width)``; strides relative to the padded input)::

    image (N,3,H,W) RGB in [0,1]
      → normalise with ImageNet mean/std (buffers)
      → replicate-pad bottom/right to a multiple of ``pad_multiple`` (default 32)
      → ResNet encoder (stem max-pool removed, layer1 strided): f0 stem s2, f1 layer1 s4,
        f2 layer2 s8, f3 layer3 s16, f4 layer4 s32
      → ASPP(f4)                                  s32, C(256)
      → up×2, cat f3        → 2×(conv3x3-BN-ReLU)  s16, C(256)
      → up×2, cat f2        → 2×(conv3x3-BN-ReLU)  s8,  C(128)
      → up×2, cat f1        → 2×(conv3x3-BN-ReLU)  s4,  C(64)
      → up×2, cat f0        → 2×(conv3x3-BN-ReLU)  s2,  C(32)
      → up×2, cat normalised image → 2×(conv3x3-BN-ReLU) s1, C(16)
      → matte head: conv3x3 → sigmoid → alpha (N,1,H,W) in [0,1]
      → boundary head: conv3x3 → boundary_logits (N,1,H,W) (sigmoid = P(0.05 < α < 0.95))
      → crop back to (H, W)

Decoder widths (256, 128, 64, 32, 16) are the common U-Net defaults (project choice,
``decoder_channels``); the full-resolution skip is the normalised image itself, so the
heads see pixel-level colour edges for hair and fine boundaries.

Export notes (STYLE.md §8): the pad amounts are ``(-H) % pad_multiple`` on the (symbolic)
input size, upsampling uses a fixed ``scale_factor=2`` (exact because the padded size is a
multiple of 32), ASPP pools with ``mean`` + ``expand_as``; nothing branches on a size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .aspp import ASPP
from .resnet import ResNetBackbone, scaled_channels

__all__ = ["UNetMatting", "AlphaOnly", "IMAGENET_MEAN", "IMAGENET_STD", "pad_to_multiple"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_DECODER_CHANNELS = (256, 128, 64, 32, 16)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad (N, C, H, W) at the bottom/right so H and W become multiples of ``multiple``.

    Pads are ``(-H) % multiple`` and ``(-W) % multiple`` (0 when already a multiple). Replicate
    rather than reflect: reflect needs pad < size, which fails for inputs smaller than 32 px.
    """
    pad_h = (-x.shape[-2]) % multiple
    pad_w = (-x.shape[-1]) % multiple
    return F.pad(x, [0, pad_w, 0, pad_h], mode="replicate")


class _DecoderBlock(nn.Module):
    """Upsample ×2 (bilinear), concatenate skips, then two conv3x3-BN-ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels + skip_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.body(torch.cat([x, *skips], dim=1))


class UNetMatting(nn.Module):
    """Trimap-free matting U-Net with a ResNet encoder, ASPP, a matte and a boundary head.

    Args:
        depth: ResNet depth (18, 34, 50, 101).
        width: channel multiplier on every layer (encoder, ASPP, decoder).
        aspp_rates: ASPP dilation rates (see ``aspp.py``).
        aspp_channels: ASPP width before the multiplier (default 256).
        decoder_channels: the five decoder widths (strides 16, 8, 4, 2, 1) before the multiplier.
        pad_multiple: inputs are padded to a multiple of this (must be a multiple of 32).

    ``forward(image)``: image (N, 3, H, W) float RGB in [0, 1], any H, W ≥ 1 →
    ``{"alpha": (N, 1, H, W) in [0, 1], "boundary_logits": (N, 1, H, W)}``.
    """

    def __init__(
        self,
        depth: int = 18,
        width: float = 1.0,
        aspp_rates: Sequence[int] = (3, 6, 9),
        aspp_channels: int = 256,
        decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS,
        pad_multiple: int = 32,
    ) -> None:
        super().__init__()
        decoder_channels = tuple(int(c) for c in decoder_channels)
        if len(decoder_channels) != 5:
            raise ValueError(f"decoder_channels needs 5 entries (strides 16, 8, 4, 2, 1), got {decoder_channels}")
        self.encoder = ResNetBackbone(depth=depth, width=width)
        if pad_multiple <= 0 or pad_multiple % self.encoder.output_stride:
            raise ValueError(
                f"pad_multiple must be a positive multiple of the output stride "
                f"{self.encoder.output_stride}, got {pad_multiple}"
            )
        self.pad_multiple = int(pad_multiple)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

        fc = self.encoder.feature_channels
        aspp_ch = scaled_channels(aspp_channels, width)
        d16, d8, d4, d2, d1 = (scaled_channels(c, width) for c in decoder_channels)
        self.aspp = ASPP(fc[4], aspp_ch, aspp_rates)
        self.dec16 = _DecoderBlock(aspp_ch, fc[3], d16)
        self.dec8 = _DecoderBlock(d16, fc[2], d8)
        self.dec4 = _DecoderBlock(d8, fc[1], d4)
        self.dec2 = _DecoderBlock(d4, fc[0], d2)
        self.dec1 = _DecoderBlock(d2, 3, d1)
        self.alpha_head = nn.Conv2d(d1, 1, 3, padding=1)
        self.boundary_head = nn.Conv2d(d1, 1, 3, padding=1)
        self._init_decoder()

    def _init_decoder(self) -> None:
        decoder = (self.aspp, self.dec16, self.dec8, self.dec4, self.dec2, self.dec1)
        for module in (*decoder, self.alpha_head, self.boundary_head):
            for m in module.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
        # Heads start small so the first predictions are near 0.5 / p=0.5 rather than saturated.
        for head in (self.alpha_head, self.boundary_head):
            nn.init.normal_(head.weight, std=1e-3)
            nn.init.zeros_(head.bias)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be (N, 3, H, W) RGB in [0, 1], got shape {tuple(image.shape)}")
        height, width = image.shape[-2], image.shape[-1]
        x = (image - self.mean) / self.std
        x = pad_to_multiple(x, self.pad_multiple)
        f0, f1, f2, f3, f4 = self.encoder(x)
        y = self.aspp(f4)
        y = self.dec16(y, [f3])
        y = self.dec8(y, [f2])
        y = self.dec4(y, [f1])
        y = self.dec2(y, [f0])
        y = self.dec1(y, [x])
        alpha = torch.sigmoid(self.alpha_head(y))[:, :, :height, :width]
        boundary_logits = self.boundary_head(y)[:, :, :height, :width]
        return {"alpha": alpha, "boundary_logits": boundary_logits}


class AlphaOnly(nn.Module):
    """Export wrapper: ``image (N,3,H,W) → alpha (N,1,H,W)`` (drops the boundary head output)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)["alpha"]
