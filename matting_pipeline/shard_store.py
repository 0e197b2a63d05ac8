"""Shard sets on object storage: where a set is read from, publishing, the fetch cache.

With ``data.shard_url`` set (params.yaml), the shard sets under the data root also live at
``<shard_url>/<path of the set relative to the data root>``, e.g. ``data/shards/seg`` at
``s3://bucket/matting/shards/seg`` (:func:`remote_location`), holding the same
``index.json`` and tars as the local set (docs/FORMATS.md "Shard sets on object storage").

- Producers (``shard``, ``composite``, ``pseudolabel``) write the local set as before, then
  :func:`publish_set`: every tar, then ``index.json`` last, so a reader never sees an index
  whose tars are not all there.
- Every stage calls :func:`activate` at start-up with its params; it puts the URL and the
  absolute data root in ``MATTING_SHARD_URL`` / ``MATTING_SHARD_DATA_ROOT``, so the
  processes the stage starts (DataLoader workers, decoding pools, local Ray workers)
  inherit them. :func:`source_of` then maps a set directory under the data root to its URL,
  and :mod:`matting_pipeline.shards`' readers read from there.
- Exactness: a set read from the URL is the version DVC tracks here. Its remote
  ``index.json`` must equal the local one byte for byte (:func:`check_remote_index`, else an
  error naming both and the fix), and every tar read must match the index's sha256
  (:func:`read_verified`, :func:`fetch`; :class:`ShardIntegrityError` otherwise).
- I/O goes through WebDataset's ``webdataset.gopen`` (file://, http(s):// through curl,
  gs:// through gsutil); :func:`open_url` adds an ``s3`` handler that opens through
  fsspec/s3fs (webdataset 1.0.2 has none). Publishing uses fsspec (s3fs for s3://, gcsfs
  for gs://). The S3 endpoint and credentials come from the usual ``AWS_ENDPOINT_URL``
  (or ``AWS_ENDPOINT_URL_S3``), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_DEFAULT_REGION``.
- Random access fetches whole tars into a content-addressed cache
  (``MATTING_SHARD_CACHE``, default ``~/.cache/matting-shards``; ``<sha256>.tar``, written
  to a temporary file, verified, renamed), so two processes fetching the same shard at
  once both end with the same verified file.

Public API::

    remote_location(local_set_dir, data_root, shard_url) -> str
    publish_set(local_set_dir, url, progress=True) -> bool
    publish_stage_sets(shard_url, data_root, set_dirs, progress=True) -> None
    activate(shard_url, data_root) -> None
    source_of(set_dir) -> str | Path
    env_vars() -> dict[str, str]
    check_remote_index(set_dir, url, local_bytes) -> None
    check_shard_name(name, index_path) -> None
    register_gopen() -> None
    open_url(url, mode="rb") -> binary file object
    read_verified(url, sha256) -> bytes
    fetch(url, sha256, verify_cached=True) -> Path
    cache_dir() -> Path

Command line: ``python -m matting_pipeline.shard_store publish data/shards/seg [...]``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

from matting_pipeline.atomic import file_sha256
from matting_pipeline.shard_errors import ShardError, ShardIntegrityError

__all__ = [
    "CACHE_ENV",
    "DATA_ROOT_ENV",
    "INDEX_NAME",
    "URL_ENV",
    "activate",
    "cache_dir",
    "check_remote_index",
    "check_shard_name",
    "env_vars",
    "fetch",
    "open_url",
    "read_verified",
    "publish_set",
    "publish_stage_sets",
    "register_gopen",
    "remote_location",
    "source_of",
]

INDEX_NAME = "index.json"
URL_ENV = "MATTING_SHARD_URL"
DATA_ROOT_ENV = "MATTING_SHARD_DATA_ROOT"
CACHE_ENV = "MATTING_SHARD_CACHE"
_BLOCK = 1 << 20  # copy and hash in 1 MiB blocks
_READ_AHEAD = 16 << 20  # s3fs fetches 16 MiB per request when a tar is read block by block
_PUBLISH_HINT = "python -m matting_pipeline.shard_store publish {set_dir}"
_verified: set[tuple[str, str]] = set()  # (url, sha256 of the local index) checked by this process


# ---------------------------------------------------------------------------- locations


def remote_location(local_set_dir: str | Path, data_root: str | Path, shard_url: str) -> str:
    """``<shard_url>/<path of the set relative to the data root>``.

    >>> remote_location("data/shards/seg", "data", "s3://bucket/pfx")
    's3://bucket/pfx/shards/seg'

    Raises:
        ValueError: the set is not inside the data root.
    """
    local, root = Path(local_set_dir).resolve(), Path(data_root).resolve()
    try:
        relative = local.relative_to(root)
    except ValueError:
        raise ValueError(f"{local_set_dir} is not inside the data root {data_root}") from None
    if not relative.parts:
        raise ValueError(f"{local_set_dir} is the data root itself, not a shard set in it")
    return f"{shard_url.rstrip('/')}/{relative.as_posix()}"


def activate(shard_url: str | None, data_root: str | Path) -> None:
    """Read the shard sets under ``data_root`` from ``shard_url`` in this process and the
    ones it starts (environment variables ``MATTING_SHARD_URL``, ``MATTING_SHARD_DATA_ROOT``,
    absolute); ``shard_url`` None reads the local files (clears them). Each stage calls it
    at start-up with ``params.data.shard_url`` and its ``--data-root``."""
    if shard_url is None:
        os.environ.pop(URL_ENV, None)
        os.environ.pop(DATA_ROOT_ENV, None)
        return
    os.environ[URL_ENV] = shard_url.rstrip("/")
    os.environ[DATA_ROOT_ENV] = str(Path(data_root).resolve())


def source_of(set_dir: str | Path) -> str | Path:
    """Where to read the set ``set_dir`` from: its URL (a ``str``) when :func:`activate` made a
    URL active and the set is under the data root, else the local directory (a ``Path``)."""
    url, root = os.environ.get(URL_ENV), os.environ.get(DATA_ROOT_ENV)
    if not url or not root:
        return Path(set_dir)
    try:
        return remote_location(set_dir, root, url)
    except ValueError:
        return Path(set_dir)  # a set outside the data root (a test's, a benchmark's) stays local


def env_vars() -> dict[str, str]:
    """The variables that carry the activation (and the cache) to other processes, e.g. a
    Ray cluster's workers (``runtime_env={"env_vars": ...}``). No credentials."""
    return {name: os.environ[name] for name in (URL_ENV, DATA_ROOT_ENV, CACHE_ENV) if os.environ.get(name)}


