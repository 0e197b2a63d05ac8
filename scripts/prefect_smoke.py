"""Smoke check of the served deployments against a real local Prefect server.

    python scripts/prefect_smoke.py             # toy DVC project in a temp dir
    python scripts/prefect_smoke.py --root .  --seg 60 --mat 8   # this checkout (real training)

1. creates a toy DVC project (flows/toy.py: git + DVC, the study's stage kinds) unless
   ``--root`` is given;
2. starts ``prefect server start --host 127.0.0.1 --port <free>`` on a temp sqlite DB and a
   temp PREFECT_HOME;
3. starts ``python -m flows.serve --root <project>`` against it;
4. reads back through the REST API (``POST /api/deployments/filter``) that both deployments
   exist, the nightly one with the cron schedule of ``orchestration.schedule_cron``;
5. triggers the on-demand cell deployment (``POST /api/deployments/{id}/create_flow_run``),
   waits until the run is final and prints its state, task runs and artifacts;
6. stops every process it started (its own process groups only) and removes the temp dir.

Exit status 0 when every check holds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def say(message: str) -> None:
    print(f"[smoke {time.strftime('%H:%M:%S')}] {message}", flush=True)


def wait_for(what: str, check, timeout: float, every: float = 1.0, procs: dict | None = None):
    """Poll ``check()`` until it returns something truthy; fail if a child process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in (procs or {}).items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}")
        try:
            value = check()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"no {what} after {timeout:.0f} s")


def stop(name: str, proc: subprocess.Popen) -> None:
    """SIGINT, then SIGTERM, then SIGKILL to the process group this script started."""
    if proc.poll() is None:
        for sig, grace in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    say(f"stopped {name} (exit {proc.returncode})")


def run(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO))  # a script: make the project importable without installing it
    from flows.serve import CELL_DEPLOYMENT, STUDY_DEPLOYMENT
    from flows.study import profile_params
    from flows.toy import make_toy_project

    temp = Path(tempfile.mkdtemp(prefix="prefect-smoke-"))
    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}
    try:
        root = Path(args.root).resolve() if args.root else make_toy_project(temp / "project", sleep=0.5)
        seg, mat = (args.seg, args.mat) if args.root else (1, 3)
        cron = profile_params(root, "demo").orchestration.schedule_cron
        port = free_port()
        api = f"http://127.0.0.1:{port}/api"
        env = {
            **os.environ,
            "PREFECT_HOME": str(temp / "prefect-home"),
            "PREFECT_API_URL": api,
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{temp / 'prefect.db'}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_RUNNER_POLL_FREQUENCY": "2",
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",
        }
        python = sys.executable
        prefect = str(Path(python).parent / "prefect")

        def start(name: str, cmd: list[str]) -> None:
            logs[name] = temp / f"{name}.log"
            say(f"start {name}: {' '.join(cmd)}")
            procs[name] = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=logs[name].open("w"), stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        t0 = time.monotonic()
        start("server", [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)])
        client = httpx.Client(base_url=api, timeout=30)
        wait_for("healthy server", lambda: client.get("/health").json() is True, 180, procs=procs)
        say(f"server healthy at {api} after {time.monotonic() - t0:.1f} s")

        start("serve", [python, "-m", "flows.serve", "--root", str(root)])

        def deployments():
            found = client.post("/deployments/filter", json={}).json()
            names = {d["name"] for d in found}
            return found if {STUDY_DEPLOYMENT, CELL_DEPLOYMENT} <= names else None

        found = wait_for("served deployments", deployments, 180, every=2, procs=procs)
        flows = {f["id"]: f["name"] for f in client.post("/flows/filter", json={}).json()}
        by_name = {d["name"]: d for d in found}
        for d in found:
            schedules = [
                f"cron {s['schedule'].get('cron')!r} {s['schedule'].get('timezone')} active={s['active']}"
                for s in d["schedules"]
            ]
            say(f"deployment {flows[d['flow_id']]}/{d['name']}: schedules {schedules or 'none'};"
                f" parameters {d['parameters']}")
        nightly = by_name[STUDY_DEPLOYMENT]["schedules"]
        assert len(nightly) == 1 and nightly[0]["schedule"]["cron"] == cron and nightly[0]["active"], nightly
        assert by_name[CELL_DEPLOYMENT]["schedules"] == []
        say(f"OK: both deployments exist; the nightly study runs on cron {cron!r}")

        deployment_id = by_name[CELL_DEPLOYMENT]["id"]
        for attempt in range(5):  # 503 = the server is busy (its sqlite under load): asks to try again
            response = client.post(
                f"/deployments/{deployment_id}/create_flow_run", json={"parameters": {"seg": seg, "mat": mat}}
            )
            if response.status_code != 503:
                break
            say(f"create_flow_run: HTTP 503 (server busy), retrying in {2 ** attempt} s")
            time.sleep(2 ** attempt)
        assert response.status_code < 300, f"create_flow_run: HTTP {response.status_code} {response.text}"
        run_ = response.json()
        say(f"triggered {flows[by_name[CELL_DEPLOYMENT]['flow_id']]}/{CELL_DEPLOYMENT} seg={seg} mat={mat}:"
            f" flow run {run_['id']}")
        t1 = time.monotonic()

        def final_state():
            flow_run = client.get(f"/flow_runs/{run_['id']}").json()
            state = flow_run.get("state") or {}
            return flow_run if state.get("type") in FINAL else None

        flow_run = wait_for("final flow run state", final_state, args.timeout, every=2, procs=procs)
        state = flow_run["state"]
        say(f"flow run {flow_run['name']!r}: {state['name']} after {time.monotonic() - t1:.1f} s"
            + (f" ({state['message']})" if state.get("message") else ""))
        task_runs = client.post(
            "/task_runs/filter",
            json={"flow_runs": {"id": {"any_": [run_["id"]]}}, "sort": "EXPECTED_START_TIME_ASC"},
        ).json()
        for tr in task_runs:
            say(f"  task run {tr['name']!r}: {tr['state']['name']} (attempts {tr['run_count']})")
        artifacts = client.post(
            "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_["id"]]}}}
        ).json()
        for art in artifacts:
            say(f"  artifact {art['type']} key={art['key']}: {str(art['data'])[:100]!r}")
        assert state["type"] == "COMPLETED", state
        say(f"OK: the triggered run completed; total {time.monotonic() - t0:.1f} s")
        return 0
    except Exception as exc:
        say(f"FAILED: {type(exc).__name__}: {exc}")
        for name, path in logs.items():
            say(f"--- last lines of {name} log ---")
            print("\n".join(path.read_text(errors="replace").splitlines()[-40:]), flush=True)
        return 1
    finally:
        for name in reversed(list(procs)):
            stop(name, procs[name])
        shutil.rmtree(temp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="an existing DVC project (default: a temp toy project)")
    parser.add_argument("--seg", type=int, default=1, help="cell to trigger (with --root)")
    parser.add_argument("--mat", type=int, default=3, help="cell to trigger (with --root)")
    parser.add_argument("--timeout", type=float, default=420, help="seconds to wait for the triggered run")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
