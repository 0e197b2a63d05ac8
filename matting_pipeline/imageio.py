"""Robust decoding of the image files real datasets contain.

Every reader returns ``(array, conversions)``: the decoded numpy array and a list of the
conversions applied, each a short ``"kind: detail"`` string (``"mode: CMYK->RGB"``,
``"exif_transpose: orientation 6"``, ``"mask: 0/1 values"``). Nothing is altered silently:
if a reader changes a value or a layout, it says so in ``conversions``. A file that cannot
be read raises :class:`ImageReadError` whose ``reason`` is a short human-readable string
(``"empty file (0 bytes)"``, ``"truncated file"``, ``"not an image (unrecognised format)"``).

Public readers (also used by ``matting predict``):

- :func:`read_image_rgb` -- any photo -> ``(H, W, 3) uint8`` RGB.
- :func:`read_alpha` -- an alpha matte -> ``(H, W) uint8 | uint16``, kept at the file's own
  bit depth so shards store it exactly; :func:`alpha_to_float` maps it to ``float32 [0, 1]``.
- :func:`read_mask` -- a segmentation mask (0/1 or 0/255, PNG or JPG) -> ``(H, W) uint8 {0, 1}``.
- :func:`read_trimap` -- a trimap -> ``(H, W) uint8 {0, 128, 255}``.
- :func:`read_rgba` -- an RGBA cutout -> ``(rgb (H, W, 3) uint8, alpha (H, W) uint8)``.

Policies (each a defined outcome, see README "Data layouts"):

- EXIF orientation is applied (``ImageOps.exif_transpose``) and recorded.
- Grayscale, palette, CMYK, YCbCr, 1-bit and 16-bit photos are converted to 8-bit RGB and
  recorded; the transparency of an RGBA/LA/PA photo is dropped and recorded.
- Alpha files must be single-channel-convertible: gray (8/16-bit) as is; RGB only if all
  three channels are equal (else rejected: "alpha has 3 different channels"); a file with
  a transparency channel uses its gray/colour value when fully opaque, or its transparency
  channel when the colour is constant (a black cutout), else it is rejected as ambiguous.
- Masks: 0/255 as is; 0/1 accepted and recorded; any other values (JPEG artefacts,
  anti-aliasing) thresholded at half range and recorded.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ImageReadError",
    "read_image_rgb",
    "read_alpha",
    "read_mask",
    "read_trimap",
    "read_rgba",
    "alpha_to_float",
    "resize_partner",
    "apply_orientation",
    "EXIF_ORIENTATION_TAG",
]

EXIF_ORIENTATION_TAG = 0x0112
# Largest image accepted (pixels); PIL's own bomb guard is 2x its MAX_IMAGE_PIXELS.
MAX_PIXELS = 200_000_000


class ImageReadError(ValueError):
    """A file could not be read as the requested kind of image.

    Attributes: ``path`` (str) and ``reason`` (a short string suitable for a quarantine
    report, without the path).
    """

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


# ---------------------------------------------------------------------------- decoding


_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8", "JPEG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _sniff(data: bytes) -> str | None:
    """The image format a file's first bytes claim, if any (to tell corrupt from non-image)."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _load(path: str | Path, data: bytes | None) -> tuple[Image.Image, list[str], int]:
    """Open and fully decode ``path`` (or ``data``, its bytes), apply EXIF orientation.

    Returns the PIL image, the conversions so far, and the EXIF orientation (1 = none).
    """
    if data is None:  # decode from the file: its bytes are never all in memory beside the pixels
        try:
            with open(path, "rb") as fh:
                if os.fstat(fh.fileno()).st_size == 0:
                    raise ImageReadError(path, "empty file (0 bytes)")
                return _decode(path, fh)
        except OSError as err:
            raise ImageReadError(path, f"cannot read file ({err.strerror or err})") from None
    if len(data) == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    return _decode(path, io.BytesIO(data))


