"""flows.repro: the DVC pipeline N stage instances at a time, on the toy project (real git,
DVC, MLflow sqlite store; the toy commands log when they start and end)."""

import io
import subprocess
import sys

import mlflow
import pytest
import yaml

from flows.repro import ReproError, main, run_pipeline
from flows.toy import make_toy_project, max_overlap, read_timeline

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:dvc")

ALL = [
    "ingest", "pretrain@1", "pretrain@2", "teacher_scratch@3", "teacher_scratch@4",
    "teacher@1-3", "teacher@1-4", "teacher@2-3", "teacher@2-4", "report",
]


def _dvc(root, *args):
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True, check=True)


@pytest.fixture()
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_runs_everything_two_at_a_time_and_dvc_agrees(tmp_path, store):
    root = make_toy_project(tmp_path / "toy", sleep=1.5)
    out = io.StringIO()
    results = run_pipeline(root, jobs=2, threads=3, out=out)
    assert [r.stage for r in results] == ALL
    assert {r.outcome for r in results} == {"ran"}
    events = read_timeline(root)
    assert max_overlap(events) == 2  # the 4 teachers are independent: two ran side by side
    assert {e["threads"] for e in events} == {"3"}
    # Parents ended before their children started.
    start = {e["stage"]: e["t"] for e in events if e["event"] == "start"}
    end = {e["stage"]: e["t"] for e in events if e["event"] == "end"}
    assert end["pretrain@2"] <= start["teacher@2-4"] and max(end[s] for s in ALL[:-1]) <= start["report"]
    # dvc.lock records every stage: DVC itself has nothing to do, and a second run skips all.
    assert "up to date" in _dvc(root, "status").stdout
    assert {r.outcome for r in run_pipeline(root, jobs=2, out=io.StringIO())} == {"skipped (up to date)"}
    assert len(read_timeline(root)) == len(events)
    # One MLflow parent run per grid cell, created before the stages (never twice).
    cells = mlflow.search_runs(experiment_names=["toy-study"], filter_string="tags.run_kind = 'cell'")
    assert sorted(cells["tags.cell"]) == sorted(["seg1-mat0", "seg2-mat0", "seg0-mat3", "seg0-mat4",
                                                 "seg1-mat3", "seg1-mat4", "seg2-mat3", "seg2-mat4"])
    text = out.getvalue()
    assert "10 stage instances, 2 at a time, 3 math thread(s) each" in text and "done in" in text
    assert (root / "logs" / "repro" / "teacher@1-3.log").read_text().strip()


def test_one_job_never_overlaps_and_exclusive_groups_run_alone(tmp_path, store):
    root = make_toy_project(tmp_path / "one", sleep=0.2)
    run_pipeline(root, jobs=1, track_cells=False, out=io.StringIO())
    assert max_overlap(read_timeline(root)) == 1
    root = make_toy_project(tmp_path / "excl", sleep=1.5)
    run_pipeline(root, jobs=3, exclusive=("teacher",), track_cells=False, out=io.StringIO())
    events = read_timeline(root)
    assert max_overlap(events) >= 2  # other groups still ran side by side
    assert max_overlap([e for e in events if e["stage"].startswith("teacher@")]) == 1


def test_a_failure_stops_new_work_and_names_the_stage(tmp_path, store, capsys):
    root = make_toy_project(tmp_path / "fail", sleep=0.2, fail_always=("pretrain@1",))
    code = main(["--root", str(root), "--jobs", "1"])
    captured = capsys.readouterr()
    assert code == 1
    assert "FAILED  pretrain@1" in captured.out and "toy failure: pretrain@1 always fails" in captured.out
    assert "full log: " in captured.out and "pretrain@1 failed" in captured.err
    ran = {e["stage"] for e in read_timeline(root) if e["event"] == "start"}
    assert ran == {"ingest", "pretrain@1"}  # nothing new after the failure (jobs=1: nothing beside it)


def test_keep_going_runs_every_branch_that_does_not_depend_on_the_failure(tmp_path, store):
    root = make_toy_project(tmp_path / "keep", sleep=0.2, fail_always=("pretrain@1",))
    results = {r.stage: r for r in run_pipeline(root, jobs=2, keep_going=True, track_cells=False, out=io.StringIO())}
    assert results["pretrain@1"].outcome == "failed"
    for stage in ("teacher@1-3", "teacher@1-4", "report"):
        assert results[stage].outcome == "not run" and "did not complete" in results[stage].reason
    for stage in ("pretrain@2", "teacher_scratch@3", "teacher_scratch@4", "teacher@2-3", "teacher@2-4"):
        assert results[stage].outcome == "ran"
    # After the fix, a new run does only what is left.
    (root / ".toy" / "fail_always").write_text("")
    again = {r.stage: r.outcome for r in run_pipeline(root, jobs=2, track_cells=False, out=io.StringIO())}
    assert again["teacher@2-3"] == "skipped (up to date)"
    assert again["pretrain@1"] == again["teacher@1-3"] == again["report"] == "ran"


def test_clear_errors_before_anything_runs(tmp_path, capsys):
    assert main(["--root", str(tmp_path)]) == 2
    assert "no dvc.yaml here" in capsys.readouterr().err
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {}}))
    with pytest.raises(ReproError, match="--jobs must be >= 1"):
        run_pipeline(tmp_path, jobs=0)


def test_help_explains():
    proc = subprocess.run([sys.executable, "-m", "flows.repro", "--help"], capture_output=True, text=True, check=True)
    assert "several stage instances at a time" in proc.stdout and "--keep-going" in proc.stdout
