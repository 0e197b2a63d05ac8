"""The tiny study through Prefect on a local 2-node Ray cluster (issue 14), with real parts:
a Prefect test server, ``ray.cluster_utils.Cluster`` (a head and a second node, 1 CPU each:
two stage instances at once must run on different nodes), ``make mlflow-server`` and a
moto S3 server on loopback holding the shard sets (``data.shard_url``) and a DVC remote.

1. The whole tiny study with ``runner: ray``: every instance completes, instances ran on
   both nodes (the node id is in each task's result and log), MLflow on the server holds one
   parent run per cell, training and evaluation read their shards from S3, ``dvc push`` to
   the S3 remote works and ``dvc status`` is clean.
2. Retries and parallel cells: the toy study (flows/toy.py) on the same cluster, one
   stage failing once (Prefect retries it), one always (only its cell fails), two instances
   at once on the two nodes.
3. Node loss: the pretrain output is removed and the seg-only cell runs again with the
   head's CPU held, so pretrain must go to the second node; that node is killed once the
   stage has saved a resumable state. Ray retries the task on the head, the stage resumes
   from its state, its weights equal the uninterrupted run's (its loss history on the
   MLflow server too), and so do the cell's metrics; ``dvc status`` is clean.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterTaskRunId
from prefect.testing.utilities import prefect_test_harness

from flows.study import cell, study
from flows.toy import make_toy_project, max_overlap, read_timeline
from matting_core.checkpoint import model_identity
from matting_pipeline.layout import RUN_NAME, Layout
from matting_pipeline.trainer import FINISHED_NAME
from tests.e2e.tiny import make_tiny_project, pipeline_env, without_clock_fields
from tests.services import mlflow_server, s3_server

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

BUCKET = "matting-shards"
SEG, MAT = 12, 4  # tiny_params.yaml's grid
PRETRAIN = {"iters": 160, "checkpoint_every": 20, "log_every": 20}  # ~5 s of steps: long enough to be killed mid-way


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Prefect test server, MLflow server, S3 endpoint and a 2-node Ray cluster; the nodes
    inherit this environment (MLflow URI, S3 endpoint and credentials) as real nodes would."""
    import ray
    from ray.cluster_utils import Cluster

    base = tmp_path_factory.mktemp("cluster")
    with pytest.MonkeyPatch.context() as mp, s3_server(bucket=BUCKET) as s3, \
            mlflow_server(base / "mlflow-server") as mlflow_srv:
        for key, value in {**pipeline_env(base), **s3["env"], "MLFLOW_TRACKING_URI": mlflow_srv["uri"]}.items():
            mp.setenv(key, value)
        mp.delenv("RAY_ADDRESS", raising=False)
        with prefect_test_harness(server_startup_timeout=240):
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
            second = cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False)  # the flows' RayTaskRunner reuses it
            try:
                yield {"cluster": cluster, "head": cluster.head_node, "second": second, "s3": s3,
                       "mlflow": mlflow_srv, "base": base}
            finally:
                ray.shutdown()
                cluster.shutdown()


