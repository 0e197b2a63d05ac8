"""Serve the study's flows as Prefect deployments: a nightly study and an on-demand cell.

    prefect server start --host 127.0.0.1                      # terminal 1: API + UI on :4200
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve   # terminal 2
    # open http://127.0.0.1:4200/deployments: "study/nightly-study" runs on
    # orchestration.schedule_cron; "cell/on-demand-cell" asks for seg and mat on "Run"

No cloud account and no work pool: this process polls the server for scheduled or
triggered runs of its deployments and runs each in a subprocess, one at a time (both
flows write the same DVC workspace). Stop it with Ctrl-C; the schedules pause until it
serves again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import serve
from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType

from flows.study import PROFILES, PROJECT_ROOT, profile_params, cell, study

STUDY_DEPLOYMENT = "nightly-study"
CELL_DEPLOYMENT = "on-demand-cell"


def build_deployments(root: str | Path = PROJECT_ROOT, profile: str = "demo") -> list:
    """The two deployments, parameterised with ``root`` and ``profile``.

    The schedule comes from the profile's params file (``orchestration.schedule_cron``,
    ``orchestration.timezone``).
    """
    root = Path(root).resolve()
    orchestration = profile_params(root, profile).orchestration
    common = {"root": str(root), "profile": profile}
    nightly = study.to_deployment(
        name=STUDY_DEPLOYMENT,
        schedules=[Cron(orchestration.schedule_cron, timezone=orchestration.timezone)],
        parameters=common,
        description=f"The whole study grid of {PROFILES[profile]} in {root}, on a schedule",
        tags=["matting-study", profile],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    on_demand = cell.to_deployment(
        name=CELL_DEPLOYMENT,
        parameters=common,
        description=f"One (seg, mat) cell of {PROFILES[profile]} in {root} and the stages it needs",
        tags=["matting-study", profile],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    return [nightly, on_demand]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(PROJECT_ROOT), help="the DVC project (default: this checkout)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="demo")
    args = parser.parse_args(argv)
    serve(*build_deployments(args.root, args.profile), limit=1)


if __name__ == "__main__":
    main()
