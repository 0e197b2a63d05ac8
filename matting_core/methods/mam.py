"""Matting Anything (Li et al., 2023): prompt → mask (frozen segmenter) → matte (METHOD.md §3).

Pipeline (:class:`MAMNet`)::

    image (N,3,H,W) RGB in [0,1], prompt (N,5) float
      segmenter (frozen, pluggable, :class:`Segmenter`):  segment(image, prompt)
          → mask (N,1,H,W) {0,1}, features (N,C,h,w) at about stride 16
      mask-to-matte module (:class:`MaskToMatte`, MAM's M2M decoder):
          g = cat(normalised image, mask), replicate-padded to a multiple of 32
          g16, g8, g4 = avg_pool(g, 16 | 8 | 4)
          f = bilinear resize of the features to the stride-16 grid of g
          x8 = layer_os8(cat(f, g16))   (blocks, the first upsamples ×2)   → head → alpha_os8
          x4 = layer_os4(cat(x8, g8))                                      → head → alpha_os4
          x2 = layer_os2(cat(x4, g4))
          x1 = LeakyReLU(BN(ConvTranspose 4x4/2 (x2)))                     → head → alpha_os1
          progressive fusion exactly as MGM (:func:`~matting_core.methods.mgm.progressive_fusion`)
      → {"alpha", "alpha_os8", "alpha_os4", "alpha_os1", "alpha_fused_os4", "band_os4",
         "band_os1", "mask"}

Blocks (MAM/GCA): conv1 (3x3, or transposed 4x4/2 when upsampling) → BN → LeakyReLU(0.2) →
conv2 3x3 → BN, plus a shortcut (nearest ×2 + 1x1 conv + BN when upsampling); spectral
norm on the convs (``spectral_norm=True``). Widths C(128), C(64), C(32), blocks (3, 3, 2) as
MAM (its ``layers = [2, 3, 3, 2]`` without the unused first stage).

Prompts: a (5,) float vector per image, ``[kind, x0, y0, x1, y1]`` in pixel indices of the
image the model sees: kind 0 = box, pixels x0 ≤ x ≤ x1, y0 ≤ y ≤ y1 (inclusive);
kind 1 = point (x, y) stored as ``[1, x, y, x, y]``. :func:`box_prompt`,
:func:`point_prompt`, :func:`scale_prompt` (after a resize), :func:`prompt_from_alpha`.

Segmenters:

* :class:`OwnSegmenter` (default): the project's seg-pretrained network (any
  ``matting_core.models`` network) → ``mask = 1[α ≥ 0.5]`` restricted to the prompt's
  region (:func:`restrict_to_prompt`): a box zeroes the mask outside the box; a point keeps
  the 8-connected component of the mask containing the point — or, when the point lies on
  background, the component nearest to it (squared pixel distance; empty mask if there is
  none). Its features are the output of the network's stride-16 decoder block ``dec16``
  (C(256) channels, captured with a forward hook; ``feature_module``), the counterpart of
  SAM's stride-16 image embedding.
* :class:`SamSegmenter`: Segment Anything, only when the user passes a local checkpoint file
  AND the optional ``segment_anything`` package is importable (``pip install '.[sam]'``);
  imported lazily, never downloads. Features: SAM's image embedding cropped to the image's
  valid region.

Training prompts (:func:`prompt_from_alpha`, project choices): with probability 0.25 a point
drawn uniformly among pixels with α ≥ 0.5, else the bounding box of α ≥ 0.5 with each
coordinate moved by N(0, (0.1·side)²) clipped to ±20 px (SAM-style box noise). Evaluation:
the bounding box of α ≥ 0.5 grown by 5 % of its side on each side (deterministic). An alpha
without α ≥ 0.5 pixels gives the whole-image box.

Loss and training: MGM's (:class:`~matting_core.methods.mgm.MGMLoss`, random band widths,
warm-up); only the M2M module trains (the segmenter's parameters are frozen and it always
runs in eval mode).

Changes from the paper (and why): SAM ViT → the project's own seg network by default (no
external weights needed; SAM remains available); no multi-mask selection (one mask per
prompt); image/mask are fed to each stage by average pooling instead of bilinear resizing
(anti-aliased, export-safe); the M2M width follows the width multiplier.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from matting_core.models import pad_to_multiple, scaled_channels

from .common import AlphaHead, crop_to, init_decoder_modules, optimise, register_image_stats
from .dim import _alpha_2d
from .mgm import DEFAULT_TEST_BAND_WIDTHS, MGMLoss, mgm_outputs, training_bands

__all__ = [
    "MAMNet",
    "MaskToMatte",
    "OwnSegmenter",
    "PROMPT_BOX",
    "PROMPT_POINT",
    "SamSegmenter",
    "Segmenter",
    "SegmenterUnavailable",
    "box_prompt",
    "mam_train_step",
    "point_prompt",
    "prompt_from_alpha",
    "prompt_mask",
    "prompt_region",
    "restrict_to_prompt",
    "scale_prompt",
]

PROMPT_BOX = 0.0
PROMPT_POINT = 1.0
SAM_INSTALL_HINT = (
    "Segment Anything needs the optional 'segment-anything' package and a local checkpoint file: "
    "run pip install '.[sam]' and pass the checkpoint path (e.g. sam_vit_b_01ec64.pth, downloaded by "
    "you from the SAM release page); nothing is downloaded automatically. Without them, use the "
    "default segmenter 'own' (the project's seg-pretrained network)."
)


# ----------------------------------------------------------------------------- prompts


def box_prompt(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Box prompt ``[0, x0, y0, x1, y1]`` (inclusive pixel indices) as float32 (5,)."""
    if not (x0 <= x1 and y0 <= y1):
        raise ValueError(f"a box needs x0 <= x1 and y0 <= y1, got {(x0, y0, x1, y1)}")
    return np.array([PROMPT_BOX, x0, y0, x1, y1], dtype=np.float32)


