"""Bootstrap intervals and verdicts for comparing per-image errors across seeds.

Data layout. One model's results are an array ``(n_seeds, n_images)`` of per-image
errors (e.g. MSE on the validation set), one row per training seed; a 1-D array
``(n_images,)`` is one seed. Two models compared on a finding use the SAME images in
the SAME column order (paired over images); their seeds are independent runs.

Hierarchical (two-level) bootstrap. Each replicate ``r`` draws

1. seed counts ``c_s`` ~ Multinomial(S, 1/S each) -- S seeds drawn with replacement;
2. image counts ``w_i`` ~ Multinomial(N, 1/N each) -- N images drawn with replacement,
   one draw shared by every drawn seed (the images are the same for all seeds),

and takes the mean of the resampled table::

    m_r = sum_s sum_i c_s * w_i * x[s, i] / (S * N)

which equals the mean of ``x[seeds_r][:, images_r]``. For a comparison of A with B the
seed counts are drawn independently for A and for B (independent runs), while the
image counts ``w`` are drawn once and applied to both (paired)::

    delta_r = m_r(A; c^A, w) / m_r(B; c^B, w) - 1

Point estimates use the data as given: ``mean = x.mean()`` and
``delta = mean(A) / mean(B) - 1`` (negative = A has lower error). The interval is the
percentile interval ``[q_{(1-level)/2}, q_{(1+level)/2}]`` of the replicates
(``numpy.quantile``, linear interpolation). With one seed the seed level is constant,
so the interval reflects image sampling only; with few seeds (e.g. 3) seed variability
is under-estimated by the factor (S-1)/S inherent to resampling S values.

Random draws come from ``numpy.random.default_rng(seed)`` in a fixed order (seed
counts of A, seed counts of B, image counts), so results are deterministic given
``seed``.

Verdicts (see :func:`verdict`) turn an interval of the relative change into one of
:data:`HELD`, :data:`NOT_HELD`, :data:`INCONCLUSIVE`; :func:`finding_verdict` combines
several comparisons that must all hold.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "HELD",
    "NOT_HELD",
    "INCONCLUSIVE",
    "bootstrap_mean_ci",
    "bootstrap_relative_change",
    "verdict",
    "compare",
    "finding_verdict",
]

HELD = "held"
NOT_HELD = "not held"
INCONCLUSIVE = "inconclusive"
_VERDICTS = (HELD, NOT_HELD, INCONCLUSIVE)
_EXPECT = ("lower", "higher")


# --------------------------------------------------------------------------- checks
def _as_table(name: str, values: Any) -> np.ndarray:
    """``values`` as a float64 ``(n_seeds, n_images)`` array; 1-D input is one seed."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if x.ndim != 2:
        raise ValueError(
            f"{name} must be 1-D (n_images,) or 2-D (n_seeds, n_images), got shape {x.shape}"
        )
    if x.size == 0:
        raise ValueError(f"{name} is empty (shape {x.shape}); need at least one seed and one image")
    if np.isnan(x).any():
        raise ValueError(f"{name} contains NaN ({int(np.isnan(x).sum())} entries)")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains infinite values")
    return x


def _check_boot(n_boot: Any, level: Any) -> tuple[int, float]:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    level = float(level)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    return int(n_boot), level


def _seed_counts(rng: np.random.Generator, n_seeds: int, n_boot: int) -> np.ndarray:
    """``(n_boot, n_seeds)`` multiplicities of seeds drawn with replacement."""
    return rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=n_boot)


def _image_counts(rng: np.random.Generator, n_images: int, n_boot: int) -> np.ndarray:
    """``(n_boot, n_images)`` multiplicities of images drawn with replacement."""
    return rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=n_boot)


