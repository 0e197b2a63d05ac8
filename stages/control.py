"""The S-only control student: the MLB student's training with the label S instead of M̃.

    α'_s, b'_s = student(strong view);  L = L_matte(α'_s, S) + λ·BCE_w(b'_s, 1[0.05 < S < 0.95])

Same start (the seg-pretrained ``models/seed<k>/pretrain/seg<S>/model.pt`` when the
architecture matches, as the student), same network, steps, lr, batch, crops and strong
augmentation (``train.student``), same seg subset of ``S`` samples; only the label differs.
A student that beats its control owes that to the teacher's labels, not to the extra
training steps it had over the pre-trained (seg-only) model. The control does not depend on
the matte budget, so one per seg budget serves every both-cell (S, M) of that row, as
pre-training does. Output: ``models/seed<k>/control/seg<S>/model.pt``; its MLflow run nests
under the seg-only cell (S, 0).
"""

from __future__ import annotations

import argparse

DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from matting_pipeline.cli import add_training_arguments

    add_training_arguments(parser, mat_required=False)


def build_job(args: argparse.Namespace, params, device=None):
    import torch

    from matting_core.models import build_network
    from matting_pipeline.cli import StageError, stage_layout
    from matting_pipeline.jobs import boundary_head_groups, budget_keys, student_init, student_objective
    from matting_pipeline.layout import cell_name
    from matting_pipeline.shards import ShardReader
    from matting_pipeline.trainer import TrainingJob, step_hyper
    from matting_pipeline.views import ViewDataset

    seg_count = int(args.seg)
    if seg_count <= 0:
        raise StageError(f"--seg {seg_count}: the S-only control trains on segmentation labels; it needs S > 0")
    cfg = params.train.student
    hyper = step_hyper(cfg, args.iters, args.seed)
    layout = stage_layout(args)
    seg_dir = layout.shard_set("seg")
    reader = ShardReader(seg_dir, budget_keys(seg_dir, seg_count))

    torch.manual_seed(hyper["seed"])
    model = build_network(cfg.network or params.model.network)
    init_from, fingerprint_extra = student_init(layout, seg_count, model, params)
    dataset = ViewDataset(reader, ["mask"], cfg.crop, cfg.scale_range, hyper["seed"], strong=True)
    return TrainingJob(
        stage="control",
        seg_count=seg_count,
        mat_count=0,
        cell=cell_name(seg_count, 0),
        out_dir=layout.model_dir("control", seg_count),
        model=model,
        dataset=dataset,
        objective=student_objective(cfg, "mask"),
        hyper=hyper,
        experiment=params.study.experiment,
        optimizer_parameters=boundary_head_groups(model, hyper["lr"], cfg.boundary_head_lr),
        input_key="image_strong",
        run_params={"init_from": init_from, "loss": "student", "label_source": "mask", "data": str(seg_dir)},
        fingerprint_extra=fingerprint_extra,
        num_workers=params.train.num_workers,
        amp=params.train.amp,
    )


def run(args: argparse.Namespace) -> int:
    from matting_pipeline.trainer import run_training_stage

    return run_training_stage("control", build_job, args)


if __name__ == "__main__":
    from matting_pipeline.cli import run_module

    run_module("control")