def point_prompt(x: float, y: float) -> np.ndarray:
    """Point prompt ``[1, x, y, x, y]`` (pixel indices) as float32 (5,)."""
    return np.array([PROMPT_POINT, x, y, x, y], dtype=np.float32)


def scale_prompt(prompt: np.ndarray, scale_x: float, scale_y: float) -> np.ndarray:
    """Map a prompt (5,) or (N,5) through an image resize by (scale_x, scale_y).

    Pixel-centre convention: ``x' = (x + 0.5)·s − 0.5``.
    """
    out = np.array(prompt, dtype=np.float32, copy=True)
    for cols, s in (((1, 3), scale_x), ((2, 4), scale_y)):
        for c in cols:
            out[..., c] = (out[..., c] + 0.5) * float(s) - 0.5
    return out


def _bbox(region: np.ndarray) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(region)
    if ys.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def prompt_from_alpha(
    alpha: np.ndarray,
    rng: np.random.Generator | None = None,
    train: bool = True,
    point_prob: float = 0.25,
    box_noise: float = 0.1,
    max_noise_px: float = 20.0,
    eval_margin: float = 0.05,
    threshold: float = 0.5,
) -> np.ndarray:
    """A box or point prompt for the person in ``alpha`` (module doc): float32 (5,).

    Args:
        alpha: (H, W) or (1, H, W) float in [0, 1].
        rng: randomness (training only). Draw order: point-or-box, then the point index or
            the four box noises (x0, y0, x1, y1).
        train: random prompt (True) or the deterministic evaluation box (False).
    """
    alpha2d = _alpha_2d(alpha)
    height, width = alpha2d.shape
    region = alpha2d >= float(threshold)
    box = _bbox(region)
    if box is None:
        return box_prompt(0, 0, width - 1, height - 1)
    x0, y0, x1, y1 = box
    if not train:
        mx, my = eval_margin * (x1 - x0 + 1), eval_margin * (y1 - y0 + 1)
        return box_prompt(
            max(0.0, math.floor(x0 - mx)), max(0.0, math.floor(y0 - my)),
            min(width - 1.0, math.ceil(x1 + mx)), min(height - 1.0, math.ceil(y1 + my)),
        )
    if rng is None:
        raise ValueError("a training prompt is random: pass rng (a numpy Generator)")
    if rng.random() < point_prob:
        ys, xs = np.nonzero(region)
        i = int(rng.integers(ys.size))
        return point_prompt(float(xs[i]), float(ys[i]))
    sides = np.array([x1 - x0 + 1, y1 - y0 + 1, x1 - x0 + 1, y1 - y0 + 1], dtype=np.float64)
    noise = np.clip(rng.normal(0.0, 1.0, 4) * box_noise * sides, -max_noise_px, max_noise_px)
    nx0, ny0, nx1, ny1 = np.array([x0, y0, x1, y1], dtype=np.float64) + noise
    nx0, nx1 = sorted((float(np.clip(nx0, 0, width - 1)), float(np.clip(nx1, 0, width - 1))))
    ny0, ny1 = sorted((float(np.clip(ny0, 0, height - 1)), float(np.clip(ny1, 0, height - 1))))
    return box_prompt(nx0, ny0, nx1, ny1)


