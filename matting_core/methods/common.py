"""Pieces shared by the related methods: guided encoder, U-Net decoder, heads, ε-losses, training glue.

Every method's encoder is the project's :class:`~matting_core.models.ResNetBackbone` (no stem
max-pool, width multiplier) with extra input channels for the method's guidance, followed by
the project's :class:`~matting_core.models.ASPP`; decoders are built from the project's U-Net
decoder block (``matting_core.models.unet._DecoderBlock``: bilinear ×2, concatenate skips,
two conv3x3-BN-ReLU), one block per stride below the encoder's output stride, so they follow
the backbone's layout. With the current backbone (``C(c) = round(c·width)``, strides relative
to the padded input)::

    image (N,3,H,W) RGB in [0,1], guidance (N,g,H,W) in [0,1]
      → image normalised with ImageNet mean/std; cat guidance → (N, 3+g, H, W)
      → replicate-pad bottom/right to a multiple of pad_multiple (32)
      → ResNet (in_channels = 3+g): f0 s2, f1 s4, f2 s8, f3 s16, f4 s32
      → ASPP(f4) s32 C(256)
      → dec16 (cat f3) s16 C(256) → dec8 (cat f2) s8 C(128) → dec4 (cat f1) s4 C(64)
      → dec2 (cat f0) s2 C(32) → dec1 (cat normalised image) s1 C(16)

DIM, AdaMatting and MGM are :class:`GuidedEncoderDecoder` subclasses: the base builds ``body``
(the encoder above, one guidance channel) and the U-Net decoder(s) on it, in that order, and
the subclass adds its heads afterwards (torch's RNG is consumed in construction order).

The attribute names (``body.encoder``, ``body.aspp``, ``decoder.dec16`` ...) mirror
:class:`~matting_core.models.UNetMatting`, so :func:`transfer_unet_weights` can initialise a
method from the project's (seg-)pretrained U-Net: equal shapes are copied, the stem conv is
copied for its RGB input channels and zero for the guidance channels (DIM's initialisation of
its 4th input channel), everything else keeps its fresh initialisation.

Export notes (STYLE.md §8): padding amounts are symbolic ``(-H) % m``, upsampling uses fixed
scale factors, and nothing branches on a tensor size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from matting_core.losses import weighted_mean
from matting_core.models import ASPP, ResNetBackbone, pad_to_multiple, scaled_channels
from matting_core.models.unet import DEFAULT_DECODER_CHANNELS, IMAGENET_MEAN, IMAGENET_STD, _DecoderBlock
from matting_core.training import backward_and_step

__all__ = [
    "DEFAULT_DECODER_CHANNELS",
    "AlphaHead",
    "GuidedEncoder",
    "GuidedEncoderDecoder",
    "UNetDecoder",
    "build_decoder",
    "charbonnier",
    "check_optimizer_covers",
    "check_pair",
    "crop_to",
    "init_decoder_modules",
    "init_output_conv",
    "optimise",
    "to_float32",
    "upsample",
    "region_charbonnier",
    "register_image_stats",
    "transfer_unet_weights",
    "unknown_region",
]

EPSILON = 1e-6  # DIM's ε (confirmed)
TRIMAP_LOW = 0.25  # a trimap value v in [0,1] is background below, foreground above TRIMAP_HIGH
TRIMAP_HIGH = 0.75


# ----------------------------------------------------------------------------- modules


class GuidedEncoder(nn.Module):
    """ResNet encoder with ``guidance_channels`` extra input channels, plus ASPP.

    ``forward(image, guidance)``: image (N, 3, H, W) RGB in [0, 1], guidance (N, g, H, W)
    float (trimap / mask scaled to [0, 1]), any H, W ≥ 1 →
    ``(features [f0..f4], aspp (N, C(aspp), Hp/os, Wp/os), image_normalised_padded (N,3,Hp,Wp))``
    with Hp, Wp the sizes padded to ``pad_multiple`` and os the encoder's output stride (32).
    ``guidance_channels = 0`` gives the plain RGB encoder (guidance must then be ``None``).
    ``guidance_name`` names the input in error messages.
    """

    def __init__(
        self,
        guidance_channels: int,
        depth: int = 18,
        width: float = 1.0,
        aspp_rates: Sequence[int] = (3, 6, 9),
        aspp_channels: int = 256,
        pad_multiple: int = 32,
        guidance_name: str = "guidance",
    ) -> None:
        super().__init__()
        self.guidance_name = guidance_name
        if guidance_channels < 0:
            raise ValueError(f"guidance_channels must be >= 0, got {guidance_channels}")
        self.guidance_channels = int(guidance_channels)
        self.encoder = ResNetBackbone(depth=depth, width=width, in_channels=3 + self.guidance_channels)
        if pad_multiple <= 0 or pad_multiple % self.encoder.output_stride:
            raise ValueError(
                f"pad_multiple must be a positive multiple of {self.encoder.output_stride}, got {pad_multiple}"
            )
        self.pad_multiple = int(pad_multiple)
        register_image_stats(self)
        self.aspp_channels = scaled_channels(aspp_channels, width)
        self.aspp = ASPP(self.encoder.feature_channels[4], self.aspp_channels, aspp_rates)
        init_decoder_modules([self.aspp])

    @property
    def feature_channels(self) -> tuple[int, ...]:
        return self.encoder.feature_channels

    def forward(
        self, image: torch.Tensor, guidance: torch.Tensor | None
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        check_pair("image", image, 3, self.guidance_name, guidance, self.guidance_channels)
        x = (image - self.mean) / self.std
        if self.guidance_channels:
            x = torch.cat([x, guidance.to(x.dtype)], dim=1)
        x = pad_to_multiple(x, self.pad_multiple)
        features = self.encoder(x)
        return features, self.aspp(features[4]), x[:, :3]


class UNetDecoder(nn.Module):
    """The project's U-Net decoder, generic over the encoder's strides.

    One block ``dec{s}`` (the project's ``_DecoderBlock``: bilinear ×2, concatenate skips, two
    conv3x3-BN-ReLU) per stride s = output_stride/2, …, 2, 1; the block at stride s takes the
    encoder features of stride s (and, at s = 1, the normalised image) as skips. With the
    backbone's strides 2/4/8/16/32 this is exactly UNetMatting's dec16 … dec1.

    Args:
        in_channels: ASPP output channels.
        feature_channels, feature_strides: the encoder's feature widths and strides.
        output_stride: stride of the ASPP input (the deepest features).
        decoder_channels: one width per block (already scaled by the width multiplier),
            from the coarsest stride to stride 1.
        image_channels: channels of the stride-1 skip (the normalised image, 3).

    ``forward(aspp, features, image_skip)`` → ``{stride: (N, C_s, Hp/stride, Wp/stride)}``.
    """

    def __init__(
        self,
        in_channels: int,
        feature_channels: Sequence[int],
        feature_strides: Sequence[int],
        output_stride: int,
        decoder_channels: Sequence[int],
        image_channels: int = 3,
    ) -> None:
        super().__init__()
        strides = []
        stride = int(output_stride) // 2
        while stride >= 1:
            strides.append(stride)
            stride //= 2
        decoder_channels = [int(c) for c in decoder_channels]
        if len(decoder_channels) != len(strides):
            raise ValueError(
                f"decoder_channels needs {len(strides)} entries (strides {', '.join(map(str, strides))}), "
                f"got {decoder_channels}"
            )
        self.strides = tuple(strides)
        self.feature_strides = tuple(int(s) for s in feature_strides)
        self.channels: dict[int, int] = {}
        previous = int(in_channels)
        for stride, out_channels in zip(strides, decoder_channels):
            skip = sum(int(c) for c, s in zip(feature_channels, self.feature_strides) if s == stride)
            skip += image_channels if stride == 1 else 0
            self.add_module(f"dec{stride}", _DecoderBlock(previous, skip, out_channels))
            self.channels[stride] = out_channels
            previous = out_channels
        init_decoder_modules([self])

    def forward(
        self, aspp: torch.Tensor, features: Sequence[torch.Tensor], image_skip: torch.Tensor
    ) -> dict[int, torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        y = aspp
        for stride in self.strides:
            skips = [f for f, s in zip(features, self.feature_strides) if s == stride]
            if stride == 1:
                skips.append(image_skip)
            y = getattr(self, f"dec{stride}")(y, skips)
            out[stride] = y
        return out


def build_decoder(encoder: GuidedEncoder, decoder_channels: Sequence[int], width: float) -> UNetDecoder:
    """A :class:`UNetDecoder` on ``encoder`` with ``decoder_channels`` scaled by ``width``."""
    return UNetDecoder(
        encoder.aspp_channels,
        encoder.feature_channels,
        encoder.encoder.feature_strides,
        encoder.encoder.output_stride,
        [scaled_channels(c, width) for c in decoder_channels],
    )


class GuidedEncoderDecoder(nn.Module):
    """Base of the guided method networks (DIM, AdaMatting, MGM): encoder + U-Net decoder(s).

    Builds, in this order (parameter creation order fixes the seeded initial weights, so a
    subclass adds its heads after ``super().__init__``):

    * ``body``: :class:`GuidedEncoder` with one guidance channel, named :attr:`required_input`
      in error messages — image (N, 3, H, W) + guidance (N, 1, H, W) → ResNet + ASPP;
    * one :class:`UNetDecoder` per name in :attr:`decoder_names` (default ``("decoder",)``),
      each :func:`build_decoder` ``(body, decoder_channels, width)``.

    Args:
        depth, width, aspp_rates, aspp_channels, decoder_channels, pad_multiple: as
            :class:`~matting_core.models.UNetMatting` (the defaults are UNetMatting's).

    ``width`` is kept as :attr:`width` for the subclass's own channel scaling.
    :meth:`decode` runs the encoder once and every decoder on its output.
    """

    required_input: str = "guidance"
    decoder_names: tuple[str, ...] = ("decoder",)

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
        self.width = width
        self.body = GuidedEncoder(1, depth, width, aspp_rates, aspp_channels, pad_multiple, self.required_input)
        for name in self.decoder_names:
            self.add_module(name, build_decoder(self.body, decoder_channels, width))

    def decode(self, image: torch.Tensor, guidance: torch.Tensor) -> tuple[dict[int, torch.Tensor], ...]:
        """Encoder once, then each decoder of :attr:`decoder_names`, in that order.

        image (N, 3, H, W) RGB in [0, 1], guidance (N, 1, H, W) in [0, 1] → one
        ``{stride: (N, C_s, Hp/stride, Wp/stride)}`` per decoder (Hp, Wp padded to
        ``pad_multiple``; crop full-size outputs with :func:`crop_to`).
        """
        features, aspp, image_skip = self.body(image, guidance)
        return tuple(getattr(self, name)(aspp, features, image_skip) for name in self.decoder_names)


class AlphaHead(nn.Module):
    """MGM/MAM output head: conv3x3-BN-LeakyReLU(0.2)-conv3x3 → ×scale → (tanh(x) + 1) / 2.

    ``forward(x (N, C, h, w))`` → alpha (N, 1, h·scale, w·scale) in [0, 1]; the logits are
    upsampled bilinearly by the fixed ``scale`` before the activation (as MGM/MAM do). The
    last conv starts small (std 1e-3, bias 0), so the first predictions are ≈ 0.5.
    """

    def __init__(self, in_channels: int, mid_channels: int, scale: int = 1) -> None:
        super().__init__()
        self.scale = int(scale)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.LeakyReLU(0.2, inplace=True),
        )
        self.out = nn.Conv2d(mid_channels, 1, 3, padding=1)
        init_decoder_modules([self.body])
        init_output_conv(self.out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.out(self.body(x))
        if self.scale != 1:
            logits = upsample(logits, self.scale)
        return (torch.tanh(logits) + 1.0) * 0.5


def init_decoder_modules(modules: Iterable[nn.Module]) -> None:
    """Kaiming-normal convs (fan_out, relu), zero biases, BN weight 1 / bias 0 (as UNetMatting)."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def init_output_conv(*convs: nn.Conv2d, std: float = 1e-3) -> None:
    """Start output convs small: weight ~ N(0, std²), bias 0 (outputs start near the activation's centre).

    The weights are drawn in argument order (torch's global RNG).
    """
    for conv in convs:
        nn.init.normal_(conv.weight, std=std)
        nn.init.zeros_(conv.bias)


def register_image_stats(module: nn.Module) -> None:
    """Give ``module`` the ImageNet ``mean`` and ``std`` buffers, each (1, 3, 1, 1) float32.

    Not persistent (not in the state dict); normalise with ``(image - module.mean) / module.std``.
    """
    module.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
    module.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)


