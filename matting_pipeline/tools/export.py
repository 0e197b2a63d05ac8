"""``matting export``: turn a model checkpoint into an ONNX file for deployment.

The ONNX model takes ``image`` float32 (N, 3, H, W) RGB in [0, 1] with dynamic N, H, W and
returns ``alpha`` (N, 1, H, W) in [0, 1] (the boundary head is dropped). A related method's
checkpoint takes its guidance as a second named input of the same N, H, W: ``trimap`` (DIM,
AdaMatting; float32 (N, 1, H, W): 0 background, 0.5 unknown, 1 foreground), ``mask`` (MGM,
MGM in the wild; 0/1) or ``prompt_mask`` (MAM: the prompt box drawn as a 0/1 region mask,
which gives exactly the box prompt's alpha; a point prompt's connected component does not
trace, so give its box). Normalisation and
padding to a multiple of 32 are inside the graph, so callers feed plain RGB. The network
spec is stored in the ONNX metadata (``network_spec``, JSON). Unless ``--no-check``, the
file is run in onnxruntime at two sizes and compared with PyTorch (max abs difference must
be below ``--tolerance``) before it is written; the write is atomic.

With ``--int8`` the file written is the int8 model for CPU inference
(:func:`matting_core.models.onnx_quant.quantize_int8`: static quantization, QDQ, calibrated on
``--calibration-count`` images of a training shard set, ``data/composite/train`` by default,
at their own size up to a short side of 512 px; a guided method's trimap or mask is made
from their alpha). The fp32 parity check runs first; then the int8 model must agree with
the fp32 one on ``--check-count`` further images of the set: mean absolute alpha
difference at most ``--int8-tolerance``. Figures (FPS, natural-set MSE):
``benchmarks/bench_inference.py``.
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
    int8 = parser.add_argument_group("int8 (CPU inference)")
    int8.add_argument("--int8", action="store_true",
                      help="write the int8 model (static quantization calibrated on training shards) instead of fp32")
    int8.add_argument("--calibration", type=Path, default=Path("data/composite/train"),
                      help="shard set whose images calibrate the int8 ranges (default data/composite/train)")
    int8.add_argument("--calibration-count", type=int, default=32, help="calibration images (default 32)")
    int8.add_argument("--check-count", type=int, default=8,
                      help="further images of the set for the int8 agreement check (default 8)")
    int8.add_argument("--int8-tolerance", type=float, default=0.02,
                      help="mean abs alpha difference int8 vs fp32 allowed by the check (default 0.02)")


def run(args: argparse.Namespace) -> int:
    from matting_core.checkpoint import load_model
    from matting_core.models.onnx_export import DEFAULT_OPSET, export_onnx, guidance_input, onnx_parity
    from matting_pipeline.atomic import write_bytes

    if not args.checkpoint.is_file():
        print(f"matting export: checkpoint not found: {args.checkpoint}", file=sys.stderr)
        return 2
    model, info = load_model(args.checkpoint)  # a CheckpointError is one line from cli.main, exit 2
    from matting_core.methods import method_of

    guidance = guidance_input(model)  # MAM: the prompt box as a region mask (point prompts do not trace)
    if guidance == "prompt_mask":
        from matting_core.methods.mam import OwnSegmenter

        if not isinstance(getattr(model, "segmenter", None), OwnSegmenter):
            print(f"matting export: error: {args.checkpoint} is a MAM model with an external segmenter (SAM), "
                  "which is not part of the checkpoint; only MAM with the project's own segmenter exports",
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
    precision = "fp32"
    if args.int8:
        data, precision = _int8(data, args, guidance), "int8"
        if data is None:
            return 1
    write_bytes(args.output, data)
    inputs = "image" + (f" + {guidance}" if guidance else "")
    print(f"wrote {args.output} ({len(data) / 1e6:.1f} MB, {precision}, opset {opset}, network "
          f"{info['network_spec']['name']}, method {method_of(model).name}, inputs {inputs})")
    return 0


def sample_feed(image, alpha, guidance: str | None, max_side: int = 512):
    """``(feed, alpha)`` of one shard sample for the exported model: ``image`` (1, 3, h, w)
    float32 RGB in [0, 1] with the short side at most ``max_side``, ``alpha`` (H, W) resized
    alike (None stays None), and a guided method's ``trimap`` / ``mask`` / ``prompt_mask``
    made from that alpha."""
    import cv2
    import numpy as np

    from matting_core.inference import resize_short_side
    from matting_core.models.onnx_quant import guidance_from_alpha

    small = resize_short_side(image, min(max_side, min(image.shape[:2])))
    feed = {"image": np.ascontiguousarray(small.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0}
    if alpha is not None:
        h, w = small.shape[:2]
        alpha = cv2.resize(np.asarray(alpha, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    if guidance is not None:
        feed[guidance] = guidance_from_alpha(guidance, alpha)
    return feed, alpha


def calibration_feeds(set_dir: Path, count: int, guidance: str | None, max_side: int = 512) -> list[dict]:
    """``count`` feeds (:func:`sample_feed`) from the first samples of ``set_dir``'s subset
    order; a guided method's guidance is made from each sample's alpha (or its mask)."""
    from matting_pipeline.cli import StageError
    from matting_pipeline.shards import iter_samples, read_index, subset_keys

    if not (set_dir / "index.json").is_file():
        raise StageError(f"{set_dir}: no shard set here (no index.json) to calibrate the int8 model on; make it "
                         "with `dvc repro` (data/composite/train) or point --calibration at a shard set")
    available = int(read_index(set_dir)["count"])
    if count > available:
        raise StageError(f"{set_dir} holds {available} samples; --calibration-count plus --check-count asks for "
                         f"{count}: lower them")
    feeds = []
    for sample in iter_samples(set_dir, subset_keys(set_dir, count)):
        source = sample.get("alpha", sample.get("mask")) if guidance is not None else None
        if guidance is not None and source is None:
            raise StageError(f"{set_dir}: sample {sample['key']} has no alpha or mask to make the "
                             f"{guidance} of the calibration from; use a set that has (data/composite/train)")
        feeds.append(sample_feed(sample["image"], source, guidance, max_side)[0])
    return feeds


def quantize_from_set(fp32: bytes, set_dir: Path, calibration_count: int, check_count: int,
                      guidance: str | None) -> tuple[bytes, dict[str, float]]:
    """``(int8 model, agreement)``: ``fp32`` quantized on the first ``calibration_count``
    samples of ``set_dir`` and compared with it on the next ``check_count``
    (:func:`~matting_core.models.onnx_quant.int8_agreement`)."""
    from matting_core.models.onnx_quant import int8_agreement, quantize_int8

    feeds = calibration_feeds(set_dir, calibration_count + check_count, guidance)
    data = quantize_int8(fp32, feeds[:calibration_count], metadata={"calibration_set": set_dir.as_posix()})
    return data, int8_agreement(fp32, data, feeds[calibration_count:])


def _int8(fp32: bytes, args: argparse.Namespace, guidance: str | None) -> bytes | None:
    """The int8 model of ``fp32`` when it passes its agreement check, else None (said why)."""
    from matting_pipeline.cli import StageError

    if args.calibration_count < 1 or args.check_count < 1:
        raise StageError("--calibration-count and --check-count must be >= 1")
    data, agreement = quantize_from_set(fp32, args.calibration, args.calibration_count, args.check_count, guidance)
    print(f"int8 vs fp32 on {args.check_count} held-out images of {args.calibration}: mean abs alpha difference "
          f"{agreement['mean_abs']:.4f} (tolerance {args.int8_tolerance:g}), 99th percentile "
          f"{agreement['p99_abs']:.4f}, max {agreement['max_abs']:.4f}")
    if not agreement["mean_abs"] <= args.int8_tolerance:
        print("matting export: int8 agreement check failed; nothing written (more --calibration-count, or export fp32)",
              file=sys.stderr)
        return None
    return data


if __name__ == "__main__":
    run_module("export")
