"""MGM in the wild (Park et al., CVPR 2023): instance-wise compositing and EMA self-training.

The network and the supervised loss are MGM's (:mod:`matting_core.methods.mgm`). Two recipes
are added:

(a) Instance-wise compositing (:func:`two_instance_sample`): two foregrounds A (front) and B
    (behind) over one background,

        I = α_A·F_A + (1 − α_A)·(α_B·F_B + (1 − α_B)·Bg)

    (:func:`matting_core.compositing.composite_two_instances`). One instance is the target,
    picked at random; its visible alpha (:func:`matting_core.compositing.layer_two_instances`)
    is the target matte: v = α_A for A, v = α_B·(1 − α_A) for B. The guidance is that
    instance's mask, made from v by :func:`matting_core.regions.mgm_guidance_mask` (project
    choice: a segmenter's instance mask does not cover the occluded part). So the composition
    loss stays exact, the sample carries the target's own foreground F_t and the "everything
    else" layer B_t with I = v·F_t + (1 − v)·B_t:

        front: B_t = α_B·F_B + (1 − α_B)·Bg
        back:  B_t = (I − v·F_B) / (1 − v)   (= (α_A·F_A + (1−α_A)(1−α_B)·Bg) / (1 − v),
               a convex mix; where v = 1 it is Bg)

(b) Self-training on natural photos (:func:`mgm_wild_train_step`): an EMA copy of the network
    (the teacher, held by :class:`MGMWildLoss`) sees the weak view with the segmentation mask
    as guidance and gives the fused alpha at the test band widths; the student sees the
    strong view (same geometry, :func:`matting_core.augment.strong_photometric` — e.g. from
    :func:`matting_core.training.make_views` with ``strong=True``) with the same mask and is
    trained with MGM's weighted output loss against the teacher's alpha (no composition
    term: natural photos have no F/B). After each step θ_t ← m·θ_t + (1 − m)·θ_s
    (:func:`matting_core.training.ema_update`, m = 0.999, project choice).

Batch keys: MGM's ``image``, ``mask``, ``alpha`` (+ ``fg``, ``bg``) for the instance
composites, and — when self-training — ``natural_image`` (weak view), ``natural_image_strong``
and ``natural_mask`` (N',·,h,w). Self-training starts after ``unsup_start_fraction`` of the
run (0.25, project choice: the EMA teacher first needs supervised steps) and is weighted by
``unsup_weight`` (1, project choice). The term ``unsupervised`` is always in the loss dict
(0 while inactive) so logged curves have a value at every step.

Changes from the paper: the network is MGM-on-the-project-backbone (see mgm.py); the
self-training targets are the teacher's fused alpha (the paper's exact pseudo-label filtering
is not specified in METHOD.md and is not reproduced).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from matting_core.compositing import composite, composite_two_instances, layer_two_instances
from matting_core.regions import mgm_guidance_mask
from matting_core.training import ema_update

from .common import optimise
from .mgm import (
    DEFAULT_TRAIN_BAND_RANGES,
    DEFAULT_WARMUP_FRACTION,
    MGMLoss,
    MGMNet,
    sample_band_widths,
    training_bands,
    weighted_output_loss,
)

__all__ = ["MGMWildLoss", "NATURAL_KEYS", "mgm_wild_train_step", "two_instance_sample"]

NATURAL_KEYS = ("natural_image", "natural_image_strong", "natural_mask")


def _float_image(name: str, x: np.ndarray, channels: int | None) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / np.float32(255.0)
    elif x.dtype.kind == "f":
        x = np.clip(x.astype(np.float32), 0.0, 1.0)
    else:
        raise ValueError(f"{name} must be uint8 or float in [0, 1], got {x.dtype}")
    if channels is None:
        if x.ndim == 3 and x.shape[2] == 1:
            x = x[..., 0]
        if x.ndim != 2:
            raise ValueError(f"{name} must be (H, W), got shape {x.shape}")
    elif x.ndim != 3 or x.shape[2] != channels:
        raise ValueError(f"{name} must be (H, W, {channels}), got shape {x.shape}")
    return x


def two_instance_sample(
    fg_front: np.ndarray,
    alpha_front: np.ndarray,
    fg_back: np.ndarray,
    alpha_back: np.ndarray,
    background: np.ndarray,
    rng: np.random.Generator,
    target: str | None = None,
    guidance: bool = True,
    **mask_options: Any,
) -> dict[str, Any]:
    """One MGM-in-the-wild training sample: two instances on a background, one is the target.

    Args:
        fg_front, fg_back, background: (H, W, 3) RGB, uint8 or float in [0, 1].
        alpha_front, alpha_back: (H, W), uint8 or float in [0, 1]. The caller places the two
            instances (e.g. crops of two different foregrounds at different positions).
        rng: randomness. Draw order: the target (``rng.random() < 0.5`` → front) unless
            ``target`` is given, then the guidance mask's draws.
        target: ``"front"`` / ``"back"`` to fix the target instead of drawing it.
        guidance: also make ``mask`` (mgm_guidance_mask of the visible alpha).
        mask_options: passed to :func:`matting_core.regions.mgm_guidance_mask`.

    Returns:
        ``{"image" (H,W,3), "alpha" (H,W) visible alpha of the target, "fg" (H,W,3) its
        foreground, "bg" (H,W,3) the layer behind it, ["mask" (H,W) {0,1},] "target"}``,
        float32 in [0, 1], channel-last (the roles :func:`matting_core.training.make_views`
        resamples). ``image == alpha·fg + (1 − alpha)·bg`` up to float rounding.
    """
    fg_a = _float_image("fg_front", fg_front, 3)
    fg_b = _float_image("fg_back", fg_back, 3)
    bg = _float_image("background", background, 3)
    a_a = _float_image("alpha_front", alpha_front, None)
    a_b = _float_image("alpha_back", alpha_back, None)
    if target is None:
        target = "front" if rng.random() < 0.5 else "back"
    if target not in ("front", "back"):
        raise ValueError(f"target must be 'front' or 'back', got {target!r}")
    image, _ = composite_two_instances(fg_a, a_a, fg_b, a_b, bg)
    visible_front, visible_back, _ = layer_two_instances(a_a, a_b)
    if target == "front":
        alpha, fg = visible_front, fg_a
        behind = composite(fg_b, bg, a_b)
    else:
        alpha, fg = visible_back, fg_b
        rest = 1.0 - alpha[..., None]
        safe = rest > 1e-6
        behind = np.where(safe, (image - alpha[..., None] * fg_b) / np.where(safe, rest, 1.0), bg)
        behind = np.clip(behind, 0.0, 1.0)
    sample: dict[str, Any] = {
        "image": image.astype(np.float32),
        "alpha": alpha.astype(np.float32),
        "fg": fg.astype(np.float32),
        "bg": behind.astype(np.float32),
        "target": target,
    }
    if guidance:
        sample["mask"] = mgm_guidance_mask(sample["alpha"], rng, **mask_options)
    return sample


class MGMWildLoss(MGMLoss):
    """MGM's loss plus the EMA teacher and the self-training term (module doc).

    Args:
        model: the student :class:`~matting_core.methods.mgm.MGMNet`; the teacher starts as a
            deep copy (create the loss AFTER loading initial weights, or call
            :meth:`reset_teacher`).
        ema_momentum: m of the EMA update (0.999).
        unsup_weight: λ of the self-training term (1.0).
        unsup_start_fraction: self-training starts at this fraction of the run (0.25).
        warmup_fraction, band_width_ranges: as :class:`~matting_core.methods.mgm.MGMLoss`.

    The teacher is a submodule (saved with the loss module's state dict, so a resumed run
    restores it) whose parameters never require gradients and which always stays in eval mode.
    """

    def __init__(
        self,
        model: nn.Module,
        ema_momentum: float = 0.999,
        unsup_weight: float = 1.0,
        unsup_start_fraction: float = 0.25,
        warmup_fraction: float = DEFAULT_WARMUP_FRACTION,
        band_width_ranges: Sequence[Sequence[int]] = DEFAULT_TRAIN_BAND_RANGES,
    ) -> None:
        super().__init__(warmup_fraction, band_width_ranges)
        if not 0.0 <= float(ema_momentum) <= 1.0:
            raise ValueError(f"ema_momentum must be in [0, 1], got {ema_momentum}")
        self.ema_momentum = float(ema_momentum)
        self.unsup_weight = float(unsup_weight)
        self.unsup_start_fraction = float(unsup_start_fraction)
        self.teacher = copy.deepcopy(model)
        self.reset_teacher(model)

    def reset_teacher(self, model: nn.Module) -> None:
        """Copy the student's weights into the teacher (and freeze it)."""
        self.teacher.load_state_dict(model.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()

    def train(self, mode: bool = True) -> MGMWildLoss:
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def teacher_alpha(self, image_weak: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The teacher's fused alpha (test band widths) on the weak view: (N,1,H,W) in [0,1]."""
        self.teacher.eval()
        return self.teacher(image_weak, mask)["alpha"].float()

    def update_teacher(self, model: nn.Module) -> None:
        """θ_t ← m·θ_t + (1 − m)·θ_s (parameters and BN statistics)."""
        ema_update(self.teacher, model, self.ema_momentum)

    def self_training_active(self, batch: Mapping[str, torch.Tensor], step: int, total_steps: int) -> bool:
        return all(k in batch for k in NATURAL_KEYS) and step >= self.unsup_start_fraction * total_steps

    def forward(  # type: ignore[override]
        self,
        pred: Mapping[str, Any],
        batch: Mapping[str, torch.Tensor],
        bands: tuple[torch.Tensor, torch.Tensor] | None = None,
        natural_pred: Mapping[str, torch.Tensor] | None = None,
        teacher_alpha: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Supervised MGM terms on ``pred``; plus ``unsupervised`` when natural_pred is given.

        Returns MGM's terms (``os8``, ``os4``, ``os1``, ``l1``, ...), ``supervised`` (their
        total), ``unsupervised`` (0 when inactive) and ``total`` = supervised + λ·unsupervised.
        """
        terms = super().forward(pred, batch, bands)
        terms["supervised"] = terms.pop("total")
        if natural_pred is not None and teacher_alpha is not None:
            unsup = weighted_output_loss(natural_pred, teacher_alpha.detach())["total"]
        else:
            unsup = terms["supervised"].new_zeros(())
        terms["unsupervised"] = unsup
        terms["total"] = terms["supervised"] + self.unsup_weight * unsup
        return terms


def mgm_wild_train_step(
    model: MGMNet,
    loss_module: MGMWildLoss,
    batch: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator | None = None,
    step: int = 0,
    total_steps: int = 1,
    **amp: Any,
) -> dict[str, torch.Tensor]:
    """One MGM-in-the-wild step: supervised instance composites (+ self-training), EMA update.

    Randomness from ``generator`` (None → seeded with ``step``), in order: the supervised band
    widths and warm-up coin (:func:`~matting_core.methods.mgm.training_bands`), then — when
    self-training is active — the student's natural-view band widths.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(int(step))
    widths, bands = training_bands(loss_module, batch["alpha"], generator, step, total_steps)
    natural = loss_module.self_training_active(batch, step, total_steps)
    teacher_alpha = None
    natural_widths = None
    if natural:
        teacher_alpha = loss_module.teacher_alpha(batch["natural_image"], batch["natural_mask"])
        natural_widths = sample_band_widths(
            batch["natural_image"].shape[0], generator, loss_module.band_width_ranges
        )
    model.train()

    def forward() -> dict[str, Any]:
        out: dict[str, Any] = {"sup": model(batch["image"], batch["mask"], band_widths=widths)}
        if natural:
            out["natural"] = model(batch["natural_image_strong"], batch["natural_mask"], band_widths=natural_widths)
        return out

    terms = optimise(
        optimizer,
        forward,
        lambda pred: loss_module(pred["sup"], batch, bands, pred.get("natural"), teacher_alpha),
        device_type=batch["image"].device.type,
        **amp,
    )
    loss_module.update_teacher(model)
    return terms
