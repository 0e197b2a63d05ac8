"""MLflow conventions against a real sqlite store in a temp dir."""

import mlflow
import pytest

from matting_pipeline import tracking


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    yield
    mlflow.set_tracking_uri(None)


def test_cell_parent_run_is_created_once(store):
    first = tracking.get_or_create_cell_run("exp", 60, 8, "unet_r18x0.5")
    again = tracking.get_or_create_cell_run("exp", 60, 8, "unet_r18x0.5")
    other = tracking.get_or_create_cell_run("exp", 60, 32, "unet_r18x0.5")
    assert first == again != other
    runs = mlflow.search_runs(experiment_names=["exp"], filter_string="tags.run_kind = 'cell'")
    assert len(runs) == 2
    row = runs[runs["run_id"] == first].iloc[0]
    assert row["params.seg_count"] == "60" and row["params.mat_count"] == "8"
    assert row["tags.mlflow.runName"] == "cell-seg60-mat8"


def test_flatten_params():
    flat = tracking.flatten_params({"a": {"b": 1, "c": [0.5, 2]}, "d": "x"})
    assert flat == {"a.b": "1", "a.c": "0.5,2", "d": "x"}


def test_cell_name():
    assert tracking.cell_name(2000, 50) == "seg2000-mat50"


def test_an_unreachable_tracking_server_fails_a_stage_in_seconds(tmp_path):
    """A real stage process against a closed port: one line naming the URI and the fix, fast."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, MLFLOW_TRACKING_URI="http://127.0.0.1:9", PYTHONPATH=str(repo))
    for cmd in (["stages.pretrain", "--seg", "12"], ["stages.evaluate", "--seg", "12", "--mat", "0"]):
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", *cmd, "--params", str(repo / "params.yaml"),
                               "--data-root", str(tmp_path / "data")],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - start
        assert proc.returncode == 2, proc.stderr
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1 and "http://127.0.0.1:9 is unreachable" in err[0] and "MLFLOW_TRACKING_URI" in err[0]
        assert "Traceback" not in proc.stderr and took < 60, took
    assert not (tmp_path / "models").exists()  # nothing started


def test_reachability_check_skips_local_stores():
    from matting_pipeline import tracking

    tracking.check_reachable("sqlite:///x.db")
    tracking.check_reachable("file:///tmp/mlruns")


_RACER = """
import sys, time
from matting_pipeline import tracking
time.sleep(max(0.0, float(sys.argv[1]) - time.time()))  # every racer starts at the same instant
print(tracking.get_or_create_cell_run("race", 12, 4, "unet_r18x0.5"))
"""


def test_processes_creating_a_fresh_store_at_once_agree_on_one_cell_run(tmp_path):
    """Issue 16 item 6: two `flows.repro` at once on a fresh clone -- one died with an alembic
    traceback while both created mlflow.db. Four processes now race to create the store,
    the experiment and the same cell run: all succeed and there is one cell run."""
    import os
    import subprocess
    import sys
    import time

    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    start = time.time() + 8.0  # after every interpreter has imported mlflow
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(start)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    outs = [p.communicate(timeout=180) for p in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-2000:]
    assert len({out.strip() for out, _ in outs}) == 1
    mlflow.set_tracking_uri(uri)
    try:
        runs = mlflow.search_runs(experiment_names=["race"], filter_string="tags.run_kind = 'cell'")
        assert len(runs) == 1
    finally:
        mlflow.set_tracking_uri(None)