def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True,
                          env=pipeline_env(root) | {k: os.environ[k] for k in os.environ if k.startswith("AWS_")} |
                          {"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]})


def _task_logs(flow_run_id) -> dict[str, list[str]]:
    """Log lines of each task run of a flow run, by task run name (waits for them to land)."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        time.sleep(2)  # logs reach the API in batches
        return {
            run.name: [log.message for log in client.read_logs(
                log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[run.id])), limit=200)]
            for run in runs
        }


@pytest.fixture(scope="module")
def study_run(world):
    root = make_tiny_project(
        world["base"] / "tiny",
        orchestration={"runner": "ray", "ray_address": world["cluster"].address, "max_concurrency": 2,
                       "retries": 1, "retry_delay_seconds": 1},
        methods={"compare": []},
        train={"pretrain": PRETRAIN},
        data={"shard_url": f"s3://{BUCKET}/tiny"},
    )
    started = time.monotonic()
    state = study(root=str(root), return_state=True)
    seconds = time.monotonic() - started
    rows = state.result(raise_on_failure=False) if state.is_completed() else None
    return {"root": root, "state": state, "rows": rows, "seconds": seconds,
            "logs": _task_logs(state.state_details.flow_run_id)}


def test_the_tiny_study_completes_on_both_nodes(world, study_run):
    state, rows = study_run["state"], study_run["rows"]
    assert state.is_completed(), state.message
    assert len(rows) == 13 and all(r["state"] == "Completed" for r in rows)
    nodes = {r["node"] for r in rows}
    assert {world["head"].node_id, world["second"].node_id} <= nodes, nodes
    # each task says in its log where it ran
    every_log = [line for lines in study_run["logs"].values() for line in lines]
    assert any(f"running on Ray node {world['second'].node_id}" in line for line in every_log)
    assert any(f"running on Ray node {world['head'].node_id}" in line for line in every_log)


def test_mlflow_server_holds_one_parent_run_per_cell(world, study_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(world["mlflow"]["uri"])
    experiment = client.get_experiment_by_name("tiny-study")
    cells = client.search_runs([experiment.experiment_id], "tags.run_kind = 'cell'")
    assert sorted(r.data.tags["cell"] for r in cells) == sorted(["seg12-mat0", "seg0-mat4", "seg12-mat4"])
    for parent in cells:
        children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert children and all(c.info.status == "FINISHED" for c in children)
    assert not (study_run["root"] / "mlruns").exists() and not (study_run["root"] / "mlflow.db").exists()


def test_shards_are_read_from_the_s3_endpoint(world, study_run):
    import boto3

    s3 = boto3.client("s3", endpoint_url=world["s3"]["endpoint"])
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="tiny/")["Contents"]}
    for set_name in ("shards/seg/index.json", "composite/train/index.json", "composite/val-composited/index.json"):
        assert f"tiny/{set_name}" in keys, sorted(keys)[:20]
    every_log = "\n".join(line for lines in study_run["logs"].values() for line in lines)
    assert f"s3://{BUCKET}/tiny/shards/seg" in every_log


def test_dvc_remote_on_s3_and_dvc_status_clean(world, study_run):
    root = study_run["root"]
    for args in (("remote", "add", "-d", "store", f"s3://{BUCKET}/dvc"),
                 ("remote", "modify", "store", "endpointurl", world["s3"]["endpoint"])):
        assert _dvc(root, *args).returncode == 0
    pushed = _dvc(root, "push")
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    remote = _dvc(root, "status", "--cloud")
    assert remote.returncode == 0 and "in sync" in remote.stdout, remote.stdout + remote.stderr
    local = _dvc(root, "status")
    assert local.returncode == 0 and "up to date" in local.stdout, local.stdout


def test_failed_tasks_are_retried_and_independent_cells_run_side_by_side(world):
    """The toy study (flows/toy.py) on the same cluster: a stage failing once is retried by
    Prefect, one failing always fails its cell only, two instances run at once on two nodes."""
    root = make_toy_project(
        world["base"] / "toy", sleep=0.5, fail_once=("teacher@1-3",), fail_always=("teacher@2-4",),
        orchestration={"runner": "ray", "ray_address": world["cluster"].address, "max_concurrency": 2,
                       "retries": 2, "retry_delay_seconds": 0.5},
    )
    state = study(root=str(root), return_state=True)
    assert state.is_failed()
    rows = {r["stage"]: r for r in state.result(raise_on_failure=False)}
    assert (rows["teacher@1-3"]["state"], rows["teacher@1-3"]["attempts"]) == ("Completed", 2)
    assert (rows["teacher@2-4"]["state"], rows["teacher@2-4"]["attempts"]) == ("Failed", 3)
    assert rows["report"]["state"] == "NotReady"
    assert sum(r["state"] == "Completed" for r in rows.values()) == 8
    assert {r["node"] for r in rows.values() if r["node"]} == {world["head"].node_id, world["second"].node_id}
    assert max_overlap(read_timeline(root)) == 2


def _stage_on(raylet_pid: int, module: str):
    """The process running ``python -m <module>`` under a node's raylet (None if none)."""
    import psutil

    try:
        children = psutil.Process(raylet_pid).children(recursive=True)
    except psutil.Error:
        return None
    for proc in children:
        try:
            if f"-m {module} " in " ".join(proc.cmdline()) + " ":
                return proc
        except psutil.Error:
            continue
    return None


def test_a_node_lost_mid_training_is_retried_elsewhere_with_the_same_result(world, study_run):
    """Runs last in this module: it kills the second node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    root = study_run["root"]
    layout = Layout().for_seed(0)
    model = root / layout.model_path("pretrain", SEG)
    state_file = root / layout.model_dir("pretrain", SEG) / "state.pt"
    before = model_identity(model)
    metrics = root / layout.cell_metrics(SEG, 0)
    metrics_before = metrics.read_bytes()
    # DVC must rerun pretrain@12-0: its out goes, from the workspace and from DVC's cache
    # (else DVC checks it out again), and the run cache goes
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"][f"pretrain@{SEG}-0"]
    md5 = next(out["md5"] for out in lock["outs"] if out["path"].endswith("model.pt"))
    (root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).unlink()
    shutil.rmtree(root / ".dvc" / "cache" / "runs")
    for name in (model.name, FINISHED_NAME, RUN_NAME):  # (the trainer's own finished copy too)
        (model.parent / name).unlink()

    @ray.remote(num_cpus=1)
    class Hold:
        def ready(self):
            return True

    head = world["head"]
    hold = Hold.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head.node_id, soft=False)).remote()
    ray.get(hold.ready.remote())  # the head's CPU is taken: the stage can only go to the second node
    raylet = world["second"].all_processes["raylet"][0].process.pid
    killed: dict = {}

    seen: list[str] = []

    def kill_when_resumable():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            proc = _stage_on(raylet, "stages.pretrain")
            if proc is not None and not seen:
                seen.append(f"pretrain pid {proc.pid} on the second node")
            if proc is not None and state_file.is_file():
                killed["pid"] = proc.pid
                world["cluster"].remove_node(world["second"], allow_graceful=False)
                ray.kill(hold)  # the head is free for the retry
                return
            time.sleep(0.05)
        ray.kill(hold)

    killer = threading.Thread(target=kill_when_resumable, daemon=True)
    killer.start()
    state = cell(seg=SEG, mat=0, root=str(root), return_state=True)
    killer.join(timeout=5)
    rows = {r["stage"]: r for r in state.result(raise_on_failure=False) or []} if state.is_completed() else {}
    assert killed, f"pretrain was not killed on the second node with a saved state: seen {seen}, {state_file}" \
        f" exists: {state_file.is_file()}, flow {state.name}: {state.message}, rows {rows}"
    assert state.is_completed(), state.message
    assert rows[f"pretrain@{SEG}-0"]["node"] == head.node_id
    # the stage resumed from the state the killed attempt saved, on the head
    logs = _task_logs(state.state_details.flow_run_id)[f"pretrain seg{SEG}-mat0 seed0"]
    assert any(f"running on Ray node {world['second'].node_id}" in line for line in logs)
    assert any(f"running on Ray node {head.node_id}" in line for line in logs)
    assert any("resuming" in line and "state.pt" in line for line in logs), logs[-20:]
    # the same weights as the uninterrupted run, and the same metrics downstream (model.pt
    # names its new MLflow run, so DVC ran control and evaluate again: they must agree)
    assert model_identity(model) == before
    assert all(r["state"] == "Completed" for r in rows.values())
    assert without_clock_fields(json.loads(metrics.read_text())) == without_clock_fields(json.loads(metrics_before))
    # and the resumed run's logged losses equal the uninterrupted run's
    from mlflow.tracking import MlflowClient

    client = MlflowClient(world["mlflow"]["uri"])
    experiment = client.get_experiment_by_name("tiny-study")
    runs = client.search_runs([experiment.experiment_id], f"tags.run_kind = 'pretrain' and tags.cell = 'seg{SEG}-mat0'",
                              order_by=["attributes.start_time ASC"])
    assert len(runs) == 2, [r.info.run_id for r in runs]
    # (steps after the last saved state may be logged twice: by the killed attempt and the resumed one)
    first, resumed = ({m.step: m.value for m in client.get_metric_history(r.info.run_id, "loss/total")} for r in runs)
    assert resumed == first and len(first) == PRETRAIN["iters"] // PRETRAIN["log_every"]
    # the cell flow brought its own cell up to date (the both-cell's stages use the new model.pt
    # next time the study runs)
    cell_status = _dvc(root, "status", *rows)
    assert cell_status.returncode == 0 and "up to date" in cell_status.stdout, cell_status.stdout
