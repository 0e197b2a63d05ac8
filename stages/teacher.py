"""Step 2: train the teacher on composited matte data.

Loss (METHOD.md §1): ``L_t = L1 + composition L1 + Laplacian L1 + λ·BCE(b', 1[0.05 < α < 0.95])``,
λ = ``train.teacher.lambda_boundary`` (0.01). The composition term rebuilds the image from
the (augmented) ground-truth alpha, foreground and background.

Data: the composites of ``data/composite/train`` made only from foregrounds of the nested
matte subset of ``M`` samples (``subset_keys(data/shards/matte, M)``): a composite is used
when every key in its ``meta["fg_keys"]`` is in the subset (a two-instance composite whose
second foreground lies outside the budget would leak an extra matte label).

Init: the pre-trained ``models/pretrain/seg<S>/model.pt`` when ``S > 0`` (it must exist and
have the same network), from scratch when ``S = 0`` (the mat-only cells of the grid).
Output: ``models/teacher/seg<S>-mat<M>/model.pt``.

With params.yaml's ``method`` set to a related method (``dim``, ``adamatting``, ``mgm``,
``mgm_wild``, ``mam``) this stage trains that method instead, on the same composites and
from the same pre-trained network (:func:`stages.method.build_method_job`: the method's
network, guidance, loss and step; ``train.teacher``'s lr / batch / crop / iters; MLflow
run ``teacher-<method>-...``). The MLB stages that follow (pseudolabel, student) refuse a
related method.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from stages.training import add_common_arguments

    add_common_arguments(parser)


def matte_subset_composites(reader, matte_keys: list[str]) -> list[str]:
    """Keys of composites (``reader``) all of whose ``meta["fg_keys"]`` lie in ``matte_keys``."""
    from stages.training import StageError

    allowed = set(matte_keys)
    selected = []
    for key in reader.keys:
        fg_keys = reader.meta(key).get("fg_keys")
        if not isinstance(fg_keys, list) or not fg_keys:
            raise StageError(f"{reader.set_dir}: composite {key!r} has no meta['fg_keys']; rebuild the composite set")
        if all(k in allowed for k in fg_keys):
            selected.append(key)
    return selected


def build_job(args: argparse.Namespace, params, device=None):
    import torch

    from matting_core.checkpoint import load_model
    from matting_core.losses import teacher_loss
    from matting_core.models import build_network
    from stages import tracking
    from stages.training import budget_keys as subset_keys
    from stages.training import (
        ShardReader,
        StageError,
        TrainingJob,
        ViewDataset,
        cell_dir,
        file_sha256,
        pretrain_dir,
        require_checkpoint,
        step_hyper,
    )

    seg_count, mat_count = int(args.seg), int(args.mat)
    if seg_count < 0:
        raise StageError(f"--seg must be >= 0, got {seg_count}")
    if mat_count <= 0:
        raise StageError(
            f"--mat {mat_count}: the teacher needs matte labels; a seg-only cell stops at the "
            f"pre-trained model (`matting pretrain --seg {seg_count}`)"
        )
    cfg = params.train.teacher
    if params.method != "mlb":
        from stages.method import build_method_job, method_hyper

        return build_method_job(
            stage="teacher",
            name=params.method,
            seg_count=seg_count,
            mat_count=mat_count,
            params=params,
            data_root=args.data_root,
            models_root=args.models_root,
            out_dir=cell_dir(args.models_root, "teacher", seg_count, mat_count),
            hyper=method_hyper(cfg, args.iters),
        )
    hyper = step_hyper(cfg, args.iters)
    data_root = Path(args.data_root)
    matte_keys = subset_keys(data_root / "shards" / "matte", mat_count)
    composite_dir = data_root / "composite" / "train"
    all_composites = ShardReader(composite_dir)
    keys = matte_subset_composites(all_composites, matte_keys)
    if not keys:
        raise StageError(
            f"{composite_dir}: no composite is made from the first {mat_count} matte foregrounds; "
            "rebuild the composite set (`matting composite`) or raise the budget"
        )
    reader = all_composites.restrict(keys)
    dataset = ViewDataset(reader, ["alpha", "fg", "bg"], cfg.crop, cfg.scale_range, hyper["seed"])

    torch.manual_seed(hyper["seed"])
    model = build_network(params.model.network)
    fingerprint_extra: dict = {}
    if seg_count > 0:
        path = require_checkpoint(
            pretrain_dir(args.models_root, seg_count) / "model.pt", f"matting pretrain --seg {seg_count}"
        )
        pretrained, info = load_model(path)
        if info["network_spec"] != model.network_spec:
            raise StageError(
                f"{path} is a {info['network_spec'].get('name')} but model.network is {params.model.network}; "
                f"re-run `matting pretrain --seg {seg_count}`"
            )
        model.load_state_dict(pretrained.state_dict())
        init_from = str(path)
        fingerprint_extra["init_sha256"] = file_sha256(path)
    else:
        init_from = "scratch"
    lambda_boundary = float(cfg.lambda_boundary)

    def objective(pred, batch):
        return teacher_loss(
            pred, batch["alpha"], None, lambda_boundary, fg=batch["fg"], bg=batch["bg"]
        )

    return TrainingJob(
        stage="teacher",
        seg_count=seg_count,
        mat_count=mat_count,
        cell=tracking.cell_name(seg_count, mat_count),
        out_dir=cell_dir(args.models_root, "teacher", seg_count, mat_count),
        model=model,
        dataset=dataset,
        objective=objective,
        hyper=hyper,
        experiment=params.study.experiment,
        run_params={
            "init_from": init_from,
            "loss": "teacher",
            "data": str(composite_dir),
            "matte_samples": mat_count,
        },
        fingerprint_extra=fingerprint_extra,
        num_workers=params.train.num_workers,
        amp=params.train.amp,
    )


def run(args: argparse.Namespace) -> int:
    from stages.training import run_training_stage

    return run_training_stage("teacher", build_job, args)


if __name__ == "__main__":
    from stages.cli import run_module

    run_module("teacher")
