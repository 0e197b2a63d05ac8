"""Assembly of training jobs that several stages share (no stage logic).

- The matte budget's training data: :func:`matte_composites` (the composites of
  ``data/composite/train`` made only from the first ``M`` matte foregrounds; used by the
  teacher stage and the related methods).
- The seg-pretrained start: :func:`load_pretrained` (``models/seed<k>/pretrain/seg<S>/model.pt``,
  checked against the network it must initialise).
- The related methods (DIM, AdaMatting, MGM, MGM in the wild, MAM): their options from
  ``params.methods`` (:data:`METHOD_OPTIONS`), training and evaluation guidance, and
  :func:`build_method_job`, the job the ``method`` stage (the comparison) and the teacher
  stage (params ``method`` not ``mlb``) train. The method itself is
  :mod:`matting_core.methods`; the stage docstring of ``stages/method.py`` says what the
  job does.
- :func:`mlb_only_message`: why the MLB-only stages refuse a related method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matting_pipeline import tracking
from matting_pipeline.atomic import file_sha256
from matting_pipeline.cli import StageError
from matting_pipeline.layout import Layout, cell_name
from matting_pipeline.shards import ShardError, ShardReader, subset_keys
from matting_pipeline.views import ViewDataset

__all__ = [
    "METHOD_OPTIONS",
    "EvaluationGuidance",
    "MethodOptions",
    "TrainingGuidance",
    "budget_keys",
    "build_method_job",
    "evaluation_guidance",
    "load_pretrained",
    "matte_composites",
    "matte_subset_composites",
    "method_hyper",
    "method_options",
    "mlb_only_message",
    "require_checkpoint",
]


# ----------------------------------------------------------------------------- inputs


def require_checkpoint(path: Path, command: str) -> Path:
    """``path`` when it is a file, else a StageError saying which command makes it."""
    if not path.is_file():
        raise StageError(f"{path} not found; make it first with `{command}`")
    return path


def budget_keys(set_dir: str | Path, count: int) -> list[str]:
    """``subset_keys(set_dir, count)``, with a budget larger than the set as a StageError."""
    try:
        return subset_keys(set_dir, count)
    except ShardError:
        raise
    except ValueError as err:
        raise StageError(str(err)) from None


def matte_subset_composites(reader, matte_keys: list[str], single_person: bool = False) -> list[str]:
    """Keys of composites (``reader``) all of whose ``meta["fg_keys"]`` lie in ``matte_keys``;
    with ``single_person`` only those made from one foreground (no second instance)."""
    allowed = set(matte_keys)
    selected = []
    for key in reader.keys:
        fg_keys = reader.meta(key).get("fg_keys")
        if not isinstance(fg_keys, list) or not fg_keys:
            raise StageError(f"{reader.set_dir}: composite {key!r} has no meta['fg_keys']; rebuild the composite set")
        if single_person and len(fg_keys) > 1:
            continue
        if all(k in allowed for k in fg_keys):
            selected.append(key)
    return selected


def matte_composites(layout: Layout, mat_count: int, single_person: bool = False) -> ShardReader:
    """A reader over the training composites made only from the first ``mat_count`` matte
    foregrounds (one-person composites only with ``single_person``)."""
    matte_keys = budget_keys(layout.shard_set("matte"), mat_count)
    composite_dir = layout.composite_set("train")
    all_composites = ShardReader(composite_dir)
    keys = matte_subset_composites(all_composites, matte_keys, single_person)
    if not keys:
        kind = "one-person composite" if single_person else "composite"
        raise StageError(
            f"{composite_dir}: no {kind} is made from the first {mat_count} matte foregrounds; "
            "rebuild the composite set (`matting composite`) or raise the budget"
        )
    return all_composites.restrict(keys)


def init_backbone(model, params, required: bool = True) -> dict:
    """Load ``model.backbone_weights`` (an ImageNet ResNet state dict) into ``model``'s backbone
    when set; print what was and was not loaded. Returns fingerprint entries (the file's sha256).

    ``required=False`` (a student whose architecture differs from the file's, e.g. the
    paper's r18x0.5 student with a ResNet-101 file): a file that does not fit is said and
    skipped, the network starts from scratch.
    """
    from matting_core.models.pretrained import load_backbone_weights

    path = params.model.backbone_weights
    if not path:
        return {}
    if not Path(path).is_file():
        raise StageError(
            f"model.backbone_weights: {path} does not exist; point it at a torchvision/timm ResNet "
            "state dict you downloaded yourself, or set it to null"
        )
    try:
        report = load_backbone_weights(model, path)
    except ValueError as err:
        if required:
            raise StageError(f"model.backbone_weights: {err}") from None
        print(f"backbone weights not used ({err}); this network starts from scratch", flush=True)
        return {}
    print(f"backbone weights: {report.summary()}", flush=True)
    return {"backbone_sha256": file_sha256(path)}


def student_objective(cfg, label_key: str):
    """The MLB student's loss on ``batch[label_key]`` (the blended label M̃; the S-only
    control passes the mask S): ``train.student``'s matte loss, λ and BCE positive weight."""
    from matting_core.losses import student_loss

    lambda_boundary = float(cfg.lambda_boundary)

    def objective(pred, batch):
        return student_loss(
            pred, batch[label_key], lambda_boundary, matte=cfg.matte_loss, pos_weight=cfg.boundary_pos_weight
        )

    return objective


def student_init(layout: Layout, seg_count: int, model, params) -> tuple[str, dict]:
    """Start ``model`` from the seg-pretrained network when the architecture matches
    (project choice; else from scratch, with ``model.backbone_weights`` when set). Returns
    ``(init_from, fingerprint entries)``."""
    pretrained, pre_path = load_pretrained(layout, seg_count)
    if pretrained.network_spec != model.network_spec:
        loaded = init_backbone(model, params, required=False)
        return (params.model.backbone_weights if loaded else "scratch"), loaded
    model.load_state_dict(pretrained.state_dict())
    return str(pre_path), {"init_sha256": file_sha256(pre_path)}


def boundary_head_groups(model, lr: float, multiplier: float) -> Callable[[], list[dict]] | None:
    """Optimiser parameter groups with the boundary head at ``lr × multiplier`` (None when 1).

    The boundary head is one 3×3 conv on the decoder's last features; with a small λ its
    gradient is tiny next to the matte term's, so a larger step lets it learn within a short
    run without scaling λ (which would also scale the BCE's pull on the shared decoder).
    """
    if multiplier == 1.0:
        return None
    head = getattr(model, "boundary_head", None)
    if head is None:
        raise StageError(f"{type(model).__name__} has no boundary_head: set boundary_head_lr to 1")

    def groups() -> list[dict]:
        head_ids = {id(p) for p in head.parameters()}
        rest = [p for p in model.parameters() if id(p) not in head_ids]
        return [{"params": rest}, {"params": list(head.parameters()), "lr": float(lr) * float(multiplier)}]

    return groups


def load_pretrained(layout: Layout, seg_count: int, network_spec: Mapping[str, Any] | None = None):
    """``(model, path)``: the seg-pretrained network of budget ``seg_count``.

    With ``network_spec``, a checkpoint of another network is a StageError (re-run the
    pre-training); without it the caller decides (the student starts from it only when
    the architectures match).
    """
    from matting_core.checkpoint import load_model

    path = require_checkpoint(layout.model_path("pretrain", seg_count), f"matting pretrain --seg {seg_count}")
    pretrained, info = load_model(path)
    if network_spec is not None and info["network_spec"] != dict(network_spec):
        raise StageError(
            f"{path} is a {info['network_spec'].get('name')} but model.network is {network_spec.get('name')}; "
            f"re-run `matting pretrain --seg {seg_count}`"
        )
    return pretrained, path


def mlb_only_message(stage: str, method: str, seg_count: int, mat_count: int) -> str:
    """Why an MLB-only stage (student, pseudolabel) refuses a related ``method``."""
    return (
        f"params.yaml has method: {method}; the {stage} stage is part of Matte Label Blending (method: mlb) only. "
        f"With method: {method} the grid's teacher stages train {method} "
        f"(`matting teacher --seg {seg_count} --mat {mat_count}`) and "
        f"`matting evaluate --seg {seg_count} --mat {mat_count}` evaluates that teacher; "
        "to compare the methods with MLB, keep method: mlb and use the `methods` section "
        "(dvc repro method evaluate_method report)"
    )


# ----------------------------------------------------------------------------- related methods


@dataclass(frozen=True)
class MethodOptions:
    """A method's params.yaml options, sorted by where they go.

    spec: architecture (``Method.method_spec``); loss: ``Method.make_loss`` (the recipe);
    guidance: training guidance (``make_guidance(train=True)``); evaluation: evaluation
    guidance (``make_guidance(train=False)``); params: every option, for MLflow.
    """

    spec: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, Any] = field(default_factory=dict)
    guidance: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)


