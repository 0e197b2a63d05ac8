"""Pre-training probe: how fast the seg-pretraining recipe fits its masks (README "Training regime").

Trains the pre-training step in-process (no DVC, no MLflow) on the first ``--seg`` samples
of ``<data>/shards/seg`` with one recipe variant and prints one JSON line: the mean training
MSE of the first 10 and the last 10 % of the steps, the natural-set MSE x1e3 whole /
boundary, and seconds per step. Seed 0 (data order, augmentation, init).

    python scripts/pretrain_probe.py --data data --iters 600 --lr 3e-3
    python scripts/pretrain_probe.py --data data --iters 200 --lr 1e-3 --warmup 20 --batch 16
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matting_core.inference import predict_alpha  # noqa: E402
from matting_core.losses import mse_loss  # noqa: E402
from matting_core.metrics import evaluate_alpha  # noqa: E402
from matting_core.models import build_network  # noqa: E402
from matting_pipeline.jobs import budget_keys  # noqa: E402
from matting_pipeline.shards import ShardReader, iter_samples  # noqa: E402
from matting_pipeline.views import ViewDataset, make_loader  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data", help="data folder after `dvc repro shard`")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps before the cosine decay")
    p.add_argument("--crop", type=int, default=96)
    p.add_argument("--scale", type=float, nargs=2, default=[0.75, 1.25])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--net", default="unet_r18x0.5")
    p.add_argument("--seg", type=int, default=240)
    p.add_argument("--short-side", type=int, default=128)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    shards = Path(a.data) / "shards"
    reader = ShardReader(shards / "seg", budget_keys(shards / "seg", a.seg))
    loader = iter(make_loader(ViewDataset(reader, ["mask"], a.crop, tuple(a.scale), 0), a.batch, 0, 0))
    model = build_network(a.net)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)

    def factor(t: int) -> float:
        if t < a.warmup:
            return (t + 1) / a.warmup
        return 0.5 * (1 + math.cos(math.pi * (t - a.warmup) / max(1, a.iters - a.warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    losses, start = [], time.perf_counter()
    for _ in range(a.iters):
        batch = next(loader)
        loss = mse_loss(model(batch["image"]), batch["mask"])["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    seconds = (time.perf_counter() - start) / a.iters
    whole, boundary = [], []
    for sample in iter_samples(shards / "val-natural"):
        scores = evaluate_alpha(predict_alpha(model, sample["image"], short_side=a.short_side), sample["alpha"])
        whole.append(scores["whole"]["mse"])
        boundary.append(scores["boundary"]["mse"])
    tail = max(1, a.iters // 10)
    print(json.dumps({
        "iters": a.iters, "lr": a.lr, "warmup": a.warmup, "batch": a.batch, "crop": a.crop, "scale": a.scale,
        "train_mse_first10": round(float(np.mean(losses[:10])), 4),
        "train_mse_last10pct": round(float(np.mean(losses[-tail:])), 4),
        "natural_mse_x1e3": [round(1e3 * float(np.mean(whole)), 1), round(1e3 * float(np.mean(boundary)), 1)],
        "s_per_step": round(seconds, 3),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
