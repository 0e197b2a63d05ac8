"""matting_pipeline.shard_store: shard sets read from object storage, against a real S3
server (moto) on loopback -- the same samples, keys, order and digests as the local set,
integrity and exactness errors, member-name safety, the fetch cache, index-last publishing."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from matting_pipeline import shard_store, shards
from matting_pipeline.atomic import file_sha256
from matting_pipeline.shards import ShardError, ShardIntegrityError, UnsafeMemberError

from tests.images import disc_mask, rgb
from tests.services import s3_server as s3_service

REPO = Path(__file__).resolve().parents[2]
H, W = 12, 16
N, PER_SHARD = 10, 3  # 4 shards: 3 + 3 + 3 + 1


class _Requests(logging.Handler):
    """The moto server's request log ("PUT /bucket/key HTTP/1.1" ...), in order."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def calls(self, method: str, bucket: str) -> list[str]:
        """Object keys of ``method`` requests on ``bucket``, in order (query strings dropped)."""
        out = []
        for line in self.lines:
            line = re.sub(r"\x1b\[[0-9;]*m", "", line)  # werkzeug colours some status lines
            marker = f'"{method} /{bucket}/'
            if marker in line:
                out.append(line.split(marker, 1)[1].split(" ", 1)[0].split("?", 1)[0])
        return out


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on a free loopback port; yields its endpoint URL and request log."""
    requests = _Requests()
    logger = logging.getLogger("werkzeug")
    logger.addHandler(requests)
    logger.setLevel(logging.INFO)
    with s3_service() as server:
        yield server["endpoint"], requests
    logger.removeHandler(requests)


@pytest.fixture
def store(s3_server, tmp_path, monkeypatch):
    """A fresh bucket, credentials and endpoint in the environment, an empty fetch cache, and
    a local set ``<tmp>/data/shards/seg`` (not published); nothing activated yet."""
    import boto3

    endpoint, requests = s3_server
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", shard_store.CACHE_ENV: str(tmp_path / "cache"),
        shard_store.URL_ENV: "", shard_store.DATA_ROOT_ENV: "",  # restored (removed) after the test
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    shard_store.activate(None, tmp_path)
    bucket = f"shards-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    data = tmp_path / "data"
    set_dir = data / "shards" / "seg"
    shards.write_shard_set(set_dir, "seg", _samples(N), samples_per_shard=PER_SHARD)

    class Store:
        pass

    s = Store()
    s.bucket, s.client, s.requests, s.data, s.set_dir = bucket, client, requests, data, set_dir
    s.base = f"s3://{bucket}/matting"
    s.url = f"{s.base}/shards/seg"
    s.key = lambda name: f"matting/shards/seg/{name}"
    return s


def _samples(n: int, seed: int = 0):
    for i in range(n):
        yield f"seg-{i:06d}", {"stem": f"s{i}"}, {"image": rgb(H, W, i + seed), "mask": disc_mask(H, W)}


def _same_samples(a: list[dict], b: list[dict]) -> None:
    assert [s["key"] for s in a] == [s["key"] for s in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and x["meta"] == y["meta"]
        for role in x.keys() - {"key", "meta"}:
            assert x[role].dtype == y[role].dtype and np.array_equal(x[role], y[role])


def _tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _replace_local_shard(set_dir: Path, name: str, data: bytes) -> None:
    """Put ``data`` in place of shard ``name`` and record its sha256 in the local index (a
    consistent local set, as a producer that wrote it would leave it)."""
    (set_dir / name).write_bytes(data)
    index = json.loads((set_dir / "index.json").read_text())
    for shard in index["shards"]:
        if shard["name"] == name:
            shard["sha256"] = file_sha256(set_dir / name)
    (set_dir / "index.json").write_text(json.dumps(index, indent=1) + "\n")


# ------------------------------------------------------------------------ locations


def test_remote_location_and_source_of(tmp_path, monkeypatch):
    monkeypatch.setenv(shard_store.URL_ENV, "")
    monkeypatch.setenv(shard_store.DATA_ROOT_ENV, "")
    data = tmp_path / "data"
    assert shard_store.remote_location(data / "shards" / "seg", data, "s3://b/pfx/") == "s3://b/pfx/shards/seg"
    assert (shard_store.remote_location(data / "pseudolabels" / "seed0" / "seg6-mat2", data, "gs://b")
            == "gs://b/pseudolabels/seed0/seg6-mat2")
    with pytest.raises(ValueError, match="not inside the data root"):
        shard_store.remote_location(tmp_path / "elsewhere", data, "s3://b")
    shard_store.activate("s3://b/pfx", data)
    assert os.path.isabs(os.environ[shard_store.DATA_ROOT_ENV])
    assert shard_store.source_of(data / "composite" / "train") == "s3://b/pfx/composite/train"
    assert shard_store.source_of(tmp_path / "other" / "set") == tmp_path / "other" / "set"  # outside: local
    assert shard_store.env_vars()[shard_store.URL_ENV] == "s3://b/pfx"
    shard_store.activate(None, data)
    assert shard_store.source_of(data / "composite" / "train") == data / "composite" / "train"


def test_shard_url_param_is_validated_and_no_dvc_dep():
    from matting_pipeline.config import ConfigError, DataConfig, parse_params

    for url in ("s3://bucket/matting", "gs://b/x", "https://host/x", "file:///srv/shards", None):
        assert parse_params({"data": {"shard_url": url}}).data.shard_url == url
    for bad in ("bucket/matting", "ftp://host/x", "s3://"):
        with pytest.raises(ConfigError, match=r"data\.shard_url: must be an s3://"):
            parse_params({"data": {"shard_url": bad}})
    # reading verified bytes from a bucket changes no result: no stage re-runs when it changes
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    deps = {name: stage.get("params", []) for name, stage in stages.items()}
    assert not [name for name, params in deps.items() if "data" in params or "data.shard_url" in params]
    assert set(deps["ingest"]) == {f"data.{field}" for field in DataConfig.model_fields} - {"data.shard_url"}


# ------------------------------------------------------------------------ reading from the URL


def test_shard_reader_over_url_equals_local(store, capfd):
    local = shards.ShardReader(store.set_dir)
    local_samples = [local.read(k) for k in local.keys]
    assert shard_store.publish_set(store.set_dir, store.url, progress=False) is True
    shard_store.activate(store.base, store.data)
    remote = shards.ShardReader(store.set_dir)
    assert remote.keys == local.keys and len(remote) == N
    _same_samples([remote.read(k) for k in remote.keys], local_samples)
    assert remote.content_digest() == local.content_digest()
    assert all(Path(p).parent == Path(os.environ[shard_store.CACHE_ENV]) for p in remote._paths.values())
    # a subset in the caller's order (what the training samplers rely on), and its digest
    keys = shards.subset_keys(store.set_dir, 4)[::-1]
    sub_remote = shards.ShardReader(store.set_dir, keys)
    shard_store.activate(None, store.data)
    sub_local = shards.ShardReader(store.set_dir, keys)
    assert sub_remote.keys == keys == sub_local.keys
    assert sub_remote.content_digest() == sub_local.content_digest()
    _same_samples([sub_remote.read(k, ["mask"]) for k in keys], [sub_local.read(k, ["mask"]) for k in keys])
    # the stage log says once where the set is read from
    log = capfd.readouterr().err
    assert log.count(f"seg: {store.url} (verified against {store.set_dir / 'index.json'})") == 1


def test_iter_samples_over_url_equals_local(store):
    local_all = list(shards.iter_samples(store.set_dir))
    local_some = list(shards.iter_samples(store.set_dir, keys=["seg-000007", "seg-000001"], roles=["image"]))
    local_subset = shards.load_samples(store.set_dir, n=5)
    shard_store.publish_set(store.set_dir, store.url, progress=False)
    shard_store.activate(store.base, store.data)
    store.requests.lines.clear()
    _same_samples(list(shards.iter_samples(store.set_dir)), local_all)
    assert sorted(store.requests.calls("GET", store.bucket)) == sorted(
        [store.key("index.json")] + [store.key(f"seg-{i:06d}.tar") for i in range(4)])  # streamed from S3
    _same_samples(list(shards.iter_samples(store.set_dir, keys=["seg-000007", "seg-000001"], roles=["image"])),
                  local_some)
    _same_samples(shards.load_samples(store.set_dir, n=5), local_subset)
    assert shards.verify_set(store.set_dir)["count"] == N
    raw = [s["members"] for s in shards.iter_encoded_samples(store.set_dir)]
    shard_store.activate(None, store.data)
    assert raw == [s["members"] for s in shards.iter_encoded_samples(store.set_dir)]  # bit-exact members


def test_tampered_remote_tar_is_an_integrity_error(store):
    shard_store.publish_set(store.set_dir, store.url, progress=False)
    data = bytearray((store.set_dir / "seg-000001.tar").read_bytes())
    data[2048] ^= 0xFF  # inside a member's data: the tar still parses
    store.client.put_object(Bucket=store.bucket, Key=store.key("seg-000001.tar"), Body=bytes(data))
    shard_store.activate(store.base, store.data)
    with pytest.raises(ShardIntegrityError, match=r"shards/seg/seg-000001\.tar: sha256 mismatch"):
        list(shards.iter_samples(store.set_dir))
    with pytest.raises(ShardIntegrityError, match=r"shards/seg/seg-000001\.tar: sha256 mismatch"):
        list(shards.iter_samples(store.set_dir, verify=False))  # a remote tar is always verified
    with pytest.raises(ShardIntegrityError, match=r"shards/seg/seg-000001\.tar: sha256 mismatch"):
        shards.ShardReader(store.set_dir, verify=False)
    tampered = shards.read_index(store.set_dir)["shards"][1]["sha256"]
    cache = Path(os.environ[shard_store.CACHE_ENV])
    assert not (cache / f"{tampered}.tar").exists() and not list(cache.glob(".*.part"))  # nothing half-cached
    # the intact shards still read
    assert [s["key"] for s in shards.iter_samples(store.set_dir, keys=["seg-000000"])] == ["seg-000000"]


def test_remote_index_of_another_version_names_the_fix(store, tmp_path):
    shard_store.publish_set(store.set_dir, store.url, progress=False)
    shards.write_shard_set(store.set_dir, "seg", _samples(N, seed=5), samples_per_shard=PER_SHARD)  # rebuilt here
    shard_store.activate(store.base, store.data)
    with pytest.raises(ShardError, match=r"index\.json differs from .*seg/index\.json .*shard_store publish"):
        shards.ShardReader(store.set_dir)
    with pytest.raises(ShardError, match="differs from"):
        list(shards.iter_samples(store.set_dir))
    # the fix the message names, through the command line (URL from the params file)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"shard_url": store.base}}))
    cli = [sys.executable, "-m", "matting_pipeline.shard_store", "publish", str(store.set_dir),
           "--params", str(params), "--data-root", str(store.data), "--no-progress"]
    proc = subprocess.run(cli, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"published to {store.url}" in proc.stdout
    _same_samples([shards.ShardReader(store.set_dir).read("seg-000003")],
                  [s for s in shards.load_samples(store.set_dir) if s["key"] == "seg-000003"])


def test_unpublished_set_is_a_clear_error(store):
    shard_store.activate(store.base, store.data)
    with pytest.raises(ShardError, match=r"shards/seg/index\.json: not found.*shard_store publish .*shards/seg"):
        shards.subset_keys(store.set_dir, 3)
    # a producing stage checking its own output reads the local index
    assert shards.read_index(store.set_dir, local=True)["count"] == N


def test_unsafe_member_in_a_remote_tar_is_refused(store):
    image = shards.encode_member("image", rgb(H, W))[1]
    meta = json.dumps({"key": "seg-000000"}).encode()
    mask = shards.encode_member("mask", disc_mask(H, W))[1]

    def member(name, data=None, kind=tarfile.REGTYPE, link=""):
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.size = kind, link, len(data or b"")
        return info, data

    good = [member("seg-000000.json", meta), member("seg-000000.image.png", image)]
    bad_tars = {
        "parent reference": good + [member("../seg-000000.mask.png", mask)],
        "not a regular file": good + [member("seg-000000.mask.png", kind=tarfile.SYMTYPE, link="/etc/passwd")],
        "key not in this shard": good + [member("seg-000004.mask.png", mask)],
    }
    for reason, members in bad_tars.items():
        shard_store.activate(None, store.data)
        _replace_local_shard(store.set_dir, "seg-000000.tar", _tar_bytes(members))
        shard_store.publish_set(store.set_dir, store.url, progress=False)
        shard_store.activate(store.base, store.data)
        with pytest.raises(UnsafeMemberError, match=f"seg-000000.tar: refused member .*{reason}"):
            list(shards.iter_samples(store.set_dir))
        with pytest.raises(ShardError, match="seg-000000.tar: refused member"):
            shards.ShardReader(store.set_dir)


def test_fetch_cache_is_reused_and_repaired(store):
    shard_store.publish_set(store.set_dir, store.url, progress=False)
    shard_store.activate(store.base, store.data)
    first = shards.ShardReader(store.set_dir)
    expected = [first.read(k) for k in first.keys]
    cached = sorted(first._paths.values())
    assert [p.name for p in cached] == sorted(f"{s['sha256']}.tar" for s in shards.read_index(store.set_dir)["shards"])
    stamps = [p.stat().st_mtime_ns for p in cached]
    store.requests.lines.clear()
    second = shards.ShardReader(store.set_dir)
    assert store.requests.calls("GET", store.bucket) == []  # no download (index verified once per process)
    _same_samples([second.read(k) for k in second.keys], expected)
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    # a damaged cache entry is noticed (verify=True re-hashes it) and fetched again
    damaged = first._paths["seg-000002.tar"]
    damaged.write_bytes(b"\0" * damaged.stat().st_size)
    third = shards.ShardReader(store.set_dir)
    assert store.requests.calls("GET", store.bucket) == [store.key("seg-000002.tar")]
    _same_samples([third.read(k) for k in third.keys], expected)
    assert not list(damaged.parent.glob(".*.part"))


def test_concurrent_fetches_of_one_shard_by_two_processes(store):
    shard_store.publish_set(store.set_dir, store.url, progress=False)
    shard = shards.read_index(store.set_dir)["shards"][0]
    code = ("import sys; from matting_pipeline import shard_store; "
            "print(shard_store.fetch(sys.argv[1], sys.argv[2]))")
    args = [sys.executable, "-c", code, f"{store.url}/{shard['name']}", shard["sha256"]]
    procs = [subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1 and file_sha256(paths.pop()) == shard["sha256"]
    assert sorted(p.name for p in Path(os.environ[shard_store.CACHE_ENV]).iterdir()) == [f"{shard['sha256']}.tar"]


# ------------------------------------------------------------------------ publishing


def test_publish_uploads_the_index_last_and_skips_an_equal_one(store):
    store.requests.lines.clear()
    assert shard_store.publish_set(store.set_dir, store.url, progress=False) is True
    puts = store.requests.calls("PUT", store.bucket)
    assert puts[-1] == store.key("index.json") and sorted(puts[:-1]) == [store.key(f"seg-{i:06d}.tar") for i in range(4)]
    store.requests.lines.clear()
    assert shard_store.publish_set(store.set_dir, store.url, progress=False) is False
    assert store.requests.calls("PUT", store.bucket) == []


def test_interrupted_publish_leaves_no_index(store):
    # the third tar is damaged locally: publishing stops there, after uploading the first two
    path = store.set_dir / "seg-000002.tar"
    path.write_bytes(path.read_bytes()[:-1024])
    with pytest.raises(ShardIntegrityError, match="seg-000002.tar: sha256 mismatch .*not published"):
        shard_store.publish_set(store.set_dir, store.url, progress=False)
    listed = store.client.list_objects_v2(Bucket=store.bucket).get("Contents", [])
    assert sorted(o["Key"] for o in listed) == [store.key("seg-000000.tar"), store.key("seg-000001.tar")]
    shard_store.activate(store.base, store.data)
    with pytest.raises(ShardError, match="not found"):
        shards.read_index(store.set_dir)


def test_file_url_round_trip(store, tmp_path):
    """file:// (a shared file system) publishes and reads like a bucket."""
    base = (tmp_path / "mirror").as_uri()
    shard_store.publish_set(store.set_dir, f"{base}/shards/seg", progress=False)
    assert sorted(p.name for p in (tmp_path / "mirror" / "shards" / "seg").iterdir()) == sorted(
        p.name for p in store.set_dir.iterdir())
    local = shards.load_samples(store.set_dir)
    shard_store.activate(base, store.data)
    _same_samples(shards.load_samples(store.set_dir), local)
    reader = shards.ShardReader(store.set_dir)
    _same_samples([reader.read(k) for k in reader.keys], local)