def crop_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x[..., :H, :W]`` with (H, W) of ``like`` (undo the bottom/right padding)."""
    return x[:, :, : like.shape[-2], : like.shape[-1]]


def check_pair(
    image_name: str,
    image: torch.Tensor,
    image_channels: int,
    guidance_name: str,
    guidance: torch.Tensor | None,
    guidance_channels: int,
) -> None:
    """Shape checks for (image, guidance) inputs; clear ValueErrors naming the argument."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[1] != image_channels:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{image_name} must be (N, {image_channels}, H, W) in [0, 1], got {shape}")
    if guidance_channels == 0:
        if guidance is not None:
            raise ValueError(f"this network takes no {guidance_name}")
        return
    if not isinstance(guidance, torch.Tensor) or guidance.dim() != 4 or guidance.shape[1] != guidance_channels:
        shape = tuple(guidance.shape) if isinstance(guidance, torch.Tensor) else type(guidance).__name__
        raise ValueError(f"{guidance_name} must be (N, {guidance_channels}, H, W) in [0, 1], got {shape}")
    if guidance.shape[0] != image.shape[0] or guidance.shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"{guidance_name} {tuple(guidance.shape)} does not match {image_name} {tuple(image.shape)} in N, H, W"
        )


# ----------------------------------------------------------------------------- weights


