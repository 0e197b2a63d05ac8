"""The MLflow Model Registry on a real sqlite store: students as versions, the champion alias,
and `models:/<name>@champion` loaded with mlflow.pyfunc predicting alphas (issue 15 item 3)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from matting_core.checkpoint import load_model, save_checkpoint
from matting_core.models import build_network
from matting_pipeline import registry
from tests.images import rgb

NAME = "test-student"


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # the default artifact root is relative to the working directory
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("registry-test")
    yield tmp_path
    mlflow.set_tracking_uri(None)


def _checkpoint(path, seed: int):
    torch.manual_seed(seed)
    model = build_network("unet_r18x0.25").eval()
    with torch.no_grad():
        model.alpha_head.weight.normal_(0, 0.05)
    return save_checkpoint(path, model)


def test_students_become_versions_and_the_champion_predicts_alphas(store):
    worse = _checkpoint(store / "a" / "model.pt", 0)
    better = _checkpoint(store / "b" / "model.pt", 1)
    v1 = registry.register_student(NAME, worse, None, {"cell": "seg240-mat8", "seed": 0, registry.METRIC_TAG: 0.2})
    v2 = registry.register_student(NAME, better, None, {"cell": "seg240-mat32", "seed": 0, registry.METRIC_TAG: 0.1})
    assert (v1, v2) == ("1", "2")
    # the same weights again (a re-run of evaluate) add no version
    assert registry.register_student(NAME, better, None, {registry.METRIC_TAG: 0.1}) == "2"
    assert registry.update_champion(NAME) == "2"
    client = MlflowClient()
    version = client.get_model_version_by_alias(NAME, registry.CHAMPION)
    assert str(version.version) == "2" and version.tags["cell"] == "seg240-mat32" and version.tags["seed"] == "0"
    local = mlflow.artifacts.download_artifacts(f"models:/{NAME}@{registry.CHAMPION}")
    names = {p.name for p in Path(local).rglob("*")}
    assert {"MLmodel", "model.onnx", "model.pt", "requirements.txt"} <= names, names

    model = mlflow.pyfunc.load_model(f"models:/{NAME}@{registry.CHAMPION}")
    photos = np.stack([rgb(72, 88, seed).transpose(2, 0, 1) for seed in range(3)]).astype(np.float32) / 255.0
    alpha = model.predict(photos)["alpha"]
    assert alpha.shape == (3, 1, 72, 88) and 0.0 <= alpha.min() and alpha.max() <= 1.0
    torch_model, _ = load_model(better)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(photos))["alpha"].numpy()
    np.testing.assert_allclose(alpha, expected, atol=1e-4)