def test_http_url_reads_a_served_mirror_and_refuses_to_publish_another_version(store, tmp_path):
    """http(s):// (e.g. a web server in front of the bucket) is read through WebDataset's
    gopen (curl); publishing to it passes only when it already serves this version."""
    import functools
    import http.server
    import threading

    mirror = tmp_path / "mirror"
    shard_store.publish_set(store.set_dir, f"{mirror.as_uri()}/shards/seg", progress=False)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(mirror))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert shard_store.publish_set(store.set_dir, f"{base}/shards/seg", progress=False) is False  # served already
        local = shards.load_samples(store.set_dir)
        shard_store.activate(base, store.data)
        _same_samples(shards.load_samples(store.set_dir), local)
        reader = shards.ShardReader(store.set_dir)
        _same_samples([reader.read(k) for k in reader.keys], local)
        shard_store.activate(None, store.data)
        (mirror / "shards" / "seg" / "index.json").write_text("{}")  # the server holds another version
        with pytest.raises(ShardError, match="read-only"):
            shard_store.publish_set(store.set_dir, f"{base}/shards/seg", progress=False)
    finally:
        server.shutdown()


# ------------------------------------------------------------------------ the stages


def test_stages_publish_their_sets_and_read_them_from_the_url(store, tmp_path, monkeypatch, capfd):
    """shard and composite publish; composite reads matte/background from the bucket; the
    pseudolabel stage's readers get verified cache copies and label exactly as from the local set."""
    import torch

    from matting_core.checkpoint import save_checkpoint
    from matting_core.models import build_network
    from matting_pipeline.cli import main as matting
    from matting_pipeline.config import load_params
    from stages import pseudolabel

    root = tmp_path / "work"
    root.mkdir()
    raw = {
        "data": {"synthetic": {"image_size": 32, "matte": 10, "background": 8, "seg": 12, "val_natural": 3},
                 "shard_url": store.base},
        "shard": {"samples_per_shard": 4},
        "study": {"seg": [12], "mat": [4]},
        "composite": {"backgrounds_per_fg": 1, "val_foregrounds": 3, "val_backgrounds": 2, "val_backgrounds_per_fg": 1},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(root)  # the stages' working directory (manifest paths are relative to it)
    for stage in ("ingest", "shard", "composite"):
        assert matting([stage, "--no-progress"]) == 0, stage
    log = capfd.readouterr().err
    published = ["shards/matte", "shards/background", "shards/seg", "shards/val-natural",
                 "composite/train", "composite/val-composited"]
    for rel in published:
        assert f"published to {store.base}/{rel}" in log
        remote = store.client.get_object(Bucket=store.bucket, Key=f"matting/{rel}/index.json")["Body"].read()
        assert remote == (Path("data") / rel / "index.json").read_bytes()
    assert f"matte: {store.base}/shards/matte (verified against data/shards/matte/index.json)" in log
    # rerun: up to date here and there, nothing uploaded
    store.requests.lines.clear()
    assert matting(["shard", "--no-progress"]) == 0
    assert store.requests.calls("PUT", store.bucket) == []
    assert "already at" in capfd.readouterr().err

    torch.manual_seed(0)
    save_checkpoint(Path("models/seed0/teacher/seg12-mat4/model.pt"), build_network("unet_r18x0.25"))
    params = load_params("params.yaml")
    shard_store.activate(params.data.shard_url, "data")
    plan = pseudolabel.make_plan(params, 12, 4, "data", "models")
    cache = Path(os.environ[shard_store.CACHE_ENV]).resolve()
    assert plan.shard_paths and all(Path(p).parent == cache for p in plan.shard_paths)
    remote_labels = pseudolabel.label_in_process(plan, out_dir=tmp_path / "remote-labels")
    shard_store.activate(None, "data")
    local_plan = pseudolabel.make_plan(params, 12, 4, "data", "models")
    assert all(Path(p).is_relative_to(root) for p in local_plan.shard_paths)
    local_labels = pseudolabel.label_in_process(local_plan, out_dir=tmp_path / "local-labels")
    assert remote_labels["shards"] == local_labels["shards"]  # the same bytes, shard for shard


def test_publishing_to_a_missing_bucket_is_one_clear_error(store):
    with pytest.raises(ShardError, match=r"s3://no-such-bucket-here/shards/seg/seg-000000\.tar: cannot write .*bucket"):
        shard_store.publish_set(store.set_dir, "s3://no-such-bucket-here/shards/seg", progress=False)
    with socket.socket() as sock:  # a loopback port nobody serves (no DNS lookup, no network)
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    with pytest.raises(ShardError, match="read-only"):
        shard_store.publish_set(store.set_dir, f"http://127.0.0.1:{closed}/shards/seg", progress=False)
