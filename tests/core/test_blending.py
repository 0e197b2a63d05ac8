"""Tests for matting_core.blending: M~ = beta * alpha_t + (1 - beta) * S."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from matting_core.blending import BLEND_MODES, blend_labels

FAST = settings(max_examples=50, deadline=None)
unit = st.floats(0.0, 1.0, allow_nan=False, width=32)


@st.composite
def label_triples(draw, batched=False):
    h, w = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    shape = (draw(st.integers(1, 3)), 1, h, w) if batched else (h, w)
    values = st.one_of(st.just(0.0), st.just(0.5), st.just(1.0), unit)
    make = arrays(np.float32, shape, elements=values)
    return draw(make), draw(make), draw(make)  # teacher, boundary_prob, seg


# ------------------------------------------------------------------------ golden
def test_soft_blend_golden():
    teacher = np.array([[0.2, 0.9]])
    prob = np.array([[0.25, 0.75]])
    seg = np.array([[1.0, 0.0]])
    out = blend_labels(teacher, prob, seg)
    assert out.dtype == np.float32
    # 0.25*0.2 + 0.75*1 = 0.8 ; 0.75*0.9 + 0.25*0 = 0.675
    np.testing.assert_allclose(out, [[0.8, 0.675]], rtol=1e-6)


def test_hard_blend_golden_threshold_is_inclusive():
    teacher = np.array([[0.2, 0.9, 0.4]])
    prob = np.array([[0.25, 0.75, 0.5]])
    seg = np.array([[1.0, 0.0, 0.0]])
    out = blend_labels(teacher, prob, seg, mode="hard")
    np.testing.assert_allclose(out, [[1.0, 0.9, 0.4]], rtol=1e-6)  # beta = [0, 1, 1]


def test_hard_blend_dilation_golden():
    teacher = np.full((5, 5), 0.3)
    seg = np.zeros((5, 5))
    prob = np.zeros((5, 5))
    prob[2, 2] = 0.6
    out = blend_labels(teacher, prob, seg, mode="hard", dilate=1)
    expected = np.zeros((5, 5), np.float32)
    expected[1:4, 1:4] = 0.3  # beta dilated by a 3x3 square
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    corner = np.zeros((5, 5))
    corner[0, 0] = 0.9
    out = blend_labels(teacher, corner, seg, mode="hard", dilate=2)
    expected = np.zeros((5, 5), np.float32)
    expected[:3, :3] = 0.3  # no wrap-around, border does not dilate inward
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_torch_batched_golden_keeps_device_and_has_no_grad():
    teacher = torch.tensor([[[[0.2, 0.9]]]], requires_grad=True)
    prob = torch.tensor([[[[0.25, 0.75]]]])
    seg = torch.tensor([[[[1.0, 0.0]]]])
    out = blend_labels(teacher, prob, seg)
    assert out.dtype == torch.float32 and out.shape == (1, 1, 1, 2)
    assert not out.requires_grad
    torch.testing.assert_close(out, torch.tensor([[[[0.8, 0.675]]]]))


# --------------------------------------------------------------------- properties
@FAST
@given(label_triples(), st.sampled_from(BLEND_MODES))
def test_blend_is_seg_where_beta_zero_and_teacher_where_beta_one(triple, mode):
    teacher, prob, seg = triple
    out = blend_labels(teacher, prob, seg, mode=mode)
    beta = prob if mode == "soft" else (prob >= 0.5).astype(np.float32)
    np.testing.assert_array_equal(out[beta == 0], seg[beta == 0])
    np.testing.assert_array_equal(out[beta == 1], teacher[beta == 1])


@FAST
@given(label_triples(), st.sampled_from(BLEND_MODES))
def test_blend_between_its_inputs(triple, mode):
    teacher, prob, seg = triple
    out = blend_labels(teacher, prob, seg, mode=mode)
    assert out.shape == teacher.shape and out.dtype == np.float32
    assert np.all(out >= np.minimum(teacher, seg) - 1e-6)
    assert np.all(out <= np.maximum(teacher, seg) + 1e-6)


@FAST
@given(label_triples(batched=True), st.sampled_from(["soft", "hard"]), st.integers(0, 3))
def test_numpy_and_torch_agree_batched(triple, mode, dilate):
    dilate = dilate if mode == "hard" else 0
    out_np = blend_labels(*triple, mode=mode, dilate=dilate)
    out_t = blend_labels(*(torch.from_numpy(x) for x in triple), mode=mode, dilate=dilate)
    np.testing.assert_allclose(out_t.numpy(), out_np, rtol=0, atol=1e-6)


@FAST
@given(label_triples(), st.integers(1, 3))
def test_numpy_and_torch_agree_unbatched_dilated(triple, dilate):
    out_np = blend_labels(*triple, mode="hard", dilate=dilate)
    out_t = blend_labels(*(torch.from_numpy(x) for x in triple), mode="hard", dilate=dilate)
    assert out_t.shape == out_np.shape
    np.testing.assert_allclose(out_t.numpy(), out_np, rtol=0, atol=1e-6)


@FAST
@given(label_triples(batched=True), st.integers(1, 3))
def test_dilation_only_moves_towards_teacher(triple, dilate):
    teacher, prob, seg = triple
    plain = blend_labels(teacher, prob, seg, mode="hard")
    dilated = blend_labels(teacher, prob, seg, mode="hard", dilate=dilate)
    kept = (prob >= 0.5)
    np.testing.assert_array_equal(dilated[kept], plain[kept])
    changed = dilated != plain
    np.testing.assert_array_equal(dilated[changed], teacher[changed])


def test_batched_numpy_dilation_is_per_sample():
    teacher = np.ones((2, 1, 3, 3))
    seg = np.zeros((2, 1, 3, 3))
    prob = np.zeros((2, 1, 3, 3))
    prob[0, 0, 0, 0] = 1.0
    out = blend_labels(teacher, prob, seg, mode="hard", dilate=1)
    assert out[0, 0].sum() == 4 and out[1].sum() == 0


# ------------------------------------------------------------------------- errors
def test_blend_errors():
    x = np.full((2, 2), 0.5)
    with pytest.raises(ValueError, match="mode must be one of 'soft', 'hard'; got 'binary'"):
        blend_labels(x, x, x, mode="binary")
    with pytest.raises(ValueError, match="dilate > 0 needs mode='hard'"):
        blend_labels(x, x, x, mode="soft", dilate=2)
    with pytest.raises(ValueError, match="dilate must be an int >= 0"):
        blend_labels(x, x, x, mode="hard", dilate=-1)
    with pytest.raises(ValueError, match="teacher_alpha and boundary_prob and seg_mask must have the same shape"):
        blend_labels(x, np.full((2, 3), 0.5), x)
    with pytest.raises(ValueError, match="boundary_prob must be finite and in"):
        blend_labels(x, x + 1.0, x)
    with pytest.raises(ValueError, match="seg_mask .*NaN"):
        blend_labels(x, x, np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match="seg_mask must have a floating dtype"):
        blend_labels(x, x, np.ones((2, 2), np.uint8))
    with pytest.raises(ValueError, match="teacher_alpha must have 2 or 4 dimensions"):
        blend_labels(x[0], x[0], x[0])
    with pytest.raises(ValueError, match=r"teacher_alpha must have shape \(H, W\) or \(N, 1, H, W\)"):
        y = np.full((1, 2, 2, 2), 0.5)
        blend_labels(y, y, y)
    with pytest.raises(ValueError, match="must all be numpy arrays or all torch tensors"):
        blend_labels(x, x, torch.from_numpy(x))
    t = torch.full((1, 1, 2, 2), 0.5)
    with pytest.raises(ValueError, match="teacher_alpha must be finite"):
        blend_labels(t * 3, t, t)