def transfer_unet_weights(
    target: nn.Module, source_state: Mapping[str, torch.Tensor], key_map: Mapping[str, str]
) -> dict[str, list[str]]:
    """Initialise ``target`` from a :class:`~matting_core.models.UNetMatting` state dict.

    Args:
        target: a method network.
        source_state: ``UNetMatting.state_dict()`` (e.g. the seg-pretrained network).
        key_map: target key prefix → source key prefix, e.g.
            ``{"body.encoder.": "encoder.", "body.decoder.dec8.": "dec8."}``.

    A tensor is copied when the shapes are equal; a conv weight (out, in_t, k, k) whose source
    is (out, in_s, k, k) with in_s < in_t (the stem with extra guidance channels) gets the
    source in its first in_s input channels and zeros in the rest. Everything else is left.

    Returns:
        ``{"copied": [...], "expanded": [...], "skipped": [...]}`` target keys.
    """
    report: dict[str, list[str]] = {"copied": [], "expanded": [], "skipped": []}
    state = target.state_dict()
    with torch.no_grad():
        for key, tensor in state.items():
            source_key = None
            for t_prefix, s_prefix in key_map.items():
                if key.startswith(t_prefix):
                    source_key = s_prefix + key[len(t_prefix):]
                    break
            if source_key is None or source_key not in source_state:
                report["skipped"].append(key)
                continue
            src = source_state[source_key]
            if src.shape == tensor.shape:
                tensor.copy_(src)
                report["copied"].append(key)
            elif (
                tensor.dim() == 4
                and src.dim() == 4
                and src.shape[0] == tensor.shape[0]
                and src.shape[2:] == tensor.shape[2:]
                and src.shape[1] < tensor.shape[1]
            ):
                tensor.zero_()
                tensor[:, : src.shape[1]].copy_(src)
                report["expanded"].append(key)
            else:
                report["skipped"].append(key)
    return report


