"""``matting export``: turn a model checkpoint into an ONNX file for deployment.

The ONNX model takes ``image`` float32 (N, 3, H, W) RGB in [0, 1] with dynamic N, H, W and
returns ``alpha`` (N, 1, H, W) in [0, 1] (the boundary head is dropped). A related method's
checkpoint takes its guidance as a second named input of the same N, H, W: ``trimap`` (DIM,
AdaMatting; float32 (N, 1, H, W): 0 background, 0.5 unknown, 1 foreground) or ``mask`` (MGM,
MGM in the wild; 0/1). MAM is refused: its point prompts go through OpenCV's connected
components, which do not trace. Normalisation and
padding to a multiple of 32 are inside the graph, so callers feed plain RGB. The network
spec is stored in the ONNX metadata (``network_spec``, JSON). Unless ``--no-check``, the
file is run in onnxruntime at two sizes and compared with PyTorch (max abs difference must
be below ``--tolerance``) before it is written; the write is atomic.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from matting_pipeline.cli import run_module

DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="model checkpoint (.pt) to export")
    parser.add_argument("--output", required=True, type=Path, help="where to write the .onnx file")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 18)")
    parser.add_argument(
        "--no-check", dest="check", action="store_false", help="skip the onnxruntime parity check"
    )
    parser.add_argument(
        "--tolerance", type=float, default=1e-4, help="max abs alpha difference allowed by the check (default 1e-4)"
    )


def run(args: argparse.Namespace) -> int:
    from matting_core.checkpoint import load_model
    from matting_core.models.onnx_export import DEFAULT_OPSET, export_onnx, onnx_parity
    from matting_pipeline.atomic import write_bytes

    if not args.checkpoint.is_file():
        print(f"matting export: checkpoint not found: {args.checkpoint}", file=sys.stderr)
        return 2
    model, info = load_model(args.checkpoint)  # a CheckpointError is one line from cli.main, exit 2
    from matting_core.methods import method_of

    guidance = method_of(model).required_input
    if guidance == "prompt":
        print(f"matting export: error: {args.checkpoint} is a MAM model; its point prompts run OpenCV's connected "
              "components, which ONNX cannot trace, so it is not exported (use `matting predict` with --box/--point)",
              file=sys.stderr)
        return 2
    opset = args.opset or DEFAULT_OPSET
    data = export_onnx(model, opset=opset, metadata={"network_spec": info["network_spec"]}, guidance=guidance)
    if args.check:
        diff = onnx_parity(data, model, guidance=guidance)
        print(f"onnxruntime vs PyTorch: max abs alpha difference {diff:.3g} (tolerance {args.tolerance:g})")
        if not diff < args.tolerance:
            print("matting export: parity check failed; nothing written", file=sys.stderr)
            return 1
    write_bytes(args.output, data)
    inputs = "image" + (f" + {guidance}" if guidance else "")
    print(f"wrote {args.output} ({len(data) / 1e6:.1f} MB, opset {opset}, network {info['network_spec']['name']}, "
          f"method {method_of(model).name}, inputs {inputs})")
    return 0


if __name__ == "__main__":
    run_module("export")
