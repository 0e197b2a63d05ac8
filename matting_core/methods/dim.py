"""Deep Image Matting (Xu et al., CVPR 2017) on the project's backbone (METHOD.md §3).

Network (:class:`DIMNet`)::

    image (N,3,H,W) RGB in [0,1], trimap (N,1,H,W) in [0,1] (0 bg, 128/255 unknown, 1 fg)
      stage 1 (encoder-decoder): GuidedEncoder(4 input channels) + ASPP + U-Net decoder
               → alpha prediction layer conv3x3 → sigmoid → alpha_stage1 (N,1,H,W)
      stage 2 (refinement): x = cat(normalised image, alpha_stage1)         (N,4,H,W)
               r = conv3x3(C→1)(ReLU(conv3x3(C→C)(ReLU(conv3x3(C→C)(ReLU(conv3x3(4→C)(x)))))))
               alpha = clamp(alpha_stage1 + r, 0, 1)                          (skip model)
      → {"alpha": refined, "alpha_stage1": stage-1 alpha}

C = round(64·width) (DIM: 64). The refinement's last conv starts small (std 1e-3) so the
refined alpha starts at the stage-1 alpha.

Losses (:class:`DIMLoss`), over the trimap's unknown region U (0.25 < t < 0.75), each the
mean over U (0 when U is empty), ε = 1e-6 (confirmed):

    L_α    = mean_U sqrt((α_p − α_g)² + ε²)
    L_c    = mean_U,RGB sqrt((c_p − c_g)² + ε²),  c_p = α_p·F + (1 − α_p)·B,  c_g = the image
    stage 1: L_1 = 0.5·L_α(α_stage1) + 0.5·L_c(α_stage1)
    refinement: L_2 = L_α(α_refined)

Three-phase schedule (:func:`dim_phase`, :func:`set_dim_phase`): DIM first trains the
encoder-decoder alone (loss L_1; the refinement is frozen), then freezes it and trains the
refinement (loss L_2; the encoder-decoder is frozen and its BatchNorms use running
statistics), then fine-tunes everything (loss L_1 + L_2). Phase boundaries are fractions of
the run: default 50 % / 25 % / 25 % (project choice; the paper trains each phase "until
convergence").

Trimaps: training trimaps come from :func:`matting_core.regions.dim_trimap` (fg and bg eroded
with random elliptical kernels, diameters 1–30, confirmed); evaluation trimaps, when the
validation set ships none, from :func:`matting_core.regions.eval_trimap` with a fixed 15 px
elliptical kernel (project choice, ``EVAL_TRIMAP_KERNEL``).

Changes from the paper (and why):

* VGG-16 encoder with max-unpooling decoder → the project's ResNet (stem max-pool removed,
  width multiplier, 4-channel stem) + ASPP + U-Net decoder with skips. All methods share the
  same backbone and decoder so the comparison isolates the method, and the network scales
  with the project's width/depth options. The trimap's stem weights start at zero when the
  method is initialised from the project's pretrained U-Net (DIM zero-initialises its 4th
  input channel the same way).
* Stage-1 output through a sigmoid (DIM's alpha prediction layer; the paper does not name the
  activation); the refined alpha is clamped to [0, 1] as the skip model needs.
* The joint phase's loss is L_1 + L_2 (the paper does not state it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from matting_core.losses import weighted_mean
from matting_core.models import scaled_channels
from matting_core.regions import dim_trimap, eval_trimap

from .common import (
    GuidedEncoderDecoder,
    charbonnier,
    crop_to,
    init_decoder_modules,
    init_output_conv,
    optimise,
    region_charbonnier,
    register_image_stats,
    unknown_region,
)

__all__ = [
    "DIMLoss",
    "DIMNet",
    "DIMRefinement",
    "DIM_PHASES",
    "DIM_PHASE_MODULES",
    "EVAL_TRIMAP_KERNEL",
    "dim_guidance",
    "dim_phase",
    "dim_train_step",
    "set_dim_phase",
]

Phase = Literal["encoder_decoder", "refinement", "joint"]
DIM_PHASES: tuple[str, ...] = ("encoder_decoder", "refinement", "joint")
# Which top-level submodules of DIMNet train in each phase (the rest is frozen).
DIM_PHASE_MODULES: dict[str, tuple[str, ...]] = {
    "encoder_decoder": ("body", "decoder", "head"),
    "refinement": ("refinement",),
    "joint": ("body", "decoder", "head", "refinement"),
}
DEFAULT_PHASE_FRACTIONS = (0.5, 0.25)  # encoder-decoder, refinement; the rest is joint
EVAL_TRIMAP_KERNEL = 15  # px, elliptical kernel diameter (project choice)
TRAIN_TRIMAP_KERNELS = (1, 30)  # px, confirmed


class DIMRefinement(nn.Module):
    """DIM's refinement stage: 4 convs on cat(image, α₁), residual added to α₁, clamped.

    ``residual(image, alpha)``: image (N,3,H,W) in [0,1], alpha (N,1,H,W) → r (N,1,H,W).
    ``forward(image, alpha)`` = ``clamp(alpha + residual(image, alpha), 0, 1)``.
    """

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        register_image_stats(self)
        self.conv1 = nn.Conv2d(4, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv4 = nn.Conv2d(channels, 1, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        init_decoder_modules([self])
        init_output_conv(self.conv4)

    def residual(self, image: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        x = torch.cat([(image - self.mean) / self.std, alpha], dim=1)
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        x = self.relu(self.conv3(x))
        return self.conv4(x)

    def forward(self, image: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return torch.clamp(alpha + self.residual(image, alpha), 0.0, 1.0)


class DIMNet(GuidedEncoderDecoder):
    """DIM: 4-channel encoder-decoder + refinement stage (module doc).

    Args:
        refine_channels: refinement width before the width multiplier (DIM: 64).
        backbone: depth, width, aspp_rates, aspp_channels, decoder_channels, pad_multiple —
            the shared encoder-decoder's options (:class:`~.common.GuidedEncoderDecoder`).

    Modules, in construction order: ``body``, ``decoder`` (the base), ``head`` (conv3x3 → 1),
    ``refinement``.

    ``forward(image, trimap)``: image (N,3,H,W) RGB in [0,1], trimap (N,1,H,W) in [0,1], any
    H, W → ``{"alpha": (N,1,H,W) refined in [0,1], "alpha_stage1": (N,1,H,W) in [0,1]}``.
    """

    required_input = "trimap"

    def __init__(self, *, refine_channels: int = 64, **backbone: Any) -> None:
        super().__init__(**backbone)
        self.head = nn.Conv2d(self.decoder.channels[1], 1, 3, padding=1)
        init_output_conv(self.head)
        self.refinement = DIMRefinement(scaled_channels(refine_channels, self.width))

    def forward(self, image: torch.Tensor, trimap: torch.Tensor) -> dict[str, torch.Tensor]:
        (decoded,) = self.decode(image, trimap)
        alpha_stage1 = crop_to(torch.sigmoid(self.head(decoded[1])), image)
        return {"alpha": self.refinement(image, alpha_stage1), "alpha_stage1": alpha_stage1}


# ----------------------------------------------------------------------------- schedule


def dim_phase(step: int, total_steps: int, fractions: Sequence[float] = DEFAULT_PHASE_FRACTIONS) -> Phase:
    """DIM's training phase at ``step`` (0-based) of a ``total_steps`` run.

    ``"encoder_decoder"`` for step < f₀·T, ``"refinement"`` for step < (f₀ + f₁)·T, then
    ``"joint"``. ``fractions = (f₀, f₁)``, each ≥ 0, f₀ + f₁ ≤ 1 (default 0.5, 0.25).

    >>> [dim_phase(s, 8) for s in (0, 3, 4, 5, 6, 7)]
    ['encoder_decoder', 'encoder_decoder', 'refinement', 'refinement', 'joint', 'joint']
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    f0, f1 = (float(f) for f in fractions)
    if f0 < 0 or f1 < 0 or f0 + f1 > 1.0 + 1e-9:
        raise ValueError(f"phase fractions must be >= 0 with a sum <= 1, got {tuple(fractions)}")
    if step < f0 * total_steps:
        return "encoder_decoder"
    if step < (f0 + f1) * total_steps:
        return "refinement"
    return "joint"


