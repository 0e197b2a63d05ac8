"""Predict alpha mattes for an image or a folder of images.

    matting predict --checkpoint models/student/seg240-mat32/model.pt --input photos/ --output out/
    matting predict --checkpoint model.pt --input me.jpg --output out/ --composite "#00ff00"

For every input image: ``<output>/<name>.png``, an 8-bit single-channel alpha of the input's
size (the network sees the image resized so its shorter side is ``--short-side``, 512 by
default, and the alpha is resized back). With ``--composite`` also
``<output>/<name>.composite.png``: the cut-out over a colour (a name such as ``white``,
``#rrggbb`` or ``r,g,b``) or over an image file (scaled to cover, centre-cropped).

Related methods (a checkpoint of ``method@<name>``, or of a teacher trained with
params.yaml's ``method``) need their guidance; the checkpoint's spec says which, and a
missing one is a usage error naming the flag:

    matting predict --checkpoint models/methods/dim/seg240-mat32/model.pt --input photos/ \
        --trimap trimaps/ --output out/           # DIM, AdaMatting: a trimap per image
    matting predict ... --mask masks/             # MGM, MGM in the wild: a coarse mask per image
    matting predict ... --box 40,10,200,300       # MAM: a box X0,Y0,X1,Y1 (or --point X,Y)

``--trimap DIR`` / ``--mask DIR`` hold one file per input image with the same relative
path and stem, any image extension (``photos/sub/a.jpg`` → ``DIR/sub/a.png``); with a single
``--input`` file they may name the file itself. Trimaps are 0 / 128 / 255 (other values are
quantised), masks 0/255 or 0/1; a partner of another size is resized to the image
(nearest) and said so. An image without its partner file is skipped with the reason.
``--box`` / ``--point`` are pixel coordinates of the input image (inclusive), used for every
input. Giving guidance a checkpoint does not take is a usage error too.

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
import tempfile
from pathlib import Path

import numpy as np

DESCRIPTION = __doc__


MAX_SHORT_SIDE = 8192  # px: a larger network input does not fit a workstation's memory


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
    guidance = parser.add_argument_group("guidance (related methods only; the checkpoint says which it needs)")
    guidance.add_argument("--trimap", metavar="DIR", default=None,
                          help="trimaps (0/128/255) matching the inputs' relative paths: DIM, AdaMatting")
    guidance.add_argument("--mask", metavar="DIR", default=None,
                          help="coarse person masks matching the inputs' relative paths: MGM, MGM in the wild")
    guidance.add_argument("--box", metavar="X0,Y0,X1,Y1", default=None,
                          help="box prompt in input-image pixels (inclusive), for every input: MAM")
    guidance.add_argument("--point", metavar="X,Y", default=None,
                          help="point prompt in input-image pixels, for every input: MAM")


GUIDANCE_FLAGS = {"trimap": "--trimap DIR", "mask": "--mask DIR", "prompt": "--box X0,Y0,X1,Y1 or --point X,Y"}


def parse_numbers(text: str, count: int, flag: str) -> list[float]:
    """``"1,2,3,4"`` → four floats (``count`` of them), each >= 0, or a ValueError naming ``flag``."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != count or not all(np.isfinite(v) and v >= 0 for v in values):
        shape = "X0,Y0,X1,Y1" if count == 4 else "X,Y"
        raise ValueError(f"{flag} {text!r}: expected {shape}, {count} pixel coordinates >= 0")
    return values


def parse_prompt(box: str | None, point: str | None):
    """The MAM prompt (5,) of ``--box`` or ``--point`` (None when neither is given)."""
    from matting_core.methods.mam import box_prompt, point_prompt

    if box is not None and point is not None:
        raise ValueError("give either --box or --point, not both (one prompt per image)")
    if box is not None:
        x0, y0, x1, y1 = parse_numbers(box, 4, "--box")
        if x1 < x0 or y1 < y0:
            raise ValueError(f"--box {box!r}: needs X0 <= X1 and Y0 <= Y1")
        return box_prompt(x0, y0, x1, y1)
    if point is not None:
        return point_prompt(*parse_numbers(point, 2, "--point"))
    return None


def check_guidance(method, given: dict[str, bool], checkpoint: Path) -> str | None:
    """The usage error for the guidance flags given to ``method``'s checkpoint, or None."""
    need = method.required_input
    names = {"trimap": "--trimap", "mask": "--mask", "prompt": "--box/--point"}
    extra = [names[k] for k, on in given.items() if on and k != need]
    if need is None and extra:
        return (f"{checkpoint} is a {method.name} model ({method.summary}): it takes the RGB image only; "
                f"drop {', '.join(extra)}")
    if extra:
        return (f"{', '.join(extra)} is not used by a {method.name} model ({checkpoint}); it needs "
                f"{method.guidance_help}" + ("" if given.get(need) else f". Pass {GUIDANCE_FLAGS[need]}"))
    if need is not None and not given.get(need):
        return (f"{checkpoint} is a {method.name} model ({method.summary}); it needs {method.guidance_help}. "
                f"Pass {GUIDANCE_FLAGS[need]}")
    return None


