"""Tests for matting_core.regions: boundary label, DIM trimaps, MGM guidance masks,
CutMask and the MGM uncertain band."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from matting_core.regions import (
    boundary_label,
    boundary_mask,
    cutmask,
    dim_trimap,
    eval_trimap,
    mgm_guidance_mask,
    uncertain_band,
    uncertain_band_torch,
)

FAST = settings(max_examples=50, deadline=None)
unit = st.floats(0.0, 1.0, allow_nan=False, width=64)


@st.composite
def mattes(draw, max_side=24):
    """(H, W) float64 mattes with pure 0 / 1 areas and a soft part."""
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    values = st.one_of(st.just(0.0), st.just(1.0), unit)
    return draw(arrays(np.float64, (h, w), elements=values))


def soft_disc(size=64, radius=18.0, edge=4.0):
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    return np.clip((radius - r) / edge, 0.0, 1.0)


# ------------------------------------------------------------------ boundary label
def test_boundary_label_golden():
    alpha = np.array([0.0, 0.05, 0.0500001, 0.5, 0.9499, 0.95, 1.0])
    out = boundary_label(alpha)
    assert out.dtype == np.float32
    assert out.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]  # open interval (0.05, 0.95)
    assert boundary_mask(alpha).tolist() == [False, False, True, True, True, False, False]
    assert boundary_label(alpha, low=0.4, high=0.6).tolist() == [0, 0, 0, 1, 0, 0, 0]


@FAST
@given(mattes())
def test_boundary_label_numpy_and_torch_agree(alpha):
    label_t = boundary_label(torch.from_numpy(alpha)[None, None])
    assert label_t.dtype == torch.float32 and label_t.shape == (1, 1) + alpha.shape
    np.testing.assert_array_equal(label_t[0, 0].numpy(), boundary_label(alpha))
    np.testing.assert_array_equal(boundary_mask(torch.from_numpy(alpha)).numpy(), boundary_mask(alpha))


def test_boundary_label_errors():
    with pytest.raises(ValueError, match="alpha must be finite"):
        boundary_label(np.array([0.5, 1.2]))
    with pytest.raises(ValueError, match="alpha .*NaN"):
        boundary_label(torch.tensor([np.nan]))
    with pytest.raises(ValueError, match="alpha must have a floating dtype"):
        boundary_mask(np.array([0, 255], np.uint8))
    with pytest.raises(ValueError, match="low, high must satisfy"):
        boundary_label(np.array([0.5]), low=0.9, high=0.1)


# ------------------------------------------------------------------------- trimaps
def test_eval_trimap_golden_step_edge():
    # columns: 0 0 | 0.5 | 1 1 ; a 3x3 ellipse is a cross; borders never erode
    alpha = np.tile([0.0, 0.0, 0.5, 1.0, 1.0], (5, 1))
    trimap = eval_trimap(alpha, kernel_size=3)
    assert trimap.dtype == np.uint8
    np.testing.assert_array_equal(trimap, np.tile([0, 128, 128, 128, 255], (5, 1)))


def test_trimap_without_erosion_is_exact_fg_bg():
    alpha = np.array([[0.0, 1e-7, 0.3], [1.0, 1 - 1e-7, 0.999]])
    expected = np.array([[0, 0, 128], [255, 255, 128]], np.uint8)  # within 1e-6 counts as pure
    np.testing.assert_array_equal(eval_trimap(alpha, kernel_size=1), expected)
    np.testing.assert_array_equal(dim_trimap(alpha, np.random.default_rng(0), (1, 1)), expected)


def test_dim_trimap_erodes_with_drawn_ellipse_sizes():
    alpha = soft_disc()
    rng = np.random.default_rng(5)
    trimap = dim_trimap(alpha, np.random.default_rng(5), kernel_range=(3, 25))
    fg_size, bg_size = (int(rng.integers(3, 26)) for _ in range(2))  # documented draw order
    ellipse = lambda k: cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))  # noqa: E731
    fg = cv2.erode((alpha == 1).astype(np.uint8), ellipse(fg_size)).astype(bool)
    bg = cv2.erode((alpha == 0).astype(np.uint8), ellipse(bg_size)).astype(bool)
    np.testing.assert_array_equal(trimap == 255, fg)
    np.testing.assert_array_equal(trimap == 0, bg)
    assert fg_size != bg_size  # the seed draws two different sizes, so the test can tell them apart


@FAST
@given(mattes(), st.integers(0, 2**32 - 1), st.integers(1, 12), st.integers(0, 12))
def test_dim_trimap_deterministic_and_unknown_covers_soft(alpha, seed, lo, extra):
    kernel_range = (lo, lo + extra)
    a = dim_trimap(alpha, np.random.default_rng(seed), kernel_range)
    b = dim_trimap(alpha, np.random.default_rng(seed), kernel_range)
    np.testing.assert_array_equal(a, b)
    assert set(np.unique(a).tolist()) <= {0, 128, 255}
    soft = (alpha > 1e-6) & (alpha < 1 - 1e-6)
    assert np.all(a[soft] == 128)
    assert np.all(alpha[a == 255] >= 1 - 1e-6)
    assert np.all(alpha[a == 0] <= 1e-6)


def test_dim_trimap_seed_changes_the_trimap():
    alpha = soft_disc()
    trimaps = [dim_trimap(alpha, np.random.default_rng(s)) for s in range(6)]
    assert any(not np.array_equal(trimaps[0], t) for t in trimaps[1:])


def test_eval_trimap_is_deterministic_and_wider_with_bigger_kernel():
    alpha = soft_disc()
    np.testing.assert_array_equal(eval_trimap(alpha), eval_trimap(alpha))
    unknown_small = eval_trimap(alpha, kernel_size=3) == 128
    unknown_big = eval_trimap(alpha, kernel_size=15) == 128
    assert np.all(unknown_big >= unknown_small) and unknown_big.sum() > unknown_small.sum()


def test_trimap_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="alpha must have 2 dimensions"):
        dim_trimap(np.zeros((2, 2, 1)), rng)
    with pytest.raises(ValueError, match="alpha must be finite"):
        dim_trimap(np.full((2, 2), 2.0), rng)
    with pytest.raises(ValueError, match="alpha must have a floating dtype"):
        eval_trimap(np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="alpha must be a numpy array"):
        eval_trimap(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="kernel_range must be ints with 1 <= lo <= hi"):
        dim_trimap(np.zeros((2, 2)), rng, kernel_range=(0, 3))
    with pytest.raises(ValueError, match="kernel_size must be an int >= 1"):
        eval_trimap(np.zeros((2, 2)), kernel_size=0)


# ------------------------------------------------------------------ guidance masks
def test_guidance_mask_without_morphology_or_cut_is_the_threshold():
    alpha = soft_disc()
    mask = mgm_guidance_mask(
        alpha, np.random.default_rng(0), threshold_range=(0.5, 0.5), kernel_range=(1, 1), cutmask_prob=0.0
    )
    assert mask.dtype == np.float32
    np.testing.assert_array_equal(mask, (alpha >= 0.5).astype(np.float32))


@FAST
@given(mattes(), st.integers(0, 2**32 - 1))
def test_guidance_mask_deterministic_per_seed_and_binary(alpha, seed):
    a = mgm_guidance_mask(alpha, np.random.default_rng(seed))
    b = mgm_guidance_mask(alpha, np.random.default_rng(seed))
    np.testing.assert_array_equal(a, b)
    assert a.shape == alpha.shape and a.dtype == np.float32
    assert set(np.unique(a).tolist()) <= {0.0, 1.0}


def test_guidance_mask_varies_with_seed_and_morphology_moves_the_edge():
    alpha = soft_disc(size=96, radius=30, edge=10)
    masks = [mgm_guidance_mask(alpha, np.random.default_rng(s), cutmask_prob=0.0) for s in range(8)]
    areas = {float(m.sum()) for m in masks}
    assert len(areas) > 1
    # erosion/dilation with kernels up to 30 px changes the area beyond what thresholds alone can
    thresholded = {(alpha >= t).sum() for t in (0.01, 1.0)}
    assert min(areas) < min(thresholded) or max(areas) > max(thresholded)


def test_guidance_mask_cutmask_prob_one_applies_cutmask():
    alpha = np.zeros((40, 40))
    alpha[:, 20:] = 1.0  # left half 0, right half 1: any horizontal copy shows
    kwargs = dict(threshold_range=(0.5, 0.5), kernel_range=(1, 1))
    masks = [
        mgm_guidance_mask(alpha, np.random.default_rng(s), cutmask_prob=1.0, **kwargs) for s in range(5)
    ]
    plain = (alpha >= 0.5).astype(np.float32)
    assert any(not np.array_equal(m, plain) for m in masks)
    never = mgm_guidance_mask(alpha, np.random.default_rng(0), cutmask_prob=0.0, **kwargs)
    np.testing.assert_array_equal(never, plain)


@pytest.mark.parametrize("seed", range(10))
def test_cutmask_copies_one_rectangle(seed):
    h, w = 24, 32
    mask = np.arange(h * w, dtype=np.float64).reshape(h, w) / (h * w - 1)  # unique values
    out = cutmask(mask, np.random.default_rng(seed))
    assert out.dtype == mask.dtype and not np.shares_memory(out, mask)
    np.testing.assert_array_equal(mask, np.arange(h * w).reshape(h, w) / (h * w - 1))  # input untouched
    source = np.rint(out * (h * w - 1)).astype(int)
    src_y, src_x = np.divmod(source, w)
    dy, dx = src_y - np.arange(h)[:, None], src_x - np.arange(w)[None, :]
    moved = (dy != 0) | (dx != 0)
    if not moved.any():  # source == target: nothing changes
        return
    assert len({(a, b) for a, b in zip(dy[moved], dx[moved])}) == 1  # one rigid shift
    ys, xs = np.nonzero(moved)
    box = moved[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    assert box.all()  # a full rectangle
    assert h // 4 <= box.shape[0] <= h // 2 and w // 4 <= box.shape[1] <= w // 2


def test_cutmask_deterministic():
    mask = (np.random.default_rng(0).random((30, 30)) > 0.5).astype(np.float32)
    np.testing.assert_array_equal(
        cutmask(mask, np.random.default_rng(3)), cutmask(mask, np.random.default_rng(3))
    )


def test_guidance_errors():
    rng = np.random.default_rng(0)
    alpha = np.zeros((8, 8))
    with pytest.raises(ValueError, match="threshold_range must satisfy"):
        mgm_guidance_mask(alpha, rng, threshold_range=(0.5, 1.5))
    with pytest.raises(ValueError, match="cutmask_prob must be in"):
        mgm_guidance_mask(alpha, rng, cutmask_prob=2.0)
    with pytest.raises(ValueError, match="alpha .*NaN"):
        mgm_guidance_mask(np.full((4, 4), np.nan), rng)
    with pytest.raises(ValueError, match="mask must have 2 dimensions"):
        cutmask(np.zeros((4, 4, 1)), rng)
    with pytest.raises(ValueError, match="size_range must have lo > 0"):
        cutmask(alpha, rng, size_range=(0.0, 0.5))


# ------------------------------------------------------------------- uncertain band
def test_uncertain_band_golden():
    alpha = np.array([[0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0]])
    assert uncertain_band(alpha, 0).tolist() == [[False, False, False, True, False, False, False]]
    assert uncertain_band(alpha, 1).tolist() == [[False, False, True, True, True, False, False]]
    assert uncertain_band(alpha, 2).tolist() == [[False, True, True, True, True, True, False]]


def test_uncertain_band_limits_are_inclusive():
    alpha = np.array([[0.5 / 255, 1 / 255, 1 - 1 / 255, 1 - 0.5 / 255, 1.0, 0.0]])
    assert uncertain_band(alpha, 0).tolist() == [[False, True, True, False, False, False]]


def test_uncertain_band_square_dilation_at_corner():
    alpha = np.zeros((6, 6))
    alpha[0, 0] = 0.5
    band = uncertain_band(alpha, 2)
    expected = np.zeros((6, 6), bool)
    expected[:3, :3] = True
    np.testing.assert_array_equal(band, expected)


@FAST
@given(mattes(max_side=16), st.integers(0, 5))
def test_uncertain_band_numpy_and_torch_agree(alpha, width):
    band_t = uncertain_band_torch(torch.from_numpy(alpha)[None, None], width)
    assert band_t.dtype == torch.bool and band_t.shape == (1, 1) + alpha.shape
    np.testing.assert_array_equal(band_t[0, 0].numpy(), uncertain_band(alpha, width))


def test_uncertain_band_torch_batched_float32():
    alpha = torch.zeros(2, 1, 5, 5)
    alpha[1, 0, 2, 2] = 0.5
    band = uncertain_band_torch(alpha, 1)
    assert not band[0].any()
    assert band[1, 0].sum() == 9 and band[1, 0, 1:4, 1:4].all()


def test_uncertain_band_errors():
    with pytest.raises(ValueError, match="width_px must be an int >= 0"):
        uncertain_band(np.zeros((3, 3)), -1)
    with pytest.raises(ValueError, match="alpha must be finite"):
        uncertain_band(np.full((3, 3), -0.1), 1)
    with pytest.raises(ValueError, match=r"alpha must have shape \(N, 1, H, W\)"):
        uncertain_band_torch(torch.zeros(1, 2, 3, 3), 1)
    with pytest.raises(ValueError, match="alpha must have 4 dimensions"):
        uncertain_band_torch(torch.zeros(3, 3), 1)
    with pytest.raises(ValueError, match="alpha must be a torch tensor"):
        uncertain_band_torch(np.zeros((1, 1, 3, 3)), 1)
