"""Peak memory of ``matting predict`` on a huge photo, with ``--composite``.

A 13000x13000 photo (169 MP, under the 200 MP limit of ``matting_pipeline.imageio``) once
peaked at 8.2 GB with ``--composite``: float copies of the photo, the alpha and the
composite. Now the full-size arrays are the photo (3 bytes/pixel, overwritten in place by the
composite), the 8-bit alpha (1 B/px) and, while decoding, Pillow's own 4 B/px.

Each case runs ``matting predict`` in a fresh interpreter and reads its own ``VmHWM`` (the
peak resident set of that process alone); the baseline in the same run is a 512x512 photo,
whose peak is the fixed cost (Python, torch, the model). Printed: peak MB, MB above the
baseline, bytes per pixel above it, and the peak against the 2 GB target. Run::

    python benchmarks/bench_predict_memory.py             # 13000x13000, colour and image backgrounds
    python benchmarks/bench_predict_memory.py --quick     # 6000x6000, colour only
    python benchmarks/bench_predict_memory.py --side 14000
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

TARGET_MB = 2048
_MEASURE = (
    "import re, sys; from matting_pipeline.cli import main; rc = main(['predict', *sys.argv[1:]]); "
    "print('VmHWM', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); sys.exit(rc)"
)


def write_photo(path: Path, side: int, band: int = 1024) -> None:
    """A smooth, noisy synthetic photo of ``side``² written as JPEG (built a band at a time)."""
    rng = np.random.default_rng(0)
    image = np.empty((side, side, 3), np.uint8)
    x = np.arange(side, dtype=np.float32) / side
    for top in range(0, side, band):
        y = (np.arange(top, min(side, top + band), dtype=np.float32) / side)[:, None]
        rows = np.stack([np.broadcast_to(255 * x, (len(y), side)), np.broadcast_to(255 * y, (len(y), side)),
                         128 + 100 * np.sin(20 * x * y)], -1)
        rows += rng.normal(0, 8, rows.shape).astype(np.float32)
        image[top:top + len(y)] = np.clip(rows, 0, 255).astype(np.uint8)
    if not cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 90]):
        raise OSError(f"cannot write {path}")


def peak_mb(args: list[str]) -> tuple[float, float]:
    """(peak resident MB of `matting predict ARGS` alone, seconds)."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"predict failed ({result.returncode}):\n{result.stderr[-3000:]}")
    kb = int(re.search(r"VmHWM (\d+)", result.stdout).group(1))
    return kb / 1024, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=13000, help="side of the square photo, px (default 13000)")
    parser.add_argument("--quick", action="store_true", help="6000x6000, colour background only")
    parser.add_argument("--network", default="unet_r18x0.5", help="network of the (untrained) checkpoint")
    args = parser.parse_args(argv)
    side = 6000 if args.quick else args.side

    from matting_core.checkpoint import save_checkpoint
    from matting_core.models import build_network

    with tempfile.TemporaryDirectory(prefix="bench-predict-memory-") as tmp:
        root = Path(tmp)
        checkpoint = save_checkpoint(root / "model.pt", build_network(args.network))
        write_photo(root / "small.jpg", 512)
        write_photo(root / "big.jpg", side)
        write_photo(root / "background.jpg", 1024)
        common = ["--checkpoint", str(checkpoint), "--device", "cpu"]
        cases = [("512x512, --composite colour (baseline)", "small.jpg", "#00ff00")]
        cases.append((f"{side}x{side}, --composite colour", "big.jpg", "#00ff00"))
        if not args.quick:
            cases.append((f"{side}x{side}, --composite image", "big.jpg", str(root / "background.jpg")))
            cases.append((f"{side}x{side}, alpha only", "big.jpg", None))
        print(f"matting predict peak memory ({args.network}, {side}x{side} = {side * side / 1e6:.0f} MP photo)")
        print(f"{'case':<40} {'peak MB':>8} {'above base':>10} {'B/px':>6} {'of 2 GB':>8} {'s':>6}")
        base = None
        for label, photo, background in cases:
            extra = [] if background is None else ["--composite", background]
            mb, seconds = peak_mb(["--input", str(root / photo), "--output", str(root / "out"), *common, *extra])
            base = mb if base is None else base
            pixels = 512 * 512 if photo == "small.jpg" else side * side
            above = mb - base
            print(f"{label:<40} {mb:>8.0f} {above:>10.0f} {above * 2**20 / pixels:>6.1f} "
                  f"{mb / TARGET_MB:>7.0%} {seconds:>6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
