"""One MLflow server for the team (issue 14 item 2): ``make mlflow-server`` starts a real
``mlflow server`` (sqlite database backend, proxied artifact store) on loopback; a training
stage logs to it through ``MLFLOW_TRACKING_URI`` and its model goes into the server's
Model Registry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from matting_core.checkpoint import model_identity
from tests.services import mlflow_server

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``make mlflow-server`` on a free port, home in a temp dir; stopped at the end."""
    try:
        with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as running:
            yield running
    except RuntimeError as err:  # did not start: say why
        pytest.fail(str(err))


def test_a_stage_logs_to_the_team_server_and_registers_there(server, tmp_path):
    from mlflow.tracking import MlflowClient

    import mlflow
    from matting_pipeline import registry
    from tests.stages.test_training import SEG, make_data, make_params

    make_data(tmp_path / "data")
    raw = make_params(pretrain={"iters": 4, "checkpoint_every": 2})
    raw["study"]["experiment"] = "team-server"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "MLFLOW_TRACKING_URI": server["uri"], "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "stages.pretrain", "--seg", str(SEG), "--params", str(tmp_path / "params.yaml"),
         "--data-root", str(tmp_path / "data"), "--models-root", str(tmp_path / "models"), "--device", "cpu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    model_pt = tmp_path / "models" / "seed0" / "pretrain" / f"seg{SEG}" / "model.pt"

    mlflow.set_tracking_uri(server["uri"])
    try:
        client = MlflowClient(server["uri"])
        experiment = client.get_experiment_by_name("team-server")
        runs = client.search_runs([experiment.experiment_id], "tags.run_kind = 'pretrain'")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        run = runs[0]
        parent = client.get_run(run.data.tags["mlflow.parentRunId"])
        assert parent.data.tags["run_kind"] == "cell"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")] == [1, 2, 3, 4]
        # the artifact went through the server into its artifact store, not to a local folder
        local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="checkpoint/model.pt",
                                                         dst_path=str(tmp_path / "download")))
        assert model_identity(local) == model_identity(model_pt)
        stored = list((server["home"] / "artifacts").rglob("model.pt"))
        assert stored and not (tmp_path / "mlruns").exists() and not (tmp_path / "mlartifacts").exists()
        assert (server["home"] / "mlflow.db").is_file()

        version = registry.register_student("team-student", model_pt, run.info.run_id,
                                            {"cell": "seg8-mat0", "seed": 0, registry.METRIC_TAG: 0.1})
        assert registry.update_champion("team-student") == version
        champion = mlflow.pyfunc.load_model("models:/team-student@champion")
        import numpy as np

        alpha = champion.predict(np.random.default_rng(0).random((1, 3, 40, 56), dtype=np.float32))["alpha"]
        assert alpha.shape == (1, 1, 40, 56)
    finally:
        mlflow.set_tracking_uri(None)
