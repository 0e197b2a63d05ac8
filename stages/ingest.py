"""Stage ``ingest``: validate every configured dataset file; write manifest + quarantine.

Reads params ``data``. With ``data.source: synthetic`` the embedded dataset is first
generated into ``<data-root>/ingest/synthetic/`` in the same folder layouts a user
supplies, then ingested by the same code as real folders.

Set layouts (README "Data layouts"):

=============  ===========================  ==========================================
set            params key                   folder layout
=============  ===========================  ==========================================
``matte``      ``data.matte_dir``           ``fg/`` + ``alpha/`` (same stems), and/or ``rgba/``
``background`` ``data.background_dir``      any images, recursive
``seg``        ``data.seg_dir``             ``image/`` + ``mask/`` (same stems)
``val-<n>``    ``data.val.<n>``             ``image/`` + ``alpha/`` (+ ``trimap/``, + ``mask/``: coarse
                                            segmentation labels; the report then shows each model's
                                            error next to its training label's own error)
=============  ===========================  ==========================================

A *stem* is the path below the role folder without its last suffix, Unicode-NFC
normalised (``image/sub/Ä b.JPG`` and ``mask/sub/Ä b.png`` pair up). Every file found
is either part of an accepted sample in ``manifest.jsonl`` or listed with a reason in
``quarantine.jsonl``; nothing is dropped silently (docs/FORMATS.md "Ingest").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from matting_pipeline.atomic import atomic_dir, bytes_sha256, write_json, write_jsonl
from matting_pipeline.config import DataConfig, SyntheticConfig, load_params
from matting_pipeline.layout import Layout
from matting_pipeline.manifest import IngestError, decode_candidate
from matting_pipeline.shards import default_workers, parallel_map

DESCRIPTION = __doc__

# set kind -> (primary role, required partner roles, optional partner roles)
PAIR_LAYOUTS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "seg": ("image", ("mask",), ()),
    "val": ("image", ("alpha",), ("trimap", "mask")),
    "matte": ("fg", ("alpha",), ()),
}
# role -> folder name inside the set directory
ROLE_DIRS = {"image": "image", "mask": "mask", "alpha": "alpha", "trimap": "trimap", "fg": "fg"}
SYNTHETIC_VAL_NAME = "natural"
# val items of the synthetic set are natural_item(seed, SYNTHETIC_VAL_OFFSET + j): disjoint
# from the seg items (0 .. seg-1) whatever the sizes.
SYNTHETIC_VAL_OFFSET = 1_000_000


@dataclass(frozen=True)
class SetSource:
    """One configured set: its name (``matte``, ``seg``, ``val-p3m``), kind and folder."""

    name: str
    kind: str  # matte | background | seg | val
    root: Path
    param_key: str  # e.g. "data.seg_dir" -- named in every error about this set


@dataclass
class Candidate:
    """A would-be sample: files by role, before decoding."""

    set: str
    kind: str
    stem: str
    paths: dict[str, str]
    layout: str = "pair"  # pair | rgba | single


@dataclass
class SetReport:
    """One set's ingest counts. Files: ``files`` found = ``files_used`` + ``quarantined``;
    samples: ``accepted`` (a sample is a pair of files, or one for backgrounds)."""

    files: int = 0
    accepted: int = 0
    quarantined: int = 0
    files_used: int = 0
    converted: int = 0
    conversions: Counter = field(default_factory=Counter)


# ---------------------------------------------------------------------------- discovery


def _list_files(root: Path) -> list[Path]:
    """Every regular file below ``root`` (recursive, following links), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_file():
                out.append(p)
    return out


def _stem(path: Path, base: Path) -> str:
    rel = path.relative_to(base).as_posix()
    name = rel.rsplit("/", 1)[-1]
    if "." in name.lstrip("."):
        rel = rel[: rel.rfind(".")]
    return unicodedata.normalize("NFC", rel)


def _require_dir(path: Path, param_key: str, what: str) -> None:
    if not path.exists():
        raise IngestError(f"{param_key}: {what} {path} does not exist")
    if not path.is_dir():
        raise IngestError(f"{param_key}: {what} {path} is not a directory")


def _group_by_stem(files: list[Path], base: Path) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for f in files:
        groups.setdefault(_stem(f, base), []).append(f)
    return groups


