"""Stage ``shard``: pack every ingested set into WebDataset tar shards with nested subsets.

Reads ``<data-root>/ingest/manifest.jsonl`` and params ``shard``; writes one shard set per
ingested set to ``<data-root>/shards/<set>/`` (``matte``, ``background``, ``seg``,
``val-<name>``), see docs/FORMATS.md "Shards".

Samples are stored in the set's seeded permutation order (``shards.seeded_order`` with
``shard.subset_seed``), so ``index["keys"] == index["order"]`` and the nested subset of size
``n`` (``order[:n]``) lives in the first ``ceil(n / samples_per_shard)`` shards. Each file
is re-read, checked against its manifest sha256 and decoded exactly as ingest accepted
it (same conversions); alphas keep their bit depth (8 or 16), masks are stored 0/255.
A source PNG that already decodes to exactly the member's content is stored byte for
byte (no re-encoding); anything else is re-encoded losslessly.

Members per set: ``matte`` fg + alpha; ``background`` image; ``seg`` image + mask;
``val-<name>`` image + alpha (+ trimap). The meta is the manifest entry.

Each set is written atomically and skipped when its index already records the same
inputs (manifest entries, shard params, code version) -- ``--force`` rebuilds. With
``data.shard_url`` set, every set is then published there (``matting_pipeline.shard_store``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from matting_pipeline import shard_store, shards
from matting_pipeline.config import ShardConfig, load_params
from matting_pipeline.atomic import code_digest
from matting_pipeline.layout import Layout
from matting_pipeline.manifest import IngestError, load_entry, read_manifest, set_kind
from matting_pipeline.shards import default_workers

DESCRIPTION = __doc__



_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _passthrough(role: str, array, path: str, conversions: list[str]) -> bytes | None:
    """The source file's own bytes, if it is a PNG that already decodes to the member exactly.

    Unconverted PNG alphas/masks/images are stored as the very file ingest hashed (its
    sha256 in the manifest then identifies the member too) and need no re-encoding.
    """
    if any(c.startswith(f"{role}.") for c in conversions):
        return None
    data = Path(path).read_bytes()
    if not data.startswith(_PNG_MAGIC):
        return None
    expected = array.astype(np.uint8) * np.uint8(255) if role == "mask" else array
    try:
        stored = shards.decode_png(data)
    except shards.ShardError:
        return None
    if stored.dtype != expected.dtype or not np.array_equal(stored, expected):
        return None
    return data


def _encode_job(job: tuple[dict, str]) -> dict[str, tuple[str, bytes]]:
    """Decode one manifest entry's files and encode its shard members."""
    entry, kind = job
    arrays = load_entry(entry, kind)
    members = {"meta": shards.encode_member("meta", entry)}
    for role, array in arrays.items():
        same = _passthrough(role, array, entry["paths"][role], entry["conversions"])
        members[role] = ("png", same) if same is not None else shards.encode_member(role, array)
    return members


def fingerprint(entries: list[dict], cfg: ShardConfig) -> str:
    """Digest of what a set's shards depend on: its manifest entries, shard params and code."""
    h = hashlib.sha256()
    h.update(json.dumps(entries, sort_keys=True).encode("utf-8"))
    h.update(json.dumps(cfg.model_dump(), sort_keys=True).encode("utf-8"))
    h.update(code_digest(__file__).encode())
    return h.hexdigest()


def shard_set(
    set_name: str,
    entries: list[dict],
    out_dir: Path,
    cfg: ShardConfig,
    workers: int = 1,
    progress: bool = True,
    force: bool = False,
) -> tuple[dict, bool]:
    """Write one set's shards; returns ``(index, written)`` (``written`` False when up to date)."""
    digest = fingerprint(entries, cfg)
    if not force:
        try:
            index = shards.read_index(out_dir, local=True)
        except shards.ShardError:
            index = None
        if index is not None and index.get("fingerprint") == digest:
            return index, False
    kind = set_kind(set_name)
    by_key = {e["key"]: e for e in entries}
    order = shards.seeded_order(sorted(by_key), cfg.subset_seed, set_name)
    jobs = [(by_key[k], kind) for k in order]
    with shards.ShardWriter(out_dir, set_name, cfg.samples_per_shard, cfg.subset_seed, digest) as writer:
        results = shards.parallel_map(_encode_job, jobs, workers=workers, desc=f"shard {set_name}", progress=progress)
        for key, members in zip(order, results):
            writer.add_encoded(key, members)
        writer.set_order(order)
    return writer.index, True


def shard_all(
    cfg: ShardConfig, data_root: str | Path = "data", workers: int | None = None, progress: bool = True, force: bool = False
) -> dict[str, dict]:
    """Shard every set of the manifest to ``<data_root>/shards/<set>/``; returns set -> index."""
    workers = default_workers() if workers is None else max(1, int(workers))
    manifest = read_manifest(data_root)
    by_set: dict[str, list[dict]] = {}
    for entry in manifest:
        by_set.setdefault(entry["set"], []).append(entry)
    out_root = Layout(data=data_root).shards_root
    indexes = {}
    for set_name, entries in by_set.items():
        index, written = shard_set(set_name, entries, out_root / set_name, cfg, workers, progress, force)
        indexes[set_name] = index
        state = "written" if written else "up to date"
        print(f"{set_name:<16} {index['count']:>7} samples  {len(index['shards']):>4} shards  ({state})")
    if out_root.is_dir():  # a set no longer in the manifest must not linger
        for stale in sorted(out_root.iterdir()):
            if stale.is_dir() and stale.name not in by_set and (stale / shards.INDEX_NAME).is_file():
                shutil.rmtree(stale)
                print(f"{stale.name:<16} removed (not in the manifest any more)")
    return indexes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--data-root", default="data", help="data folder (default: data/)")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: CPUs, at most 8)")
    parser.add_argument("--force", action="store_true", help="rebuild sets that are up to date")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def budget_problems(params, counts: dict[str, int]) -> list[str]:
    """The study budgets the sharded sets cannot supply, one sentence each (checked here, as
    soon as the set sizes are known, not at ``pretrain@S`` after the upstream stages)."""
    problems = []
    seg_have = counts.get("seg", 0)
    for budget in params.study.seg:
        if budget > seg_have:
            problems.append(f"study.seg budget {budget} needs {budget} segmentation samples but data/shards/seg "
                            f"holds {seg_have}")
    held_out = params.composite.held_out_foregrounds
    mat_have = max(0, counts.get("matte", 0) - held_out)
    for budget in params.study.mat:
        if budget > mat_have:
            problems.append(f"study.mat budget {budget} needs {budget} training mattes but data/shards/matte holds "
                            f"{counts.get('matte', 0)} ({held_out} held out for the composited validation set)")
    return problems


def run(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    shard_store.activate(params.data.shard_url, args.data_root)
    try:
        indexes = shard_all(params.shard, args.data_root, args.workers, not args.no_progress, args.force)
        layout = Layout(data=args.data_root)
        shard_store.publish_stage_sets(params.data.shard_url, args.data_root,
                                       [layout.shard_set(name) for name in indexes], progress=not args.no_progress)
    except (IngestError, shards.ShardError) as err:
        print(f"matting shard: error: {err}", file=sys.stderr)
        return 1
    problems = budget_problems(params, {name: index["count"] for name, index in indexes.items()})
    for problem in problems:
        print(f"matting shard: error: {problem}; lower the budget in {args.params} or add data", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    from matting_pipeline.cli import run_module

    run_module("shard")
