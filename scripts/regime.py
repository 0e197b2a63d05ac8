"""Reproduce a row of the training-regime table: one both-cell, its baselines and its teacher.

Runs the real stage commands (pre-train, teacher, S-only control, MLB student with
in-process labels, evaluation) for one cell (S, M) and the given seeds, in a work folder of
its own, on the data of an existing project tree (after `dvc repro composite`), then
prints natural-set MSE x1e3 whole/boundary of the seg-only model, the S-only control, the
MLB student and the teacher, and the teacher's beta band/outside on the composited set.

    python scripts/regime.py --params params.yaml --seg 240 --mat 32 --seeds 0 1 \\
        --work /tmp/regime-default
    python scripts/regime.py --params params.yaml --set train.teacher.lambda_boundary=0.1 ...

``--set KEY=VALUE`` (repeatable, YAML values) edits a copy of the params file, so a
regime is one command line. Stages that are up to date in the work folder are skipped by
their own resume logic only when their state matches; delete the work folder to start
over. Every figure quoted in README's "Training regime" section comes from this script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def set_key(tree: dict, dotted: str, value) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        if part not in node or not isinstance(node[part], dict):
            raise SystemExit(f"--set {dotted}: no section {part!r} in the params file")
        node = node[part]
    if parts[-1] not in node:
        raise SystemExit(f"--set {dotted}: no key {parts[-1]!r} in the params file")
    node[parts[-1]] = value


def run(cmd: list[str], env: dict, log) -> float:
    start = time.perf_counter()
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log.name}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="edit a params key")
    parser.add_argument("--seg", type=int, default=240)
    parser.add_argument("--mat", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--data-root", default="data", help="a data folder holding shards and composites")
    parser.add_argument("--work", required=True, help="work folder (params copy, models, metrics, log)")
    parser.add_argument("--skip-pretrain", default=None, metavar="MODELS_ROOT",
                        help="reuse models/seed<k>/pretrain from this models root (same pre-train params)")
    args = parser.parse_args(argv)

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load(Path(args.params).read_text())
    for item in args.set:
        key, _, value = item.partition("=")
        set_key(params, key, yaml.safe_load(value))
    params_path = work / "params.yaml"
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}", PYTHONUNBUFFERED="1")
    models, metrics, evals = work / "models", work / "metrics", work / "eval"
    common = ["--params", str(params_path), "--data-root", str(Path(args.data_root).resolve())]
    py = sys.executable
    times: dict[str, float] = {}
    with open(work / "log.txt", "a") as log:
        for seed in args.seeds:
            sd = ["--seed", str(seed)]
            train = [*common, "--models-root", str(models), *sd]
            pre_src = Path(args.skip_pretrain) / f"seed{seed}" / "pretrain" / f"seg{args.seg}" if args.skip_pretrain else None
            pre_dst = models / f"seed{seed}" / "pretrain" / f"seg{args.seg}"
            if pre_src is not None and not (pre_dst / "model.pt").is_file():
                pre_dst.mkdir(parents=True, exist_ok=True)
                (pre_dst / "model.pt").write_bytes((pre_src / "model.pt").read_bytes())
            if not (pre_dst / "model.pt").is_file():
                times["pretrain"] = run([py, "-m", "stages.pretrain", *train, "--seg", str(args.seg)], env, log)
            times["teacher"] = run([py, "-m", "stages.teacher", *train, "--seg", str(args.seg), "--mat", str(args.mat)], env, log)
            times["control"] = run([py, "-m", "stages.control", *train, "--seg", str(args.seg)], env, log)
            times["student"] = run([py, "-m", "stages.student", *train, "--seg", str(args.seg), "--mat", str(args.mat)], env, log)
            ev = [*common, "--models-root", str(models), "--metrics-dir", str(metrics), "--eval-root", str(evals),
                  *sd, "--no-mlflow"]
            run([py, "-m", "stages.evaluate", *ev, "--seg", str(args.seg), "--mat", "0"], env, log)
            run([py, "-m", "stages.evaluate", *ev, "--seg", str(args.seg), "--mat", str(args.mat)], env, log)
            print(json.dumps({"seed": seed, **row(metrics / f"seed{seed}", args.seg, args.mat), "seconds": times}),
                  flush=True)
    return 0


def row(metrics_dir: Path, seg: int, mat: int) -> dict:
    seg_only = json.loads((metrics_dir / f"seg{seg}-mat0.json").read_text())["models"]["pretrain"]
    cell = json.loads((metrics_dir / f"seg{seg}-mat{mat}.json").read_text())["models"]

    def nat(entry):
        s = entry["sets"]["natural"]
        return f"{s['whole']['mse'] * 1e3:.1f}/{s['boundary']['mse'] * 1e3:.1f}"

    beta = cell["teacher"]["sets"]["composited"].get("beta", {})
    return {
        "teacher_beta_band_outside": f"{beta.get('band', float('nan')):.2f}/{beta.get('outside', float('nan')):.2f}",
        "seg_only": nat(seg_only),
        "control": nat(cell["control"]),
        "student": nat(cell["student"]),
        "teacher": nat(cell["teacher"]),
    }


if __name__ == "__main__":
    sys.exit(main())