def _decode(path: str | Path, source) -> tuple[Image.Image, list[str], int]:
    """:func:`_load` on an open binary file object ``source`` (fully decoded before return)."""
    conversions: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(source)
        except UnidentifiedImageError:
            source.seek(0)
            magic = _sniff(source.read(16))
            if magic:
                raise ImageReadError(path, f"undecodable {magic} (corrupt header)") from None
            raise ImageReadError(path, "not an image (unrecognised format)") from None
        except Image.DecompressionBombError as err:
            raise ImageReadError(path, f"image too large ({err})") from None
        except Exception as err:  # noqa: BLE001 - any decoder failure is a reason, not a crash
            raise ImageReadError(path, f"undecodable ({type(err).__name__}: {err})") from None
        fmt = im.format or "unknown"
        if im.width * im.height > MAX_PIXELS:
            raise ImageReadError(path, f"image too large ({im.width}x{im.height} px)")
        if im.width == 0 or im.height == 0:
            raise ImageReadError(path, f"image has zero size ({im.width}x{im.height})")
        n_frames = getattr(im, "n_frames", 1)
        try:
            im.load()
        except OSError as err:
            msg = str(err)
            if "truncated" in msg or "broken data stream" in msg:
                raise ImageReadError(path, f"truncated file ({fmt})") from None
            raise ImageReadError(path, f"undecodable {fmt} ({msg})") from None
        except Exception as err:  # noqa: BLE001
            raise ImageReadError(path, f"undecodable {fmt} ({type(err).__name__}: {err})") from None
    if n_frames > 1:
        conversions.append(f"frames: used the first of {n_frames}")
    orientation = 1
    try:
        orientation = int(im.getexif().get(EXIF_ORIENTATION_TAG, 1) or 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: leave the pixels as stored
        conversions.append("exif: unreadable, orientation not applied")
    if orientation not in range(1, 9):
        conversions.append(f"exif: invalid orientation {orientation}, not applied")
        orientation = 1
    if orientation != 1:
        im = ImageOps.exif_transpose(im)
        conversions.append(f"exif_transpose: orientation {orientation}")
    return im, conversions, orientation


def apply_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF ``orientation`` (1..8) to an ``(H, W[, C])`` array, as ``exif_transpose`` does."""
    a = array
    if orientation == 1:
        return a
    if orientation == 2:
        return a[:, ::-1].copy()
    if orientation == 3:
        return a[::-1, ::-1].copy()
    if orientation == 4:
        return a[::-1].copy()
    if orientation == 5:
        return np.ascontiguousarray(np.swapaxes(a, 0, 1))
    if orientation == 6:
        return np.ascontiguousarray(np.rot90(a, -1))
    if orientation == 7:
        return np.ascontiguousarray(np.rot90(np.swapaxes(a, 0, 1), 2))
    if orientation == 8:
        return np.ascontiguousarray(np.rot90(a, 1))
    raise ValueError(f"EXIF orientation must be 1..8, got {orientation}")


def _int_gray(im: Image.Image, path, conversions: list[str]) -> np.ndarray:
    """A 16/32-bit integer or float single-channel PIL image -> uint16 array (exact when possible)."""
    a = np.array(im)
    if a.dtype.kind == "u" and a.dtype.itemsize == 2:
        return a.astype(np.uint16)
    if im.mode == "F":
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        if np.isnan(a).any() or lo < 0.0 or hi > 1.0:
            raise ImageReadError(path, f"float image with values outside [0, 1] ({lo:g}..{hi:g})")
        conversions.append("depth: float->16-bit")
        return np.round(a * 65535.0).astype(np.uint16)
    a = a.astype(np.int64)
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi > 65535:
        raise ImageReadError(path, f"integer image with values outside 0..65535 ({lo}..{hi})")
    if a.dtype != np.uint16 and im.mode not in ("I;16", "I;16B", "I;16L", "I;16N"):
        conversions.append(f"depth: {im.mode} 32-bit int->16-bit")
    return a.astype(np.uint16)


def read_image_rgb(path: str | Path, data: bytes | None = None) -> tuple[np.ndarray, list[str]]:
    """Read any photo as RGB.

    Args:
        path: the file (used for messages; read unless ``data`` is given).
        data: the file's bytes, if already read (ingest hashes and decodes one read).
    Returns:
        ``image: (H, W, 3) uint8`` RGB after EXIF orientation, and the conversions.
    Raises:
        ImageReadError: empty, truncated, undecodable or non-image file.
    """
    im, conversions, _ = _load(path, data)
    mode = im.mode
    if mode == "RGB":
        return _rgb_array(im), conversions
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        if mode == "F":
            a = np.array(im, dtype=np.float32)
            lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
            scale = 255.0 if hi <= 1.0 else 1.0
            gray = np.clip(np.round(np.nan_to_num(a) * scale), 0, 255).astype(np.uint8)
            conversions.append(f"depth: float ({lo:g}..{hi:g})->8-bit")
        else:
            a16 = _int_gray(im, path, conversions)
            gray = ((a16.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
            conversions.append("depth: 16-bit->8-bit")
        conversions.append("mode: L->RGB")
        return np.repeat(gray[:, :, None], 3, axis=2), conversions
    has_transparency = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in im.info
    )
    if has_transparency:
        conversions.append(f"mode: {mode}->RGB (transparency dropped)")
        rgb = im.convert("RGBA").convert("RGB") if mode in ("P", "PA") else im.convert("RGB")
    else:
        conversions.append(f"mode: {mode}->RGB")
        rgb = im.convert("RGB")
    im.close()  # free the source pixels before the array is made
    return _rgb_array(rgb), conversions


def _rgb_array(im: Image.Image, rows: int = 512) -> np.ndarray:
    """An RGB PIL image as a writable ``(H, W, 3)`` uint8 array, copied a band of rows at a
    time (``np.asarray(im).copy()`` holds two full copies beside PIL's own 4 bytes/pixel);
    the PIL image is closed after."""
    out = np.empty((im.height, im.width, 3), np.uint8)
    for top in range(0, im.height, rows):
        bottom = min(im.height, top + rows)
        out[top:bottom] = np.asarray(im.crop((0, top, im.width, bottom)), dtype=np.uint8)
    im.close()
    return out


def _single_channel(im: Image.Image, path, conversions: list[str], what: str) -> np.ndarray:
    """Reduce a PIL image to one channel (uint8 or uint16) or raise if that would be a guess."""
    mode = im.mode
    if mode == "L":
        return np.asarray(im, dtype=np.uint8).copy()
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _int_gray(im, path, conversions)
    if mode == "1":
        conversions.append("mode: 1-bit->L")
        return np.asarray(im.convert("L"), dtype=np.uint8).copy()
    if mode in ("P", "PA"):
        conversions.append(f"mode: {mode}->RGBA")
        im = im.convert("RGBA")
        mode = "RGBA"
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        conversions.append(f"mode: {mode}->RGB")
        im = im.convert("RGB")
        mode = "RGB"
    elif mode in ("RGBa", "La"):
        im = im.convert(mode[0:-1] + "A")
        mode = im.mode
    a = np.asarray(im)
    if mode in ("LA", "RGBA"):
        colour, transparency = a[..., :-1], a[..., -1]
        if (transparency == 255).all():
            conversions.append(f"channels: {mode} fully opaque, transparency ignored")
            a, mode = colour, mode[:-1]
        elif (colour == colour.reshape(-1, colour.shape[-1])[0]).all():
            conversions.append(f"channels: {mode} with constant colour, used the transparency channel")
            return transparency.copy()
        else:
            raise ImageReadError(
                path,
                f"{what} has both varying colour and transparency ({mode}); "
                "not single-channel-convertible (ambiguous)",
            )
    if mode == "LA" or (a.ndim == 3 and a.shape[-1] == 1):
        return a.reshape(a.shape[0], a.shape[1]).copy()
    if a.ndim == 3 and a.shape[-1] == 3:
        if (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all():
            conversions.append("channels: RGB with equal channels->L")
            return a[..., 0].copy()
        raise ImageReadError(path, f"{what} has 3 different channels (not single-channel-convertible)")
    raise ImageReadError(path, f"{what}: unsupported image mode {im.mode!r}")


def read_alpha(path: str | Path, data: bytes | None = None) -> tuple[np.ndarray, list[str]]:
    """Read an alpha matte at its own bit depth.

    Returns:
        ``alpha: (H, W) uint8 (0..255) or uint16 (0..65535)`` -- exactly the stored values, so
        a shard keeps them bit-exact; use :func:`alpha_to_float` for ``float32 [0, 1]``.
        Float (mode ``F``) files in [0, 1] are stored as uint16 (recorded).
    Raises:
        ImageReadError: unreadable file, or not single-channel-convertible (an RGB file whose
        channels differ; colour and transparency both varying).
    """
    im, conversions, _ = _load(path, data)
    return _single_channel(im, path, conversions, "alpha"), conversions


def alpha_to_float(alpha: np.ndarray) -> np.ndarray:
    """``alpha: (H, W) uint8 | uint16 | float`` -> ``(H, W) float32 in [0, 1]`` (uint8 /255, uint16 /65535)."""
    if alpha.dtype == np.uint8:
        return alpha.astype(np.float32) / np.float32(255.0)
    if alpha.dtype == np.uint16:
        return alpha.astype(np.float32) / np.float32(65535.0)
    if np.issubdtype(alpha.dtype, np.floating):
        return alpha.astype(np.float32)
    raise TypeError(f"alpha must be uint8, uint16 or float, got {alpha.dtype}")


def read_mask(path: str | Path, data: bytes | None = None) -> tuple[np.ndarray, list[str]]:
    """Read a segmentation mask.

    Returns:
        ``mask: (H, W) uint8 in {0, 1}``. 0/255 files need no conversion; 0/1 files are
        recorded (``"mask: 0/1 values"``); anything else is thresholded at half range
        (``>= 128`` for 8-bit, ``>= 32768`` for 16-bit) and recorded with the number of
        distinct values found.
    """
    im, conversions, _ = _load(path, data)
    a = _single_channel(im, path, conversions, "mask")
    if a.dtype == np.uint8:
        present = np.flatnonzero(np.bincount(a.ravel(), minlength=256))
        full = 255
    else:
        present = np.unique(a)
        full = 65535
        conversions.append("depth: 16-bit mask")
    values = set(present.tolist())
    if values <= {0, full}:
        return (a == full).astype(np.uint8), conversions
    if values <= {0, 1}:
        conversions.append("mask: 0/1 values")
        return a.astype(np.uint8), conversions
    half = (full + 1) // 2
    conversions.append(f"mask: thresholded at {half} ({len(values)} distinct values)")
    return (a >= half).astype(np.uint8), conversions


def read_trimap(path: str | Path, data: bytes | None = None) -> tuple[np.ndarray, list[str]]:
    """Read a trimap: ``(H, W) uint8`` with 0 = background, 128 = unknown, 255 = foreground.

    Other values are quantised (``< 85`` -> 0, ``> 170`` -> 255, else 128) and recorded;
    16-bit files are scaled to 8 bits first (recorded).
    """
    im, conversions, _ = _load(path, data)
    a = _single_channel(im, path, conversions, "trimap")
    if a.dtype == np.uint16:
        a = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        conversions.append("depth: 16-bit->8-bit")
    present = set(np.flatnonzero(np.bincount(a.ravel(), minlength=256)).tolist())
    if present <= {0, 128, 255}:
        return a, conversions
    out = np.full_like(a, 128)
    out[a < 85] = 0
    out[a > 170] = 255
    conversions.append(f"trimap: quantised to 0/128/255 ({len(present)} distinct values)")
    return out, conversions


def read_rgba(path: str | Path, data: bytes | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read an RGBA cutout: its colour is the foreground as is, its 4th channel the alpha.

    The colour is taken as straight (not premultiplied) colour and used unchanged, also
    where alpha is 0 (see README "RGBA cutouts").

    Returns:
        ``rgb: (H, W, 3) uint8``, ``alpha: (H, W) uint8``, conversions.
    Raises:
        ImageReadError: unreadable, or the file has no transparency channel.
    """
    im, conversions, _ = _load(path, data)
    mode = im.mode
    if mode == "RGBA":
        a = np.asarray(im, dtype=np.uint8)
    elif mode in ("LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        conversions.append(f"mode: {mode}->RGBA")
        a = np.asarray(im.convert("RGBA"), dtype=np.uint8)
    else:
        raise ImageReadError(path, f"RGBA cutout has no transparency channel (mode {mode})")
    rgb, alpha = a[..., :3].copy(), a[..., 3].copy()
    if (alpha == 255).all():
        conversions.append("alpha: fully opaque cutout")
    return rgb, alpha, conversions


# ---------------------------------------------------------------------------- resizing

_RESIZE_KINDS = ("mask", "trimap", "alpha", "image")


def resize_partner(array: np.ndarray, size_hw: tuple[int, int], kind: str) -> tuple[np.ndarray, str]:
    """Resize a partner file (mask/trimap/alpha/image) to its image's ``size_hw``.

    Masks and trimaps use nearest neighbour (values stay in their label set); alpha and
    images use area interpolation when shrinking in both axes, else bilinear. The dtype
    is kept (uint8 / uint16). Returns the array and the conversion string to record.
    """
    if kind not in _RESIZE_KINDS:
        raise ValueError(f"kind must be one of {_RESIZE_KINDS}, got {kind!r}")
    h, w = int(size_hw[0]), int(size_hw[1])
    src_h, src_w = array.shape[:2]
    if kind in ("mask", "trimap"):
        interp, name = cv2.INTER_NEAREST, "nearest"
    elif h <= src_h and w <= src_w:
        interp, name = cv2.INTER_AREA, "area"
    else:
        interp, name = cv2.INTER_LINEAR, "linear"
    out = cv2.resize(array, (w, h), interpolation=interp)
    if out.ndim < array.ndim:  # cv2 drops a trailing channel axis of size 1
        out = out[..., None]
    return out, f"resize: {src_w}x{src_h}->{w}x{h} ({name})"