def _dim_options(cfg) -> MethodOptions:
    o = cfg.dim
    return MethodOptions(
        loss={"phase_fractions": list(o.phase_fractions)},
        evaluation={"eval_kernel": cfg.eval_trimap_kernel},
        params={**o.model_dump(mode="json"), "eval_trimap_kernel": cfg.eval_trimap_kernel},
    )


def _adamatting_options(cfg) -> MethodOptions:
    o = cfg.adamatting
    return MethodOptions(
        spec={"propagation_steps": o.propagation_steps},
        loss={"trimap_band_px": o.trimap_band_px, "alpha_region": o.alpha_region},
        evaluation={"eval_kernel": cfg.eval_trimap_kernel},
        params={**o.model_dump(mode="json"), "eval_trimap_kernel": cfg.eval_trimap_kernel},
    )


def _mgm_options(cfg) -> MethodOptions:
    o = cfg.mgm
    return MethodOptions(
        loss={"warmup_fraction": o.warmup_fraction},
        evaluation={"eval_threshold": o.eval_mask_threshold},
        params=o.model_dump(mode="json"),
    )


def _mgm_wild_options(cfg) -> MethodOptions:
    o = cfg.mgm_wild
    return MethodOptions(
        loss={
            "warmup_fraction": o.warmup_fraction,
            "ema_momentum": o.ema_momentum,
            "unsup_start_fraction": o.unsup_start_fraction,
            "unsup_weight": o.unsup_weight,
        },
        evaluation={"eval_threshold": o.eval_mask_threshold},
        params=o.model_dump(mode="json"),
    )


