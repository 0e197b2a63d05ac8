"""Offline Matte Label Blending on numpy images: the per-batch label function.

The ``pseudolabel`` stage (one Ray actor per teacher copy) and any plain loop call
:func:`label_images` on decoded samples; it runs the frozen teacher on the *weak view* and
blends with the segmentation label through :func:`matting_core.training.mlb_labels`, the
same function the student uses for in-process labels, so both label paths agree::

    alpha'_t, b'_t = teacher(weak view)
    beta = sigmoid(b'_t)
    M~ = beta * alpha'_t + (1 - beta) * S            (soft; "hard" binarises beta at 0.5)

Weak view (project choice): the image exactly as stored, at its own size, no augmentation
(:func:`weak_view`). The network pads to its stride internally and crops back, so any
``H x W`` is labelled at full resolution. Images of different sizes are batched by size.

Example::

    >>> from matting_core.models import build_network
    >>> teacher = build_network("unet_r18x0.25").eval()
    >>> out = label_images(teacher, [np.zeros((40, 50, 3), np.uint8)], [np.ones((40, 50), np.float32)])
    >>> sorted(out[0]), out[0]["blended"].shape
    (['blended', 'teacher_alpha', 'teacher_boundary'], (40, 50))
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from matting_core.training import mlb_labels

__all__ = ["LABEL_ROLES", "weak_view", "label_images"]

LABEL_ROLES = ("teacher_alpha", "teacher_boundary", "blended")


def weak_view(image: np.ndarray) -> np.ndarray:
    """The teacher's view of a stored image: ``(H, W, 3) uint8`` -> ``(3, H, W) float32`` in [0, 1].

    No augmentation, no resize (project choice: the offline labels belong to the stored
    image, so the student can crop/flip image and label together later).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    # the float32 conversion copies, so read-only (Ray / mmap) buffers never reach torch
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)


def label_images(
    teacher: nn.Module,
    images: Sequence[np.ndarray],
    seg_masks: Sequence[np.ndarray],
    mode: str = "soft",
    dilate: int = 0,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    max_batch: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """Teacher matte, boundary probability and blended label for each image.

    Args:
        teacher: frozen matting network on ``device`` (``forward -> {"alpha", "boundary_logits"}``).
        images: ``N`` RGB images, each ``(H_i, W_i, 3) uint8`` (sizes may differ).
        seg_masks: ``N`` segmentation labels S, each ``(H_i, W_i)`` float in {0, 1}
            (or soft, in [0, 1]).
        mode, dilate: blending options of :func:`matting_core.blending.blend_labels`.
        device: where the teacher runs.
        autocast_dtype: CUDA mixed precision for the teacher forward (None = float32).
        max_batch: most images per forward pass (None = all images of one size at once).

    Returns:
        ``N`` dicts (input order) with ``teacher_alpha`` (alpha'_t), ``teacher_boundary``
        (beta = sigmoid(b'_t)) and ``blended`` (M~), each ``(H_i, W_i) float32`` in [0, 1].

    Raises:
        ValueError: mismatched lengths, a mask whose size differs from its image, or a
            non-RGB-uint8 image.
    """
    if len(images) != len(seg_masks):
        raise ValueError(f"got {len(images)} images but {len(seg_masks)} seg masks")
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (image, mask) in enumerate(zip(images, seg_masks)):
        size = tuple(np.shape(image)[:2])
        if tuple(np.shape(mask)) != size:
            raise ValueError(f"sample {i}: seg mask {np.shape(mask)} does not match image {np.shape(image)}")
        groups.setdefault(size, []).append(i)
    device = torch.device(device)
    results: list[dict[str, np.ndarray] | None] = [None] * len(images)
    for indices in groups.values():
        step = len(indices) if max_batch is None else int(max_batch)
        for start in range(0, len(indices), step):
            chunk = indices[start : start + step]
            image_t = torch.from_numpy(np.stack([weak_view(images[i]) for i in chunk])).to(device)
            mask_t = torch.from_numpy(
                np.stack([np.asarray(seg_masks[i], dtype=np.float32)[None] for i in chunk])
            ).to(device)
            labels = mlb_labels(teacher, image_t, mask_t, mode=mode, dilate=dilate, autocast_dtype=autocast_dtype)
            arrays = {role: labels[role].float().clamp_(0.0, 1.0).cpu().numpy()[:, 0] for role in LABEL_ROLES}
            for j, i in enumerate(chunk):
                results[i] = {role: np.ascontiguousarray(arrays[role][j]) for role in LABEL_ROLES}
    return results  # type: ignore[return-value]
