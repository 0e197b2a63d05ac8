"""Image and dataset-folder makers shared by the tests (real files in a temp dir, no mocks).

``rgb``, ``soft_alpha``, ``disc_mask`` make arrays; ``save``, ``save_truncated``,
``save_exif_rotated`` write them as real files;
``messy_tree(root)`` writes a matte set, a background folder, a seg set and a val set with
every case the ingest stage must handle, and returns what the tests should expect:
the folder paths, the bad files with a word their quarantine reason must contain, and
the conversions certain stems must record.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth, deterministic RGB uint8 test image (gradients + a block, compresses well)."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y + seed * 37) % 256)], -1)
    img[h // 4 : h // 2, w // 4 : w // 2] = (seed * 53 % 256, 200, 30)
    return img.astype(np.uint8)


def soft_alpha(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A float alpha in [0, 1]: an opaque disc with a soft edge (exact 0 and 1 present)."""
    y, x = np.mgrid[0:h, 0:w]
    r = np.hypot(y - h / 2, x - w / 2 - seed)
    return np.clip((min(h, w) * 0.35 - r) / 4.0, 0.0, 1.0).astype(np.float32)


def disc_mask(h: int, w: int) -> np.ndarray:
    return (soft_alpha(h, w) > 0.5).astype(np.uint8)


