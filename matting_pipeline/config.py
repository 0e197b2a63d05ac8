"""Typed schema of ``params.yaml``.

Every stage reads its section through :func:`load_params`, so a typo or a wrong type
fails at once with the key's dotted name instead of an hour into training::

    >>> params = load_params("params.yaml")
    >>> params.train.teacher.lr
    5e-05

Unknown keys are errors (``extra="forbid"``); values that cannot be read as the field's
type are errors (``lr: 1e-4``, which YAML 1.1 reads as a string, is still accepted as a
float). Project choices (METHOD.md "project choice") are
documented next to their fields and in params.yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """params.yaml does not match the schema; the message names every bad key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticConfig(_Section):
    """Sizes of the embedded procedural dataset (``data.source: synthetic``)."""

    image_size: int = Field(128, ge=32, description="side of every generated image, px")
    matte: int = Field(48, ge=1, description="foregrounds with exact alpha (D_m)")
    background: int = Field(48, ge=1, description="backgrounds without people")
    seg: int = Field(240, ge=1, description="natural scenes with coarse person masks (D_s)")
    val_natural: int = Field(16, ge=1, description="natural scenes with exact alpha (validation)")
    seed: int = 0


class DataConfig(_Section):
    source: Literal["synthetic", "folders"] = "synthetic"
    matte_dir: str | None = None
    background_dir: str | None = None
    seg_dir: str | None = None
    val: dict[str, str] = Field(
        default_factory=dict,
        description="{name: dir} validation sets; the set is called val-<name> (name: a-z, 0-9, _ or -)",
    )
    synthetic: SyntheticConfig = SyntheticConfig()
    shard_url: str | None = Field(
        None,
        description="where the stages read shard sets from and publish them to: an s3://, gs://, "
        "http(s):// or file:// URL standing for the data root (set <data>/shards/seg is read from "
        "<shard_url>/shards/seg, verified against the local index.json); None = the local files. "
        "Reading from it changes no result, so it is no DVC param dep",
    )

    @field_validator("shard_url")
    @classmethod
    def _shard_url_scheme(cls, v: str | None) -> str | None:
        import re

        if v is not None and not re.fullmatch(r"(s3|gs|https?|file)://[^\s]+", v):
            raise ValueError(
                "must be an s3://, gs://, http(s):// or file:// URL (e.g. s3://my-bucket/matting), "
                "or null to read the local shard sets"
            )
        return v

    @field_validator("val")
    @classmethod
    def _val_names(cls, v: dict[str, str]) -> dict[str, str]:
        import re

        bad = [n for n in v if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", n)]
        if bad:
            raise ValueError(
                f"validation set names {bad} must be lower-case ASCII letters, digits, '_' or '-' "
                "(they become shard-set names val-<name>)"
            )
        return v

    @model_validator(mode="after")
    def _folders_need_paths(self) -> "DataConfig":
        if self.source == "folders":
            missing = [k for k in ("matte_dir", "background_dir", "seg_dir") if getattr(self, k) is None]
            if missing:
                raise ValueError(
                    "data.source is 'folders' but " + ", ".join(f"data.{k}" for k in missing)
                    + (" are" if len(missing) > 1 else " is") + " not set (null); point "
                    + ("each" if len(missing) > 1 else "it") + " at your dataset folder (README 'Data layouts'), "
                    "or use data.source: synthetic for the embedded demo data"
                )
        return self


class ShardConfig(_Section):
    samples_per_shard: int = Field(64, ge=1)
    subset_seed: int = Field(0, description="seed of the per-set permutation behind nested subsets")


class CompositeConfig(_Section):
    backgrounds_per_fg: int = Field(4, ge=1, description="DIM: each foreground over N backgrounds")
    two_instance_ratio: float = Field(
        0.2, ge=0.0, le=1.0, description="extra MGM-in-the-wild samples with two foregrounds, per fg sample"
    )
    background_scale: tuple[float, float] = Field(
        (1.0, 1.5), description="fit_background: cover scale times U(lo, hi), then a random crop"
    )
    two_instance_scale: tuple[float, float] = Field(
        (0.6, 1.0), description="project choice: the second instance is scaled to fit the canvas times U(lo, hi)"
    )
    val_composited: bool = Field(True, description="build a Distinctions-646-style composited val set")
    val_backgrounds_per_fg: int = Field(5, ge=1)
    val_foregrounds: int = Field(
        8, ge=0, description="last foregrounds of the matte order held out for the composited val set"
    )
    val_backgrounds: int = Field(
        8, ge=0, description="project choice: last backgrounds of their order kept for val only (0 = shared)"
    )
    seed: int = 0

    @property
    def held_out_foregrounds(self) -> int:
        """Foregrounds kept out of every training subset for the composited validation set."""
        return self.val_foregrounds if self.val_composited else 0

    @field_validator("background_scale", "two_instance_scale")
    @classmethod
    def _scale_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0.0 < v[0] <= v[1]):
            raise ValueError("must be (lo, hi) with 0 < lo <= hi")
        return v


