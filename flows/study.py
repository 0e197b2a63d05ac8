"""The label-efficiency study as Prefect flows: ``study`` (the grid) and ``cell`` (one cell).

Both run the DVC stage instances of ``dvc.yaml`` through :mod:`flows.dag` (one
``dvc repro --single-item`` per task, parents first, independent cells in parallel);
neither has any stage logic. Run once from a shell::

    python -m flows.study                                   # the grid of params.yaml
    python -m flows.study --seg 60 --mat 8 --max-concurrency 1
    python -m flows.study --profile cpu                     # params-cpu.yaml: 3 seeds, intervals
    python -m flows.study --profile paper                   # params-paper.yaml
    python -m flows.study --runner ray --ray-address auto   # each stage instance a Ray task

against ``PREFECT_API_URL`` when it is set, else a temporary local Prefect server.
``python -m flows.serve`` serves both flows as deployments (see there).

Profiles: ``demo`` reads ``params.yaml``; ``cpu`` reads ``params-cpu.yaml`` (the study on a
2-core CPU, 3 seeds, <= 90 min); ``gpu-check`` reads ``params-gpu-check.yaml`` (<= 8 min on
one GPU); ``paper`` reads ``params-paper.yaml``. The DVC
stages always read ``params.yaml``, so a profile whose file differs from it is made the
active one first: its file is copied over ``params.yaml`` (refused when ``params.yaml``
has uncommitted edits; ``git checkout params.yaml`` returns to the committed one). DVC then
reruns exactly what the changed parameters invalidate, and dvc.lock records them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from prefect.exceptions import MissingContextError
from prefect.logging import get_logger
from prefect.runtime import flow_run
from prefect.settings import temporary_settings
from prefect.states import Completed, Failed

from flows.dag import (
    RUNNERS,
    Cell,
    failure_message,
    load_pipeline,
    publish_summary,
    run_stages,
    select_stages,
)
from matting_pipeline import atomic
from matting_pipeline.config import ConfigError, Params, RunnerName, StudyConfig, load_params
from matting_pipeline.layout import cell_name

PROFILES = {"demo": "params.yaml", "cpu": "params-cpu.yaml", "gpu-check": "params-gpu-check.yaml",
            "paper": "params-paper.yaml"}
ACTIVE_PARAMS = "params.yaml"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
Profile = Literal["demo", "cpu", "gpu-check", "paper"]


class StudySetupError(ValueError):
    """The flow's parameters do not fit the project (profile file, grid, concurrency)."""


def _logger():
    """The run logger inside a flow, else this module's logger."""
    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger(__name__)


def _committed(root: Path, relpath: str) -> bytes | None:
    proc = subprocess.run(["git", "show", f"HEAD:{relpath}"], cwd=root, capture_output=True)
    return proc.stdout if proc.returncode == 0 else None


def profile_params(root: Path, profile: str) -> Params:
    """The profile's params file, validated (a missing file is a clear error)."""
    if profile not in PROFILES:
        raise StudySetupError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    source = Path(root) / PROFILES[profile]
    if not source.is_file():
        hint = " (the paper-scale parameters are not in this checkout yet; use profile 'demo')" if profile == "paper" else ""
        raise StudySetupError(f"profile {profile!r} reads {source.name}, which does not exist in {root}{hint}")
    try:
        return load_params(source)
    except ConfigError as err:
        raise StudySetupError(f"profile {profile!r}: {err}") from None


def activate_profile(root: Path, profile: str) -> Params:
    """Validate the profile's params file and make it the ``params.yaml`` DVC reads."""
    params = profile_params(root, profile)
    source = root / PROFILES[profile]
    active = root / ACTIVE_PARAMS
    if source.name != ACTIVE_PARAMS and (not active.is_file() or active.read_bytes() != source.read_bytes()):
        if active.is_file() and active.read_bytes() != _committed(root, ACTIVE_PARAMS):
            raise StudySetupError(
                f"profile {profile!r}: the DVC stages read {ACTIVE_PARAMS}, which has changes not committed"
                f" to git; commit or stash them (or copy {source.name} over it yourself) and run again"
            )
        atomic.write_bytes(active, source.read_bytes())
        _logger().warning(
            "profile %r: copied %s over %s (DVC stages read it); `git checkout %s` restores the committed one",
            profile, source.name, ACTIVE_PARAMS, ACTIVE_PARAMS,
        )
    return params