def discover(source: SetSource) -> tuple[list[Candidate], list[dict], int]:
    """Pair the files of one set by stem.

    Returns ``(candidates, quarantine_rows, files_found)``; rows cover duplicate stems and
    files without their partner. Raises :class:`IngestError` (naming ``param_key``) when
    the folder or a required sub-folder is missing, or no file is found at all.
    """
    root = source.root
    _require_dir(root, source.param_key, "folder")
    quarantine: list[dict] = []

    def q(path: Path, reason: str) -> None:
        quarantine.append({"set": source.name, "path": str(path), "reason": reason})

    if source.kind == "background":
        files = _list_files(root)
        if not files:
            raise IngestError(f"{source.param_key}: folder {root} is empty (no files found)")
        cands = []
        for stem, group in sorted(_group_by_stem(files, root).items()):
            if len(group) > 1:
                for f in group:
                    q(f, f"duplicate stem {stem!r}: {', '.join(g.name for g in group)} (ambiguous)")
                continue
            cands.append(Candidate(source.name, source.kind, stem, {"image": str(group[0])}, "single"))
        return cands, quarantine, len(files)

    primary, required, optional = PAIR_LAYOUTS[source.kind]
    layouts: dict[str, dict[str, list[Path]]] = {}  # stem -> role -> files
    n_files = 0
    role_dirs = {r: root / ROLE_DIRS[r] for r in (primary, *required, *optional)}
    rgba_dir = root / "rgba"
    has_pairs = role_dirs[primary].is_dir() or any(role_dirs[r].is_dir() for r in required)
    use_rgba = source.kind == "matte" and rgba_dir.is_dir()
    if not has_pairs and not use_rgba:
        want = f"{ROLE_DIRS[primary]}/ + " + " + ".join(f"{ROLE_DIRS[r]}/" for r in required)
        if source.kind == "matte":
            want += " (or rgba/ cutouts)"
        raise IngestError(f"{source.param_key}: {root} has no {want} folders")
    present_optional: list[str] = []
    if has_pairs:
        for role in (primary, *required):
            _require_dir(role_dirs[role], source.param_key, f"{role} folder")
        for role in (primary, *required, *optional):
            d = role_dirs[role]
            if not d.is_dir():
                continue
            files = _list_files(d)
            n_files += len(files)
            if role in optional and files:
                present_optional.append(role)
            for stem, group in _group_by_stem(files, d).items():
                layouts.setdefault(stem, {})[role] = group
    rgba_stems: dict[str, list[Path]] = {}
    if use_rgba:
        files = _list_files(rgba_dir)
        n_files += len(files)
        rgba_stems = _group_by_stem(files, rgba_dir)
    if n_files == 0:
        raise IngestError(f"{source.param_key}: folder {root} is empty (no files found in its layout folders)")
    # files beside the layout folders (a README, a misspelt masks/ folder) are reported, not used
    layout_dirs = [role_dirs[r] for r in (primary, *required, *optional)] + ([rgba_dir] if use_rgba else [])
    expected = " + ".join(f"{d.name}/" for d in layout_dirs if d.is_dir())
    for f in _list_files(root):
        if not any(d == f.parent or d in f.parents for d in layout_dirs if d.is_dir()):
            q(f, f"outside the set layout (expected {expected}); not used")
            n_files += 1

    cands: list[Candidate] = []
    for stem in sorted(set(layouts) | set(rgba_stems)):
        roles = layouts.get(stem, {})
        everything = [f for fs in roles.values() for f in fs] + rgba_stems.get(stem, [])
        dup = {r: fs for r, fs in roles.items() if len(fs) > 1}
        if stem in rgba_stems and (roles or len(rgba_stems[stem]) > 1):
            for f in everything:
                q(f, f"duplicate stem {stem!r} (in rgba/ and elsewhere, or twice in rgba/); ambiguous")
            continue
        if stem in rgba_stems:
            p = str(rgba_stems[stem][0])
            cands.append(Candidate(source.name, source.kind, stem, {"fg": p, "alpha": p}, "rgba"))
            continue
        if dup:
            for r, fs in dup.items():
                for f in fs:
                    q(f, f"duplicate stem {stem!r} in {ROLE_DIRS[r]}/: {', '.join(g.name for g in fs)} (ambiguous)")
            for r, fs in roles.items():
                if r not in dup:
                    q(fs[0], f"partner {ROLE_DIRS[next(iter(dup))]}/ has duplicate stem {stem!r}")
            continue
        if primary not in roles:
            for r, fs in roles.items():
                q(fs[0], f"no {ROLE_DIRS[primary]}/ partner for stem {stem!r} ({r} without its image)")
            continue
        missing = [r for r in (*required, *present_optional) if r not in roles]
        if missing:
            names = " and ".join(f"{ROLE_DIRS[r]}/" for r in missing)
            for r, fs in roles.items():
                q(fs[0], f"no {names} partner for stem {stem!r} (image without its partner)")
            continue
        paths = {r: str(fs[0]) for r, fs in roles.items()}
        cands.append(Candidate(source.name, source.kind, stem, paths, "pair"))
    return cands, quarantine, n_files


