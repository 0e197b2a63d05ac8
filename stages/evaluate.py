"""Evaluate one grid cell on every validation set and log it to the cell's MLflow run.

The cell's *primary* model is its result: the pre-trained model for a seg-only cell
(S, 0), the teacher for a mat-only cell (0, M), the MLB student otherwise (whose
fine-tuned teacher, and the row's S-only control student, are evaluated too, so the report
can check findings F2 and F3 at equal training steps). With params.yaml's ``method`` set to
a related method, a both-cell has no student: its primary is the teacher (that method).

Writes ``metrics/seed<k>/seg<S>-mat<M>.json`` (the contract the report reads, see
``docs/FORMATS.md``) and ``eval/seed<k>/seg<S>-mat<M>/`` (per-image CSV tables and a few
prediction panels: image | GT | prediction | error [| β map]). Per set and model the file
holds the means, the per-image MSE (``per_image``: keys, whole and boundary, so the report
can bootstrap over images and seeds) and, for networks with a boundary head, ``beta``: the
mean β = sigmoid(b') in the GT boundary band, in the foreground, in the background and
outside the band (pixel-weighted over the set).

    python -m stages.evaluate --seg 240 --mat 32 --seed 0 # a grid cell, study seed 0
    python -m stages.evaluate --method dim                # a compared method (methods.cell)

``--method NAME`` evaluates ``models/seed<k>/methods/<name>/seg<S>-mat<M>/model.pt`` (the
``method@<name>`` stage) the same way and writes ``metrics/seed<k>/methods/<name>.json`` (one
model entry as in a cell file plus ``method``, ``cell``, budgets and ``guidance``) and
``eval/seed<k>/methods/<name>/``; its metrics go to the method's own MLflow training run.
MLflow: a cell's metrics go to its parent run at step k (the seed).

Guidance: every checkpoint's spec says its method (:func:`matting_core.methods.method_of`).
A related method gets its evaluation guidance from the GT of each validation sample
(:func:`matting_pipeline.jobs.evaluation_guidance`): DIM and AdaMatting the set's trimap when the
set ships trimaps, else ``regions.eval_trimap`` of the GT alpha with the fixed
``methods.eval_trimap_kernel``; MGM and MGM in the wild ``1[alpha >= 0.5]``
(``eval_mask_threshold``); MAM the box around ``alpha >= 0.5`` grown by
``methods.mam.eval_box_margin`` of its side. The guidance used is recorded per set
(``sets.<set>.guidance``). FPS of a related method includes its guidance input (MAM: the
frozen segmenter too), with a fixed synthetic guidance of the FPS size.
"""

from __future__ import annotations

import argparse
import csv
import io
import time
from pathlib import Path

import numpy as np

from matting_pipeline import atomic, shard_store, tracking
from matting_pipeline.config import COMPARED_METHODS, load_params
from matting_pipeline.layout import MODEL_NAME, Layout, cell_kind, cell_name

DESCRIPTION = __doc__

REGIONS = ("whole", "boundary", "unknown")
METRICS = ("sad", "mse", "grad", "conn")


def cell_models(
    layout: Layout, seg_count: int, mat_count: int, method: str = "mlb"
) -> tuple[str, dict[str, Path]]:
    """The primary role and the checkpoints to evaluate for a cell (``method``: params.yaml's)."""
    kind = cell_kind(seg_count, mat_count)
    if kind == "seg_only":
        return "pretrain", {"pretrain": layout.model_path("pretrain", seg_count)}
    if kind == "mat_only" or method != "mlb":
        return "teacher", {"teacher": layout.model_path("teacher", seg_count, mat_count)}
    return "student", {
        "student": layout.model_path("student", seg_count, mat_count),
        "teacher": layout.model_path("teacher", seg_count, mat_count),
        "control": layout.model_path("control", seg_count),
    }


def validation_sets(layout: Layout) -> dict[str, Path]:
    """Every validation shard set: ``data/shards/val-<name>`` and the composited set."""
    sets: dict[str, Path] = {}
    shards = layout.shards_root
    if shards.is_dir():
        for path in sorted(shards.glob("val-*")):
            if (path / "index.json").is_file():
                sets[path.name[len("val-"):]] = path
    composited = layout.composite_set("val-composited")
    if (composited / "index.json").is_file():
        sets["composited"] = composited
    return sets


