"""Mask-Guided Matting (Yu et al., AAAI 2021) on the project's backbone (METHOD.md §3).

Network (:class:`MGMNet`)::

    image (N,3,H,W) RGB in [0,1], mask (N,1,H,W) coarse guidance in {0,1} (or soft)
      GuidedEncoder(4 input channels) + ASPP + U-Net decoder → s8, s4, s2, s1 features
      heads (conv3x3-BN-LeakyReLU-conv3x3, logits upsampled to full size, (tanh+1)/2):
        alpha_os8 from s8 (×8), alpha_os4 from s4 (×4), alpha_os1 from s1
      progressive refinement (:func:`progressive_fusion`):
        band_os4 = U(alpha_os8, w₄);  fused_os4 = where(band_os4, alpha_os4, alpha_os8)
        band_os1 = U(fused_os4, w₁);  alpha     = where(band_os1, alpha_os1, fused_os4)
      U(α, w) = {1/255 ≤ α ≤ 1 − 1/255} dilated by w px
      (:func:`matting_core.regions.uncertain_band_torch`, a (2w+1)² square).

Band widths: training draws w₄ ~ U{1..30} and w₁ ~ U{1..15} per sample from an explicit
``torch.Generator`` (:func:`sample_band_widths`); evaluation uses the fixed (15, 7)
(confirmed). ``forward(image, mask, band_widths=None)`` uses the fixed widths unless given.

Loss (:class:`MGMLoss`; MGM's trainer): each output gets L1 + composition + Laplacian
(:func:`matting_core.losses.matte_loss`) in its own region — os8 the whole image, os4
``band_os4``, os1 ``band_os1`` — after MGM's replacement (os4 outside its band := os8, os1
outside its band := fused os4), and

    L = (2·L_os1 + L_os4 + L_os8) / 5.

Warm-up (MGM's trainer): for the first ``warmup_fraction`` of the run (MGM: 5 000 of 100 000
steps → 0.05) the os4/os1 regions are the GT alpha's uncertain band dilated by the drawn
widths instead of the predicted bands, without replacement; up to 3× that, a fair coin (from
the generator) picks GT or predicted bands per step; after that, always predicted.

Guidance masks (:func:`mgm_guidance`): training from
:func:`matting_core.regions.mgm_guidance_mask` (threshold t ~ U(0.01, 1), random
erode/dilate 1–30 px, CutMask p = 0.25; confirmed); evaluation: ``1[α ≥ 0.5]`` (project
choice: the coarse mask a perfect segmenter would give; the pipeline may pass a segmenter's
mask instead).

Changes from the paper (and why):

* ResNet-34 encoder + GCA-style shortcut decoder (transposed-conv blocks, spectral norm) →
  the project's ResNet (4-channel stem, no max-pool) + ASPP + U-Net decoder, the heads at the
  same strides 8/4/1. Every compared method shares the backbone and decoder so the
  comparison isolates the method (guidance, progressive refinement, losses).
* The band is dilated with a square of radius w (regions.uncertain_band_torch) rather than an
  ellipse of diameter w; widths are drawn from the inclusive ranges 1–30 / 1–15.
* MGM's gradient clipping and learning-rate warm-up are left to the training loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from matting_core.losses import matte_loss
from matting_core.models import scaled_channels
from matting_core.regions import mgm_guidance_mask, uncertain_band_torch

from .common import AlphaHead, GuidedEncoderDecoder, crop_to, optimise
from .dim import _alpha_2d

__all__ = [
    "DEFAULT_TEST_BAND_WIDTHS",
    "DEFAULT_TRAIN_BAND_RANGES",
    "MGMLoss",
    "MGMNet",
    "band_mode",
    "gt_bands",
    "mgm_guidance",
    "mgm_outputs",
    "mgm_train_step",
    "progressive_fusion",
    "sample_band_widths",
    "training_bands",
    "uncertain_band_per_sample",
    "weighted_output_loss",
]

DEFAULT_TEST_BAND_WIDTHS = (15, 7)  # px, confirmed
DEFAULT_TRAIN_BAND_RANGES = ((1, 30), (1, 15))  # px, inclusive, confirmed
DEFAULT_WARMUP_FRACTION = 0.05  # MGM: warmup_step 5 000 of 100 000
OUTPUT_WEIGHTS = {"os1": 2.0, "os4": 1.0, "os8": 1.0}  # / 5, confirmed

Widths = int | Sequence[int]


# ----------------------------------------------------------------------------- fusion


def uncertain_band_per_sample(alpha: torch.Tensor, widths: Widths) -> torch.Tensor:
    """MGM's uncertain band with one dilation width per sample.

    alpha (N,1,H,W) in [0,1]; ``widths`` an int (all samples) or N ints → (N,1,H,W) bool.
    No gradient flows through the band.
    """
    if isinstance(widths, (int, np.integer)):
        return uncertain_band_torch(alpha, int(widths))
    widths = [int(w) for w in widths]
    if len(widths) != alpha.shape[0]:
        raise ValueError(f"got {len(widths)} band widths for a batch of {alpha.shape[0]}")
    if len(set(widths)) == 1:
        return uncertain_band_torch(alpha, widths[0])
    return torch.cat([uncertain_band_torch(alpha[i : i + 1], w) for i, w in enumerate(widths)], dim=0)


def progressive_fusion(
    alpha_os8: torch.Tensor,
    alpha_os4: torch.Tensor,
    alpha_os1: torch.Tensor,
    widths_os4: Widths = DEFAULT_TEST_BAND_WIDTHS[0],
    widths_os1: Widths = DEFAULT_TEST_BAND_WIDTHS[1],
) -> dict[str, torch.Tensor]:
    """MGM's progressive refinement of three full-size alphas (module doc).

    All alphas (N,1,H,W) in [0,1]. Returns ``{"alpha": fused, "alpha_fused_os4",
    "band_os4", "band_os1"}`` (bands as float {0,1}). The stride-4 output only enters inside
    ``band_os4`` and the stride-1 output only inside ``band_os1``; elsewhere the coarser
    result is kept exactly. ``torch.where``, no boolean indexing (export-safe).
    """
    band_os4 = uncertain_band_per_sample(alpha_os8, widths_os4)
    fused_os4 = torch.where(band_os4, alpha_os4, alpha_os8)
    band_os1 = uncertain_band_per_sample(fused_os4, widths_os1)
    fused = torch.where(band_os1, alpha_os1, fused_os4)
    return {
        "alpha": fused,
        "alpha_fused_os4": fused_os4,
        "band_os4": band_os4.to(alpha_os8.dtype),
        "band_os1": band_os1.to(alpha_os8.dtype),
    }


def mgm_outputs(
    alpha_os8: torch.Tensor,
    alpha_os4: torch.Tensor,
    alpha_os1: torch.Tensor,
    band_widths: tuple[Widths, Widths] | None,
    test_band_widths: tuple[int, int],
) -> dict[str, torch.Tensor]:
    """The output dict of MGM's network (and MAM's M2M): the three alphas + their fusion.

    All alphas (N,1,H,W) in [0,1]; ``band_widths = (w₄, w₁)`` (ints or per-sample lists), None
    → ``test_band_widths``. Returns ``{"alpha_os8", "alpha_os4", "alpha_os1"}`` plus
    :func:`progressive_fusion`'s ``{"alpha", "alpha_fused_os4", "band_os4", "band_os1"}``.
    """
    w4, w1 = test_band_widths if band_widths is None else band_widths
    out = {"alpha_os8": alpha_os8, "alpha_os4": alpha_os4, "alpha_os1": alpha_os1}
    out.update(progressive_fusion(alpha_os8, alpha_os4, alpha_os1, w4, w1))
    return out


def sample_band_widths(
    batch_size: int,
    generator: torch.Generator,
    ranges: Sequence[Sequence[int]] = DEFAULT_TRAIN_BAND_RANGES,
) -> tuple[list[int], list[int]]:
    """Training band widths: N widths for os4 from ``ranges[0]``, then N for os1 (inclusive).

    ``generator``: a CPU ``torch.Generator`` (the only randomness). Draw order: os4 widths,
    then os1 widths.
    """
    out = []
    for lo, hi in ranges:
        lo, hi = int(lo), int(hi)
        if not 0 <= lo <= hi:
            raise ValueError(f"band width range must satisfy 0 <= lo <= hi, got {(lo, hi)}")
        out.append(torch.randint(lo, hi + 1, (batch_size,), generator=generator).tolist())
    return out[0], out[1]


def band_mode(step: int, total_steps: int, warmup_fraction: float, generator: torch.Generator) -> str:
    """``"gt"`` or ``"pred"``: which bands weight the os4/os1 losses at ``step`` (module doc).

    step < w·T → "gt"; w·T ≤ step < 3·w·T → a fair coin from ``generator`` (drawn only
    there); later → "pred".
    """
    warmup = float(warmup_fraction) * int(total_steps)
    if step < warmup:
        return "gt"
    if step < 3 * warmup:
        return "gt" if int(torch.randint(0, 2, (1,), generator=generator)) == 0 else "pred"
    return "pred"


def gt_bands(alpha: torch.Tensor, widths_os4: Widths, widths_os1: Widths) -> tuple[torch.Tensor, torch.Tensor]:
    """Warm-up regions: the GT alpha's uncertain band dilated by the drawn widths, as float."""
    return (
        uncertain_band_per_sample(alpha, widths_os4).to(alpha.dtype),
        uncertain_band_per_sample(alpha, widths_os1).to(alpha.dtype),
    )


