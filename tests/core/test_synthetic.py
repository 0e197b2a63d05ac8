"""Tests for matting_core.synthetic: the embedded procedural dataset.

Statistical tests pool a small batch of 128x128 items (cached per module) so they stay
fast; thresholds were chosen with margin from the measured distributions and each one
fails for the defect it names (e.g. removing the hair strands drops the thin-structure
fraction from ~7% to <1%).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from matting_core import synthetic as syn

SIZE = 128
N_FG = 16
N_NAT = 16


@pytest.fixture(scope="module")
def foregrounds():
    return [syn.foreground_item(0, i, SIZE) for i in range(N_FG)]


@pytest.fixture(scope="module")
def naturals():
    return [syn.natural_item(0, i, SIZE) for i in range(N_NAT)]


@pytest.fixture(scope="module")
def composites():
    """Plain DIM-style composites: foreground_item i over background_item i, uint8."""
    out = []
    for i in range(N_NAT):
        fg, alpha = syn.foreground_item(0, i, SIZE)
        bg = syn.background_item(0, i, SIZE)
        a = alpha[..., None]
        out.append(((a * fg + (1 - a) * bg) + 0.5).astype(np.uint8))
    return out


def _fractional(alpha: np.ndarray) -> np.ndarray:
    return (alpha > 0) & (alpha < 1)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


# ------------------------------------------------------------------------- determinism
@pytest.mark.parametrize(
    "item", [syn.foreground_item, syn.background_item, syn.natural_item], ids=["fg", "bg", "natural"]
)
def test_items_are_deterministic_and_distinct(item):
    first = item(7, 3, SIZE)
    again = item(7, 3, SIZE)
    other_i = item(7, 4, SIZE)
    other_seed = item(8, 3, SIZE)
    first, again, other_i, other_seed = (
        x if isinstance(x, tuple) else (x,) for x in (first, again, other_i, other_seed)
    )
    for a, b in zip(first, again):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert not np.array_equal(first[0], other_i[0])
    assert not np.array_equal(first[0], other_seed[0])


def test_items_ignore_global_random_state_and_generation_order():
    np.random.seed(1)
    alone = syn.natural_item(0, 5, 64)
    np.random.seed(2)
    for i in range(5):  # generating other items first must not matter
        syn.natural_item(0, i, 64)
    after = syn.natural_item(0, 5, 64)
    for a, b in zip(alone, after):
        assert np.array_equal(a, b)


def test_item_rng_matches_documented_scheme():
    ref = np.random.default_rng([3, syn.KIND_IDS["background"], 11])
    assert np.array_equal(syn.background_item(3, 11, 64), syn.make_background(ref, 64))
    assert syn.KIND_IDS == {"foreground": 0, "background": 1, "natural": 2}


def test_kinds_use_independent_streams():
    # the same (seed, i) for different kinds must not share random numbers
    a = syn.item_rng(0, "foreground", 0).random(4)
    b = syn.item_rng(0, "natural", 0).random(4)
    assert not np.allclose(a, b)


@pytest.mark.parametrize("bad", [("person", 0, 0), ("natural", -1, 0), ("natural", 0, -2)])
def test_item_rng_rejects_bad_arguments(bad):
    kind, seed, i = bad
    with pytest.raises(ValueError):
        syn.item_rng(seed, kind, i)


@pytest.mark.parametrize("size", [8, (8, 64), (64, 0), "big", (1, 2, 3)])
def test_bad_sizes_raise(size):
    with pytest.raises(ValueError):
        syn.make_background(np.random.default_rng(0), size)


# ------------------------------------------------------------- shapes, dtypes, ranges
@pytest.mark.parametrize("size", [64, SIZE, (96, 160), (160, 96), (48, 200)])
def test_shapes_dtypes_ranges(size):
    h, w = (size, size) if isinstance(size, int) else size
    fg, alpha = syn.foreground_item(1, 0, size)
    assert fg.shape == (h, w, 3) and fg.dtype == np.uint8
    assert alpha.shape == (h, w) and alpha.dtype == np.float32
    assert alpha.min() == 0.0 and alpha.max() == 1.0
    # 8-bit exact: a PNG round trip keeps the alpha bit-identical
    assert np.array_equal(np.round(alpha * 255) / 255, alpha.astype(np.float64).astype(np.float32))
    bg = syn.background_item(1, 0, size)
    assert bg.shape == (h, w, 3) and bg.dtype == np.uint8
    image, nat_alpha, coarse = syn.natural_item(1, 0, size)
    assert image.shape == (h, w, 3) and image.dtype == np.uint8
    assert nat_alpha.shape == (h, w) and nat_alpha.dtype == np.float32
    assert 0.0 <= nat_alpha.min() and nat_alpha.max() <= 1.0
    assert coarse.shape == (h, w) and coarse.dtype == np.uint8
    assert set(np.unique(coarse)) <= {0, 1}
    assert coarse.any(), "the person must appear in the coarse mask"


def test_figure_leaves_frame_at_bottom_like_a_portrait(foregrounds):
    touching = sum(bool((alpha[-1] == 1).any()) for _, alpha in foregrounds)
    assert touching >= N_FG // 2  # most are portraits (torso continues below the frame)


# ------------------------------------------------------------------- alpha structure
def test_alpha_has_exact_core_background_and_a_boundary_band(foregrounds):
    fractions = []
    for _, alpha in foregrounds:
        assert (alpha == 1).mean() > 0.02, "no exact-1 body core"
        assert (alpha == 0).mean() > 0.2, "no exact-0 background"
        fractions.append(_fractional(alpha).mean())
    fractions = np.asarray(fractions)
    assert fractions.min() > 0.01 and fractions.max() < 0.2
    assert 0.02 < np.median(fractions) < 0.12  # boundary ~2-10% of the image


def test_boundary_band_is_thin_at_higher_resolution():
    # the soft edge is ~1-2 px at any size, so the band's share shrinks with resolution
    small = np.mean([_fractional(syn.foreground_item(0, i, 64)[1]).mean() for i in range(6)])
    large = np.mean([_fractional(syn.foreground_item(0, i, 256)[1]).mean() for i in range(6)])
    assert large < 0.75 * small


def test_hair_strands_are_thin_fractional_structures(foregrounds):
    # thin bright ridges (white top-hat with a 3x3 element) among the fractional pixels:
    # sub-pixel strands; a smooth anti-aliased silhouette or a translucent area has none
    thin = []
    for _, alpha in foregrounds:
        tophat = cv2.morphologyEx(alpha, cv2.MORPH_TOPHAT, np.ones((3, 3), np.uint8))
        frac = _fractional(alpha)
        thin.append(((tophat > 0.1) & frac).sum() / max(frac.sum(), 1))
    thin = np.asarray(thin)
    assert np.median(thin) > 0.03
    assert (thin > 0.01).mean() >= 0.75


def test_strands_leave_the_silhouette(foregrounds):
    # flyaways: thin fractional ridges several px away from any near-opaque pixel
    counts = []
    for _, alpha in foregrounds:
        solid = (alpha >= 0.9).astype(np.uint8)
        far = cv2.dilate(solid, np.ones((7, 7), np.uint8)) == 0
        ridge = cv2.morphologyEx(alpha, cv2.MORPH_TOPHAT, np.ones((3, 3), np.uint8)) > 0.05
        counts.append(int((_fractional(alpha) & far & ridge).sum()))
    counts = np.asarray(counts)
    assert counts.sum() >= 80  # ~200 with strands, <10 without
    assert (counts > 0).mean() >= 0.5


def test_foreground_colour_is_defined_under_the_soft_boundary(foregrounds):
    # no dark (premultiplied) fringe and no jumps: F varies as smoothly in the fractional
    # band and just outside the figure as it does inside the body
    for fg, alpha in foregrounds:
        f = fg.astype(np.float32).mean(2)
        grad = np.abs(cv2.Sobel(f, cv2.CV_32F, 1, 0)) + np.abs(cv2.Sobel(f, cv2.CV_32F, 0, 1))
        core = cv2.erode((alpha == 1).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        band = _fractional(alpha)
        ring = (cv2.dilate((alpha > 0).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0) & (alpha == 0)
        assert grad[band].mean() < 3.0 * grad[core].mean() + 20
        assert grad[ring].mean() < 3.0 * grad[core].mean() + 20
        # the extension outside continues the colours just inside the figure
        inside = (alpha > 0).astype(np.float32)
        num = cv2.blur(fg.astype(np.float32) * inside[..., None], (5, 5))
        den = cv2.blur(inside, (5, 5))[..., None]
        local = num / np.maximum(den, 1e-6)
        assert np.abs(fg[ring].astype(np.float32) - local[ring]).mean() < 25


def test_foregrounds_vary(foregrounds):
    areas = np.array([(alpha > 0.5).mean() for _, alpha in foregrounds])
    colours = np.array([fg[alpha == 1].mean(0) for fg, alpha in foregrounds])
    assert areas.std() > 0.03
    assert colours.std(0).mean() > 10


def test_backgrounds_are_varied_and_textured():
    bgs = [syn.background_item(0, i, SIZE).astype(np.float32) for i in range(12)]
    means = np.array([b.reshape(-1, 3).mean(0) for b in bgs])
    assert means.std(0).mean() > 15  # different palettes
    assert np.median([b.std() for b in bgs]) > 5  # not flat colour fields


# -------------------------------------------------------------------- coarse masks
def test_coarse_mask_is_close_to_alpha_but_coarse(naturals):
    ious, near = [], []
    for _, alpha, coarse in naturals:
        hard = alpha > 0.5
        soft = coarse.astype(bool)
        ious.append(_iou(hard, soft))
        # where do they disagree? distance to the hard silhouette's outline
        outline = hard.astype(np.uint8) - cv2.erode(hard.astype(np.uint8), np.ones((3, 3), np.uint8))
        dist = cv2.distanceTransform((outline == 0).astype(np.uint8), cv2.DIST_L2, 3)
        wrong = hard != soft
        near.append((dist[wrong] <= 0.08 * SIZE).mean() if wrong.any() else 1.0)
    ious = np.asarray(ious)
    # measured over seeds: mean ~0.92, min ~0.7 (small full-body figures with thin limbs)
    assert ious.mean() > 0.85 and np.percentile(ious, 10) > 0.75 and ious.min() > 0.6
    assert ious.mean() < 0.985, "coarse mask is (almost) the exact alpha"
    assert (ious < 0.999).all()
    assert np.mean(near) > 0.9, "errors must sit near the boundary"


def test_coarse_mask_drops_hair_strands(naturals):
    dropped = []
    for _, alpha, coarse in naturals:
        tophat = cv2.morphologyEx(alpha, cv2.MORPH_TOPHAT, np.ones((3, 3), np.uint8))
        strands = (tophat > 0.1) & (alpha < 0.5)
        if strands.sum() >= 5:
            dropped.append(1.0 - coarse[strands].mean())
    assert dropped and np.mean(dropped) > 0.7


def test_make_coarse_mask_on_a_disk_with_hairs():
    alpha = np.zeros((96, 96), np.float32)
    cv2.circle(alpha, (48, 48), 25, 1.0, -1, cv2.LINE_AA)
    for k in range(12):  # faint radial hairs
        a = 2 * np.pi * k / 12
        cv2.line(alpha, (48, 48), (int(48 + 45 * np.cos(a)), int(48 + 45 * np.sin(a))), 0.3, 1)
    cv2.circle(alpha, (48, 48), 25, 1.0, -1, cv2.LINE_AA)
    for seed in range(5):
        m = syn.make_coarse_mask(np.random.default_rng(seed), alpha)
        assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
        assert _iou(m.astype(bool), alpha > 0.5) > 0.8
        assert m[alpha == 0.3].mean() < 0.2  # the hairs are not labelled as person


# -------------------------------------------------------------- domain gap (natural)
_LAPLACE = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)


def _flat_region_residual(image: np.ndarray, alpha: np.ndarray) -> float:
    """Median |noise residual| over background pixels: ~0 for clean renders, >0 with noise."""
    r = np.abs(cv2.filter2D(image.astype(np.float32).mean(2), -1, _LAPLACE))
    far = cv2.dilate((alpha > 0).astype(np.uint8), np.ones((5, 5), np.uint8)) == 0
    return float(np.median(r[far])) if far.any() else float(np.median(r))


def _blockiness(image: np.ndarray) -> float:
    """Luma step across 8-px JPEG block borders relative to the steps beside them (~1 clean)."""
    g = image.astype(np.float32).mean(2)
    dx = np.abs(np.diff(g, axis=1))
    dy = np.abs(np.diff(g, axis=0))
    bx = dx[:, 7::8].mean() / (0.5 * (dx[:, 6::8].mean() + dx[:, 8::8].mean()) + 1e-6)
    by = dy[7::8].mean() / (0.5 * (dy[6::8].mean() + dy[8::8].mean()) + 1e-6)
    return float(0.5 * (bx + by))


def _auc(higher, lower) -> float:
    """P(a random draw of ``higher`` exceeds one of ``lower``) (ties count half)."""
    a, b = np.asarray(higher)[:, None], np.asarray(lower)[None, :]
    return float((a > b).mean() + 0.5 * (a == b).mean())


def test_natural_scenes_have_more_fine_scale_residual_than_composites(naturals, composites, foregrounds):
    # sensor noise, JPEG ringing, sharpening halos and textured clutter all raise the
    # Laplacian residual of background regions; clean composites have ~quantisation only
    nat = [_flat_region_residual(img, a) for img, a, _ in naturals]
    comp = [_flat_region_residual(img, foregrounds[i][1]) for i, img in enumerate(composites)]
    assert _auc(nat, comp) > 0.8  # measured 0.93-1.0 over seeds
    assert np.median(nat) > 1.5 * np.median(comp)


def test_natural_scenes_carry_jpeg_artefacts(naturals, composites):
    nat = [_blockiness(img) for img, _, _ in naturals]
    comp = [_blockiness(img) for img in composites]
    assert _auc(nat, comp) > 0.7  # measured 0.8-0.93 over seeds
    assert np.median(comp) < 1.1  # clean renders have no block grid


def test_natural_alpha_is_blurred_more_often_than_foreground_alpha(naturals, foregrounds):
    # band width = fractional pixels per outline pixel; lens/motion blur widens it
    def width(alpha):
        hard = (alpha > 0.5).astype(np.uint8)
        outline = (hard - cv2.erode(hard, np.ones((3, 3), np.uint8))).sum()
        return _fractional(alpha).sum() / max(outline, 1)

    assert np.mean([width(a) for _, a, _ in naturals]) > 1.1 * np.mean([width(a) for _, a in foregrounds])


def test_natural_alpha_is_the_alpha_the_image_shows(naturals):
    # image edges line up with the returned alpha's edges (flip, blur and occluders applied
    # to both), and not with a shifted or mirrored copy of it
    def edge_corr(image, alpha):
        g = image.astype(np.float32).mean(2)
        gi = np.hypot(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1))
        ga = np.hypot(cv2.Sobel(alpha, cv2.CV_32F, 1, 0), cv2.Sobel(alpha, cv2.CV_32F, 0, 1))
        return float(np.corrcoef(gi.ravel(), ga.ravel())[0, 1])

    true, shifted, mirrored = [], [], []
    for image, alpha, _ in naturals:
        assert (alpha == 1).any() and (alpha == 0).any()
        true.append(edge_corr(image, alpha))
        shifted.append(edge_corr(image, np.roll(alpha, 6, axis=1)))
        mirrored.append(edge_corr(image, np.ascontiguousarray(alpha[:, ::-1])))
    true = np.asarray(true)
    assert true.mean() > 0.25
    assert (true > np.asarray(shifted)).mean() >= 0.9
    assert true.mean() > np.mean(mirrored) + 0.1
