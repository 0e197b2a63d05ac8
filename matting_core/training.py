"""Pure pieces of the three training steps (METHOD.md §1): views, labels, EMA, schedule, step.

Nothing here knows a file path or a params.yaml key; ``matting_pipeline/trainer.py`` wires these
into the resumable loop.

Views (one sample → the arrays one training example needs)
    :func:`make_views` draws ONE random geometry (scale, crop, flip) per sample and applies
    it to every role (image, alpha, mask, fg, bg, labels), so the weak view, the strong view
    and every target stay pixel-aligned. With ``strong=True`` it adds
    ``image_strong = strong_photometric(image_weak)`` (colour jitter, blur, noise, JPEG):
    the MLB student sees the strong view, its teacher the weak one.
    :func:`collate_views` stacks a list of views into ``(N, C, h, w)`` float32 tensors.

Labels (MLB)
    :func:`teacher_labels` — frozen teacher on the weak view → ``(α'_t, β = sigmoid(b'_t))``.
    :func:`mlb_labels` — the same plus ``M̃ = blend_labels(α'_t, β, S)``; the Ray
    pseudo-label stage and the in-process fallback of the student stage both call it, so
    offline and online labels are the same function.

EMA (online mode)
    :func:`ema_update` — ``θ_t ← m·θ_t + (1 − m)·θ_s``.

Schedule
    :func:`cosine_factor` / :func:`cosine_schedule` — ``lr(t) = lr₀·½(1 + cos(π·t/T))``.

Step
    :func:`train_step` — forward (optionally under autocast), loss dict, backward
    (optionally through a GradScaler), optimiser and scheduler step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from matting_core.augment import apply_geometry, sample_geometry, strong_photometric
from matting_core.blending import blend_labels

__all__ = [
    "INTERPOLATION",
    "collate_views",
    "cosine_factor",
    "cosine_schedule",
    "ema_update",
    "make_views",
    "mlb_labels",
    "sample_rng",
    "teacher_labels",
    "train_step",
]

# How each role is resampled by the shared geometry. Images and soft mattes are linear;
# the coarse segmentation mask stays binary (nearest), like the paper's coarse label S.
INTERPOLATION: dict[str, str] = {
    "image": "linear",
    "fg": "linear",
    "bg": "linear",
    "alpha": "linear",
    "teacher_alpha": "linear",
    "teacher_boundary": "linear",
    "blended": "linear",
    "mask": "nearest",
}


def sample_rng(seed: int, position: int) -> np.random.Generator:
    """The generator of the ``position``-th sample drawn in a run seeded ``seed``.

    Augmentation randomness is a pure function of ``(seed, position)``, not of a stream's
    history: a resumed run (or another number of loader workers) draws exactly the same
    views as an uninterrupted one.
    """
    return np.random.default_rng([int(seed), int(position)])


def _to_chw_float(name: str, array: np.ndarray) -> np.ndarray:
    """uint8 ``(h, w[, C])`` → float32 /255; float stays; then channel-first ``(C, h, w)``."""
    if array.dtype == np.uint8:
        out = array.astype(np.float32) * np.float32(1.0 / 255.0)
    elif array.dtype == np.uint16:
        out = array.astype(np.float32) * np.float32(1.0 / 65535.0)
    elif array.dtype.kind == "f":
        out = array.astype(np.float32, copy=False)
    else:
        raise ValueError(f"{name} must be uint8, uint16 or float, got {array.dtype}")
    out = np.clip(out, 0.0, 1.0)
    if out.ndim == 2:
        out = out[None]
    elif out.ndim == 3:
        out = out.transpose(2, 0, 1)
    else:
        raise ValueError(f"{name} must be (h, w) or (h, w, C), got shape {array.shape}")
    return np.ascontiguousarray(out)


def make_views(
    sample: Mapping[str, np.ndarray],
    rng: np.random.Generator,
    crop: int,
    scale_range: tuple[float, float],
    roles: Sequence[str] | None = None,
    strong: bool = False,
) -> dict[str, np.ndarray]:
    """One training example: the same random geometry applied to every role.

    Args:
        sample: ``{"image": (H, W, 3) uint8, role: (H, W) float32 in [0, 1] | (H, W, 3) uint8,
            ...}`` — e.g. the dict :func:`matting_pipeline.shards.iter_samples` yields. Roles not in
            ``roles`` are ignored.
        rng: the sample's generator (see :func:`sample_rng`). Draw order: the geometry
            (:func:`matting_core.augment.sample_geometry`), then, when ``strong``, the
            photometric draws (:func:`matting_core.augment.strong_photometric`).
        crop: side of the square output crop, px.
        scale_range: random rescale range ``(lo, hi)`` before cropping (multi-scale crops).
        roles: roles to keep besides ``image`` (default: every role in :data:`INTERPOLATION`
            present in ``sample``).
        strong: also return ``image_strong``, the strongly augmented copy of the weak view.

    Returns:
        ``{"image": (3, crop, crop), ["image_strong": (3, crop, crop),] role: (C, crop, crop)}``,
        all float32 in [0, 1], channel-first, contiguous. ``image`` is the weak view
        (geometry only).
    """
    if "image" not in sample:
        raise ValueError(f"sample has no 'image'; roles present: {sorted(sample)}")
    image = sample["image"]
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {image.shape}")
    if roles is None:
        roles = [r for r in INTERPOLATION if r != "image" and r in sample]
    unknown = [r for r in roles if r not in INTERPOLATION]
    if unknown:
        raise ValueError(f"unknown role(s) {unknown}; known roles: {', '.join(INTERPOLATION)}")
    missing = [r for r in roles if r not in sample]
    if missing:
        raise ValueError(f"sample lacks role(s) {missing}; it has {sorted(sample)}")
    height, width = image.shape[:2]
    for role in roles:
        if tuple(sample[role].shape[:2]) != (height, width):
            raise ValueError(
                f"{role} has size {tuple(sample[role].shape[:2])}, image has {(height, width)}"
            )

    geometry = sample_geometry(rng, (height, width), crop, scale_range)
    weak = apply_geometry(geometry, image, INTERPOLATION["image"])
    views = {"image": _to_chw_float("image", weak)}
    if strong:
        views["image_strong"] = _to_chw_float("image_strong", strong_photometric(weak, rng))
    for role in roles:
        if role == "image":
            continue
        views[role] = _to_chw_float(role, apply_geometry(geometry, sample[role], INTERPOLATION[role]))
    return views


def collate_views(views: Sequence[Mapping[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack views (same keys, same shapes) into ``{role: (N, C, h, w) float32 tensor}``."""
    if not views:
        raise ValueError("collate_views needs at least one view")
    keys = list(views[0])
    for i, v in enumerate(views):
        if list(v) != keys:
            raise ValueError(f"view {i} has roles {list(v)}, view 0 has {keys}")
    return {k: torch.from_numpy(np.stack([v[k] for v in views])) for k in keys}


