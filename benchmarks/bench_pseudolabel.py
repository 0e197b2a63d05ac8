"""Throughput of the ``pseudolabel`` stage: Ray Data actor pool vs a plain single-process loop.

Builds a seg shard set of random images and a randomly initialised teacher in a temp dir
(not timed), then, in the same run on the same shards:

- ``loop``: one process reads the shards (``iter_encoded_samples``), labels ``batch_size``
  samples at a time with the stage's own per-batch function (decode, teacher + MLB blend,
  encode) and writes the shard set -- no Ray; torch uses its default threads.
- ``ray xN``: the stage's Ray Data job (``stages.pseudolabel.pseudolabel``) with N actors on
  one local Ray (started once, not timed), N = 1, 2 by default.
  ``total`` = samples / wall time of the whole job (actor start-up included). ``steady`` is
  the marginal rate from two job sizes, ``(n - n0) / (t(n) - t(n0))`` with ``n0 = n / 8``,
  so fixed costs (actor start, teacher load, first forward) cancel; ``fixed`` is what is left.
  Each configuration runs ``--repeats`` times, interleaved, and the fastest time counts
  (other processes on a shared machine only ever slow a run down).
- on CUDA (when torch sees a GPU): GPU actors, one GPU each; samples/s per GPU.

Both paths must write the same keys with labels equal within float rounding (checked).
Run::

    python benchmarks/bench_pseudolabel.py            # 256 samples, 128 px, unet_r18x0.5
    python benchmarks/bench_pseudolabel.py --quick    # 64 samples, 96 px, unet_r18x0.25 (a smoke
                                                      # run: actor start-up dominates)
    python benchmarks/bench_pseudolabel.py --samples 768 --repeats 1   # fixed costs < 1/3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from matting_core.checkpoint import load_model, save_checkpoint  # noqa: E402
from matting_core.models import build_network  # noqa: E402
from stages import pseudolabel as stage  # noqa: E402
from matting_pipeline.config import parse_params  # noqa: E402
from matting_pipeline.layout import Layout  # noqa: E402
from matting_pipeline.shards import iter_samples, seeded_order, write_shard_set  # noqa: E402


def teacher_path(root: Path, seg: int) -> Path:
    """Where the stage looks for the teacher of cell (seg, 1), study seed 0."""
    return Layout(data=root / "data", models=root / "models").for_seed(0).model_path("teacher", seg, 1)


def make_inputs(root: Path, n: int, size: int, network: str, samples_per_shard: int) -> None:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        mask[size // 5 : 4 * size // 5, size // 4 :] = 1
        samples.append((f"seg-{i:06d}", {"set": "seg", "stem": str(i)}, {"image": image, "mask": mask}))
    order = seeded_order([s[0] for s in samples], 0, "seg")
    position = {k: i for i, k in enumerate(order)}
    samples.sort(key=lambda s: position[s[0]])
    write_shard_set(root / "data/shards/seg", "seg", samples, samples_per_shard, subset_seed=0, order=order)
    torch.manual_seed(0)
    save_checkpoint(teacher_path(root, n), build_network(network))


def plain_loop(plan: stage.Plan, out_dir: Path, batch_size: int, device: str) -> float:
    """Single process, no Ray (``stage.label_in_process``): read -> label -> write. Returns seconds."""
    start = time.perf_counter()
    stage.label_in_process(plan, out_dir, batch_size, device)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def ray_job(plan: stage.Plan, cfg) -> tuple[float, stage.ActorResources]:
    """The stage's Ray job (Ray already up), without progress output. Returns (seconds, resources)."""
    import ray

    resources = stage.actor_resources(cfg, ray.cluster_resources())
    start = time.perf_counter()
    stage.pseudolabel(plan, cfg, progress=False)
    return time.perf_counter() - start, resources


def compare(a: Path, b: Path) -> float:
    """Largest label difference between two output sets (they must hold the same keys)."""
    worst = 0.0
    sa, sb = list(iter_samples(a)), {s["key"]: s for s in iter_samples(b)}
    assert sorted(s["key"] for s in sa) == sorted(sb), "the two paths labelled different keys"
    for s in sa:
        for role in stage.LABEL_ROLES:
            worst = max(worst, float(np.abs(s[role] - sb[s["key"]][role]).max()))
    return worst


