"""Test-time inference: resize, predict, resize back (METHOD.md §1 "Test time").

    image (H, W, 3) → resize so min(h, w) = short_side → network → alpha (h, w)
                    → resize back to (H, W) → clip to [0, 1]

Shrinking uses ``cv2.INTER_AREA`` (no aliasing), enlarging ``cv2.INTER_LINEAR``; the alpha
goes back with ``cv2.INTER_LINEAR``. The network pads to its own multiple internally, so any
size works. :func:`cutout_over` puts the predicted foreground over a new background.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import nn

__all__ = [
    "composite_rows", "cover_background", "cutout_over", "fit_cover", "predict_alpha", "predict_lowres",
    "predict_outputs", "resize_short_side", "row_bands", "upsample_rows",
]


def resize_short_side(image: np.ndarray, short_side: int) -> np.ndarray:
    """Resize ``(H, W[, C])`` so that ``min(H, W) == short_side`` (aspect kept, sides ≥ 1)."""
    if short_side < 1:
        raise ValueError(f"short_side must be >= 1, got {short_side}")
    height, width = image.shape[:2]
    scale = short_side / min(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    if (new_h, new_w) == (height, width):
        return image
    flag = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    return cv2.resize(image, (new_w, new_h), interpolation=flag)


def _as_float_rgb(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be an (H, W, 3) RGB array, got {getattr(image, 'shape', type(image))}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) * np.float32(1.0 / 255.0)
    if image.dtype.kind == "f":
        return np.clip(image.astype(np.float32), 0.0, 1.0)
    raise ValueError(f"image must be uint8 or float in [0, 1], got {image.dtype}")


def predict_alpha(
    model: nn.Module,
    image: np.ndarray,
    short_side: int | None = 512,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Predict the alpha matte of one image at the test-time scale.

    Args:
        model: a matting network (``forward(image (N,3,H,W) in [0,1]) → {"alpha": (N,1,H,W)}``).
            It runs in eval mode (its mode is restored afterwards), without gradients.
        image: ``(H, W, 3)`` RGB, uint8 in [0, 255] or float in [0, 1].
        short_side: the network sees the image resized so its shorter side is this many
            pixels (512, confirmed); ``None`` = native size.
        device: where to run (default: the model's device).

    Returns:
        ``(H, W)`` float32 alpha in [0, 1], the input's size.
    """
    return predict_outputs(model, image, short_side, device, beta=False)["alpha"]


def predict_outputs(
    model: nn.Module,
    image: np.ndarray,
    short_side: int | None = 512,
    device: torch.device | str | None = None,
    beta: bool = True,
) -> dict[str, np.ndarray]:
    """:func:`predict_alpha`, plus (with ``beta``) ``beta`` = sigmoid(boundary logits)
    ``(H, W)`` float32 in [0, 1] when the network has a boundary head (the MLB networks),
    same resizing."""
    height, width = image.shape[:2]
    maps = predict_lowres(model, image, short_side, device, beta)
    return {name: upsample_rows(value, (height, width)) for name, value in maps.items()}


def predict_lowres(
    model: nn.Module,
    image: np.ndarray,
    short_side: int | None = 512,
    device: torch.device | str | None = None,
    beta: bool = False,
) -> dict[str, np.ndarray]:
    """The network's maps at the test-time scale, before resizing back: ``alpha`` (and
    ``beta``), ``(h, w)`` float32. Only the small resized copy of ``image`` is converted to
    float, so a huge photo costs its own bytes and no more (:func:`upsample_rows` brings the
    maps back to full size a band of rows at a time)."""
    net_input = image if short_side is None else resize_short_side(image, int(short_side))
    x = _as_float_rgb(net_input)
    if device is None:
        device = next(model.parameters()).device
    tensor = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = model(tensor)
            maps = {"alpha": out["alpha"][0, 0].float().cpu().numpy()}
            if beta and "boundary_logits" in out:
                maps["beta"] = torch.sigmoid(out["boundary_logits"][0, 0].float()).cpu().numpy()
    finally:
        model.train(was_training)
    return maps