def resolve_grid(params: Params, seg: list[int] | None, mat: list[int] | None) -> StudyConfig:
    """The requested grid, which must be inside the params file's grid (dvc.yaml's stages)."""
    study = params.study
    try:
        grid = StudyConfig(experiment=study.experiment, seg=seg or study.seg, mat=mat or study.mat)
    except ValueError as err:
        raise StudySetupError(f"grid: {err}") from None
    for axis, asked, known in (("seg", grid.seg, study.seg), ("mat", grid.mat, study.mat)):
        missing = sorted(set(asked) - set(known))
        if missing:
            raise StudySetupError(
                f"{axis} budget(s) {missing} have no DVC stages: dvc.yaml expands study.{axis} = {known}"
                f" from the params file; add them there first"
            )
    return grid


def run_cells(
    root: Path, params: Params, cells: list[Cell], max_concurrency: int | None, title: str, key: str,
    runner: str | None = None, ray_address: str | None = None,
):
    """Run the stage instances of ``cells`` (and their DVC ancestors); the flow's final state.

    ``runner`` / ``ray_address``: default ``orchestration.runner`` / ``orchestration.ray_address``.
    """
    logger = get_run_logger()
    orchestration = params.orchestration
    runner = runner or orchestration.runner
    if runner not in RUNNERS:
        raise StudySetupError(f"unknown runner {runner!r}; choose one of {', '.join(RUNNERS)}")
    if runner == "ray" and orchestration.cuda_devices:
        logger.warning("orchestration.cuda_devices %s is for the local runner: on Ray each task gets the GPUs"
                       " orchestration.resources reserves for it", orchestration.cuda_devices)
    concurrency = orchestration.max_concurrency if max_concurrency is None else max_concurrency
    if concurrency < 1:
        raise StudySetupError(f"max_concurrency must be at least 1, got {concurrency}")
    nodes = load_pipeline(root)
    selected = select_stages(nodes, cells)
    logger.info(
        "%s: %d stage instances for %d cell(s), at most %d at once, %d retries, %s runner",
        title, len(selected), len(cells), concurrency, orchestration.retries, runner,
    )
    reports = run_stages(
        root,
        nodes,
        selected,
        max_concurrency=concurrency,
        retries=orchestration.retries,
        retry_delay_seconds=orchestration.retry_delay_seconds,
        cuda_devices=orchestration.cuda_devices,
        cell_tracking={
            "experiment": params.study.experiment,
            "network": params.model.network,
            "ui_url": orchestration.mlflow_ui_url,
        },
        runner=runner,
        ray_address=ray_address or orchestration.ray_address,
        resources=orchestration.resources,
    )
    publish_summary(key, title, reports)
    rows = [
        {"stage": r.stage, "state": r.state, "attempts": r.attempts, "detail": r.detail,
         "mlflow_run_id": r.mlflow_run_id, "node": r.node}
        for r in reports
    ]
    message = failure_message(reports)
    if message:
        return Failed(message=message, data=rows)
    return Completed(message=f"{len(reports)} stage instances completed", data=rows)


def _study_run_name() -> str:
    """``study demo``, or with a narrowed grid ``study demo seg60-mat8,32``."""
    p = flow_run.parameters
    name = f"study {p.get('profile') or 'demo'}"
    if p.get("seg") or p.get("mat"):
        axes = [f"{axis}{','.join(map(str, p[axis]))}" for axis in ("seg", "mat") if p.get(axis)]
        name += " " + "-".join(axes)
    return name


