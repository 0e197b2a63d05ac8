"""Step 3: the MLB student on the segmentation set (METHOD.md §1).

    α'_t, b'_t = teacher(weak view);  β = sigmoid(b'_t);  M̃ = β ⊙ α'_t + (1 − β) ⊙ S
    L_s = L_matte(α'_s, M̃) + λ·BCE_w(b'_s, 1[0.05 < M̃ < 0.95]),
    α'_s, b'_s = student(strong view: the same geometry + colour jitter, blur, noise, JPEG)

Needs ``S > 0`` and ``M > 0``. Data: the nested subset of ``S`` seg samples. Loss knobs
(``train.student``): ``matte_loss`` (conventional | l1 | mse), λ = ``lambda_boundary``,
``boundary_pos_weight``, ``boundary_head_lr``; the ``control`` stage trains the same way on S.

Label modes (``train.student.label_mode``):
- ``offline`` (default; any teacher/student pair): the labels come from the pseudo-label
  shards ``data/pseudolabels/seed<k>/seg<S>-mat<M>/`` (image, mask, blended, ...) written by the
  ``pseudolabel`` stage; the blended label gets the same geometry as the image. When that
  directory does not exist, the frozen teacher ``models/seed<k>/teacher/seg<S>-mat<M>/model.pt``
  labels each weak view in-process with the same function
  (:func:`matting_core.training.mlb_labels`).
- ``ema`` (teacher and student must share an architecture): the teacher starts from the
  teacher checkpoint, labels the weak view inside the loop and follows the student,
  ``θ_t ← m·θ_t + (1 − m)·θ_s`` after each step (m = ``train.student.ema_momentum``).

MLB only: with params.yaml's ``method`` set to a related method the stage refuses to run
(the grid's teacher stages train that method; it has no MLB student).

Student network: ``train.student.network`` or ``model.network``. Init (project choice): the
pre-trained ``models/seed<k>/pretrain/seg<S>/model.pt`` when its architecture equals the student's,
else from scratch. Output: ``models/seed<k>/student/seg<S>-mat<M>/model.pt``.
"""

from __future__ import annotations

import argparse

DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from matting_pipeline.cli import add_training_arguments

    add_training_arguments(parser)


def build_job(args: argparse.Namespace, params, device=None):
    import torch

    from matting_core.checkpoint import load_model
    from matting_core.models import build_network
    from matting_core.training import ema_update, mlb_labels
    from matting_pipeline.atomic import file_sha256
    from matting_pipeline.cli import StageError, stage_layout
    from matting_pipeline.jobs import (
        boundary_head_groups,
        budget_keys,
        mlb_only_message,
        require_checkpoint,
        student_init,
        student_objective,
    )
    from matting_pipeline.layout import cell_name
    from matting_pipeline.shards import ShardReader, read_index
    from matting_pipeline.trainer import TrainingJob, autocast_settings, step_hyper
    from matting_pipeline.views import ViewDataset

    seg_count, mat_count = int(args.seg), int(args.mat)
    if params.method != "mlb":
        raise StageError(mlb_only_message("student", params.method, seg_count, mat_count))
    if seg_count <= 0 or mat_count <= 0:
        raise StageError(
            f"--seg {seg_count} --mat {mat_count}: the MLB student needs both budgets > 0 "
            "(seg-only cells stop at `matting pretrain`, mat-only cells at `matting teacher`)"
        )
    cfg = params.train.student
    hyper = step_hyper(cfg, args.iters, args.seed)
    cell = cell_name(seg_count, mat_count)
    layout = stage_layout(args)
    seg_dir = layout.shard_set("seg")
    seg_keys = budget_keys(seg_dir, seg_count)
    pseudo_dir = layout.pseudolabel_dir(seg_count, mat_count)
    teacher_path = layout.model_path("teacher", seg_count, mat_count)
    teacher_cmd = f"matting teacher --seg {seg_count} --mat {mat_count}"
    device = torch.device("cpu") if device is None else device
    autocast_dtype, _ = autocast_settings(device, params.train.amp)

    student_network = cfg.network or params.model.network
    torch.manual_seed(hyper["seed"])
    model = build_network(student_network)
    fingerprint_extra: dict = {"label_mode": cfg.label_mode}
    init_from, init_fingerprint = student_init(layout, seg_count, model, params)
    fingerprint_extra.update(init_fingerprint)

    teacher = None
    modules: dict = {}
    after_step = None
    if cfg.label_mode == "offline" and (pseudo_dir / "index.json").is_file():
        label_source = "pseudolabel-shards"
        index = read_index(pseudo_dir)
        if set(index["keys"]) != set(seg_keys):
            raise StageError(
                f"{pseudo_dir} labels {index['count']} samples but the seg budget is {seg_count} "
                f"(or another subset); re-run `matting pseudolabel --seg {seg_count} --mat {mat_count}`"
            )
        reader = ShardReader(pseudo_dir, seg_keys)
        roles = ["mask", "blended"]
        fingerprint_extra["labels_index_sha256"] = file_sha256(pseudo_dir / "index.json")
    else:
        label_source = "in-process" if cfg.label_mode == "offline" else "ema"
        teacher, t_info = load_model(require_checkpoint(teacher_path, teacher_cmd), map_location=device)
        if cfg.label_mode == "ema" and t_info["network_spec"] != model.network_spec:
            raise StageError(
                f"label_mode ema needs teacher and student to share an architecture, but the teacher "
                f"{teacher_path} is {t_info['network_spec'].get('name')} and the student is {student_network}; "
                "set train.student.network to the teacher's network (or null), or use label_mode: offline"
            )
        teacher.requires_grad_(False)
        teacher.eval()
        fingerprint_extra["teacher_sha256"] = file_sha256(teacher_path)
        reader = ShardReader(seg_dir, seg_keys)
        roles = ["mask"]
        blend = cfg.blend

        def prepare_batch(batch):
            batch.update(
                mlb_labels(teacher, batch["image"], batch["mask"], blend.mode, blend.dilate, autocast_dtype)
            )
            return batch

        if cfg.label_mode == "ema":
            modules["ema_teacher"] = teacher
            momentum = float(cfg.ema_momentum)

            def after_step():
                ema_update(teacher, model, momentum)

    dataset = ViewDataset(reader, roles, cfg.crop, cfg.scale_range, hyper["seed"], strong=True)

    return TrainingJob(
        stage="student",
        seg_count=seg_count,
        mat_count=mat_count,
        cell=cell,
        out_dir=layout.model_dir("student", seg_count, mat_count),
        model=model,
        dataset=dataset,
        objective=student_objective(cfg, "blended"),
        hyper=hyper,
        experiment=params.study.experiment,
        optimizer_parameters=boundary_head_groups(model, hyper["lr"], cfg.boundary_head_lr),
        input_key="image_strong",
        prepare_batch=None if teacher is None else prepare_batch,
        after_step=after_step,
        modules=modules,
        run_params={
            "init_from": init_from,
            "loss": "student",
            "method": "mlb",
            "label_source": label_source,
            "teacher_checkpoint": str(teacher_path),
            "data": str(reader.set_dir),
        },
        fingerprint_extra=fingerprint_extra,
        num_workers=params.train.num_workers,
        amp=params.train.amp,
    )


def run(args: argparse.Namespace) -> int:
    from matting_pipeline.trainer import run_training_stage

    return run_training_stage("student", build_job, args)


if __name__ == "__main__":
    from matting_pipeline.cli import run_module

    run_module("student")