def rates(n: int, n0: int, t: float, t0: float) -> dict:
    steady = (n - n0) / (t - t0) if t > t0 else float("nan")
    return {"total": n / t, "steady": steady, "fixed": t0 - n0 / steady if steady == steady else float("nan"), "t": t}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 samples, 96 px, unet_r18x0.25, 1 repeat")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--size", type=int, default=None, help="image side, px")
    ap.add_argument("--network", default=None, help="teacher network (default unet_r18x0.5; quick: unet_r18x0.25)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--actors", default="1,2", help="CPU actor counts to time (default 1,2)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per configuration, best counts (default 2; quick 1)")
    args = ap.parse_args(argv)
    n = args.samples or (64 if args.quick else 256)
    n0 = max(args.batch_size, n // 8)
    size = args.size or (96 if args.quick else 128)
    network = args.network or ("unet_r18x0.25" if args.quick else "unet_r18x0.5")
    repeats = args.repeats or (1 if args.quick else 2)
    actor_counts = [int(a) for a in args.actors.split(",")]
    cpus = os.cpu_count() or 1
    cuda = torch.cuda.is_available()
    default_threads = torch.get_num_threads()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.pop("RAY_ADDRESS", None)
    with tempfile.TemporaryDirectory(prefix="bench-pseudolabel-") as tmp:
        root = Path(tmp)
        make_inputs(root, n, size, network, samples_per_shard=32)
        save_checkpoint(teacher_path(root, n0), load_model(teacher_path(root, n))[0])
        params = parse_params({
            "shard": {"samples_per_shard": 32},
            "pseudolabel": {"batch_size": args.batch_size, "num_cpus": cpus},
        })
        plans = {m: stage.make_plan(params, m, 1, root / "data", root / "models") for m in (n, n0)}
        print(f"pseudolabel benchmark: {n} samples {size}x{size} (and {n0} for the fixed cost), teacher {network}, "
              f"batch {args.batch_size}, {cpus} CPU(s), torch {torch.__version__}, best of {repeats}, "
              f"load avg {os.getloadavg()[0]:.1f}", flush=True)

        import ray

        t_ray = time.perf_counter()
        stage.connect_ray(params.pseudolabel)
        print(f"local Ray started in {time.perf_counter() - t_ray:.1f} s (not counted below)", flush=True)
        # the loop with torch's default threads (one per core) and with one thread: on a busy
        # machine OpenMP threads that wait for each other can be several times slower
        configs: list[tuple[str, object]] = [("loop-cpu", None), ("loop-cpu-1t", None)]
        if cuda:
            configs.append(("loop-cuda", None))
        for count in actor_counts:
            configs.append((f"ray-cpu-{count}", params.pseudolabel.model_copy(update={"num_actors": count, "gpus_per_actor": 0.0})))
        if cuda:
            gpus = int(ray.cluster_resources().get("GPU", 0))
            for count in sorted({1, gpus}):
                configs.append((f"ray-cuda-{count}", params.pseudolabel.model_copy(update={"num_actors": count, "gpus_per_actor": 1.0})))
        best: dict[tuple[str, int], float] = {}
        labels: dict[str, str] = {}
        worst = 0.0
        try:
            for _ in range(repeats):
                for name, cfg in configs:
                    for m in (n, n0):
                        plan = plans[m]
                        if cfg is None:
                            device = "cuda" if name == "loop-cuda" else "cpu"
                            torch.set_num_threads(1 if name == "loop-cpu-1t" else default_threads)
                            t = plain_loop(plan, root / f"loop-{m}", args.batch_size, device)
                            labels[name] = f"1 process, {torch.get_num_threads()} thread(s)" if device == "cpu" else (
                                "1 process, 1 GPU")
                            torch.set_num_threads(default_threads)
                        else:
                            t, res = ray_job(plan, cfg)
                            per = f"{res.torch_threads} thread(s)" if res.device == "cpu" else f"{res.num_gpus:g} GPU"
                            labels[name] = f"{res.num_actors} actor(s), {per} each"
                            if m == n and res.device == "cpu":
                                worst = max(worst, compare(root / f"loop-{n}", plan.out_dir))
                        best[(name, m)] = min(best.get((name, m), float("inf")), t)
                        print(f"  {name:<12} n={m:<4} {t:6.1f} s", flush=True)
        finally:
            ray.shutdown()

    print(f"\n{'path':<12} {'resources':<28} {'total/s':>8} {'steady/s':>9} {'fixed s':>8} {'wall s':>7}")
    results = {}
    for name, _ in configs:
        r = rates(n, n0, best[(name, n)], best[(name, n0)])
        results[name] = r
        extra = ""
        if name.startswith("ray-cuda"):
            count = int(name.rsplit("-", 1)[1])
            extra = f"  ({r['steady'] / count:.1f}/s per GPU steady, {r['total'] / count:.1f}/s per GPU total)"
        print(f"{name:<12} {labels[name]:<28} {r['total']:8.1f} {r['steady']:9.1f} {r['fixed']:8.1f} {r['t']:7.1f}{extra}")
    if any(r["fixed"] > 0.5 * r["t"] for name, r in results.items() if name.startswith("ray")):
        print("note: fixed costs (actor start-up, teacher load) dominate these Ray runs, so the steady "
              "column is noise; time a larger job (no --quick, or --samples 768) for throughput")
    one, two = results.get("ray-cpu-1"), results.get("ray-cpu-2")
    if one and two:
        print(f"scaling 1 -> 2 CPU actors: total x{two['total'] / one['total']:.2f}, steady x{two['steady'] / one['steady']:.2f}")
    for loop_name in ("loop-cpu", "loop-cpu-1t"):
        loop = results[loop_name]
        for ray_name in ("ray-cpu-1", "ray-cpu-2"):
            if ray_name in results:
                r = results[ray_name]
                print(f"{ray_name} vs {loop_name}: total x{r['total'] / loop['total']:.2f}, "
                      f"steady x{r['steady'] / loop['steady']:.2f}")
    print(f"labels: loop vs ray max |diff| = {worst:.2e} (same function; batch composition changes float rounding)")
    if worst > 1e-3:
        print("error: the Ray stage and the plain loop disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
