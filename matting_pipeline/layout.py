"""Every path of the project's tree, defined once.

::

    data/ingest/{manifest.jsonl, quarantine.jsonl, summary.json}    ingest
    data/shards/<set>/{index.json, <set>-NNNNNN.tar}                shard   (matte, background, seg, val-<name>)
    data/composite/{train, val-composited}/                         composite
    data/pseudolabels/seg<S>-mat<M>/                                pseudolabel@S-M
    models/pretrain/seg<S>/model.pt                                 pretrain@S
    models/{teacher, student}/seg<S>-mat<M>/model.pt                teacher@S-M, student@S-M
    models/methods/<method>/seg<S>-mat<M>/model.pt                  method@<method>
    eval/seg<S>-mat<M>/, eval/methods/<method>/                     evaluate*
    metrics/seg<S>-mat<M>.json, metrics/methods/<method>.json       evaluate*
    reports/                                                        report

Stages build a :class:`Layout` from their ``--data-root`` / ``--models-root`` / ...
arguments (the defaults are the tree above, relative to the repository root); dvc.yaml
writes the same paths, and ``tests/test_project.py`` checks that every stage instance's
outs are the ones this module gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from matting_core.grid import cell_kind, cell_name

__all__ = ["Layout", "MODEL_NAME", "RUN_NAME", "STATE_NAME", "cell_kind", "cell_name"]

MODEL_NAME = "model.pt"  # the trained network (a DVC out)
STATE_NAME = "state.pt"  # the resumable training state beside it (not a DVC out: it survives a kill)
RUN_NAME = "run.json"  # the MLflow run of the training job beside it


@dataclass(frozen=True)
class Layout:
    """The tree under five roots (module doc). Paths are relative when the roots are."""

    data: Path = Path("data")
    models: Path = Path("models")
    metrics: Path = Path("metrics")
    eval: Path = Path("eval")
    reports: Path = Path("reports")

    def __post_init__(self) -> None:
        for name in ("data", "models", "metrics", "eval", "reports"):
            object.__setattr__(self, name, Path(getattr(self, name)))

    # ------------------------------------------------------------------ data

    @property
    def ingest_dir(self) -> Path:
        return self.data / "ingest"

    @property
    def manifest(self) -> Path:
        return self.ingest_dir / "manifest.jsonl"

    @property
    def quarantine(self) -> Path:
        return self.ingest_dir / "quarantine.jsonl"

    @property
    def ingest_summary(self) -> Path:
        return self.ingest_dir / "summary.json"

    @property
    def shards_root(self) -> Path:
        return self.data / "shards"

    def shard_set(self, name: str) -> Path:
        """``data/shards/<name>``: ``matte``, ``background``, ``seg`` or ``val-<name>``."""
        return self.shards_root / name

    @property
    def composite_root(self) -> Path:
        return self.data / "composite"

    def composite_set(self, name: str) -> Path:
        """``data/composite/<name>``: ``train`` or ``val-composited``."""
        return self.composite_root / name

    def pseudolabel_dir(self, seg_count: int, mat_count: int) -> Path:
        return self.data / "pseudolabels" / cell_name(seg_count, mat_count)

    # ---------------------------------------------------------------- models

    def model_dir(self, stage: str, seg_count: int, mat_count: int = 0) -> Path:
        """``models/pretrain/seg<S>`` (pre-training depends on S only) or ``models/<stage>/seg<S>-mat<M>``."""
        if stage == "pretrain":
            return self.models / "pretrain" / f"seg{int(seg_count)}"
        if stage not in ("teacher", "student"):
            raise ValueError(f"stage must be pretrain, teacher or student, got {stage!r} (methods: method_dir)")
        return self.models / stage / cell_name(seg_count, mat_count)

    def model_path(self, stage: str, seg_count: int, mat_count: int = 0) -> Path:
        return self.model_dir(stage, seg_count, mat_count) / MODEL_NAME

    def method_dir(self, method: str, seg_count: int, mat_count: int) -> Path:
        """``models/methods/<method>/seg<S>-mat<M>`` (the methods comparison)."""
        return self.models / "methods" / method / cell_name(seg_count, mat_count)

    # -------------------------------------------------------- eval / metrics

    def cell_eval_dir(self, seg_count: int, mat_count: int) -> Path:
        return self.eval / cell_name(seg_count, mat_count)

    def cell_metrics(self, seg_count: int, mat_count: int) -> Path:
        return self.metrics / f"{cell_name(seg_count, mat_count)}.json"

    def method_eval_dir(self, method: str) -> Path:
        return self.eval / "methods" / method

    @property
    def method_metrics_dir(self) -> Path:
        return self.metrics / "methods"

    def method_metrics(self, method: str) -> Path:
        return self.method_metrics_dir / f"{method}.json"