# ----------------------------------------------------------------------------- network


class MGMNet(GuidedEncoderDecoder):
    """MGM: 4-channel encoder, U-Net decoder, heads at strides 8/4/1, progressive fusion.

    Args:
        head_channels: hidden width of each head before the width multiplier (MGM: 32).
        test_band_widths: (w₄, w₁) used when ``forward`` gets no widths (15, 7).
        backbone: depth, width, aspp_rates, aspp_channels, decoder_channels, pad_multiple —
            the shared encoder-decoder's options (:class:`~.common.GuidedEncoderDecoder`).

    Modules, in construction order: ``body``, ``decoder`` (the base), ``head_os8``,
    ``head_os4``, ``head_os1`` (:class:`~.common.AlphaHead`).

    ``forward(image, mask, band_widths=None)``: image (N,3,H,W) RGB in [0,1], mask
    (N,1,H,W) in [0,1], ``band_widths = (w₄s, w₁s)`` (ints or per-sample lists) →
    ``{"alpha", "alpha_os8", "alpha_os4", "alpha_os1", "alpha_fused_os4"}`` (N,1,H,W) in
    [0,1] and ``{"band_os4", "band_os1"}`` (N,1,H,W) float {0,1}.
    """

    required_input = "mask"

    def __init__(
        self,
        *,
        head_channels: int = 32,
        test_band_widths: Sequence[int] = DEFAULT_TEST_BAND_WIDTHS,
        **backbone: Any,
    ) -> None:
        super().__init__(**backbone)
        hidden = scaled_channels(head_channels, self.width)
        self.head_os8 = AlphaHead(self.decoder.channels[8], hidden, scale=8)
        self.head_os4 = AlphaHead(self.decoder.channels[4], hidden, scale=4)
        self.head_os1 = AlphaHead(self.decoder.channels[1], hidden, scale=1)
        self.test_band_widths = tuple(int(w) for w in test_band_widths)

    def forward(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        band_widths: tuple[Widths, Widths] | None = None,
    ) -> dict[str, torch.Tensor]:
        (decoded,) = self.decode(image, mask)
        alpha_os8 = crop_to(self.head_os8(decoded[8]), image)
        alpha_os4 = crop_to(self.head_os4(decoded[4]), image)
        alpha_os1 = crop_to(self.head_os1(decoded[1]), image)
        return mgm_outputs(alpha_os8, alpha_os4, alpha_os1, band_widths, self.test_band_widths)