def set_dim_phase(model: DIMNet, phase: str) -> None:
    """Freeze what does not train in ``phase`` (``requires_grad``) and put it in eval mode.

    Parameters of :data:`DIM_PHASE_MODULES` ``[phase]`` train; the others get
    ``requires_grad = False`` and, when the model is in training mode, their modules switch to
    eval mode so frozen BatchNorms keep their running statistics. Call after ``model.train()``.
    """
    if phase not in DIM_PHASE_MODULES:
        raise ValueError(f"unknown DIM phase {phase!r}; valid phases: {', '.join(DIM_PHASES)}")
    training = DIM_PHASE_MODULES[phase]
    for name, module in model.named_children():
        trains = name in training
        for p in module.parameters():
            p.requires_grad_(trains)
        if model.training:
            module.train(trains)


# ----------------------------------------------------------------------------- loss


class DIMLoss(nn.Module):
    """DIM's losses over the unknown region, by phase (module doc).

    Args:
        phase_fractions: (f₀, f₁) of :func:`dim_phase` (the training recipe lives here).
        alpha_weight, composition_weight: stage-1 mix (0.5 / 0.5, confirmed).
        epsilon: ε of the ε-smoothed differences (1e-6, confirmed).

    ``forward(pred, batch, phase)``: pred from :class:`DIMNet`; batch with ``alpha``
    (N,1,H,W), ``trimap`` (N,1,H,W) in [0,1], ``image``, ``fg``, ``bg`` (N,3,H,W) in [0,1].
    Returns ``{"alpha_stage1", "composition_stage1", "stage1", "alpha_refined", "phase",
    "total"}`` (``phase``: 0, 1, 2 for logging; ``total`` depends on the phase).
    """

    def __init__(
        self,
        phase_fractions: Sequence[float] = DEFAULT_PHASE_FRACTIONS,
        alpha_weight: float = 0.5,
        composition_weight: float = 0.5,
        epsilon: float = 1e-6,
    ) -> None:
        super().__init__()
        dim_phase(0, 1, phase_fractions)  # validates
        self.phase_fractions = tuple(float(f) for f in phase_fractions)
        self.alpha_weight = float(alpha_weight)
        self.composition_weight = float(composition_weight)
        self.epsilon = float(epsilon)

    def forward(
        self, pred: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor], phase: str = "joint"
    ) -> dict[str, torch.Tensor]:
        if phase not in DIM_PHASES:
            raise ValueError(f"unknown DIM phase {phase!r}; valid phases: {', '.join(DIM_PHASES)}")
        missing = [k for k in ("alpha", "trimap", "image", "fg", "bg") if k not in batch]
        if missing:
            raise ValueError(f"the DIM loss needs batch keys {missing}; it has {sorted(batch)}")
        gt, image, fg, bg = batch["alpha"], batch["image"], batch["fg"], batch["bg"]
        region = unknown_region(batch["trimap"].float())
        alpha1 = pred["alpha_stage1"]
        terms: dict[str, torch.Tensor] = {}
        terms["alpha_stage1"] = region_charbonnier(alpha1, gt, region, self.epsilon)
        composite = alpha1 * fg + (1.0 - alpha1) * bg
        terms["composition_stage1"] = weighted_mean(charbonnier(composite, image, self.epsilon), region)
        terms["stage1"] = (
            self.alpha_weight * terms["alpha_stage1"] + self.composition_weight * terms["composition_stage1"]
        )
        terms["alpha_refined"] = region_charbonnier(pred["alpha"], gt, region, self.epsilon)
        if phase == "encoder_decoder":
            total = terms["stage1"]
        elif phase == "refinement":
            total = terms["alpha_refined"]
        else:
            total = terms["stage1"] + terms["alpha_refined"]
        terms["phase"] = torch.tensor(float(DIM_PHASES.index(phase)), device=gt.device)
        terms["total"] = total
        return terms


