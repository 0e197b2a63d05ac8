"""``matting``: one command line for every stage and tool.

Subcommands are imported lazily, so ``matting --help`` is instant and a stage's heavy
imports (torch, ray, mlflow) are paid only when it runs. Each stage module provides::

    DESCRIPTION: str
    def add_arguments(parser: argparse.ArgumentParser) -> None
    def run(args: argparse.Namespace) -> int

and is also runnable as ``python -m stages.<name>`` (what dvc.yaml calls).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line summary). Summaries live here so `matting --help` needs no imports.
COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("stages.ingest", "validate raw datasets (or generate the synthetic set); write manifest + quarantine"),
    "shard": ("stages.shard", "pack ingested sets into WebDataset tar shards with nested subsets"),
    "composite": ("stages.composite", "composite matte foregrounds over backgrounds (DIM / two-instance / val)"),
    "pretrain": ("stages.pretrain", "pre-train the network on segmentation labels (step 1)"),
    "teacher": ("stages.teacher", "train the teacher on composited matte data (step 2)"),
    "pseudolabel": ("stages.pseudolabel", "label the seg subset with the teacher and blend (MLB) on Ray Data"),
    "student": ("stages.student", "train the MLB student on blended labels (step 3)"),
    "method": ("stages.method", "train a related method (DIM, AdaMatting, MGM, MGM-wild, MAM) at the comparison cell"),
    "evaluate": ("stages.evaluate", "evaluate one grid cell (or a compared method) on every validation set"),
    "report": ("stages.report", "tables, heatmaps, findings F1-F3 and an offline HTML report"),
    "predict": ("stages.predict", "predict alpha mattes for an image or a folder"),
    "export": ("stages.export", "export a checkpoint to ONNX"),
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


def main(argv: list[str] | None = None) -> int:
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
    return int(args._run(args) or 0)


def run_module(command: str) -> None:
    """Entry point for ``python -m stages.<command>``."""
    sys.exit(main([command, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
