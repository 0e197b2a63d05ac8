"""Do a training stage's weights depend on the runner's thread count? (issue 16 item 6)

    python scripts/thread_determinism.py

Pre-trains the tiny test network (tests/stages/test_training.py data, 30 steps) four times
with ``python -m stages.pretrain``: ``train.threads`` 0 (the environment decides, as before
the param existed) and 1, each under ``OMP_NUM_THREADS`` 1 and 2, and prints the first 12
hex digits of each model's weights digest. With 0 the two thread counts train different
weights; with 1 all agree.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from matting_core.checkpoint import read_checkpoint  # noqa: E402
from tests.stages.test_training import SEG, make_data, make_params  # noqa: E402


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="threads-") as tmp:
        root = Path(tmp)
        make_data(root / "data")
        digests = {}
        for threads in (0, 1):
            raw = make_params(pretrain={"iters": 30, "checkpoint_every": 100})
            raw["train"]["threads"] = threads
            params = root / f"params-{threads}.yaml"
            params.write_text(yaml.safe_dump(raw))
            for omp in ("1", "2"):
                models = root / f"models-{threads}-{omp}"
                env = {**os.environ, "OMP_NUM_THREADS": omp, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
                subprocess.run([sys.executable, "-m", "stages.pretrain", "--seg", str(SEG), "--params", str(params),
                                "--data-root", str(root / "data"), "--models-root", str(models), "--device", "cpu"],
                               env=env, check=True, capture_output=True, cwd=REPO)
                model = models / "seed0" / "pretrain" / f"seg{SEG}" / "model.pt"
                digests[threads, omp] = read_checkpoint(model)["tensors_sha256"][:12]
                print(f"train.threads {threads}  OMP_NUM_THREADS {omp}:  weights {digests[threads, omp]}", flush=True)
        for threads in (0, 1):
            same = digests[threads, "1"] == digests[threads, "2"]
            print(f"train.threads {threads}: 1 and 2 environment threads {'agree' if same else 'DIFFER'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
