"""Atomic outputs (write to a temporary sibling, then rename into place) and file digests.

A stage killed half-way leaves either the old output or the new one, never a torn file.
``os.replace`` is atomic on POSIX when source and target are on the same filesystem,
which a sibling temp path guarantees.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from matting_core.files import created_mode


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (the one digest helper of the project)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def bytes_sha256(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def code_digest(stage_file: str | Path) -> str:
    """Hex sha256 of the code a stage's outputs depend on: ``stage_file`` and every ``*.py``
    of ``matting_pipeline/`` and ``matting_core/`` (what dvc.yaml lists as the stage's code
    deps), so a stage's own "up to date" check agrees with DVC's."""
    root = Path(__file__).resolve().parents[1]
    shared = sorted(p for pkg in ("matting_pipeline", "matting_core") for p in (root / pkg).rglob("*.py"))
    h = hashlib.sha256()
    for label, path in [(Path(stage_file).name, Path(stage_file))] + [(p.relative_to(root).as_posix(), p) for p in shared]:
        h.update(label.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    """An empty ``.<name>.XXXX<suffix>`` file beside ``path`` (mode from the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.fchmod(fd, created_mode())  # mkstemp's 0600 would survive the rename: respect the umask
    os.close(fd)
    return Path(name)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (fsync, then rename)."""
    path = Path(path)
    with atomic_file(path, "wb") as fh:
        fh.write(data)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=False, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator:
    """Open a temp sibling of ``path`` for writing; rename it into place on clean exit."""
    path = Path(path)
    tmp = _tmp_sibling(path, ".tmp")
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp sibling *name* ending in ``path``'s suffix, for writers that take a file name
    and pick the format by it (``cv2.imwrite``); fsynced and renamed into place on clean exit."""
    path = Path(path)
    tmp = _tmp_sibling(path, ".tmp" + path.suffix)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory in a temp sibling; on clean exit it replaces ``path`` whole.

    On an exception (or a kill) the temp directory is removed (or left as a dot-prefixed
    ``.name.*.tmp`` sibling that the next run cleans up) and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, created_mode(directory=True))  # mkdtemp's 0700 would survive the rename
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old.tmp")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