def _mam_options(cfg) -> MethodOptions:
    o = cfg.mam
    return MethodOptions(
        spec={"segmenter": o.segmenter, "sam_checkpoint": o.sam_checkpoint or "", "sam_model_type": o.sam_model_type},
        loss={"warmup_fraction": o.warmup_fraction},
        guidance={"point_prob": o.point_prob, "box_noise": o.box_noise, "max_noise_px": o.max_noise_px},
        evaluation={"eval_margin": o.eval_box_margin},
        params=o.model_dump(mode="json"),
    )


# compared method -> its options from ``params.methods`` (keys: config.COMPARED_METHODS)
METHOD_OPTIONS: dict[str, Callable[[Any], MethodOptions]] = {
    "dim": _dim_options,
    "adamatting": _adamatting_options,
    "mgm": _mgm_options,
    "mgm_wild": _mgm_wild_options,
    "mam": _mam_options,
}


def method_options(params, name: str) -> MethodOptions:
    """The options of method ``name`` from ``params.methods`` (``mlb`` has none)."""
    if name == "mlb":
        return MethodOptions()
    if name not in METHOD_OPTIONS:
        from matting_core.methods import get_method

        get_method(name)  # raises the ValueError listing the valid names
        raise ValueError(f"method {name!r} has no options section in params.methods")
    return METHOD_OPTIONS[name](params.methods)


class TrainingGuidance:
    """``(alpha (1,h,w), rng) → guidance`` of method ``name`` (picklable for loader workers)."""

    def __init__(self, name: str, options: Mapping[str, Any] | None = None):
        self.name = name
        self.options = dict(options or {})

    def __call__(self, alpha, rng):
        from matting_core.methods import get_method

        return get_method(self.name).make_guidance(alpha, rng, train=True, **self.options)

    def __repr__(self) -> str:
        return f"TrainingGuidance({self.name!r}, {dict(sorted(self.options.items()))!r})"


class EvaluationGuidance:
    """The evaluation guidance of a method for one validation sample (module doc).

    ``guidance(sample) → (guidance, source)``: ``sample`` as :func:`matting_pipeline.shards.iter_samples`
    yields it (``alpha`` (H, W) float, optional ``trimap`` (H, W) uint8); the guidance is
    in the form :func:`matting_core.methods.predict_image` takes, ``source`` a short
    description for the metrics file (``"set trimap"``, ``"eval_trimap 15 px"``, ...).
    """

    def __init__(self, name: str, options: Mapping[str, Any] | None = None):
        from matting_core.methods import get_method

        self.method = get_method(name)
        if self.method.required_input is None:
            raise ValueError(f"method {name!r} takes no guidance")
        self.options = dict(options or {})

    def describe(self, source: str) -> str:
        o = self.options
        kind = self.method.required_input
        if kind == "trimap":
            return "the set's trimap" if source == "set" else f"trimap from GT alpha (eval_trimap, {o['eval_kernel']} px)"
        if kind == "mask":
            return f"mask 1[GT alpha >= {o['eval_threshold']:g}]"
        return f"box around GT alpha >= 0.5, margin {o['eval_margin']:g} x side"

    def __call__(self, sample: Mapping[str, Any]):
        if self.method.required_input == "trimap" and sample.get("trimap") is not None:
            return sample["trimap"], self.describe("set")
        return self.method.make_guidance(sample["alpha"], None, train=False, **self.options), self.describe("gt")


def evaluation_guidance(params, name: str) -> EvaluationGuidance | None:
    """The evaluation guidance of method ``name`` (None for ``mlb``)."""
    if name == "mlb":
        return None
    return EvaluationGuidance(name, method_options(params, name).evaluation)


# ----------------------------------------------------------------------------- the job


