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
