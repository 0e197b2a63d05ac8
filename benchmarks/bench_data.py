"""Throughput of the data layer: ingest + shard, and compositing (images/s on this CPU).

Generates a small synthetic dataset in a temp dir (not timed), points a ``source: folders``
config at it, then times ``ingest`` (decode + validate every file), ``shard`` (decode
again, check sha256, encode PNG members, write tars) and ``composite`` (train +
val-composited). Run::

    python benchmarks/bench_data.py            # 128 px, the default synthetic size
    python benchmarks/bench_data.py --quick    # fewer images (used by `make bench`)
    python benchmarks/bench_data.py --size 512 --workers 1

Images/s counts samples (an image with its mask/alpha is one) per wall-clock second.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matting_pipeline.config import parse_params  # noqa: E402
from stages.composite import composite_all  # noqa: E402
from matting_pipeline.shards import default_workers  # noqa: E402
from stages.ingest import generate_synthetic, ingest  # noqa: E402
from stages.shard import shard_all  # noqa: E402


def _timed(fn, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer images")
    ap.add_argument("--size", type=int, default=128, help="image side, px (default 128)")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: CPUs, at most 8)")
    args = ap.parse_args(argv)
    workers = default_workers() if args.workers is None else args.workers
    n = {"matte": 24, "background": 24, "seg": 96, "val_natural": 8} if args.quick else {
        "matte": 48, "background": 48, "seg": 240, "val_natural": 16
    }
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        tmp = Path(tmp)
        syn = parse_params({"data": {"synthetic": {"image_size": args.size, **n}}}).data.synthetic
        t_gen, _ = _timed(generate_synthetic, syn, tmp / "raw", workers=workers, progress=False)
        raw = tmp / "raw"
        params = parse_params(
            {
                "data": {
                    "source": "folders",
                    "matte_dir": str(raw / "matte"),
                    "background_dir": str(raw / "backgrounds"),
                    "seg_dir": str(raw / "seg"),
                    "val": {"natural": str(raw / "val" / "natural")},
                },
                "composite": {"val_foregrounds": 8, "val_backgrounds": 8},
            }
        )
        data = tmp / "data"
        t_ing, reports = _timed(ingest, params.data, data, workers=workers, progress=False)
        t_shard, _ = _timed(shard_all, params.shard, data, workers=workers, progress=False)
        t_comp, idx = _timed(
            composite_all, params.composite, data, params.shard.samples_per_shard, workers=workers, progress=False
        )
        n_in = sum(r.accepted for r in reports.values())
        n_files = sum(r.files for r in reports.values())
        n_comp = sum(i["count"] for i in idx.values())
    cpus = os.cpu_count()
    print(f"bench_data: {args.size}x{args.size} px, {workers} worker process(es), {cpus} CPUs")
    print(f"  (generating the synthetic set: {t_gen:.1f} s, not counted)")
    rows = [
        ("ingest", n_in, t_ing),
        ("shard", n_in, t_shard),
        ("ingest+shard", n_in, t_ing + t_shard),
        ("composite", n_comp, t_comp),
    ]
    print(f"  {'step':<14}{'images':>8}{'seconds':>10}{'images/s':>10}")
    for name, count, sec in rows:
        print(f"  {name:<14}{count:>8}{sec:>10.2f}{count / sec:>10.1f}")
    print(f"  ({n_files} files ingested; composite = train + val-composited samples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