def _validate(cand: Candidate) -> tuple[dict | None, list[dict]]:
    """Decode one candidate; returns (manifest entry without key, quarantine rows)."""
    blobs: dict[str, bytes] = {}
    read_errors: dict[str, str] = {}
    for role, p in cand.paths.items():
        if p in blobs:
            continue
        try:
            blobs[p] = Path(p).read_bytes()
        except OSError as err:
            read_errors[role] = f"cannot read file ({err.strerror or err})"
    if read_errors:
        arrays, conversions, errors = {}, [], read_errors
    else:
        arrays, conversions, errors = decode_candidate(cand.kind, cand.paths, cand.layout, blobs)
    if errors:
        rows, seen = [], set()
        for role, p in cand.paths.items():
            if p in seen:
                continue
            seen.add(p)
            if role in errors:
                reason = errors[role]
            else:
                bad_role = next(iter(errors))
                reason = f"partner {bad_role} ({Path(cand.paths[bad_role]).name}) rejected: {errors[bad_role]}"
            rows.append({"set": cand.set, "path": p, "reason": reason})
        return None, rows
    primary = arrays.get("image", arrays.get("fg"))
    entry = {
        "set": cand.set,
        "stem": cand.stem,
        "paths": dict(cand.paths),
        "sha256": {role: bytes_sha256(blobs[p]) for role, p in cand.paths.items()},
        "width": int(primary.shape[1]),
        "height": int(primary.shape[0]),
        "conversions": conversions,
    }
    return entry, []


# ---------------------------------------------------------------------------- synthetic


def _alpha_png_array(alpha: np.ndarray) -> np.ndarray:
    """float alpha -> uint8 when exactly representable in 8 bits, else uint16 (both lossless-ish)."""
    a8 = np.round(alpha.astype(np.float64) * 255.0)
    if np.array_equal((a8 / 255.0).astype(np.float32), alpha.astype(np.float32)):
        return a8.astype(np.uint8)
    return np.round(alpha.astype(np.float64) * 65535.0).astype(np.uint16)


def _synth_job(job: tuple[str, int, int, int, str]) -> dict[str, bytes]:
    """Generate one synthetic item; returns relative path -> PNG bytes."""
    from matting_core import synthetic
    from matting_pipeline.shards import encode_png

    kind, seed, i, size, name = job
    if kind == "matte":
        fg, alpha = synthetic.foreground_item(seed, i, size)
        return {f"matte/fg/{name}.png": encode_png(fg), f"matte/alpha/{name}.png": encode_png(_alpha_png_array(alpha))}
    if kind == "background":
        return {f"backgrounds/{name}.png": encode_png(synthetic.background_item(seed, i, size))}
    image, alpha, coarse = synthetic.natural_item(seed, i, size)
    if kind == "seg":
        return {f"seg/image/{name}.png": encode_png(image), f"seg/mask/{name}.png": encode_png(coarse.astype(np.uint8) * 255)}
    return {
        f"val/{SYNTHETIC_VAL_NAME}/image/{name}.png": encode_png(image),
        f"val/{SYNTHETIC_VAL_NAME}/alpha/{name}.png": encode_png(_alpha_png_array(alpha)),
        f"val/{SYNTHETIC_VAL_NAME}/mask/{name}.png": encode_png(coarse.astype(np.uint8) * 255),
    }


