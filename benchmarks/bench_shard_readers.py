"""Shard readers: today's local readers against WebDataset's streaming path, on local disk
and on an S3 endpoint on loopback (samples/s, decoding included).

Builds a synthetic shard set (128 px image + alpha PNGs, 64 samples per shard) in a temp
dir, starts a moto S3 server on loopback (its own process, so it does not share the
readers' GIL), publishes the set there (``shard_store.publish_set``), then times, in
interleaved rounds (the order reversed every other round; the median counts, the best
round is shown beside it since other processes on a shared machine only slow a round):

- ``today: ShardReader``: ``shards.ShardReader`` on the local set (sha256 check + header walk)
  then ``read`` of every key -- random access, what training uses.
- ``today: iter_samples``: ``shards.iter_samples`` on the local set (whole tar read, sha256,
  ``tarfile``), storage order.
- ``webdataset: local``: ``webdataset.WebDataset(tars, shardshuffle=False)``, the library's
  own streaming reader, members decoded with ``shards.decode_member`` (no checks).
- ``iter_samples: file://``: the pipeline's URL path (``data.shard_url`` a file:// URL):
  each tar read through ``webdataset.gopen``, its sha256 checked, then parsed with today's
  checks. (Parsing it as it streams, ``tarfile`` mode ``r|`` as WebDataset does, cost about
  10 % of a read-only pass -- tarfile's pure-Python stream buffering -- and saves no memory,
  since a tar must be verified whole before any of its samples is used.)
- ``webdataset: s3``, ``iter_samples: s3://``: the same two over the loopback S3 endpoint.
- ``ShardReader: s3:// cold`` / ``warm``: random access over the URL with an empty fetch
  cache / with the cache the previous run filled.

Ratios compare each reader with today's reader of the same kind (sequential with
``today: iter_samples``, random access with ``today: ShardReader``). Run::

    python benchmarks/bench_shard_readers.py            # 384 samples, 5 rounds
    python benchmarks/bench_shard_readers.py --quick    # 96 samples, 3 rounds (`make bench`)
    python benchmarks/bench_shard_readers.py --samples 1024 --rounds 7
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from matting_pipeline import shard_store, shards  # noqa: E402

BUCKET = "bench-shards"
PER_SHARD = 64


def make_set(set_dir: Path, n: int, size: int) -> None:
    """``n`` samples of a smooth RGB image with noise and a soft-edged disc alpha (uint8)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size

    def samples():
        for i in range(n):
            base = np.stack([x, y, (x + y) / 2], -1) * 255
            image = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            r = np.hypot(y - rng.uniform(0.3, 0.7), x - rng.uniform(0.3, 0.7))
            alpha = (np.clip((0.3 - r) * 20, 0, 1) * 255).round().astype(np.uint8)
            yield f"seg-{i:06d}", {"stem": str(i)}, {"image": image, "alpha": alpha}

    shards.write_shard_set(set_dir, "seg", samples(), PER_SHARD)


