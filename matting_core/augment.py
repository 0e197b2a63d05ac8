"""Data augmentation for matting: shared geometry, weak and strong views (METHOD.md §1).

Everything here is numpy + OpenCV on channel-last arrays, randomness only from an explicit
``np.random.Generator``. The split into *sampling* and *applying* is what keeps views and
labels aligned: draw one :class:`Geometry`, then apply it to the image, alpha, seg mask,
foreground and background alike.

Geometry (the "weak view" is geometry only) — project choices, see ``sample_geometry``:

1. random scale s ~ U(scale_range), default (0.75, 1.5): the image is (conceptually) resized
   by s;
2. multi-scale crop: a window of m × crop output pixels is cut from the scaled image, with
   m drawn uniformly from ``crop_multipliers`` (default (1.0, 1.5, 2.0), DIM/MGM style:
   crops of 1×, 1.5× and 2× the output size), and resized to ``crop`` — so in source pixels
   the window is ``crop · m / s``. A window larger than the image is shrunk (both sides by
   the same factor, aspect kept) to fit: no padding is ever invented;
3. horizontal flip with probability ``flip_prob`` (default 0.5).
Applying it is one integer crop, one ``cv2.resize`` and an optional flip: linear
interpolation for images/alpha/fg/bg (``cv2.INTER_AREA`` when shrinking, to avoid aliasing;
``cv2.INTER_LINEAR`` when enlarging), ``cv2.INTER_NEAREST_EXACT`` for masks/trimaps (keeps
their label values; pixel-centre aligned like the linear modes).

Strong photometric view (``strong_photometric``; the student's input, never the labels) —
applied in this order, defaults in :class:`PhotometricParams`:

1. colour jitter, always, in a random order of the four ops (torchvision ``ColorJitter``
   semantics): brightness factor ∈ [0.6, 1.4] (x·f), contrast ∈ [0.6, 1.4] (blend with the
   mean luma), saturation ∈ [0.6, 1.4] (blend with the luma image), hue shift ∈ [−0.05, 0.05]
   of a full turn (±18°, in HSV);
2. Gaussian blur with p = 0.5, σ ~ U(0.1, 2.0) px, kernel 2·⌈3σ⌉ + 1;
3. Gaussian noise with p = 0.5, std ~ U(0, 0.04) on the [0, 1] scale, per pixel and channel;
4. JPEG re-encoding with p = 0.5, quality ~ U{30, …, 95} (cv2.imencode / imdecode).
Values are clipped to [0, 1] after each step. Input uint8 (H,W,3) in [0, 255] or float
(H,W,3) in [0, 1]; the output has the input's shape and dtype and stays in range.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

__all__ = [
    "Geometry",
    "PhotometricParams",
    "apply_geometry",
    "paired_views",
    "sample_geometry",
    "strong_photometric",
]

Interpolation = Literal["linear", "nearest"]

# Keys that paired_views treats as label masks (nearest interpolation).
MASK_KEYS = frozenset({"mask", "seg_mask", "trimap", "boundary"})


@dataclass(frozen=True)
class Geometry:
    """One sampled geometric transform, applicable to any array of the source size.

    Attributes:
        source_hw: (H, W) of the arrays it applies to.
        window: (top, left, height, width) crop window in source pixels (inside the image).
        output_hw: (h, w) of the result.
        flip: mirror left-right after resizing.
    """

    source_hw: tuple[int, int]
    window: tuple[int, int, int, int]
    output_hw: tuple[int, int]
    flip: bool

    @property
    def scale(self) -> tuple[float, float]:
        """Output pixels per source pixel along (y, x)."""
        return self.output_hw[0] / self.window[2], self.output_hw[1] / self.window[3]


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        h = w = int(value)
    else:
        h, w = (int(v) for v in value)
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return h, w


def sample_geometry(
    rng: np.random.Generator,
    image_hw: tuple[int, int],
    crop: int | tuple[int, int],
    scale_range: tuple[float, float] = (0.75, 1.5),
    crop_multipliers: Sequence[float] = (1.0, 1.5, 2.0),
    flip_prob: float = 0.5,
) -> Geometry:
    """Draw random scale, multi-scale crop and flip (see the module doc for the maths).

    Args:
        rng: the only source of randomness.
        image_hw: (H, W) of the source arrays.
        crop: output size, int (square) or (h, w).
        scale_range: (low, high) for s ~ U(low, high), > 0.
        crop_multipliers: window sizes as multiples of ``crop`` in the scaled image.
        flip_prob: probability of a horizontal flip.
    """
    src_h, src_w = _pair(image_hw, "image_hw")
    out_h, out_w = _pair(crop, "crop")
    low, high = (float(v) for v in scale_range)
    if not 0 < low <= high:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range!r}")
    if not crop_multipliers or min(crop_multipliers) <= 0:
        raise ValueError(f"crop_multipliers must be positive, got {crop_multipliers!r}")
    scale = rng.uniform(low, high)
    multiplier = float(crop_multipliers[rng.integers(len(crop_multipliers))])
    win_h = out_h * multiplier / scale
    win_w = out_w * multiplier / scale
    fit = min(1.0, src_h / win_h, src_w / win_w)
    win_h = int(np.clip(round(win_h * fit), 1, src_h))
    win_w = int(np.clip(round(win_w * fit), 1, src_w))
    top = int(rng.integers(src_h - win_h + 1))
    left = int(rng.integers(src_w - win_w + 1))
    flip = bool(rng.random() < flip_prob)
    return Geometry((src_h, src_w), (top, left, win_h, win_w), (out_h, out_w), flip)


def apply_geometry(geometry: Geometry, array: np.ndarray, interpolation: Interpolation = "linear") -> np.ndarray:
    """Crop ``geometry.window``, resize to ``geometry.output_hw``, flip if asked.

    Args:
        array: (H, W) or (H, W, C) with (H, W) == ``geometry.source_hw``; any dtype
            (bool is handled as uint8 and returned as bool).
        interpolation: "linear" for images/alpha/fg/bg, "nearest" for masks and trimaps.

    Returns: (h, w) or (h, w, C), same dtype as ``array`` (a new, contiguous array).
    """
    if interpolation not in ("linear", "nearest"):
        raise ValueError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}")
    array = np.asarray(array)
    if array.ndim not in (2, 3) or tuple(array.shape[:2]) != tuple(geometry.source_hw):
        raise ValueError(
            f"array of shape {array.shape} does not match the geometry's source size {geometry.source_hw}"
        )
    top, left, win_h, win_w = geometry.window
    out_h, out_w = geometry.output_hw
    is_bool = array.dtype == np.bool_
    work = array.view(np.uint8) if is_bool else array
    work = work[top : top + win_h, left : left + win_w]
    if (win_h, win_w) != (out_h, out_w):
        if interpolation == "nearest":
            flag = cv2.INTER_NEAREST_EXACT
        elif out_h < win_h and out_w < win_w:
            flag = cv2.INTER_AREA
        else:
            flag = cv2.INTER_LINEAR
        squeeze = work.ndim == 3 and work.shape[2] == 1
        work = cv2.resize(np.ascontiguousarray(work), (out_w, out_h), interpolation=flag)
        if squeeze:
            work = work[:, :, None]
    if geometry.flip:
        work = work[:, ::-1]
    work = np.ascontiguousarray(work)
    return work.astype(np.bool_) if is_bool else work


@dataclass(frozen=True)
class PhotometricParams:
    """Ranges of the strong view (project choices; documented in the module doc)."""

    brightness: tuple[float, float] = (0.6, 1.4)
    contrast: tuple[float, float] = (0.6, 1.4)
    saturation: tuple[float, float] = (0.6, 1.4)
    hue: tuple[float, float] = (-0.05, 0.05)
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    noise_prob: float = 0.5
    noise_std: tuple[float, float] = (0.0, 0.04)
    jpeg_prob: float = 0.5
    jpeg_quality: tuple[int, int] = (30, 95)


_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _luma(x: np.ndarray) -> np.ndarray:
    return (x @ _LUMA)[..., None]


def _jitter(x: np.ndarray, rng: np.random.Generator, p: PhotometricParams) -> np.ndarray:
    ops = ["brightness", "contrast", "saturation", "hue"]
    for index in rng.permutation(len(ops)):
        op = ops[index]
        if op == "brightness":
            x = x * rng.uniform(*p.brightness)
        elif op == "contrast":
            f = rng.uniform(*p.contrast)
            x = f * x + (1.0 - f) * _luma(x).mean()
        elif op == "saturation":
            f = rng.uniform(*p.saturation)
            x = f * x + (1.0 - f) * _luma(x)
        else:
            shift = rng.uniform(*p.hue)
            hsv = cv2.cvtColor(np.clip(x, 0.0, 1.0).astype(np.float32), cv2.COLOR_RGB2HSV)
            hsv[..., 0] = np.mod(hsv[..., 0] + 360.0 * shift, 360.0)
            x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        x = np.clip(x, 0.0, 1.0).astype(np.float32)
    return x


def strong_photometric(
    image: np.ndarray, rng: np.random.Generator, params: PhotometricParams = PhotometricParams()
) -> np.ndarray:
    """The strong view's photometric part: colour jitter, blur, noise, JPEG (module doc).

    Args:
        image: (H, W, 3) RGB, uint8 in [0, 255] or float in [0, 1].
        rng: the only source of randomness.

    Returns: same shape and dtype, values in the same range.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {image.shape}")
    is_uint8 = image.dtype == np.uint8
    if not (is_uint8 or np.issubdtype(image.dtype, np.floating)):
        raise ValueError(f"image must be uint8 or float, got {image.dtype}")
    x = image.astype(np.float32) / 255.0 if is_uint8 else np.clip(image.astype(np.float32), 0.0, 1.0)

    x = _jitter(x, rng, params)
    if rng.random() < params.blur_prob:
        sigma = rng.uniform(*params.blur_sigma)
        size = 2 * int(np.ceil(3 * sigma)) + 1
        x = cv2.GaussianBlur(x, (size, size), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)
    if rng.random() < params.noise_prob:
        std = rng.uniform(*params.noise_std)
        x = np.clip(x + rng.normal(0.0, std, size=x.shape).astype(np.float32), 0.0, 1.0)
    if rng.random() < params.jpeg_prob:
        quality = int(rng.integers(params.jpeg_quality[0], params.jpeg_quality[1] + 1))
        bgr = cv2.cvtColor(np.round(x * 255.0).astype(np.uint8), cv2.COLOR_RGB2BGR)
        ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:  # pragma: no cover - OpenCV always encodes a valid uint8 image
            raise RuntimeError("cv2.imencode failed")
        x = cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0

    x = np.clip(x, 0.0, 1.0)
    if is_uint8:
        return np.round(x * 255.0).astype(np.uint8)
    return x.astype(image.dtype)


