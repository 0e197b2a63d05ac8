"""Alpha-matte error metrics (community definitions, METHOD.md section 2).

All metrics take ``pred`` and ``gt`` as ``(H, W)`` float arrays in [0, 1] (8-bit mattes
must be divided by 255 first; integer input is rejected) and an optional region ``mask``
(``(H, W)`` bool; ``None`` = whole image). Units:

- SAD  = sum_region |p - g| / 1000
- MSE  = sum_region (p - g)^2 / |region|          (raw; 0.0 for an empty region;
                                                    tables usually print x1e3)
- Grad = sum_region (|grad p^| - |grad g^|)^2 / 1000
- Conn = sum_region |phi_p - phi_g| / 1000

Gradient error. ``p^`` and ``g^`` are the mattes min-max normalised to [0, 1]
(MATLAB ``mat2gray`` in the DIM reference code, ``cv2.normalize(NORM_MINMAX)`` in
mmeval; a constant matte becomes 0, whose gradient is 0 anyway). The gradient is
taken with Gaussian first-derivative filters, sigma = 1.4: the 2-D kernel
``G(y) * G'(x)`` on ``[-h, h]^2`` with ``h = ceil(sigma * sqrt(-2 ln(sqrt(2 pi) sigma eps)))``,
``eps = 0.01`` (h = 4, a 9x9 kernel), scaled to unit L2 norm, correlation with
replicated borders; ``|grad a| = sqrt(gx^2 + gy^2)``, gy using the transposed kernel.

Connectivity error. For thresholds ``t_k = k * 0.1`` (k = 1..10, computed in float64,
so t_3 = 0.30000000000000004 exactly as in mmeval), take the largest 4-connected
component of ``(p >= t_k) & (g >= t_k)`` (ties: the lowest label in raster order, as
``cv2.connectedComponentsWithStats`` numbers them). Each pixel's level ``l`` is
``t_{k-1}`` for the first k at which it is not in that component (t_0 = 0), or 1 if it
always is. ``d = a - l``, ``phi = 1 - d * [d >= 0.15]``.

Gradient and connectivity are computed on the whole image and then summed over the
region, so a region never changes the filter or component geometry.
These definitions reproduce mmeval 0.2.1 (SumAbsoluteDifferences,
MattingMeanSquaredError, GradientError, ConnectivityError) when it is fed the same
[0, 1] float64 inputs; see tests/core/test_metrics.py for how to feed it like-for-like.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import cv2
import numpy as np

from matting_core._validate import (
    as_float_array,
    check_ndim,
    check_same_shape,
    check_unit_range,
    is_tensor,
)

__all__ = [
    "beta_stats",
    "BOUNDARY_HIGH",
    "BOUNDARY_LOW",
    "NORM_CONST",
    "connectivity_error",
    "error_maps",
    "evaluate_alpha",
    "gradient_error",
    "mse",
    "sad",
]

NORM_CONST = 1000.0
BOUNDARY_LOW = 0.05
BOUNDARY_HIGH = 0.95
GRAD_SIGMA = 1.4
_GRAD_EPSILON = 1e-2
_CONN_THRESHOLDS = np.arange(11, dtype=np.float64) * 0.1  # t_0 = 0 ... t_10 = 1
_CONN_MIN_DIFF = 0.15
_TRIMAP_VALUES = np.zeros(256, dtype=bool)
_TRIMAP_VALUES[[0, 128, 255]] = True


# --------------------------------------------------------------------------- inputs
def _check_alpha_pair(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate pred/gt and return them as float64 numpy arrays."""
    for name, x in (("pred", pred), ("gt", gt)):
        if not (isinstance(x, np.ndarray) or is_tensor(x)):
            raise ValueError(
                f"{name} must be a numpy array (or torch tensor), got {type(x).__name__}"
            )
        check_ndim(name, x, 2)
        check_unit_range(name, x)
    check_same_shape(pred=pred, gt=gt)
    return as_float_array("pred", pred), as_float_array("gt", gt)