def _linear_taps(size_in: int, size_out: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps of output positions ``start..stop-1`` (half-pixel centres, edges clamped,
    as ``cv2.resize(..., INTER_LINEAR)``): first index, second index, weight of the second."""
    pos = (np.arange(start, stop, dtype=np.float64) + 0.5) * (size_in / size_out) - 0.5
    pos = np.clip(pos, 0.0, size_in - 1)
    first = np.floor(pos).astype(np.intp)
    second = np.minimum(first + 1, size_in - 1)
    return first, second, (pos - first).astype(np.float32)


def upsample_rows(low: np.ndarray, size_hw: tuple[int, int], start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows ``start..stop-1`` of ``low`` (h, w) resized bilinearly to ``size_hw``, clipped to
    [0, 1], float32 ``(stop - start, W)``. Computed per output row from the small map, so a
    band costs only its own pixels; any split into bands gives the same values."""
    height, width = int(size_hw[0]), int(size_hw[1])
    stop = height if stop is None else stop
    low = np.asarray(low, dtype=np.float32)
    if low.shape == (height, width):
        return np.clip(low[start:stop], 0.0, 1.0)
    y0, y1, wy = _linear_taps(low.shape[0], height, start, stop)
    x0, x1, wx = _linear_taps(low.shape[1], width, 0, width)
    rows = low[y0] * (1.0 - wy)[:, None] + low[y1] * wy[:, None]
    out = rows[:, x0] * (1.0 - wx) + rows[:, x1] * wx
    return np.clip(out, 0.0, 1.0, out=out)


def row_bands(height: int, rows: int = 256):
    """``(start, stop)`` bands of ``rows`` rows covering ``0..height``."""
    for start in range(0, height, rows):
        yield start, min(height, start + rows)


def fit_cover(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Scale ``image`` to cover ``size_hw`` (aspect kept), then crop the centre to exactly that size."""
    out_h, out_w = int(size_hw[0]), int(size_hw[1])
    in_h, in_w = image.shape[:2]
    scale = max(out_h / in_h, out_w / in_w)
    new_h, new_w = max(out_h, round(in_h * scale)), max(out_w, round(in_w * scale))
    flag = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=flag) if (new_h, new_w) != (in_h, in_w) else image
    top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    return np.ascontiguousarray(resized[top : top + out_h, left : left + out_w])


def cutout_over(image: np.ndarray, alpha: np.ndarray, background: np.ndarray | tuple[int, int, int]) -> np.ndarray:
    """The cut-out over a new background: ``round(α·I + (1 − α)·B)`` as uint8.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        alpha: ``(H, W)`` float in [0, 1].
        background: an RGB colour ``(r, g, b)`` in 0..255, or an ``(h, w, 3)`` uint8 image
            (fitted with :func:`fit_cover`).

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    height, width = image.shape[:2]
    if alpha.shape != (height, width):
        raise ValueError(f"alpha {alpha.shape} does not match image {image.shape[:2]}")
    bg = cover_background(background, (height, width))
    out = np.empty_like(image)
    for start, stop in row_bands(height):
        out[start:stop] = composite_rows(image[start:stop], alpha[start:stop], bg, start)
    return out


def cover_background(background: np.ndarray | tuple[int, int, int], size_hw: tuple[int, int]):
    """A background for :func:`composite_rows`: an image fitted to ``size_hw`` (uint8), or
    the colour as a checked ``(r, g, b)`` tuple (never expanded to a full image)."""
    if isinstance(background, np.ndarray) and background.ndim == 3:
        return fit_cover(background, size_hw)
    colour = np.asarray(background, dtype=np.float32).reshape(-1)
    if colour.shape != (3,) or colour.min() < 0 or colour.max() > 255:
        raise ValueError(f"background colour must be 3 values in 0..255, got {background!r}")
    return tuple(float(c) for c in colour)


def composite_rows(image: np.ndarray, alpha: np.ndarray, background, start: int = 0) -> np.ndarray:
    """``round(α·I + (1 − α)·B)`` of the band of rows starting at row ``start`` as uint8 RGB;
    ``background``: :func:`cover_background`'s full-size fitted image or ``(r, g, b)`` tuple."""
    a = np.clip(alpha, 0.0, 1.0)[..., None]
    if not isinstance(background, tuple):
        background = background[start:start + len(image)]
    bg = np.asarray(background, dtype=np.float32)
    out = a * image.astype(np.float32) + (1.0 - a) * bg
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