def paired_views(
    rng: np.random.Generator,
    image: np.ndarray,
    crop: int | tuple[int, int],
    targets: Mapping[str, np.ndarray] | None = None,
    scale_range: tuple[float, float] = (0.75, 1.5),
    crop_multipliers: Sequence[float] = (1.0, 1.5, 2.0),
    flip_prob: float = 0.5,
    photometric: PhotometricParams = PhotometricParams(),
) -> dict[str, object]:
    """Weak and strong views of one sample under ONE geometry (MLB student, MGM-wild).

    Returns ``{"weak_image", "strong_image", "geometry", **targets}``: the weak image is the
    geometry only (the teacher's input); the strong image is the same crop plus
    :func:`strong_photometric` (the student's input); every target (alpha, seg_mask, fg, ...)
    gets the same geometry — nearest interpolation for keys in ``MASK_KEYS``, linear else.
    """
    geometry = sample_geometry(rng, image.shape[:2], crop, scale_range, crop_multipliers, flip_prob)
    weak = apply_geometry(geometry, image, "linear")
    out: dict[str, object] = {
        "weak_image": weak,
        "strong_image": strong_photometric(weak, rng, photometric),
        "geometry": geometry,
    }
    for key, value in (targets or {}).items():
        out[key] = apply_geometry(geometry, value, "nearest" if key in MASK_KEYS else "linear")
    return out
