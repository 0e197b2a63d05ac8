"""Matte Label Blending (MLB): the student's training label.

    M~ = beta * alpha_t + (1 - beta) * S

alpha_t is the frozen teacher's matte, S the coarse segmentation label and beta the
teacher's boundary probability sigmoid(b'_t). Where the teacher sees fine boundary
detail (beta -> 1) the label keeps its matte; elsewhere (beta -> 0) it trusts S, which
removes the teacher's false foreground/background blobs on natural photos.

Modes (project choice, see params.yaml ``train.student.blend``):
- ``"soft"`` (default): beta = boundary_prob.
- ``"hard"``: beta = 1[boundary_prob >= 0.5], optionally dilated by a
  ``(2*dilate + 1)`` square so the matte is kept a little beyond the predicted band.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

from matting_core._validate import (
    ArrayOrTensor,
    check_choice,
    check_ndim,
    check_same_kind,
    check_same_shape,
    check_unit_range,
)

if TYPE_CHECKING:
    import torch

__all__ = ["BLEND_MODES", "blend_labels"]

BLEND_MODES = ("soft", "hard")
_HARD_THRESHOLD = 0.5


def blend_labels(
    teacher_alpha: ArrayOrTensor,
    boundary_prob: ArrayOrTensor,
    seg_mask: ArrayOrTensor,
    mode: str = "soft",
    dilate: int = 0,
) -> ArrayOrTensor:
    """Blend the teacher's matte with the segmentation label by boundary probability.

        M~ = beta * teacher_alpha + (1 - beta) * seg_mask
        beta = boundary_prob                                   (mode "soft")
        beta = dilate_{(2d+1) square}(1[boundary_prob >= 0.5])  (mode "hard")

    M~ lies between seg_mask and teacher_alpha at every pixel, so it stays in [0, 1].

    Args:
        teacher_alpha: alpha'_t, ``(H, W)`` or ``(N, 1, H, W)``, float in [0, 1].
        boundary_prob: sigmoid(b'_t), same shape, float in [0, 1].
        seg_mask: S, same shape, float in [0, 1] ({0, 1} or soft).
        mode: ``"soft"`` or ``"hard"``.
        dilate: radius ``d >= 0`` of the square dilation of the hard beta
            (``"hard"`` mode only).

    Returns:
        M~ as float32, same shape and type as the inputs (numpy array, or torch tensor
        on the inputs' device without autograd history: it is a training target).

    Raises:
        ValueError: unknown mode, ``dilate > 0`` with ``mode="soft"``, negative
            ``dilate``, or mismatched / out-of-range / non-float inputs.

    Example:
        >>> t = np.array([[0.5, 0.5]]); s = np.array([[1.0, 1.0]]); b = np.array([[1.0, 0.25]])
        >>> blend_labels(t, b, s).tolist()
        [[0.5, 0.875]]
    """
    check_choice("mode", mode, BLEND_MODES)
    if not isinstance(dilate, (int, np.integer)) or isinstance(dilate, bool) or dilate < 0:
        raise ValueError(f"dilate must be an int >= 0, got {dilate!r}")
    if dilate > 0 and mode == "soft":
        raise ValueError(
            "dilate > 0 needs mode='hard': dilation is defined on the binary beta "
            "(boundary_prob >= 0.5); a soft beta would have to be binarised first"
        )
    use_torch = check_same_kind(
        teacher_alpha=teacher_alpha, boundary_prob=boundary_prob, seg_mask=seg_mask
    )
    check_same_shape(teacher_alpha=teacher_alpha, boundary_prob=boundary_prob, seg_mask=seg_mask)
    check_ndim("teacher_alpha", teacher_alpha, (2, 4))
    if teacher_alpha.ndim == 4 and teacher_alpha.shape[1] != 1:
        raise ValueError(
            f"teacher_alpha must have shape (H, W) or (N, 1, H, W), got {tuple(teacher_alpha.shape)}"
        )
    check_unit_range("teacher_alpha", teacher_alpha)
    check_unit_range("boundary_prob", boundary_prob)
    check_unit_range("seg_mask", seg_mask)
    if use_torch:
        return _blend_torch(teacher_alpha, boundary_prob, seg_mask, mode, int(dilate))
    return _blend_numpy(teacher_alpha, boundary_prob, seg_mask, mode, int(dilate))


def _blend_numpy(
    teacher_alpha: np.ndarray, boundary_prob: np.ndarray, seg_mask: np.ndarray, mode: str, dilate: int
) -> np.ndarray:
    teacher = teacher_alpha.astype(np.float32, copy=False)
    seg = seg_mask.astype(np.float32, copy=False)
    if mode == "soft":
        beta = boundary_prob.astype(np.float32, copy=False)
    else:
        hard = (boundary_prob >= _HARD_THRESHOLD).view(np.uint8)
        if dilate > 0:
            kernel = np.ones((2 * dilate + 1, 2 * dilate + 1), np.uint8)
            if hard.ndim == 2:
                hard = cv2.dilate(hard, kernel)
            else:
                hard = np.stack([cv2.dilate(h[0], kernel)[None] for h in hard])
        beta = hard.astype(np.float32)
    return beta * teacher + (np.float32(1.0) - beta) * seg


def _blend_torch(
    teacher_alpha: torch.Tensor,
    boundary_prob: torch.Tensor,
    seg_mask: torch.Tensor,
    mode: str,
    dilate: int,
) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        teacher = teacher_alpha.detach().to(torch.float32)
        seg = seg_mask.detach().to(torch.float32)
        prob = boundary_prob.detach()
        if mode == "soft":
            beta = prob.to(torch.float32)
        else:
            beta = (prob >= _HARD_THRESHOLD).to(torch.float32)
            if dilate > 0:
                batched = beta if beta.ndim == 4 else beta[None, None]
                batched = F.max_pool2d(batched, kernel_size=2 * dilate + 1, stride=1, padding=dilate)
                beta = batched if beta.ndim == 4 else batched[0, 0]
        return beta * teacher + (1.0 - beta) * seg
