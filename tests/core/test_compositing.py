"""Tests for matting_core.compositing: I = alpha F + (1 - alpha) B, two-instance
layering (MGM in the wild) and background fitting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from matting_core.compositing import (
    composite,
    composite_two_instances,
    fit_background,
    layer_two_instances,
)

unit = st.floats(0.0, 1.0, allow_nan=False, width=64)
FAST = settings(max_examples=50, deadline=None)


@st.composite
def scenes(draw, with_second=False):
    """numpy (H, W, 3) foreground(s) and background, (H, W) alpha(s), all in [0, 1]."""
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    image = arrays(np.float64, (h, w, 3), elements=unit)
    alpha = arrays(np.float64, (h, w), elements=unit)
    scene = {"fg": draw(image), "bg": draw(image), "alpha": draw(alpha)}
    if with_second:
        scene["fg2"], scene["alpha2"] = draw(image), draw(alpha)
    return scene


# ------------------------------------------------------------------------ golden
def test_composite_golden_pixel():
    fg = np.array([[[0.8, 0.4, 0.2]]])
    bg = np.array([[[0.2, 0.6, 1.0]]])
    out = composite(fg, bg, np.array([[0.25]]))
    # 0.25 * F + 0.75 * B, worked by hand
    np.testing.assert_allclose(out, [[[0.35, 0.55, 0.8]]], rtol=0, atol=1e-15)


def test_composite_golden_torch_batched_and_unbatched():
    fg = torch.tensor([0.8, 0.4, 0.2]).reshape(1, 3, 1, 1)
    bg = torch.tensor([0.2, 0.6, 1.0]).reshape(1, 3, 1, 1)
    alpha = torch.full((1, 1, 1, 1), 0.25)
    expected = torch.tensor([0.35, 0.55, 0.8]).reshape(1, 3, 1, 1)
    torch.testing.assert_close(composite(fg, bg, alpha), expected)
    torch.testing.assert_close(composite(fg[0], bg[0], alpha[0]), expected[0])


def test_layer_two_instances_golden():
    front, back, union = layer_two_instances(np.array([0.5, 1.0, 0.0]), np.array([0.6, 0.7, 0.7]))
    np.testing.assert_allclose(front, [0.5, 1.0, 0.0])
    np.testing.assert_allclose(back, [0.3, 0.0, 0.7])  # alpha_B (1 - alpha_A)
    np.testing.assert_allclose(union, [0.8, 1.0, 0.7])  # alpha_A + alpha_B (1 - alpha_A)


def test_composite_two_instances_golden():
    gray = lambda v: np.full((1, 1, 3), v)  # noqa: E731
    image, union = composite_two_instances(
        gray(1.0), np.array([[0.5]]), gray(0.5), np.array([[0.6]]), gray(0.0)
    )
    # B over bg: 0.6*0.5 = 0.3; A over that: 0.5*1 + 0.5*0.3 = 0.65
    np.testing.assert_allclose(image, gray(0.65))
    np.testing.assert_allclose(union, [[0.8]])


# --------------------------------------------------------------------- properties
@FAST
@given(scenes())
def test_composite_alpha_one_gives_foreground_alpha_zero_gives_background(scene):
    fg, bg = scene["fg"], scene["bg"]
    ones, zeros = np.ones(fg.shape[:2]), np.zeros(fg.shape[:2])
    np.testing.assert_array_equal(composite(fg, bg, ones), fg)
    np.testing.assert_array_equal(composite(fg, bg, zeros), bg)


@FAST
@given(scenes())
def test_composite_in_range_and_alpha_channel_forms_agree(scene):
    out = composite(scene["fg"], scene["bg"], scene["alpha"])
    assert out.shape == scene["fg"].shape and out.dtype == np.float64
    assert np.all(out >= np.minimum(scene["fg"], scene["bg"]) - 1e-12)
    assert np.all(out <= np.maximum(scene["fg"], scene["bg"]) + 1e-12)
    np.testing.assert_array_equal(
        out, composite(scene["fg"], scene["bg"], scene["alpha"][..., None])
    )


@FAST
@given(scenes())
def test_composite_numpy_and_torch_agree(scene):
    out_np = composite(scene["fg"], scene["bg"], scene["alpha"])
    to_chw = lambda x: torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 0)))[None]  # noqa: E731
    out_t = composite(to_chw(scene["fg"]), to_chw(scene["bg"]), torch.from_numpy(scene["alpha"])[None, None])
    np.testing.assert_allclose(np.moveaxis(out_t[0].numpy(), 0, -1), out_np, rtol=0, atol=1e-12)


@FAST
@given(scenes(with_second=True))
def test_two_instances_equals_sum_of_visible_layers(scene):
    image, union = composite_two_instances(
        scene["fg"], scene["alpha"], scene["fg2"], scene["alpha2"], scene["bg"]
    )
    front, back, union2 = layer_two_instances(scene["alpha"], scene["alpha2"])
    np.testing.assert_allclose(front + back, union, atol=1e-12)
    np.testing.assert_array_equal(union, union2)
    assert union.min() >= 0.0 and union.max() <= 1.0 + 1e-12
    expected = (
        front[..., None] * scene["fg"]
        + back[..., None] * scene["fg2"]
        + (1 - union[..., None]) * scene["bg"]
    )
    np.testing.assert_allclose(image, expected, atol=1e-12)


@FAST
@given(scenes(with_second=True))
def test_layer_two_instances_numpy_and_torch_agree(scene):
    a, b = scene["alpha"], scene["alpha2"]
    out_np = layer_two_instances(a, b)
    out_t = layer_two_instances(torch.from_numpy(a), torch.from_numpy(b))
    for x_np, x_t in zip(out_np, out_t):
        np.testing.assert_allclose(x_t.numpy(), x_np, atol=1e-12)


def test_layer_two_instances_returns_copies():
    a, b = np.array([0.5]), np.array([0.5])
    front, _, _ = layer_two_instances(a, b)
    front[0] = 0.0
    assert a[0] == 0.5


def test_composite_keeps_float32():
    fg = np.full((2, 2, 3), 0.5, np.float32)
    out = composite(fg, fg, np.full((2, 2), 0.3, np.float64))
    assert out.dtype == np.float32
    t = torch.full((1, 3, 2, 2), 0.5)
    assert composite(t, t, torch.full((1, 1, 2, 2), 0.3, dtype=torch.float64)).dtype == torch.float32


# ------------------------------------------------------------------ fit_background
@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(40, 60, 3), (300, 200, 3), (50, 50), (64, 32, 1)])
def test_fit_background_shape_and_dtype(dtype, shape):
    rng = np.random.default_rng(0)
    bg = rng.random(shape)
    bg = (bg * 255).astype(np.uint8) if dtype == np.uint8 else bg.astype(dtype)
    out = fit_background(bg, (48, 64), np.random.default_rng(1))
    assert out.shape == (48, 64) + shape[2:]
    assert out.dtype == dtype and out.flags.c_contiguous
    if dtype != np.uint8:
        assert out.min() >= 0.0 and out.max() <= 1.0


def test_fit_background_same_seed_same_crop_and_seed_matters():
    bg = np.random.default_rng(0).random((120, 90, 3))
    a = fit_background(bg, (32, 32), np.random.default_rng(7))
    b = fit_background(bg, (32, 32), np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    others = [fit_background(bg, (32, 32), np.random.default_rng(s)) for s in range(5)]
    assert any(not np.array_equal(a, o) for o in others)


def test_fit_background_exact_size_scale_one_is_identity():
    bg = np.random.default_rng(0).random((20, 30, 3))
    out = fit_background(bg, (20, 30), np.random.default_rng(0), scale_range=(1.0, 1.0))
    np.testing.assert_array_equal(out, bg)


def test_fit_background_crop_comes_from_the_resized_image():
    # a background that is already large enough, scale 1: the output is a window of it
    bg = np.arange(40 * 50, dtype=np.float64).reshape(40, 50) / (40 * 50)
    out = fit_background(bg, (10, 50), np.random.default_rng(3), scale_range=(1.0, 1.0))
    # (10, 50) needs cover scale max(10/40, 50/50) = 1: no resize, vertical offset only
    top = int(round(out[0, 0] * 40 * 50)) // 50
    np.testing.assert_array_equal(out, bg[top : top + 10])


# ------------------------------------------------------------------------- errors
def test_composite_errors_name_the_argument():
    fg, bg, a = np.full((2, 2, 3), 0.5), np.full((2, 2, 3), 0.5), np.full((2, 2), 0.5)
    with pytest.raises(ValueError, match="foreground and background must have the same shape"):
        composite(fg, np.full((2, 3, 3), 0.5), a)
    with pytest.raises(ValueError, match=r"alpha must have shape \(2, 2\) or \(2, 2, 1\)"):
        composite(fg, bg, np.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="alpha must be finite and in"):
        composite(fg, bg, np.full((2, 2), 1.5))
    with pytest.raises(ValueError, match="alpha .*NaN"):
        composite(fg, bg, np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match="foreground must have a floating dtype"):
        composite(np.full((2, 2, 3), 1, np.uint8), bg, a)
    with pytest.raises(ValueError, match="background must be finite and in"):
        composite(fg, -bg, a)
    with pytest.raises(ValueError, match="foreground must have 3 dimensions"):
        composite(fg[0], bg[0], a[0])
    with pytest.raises(ValueError, match="must all be numpy arrays or all torch tensors"):
        composite(fg, bg, torch.from_numpy(a))
    t = torch.full((1, 3, 2, 2), 0.5)
    with pytest.raises(ValueError, match=r"alpha must have shape \(1, 1, 2, 2\)"):
        composite(t, t, torch.full((1, 3, 2, 2), 0.5))


def test_layer_two_instances_errors():
    with pytest.raises(ValueError, match="alpha_front and alpha_back must have the same shape"):
        layer_two_instances(np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match="alpha_back must be finite"):
        layer_two_instances(np.zeros(2), np.full(2, -0.5))


def test_fit_background_errors():
    rng = np.random.default_rng(0)
    bg = np.zeros((10, 10, 3))
    with pytest.raises(ValueError, match="background must be uint8 or float32/float64"):
        fit_background(np.zeros((10, 10), np.int32), (5, 5), rng)
    with pytest.raises(ValueError, match="background must be finite and in"):
        fit_background(bg + 2, (5, 5), rng)
    with pytest.raises(ValueError, match="background must have 2 or 3 dimensions"):
        fit_background(np.zeros(10), (5, 5), rng)
    with pytest.raises(ValueError, match="size_hw must be two positive ints"):
        fit_background(bg, (0, 5), rng)
    with pytest.raises(ValueError, match="scale_range must satisfy"):
        fit_background(bg, (5, 5), rng, scale_range=(1.5, 1.0))
