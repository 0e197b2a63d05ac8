"""Train a related method (DIM, AdaMatting, MGM, MGM in the wild, MAM) through the shared loop.

    python -m stages.method --method dim                 # at methods.cell of params.yaml
    matting method --method mam --seg 240 --mat 32 --iters 20

The methods comparison (``methods`` in params.yaml): each method in ``methods.compare`` is
trained at the comparison cell ``methods.cell = [S, M]`` exactly as that cell's teacher is,
but with the method's own network, guidance, loss and step
(:mod:`matting_core.methods`):

- **Data**: the composites of ``data/composite/train`` made only from the first ``M``
  matte foregrounds (:func:`matting_pipeline.jobs.matte_composites`; single- and
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
- **Init**: ``S > 0``: the seg-pretrained ``models/seed<k>/pretrain/seg<S>/model.pt``
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
(output ``models/seed<k>/teacher/seg<S>-mat<M>/model.pt``, run ``teacher-<name>-...``).

Evaluation guidance (:func:`matting_pipeline.jobs.evaluation_guidance`, used by ``stages.evaluate``): DIM and
AdaMatting take the validation set's trimap when it ships one, else
``regions.eval_trimap(GT alpha, methods.eval_trimap_kernel)``; MGM and MGM in the wild
``1[GT alpha >= eval_mask_threshold]``; MAM the box around ``GT alpha >= 0.5`` grown by
``eval_box_margin`` of its side on each side.
"""

from __future__ import annotations

import argparse

from matting_pipeline.config import COMPARED_METHODS

DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from matting_pipeline.cli import add_run_arguments

    parser.add_argument("--method", required=True, choices=COMPARED_METHODS, help="the related method to train")
    parser.add_argument("--seg", type=int, default=None, help="seg budget S (default: methods.cell[0])")
    parser.add_argument("--mat", type=int, default=None, help="matte budget M (default: methods.cell[1])")
    add_run_arguments(parser)
    parser.add_argument("--iters", type=int, default=None, help="override methods.iters")


def build_job(args: argparse.Namespace, params, device=None):
    """The comparison job of ``--method`` at ``methods.cell`` (or ``--seg``/``--mat``)."""
    from matting_pipeline.cli import stage_layout
    from matting_pipeline.jobs import build_method_job, method_hyper

    cell_seg, cell_mat = params.comparison_cell()
    seg_count = cell_seg if args.seg is None else int(args.seg)
    mat_count = cell_mat if args.mat is None else int(args.mat)
    hyper = method_hyper(params.train.teacher, params.methods.iters if args.iters is None else args.iters, args.seed)
    return build_method_job(
        stage="method",
        name=args.method,
        seg_count=seg_count,
        mat_count=mat_count,
        params=params,
        layout=(layout := stage_layout(args)),
        out_dir=layout.method_dir(args.method, seg_count, mat_count),
        hyper=hyper,
    )


def run(args: argparse.Namespace) -> int:
    from matting_pipeline.trainer import run_training_stage

    return run_training_stage("method", build_job, args, label=f"method {args.method}")


if __name__ == "__main__":
    from matting_pipeline.cli import run_module

    run_module("method")
