"""Speed of the alpha metrics at 2048×2048 next to mmeval's, measured in the same run.

Times ``matting_core.metrics`` (SAD, MSE, gradient, connectivity, and ``evaluate_alpha``
over whole / boundary / unknown regions) against mmeval 0.2.1's
SumAbsoluteDifferences, MattingMeanSquaredError, GradientError and ConnectivityError
on the same input (a soft disc with hair-like strands as ground truth, a noisy,
shifted copy as prediction; float64 in [0, 1]; the region is a trimap's unknown band).
Runs are interleaved (ours, mmeval, ours, ...) so both see the same machine load; the
table shows the best and the median of the timed runs, and the ratio
mmeval / ours of the medians (> 1: ours is faster). Values are checked to agree.
Ours includes input validation (finite, in [0, 1], shapes); mmeval's SAD/MSE include
the masking of the prediction by the trimap that they need for a region value.
Run::

    python benchmarks/bench_metrics.py            # 2048 px, 1 warm-up + 5 timed runs
    python benchmarks/bench_metrics.py --quick    # 2048 px, 1 warm-up + 2 timed runs (make bench)
    python benchmarks/bench_metrics.py --size 1024 --repeats 10
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matting_core import metrics  # noqa: E402
from matting_core.regions import eval_trimap  # noqa: E402


def make_pair(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth (soft disc + strands) and a noisy, shifted prediction, float64 in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    centre, radius, edge = size / 2, size / 3, size / 50
    gt = np.clip((radius - np.hypot(yy - centre, xx - centre)) / edge, 0.0, 1.0)
    for _ in range(40):  # hair-like strands leaving the disc
        x0, slope, strength = rng.uniform(0, size), rng.uniform(-1, 1), rng.uniform(0.2, 1.0)
        dist = np.abs(xx - (x0 + slope * (yy - centre))) / math.hypot(1.0, slope)
        np.maximum(gt, strength * np.clip(1.5 - dist, 0.0, 1.0) * (yy < centre), out=gt)
    shifted = np.roll(gt, (size // 200, -size // 300), axis=(0, 1))
    pred = np.clip(shifted + rng.normal(0.0, 0.05, gt.shape), 0.0, 1.0)
    return pred, gt


def _time(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 timed runs instead of 5")
    parser.add_argument("--size", type=int, default=2048, help="image side, px (default 2048)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per function")
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)

    try:
        import mmeval
    except ImportError:  # dev dependency
        mmeval = None
        print("mmeval not installed (pip install -e '.[dev]'): timing ours only")

    pred, gt = make_pair(args.size)
    trimap = eval_trimap(gt)
    region = trimap == 128
    tri = [trimap]

    def masked() -> np.ndarray:
        # mmeval's SAD has no region argument and its MSE sums every pixel: the
        # prediction must be masked by the trimap first, so that is timed with it
        return np.where(trimap == 128, pred, gt)

    cases: list[tuple[str, Callable[[], object], Callable[[], object] | None]] = [
        ("sad", lambda: metrics.sad(pred, gt, region),
         mmeval and (lambda: mmeval.SumAbsoluteDifferences()([masked()], [gt])["sad"])),
        ("mse", lambda: metrics.mse(pred, gt, region),
         mmeval and (lambda: mmeval.MattingMeanSquaredError()([masked()], [gt], tri)["matting_mse"])),
        ("gradient_error", lambda: metrics.gradient_error(pred, gt, region),
         mmeval and (lambda: mmeval.GradientError()([pred], [gt], tri)["gradient_error"])),
        ("connectivity_error", lambda: metrics.connectivity_error(pred, gt, region),
         mmeval and (lambda: mmeval.ConnectivityError()([pred], [gt], tri)["connectivity_error"])),
        ("evaluate_alpha (3 regions x 4)", lambda: metrics.evaluate_alpha(pred, gt, trimap), None),
    ]  # fmt: skip

    print(f"alpha {args.size}x{args.size} float64, unknown region {region.mean():.1%} of pixels, "
          f"1 warm-up + {repeats} timed runs, interleaved")
    header = f"{'metric':32s} {'ours best':>10s} {'median':>8s} {'mmeval best':>12s} {'median':>8s} {'ratio':>7s}  value (ours / mmeval)"
    print(header)
    print("-" * len(header))
    for name, ours_fn, ref_fn in cases:
        ours_fn()  # warm-up (first-touch page faults, cv2 thread pool)
        if ref_fn:
            ref_fn()
        ours_t, ref_t = [], []
        for _ in range(repeats):
            t, ours_value = _time(ours_fn)
            ours_t.append(t)
            if ref_fn:
                t, ref_value = _time(ref_fn)
                ref_t.append(t)
        line = f"{name:32s} {min(ours_t) * 1e3:8.1f}ms {statistics.median(ours_t) * 1e3:6.1f}ms"
        if ref_fn:
            ratio = statistics.median(ref_t) / statistics.median(ours_t)
            agree = math.isclose(ours_value, ref_value, rel_tol=1e-4, abs_tol=1e-12)
            line += (f" {min(ref_t) * 1e3:10.1f}ms {statistics.median(ref_t) * 1e3:6.1f}ms {ratio:6.2f}x"
                     f"  {ours_value:.6g} / {ref_value:.6g}{'' if agree else '  MISMATCH'}")
            if not agree:
                print(line)
                return 1
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