def _check_prompt(prompt: torch.Tensor, batch: int) -> None:
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.shape[1] != 5:
        shape = tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__
        raise ValueError(f"prompt must be (N, 5) [kind, x0, y0, x1, y1], got {shape}")
    if prompt.shape[0] != batch:
        raise ValueError(f"got {prompt.shape[0]} prompts for {batch} images")


def prompt_region(prompt: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Pixels inside each box prompt: (N,5) prompts, ``like`` (N,·,H,W) → (N,1,H,W) bool.

    Point prompts give all-True (their restriction is by connected component). Pure tensor
    ops on index grids (no loops).
    """
    _check_prompt(prompt, like.shape[0])
    p = prompt.to(torch.float32).view(-1, 5, 1, 1)
    ys = torch.arange(like.shape[-2], device=like.device, dtype=torch.float32).view(1, 1, -1, 1)
    xs = torch.arange(like.shape[-1], device=like.device, dtype=torch.float32).view(1, 1, 1, -1)
    inside = (xs >= p[:, 1:2]) & (xs <= p[:, 3:4]) & (ys >= p[:, 2:3]) & (ys <= p[:, 4:5])
    return inside | (p[:, 0:1] >= 0.5)


def prompt_mask(prompt: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Box prompts (N,5) as region masks (N,1,H,W) float {0,1} of ``like``'s size: the
    ``prompt_mask`` input of an exported MAM model (:meth:`MAMNet.forward_region`). A point
    prompt has no region (its restriction is a connected component): a ValueError."""
    _check_prompt(prompt, like.shape[0])
    if bool((prompt[:, 0] >= 0.5).any()):
        raise ValueError("a point prompt has no region mask; give a box (an exported MAM model takes the box as a mask)")
    return prompt_region(prompt, like).to(torch.float32)


def _point_component(mask: np.ndarray, x: float, y: float) -> np.ndarray:
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return np.zeros(mask.shape, dtype=np.float32)
    height, width = mask.shape
    xi = int(np.clip(round(x), 0, width - 1))
    yi = int(np.clip(round(y), 0, height - 1))
    label = labels[yi, xi]
    if label == 0:
        ys, xs = np.nonzero(labels)
        nearest = int(np.argmin((ys - yi) ** 2 + (xs - xi) ** 2))
        label = labels[ys[nearest], xs[nearest]]
    return (labels == label).astype(np.float32)


def restrict_to_prompt(mask: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """Restrict a binary mask to the prompt's region (module doc).

    mask (N,1,H,W) float {0,1}; prompt (N,5) → (N,1,H,W) float {0,1}. Boxes: zero outside
    the box. Points: the connected component at (or nearest to) the point, computed with
    OpenCV on the CPU (not traceable; the segmenter is not part of the exported matte model).
    """
    out = mask * prompt_region(prompt, mask).to(mask.dtype)
    kinds = prompt[:, 0].tolist()
    if any(k >= 0.5 for k in kinds):
        out = out.clone()
        for i, kind in enumerate(kinds):
            if kind >= 0.5:
                x, y = float(prompt[i, 1]), float(prompt[i, 2])
                comp = _point_component((mask[i, 0] > 0.5).cpu().numpy(), x, y)
                out[i, 0] = torch.from_numpy(comp).to(out)
    return out


# ----------------------------------------------------------------------------- segmenters


@runtime_checkable
class Segmenter(Protocol):
    """Turns a prompt into a mask and features.

    ``feature_channels``: C of the features. ``segment(image (N,3,H,W) in [0,1], prompt
    (N,5))`` → ``(mask (N,1,H,W) float {0,1}, features (N,C,h,w))``, without gradients.
    """

    feature_channels: int

    def segment(self, image: torch.Tensor, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class SegmenterUnavailable(RuntimeError):
    """The requested segmenter cannot be built here (missing package or checkpoint)."""


class OwnSegmenter(nn.Module):
    """The project's seg-pretrained network as a frozen prompt segmenter (module doc).

    Args:
        network: a ``matting_core.models`` network (``forward(image) → {"alpha", ...}``).
        feature_module: attribute name of the submodule whose output are the features
            (``"dec16"``: stride 16; ``"aspp"`` would give the stride-32 context features).
        threshold: mask = 1[α ≥ threshold].
    """

    def __init__(self, network: nn.Module, feature_module: str = "dec16", threshold: float = 0.5) -> None:
        super().__init__()
        module = getattr(network, feature_module, None)
        if not isinstance(module, nn.Module):
            raise ValueError(f"the segmenter network has no submodule {feature_module!r}")
        convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise ValueError(f"submodule {feature_module!r} has no convolution to read the width from")
        self.network = network
        self.feature_module = feature_module
        self.feature_channels = int(convs[-1].out_channels)
        self.threshold = float(threshold)
        for p in self.network.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> OwnSegmenter:
        return super().train(False)  # frozen: always running statistics

    def _mask_and_features(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}
        module = getattr(self.network, self.feature_module)
        handle = module.register_forward_hook(lambda _m, _i, out: captured.__setitem__("features", out))
        try:
            alpha = self.network(image)["alpha"]
        finally:
            handle.remove()
        return (alpha >= self.threshold).to(image.dtype), captured["features"]

    @torch.no_grad()
    def segment(self, image: torch.Tensor, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask, features = self._mask_and_features(image)
        return restrict_to_prompt(mask, prompt), features

    @torch.no_grad()
    def segment_region(self, image: torch.Tensor, region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``segment`` with the prompt given as a region mask (N,1,H,W) {0,1}: the mask is
        zeroed outside it. A box's region (:func:`prompt_mask`) gives exactly the box
        prompt's result; tensor ops only, so it exports to ONNX."""
        mask, features = self._mask_and_features(image)
        return mask * region.to(mask.dtype), features


class SamSegmenter:
    """Segment Anything as the segmenter (optional; module doc).

    Args:
        checkpoint: path of a local SAM checkpoint file (required).
        model_type: ``sam_model_registry`` key (``vit_b``, ``vit_l``, ``vit_h``).
        device: where SAM runs (default CPU).

    Raises:
        SegmenterUnavailable: no checkpoint path, the file does not exist, or
            ``segment_anything`` is not importable (the message says what to do).
    """

    feature_channels = 256

    def __init__(
        self, checkpoint: str | Path | None, model_type: str = "vit_b", device: str | torch.device | None = None
    ) -> None:
        if not checkpoint:
            raise SegmenterUnavailable(f"no SAM checkpoint path given. {SAM_INSTALL_HINT}")
        path = Path(checkpoint)
        if not path.is_file():
            raise SegmenterUnavailable(f"SAM checkpoint {str(path)!r} is not a file. {SAM_INSTALL_HINT}")
        try:
            import segment_anything  # noqa: PLC0415 - optional extra, imported lazily
        except ImportError as exc:
            raise SegmenterUnavailable(f"cannot import segment_anything ({exc}). {SAM_INSTALL_HINT}") from exc
        if model_type not in segment_anything.sam_model_registry:
            raise ValueError(
                f"unknown SAM model type {model_type!r}; valid: {', '.join(segment_anything.sam_model_registry)}"
            )
        self.device = torch.device(device or "cpu")
        self.model = segment_anything.sam_model_registry[model_type](checkpoint=str(path)).to(self.device).eval()
        self.predictor = segment_anything.SamPredictor(self.model)
        self.checkpoint = str(path)
        self.model_type = model_type

    @torch.no_grad()
    def segment(self, image: torch.Tensor, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_prompt(prompt, image.shape[0])
        masks, features = [], []
        for i in range(image.shape[0]):
            rgb = (image[i].clamp(0, 1).permute(1, 2, 0) * 255.0).round().byte().cpu().numpy()
            self.predictor.set_image(rgb)
            kind, x0, y0, x1, y1 = (float(v) for v in prompt[i].tolist())
            if kind < 0.5:
                mask, _, _ = self.predictor.predict(box=np.array([x0, y0, x1 + 1.0, y1 + 1.0]), multimask_output=False)
            else:
                mask, _, _ = self.predictor.predict(
                    point_coords=np.array([[x0, y0]]), point_labels=np.array([1]), multimask_output=False
                )
            masks.append(torch.from_numpy(mask[:1].astype(np.float32)))
            embedding = self.predictor.get_image_embedding()  # (1, 256, 64, 64) over the padded 1024² input
            h, w = self.predictor.input_size  # the resized image inside the padded square
            features.append(embedding[:, :, : math.ceil(h / 16), : math.ceil(w / 16)])
        mask = torch.stack(masks).to(image.device, image.dtype)
        return mask, torch.cat(features).to(image.device, image.dtype)


# ----------------------------------------------------------------------------- M2M


def _sn(module: nn.Module, enabled: bool) -> nn.Module:
    return spectral_norm(module) if enabled else module


class UpBlock(nn.Module):
    """MAM/GCA residual block, optionally upsampling ×2 (module doc). (N,Cin,h,w) → (N,Cout,h·s,w·s)."""

    def __init__(self, in_channels: int, out_channels: int, upsample: bool, spectral: bool = True) -> None:
        super().__init__()
        if upsample:
            conv1 = nn.ConvTranspose2d(in_channels, in_channels, 4, stride=2, padding=1, bias=False)
        else:
            conv1 = nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False)
        self.conv1 = _sn(conv1, spectral)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = _sn(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), spectral)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act = nn.LeakyReLU(0.2, inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if upsample or in_channels != out_channels:
            layers: list[nn.Module] = [nn.Upsample(scale_factor=2.0, mode="nearest")] if upsample else []
            layers += [_sn(nn.Conv2d(in_channels, out_channels, 1, bias=False), spectral), nn.BatchNorm2d(out_channels)]
            self.shortcut = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


def _layer(in_channels: int, out_channels: int, blocks: int, spectral: bool) -> nn.Sequential:
    if blocks < 1:
        raise ValueError(f"each M2M stage needs >= 1 block, got {blocks}")
    layers = [UpBlock(in_channels, out_channels, True, spectral)]
    layers += [UpBlock(out_channels, out_channels, False, spectral) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class MaskToMatte(nn.Module):
    """MAM's light mask-to-matte (M2M) module with stride 8/4/1 outputs (module doc).

    Args:
        feature_channels: C of the segmenter's features.
        width: multiplier on every width below.
        channels: stage widths at strides 8, 4, 2 (MAM: 128, 64, 32).
        blocks: blocks per stage (MAM: 3, 3, 2).
        head_channels: hidden width of the heads and of the stride-1 map (MAM: 32).
        pad_multiple: inputs are replicate-padded to a multiple of this (multiple of 16).
        spectral: spectral norm on the block convolutions (MAM: yes).
        test_band_widths: fixed (w₄, w₁) of the fusion when ``forward`` gets none.

    ``forward(image, mask, features, band_widths=None)``: image (N,3,H,W) in [0,1], mask
    (N,1,H,W) in [0,1], features (N,C,h,w) any h, w → the dict of
    :class:`~matting_core.methods.mgm.MGMNet` (alphas, fused alpha, bands).
    """

    def __init__(
        self,
        feature_channels: int,
        width: float = 1.0,
        channels: Sequence[int] = (128, 64, 32),
        blocks: Sequence[int] = (3, 3, 2),
        head_channels: int = 32,
        pad_multiple: int = 32,
        spectral: bool = True,
        test_band_widths: Sequence[int] = DEFAULT_TEST_BAND_WIDTHS,
    ) -> None:
        super().__init__()
        if pad_multiple <= 0 or pad_multiple % 16:
            raise ValueError(f"pad_multiple must be a positive multiple of 16, got {pad_multiple}")
        c8, c4, c2 = (scaled_channels(c, width) for c in channels)
        hidden = scaled_channels(head_channels, width)
        b8, b4, b2 = (int(b) for b in blocks)
        self.pad_multiple = int(pad_multiple)
        self.feature_channels = int(feature_channels)
        register_image_stats(self)
        self.layer_os8 = _layer(feature_channels + 4, c8, b8, spectral)
        self.layer_os4 = _layer(c8 + 4, c4, b4, spectral)
        self.layer_os2 = _layer(c4 + 4, c2, b2, spectral)
        self.up_os1 = nn.Sequential(
            _sn(nn.ConvTranspose2d(c2, hidden, 4, stride=2, padding=1, bias=False), spectral),
            nn.BatchNorm2d(hidden),
            nn.LeakyReLU(0.2, inplace=True),
        )
        init_decoder_modules([self.layer_os8, self.layer_os4, self.layer_os2, self.up_os1])
        for m in self.modules():  # residual branches start as identity (MAM/GCA)
            if isinstance(m, UpBlock):
                nn.init.zeros_(m.bn2.weight)
        self.head_os8 = AlphaHead(c8, hidden, scale=8)
        self.head_os4 = AlphaHead(c4, hidden, scale=4)
        self.head_os1 = AlphaHead(hidden, hidden, scale=1)
        self.test_band_widths = tuple(int(w) for w in test_band_widths)

    def forward(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        features: torch.Tensor,
        band_widths: tuple[Any, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        if features.dim() != 4 or features.shape[1] != self.feature_channels:
            raise ValueError(f"features must be (N, {self.feature_channels}, h, w), got {tuple(features.shape)}")
        g = torch.cat([(image - self.mean) / self.std, mask.to(image.dtype)], dim=1)
        g = pad_to_multiple(g, self.pad_multiple)
        g16, g8, g4 = F.avg_pool2d(g, 16), F.avg_pool2d(g, 8), F.avg_pool2d(g, 4)
        f = F.interpolate(features.to(g.dtype), size=g16.shape[-2:], mode="bilinear", align_corners=False)
        x = self.layer_os8(torch.cat([f, g16], dim=1))
        alpha_os8 = crop_to(self.head_os8(x), image)
        x = self.layer_os4(torch.cat([x, g8], dim=1))
        alpha_os4 = crop_to(self.head_os4(x), image)
        x = self.up_os1(self.layer_os2(torch.cat([x, g4], dim=1)))
        alpha_os1 = crop_to(self.head_os1(x), image)
        return mgm_outputs(alpha_os8, alpha_os4, alpha_os1, band_widths, self.test_band_widths)


class MAMNet(nn.Module):
    """Frozen segmenter + trainable M2M (module doc).

    ``forward(image, prompt, band_widths=None)``: image (N,3,H,W) RGB in [0,1], prompt
    (N,5) → M2M's dict plus ``"mask"`` (N,1,H,W), the segmenter's mask. A segmenter that is
    an ``nn.Module`` (OwnSegmenter) is a submodule (its weights are in the state dict); an
    external one (SamSegmenter) is a plain attribute (its weights stay in its own file).
    """

    required_input = "prompt"

    def __init__(self, segmenter: Segmenter, m2m: MaskToMatte) -> None:
        super().__init__()
        if not isinstance(segmenter, Segmenter):
            raise ValueError("segmenter must have feature_channels and segment(image, prompt)")
        if segmenter.feature_channels != m2m.feature_channels:
            raise ValueError(
                f"segmenter gives {segmenter.feature_channels} feature channels, M2M expects {m2m.feature_channels}"
            )
        self.segmenter = segmenter
        self.m2m = m2m

    def train(self, mode: bool = True) -> MAMNet:
        super().train(mode)
        if isinstance(self.segmenter, nn.Module):
            self.segmenter.eval()
        return self

    @torch.no_grad()
    def segment(self, image: torch.Tensor, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The segmenter's (mask, features) for a prompt, without gradients."""
        _check_prompt(prompt, image.shape[0])
        return self.segmenter.segment(image, prompt)

    def forward(
        self, image: torch.Tensor, prompt: torch.Tensor, band_widths: tuple[Any, Any] | None = None
    ) -> dict[str, torch.Tensor]:
        mask, features = self.segment(image, prompt)
        out = self.m2m(image, mask, features, band_widths)
        out["mask"] = mask
        return out

    def forward_region(self, image: torch.Tensor, region: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`forward` with the prompt as a region mask (N,1,H,W) {0,1}
        (:func:`prompt_mask` of a box gives the box prompt's output): the exportable path.
        Only the project's own segmenter has it (SAM is not an exportable module here)."""
        if not isinstance(self.segmenter, OwnSegmenter):
            raise ValueError("only a MAM model with the project's own segmenter takes a region mask (and exports)")
        mask, features = self.segmenter.segment_region(image, region)
        out = self.m2m(image, mask, features)
        out["mask"] = mask
        return out


def mam_train_step(
    model: MAMNet,
    loss_module: MGMLoss,
    batch: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator | None = None,
    step: int = 0,
    total_steps: int = 1,
    **amp: Any,
) -> dict[str, torch.Tensor]:
    """One MAM step: prompt → frozen segmenter → M2M with random band widths → MGM loss.

    batch: ``image``, ``prompt`` (N,5), ``alpha`` (+ ``fg``, ``bg``). Randomness as
    :func:`~matting_core.methods.mgm.training_bands`.
    """
    widths, bands = training_bands(loss_module, batch["alpha"], generator, step, total_steps)
    model.train()
    return optimise(
        optimizer,
        lambda: model(batch["image"], batch["prompt"], band_widths=widths),
        lambda pred: loss_module(pred, batch, bands),
        device_type=batch["image"].device.type,
        **amp,
    )
