"""Atomic outputs: a failure mid-write leaves the old content, never a torn file."""

import json
import os

import pytest

from matting_pipeline import atomic


def test_write_json_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "out.json"
    atomic.write_json(path, {"a": 1})
    atomic.write_json(path, {"b": 2})
    assert json.loads(path.read_text()) == {"b": 2}
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]


def test_atomic_file_failure_keeps_old_content(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_file(path) as fh:
            fh.write(b"new-but-incomplete")
            raise RuntimeError("killed")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    target = tmp_path / "set"
    with pytest.raises(KeyError):
        with atomic.atomic_dir(target) as tmp:
            (tmp / "a.tar").write_bytes(b"x")
            raise KeyError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_existing_and_cleans_stale(tmp_path):
    target = tmp_path / "set"
    target.mkdir()
    (target / "old.tar").write_bytes(b"old")
    stale = tmp_path / ".set.abc.tmp"
    stale.mkdir()
    with atomic.atomic_dir(target) as tmp:
        (tmp / "new.tar").write_bytes(b"new")
    assert [p.name for p in target.iterdir()] == ["new.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_jsonl_round_trip(tmp_path):
    rows = [{"set": "seg", "path": "ü b.png", "reason": "truncated"}, {"k": [1, 2]}]
    path = atomic.write_jsonl(tmp_path / "q.jsonl", rows)
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == rows


def test_code_digest_covers_the_stage_and_the_shared_code(tmp_path):
    """A stage's own up-to-date check hashes what dvc.yaml lists as its code deps."""
    from pathlib import Path

    repo = Path(atomic.__file__).resolve().parents[1]
    stage = repo / "stages" / "shard.py"
    base = atomic.code_digest(stage)
    assert base == atomic.code_digest(stage) and len(base) == 64
    assert atomic.code_digest(repo / "stages" / "composite.py") != base
    copy = tmp_path / "shard.py"
    copy.write_bytes(stage.read_bytes() + b"\n# edited\n")
    # the same name, other content: another digest (the stage file is part of it)
    assert atomic.code_digest(copy) != base


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_atomic_outputs_respect_the_umask(tmp_path, umask, file_mode, dir_mode):
    import stat

    import torch

    from matting_core.checkpoint import save_checkpoint
    from matting_core.models import build_network
    from matting_pipeline import atomic

    old = os.umask(umask)
    try:
        written = atomic.write_bytes(tmp_path / "alpha.png", b"x")
        with atomic.atomic_dir(tmp_path / "reports") as tmp:
            (tmp / "index.html").write_text("ok")
        torch.manual_seed(0)
        ckpt = save_checkpoint(tmp_path / "model.pt", build_network("unet_r18x0.25"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(written.stat().st_mode) == file_mode  # mkstemp alone gives 0600
    assert stat.S_IMODE(ckpt.stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "reports").stat().st_mode) == dir_mode
