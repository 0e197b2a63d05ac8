"""The study flow on a 2 x 2 toy grid against a real Prefect test server, real DVC and MLflow.

The toy project (flows/toy.py) has the study's stage kinds: ingest, pretrain@S,
teacher_scratch@M, teacher@S-M, report; seg [1, 2] x mat [3, 4] (8 cells, 10 stage
instances). ``teacher@1-3`` fails on its first attempt (a retry must fix it) and
``teacher@2-4`` fails on every attempt (its cell fails, ``report`` below it never runs,
every other cell completes). Then the failure is removed and the flow runs again: only what
DVC considers changed runs, and ``dvc repro`` afterwards has nothing to do.
"""

import socket
import subprocess
import sys
import time

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId
from prefect.testing.utilities import prefect_test_harness

from flows.dag import OUTCOME_RAN, OUTCOME_SKIPPED
from flows.study import study
from flows.toy import make_toy_project, max_overlap, read_timeline

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning:dvc")]

LIMIT = 2
DEVICES = ["7", "9"]
STAGES = {  # task run name -> DVC stage instance
    "ingest": "ingest",
    "pretrain seg1-mat0": "pretrain@1",
    "pretrain seg2-mat0": "pretrain@2",
    "teacher_scratch seg0-mat3": "teacher_scratch@3",
    "teacher_scratch seg0-mat4": "teacher_scratch@4",
    "teacher seg1-mat3": "teacher@1-3",
    "teacher seg1-mat4": "teacher@1-4",
    "teacher seg2-mat3": "teacher@2-3",
    "teacher seg2-mat4": "teacher@2-4",
    "report": "report",
}


@pytest.fixture(scope="module")
def harness():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # the test server inherits it
        mp.setenv("DO_NOT_TRACK", "1")
        with prefect_test_harness(server_startup_timeout=240):
            yield


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


@pytest.fixture(scope="module")
def first_run(harness, mlflow_store, tmp_path_factory):
    root = make_toy_project(
        tmp_path_factory.mktemp("study") / "toy",
        sleep=1.0,
        orchestration={"max_concurrency": LIMIT, "retries": 2, "retry_delay_seconds": 0.5, "cuda_devices": DEVICES},
        fail_once=("teacher@1-3",),
        fail_always=("teacher@2-4",),
    )
    state = study(root=str(root), return_state=True)
    return root, state, wait_for_task_runs(state.state_details.flow_run_id, {"teacher seg2-mat4": "Failed"})


def wait_for_task_runs(flow_run_id, expect: dict[str, str], timeout: float = 60.0) -> dict:
    """Task runs of the flow run by name, once the API shows the states the flow reported
    (task states reach the API as events, a moment after the flow returns)."""
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            by_name = {run.name: run for run in runs}
            settled = all(by_name.get(n) and by_name[n].state.name == s for n, s in expect.items())
            if (settled and len(by_name) == len(STAGES)) or time.monotonic() > deadline:
                return by_name
            time.sleep(1)


def test_every_task_ends_in_the_expected_state(first_run):
    _, state, runs = first_run
    assert set(runs) == set(STAGES)
    states = {name: run.state.name for name, run in runs.items()}
    expected = {name: "Completed" for name in STAGES}
    expected.update({"teacher seg2-mat4": "Failed", "report": "NotReady"})
    assert states == expected
    assert state.is_failed()


def test_flow_fails_naming_the_failed_cell_and_why(first_run):
    _, state, _ = first_run
    lines = state.message.splitlines()
    assert lines[0] == "2 of 10 stage instances did not complete:"
    assert lines[1] == (
        "- teacher@2-4 [cell seg2-mat4]: Failed after 3 attempt(s): exit 255: toy failure: teacher@2-4 always fails"
    )
    assert lines[2] == "- report: not run: upstream teacher@2-4 did not complete"


