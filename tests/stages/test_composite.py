"""Stage composite (and the synthetic default end to end): correctness, hold-outs, determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from matting_pipeline import shards
from stages import composite
from matting_pipeline.cli import main as matting
from matting_pipeline.manifest import read_manifest
from matting_pipeline.config import parse_params

from tests.images import folders_params

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "data": {"synthetic": {"image_size": 32, "matte": 10, "background": 8, "seg": 12, "val_natural": 3}},
    "shard": {"samples_per_shard": 4},
    "study": {"seg": [12], "mat": [4]},
    "composite": {
        "backgrounds_per_fg": 2,
        "two_instance_ratio": 0.5,
        "val_foregrounds": 3,
        "val_backgrounds": 2,
        "val_backgrounds_per_fg": 2,
    },
}


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    """The tiny synthetic default run through ingest -> shard -> composite.

    Run from the folder holding params.yaml with the defaults (``--params params.yaml``,
    ``--data-root data``): ingest as ``python -m stages.ingest``, the rest through ``matting``.
    """
    root = tmp_path_factory.mktemp("synthetic")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "stages.ingest", "--no-progress"], cwd=root, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "val-natural" in proc.stdout
    # manifest paths are relative to the working directory the stages run in (the repo root
    # under DVC), so the later stages run from the same folder
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert matting(["shard", "--no-progress"]) == 0
        assert matting(["composite", "--no-progress"]) == 0
    finally:
        os.chdir(cwd)
    return root / "data"


def _check_composition(samples: list[dict]) -> None:
    for s in samples:
        a = s["alpha"].astype(np.float64)[..., None]
        expected = a * s["fg"] / 255.0 + (1 - a) * s["bg"] / 255.0
        err = np.abs(s["image"] / 255.0 - expected).max()
        assert err <= 0.5 / 255 + 1e-6, (s["key"], err * 255)


def test_synthetic_default_end_to_end(synthetic_root):
    data = synthetic_root
    syn = data / "ingest" / "synthetic"
    assert len(list((syn / "matte" / "fg").iterdir())) == 10
    assert len(list((syn / "val" / "natural" / "alpha").iterdir())) == 3
    counts = {s: shards.read_index(data / "shards" / s)["count"] for s in ("matte", "background", "seg", "val-natural")}
    assert counts == {"matte": 10, "background": 8, "seg": 12, "val-natural": 3}
    assert (data / "ingest" / "quarantine.jsonl").read_text() == ""
    seg = shards.load_samples(data / "shards" / "seg", n=5)
    assert seg[0]["image"].shape == (32, 32, 3) and set(np.unique(seg[0]["mask"])) <= {0.0, 1.0}
    train, val = shards.read_index(data / "composite" / "train"), shards.read_index(data / "composite" / "val-composited")
    assert train["count"] == (10 - 3) * 2 + round(0.5 * 14)
    assert val["count"] == 3 * 2


def test_composites_are_exact_up_to_8bit_rounding(synthetic_root):
    train = shards.load_samples(synthetic_root / "composite" / "train")
    val = shards.load_samples(synthetic_root / "composite" / "val-composited")
    _check_composition(train + val)
    matte = {s["key"]: s for s in shards.load_samples(synthetic_root / "shards" / "matte")}
    for s in train + val:
        meta, target = s["meta"], matte[s["meta"]["fg_keys"][0]]
        assert np.array_equal(s["fg"], target["fg"])
        if not meta["two_instance"] or meta["target"] == "front":
            assert np.array_equal(s["alpha"], target["alpha"])  # bit-exact
        else:
            assert (s["alpha"] <= target["alpha"] + 1e-6).all()


def test_two_instance_visible_alpha(synthetic_root):
    """Re-draw one two-instance sample's randomness and check its layered alpha."""
    from matting_core.compositing import fit_background

    cfg = parse_params(TINY).composite
    matte_idx = shards.read_index(synthetic_root / "shards" / "matte")
    bg_idx = shards.read_index(synthetic_root / "shards" / "background")
    jobs = composite.plan(matte_idx["order"], bg_idx["order"], cfg)["train"]
    twos = [j for j in jobs if j["kind"] == "two"]
    assert twos and all(j["fg_keys"][0] != j["fg_keys"][1] for j in twos)
    matte = {s["key"]: s for s in shards.load_samples(synthetic_root / "shards" / "matte")}
    bgs = {s["key"]: s for s in shards.load_samples(synthetic_root / "shards" / "background")}
    stored = {s["key"]: s for s in shards.iter_samples(synthetic_root / "composite" / "train", keys=[j["key"] for j in twos])}
    for job in twos:
        s, t, p = stored[job["key"]], matte[job["fg_keys"][0]], matte[job["fg_keys"][1]]
        assert s["meta"]["two_instance"] and s["meta"]["fg_keys"] == job["fg_keys"]
        rng = np.random.default_rng(job["seed"])
        fit_background(bgs[job["bg_key"]]["image"], t["alpha"].shape, rng, cfg.background_scale)
        _, p_alpha = composite.place_instance(p["fg"], p["alpha"], t["alpha"].shape, rng, cfg.two_instance_scale)
        a_t = t["alpha"].astype(np.float64)
        visible = a_t if s["meta"]["target"] == "front" else a_t * (1 - p_alpha)
        assert np.abs(s["alpha"] - visible).max() <= 0.5 / 65535 + 1e-6


