"""A tiny copy of the real project for end-to-end DAG tests.

`make_tiny_project(dest)` clones the repository's tracked files into ``dest`` (a fresh
git repo with DVC initialised by the clone), and writes a params.yaml that is the
project's own params.yaml with the overrides of ``tiny_params.yaml`` merged in, so
every key dvc.yaml declares exists and every stage runs in seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
TINY = Path(__file__).with_name("tiny_params.yaml")


def deep_update(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


def tiny_params(**extra) -> dict:
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    params = deep_update(base, yaml.safe_load(TINY.read_text()))
    return deep_update(params, extra)


def pipeline_env(root: Path) -> dict[str, str]:
    """Environment for running the stages: the venv's tools first, a private MLflow store."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
        MLFLOW_DISABLE_TELEMETRY="true",
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        DVC_NO_ANALYTICS="1",
        PYTHONUNBUFFERED="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    env.pop("RAY_ADDRESS", None)
    return env


CLOCK_FIELDS = ("fps", "run_id")


def without_clock_fields(value):
    """A metrics/findings document (or CSV rows) less what a clock or MLflow decides: FPS
    figures and run ids, at any depth (two runs of the same pipeline agree on the rest)."""
    if isinstance(value, dict):
        return {k: without_clock_fields(v) for k, v in value.items() if k not in CLOCK_FIELDS}
    if isinstance(value, list):
        return [without_clock_fields(v) for v in value]
    return value


def make_tiny_project(dest: Path, **extra) -> Path:
    """Clone the committed project into ``dest`` with tiny params; returns ``dest``."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    dest.mkdir(parents=True, exist_ok=True)
    for name in filter(None, files.decode().split("\0")):
        src = REPO / name
        if not src.is_file():
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(src.read_bytes())
    (dest / "params.yaml").write_text(yaml.safe_dump(tiny_params(**extra), sort_keys=False))
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "tiny project"], cwd=dest, check=True)
    return dest
