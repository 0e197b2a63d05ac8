"""The MLflow Model Registry: every both-cell student as a version of one registered model.

The evaluate stage of a both-cell (S > 0, M > 0) calls :func:`register_student`: the
student is exported to ONNX (``matting export``'s graph: ``image`` float32 (N, 3, H, W) RGB in
[0, 1], dynamic N/H/W → ``alpha`` (N, 1, H, W)) and logged with MLflow's ONNX flavour on
the student's own training run, with a signature of those dynamic shapes, an input
example, its pip requirements and the PyTorch checkpoint (``model.pt``) among the model's
files; the version is tagged with its cell, seed, experiment, the weights' identity and the
natural set's whole/boundary MSE. The alias ``champion`` then moves to the version with
the lowest natural boundary MSE (:func:`update_champion`). Registering the same weights
twice (a re-run) adds no version.

Use::

    model = mlflow.pyfunc.load_model("models:/matting-student@champion")
    alpha = model.predict(images)["alpha"]          # images: (N, 3, H, W) float32 in [0, 1]
    mlflow models serve -m models:/matting-student@champion --env-manager local -p 5001
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

CHAMPION = "champion"
METRIC_TAG = "natural_boundary_mse"
PIP_REQUIREMENTS = ["onnxruntime", "numpy", "onnx"]


def signature():
    """Input ``image`` (-1, 3, -1, -1) float32, output ``alpha`` (-1, 1, -1, -1) float32."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1), "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, -1, -1), "alpha")]),
    )


def _versions(client, name: str) -> list:
    from mlflow.exceptions import MlflowException

    try:
        return list(client.search_model_versions(f"name = '{name}'"))
    except MlflowException:
        return []


def register_student(name: str, checkpoint: str | Path, run_id: str | None, tags: dict[str, Any]) -> str:
    """Register ``checkpoint`` (an MLB network) as a version of ``name``; returns the version.

    ``run_id``: the student's training run (the model is logged there; a new run when None
    or not in this store). ``tags``: cell, seed, experiment, metrics (strings on the version).
    """
    import mlflow
    import onnx
    import torch
    from mlflow.tracking import MlflowClient

    from matting_core.checkpoint import load_model, model_identity
    from matting_core.models.onnx_export import export_onnx

    client = MlflowClient()
    identity = model_identity(checkpoint)
    for version in _versions(client, name):
        if version.tags.get("weights") == identity:
            return str(version.version)  # these weights are registered already (a re-run)
    model, info = load_model(checkpoint)
    model.eval()
    run_id = run_id or info.get("extra", {}).get("run_id")
    example = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)).numpy()
    data = export_onnx(model, metadata={"network_spec": info["network_spec"]})
    try:
        active = run_id if run_id and client.get_run(run_id) else None
    except Exception:  # noqa: BLE001 - a run from another store
        active = None
    with mlflow.start_run(run_id=active, run_name=None if active else f"register-{tags.get('cell', 'model')}"):
        logged = mlflow.onnx.log_model(
            onnx.load_from_string(data), name="onnx-model", signature=signature(), input_example=example,
            pip_requirements=PIP_REQUIREMENTS, extra_files=[str(checkpoint)], registered_model_name=name,
            await_registration_for=60,
        )
    version = str(logged.registered_model_version)
    for key, value in {**tags, "weights": identity}.items():
        client.set_model_version_tag(name, version, key, str(value))
    return version


def update_champion(name: str) -> str | None:
    """Point the ``champion`` alias at the version with the lowest natural boundary MSE; the version."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    scored = [(float(v.tags[METRIC_TAG]), int(v.version)) for v in _versions(client, name) if METRIC_TAG in v.tags]
    if not scored:
        return None
    best = str(min(scored)[1])
    client.set_registered_model_alias(name, CHAMPION, best)
    return best
