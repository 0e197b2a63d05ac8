"""Step 2: train the teacher on composited matte data.

Loss (METHOD.md §1): ``L_t = L_matte(α', α) + λ·BCE_w(b', 1[0.05 < α < 0.95])`` with
``train.teacher``: ``matte_loss`` (``conventional`` = L1 + composition L1 + Laplacian L1,
``l1`` or ``mse``), λ = ``lambda_boundary``, the BCE's positive-class weight
``boundary_pos_weight`` and the boundary head's lr multiplier ``boundary_head_lr``. The
composition term rebuilds the image from the (augmented) ground-truth alpha, foreground
and background.

Data: the composites of ``data/composite/train`` made only from foregrounds of the nested
matte subset of ``M`` samples (``subset_keys(data/shards/matte, M)``): a composite is used
when every key in its ``meta["fg_keys"]`` is in the subset (a two-instance composite whose
second foreground lies outside the budget would leak an extra matte label). With
``train.teacher.single_person`` only one-person composites (the paper's teacher data: one
person on a people-free background; the two-instance ones stay for MGM in the wild).

Init: the pre-trained ``models/seed<k>/pretrain/seg<S>/model.pt`` when ``S > 0`` (it must exist and
have the same network), from scratch when ``S = 0`` (the mat-only cells of the grid).
Output: ``models/seed<k>/teacher/seg<S>-mat<M>/model.pt``.

With params.yaml's ``method`` set to a related method (``dim``, ``adamatting``, ``mgm``,
``mgm_wild``, ``mam``) this stage trains that method instead, on the same composites and
from the same pre-trained network (:func:`matting_pipeline.jobs.build_method_job`: the method's
network, guidance, loss and step; ``train.teacher``'s lr / batch / crop / iters; MLflow
run ``teacher-<method>-...``). The MLB stages that follow (pseudolabel, student) refuse a
related method.
"""

from __future__ import annotations

import argparse

DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from matting_pipeline.cli import add_training_arguments

    add_training_arguments(parser)


def build_job(args: argparse.Namespace, params, device=None):
    import torch

    from matting_core.losses import teacher_loss
    from matting_core.models import build_network
    from matting_pipeline.atomic import file_sha256
    from matting_pipeline.cli import StageError, stage_layout
    from matting_pipeline.jobs import (
        boundary_head_groups,
        build_method_job,
        init_backbone,
        load_pretrained,
        matte_composites,
        method_hyper,
    )
    from matting_pipeline.layout import cell_name
    from matting_pipeline.trainer import TrainingJob, step_hyper
    from matting_pipeline.views import ViewDataset

    seg_count, mat_count = int(args.seg), int(args.mat)
    if seg_count < 0:
        raise StageError(f"--seg must be >= 0, got {seg_count}")
    if mat_count <= 0:
        raise StageError(
            f"--mat {mat_count}: the teacher needs matte labels; a seg-only cell stops at the "
            f"pre-trained model (`matting pretrain --seg {seg_count}`)"
        )
    cfg = params.train.teacher
    layout = stage_layout(args)
    if params.method != "mlb":
        return build_method_job(
            stage="teacher",
            name=params.method,
            seg_count=seg_count,
            mat_count=mat_count,
            params=params,
            layout=layout,
            out_dir=layout.model_dir("teacher", seg_count, mat_count),
            hyper=method_hyper(cfg, args.iters, args.seed),
        )
    hyper = step_hyper(cfg, args.iters, args.seed)
    reader = matte_composites(layout, mat_count, cfg.single_person)
    dataset = ViewDataset(reader, ["alpha", "fg", "bg"], cfg.crop, cfg.scale_range, hyper["seed"])

    torch.manual_seed(hyper["seed"])
    model = build_network(params.model.network)
    fingerprint_extra: dict = {}
    if seg_count > 0:
        pretrained, path = load_pretrained(layout, seg_count, model.network_spec)
        model.load_state_dict(pretrained.state_dict())
        init_from = str(path)
        fingerprint_extra["init_sha256"] = file_sha256(path)
    else:
        fingerprint_extra.update(init_backbone(model, params))
        init_from = params.model.backbone_weights or "scratch"
    lambda_boundary = float(cfg.lambda_boundary)

    def objective(pred, batch):
        return teacher_loss(
            pred, batch["alpha"], None, lambda_boundary, fg=batch["fg"], bg=batch["bg"],
            matte=cfg.matte_loss, pos_weight=cfg.boundary_pos_weight,
        )

    return TrainingJob(
        stage="teacher",
        seg_count=seg_count,
        mat_count=mat_count,
        cell=cell_name(seg_count, mat_count),
        out_dir=layout.model_dir("teacher", seg_count, mat_count),
        model=model,
        dataset=dataset,
        objective=objective,
        hyper=hyper,
        experiment=params.study.experiment,
        optimizer_parameters=boundary_head_groups(model, hyper["lr"], cfg.boundary_head_lr),
        run_params={
            "init_from": init_from,
            "loss": "teacher",
            "method": "mlb",
            "data": str(reader.set_dir),
            "matte_samples": mat_count,
        },
        fingerprint_extra=fingerprint_extra,
        num_workers=params.train.num_workers,
        amp=params.train.amp,
    )


def run(args: argparse.Namespace) -> int:
    from matting_pipeline.trainer import run_training_stage

    return run_training_stage("teacher", build_job, args)


if __name__ == "__main__":
    from matting_pipeline.cli import run_module

    run_module("teacher")
