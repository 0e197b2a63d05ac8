"""Shared fixtures of the flow tests: a toy DVC project, quiet tools, a temp MLflow store."""

import pytest

from flows.toy import make_toy_project


@pytest.fixture(autouse=True)
def _quiet_tools(monkeypatch):
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("DO_NOT_TRACK", "1")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")


@pytest.fixture()
def toy(tmp_path):
    """A fresh toy study (seg [1, 2] x mat [3, 4]) in a temp git + DVC repository."""
    return make_toy_project(tmp_path / "toy")