# ----------------------------------------------------------------------------- recipe


def dim_guidance(
    alpha: np.ndarray,
    rng: np.random.Generator | None = None,
    train: bool = True,
    kernel_range: tuple[int, int] = TRAIN_TRIMAP_KERNELS,
    eval_kernel: int = EVAL_TRIMAP_KERNEL,
) -> np.ndarray:
    """DIM trimap from the GT alpha, as the network input: (1, H, W) float32 in {0, 128/255, 1}.

    Training: :func:`matting_core.regions.dim_trimap` (random elliptical erosion, diameters
    ``kernel_range``, draws from ``rng``). Evaluation: :func:`matting_core.regions.eval_trimap`
    with the fixed ``eval_kernel`` (deterministic; ``rng`` unused).

    Args:
        alpha: (H, W) or (1, H, W) float in [0, 1].
    """
    alpha2d = _alpha_2d(alpha)
    if train:
        if rng is None:
            raise ValueError("a training trimap is random: pass rng (a numpy Generator)")
        trimap = dim_trimap(alpha2d, rng, kernel_range)
    else:
        trimap = eval_trimap(alpha2d, eval_kernel)
    return (trimap.astype(np.float32) / np.float32(255.0))[None]


def _alpha_2d(alpha: Any) -> np.ndarray:
    alpha = np.asarray(alpha)
    if alpha.ndim == 3 and alpha.shape[0] == 1:
        alpha = alpha[0]
    if alpha.ndim != 2:
        raise ValueError(f"alpha must be (H, W) or (1, H, W), got shape {alpha.shape}")
    return np.ascontiguousarray(alpha, dtype=np.float32)


def dim_train_step(
    model: DIMNet,
    loss_module: DIMLoss,
    batch: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator | None = None,
    step: int = 0,
    total_steps: int = 1,
    **amp: Any,
) -> dict[str, torch.Tensor]:
    """One DIM step: pick the phase, freeze accordingly, forward, phase loss, update.

    ``generator`` is unused (DIM's randomness is all in the data). ``amp``: ``scheduler``,
    ``scaler``, ``autocast_dtype`` as :func:`matting_core.methods.common.optimise`.
    """
    phase = dim_phase(step, total_steps, loss_module.phase_fractions)
    model.train()
    set_dim_phase(model, phase)
    return optimise(
        optimizer,
        lambda: model(batch["image"], batch["trimap"]),
        lambda pred: loss_module(pred, batch, phase),
        device_type=batch["image"].device.type,
        **amp,
    )
