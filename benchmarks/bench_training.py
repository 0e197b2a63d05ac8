"""Steps/s of the real training loop against a bare forward/backward/optimiser loop.

For each training stage of the main method (``pretrain``, ``teacher``, ``student`` with
offline MLB labels) the benchmark builds the stage's own job (``stages.<stage>.build_job``)
on a synthetic data set made by the pipeline's own ingest/shard/composite functions (in a
temp dir, not timed), then times, interleaved (which goes first alternates by round), ``--rounds`` times each:

- ``loop``: :func:`matting_pipeline.trainer.train` on that job -- shard decoding, views and
  augmentation, MLB labels, the step, windowed MLflow logging (a sqlite store in the temp
  dir), resumable states every ``checkpoint_every`` steps, the progress bar;
- ``bare``: the same network (same init), optimiser parameter groups, schedule, objective
  and :func:`matting_core.training.train_step`, on one batch of the same shape made once
  before the clock starts.

Rates are steady-state steps/s between step ``--warmup`` and the last step (the clock is
read by the loop's ``on_step`` hook, after any checkpoint of that step); ``run`` adds the
per-run fixed costs of the loop (MLflow run, fingerprint, model.pt). The ratio is
``loop / bare`` of the medians; the target is >= 0.9 on CPU. The math threads are
``train.threads`` (params default 1, as every stage runs them), or ``--threads``; the
memory layout (``train.channels_last``) and the decoded-sample cache (``train.cache_mb``)
are the params' too, applied as the stages apply them (``apply_train_settings``).

Run::

    python benchmarks/bench_training.py            # 150 steps per run, 3 rounds
    python benchmarks/bench_training.py --quick    # 60 steps, 3 rounds (make bench)
    python benchmarks/bench_training.py --stages student --steps 200 --profile   # where the loop's time goes
    python benchmarks/bench_training.py --quick --variants channels_first   # what channels-last buys
    python benchmarks/bench_training.py --quick --stages pretrain --variants compile  # torch.compile (minutes)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

from matting_core.checkpoint import save_checkpoint  # noqa: E402
from matting_core.models import build_network  # noqa: E402
from matting_core.training import cosine_schedule, train_step  # noqa: E402
from matting_pipeline.layout import Layout  # noqa: E402
from matting_pipeline.trainer import apply_train_settings, place_model, set_math_threads, to_device, train  # noqa: E402
from matting_pipeline.views import make_loader  # noqa: E402

STAGES = ("pretrain", "teacher", "student")


def make_world(root: Path, quick: bool, network: str, steps: int) -> tuple[object, dict[str, int]]:
    """The repository's params.yaml (only ``iters`` and the data set's size changed); synthetic
    data through ingest → shard → composite, random pretrain/teacher checkpoints and the
    student's offline pseudo-labels; returns ``(params, budgets)``."""
    from _world import synthetic_data
    from stages import pseudolabel

    counts = {"matte": 16, "background": 16, "seg": 64, "val_natural": 4} if quick else {
        "matte": 48, "background": 48, "seg": 240, "val_natural": 4}
    # the demo's batch, crop, lr and cadences; only the length changes
    params = synthetic_data(root, counts, {stage: {"iters": steps} for stage in STAGES}, network)
    data = root / "data"
    seg, mat = counts["seg"], 8
    base = Layout(data=data, models=root / "base").for_seed(0)
    torch.manual_seed(0)
    save_checkpoint(base.model_path("pretrain", seg), build_network(network))
    save_checkpoint(base.model_path("teacher", seg, mat), build_network(network))
    plan = pseudolabel.make_plan(params, seg, mat, data, root / "base")
    pseudolabel.label_in_process(plan, plan.out_dir)
    return params, {"seg": seg, "mat": mat}


def build(stage: str, params, budgets: dict[str, int], root: Path):
    """The stage's job in a fresh models root holding the base checkpoints."""
    import argparse as ap

    module = __import__(f"stages.{stage}", fromlist=["build_job"])
    models = root / f"models-{stage}"
    shutil.rmtree(models, ignore_errors=True)
    shutil.copytree(root / "base", models)
    out = Layout(data=root / "data", models=models).for_seed(0)
    shutil.rmtree(out.model_dir(stage, budgets["seg"], budgets["mat"]) if stage != "pretrain"
                  else out.model_dir("pretrain", budgets["seg"]), ignore_errors=True)
    args = ap.Namespace(seg=budgets["seg"], mat=budgets["mat"], params=None, data_root=str(root / "data"),
                        models_root=str(models), device="cpu", iters=None, seed=0)
    return apply_train_settings(module.build_job(args, params, torch.device("cpu")), params)


