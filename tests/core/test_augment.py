"""matting_core.augment: shared geometry keeps views and labels aligned; strong view contract."""

from __future__ import annotations

import numpy as np
import pytest

from matting_core.augment import (
    Geometry,
    PhotometricParams,
    apply_geometry,
    paired_views,
    sample_geometry,
    strong_photometric,
)


def _smooth_fields(h: int, w: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    alpha = np.clip(0.5 + 0.6 * np.sin(3 * xx + 2 * yy + rng.uniform()), 0, 1).astype(np.float32)
    fg = np.stack([xx, yy, 0.5 + 0.4 * np.cos(4 * xx)], axis=-1).astype(np.float32)
    bg = np.stack([1 - yy, 0.3 + 0.2 * xx, xx * yy], axis=-1).astype(np.float32)
    image = alpha[..., None] * fg + (1 - alpha[..., None]) * bg
    return image, alpha, fg, bg


def test_geometry_is_deterministic_per_seed():
    a = sample_geometry(np.random.default_rng(7), (120, 90), 48)
    b = sample_geometry(np.random.default_rng(7), (120, 90), 48)
    assert a == b
    others = {sample_geometry(np.random.default_rng(s), (120, 90), 48) for s in range(10)}
    assert len(others) > 5


def test_sampled_windows_stay_inside_and_respect_the_scale_range():
    rng = np.random.default_rng(0)
    flips = 0
    for _ in range(300):
        g = sample_geometry(rng, (200, 160), (48, 40), scale_range=(0.5, 2.0), crop_multipliers=(1.0, 2.0))
        top, left, h, w = g.window
        assert 0 <= top and top + h <= 200 and 0 <= left and left + w <= 160
        assert g.output_hw == (48, 40)
        # window = crop * m / s with s in [0.5, 2] and m in {1, 2}: output/window in [0.25, 2]
        sy, sx = g.scale
        assert 0.25 * 0.97 <= sy <= 2.0 * 1.03 and 0.25 * 0.97 <= sx <= 2.0 * 1.03
        assert abs(sy - sx) / sy < 0.1  # aspect ratio kept
        flips += g.flip
    assert 100 < flips < 200  # flip_prob 0.5
    assert not any(sample_geometry(rng, (50, 50), 16, flip_prob=0.0).flip for _ in range(50))


def test_window_larger_than_image_is_shrunk_to_fit():
    g = sample_geometry(np.random.default_rng(1), (30, 20), 64, scale_range=(1.0, 1.0), crop_multipliers=(1.0,))
    top, left, h, w = g.window
    assert (h, w) == (20, 20) and 0 <= top <= 10 and left == 0
    out = apply_geometry(g, np.zeros((30, 20, 3), np.uint8))
    assert out.shape == (64, 64, 3)


def test_identity_and_flip():
    array = np.arange(5 * 4 * 2, dtype=np.float32).reshape(5, 4, 2)
    identity = Geometry((5, 4), (0, 0, 5, 4), (5, 4), flip=False)
    np.testing.assert_array_equal(apply_geometry(identity, array), array)
    flipped = Geometry((5, 4), (0, 0, 5, 4), (5, 4), flip=True)
    np.testing.assert_array_equal(apply_geometry(flipped, array), array[:, ::-1])
    crop = Geometry((5, 4), (1, 2, 3, 2), (3, 2), flip=True)
    np.testing.assert_array_equal(apply_geometry(crop, array[..., 0]), array[1:4, 2:4, 0][:, ::-1])


@pytest.mark.parametrize("seed", range(6))
def test_same_geometry_keeps_image_and_alpha_aligned(seed):
    image, alpha, fg, bg = _smooth_fields(97, 83, seed)
    image[..., 1] = alpha  # the alpha rides along as an image channel
    rng = np.random.default_rng(seed)
    g = sample_geometry(rng, (97, 83), (40, 36), scale_range=(0.5, 1.8))
    out_image = apply_geometry(g, image, "linear")
    out_alpha = apply_geometry(g, alpha, "linear")
    np.testing.assert_array_equal(out_image[..., 1], out_alpha)
    # the composite identity survives the geometry (up to resampling of smooth fields)
    out_fg, out_bg = apply_geometry(g, fg), apply_geometry(g, bg)
    recomposed = out_alpha[..., None] * out_fg + (1 - out_alpha[..., None]) * out_bg
    np.testing.assert_allclose(recomposed[..., [0, 2]], out_image[..., [0, 2]], atol=0.02)


def test_composite_identity_exact_without_resampling():
    image, alpha, fg, bg = _smooth_fields(64, 48)
    g = Geometry((64, 48), (10, 5, 32, 30), (32, 30), flip=True)
    a, f, b = (apply_geometry(g, x) for x in (alpha, fg, bg))
    np.testing.assert_allclose(a[..., None] * f + (1 - a[..., None]) * b, apply_geometry(g, image), atol=1e-6)


def test_masks_use_nearest_and_keep_their_values_and_dtype():
    rng = np.random.default_rng(3)
    trimap = rng.choice(np.array([0, 128, 255], np.uint8), size=(60, 50))
    mask = rng.random((60, 50)) > 0.5
    g = sample_geometry(rng, (60, 50), 37, scale_range=(0.6, 1.7))
    out_trimap = apply_geometry(g, trimap, "nearest")
    out_mask = apply_geometry(g, mask, "nearest")
    assert out_trimap.dtype == np.uint8 and set(np.unique(out_trimap)) <= {0, 128, 255}
    assert out_mask.dtype == np.bool_ and out_mask.shape == (37, 37)
    # nearest and linear agree on where a large block sits
    block = np.zeros((60, 50), np.float32)
    block[10:40, 5:30] = 1
    near = apply_geometry(g, block, "nearest")
    lin = apply_geometry(g, block, "linear")
    assert np.mean(np.abs(near - lin) > 0.5) < 0.1


def test_apply_geometry_errors():
    g = Geometry((10, 10), (0, 0, 10, 10), (5, 5), flip=False)
    with pytest.raises(ValueError, match="source size"):
        apply_geometry(g, np.zeros((10, 11)))
    with pytest.raises(ValueError, match="interpolation"):
        apply_geometry(g, np.zeros((10, 10)), "cubic")


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_strong_view_keeps_shape_dtype_range_and_is_seeded(dtype):
    rng = np.random.default_rng(0)
    image = rng.random((40, 30, 3))
    image = (image * 255).astype(np.uint8) if dtype == np.uint8 else image.astype(dtype)
    original = image.copy()
    outs = [strong_photometric(image, np.random.default_rng(s)) for s in range(8)]
    for out in outs:
        assert out.shape == image.shape and out.dtype == image.dtype
        if dtype == np.uint8:
            assert out.min() >= 0 and out.max() <= 255
        else:
            assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_array_equal(image, original)  # input untouched
    np.testing.assert_array_equal(strong_photometric(image, np.random.default_rng(5)), outs[5])
    scale = 255.0 if dtype == np.uint8 else 1.0
    changed = [np.abs(o.astype(np.float64) - image.astype(np.float64)).mean() / scale > 0.005 for o in outs]
    assert all(changed)


def test_strong_view_components_do_what_they_say():
    image = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    off = dict(blur_prob=0.0, noise_prob=0.0, jpeg_prob=0.0)
    none = PhotometricParams(brightness=(1, 1), contrast=(1, 1), saturation=(1, 1), hue=(0, 0), **off)
    np.testing.assert_allclose(strong_photometric(image, np.random.default_rng(0), none), image, atol=2e-6)
    darker = PhotometricParams(brightness=(0.5, 0.5), contrast=(1, 1), saturation=(1, 1), hue=(0, 0), **off)
    np.testing.assert_allclose(strong_photometric(image, np.random.default_rng(0), darker), image * 0.5, atol=1e-6)
    gray = PhotometricParams(brightness=(1, 1), contrast=(1, 1), saturation=(0, 0), hue=(0, 0), **off)
    out = strong_photometric(image, np.random.default_rng(0), gray)
    np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-6)
    blur = PhotometricParams(brightness=(1, 1), contrast=(1, 1), saturation=(1, 1), hue=(0, 0),
                             blur_prob=1.0, blur_sigma=(2.0, 2.0), noise_prob=0.0, jpeg_prob=0.0)
    assert strong_photometric(image, np.random.default_rng(0), blur).std() < 0.5 * image.std()


def test_paired_views_share_geometry_with_targets():
    image, alpha, fg, bg = _smooth_fields(80, 70)
    image_u8 = (image * 255).round().astype(np.uint8)
    seg_mask = alpha > 0.5
    views = paired_views(
        np.random.default_rng(11), image_u8, 40, {"alpha": alpha, "seg_mask": seg_mask, "fg": fg}
    )
    g = views["geometry"]
    np.testing.assert_array_equal(views["weak_image"], apply_geometry(g, image_u8))
    np.testing.assert_array_equal(views["alpha"], apply_geometry(g, alpha))
    np.testing.assert_array_equal(views["seg_mask"], apply_geometry(g, seg_mask, "nearest"))
    assert views["strong_image"].shape == views["weak_image"].shape == (40, 40, 3)
    assert views["strong_image"].dtype == np.uint8
    assert not np.array_equal(views["strong_image"], views["weak_image"])
    again = paired_views(np.random.default_rng(11), image_u8, 40, {"alpha": alpha})
    np.testing.assert_array_equal(again["strong_image"], views["strong_image"])
