"""matting_pipeline.shards: round trips, nested subsets, integrity, member-name safety, atomicity."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest

from matting_pipeline import shards
from matting_pipeline.shards import ShardError, ShardIntegrityError, UnsafeMemberError

from tests.images import disc_mask, rgb, soft_alpha

H, W = 12, 16


def _samples(n: int, set_name: str = "seg"):
    for i in range(n):
        yield f"{set_name}-{i:06d}", {"stem": f"s{i}"}, {"image": rgb(H, W, i), "mask": disc_mask(H, W)}


def test_round_trip_bit_exact_alpha_8_and_16_bit(tmp_path):
    a8 = (soft_alpha(H, W) * 255).round().astype(np.uint8)
    a16 = (soft_alpha(H, W, 2) * 65535).round().astype(np.uint16)
    a16[0, 0] = 12345
    tri = np.where(a8 == 255, 255, np.where(a8 > 0, 128, 0)).astype(np.uint8)
    samples = [
        ("v-000000", {"n": 0}, {"image": rgb(H, W, 1), "alpha": a8, "trimap": tri}),
        ("v-000001", {"n": 1}, {"image": rgb(H, W, 2), "alpha": a16}),
    ]
    index = shards.write_shard_set(tmp_path / "v", "v", samples, samples_per_shard=1)
    assert index["count"] == 2 and len(index["shards"]) == 2
    out = shards.load_samples(tmp_path / "v")
    assert [s["key"] for s in out] == ["v-000000", "v-000001"]
    assert out[0]["meta"] == {"n": 0, "key": "v-000000"}
    assert np.array_equal(out[0]["image"], rgb(H, W, 1)) and out[0]["image"].dtype == np.uint8
    assert out[0]["alpha"].dtype == np.float32
    assert np.array_equal(out[0]["alpha"], a8.astype(np.float32) / np.float32(255))
    assert np.array_equal(out[1]["alpha"], a16.astype(np.float32) / np.float32(65535))
    assert np.array_equal(out[0]["trimap"], tri)
    # the stored integers come back exactly
    raw = next(shards.iter_encoded_samples(tmp_path / "v", keys=["v-000001"]))
    assert np.array_equal(shards.decode_png(raw["members"]["alpha"][1]), a16)


def test_decode_member_mask_and_float_alpha():
    m = disc_mask(H, W)
    ext, data = shards.encode_member("mask", m)
    assert np.array_equal(shards.decode_png(data), m * 255)
    assert np.array_equal(shards.decode_member("mask", ext, data), m.astype(np.float32))
    f = np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W)
    ext, data = shards.encode_member("alpha", f)
    assert shards.decode_png(data).dtype == np.uint16
    assert np.abs(shards.decode_member("alpha", ext, data) - f).max() <= 0.5 / 65535 + 1e-7
    with pytest.raises(TypeError):
        shards.encode_member("image", rgb(H, W).astype(np.float32))
    with pytest.raises(ValueError):
        shards.encode_member("mask", np.array([[0, 3]], np.uint8))
    with pytest.raises(ShardError):
        shards.decode_member("unknown_role", "png", data)


def test_nested_subsets_and_too_large(tmp_path):
    keys = [k for k, _, _ in _samples(200)]
    order = shards.seeded_order(keys, seed=0, set_name="seg")
    assert sorted(order) == keys and order != keys
    assert shards.seeded_order(keys, 0, "seg") == order  # deterministic
    assert shards.seeded_order(keys, 0, "matte") != order  # per-set permutation
    samples = [(k, {}, {"mask": np.zeros((2, 2), np.uint8)}) for k in keys]
    shards.write_shard_set(tmp_path / "seg", "seg", samples, samples_per_shard=64, order=order)
    s50, s200 = shards.subset_keys(tmp_path / "seg", 50), shards.subset_keys(tmp_path / "seg", 200)
    assert s50 == order[:50] and set(s50) < set(s200) and len(s200) == 200
    with pytest.raises(ValueError, match="has only 200"):
        shards.subset_keys(tmp_path / "seg", 201)
    got = shards.load_samples(tmp_path / "seg", n=50)
    assert {s["key"] for s in got} == set(s50)
    assert shards.load_samples(tmp_path / "seg", n=0) == []


def test_tars_are_reproducible_and_webdataset_readable(tmp_path):
    a = shards.write_shard_set(tmp_path / "a" / "seg", "seg", _samples(5), samples_per_shard=2)
    b = shards.write_shard_set(tmp_path / "b" / "seg", "seg", _samples(5), samples_per_shard=2)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert a["keys"] == a["order"] and a["shard_of"]["seg-000004"] == "seg-000002.tar"
    import webdataset as wds

    urls = [str(tmp_path / "a" / "seg" / s["name"]) for s in a["shards"]]
    got = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [g["__key__"] for g in got] == a["keys"]
    assert set(got[0]) >= {"json", "image.png", "mask.png"}
    assert json.loads(got[0]["json"])["key"] == "seg-000000"


def test_sha256_mismatch_is_caught(tmp_path):
    shards.write_shard_set(tmp_path / "seg", "seg", _samples(4), samples_per_shard=2)
    shard = tmp_path / "seg" / "seg-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardIntegrityError, match="seg-000001.tar: sha256 mismatch"):
        list(shards.iter_samples(tmp_path / "seg"))
    with pytest.raises(ShardIntegrityError):
        shards.verify_set(tmp_path / "seg")
    # the intact shard is still readable on its own
    assert [s["key"] for s in shards.iter_samples(tmp_path / "seg", keys=["seg-000000"])] == ["seg-000000"]


def _crafted_set(tmp_path, members: list[tuple[str, bytes]], symlink: str | None = None):
    """A one-shard set whose tar holds exactly ``members`` (index consistent, sha256 right)."""
    d = tmp_path / "evil"
    d.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tf.addfile(info)
    blob = buf.getvalue()
    (d / "evil-000000.tar").write_bytes(blob)
    index = {
        "set": "evil", "count": 1, "samples_per_shard": 1, "subset_seed": 0,
        "shards": [{"name": "evil-000000.tar", "sha256": hashlib.sha256(blob).hexdigest(), "count": 1}],
        "keys": ["k-000000"], "shard_of": {"k-000000": "evil-000000.tar"}, "order": ["k-000000"],
    }
    (d / "index.json").write_text(json.dumps(index))
    return d


@pytest.mark.parametrize(
    "name, why",
    [
        ("../k-000000.image.png", "parent reference"),
        ("/abs/k-000000.image.png", "absolute path"),
        ("/k-000000.image.png", "absolute path"),
        ("sub/k-000000.image.png", "directories"),
        ("k-000000.image.png.exe", "not <key>"),
        ("k-000000.payload.sh", "unexpected role"),
        ("other-000001.image.png", "key not in this shard"),
    ],
)
def test_unsafe_member_names_are_refused(tmp_path, name, why):
    meta = ("k-000000.json", b"{}")
    d = _crafted_set(tmp_path, [meta, (name, shards.encode_png(rgb(2, 2)))])
    with pytest.raises(UnsafeMemberError, match=f"evil-000000.tar: refused member .*{why}"):
        list(shards.iter_samples(d))


def test_symlink_member_is_refused(tmp_path):
    d = _crafted_set(tmp_path, [("k-000000.json", b"{}")], symlink="k-000000.image.png")
    with pytest.raises(UnsafeMemberError, match="not a regular file"):
        list(shards.iter_samples(d))


def test_exception_mid_write_leaves_nothing(tmp_path):
    def exploding():
        yield from _samples(3)
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        shards.write_shard_set(tmp_path / "seg", "seg", exploding(), samples_per_shard=1)
    assert list(tmp_path.iterdir()) == []
    # an existing set survives a failed rewrite untouched
    index = shards.write_shard_set(tmp_path / "seg", "seg", _samples(2), samples_per_shard=1)
    with pytest.raises(RuntimeError):
        shards.write_shard_set(tmp_path / "seg", "seg", exploding(), samples_per_shard=1)
    assert shards.read_index(tmp_path / "seg") == index
    assert [p.name for p in tmp_path.iterdir()] == ["seg"]


def test_writer_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="duplicate"):
        shards.write_shard_set(tmp_path / "s", "s", [("a", {}, {}), ("a", {}, {})], 4)
    with pytest.raises(ValueError, match="must match"):
        shards.write_shard_set(tmp_path / "s", "s", [("a.b", {}, {})], 4)
    with pytest.raises(ValueError, match="permutation"):
        shards.write_shard_set(tmp_path / "s", "s", [("a", {}, {})], 4, order=["b"])
    assert not (tmp_path / "s").exists()


def test_missing_index_and_unknown_keys(tmp_path):
    with pytest.raises(ShardError, match="not found"):
        shards.read_index(tmp_path)
    shards.write_shard_set(tmp_path / "seg", "seg", _samples(2), samples_per_shard=4)
    with pytest.raises(ShardError, match="unknown key"):
        list(shards.iter_samples(tmp_path / "seg", keys=["nope"]))


def test_parallel_map_keeps_order():
    items = list(range(40))
    assert list(shards.parallel_map(abs, items, workers=2, progress=False)) == items
