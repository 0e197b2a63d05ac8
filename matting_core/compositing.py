"""Alpha compositing: the image-formation model of matting.

    I = alpha * F + (1 - alpha) * B

Conventions
- numpy images are channel-last: foreground/background ``(H, W, C)`` (C = 3 for RGB),
  alpha ``(H, W)`` or ``(H, W, 1)``.
- torch images are channel-first: ``(N, C, H, W)`` with alpha ``(N, 1, H, W)``, or the
  unbatched ``(C, H, W)`` with alpha ``(1, H, W)``.
- All values are floats in [0, 1]. Results keep the foreground's type and dtype.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from matting_core._validate import (
    ArrayOrTensor,
    check_float_dtype,
    check_ndim,
    check_same_kind,
    check_same_shape,
    check_unit_range,
    is_tensor,
)

__all__ = [
    "composite",
    "composite_two_instances",
    "fit_background",
    "layer_two_instances",
]


def _check_image_alpha(
    foreground: ArrayOrTensor, background: ArrayOrTensor, alpha: ArrayOrTensor
) -> bool:
    """Validate a (foreground, background, alpha) triple; return True for torch."""
    use_torch = check_same_kind(foreground=foreground, background=background, alpha=alpha)
    check_same_shape(foreground=foreground, background=background)
    for name, x in (("foreground", foreground), ("background", background), ("alpha", alpha)):
        check_unit_range(name, x)
    fg_shape = tuple(foreground.shape)
    a_shape = tuple(alpha.shape)
    if use_torch:
        check_ndim("foreground", foreground, (3, 4))
        expected = fg_shape[:-3] + (1,) + fg_shape[-2:]
        if a_shape != expected:
            raise ValueError(
                f"alpha must have shape {expected} to match foreground {fg_shape} "
                f"(channel-first, one alpha channel); got {a_shape}"
            )
    else:
        check_ndim("foreground", foreground, 3)
        if a_shape not in (fg_shape[:2], fg_shape[:2] + (1,)):
            raise ValueError(
                f"alpha must have shape {fg_shape[:2]} or {fg_shape[:2] + (1,)} to match "
                f"foreground {fg_shape} (channel-last); got {a_shape}"
            )
    return use_torch


def composite(
    foreground: ArrayOrTensor, background: ArrayOrTensor, alpha: ArrayOrTensor
) -> ArrayOrTensor:
    """Composite a foreground over a background: ``I = alpha*F + (1 - alpha)*B``.

    Args:
        foreground: F. numpy ``(H, W, C)`` or torch ``(N, C, H, W)`` / ``(C, H, W)``,
            float in [0, 1].
        background: B, same shape and kind as ``foreground``, float in [0, 1].
        alpha: numpy ``(H, W)`` or ``(H, W, 1)``; torch ``(N, 1, H, W)`` / ``(1, H, W)``;
            float in [0, 1].

    Returns:
        I with the shape, type and dtype of ``foreground``, in [0, 1].

    Example:
        >>> F = np.ones((1, 1, 3)); B = np.zeros((1, 1, 3))
        >>> composite(F, B, np.full((1, 1), 0.25))[0, 0].tolist()
        [0.25, 0.25, 0.25]
    """
    use_torch = _check_image_alpha(foreground, background, alpha)
    if use_torch:
        a = alpha.to(foreground.dtype)
        return a * foreground + (1 - a) * background.to(foreground.dtype)
    a = alpha if alpha.ndim == 3 else alpha[..., None]
    image = a * foreground + (1.0 - a) * background
    return image.astype(foreground.dtype, copy=False)


def layer_two_instances(
    alpha_front: ArrayOrTensor, alpha_back: ArrayOrTensor
) -> tuple[ArrayOrTensor, ArrayOrTensor, ArrayOrTensor]:
    """Visible alphas of two layered instances, A (front) over B (back).

        visible_front = alpha_A
        visible_back  = alpha_B * (1 - alpha_A)
        union         = alpha_A + alpha_B * (1 - alpha_A)

    ``visible_front + visible_back == union`` and all three stay in [0, 1].

    Args:
        alpha_front: alpha_A, any shape, float in [0, 1] (numpy or torch).
        alpha_back: alpha_B, same shape and kind.

    Returns:
        ``(visible_front, visible_back, union)``, fresh arrays/tensors of the input
        shape (``visible_front`` is a copy of ``alpha_front``).
    """
    use_torch = check_same_kind(alpha_front=alpha_front, alpha_back=alpha_back)
    check_same_shape(alpha_front=alpha_front, alpha_back=alpha_back)
    check_unit_range("alpha_front", alpha_front)
    check_unit_range("alpha_back", alpha_back)
    visible_back = alpha_back * (1 - alpha_front)
    union = alpha_front + visible_back
    visible_front = alpha_front.clone() if use_torch else alpha_front.copy()
    return visible_front, visible_back, union


def composite_two_instances(
    fg_front: ArrayOrTensor,
    alpha_front: ArrayOrTensor,
    fg_back: ArrayOrTensor,
    alpha_back: ArrayOrTensor,
    background: ArrayOrTensor,
) -> tuple[ArrayOrTensor, ArrayOrTensor]:
    """Layer two foregrounds over one background (MGM "in the wild").

    First B over the background, then A over that:

        I = alpha_A*F_A + (1 - alpha_A) * (alpha_B*F_B + (1 - alpha_B)*Bg)

    Args:
        fg_front, fg_back, background: images, shapes/kinds as in :func:`composite`.
        alpha_front, alpha_back: their alphas, shapes as in :func:`composite`.

    Returns:
        ``(image, union_alpha)``: the composited image (like ``fg_front``) and
        ``alpha_A + alpha_B*(1 - alpha_A)`` (like ``alpha_front``).
    """
    check_same_shape(alpha_front=alpha_front, alpha_back=alpha_back)
    behind = composite(fg_back, background, alpha_back)
    image = composite(fg_front, behind, alpha_front)
    _, _, union = layer_two_instances(alpha_front, alpha_back)
    return image, union


def fit_background(
    background: np.ndarray,
    size_hw: tuple[int, int],
    rng: np.random.Generator,
    scale_range: tuple[float, float] = (1.0, 1.5),
) -> np.ndarray:
    """Resize a background to cover ``size_hw`` (times a random scale), then crop.

    The cover scale is ``s0 = max(H / h, W / w)``; the image is resized by
    ``s = s0 * u`` with ``u ~ U(scale_range)`` (cv2.INTER_AREA when shrinking,
    cv2.INTER_LINEAR when enlarging), then a uniformly random ``(H, W)`` window is cut.
    Draw order from ``rng``: ``u``, crop top, crop left.

    Args:
        background: ``(h, w)`` or ``(h, w, C)``, uint8 in [0, 255] or float in [0, 1].
        size_hw: target ``(H, W)``, positive ints.
        rng: source of randomness.
        scale_range: ``(lo, hi)`` with ``0 < lo <= hi``; ``lo >= 1`` keeps the crop
            inside the image without upsampling past the cover size.

    Returns:
        ``(H, W)`` or ``(H, W, C)`` array of ``background``'s dtype (contiguous copy).
    """
    if not isinstance(background, np.ndarray):
        raise ValueError(f"background must be a numpy array, got {type(background).__name__}")
    check_ndim("background", background, (2, 3))
    if background.dtype == np.uint8:
        pass
    elif background.dtype in (np.float32, np.float64):
        check_unit_range("background", background)
    else:
        raise ValueError(
            f"background must be uint8 or float32/float64, got {background.dtype}"
        )
    if background.shape[0] < 1 or background.shape[1] < 1:
        raise ValueError(f"background must be non-empty, got shape {background.shape}")
    if (
        len(size_hw) != 2
        or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size_hw)
    ):
        raise ValueError(f"size_hw must be two positive ints (H, W), got {size_hw!r}")
    lo, hi = (float(v) for v in scale_range)
    if not (0.0 < lo <= hi and math.isfinite(hi)):
        raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {scale_range!r}")

    out_h, out_w = int(size_hw[0]), int(size_hw[1])
    in_h, in_w = background.shape[:2]
    scale = max(out_h / in_h, out_w / in_w) * rng.uniform(lo, hi)
    new_h = max(out_h, int(math.ceil(in_h * scale - 1e-9)))
    new_w = max(out_w, int(math.ceil(in_w * scale - 1e-9)))
    resized = background
    if (new_h, new_w) != (in_h, in_w):
        interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
        resized = cv2.resize(background, (new_w, new_h), interpolation=interp)
        if background.ndim == 3 and resized.ndim == 2:  # cv2 drops a single channel
            resized = resized[..., None]
        if resized.dtype.kind == "f":  # linear interpolation can overshoot by an ulp
            np.clip(resized, 0.0, 1.0, out=resized)
    top = int(rng.integers(0, new_h - out_h + 1))
    left = int(rng.integers(0, new_w - out_w + 1))
    return np.ascontiguousarray(resized[top : top + out_h, left : left + out_w])