def test_hold_outs_and_nested_partners(synthetic_root):
    matte_order = shards.read_index(synthetic_root / "shards" / "matte")["order"]
    bg_order = shards.read_index(synthetic_root / "shards" / "background")["order"]
    train = [s["meta"] for s in shards.iter_samples(synthetic_root / "composite" / "train", roles=())]
    val = [s["meta"] for s in shards.iter_samples(synthetic_root / "composite" / "val-composited", roles=())]
    held_fg, held_bg = set(matte_order[-3:]), set(bg_order[-2:])
    assert {m["fg_keys"][0] for m in val} == held_fg
    assert {m["bg_key"] for m in val} <= held_bg
    assert not held_fg & {k for m in train for k in m["fg_keys"]}
    assert not held_bg & {m["bg_key"] for m in train}
    rank = {k: i for i, k in enumerate(matte_order)}
    for m in train:
        assert m["target"] in (("front", "back") if m["two_instance"] else ("single",))
        if m["two_instance"]:
            assert rank[m["fg_keys"][1]] < rank[m["fg_keys"][0]]  # partner inside every subset holding the target
    # the teacher's selection for a budget M: composites whose target fg is in subset_keys(matte, M)
    subset = set(shards.subset_keys(synthetic_root / "shards" / "matte", 4))
    chosen = [m for m in train if m["fg_keys"][0] in subset]
    assert chosen and all(set(m["fg_keys"]) <= subset for m in chosen)


def test_composite_is_deterministic_and_resumable(synthetic_root, tmp_path, capsys):
    cfg = parse_params(TINY).composite
    before = shards.read_index(synthetic_root / "composite" / "train")
    # same inputs -> up to date, not rewritten
    composite.composite_all(cfg, synthetic_root, samples_per_shard=4, workers=1, progress=False)
    assert "up to date" in capsys.readouterr().out
    # a forced rebuild (here with 2 processes) gives the same bytes
    composite.composite_all(cfg, synthetic_root, samples_per_shard=4, workers=2, progress=False, force=True)
    after = shards.read_index(synthetic_root / "composite" / "train")
    assert [s["sha256"] for s in after["shards"]] == [s["sha256"] for s in before["shards"]]


def test_plan_errors_name_the_key():
    cfg = parse_params({"composite": {"val_foregrounds": 5}}).composite
    with pytest.raises(composite.CompositeError, match="composite.val_foregrounds"):
        composite.plan([f"m{i}" for i in range(5)], ["b0", "b1"], cfg)
    cfg = parse_params({"composite": {"val_foregrounds": 1, "val_backgrounds": 2}}).composite
    with pytest.raises(composite.CompositeError, match="composite.val_backgrounds"):
        composite.plan(["m0", "m1"], ["b0", "b1"], cfg)
    cfg = parse_params({"composite": {"val_composited": False, "two_instance_ratio": 1.0}}).composite
    jobs = composite.plan(["m0", "m1", "m2"], ["b0"], cfg)
    assert jobs["val-composited"] == [] and len(jobs["train"]) == 3 * 4 * 2


def test_place_instance_fits_any_partner_size():
    rng = np.random.default_rng(0)
    fg = np.full((90, 40, 3), 200, np.uint8)
    alpha = np.ones((90, 40))
    out_fg, out_a = composite.place_instance(fg, alpha, (30, 50), rng, (0.6, 1.0))
    assert out_fg.shape == (30, 50, 3) and out_a.shape == (30, 50)
    assert 0 < out_a.sum() and out_a.max() <= 1.0 and (out_fg[out_a == 0] == 0).all()


def test_real_folders_with_rgba_cutouts(tmp_path, messy):
    """`source: folders` on the messy tree, through to composites (RGBA cutout included)."""
    params = folders_params(
        messy,
        composite={"backgrounds_per_fg": 2, "val_foregrounds": 1, "val_backgrounds": 1, "val_backgrounds_per_fg": 1},
    )
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params, allow_unicode=True))
    args = ["--params", str(params_path), "--data-root", str(tmp_path / "data"), "--no-progress", "--workers", "1"]
    for stage in ("ingest", "shard", "composite"):
        assert matting([stage, *args]) == 0, stage
    train = shards.load_samples(tmp_path / "data" / "composite" / "train")
    val = shards.load_samples(tmp_path / "data" / "composite" / "val-composited")
    assert len(train) == 4 * 2 + round(0.2 * 8) and len(val) == 1
    _check_composition(train + val)
    stems = {s["meta"]["stem"]: s["key"] for s in shards.iter_samples(tmp_path / "data" / "shards" / "matte", roles=())}
    used = {k for s in train + val for k in s["meta"]["fg_keys"]}
    assert used == set(stems.values())  # every foreground, the RGBA cutout included, is composited
    quarantine = [json.loads(x) for x in (tmp_path / "data" / "ingest" / "quarantine.jsonl").read_text().splitlines()]
    assert len(quarantine) == len(messy["bad"])
    assert read_manifest(tmp_path / "data")
