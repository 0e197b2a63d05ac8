"""Inference speed of the matting networks at 512×512, batch 1, next to the paper's figures.

For each network (default ``unet_r18x0.5``, ``unet_r18``, ``unet_r101``; random weights — speed
does not depend on them) it measures frames per second of

* eager PyTorch on CPU (``torch.inference_mode``, eval mode, fp32),
* ONNX Runtime on CPU (the model exported exactly as ``matting export`` does, default
  session options: all graph optimisations, intra-op threads = cores),
* and, when ``torch.cuda.is_available()``, eager PyTorch on CUDA (fp32, synchronised) and
  ONNX Runtime's CUDA provider when the installed onnxruntime has it,

after warm-up runs, as iterations / wall-clock seconds. The paper (METHOD.md: ONNX Runtime,
512×512; GPU = V100, CPU model unstated) reports UNet-R101 58.3 / 5.0, UNet-R18 222.2 / 18.7,
UNet-R18×0.5 328.9 / 43.7 FPS (GPU / CPU). Absolute numbers depend on the machine; the
ratios between networks are what to compare. Run::

    python benchmarks/bench_inference.py            # 3 warm-up + 10 timed runs each
    python benchmarks/bench_inference.py --quick    # 1 warm-up + 3 timed runs (make bench)
    python benchmarks/bench_inference.py --networks unet_r18 --size 320 --no-onnx
    python benchmarks/bench_inference.py --quick --threads 1   # steadier on a busy machine

int8 (``matting export --int8``): a model is trained by the pipeline's own pretrain stage on
synthetic seg data in a temp dir (``unet_r18x0.5`` from scratch, ``--int8-steps`` steps, seed 0;
not timed), or read from ``--checkpoint`` with ``--calibration`` / ``--natural`` shard sets
(e.g. the demo's champion student and ``data/composite/train`` / ``data/shards/val-natural``).
It is exported as fp32 and quantized as ``matting export --int8`` does (32 calibration
images of its training shards), then: ORT CPU FPS of both at ``--size`` batch 1
(interleaved rounds, medians), the whole-image MSE of both on the natural validation set
(images at their own size up to a short side of 512) and its relative change, and the int8
agreement figures on 8 held-out calibration-set images. ``--no-int8`` skips it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from matting_core.models import build_network, count_parameters  # noqa: E402
from matting_core.models.onnx_export import export_onnx  # noqa: E402

# name -> (GPU FPS on V100, CPU FPS), ONNX Runtime at 512x512 (METHOD.md, "Paper speed").
PAPER_FPS: dict[str, tuple[float, float]] = {
    "unet_r101": (58.3, 5.0),
    "unet_r18": (222.2, 18.7),
    "unet_r18x0.5": (328.9, 43.7),
}
DEFAULT_NETWORKS = ("unet_r18x0.5", "unet_r18", "unet_r101")


def _fps(run, warmup: int, iters: int, sync=lambda: None) -> float:
    for _ in range(warmup):
        run()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        run()
    sync()
    return iters / (time.perf_counter() - start)


def bench_torch(model: torch.nn.Module, image: torch.Tensor, warmup: int, iters: int) -> float:
    sync = torch.cuda.synchronize if image.is_cuda else (lambda: None)
    with torch.inference_mode():
        return _fps(lambda: model(image), warmup, iters, sync)


def bench_onnx(
    onnx_path: str, feed: dict[str, np.ndarray], provider: str, warmup: int, iters: int, threads: int | None = None
) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(onnx_path, options, providers=[provider])
    return _fps(lambda: session.run(["alpha"], feed), warmup, iters)


def gmacs(name: str, size: int) -> float:
    """Multiply-accumulates (×1e9) of one 1×3×size×size forward, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_network(name).eval()
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, size, size))
    return counter.get_total_flops() / 2e9


def trained_model(root: Path, steps: int):
    """(model, calibration set, natural set, description): the pre-training stage's network
    trained from scratch for ``steps`` on the synthetic seg set under ``root`` (seed 0); its
    training shards calibrate it."""
    import contextlib
    import io

    from _world import synthetic_data
    from matting_pipeline.trainer import apply_train_settings, train
    from stages import pretrain

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    counts = {"matte": 16, "background": 16, "seg": 128, "val_natural": 16}
    params = synthetic_data(root, counts, {"pretrain": {"iters": steps, "checkpoint_every": steps}})
    args = argparse.Namespace(seg=128, mat=0, params=None, data_root=str(root / "data"),
                              models_root=str(root / "models"), device="cpu", iters=None, seed=0)
    job = apply_train_settings(pretrain.build_job(args, params, torch.device("cpu")), params)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        train(job, torch.device("cpu"), progress=False)
    model = job.model.to(memory_format=torch.contiguous_format).eval()
    return (model, root / "data" / "shards" / "seg", root / "data" / "shards" / "val-natural",
            f"unet_r18x0.5 trained by the pretrain stage from scratch, {steps} steps on 128 synthetic seg samples (seed 0)")