# ------------------------------------------------------------------------------- labels


@torch.no_grad()
def teacher_labels(
    teacher: nn.Module, images_weak: torch.Tensor, autocast_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen-teacher prediction on the weak view.

    Args:
        teacher: a matting network (``forward → {"alpha", "boundary_logits"}``). It is run
            in eval mode (BatchNorm running statistics) and left in the mode it was in.
        images_weak: ``(N, 3, H, W)`` float in [0, 1] on the teacher's device.
        autocast_dtype: run the forward under ``torch.autocast`` with this dtype (CUDA AMP).

    Returns:
        ``(teacher_alpha α'_t, boundary_prob β = sigmoid(b'_t))``, both ``(N, 1, H, W)``
        float32 in [0, 1], without autograd history.
    """
    was_training = teacher.training
    teacher.eval()
    try:
        if autocast_dtype is not None:
            with torch.autocast(images_weak.device.type, dtype=autocast_dtype):
                out = teacher(images_weak)
        else:
            out = teacher(images_weak)
    finally:
        teacher.train(was_training)
    alpha = out["alpha"].float().clamp_(0.0, 1.0)
    boundary_prob = torch.sigmoid(out["boundary_logits"].float())
    return alpha, boundary_prob


def mlb_labels(
    teacher: nn.Module,
    images_weak: torch.Tensor,
    seg_mask: torch.Tensor,
    mode: str = "soft",
    dilate: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Matte Label Blending targets for a batch.

        α'_t, β = teacher(weak view);   M̃ = β ⊙ α'_t + (1 − β) ⊙ S   (soft mode)

    Args:
        teacher, images_weak, autocast_dtype: as :func:`teacher_labels`.
        seg_mask: S, ``(N, 1, H, W)`` float in {0, 1} (or soft), same device.
        mode, dilate: :func:`matting_core.blending.blend_labels` options.

    Returns:
        ``{"teacher_alpha", "teacher_boundary", "blended"}``, each ``(N, 1, H, W)`` float32.
    """
    alpha, boundary_prob = teacher_labels(teacher, images_weak, autocast_dtype)
    blended = blend_labels(alpha, boundary_prob, seg_mask.to(alpha.dtype), mode=mode, dilate=dilate)
    return {"teacher_alpha": alpha, "teacher_boundary": boundary_prob, "blended": blended}


