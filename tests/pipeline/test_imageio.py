"""matting_pipeline.imageio: every messy file kind decodes to a defined array, or fails with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from matting_pipeline import imageio
from matting_pipeline.imageio import ImageReadError

from tests.images import disc_mask, rgb, save, save_exif_rotated, save_truncated, soft_alpha

H, W = 24, 32


def test_rgb_png_is_exact_and_unconverted(tmp_path):
    img = rgb(H, W, 1)
    out, conv = imageio.read_image_rgb(save(tmp_path / "a.png", img))
    assert out.dtype == np.uint8 and out.shape == (H, W, 3)
    assert np.array_equal(out, img) and conv == []


def test_grayscale_palette_rgba_cmyk_become_rgb_and_say_so(tmp_path):
    gray, conv = imageio.read_image_rgb(save(tmp_path / "g.png", rgb(H, W)[..., 0]))
    assert gray.shape == (H, W, 3) and conv == ["mode: L->RGB"]
    assert np.array_equal(gray[..., 0], gray[..., 2])
    pal = Image.fromarray(rgb(H, W, 2)).convert("P", palette=Image.Palette.ADAPTIVE)
    out, conv = imageio.read_image_rgb(save(tmp_path / "p.png", pal))
    assert out.shape == (H, W, 3) and conv == ["mode: P->RGB"]
    rgba = np.dstack([rgb(H, W, 3), np.full((H, W), 7, np.uint8)])
    out, conv = imageio.read_image_rgb(save(tmp_path / "t.png", rgba))
    assert np.array_equal(out, rgba[..., :3]) and conv == ["mode: RGBA->RGB (transparency dropped)"]
    cmyk = Image.fromarray(rgb(H, W, 4)).convert("CMYK")
    out, conv = imageio.read_image_rgb(save(tmp_path / "c.jpg", cmyk, "JPEG", quality=95))
    assert out.shape == (H, W, 3) and conv == ["mode: CMYK->RGB"]
    assert np.abs(out.astype(int) - rgb(H, W, 4)).mean() < 8  # colours survive the round trip


def test_16bit_gray_photo_is_scaled_to_8bit(tmp_path):
    a = (np.arange(H * W).reshape(H, W) * 80).astype(np.uint16)
    out, conv = imageio.read_image_rgb(save(tmp_path / "d.png", a))
    assert "depth: 16-bit->8-bit" in conv
    assert np.array_equal(out[..., 0], np.round(a / 257).astype(np.uint8))


def test_exif_orientation_is_applied_and_recorded(tmp_path):
    displayed = rgb(H, W, 5)
    path = save_exif_rotated(tmp_path / "e.jpg", displayed)
    out, conv = imageio.read_image_rgb(path)
    assert conv == ["exif_transpose: orientation 6"]
    assert out.shape == (H, W, 3)
    assert np.abs(out.astype(int) - displayed).mean() < 6  # JPEG, but the right way up


@pytest.mark.parametrize("orientation", range(1, 9))
def test_apply_orientation_matches_pil(orientation):
    a = rgb(5, 7, orientation)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.info["exif"] = exif.tobytes()
    expected = np.asarray(ImageOps.exif_transpose(im))
    assert np.array_equal(imageio.apply_orientation(a, orientation), expected)


def test_alpha_keeps_bit_depth(tmp_path):
    a8 = (soft_alpha(H, W) * 255).round().astype(np.uint8)
    out, conv = imageio.read_alpha(save(tmp_path / "a8.png", a8))
    assert out.dtype == np.uint8 and np.array_equal(out, a8) and conv == []
    a16 = (soft_alpha(H, W) * 65535).round().astype(np.uint16)
    a16[3, 3] = 1
    out, conv = imageio.read_alpha(save(tmp_path / "a16.png", a16))
    assert out.dtype == np.uint16 and np.array_equal(out, a16) and conv == []
    f = imageio.alpha_to_float(out)
    assert f.dtype == np.float32 and np.array_equal(f, a16.astype(np.float32) / np.float32(65535))


def test_alpha_channel_policy(tmp_path):
    a8 = (soft_alpha(H, W) * 255).round().astype(np.uint8)
    same = np.repeat(a8[..., None], 3, axis=2)
    out, conv = imageio.read_alpha(save(tmp_path / "same.png", same))
    assert np.array_equal(out, a8) and conv == ["channels: RGB with equal channels->L"]
    with pytest.raises(ImageReadError, match="3 different channels"):
        imageio.read_alpha(save(tmp_path / "diff.png", np.dstack([a8, a8 // 2, a8 // 3])))
    # a black cutout: constant colour, the matte lives in the transparency channel
    black = np.dstack([np.zeros((H, W, 3), np.uint8), a8])
    out, conv = imageio.read_alpha(save(tmp_path / "black.png", black))
    assert np.array_equal(out, a8) and "transparency channel" in conv[0]
    # opaque RGBA with equal channels: the transparency carries nothing
    opaque = np.dstack([same, np.full((H, W), 255, np.uint8)])
    out, conv = imageio.read_alpha(save(tmp_path / "opaque.png", opaque))
    assert np.array_equal(out, a8)
    # colour and transparency both vary: which one is the matte? refuse to guess
    with pytest.raises(ImageReadError, match="ambiguous"):
        imageio.read_alpha(save(tmp_path / "amb.png", np.dstack([same, 255 - a8])))


def test_mask_values(tmp_path):
    m = disc_mask(H, W)
    out, conv = imageio.read_mask(save(tmp_path / "m255.png", m * 255))
    assert np.array_equal(out, m) and conv == []
    out, conv = imageio.read_mask(save(tmp_path / "m01.png", m))
    assert np.array_equal(out, m) and conv == ["mask: 0/1 values"]
    out, conv = imageio.read_mask(save(tmp_path / "mj.JPG", m * 255, "JPEG", quality=60))
    assert conv and conv[0].startswith("mask: thresholded at 128")
    assert (out != m).mean() < 0.02 and set(np.unique(out)) <= {0, 1}
    out, conv = imageio.read_mask(save(tmp_path / "m16.png", m.astype(np.uint16) * 65535))
    assert np.array_equal(out, m)


def test_trimap_quantised(tmp_path):
    t = np.array([[0, 127, 255, 3], [250, 128, 90, 180]], np.uint8)
    out, conv = imageio.read_trimap(save(tmp_path / "t.png", t))
    assert out.tolist() == [[0, 128, 255, 0], [255, 128, 128, 255]]
    assert conv[0].startswith("trimap: quantised")


def test_rgba_cutout(tmp_path):
    a8 = (soft_alpha(H, W) * 255).round().astype(np.uint8)
    cut = np.dstack([rgb(H, W, 6), a8])
    colour, alpha, conv = imageio.read_rgba(save(tmp_path / "c.png", cut))
    assert np.array_equal(colour, cut[..., :3]) and np.array_equal(alpha, a8) and conv == []
    with pytest.raises(ImageReadError, match="no transparency"):
        imageio.read_rgba(save(tmp_path / "n.png", rgb(H, W)))


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.png", b"", "empty file"),
        ("notes.txt", b"hello, not an image\n", "not an image"),
        ("fake.PNG", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "undecodable"),
    ],
)
def test_unreadable_files_raise_typed_error_with_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    for reader in (imageio.read_image_rgb, imageio.read_alpha, imageio.read_mask):
        with pytest.raises(ImageReadError) as err:
            reader(path)
        assert reason in err.value.reason and err.value.path == str(path)


def test_truncated_png_and_jpeg(tmp_path):
    with pytest.raises(ImageReadError, match="truncated"):
        imageio.read_image_rgb(save_truncated(tmp_path / "t.png", rgb(64, 64)))
    data = (save(tmp_path / "full.jpg", rgb(64, 64), "JPEG")).read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated"):
        imageio.read_image_rgb(tmp_path / "t.jpg")


def test_non_ascii_and_spaces_in_names(tmp_path):
    img = rgb(H, W, 9)
    out, _ = imageio.read_image_rgb(save(tmp_path / "sub dir" / "Ünïcødé name 名前.PNG", img))
    assert np.array_equal(out, img)


def test_resize_partner():
    m = np.zeros((4, 6), np.uint8)
    m[:, 3:] = 1
    out, conv = imageio.resize_partner(m, (8, 12), "mask")
    assert out.shape == (8, 12) and set(np.unique(out)) == {0, 1}
    assert conv == "resize: 6x4->12x8 (nearest)"
    a16 = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    out, conv = imageio.resize_partner(a16, (32, 32), "alpha")
    assert out.dtype == np.uint16 and out.shape == (32, 32) and conv.endswith("(area)")
    out, conv = imageio.resize_partner(a16, (80, 80), "alpha")
    assert conv.endswith("(linear)")
    with pytest.raises(ValueError):
        imageio.resize_partner(m, (2, 2), "nonsense")
