"""Fault injection: kill the tiny pipeline N times at random moments; it must end exactly
where an uninterrupted run ends.

    python scripts/chaos.py --kills 10 --seed 0

1. **Reference.** A tiny copy of the project (``tests/e2e/tiny.py``: the committed files,
   tiny params) runs ``dvc repro`` once, uninterrupted.
2. **Chaos.** A second copy runs ``dvc repro``; after a random delay one process of that run
   gets SIGKILL: ``dvc`` itself, a stage's own process, or a process a stage started (an
   ingest pool worker, a Ray worker). The script then waits until dvc has exited and no
   process of the run is left (what :mod:`matting_pipeline.lifecycle` promises), restarts
   ``dvc repro``, and kills again, until N kills were made; then one last ``dvc repro``
   runs to the end and ``dvc status`` must be clean.
3. **Compare** every file under data/, models/, metrics/, eval/ and reports/ of the two
   copies: sha256, except where a clock or MLflow decides the bytes -- checkpoints by the
   sha256 of their tensors (``tensors_sha256``; ``extra`` holds the MLflow run id), JSON
   documents less ``fps``/``run_id`` keys, CSVs less the ``fps`` column; ``run.json``
   (run ids, status) and ``.lock`` (a pid) are checked for status / skipped; the HTML/Markdown
   report is compared with its FPS figures (one-decimal numbers) and its time stamp masked. **MLflow**: the number
   of FINISHED runs of every run name must be equal; no run may be left RUNNING (a run
   killed before its first resumable state is closed as KILLED by the run that replaces it).

Exit status 0 when everything matches; the output lists every kill and every mismatch.
Runs on the CPU in about 2-3x the time of one tiny run (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from matting_pipeline import lifecycle  # noqa: E402
from tests.e2e.tiny import make_tiny_project, pipeline_env, without_clock_fields  # noqa: E402

OUTPUT_DIRS = ("data", "models", "metrics", "eval", "reports")
# In the HTML/Markdown report a clock decides the FPS figures (printed with one decimal;
# metrics have three) and the "generated" time.
_CLOCK = re.compile(r"\b\d+\.\d\b|\d{4}-\d\d-\d\d \d\d:\d\d(:\d\d)? UTC")


def dvc(root: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=pipeline_env(root),
                          capture_output=True, text=True, **kw)


# ----------------------------------------------------------------------------- killing


def targets(dvc_pid: int) -> dict[str, list[int]]:
    """The processes of a running ``dvc repro`` by kind: dvc, stage, child (never a reaper)."""
    kinds: dict[str, list[int]] = {"dvc": [dvc_pid], "stage": [], "child": []}
    tree = lifecycle.descendants(dvc_pid)
    stages = {p for p in tree if "-m stages." in " ".join(lifecycle._cmdline(p))}
    for pid in tree:
        line = " ".join(lifecycle._cmdline(pid))
        if "matting_pipeline.lifecycle" in line or not line:
            continue
        parent = lifecycle._stat(pid)
        if pid in stages and parent is not None and parent[0] not in stages:
            kinds["stage"].append(pid)
        elif "ray::" in line or pid in stages:  # Ray workers, pool workers (forks of the stage)
            kinds["child"].append(pid)
    return kinds


def wait_quiet(proc: subprocess.Popen, tree: dict[int, int], timeout: float = 60.0) -> list[str]:
    """Wait for dvc to exit and every process of ``tree`` to end; the ones left after ``timeout``."""
    deadline = time.monotonic() + timeout
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    while time.monotonic() < deadline:
        left = [p for p, s in tree.items() if lifecycle.alive(p, s)]
        if not left and proc.poll() is not None:
            return []
        time.sleep(0.1)
    return [f"{p} {' '.join(lifecycle._cmdline(p))[:100]}" for p, s in tree.items() if lifecycle.alive(p, s)]


def chaos_run(root: Path, kills: int, rng: random.Random, max_delay: float, log) -> list[dict]:
    done: list[dict] = []
    attempt = 0
    while len(done) < kills:
        attempt += 1
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=root, env=pipeline_env(root),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delay = rng.uniform(1.0, max_delay)
        kind_roll = rng.random()
        tree: dict[int, int] = {}
        while time.monotonic() - started < delay and proc.poll() is None:
            tree.update(lifecycle.descendants(proc.pid))
            time.sleep(0.05)
        if proc.poll() is not None:
            if proc.returncode == 0:
                raise SystemExit(f"the pipeline finished after {len(done)} kill(s); lower --max-delay "
                                 f"(now {max_delay:.1f} s) to fit {kills} kills in one run")
            raise SystemExit(f"dvc repro failed on its own (exit {proc.returncode}) in attempt {attempt}:\n"
                             + dvc(root, "repro").stdout[-3000:])
        kinds = targets(proc.pid)
        tree.update(lifecycle.descendants(proc.pid))
        kind = "dvc" if kind_roll < 0.35 or not kinds["stage"] else ("stage" if kind_roll < 0.85 or not kinds["child"] else "child")
        pid = rng.choice(kinds[kind])
        what = " ".join(lifecycle._cmdline(pid))
        stage = next((lifecycle._cmdline(p) for p in kinds["stage"]), [])
        stage_name = " ".join(a for a in stage if not a.startswith("/"))[:90] or "-"
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        left = wait_quiet(proc, tree)
        record = {"kill": len(done) + 1, "after_s": round(time.monotonic() - started, 1), "target": kind,
                  "process": what[:80], "stage": stage_name, "left_running": left}
        done.append(record)
        log(f"  kill {record['kill']:>2}: {kind:<5} after {record['after_s']:>5.1f} s  stage: {stage_name}"
            + (f"  LEFT RUNNING: {left}" if left else ""))
    return done


# ----------------------------------------------------------------------------- comparing


def fingerprint(path: Path) -> tuple[str, str]:
    """``(how it was compared, digest)`` of one output file."""
    name = path.name
    if name == ".lock":
        return "skipped (a pid)", ""
    if name == "run.json":
        return "run status", json.loads(path.read_text()).get("status", "?")
    if path.suffix == ".pt":
        from matting_core.checkpoint import read_checkpoint

        ckpt = read_checkpoint(path)
        return "tensors", json.dumps([ckpt.get("tensors_sha256"), ckpt.get("network_spec")], sort_keys=True, default=str)
    if path.suffix == ".json":
        return "json less fps/run_id", json.dumps(without_clock_fields(json.loads(path.read_text())), sort_keys=True)
    if path.suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
        return "csv less fps", json.dumps([without_clock_fields(r) for r in rows], sort_keys=True)
    if path.suffix in (".html", ".md"):
        return "text, FPS and time masked", hashlib.sha256(_CLOCK.sub("#", path.read_text()).encode()).hexdigest()
    return "sha256", hashlib.sha256(path.read_bytes()).hexdigest()


def compare_outputs(a: Path, b: Path) -> tuple[Counter, list[str]]:
    how: Counter = Counter()
    problems: list[str] = []
    files = {p.relative_to(a) for d in OUTPUT_DIRS for p in (a / d).rglob("*") if p.is_file()}
    other = {p.relative_to(b) for d in OUTPUT_DIRS for p in (b / d).rglob("*") if p.is_file()}
    for rel in sorted(files ^ other):
        problems.append(f"{rel}: only in the {'reference' if rel in files else 'chaos'} run")
    for rel in sorted(files & other):
        kind, x = fingerprint(a / rel)
        _, y = fingerprint(b / rel)
        how[kind] += 1
        if x != y:
            problems.append(f"{rel}: differs ({kind})")
        if kind == "run status" and y != "FINISHED":
            problems.append(f"{rel}: status {y} in the chaos run")
    return how, problems


def mlflow_runs(root: Path) -> Counter:
    """``(run name, status)`` -> count over every run of the tiny study's store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    counts: Counter = Counter()
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id], max_results=5000):
            counts[(run.info.run_name, run.info.status)] += 1
    return counts


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs to inject (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the delays and targets (default 0)")
    parser.add_argument("--max-delay", type=float, default=None,
                        help="longest wait before a kill, s (default: 1.2 x reference time / kills, at least 5)")
    parser.add_argument("--workdir", default=None, help="where the two tiny projects go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    args = parser.parse_args(argv)
    for name, value in dict(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1", RAY_USAGE_STATS_ENABLED="0",
                            RAY_AUTH_MODE="disabled", DVC_NO_ANALYTICS="1").items():
        os.environ.setdefault(name, value)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)

    def log(text: str) -> None:
        print(text, flush=True)

    try:
        reference = make_tiny_project(work / "reference")
        t0 = time.monotonic()
        result = dvc(reference, "repro")
        ref_s = time.monotonic() - t0
        if result.returncode != 0:
            log(result.stdout[-3000:] + result.stderr[-3000:])
            return 2
        log(f"reference: uninterrupted dvc repro in {ref_s:.0f} s")
        max_delay = args.max_delay or max(5.0, 1.2 * ref_s / max(1, args.kills))
        chaos = make_tiny_project(work / "chaos")
        log(f"chaos: {args.kills} SIGKILLs, each after a delay in [1, {max_delay:.1f}] s (seed {args.seed})")
        t0 = time.monotonic()
        kills = chaos_run(chaos, args.kills, rng, max_delay, log)
        final = dvc(chaos, "repro")
        chaos_s = time.monotonic() - t0
        status = dvc(chaos, "status").stdout.strip()
        log(f"chaos: final dvc repro exit {final.returncode}; total {chaos_s:.0f} s; dvc status: {status.splitlines()[-1] if status else '?'}")
        problems = [f"kill {k['kill']}: left running {k['left_running']}" for k in kills if k["left_running"]]
        if final.returncode != 0:
            problems.append("final dvc repro failed:\n" + final.stdout[-2000:] + final.stderr[-2000:])
        if "up to date" not in status:
            problems.append(f"dvc status not clean:\n{status}")
        how, diffs = compare_outputs(reference, chaos)
        problems += diffs
        log("outputs compared: " + ", ".join(f"{n} by {k}" for k, n in sorted(how.items())))
        ref_runs, chaos_runs = mlflow_runs(reference), mlflow_runs(chaos)
        finished = lambda c: Counter({name: n for (name, st), n in c.items() if st == "FINISHED"})  # noqa: E731
        if finished(ref_runs) != finished(chaos_runs):
            problems.append(f"FINISHED MLflow runs differ: reference {sum(finished(ref_runs).values())}, "
                            f"chaos {sum(finished(chaos_runs).values())}: "
                            f"{sorted((finished(ref_runs) - finished(chaos_runs)) + (finished(chaos_runs) - finished(ref_runs)))}")
        running = [name for (name, st), n in chaos_runs.items() if st == "RUNNING"]
        if running:
            problems.append(f"MLflow runs left RUNNING: {running}")
        by_status = Counter()
        for (_, st), n in chaos_runs.items():
            by_status[st] += n
        log(f"MLflow: reference {sum(ref_runs.values())} runs ({sum(finished(ref_runs).values())} FINISHED); "
            f"chaos {dict(by_status)}")
        kinds = Counter(k["target"] for k in kills)
        log(f"kills: {dict(kinds)}; stages hit: {len({k['stage'] for k in kills})}")
        if problems:
            log(f"FAIL: {len(problems)} problem(s)")
            for p in problems:
                log(f"  - {p}")
            return 1
        log(f"PASS: {len(kills)} kills; every output equals the uninterrupted run's; MLflow FINISHED runs match")
        return 0
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