class ModelConfig(_Section):
    network: str = Field("unet_r18x0.5", description="name in matting_core.models.NETWORKS")
    backbone_weights: str | None = Field(
        None,
        description="a torchvision/timm ImageNet ResNet checkpoint (state dict) loaded into the backbone of "
        "every network trained from scratch; you supply the file, nothing is downloaded",
    )


class StepConfig(_Section):
    """Hyper-parameters of one training step (pretrain / teacher / student)."""

    iters: int = Field(ge=1)
    lr: float = Field(gt=0)
    batch_size: int = Field(8, ge=1)
    crop: int = Field(96, ge=32, description="training crop side, px (multi-scale crops around it)")
    scale_range: tuple[float, float] = (0.75, 1.25)
    checkpoint_every: int = Field(50, ge=1)
    log_every: int = Field(10, ge=1)
    seed: int = 0


MatteLoss = Literal["conventional", "l1", "mse"]


class MatteStepConfig(StepConfig):
    """A step that trains the matte and boundary heads (teacher, student, control)."""

    matte_loss: MatteLoss = Field(
        "conventional", description="conventional (L1 + composition + Laplacian, MGM) | l1 | mse"
    )
    lambda_boundary: float = Field(0.01, ge=0, description="λ of BCE(b', b); paper found 0.1/0.01/0.001 within 1%")
    boundary_pos_weight: float = Field(
        1.0, gt=0, description="weight of the boundary (positive) class in the BCE; 1 = plain BCE"
    )
    boundary_head_lr: float = Field(
        1.0, gt=0, description="lr multiplier of the boundary head's parameters"
    )


class TeacherConfig(MatteStepConfig):
    single_person: bool = Field(
        False,
        description="MLB teachers train on one-person composites only (the paper's teacher data); "
        "the two-instance composites stay for MGM in the wild",
    )


class BlendConfig(_Section):
    mode: Literal["soft", "hard"] = Field("soft", description="project choice: β soft by default")
    dilate: int = Field(0, ge=0, description="dilation of the hard β, px (hard mode only)")


class StudentConfig(MatteStepConfig):
    label_mode: Literal["offline", "ema"] = "offline"
    ema_momentum: float = Field(0.999, gt=0, lt=1, description="project choice m for online EMA mode")
    blend: BlendConfig = BlendConfig()
    network: str | None = Field(None, description="student network; None = model.network")