def save(path: Path, array: np.ndarray | Image.Image, fmt: str | None = None, **kw) -> Path:
    """Write an image with PIL (parents created); ``fmt`` overrides the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = array if isinstance(array, Image.Image) else Image.fromarray(array)
    im.save(path, format=fmt, **kw)
    return path


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def save_truncated(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = png_bytes(array)
    path.write_bytes(data[: len(data) // 2])
    return path


def save_exif_rotated(path: Path, displayed: np.ndarray, orientation: int = 6) -> Path:
    """A JPEG whose stored pixels are ``displayed`` rotated back; EXIF ``orientation`` restores it.

    Orientation 6 means "rotate 90° clockwise to display", so the stored image is the
    displayed one rotated 90° counter-clockwise.
    """
    assert orientation == 6
    stored = np.ascontiguousarray(np.rot90(displayed, 1))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(path, stored, "JPEG", quality=95, exif=exif.tobytes())


def messy_tree(root: Path) -> dict:
    """Build the messy folders under ``root``; returns the expectations (see module doc)."""
    H, W = 24, 32
    bad: dict[str, str] = {}  # path -> word the reason must contain
    conv: dict[tuple[str, str], list[str]] = {}  # (set, stem) -> substrings of expected conversions

    # ---- matte: fg/ + alpha/ and rgba/
    m = root / "matte"
    save(m / "fg" / "person 1.png", rgb(H, W, 1))
    save(m / "alpha" / "person 1.png", (soft_alpha(H, W) * 255).round().astype(np.uint8))
    save(m / "fg" / "ünï côdé.JPG", rgb(H, W, 2), "JPEG", quality=95)
    a16 = (soft_alpha(H, W, 3) * 65535).round().astype(np.uint16)
    a16[0, 0] = 12345  # a value only 16 bits can hold
    save(m / "alpha" / "ünï côdé.PNG", a16)
    save(m / "fg" / "gray.png", rgb(H, W, 4)[..., 0])
    a8 = (soft_alpha(H, W) * 255).round().astype(np.uint8)
    save(m / "alpha" / "gray.png", np.repeat(a8[..., None], 3, axis=2))
    conv[("matte", "gray")] = ["fg.mode: L->RGB", "alpha.channels: RGB with equal channels"]
    save(m / "fg" / "badalpha.png", rgb(H, W, 5))
    three = np.stack([a8, a8 // 2, 255 - a8], -1)
    bad[str(m / "alpha" / "badalpha.png")] = "3 different channels"
    save(m / "alpha" / "badalpha.png", three)
    bad[str(m / "fg" / "badalpha.png")] = "partner alpha"
    save(m / "fg" / "palette.png", Image.fromarray(rgb(H, W, 6)).convert("P", palette=Image.Palette.ADAPTIVE))
    save(m / "alpha" / "palette.png", (soft_alpha(H // 2, W // 2) * 255).round().astype(np.uint8))
    conv[("matte", "palette")] = ["fg.mode: P->RGB", "alpha.resize: 16x12->32x24 (linear)"]
    save(m / "alpha" / "orphan alpha.png", a8)
    bad[str(m / "alpha" / "orphan alpha.png")] = "no fg/ partner"
    cut = np.dstack([rgb(H, W, 7), a8])
    save(m / "rgba" / "cutout.png", cut)
    conv[("matte", "cutout")] = ["fg.cutout", "alpha.cutout"]

    # ---- backgrounds: recursive, messy
    b = root / "backgrounds"
    save(b / "plain.jpg", rgb(H, W, 8), "JPEG", quality=90)
    save(b / "sub" / "gray bg.PNG", rgb(H, W, 9)[..., 1])
    conv[("background", "sub/gray bg")] = ["image.mode: L->RGB"]
    save(b / "cmyk.jpg", Image.fromarray(rgb(H, W, 10)).convert("CMYK"), "JPEG", quality=95)
    conv[("background", "cmyk")] = ["image.mode: CMYK->RGB"]
    save(b / "wide16.png", (rgb(H, W, 11)[..., 0].astype(np.uint16) * 257))
    conv[("background", "wide16")] = ["image.depth: 16-bit->8-bit"]
    bad[str(save_truncated(b / "truncated.png", rgb(H, W, 12)))] = "truncated"
    (b / "empty.png").write_bytes(b"")
    bad[str(b / "empty.png")] = "empty file"
    (b / "notes.txt").write_text("not an image\n")
    bad[str(b / "notes.txt")] = "not an image"

    # ---- seg: image/ + mask/
    s = root / "seg"
    save(s / "image" / "s0.jpg", rgb(H, W, 13), "JPEG", quality=95)
    save(s / "mask" / "s0.png", disc_mask(H, W) * 255)
    save(s / "image" / "s1.png", rgb(H, W, 14))
    save(s / "mask" / "s1.png", disc_mask(H, W))
    conv[("seg", "s1")] = ["mask.mask: 0/1 values"]
    save_exif_rotated(s / "image" / "exif.jpg", rgb(H, W, 15))
    save(s / "mask" / "exif.png", disc_mask(H, W) * 255)  # annotated in the displayed orientation
    conv[("seg", "exif")] = ["image.exif_transpose: orientation 6"]
    save_exif_rotated(s / "image" / "exif raw.jpg", rgb(H, W, 22))
    save(s / "mask" / "exif raw.png", np.ascontiguousarray(np.rot90(disc_mask(H, W) * 255, 1)))  # stored orientation
    conv[("seg", "exif raw")] = ["mask.exif_transpose: orientation 6 (from the image"]
    save(s / "image" / "big.png", rgb(2 * H, 2 * W, 16))
    save(s / "mask" / "big.png", disc_mask(H, W) * 255)
    conv[("seg", "big")] = ["mask.resize: 32x24->64x48 (nearest)"]
    save(s / "image" / "UPPER.PNG", rgb(H, W, 17))
    save(s / "mask" / "UPPER.png", disc_mask(H, W) * 255)
    save(s / "image" / "with alpha.png", np.dstack([rgb(H, W, 18), np.full((H, W), 200, np.uint8)]))
    save(s / "mask" / "with alpha.png", disc_mask(H, W) * 255)
    conv[("seg", "with alpha")] = ["image.mode: RGBA->RGB (transparency dropped)"]
    save(s / "mask" / "jpeg mask.jpg", disc_mask(H, W) * 255, "JPEG", quality=70)
    save(s / "image" / "jpeg mask.png", rgb(H, W, 19))
    conv[("seg", "jpeg mask")] = ["mask.mask: thresholded at 128"]
    save(s / "image" / "lonely image.png", rgb(H, W, 20))
    bad[str(s / "image" / "lonely image.png")] = "no mask/ partner"
    save(s / "mask" / "lonely mask.png", disc_mask(H, W) * 255)
    bad[str(s / "mask" / "lonely mask.png")] = "no image/ partner"
    save(s / "image" / "bad mask.png", rgb(H, W, 21))
    bad[str(save_truncated(s / "mask" / "bad mask.png", disc_mask(H, W) * 255))] = "truncated"
    bad[str(s / "image" / "bad mask.png")] = "partner mask"
    (s / "README.txt").write_text("a file beside image/ and mask/\n")
    bad[str(s / "README.txt")] = "outside the set layout"

    # ---- val: image/ + alpha/ + trimap/
    v = root / "val"
    for i, name in enumerate(["v0", "v1"]):
        save(v / "image" / f"{name}.png", rgb(H, W, 30 + i))
        save(v / "alpha" / f"{name}.png", (soft_alpha(H, W, i) * 65535).round().astype(np.uint16))
        tri = np.where(soft_alpha(H, W, i) > 0.99, 255, np.where(soft_alpha(H, W, i) > 0.01, 128, 0)).astype(np.uint8)
        if i == 1:
            tri[tri == 128] = 127  # an off-by-one trimap, quantised back to 128
            conv[("val-ext", "v1")] = ["trimap.trimap: quantised"]
        save(v / "trimap" / f"{name}.png", tri)
    return {
        "matte_dir": str(m),
        "background_dir": str(b),
        "seg_dir": str(s),
        "val_dir": str(v),
        "bad": bad,
        "conversions": conv,
        "accepted": {"matte": 5, "background": 4, "seg": 8, "val-ext": 2},
    }


def folders_params(tree: dict, **sections) -> dict:
    """A params mapping (as params.yaml would hold) for ``source: folders`` on ``tree``."""
    params = {
        "data": {
            "source": "folders",
            "matte_dir": tree["matte_dir"],
            "background_dir": tree["background_dir"],
            "seg_dir": tree["seg_dir"],
            "val": {"ext": tree["val_dir"]},
        },
        "shard": {"samples_per_shard": 3},
        "study": {"seg": [4], "mat": [1]},  # within the small trees' sizes (the shard stage checks)
        "composite": {"val_foregrounds": 2},
    }
    params.update(sections)
    return params