# --------------------------------------------------------------------------------- EMA


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """Exponential moving average, in place: ``θ_t ← m·θ_t + (1 − m)·θ_s``.

    Applied to every parameter and every floating buffer (BatchNorm running mean/var), so
    the teacher's normalisation statistics follow the student's the same way; integer
    buffers (``num_batches_tracked``) are copied.

    Args:
        teacher, student: modules with identical state-dict keys and shapes.
        momentum: m in [0, 1] (1 keeps the teacher, 0 copies the student).

    Raises:
        ValueError: momentum out of range, or the two modules differ in architecture.
    """
    m = float(momentum)
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    t_state = teacher.state_dict(keep_vars=True)
    s_state = student.state_dict(keep_vars=True)
    if t_state.keys() != s_state.keys():
        only_t = sorted(set(t_state) - set(s_state))[:3]
        only_s = sorted(set(s_state) - set(t_state))[:3]
        raise ValueError(
            f"EMA needs the same architecture: teacher-only keys {only_t}, student-only keys {only_s}"
        )
    for key, t in t_state.items():
        s = s_state[key]
        if t.shape != s.shape:
            raise ValueError(f"EMA needs the same architecture: {key} is {tuple(t.shape)} vs {tuple(s.shape)}")
        if t.dtype.is_floating_point:
            t.data.mul_(m).add_(s.data.to(t.dtype), alpha=1.0 - m)
        else:
            t.data.copy_(s.data)


# ----------------------------------------------------------------------------- schedule


def cosine_factor(step: int, total_steps: int, final_factor: float = 0.0) -> float:
    """Cosine decay multiplier: ``f + (1 − f)·½(1 + cos(π·min(t, T)/T))``.

    1 at ``t = 0``, ``final_factor`` at ``t = T`` and after.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    t = min(max(int(step), 0), int(total_steps))
    return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * t / total_steps))


def cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, final_factor: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` with :func:`cosine_factor` (step it once per optimiser step)."""
    cosine_factor(0, total_steps, final_factor)  # validates
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_factor(step, total_steps, final_factor)
    )


# --------------------------------------------------------------------------------- step


def backward_and_step(
    total: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    scheduler: Any | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Backward ``total`` (scaled when an AMP ``scaler`` is given), optimiser step, then the
    scheduler step. Shared by every training step (MLB and the related methods)."""
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        total.backward()
        optimizer.step()
    if scheduler is not None:
        scheduler.step()


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Mapping[str, torch.Tensor],
    objective: Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], dict[str, torch.Tensor]],
    *,
    input_key: str = "image",
    scheduler: Any | None = None,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """One optimisation step.

    ``pred = model(batch[input_key])`` (under ``torch.autocast`` when ``autocast_dtype`` is
    given); the objective sees the prediction cast to float32, so losses are computed in
    full precision: ``terms = objective(pred, batch)`` with a ``total`` key. Then backward
    (scaled when ``scaler`` is given), optimiser step, scheduler step.

    Returns:
        The loss terms, detached (0-dim tensors on the model's device; convert when logging
        to avoid a device sync per step; the caller checks finiteness when it logs).
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    images = batch[input_key]
    if autocast_dtype is not None:
        with torch.autocast(images.device.type, dtype=autocast_dtype):
            pred = model(images)
    else:
        pred = model(images)
    pred = {k: v.float() for k, v in pred.items()}
    terms = objective(pred, batch)
    backward_and_step(terms["total"], optimizer, scheduler=scheduler, scaler=scaler)
    return {k: v.detach() for k, v in terms.items()}