def steady_rate(times: list[float], warmup: int) -> float:
    """Steps/s between step ``warmup`` and the last step (``times[i]`` = end of step i+1)."""
    return (len(times) - warmup) / (times[-1] - times[warmup - 1])


def time_loop(job) -> tuple[float, float]:
    """(steady steps/s, whole-run steps/s) of :func:`train` on ``job``."""
    times: list[float] = []
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        train(job, torch.device("cpu"), on_step=lambda *_: times.append(time.perf_counter()), progress=True)
    whole = len(times) / (time.perf_counter() - start)
    return steady_rate(times, WARMUP), whole


def time_bare(job, variant: str | None = None) -> float:
    """Steady steps/s of the same network, optimiser and objective on one pre-made batch;
    ``variant`` ``channels_first`` / ``channels_last`` overrides the job's layout,
    ``compile`` adds ``torch.compile`` of the network (its compilation is left out, and
    printed)."""
    cpu = torch.device("cpu")
    if variant in ("channels_first", "channels_last"):
        job.channels_last = variant == "channels_last"
    loader = iter(make_loader(job.dataset, int(job.hyper["batch_size"]), 0, 0))
    batch = to_device(next(loader), cpu, job.channels_last)
    if job.prepare_batch is not None:
        batch = job.prepare_batch(batch)
    model = place_model(job.model, cpu, job.channels_last)
    stepped = model
    if variant == "compile":
        start = time.perf_counter()
        stepped = torch.compile(model)
        train_step(stepped, torch.optim.SGD(model.parameters(), lr=0.0), batch, job.objective,
                   input_key=job.input_key)  # compiles forward and backward
        print(f"    torch.compile of {job.stage}'s network: {time.perf_counter() - start:.0f} s", flush=True)
    parameters = model.parameters() if job.optimizer_parameters is None else job.optimizer_parameters()
    optimizer = torch.optim.Adam(parameters, lr=float(job.hyper["lr"]))
    iters = int(job.hyper["iters"])
    scheduler = cosine_schedule(optimizer, iters)
    times: list[float] = []
    for step in range(iters):
        if job.step_fn is not None:
            job.step_fn(batch, optimizer, step, iters, scheduler=scheduler, scaler=None, autocast_dtype=None)
        else:
            train_step(stepped, optimizer, batch, job.objective, input_key=job.input_key, scheduler=scheduler)
        if job.after_step is not None:
            job.after_step()
        times.append(time.perf_counter())
    return steady_rate(times, WARMUP)


WARMUP = 5