def test_failure_is_retried_with_backoff(first_run):
    root, _, runs = first_run
    assert runs["teacher seg1-mat3"].run_count == 2  # failed once, the retry completed
    assert runs["teacher seg2-mat4"].run_count == 3  # 1 + retries
    assert runs["teacher seg1-mat4"].run_count == 1
    starts = [e for e in read_timeline(root) if e["event"] == "start"]
    assert sum(e["stage"] == "teacher@1-3" for e in starts) == 2
    assert sum(e["stage"] == "teacher@2-4" for e in starts) == 3
    assert not any(e["stage"] == "report" for e in starts)  # below the failure: never ran


def test_concurrency_stays_within_the_limit_and_uses_it(first_run):
    root, _, _ = first_run
    events = read_timeline(root)
    assert max_overlap(events) == LIMIT  # independent cells did run side by side, never more
    # Each running command had one of the configured GPUs, and two at once never shared one.
    spans = {}
    for e in events:
        spans.setdefault((e["stage"], e["pid"]), {})[e["event"]] = e
    for (stage, _), span in spans.items():
        assert span["start"]["cuda"] in DEVICES, stage
    overlapping = [
        (a, b) for a in spans.values() for b in spans.values()
        if a is not b and a["start"]["t"] < b["start"]["t"] < a["end"]["t"]
    ]
    assert overlapping
    assert all(a["start"]["cuda"] != b["start"]["cuda"] for a, b in overlapping)


def test_concurrent_repros_all_reach_dvc_lock(first_run):
    root, _, _ = first_run
    locked = set(yaml.safe_load((root / "dvc.lock").read_text())["stages"])
    assert locked == set(STAGES.values()) - {"teacher@2-4", "report"}


def test_summary_artifact_and_mlflow_cell_runs(first_run, mlflow_store):
    from matting_pipeline import tracking

    _, state, runs = first_run
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    by_key = {a.key: a for a in artifacts}
    summary = by_key["study-summary"].data
    assert "| teacher@2-4 | seg2-mat4 | Failed | 3 | - | exit 255: toy failure: teacher@2-4 always fails |" in summary
    host = socket.gethostname()[:12]  # the local runner's tasks ran on this machine
    assert f"| teacher@1-3 | seg1-mat3 | Completed | 2 | {host} | ran (" in summary
    # Every cell's MLflow parent run is linked from its tasks, and exists exactly once.
    for seg, mat in [(1, 0), (2, 0), (0, 3), (0, 4), (1, 3), (1, 4), (2, 3), (2, 4)]:
        name = f"seg{seg}-mat{mat}"
        run_id = tracking.get_or_create_cell_run("toy-study", seg, mat, "unet_r18x0.5")
        link = by_key[f"mlflow-{name}"]
        assert run_id in link.data and link.task_run_id is not None
    import mlflow

    cells = mlflow.search_runs(experiment_names=["toy-study"], filter_string="tags.run_kind = 'cell'")
    assert sorted(cells["tags.cell"]) == sorted(
        f"seg{s}-mat{m}" for s, m in [(1, 0), (2, 0), (0, 3), (0, 4), (1, 3), (1, 4), (2, 3), (2, 4)]
    )


def test_rerun_skips_what_is_up_to_date_and_leaves_dvc_nothing_to_do(first_run):
    root, _, _ = first_run
    (root / ".toy" / "fail_always").write_text("")
    before = len(read_timeline(root))
    state = study(root=str(root), return_state=True)
    assert state.is_completed(), state.message
    outcomes = {row["stage"]: row["detail"].rsplit(" (", 1)[0] for row in state.result()}
    assert outcomes == {
        stage: (OUTCOME_RAN if stage in {"teacher@2-4", "report"} else OUTCOME_SKIPPED) for stage in STAGES.values()
    }
    ran = {e["stage"] for e in read_timeline(root)[before:]}
    assert ran == {"teacher@2-4", "report"}
    dvc = [sys.executable, "-m", "dvc"]
    status = subprocess.run([*dvc, "status", "--json"], cwd=root, capture_output=True, text=True, check=True)
    assert status.stdout.strip() == "{}"
    repro = subprocess.run([*dvc, "repro"], cwd=root, capture_output=True, text=True, check=True)
    assert "Data and pipelines are up to date." in repro.stdout
    assert "Running stage" not in repro.stdout