def cache_dir() -> Path:
    """The fetch cache: ``MATTING_SHARD_CACHE``, default ``~/.cache/matting-shards``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "matting-shards")


# ---------------------------------------------------------------------------- I/O


def _storage_options(url: str) -> dict[str, Any]:
    """fsspec options for ``url``: the S3 endpoint of ``AWS_ENDPOINT_URL(_S3)``, if set.

    botocore reads these variables itself (checked with s3fs 2026.9 and aiobotocore 3.10);
    passing the endpoint explicitly also puts it in fsspec's instance-cache key, so a
    process that changes endpoints gets a client for the new one.
    """
    if url.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            return {"client_kwargs": {"endpoint_url": endpoint}}
    return {}


def _filesystem(url: str):
    """``(fsspec filesystem, path)`` of ``url``.

    Raises:
        ShardError: no fsspec implementation of the scheme is installed (e.g. gcsfs for gs://).
    """
    import fsspec.core

    try:
        return fsspec.core.url_to_fs(url, **_storage_options(url))
    except ImportError as err:
        raise ShardError(f"{url}: {err}") from None


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> BinaryIO:
    """A ``webdataset.gopen`` handler that opens ``url`` through fsspec (s3fs for s3://)."""
    fs, path = _filesystem(url)
    if mode.startswith("r"):
        return fs.open(path, mode, block_size=_READ_AHEAD, cache_type="readahead")
    return fs.open(path, mode)


def register_gopen() -> None:
    """Give ``webdataset.gopen`` (and so ``webdataset.WebDataset``) an ``s3`` handler that opens
    through fsspec/s3fs, unless one is registered already. Idempotent; :func:`open_url` calls it."""
    from webdataset.gopen import gopen_schemes

    gopen_schemes.setdefault("s3", _gopen_fsspec)


def open_url(url: str, mode: str = "rb") -> BinaryIO:
    """Open ``url`` (or a local path) with ``webdataset.gopen`` (s3:// through :func:`register_gopen`)."""
    from webdataset.gopen import gopen

    register_gopen()
    return gopen(url, mode)


def _read_url(url: str) -> bytes:
    with open_url(url) as stream:
        return stream.read()


def _mismatch(url: str, expected: str, got: str) -> ShardIntegrityError:
    return ShardIntegrityError(
        f"{url}: sha256 mismatch (index {expected[:12]}..., remote {got[:12]}...); the remote shard is "
        f"corrupt or was modified -- publish the set again (`{_PUBLISH_HINT.format(set_dir='<set_dir>')}`)"
    )


def _unreadable(url: str, err: BaseException) -> ShardError:
    kind = "missing" if isinstance(err, FileNotFoundError) else f"unreadable ({type(err).__name__}: {err})"
    return ShardError(
        f"{url}: {kind}; publish the set again (`{_PUBLISH_HINT.format(set_dir='<set_dir>')}`) "
        "or check the endpoint and credentials (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)"
    )


def read_verified(url: str, sha256: str) -> bytes:
    """The bytes at ``url`` (through :func:`open_url`), which must hash to ``sha256``.

    Raises:
        ShardIntegrityError: they do not.
        ShardError: ``url`` is missing or unreadable.
    """
    try:
        with open_url(url) as stream:
            data = stream.read()
    except Exception as err:
        raise _unreadable(url, err) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise _mismatch(url, sha256, digest)
    return data


def fetch(url: str, sha256: str, verify_cached: bool = True) -> Path:
    """A verified local copy of the tar at ``url``: ``<cache>/<sha256>.tar``.

    A cached copy is used as is (re-hashed first with ``verify_cached``; a damaged one is
    fetched again). Otherwise the tar is streamed into a temporary file in the cache,
    hashed on the way, and renamed into place only when it matches, so concurrent fetches
    of one shard (two processes, two threads) each rename a complete, verified file.

    Raises:
        ShardIntegrityError: the remote bytes do not hash to ``sha256``.
        ShardError: the remote tar is missing or unreadable.
    """
    root = cache_dir()
    target = root / f"{sha256}.tar"
    if target.is_file():
        if not verify_cached or file_sha256(target) == sha256:
            return target
        target.unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{sha256[:16]}-", suffix=".part")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with open_url(url) as source:
                    for block in iter(lambda: source.read(_BLOCK), b""):
                        digest.update(block)
                        out.write(block)
            except Exception as err:
                raise _unreadable(url, err) from None
        if digest.hexdigest() != sha256:
            raise _mismatch(url, sha256, digest.hexdigest())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return target


# ---------------------------------------------------------------------------- exactness


def check_remote_index(set_dir: str | Path, url: str, local_bytes: bytes) -> None:
    """Require ``<url>/index.json`` to equal ``local_bytes`` (the local, DVC-tracked index of
    ``set_dir``); on the first success in this process, log where the set is read from.

    Raises:
        ShardError: the remote index is missing, unreadable or another version; the message
        names both locations and the fix.
    """
    local_index = Path(set_dir) / INDEX_NAME
    memo = (url, hashlib.sha256(local_bytes).hexdigest())
    if memo in _verified:
        return
    remote_index = f"{url}/{INDEX_NAME}"
    fix = (f"publish this version: `{_PUBLISH_HINT.format(set_dir=set_dir)}`, or rerun the stage that "
           "writes the set")
    try:
        remote_bytes = _read_url(remote_index)
    except Exception as err:
        state = "not found" if isinstance(err, FileNotFoundError) else f"unreadable ({type(err).__name__}: {err})"
        raise ShardError(
            f"{remote_index}: {state}, so {set_dir} cannot be read from data.shard_url; {fix} "
            "(or check the endpoint and credentials: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)"
        ) from None
    if remote_bytes != local_bytes:
        raise ShardError(
            f"{remote_index} differs from {local_index} (the version DVC tracks here): the bucket holds "
            f"another version of this set; {fix} (or `dvc checkout` the version the bucket holds)"
        )
    _verified.add(memo)
    print(f"{Path(set_dir).name}: {url} (verified against {local_index})", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- publishing


def _index_shards(raw: bytes, path: Path) -> list[tuple[str, str]]:
    """``[(tar name, sha256)]`` of an index (only what publishing needs; readers check the rest)."""
    try:
        shards = json.loads(raw.decode("utf-8"))["shards"]
        listed = [(str(s["name"]), str(s["sha256"])) for s in shards]
    except (ValueError, KeyError, TypeError) as err:
        raise ShardError(f"{path}: unreadable index ({err})") from None
    for name, _ in listed:
        check_shard_name(name, path)
    return listed


def check_shard_name(name: Any, index_path: Path) -> None:
    """A shard name an index may list: a plain ``<something>.tar`` in the set's own folder (no
    path separator, not hidden). :func:`matting_pipeline.shards.read_index` checks with it too.

    Raises:
        ShardError: any other name, naming the index.
    """
    if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith(".") or not name.endswith(".tar"):
        raise ShardError(f"{index_path}: refused shard name {name!r}")


def publish_set(local_set_dir: str | Path, url: str, progress: bool = True) -> bool:
    """Upload the local set ``local_set_dir`` to ``url``: every tar (checked against the
    index's sha256 first), then ``index.json`` last. Returns False (nothing uploaded) when
    the remote index already equals the local one.

    A publish interrupted before its end leaves the previous remote index (or none), never
    an index whose tars are missing. Tars of an older version that the new index does not
    list are left in place (harmless: readers only open what the index names).

    Raises:
        ShardError: no local index, or ``url`` cannot be written (http(s):// is read-only:
        it only passes when it already serves this version).
        ShardIntegrityError: a local tar is missing or does not match the index.
    """
    from tqdm import tqdm

    local = Path(local_set_dir)
    index_path = local / INDEX_NAME
    try:
        raw = index_path.read_bytes()
    except OSError as err:
        raise ShardError(f"{index_path}: cannot read the set's index ({err.strerror or err}); build the set first") from None
    listed = _index_shards(raw, index_path)
    url = url.rstrip("/")
    with contextlib.suppress(Exception):
        if _read_url(f"{url}/{INDEX_NAME}") == raw:
            return False
    if url.startswith(("http://", "https://")):  # already there is fine (above); writing is not
        raise ShardError(f"{url}: http(s) URLs are read-only and do not hold this version of the set;"
                         " publish it to the bucket behind them (s3://, gs://) first")
    fs, root = _filesystem(url)
    is_local = "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))
    if is_local:
        with _writing(url):
            fs.makedirs(root, exist_ok=True)
    bar = tqdm(listed, desc=f"publish {local.name}", unit="shard", leave=False, file=sys.stderr,
               disable=not progress or len(listed) < 4)
    for name, sha256 in bar:
        path = local / name
        try:
            digest = file_sha256(path)
        except OSError as err:
            raise ShardIntegrityError(f"{path}: cannot read shard ({err.strerror or err}); rebuild the set") from None
        if digest != sha256:
            raise ShardIntegrityError(
                f"{path}: sha256 mismatch (index {sha256[:12]}..., file {digest[:12]}...); not published "
                f"(the remote index is left as it was) -- rebuild the set"
            )
        with _writing(f"{url}/{name}"):
            fs.put_file(str(path), f"{root}/{name}")
    with _writing(f"{url}/{INDEX_NAME}"):
        if is_local:  # an object store's PUT is atomic; a file is not, so write a sibling and rename
            tmp = f"{root}/.{INDEX_NAME}.{os.getpid()}.part"
            fs.pipe_file(tmp, raw)
            fs.mv(tmp, f"{root}/{INDEX_NAME}")
        else:
            fs.pipe_file(f"{root}/{INDEX_NAME}", raw)
    return True


@contextlib.contextmanager
def _writing(url: str):
    """Turn a failed upload (no such bucket, no permission, no endpoint) into one ShardError line."""
    try:
        yield
    except Exception as err:
        raise ShardError(
            f"{url}: cannot write ({type(err).__name__}: {err}); check the bucket, the endpoint and the "
            "credentials (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)"
        ) from err


def publish_stage_sets(shard_url: str | None, data_root: str | Path, set_dirs, progress: bool = True) -> None:
    """What a producing stage calls after writing its sets: publish each of ``set_dirs`` to its
    :func:`remote_location` when ``shard_url`` is set (one line per set on stderr)."""
    if shard_url is None:
        return
    for set_dir in set_dirs:
        url = remote_location(set_dir, data_root, shard_url)
        uploaded = publish_set(set_dir, url, progress=progress)
        print(f"{Path(set_dir).name}: {'published to' if uploaded else 'already at'} {url}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m matting_pipeline.shard_store",
        description="Shard sets on object storage (data.shard_url). `publish` uploads local shard sets "
        "to <data.shard_url>/<path relative to the data root>: the tars, then index.json.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    publish = commands.add_parser("publish", help="upload local shard sets (tars first, index.json last)")
    publish.add_argument("set_dirs", nargs="+", type=Path, help="shard set directories, e.g. data/shards/seg")
    publish.add_argument("--params", default="params.yaml", help="params file with data.shard_url (default: params.yaml)")
    publish.add_argument("--data-root", default="data", help="data folder the URL stands for (default: data)")
    publish.add_argument("--url", default=None, help="publish one set to this URL instead of its place under data.shard_url")
    publish.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        if args.url is not None:
            if len(args.set_dirs) != 1:
                parser.error("--url takes exactly one set directory")
            targets = [(args.set_dirs[0], args.url)]
        else:
            from matting_pipeline.config import load_params

            shard_url = load_params(args.params).data.shard_url
            if shard_url is None:
                parser.error(f"data.shard_url is null in {args.params}: set it, or give --url")
            targets = [(d, remote_location(d, args.data_root, shard_url)) for d in args.set_dirs]
        for set_dir, url in targets:
            uploaded = publish_set(set_dir, url, progress=not args.no_progress)
            print(f"{set_dir}: {'published to' if uploaded else 'already at'} {url}")
    except (ShardError, ValueError) as err:
        print(f"shard_store publish: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