def main(argv: list[str] | None = None) -> int:
    global WARMUP
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--quick", action="store_true", help="a small data set, 60 steps per run, 3 rounds")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default 150; quick 60)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds, medians reported (default 3)")
    ap.add_argument("--warmup", type=int, default=WARMUP, help=f"steps not timed at the start of a run (default {WARMUP})")
    ap.add_argument("--network", default="unet_r18x0.5", help="network of every stage (default unet_r18x0.5)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    ap.add_argument("--threads", type=int, default=None, help="math threads (default: params train.threads)")
    ap.add_argument("--cache-mb", type=int, default=None, help="decoded-sample cache (default: params train.cache_mb)")
    ap.add_argument("--channels-last", type=int, choices=(0, 1), default=None,
                    help="1/0: train channels-last or not, loop and bare alike (default: params train.channels_last)")
    ap.add_argument("--variants", default="",
                    help="comma list of extra bare-step variants timed each round against the bare step: "
                         "channels_first, channels_last, compile (torch.compile; step-function methods excluded)")
    ap.add_argument("--profile", action="store_true", help="also print cProfile's top functions of one loop run per stage")
    args = ap.parse_args(argv)
    steps = args.steps or (60 if args.quick else 150)
    rounds = args.rounds or 3  # with 2, one noisy pair of runs decides the median
    WARMUP = max(1, min(args.warmup, steps - 2))
    stages = [s for s in args.stages.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    if set(variants) - {"channels_first", "channels_last", "compile"}:
        ap.error(f"--variants: unknown {sorted(set(variants) - {'channels_first', 'channels_last', 'compile'})}")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        ap.error(f"--stages: unknown {unknown}; choose from {', '.join(STAGES)}")

    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        t0 = time.perf_counter()
        params, budgets = make_world(root, args.quick, args.network, steps)
        overrides = {k: v for k, v in (("cache_mb", args.cache_mb), ("channels_last", args.channels_last))
                     if v is not None}
        params = params.model_copy(update={"train": params.train.model_copy(update=overrides)})
        threads = params.train.threads if args.threads is None else args.threads
        set_math_threads(threads)
        job0 = build("student", params, budgets, root)
        print(f"bench_training: {args.network}, batch {job0.hyper['batch_size']}, crop {job0.hyper['crop']}, "
              f"{steps} steps per run ({WARMUP} not timed), {rounds} rounds interleaved, "
              f"{torch.get_num_threads()} math thread(s), {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"num_workers {params.train.num_workers}, cache {params.train.cache_mb} MiB, "
              f"channels_last {params.train.channels_last}, load avg {os.getloadavg()[0]:.1f}")
        print(f"  (data, checkpoints and pseudo-labels made in {time.perf_counter() - t0:.1f} s, not counted)",
              flush=True)
        results: dict[str, dict[str, list[float]]] = {s: {"loop": [], "bare": [], "run": [], "ratio": []}
                                                      for s in stages}
        for r in range(rounds):
            for stage in stages:
                if r % 2 == 0:  # alternate which goes first: an order effect cancels over rounds
                    steady, whole = time_loop(build(stage, params, budgets, root))
                    bare = time_bare(build(stage, params, budgets, root))
                else:
                    bare = time_bare(build(stage, params, budgets, root))
                    steady, whole = time_loop(build(stage, params, budgets, root))
                results[stage]["loop"].append(steady)
                results[stage]["run"].append(whole)
                results[stage]["bare"].append(bare)
                results[stage]["ratio"].append(steady / bare)
                for variant in variants:
                    rate = time_bare(build(stage, params, budgets, root), variant)
                    results[stage].setdefault(variant, []).append(rate / bare)
                    print(f"    {variant}: {rate:6.2f}/s, x{rate / bare:.3f} the bare step", flush=True)
                print(f"  round {r + 1} {stage:<8} loop {steady:6.2f}/s  bare {bare:6.2f}/s  "
                      f"ratio {steady / bare:.3f}", flush=True)
        if args.profile:
            import cProfile
            import pstats

            for stage in stages:
                job = build(stage, params, budgets, root)
                prof = cProfile.Profile()
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    prof.runcall(train, job, torch.device("cpu"), progress=True)
                print(f"\n== profile of one {stage} loop run (cumulative, top 25)")
                pstats.Stats(prof).sort_stats("cumulative").print_stats(25)

    print(f"\n{'stage':<9} {'loop/s':>7} {'bare/s':>7} {'ratio':>6} {'run/s':>6}  (medians of {rounds}; ratio: "
          "median of each round's loop/bare, the two timed back to back)")
    worst = float("inf")
    for stage in stages:
        loop, bare = statistics.median(results[stage]["loop"]), statistics.median(results[stage]["bare"])
        run, ratio = statistics.median(results[stage]["run"]), statistics.median(results[stage]["ratio"])
        worst = min(worst, ratio)
        print(f"{stage:<9} {loop:7.2f} {bare:7.2f} {ratio:6.3f} {run:6.2f}")
    for variant in variants:
        speed = ", ".join(f"{stage} x{statistics.median(results[stage][variant]):.3f}" for stage in stages)
        print(f"bare step with {variant} / bare step (median of {rounds}): {speed}")
    verdict = "meets" if worst >= 0.9 else "MISSES"
    print(f"loop/bare ratio: lowest {worst:.3f} ({verdict} the 0.9 target); run/s includes each run's fixed costs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