# ----------------------------------------------------------------------------- loss


class MGMLoss(nn.Module):
    """MGM's weighted multi-output matte loss (module doc); also MAM's.

    Args:
        warmup_fraction: GT-band warm-up length as a fraction of the run (0.05).
        band_width_ranges: training width ranges ((1, 30), (1, 15)).

    ``forward(pred, batch, bands=None)``: pred from :class:`MGMNet` (or MAM); batch with
    ``alpha`` (N,1,H,W) and optionally ``image``, ``fg``, ``bg`` (N,3,H,W) (the composition
    term needs fg and bg; without them it is left out). ``bands = (band_os4, band_os1)``
    replaces the predicted bands (warm-up). Returns per-output totals ``os8``, ``os4``,
    ``os1``, the weighted ``l1``, ``[composition,]`` ``laplacian`` and ``total`` =
    (2·os1 + os4 + os8)/5.
    """

    def __init__(
        self,
        warmup_fraction: float = DEFAULT_WARMUP_FRACTION,
        band_width_ranges: Sequence[Sequence[int]] = DEFAULT_TRAIN_BAND_RANGES,
    ) -> None:
        super().__init__()
        if not 0.0 <= float(warmup_fraction) <= 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1], got {warmup_fraction}")
        self.warmup_fraction = float(warmup_fraction)
        self.band_width_ranges = tuple((int(lo), int(hi)) for lo, hi in band_width_ranges)

    def forward(
        self,
        pred: Mapping[str, torch.Tensor],
        batch: Mapping[str, torch.Tensor],
        bands: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        if "alpha" not in batch:
            raise ValueError(f"the MGM loss needs batch key 'alpha'; it has {sorted(batch)}")
        return weighted_output_loss(
            pred, batch["alpha"], batch.get("image"), batch.get("fg"), batch.get("bg"), bands
        )


def weighted_output_loss(
    pred: Mapping[str, torch.Tensor],
    target: torch.Tensor,
    image: torch.Tensor | None = None,
    fg: torch.Tensor | None = None,
    bg: torch.Tensor | None = None,
    bands: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """(2·L_os1 + L_os4 + L_os8)/5 with L = matte_loss in each output's region (module doc)."""
    os8, os4, os1 = pred["alpha_os8"], pred["alpha_os4"], pred["alpha_os1"]
    if bands is None:
        band4, band1 = pred["band_os4"], pred["band_os1"]
        os4 = torch.where(band4 > 0, os4, os8)
        os1 = torch.where(band1 > 0, os1, os4)
    else:
        band4, band1 = bands
    if fg is None or bg is None:
        fg = bg = image = None
    outputs = {"os8": (os8, None), "os4": (os4, band4), "os1": (os1, band1)}
    terms: dict[str, torch.Tensor] = {}
    combined: dict[str, torch.Tensor] = {}
    for name, (alpha, region) in outputs.items():
        part = matte_loss(alpha, target, image=image, fg=fg, bg=bg, weight=region)
        weight = OUTPUT_WEIGHTS[name] / 5.0
        for key, value in part.items():
            if key == "total":
                terms[name] = value
            else:
                combined[key] = combined.get(key, 0.0) + weight * value
    terms.update(combined)
    terms["total"] = sum(OUTPUT_WEIGHTS[name] * terms[name] for name in outputs) / 5.0
    return terms


# ----------------------------------------------------------------------------- recipe


def mgm_guidance(
    alpha: np.ndarray,
    rng: np.random.Generator | None = None,
    train: bool = True,
    threshold_range: tuple[float, float] = (0.01, 1.0),
    kernel_range: tuple[int, int] = (1, 30),
    cutmask_prob: float = 0.25,
    eval_threshold: float = 0.5,
) -> np.ndarray:
    """MGM guidance mask from the GT alpha: (1, H, W) float32 in {0, 1}.

    Training: :func:`matting_core.regions.mgm_guidance_mask` (draws from ``rng``).
    Evaluation: ``1[α ≥ eval_threshold]`` (deterministic; ``rng`` unused).

    Args:
        alpha: (H, W) or (1, H, W) float in [0, 1].
    """
    alpha2d = _alpha_2d(alpha)
    if train:
        if rng is None:
            raise ValueError("a training guidance mask is random: pass rng (a numpy Generator)")
        mask = mgm_guidance_mask(alpha2d, rng, threshold_range, kernel_range, cutmask_prob)
    else:
        mask = (alpha2d >= float(eval_threshold)).astype(np.float32)
    return mask.astype(np.float32, copy=False)[None]


def training_bands(
    loss_module: MGMLoss,
    gt_alpha: torch.Tensor,
    generator: torch.Generator | None,
    step: int,
    total_steps: int,
) -> tuple[tuple[list[int], list[int]], tuple[torch.Tensor, torch.Tensor] | None]:
    """Draw this step's band widths and, in warm-up, the GT bands (module doc).

    ``generator`` None → a CPU generator seeded with ``step`` (deterministic per step).
    Draw order: os4 widths, os1 widths, then the warm-up coin when in its window.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(int(step))
    widths = sample_band_widths(gt_alpha.shape[0], generator, loss_module.band_width_ranges)
    mode = band_mode(step, total_steps, loss_module.warmup_fraction, generator)
    bands = gt_bands(gt_alpha.float(), *widths) if mode == "gt" else None
    return widths, bands


def mgm_train_step(
    model: MGMNet,
    loss_module: MGMLoss,
    batch: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator | None = None,
    step: int = 0,
    total_steps: int = 1,
    **amp: Any,
) -> dict[str, torch.Tensor]:
    """One MGM step: random band widths, warm-up bands, forward, weighted loss, update.

    batch: ``image``, ``mask``, ``alpha`` (+ ``fg``, ``bg`` for the composition term).
    """
    widths, bands = training_bands(loss_module, batch["alpha"], generator, step, total_steps)
    model.train()
    return optimise(
        optimizer,
        lambda: model(batch["image"], batch["mask"], band_widths=widths),
        lambda pred: loss_module(pred, batch, bands),
        device_type=batch["image"].device.type,
        **amp,
    )