def _replicate_means(x: np.ndarray, c: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``m_r = sum_s sum_i c[r, s] w[r, i] x[s, i] / (S N)`` for every replicate r."""
    s, n = x.shape
    return np.einsum("rs,si,ri->r", c, x, w) / (s * n)


def _percentiles(reps: np.ndarray, level: float) -> tuple[float, float]:
    alpha = 1.0 - level
    lo, hi = np.quantile(reps, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


# --------------------------------------------------------------------------- bootstrap
def bootstrap_mean_ci(
    values: Any, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``values`` and its hierarchical-bootstrap percentile interval.

    ``values``: ``(n_seeds, n_images)`` or ``(n_images,)`` (one seed). Each replicate
    resamples seeds with replacement, then images with replacement (one image resample
    shared by all drawn seeds), and takes the mean
    ``m_r = sum_s sum_i c_s w_i x[s, i] / (S N)``.

    Returns ``(mean, lo, hi)``: ``mean = values.mean()`` and ``[lo, hi]`` the
    ``(1-level)/2`` and ``(1+level)/2`` quantiles of the ``n_boot`` replicates.
    Raises ``ValueError`` on empty input, NaN/inf, or a bad ``n_boot``/``level``.
    """
    x = _as_table("values", values)
    n_boot, level = _check_boot(n_boot, level)
    rng = np.random.default_rng(seed)
    s, n = x.shape
    reps = _replicate_means(x, _seed_counts(rng, s, n_boot), _image_counts(rng, n, n_boot))
    lo, hi = _percentiles(reps, level)
    return float(x.mean()), lo, hi


def bootstrap_relative_change(
    a: Any, b: Any, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """Relative change ``delta = mean(a) / mean(b) - 1`` with a paired bootstrap interval.

    ``a``: ``(n_seeds_a, n_images)``, ``b``: ``(n_seeds_b, n_images)`` (1-D = one seed),
    per-image errors on the same images in the same column order; negative ``delta``
    means A has lower error than B. Each replicate draws seed counts ``c^A`` and ``c^B``
    independently (independent runs) and one image count vector ``w`` applied to both
    (paired over images), then ``delta_r = m(a; c^A, w) / m(b; c^B, w) - 1`` with
    ``m(x; c, w) = sum_s sum_i c_s w_i x[s, i] / (S N)``. The interval is the percentile
    interval of the ``delta_r`` at ``level`` (stored under ``"ci95"`` whatever the level).

    Returns ``{"delta", "ci95": [lo, hi], "mean_a", "mean_b", "n_images",
    "n_seeds": [sa, sb], "n_boot", "level"}``.

    Raises ``ValueError`` for: different image counts, empty input, NaN/inf, negative
    errors (a ratio of means of errors needs non-negative values), ``mean(b) == 0``,
    or a bootstrap replicate whose B mean is 0 (B is zero on most images).
    """
    xa = _as_table("a", a)
    xb = _as_table("b", b)
    if xa.shape[1] != xb.shape[1]:
        raise ValueError(
            f"a and b must hold the same images (paired columns): a has {xa.shape[1]} images, "
            f"b has {xb.shape[1]}"
        )
    for name, x in (("a", xa), ("b", xb)):
        if (x < 0).any():
            raise ValueError(f"{name} contains negative errors; the relative change needs errors >= 0")
    n_boot, level = _check_boot(n_boot, level)
    mean_a, mean_b = float(xa.mean()), float(xb.mean())
    if mean_b == 0.0:
        raise ValueError("mean(b) is zero: the relative change mean(a)/mean(b) - 1 is undefined")

    rng = np.random.default_rng(seed)
    (sa, n), (sb, _) = xa.shape, xb.shape
    ca = _seed_counts(rng, sa, n_boot)
    cb = _seed_counts(rng, sb, n_boot)
    w = _image_counts(rng, n, n_boot)  # shared: paired over images
    ma = _replicate_means(xa, ca, w)
    mb = _replicate_means(xb, cb, w)
    if (mb == 0.0).any():
        raise ValueError(
            "mean(b) is zero in a bootstrap replicate (b is zero on most images): "
            "the relative change is undefined"
        )
    lo, hi = _percentiles(ma / mb - 1.0, level)
    return {
        "delta": mean_a / mean_b - 1.0,
        "ci95": [lo, hi],
        "mean_a": mean_a,
        "mean_b": mean_b,
        "n_images": int(n),
        "n_seeds": [int(sa), int(sb)],
        "n_boot": n_boot,
        "level": level,
    }


# --------------------------------------------------------------------------- verdicts
def verdict(ci: Sequence[float], expect: str = "lower", margin: float = 0.0) -> str:
    """Verdict on a claim from an interval ``ci = (lo, hi)`` of the relative change.

    ``expect="lower"`` is the claim A < B (``delta < 0``); ``expect="higher"`` the claim
    A > B (``delta > 0``). ``margin >= 0`` is a dead band ``[-margin, margin]`` around 0.

    - ``expect="lower"``:  ``"held"`` iff ``hi < -margin``; ``"not held"`` iff ``lo > margin``.
    - ``expect="higher"``: ``"held"`` iff ``lo > margin``; ``"not held"`` iff ``hi < -margin``.
    - otherwise ``"inconclusive"``: the closed interval touches the closed band
      ``[-margin, margin]`` (with ``margin = 0``: the interval contains 0).

    So a claim holds only if the whole interval is beyond the band on the claimed side,
    and fails only if the whole interval is beyond the band on the opposite side.
    """
    if expect not in _EXPECT:
        raise ValueError(f"expect must be one of {_EXPECT}, got {expect!r}")
    margin = float(margin)
    if not (math.isfinite(margin) and margin >= 0.0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    try:
        lo, hi = (float(v) for v in ci)
    except (TypeError, ValueError):
        raise ValueError(f"ci must be a pair (lo, hi) of numbers, got {ci!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"ci must be finite with lo <= hi, got {ci!r}")
    below, above = hi < -margin, lo > margin
    if expect == "lower":
        return HELD if below else NOT_HELD if above else INCONCLUSIVE
    return HELD if above else NOT_HELD if below else INCONCLUSIVE


def compare(
    a: Any,
    b: Any,
    expect: str = "lower",
    n_boot: int = 2000,
    seed: int = 0,
    margin: float = 0.0,
    level: float = 0.95,
) -> dict[str, Any]:
    """:func:`bootstrap_relative_change` of A vs B plus its :func:`verdict`.

    Returns that dict with ``"verdict"`` (``verdict(ci95, expect, margin)``),
    ``"expect"`` and ``"margin"`` added.
    """
    if expect not in _EXPECT:  # fail before the bootstrap
        raise ValueError(f"expect must be one of {_EXPECT}, got {expect!r}")
    out = bootstrap_relative_change(a, b, n_boot=n_boot, level=level, seed=seed)
    out["verdict"] = verdict(out["ci95"], expect=expect, margin=margin)
    out["expect"] = expect
    out["margin"] = float(margin)
    return out


def finding_verdict(comparisons: Iterable[Mapping[str, Any] | str]) -> str:
    """Combine comparisons that must ALL hold for one finding.

    Each item is a :func:`compare` result (its ``"verdict"`` is used) or a verdict
    string. ``"not held"`` if any comparison is not held (one failed part sinks the
    finding, even if others are inconclusive); else ``"held"`` if all are held; else
    ``"inconclusive"``. Raises ``ValueError`` on an empty list or an unknown verdict.
    """
    verdicts = []
    for item in comparisons:
        v = item if isinstance(item, str) else item.get("verdict")
        if v not in _VERDICTS:
            raise ValueError(f"unknown verdict {v!r}; expected one of {_VERDICTS}")
        verdicts.append(v)
    if not verdicts:
        raise ValueError("finding_verdict needs at least one comparison")
    if NOT_HELD in verdicts:
        return NOT_HELD
    if all(v == HELD for v in verdicts):
        return HELD
    return INCONCLUSIVE
