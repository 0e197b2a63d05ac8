"""MLflow conventions shared by every stage.

- Tracking URI: ``MLFLOW_TRACKING_URI``, else ``sqlite:///<repo>/mlflow.db``.
- One experiment for the study (``study.experiment`` in params.yaml).
- One *cell* parent run per grid cell (tags ``run_kind=cell``, ``cell=seg<S>-mat<M>``),
  found again by its tags so a re-run never duplicates it; training and evaluation runs
  of that cell are nested under it (``mlflow.parentRunId``).

Run names encode the experiment, e.g. ``teacher-unet_r18x0.5-seg60-mat8-seed0``.
"""

from __future__ import annotations

import os
from pathlib import Path

from matting_core.grid import cell_name

REPO_ROOT = Path(__file__).resolve().parents[1]

# MLflow phones home and prints a banner unless told not to; set before import.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def setup(experiment: str):
    """Point MLflow at the study's store and experiment; returns the experiment id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    exp = mlflow.set_experiment(experiment)
    return exp.experiment_id


def get_or_create_cell_run(experiment: str, seg_count: int, mat_count: int, network: str) -> str:
    """Return the id of the cell's parent run, creating it the first time.

    The parent run is looked up by its tags, so any number of stage re-runs share one.
    """
    from mlflow.tracking import MlflowClient

    experiment_id = setup(experiment)
    cell = cell_name(seg_count, mat_count)
    client = MlflowClient()
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.run_kind = 'cell' and tags.cell = '{cell}'",
        max_results=1,
        order_by=["attributes.start_time ASC"],
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment_id,
        run_name=f"cell-{cell}",
        tags={"run_kind": "cell", "cell": cell, "seg_count": str(seg_count), "mat_count": str(mat_count)},
    )
    run_id = run.info.run_id
    client.log_param(run_id, "seg_count", int(seg_count))
    client.log_param(run_id, "mat_count", int(mat_count))
    client.log_param(run_id, "network", network)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def flatten_params(obj, prefix: str = "") -> dict[str, str]:
    """Flatten nested dicts/lists of hyper-parameters to MLflow's ``a.b.c`` keys."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten_params(value, f"{prefix}{key}."))
    elif isinstance(obj, (list, tuple)):
        out[prefix[:-1]] = ",".join(str(v) for v in obj)
    else:
        out[prefix[:-1]] = str(obj)
    return out
