"""A toy DVC project with the study's shape, for the flow tests and scripts/prefect_smoke.py.

``make_toy_project(path)`` creates a real git + DVC repository whose ``dvc.yaml`` has the
same stage kinds as the real study (ingest → pretrain@S → teacher@S-M, teacher_scratch@M,
report over the grid) but whose commands are a few lines of Python that sleep briefly and
write small files. Every command appends ``start``/``end`` events (wall time, pid,
``CUDA_VISIBLE_DEVICES``) to ``.toy/timeline.jsonl``, so a test can check how many ran at
once. Failures are injected without touching dvc.yaml:

- ``.toy/fail_always``: stage names (one a line) that exit 3 on every attempt;
- ``.toy/fail_once``: stage names that exit 3 on their first attempt only (a marker in
  ``.toy/failed_once/`` remembers it), to exercise retries.

``.toy/`` is git-ignored and no stage's dep, so editing it never changes DVC's view.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

TOY_STAGE = '''\
"""Toy stage: python toy_stage.py <stage> <out> [inputs...]; see flows/toy.py."""
import json, os, sys, time
from pathlib import Path

stage, out, inputs = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
ctl = Path(".toy")
ctl.mkdir(exist_ok=True)


def event(kind):
    line = json.dumps({"stage": stage, "event": kind, "t": time.time(), "pid": os.getpid(),
                       "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                       "threads": os.environ.get("OMP_NUM_THREADS")})
    with open(ctl / "timeline.jsonl", "a") as fh:
        fh.write(line + "\\n")


def listed(name):
    path = ctl / name
    return path.is_file() and stage in path.read_text().split()


event("start")
time.sleep(float(os.environ.get("TOY_SLEEP", "SLEEP")))
if listed("fail_always"):
    event("end")
    sys.exit(f"toy failure: {stage} always fails")
marker = ctl / "failed_once" / stage
if listed("fail_once") and not marker.exists():
    marker.parent.mkdir(exist_ok=True)
    marker.touch()
    event("end")
    sys.exit(f"toy failure: {stage} fails on its first attempt")
print(f"{stage}: {len(inputs)} input(s) -> {out}")
out.parent.mkdir(parents=True, exist_ok=True)
text = stage + "\\n" + "".join(Path(p).read_text() for p in inputs)
tmp = out.with_suffix(".tmp")
tmp.write_text(text)
tmp.replace(out)
event("end")
'''


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def toy_dvc_yaml(seg: list[int], mat: list[int]) -> dict:
    """dvc.yaml of the toy study: the real stage kinds, toy commands."""
    cmd = "python toy_stage.py"
    teachers = [f"models/teacher/seg{s}-mat{m}.txt" for s in [0, *seg] for m in mat]
    pretrains = [f"models/pretrain/seg{s}.txt" for s in seg]
    return {
        "stages": {
            "ingest": {
                "cmd": f"{cmd} ingest data/ingest.txt",
                "deps": ["toy_stage.py"],
                "outs": ["data/ingest.txt"],
            },
            "pretrain": {
                "matrix": {"seg": "${study.seg}"},
                "cmd": f"{cmd} pretrain@${{item.seg}} models/pretrain/seg${{item.seg}}.txt data/ingest.txt",
                "deps": ["toy_stage.py", "data/ingest.txt"],
                "outs": ["models/pretrain/seg${item.seg}.txt"],
            },
            "teacher_scratch": {
                "matrix": {"mat": "${study.mat}"},
                "cmd": f"{cmd} teacher_scratch@${{item.mat}} models/teacher/seg0-mat${{item.mat}}.txt data/ingest.txt",
                "deps": ["toy_stage.py", "data/ingest.txt"],
                "outs": ["models/teacher/seg0-mat${item.mat}.txt"],
            },
            "teacher": {
                "matrix": {"seg": "${study.seg}", "mat": "${study.mat}"},
                "cmd": (
                    f"{cmd} teacher@${{item.seg}}-${{item.mat}} models/teacher/seg${{item.seg}}-mat${{item.mat}}.txt"
                    " models/pretrain/seg${item.seg}.txt"
                ),
                "deps": ["toy_stage.py", "models/pretrain/seg${item.seg}.txt"],
                "outs": ["models/teacher/seg${item.seg}-mat${item.mat}.txt"],
            },
            "report": {
                "cmd": f"{cmd} report reports/grid.txt " + " ".join(pretrains + teachers),
                "deps": ["toy_stage.py", *pretrains, *teachers],
                "outs": ["reports/grid.txt"],
            },
        }
    }


def make_toy_project(
    path: str | Path,
    *,
    seg: tuple[int, ...] = (1, 2),
    mat: tuple[int, ...] = (3, 4),
    sleep: float = 1.0,
    orchestration: dict | None = None,
    fail_always: tuple[str, ...] = (),
    fail_once: tuple[str, ...] = (),
) -> Path:
    """Create the toy project at ``path`` (a fresh git + DVC repo, committed); returns it."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    _git(root, "init", "-q")
    _git(root, "config", "user.email", "toy@example.invalid")
    _git(root, "config", "user.name", "toy")
    _git(root, "config", "commit.gpgsign", "false")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=root, check=True,
                   capture_output=True)
    params = {
        "study": {"experiment": "toy-study", "seg": list(seg), "mat": list(mat)},
        "orchestration": {"max_concurrency": 2, "retries": 2, "retry_delay_seconds": 1.0,
                          **(orchestration or {})},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "dvc.yaml").write_text(yaml.safe_dump(toy_dvc_yaml(list(seg), list(mat)), sort_keys=False))
    (root / "toy_stage.py").write_text(TOY_STAGE.replace("SLEEP", str(float(sleep))))
    (root / ".gitignore").write_text(textwrap.dedent("""\
        .toy/
        mlflow.db
        mlruns/
    """))
    control = root / ".toy"
    control.mkdir()
    (control / "fail_always").write_text("".join(f"{s}\n" for s in fail_always))
    (control / "fail_once").write_text("".join(f"{s}\n" for s in fail_once))
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "toy study")
    return root


def read_timeline(root: str | Path) -> list[dict]:
    """The toy commands' start/end events, in file order."""
    path = Path(root) / ".toy" / "timeline.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def max_overlap(events: list[dict]) -> int:
    """Most toy commands that were running at the same instant (ends sort before starts)."""
    points = sorted((e["t"], 0 if e["event"] == "end" else 1) for e in events)
    running = peak = 0
    for _, is_start in points:
        running += 1 if is_start else -1
        peak = max(peak, running)
    return peak
