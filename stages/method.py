"""Train a related method (DIM, AdaMatting, MGM, MGM in the wild, MAM) through the shared loop.

    python -m stages.method --method dim                 # at methods.cell of params.yaml
    matting method --method mam --seg 240 --mat 32 --iters 20

The methods comparison (``methods`` in params.yaml): each method in ``methods.compare`` is
trained at the comparison cell ``methods.cell = [S, M]`` exactly as that cell's teacher is,
but with the method's own network, guidance, loss and step
(:mod:`matting_core.methods`):

- **Data**: the composites of ``data/composite/train`` made only from the first ``M``
  matte foregrounds (:func:`stages.teacher.matte_subset_composites`; single- and
  two-instance composites, whose alpha is the target's visible alpha), views (crop, scale,
  flip) as the teacher's, plus the method's training guidance made per view from the
  cropped GT alpha (:meth:`~matting_core.methods.Method.make_guidance`, drawn from the
  view's own generator): DIM / AdaMatting a randomly eroded trimap, MGM / MGM-in-the-wild
  a randomly perturbed mask (threshold, erode/dilate, CutMask), MAM a noisy box or a point.
- **MGM in the wild** also self-trains on the cell's seg subset (the first ``S`` seg
  images, their masks as guidance): a second view stream (weak + strong view) enters each
  batch as ``natural_image``, ``natural_image_strong``, ``natural_mask``; the EMA teacher
  labels the weak view from ``methods.mgm_wild.unsup_start_fraction`` of the run on. With
  ``S = 0`` (a mat-only cell) there is no seg subset and it trains supervised only.
- **Init**: ``S > 0``: the seg-pretrained ``models/pretrain/seg<S>/model.pt``
  (:meth:`~matting_core.methods.Method.init_from_network`: encoder, ASPP and decoder
  copied, the guidance channels of the stem zero; for MAM it becomes the frozen
  segmenter). ``S = 0``: from scratch — except MAM with ``segmenter: own``, which has no
  segmenter without seg labels and is refused.
- **Optimisation**: ``train.teacher``'s lr, batch size, crop, scale range, seed and
  checkpoint cadence; ``methods.iters`` steps (``--iters`` overrides); Adam over
  :meth:`~matting_core.methods.Method.optimizer_parameters` (AdaMatting's learned
  log-variances included, MAM's segmenter excluded), cosine decay, AMP on CUDA. The loss
  module is part of the resumable state (AdaMatting's log-variances, MGM-in-the-wild's
  EMA teacher).
- **MLflow**: a run ``method-<name>-<network>-seg<S>-mat<M>-seed<k>`` nested under the
  cell's parent run, with params ``method`` and ``<name>.<option>`` and every loss term.

Output: ``models/methods/<name>/seg<S>-mat<M>/model.pt`` (loads with
:func:`matting_core.checkpoint.load_model`; its spec names the method). The same job
builder trains the grid's teachers when params.yaml's top-level ``method`` is not ``mlb``
(output ``models/teacher/seg<S>-mat<M>/model.pt``, run ``teacher-<name>-...``).

Evaluation guidance (:func:`evaluation_guidance`, used by ``stages.evaluate``): DIM and
AdaMatting take the validation set's trimap when it ships one, else
``regions.eval_trimap(GT alpha, methods.eval_trimap_kernel)``; MGM and MGM in the wild
``1[GT alpha >= eval_mask_threshold]``; MAM the box around ``GT alpha >= 0.5`` grown by
``eval_box_margin`` of its side on each side.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DESCRIPTION = __doc__

COMPARED = ("dim", "adamatting", "mgm", "mgm_wild", "mam")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, choices=COMPARED, help="the related method to train")
    parser.add_argument("--seg", type=int, default=None, help="seg budget S (default: methods.cell[0])")
    parser.add_argument("--mat", type=int, default=None, help="matte budget M (default: methods.cell[1])")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--data-root", default="data", help="data folder (default: data)")
    parser.add_argument("--models-root", default="models", help="models folder (default: models)")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default=None,
        help="override train.device (auto = CUDA when available)",
    )
    parser.add_argument("--iters", type=int, default=None, help="override methods.iters")


# ----------------------------------------------------------------------------- options


@dataclass(frozen=True)
class MethodOptions:
    """A method's params.yaml options, sorted by where they go.

    spec: architecture (``Method.method_spec``); loss: ``Method.make_loss`` (the recipe);
    guidance: training guidance (``make_guidance(train=True)``); evaluation: evaluation
    guidance (``make_guidance(train=False)``); params: every option, for MLflow.
    """

    spec: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, Any] = field(default_factory=dict)
    guidance: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)


def method_options(params, name: str) -> MethodOptions:
    """The options of method ``name`` from ``params.methods`` (``mlb`` has none)."""
    cfg = params.methods
    if name == "mlb":
        return MethodOptions()
    if name == "dim":
        o = cfg.dim
        return MethodOptions(
            loss={"phase_fractions": list(o.phase_fractions)},
            evaluation={"eval_kernel": cfg.eval_trimap_kernel},
            params={**o.model_dump(mode="json"), "eval_trimap_kernel": cfg.eval_trimap_kernel},
        )
    if name == "adamatting":
        o = cfg.adamatting
        return MethodOptions(
            spec={"propagation_steps": o.propagation_steps},
            loss={"trimap_band_px": o.trimap_band_px, "alpha_region": o.alpha_region},
            evaluation={"eval_kernel": cfg.eval_trimap_kernel},
            params={**o.model_dump(mode="json"), "eval_trimap_kernel": cfg.eval_trimap_kernel},
        )
    if name == "mgm":
        o = cfg.mgm
        return MethodOptions(
            loss={"warmup_fraction": o.warmup_fraction},
            evaluation={"eval_threshold": o.eval_mask_threshold},
            params=o.model_dump(mode="json"),
        )
    if name == "mgm_wild":
        o = cfg.mgm_wild
        return MethodOptions(
            loss={
                "warmup_fraction": o.warmup_fraction,
                "ema_momentum": o.ema_momentum,
                "unsup_start_fraction": o.unsup_start_fraction,
                "unsup_weight": o.unsup_weight,
            },
            evaluation={"eval_threshold": o.eval_mask_threshold},
            params=o.model_dump(mode="json"),
        )
    if name == "mam":
        o = cfg.mam
        return MethodOptions(
            spec={"segmenter": o.segmenter, "sam_checkpoint": o.sam_checkpoint or "", "sam_model_type": o.sam_model_type},
            loss={"warmup_fraction": o.warmup_fraction},
            guidance={"point_prob": o.point_prob, "box_noise": o.box_noise, "max_noise_px": o.max_noise_px},
            evaluation={"eval_margin": o.eval_box_margin},
            params=o.model_dump(mode="json"),
        )
    from matting_core.methods import get_method

    get_method(name)  # raises the ValueError listing the valid names
    raise ValueError(f"method {name!r} has no options section in params.methods")


class TrainingGuidance:
    """``(alpha (1,h,w), rng) → guidance`` of method ``name`` (picklable for loader workers)."""

    def __init__(self, name: str, options: Mapping[str, Any] | None = None):
        self.name = name
        self.options = dict(options or {})

    def __call__(self, alpha, rng):
        from matting_core.methods import get_method

        return get_method(self.name).make_guidance(alpha, rng, train=True, **self.options)

    def __repr__(self) -> str:
        return f"TrainingGuidance({self.name!r}, {dict(sorted(self.options.items()))!r})"


class EvaluationGuidance:
    """The evaluation guidance of a method for one validation sample (module doc).

    ``guidance(sample) → (guidance, source)``: ``sample`` as :func:`stages.shards.iter_samples`
    yields it (``alpha`` (H, W) float, optional ``trimap`` (H, W) uint8); the guidance is
    in the form :func:`matting_core.methods.predict_image` takes, ``source`` a short
    description for the metrics file (``"set trimap"``, ``"eval_trimap 15 px"``, ...).
    """

    def __init__(self, name: str, options: Mapping[str, Any] | None = None):
        from matting_core.methods import get_method

        self.method = get_method(name)
        if self.method.required_input is None:
            raise ValueError(f"method {name!r} takes no guidance")
        self.options = dict(options or {})

    def describe(self, source: str) -> str:
        o = self.options
        kind = self.method.required_input
        if kind == "trimap":
            return "the set's trimap" if source == "set" else f"trimap from GT alpha (eval_trimap, {o['eval_kernel']} px)"
        if kind == "mask":
            return f"mask 1[GT alpha >= {o['eval_threshold']:g}]"
        return f"box around GT alpha >= 0.5, margin {o['eval_margin']:g} x side"

    def __call__(self, sample: Mapping[str, Any]):
        if self.method.required_input == "trimap" and sample.get("trimap") is not None:
            return sample["trimap"], self.describe("set")
        return self.method.make_guidance(sample["alpha"], None, train=False, **self.options), self.describe("gt")


def evaluation_guidance(params, name: str) -> EvaluationGuidance | None:
    """The evaluation guidance of method ``name`` (None for ``mlb``)."""
    if name == "mlb":
        return None
    return EvaluationGuidance(name, method_options(params, name).evaluation)


def method_dir(models_root: str | Path, name: str, seg_count: int, mat_count: int) -> Path:
    """``models/methods/<name>/seg<S>-mat<M>``."""
    from stages import tracking

    return Path(models_root) / "methods" / name / tracking.cell_name(seg_count, mat_count)


# ----------------------------------------------------------------------------- the job


def build_method_job(
    *,
    stage: str,
    name: str,
    seg_count: int,
    mat_count: int,
    params,
    data_root: str | Path,
    models_root: str | Path,
    out_dir: Path,
    hyper: dict[str, Any],
):
    """A :class:`~stages.training.TrainingJob` that trains method ``name`` at cell (S, M) (module doc).

    ``stage``: ``method`` (the comparison) or ``teacher`` (the grid's teacher stages when
    params.yaml's ``method`` is not ``mlb``).
    """
    import torch

    from matting_core.checkpoint import load_model
    from matting_core.methods import get_method
    from matting_core.models import network_spec
    from stages import tracking
    from stages.teacher import matte_subset_composites
    from stages.training import (
        ShardReader,
        StageError,
        TrainingJob,
        ViewDataset,
        budget_keys,
        file_sha256,
        pretrain_dir,
        require_checkpoint,
    )

    try:
        method = get_method(name)
    except ValueError as err:
        raise StageError(str(err)) from None
    if method.name == "mlb":
        raise StageError("mlb is the main method: it trains through the pretrain, teacher and student stages")
    seg_count, mat_count = int(seg_count), int(mat_count)
    if seg_count < 0:
        raise StageError(f"--seg must be >= 0, got {seg_count}")
    if mat_count <= 0:
        raise StageError(f"--mat {mat_count}: {name} trains on matte labels; the budget M must be > 0")
    options = method_options(params, name)
    if name == "mam" and seg_count == 0 and options.spec["segmenter"] == "own":
        raise StageError(
            "mam with segmenter 'own' needs the seg-pretrained network of the cell as its segmenter, and a "
            "mat-only cell (S = 0) has none; compare MAM at a cell with S > 0, or set methods.mam.segmenter: sam "
            "with a local methods.mam.sam_checkpoint"
        )
    data_root, models_root = Path(data_root), Path(models_root)

    matte_keys = budget_keys(data_root / "shards" / "matte", mat_count)
    composite_dir = data_root / "composite" / "train"
    all_composites = ShardReader(composite_dir)
    keys = matte_subset_composites(all_composites, matte_keys)
    if not keys:
        raise StageError(
            f"{composite_dir}: no composite is made from the first {mat_count} matte foregrounds; "
            "rebuild the composite set (`matting composite`) or raise the budget"
        )
    seed = int(hyper["seed"])
    dataset = ViewDataset(
        all_composites.restrict(keys), ["alpha", "fg", "bg"], hyper["crop"], hyper["scale_range"], seed,
        guidance_key=method.required_input, guidance=TrainingGuidance(name, options.guidance),
    )

    torch.manual_seed(seed)
    spec = method.method_spec(network=params.model.network, **options.spec)
    model = method.build(spec)
    fingerprint_extra: dict[str, Any] = {"loss": options.loss, "guidance": options.guidance}
    run_params: dict[str, Any] = {}
    if seg_count > 0:
        path = require_checkpoint(
            pretrain_dir(models_root, seg_count) / "model.pt", f"matting pretrain --seg {seg_count}"
        )
        pretrained, info = load_model(path)
        if info["network_spec"] != network_spec(params.model.network):
            raise StageError(
                f"{path} is a {info['network_spec'].get('name')} but model.network is {params.model.network}; "
                f"re-run `matting pretrain --seg {seg_count}`"
            )
        transfer = method.init_from_network(model, pretrained)
        del pretrained
        init_from = str(path)
        fingerprint_extra["init_sha256"] = file_sha256(path)
        run_params.update({f"init_{k}": len(v) for k, v in transfer.items()})
    else:
        init_from = "scratch"
    # after the initial weights: MGM-in-the-wild's EMA teacher starts as a copy of them
    loss_module = method.make_loss(model, **options.loss)

    aux_dataset = None
    self_training = "off"
    if name == "mgm_wild" and seg_count > 0:
        seg_dir = data_root / "shards" / "seg"
        aux_dataset = ViewDataset(
            ShardReader(seg_dir, budget_keys(seg_dir, seg_count)), ["mask"], hyper["crop"], hyper["scale_range"],
            seed + 1, strong=True,
        )
        self_training = f"{seg_dir} first {seg_count}"

    def step_fn(batch, optimizer, step, total_steps, **amp):
        # in-step randomness (MGM band widths, warm-up coin): a pure function of (seed, step)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + int(step))
        return method.train_step(model, loss_module, batch, optimizer, generator, step, total_steps, **amp)

    def optimizer_parameters():
        return method.optimizer_parameters(model, loss_module)

    run_params.update({
        "init_from": init_from,
        "loss": name,
        "data": str(composite_dir),
        "matte_samples": mat_count,
        "guidance": method.required_input,
        "self_training": self_training if name == "mgm_wild" else "n/a",
        **tracking.flatten_params({name: options.params}),
    })
    return TrainingJob(
        stage=stage,
        seg_count=seg_count,
        mat_count=mat_count,
        cell=tracking.cell_name(seg_count, mat_count),
        out_dir=out_dir,
        model=model,
        dataset=dataset,
        objective=None,
        hyper=hyper,
        experiment=params.study.experiment,
        modules={"loss": loss_module},
        run_params=run_params,
        fingerprint_extra=fingerprint_extra,
        num_workers=params.train.num_workers,
        amp=params.train.amp,
        method=name,
        step_fn=step_fn,
        optimizer_parameters=optimizer_parameters,
        aux_dataset=aux_dataset,
    )


def method_hyper(step_cfg, iters: int | None) -> dict[str, Any]:
    """``train.teacher``'s hyper-parameters for a method (its MLB-only ``lambda_boundary`` left out)."""
    from stages.training import step_hyper

    hyper = step_hyper(step_cfg, iters)
    hyper.pop("lambda_boundary", None)
    return hyper


def build_job(args: argparse.Namespace, params, device=None):
    """The comparison job of ``--method`` at ``methods.cell`` (or ``--seg``/``--mat``)."""
    cell_seg, cell_mat = params.comparison_cell()
    seg_count = cell_seg if args.seg is None else int(args.seg)
    mat_count = cell_mat if args.mat is None else int(args.mat)
    hyper = method_hyper(params.train.teacher, params.methods.iters if args.iters is None else args.iters)
    return build_method_job(
        stage="method",
        name=args.method,
        seg_count=seg_count,
        mat_count=mat_count,
        params=params,
        data_root=args.data_root,
        models_root=args.models_root,
        out_dir=method_dir(args.models_root, args.method, seg_count, mat_count),
        hyper=hyper,
    )


def run(args: argparse.Namespace) -> int:
    from stages.training import run_training_stage

    return run_training_stage("method", build_job, args, label=f"method {args.method}")


if __name__ == "__main__":
    from stages.cli import run_module

    run_module("method")