def fps_guidance(required_input: str | None, size: int, device):
    """A fixed guidance of a (1, 3, size, size) input for timing: a centred person-like region.

    trimap: foreground in the middle, an unknown ring, background outside; mask: the middle
    square; prompt: a box around it. None for the main method (RGB only).
    """
    import torch

    if required_input is None:
        return None
    lo, hi = size // 4, size - size // 4
    if required_input == "prompt":
        return torch.tensor([[0.0, lo, lo, hi - 1, hi - 1]], device=device)
    g = torch.zeros(1, 1, size, size, device=device)
    if required_input == "trimap":
        band = max(1, size // 32)
        g[..., lo - band : hi + band, lo - band : hi + band] = 128 / 255
        g[..., lo + band : hi - band, lo + band : hi - band] = 1.0
    else:
        g[..., lo:hi, lo:hi] = 1.0
    return g


def measure_fps(model, size: int, iters: int, device) -> float:
    """Images per second at (1, 3, size, size), after one warm-up pass.

    A related method's model also gets its guidance (:func:`fps_guidance`), so the time is
    that of the whole prediction (MAM: segmenter + mask-to-matte).
    """
    import torch

    from matting_core.methods import method_of

    x = torch.rand(1, 3, size, size, device=device)
    guidance = fps_guidance(method_of(model).required_input, size, device)
    inputs = (x,) if guidance is None else (x, guidance)
    with torch.inference_mode():
        model(*inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            model(*inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return iters / (time.perf_counter() - start)


def _panel(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, beta: np.ndarray | None = None) -> np.ndarray:
    """image | ground truth | prediction | |error| [| β map], as one uint8 RGB strip."""
    def gray(a):
        return np.repeat((np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=2)

    tiles = [image, gray(gt), gray(pred), gray(np.abs(pred - gt))]
    if beta is not None:
        tiles.append(gray(beta))
    return np.concatenate(tiles, axis=1)


BETA_REGIONS = ("band", "fg", "bg", "outside")


def _beta_summary(per_image: list[dict]) -> dict:
    """Pixel-weighted mean β per region over a set's images (None where no pixel)."""
    out: dict = {}
    for region in BETA_REGIONS:
        n = sum(s[f"{region}_pixels"] for s in per_image)
        total = sum(s[region] * s[f"{region}_pixels"] for s in per_image if s[region] is not None)
        out[region] = float(total / n) if n else None
    return out


def _png(array: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", array[..., ::-1] if array.ndim == 3 else array)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _label_scores(labels: dict[str, list], name: str, pred: np.ndarray, gt: np.ndarray) -> None:
    """Whole and boundary MSE of a training label used as a prediction (only the MSE is kept)."""
    from matting_core.metrics import mse
    from matting_core.regions import boundary_mask

    entry = labels.setdefault(name, {"whole_mse": [], "boundary_mse": []})
    entry["whole_mse"].append(mse(pred, gt))
    entry["boundary_mse"].append(mse(pred, gt, boundary_mask(gt)))


def evaluate_model(
    model, valsets: dict[str, Path], short_side: int, device, keep: int, out_dir: Path, role: str, guidance=None,
    blend=None,
):
    """Mean metrics per set/region for one model; per-image CSVs and panels under out_dir.

    ``guidance``: a related method's :class:`matting_pipeline.jobs.EvaluationGuidance` (None for the
    main method); each set's summary then records the guidance it used (``guidance``).
    On a set with coarse masks (``mask``), the summary's ``labels`` score the training labels
    themselves against the GT: ``mask`` (S used as a prediction) and, with ``blend`` (the
    MLB teacher's ``train.student.blend``), ``blended`` (M̃ = β·α' + (1 − β)·S from this
    model's outputs): the error a model trained on them is measured against.
    """
    from matting_core.blending import blend_labels
    from matting_core.inference import predict_outputs
    from matting_core.methods import predict_image
    from matting_core.metrics import beta_stats, evaluate_alpha
    from matting_pipeline.shards import iter_samples

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **_):
            return x

    results: dict[str, dict] = {}
    for set_name, set_dir in valsets.items():
        rows = []
        betas: list[dict] = []
        labels: dict[str, dict] = {}
        sources: dict[str, int] = {}
        for i, sample in enumerate(tqdm(list(iter_samples(set_dir)), desc=f"{role}/{set_name}", unit="img")):
            image, gt = sample["image"], sample["alpha"]
            beta = None
            if guidance is None:
                outputs = predict_outputs(model, image, short_side=short_side, device=device)
                pred, beta = outputs["alpha"], outputs.get("beta")
                if beta is not None:
                    betas.append(beta_stats(beta, gt))
                if "mask" in sample:
                    mask = np.asarray(sample["mask"], dtype=np.float32)
                    _label_scores(labels, "mask", mask, gt)
                    if blend is not None and beta is not None:
                        blended = blend_labels(pred, beta, mask, blend.mode, blend.dilate)
                        _label_scores(labels, "blended", blended, gt)
            else:
                user_guidance, source = guidance(sample)
                sources[source] = sources.get(source, 0) + 1
                pred = predict_image(model, image, user_guidance, short_side=short_side, device=device)
            scores = evaluate_alpha(pred, gt, trimap=sample.get("trimap"))
            row = {"key": sample["key"]}
            for region, values in scores.items():
                for metric, value in values.items():
                    row[f"{region}/{metric}"] = float(value)
            rows.append(row)
            if i < keep:
                atomic.write_bytes(out_dir / "predictions" / role / set_name / f"{sample['key']}.png",
                                   _png(_panel(image, gt, pred, beta)))
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
        summary["per_image"] = {
            "key": [r["key"] for r in rows],
            "whole_mse": [r["whole/mse"] for r in rows],
            "boundary_mse": [r["boundary/mse"] for r in rows],
        }
        if betas:
            summary["beta"] = _beta_summary(betas)
        if labels:
            summary["labels"] = {
                name: {"whole": {"mse": float(np.mean(v["whole_mse"]))},
                       "boundary": {"mse": float(np.mean(v["boundary_mse"]))}, "per_image": v}
                for name, v in labels.items()
            }
        if sources:
            summary["guidance"] = "; ".join(sources if len(sources) == 1 else (f"{k} ({n})" for k, n in sources.items()))
        results[set_name] = summary
    return results


def evaluate_cell(params, seg_count: int, mat_count: int, layout: Layout, device_name: str = "auto") -> dict:
    from matting_core.checkpoint import load_model

    cell = cell_name(seg_count, mat_count)
    primary, checkpoints = cell_models(layout, seg_count, mat_count, params.method)
    for role, path in checkpoints.items():
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: the {role} model of cell {cell} is missing; run `dvc repro` "
                f"(or `python -m stages.{role} --seg {seg_count} --mat {mat_count}`) first"
            )
    valsets = _validation_sets_or_fail(layout)
    device = _device(device_name)
    out_dir = layout.cell_eval_dir(seg_count, mat_count)
    result = {"cell": cell, "seg_count": seg_count, "mat_count": mat_count, "seed": layout.seed or 0,
              "kind": cell_kind(seg_count, mat_count), "primary": primary, "models": {}}
    for role, path in checkpoints.items():
        model, info = load_model(path, map_location=device)
        result["models"][role] = evaluate_checkpoint(params, model, info, path, valsets, device, out_dir, role)
    atomic.write_json(layout.cell_metrics(seg_count, mat_count), result)
    return result


def _validation_sets_or_fail(layout: Layout) -> dict[str, Path]:
    valsets = validation_sets(layout)
    if not valsets:
        raise FileNotFoundError(f"no validation sets under {layout.shards_root}/val-* or "
                                f"{layout.composite_set('val-composited')}; "
                                "run the shard and composite stages first")
    return valsets


def _device(device_name: str):
    import torch

    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device_name)


def evaluate_checkpoint(params, model, info: dict, path: Path, valsets: dict[str, Path], device, out_dir: Path,
                        role: str) -> dict:
    """One model entry of a metrics file: metrics per set, params, FPS (method-aware guidance)."""
    from matting_core.methods import method_of
    from matting_pipeline.jobs import evaluation_guidance

    cfg = params.evaluate
    method = method_of(model)
    model.eval().to(device)
    guidance = evaluation_guidance(params, method.name)
    blend = params.train.student.blend if role == "teacher" and method.name == "mlb" else None
    sets = evaluate_model(model, valsets, cfg.short_side, device, cfg.save_predictions, out_dir, role, guidance, blend)
    entry = {
        "checkpoint": str(path),
        "network": str(info["network_spec"]["name"]),
        "params": int(sum(p.numel() for p in model.parameters())),
        "fps": round(measure_fps(model, cfg.fps_size, cfg.fps_iters, device), 3),
        "fps_size": cfg.fps_size,
        "device": device.type,
        "sets": sets,
    }
    if method.name != "mlb":
        entry["method"] = method.name
        entry["required_input"] = method.required_input
        entry["trainable_params"] = int(sum(p.numel() for p in method.optimizer_parameters(model)))
    return entry


def evaluate_method(params, name: str, layout: Layout, device_name: str = "auto",
                    seg_count: int | None = None, mat_count: int | None = None) -> dict:
    """Evaluate the compared method ``name`` (``models/methods/<name>/<cell>/model.pt``).

    Writes ``metrics/seed<k>/methods/<name>.json``: the model entry of :func:`evaluate_checkpoint`
    plus ``method``, ``summary``, ``cell``, ``seg_count``, ``mat_count`` and ``guidance``.
    """
    from matting_core.checkpoint import load_model
    from matting_core.methods import get_method
    from matting_pipeline.jobs import evaluation_guidance

    method = get_method(name)
    cell_seg, cell_mat = params.comparison_cell()
    seg_count = cell_seg if seg_count is None else int(seg_count)
    mat_count = cell_mat if mat_count is None else int(mat_count)
    cell = cell_name(seg_count, mat_count)
    path = layout.method_dir(name, seg_count, mat_count) / MODEL_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: the {name} model of the comparison cell {cell} is missing; run `dvc repro method@{name}` "
            f"(or `python -m stages.method --method {name}`) first"
        )
    valsets = _validation_sets_or_fail(layout)
    device = _device(device_name)
    model, info = load_model(path, map_location=device)
    if method_of_spec(info["network_spec"]) != name:
        raise ValueError(f"{path} holds a {method_of_spec(info['network_spec'])} model, not {name}")
    entry = evaluate_checkpoint(params, model, info, path, valsets, device, layout.method_eval_dir(name), name)
    guidance = evaluation_guidance(params, name)
    result = {
        "method": name,
        "summary": method.summary,
        "cell": cell,
        "seg_count": seg_count,
        "mat_count": mat_count,
        "seed": layout.seed or 0,
        "guidance": {s: v.get("guidance", "") for s, v in entry["sets"].items()},
        "guidance_rule": guidance.describe("gt") if guidance is not None else "none",
        "run_id": info["extra"].get("run_id"),
        **entry,
    }
    atomic.write_json(layout.method_metrics(name), result)
    return result


def method_of_spec(spec: dict) -> str:
    return str(spec.get("method", "mlb"))


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
            for region, value in summary.get("beta", {}).items():
                if value is not None:
                    metrics[f"{prefix}{set_name}/beta/{region}"] = value
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    seed = int(result.get("seed", 0))
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, seed) for k, v in metrics.items()])
    client.set_tag(run_id, "kind", result["kind"])
    client.set_tag(run_id, "primary_model", result["primary"])
    # the cell's models belong to params `method` (mlb unless the study trains a related
    # method everywhere): a `params.method` query then finds these next to the compared methods' runs
    client.set_tag(run_id, "method", params.method)
    if "method" not in client.get_run(run_id).data.params:  # params are write-once in MLflow
        client.log_param(run_id, "method", params.method)
    if eval_dir.is_dir():
        client.log_artifacts(run_id, str(eval_dir), artifact_path=f"evaluation/seed{seed}")
    return run_id