def _check_mask(mask: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    if mask is None:
        return None
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
        kind = mask.dtype if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ValueError(
            f"mask must be a bool numpy array of shape {shape} (True = in region), got {kind}"
        )
    if mask.shape != shape:
        raise ValueError(f"mask must have shape {shape} like pred and gt, got {mask.shape}")
    return mask


def _check_trimap(trimap: Any, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(trimap, np.ndarray) or trimap.dtype != np.uint8:
        kind = trimap.dtype if isinstance(trimap, np.ndarray) else type(trimap).__name__
        raise ValueError(f"trimap must be a uint8 numpy array (0 / 128 / 255), got {kind}")
    if trimap.shape != shape:
        raise ValueError(f"trimap must have shape {shape} like pred and gt, got {trimap.shape}")
    if not _TRIMAP_VALUES[trimap].all():
        raise ValueError("trimap must only contain 0 (bg), 128 (unknown) and 255 (fg)")
    return trimap


def _region_sum(values: np.ndarray, mask: np.ndarray | None) -> float:
    return float(values.sum() if mask is None else values[mask].sum())


# ---------------------------------------------------------------- per-pixel maps
@lru_cache(maxsize=8)
def _gaussian_derivative_kernels(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """1-D Gaussian and its derivative, each scaled to unit L2 norm.

    Their outer product ``G (rows) x G' (cols)`` is the unit-norm 2-D x-derivative kernel.
    """
    half = math.ceil(
        sigma * math.sqrt(-2.0 * math.log(math.sqrt(2.0 * math.pi) * sigma * _GRAD_EPSILON))
    )
    x = np.arange(-half, half + 1, dtype=np.float64)
    gauss = np.exp(-(x**2) / (2.0 * sigma**2)) / (sigma * math.sqrt(2.0 * math.pi))
    dgauss = -x * gauss / sigma**2
    return gauss / np.linalg.norm(gauss), dgauss / np.linalg.norm(dgauss)


def _gradient_magnitude(alpha: np.ndarray, sigma: float = GRAD_SIGMA) -> np.ndarray:
    """``|grad a^|`` of the min-max normalised matte, ``(H, W)`` float64."""
    normalised = cv2.normalize(alpha, None, 0.0, 1.0, cv2.NORM_MINMAX, dtype=cv2.CV_64F)
    gauss, dgauss = _gaussian_derivative_kernels(float(sigma))
    gx = cv2.sepFilter2D(normalised, cv2.CV_64F, dgauss, gauss, borderType=cv2.BORDER_REPLICATE)
    gy = cv2.sepFilter2D(normalised, cv2.CV_64F, gauss, dgauss, borderType=cv2.BORDER_REPLICATE)
    return cv2.magnitude(gx, gy)


def _connectivity_levels(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Per-pixel level ``l``: the last threshold at which the pixel was still connected.

    One connected-components pass per threshold; ``connected`` holds the pixels that
    have been in the largest component at every threshold so far, ``level_index``
    counts those thresholds. Stops early once no pixel is connected any more.
    """
    lowest = np.minimum(pred, gt)  # p >= t and g >= t  <=>  min(p, g) >= t
    level_index = np.zeros(pred.shape, dtype=np.uint8)
    connected = np.ones(pred.shape, dtype=bool)
    for k in range(1, len(_CONN_THRESHOLDS)):
        both_above = lowest >= _CONN_THRESHOLDS[k]
        # Labels only (sizes via bincount are cheaper than cv2's per-component stats);
        # cv2 numbers components in raster order of their first pixel.
        count, labels = cv2.connectedComponents(
            both_above.view(np.uint8), connectivity=4, ltype=cv2.CV_32S
        )
        if count <= 1:  # no component: nobody stays connected
            break
        if count == 2:
            largest = 1
        else:
            sizes = np.bincount(labels.ravel(), minlength=count)
            largest = 1 + int(np.argmax(sizes[1:]))  # first (lowest label) on ties
        connected &= labels == largest
        if not connected.any():
            break
        level_index += connected
    return _CONN_THRESHOLDS[level_index]


def _connectivity_phi(alpha: np.ndarray, level: np.ndarray) -> np.ndarray:
    """``phi = 1 - d * [d >= 0.15]`` with ``d = alpha - level``."""
    diff = alpha - level
    return np.where(diff >= _CONN_MIN_DIFF, 1.0 - diff, 1.0)


def error_maps(pred: np.ndarray, gt: np.ndarray) -> dict[str, np.ndarray]:
    """Per-pixel error terms whose region sums give the four metrics.

    Args:
        pred: ``(H, W)`` float in [0, 1].
        gt: ``(H, W)`` float in [0, 1].

    Returns:
        ``(H, W)`` float64 maps, unscaled:
        ``"sad"`` |p - g|, ``"mse"`` (p - g)^2, ``"grad"`` (|grad p^| - |grad g^|)^2,
        ``"conn"`` |phi_p - phi_g|. Useful for error visualisations too.
    """
    p, g = _check_alpha_pair(pred, gt)
    return _error_maps(p, g)


def _error_maps(p: np.ndarray, g: np.ndarray) -> dict[str, np.ndarray]:
    diff = p - g
    level = _connectivity_levels(p, g)
    return {
        "sad": np.abs(diff),
        "mse": np.square(diff),
        "grad": np.square(_gradient_magnitude(p) - _gradient_magnitude(g)),
        "conn": np.abs(_connectivity_phi(p, level) - _connectivity_phi(g, level)),
    }


# --------------------------------------------------------------------------- metrics
def sad(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Sum of absolute differences, ``sum_region |p - g| / 1000``.

    Args:
        pred: ``(H, W)`` float in [0, 1].
        gt: ``(H, W)`` float in [0, 1].
        mask: ``(H, W)`` bool region, or None for the whole image.

    Example:
        >>> sad(np.array([[0.0, 1.0]]), np.array([[1.0, 0.5]]))
        0.0015
    """
    p, g = _check_alpha_pair(pred, gt)
    region = _check_mask(mask, p.shape)
    return _region_sum(np.abs(p - g), region) / NORM_CONST


def mse(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean squared error over the region, ``sum_region (p - g)^2 / |region|``.

    Raw (not x1e3). Returns 0.0 for an empty region.

    Args:
        pred: ``(H, W)`` float in [0, 1].
        gt: ``(H, W)`` float in [0, 1].
        mask: ``(H, W)`` bool region, or None for the whole image.
    """
    p, g = _check_alpha_pair(pred, gt)
    region = _check_mask(mask, p.shape)
    return _mse_from_map(np.square(p - g), region)


def _mse_from_map(squared: np.ndarray, region: np.ndarray | None) -> float:
    count = squared.size if region is None else int(np.count_nonzero(region))
    return _region_sum(squared, region) / count if count else 0.0


def gradient_error(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Gradient error, ``sum_region (|grad p^| - |grad g^|)^2 / 1000``.

    ``p^``, ``g^``: min-max normalised mattes; Gaussian-derivative gradients,
    sigma 1.4, 9x9 unit-norm kernel (details in the module docstring). Gradients are
    computed on the whole image, then summed over ``mask``.

    Args:
        pred: ``(H, W)`` float in [0, 1].
        gt: ``(H, W)`` float in [0, 1].
        mask: ``(H, W)`` bool region, or None for the whole image.
    """
    p, g = _check_alpha_pair(pred, gt)
    region = _check_mask(mask, p.shape)
    squared = np.square(_gradient_magnitude(p) - _gradient_magnitude(g))
    return _region_sum(squared, region) / NORM_CONST


def connectivity_error(
    pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None
) -> float:
    """Connectivity error, ``sum_region |phi_p - phi_g| / 1000``.

    Thresholds 0.1 k (k = 1..10), largest 4-connected component of
    ``(p >= t) & (g >= t)``, ``phi = 1 - d [d >= 0.15]`` with ``d = a - level``
    (details in the module docstring). Computed on the whole image, summed over
    ``mask``. About 10 connected-component passes: well under a second at 2048x2048.

    Args:
        pred: ``(H, W)`` float in [0, 1].
        gt: ``(H, W)`` float in [0, 1].
        mask: ``(H, W)`` bool region, or None for the whole image.
    """
    p, g = _check_alpha_pair(pred, gt)
    region = _check_mask(mask, p.shape)
    level = _connectivity_levels(p, g)
    conn = np.abs(_connectivity_phi(p, level) - _connectivity_phi(g, level))
    return _region_sum(conn, region) / NORM_CONST


def evaluate_alpha(
    pred: np.ndarray, gt: np.ndarray, trimap: np.ndarray | None = None
) -> dict[str, dict[str, float]]:
    """All four metrics over the standard regions, per-pixel maps computed once.

    Regions: ``"whole"`` (every pixel), ``"boundary"`` (``0.05 < gt < 0.95``, the
    study's boundary region), and ``"unknown"`` (``trimap == 128``) only when a
    trimap is given.

    Args:
        pred: ``(H, W)`` float in [0, 1].
        gt: ``(H, W)`` float in [0, 1].
        trimap: optional ``(H, W)`` uint8 with values in {0, 128, 255}.

    Returns:
        ``{region: {"sad": ..., "mse": ..., "grad": ..., "conn": ...}}`` as floats,
        units as in the module docstring (SAD/Grad/Conn divided by 1000, MSE raw).
    """
    p, g = _check_alpha_pair(pred, gt)
    regions: dict[str, np.ndarray | None] = {
        "whole": None,
        "boundary": (g > BOUNDARY_LOW) & (g < BOUNDARY_HIGH),
    }
    if trimap is not None:
        regions["unknown"] = _check_trimap(trimap, p.shape) == 128
    maps = _error_maps(p, g)
    return {
        name: {
            "sad": _region_sum(maps["sad"], region) / NORM_CONST,
            "mse": _mse_from_map(maps["mse"], region),
            "grad": _region_sum(maps["grad"], region) / NORM_CONST,
            "conn": _region_sum(maps["conn"], region) / NORM_CONST,
        }
        for name, region in regions.items()
    }


def beta_stats(beta: np.ndarray, gt: np.ndarray) -> dict[str, float | None]:
    """Where the boundary head fires: mean β over GT regions of one image.

    ``band`` = ``0.05 < α < 0.95`` (the boundary label), ``fg`` = ``α ≥ 0.95``, ``bg`` =
    ``α ≤ 0.05``, ``outside`` = fg ∪ bg; with ``*_pixels`` counts so set means can be pixel
    weighted. A region without pixels gives None. MLB wants β high in the band and low
    outside it (the blend then takes the teacher only at the boundary).
    """
    from matting_core.regions import boundary_mask

    b, g = _check_alpha_pair(beta, gt)
    regions = {
        "band": boundary_mask(g, BOUNDARY_LOW, BOUNDARY_HIGH),
        "fg": g >= BOUNDARY_HIGH,
        "bg": g <= BOUNDARY_LOW,
    }
    regions["outside"] = ~regions["band"]
    out: dict[str, float | None] = {}
    for name, mask in regions.items():
        n = int(mask.sum())
        out[name] = float(b[mask].mean()) if n else None
        out[f"{name}_pixels"] = n
    return out
