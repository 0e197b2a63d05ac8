"""Every path of the project's tree, defined once.

::

    data/ingest/{manifest.jsonl, quarantine.jsonl, summary.json}    ingest
    data/shards/<set>/{index.json, <set>-NNNNNN.tar}                shard   (matte, background, seg, val-<name>)
    data/composite/{train, val-composited}/                         composite
    data/pseudolabels/seed<k>/seg<S>-mat<M>/                        pseudolabel@S-M-k
    models/seed<k>/pretrain/seg<S>/model.pt                         pretrain@S-k
    models/seed<k>/control/seg<S>/model.pt                          control@S-k
    models/seed<k>/{teacher, student}/seg<S>-mat<M>/model.pt        teacher@S-M-k, student@S-M-k
    models/seed<k>/methods/<method>/seg<S>-mat<M>/model.pt          method@<method>-k
    eval/seed<k>/seg<S>-mat<M>/, eval/seed<k>/methods/<method>/     evaluate*
    metrics/seed<k>/seg<S>-mat<M>.json, .../methods/<method>.json   evaluate*
    reports/                                                        report

``k`` is a study seed (``study.seeds``): every training and evaluation stage runs once per
seed, and :meth:`Layout.for_seed` gives the tree of one seed (the data up to the
composites is shared by all seeds). Stages build a :class:`Layout` from their
``--data-root`` / ``--models-root`` / ... and ``--seed`` arguments (the defaults are the
tree above, relative to the repository root); dvc.yaml writes the same paths, and
``tests/test_project.py`` checks that every stage instance's outs are the ones this
module gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from matting_core.grid import cell_kind, cell_name

__all__ = ["Layout", "MODEL_NAME", "RUN_NAME", "STATE_NAME", "cell_kind", "cell_name", "seed_name"]

MODEL_NAME = "model.pt"  # the trained network (a DVC out)
STATE_NAME = "state.pt"  # the resumable training state beside it (not a DVC out: it survives a kill)
RUN_NAME = "run.json"  # the MLflow run of the training job beside it


def seed_name(seed: int) -> str:
    """``seed<k>``: the folder of one study seed."""
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"a study seed must be >= 0, got {seed}")
    return f"seed{seed}"


@dataclass(frozen=True)
class Layout:
    """The tree under five roots (module doc). Paths are relative when the roots are.

    ``seed`` None: the roots as given (the shared data, or a tree of your own); a seed:
    the per-seed folders under models/, metrics/, eval/ and data/pseudolabels/ (use
    :meth:`for_seed`).
    """

    data: Path = Path("data")
    models: Path = Path("models")
    metrics: Path = Path("metrics")
    eval: Path = Path("eval")
    reports: Path = Path("reports")
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("data", "models", "metrics", "eval", "reports"):
            object.__setattr__(self, name, Path(getattr(self, name)))

    def for_seed(self, seed: int) -> "Layout":
        """The tree of study seed ``seed`` under these roots."""
        if self.seed is not None:
            raise ValueError(f"this layout is already the tree of seed {self.seed}")
        seed_name(seed)  # validates
        return Layout(self.data, self.models, self.metrics, self.eval, self.reports, int(seed))

    def _seeded(self, root: Path) -> Path:
        return root if self.seed is None else root / seed_name(self.seed)

    @property
    def models_dir(self) -> Path:
        """``models/seed<k>`` (or the models root without a seed)."""
        return self._seeded(self.models)

    @property
    def metrics_dir(self) -> Path:
        """``metrics/seed<k>`` (or the metrics root without a seed)."""
        return self._seeded(self.metrics)

    @property
    def eval_dir(self) -> Path:
        return self._seeded(self.eval)

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
        return self._seeded(self.data / "pseudolabels") / cell_name(seg_count, mat_count)

    # ---------------------------------------------------------------- models

    def model_dir(self, stage: str, seg_count: int, mat_count: int = 0) -> Path:
        """``models/<seed>/{pretrain, control}/seg<S>`` (they depend on S only) or
        ``models/<seed>/{teacher, student}/seg<S>-mat<M>``."""
        if stage in ("pretrain", "control"):
            return self.models_dir / stage / f"seg{int(seg_count)}"
        if stage not in ("teacher", "student"):
            raise ValueError(
                f"stage must be pretrain, control, teacher or student, got {stage!r} (methods: method_dir)"
            )
        return self.models_dir / stage / cell_name(seg_count, mat_count)

    def model_path(self, stage: str, seg_count: int, mat_count: int = 0) -> Path:
        return self.model_dir(stage, seg_count, mat_count) / MODEL_NAME

    def method_dir(self, method: str, seg_count: int, mat_count: int) -> Path:
        """``models/methods/<method>/seg<S>-mat<M>`` (the methods comparison)."""
        return self.models_dir / "methods" / method / cell_name(seg_count, mat_count)

    # -------------------------------------------------------- eval / metrics

    def cell_eval_dir(self, seg_count: int, mat_count: int) -> Path:
        return self.eval_dir / cell_name(seg_count, mat_count)

    def cell_metrics(self, seg_count: int, mat_count: int) -> Path:
        return self.metrics_dir / f"{cell_name(seg_count, mat_count)}.json"

    def method_eval_dir(self, method: str) -> Path:
        return self.eval_dir / "methods" / method

    @property
    def method_metrics_dir(self) -> Path:
        return self.metrics_dir / "methods"

    def method_metrics(self, method: str) -> Path:
        return self.method_metrics_dir / f"{method}.json"
