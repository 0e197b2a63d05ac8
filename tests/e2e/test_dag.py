"""The whole study DAG, end to end, on a tiny grid in a temp git repo with real DVC.

Grid: seg [12] x mat [4] -> cells (0, 4) mat-only, (12, 0) seg-only, (12, 4) both, so
every stage kind runs: ingest, shard, composite, pretrain, teacher_scratch, teacher,
pseudolabel (local Ray), student, the three evaluate kinds and the report.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import mlflow
import pytest
import yaml

import sys

import torch

from matting_core.checkpoint import load_model
from tests.e2e.tiny import make_tiny_project, pipeline_env, without_clock_fields

pytestmark = pytest.mark.slow

CELLS = ["seg0-mat4", "seg12-mat0", "seg12-mat4"]


def dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    # 2 math threads in the environment: flows.repro below gives its stages 1 (issue 16 item 6)
    env = {**pipeline_env(root), "OMP_NUM_THREADS": "2"}
    result = subprocess.run(["dvc", *args], cwd=root, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = make_tiny_project(tmp_path_factory.mktemp("study"))
    first = dvc(root, "repro")
    return root, first.stdout


def test_every_stage_ran(study):
    root, log = study
    stages = [line.split()[0] for line in dvc(root, "stage", "list").stdout.splitlines() if line.strip()]
    assert {"ingest", "shard", "composite", "pretrain@12-0", "teacher_scratch@4-0", "teacher@12-4-0",
            "pseudolabel@12-4-0", "student@12-4-0", "control@12-0", "evaluate_seg_only@12-0",
            "evaluate_mat_only@4-0", "evaluate@12-4-0", "report",
            *(f"{kind}@{name}-0" for kind in ("method", "evaluate_method")
              for name in ("dim", "adamatting", "mgm", "mgm_wild", "mam"))} == set(stages)
    for stage in stages:
        assert f"Running stage '{stage}'" in log
    # (0, 0) is never a cell: nothing was trained or evaluated for it.
    assert not (root / "metrics" / "seed0" / "seg0-mat0.json").exists()


def test_second_repro_runs_nothing(study):
    root, _ = study
    again = dvc(root, "repro")
    assert "Running stage" not in again.stdout
    assert "Data and pipelines are up to date" in again.stdout
    assert "up to date" in dvc(root, "status").stdout


def test_metrics_list_every_cell_with_the_cell_kind(study):
    root, _ = study
    shown = json.loads(dvc(root, "metrics", "show", "--json").stdout)
    files = next(iter(shown.values()))["data"]
    for cell in CELLS:
        data = files[f"metrics/seed0/{cell}.json"]["data"]
        assert data["cell"] == cell
        primary = data["models"][data["primary"]]
        natural = primary["sets"]["natural"]
        assert natural["n"] == 4
        assert 0 <= natural["boundary"]["mse"] <= 1 and natural["whole"]["sad"] >= 0
        full = json.loads((root / "metrics" / "seed0" / f"{cell}.json").read_text())  # dvc shows no lists
        natural = full["models"][full["primary"]]["sets"]["natural"]
        assert len(natural["per_image"]["whole_mse"]) == 4 and natural["labels"]["mask"]["whole"]["mse"] >= 0
    kinds = {cell: json.loads((root / "metrics" / "seed0" / f"{cell}.json").read_text())["primary"] for cell in CELLS}
    assert kinds == {"seg0-mat4": "teacher", "seg12-mat0": "pretrain", "seg12-mat4": "student"}
    # The both-cell also evaluates its fine-tuned teacher and the row's S-only control (F2, F3),
    # with the teacher's beta statistics and its blended labels scored against the GT.
    both = json.loads((root / "metrics" / "seed0" / "seg12-mat4.json").read_text())["models"]
    assert {"student", "teacher", "control"} <= set(both)
    teacher = both["teacher"]["sets"]
    assert set(teacher["composited"]["beta"]) == {"band", "fg", "bg", "outside"}
    assert {"mask", "blended"} <= set(teacher["natural"]["labels"])


def test_mlflow_holds_one_parent_run_per_cell_with_nested_training(study):
    root, _ = study
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    try:
        cells = mlflow.search_runs(experiment_names=["tiny-study"], filter_string="tags.run_kind = 'cell'")
        assert sorted(cells["tags.cell"]) == sorted(CELLS)
        for _, row in cells.iterrows():
            assert row["metrics.natural/boundary/mse"] >= 0
            assert row["metrics.natural/whole/sad"] >= 0
        both = cells[cells["tags.cell"] == "seg12-mat4"].iloc[0]
        assert both["params.seg_count"] == "12" and both["params.mat_count"] == "4"
        # one query over params.method compares MLB's cells with the related methods' runs (issue 15 item 5)
        scored = mlflow.search_runs(experiment_names=["tiny-study"],
                                    filter_string="metrics.`natural/boundary/mse` >= 0")
        by_method = scored.groupby("params.method").size().to_dict()
        assert by_method["mlb"] == len(CELLS) and {"dim", "adamatting", "mgm", "mgm_wild", "mam"} <= set(by_method)
        children = mlflow.search_runs(
            experiment_names=["tiny-study"], filter_string=f"tags.mlflow.parentRunId = '{both['run_id']}'"
        )
        assert {"teacher", "student"} <= set(children["tags.run_kind"])
        row = cells[cells["tags.cell"] == "seg12-mat0"].iloc[0]
        controls = mlflow.search_runs(
            experiment_names=["tiny-study"], filter_string=f"tags.mlflow.parentRunId = '{row['run_id']}'"
        )
        assert "control" in set(controls["tags.run_kind"])
    finally:
        mlflow.set_tracking_uri(None)


def test_report_is_written_offline(study):
    root, _ = study
    html = (root / "reports" / "index.html").read_text(encoding="utf-8")
    links = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', html)
    assert links, "the report embeds its heatmaps"
    for link in links:
        assert not re.match(r"^[a-z]+://", link), f"report loads {link} from the network"
        if not link.startswith("#"):
            assert (root / "reports" / link).is_file(), link
    findings = json.loads((root / "reports" / "findings.json").read_text())
    for fid in ("F1", "F2", "F3"):
        assert findings[fid]["verdict"] in ("held", "not held", "inconclusive")
        lo, hi = findings[fid]["ci95"]
        assert lo <= findings[fid]["delta"] <= hi
    assert set(findings["regime"]) == {"seg_only", "mat_only", "both"}
    assert (root / "reports" / "heatmaps" / "natural-boundary-mse.png").stat().st_size > 1000


def test_changing_a_student_param_reruns_only_its_dependents(study):
    root, _ = study
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["student"]["iters"] = 5
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = json.loads(dvc(root, "status", "--json").stdout)
        # The report declares every param (index.html prints them all); the S-only control
        # shares train.student (same recipe); nothing else moves.
        assert set(status) == {"student@12-4-0", "control@12-0", "report"}
        dry = dvc(root, "repro", "--dry").stdout
        ran = {line.split("'")[1] for line in dry.splitlines() if line.startswith("Running stage")}
        # A dry run lists the stages whose inputs changed now; evaluate@12-4 follows once
        # the student's model.pt is rewritten.
        assert ran == {"student@12-4-0", "control@12-0", "report"}
    finally:
        params["train"]["student"]["iters"] = 4
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_methods_comparison_rows_in_the_report(study):
    root, _ = study
    table = (root / "reports" / "methods.csv").read_text(encoding="utf-8")
    for name in ("dim", "adamatting", "mgm", "mgm_wild", "mam"):
        assert name in table
        metrics = json.loads((root / "metrics" / "seed0" / "methods" / f"{name}.json").read_text())
        assert metrics["method"] == name and metrics["cell"] == "seg12-mat4"
        natural = metrics["sets"]["natural"]
        assert natural["n"] == 4 and 0 <= natural["boundary"]["mse"] <= 1 and metrics["fps"] > 0
    assert "Method comparison" in (root / "reports" / "index.html").read_text(encoding="utf-8")


def test_flows_repro_trains_and_scores_exactly_what_dvc_repro_does(study, tmp_path_factory):
    """Issue 16 item 6: `flows.repro -j 2` (1 math thread per stage from the runner) and `dvc
    repro` (2 from the environment) trained different students; train.threads now decides."""
    root, _ = study
    other = make_tiny_project(tmp_path_factory.mktemp("study-flows"))
    result = subprocess.run([sys.executable, "-m", "flows.repro", "--jobs", "2", "--threads", "1"], cwd=other,
                            env=pipeline_env(other), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    models = sorted(p.relative_to(root) for p in (root / "models").rglob("model.pt"))
    assert len(models) >= 10 and models == sorted(p.relative_to(other) for p in (other / "models").rglob("model.pt"))
    for rel in models:
        a, _ = load_model(root / rel)
        b, _ = load_model(other / rel)
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), f"{rel}: {name} differs between dvc repro and flows.repro"
    metrics = sorted(p.relative_to(root) for p in (root / "metrics").rglob("*.json"))
    assert metrics == sorted(p.relative_to(other) for p in (other / "metrics").rglob("*.json"))
    for rel in metrics:
        assert without_clock_fields(json.loads((root / rel).read_text())) == without_clock_fields(
            json.loads((other / rel).read_text())), rel
