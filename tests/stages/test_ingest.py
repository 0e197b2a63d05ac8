"""Stages ingest + shard on real messy folders: every file accepted or quarantined with a reason."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from matting_pipeline import shards
from stages import ingest, shard
from matting_pipeline.cli import main as matting
from matting_pipeline.manifest import read_manifest
from matting_pipeline.config import parse_params

from tests.images import disc_mask, folders_params


def _run_ingest(tmp_path, messy, workers=1):
    params = parse_params(folders_params(messy))
    reports = ingest.ingest(params.data, tmp_path / "data", workers=workers, progress=False)
    out = tmp_path / "data" / "ingest"
    manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    quarantine = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    return reports, manifest, quarantine


def test_every_file_is_accepted_or_quarantined_with_its_reason(tmp_path, messy):
    reports, manifest, quarantine = _run_ingest(tmp_path, messy)
    # counts per set
    counts = {name: r.accepted for name, r in reports.items()}
    assert counts == messy["accepted"]
    for name, r in reports.items():
        assert r.quarantined == sum(q["set"] == name for q in quarantine)
    # every bad file, with the expected reason
    reasons = {q["path"]: q["reason"] for q in quarantine}
    assert set(reasons) == set(messy["bad"]), set(reasons) ^ set(messy["bad"])
    for path, word in messy["bad"].items():
        assert word in reasons[path], (path, reasons[path])
    # nothing dropped: every file under the raw folders is in the manifest or the quarantine
    everything = {str(p) for p in Path(messy["matte_dir"]).parent.rglob("*") if p.is_file()}
    in_manifest = {p for e in manifest for p in e["paths"].values()}
    assert everything == in_manifest | set(reasons)
    assert not in_manifest & set(reasons)
    # conversions recorded
    by_stem = {(e["set"], e["stem"]): e for e in manifest}
    for (set_name, stem), expected in messy["conversions"].items():
        conv = by_stem[(set_name, stem)]["conversions"]
        for fragment in expected:
            assert any(fragment in c for c in conv), (stem, fragment, conv)
    # clean files record nothing
    assert by_stem[("seg", "s0")]["conversions"] == []
    assert by_stem[("matte", "person 1")]["conversions"] == []


def test_manifest_entries_follow_formats_md(tmp_path, messy):
    _, manifest, quarantine = _run_ingest(tmp_path, messy)
    for e in manifest:
        assert list(e) == ["set", "stem", "key", "paths", "sha256", "width", "height", "conversions"]
        assert e["key"].isascii() and e["key"].startswith(e["set"] + "-") and len(e["key"].rsplit("-", 1)[1]) == 6
        assert set(e["sha256"]) == set(e["paths"])
    for q in quarantine:
        assert list(q) == ["set", "path", "reason"]
    keys = {e["set"]: [] for e in manifest}
    for e in manifest:
        keys[e["set"]].append(e["key"])
    assert keys["seg"] == [f"seg-{i:06d}" for i in range(8)]
    stems = {e["stem"] for e in manifest}
    assert "ünï côdé" in stems and "sub/gray bg" in stems
    exif = next(e for e in manifest if e["stem"] == "exif")
    assert (exif["width"], exif["height"]) == (32, 24)  # displayed orientation
    cut = next(e for e in manifest if e["stem"] == "cutout")
    assert cut["paths"]["fg"] == cut["paths"]["alpha"] and cut["paths"]["fg"].endswith("rgba/cutout.png")


def test_parallel_ingest_gives_the_same_manifest(tmp_path, messy):
    _, m1, q1 = _run_ingest(tmp_path / "one", messy, workers=1)
    _, m2, q2 = _run_ingest(tmp_path / "two", messy, workers=2)
    assert m1 == m2 and q1 == q2


@pytest.mark.parametrize("key", ["seg_dir", "background_dir", "matte_dir"])
def test_missing_or_empty_folder_names_the_key(tmp_path, messy, key):
    params = folders_params(messy)
    params["data"][key] = str(tmp_path / "does not exist")
    with pytest.raises(ingest.IngestError, match=f"data.{key}: .* does not exist"):
        ingest.ingest(parse_params(params).data, tmp_path / "data", workers=1, progress=False)
    empty = tmp_path / "empty"
    for sub in ("image", "mask", "fg", "alpha"):
        (empty / sub).mkdir(parents=True, exist_ok=True)
    params["data"][key] = str(empty)
    with pytest.raises(ingest.IngestError, match=f"data.{key}: .*empty"):
        ingest.ingest(parse_params(params).data, tmp_path / "data", workers=1, progress=False)


def test_wrong_layout_and_missing_val_dir_name_the_key(tmp_path, messy):
    params = folders_params(messy)
    params["data"]["seg_dir"] = messy["background_dir"]  # no image/ + mask/
    with pytest.raises(ingest.IngestError, match="data.seg_dir: .*image/ \\+ mask/"):
        ingest.ingest(parse_params(params).data, tmp_path / "data", workers=1, progress=False)
    params = folders_params(messy)
    params["data"]["val"] = {"p3m": str(tmp_path / "nope")}
    with pytest.raises(ingest.IngestError, match="data.val.p3m"):
        ingest.ingest(parse_params(params).data, tmp_path / "data", workers=1, progress=False)


def test_cli_prints_summary_and_shards_round_trip(tmp_path, messy, capsys):
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(folders_params(messy), allow_unicode=True))
    data_root = tmp_path / "data"
    args = ["--params", str(params_path), "--data-root", str(data_root), "--no-progress", "--workers", "1"]
    assert matting(["ingest", *args]) == 0
    table = capsys.readouterr().out
    header = table.splitlines()[0].split()
    assert header == ["set", "files", "used", "quarantined", "samples", "converted", "conversions"]
    seg_row = next(line for line in table.splitlines() if line.startswith("seg "))
    # 21 files: 8 pairs (16 files used), 5 quarantined (2 orphans, 1 bad pair, 1 stray): one unit per column
    assert seg_row.split()[1:5] == ["21", "16", "5", "8"]
    for row in table.splitlines()[1:5]:
        files, used, quarantined = map(int, row.split()[1:4])
        assert files == used + quarantined, row

    assert matting(["shard", *args]) == 0
    manifest = read_manifest(data_root)
    for set_name in ("matte", "background", "seg", "val-ext"):
        index = shards.read_index(data_root / "shards" / set_name)
        assert index["keys"] == index["order"]
        assert sorted(index["keys"]) == sorted(e["key"] for e in manifest if e["set"] == set_name)
    by_stem = {e["stem"]: e for e in manifest}
    samples = {s["meta"]["stem"]: s for s in shards.iter_samples(data_root / "shards" / "matte")}
    # 16-bit alpha stays bit-exact through ingest and shard
    from matting_pipeline.imageio import read_alpha

    a16, _ = read_alpha(by_stem["ünï côdé"]["paths"]["alpha"])
    assert a16.dtype == np.uint16
    assert np.array_equal(samples["ünï côdé"]["alpha"], a16.astype(np.float32) / np.float32(65535))
    assert samples["ünï côdé"]["meta"]["conversions"] == []
    # an unconverted source PNG is stored byte for byte; the JPEG fg is re-encoded as PNG
    raw = next(r for r in shards.iter_encoded_samples(data_root / "shards" / "matte") if r["meta"]["stem"] == "ünï côdé")
    assert raw["members"]["alpha"] == ("png", Path(by_stem["ünï côdé"]["paths"]["alpha"]).read_bytes())
    assert raw["members"]["fg"][1].startswith(b"\x89PNG")
    seg = {s["meta"]["stem"]: s for s in shards.iter_samples(data_root / "shards" / "seg")}
    assert np.array_equal(seg["s1"]["mask"], disc_mask(24, 32).astype(np.float32))  # 0/1 file
    assert np.array_equal(seg["exif raw"]["mask"], disc_mask(24, 32).astype(np.float32))  # re-oriented
    assert seg["big"]["mask"].shape == seg["big"]["image"].shape[:2] == (48, 64)
    val = next(iter(shards.iter_samples(data_root / "shards" / "val-ext")))
    assert set(val) == {"key", "meta", "image", "alpha", "trimap"}
    # second run: up to date, nothing rewritten
    before = {p: p.stat().st_mtime_ns for p in (data_root / "shards").rglob("*.tar")}
    assert matting(["shard", *args]) == 0
    assert "up to date" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in (data_root / "shards").rglob("*.tar")}


def test_shard_refuses_a_file_changed_since_ingest(tmp_path, messy):
    _run_ingest(tmp_path, messy)
    manifest = read_manifest(tmp_path / "data")
    victim = next(e for e in manifest if e["set"] == "seg")["paths"]["mask"]
    os.utime(victim)
    with open(victim, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ingest.IngestError, match="changed since ingest"):
        shard.shard_all(parse_params({}).shard, tmp_path / "data", workers=1, progress=False)
    assert not (tmp_path / "data" / "shards" / "seg").exists()


def test_no_accepted_sample_is_an_error_after_writing_the_quarantine(tmp_path):
    bg = tmp_path / "bg"
    bg.mkdir()
    (bg / "a.txt").write_text("x")
    from tests.images import messy_tree

    tree = messy_tree(tmp_path / "raw")
    params = folders_params(tree)
    params["data"]["background_dir"] = str(bg)
    with pytest.raises(ingest.IngestError, match="data.background_dir .*none accepted"):
        ingest.ingest(parse_params(params).data, tmp_path / "data", workers=1, progress=False)
    q = (tmp_path / "data" / "ingest" / "quarantine.jsonl").read_text()
    assert "a.txt" in q


def test_shard_names_a_budget_the_data_cannot_supply(tmp_path, messy, capsys):
    params = folders_params(messy, study={"seg": [4, 1000], "mat": [1]})
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params, allow_unicode=True))
    args = ["--params", str(params_path), "--data-root", str(tmp_path / "data"), "--no-progress", "--workers", "1"]
    assert matting(["ingest", *args]) == 0
    capsys.readouterr()
    assert matting(["shard", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"matting shard: error: study.seg budget 1000 needs 1000 segmentation samples but "
                   f"data/shards/seg holds 8; lower the budget in {params_path} or add data"]
    params["study"]["mat"] = [1, 4]  # 5 mattes, 2 held out for validation: 3 to train on
    params_path.write_text(yaml.safe_dump(params, allow_unicode=True))
    assert matting(["shard", *args]) == 1
    err = capsys.readouterr().err
    assert "study.mat budget 4 needs 4 training mattes but data/shards/matte holds 5 (2 held out" in err