def _synthetic_fingerprint(cfg: SyntheticConfig) -> dict:
    import matting_core.synthetic as synthetic

    src = Path(synthetic.__file__).read_bytes() + Path(__file__).read_bytes()
    return {"config": cfg.model_dump(), "generator_sha256": bytes_sha256(src)}


def generate_synthetic(cfg: SyntheticConfig, out_dir: Path, workers: int = 1, progress: bool = True) -> bool:
    """Write the embedded dataset into ``out_dir`` in the user folder layouts.

    ``matte/fg`` + ``matte/alpha`` (``fg-000000.png``), ``backgrounds/``, ``seg/image`` +
    ``seg/mask`` (0/255), ``val/natural/image`` + ``val/natural/alpha`` + ``val/natural/mask``. Alphas are 8-bit
    PNG when the generator's alpha is exactly representable in 8 bits (it quantises to
    1/255), else 16-bit. Built atomically; skipped (returns False) when ``out_dir`` already
    holds the same config and generator version (``synthetic.json``).
    """
    fingerprint = _synthetic_fingerprint(cfg)
    marker = out_dir / "synthetic.json"
    if marker.is_file():
        try:
            if json.loads(marker.read_text(encoding="utf-8")) == fingerprint:
                return False
        except ValueError:
            pass
    size, seed = cfg.image_size, cfg.seed
    jobs = (
        [("matte", seed, i, size, f"fg-{i:06d}") for i in range(cfg.matte)]
        + [("background", seed, i, size, f"bg-{i:06d}") for i in range(cfg.background)]
        + [("seg", seed, i, size, f"seg-{i:06d}") for i in range(cfg.seg)]
        + [("val", seed, SYNTHETIC_VAL_OFFSET + j, size, f"val-{j:06d}") for j in range(cfg.val_natural)]
    )
    with atomic_dir(out_dir) as tmp:
        for files in parallel_map(_synth_job, jobs, workers=workers, desc="generate synthetic", progress=progress):
            for rel, data in files.items():
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
        (tmp / "synthetic.json").write_text(json.dumps(fingerprint, indent=1) + "\n", encoding="utf-8")
    return True


# ---------------------------------------------------------------------------- the stage


def configured_sets(data: DataConfig, ingest_dir: Path) -> list[SetSource]:
    """The sets to ingest, in manifest order: matte, background, seg, val-<name>..."""
    if data.source == "synthetic":
        syn = ingest_dir / "synthetic"
        sets = [
            SetSource("matte", "matte", syn / "matte", "data.synthetic"),
            SetSource("background", "background", syn / "backgrounds", "data.synthetic"),
            SetSource("seg", "seg", syn / "seg", "data.synthetic"),
            SetSource(f"val-{SYNTHETIC_VAL_NAME}", "val", syn / "val" / SYNTHETIC_VAL_NAME, "data.synthetic"),
        ]
        if SYNTHETIC_VAL_NAME in data.val:
            raise IngestError(f"data.val.{SYNTHETIC_VAL_NAME}: the name is taken by the synthetic validation set")
    else:
        sets = [
            SetSource("matte", "matte", Path(data.matte_dir), "data.matte_dir"),
            SetSource("background", "background", Path(data.background_dir), "data.background_dir"),
            SetSource("seg", "seg", Path(data.seg_dir), "data.seg_dir"),
        ]
    for name, d in sorted(data.val.items()):
        sets.append(SetSource(f"val-{name}", "val", Path(d), f"data.val.{name}"))
    return sets


