"""Predict alpha mattes for an image or a folder of images.

    matting predict --checkpoint models/student/seg240-mat32/model.pt --input photos/ --output out/
    matting predict --checkpoint model.pt --input me.jpg --output out/ --composite "#00ff00"

For every input image: ``<output>/<name>.png``, an 8-bit single-channel alpha of the input's
size (the network sees the image resized so its shorter side is ``--short-side``, 512 by
default, and the alpha is resized back). With ``--composite`` also
``<output>/<name>.composite.png``: the cut-out over a colour (a name such as ``white``,
``#rrggbb`` or ``r,g,b``) or over an image file (scaled to cover, centre-cropped).

A folder is searched recursively (hidden files skipped); sub-folders are kept in the
output. When two inputs would get the same output name (``a.jpg`` and ``a.png``) both keep
their extension (``a.jpg.png``, ``a.png.png``). Files are decoded like ingest does
(EXIF rotation applied, grayscale / CMYK / 16-bit / RGBA converted); a file that cannot be
read is reported with its reason and skipped. Exit status: 0 when at least one matte was
written, 1 when no input could be read, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a model.pt written by a training stage")
    parser.add_argument("--input", required=True, help="an image file or a folder of images (recursive)")
    parser.add_argument("--output", required=True, help="folder for the alpha PNGs (created)")
    parser.add_argument(
        "--short-side", type=int, default=512, help="network input: shorter side resized to this (default 512)"
    )
    parser.add_argument(
        "--composite", default=None, metavar="COLOR_OR_IMAGE",
        help="also write the cut-out over a colour (name, #rrggbb, r,g,b) or an image file",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def parse_colour(text: str) -> tuple[int, int, int]:
    """``"white"``, ``"#00ff00"``, ``"#0f0"`` or ``"0,255,0"`` → ``(r, g, b)``."""
    from PIL import ImageColor

    parts = [p.strip() for p in text.split(",")]
    if len(parts) == 3:
        try:
            rgb = tuple(int(p) for p in parts)
        except ValueError:
            rgb = None
        if rgb is None or not all(0 <= v <= 255 for v in rgb):
            raise ValueError(f"colour {text!r}: r,g,b needs three integers in 0..255")
        return rgb  # type: ignore[return-value]
    try:
        value = ImageColor.getrgb(text.strip())
    except ValueError:
        raise ValueError(
            f"--composite {text!r} is neither an existing image file nor a colour "
            "(a name such as white, #rrggbb, or r,g,b)"
        ) from None
    return tuple(value[:3])  # type: ignore[return-value]


def list_inputs(path: Path) -> list[tuple[Path, Path]]:
    """``(file, path relative to the input root)`` for a file or every non-hidden file below a folder."""
    if path.is_file():
        return [(path, Path(path.name))]
    files = []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            files.append((p, rel))
    return files


def output_names(rels: list[Path]) -> list[Path]:
    """Output stem paths (no extension) per input, unique: ``a`` or, on a clash, ``a.jpg``."""
    stems = [r.with_suffix("") for r in rels]
    counts: dict[Path, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    names = [r if counts[s] > 1 else s for r, s in zip(rels, stems)]
    seen: set[Path] = set()
    unique = []
    for n in names:
        candidate, i = n, 1
        while candidate in seen:
            candidate = n.with_name(f"{n.name}-{i}")
            i += 1
        seen.add(candidate)
        unique.append(candidate)
    return unique


def _png_bytes(array) -> bytes:
    import cv2

    if array.ndim == 3:
        array = array[:, :, ::-1]  # RGB -> BGR for cv2
    ok, buf = cv2.imencode(".png", array)
    if not ok:  # pragma: no cover - cv2 encodes any uint8 array
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    from matting_core.checkpoint import load_model
    from matting_core.inference import cutout_over, predict_alpha
    from stages.atomic import write_bytes
    from stages.imageio import ImageReadError, read_image_rgb
    from stages.training import resolve_device

    def usage(message: str) -> int:
        print(f"matting predict: error: {message}", file=sys.stderr)
        return 2

    source = Path(args.input)
    if not source.exists():
        return usage(f"--input {source} does not exist")
    if args.short_side < 1:
        return usage(f"--short-side must be >= 1, got {args.short_side}")
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        return usage(f"--checkpoint {checkpoint} not found")
    background = None
    if args.composite is not None:
        bg_path = Path(args.composite)
        if bg_path.is_file():
            try:
                background, _ = read_image_rgb(bg_path)
            except ImageReadError as err:
                return usage(f"--composite {bg_path}: {err.reason}")
        else:
            try:
                background = parse_colour(args.composite)
            except ValueError as err:
                return usage(str(err))
    try:
        device = resolve_device(args.device)
        model, _ = load_model(checkpoint, map_location=device)
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is a usage error here
        return usage(f"cannot load {checkpoint}: {err}")

    inputs = list_inputs(source)
    names = output_names([rel for _, rel in inputs])
    out_dir = Path(args.output)
    written, unreadable = 0, []
    for (path, _), name in tqdm(list(zip(inputs, names)), desc="predict", unit="img", disable=len(inputs) < 2):
        try:
            image, _ = read_image_rgb(path)
        except ImageReadError as err:
            unreadable.append((path, err.reason))
            continue
        except Exception as err:  # noqa: BLE001 - report any decoder failure, keep going
            unreadable.append((path, f"{type(err).__name__}: {err}"))
            continue
        alpha = predict_alpha(model, image, short_side=args.short_side, device=device)
        alpha_u8 = np.clip(np.round(alpha * 255.0), 0, 255).astype(np.uint8)
        write_bytes(out_dir / name.parent / f"{name.name}.png", _png_bytes(alpha_u8))
        if background is not None:
            cut = cutout_over(image, alpha, background)
            write_bytes(out_dir / name.parent / f"{name.name}.composite.png", _png_bytes(cut))
        written += 1

    for path, reason in unreadable:
        print(f"matting predict: skipped {path}: {reason}", file=sys.stderr)
    print(f"predict: wrote {written} alpha matte(s) to {out_dir}; {len(unreadable)} file(s) unreadable")
    if written == 0:
        print(f"matting predict: error: no readable image under {source}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from stages.cli import run_module

    run_module("predict")
