"""Tests for matting_core.metrics: hand-worked golden values, properties, and mmeval
0.2.1 as the reference oracle.

How mmeval is fed so that the comparison is like-for-like
---------------------------------------------------------
* Every argument is a one-element list: ``metric([pred], [gt], [trimap])``. Its
  ``add`` zips over sequences, so a bare 2-D array would be iterated row by row.
* Alphas are float64 in [0, 1], not 0..255, whatever its docstrings say:
  ConnectivityError marks "level not set yet" with ``-np.ones_like(gt)`` (wraps to 255
  for uint8) and thresholds at 0.1..1.0; GradientError min-max normalises into an
  array of the input dtype (uint8 would collapse to {0, 1}); SAD/MSE would come out
  255x / 255^2x larger.
* SAD, Grad and Conn already divide by ``norm_const=1000``; MSE does not. Our units are
  the same, so values are compared directly.
* Regions. SumAbsoluteDifferences has no mask and sums every pixel;
  MattingMeanSquaredError sums every pixel and divides by ``count(trimap == 128)`` (it
  expects the prediction to be "masked by the trimap" already). For a region we pass
  ``where(region, pred, gt)`` (zero error outside) and ``trimap = 128`` inside, 0
  outside. GradientError and ConnectivityError compute on the whole image and sum
  over ``trimap == 128``, so they get the raw ``pred`` and the same region trimap.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from matting_core.metrics import (
    connectivity_error,
    error_maps,
    evaluate_alpha,
    gradient_error,
    mse,
    sad,
)
from matting_core.regions import eval_trimap

try:  # the oracle (dev dependency); golden and property tests run without it
    import mmeval
except ImportError:  # pragma: no cover
    mmeval = None
requires_mmeval = pytest.mark.skipif(mmeval is None, reason="mmeval (dev extra) not installed")

FAST = settings(max_examples=50, deadline=None)
unit = st.floats(0.0, 1.0, allow_nan=False, allow_subnormal=False, width=64)


# ------------------------------------------------------------------------ fixtures
def _disc(h, w, cy, cx, radius, edge):
    yy, xx = np.mgrid[:h, :w]
    return np.clip((radius - np.hypot(yy - cy, xx - cx)) / edge, 0.0, 1.0)


def _strands(h, w, rng, count=12):
    """Hair-like soft lines: thin diagonal strokes with random strength."""
    alpha = np.zeros((h, w))
    yy, xx = np.mgrid[:h, :w]
    for _ in range(count):
        x0, slope, strength = rng.uniform(0, w), rng.uniform(-1.5, 1.5), rng.uniform(0.2, 1)
        dist = np.abs(xx - (x0 + slope * (yy - h / 2))) / math.hypot(1, slope)
        alpha = np.maximum(alpha, strength * np.clip(1.0 - dist, 0.0, 1.0))
    return alpha


def _case(name):
    rng = np.random.default_rng(sum(map(ord, name)))  # a fixed seed per case
    h, w = 56, 72
    disc = _disc(h, w, 28, 36, 18, 5)
    if name == "uniform":
        return rng.random((h, w)), rng.random((h, w))
    if name == "disc":
        pred = np.clip(_disc(h, w, 30, 33, 17, 8) + rng.normal(0, 0.05, (h, w)), 0, 1)
        return pred, disc
    if name == "disc_with_blobs":  # false-positive blobs away from the person
        pred = disc.copy()
        pred[2:8, 2:10] = 0.9
        pred[45:50, 60:70] = 0.4
        return pred, disc
    if name == "strands":
        gt = np.maximum(_strands(h, w, rng), 0.8 * disc)
        return np.clip(gt + rng.normal(0, 0.1, (h, w)), 0, 1), gt
    if name == "gt_all_zero":
        return rng.random((h, w)) ** 4, np.zeros((h, w))
    if name == "gt_all_one":
        return 1 - rng.random((h, w)) ** 4, np.ones((h, w))
    if name == "both_zero":
        return np.zeros((h, w)), np.zeros((h, w))
    if name == "both_one":
        return np.ones((h, w)), np.ones((h, w))
    if name == "constant_pred":
        return np.full((h, w), 0.5), disc
    if name == "tenths":  # values exactly on the connectivity thresholds
        return np.round(rng.random((h, w)) * 10) / 10, np.round(disc * 10) / 10
    if name == "eight_bit":
        return np.round(rng.random((h, w)) * 255) / 255, np.round(disc * 255) / 255
    raise KeyError(name)


CASES = [
    "uniform", "disc", "disc_with_blobs", "strands", "gt_all_zero", "gt_all_one",
    "both_zero", "both_one", "constant_pred", "tenths", "eight_bit",
]  # fmt: skip


def _region(name, gt):
    if name == "whole":
        return np.ones(gt.shape, bool)
    return eval_trimap(gt) == 128  # the "unknown" region of a trimap


def _mmeval_values(pred, gt, region):
    trimap = np.where(region, 128, 0).astype(np.uint8)
    pred_in_region = np.where(region, pred, gt)
    return {
        "sad": mmeval.SumAbsoluteDifferences()([pred_in_region], [gt])["sad"],
        "mse": mmeval.MattingMeanSquaredError()([pred_in_region], [gt], [trimap])["matting_mse"],
        "grad": mmeval.GradientError()([pred], [gt], [trimap])["gradient_error"],
        "conn": mmeval.ConnectivityError()([pred], [gt], [trimap])["connectivity_error"],
    }


ORACLE_TOLERANCE = {"sad": 1e-9, "mse": 1e-9, "grad": 1e-4, "conn": 1e-4}


# ------------------------------------------------------------------------- oracle
@requires_mmeval
@pytest.mark.parametrize("region_name", ["whole", "unknown"])
@pytest.mark.parametrize("case", CASES)
def test_metrics_match_mmeval(case, region_name):
    pred, gt = _case(case)
    region = _region(region_name, gt)
    mask = None if region_name == "whole" else region
    ours = {
        "sad": sad(pred, gt, mask),
        "mse": mse(pred, gt, mask),
        "grad": gradient_error(pred, gt, mask),
        "conn": connectivity_error(pred, gt, mask),
    }
    reference = _mmeval_values(pred, gt, region)
    for key, value in ours.items():
        assert value == pytest.approx(reference[key], rel=ORACLE_TOLERANCE[key], abs=1e-12), key
    if case not in ("both_zero", "both_one") and region_name == "whole":
        assert ours["sad"] > 0  # the oracle comparison is not 0 == 0 everywhere


def test_oracle_cases_exercise_connectivity():
    # if every case had Conn == 0 the oracle test above could not catch a wrong level map
    values = [connectivity_error(*_case(c)) for c in CASES]
    assert sum(v > 0 for v in values) >= 7


@requires_mmeval
@pytest.mark.parametrize("case", ["disc", "strands", "tenths"])
def test_evaluate_alpha_unknown_region_matches_mmeval(case):
    pred, gt = _case(case)
    trimap = eval_trimap(gt, kernel_size=9)
    result = evaluate_alpha(pred, gt, trimap)["unknown"]
    reference = _mmeval_values(pred, gt, trimap == 128)
    for key, tol in ORACLE_TOLERANCE.items():
        assert result[key] == pytest.approx(reference[key], rel=tol, abs=1e-12), key


# ------------------------------------------------------------------------- golden
PRED_2x2 = np.array([[0.0, 0.5], [1.0, 0.25]])
GT_2x2 = np.array([[0.5, 0.5], [0.0, 1.0]])
DIAGONAL = np.array([[True, False], [False, True]])


def test_sad_golden():
    assert sad(PRED_2x2, GT_2x2) == pytest.approx((0.5 + 0 + 1 + 0.75) / 1000, rel=1e-12)
    assert sad(PRED_2x2, GT_2x2, DIAGONAL) == pytest.approx((0.5 + 0.75) / 1000, rel=1e-12)
    assert sad(PRED_2x2, GT_2x2, np.zeros((2, 2), bool)) == 0.0


def test_mse_golden():
    assert mse(PRED_2x2, GT_2x2) == pytest.approx((0.25 + 0 + 1 + 0.5625) / 4, rel=1e-12)
    assert mse(PRED_2x2, GT_2x2, DIAGONAL) == pytest.approx((0.25 + 0.5625) / 2, rel=1e-12)
    assert mse(PRED_2x2, GT_2x2, np.zeros((2, 2), bool)) == 0.0


def test_connectivity_golden_small_component_drops_to_level_zero():
    # t = 0.1: components {0, 1} (size 2) and {3} (size 1): pixel 3 gets level 0.
    # pixel 3: gt d = 1 -> phi 0, pred d = 0.5 -> phi 0.5; others phi 1 in both
    pred = np.array([[1.0, 1.0, 0.0, 0.5]])
    gt = np.array([[1.0, 1.0, 0.0, 1.0]])
    assert connectivity_error(pred, gt) == pytest.approx(0.5 / 1000, rel=1e-12)


def test_connectivity_golden_uses_4_connectivity():
    # diagonal pixels are separate components with 4-connectivity: (1,1) gets level 0,
    # phi_gt = 1 - 0.8 = 0.2, phi_pred = 1 - 1 = 0  -> 0.2 (8-connectivity would give 0.3)
    pred = np.array([[1.0, 0.0], [0.0, 1.0]])
    gt = np.array([[1.0, 0.0], [0.0, 0.8]])
    assert connectivity_error(pred, gt) == pytest.approx(0.2 / 1000, rel=1e-12)


def test_connectivity_golden_tie_goes_to_first_component_in_raster_order():
    # at t = 0.1 both single pixels are largest; (0,0) wins. It drops at 0.2 -> level 0.1:
    # phi_gt = 1 (d = 0), phi_pred = 1 - 0.9 -> 0.9. (1,1) has level 0, phi 0 in both.
    # Had (1,1) won, (0,0) would have level 0 and the error would be 1.0.
    pred = np.array([[1.0, 0.0], [0.0, 1.0]])
    gt = np.array([[0.1, 0.0], [0.0, 1.0]])
    assert connectivity_error(pred, gt) == pytest.approx(0.9 / 1000, rel=1e-9)


def test_connectivity_golden_phi_threshold_is_inclusive():
    # pixel 2 is never in a component (pred = 0): level 0, d_gt = 0.15 exactly, and
    # phi = 1 - d * [d >= 0.15] = 0.85 (a strict ">" would give phi = 1, error 0)
    pred = np.array([[1.0, 1.0, 0.0]])
    gt = np.array([[1.0, 1.0, 0.15]])
    assert connectivity_error(pred, gt) == pytest.approx(0.15 / 1000, rel=1e-12)


def test_connectivity_region_sum():
    pred = np.array([[1.0, 1.0, 0.0, 0.5]])
    gt = np.array([[1.0, 1.0, 0.0, 1.0]])
    assert connectivity_error(pred, gt, np.array([[True, True, True, False]])) == 0.0
    assert connectivity_error(pred, gt, np.array([[False, False, False, True]])) > 0.0


def _reference_step_gradient_error(height, width, sigma=1.4, half=4):
    """Gradient error of a vertical 0|1 step against a constant prediction, from scratch.

    For an image constant along y with replicated borders, the y-derivative vanishes and
    the x-derivative is (sum of the unit-norm Gaussian) * (1-D correlation with the
    unit-norm Gaussian derivative).
    """
    x = np.arange(-half, half + 1)
    gauss = np.exp(-(x**2) / (2 * sigma**2))
    dgauss = -x * gauss
    gauss, dgauss = gauss / np.sqrt((gauss**2).sum()), dgauss / np.sqrt((dgauss**2).sum())
    step = (np.arange(width) >= width // 2).astype(float)
    gx = np.array(
        [sum(dgauss[j] * step[min(max(c + j - half, 0), width - 1)] for j in range(2 * half + 1)) for c in range(width)]
    )
    return height * np.sum((gauss.sum() * gx) ** 2) / 1000


def test_gradient_error_golden_step_edge():
    h, w = 5, 12
    gt = np.tile((np.arange(w) >= w // 2).astype(float), (h, 1))
    expected = _reference_step_gradient_error(h, w)
    assert gradient_error(np.zeros((h, w)), gt) == pytest.approx(expected, rel=1e-9)
    assert gradient_error(gt, gt) == 0.0


def test_gradient_error_min_max_normalises_each_matte():
    # DIM reference code (mat2gray) and mmeval normalise each matte to [0, 1] first,
    # so a prediction scaled into [0, 0.5] has the same gradient error
    pred, gt = _case("disc")
    pred = (pred - pred.min()) / (pred.max() - pred.min())
    assert gradient_error(0.5 * pred, gt) == pytest.approx(gradient_error(pred, gt), rel=1e-9)
    assert gradient_error(np.full(gt.shape, 0.3), gt) == pytest.approx(
        gradient_error(np.zeros(gt.shape), gt), rel=1e-12
    )


# --------------------------------------------------------------------- properties
@st.composite
def alpha_pairs(draw):
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    values = st.one_of(st.just(0.0), st.just(1.0), unit)
    make = arrays(np.float64, (h, w), elements=values)
    return draw(make), draw(make)


@FAST
@given(alpha_pairs())
def test_sad_symmetric_and_zero_iff_equal(pair):
    pred, gt = pair
    assert sad(pred, gt) == sad(gt, pred)
    assert (sad(pred, gt) == 0.0) == bool(np.array_equal(pred, gt))
    assert sad(pred, pred) == 0.0
    assert mse(pred, pred) == 0.0
    if sad(pred, gt) > 1e-100:  # (p - g)^2 only underflows for |p - g| < 1e-154
        assert mse(pred, gt) > 0.0


@FAST
@given(alpha_pairs())
def test_grad_and_conn_symmetric_and_zero_on_equal(pair):
    pred, gt = pair
    assert gradient_error(pred, gt) == pytest.approx(gradient_error(gt, pred), rel=1e-12, abs=1e-15)
    assert connectivity_error(pred, gt) == pytest.approx(connectivity_error(gt, pred), rel=1e-12)
    # cv2's SIMD filter paths may differ in the last bits between two calls: ~1e-34, not 0
    assert gradient_error(pred, pred) < 1e-20
    assert connectivity_error(pred, pred) == 0.0


@FAST
@given(alpha_pairs())
def test_evaluate_alpha_equals_the_single_metrics(pair):
    pred, gt = pair
    trimap = eval_trimap(gt, kernel_size=3)
    result = evaluate_alpha(pred, gt, trimap)
    boundary = (gt > 0.05) & (gt < 0.95)
    for name, mask in (("whole", None), ("boundary", boundary), ("unknown", trimap == 128)):
        got = result[name]
        assert got["sad"] == pytest.approx(sad(pred, gt, mask), rel=1e-12, abs=1e-15)
        assert got["mse"] == pytest.approx(mse(pred, gt, mask), rel=1e-12, abs=1e-15)
        assert got["grad"] == pytest.approx(gradient_error(pred, gt, mask), rel=1e-12, abs=1e-15)
        assert got["conn"] == pytest.approx(connectivity_error(pred, gt, mask), rel=1e-12, abs=1e-15)


def test_evaluate_alpha_keys_and_types():
    pred, gt = _case("disc")
    result = evaluate_alpha(pred, gt)
    assert list(result) == ["whole", "boundary"]
    assert all(list(v) == ["sad", "mse", "grad", "conn"] for v in result.values())
    assert all(type(x) is float for v in result.values() for x in v.values())
    assert list(evaluate_alpha(pred, gt, eval_trimap(gt))) == ["whole", "boundary", "unknown"]
    assert result["boundary"]["sad"] < result["whole"]["sad"]


def test_error_maps_sum_to_metrics_and_accept_float32():
    pred, gt = _case("strands")
    maps = error_maps(pred.astype(np.float32), gt.astype(np.float32))
    assert set(maps) == {"sad", "mse", "grad", "conn"}
    assert all(m.shape == gt.shape and m.dtype == np.float64 for m in maps.values())
    p32, g32 = pred.astype(np.float32), gt.astype(np.float32)
    assert maps["sad"].sum() / 1000 == pytest.approx(sad(p32, g32), rel=1e-12)
    assert maps["conn"].sum() / 1000 == pytest.approx(connectivity_error(p32, g32), rel=1e-12)


def test_connectivity_is_vectorised_with_many_components():
    # Uniform noise at 512x512 has tens of thousands of 4-connected components per
    # threshold: any per-component or per-pixel Python loop takes many seconds, the
    # vectorised version ~0.05 s. The 2048x2048 timing against mmeval is in
    # benchmarks/bench_metrics.py (a wall-clock bound at that size is flaky on a
    # shared 2-core runner).
    rng = np.random.default_rng(0)
    pred, gt = rng.random((512, 512)), rng.random((512, 512))
    best = math.inf
    for _ in range(2):
        start = time.perf_counter()
        connectivity_error(pred, gt)
        best = min(best, time.perf_counter() - start)
    assert best < 1.0, f"connectivity_error took {best:.2f} s on 512x512 noise"


# ------------------------------------------------------------------------- errors
@pytest.mark.parametrize("metric", [sad, mse, gradient_error, connectivity_error, evaluate_alpha])
def test_bad_alpha_inputs_name_the_argument(metric):
    good = np.full((3, 3), 0.5)
    with pytest.raises(ValueError, match="pred and gt must have the same shape"):
        metric(good, np.full((3, 4), 0.5))
    with pytest.raises(ValueError, match="pred .*NaN"):
        metric(np.full((3, 3), np.nan), good)
    with pytest.raises(ValueError, match="gt must be finite and in"):
        metric(good, np.full((3, 3), 255.0))
    with pytest.raises(ValueError, match="gt must have a floating dtype, got uint8"):
        metric(good, np.full((3, 3), 128, np.uint8))
    with pytest.raises(ValueError, match="pred must have 2 dimensions"):
        metric(good[None], good)
    with pytest.raises(ValueError, match="pred must be a numpy array"):
        metric(good.tolist(), good)


@pytest.mark.parametrize("metric", [sad, mse, gradient_error, connectivity_error])
def test_bad_mask_names_the_argument(metric):
    good = np.full((3, 3), 0.5)
    with pytest.raises(ValueError, match="mask must be a bool numpy array"):
        metric(good, good, np.full((3, 3), 128, np.uint8))
    with pytest.raises(ValueError, match=r"mask must have shape \(3, 3\)"):
        metric(good, good, np.ones((3, 4), bool))


def test_bad_trimap_names_the_argument():
    good = np.full((3, 3), 0.5)
    with pytest.raises(ValueError, match="trimap must be a uint8"):
        evaluate_alpha(good, good, np.full((3, 3), 0.5))
    with pytest.raises(ValueError, match=r"trimap must have shape \(3, 3\)"):
        evaluate_alpha(good, good, np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match="trimap must only contain 0"):
        evaluate_alpha(good, good, np.full((3, 3), 127, np.uint8))