# ----------------------------------------------------------------------------- losses


def charbonnier(pred: torch.Tensor, target: torch.Tensor, epsilon: float = EPSILON) -> torch.Tensor:
    """Element-wise ``sqrt((pred − target)² + ε²)`` (DIM's ε-smoothed absolute difference)."""
    return torch.sqrt((pred - target) ** 2 + epsilon**2)


def region_charbonnier(
    pred: torch.Tensor, target: torch.Tensor, region: torch.Tensor | None, epsilon: float = EPSILON
) -> torch.Tensor:
    """Weighted mean of :func:`charbonnier` over ``region`` (N,1,H,W) {0,1}; 0 if empty."""
    return weighted_mean(charbonnier(pred, target, epsilon), region)


def unknown_region(trimap: torch.Tensor) -> torch.Tensor:
    """Unknown pixels of a trimap scaled to [0, 1]: ``0.25 < t < 0.75`` (0/128/255 → 0/0.502/1).

    trimap (N, 1, H, W) float → float {0, 1} of the same shape.
    """
    return ((trimap > TRIMAP_LOW) & (trimap < TRIMAP_HIGH)).to(trimap.dtype)


# ----------------------------------------------------------------------------- training glue


def check_optimizer_covers(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], what: str) -> None:
    """Raise if a trainable parameter in ``params`` is not in ``optimizer``'s param groups."""
    known = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [p for p in params if p.requires_grad and id(p) not in known]
    if missing:
        raise ValueError(
            f"the optimizer does not hold {len(missing)} trainable parameter(s) of the {what}; build it "
            "from matting_core.methods.optimizer_parameters(name, model, loss_module)"
        )


