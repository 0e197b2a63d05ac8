"""``dvc repro``, several stage instances at a time, without Prefect: what ``make demo`` runs.

    python -m flows.repro                 # the whole pipeline, 2 stages at a time
    python -m flows.repro --jobs 1        # one at a time (same result as `dvc repro`)
    python -m flows.repro --keep-going    # a failed stage stops only its own branch

Why: ``dvc repro`` runs one stage instance at a time, and on a small CPU machine most of a
demo stage is single-threaded start-up (torch, MLflow, Ray, DVC's own bookkeeping) while
the little training there is scales poorly past one thread. Two stage instances at once,
each with ``cores / jobs`` math threads, ran the demo about 1.5x faster on 2 cores than
``dvc repro`` (README, "Running"). On a GPU box use the Prefect flows (``cuda_devices``).

How: the graph is DVC's own (:func:`flows.graph.load_pipeline`); each instance runs as
``dvc --wait-for-lock repro --single-item <stage>`` once all its parents succeeded, so
DVC still decides whether it is stale and records it in ``dvc.lock``: afterwards
``dvc repro`` says everything is up to date, exactly as after a plain ``dvc repro``.
Each stage's output goes to ``logs/repro/<stage>.log``; the terminal gets one line per
stage start and end, and the failed stage's last lines.

Safety of running stages side by side:
- DVC guards each stage's paths with its read/write lock and queues its short bookkeeping
  on the repository lock (``--wait-for-lock``); a rare lock error is retried with back-off.
- The MLflow parent run of every grid cell is created here, one at a time, before any stage
  starts, so two stages of one cell (or a related method at its cell) never both create it.
- Stage groups in ``--exclusive`` (default: ``pseudolabel``, each starts a local Ray
  cluster that takes every CPU) never run beside another of the same group.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from flows.graph import (
    _DVC_LOCK_ERRORS,
    _LOCK_RETRIES,
    StageNode,
    _failure_reason,
    dvc_command,
    load_pipeline,
    stage_env,
    stage_outcome,
    tracking_uri,
)

LOG_DIR = Path("logs") / "repro"
DEFAULT_EXCLUSIVE = ("pseudolabel",)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
TAIL_LINES = 15


class ReproError(RuntimeError):
    """The project cannot be run (no dvc.yaml, bad arguments): nothing was started."""


@dataclass
class StageResult:
    stage: str
    outcome: str  # ran | skipped (up to date) | restored from run cache | failed | not run
    seconds: float = 0.0
    reason: str = ""
    log: Path | None = None


@dataclass
class _Running:
    node: StageNode
    proc: subprocess.Popen
    log: Path
    started: float
    lock_tries: int = 0
    handle: object = field(default=None, repr=False)


def default_threads(jobs: int) -> int:
    """Math threads per stage: the machine's cores shared out between the running stages."""
    return max(1, (os.cpu_count() or 1) // max(1, jobs))


def prepare_cell_runs(root: Path, nodes: dict[str, StageNode], env: dict[str, str]) -> int:
    """Create (or find) the MLflow parent run of every grid cell, one at a time.

    Returns how many cells there are. Skipped when the project has no params.yaml with a
    ``study`` section (not this project's pipeline, e.g. a toy project without MLflow).
    """
    cells = sorted({node.cell for node in nodes.values() if node.cell is not None})
    params_file = root / "params.yaml"
    if not cells or not params_file.is_file():
        return 0
    from matting_pipeline import tracking
    from matting_pipeline.config import load_params

    params = load_params(params_file)
    with tracking_uri(env["MLFLOW_TRACKING_URI"]):
        for seg, mat in cells:
            tracking.get_or_create_cell_run(params.study.experiment, seg, mat, params.model.network)
    return len(cells)


def run_pipeline(
    root: str | Path,
    jobs: int = 2,
    threads: int | None = None,
    keep_going: bool = False,
    exclusive: tuple[str, ...] = DEFAULT_EXCLUSIVE,
    track_cells: bool = True,
    out=None,
) -> list[StageResult]:
    """Bring every stage instance of the DVC project at ``root`` up to date, ``jobs`` at a time.

    Args:
        root: the project (where dvc.yaml is).
        jobs: stage instances at once (>= 1).
        threads: OMP/MKL threads per stage (default :func:`default_threads`); a value the
            caller's environment already sets wins.
        keep_going: after a failure, still run every stage that does not depend on it
            (default: start nothing new, let the running ones finish).
        exclusive: stage groups (dvc.yaml names) of which one instance runs at a time.
        track_cells: create the grid cells' MLflow parent runs first (see module doc).
        out: where the progress lines go (default: standard output).

    Returns:
        One :class:`StageResult` per stage instance, in DVC's topological order.
    """
    root = Path(root).resolve()
    if jobs < 1:
        raise ReproError(f"--jobs must be >= 1, got {jobs}")
    if not (root / "dvc.yaml").is_file():
        raise ReproError(f"{root}: no dvc.yaml here; run from the project root or pass --root")
    threads = default_threads(jobs) if threads is None else int(threads)
    if threads < 1:
        raise ReproError(f"--threads must be >= 1, got {threads}")

    def say(text: str) -> None:
        print(text, file=out if out is not None else sys.stdout, flush=True)

    nodes = load_pipeline(root)
    env = stage_env(root)
    for name in THREAD_VARIABLES:
        env.setdefault(name, str(threads))
    if track_cells:
        prepare_cell_runs(root, nodes, env)
    log_dir = root / LOG_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    total = len(nodes)
    say(
        f"{total} stage instances, {jobs} at a time, {env['OMP_NUM_THREADS']} math thread(s) each; "
        f"logs in {os.path.relpath(log_dir, Path.cwd())}/"
    )

    results: dict[str, StageResult] = {}
    waiting = list(nodes)
    running: dict[str, _Running] = {}
    failed = False
    started_all = time.monotonic()

    def launch(node: StageNode, lock_tries: int = 0) -> None:
        log = log_dir / f"{node.name.replace('/', '_').replace(':', '_')}.log"
        handle = open(log, "w")  # noqa: SIM115 (closed in finish)
        proc = subprocess.Popen(
            dvc_command("--wait-for-lock", "repro", "--single-item", node.name),
            cwd=root, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
        )
        running[node.name] = _Running(node, proc, log, time.monotonic(), lock_tries, handle)
        if not lock_tries:
            say(f"  start   {node.name}")

    def finish(name: str) -> None:
        nonlocal failed
        item = running.pop(name)
        item.handle.close()
        lines = item.log.read_text(errors="replace").splitlines()
        text = "\n".join(lines)
        seconds = time.monotonic() - item.started
        if item.proc.returncode != 0:
            if any(marker in text for marker in _DVC_LOCK_ERRORS) and item.lock_tries < _LOCK_RETRIES:
                time.sleep(2.0 * 2**item.lock_tries)  # DVC path-lock contention, not a failure
                launch(item.node, item.lock_tries + 1)
                return
            failed = True
            reason = _failure_reason(lines)
            results[name] = StageResult(name, "failed", seconds, reason, item.log)
            say(f"[{len(results):>3}/{total}] FAILED  {name} ({seconds:.1f} s): {reason}")
            tail = [line for line in lines[-TAIL_LINES:] if line.strip()]
            say("\n".join(f"        | {line}" for line in tail))
            say(f"        full log: {os.path.relpath(item.log, Path.cwd())}")
            return
        outcome = stage_outcome(text)
        results[name] = StageResult(name, outcome, seconds, log=item.log)
        say(f"[{len(results):>3}/{total}] {outcome:<7} {name} ({seconds:.1f} s)")

    def stop_all(signum, frame):  # Ctrl-C / SIGTERM: stop every running stage, then exit
        for item in running.values():
            try:
                os.killpg(item.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, stop_all) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while waiting or running:
            for name in list(waiting):
                node = nodes[name]
                parents = [results.get(p) for p in node.parents]
                bad = [r.stage for r in parents if r is not None and r.outcome in ("failed", "not run")]
                if bad:
                    results[name] = StageResult(name, "not run", reason="upstream " + ", ".join(bad) + " did not complete")
                    waiting.remove(name)
                    continue
                if any(r is None for r in parents) or len(running) >= jobs or (failed and not keep_going):
                    continue
                if node.group in exclusive and any(r.node.group == node.group for r in running.values()):
                    continue
                waiting.remove(name)
                launch(node)
            if not running:
                if waiting and not (failed and not keep_going):
                    raise RuntimeError("stages left with unfinished parents: " + ", ".join(waiting))
                break
            while True:  # wait for any running stage to end
                ended = [n for n, r in running.items() if r.proc.poll() is not None]
                if ended:
                    break
                time.sleep(0.2)
            for name in ended:
                finish(name)
    except KeyboardInterrupt:
        for item in running.values():
            item.proc.wait()
            item.handle.close()
        say("interrupted: the running stages were stopped; `python -m flows.repro` resumes where this left off")
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    for name in waiting:
        results.setdefault(name, StageResult(name, "not run", reason="stopped after a failure"))
    ordered = [results[name] for name in nodes]
    elapsed = time.monotonic() - started_all
    counts: dict[str, int] = {}
    for result in ordered:
        counts[result.outcome] = counts.get(result.outcome, 0) + 1
    say(f"done in {elapsed:.1f} s: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    return ordered


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.repro",
        description=(
            "Run the DVC pipeline like `dvc repro`, several stage instances at a time. Each "
            "instance is `dvc repro --single-item <stage>`, so dvc.lock ends exactly as after "
            "`dvc repro`. Stage logs go to logs/repro/<stage>.log."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--root", default=".", help="the DVC project (where dvc.yaml is)")
    parser.add_argument("--jobs", "-j", type=int, default=2, help="stage instances at once")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="OMP/MKL math threads per stage (default: CPU cores / jobs; OMP_NUM_THREADS in the environment wins)",
    )
    parser.add_argument("--keep-going", action="store_true", help="after a failure, run every stage that does not depend on it")
    parser.add_argument(
        "--exclusive", nargs="*", default=list(DEFAULT_EXCLUSIVE), metavar="GROUP",
        help="dvc.yaml stage groups of which one instance runs at a time",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results = run_pipeline(args.root, args.jobs, args.threads, args.keep_going, tuple(args.exclusive))
    except ReproError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    bad = [r for r in results if r.outcome in ("failed", "not run")]
    if bad:
        failed = [r.stage for r in bad if r.outcome == "failed"]
        print(
            f"error: {', '.join(failed)} failed; {len(bad) - len(failed)} stage(s) not run. "
            "Fix the cause and run again: finished stages are not redone.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