def natural_mse(models: dict[str, bytes], natural: Path, guidance: str | None) -> dict[str, float]:
    """Per model, the mean over the set's images of the whole-image MSE of its alpha (images
    at their own size up to a short side of 512, the GT alpha resized alike: the feeds of
    ``matting export``'s calibration, :func:`~matting_pipeline.tools.export.sample_feed`)."""
    from matting_core.models.onnx_quant import ort_alphas
    from matting_pipeline.shards import iter_samples
    from matting_pipeline.tools.export import sample_feed

    feeds, truths = zip(*(sample_feed(s["image"], s["alpha"], guidance) for s in iter_samples(natural)))
    return {name: float(np.mean([np.mean((a[0, 0] - t) ** 2) for a, t in zip(ort_alphas(data, feeds), truths)]))
            for name, data in models.items()}


def int8_section(args, warmup: int, iters: int) -> None:
    from matting_core.checkpoint import load_model
    from matting_core.models.onnx_export import guidance_input
    from matting_core.models.onnx_quant import QUANTIZATION
    from matting_pipeline.tools.export import quantize_from_set

    steps = args.int8_steps or (300 if args.quick else 600)
    rounds = args.int8_rounds or 5
    iters = max(iters, 10)  # a measurement of 3 runs at ~25 FPS is 0.1 s: noise
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        t0 = time.perf_counter()
        if args.checkpoint is None:
            model, calibration, natural, what = trained_model(Path(tmp), steps)
        else:
            model, _ = load_model(args.checkpoint)
            model.eval()
            calibration, natural, what = args.calibration, args.natural, str(args.checkpoint)
        guidance = guidance_input(model)
        fp32 = export_onnx(model, guidance=guidance)
        int8, agreement = quantize_from_set(fp32, calibration, 32, 8, guidance)  # matting export --int8's defaults
        print(f"\n# int8: {QUANTIZATION}; 32 calibration images of {calibration.name}")
        print(f"# model: {what} (made and quantized in {time.perf_counter() - t0:.0f} s, not timed)")
        image = np.random.default_rng(0).random((1, 3, args.size, args.size), dtype=np.float32)
        feed = {"image": image}
        if guidance is not None:
            from matting_core.models.onnx_export import sample_guidance

            feed[guidance] = sample_guidance(guidance, 1, args.size, args.size,
                                             torch.Generator().manual_seed(0)).numpy()
        paths = {}
        for name, data in (("fp32", fp32), ("int8", int8)):
            paths[name] = os.path.join(tmp, f"{name}.onnx")
            with open(paths[name], "wb") as fh:
                fh.write(data)
        fps: dict[str, list[float]] = {"fp32": [], "int8": []}
        for r in range(rounds):  # interleaved, which goes first alternating
            for name in (("fp32", "int8") if r % 2 == 0 else ("int8", "fp32")):
                fps[name].append(bench_onnx(paths[name], feed, "CPUExecutionProvider", warmup, iters, args.threads))
        mse = natural_mse({"fp32": fp32, "int8": int8}, natural, guidance)
    med = {k: float(np.median(v)) for k, v in fps.items()}
    change = (mse["int8"] - mse["fp32"]) / mse["fp32"]
    print(f"{'precision':<9} {'ORT CPU FPS':>11} {'natural MSE':>12}   ({args.size}x{args.size} batch 1, median of "
          f"{rounds} interleaved rounds; MSE over {natural.name}, whole image)")
    print(f"{'fp32':<9} {med['fp32']:>11.2f} {mse['fp32']:>12.5f}")
    print(f"{'int8':<9} {med['int8']:>11.2f} {mse['int8']:>12.5f}")
    print(f"int8 / fp32 FPS: x{med['int8'] / med['fp32']:.2f} (target >= 1.7); natural MSE change {change:+.1%} "
          f"(target within 5 %)")
    print(f"int8 vs fp32 alphas on 8 held-out images of {calibration.name}: mean abs {agreement['mean_abs']:.4f}, "
          f"99th percentile {agreement['p99_abs']:.4f}, max {agreement['max_abs']:.4f}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", nargs="+", default=list(DEFAULT_NETWORKS))
    parser.add_argument("--size", type=int, default=512, help="square input side (default 512)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 3, --quick 1)")
    parser.add_argument("--iters", type=int, default=None, help="timed runs (default 10, --quick 3)")
    parser.add_argument("--quick", action="store_true", help="fewer runs, for make bench")
    parser.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip ONNX export and runtime")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch and onnxruntime (default: theirs, = cores). On a busy machine "
        "1 thread can be several times faster than 2 (OpenMP threads spin-wait for each other)",
    )
    int8 = parser.add_argument_group("int8")
    int8.add_argument("--no-int8", dest="int8", action="store_false", help="skip the int8 comparison")
    int8.add_argument("--checkpoint", type=Path, default=None, help="model to quantize (default: train one, see above)")
    int8.add_argument("--calibration", type=Path, default=None, help="calibration shard set (with --checkpoint)")
    int8.add_argument("--natural", type=Path, default=None, help="natural validation shard set (with --checkpoint)")
    int8.add_argument("--int8-steps", type=int, default=None, help="training steps of the self-made model (default 600; quick 300)")
    int8.add_argument("--int8-rounds", type=int, default=None, help="interleaved FPS rounds of >= 10 runs each (default 5)")
    args = parser.parse_args(argv)
    if args.checkpoint is not None and (args.calibration is None or args.natural is None):
        parser.error("--checkpoint needs --calibration and --natural (shard set folders)")
    if args.threads:
        torch.set_num_threads(args.threads)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    iters = args.iters if args.iters is not None else (3 if args.quick else 10)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)

    cuda = torch.cuda.is_available()
    providers: list[str] = []
    if args.onnx:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    ort_cuda = cuda and "CUDAExecutionProvider" in providers
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# {args.batch}x3x{args.size}x{args.size} fp32, warm-up {warmup}, timed {iters}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
        f"load average {load:.1f}; CUDA: {torch.cuda.get_device_name(0) if cuda else 'not available'}"
    )
    if cuda and args.onnx and not ort_cuda:
        print("# onnxruntime has no CUDAExecutionProvider here: ORT GPU column left empty")

    header = (
        f"{'network':<14} {'params':>8} {'GMACs':>6} | {'torch CPU':>9} {'ORT CPU':>8} {'paper CPU':>9} | "
        f"{'torch GPU':>9} {'ORT GPU':>8} {'paper GPU':>9}"
    )
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(0)
    image_np = rng.random((args.batch, 3, args.size, args.size), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.networks:
            torch.manual_seed(0)
            model = build_network(name).eval()
            params = count_parameters(model) / 1e6
            image = torch.from_numpy(image_np)
            torch_cpu = bench_torch(model, image, warmup, iters)
            ort_cpu = ort_gpu = torch_gpu = None
            if args.onnx:
                onnx_path = os.path.join(tmp, f"{name}.onnx")
                with open(onnx_path, "wb") as fh:
                    fh.write(export_onnx(model))
                ort_cpu = bench_onnx(onnx_path, {"image": image_np}, "CPUExecutionProvider", warmup, iters, args.threads)
                if ort_cuda:
                    ort_gpu = bench_onnx(onnx_path, {"image": image_np}, "CUDAExecutionProvider", warmup * 3, iters * 10)
            if cuda:
                torch_gpu = bench_torch(model.cuda(), image.cuda(), warmup * 3, iters * 10)
            paper_gpu, paper_cpu = PAPER_FPS.get(name, (None, None))
            print(
                f"{name:<14} {params:>7.2f}M {gmacs(name, args.size):>6.1f} | {_fmt(torch_cpu):>9} {_fmt(ort_cpu):>8} {_fmt(paper_cpu):>9} | "
                f"{_fmt(torch_gpu):>9} {_fmt(ort_gpu):>8} {_fmt(paper_gpu):>9}",
                flush=True,
            )
    if args.onnx and args.int8:
        int8_section(args, warmup, iters)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# load average at the end {load:.1f}")
    print(
        "# FPS = frames per second (batch x iterations / wall seconds); GMACs per 1x3xSxS frame."
        " Paper: ONNX Runtime, V100 GPU."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