@contextlib.contextmanager
def moto_server():
    """A moto S3 server process on a free loopback port; yields its endpoint URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(400):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("the moto server did not start")
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def decode(sample: dict) -> dict:
    """A WebDataset sample (raw member bytes) decoded as the pipeline decodes it."""
    out = {"key": sample["__key__"], "meta": shards.decode_member("meta", "json", sample["json"])}
    for column, value in sample.items():
        if column.endswith(".png"):
            role = column[: -len(".png")]
            out[role] = shards.decode_member(role, "png", value)
    return out


def count_webdataset(urls: list[str], decoded: bool) -> int:
    import webdataset as wds

    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    return sum(1 for s in dataset if not decoded or decode(s))


def count_reader(set_dir: Path, decoded: bool) -> int:
    reader = shards.ShardReader(set_dir)
    return sum(1 for k in reader.keys if reader.read(k))


def count_iter(set_dir: Path, decoded: bool) -> int:
    samples = shards.iter_samples(set_dir) if decoded else shards.iter_encoded_samples(set_dir)
    return sum(1 for _ in samples)


def measure(readers: dict, rounds: int, n: int) -> dict[str, list[float]]:
    """Seconds per round of each reader: interleaved, the order reversed every other round
    (a "cold" reader always just before its "warm" one)."""
    times: dict[str, list[float]] = {name: [] for name in readers}
    for r in range(rounds):
        order = list(readers) if r % 2 == 0 else list(readers)[::-1]
        for cold in [name for name in order if name.endswith(" cold")]:
            warm = cold[: -len(" cold")] + " warm"
            if warm in order:
                order.remove(cold)
                order.insert(order.index(warm), cold)
        for name in order:
            t0 = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):  # the once-per-set "read from" lines
                count = readers[name][1]()
            times[name].append(time.perf_counter() - t0)
            assert count == n, (name, count)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="96 samples, 3 rounds")
    ap.add_argument("--samples", type=int, default=None, help="samples in the set (default 384)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5)")
    ap.add_argument("--size", type=int, default=128, help="image side, px (default 128)")
    args = ap.parse_args(argv)
    n = args.samples or (96 if args.quick else 384)
    rounds = args.rounds or (3 if args.quick else 5)

    with tempfile.TemporaryDirectory(prefix="bench_shard_readers_") as tmp, moto_server() as endpoint:
        tmp = Path(tmp)
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1")
        os.environ[shard_store.CACHE_ENV] = str(tmp / "cache")
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        data = tmp / "data"
        set_dir = data / "shards" / "seg"
        make_set(set_dir, n, args.size)
        index = shards.read_index(set_dir)
        names = [s["name"] for s in index["shards"]]
        s3_base, file_base = f"s3://{BUCKET}/matting", (tmp / "mirror").as_uri()
        for base in (s3_base, file_base):
            shard_store.publish_set(set_dir, shard_store.remote_location(set_dir, data, base), progress=False)
        size_mb = sum((set_dir / name).stat().st_size for name in names) / 1e6
        shard_store.register_gopen()

        def local(fn):
            def run():
                shard_store.activate(None, data)
                return fn()
            return run

        def remote(base, fn, cold=False):
            def run():
                if cold:
                    shutil.rmtree(tmp / "cache", ignore_errors=True)
                shard_store.activate(base, data)
                return fn()
            return run

        def table(decoded: bool) -> dict:  # name -> (kind, run)
            readers = {
                "today: ShardReader": ("random", local(lambda: count_reader(set_dir, decoded))),
                "today: iter_samples": ("sequential", local(lambda: count_iter(set_dir, decoded))),
                "webdataset: local": ("sequential", local(lambda: count_webdataset(local_tars, decoded))),
                "iter_samples: file://": ("sequential", remote(file_base, lambda: count_iter(set_dir, decoded))),
                "webdataset: s3": ("sequential", local(lambda: count_webdataset(s3_tars, decoded))),
                "iter_samples: s3://": ("sequential", remote(s3_base, lambda: count_iter(set_dir, decoded))),
                "ShardReader: s3:// cold": ("random", remote(s3_base, lambda: count_reader(set_dir, decoded), cold=True)),
                "ShardReader: s3:// warm": ("random", remote(s3_base, lambda: count_reader(set_dir, decoded))),
            }
            # without decoding only the sequential readers compare like for like
            return readers if decoded else {k: v for k, v in readers.items() if v[0] == "sequential"}

        local_tars = [str(set_dir / m) for m in names]
        s3_tars = [f"{s3_base}/shards/seg/{m}" for m in names]
        tables = {decoded: table(decoded) for decoded in (True, False)}
        for readers in tables.values():  # warm-up: imports, clients, the first connection
            measure(readers, 1, n)
        times = {decoded: measure(readers, rounds, n) for decoded, readers in tables.items()}
        shard_store.activate(None, data)

    print(f"bench_shard_readers: {n} samples ({args.size} px image + alpha PNG), {len(names)} shards, "
          f"{size_mb:.1f} MB; median of {rounds} interleaved rounds; {os.cpu_count()} CPUs")
    median = {d: {name: n / statistics.median(ts) for name, ts in times[d].items()} for d in tables}
    best = {d: {name: n / min(ts) for name, ts in times[d].items()} for d in tables}
    for decoded, readers in tables.items():
        base = {"random": "today: ShardReader", "sequential": "today: iter_samples"}
        what = "read + decode (image, alpha, meta)" if decoded else "read only (encoded members; iter_encoded_samples)"
        print(f"  {what}")
        print(f"    {'reader':<26}{'kind':<12}{'median/s':>9}{'vs today':>9}{'best/s':>9}{'vs today':>9}{'spread':>8}")
        for name, (kind, _) in readers.items():
            ts = times[decoded][name]
            spread = (max(ts) - min(ts)) / statistics.median(ts)
            m, b = median[decoded][name], best[decoded][name]
            print(f"    {name:<26}{kind:<12}{m:>9.0f}{m / median[decoded][base[kind]]:>8.2f}x"
                  f"{b:>9.0f}{b / best[decoded][base[kind]]:>8.2f}x{spread:>8.0%}")
    for decoded in (True, False):
        for reader, label in (("webdataset: local", "WebDataset's streaming reader"),
                              ("iter_samples: file://", "the pipeline's checked URL path (file://)")):
            ratio = median[decoded][reader] / median[decoded]["today: iter_samples"]
            noise = max((max(t) - min(t)) / statistics.median(t) for t in
                        (times[decoded][reader], times[decoded]["today: iter_samples"]))
            verdict = "at least as fast as" if ratio >= 1.0 else f"{1 - ratio:.0%} slower than"
            within = "within" if abs(1 - ratio) <= noise / 2 else "beyond"
            print(f"  local disk, {'decoded' if decoded else 'read only'}: {label} is {verdict} today's "
                  f"iter_samples (median {ratio:.2f}x, {within} half this run's spread of {noise:.0%})")
    print("  (spread = (max - min) / median over the rounds; best = the fastest round, which other processes "
          "only ever slow; vs today: sequential readers against today's iter_samples, random access against "
          "today's ShardReader)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