@flow(name="study", flow_run_name=_study_run_name, description="The seg x mat label-budget study over dvc.yaml")
def study(
    seg: list[int] | None = None,
    mat: list[int] | None = None,
    profile: Profile = "demo",
    max_concurrency: int | None = None,
    root: str | None = None,
    runner: RunnerName | None = None,
    ray_address: str | None = None,
):
    """Run every cell of the grid (default: the profile's ``study.seg`` x ``study.mat``).

    seg, mat: non-zero budgets, a subset of the params file's; the 0 budget is added on
    each axis as in the study. max_concurrency: default ``orchestration.max_concurrency``.
    root: the DVC project (default: this checkout). runner: local (threads here) or ray
    (a task per stage instance on a Ray cluster); default ``orchestration.runner``.
    ray_address: the cluster (default ``orchestration.ray_address``, else RAY_ADDRESS).
    """
    root_path = Path(root) if root else PROJECT_ROOT
    params = activate_profile(root_path, profile)
    grid = resolve_grid(params, seg, mat)
    title = f"study {profile}: seg {[0, *grid.seg]} x mat {[0, *grid.mat]}"
    return run_cells(root_path, params, grid.cells(), max_concurrency, title, key="study-summary",
                     runner=runner, ray_address=ray_address)


@flow(name="cell", flow_run_name="cell seg{seg}-mat{mat}", description="One grid cell of the study, on demand")
def cell(
    seg: int,
    mat: int,
    profile: Profile = "demo",
    max_concurrency: int | None = None,
    root: str | None = None,
    runner: RunnerName | None = None,
    ray_address: str | None = None,
):
    """Run one cell (seg, mat) and the DVC stages it needs; 0 is a valid budget on one axis.

    runner, ray_address: as the study flow's."""
    root_path = Path(root) if root else PROJECT_ROOT
    params = activate_profile(root_path, profile)
    if (seg, mat) not in params.study.cells():
        raise StudySetupError(
            f"cell ({seg}, {mat}) is not in the grid: seg in {[0, *params.study.seg]},"
            f" mat in {[0, *params.study.mat]}, not both 0"
        )
    title = f"cell {cell_name(seg, mat)} ({profile})"
    return run_cells(root_path, params, [(seg, mat)], max_concurrency, title, key="cell-summary",
                     runner=runner, ray_address=ray_address)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seg", type=int, nargs="+", help="non-zero seg budgets (default: the params file's)")
    parser.add_argument("--mat", type=int, nargs="+", help="non-zero mat budgets (default: the params file's)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="demo")
    parser.add_argument("--max-concurrency", type=int, help="default: orchestration.max_concurrency")
    parser.add_argument("--root", default=str(PROJECT_ROOT), help="the DVC project (default: this checkout)")
    parser.add_argument(
        "--runner", choices=RUNNERS,
        help="local: stage instances as threads on this machine; ray: each a task on a Ray cluster, reserving"
             " orchestration.resources (default: orchestration.runner)",
    )
    parser.add_argument(
        "--ray-address",
        help="the Ray cluster for --runner ray, e.g. auto (this node's cluster), head:6379 or ray://head:10001"
             " (default: orchestration.ray_address, else RAY_ADDRESS, else a local Ray for this run)",
    )
    args = parser.parse_args(argv)
    # Without PREFECT_API_URL Prefect starts a temporary server; on a busy machine it needs
    # longer than the default 20 s to come up (a value the user set still wins).
    with temporary_settings(set_defaults={"server.ephemeral.startup_timeout_seconds": 120}):
        state = study(
            seg=args.seg, mat=args.mat, profile=args.profile, max_concurrency=args.max_concurrency,
            root=args.root, runner=args.runner, ray_address=args.ray_address, return_state=True,
        )
    print(f"study flow: {state.name}" + (f"\n{state.message}" if state.message else ""))
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
