"""Training losses for the matting networks (METHOD.md §1). Every loss returns a dict of
named scalar terms with a ``total`` key (RobustVideoMatting's convention), so every term can
be logged without glue.

Shapes: alpha / weights / boundary maps ``(N, 1, H, W)``; images ``(N, 3, H, W)``; all float,
alpha and images in [0, 1]. ``weight`` is an optional non-negative region weight
``(N, 1, H, W)`` (e.g. a 0/1 boundary mask): each term becomes the weighted mean

    L = Σ_p w_p · ℓ_p / Σ_p w_p        (channels counted in the denominator),

which is 0 — not NaN — when the region is empty (Σ w = 0), with finite gradients.

Terms
- ``l1``:          mean |α_p − α_g|.
- ``composition``: mean |c_p − I| over RGB with c_p = α_p·F + (1 − α_p)·B (DIM / MGM), I the
                   image (rebuilt as α_g·F + (1 − α_g)·B when not given).
- ``laplacian``:   Σ_{i=0..4} 2^i · mean |L_i(α_p) − L_i(α_g)| over a 5-level Laplacian
                   pyramid (Gaussian 5×5 kernel [1,4,6,4,1]ᵀ[1,4,6,4,1]/256, replicate
                   borders, level weights 2^i as in MGM's ``lap_loss``); the region weight
                   is subsampled with the pyramid (w[::2^i, ::2^i]).
- ``boundary_bce``: BCE-with-logits between b' and the boundary label 1[0.05 < α < 0.95].
- ``mse``:         mean (α_p − α_g)² (segmentation pre-training, mask as a 0/1 matte).

Matte loss, one of :data:`MATTE_LOSSES` (a param per stage, ``train.<stage>.matte_loss``):
``conventional`` = l1 + composition + laplacian, weights 1 (MGM's recipe; the composition
term only where F and B exist); ``l1``; ``mse`` (the metric the study scores).
Teacher: L_t = L_matte(α', α) + λ·BCE_w(b', b), λ = 0.01 confirmed by the paper. Student
(MLB): L_s = L_matte(α'_s, M̃) + λ·BCE_w(b'_s, 1[0.05 < M̃ < 0.95]) with M̃ the blended label
(treated as a constant target). BCE_w weighs the positive (boundary) class by ``pos_weight``
(1 = plain BCE): boundary pixels are a few percent of a crop, so an unweighted BCE is
nearly minimised by a constant "no boundary" guess.

``LOSSES`` maps names (``mse``, ``matte``, ``teacher``, ``student``) to the functions;
``get_loss(name)`` raises a ValueError listing them for an unknown name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

try:  # the project's single definition of the boundary band (matting_core/regions.py)
    from matting_core.regions import boundary_label as _regions_boundary_label
except ImportError:  # regions.py not present in this checkout: same thresholds inline
    _regions_boundary_label = None

__all__ = [
    "BOUNDARY_LOW",
    "BOUNDARY_HIGH",
    "LOSSES",
    "MATTE_LOSSES",
    "boundary_bce",
    "boundary_target",
    "composition_l1",
    "get_loss",
    "l1_loss",
    "laplacian_l1",
    "laplacian_pyramid",
    "matte_loss",
    "mse_loss",
    "student_loss",
    "teacher_loss",
    "weighted_mean",
]

BOUNDARY_LOW = 0.05
BOUNDARY_HIGH = 0.95
LAPLACIAN_LEVELS = 5
MATTE_LOSSES = ("conventional", "l1", "mse")
_EPS = 1e-8

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- helpers


def _check_map(name: str, x: Tensor, like: Tensor | None = None, channels: int | None = 1) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (N, C, H, W) tensor, got {shape}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channel(s), got shape {tuple(x.shape)}")
    if like is not None and (x.shape[0] != like.shape[0] or x.shape[-2:] != like.shape[-2:]):
        raise ValueError(f"{name} shape {tuple(x.shape)} does not match {tuple(like.shape)} in N, H, W")


def _alpha_of(pred: Tensor | Mapping[str, Tensor]) -> Tensor:
    return pred["alpha"] if isinstance(pred, Mapping) else pred


def weighted_mean(values: Tensor, weight: Tensor | None = None) -> Tensor:
    """Σ w·v / Σ w over all elements, ``weight`` (N,1,H,W) broadcast over ``values`` channels.

    Without a weight: the plain mean. With an all-zero weight: 0 (and zero gradients).
    """
    if weight is None:
        return values.mean()
    weight = weight.to(values.dtype).expand_as(values)
    return (values * weight).sum() / weight.sum().clamp_min(_EPS)


def boundary_target(alpha: Tensor, low: float = BOUNDARY_LOW, high: float = BOUNDARY_HIGH) -> Tensor:
    """Boundary label b = 1[low < α < high] as float {0, 1}, same shape as ``alpha``.

    Uses ``matting_core.regions.boundary_label`` when that module exists (one definition for
    losses, metrics and pseudo-labels); the inline fallback uses the same strict thresholds.
    """
    if _regions_boundary_label is not None:
        label = _regions_boundary_label(alpha, low=low, high=high)
        return torch.as_tensor(label, dtype=alpha.dtype, device=alpha.device)
    return ((alpha > low) & (alpha < high)).to(alpha.dtype)


# ----------------------------------------------------------------------------- terms


def l1_loss(pred_alpha: Tensor, gt_alpha: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean |α_p − α_g| over the region. pred/gt (N,1,H,W)."""
    _check_map("pred_alpha", pred_alpha)
    _check_map("gt_alpha", gt_alpha, pred_alpha)
    return weighted_mean((pred_alpha - gt_alpha).abs(), weight)