def ingest(
    data: DataConfig, data_root: str | Path = "data", workers: int | None = None, progress: bool = True
) -> dict[str, SetReport]:
    """Run the stage: (generate), discover, decode and validate; write outputs atomically.

    Writes ``<data_root>/ingest/manifest.jsonl``, ``quarantine.jsonl`` and ``summary.json``.
    Returns the per-set report. Raises :class:`IngestError` for a missing or empty set
    folder (naming its params key) or a set with no accepted sample (after writing the
    quarantine report so it can be read).
    """
    workers = default_workers() if workers is None else max(1, int(workers))
    layout = Layout(data=data_root)
    ingest_dir = layout.ingest_dir
    ingest_dir.mkdir(parents=True, exist_ok=True)
    if data.source == "synthetic":
        generate_synthetic(data.synthetic, ingest_dir / "synthetic", workers=workers, progress=progress)
    sources = configured_sets(data, ingest_dir)
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise IngestError(f"duplicate set names: {names}")
    # discover everything first, so a missing folder fails before any decoding work
    discovered = [(s, *discover(s)) for s in sources]
    reports: dict[str, SetReport] = {}
    manifest: list[dict] = []
    quarantine: list[dict] = []
    empty_sets: list[str] = []
    total = sum(len(c) for _, c, _, _ in discovered)
    results = iter(parallel_map(_validate, [c for _, cands, _, _ in discovered for c in cands],
                                workers=workers, desc="ingest", progress=progress, total=total))
    for source, cands, early_q, n_files in discovered:
        rep = reports[source.name] = SetReport(files=n_files)
        quarantine += early_q
        accepted = []
        for _ in cands:
            entry, rows = next(results)
            quarantine += rows
            if entry is not None:
                accepted.append(entry)
        accepted.sort(key=lambda e: e["stem"])
        for i, entry in enumerate(accepted):
            manifest.append({**entry, "key": f"{source.name}-{i:06d}"})
            if entry["conversions"]:
                rep.converted += 1
            rep.conversions.update(c.split(":", 1)[0] for c in entry["conversions"])
        rep.accepted = len(accepted)
        rep.files_used = sum(len(set(entry["paths"].values())) for entry in accepted)  # an RGBA cut-out is one file
        rep.quarantined = sum(1 for r in quarantine if r["set"] == source.name)
        if not accepted:
            empty_sets.append(f"{source.param_key} ({source.name}: {n_files} files, none accepted)")
    # key order in each row: set, stem, key, paths, sha256, width, height, conversions
    manifest = [
        {k: e[k] for k in ("set", "stem", "key", "paths", "sha256", "width", "height", "conversions")}
        for e in manifest
    ]
    write_jsonl(layout.manifest, manifest)
    write_jsonl(layout.quarantine, quarantine)
    write_json(
        layout.ingest_summary,
        {
            name: {
                "files": r.files,
                "files_used": r.files_used,
                "accepted": r.accepted,
                "quarantined": r.quarantined,
                "converted": r.converted,
                "conversions": dict(sorted(r.conversions.items())),
            }
            for name, r in reports.items()
        },
    )
    if empty_sets:
        raise IngestError(
            "no sample accepted in " + "; ".join(empty_sets) + f"; see {layout.quarantine} for the reasons"
        )
    return reports


def format_summary(reports: dict[str, SetReport]) -> str:
    """The printed summary table, files and samples in separate columns: per set the files
    found = files used + files quarantined, then the samples those used files make."""
    head = ("set", "files", "used", "quarantined", "samples", "converted", "conversions")
    rows = []
    for name, r in reports.items():
        conv = ", ".join(f"{k} x{n}" for k, n in sorted(r.conversions.items())) or "-"
        rows.append((name, str(r.files), str(r.files_used), str(r.quarantined), str(r.accepted), str(r.converted), conv))
    n = len(head) - 1
    widths = [max(len(head[i]), *(len(row[i]) for row in rows)) if rows else len(head[i]) for i in range(n)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells[:n], widths))) + "  " + cells[n]

    return "\n".join([line(head), *(line(row) for row in rows),
                      "files = used + quarantined (files); samples: pairs (fg+alpha, image+mask) or single backgrounds; "
                      "converted: samples"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--data-root", default="data", help="data folder (default: data/)")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: CPUs, at most 8)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    try:
        reports = ingest(params.data, args.data_root, workers=args.workers, progress=not args.no_progress)
    except IngestError as err:
        print(f"matting ingest: error: {err}", file=sys.stderr)
        return 1
    layout = Layout(data=args.data_root)
    print(format_summary(reports))
    n_q = sum(r.quarantined for r in reports.values())
    print(f"manifest: {layout.manifest}  quarantine: {layout.quarantine} ({n_q} files)")
    return 0


if __name__ == "__main__":
    from matting_pipeline.cli import run_module

    run_module("ingest")
