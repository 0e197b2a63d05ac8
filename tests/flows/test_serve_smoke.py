"""`prefect server start` on 127.0.0.1, `python -m flows.serve`, REST read-back, a triggered run.

Runs scripts/prefect_smoke.py as a user would (it starts and stops every process itself) on
a toy DVC project; see that script for the steps.
"""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_served_deployments_exist_with_schedule_and_a_triggered_run_completes():
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "prefect_smoke.py")],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-6000:] + proc.stderr[-3000:]
    assert "OK: both deployments exist; the nightly study runs on cron '0 2 * * *'" in out
    assert "deployment study/nightly-study: schedules [\"cron '0 2 * * *' UTC active=True\"]" in out
    assert "deployment cell/on-demand-cell: schedules none" in out
    assert "flow run 'cell seg1-mat3': Completed" in out
    for task_run in ("'ingest': Completed", "'pretrain seg1-mat0': Completed", "'teacher seg1-mat3': Completed"):
        assert f"task run {task_run}" in out
    assert "artifact markdown key=mlflow-seg1-mat3" in out
    assert "OK: the triggered run completed" in out
    assert "stopped serve" in out and "stopped server" in out
