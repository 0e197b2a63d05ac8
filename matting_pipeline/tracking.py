"""MLflow conventions shared by every stage.

- Tracking URI: ``MLFLOW_TRACKING_URI``, else ``sqlite:///<repo>/mlflow.db``.
- One experiment for the study (``study.experiment`` in params.yaml).
- One *cell* parent run per grid cell (tags ``run_kind=cell``, ``cell=seg<S>-mat<M>``),
  found again by its tags so a re-run never duplicates it; training and evaluation runs
  of that cell are nested under it (``mlflow.parentRunId``).

Run names encode the experiment, e.g. ``teacher-unet_r18x0.5-seg60-mat8-seed0``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from matting_core.grid import cell_name

REPO_ROOT = Path(__file__).resolve().parents[1]

# MLflow phones home and prints a banner unless told not to; set before import.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


# MLflow's own HTTP client retries for minutes by default; a stage should fail in seconds.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")


class TrackingUnreachable(RuntimeError):
    """The MLflow tracking server does not answer; the message names the URI and the fix."""


def check_reachable(uri: str | None = None, timeout: float = 5.0) -> None:
    """For an ``http(s)://`` tracking URI, one request to the server's ``/health`` within
    ``timeout`` seconds, before any work starts; other URIs (sqlite, files) need no server."""
    import urllib.error
    import urllib.request

    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answered (an auth proxy, an old server without /health): reachable
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingUnreachable(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it (e.g. `mlflow server --host "
            "127.0.0.1 --port 5000`) or unset MLFLOW_TRACKING_URI to log to the local sqlite store"
        ) from None


@contextlib.contextmanager
def store_lock(uri: str | None = None) -> Iterator[None]:
    """Hold an exclusive flock on ``<db>.lock`` beside a local sqlite store (other stores: no-op).

    Two processes opening a fresh ``mlflow.db`` at once both run its schema migrations and one
    dies with an alembic error; two creating the same experiment or cell run race the same way
    (two ``flows.repro`` started together did). Creation happens under this lock."""
    uri = uri or tracking_uri()
    if not uri.startswith("sqlite:///") or uri.startswith("sqlite:///:memory:"):
        yield
        return
    db = Path(uri[len("sqlite:///"):].split("?", 1)[0])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def setup(experiment: str):
    """Point MLflow at the study's store and experiment (created under :func:`store_lock`
    when missing); returns the experiment id."""
    import mlflow

    uri = tracking_uri()
    with store_lock(uri):
        mlflow.set_tracking_uri(uri)
        exp = mlflow.set_experiment(experiment)
    return exp.experiment_id


def get_or_create_cell_run(experiment: str, seg_count: int, mat_count: int, network: str) -> str:
    """Return the id of the cell's parent run, creating it the first time.

    The parent run is looked up by its tags, so any number of stage re-runs share one.
    """
    from mlflow.tracking import MlflowClient

    experiment_id = setup(experiment)
    cell = cell_name(seg_count, mat_count)
    with store_lock():  # two processes must not both miss the run and both create it
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