def find_partner(folder: Path, rel: Path, single_input: bool) -> Path | None:
    """The guidance file for input ``rel`` in ``folder``: same relative stem, any extension (.png first)."""
    if folder.is_file():
        return folder if single_input else None
    parent = folder / rel.parent
    if not parent.is_dir():
        return None
    stem = rel.with_suffix("").name
    candidates = sorted(p for p in parent.iterdir()
                        if p.is_file() and not p.name.startswith(".") and p.with_suffix("").name == stem)
    if not candidates:
        return None
    pngs = [p for p in candidates if p.suffix.lower() == ".png"]
    return (pngs or candidates)[0]


def read_partner(kind: str, path: Path, size_hw: tuple[int, int]) -> tuple[np.ndarray, list[str]]:
    """A trimap (0/128/255) or mask (0/255) as (H, W) uint8 of the image's size, and its conversions."""
    from matting_pipeline.imageio import read_mask, read_trimap, resize_partner

    if kind == "trimap":
        array, conversions = read_trimap(path)
    else:
        array, conversions = read_mask(path)
        array = array * np.uint8(255)
    if array.shape[:2] != tuple(size_hw):
        array, note = resize_partner(array, size_hw, kind)
        conversions.append(f"{kind}.{note}")
    return array, conversions


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


def list_inputs(path: Path, exclude: Path | None = None) -> list[tuple[Path, Path]]:
    """``(file, path relative to the input root)`` for a file or every non-hidden file below a
    folder; nothing below ``exclude`` (the output folder, when it lies inside the input folder:
    a second run must not read its own mattes as photos)."""
    if path.is_file():
        return [(path, Path(path.name))]
    skip = exclude.resolve() if exclude is not None else None
    if skip is not None and path.resolve() not in skip.parents:
        skip = None  # only an output folder strictly inside the input folder is left out
    files = []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if skip is not None and (p.resolve() == skip or skip in p.resolve().parents):
            continue
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            files.append((p, rel))
    return files


def overwritten_inputs(inputs: list[tuple[Path, Path]], out_dir: Path, names: list[Path]) -> list[Path]:
    """Input files that an output of this run (``<name>.png`` or ``<name>.composite.png``) would replace."""
    sources = {p.resolve() for p, _ in inputs}
    clashes = []
    for name in names:
        for suffix in (".png", ".composite.png"):
            target = (out_dir / name).with_name(name.name + suffix).resolve()
            if target in sources:
                clashes.append(target)
    return clashes


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