def composition_l1(
    pred_alpha: Tensor, image: Tensor, fg: Tensor, bg: Tensor, weight: Tensor | None = None
) -> Tensor:
    """Mean over RGB of |α_p·F + (1 − α_p)·B − I|. alpha (N,1,H,W); image/fg/bg (N,3,H,W)."""
    _check_map("pred_alpha", pred_alpha)
    for name, x in (("image", image), ("fg", fg), ("bg", bg)):
        _check_map(name, x, pred_alpha, channels=None)
    composite = pred_alpha * fg + (1.0 - pred_alpha) * bg
    return weighted_mean((composite - image).abs(), weight)


def _gaussian_kernel(channels: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    k1 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=dtype, device=device)
    k2 = torch.outer(k1, k1) / 256.0
    return k2.expand(channels, 1, 5, 5).contiguous()


def _blur(x: Tensor, kernel: Tensor) -> Tensor:
    return F.conv2d(F.pad(x, [2, 2, 2, 2], mode="replicate"), kernel, groups=x.shape[1])


def _upsample(down: Tensor, kernel: Tensor, height: int, width: int) -> Tensor:
    """Burt–Adelson expand: insert zeros, blur with 4× the kernel, crop to (height, width).

    ``down`` is replicate-padded by one sample *before* the zeros are inserted, and the blur
    is then unpadded, so the zero/non-zero pattern is intact up to the border: a constant
    expands to exactly that constant at any size (a padded zero-inserted image would not).
    """
    padded = F.pad(down, [1, 1, 1, 1], mode="replicate")
    n, c, h, w = padded.shape
    zeros = padded.new_zeros(n, c, 2 * h, 2 * w)
    zeros[:, :, ::2, ::2] = padded
    up = F.conv2d(zeros, 4.0 * kernel, groups=c)  # (2h - 4, 2w - 4) = (2·h_down, 2·w_down)
    return up[:, :, :height, :width]


def laplacian_pyramid(x: Tensor, levels: int = LAPLACIAN_LEVELS) -> list[Tensor]:
    """Band-pass levels L_0..L_{levels-1} of a Laplacian pyramid of x (N,C,H,W).

    L_i = G_i − expand(G_{i+1}), G_0 = x, G_{i+1} = blur(G_i)[::2, ::2] (replicate borders);
    ``expand`` inserts zeros and blurs with 4× the kernel (Burt & Adelson), cropped to G_i's
    size so odd sizes work. Linear in x, so L(a) − L(b) = L(a − b); a constant has all-zero
    bands.
    """
    kernel = _gaussian_kernel(x.shape[1], x.dtype, x.device)
    pyramid = []
    current = x
    for _ in range(levels):
        down = _blur(current, kernel)[:, :, ::2, ::2]
        pyramid.append(current - _upsample(down, kernel, current.shape[2], current.shape[3]))
        current = down
    return pyramid


def laplacian_l1(
    pred_alpha: Tensor, gt_alpha: Tensor, weight: Tensor | None = None, levels: int = LAPLACIAN_LEVELS
) -> Tensor:
    """Σ_i 2^i · weighted mean |L_i(α_p − α_g)| over ``levels`` pyramid levels (MGM)."""
    _check_map("pred_alpha", pred_alpha)
    _check_map("gt_alpha", gt_alpha, pred_alpha)
    total = pred_alpha.new_zeros(())
    for i, band in enumerate(laplacian_pyramid(pred_alpha - gt_alpha, levels)):
        w = None if weight is None else weight[:, :, :: 2**i, :: 2**i]
        total = total + (2.0**i) * weighted_mean(band.abs(), w)
    return total


def boundary_bce(
    boundary_logits: Tensor, boundary: Tensor, weight: Tensor | None = None, pos_weight: float = 1.0
) -> Tensor:
    """Weighted mean of BCE-with-logits(b', b); b' logits, b in [0, 1], both (N,1,H,W).

    ``pos_weight`` w₊ multiplies the positive term: ℓ = −w₊·b·log σ(b') − (1 − b)·log(1 − σ(b')).
    """
    _check_map("boundary_logits", boundary_logits)
    _check_map("boundary", boundary, boundary_logits)
    if pos_weight <= 0:
        raise ValueError(f"pos_weight must be > 0, got {pos_weight}")
    bce = F.binary_cross_entropy_with_logits(
        boundary_logits,
        boundary.to(boundary_logits.dtype),
        reduction="none",
        pos_weight=None if pos_weight == 1.0 else boundary_logits.new_tensor(float(pos_weight)),
    )
    return weighted_mean(bce, weight)


