"""Evaluate one grid cell on every validation set and log it to the cell's MLflow run.

The cell's *primary* model is its result: the pre-trained model for a seg-only cell
(S, 0), the teacher for a mat-only cell (0, M), the MLB student otherwise (whose
fine-tuned teacher is evaluated too, so the report can check finding F3).

Writes ``metrics/seg<S>-mat<M>.json`` (the contract the report reads, see
``docs/FORMATS.md``) and ``eval/seg<S>-mat<M>/`` (per-image CSV tables and a few
prediction panels).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import time
from pathlib import Path

import numpy as np

from stages import atomic, tracking
from stages.config import load_params

DESCRIPTION = __doc__

REGIONS = ("whole", "boundary", "unknown")
METRICS = ("sad", "mse", "grad", "conn")


def cell_kind(seg_count: int, mat_count: int) -> str:
    if seg_count < 0 or mat_count < 0 or (seg_count, mat_count) == (0, 0):
        raise ValueError(f"no such grid cell: seg={seg_count}, mat={mat_count} ((0, 0) is not a cell)")
    if mat_count == 0:
        return "seg_only"
    if seg_count == 0:
        return "mat_only"
    return "both"


def cell_models(models_root: Path, seg_count: int, mat_count: int) -> tuple[str, dict[str, Path]]:
    """The primary role and the checkpoints to evaluate for a cell."""
    cell = tracking.cell_name(seg_count, mat_count)
    kind = cell_kind(seg_count, mat_count)
    if kind == "seg_only":
        return "pretrain", {"pretrain": models_root / "pretrain" / f"seg{seg_count}" / "model.pt"}
    if kind == "mat_only":
        return "teacher", {"teacher": models_root / "teacher" / cell / "model.pt"}
    return "student", {
        "student": models_root / "student" / cell / "model.pt",
        "teacher": models_root / "teacher" / cell / "model.pt",
    }


def validation_sets(data_root: Path) -> dict[str, Path]:
    """Every validation shard set: ``data/shards/val-<name>`` and the composited set."""
    sets: dict[str, Path] = {}
    shards = data_root / "shards"
    if shards.is_dir():
        for path in sorted(shards.glob("val-*")):
            if (path / "index.json").is_file():
                sets[path.name[len("val-"):]] = path
    composited = data_root / "composite" / "val-composited"
    if (composited / "index.json").is_file():
        sets["composited"] = composited
    return sets


def measure_fps(model, size: int, iters: int, device) -> float:
    """Images per second at (1, 3, size, size), after one warm-up pass."""
    import torch

    x = torch.rand(1, 3, size, size, device=device)
    with torch.inference_mode():
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return iters / (time.perf_counter() - start)


def _panel(image: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """image | ground truth | prediction | |error|, as one uint8 RGB strip."""
    def gray(a):
        return np.repeat((np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=2)

    return np.concatenate([image, gray(gt), gray(pred), gray(np.abs(pred - gt))], axis=1)


def _png(array: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", array[..., ::-1] if array.ndim == 3 else array)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def evaluate_model(model, valsets: dict[str, Path], short_side: int, device, keep: int, out_dir: Path, role: str):
    """Mean metrics per set/region for one model; per-image CSVs and panels under out_dir."""
    from matting_core.inference import predict_alpha
    from matting_core.metrics import evaluate_alpha
    from stages.shards import iter_samples

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **_):
            return x

    results: dict[str, dict] = {}
    for set_name, set_dir in valsets.items():
        rows = []
        for i, sample in enumerate(tqdm(list(iter_samples(set_dir)), desc=f"{role}/{set_name}", unit="img")):
            image, gt = sample["image"], sample["alpha"]
            pred = predict_alpha(model, image, short_side=short_side, device=device)
            scores = evaluate_alpha(pred, gt, trimap=sample.get("trimap"))
            row = {"key": sample["key"]}
            for region, values in scores.items():
                for metric, value in values.items():
                    row[f"{region}/{metric}"] = float(value)
            rows.append(row)
            if i < keep:
                atomic.write_bytes(out_dir / "predictions" / role / set_name / f"{sample['key']}.png",
                                   _png(_panel(image, gt, pred)))
        if not rows:
            raise ValueError(f"validation set {set_name!r} at {set_dir} has no samples")
        columns = list(rows[0])
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic.write_text(out_dir / f"{role}-{set_name}.csv", buf.getvalue())
        summary: dict = {"n": len(rows)}
        for region in REGIONS:
            if f"{region}/mse" in columns:
                summary[region] = {m: float(np.mean([r[f"{region}/{m}"] for r in rows])) for m in METRICS}
        results[set_name] = summary
    return results


def evaluate_cell(params, seg_count: int, mat_count: int, data_root: Path, models_root: Path,
                  metrics_dir: Path, eval_root: Path, device_name: str = "auto") -> dict:
    import torch

    from matting_core.checkpoint import load_model

    cell = tracking.cell_name(seg_count, mat_count)
    primary, checkpoints = cell_models(models_root, seg_count, mat_count)
    for role, path in checkpoints.items():
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: the {role} model of cell {cell} is missing; run `dvc repro` "
                f"(or `python -m stages.{role} --seg {seg_count} --mat {mat_count}`) first"
            )
    valsets = validation_sets(data_root)
    if not valsets:
        raise FileNotFoundError(f"no validation sets under {data_root}/shards/val-* or composite/val-composited; "
                                "run the shard and composite stages first")
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    cfg = params.evaluate
    out_dir = eval_root / cell
    result = {"cell": cell, "seg_count": seg_count, "mat_count": mat_count,
              "kind": cell_kind(seg_count, mat_count), "primary": primary, "models": {}}
    for role, path in checkpoints.items():
        model, info = load_model(path, map_location=device)
        model.eval().to(device)
        sets = evaluate_model(model, valsets, cfg.short_side, device, cfg.save_predictions, out_dir, role)
        result["models"][role] = {
            "checkpoint": str(path),
            "network": str(info["network_spec"]["name"]),
            "params": int(sum(p.numel() for p in model.parameters())),
            "fps": round(measure_fps(model, cfg.fps_size, cfg.fps_iters, device), 3),
            "fps_size": cfg.fps_size,
            "device": device.type,
            "sets": sets,
        }
    atomic.write_json(metrics_dir / f"{cell}.json", result)
    return result


def log_to_mlflow(params, result: dict, eval_dir: Path) -> str:
    """Metrics ``<valset>/<region>/<metric>`` of the primary model on the cell's parent run."""
    from mlflow.tracking import MlflowClient

    primary = result["models"][result["primary"]]
    run_id = tracking.get_or_create_cell_run(
        params.study.experiment, result["seg_count"], result["mat_count"], primary["network"]
    )
    client = MlflowClient()
    metrics = {"params_count": primary["params"], "fps": primary["fps"]}
    for role, entry in result["models"].items():
        prefix = "" if role == result["primary"] else f"{role}/"
        for set_name, summary in entry["sets"].items():
            for region in REGIONS:
                for metric, value in summary.get(region, {}).items():
                    metrics[f"{prefix}{set_name}/{region}/{metric}"] = value
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    client.set_tag(run_id, "kind", result["kind"])
    client.set_tag(run_id, "primary_model", result["primary"])
    if eval_dir.is_dir():
        client.log_artifacts(run_id, str(eval_dir), artifact_path="evaluation")
    return run_id


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seg", type=int, required=True, help="segmentation budget S of the cell")
    parser.add_argument("--mat", type=int, required=True, help="matte budget M of the cell")
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--data-root", default="data", type=Path)
    parser.add_argument("--models-root", default="models", type=Path)
    parser.add_argument("--metrics-dir", default="metrics", type=Path)
    parser.add_argument("--eval-root", default="eval", type=Path, help="per-image tables and panels")
    parser.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"],
                        help="default: train.device from params")
    parser.add_argument("--no-mlflow", action="store_true", help="skip logging to MLflow")


def run(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    result = evaluate_cell(params, args.seg, args.mat, args.data_root, args.models_root,
                           args.metrics_dir, args.eval_root, args.device or params.train.device)
    primary = result["models"][result["primary"]]
    for set_name, summary in primary["sets"].items():
        whole, boundary = summary["whole"], summary["boundary"]
        print(f"{result['cell']} [{result['primary']}] {set_name:>12}: "
              f"MSE×1e3 whole {whole['mse'] * 1e3:.3f} boundary {boundary['mse'] * 1e3:.3f} | "
              f"SAD whole {whole['sad']:.3f} | n={summary['n']}")
    print(f"{result['cell']}: {primary['params'] / 1e6:.2f}M params, {primary['fps']:.1f} FPS "
          f"at {primary['fps_size']}² on {primary['device']}")
    if not args.no_mlflow:
        run_id = log_to_mlflow(params, result, args.eval_root / result["cell"])
        print(f"MLflow cell run {run_id}")
    return 0


if __name__ == "__main__":
    from stages.cli import run_module

    run_module("evaluate")