def to_float32(value: Any) -> Any:
    """Cast every floating tensor in a (nested) dict/list to float32 (losses run in full precision)."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, Mapping):
        return {k: to_float32(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_float32(v) for v in value)
    return value


def optimise(
    optimizer: torch.optim.Optimizer,
    forward: Callable[[], Any],
    objective: Callable[[Any], dict[str, torch.Tensor]],
    *,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    autocast_dtype: torch.dtype | None = None,
    device_type: str = "cpu",
) -> dict[str, torch.Tensor]:
    """One optimisation step: zero_grad → forward → objective → backward(total) → step.

    ``forward()`` runs the network(s) (under ``torch.autocast`` when ``autocast_dtype`` is
    given) and returns predictions (a tensor dict, possibly nested); the objective sees them
    cast to float32 and runs outside autocast, so losses are computed in full precision, and
    returns the loss dict (with ``total``). With a ``scaler`` (AMP GradScaler) the backward is
    scaled. The scheduler, when given, is stepped after the optimiser.

    Returns:
        The loss terms, detached.
    """
    optimizer.zero_grad(set_to_none=True)
    if autocast_dtype is not None:
        with torch.autocast(device_type, dtype=autocast_dtype):
            pred = forward()
    else:
        pred = forward()
    terms = objective(to_float32(pred))
    backward_and_step(terms["total"], optimizer, scheduler=scheduler, scaler=scaler)
    return {k: v.detach() for k, v in terms.items()}


def upsample(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Bilinear upsampling by a fixed factor (align_corners=False; export-safe)."""
    return F.interpolate(x, scale_factor=float(factor), mode="bilinear", align_corners=False)