# ----------------------------------------------------------------------------- objectives


def matte_loss(
    pred_alpha: Tensor,
    gt_alpha: Tensor,
    image: Tensor | None = None,
    fg: Tensor | None = None,
    bg: Tensor | None = None,
    weight: Tensor | None = None,
    kind: str = "conventional",
) -> dict[str, Tensor]:
    """The matte term, ``kind`` one of :data:`MATTE_LOSSES`.

    ``conventional``: l1 + composition + laplacian (each weight 1; MGM's recipe);
    ``composition`` is computed only when both ``fg`` and ``bg`` are given (image defaults
    to α_g·F + (1 − α_g)·B). Returns ``{"l1", ["composition",] "laplacian", "total"}``.
    ``l1`` / ``mse``: that one term, ``{"l1" | "mse", "total"}`` (fg/bg/image unused).
    """
    pred_alpha = _alpha_of(pred_alpha)
    if kind not in MATTE_LOSSES:
        raise ValueError(f"unknown matte loss {kind!r}; valid: {', '.join(MATTE_LOSSES)}")
    if (fg is None) != (bg is None):
        raise ValueError("composition loss needs both fg and bg (or neither)")
    if kind == "mse":
        return mse_loss(pred_alpha, gt_alpha, weight)
    terms: dict[str, Tensor] = {"l1": l1_loss(pred_alpha, gt_alpha, weight)}
    if kind == "l1":
        terms["total"] = terms["l1"]
        return terms
    if fg is not None and bg is not None:
        if image is None:
            image = gt_alpha * fg + (1.0 - gt_alpha) * bg
        terms["composition"] = composition_l1(pred_alpha, image, fg, bg, weight)
    terms["laplacian"] = laplacian_l1(pred_alpha, gt_alpha, weight)
    terms["total"] = sum(terms.values())
    return terms


def teacher_loss(
    pred: Mapping[str, Tensor],
    gt_alpha: Tensor,
    gt_boundary: Tensor | None = None,
    lambda_boundary: float = 0.01,
    image: Tensor | None = None,
    fg: Tensor | None = None,
    bg: Tensor | None = None,
    weight: Tensor | None = None,
    matte: str = "conventional",
    pos_weight: float = 1.0,
) -> dict[str, Tensor]:
    """L_t = L_matte(α', α) + λ·BCE_w(b', b). ``pred``: the network's output dict.

    ``gt_boundary`` defaults to 1[0.05 < α < 0.95] of ``gt_alpha``; ``matte`` picks the matte
    term (:func:`matte_loss` ``kind``), ``pos_weight`` the BCE's positive-class weight.
    Returns the matte terms plus ``matte`` (their sum), ``boundary_bce`` and ``total``.
    """
    if gt_boundary is None:
        gt_boundary = boundary_target(gt_alpha)
    terms = matte_loss(pred["alpha"], gt_alpha, image=image, fg=fg, bg=bg, weight=weight, kind=matte)
    terms["matte"] = terms.pop("total")
    terms["boundary_bce"] = boundary_bce(pred["boundary_logits"], gt_boundary, weight, pos_weight)
    terms["total"] = terms["matte"] + lambda_boundary * terms["boundary_bce"]
    return terms


def student_loss(
    pred: Mapping[str, Tensor],
    blended_label: Tensor,
    lambda_boundary: float = 0.01,
    weight: Tensor | None = None,
    matte: str = "conventional",
    pos_weight: float = 1.0,
) -> dict[str, Tensor]:
    """MLB student: L_matte(α'_s, M̃) + λ·BCE_w(b'_s, 1[0.05 < M̃ < 0.95]).

    ``blended_label`` M̃ (N,1,H,W) in [0, 1] is detached (a fixed target). No composition
    term: natural photos have no F/B. Returns the matte terms, matte, boundary_bce, total.
    The S-only control student calls it with M̃ = S.
    """
    blended_label = blended_label.detach()
    return teacher_loss(
        pred, blended_label, boundary_target(blended_label), lambda_boundary, weight=weight,
        matte=matte, pos_weight=pos_weight,
    )


def mse_loss(
    pred: Tensor | Mapping[str, Tensor], gt_alpha: Tensor, weight: Tensor | None = None
) -> dict[str, Tensor]:
    """Pre-training loss: mean (α' − S)² with the segmentation mask S as a 0/1 matte.

    Returns ``{"mse", "total"}`` (equal).
    """
    pred_alpha = _alpha_of(pred)
    _check_map("pred_alpha", pred_alpha)
    _check_map("gt_alpha", gt_alpha, pred_alpha)
    mse = weighted_mean((pred_alpha - gt_alpha.to(pred_alpha.dtype)) ** 2, weight)
    return {"mse": mse, "total": mse}


LOSSES: dict[str, Callable[..., dict[str, Tensor]]] = {
    "mse": mse_loss,
    "matte": matte_loss,
    "teacher": teacher_loss,
    "student": student_loss,
}


def get_loss(name: str) -> Callable[..., dict[str, Tensor]]:
    """Look a loss up in :data:`LOSSES`; unknown names raise a ValueError listing the valid ones."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}") from None