def write_outputs(image: np.ndarray, alpha_rows, background, alpha_path: Path, composite_path: Path) -> None:
    """Write the 8-bit alpha PNG and, with a ``background``, the composite PNG, a band of rows
    at a time: the only full-size arrays are the photo (3 bytes/pixel, overwritten in place
    by the composite) and the 8-bit alpha (1 byte/pixel), plus a fitted background image.

    ``alpha_rows(start, stop)`` gives float alpha rows in [0, 1]. PNGs are written by
    ``cv2.imwrite`` (streamed, no encoded copy in memory) to a temp sibling, then renamed."""
    import cv2

    from matting_core.inference import composite_rows, cover_background, row_bands
    from matting_pipeline.atomic import atomic_path

    height, width = image.shape[:2]
    alpha_u8 = np.empty((height, width), np.uint8)
    bg = None if background is None else cover_background(background, (height, width))
    for start, stop in row_bands(height):
        alpha = alpha_rows(start, stop)
        alpha_u8[start:stop] = np.clip(np.round(alpha * 255.0), 0, 255)
        if bg is not None:
            image[start:stop] = composite_rows(image[start:stop], alpha, bg, start)[:, :, ::-1]  # as BGR, for cv2
    with atomic_path(alpha_path) as tmp:
        if not cv2.imwrite(str(tmp), alpha_u8):
            raise OSError(f"cv2 could not write {tmp}")
    del alpha_u8
    if bg is not None:
        with atomic_path(composite_path) as tmp:
            if not cv2.imwrite(str(tmp), image):
                raise OSError(f"cv2 could not write {tmp}")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from matting_core.checkpoint import load_model
    from matting_core.inference import predict_lowres, upsample_rows
    from matting_core.methods import method_of, predict_image
    from matting_pipeline.imageio import ImageReadError, read_image_rgb
    from matting_pipeline.trainer import resolve_device

    def usage(message: str) -> int:
        print(f"matting predict: error: {message}", file=sys.stderr)
        return 2

    source = Path(args.input)
    if not source.exists():
        return usage(f"--input {source} does not exist")
    if not 1 <= args.short_side <= MAX_SHORT_SIDE:
        return usage(f"--short-side must be between 1 and {MAX_SHORT_SIDE} px, got {args.short_side}")
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
    method = method_of(model)
    given = {"trimap": args.trimap is not None, "mask": args.mask is not None,
             "prompt": args.box is not None or args.point is not None}
    problem = check_guidance(method, given, checkpoint)
    if problem is not None:
        return usage(problem)
    try:
        prompt = parse_prompt(args.box, args.point)
    except ValueError as err:
        return usage(str(err))
    partner_dir = None
    if method.required_input in ("trimap", "mask"):
        flag = f"--{method.required_input}"
        partner_dir = Path(getattr(args, method.required_input))
        if not partner_dir.exists():
            return usage(f"{flag} {partner_dir} does not exist")
        if partner_dir.is_file() and not source.is_file():
            return usage(f"{flag} {partner_dir} is a file; with a folder --input give a folder of {method.required_input}s")

    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        return usage(f"--output {out_dir} is a file; give a folder for the alpha PNGs")
    inputs = list_inputs(source, exclude=out_dir)
    names = output_names([rel for _, rel in inputs])
    clashes = overwritten_inputs(inputs, out_dir, names)
    if clashes:
        shown = ", ".join(str(c) for c in clashes[:3]) + (f" and {len(clashes) - 3} more" if len(clashes) > 3 else "")
        return usage(f"--output {out_dir} would overwrite input file(s) {shown}; choose another --output folder")
    try:  # a folder that cannot be made or written (/proc, read-only, no permission) fails before any work
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as err:
        return usage(f"--output {out_dir} is not a writable folder ({err.strerror or err}); choose another --output")
    written, unreadable = 0, []
    for (path, rel), name in tqdm(list(zip(inputs, names)), desc="predict", unit="img", disable=len(inputs) < 2):
        try:
            image, conversions = read_image_rgb(path)
        except ImageReadError as err:
            unreadable.append((path, err.reason))
            continue
        except Exception as err:  # noqa: BLE001 - report any decoder failure, keep going
            unreadable.append((path, f"{type(err).__name__}: {err}"))
            continue
        for note in conversions:
            if note.startswith("frames:"):  # an animated image: say which frame the matte is of
                print(f"matting predict: {path}: animated image, {note[len('frames: '):]} frames", file=sys.stderr)
        height, width = image.shape[:2]
        if method.required_input is None:  # the network's small map, brought back a band at a time
            low = predict_lowres(model, image, short_side=args.short_side, device=device)["alpha"]

            def alpha_rows(start, stop, low=low):
                return upsample_rows(low, (height, width), start, stop)
        else:
            if partner_dir is not None:
                kind = method.required_input
                partner = find_partner(partner_dir, rel, source.is_file())
                if partner is None:
                    unreadable.append((path, f"no {kind} for it in {partner_dir} (looked for "
                                             f"{rel.with_suffix('').as_posix()}.*)"))
                    continue
                try:
                    guidance, notes = read_partner(kind, partner, image.shape[:2])
                except ImageReadError as err:
                    unreadable.append((path, f"its {kind} {partner}: {err.reason}"))
                    continue
                for note in notes:
                    print(f"matting predict: {partner}: {note}", file=sys.stderr)
            else:
                guidance = prompt
            alpha = predict_image(model, image, guidance, short_side=args.short_side, device=device)

            def alpha_rows(start, stop, alpha=alpha):
                return alpha[start:stop]
        target = out_dir / name.parent / f"{name.name}.png"
        try:
            write_outputs(image, alpha_rows, background, target, target.with_name(f"{name.name}.composite.png"))
        except OSError as err:  # disk full, folder removed mid-run: stop, say which file
            print(f"matting predict: error: cannot write {target} ({err.strerror or err}); "
                  f"{written} matte(s) written before it", file=sys.stderr)
            return 1
        written += 1

    for path, reason in unreadable:
        print(f"matting predict: skipped {path}: {reason}", file=sys.stderr)
    print(f"predict: wrote {written} alpha matte(s) to {out_dir}; {len(unreadable)} file(s) unreadable")
    if written == 0:
        print(f"matting predict: error: no readable image under {source}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from matting_pipeline.cli import run_module

    run_module("predict")
