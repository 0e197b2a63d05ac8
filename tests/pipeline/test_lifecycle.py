"""Issue 16 item 5: what a stage starts dies with it, and a stage dies with its dvc.

Real processes and real signals: the ingest stage's pool, a local Ray started by a process
that installed the reaper, and a stage run by a real ``dvc repro`` whose dvc is SIGKILLed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from matting_pipeline import lifecycle
from tests.e2e.tiny import REPO, pipeline_env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl are Linux")


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _survivors(tree: dict[int, int]) -> list[str]:
    return [f"{pid} {' '.join(lifecycle._cmdline(pid))[:120]}" for pid, start in tree.items()
            if lifecycle.alive(pid, start)]


def _kill_and_expect_none_left(proc: subprocess.Popen, tree: dict[int, int], what: str) -> None:
    """SIGKILL ``proc``; within 10 s no process of ``tree`` may be left."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while _survivors(tree) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _survivors(tree), f"{what} still running 10 s after the kill: {_survivors(tree)}"


@contextlib.contextmanager
def _reaped(proc: subprocess.Popen):
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _params(tmp_path: Path, seg: int = 240) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["synthetic"]["seg"] = seg
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_descendants_and_identity_follow_the_process_tree():
    child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); time.sleep(30)"])
    try:
        tree = _wait_for(lambda: len(lifecycle.descendants(child.pid)) == 1 and lifecycle.descendants(child.pid),
                         20, "the grandchild")
        assert child.pid in lifecycle.descendants(os.getpid())
        pid, start = lifecycle._parse_identity(lifecycle.identity(child.pid))
        assert pid == child.pid and lifecycle.alive(pid, start) and not lifecycle.alive(pid, start + 1)
    finally:
        child.kill()
        child.wait()
        for pid in tree:
            os.kill(pid, signal.SIGKILL)


def test_a_killed_ingest_leaves_no_pool_worker(tmp_path):
    """Before: `kill -9` of ingest left its 2 pool workers blocked forever."""
    params = _params(tmp_path, seg=3000)
    proc = subprocess.Popen([sys.executable, "-m", "stages.ingest", "--params", str(params), "--data-root",
                             str(tmp_path / "data"), "--workers", "2", "--no-progress"],
                            cwd=tmp_path, env=pipeline_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with _reaped(proc):
        def pool():
            tree = lifecycle.descendants(proc.pid)
            workers = [p for p in tree if "stages.ingest" in " ".join(lifecycle._cmdline(p))]
            return tree if len(workers) >= 2 else None

        _kill_and_expect_none_left(proc, _wait_for(pool, 120, "ingest's pool workers"), "ingest's processes")


_RAY_DRIVER = """
import os, sys, time
from matting_pipeline import lifecycle
lifecycle.install("ray-driver")
import ray
ray.init(num_cpus=1, include_dashboard=False)
ray.get(ray.remote(lambda: 1).remote())
print("ready", flush=True)
time.sleep(600)
"""


def test_a_killed_ray_driver_leaves_no_ray_process(tmp_path):
    """Before: the dashboard and runtime-env agents of a local Ray outlived a killed
    pseudolabel stage by about a minute (Ray's own fate sharing stops GCS and raylet)."""
    env = pipeline_env(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", _RAY_DRIVER], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    with _reaped(proc):
        assert proc.stdout.readline().strip() == "ready"
        tree = _wait_for(lambda: (t := lifecycle.descendants(proc.pid)) and any(
            "Agent" in " ".join(lifecycle._cmdline(p)) for p in t) and t, 60, "Ray's agents")
        _kill_and_expect_none_left(proc, tree, "Ray's processes")


def test_a_stage_dies_with_its_killed_dvc(tmp_path):
    """Before: `kill -9` of dvc left the stage running alone; the next `dvc repro` ran the
    same stage beside it."""
    root = tmp_path / "project"
    root.mkdir()
    params = _params(root, seg=6000)
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"ingest": {
        "cmd": f"python -m stages.ingest --params {params.name} --data-root data --workers 1 --no-progress",
        "outs": ["data/ingest"]}}}))
    env = {**pipeline_env(root), "PYTHONPATH": str(REPO)}
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    dvc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=root, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with _reaped(dvc):
        def stage():
            for pid in lifecycle.descendants(dvc.pid):
                if "stages.ingest" in " ".join(lifecycle._cmdline(pid)):
                    return pid
            return None

        stage_pid = _wait_for(stage, 120, "dvc to start the ingest stage")
        time.sleep(1.0)  # the stage has started its reaper
        _kill_and_expect_none_left(dvc, lifecycle.descendants(dvc.pid), f"the stage (pid {stage_pid})")
