"""The ingest manifest: its entries, and decoding an entry exactly as ingest accepted it.

``data/ingest/manifest.jsonl`` (docs/FORMATS.md "Ingest") holds one accepted sample a
line: set, stem, role -> path, role -> sha256, size and the conversions ingest applied.
The ingest stage writes it (with :func:`decode_candidate`); the shard stage reads it back
(:func:`read_manifest`, :func:`load_entry`), refusing any file that changed since.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from matting_pipeline import imageio
from matting_pipeline.atomic import bytes_sha256
from matting_pipeline.layout import Layout

__all__ = ["IngestError", "decode_candidate", "load_entry", "read_manifest", "set_kind"]


class IngestError(RuntimeError):
    """A configured set cannot be ingested (missing/empty folder, nothing accepted, changed file)."""


def _orientation(conversions: list[str]) -> int:
    for c in conversions:
        if c.startswith("exif_transpose: orientation "):
            return int(c.rsplit(" ", 1)[-1])
    return 1


def decode_candidate(
    kind: str, paths: dict[str, str], layout: str, blobs: dict[str, bytes]
) -> tuple[dict[str, np.ndarray], list[str], dict[str, str]]:
    """Decode one sample's files and bring partners to the primary's size.

    Args:
        kind: set kind (matte | background | seg | val).
        paths: role -> file path; ``blobs``: the same files' bytes (path -> bytes).
        layout: ``pair`` | ``rgba`` | ``single``.
    Returns:
        ``(arrays, conversions, errors)``: role -> array (``image``/``fg`` ``(H, W, 3)
        uint8``, ``alpha`` ``(H, W)`` uint8|uint16, ``mask`` ``(H, W)`` uint8 {0, 1},
        ``trimap`` uint8), the conversions prefixed by role (``"mask.resize: ..."``), and
        role -> reason for every file that could not be read (then ``arrays`` is partial).
    """
    arrays: dict[str, np.ndarray] = {}
    conversions: list[str] = []
    errors: dict[str, str] = {}
    if layout == "rgba":
        p = paths["fg"]
        try:
            rgb, alpha, conv = imageio.read_rgba(p, blobs[p])
        except imageio.ImageReadError as err:
            return {}, [], {"fg": err.reason, "alpha": err.reason}
        conversions += [f"fg.{c}" for c in conv]
        conversions += ["fg.cutout: RGB of the RGBA cutout used as is", "alpha.cutout: 4th channel of the RGBA cutout"]
        return {"fg": rgb, "alpha": alpha}, conversions, {}
    readers = {
        "image": imageio.read_image_rgb,
        "fg": imageio.read_image_rgb,
        "alpha": imageio.read_alpha,
        "mask": imageio.read_mask,
        "trimap": imageio.read_trimap,
    }
    primary = "image" if kind in ("background", "seg", "val") else "fg"
    order = [primary] + sorted(r for r in paths if r != primary)
    per_role: dict[str, list[str]] = {}
    for role in order:
        p = paths[role]
        try:
            arrays[role], per_role[role] = readers[role](p, blobs[p])
        except imageio.ImageReadError as err:
            errors[role] = err.reason
    if errors:
        return arrays, [], errors
    h, w = arrays[primary].shape[:2]
    orientation = _orientation(per_role[primary])
    for role in order[1:]:
        a = arrays[role]
        if a.shape[:2] == (h, w):
            continue
        if orientation in (5, 6, 7, 8) and a.shape[:2] == (w, h) and _orientation(per_role[role]) == 1:
            arrays[role] = imageio.apply_orientation(a, orientation)
            per_role[role].append(
                f"exif_transpose: orientation {orientation} (from the image; partner matched its stored orientation)"
            )
            continue
        arrays[role], conv = imageio.resize_partner(a, (h, w), "alpha" if role == "alpha" else role)
        per_role[role].append(conv)
    for role in order:
        conversions += [f"{role}.{c}" for c in per_role[role]]
    return arrays, conversions, {}


def load_entry(entry: dict, kind: str) -> dict[str, np.ndarray]:
    """Decode a manifest entry's files again, exactly as ingest accepted them.

    Checks each file's sha256 against the manifest and that the conversions are the same.
    Returns role -> array (see :func:`decode_candidate`).

    Raises:
        IngestError: a file changed, vanished or decodes differently since ingest.
    """
    blobs = {}
    for role, p in entry["paths"].items():
        try:
            data = blobs.get(p) or Path(p).read_bytes()
        except OSError as err:
            raise IngestError(f"{p}: cannot read ({err.strerror or err}); re-run `matting ingest`") from None
        if bytes_sha256(data) != entry["sha256"][role]:
            raise IngestError(f"{p}: changed since ingest (sha256 differs); re-run `matting ingest`")
        blobs[p] = data
    layout = "rgba" if kind == "matte" and entry["paths"].get("fg") == entry["paths"].get("alpha") else (
        "single" if kind == "background" else "pair"
    )
    arrays, conversions, errors = decode_candidate(kind, entry["paths"], layout, blobs)
    if errors or conversions != entry["conversions"]:
        raise IngestError(f"{entry['stem']!r} ({entry['set']}): decodes differently than at ingest; re-run `matting ingest`")
    return arrays


def set_kind(set_name: str) -> str:
    """``matte`` / ``background`` / ``seg`` / ``val`` for a set name (``val-<name>`` -> ``val``)."""
    if set_name.startswith("val-"):
        return "val"
    if set_name in ("matte", "background", "seg"):
        return set_name
    raise ValueError(f"unknown set {set_name!r}")


def read_manifest(data_root: str | Path = "data") -> list[dict]:
    """The accepted entries of ``<data_root>/ingest/manifest.jsonl`` (raises if ingest has not run)."""
    path = Layout(data=Path(data_root)).manifest
    if not path.is_file():
        raise IngestError(f"{path}: not found; run `matting ingest` first")
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