def build_method_job(
    *,
    stage: str,
    name: str,
    seg_count: int,
    mat_count: int,
    params,
    layout: Layout,
    out_dir: Path,
    hyper: dict[str, Any],
):
    """A :class:`~matting_pipeline.trainer.TrainingJob` that trains method ``name`` at cell (S, M) (stages/method.py).

    ``stage``: ``method`` (the comparison) or ``teacher`` (the grid's teacher stages when
    params.yaml's ``method`` is not ``mlb``).
    """
    import torch

    from matting_core.methods import get_method
    from matting_core.models import network_spec
    from matting_pipeline.trainer import TrainingJob

    try:
        method = get_method(name)
    except ValueError as err:
        raise StageError(str(err)) from None
    if method.name == "mlb":
        raise StageError("mlb is the main method: it trains through the pretrain, teacher and student stages")
    seg_count, mat_count = int(seg_count), int(mat_count)
    if seg_count < 0:
        raise StageError(f"--seg must be >= 0, got {seg_count}")
    if mat_count <= 0:
        raise StageError(f"--mat {mat_count}: {name} trains on matte labels; the budget M must be > 0")
    options = method_options(params, name)
    if name == "mam" and seg_count == 0 and options.spec["segmenter"] == "own":
        raise StageError(
            "mam with segmenter 'own' needs the seg-pretrained network of the cell as its segmenter, and a "
            "mat-only cell (S = 0) has none; compare MAM at a cell with S > 0, or set methods.mam.segmenter: sam "
            "with a local methods.mam.sam_checkpoint"
        )
    composites = matte_composites(layout, mat_count)
    seed = int(hyper["seed"])
    dataset = ViewDataset(
        composites, ["alpha", "fg", "bg"], hyper["crop"], hyper["scale_range"], seed,
        guidance_key=method.required_input, guidance=TrainingGuidance(name, options.guidance),
    )

    torch.manual_seed(seed)
    spec = method.method_spec(network=params.model.network, **options.spec)
    model = method.build(spec)
    fingerprint_extra: dict[str, Any] = {"loss": options.loss, "guidance": options.guidance}
    run_params: dict[str, Any] = {}
    if seg_count > 0:
        pretrained, path = load_pretrained(layout, seg_count, network_spec(params.model.network))
        transfer = method.init_from_network(model, pretrained)
        del pretrained
        init_from = str(path)
        fingerprint_extra["init_sha256"] = file_sha256(path)
        run_params.update({f"init_{k}": len(v) for k, v in transfer.items()})
    else:
        init_from = "scratch"
    # after the initial weights: MGM-in-the-wild's EMA teacher starts as a copy of them
    loss_module = method.make_loss(model, **options.loss)

    aux_dataset = None
    self_training = "off"
    if name == "mgm_wild" and seg_count > 0:
        seg_dir = layout.shard_set("seg")
        aux_dataset = ViewDataset(
            ShardReader(seg_dir, budget_keys(seg_dir, seg_count)), ["mask"], hyper["crop"], hyper["scale_range"],
            seed + 1, strong=True,
        )
        self_training = f"{seg_dir} first {seg_count}"

    def step_fn(batch, optimizer, step, total_steps, **amp):
        # in-step randomness (MGM band widths, warm-up coin): a pure function of (seed, step)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + int(step))
        return method.train_step(model, loss_module, batch, optimizer, generator, step, total_steps, **amp)

    def optimizer_parameters():
        return method.optimizer_parameters(model, loss_module)

    run_params.update({
        "init_from": init_from,
        "loss": name,
        "data": str(composites.set_dir),
        "matte_samples": mat_count,
        "guidance": method.required_input,
        "self_training": self_training if name == "mgm_wild" else "n/a",
        **tracking.flatten_params({name: options.params}),
    })
    return TrainingJob(
        stage=stage,
        seg_count=seg_count,
        mat_count=mat_count,
        cell=cell_name(seg_count, mat_count),
        out_dir=out_dir,
        model=model,
        dataset=dataset,
        objective=None,
        hyper=hyper,
        experiment=params.study.experiment,
        modules={"loss": loss_module},
        run_params=run_params,
        fingerprint_extra=fingerprint_extra,
        num_workers=params.train.num_workers,
        amp=params.train.amp,
        method=name,
        step_fn=step_fn,
        optimizer_parameters=optimizer_parameters,
        aux_dataset=aux_dataset,
    )


MLB_ONLY_KEYS = ("matte_loss", "lambda_boundary", "boundary_pos_weight", "boundary_head_lr", "single_person")


def method_hyper(step_cfg, iters: int | None, study_seed: int = 0) -> dict[str, Any]:
    """``train.teacher``'s hyper-parameters for a method (its MLB-only keys left out)."""
    from matting_pipeline.trainer import step_hyper

    hyper = step_hyper(step_cfg, iters, study_seed)
    for key in MLB_ONLY_KEYS:
        hyper.pop(key, None)
    return hyper
