"""Throughput of the embedded procedural dataset generators (matting_core.synthetic).

Prints items/s (wall clock and CPU time) for each generator at 128 and 512, and the time
to generate the default embedded set (50 foregrounds, 50 backgrounds, 250 natural scenes
at 128x128) in one process.

    python benchmarks/bench_synthetic.py [--repeat N] [--sizes 128 512] [--no-demo]
"""

from __future__ import annotations

import argparse
import time

from matting_core import synthetic as syn

GENERATORS = {
    "foreground": syn.foreground_item,
    "background": syn.background_item,
    "natural": syn.natural_item,
}


def _time(fn, n: int, size) -> tuple[float, float]:
    fn(0, 10_000, size)  # warm-up (imports, cv2 first-call costs)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        fn(0, i, size)
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20, help="items per generator at 128 (a quarter at 512)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--no-demo", action="store_true", help="skip the 50/50/250 demo-set timing")
    parser.add_argument("--quick", action="store_true", help="5 items per generator, 128 px only, no demo set (make bench)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat, args.sizes, args.no_demo = 5, [128], True

    print(f"{'generator':<11} {'size':>5} {'items':>5} {'items/s':>8} {'ms/item':>8} {'cpu ms/item':>11}")
    for size in args.sizes:
        n = max(2, args.repeat if size <= 256 else args.repeat // 4)
        for name, fn in GENERATORS.items():
            wall, cpu = _time(fn, n, size)
            print(f"{name:<11} {size:>5} {n:>5} {n / wall:>8.1f} {1e3 * wall / n:>8.1f} {1e3 * cpu / n:>11.1f}")

    if not args.no_demo:
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(50):
            syn.foreground_item(0, i, 128)
            syn.background_item(0, i, 128)
        for i in range(250):
            syn.natural_item(0, i, 128)
        print(
            f"demo set (50 fg + 50 bg + 250 natural @128): {time.perf_counter() - wall:.1f} s wall, "
            f"{time.process_time() - cpu:.1f} s CPU"
        )


if __name__ == "__main__":
    main()