class TrainConfig(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(True, description="mixed precision on CUDA (bfloat16 where supported, else float16)")
    num_workers: int = Field(
        2, ge=0, description="DataLoader worker processes decoding shards (0 = in the training process)"
    )
    cache_mb: int = Field(
        512, ge=0,
        description="decoded training samples kept in memory per loader process, MiB (0 = decode every "
        "draw); does not change results",
    )
    channels_last: bool = Field(
        True,
        description="train in the channels-last memory layout (NHWC): ~20 % faster steps on CPU; the "
        "weights differ from a channels-first run in the last bits, so it is a param",
    )
    threads: int = Field(
        1, ge=0,
        description="math threads of every training and evaluation stage (torch.set_num_threads); CPU "
        "kernels sum in a thread-dependent order, so results depend on it and it is a param: dvc repro, "
        "flows.repro and Prefect give the same weights. 0 = leave it to OMP_NUM_THREADS / torch",
    )
    pretrain: StepConfig = StepConfig(iters=150, lr=1e-4)
    teacher: TeacherConfig = TeacherConfig(iters=150, lr=5e-5)
    student: StudentConfig = StudentConfig(iters=150, lr=5e-5)


class PseudolabelConfig(_Section):
    """The Ray Data labelling job (``stages/pseudolabel.py``).

    Actors each hold one teacher copy. With GPUs in the cluster (and ``gpus_per_actor > 0``)
    each actor gets ``gpus_per_actor`` and ``cpus_per_actor`` (default 1) and the pool is
    capped at the GPUs there are; otherwise each CPU actor gets ``cpus_per_actor`` or, by
    default, an equal share of the cluster's CPUs once the shard readers have ``read_cpus``
    (reserving every CPU for actors would leave the readers none: the job would hang).
    """

    num_actors: int = Field(2, ge=1, description="actors in the pool (teacher copies)")
    batch_size: int = Field(8, ge=1, description="samples per actor call")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray; None = all")
    gpus_per_actor: float = Field(
        1.0, ge=0, description="used only when the cluster has GPUs; 0 = CPU actors even there"
    )
    cpus_per_actor: float | None = Field(
        None, gt=0, description="None = 1 with a GPU, else an equal share of the CPUs left by the readers"
    )
    read_cpus: float = Field(0.25, gt=0, description="CPUs reserved per shard-reading task")
    max_restarts: int = Field(
        3, ge=0, description="times Ray restarts a dead actor; its unfinished batches are retried as often"
    )


class EvaluateConfig(_Section):
    short_side: int = Field(512, ge=32, description="test-time resize of the shorter side")
    save_predictions: int = Field(4, ge=0, description="prediction images saved per val set")
    fps_size: int = Field(512, ge=32)
    fps_iters: int = Field(5, ge=1)
    register_models: bool = Field(
        True, description="register every both-cell student in the MLflow Model Registry (ONNX flavour) and "
        "point the alias 'champion' at the lowest natural boundary MSE (matting_pipeline/registry.py)",
    )
    registered_model: str = Field("matting-student", min_length=1, description="the registered model's name")


class StudyConfig(_Section):
    """The label-budget grid.

    ``seg`` and ``mat`` list the non-zero budgets; the grid adds the 0 budget on each
    axis, so cells are ({0} ∪ seg) × ({0} ∪ mat) without (0, 0): seg-only cells
    (S, 0) stop at the pre-trained model, mat-only cells (0, M) train the teacher from
    scratch, and the other cells run pre-train → teacher → MLB student. The paper's
    study is seg [2000, 5000, 10000, 20000, 50000] × mat [50, 200, 500, 1000, 2000]
    (35 cells).
    """

    experiment: str = "matting-label-efficiency"
    seg: list[int] = Field(default_factory=lambda: [60, 240])
    mat: list[int] = Field(default_factory=lambda: [8, 32])
    seeds: list[int] = Field(
        default_factory=lambda: [0],
        description="study seeds: every training and evaluation stage runs once per seed (models/seed<k>/...)",
    )
    bootstrap: int = Field(2000, ge=100, description="bootstrap replicates of the report's 95 % intervals")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v or any(x < 0 for x in v) or sorted(set(v)) != v:
            raise ValueError("seeds must be non-negative, unique, ascending and not empty")
        return v

    @field_validator("seg", "mat")
    @classmethod
    def _sorted_unique(cls, v: list[int]) -> list[int]:
        if 0 in v:
            raise ValueError("list only the non-zero budgets: the grid always adds the 0 budget")
        if any(x < 0 for x in v) or sorted(set(v)) != v or not v:
            raise ValueError("budgets must be positive, unique, ascending and not empty")
        return v

    def cells(self) -> list[tuple[int, int]]:
        """Every (seg, mat) cell of the grid, (0, 0) excluded, in row-major order."""
        return [(s, m) for s in [0, *self.seg] for m in [0, *self.mat] if (s, m) != (0, 0)]



# ----------------------------------------------------------------------------- related methods

MethodName = Literal["mlb", "dim", "adamatting", "mgm", "mgm_wild", "mam"]
ComparedMethod = Literal["dim", "adamatting", "mgm", "mgm_wild", "mam"]  # every MethodName but mlb
# The one list of the related methods' names (matting_core.methods.METHODS has them all, a test checks).
COMPARED_METHODS: tuple[str, ...] = get_args(ComparedMethod)


class DIMOptions(_Section):
    """Deep Image Matting (matting_core/methods/dim.py)."""

    phase_fractions: tuple[float, float] = Field(
        (0.5, 0.25),
        description="project choice: run fractions of the encoder-decoder and refinement phases; the rest is joint",
    )

    @field_validator("phase_fractions")
    @classmethod
    def _fractions(cls, v: tuple[float, float]) -> tuple[float, float]:
        if min(v) < 0 or sum(v) > 1:
            raise ValueError("two fractions >= 0 whose sum is at most 1 (the joint phase gets the rest)")
        return v


class AdaMattingOptions(_Section):
    """AdaMatting (matting_core/methods/adamatting.py)."""

    propagation_steps: int = Field(3, ge=0, description="project choice: T, ConvLSTM unrolling steps")
    alpha_region: Literal["image", "unknown"] = Field(
        "image", description="project choice: L1 over the whole image or the unknown region only"
    )
    trimap_band_px: int = Field(3, ge=0, description="project choice: unknown band of the GT trimap classes, px")


class MGMOptions(_Section):
    """Mask-Guided Matting (matting_core/methods/mgm.py)."""

    warmup_fraction: float = Field(0.05, ge=0, le=1, description="GT-band warm-up, fraction of the run (MGM: 5K/100K)")
    eval_mask_threshold: float = Field(
        0.5, gt=0, le=1, description="project choice: evaluation guidance mask = 1[GT alpha >= this]"
    )


class MGMWildOptions(MGMOptions):
    """MGM in the wild (matting_core/methods/mgm_wild.py)."""

    ema_momentum: float = Field(0.999, ge=0, le=1, description="project choice: m of the EMA teacher")
    unsup_start_fraction: float = Field(
        0.25, ge=0, le=1, description="project choice: self-training on the seg subset starts at this run fraction"
    )
    unsup_weight: float = Field(1.0, ge=0, description="project choice: weight of the self-training term")


class MAMOptions(_Section):
    """Matting Anything (matting_core/methods/mam.py)."""

    point_prob: float = Field(0.25, ge=0, le=1, description="project choice: training prompts that are points (else boxes)")
    box_noise: float = Field(0.1, ge=0, description="project choice: training box noise, std as a fraction of the side")
    max_noise_px: float = Field(20.0, ge=0, description="project choice: training box noise clipped to this, px")
    eval_box_margin: float = Field(
        0.05, ge=0, description="project choice: evaluation box = bbox of GT alpha >= 0.5 grown by this x side"
    )
    warmup_fraction: float = Field(0.05, ge=0, le=1, description="GT-band warm-up of MGM's loss")
    segmenter: Literal["own", "sam"] = Field(
        "own", description="own: the seg-pretrained network of the cell; sam: Segment Anything (needs sam_checkpoint)"
    )
    sam_checkpoint: str | None = Field(None, description="local Segment Anything checkpoint file (segmenter: sam)")
    sam_model_type: str = Field("vit_b", description="Segment Anything registry name (vit_b, vit_l, vit_h)")

    @model_validator(mode="after")
    def _sam_needs_checkpoint(self) -> "MAMOptions":
        if self.segmenter == "sam" and not self.sam_checkpoint:
            raise ValueError("segmenter 'sam' needs sam_checkpoint: a local Segment Anything checkpoint file")
        return self


class MethodsConfig(_Section):
    """The related methods: their project choices, and the side-by-side comparison.

    ``compare`` lists the methods the ``method@<name>`` DVC stages train at ``cell`` (the
    same composited matte subset and seg-pretrained initialisation as the cell's teacher,
    ``train.teacher``'s lr / batch / crop, ``iters`` steps); ``evaluate_method@<name>``
    evaluates them like every cell. The option sections are used wherever that method
    trains or is evaluated (also when it is the grid's ``method``).
    """

    compare: list[ComparedMethod] = Field(
        default_factory=lambda: list(COMPARED_METHODS),
        description="methods trained and evaluated side by side with the main method",
    )
    cell: tuple[int, int] | None = Field(
        None, description="[S, M]: the grid cell (both budgets > 0) of the comparison; None = the largest cell"
    )
    iters: int = Field(150, ge=1, description="training steps of each compared method")
    eval_trimap_kernel: int = Field(
        15, ge=1, description="project choice: elliptical erosion (px) of the evaluation trimaps made from GT alpha "
        "for DIM and AdaMatting (only for validation sets that ship no trimaps)",
    )
    dim: DIMOptions = DIMOptions()
    adamatting: AdaMattingOptions = AdaMattingOptions()
    mgm: MGMOptions = MGMOptions()
    mgm_wild: MGMWildOptions = MGMWildOptions()
    mam: MAMOptions = MAMOptions()

    @field_validator("compare")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("list each method once")
        return v


RunnerName = Literal["local", "ray"]  # the flows' task runners (flows/dag.py)


class StageResources(_Section):
    """What one stage instance reserves on a Ray cluster (``orchestration.resources``)."""

    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved (train.threads math threads + data work)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved when the cluster has GPUs (ignored on a CPU cluster)")


DVC_STAGES = ("ingest", "shard", "composite", "pretrain", "teacher_scratch", "teacher", "pseudolabel", "student",
              "evaluate_seg_only", "evaluate_mat_only", "evaluate", "method", "evaluate_method", "report")
GPU_STAGES = DVC_STAGES[3:-1]  # training, labelling and evaluation: one GPU each when the cluster has GPUs


def _default_resources() -> dict[str, StageResources]:
    gpu = StageResources(num_cpus=1, num_gpus=1)
    return {"default": StageResources(), **{name: gpu for name in GPU_STAGES}}


class OrchestrationConfig(_Section):
    """How the Prefect flows in ``flows/`` run the DVC stages (not read by any stage).

    Stage instances whose DVC parents are done run in parallel, at most
    ``max_concurrency`` at once; a failed instance is retried ``retries`` times after
    ``retry_delay_seconds``, doubling each time (exponential back-off). With
    ``cuda_devices`` set, each running instance sees one of them as its only GPU
    (``CUDA_VISIBLE_DEVICES``, slot ``i`` gets ``cuda_devices[i % len]``).
    """

    max_concurrency: int = Field(2, ge=1, description="stage instances running at once")
    retries: int = Field(2, ge=0, description="retries of a failed stage instance")
    retry_delay_seconds: float = Field(30.0, ge=0, description="first retry delay, s; doubles each retry")
    cuda_devices: list[str] = Field(
        default_factory=list, description="GPU ids handed out to running stages; empty = leave CUDA_VISIBLE_DEVICES alone"
    )
    runner: RunnerName = Field(
        "local", description="local: threads on this machine; ray: tasks on a Ray cluster (prefect-ray)"
    )
    ray_address: str | None = Field(
        None, description="Ray cluster of the ray runner (e.g. ray://head:10001 or head:6379); null = RAY_ADDRESS, else a local Ray"
    )
    resources: dict[str, StageResources] = Field(
        default_factory=_default_resources,
        description="{dvc.yaml stage name or 'default': {num_cpus, num_gpus}} reserved per task by the ray runner",
    )
    schedule_cron: str = Field("0 2 * * *", description="cron of the served nightly study deployment")
    timezone: str = Field("UTC", description="IANA time zone of schedule_cron")
    mlflow_ui_url: str = Field("http://127.0.0.1:5000", description="base URL of the MLflow UI, for run links")

    @field_validator("resources")
    @classmethod
    def _with_default(cls, v: dict[str, StageResources]) -> dict[str, StageResources]:
        unknown = sorted(set(v) - set(DVC_STAGES) - {"default"})
        if unknown:
            raise ValueError(
                f"unknown stage name(s) {unknown}: keys are dvc.yaml stage names ({', '.join(DVC_STAGES)}) or 'default'"
            )
        return {"default": StageResources(), **v}

    @field_validator("schedule_cron")
    @classmethod
    def _five_fields(cls, v: str) -> str:
        if len(v.split()) != 5:
            raise ValueError("a cron schedule has 5 fields: minute hour day-of-month month day-of-week")
        return v


class Params(_Section):
    seed: int = 0
    method: MethodName = Field(
        "mlb", description="what the grid's teacher stages train: mlb (the main method) or a related method"
    )
    data: DataConfig = DataConfig()
    shard: ShardConfig = ShardConfig()
    composite: CompositeConfig = CompositeConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    pseudolabel: PseudolabelConfig = PseudolabelConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    study: StudyConfig = StudyConfig()
    methods: MethodsConfig = MethodsConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()

    @model_validator(mode="after")
    def _comparison_cell_in_grid(self) -> "Params":
        cell = self.methods.cell
        if cell is not None and (cell[0] not in self.study.seg or cell[1] not in self.study.mat):
            raise ValueError(
                f"methods.cell {list(cell)} must be a cell of the grid with both budgets > 0: "
                f"S in study.seg {self.study.seg}, M in study.mat {self.study.mat}"
            )
        return self

    def comparison_cell(self) -> tuple[int, int]:
        """``methods.cell``, or the grid's largest cell (max seg, max mat) when unset."""
        return tuple(self.methods.cell) if self.methods.cell is not None else (self.study.seg[-1], self.study.mat[-1])


def _format_errors(err: ValidationError, source: str) -> str:
    """One line per bad key: ``  <key>: <message> (got <value>)``. The value is left out
    when it is a whole section (a cross-key check's message names the values itself)."""
    lines = [f"{source}: {err.error_count()} invalid key(s):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (typo?); see matting_pipeline/config.py for the valid keys"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        value = e.get("input")
        got = "" if isinstance(value, dict) or len(repr(value)) > 120 else f" (got {value!r})"
        lines.append(f"  {key}: {msg}{got}" if key else f"  {msg}")
    return "\n".join(lines)


def parse_params(raw: dict | None, source: str = "params") -> Params:
    """Validate an already-loaded mapping; raises ConfigError naming every bad key."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml. A missing file is an error naming the path."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found; run from the repository root or pass --params")
    with path.open(encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    return parse_params(raw, str(path))
