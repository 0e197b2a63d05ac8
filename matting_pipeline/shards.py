"""WebDataset shard sets: writing, verifying and reading (docs/FORMATS.md "Shards").

A *shard set* is a directory ``<set_dir>/`` holding tar shards ``<set>-000000.tar``, ...
and ``index.json``::

    {"set": str, "count": int, "samples_per_shard": int, "subset_seed": int,
     "shards": [{"name": "seg-000000.tar", "sha256": hex, "count": int}],
     "keys": [every key, in storage order], "shard_of": {key: shard name},
     "order": [every key, in the seeded permutation order]}

One sample is a group of members ``<key>.json`` (meta) and ``<key>.<role>.png``, all
lossless. The subset of size ``n`` is ``order[:n]`` (nested: 50 ⊂ 200 ⊂ ...). The tars are
plain WebDataset shards (``webdataset.WebDataset(urls, shardshuffle=False)`` reads them),
but alpha and masks must be decoded with :func:`decode_member` to stay exact
(WebDataset's ``rgb8`` decoder turns a 1-channel PNG into 3 channels).

Writing is atomic: the whole set is built in a temporary sibling directory and renamed
into place (:func:`matting_pipeline.atomic.atomic_dir`); tars are reproducible (fixed mtime, owner
and member order), so the same samples give the same sha256.

Reading is defensive: with ``verify=True`` each shard's sha256 is checked against the
index before use, and every member name must be ``<key>.json`` or ``<key>.<role>.<ext>``
with a key the index places in that shard -- absolute paths, ``..``, directories, links
and unexpected names are refused with an error naming the shard.

Object storage (``data.shard_url``, :mod:`matting_pipeline.shard_store`): once a stage has
called ``shard_store.activate``, the readers below read a set under the data root from
its URL instead -- the local ``index.json`` must exist and equal the remote one byte for
byte, and every remote tar must match the index's sha256 (always, whatever ``verify``
says). Sequential readers read each tar through ``webdataset.gopen``, verify it, then
parse it as a local one (a tar must be verified whole before any of its samples is
yielded, so parsing it while it streams would save no memory; it cost 10 % more time);
:class:`ShardReader` fetches the tars it needs into a content-addressed local cache and
then reads exactly as from local files (same keys, order and
:meth:`ShardReader.content_digest`).

Public API::

    ShardWriter(set_dir, set_name, samples_per_shard, subset_seed=0, fingerprint=None)
    write_shard_set(set_dir, set_name, samples, samples_per_shard, subset_seed=0,
                    order=None, fingerprint=None) -> dict
    seeded_order(keys, seed, set_name) -> list[str]
    read_index(set_dir, local=False) -> dict
    shard_files(set_dir, names, verify=True) -> list[Path]
    subset_keys(set_dir, n) -> list[str]
    iter_samples(set_dir, keys=None, verify=True, roles=None) -> Iterator[dict]
    load_samples(set_dir, n=None, verify=True, roles=None) -> list[dict]
    verify_set(set_dir) -> dict
    encode_png(array, compression=PNG_COMPRESSION) -> bytes
    decode_png(data) -> np.ndarray
    encode_member(role, value) -> tuple[str, bytes]
    decode_member(role, ext, data) -> np.ndarray | dict
    iter_encoded_samples(set_dir, keys=None, verify=True) -> Iterator[dict]
    decode_sample(sample, roles=None) -> dict
    parallel_map(fn, items, workers=1, desc=None, progress=True) -> Iterator
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from matting_pipeline import shard_store
from matting_pipeline.atomic import atomic_dir, file_sha256
from matting_pipeline.shard_errors import ShardError, ShardIntegrityError, UnsafeMemberError
from matting_pipeline.shard_store import INDEX_NAME

__all__ = [
    "ShardError",
    "ShardIntegrityError",
    "UnsafeMemberError",
    "ROLE_KINDS",
    "KEY_PATTERN",
    "ShardReader",
    "ShardWriter",
    "write_shard_set",
    "seeded_order",
    "read_index",
    "shard_files",
    "subset_keys",
    "iter_samples",
    "load_samples",
    "verify_set",
    "encode_png",
    "decode_png",
    "encode_member",
    "decode_member",
    "member_name",
    "parse_member_name",
    "parallel_map",
    "default_workers",
    "usable_cores",
    "iter_encoded_samples",
    "decode_sample",
]

PNG_COMPRESSION = 3
KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_MEMBER_PATTERN = re.compile(
    r"(?P<key>[A-Za-z0-9][A-Za-z0-9_-]*)(?:\.(?P<role>[a-z][a-z0-9_]*))?\.(?P<ext>[a-z0-9]+)"
)

# role -> how it is stored and decoded (FORMATS.md table):
#   rgb:    (H, W, 3) uint8 PNG, decoded to uint8 RGB
#   unit:   gray uint8 or uint16 PNG (exact), decoded to float32 [0, 1] (/255 or /65535)
#   unit16: like unit, but written as uint16 (pseudo-label maps)
#   binary: gray uint8 0/255 PNG, decoded to float32 {0, 1}
#   trimap: gray uint8 0/128/255 PNG, decoded to uint8
ROLE_KINDS: dict[str, str] = {
    "image": "rgb",
    "fg": "rgb",
    "bg": "rgb",
    "alpha": "unit",
    "mask": "binary",
    "trimap": "trimap",
    "teacher_alpha": "unit16",
    "teacher_boundary": "unit16",
    "blended": "unit16",
}


# ---------------------------------------------------------------------------- codecs


def encode_png(array: np.ndarray, compression: int = PNG_COMPRESSION) -> bytes:
    """Lossless PNG of ``(H, W) uint8|uint16`` gray or ``(H, W, 3) uint8`` RGB.

    zlib's RLE strategy: on composites, photos and mattes it was about 40% faster than
    the default strategy at the same level, and 5% smaller.
    """
    a = np.asarray(array)
    if a.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"encode_png needs uint8 or uint16, got {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 3:
        a = a[:, :, ::-1]  # cv2 writes BGR
    elif a.ndim != 2:
        raise ValueError(f"encode_png needs (H, W) or (H, W, 3), got shape {a.shape}")
    params = [cv2.IMWRITE_PNG_COMPRESSION, int(compression), cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(a), params)
    if not ok:
        raise ValueError(f"PNG encoding failed for shape {a.shape} {a.dtype}")
    return buf.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> ``(H, W) uint8|uint16`` or ``(H, W, 3|4)`` RGB(A), exactly as stored."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ShardError("undecodable PNG member")
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = arr[:, :, ::-1]
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, [2, 1, 0, 3]]
    return np.ascontiguousarray(arr)


def _unit_to_uint16(value: np.ndarray, role: str) -> np.ndarray:
    v = np.asarray(value)
    if v.dtype == np.uint16:
        return v
    if v.dtype == np.uint8:
        return v.astype(np.uint16) * np.uint16(257)  # v/255 == 257v/65535 exactly
    if np.issubdtype(v.dtype, np.floating):
        if not np.isfinite(v).all() or v.min(initial=0.0) < 0.0 or v.max(initial=0.0) > 1.0:
            raise ValueError(f"{role}: float values must lie in [0, 1]")
        return np.round(v.astype(np.float64) * 65535.0).astype(np.uint16)
    raise TypeError(f"{role}: expected uint8, uint16 or float in [0, 1], got {v.dtype}")


def encode_member(role: str, value: Any) -> tuple[str, bytes]:
    """Encode one member value; returns ``(ext, bytes)``.

    - ``meta``: a JSON-serialisable dict -> ``json``.
    - ``image``/``fg``/``bg``: ``(H, W, 3) uint8`` (other dtypes are refused: quantise
      explicitly first).
    - ``alpha``: ``(H, W)`` uint8 or uint16 stored as is (exact); float in [0, 1] stored as
      uint16 ``round(65535 a)``.
    - ``teacher_alpha``/``teacher_boundary``/``blended``: stored as uint16 (float rounded,
      uint8 scaled by 257, exact).
    - ``mask``: bool / {0, 1} / {0, 255} -> uint8 0/255.
    - ``trimap``: uint8 in {0, 128, 255}.
    """
    if role == "meta":
        return "json", json.dumps(value, ensure_ascii=False, sort_keys=True).encode("utf-8")
    kind = ROLE_KINDS.get(role)
    if kind is None:
        raise ShardError(f"unknown member role {role!r}; known: meta, {', '.join(ROLE_KINDS)}")
    v = np.asarray(value)
    if kind == "rgb":
        if v.dtype != np.uint8 or v.ndim != 3 or v.shape[2] != 3:
            raise TypeError(f"{role}: expected (H, W, 3) uint8, got {v.shape} {v.dtype}")
        return "png", encode_png(v)
    if v.ndim != 2:
        raise ValueError(f"{role}: expected (H, W), got shape {v.shape}")
    if kind == "unit":
        if v.dtype not in (np.uint8, np.uint16):
            v = _unit_to_uint16(v, role)
        return "png", encode_png(v)
    if kind == "unit16":
        return "png", encode_png(_unit_to_uint16(v, role))
    if kind == "binary":
        if v.dtype == np.bool_:
            return "png", encode_png(v.astype(np.uint8) * np.uint8(255))
        mx = v.max(initial=0)
        bad = (v != 0) & (v != mx)
        if bad.any() or mx not in (0, 1, 255):
            raise ValueError(f"{role}: expected values in {{0, 1}} or {{0, 255}}")
        return "png", encode_png(np.where(v != 0, 255, 0).astype(np.uint8))
    if kind == "trimap":
        if v.dtype != np.uint8 or not np.isin(v, (0, 128, 255)).all():
            raise ValueError(f"{role}: expected uint8 values in {{0, 128, 255}}")
        return "png", encode_png(v)
    raise AssertionError(kind)


def decode_member(role: str, ext: str, data: bytes) -> Any:
    """Decode one member's bytes by its role (FORMATS.md).

    Returns: ``meta`` -> dict; ``image``/``fg``/``bg`` -> ``(H, W, 3) uint8``;
    ``alpha``/``teacher_alpha``/``teacher_boundary``/``blended`` -> ``(H, W) float32`` in
    [0, 1], exactly ``stored / 255`` (uint8) or ``stored / 65535`` (uint16);
    ``mask`` -> ``(H, W) float32`` in {0, 1}; ``trimap`` -> ``(H, W) uint8`` 0/128/255.
    """
    if ext == "json":
        if role != "meta":
            raise ShardError(f"unexpected json member for role {role!r}")
        return json.loads(data.decode("utf-8"))
    if ext != "png":
        raise ShardError(f"unexpected member extension {ext!r} for role {role!r}")
    kind = ROLE_KINDS.get(role)
    if kind is None:
        raise ShardError(f"unexpected member role {role!r}")
    arr = decode_png(data)
    if kind == "rgb":
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise ShardError(f"{role}: expected RGB uint8 PNG, got {arr.shape} {arr.dtype}")
        return arr
    if arr.ndim != 2:
        raise ShardError(f"{role}: expected a 1-channel PNG, got shape {arr.shape}")
    if kind in ("unit", "unit16"):
        if arr.dtype == np.uint8:
            return arr.astype(np.float32) / np.float32(255.0)
        return arr.astype(np.float32) / np.float32(65535.0)
    if kind == "binary":
        full = 255 if arr.dtype == np.uint8 else 65535
        return (arr >= (full + 1) // 2).astype(np.float32)
    if kind == "trimap":
        if arr.dtype != np.uint8:
            raise ShardError(f"{role}: expected uint8 PNG, got {arr.dtype}")
        return arr
    raise AssertionError(kind)


# ---------------------------------------------------------------------------- names


def member_name(key: str, role: str, ext: str) -> str:
    """``<key>.json`` for meta, else ``<key>.<role>.<ext>``."""
    return f"{key}.json" if role == "meta" else f"{key}.{role}.{ext}"


def parse_member_name(name: str, shard: str = "?") -> tuple[str, str, str]:
    """Split a member name into ``(key, role, ext)``, refusing anything unsafe or unexpected.

    Raises:
        UnsafeMemberError: absolute path, ``..``, a directory part, or a name that is not
        ``<key>.json`` / ``<key>.<role>.<ext>`` (message names the shard).
    """
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise UnsafeMemberError(f"{shard}: refused member {name!r}: absolute path")
    parts = re.split(r"[/\\]", name)
    if ".." in parts:
        raise UnsafeMemberError(f"{shard}: refused member {name!r}: parent reference '..'")
    if len(parts) > 1:
        raise UnsafeMemberError(f"{shard}: refused member {name!r}: directories are not allowed")
    m = _MEMBER_PATTERN.fullmatch(name)
    if m is None:
        raise UnsafeMemberError(f"{shard}: refused member {name!r}: not <key>.<role>.<ext>")
    key, role, ext = m.group("key"), m.group("role"), m.group("ext")
    if role is None:
        if ext != "json":
            raise UnsafeMemberError(f"{shard}: refused member {name!r}: only the meta may be <key>.json")
        role = "meta"
    elif role not in ROLE_KINDS or ext != "png":
        raise UnsafeMemberError(f"{shard}: refused member {name!r}: unexpected role or extension")
    return key, role, ext


# ---------------------------------------------------------------------------- order


def seeded_order(keys: Iterable[str], seed: int, set_name: str) -> list[str]:
    """The seeded permutation of ``keys`` behind nested subsets.

    The generator is ``np.random.default_rng([seed, crc32(set_name)])``, so every set gets
    its own permutation from one ``shard.subset_seed``; the result depends only on the keys
    (in the given order), the seed and the set name.
    """
    keys = list(keys)
    rng = np.random.default_rng([int(seed), zlib.crc32(set_name.encode("utf-8"))])
    return [keys[i] for i in rng.permutation(len(keys))]


# ---------------------------------------------------------------------------- writing


class ShardWriter:
    """Write one shard set atomically.

    Usage::

        with ShardWriter("data/shards/seg", "seg", samples_per_shard=64, subset_seed=0) as w:
            w.add("seg-000000", {"stem": "a"}, image=img_u8, mask=mask01)
        w.index  # the index.json that was written

    Samples are stored in the order they are added (``keys``); ``order`` (the nested-subset
    order) defaults to the same, or set it with :meth:`set_order` before the block ends.
    The directory appears only when the block exits cleanly; an exception leaves the
    previous ``set_dir`` (if any) untouched and no temporary directory behind.
    ``fingerprint``, if given, is stored in the index (``"fingerprint"``) so a stage can
    skip an up-to-date set.
    """

    def __init__(
        self,
        set_dir: str | Path,
        set_name: str,
        samples_per_shard: int,
        subset_seed: int = 0,
        fingerprint: str | None = None,
    ):
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        if not KEY_PATTERN.fullmatch(set_name):
            raise ValueError(f"set name {set_name!r} must match {KEY_PATTERN.pattern}")
        self.set_dir = Path(set_dir)
        self.set_name = set_name
        self.samples_per_shard = int(samples_per_shard)
        self.subset_seed = int(subset_seed)
        self.fingerprint = fingerprint
        self.index: dict | None = None
        self._ctx = None
        self._tmp: Path | None = None
        self._tar: tarfile.TarFile | None = None
        self._shards: list[dict] = []
        self._keys: list[str] = []
        self._shard_of: dict[str, str] = {}
        self._order: list[str] | None = None

    def __enter__(self) -> "ShardWriter":
        self._ctx = atomic_dir(self.set_dir)
        self._tmp = self._ctx.__enter__()
        os.chmod(self._tmp, 0o755)  # mkdtemp makes it private
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._finish()
        except BaseException as err:
            self._close_tar()
            self._ctx.__exit__(type(err), err, err.__traceback__)
            raise
        else:
            self._close_tar()
            self._ctx.__exit__(exc_type, exc, tb)
        return False

    def set_order(self, order: Iterable[str]) -> None:
        """Set the nested-subset order (must be a permutation of the added keys at the end)."""
        self._order = list(order)

    def add(self, key: str, meta: Mapping[str, Any], **arrays: Any) -> None:
        """Add one sample: ``meta`` (JSON-serialisable) plus role arrays (see :func:`encode_member`)."""
        members = {"meta": encode_member("meta", {**meta, "key": key})}
        for role, value in arrays.items():
            if value is not None:
                members[role] = encode_member(role, value)
        self.add_encoded(key, members)

    def add_encoded(self, key: str, members: Mapping[str, tuple[str, bytes]]) -> None:
        """Add one sample from already encoded members ``{role: (ext, bytes)}`` (``meta`` required)."""
        if self._tmp is None:
            raise RuntimeError("ShardWriter.add outside its `with` block")
        if not KEY_PATTERN.fullmatch(key):
            raise ValueError(f"sample key {key!r} must match {KEY_PATTERN.pattern}")
        if key in self._shard_of:
            raise ValueError(f"duplicate sample key {key!r}")
        if "meta" not in members:
            raise ValueError(f"sample {key!r} has no meta")
        if self._tar is None or self._shards[-1]["count"] >= self.samples_per_shard:
            self._close_tar()
            name = f"{self.set_name}-{len(self._shards):06d}.tar"
            self._tar = tarfile.open(self._tmp / name, "w", format=tarfile.PAX_FORMAT)
            self._shards.append({"name": name, "sha256": None, "count": 0})
        shard = self._shards[-1]
        roles = ["meta"] + sorted(r for r in members if r != "meta")
        for role in roles:
            ext, data = members[role]
            name = member_name(key, role, ext)
            parse_member_name(name, shard["name"])  # never write what a reader would refuse
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        shard["count"] += 1
        self._keys.append(key)
        self._shard_of[key] = shard["name"]

    def _close_tar(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            self._shards[-1]["sha256"] = file_sha256(self._tmp / self._shards[-1]["name"])

    def _finish(self) -> None:
        self._close_tar()
        order = self._keys if self._order is None else self._order
        if sorted(order) != sorted(self._keys):
            raise ValueError("order must be a permutation of the written keys")
        index = {
            "set": self.set_name,
            "count": len(self._keys),
            "samples_per_shard": self.samples_per_shard,
            "subset_seed": self.subset_seed,
            "shards": self._shards,
            "keys": self._keys,
            "shard_of": self._shard_of,
            "order": list(order),
        }
        if self.fingerprint is not None:
            index["fingerprint"] = self.fingerprint
        (self._tmp / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
        self.index = index


def write_shard_set(
    set_dir: str | Path,
    set_name: str,
    samples: Iterable[tuple[str, Mapping[str, Any], Mapping[str, Any]]],
    samples_per_shard: int,
    subset_seed: int = 0,
    order: Iterable[str] | None = None,
    fingerprint: str | None = None,
) -> dict:
    """Write ``samples`` (``(key, meta, {role: array})``) as one shard set; returns the index."""
    with ShardWriter(set_dir, set_name, samples_per_shard, subset_seed, fingerprint) as writer:
        for key, meta, arrays in samples:
            writer.add(key, meta, **arrays)
        if order is not None:
            writer.set_order(order)
    return writer.index


# ---------------------------------------------------------------------------- reading

_INDEX_FIELDS = {
    "set": str,
    "count": int,
    "samples_per_shard": int,
    "subset_seed": int,
    "shards": list,
    "keys": list,
    "shard_of": dict,
    "order": list,
}


def read_index(set_dir: str | Path, local: bool = False) -> dict:
    """Load and check ``<set_dir>/index.json``.

    When the set is read from object storage (:func:`matting_pipeline.shard_store.source_of`),
    the remote ``index.json`` must equal this local one byte for byte; ``local=True`` skips
    that (a producing stage checking its own output).

    Raises:
        ShardError: missing index (names the stage to run), an inconsistent one, or a remote
        index that is missing or another version (names the fix).
    """
    path = Path(set_dir) / INDEX_NAME
    if not path.is_file():
        raise ShardError(f"{path}: not found; build this shard set first (`matting shard` / `matting composite`)")
    try:
        raw = path.read_bytes()
        index = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError) as err:
        raise ShardError(f"{path}: unreadable index ({err})") from None
    source = Path(set_dir) if local else shard_store.source_of(set_dir)
    if isinstance(source, str):
        shard_store.check_remote_index(set_dir, source, raw)
    for field, typ in _INDEX_FIELDS.items():
        if not isinstance(index.get(field), typ):
            raise ShardError(f"{path}: field {field!r} missing or not a {typ.__name__}")
    keys, names = index["keys"], [s.get("name") for s in index["shards"]]
    if (
        len(keys) != index["count"]
        or len(set(keys)) != len(keys)
        or sorted(index["order"]) != sorted(keys)
        or set(index["shard_of"]) != set(keys)
        or not set(index["shard_of"].values()) <= set(names)
        or sum(int(s.get("count", -1)) for s in index["shards"]) != index["count"]
    ):
        raise ShardError(f"{path}: inconsistent index (keys, order, shard_of, counts disagree)")
    for name in names:
        shard_store.check_shard_name(name, path)
    return index


def subset_keys(set_dir: str | Path, n: int) -> list[str]:
    """Keys of the nested subset of size ``n``: ``index["order"][:n]``.

    Raises:
        ValueError: ``n`` negative or larger than the set (the message says how many exist).
    """
    index = read_index(set_dir)
    n = int(n)
    if n < 0:
        raise ValueError(f"subset size must be >= 0, got {n}")
    if n > index["count"]:
        raise ValueError(
            f"{set_dir}: asked for a subset of {n} samples but set {index['set']!r} has only "
            f"{index['count']}; lower the budget in params.yaml (study.*) or add data"
        )
    return list(index["order"][:n])


def _read_shard_bytes(set_dir: Path, shard: dict, verify: bool) -> bytes:
    path = set_dir / shard["name"]
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ShardIntegrityError(f"{path}: cannot read shard ({err.strerror or err})") from None
    if verify:
        _check_sha256(path, shard["sha256"], hashlib.sha256(data).hexdigest())
    return data


def _check_sha256(path: Path, expected: str, digest: str) -> None:
    """A local shard's bytes must hash to the index's sha256."""
    if digest != expected:
        raise ShardIntegrityError(
            f"{path}: sha256 mismatch (index {expected[:12]}..., file {digest[:12]}...); "
            "the shard is corrupt or was modified -- rebuild the set"
        )


def _iter_shard(data: bytes, shard_name: str, expected: set[str], wanted: set[str] | None) -> Iterator[dict]:
    """Group one tar's members into encoded samples ``{"key", "members": {role: (ext, bytes)}}``.

    Checks every member name and type, that keys belong to this shard, that a sample's
    members are contiguous and unique, that each has a meta, and that all expected keys appear.
    """
    seen: set[str] = set()
    current: dict | None = None

    def finish(sample: dict) -> dict | None:
        if "meta" not in sample["members"]:
            raise ShardError(f"{shard_name}: sample {sample['key']!r} has no meta member")
        return sample if wanted is None or sample["key"] in wanted else None

    try:
        tf = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
    except tarfile.TarError as err:
        raise ShardIntegrityError(f"{shard_name}: not a readable tar ({err})") from None
    with tf:
        for member in tf:
            key, role, ext = parse_member_name(member.name, shard_name)
            if not member.isfile():
                raise UnsafeMemberError(f"{shard_name}: refused member {member.name!r}: not a regular file")
            if key not in expected:
                raise UnsafeMemberError(f"{shard_name}: refused member {member.name!r}: key not in this shard's index")
            if current is None or current["key"] != key:
                if current is not None:
                    done = finish(current)
                    if done is not None:
                        yield done
                if key in seen:
                    raise ShardError(f"{shard_name}: members of sample {key!r} are not contiguous")
                seen.add(key)
                current = {"key": key, "members": {}}
            if role in current["members"]:
                raise ShardError(f"{shard_name}: duplicate member {member.name!r}")
            current["members"][role] = (ext, tf.extractfile(member).read())
        if current is not None:
            done = finish(current)
            if done is not None:
                yield done
    if seen != expected:
        missing = sorted(expected - seen)
        raise ShardIntegrityError(f"{shard_name}: {len(missing)} indexed sample(s) missing, e.g. {missing[:3]}")


def _shard_samples(
    set_dir: Path, source: str | Path, shard: dict, expected: set[str], wanted: set[str] | None, verify: bool
) -> Iterator[dict]:
    """The encoded samples of one shard (:func:`_iter_shard`), from ``source``: the local set
    (sha256 checked when ``verify``) or a URL (read through ``webdataset.gopen`` and always
    checked), so nothing of a tar is yielded before all of it matched the index."""
    if isinstance(source, Path):
        data = _read_shard_bytes(set_dir, shard, verify)
    else:
        data = shard_store.read_verified(f"{source}/{shard['name']}", shard["sha256"])
    return _iter_shard(data, shard["name"], expected, wanted)


def iter_encoded_samples(
    set_dir: str | Path, keys: Iterable[str] | None = None, verify: bool = True
) -> Iterator[dict]:
    """Like :func:`iter_samples` but without decoding images.

    Yields ``{"key": str, "meta": dict, "shard": str, "members": {role: (ext, bytes)}}``
    (``members`` includes ``meta``), in storage order, with the same verification. Useful to copy
    members bit-exactly into another set, or to decode in worker processes.
    """
    set_dir = Path(set_dir)
    index = read_index(set_dir)
    source = shard_store.source_of(set_dir)
    wanted: set[str] | None = None
    if keys is not None:
        wanted = set(keys)
        unknown = wanted - set(index["shard_of"])
        if unknown:
            raise ShardError(f"{set_dir}: {len(unknown)} unknown key(s), e.g. {sorted(unknown)[:3]}")
    per_shard: dict[str, set[str]] = {}
    for key, name in index["shard_of"].items():
        per_shard.setdefault(name, set()).add(key)
    for shard in index["shards"]:
        expected = per_shard.get(shard["name"], set())
        if wanted is not None and not (expected & wanted):
            continue
        if len(expected) != shard["count"]:
            raise ShardError(f"{set_dir / INDEX_NAME}: shard {shard['name']} count disagrees with shard_of")
        for sample in _shard_samples(set_dir, source, shard, expected, wanted, verify):
            sample["shard"] = shard["name"]
            ext, blob = sample["members"]["meta"]
            try:
                sample["meta"] = decode_member("meta", ext, blob)
            except (ShardError, ValueError) as err:
                raise ShardError(f"{shard['name']}: {sample['key']}.json: {err}") from None
            yield sample


def decode_sample(sample: dict, roles: Iterable[str] | None = None) -> dict:
    """Decode an encoded sample (from :func:`iter_encoded_samples`) into arrays (see :func:`iter_samples`)."""
    shard_name = sample.get("shard", "?")
    role_set = set(roles) if roles is not None else None
    out = {"key": sample["key"], "meta": sample["meta"]}
    for role, (ext, blob) in sample["members"].items():
        if role == "meta" or (role_set is not None and role not in role_set):
            continue
        try:
            out[role] = decode_member(role, ext, blob)
        except ShardError as err:
            raise ShardError(f"{shard_name}: {sample['key']}.{role}: {err}") from None
    return out


def iter_samples(
    set_dir: str | Path,
    keys: Iterable[str] | None = None,
    verify: bool = True,
    roles: Iterable[str] | None = None,
) -> Iterator[dict]:
    """Yield decoded samples of a shard set, in storage order.

    Args:
        set_dir: the shard set directory (holds ``index.json``).
        keys: only these keys (any order; unknown keys raise); None = every sample.
        verify: check each shard's sha256 against the index before reading it.
        roles: decode only these roles (``meta`` always); None = all present.
    Yields:
        ``{"key": str, "meta": dict, <role>: array, ...}`` with the roles the sample has:
        ``image``/``fg``/``bg`` ``(H, W, 3) uint8``; ``alpha`` (and pseudo-label maps)
        ``(H, W) float32 [0, 1]``; ``mask`` ``(H, W) float32 {0, 1}``; ``trimap`` ``(H, W) uint8``.
    Raises:
        ShardIntegrityError (sha256 / count mismatch), UnsafeMemberError (bad member
        names), ShardError (unknown keys, malformed set).
    """
    for sample in iter_encoded_samples(set_dir, keys=keys, verify=verify):
        yield decode_sample(sample, roles)


def load_samples(
    set_dir: str | Path, n: int | None = None, verify: bool = True, roles: Iterable[str] | None = None
) -> list[dict]:
    """All samples (``n=None``) or the nested subset of size ``n`` (``subset_keys``), decoded."""
    keys = None if n is None else subset_keys(set_dir, n)
    if keys is not None and not keys:
        return []
    return list(iter_samples(set_dir, keys=keys, verify=verify, roles=roles))


def _shard_paths(set_dir: Path, index: dict, names: Iterable[str], verify: bool) -> dict[str, Path]:
    """``{name: local file}`` for the shards ``names`` of ``set_dir`` (see :func:`shard_files`)."""
    wanted = set(names)
    source = shard_store.source_of(set_dir)
    paths: dict[str, Path] = {}
    for shard in index["shards"]:
        name = shard["name"]
        if name not in wanted:
            continue
        if isinstance(source, str):
            paths[name] = shard_store.fetch(f"{source}/{name}", shard["sha256"], verify_cached=verify)
            continue
        path = set_dir / name
        if not path.is_file():
            raise ShardIntegrityError(f"{path}: missing shard; rebuild the set")
        if verify:
            _check_sha256(path, shard["sha256"], file_sha256(path))
        paths[name] = path
    unknown = wanted - set(paths)
    if unknown:
        raise ShardError(f"{set_dir / INDEX_NAME}: no shard(s) {sorted(unknown)[:3]} in the index")
    return paths


def shard_files(set_dir: str | Path, names: Iterable[str] | None = None, verify: bool = True) -> list[Path]:
    """Local tar files of the shards ``names`` (default: all), in index order, checked
    against the index's sha256 when ``verify``: the set's own files, or -- when the set is
    read from object storage -- verified copies in the fetch cache
    (:func:`matting_pipeline.shard_store.fetch`; downloads are always verified). For readers
    that open tars themselves (the pseudolabel stage's Ray Data job)."""
    set_dir = Path(set_dir)
    index = read_index(set_dir)
    names = [s["name"] for s in index["shards"]] if names is None else list(names)
    paths = _shard_paths(set_dir, index, names, verify)
    return [paths[s["name"]] for s in index["shards"] if s["name"] in paths]


def verify_set(set_dir: str | Path) -> dict:
    """Check every shard's sha256, member names and sample grouping without decoding images
    (from the set's URL when it is read from object storage); returns the index."""
    for _ in iter_encoded_samples(set_dir, verify=True):
        pass
    return read_index(set_dir)


# ---------------------------------------------------------------------------- random access


class ShardReader:
    """Random access to samples of one shard set without loading it.

    The constructor reads ``index.json`` and walks each needed tar's headers once, keeping
    ``key → role → (shard, byte offset, size, ext)``. :meth:`read` then seeks straight to a
    sample's members. Member names are checked as the shard reader does
    (:func:`parse_member_name`), so unsafe or unexpected names are refused.
    File handles are opened lazily per process (safe with DataLoader workers) and read
    with ``pread`` (safe from several threads: the trainer's prefetch thread). A set read
    from object storage is fetched first, tar by tar, into the verified local cache
    (:func:`shard_files`); reading then goes exactly as from the local set.

    Args:
        set_dir: the shard set directory.
        keys: the samples to expose, in this order (default: every key, storage order).
        verify: check each needed shard's sha256 against the index first (one read of
            the bytes; corrupt data fails here rather than hours into training).
    """

    def __init__(self, set_dir: str | Path, keys: Sequence[str] | None = None, verify: bool = True):
        self.set_dir = Path(set_dir)
        index = read_index(self.set_dir)
        self.keys: list[str] = list(index["keys"] if keys is None else keys)
        unknown = [k for k in self.keys if k not in index["shard_of"]]
        if unknown:
            raise ShardError(f"{self.set_dir}: {len(unknown)} unknown key(s), e.g. {unknown[:3]}")
        wanted = set(self.keys)
        needed = {index["shard_of"][k] for k in self.keys}
        self._shard_sha256 = {s["name"]: s["sha256"] for s in index["shards"] if s["name"] in needed}
        self._members: dict[str, dict[str, tuple[str, int, int, str]]] = {}
        self._paths = _shard_paths(self.set_dir, index, needed, verify)
        for shard in index["shards"]:
            name = shard["name"]
            if name not in needed:
                continue
            with tarfile.open(self._paths[name], mode="r:") as tf:
                for member in tf:
                    key, role, ext = parse_member_name(member.name, name)
                    if not member.isfile():
                        raise ShardError(f"{name}: refused member {member.name!r}: not a regular file")
                    if index["shard_of"].get(key) != name:
                        raise ShardError(f"{name}: refused member {member.name!r}: key not in this shard's index")
                    if key in wanted:
                        self._members.setdefault(key, {})[role] = (name, member.offset_data, member.size, ext)
        missing = [k for k in self.keys if k not in self._members]
        if missing:
            raise ShardError(f"{self.set_dir}: indexed sample(s) missing from the tars, e.g. {missing[:3]}")
        self._handles: dict[str, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def roles(self, key: str) -> list[str]:
        return sorted(self._members[key])

    def _read_bytes(self, shard: str, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():  # forked worker: never share file offsets
            self._handles, self._pid = {}, os.getpid()
        fh = self._handles.get(shard)
        if fh is None:
            fh = self._handles[shard] = open(self._paths[shard], "rb")
        data = os.pread(fh.fileno(), size, offset)  # positional: threads sharing a handle never race
        if len(data) != size:
            raise ShardError(f"{self.set_dir / shard}: truncated at byte {offset} (wanted {size})")
        return data

    def read(self, key: str, roles: Sequence[str] | None = None) -> dict[str, Any]:
        """Decode one sample: ``{"key", "meta", role: array}`` (as :func:`iter_samples`)."""
        members = self._members[key]
        wanted = list(members) if roles is None else ["meta", *roles]
        out: dict[str, Any] = {"key": key}
        for role in wanted:
            if role not in members:
                raise ShardError(f"{self.set_dir}: sample {key!r} has no {role!r} member (has {sorted(members)})")
            shard, offset, size, ext = members[role]
            try:
                out[role] = decode_member(role, ext, self._read_bytes(shard, offset, size))
            except ShardError as err:
                raise ShardError(f"{self.set_dir / shard}: {key}.{role}: {err}") from None
        return out

    def restrict(self, keys: Sequence[str]) -> "ShardReader":
        """A reader over ``keys`` (a subset of this one's), sharing the member table."""
        unknown = [k for k in keys if k not in self._members]
        if unknown:
            raise ShardError(f"{self.set_dir}: key(s) not in this reader, e.g. {unknown[:3]}")
        other = object.__new__(ShardReader)
        other.__dict__.update(self.__getstate__())
        other.keys = list(keys)
        other._members = {k: self._members[k] for k in keys}
        other._pid = os.getpid()
        return other

    def meta(self, key: str) -> dict:
        return self.read(key, roles=[])["meta"]

    def content_digest(self) -> str:
        """sha256 over the index's sha256 of every shard holding one of this reader's keys:
        it changes when the bytes of any sample it reads change (a resume check, cheap)."""
        shards = sorted({self._members[k][role][0] for k in self.keys for role in self._members[k]})
        text = "\n".join(f"{name} {self._shard_sha256[name]}" for name in shards)
        return hashlib.sha256(text.encode()).hexdigest()

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles = {}


# ---------------------------------------------------------------------------- utilities


def usable_cores() -> int:
    """The CPUs this process may use (its affinity mask on Linux, else the machine's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """Worker processes for decoding/generation: the CPUs this process may use (at most 8)."""
    return min(8, usable_cores())


def parallel_map(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    workers: int = 1,
    desc: str | None = None,
    progress: bool = True,
    total: int | None = None,
    min_items_per_worker: int = 4,
) -> Iterator[Any]:
    """``map(fn, items)`` in order, over ``workers`` processes, with a tqdm progress bar.

    Runs inline when ``workers <= 1`` or there are fewer than ``min_items_per_worker``
    items per worker. ``fn`` must be a module-level function (it is pickled); results come
    back in input order, so the output does not depend on ``workers``. Processes are
    forked where the platform allows (0.04 s for a pool, against about 2 s for ``spawn``,
    which re-imports everything in each worker); the workers only decode/encode images
    and never use the parent's threads or locks.
    """
    from tqdm import tqdm

    items = list(items)
    bar = tqdm(total=len(items) if total is None else total, desc=desc, unit="item",
               disable=not progress, mininterval=0.5, leave=False, file=sys.stderr)
    try:
        if workers <= 1 or len(items) < workers * min_items_per_worker:
            for item in items:
                yield fn(item)
                bar.update()
            return
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        chunksize = max(1, min(16, len(items) // (workers * 8)))
        from matting_pipeline.lifecycle import die_with_parent

        # die_with_parent: a killed stage must not leave its workers blocked on their queue forever
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=die_with_parent) as pool:
            for result in pool.map(fn, items, chunksize=chunksize):
                yield result
                bar.update()
    finally:
        bar.close()
