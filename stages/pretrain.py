"""Step 1: pre-train on the segmentation set, the mask as a 0/1 matte, MSE loss.

Data: the nested subset of ``S`` samples of ``data/shards/seg`` (``subset_keys``). Output:
``models/seed<k>/pretrain/seg<S>/model.pt``. Pre-training depends on the seg budget only, so one
model serves every matte budget of that row of the grid (``--mat`` is accepted and
ignored); its MLflow run nests under the seg-only cell ``seg<S>-mat0``.
"""

from __future__ import annotations

import argparse

DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from matting_pipeline.cli import add_training_arguments

    add_training_arguments(parser, mat_required=False)


def build_job(args: argparse.Namespace, params, device=None):
    """The pre-training job for ``args.seg`` (no I/O beyond reading the shard index)."""
    import torch

    from matting_core.losses import mse_loss
    from matting_core.models import build_network
    from matting_pipeline.cli import StageError, stage_layout
    from matting_pipeline.jobs import budget_keys, init_backbone
    from matting_pipeline.layout import cell_name
    from matting_pipeline.shards import ShardReader
    from matting_pipeline.trainer import TrainingJob, step_hyper
    from matting_pipeline.views import ViewDataset

    seg_count = int(args.seg)
    if seg_count <= 0:
        raise StageError(
            f"--seg {seg_count}: there is nothing to pre-train on without segmentation labels "
            "(a mat-only cell trains its teacher from scratch: `matting teacher --seg 0 --mat M`)"
        )
    cfg = params.train.pretrain
    hyper = step_hyper(cfg, args.iters, args.seed)
    layout = stage_layout(args)
    seg_dir = layout.shard_set("seg")
    reader = ShardReader(seg_dir, budget_keys(seg_dir, seg_count))
    dataset = ViewDataset(reader, ["mask"], cfg.crop, cfg.scale_range, hyper["seed"], strong=False)
    torch.manual_seed(hyper["seed"])
    model = build_network(params.model.network)
    fingerprint_extra = init_backbone(model, params)

    def objective(pred, batch):
        return mse_loss(pred, batch["mask"])

    return TrainingJob(
        stage="pretrain",
        seg_count=seg_count,
        mat_count=0,
        cell=cell_name(seg_count, 0),
        out_dir=layout.model_dir("pretrain", seg_count),
        model=model,
        dataset=dataset,
        objective=objective,
        hyper=hyper,
        experiment=params.study.experiment,
        run_params={
            "init_from": params.model.backbone_weights or "scratch",
            "loss": "mse",
            "data": str(seg_dir),
        },
        fingerprint_extra=fingerprint_extra,
        num_workers=params.train.num_workers,
        amp=params.train.amp,
    )


def run(args: argparse.Namespace) -> int:
    from matting_pipeline.trainer import run_training_stage

    return run_training_stage("pretrain", build_job, args)


if __name__ == "__main__":
    from matting_pipeline.cli import run_module

    run_module("pretrain")
