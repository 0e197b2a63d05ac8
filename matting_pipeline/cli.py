"""``matting``: one command line for every stage and tool, and what every stage's entry shares.

Subcommands are imported lazily, so ``matting --help`` is instant and a stage's heavy
imports (torch, ray, mlflow) are paid only when it runs. Each stage module provides::

    DESCRIPTION: str
    def add_arguments(parser: argparse.ArgumentParser) -> None
    def run(args: argparse.Namespace) -> int

and is also runnable as ``python -m stages.<name>`` (what dvc.yaml calls). The user
commands that are not stages (``predict``, ``export``) live in :mod:`matting_pipeline.tools`.

A stage that cannot start (missing input, bad budget) raises :class:`StageError`;
:func:`run_stage` turns it (and params, shard and numeric errors) into one
``matting <stage>: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import Any

# name -> (module, one-line summary). Summaries live here so `matting --help` needs no imports.
COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("stages.ingest", "validate raw datasets (or generate the synthetic set); write manifest + quarantine"),
    "shard": ("stages.shard", "pack ingested sets into WebDataset tar shards with nested subsets"),
    "composite": ("stages.composite", "composite matte foregrounds over backgrounds (DIM / two-instance / val)"),
    "pretrain": ("stages.pretrain", "pre-train the network on segmentation labels (step 1)"),
    "teacher": ("stages.teacher", "train the teacher on composited matte data (step 2)"),
    "pseudolabel": ("stages.pseudolabel", "label the seg subset with the teacher and blend (MLB) on Ray Data"),
    "student": ("stages.student", "train the MLB student on blended labels (step 3)"),
    "control": ("stages.control", "train the S-only control student (the student's recipe on the label S)"),
    "method": ("stages.method", "train a related method (DIM, AdaMatting, MGM, MGM-wild, MAM) at the comparison cell"),
    "evaluate": ("stages.evaluate", "evaluate one grid cell (or a compared method) on every validation set"),
    "report": ("stages.report", "tables, heatmaps, findings F1-F3 and an offline HTML report"),
    "predict": ("matting_pipeline.tools.predict", "predict alpha mattes for an image or a folder"),
    "export": ("matting_pipeline.tools.export", "export a checkpoint to ONNX"),
}


def _top_parser() -> argparse.ArgumentParser:
    width = max(len(n) for n in COMMANDS)
    listing = "\n".join(f"  {n.ljust(width)}  {summary}" for n, (_, summary) in COMMANDS.items())
    return argparse.ArgumentParser(
        prog="matting",
        description="Label-efficient human matting pipeline (Matte Label Blending).",
        epilog=f"commands:\n{listing}\n\nRun `matting COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser(command: str) -> argparse.ArgumentParser:
    module_name, summary = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(
        prog=f"matting {command}",
        description=getattr(module, "DESCRIPTION", summary),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    parser.set_defaults(_run=module.run)
    return parser


# Commands that start no processes of their own: no reaper (matting_pipeline.lifecycle).
_NO_REAPER = ("predict", "export")


def main(argv: list[str] | None = None, entry: bool = False) -> int:
    """Run ``matting <command> ...``. ``entry``: this process is the command's own (``python -m
    stages.X``, the console script), so what it starts must die with it
    (:func:`matting_pipeline.lifecycle.install`); not when called in-process (tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        top.error(f"unknown command {command!r}; choose from: {', '.join(COMMANDS)}")
    try:
        parser = build_parser(command)
    except ModuleNotFoundError as err:
        if err.name == COMMANDS[command][0]:
            print(f"matting {command}: not available in this version", file=sys.stderr)
            return 2
        raise
    args = parser.parse_args(rest)
    if entry and command not in _NO_REAPER:
        from matting_pipeline import lifecycle

        lifecycle.install(command)
    try:
        return int(args._run(args) or 0)
    except Exception as err:  # a user's mistake (bad params, missing input) is one line, not a traceback
        if not is_user_error(err):
            raise
        print(f"matting {command}: error: {err}", file=sys.stderr)
        return 2


# Errors that are the user's to fix, each message naming the file and the fix; checked by
# name so that `matting --help` imports none of their modules.
USER_ERRORS: tuple[tuple[str, str], ...] = (
    ("matting_pipeline.cli", "StageError"),
    ("matting_pipeline.config", "ConfigError"),
    ("matting_pipeline.shards", "ShardError"),
    ("matting_core.checkpoint", "CheckpointError"),
    ("matting_pipeline.tracking", "TrackingUnreachable"),
)


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is one of :data:`USER_ERRORS` (only modules already imported are asked)."""
    for module_name, name in USER_ERRORS:
        module = sys.modules.get(module_name)
        if module is not None and isinstance(err, getattr(module, name)):
            return True
    return False


def run_module(command: str) -> None:
    """Entry point for ``python -m stages.<command>``."""
    sys.exit(main([command, *sys.argv[1:]], entry=True))


def console_main() -> int:
    """Entry point of the ``matting`` console script."""
    return main(entry=True)


# ----------------------------------------------------------------------------- stage entry


class StageError(RuntimeError):
    """A training stage cannot start (missing input, bad budget); the message says what to run."""


def run_stage(stage: str, build_and_train: Callable[[], Any]) -> int:
    """Run a stage body; known errors become one ``matting <stage>: error: ...`` line and exit 2."""
    try:
        build_and_train()
    except Exception as err:
        if not (is_user_error(err) or isinstance(err, FloatingPointError)):
            raise
        print(f"matting {stage}: error: {err}", file=sys.stderr)
        return 2
    return 0


def add_training_arguments(parser: argparse.ArgumentParser, mat_required: bool = True) -> None:
    """Arguments every grid training stage takes: the budgets, :func:`add_run_arguments`, ``--iters``."""
    parser.add_argument("--seg", type=int, required=True, help="segmentation label budget S (subset size)")
    parser.add_argument(
        "--mat", type=int, required=mat_required, default=0, help="matte label budget M (subset size)"
    )
    add_run_arguments(parser)
    parser.add_argument("--iters", type=int, default=None, help="override the step's iters")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``--params``, ``--data-root``, ``--models-root``, ``--seed`` and ``--device`` (every training stage)."""
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--data-root", default="data", help="data folder (default: data)")
    parser.add_argument("--models-root", default="models", help="models folder (default: models)")
    add_seed_argument(parser)
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default=None,
        help="override train.device (auto = CUDA when available)",
    )


def add_seed_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seed", type=int, default=0,
        help="study seed k, one of study.seeds (default: 0): outputs under models/seed<k>/ (metrics/, eval/ "
        "alike) and a training step's seed is train.<step>.seed + k",
    )


def stage_layout(args: argparse.Namespace, **roots):
    """The :class:`~matting_pipeline.layout.Layout` of ``args.seed`` from ``--data-root`` /
    ``--models-root`` (and any other roots given)."""
    from matting_pipeline.layout import Layout

    if args.seed < 0:
        raise StageError(f"--seed must be >= 0, got {args.seed}")
    return Layout(data=args.data_root, models=args.models_root, **roots).for_seed(args.seed)


if __name__ == "__main__":
    sys.exit(console_main())
