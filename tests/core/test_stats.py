"""matting_core.stats: hierarchical paired bootstrap of relative changes and verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from matting_core.stats import (
    HELD,
    INCONCLUSIVE,
    NOT_HELD,
    bootstrap_mean_ci,
    bootstrap_relative_change,
    compare,
    finding_verdict,
    verdict,
)

N_IMAGES = 16


def _errors(rng: np.random.Generator, n_seeds: int = 3, n_images: int = N_IMAGES, spread: float = 1.0):
    """Per-image MSE-like errors: image difficulty (log-normal) times small seed noise."""
    difficulty = np.exp(rng.normal(0.0, spread, n_images)) * 1e-2
    return difficulty * np.exp(rng.normal(0.0, 0.05, (n_seeds, n_images)))


def _noisy(rng: np.random.Generator, x: np.ndarray, sd: float = 0.05) -> np.ndarray:
    return x * np.exp(rng.normal(0.0, sd, x.shape))


# --------------------------------------------------------------------------- findings
def test_clear_improvement_is_held():
    rng = np.random.default_rng(1)
    b = _errors(rng)
    a = _noisy(rng, 0.5 * b)
    out = compare(a, b, expect="lower")
    lo, hi = out["ci95"]
    assert out["verdict"] == HELD
    assert lo <= out["delta"] <= hi
    assert abs(out["delta"] - (-0.5)) < 0.05
    assert lo <= -0.5 <= hi
    assert hi < 0.0  # excludes 0
    assert out["mean_a"] == pytest.approx(a.mean())
    assert out["mean_b"] == pytest.approx(b.mean())
    assert out["delta"] == pytest.approx(a.mean() / b.mean() - 1.0)
    assert out["n_images"] == N_IMAGES and out["n_seeds"] == [3, 3]
    assert out["n_boot"] == 2000 and out["level"] == 0.95
    assert out["expect"] == "lower"


def test_clear_worsening_is_not_held():
    rng = np.random.default_rng(2)
    b = _errors(rng)
    a = _noisy(rng, 1.6 * b)
    out = compare(a, b, expect="lower")
    assert out["verdict"] == NOT_HELD
    assert out["ci95"][0] > 0.0
    # The same data read as a claim that A is worse holds.
    assert compare(a, b, expect="higher")["verdict"] == HELD


def test_identical_distributions_are_inconclusive():
    rng = np.random.default_rng(3)
    base = np.exp(rng.normal(0.0, 1.0, N_IMAGES)) * 1e-2
    a = _noisy(rng, np.tile(base, (3, 1)), sd=0.2)
    b = _noisy(rng, np.tile(base, (3, 1)), sd=0.2)
    out = compare(a, b, expect="lower")
    lo, hi = out["ci95"]
    assert lo < 0.0 < hi
    assert out["verdict"] == INCONCLUSIVE
    assert compare(a, b, expect="higher")["verdict"] == INCONCLUSIVE


def test_one_seed_as_2d_row_and_1d_give_the_same_result():
    rng = np.random.default_rng(4)
    b = _errors(rng, n_seeds=1)
    a = _noisy(rng, 0.7 * b)
    two_d = bootstrap_relative_change(a, b, n_boot=500, seed=7)
    one_d = bootstrap_relative_change(a[0], b[0], n_boot=500, seed=7)
    assert two_d == one_d
    assert two_d["n_seeds"] == [1, 1]
    lo, hi = two_d["ci95"]
    assert lo <= two_d["delta"] <= hi and hi < 0.0
    # Mixed: several seeds of A against one seed of B.
    mixed = bootstrap_relative_change(np.vstack([a, a * 1.01]), b[0], n_boot=500, seed=7)
    assert mixed["n_seeds"] == [2, 1]
    # Means: 1-D equals one-row 2-D, and the interval brackets the mean.
    m1, lo1, hi1 = bootstrap_mean_ci(b[0], n_boot=500, seed=3)
    m2, lo2, hi2 = bootstrap_mean_ci(b, n_boot=500, seed=3)
    assert (m1, lo1, hi1) == (m2, lo2, hi2)
    assert lo1 <= m1 <= hi1 and m1 == pytest.approx(b.mean())


def test_mean_ci_with_constant_rows_and_images_is_a_point():
    m, lo, hi = bootstrap_mean_ci(np.full((3, 5), 0.25), n_boot=200)
    assert m == lo == hi == pytest.approx(0.25)


def test_mean_ci_resamples_seeds():
    # Every image equal within a seed, seeds differ: only the seed level varies.
    x = np.repeat(np.array([[1.0], [2.0], [3.0]]), N_IMAGES, axis=1)
    m, lo, hi = bootstrap_mean_ci(x, n_boot=2000, seed=0)
    assert m == pytest.approx(2.0)
    assert lo < 2.0 < hi  # a bootstrap over images alone would give [2, 2]
    assert lo >= 1.0 and hi <= 3.0


def test_determinism_and_seed_dependence():
    rng = np.random.default_rng(5)
    b = _errors(rng)
    a = _noisy(rng, 0.8 * b, sd=0.2)
    r1 = bootstrap_relative_change(a, b, seed=11)
    r2 = bootstrap_relative_change(a, b, seed=11)
    r3 = bootstrap_relative_change(a, b, seed=12)
    assert r1 == r2
    assert r1["delta"] == r3["delta"]  # point estimate does not depend on the seed
    assert r1["ci95"] != r3["ci95"]
    width = r1["ci95"][1] - r1["ci95"][0]
    assert np.allclose(r1["ci95"], r3["ci95"], atol=0.2 * width)  # slightly different
    assert bootstrap_mean_ci(b, seed=4) == bootstrap_mean_ci(b, seed=4)
    assert bootstrap_mean_ci(b, seed=4) != bootstrap_mean_ci(b, seed=5)


def test_interval_covers_known_relative_change():
    """Population with E[a] / E[b] = 0.8 exactly: the 95 % interval covers -0.2 mostly."""
    true_delta = -0.2
    rng = np.random.default_rng(2024)
    hits, reps = 0, 40
    for k in range(reps):
        difficulty = np.exp(rng.normal(0.0, 1.0, N_IMAGES)) * 1e-2
        # Same multiplicative noise model for A and B (seed effect + per-image noise),
        # so the expected ratio is exactly 0.8.
        a = 0.8 * difficulty * np.exp(rng.normal(0.0, 0.05, (3, 1)) + rng.normal(0.0, 0.3, (3, N_IMAGES)))
        b = difficulty * np.exp(rng.normal(0.0, 0.05, (3, 1)) + rng.normal(0.0, 0.3, (3, N_IMAGES)))
        lo, hi = bootstrap_relative_change(a, b, n_boot=500, seed=k)["ci95"]
        hits += lo <= true_delta <= hi
    assert hits >= 0.8 * reps, f"coverage {hits}/{reps}"


def test_pairing_over_images_gives_a_tight_interval():
    rng = np.random.default_rng(6)
    # Per-image errors spanning three orders of magnitude, small seed noise.
    per_image = 10.0 ** rng.uniform(-4.0, -1.0, N_IMAGES)
    b = per_image * np.exp(rng.normal(0.0, 0.002, (3, N_IMAGES)))
    a = 0.9 * b
    out = bootstrap_relative_change(a, b)
    lo, hi = out["ci95"]
    assert out["delta"] == pytest.approx(-0.1)
    assert lo <= -0.1 <= hi
    assert hi - lo < 0.02

    # The same data with independent image resamples for A and B: a wide interval,
    # so the tight one above is due to pairing.
    r = np.random.default_rng(0)
    ia = r.integers(0, N_IMAGES, (2000, N_IMAGES))
    ib = r.integers(0, N_IMAGES, (2000, N_IMAGES))
    unpaired = a[0][ia].mean(axis=1) / b[0][ib].mean(axis=1) - 1.0
    u_lo, u_hi = np.quantile(unpaired, [0.025, 0.975])
    assert u_hi - u_lo > 0.2


def test_level_changes_interval_width():
    rng = np.random.default_rng(8)
    b = _errors(rng)
    a = _noisy(rng, 0.8 * b, sd=0.2)
    wide = bootstrap_relative_change(a, b, level=0.99)
    narrow = bootstrap_relative_change(a, b, level=0.5)
    assert wide["level"] == 0.99
    assert wide["ci95"][0] < narrow["ci95"][0] < narrow["ci95"][1] < wide["ci95"][1]


# --------------------------------------------------------------------------- errors
def test_mismatched_image_counts_raise():
    with pytest.raises(ValueError, match="same images"):
        bootstrap_relative_change(np.ones((3, 16)), np.ones((3, 15)))


def test_nan_raises():
    a = np.ones((2, 4))
    a[1, 2] = np.nan
    with pytest.raises(ValueError, match="a contains NaN"):
        bootstrap_relative_change(a, np.ones((2, 4)))
    with pytest.raises(ValueError, match="b contains NaN"):
        bootstrap_relative_change(np.ones((2, 4)), a)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_mean_ci(a)


def test_zero_baseline_mean_raises():
    with pytest.raises(ValueError, match=r"mean\(b\) is zero"):
        bootstrap_relative_change(np.ones((2, 4)), np.zeros((2, 4)))
    # Zero in a replicate: b is zero on all but one image.
    b = np.zeros(16)
    b[0] = 1.0
    with pytest.raises(ValueError, match=r"mean\(b\) is zero in a bootstrap replicate"):
        bootstrap_relative_change(np.ones(16), b, n_boot=200)


@pytest.mark.parametrize(
    "a, b, match",
    [
        (np.ones((0, 4)), np.ones((1, 4)), "a is empty"),
        (np.ones(4), np.ones((2, 0)), "b is empty"),
        (np.ones((2, 2, 2)), np.ones(2), "1-D .* or 2-D"),
        (-np.ones(4), np.ones(4), "negative"),
        (np.ones(4), np.array([1.0, np.inf, 1.0, 1.0]), "infinite"),
    ],
)
def test_bad_inputs_raise(a, b, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_relative_change(a, b)


@pytest.mark.parametrize("kwargs", [{"n_boot": 0}, {"n_boot": 2.5}, {"level": 1.0}, {"level": 0.0}])
def test_bad_bootstrap_settings_raise(kwargs):
    with pytest.raises(ValueError):
        bootstrap_mean_ci(np.ones(4), **kwargs)


def test_compare_rejects_unknown_expect():
    with pytest.raises(ValueError, match="expect"):
        compare(np.ones(4), np.ones(4), expect="less")


# --------------------------------------------------------------------------- verdicts
@pytest.mark.parametrize(
    "ci, expect, margin, want",
    [
        ((-0.3, -0.1), "lower", 0.0, HELD),
        ((0.1, 0.3), "lower", 0.0, NOT_HELD),
        ((-0.1, 0.1), "lower", 0.0, INCONCLUSIVE),
        ((-0.3, 0.0), "lower", 0.0, INCONCLUSIVE),  # touching 0 is not excluding it
        ((0.0, 0.3), "lower", 0.0, INCONCLUSIVE),
        ((-0.3, -0.1), "higher", 0.0, NOT_HELD),
        ((0.1, 0.3), "higher", 0.0, HELD),
        ((-0.1, 0.1), "higher", 0.0, INCONCLUSIVE),
        # margin 0.05: a dead band [-0.05, 0.05] around 0
        ((-0.3, -0.06), "lower", 0.05, HELD),
        ((-0.3, -0.04), "lower", 0.05, INCONCLUSIVE),
        ((0.04, 0.3), "lower", 0.05, INCONCLUSIVE),
        ((0.06, 0.3), "lower", 0.05, NOT_HELD),
        ((0.06, 0.3), "higher", 0.05, HELD),
        ((0.04, 0.3), "higher", 0.05, INCONCLUSIVE),
        ((-0.3, -0.06), "higher", 0.05, NOT_HELD),
    ],
)
def test_verdict_rule(ci, expect, margin, want):
    assert verdict(ci, expect=expect, margin=margin) == want


def test_verdict_accepts_lists_and_numpy():
    assert verdict([-0.2, -0.1]) == HELD
    assert verdict(np.array([0.1, 0.2])) == NOT_HELD


@pytest.mark.parametrize(
    "ci, kwargs",
    [
        ((0.2, -0.2), {}),
        ((np.nan, 0.1), {}),
        ((0.1,), {}),
        ((-0.1, 0.1), {"expect": "smaller"}),
        ((-0.1, 0.1), {"margin": -0.01}),
    ],
)
def test_verdict_rejects_bad_input(ci, kwargs):
    with pytest.raises(ValueError):
        verdict(ci, **kwargs)


def test_compare_passes_margin_to_verdict():
    rng = np.random.default_rng(9)
    b = _errors(rng)
    a = _noisy(rng, 0.9 * b, sd=0.01)
    plain = compare(a, b, n_boot=500)
    assert plain["verdict"] == HELD and plain["ci95"][1] > -0.5
    strict = compare(a, b, n_boot=500, margin=0.5)
    assert strict["verdict"] == INCONCLUSIVE and strict["margin"] == 0.5
    assert strict["ci95"] == plain["ci95"]


def test_finding_verdict_combinations():
    assert finding_verdict([HELD, HELD]) == HELD
    assert finding_verdict([HELD]) == HELD
    assert finding_verdict([HELD, INCONCLUSIVE]) == INCONCLUSIVE
    assert finding_verdict([INCONCLUSIVE, INCONCLUSIVE]) == INCONCLUSIVE
    assert finding_verdict([HELD, NOT_HELD]) == NOT_HELD
    assert finding_verdict([INCONCLUSIVE, NOT_HELD, HELD]) == NOT_HELD
    # compare() results are accepted directly (e.g. F3: student vs seg-only and vs S-only).
    rng = np.random.default_rng(10)
    seg_only = _errors(rng)
    s_only = _noisy(rng, 1.2 * seg_only)
    student = _noisy(rng, 0.6 * seg_only)
    parts = [compare(student, seg_only, n_boot=500), compare(student, s_only, n_boot=500)]
    assert [p["verdict"] for p in parts] == [HELD, HELD]
    assert finding_verdict(parts) == HELD
    parts.append(compare(s_only, seg_only, n_boot=500))  # S-only is worse: not held
    assert finding_verdict(parts) == NOT_HELD


def test_finding_verdict_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        finding_verdict([])
    with pytest.raises(ValueError, match="unknown verdict"):
        finding_verdict([HELD, "maybe"])
    with pytest.raises(ValueError, match="unknown verdict"):
        finding_verdict([{"delta": -0.1}])