def log_method_to_mlflow(params, result: dict, eval_dir: Path) -> str:
    """A compared method's metrics ``<valset>/<region>/<metric>``, ``fps``, ``params_count`` on its
    own training run (nested under the comparison cell's run); on the cell's run with the
    prefix ``methods/<name>/`` when that run is not in this store."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    cell_run = tracking.get_or_create_cell_run(  # first: it creates the store under its lock
        params.study.experiment, result["seg_count"], result["mat_count"], result["network"]
    )
    client = MlflowClient()
    run_id, prefix = result.get("run_id"), ""
    try:
        if not run_id or client.get_run(run_id).info.experiment_id != client.get_run(cell_run).info.experiment_id:
            raise LookupError
    except Exception:  # noqa: BLE001 - a run from another store: log on the cell's run instead
        run_id, prefix = cell_run, f"methods/{result['method']}/"
    metrics = {f"{prefix}params_count": result["params"], f"{prefix}fps": result["fps"]}
    for set_name, summary in result["sets"].items():
        for region in REGIONS:
            for metric, value in summary.get(region, {}).items():
                metrics[f"{prefix}{set_name}/{region}/{metric}"] = value
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    if eval_dir.is_dir():
        client.log_artifacts(run_id, str(eval_dir), artifact_path="evaluation")
    return run_id


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from matting_pipeline.cli import add_seed_argument

    parser.add_argument("--seg", type=int, default=None,
                        help="segmentation budget S of the cell (required without --method)")
    parser.add_argument("--mat", type=int, default=None, help="matte budget M of the cell (required without --method)")
    parser.add_argument("--method", default=None, choices=COMPARED_METHODS,
                        help="evaluate this compared method's model at methods.cell (or --seg/--mat) instead of a cell")
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--data-root", default="data", type=Path)
    parser.add_argument("--models-root", default="models", type=Path)
    parser.add_argument("--metrics-dir", default="metrics", type=Path)
    parser.add_argument("--eval-root", default="eval", type=Path, help="per-image tables and panels")
    add_seed_argument(parser)
    parser.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"],
                        help="default: train.device from params")
    parser.add_argument("--no-mlflow", action="store_true", help="skip logging to MLflow")


def run(args: argparse.Namespace) -> int:
    import sys

    if args.method is None and (args.seg is None or args.mat is None):
        print("matting evaluate: error: --seg and --mat are required (or --method NAME for a compared method)",
              file=sys.stderr)
        return 2
    from matting_pipeline.trainer import set_math_threads

    # a corrupt checkpoint or an unreachable server raises a user error: `matting`'s entry
    # (cli.main) prints it as one `matting evaluate: error: ...` line, exit 2
    params = load_params(args.params)
    shard_store.activate(params.data.shard_url, args.data_root)  # validation sets read from there when set
    set_math_threads(params.train.threads)  # metrics must not depend on the runner's thread count
    if not args.no_mlflow:
        tracking.check_reachable()  # before the evaluation, not after it
    return _run_method(args, params) if args.method is not None else _run_cell(args, params)


def _run_cell(args: argparse.Namespace, params) -> int:
    result = evaluate_cell(params, args.seg, args.mat, _layout(args), args.device or params.train.device)
    primary = result["models"][result["primary"]]
    for set_name, summary in primary["sets"].items():
        whole, boundary = summary["whole"], summary["boundary"]
        print(f"{result['cell']} [{result['primary']}] {set_name:>12}: "
              f"MSE×1e3 whole {whole['mse'] * 1e3:.3f} boundary {boundary['mse'] * 1e3:.3f} | "
              f"SAD whole {whole['sad']:.3f} | n={summary['n']}")
    print(f"{result['cell']}: {primary['params'] / 1e6:.2f}M params, {primary['fps']:.1f} FPS "
          f"at {primary['fps_size']}² on {primary['device']}")
    if not args.no_mlflow:
        run_id = log_to_mlflow(params, result, _layout(args).cell_eval_dir(args.seg, args.mat))
        print(f"MLflow cell run {run_id}")
        if result["kind"] == "both" and params.evaluate.register_models:
            register_cell_student(params, result)
    return 0


def register_cell_student(params, result: dict) -> None:
    """The cell's student as a version of ``evaluate.registered_model``; the champion alias follows."""
    from matting_pipeline import registry

    primary = result["models"][result["primary"]]
    tags = {"cell": result["cell"], "seed": result.get("seed", 0), "experiment": params.study.experiment}
    natural = primary["sets"].get("natural")
    if natural is not None:
        tags.update(natural_whole_mse=natural["whole"]["mse"], **{registry.METRIC_TAG: natural["boundary"]["mse"]})
    name = params.evaluate.registered_model
    version = registry.register_student(name, primary["checkpoint"], None, tags)
    champion = registry.update_champion(name)
    print(f"MLflow Model Registry: {name} version {version}; champion = version {champion} "
          f"(load: mlflow.pyfunc.load_model('models:/{name}@{registry.CHAMPION}'))")


def _layout(args: argparse.Namespace) -> Layout:
    from matting_pipeline.cli import stage_layout

    return stage_layout(args, metrics=args.metrics_dir, eval=args.eval_root)


def _run_method(args: argparse.Namespace, params) -> int:
    result = evaluate_method(params, args.method, _layout(args), args.device or params.train.device, args.seg, args.mat)
    for set_name, summary in result["sets"].items():
        whole, boundary = summary["whole"], summary["boundary"]
        print(f"{result['cell']} [{args.method}] {set_name:>12}: "
              f"MSE×1e3 whole {whole['mse'] * 1e3:.3f} boundary {boundary['mse'] * 1e3:.3f} | "
              f"SAD whole {whole['sad']:.3f} | n={summary['n']} | guidance: {summary.get('guidance', '')}")
    print(f"{args.method}: {result['params'] / 1e6:.2f}M params ({result['trainable_params'] / 1e6:.2f}M trained), "
          f"{result['fps']:.1f} FPS at {result['fps_size']}² on {result['device']}")
    if not args.no_mlflow:
        run_id = log_method_to_mlflow(params, result, _layout(args).method_eval_dir(args.method))
        print(f"MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    from matting_pipeline.cli import run_module

    run_module("evaluate")
