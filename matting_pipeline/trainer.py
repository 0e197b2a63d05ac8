"""The training loop shared by ``pretrain``, ``teacher``, ``student`` and ``method``.

One call of :func:`train` runs (or resumes) one :class:`TrainingJob` (built by a stage
module, or by :mod:`matting_pipeline.jobs`) in three parts: :func:`_resume` (optimiser,
scheduler, the saved state when its fingerprint matches, the MLflow run), :func:`_loop`
(the steps, windowed logging, checkpoints) and :func:`_finish` (``model.pt``, the MLflow
artifact, the state removed).

- **Data**: ``job.dataset`` is a :class:`matting_pipeline.views.ViewDataset` over a
  :class:`matting_pipeline.shards.ShardReader`; the loader
  (:func:`matting_pipeline.views.make_loader`) resumes the exact sequence of batches of
  an uninterrupted run, whatever ``num_workers``.
- **Optimisation**: Adam, cosine decay (:func:`matting_core.training.cosine_schedule`),
  mixed precision on CUDA (bfloat16 where supported, else float16 with a GradScaler). A
  related method (:mod:`matting_pipeline.jobs`) brings its own step (``TrainingJob.step_fn``:
  :meth:`matting_core.methods.Method.train_step`), optimiser parameters and loss module
  (resumed as ``modules["loss"]``); the loop, resume and logging are the same.
- **Resume**: every ``checkpoint_every`` steps the full state (model, optimizer, scheduler,
  scaler, extra modules such as the EMA teacher, RNG) is written atomically to
  ``<out_dir>/state.pt`` with a fingerprint of the job (hyper-parameters, network, data
  keys, the checkpoint it started from). Re-running the same job continues from that
  step; a state with another fingerprint is ignored (training starts afresh and says so).
  The state is deleted once ``model.pt`` is written: DVC re-runs a finished stage only when
  something changed, and then it must train from the start.
- **Outputs**: ``<out_dir>/model.pt`` (:func:`matting_core.checkpoint.save_checkpoint`,
  ``extra`` holds stage, budgets, step, run id, hyper-parameters) and ``<out_dir>/run.json``
  (the MLflow run id); names in :mod:`matting_pipeline.layout`.
- **MLflow**: one run per job, nested under the grid cell's parent run
  (:func:`matting_pipeline.tracking.get_or_create_cell_run`), named
  ``<stage>-<network>-seg<S>-mat<M>-seed<k>`` (pretrain: ``pretrain-<network>-seg<S>-seed<k>``,
  nested under the seg-only cell ``seg<S>-mat0``; a related method adds its name:
  ``teacher-dim-<network>-seg<S>-mat<M>-seed<k>``, ``method-mgm-...``). Params: stage,
  method, seg_count, mat_count, network, every hyper-parameter (and a method's options);
  tag ``method``. Metrics: every loss term as ``loss/<term>`` plus ``lr`` (a method's own
  terms too: DIM's ``phase``, AdaMatting's learned ``log_var_trimap`` / ``log_var_alpha``,
  MGM-in-the-wild's ``unsupervised``),
  the mean over each window of ``log_every`` steps, logged at the window's last step,
  sent in batches (at each checkpoint, at the end, and at most every 30 s). A resumed job
  continues the same run. The final ``model.pt`` is logged as an artifact
  (``checkpoint/model.pt``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from matting_core.checkpoint import (
    CheckpointError,
    load_training_state,
    read_checkpoint,
    save_checkpoint,
    save_training_state,
)
from matting_core.training import cosine_schedule, train_step
from matting_pipeline import tracking
from matting_pipeline.atomic import write_json
from matting_pipeline.cli import StageError, run_stage
from matting_pipeline.layout import MODEL_NAME, RUN_NAME, STATE_NAME
from matting_pipeline.views import Prefetcher, ViewDataset, make_loader

__all__ = [
    "TrainingJob",
    "apply_train_settings",
    "autocast_settings",
    "resolve_device",
    "run_training_stage",
    "step_hyper",
    "train",
]

_FLUSH_SECONDS = 30.0


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device; use --device auto or cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def autocast_settings(device: torch.device, amp: bool) -> tuple[torch.dtype | None, bool]:
    """``(autocast dtype or None, needs a GradScaler)``: AMP is used on CUDA only."""
    if not amp or device.type != "cuda":
        return None, False
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True



# ----------------------------------------------------------------------------- job


Objective = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]
# step_fn(batch, optimizer, step, total_steps, *, scheduler, scaler, autocast_dtype) -> detached terms
StepFn = Callable[..., dict[str, torch.Tensor]]


@dataclass
class TrainingJob:
    """Everything one run of :func:`train` needs; built by a stage module.

    Attributes:
        stage: ``pretrain`` | ``teacher`` | ``student`` | ``method`` (the methods comparison).
        seg_count, mat_count: the label budgets (MLflow params and the cell).
        cell: the grid cell the run nests under (``seg<S>-mat<M>``).
        out_dir: ``models/<stage>/<cell or seg<S>>``.
        model: the network to train, already initialised (pre-trained weights or scratch);
            it must carry ``network_spec``.
        dataset: the training views.
        objective: ``(pred, batch) → loss terms`` with ``total`` (None when ``step_fn`` is set).
        hyper: the step's hyper-parameters (``StepConfig.model_dump()``): iters, lr,
            batch_size, checkpoint_every, log_every, seed, ...
        input_key: the batch key the model sees (``image``; the student: ``image_strong``).
        prepare_batch: called on each batch on the device before the step (the student
            computes its MLB labels here); may add keys.
        after_step: called after each optimiser step (the EMA update).
        modules: extra modules saved in the resumable state (``{"ema_teacher": teacher}``).
        run_params: extra MLflow params (init_from, label_mode, ...).
        fingerprint_extra: what else decides whether a saved state may be resumed.
        experiment: the MLflow experiment.
        num_workers: DataLoader workers (0 = load in the training process).
        amp: mixed precision on CUDA.
        method: the params ``method`` name the model belongs to (``mlb``, ``dim``, ...); a
            related method's name appears in the run name, params and tags.
        step_fn: replaces :func:`matting_core.training.train_step` (a related method's own
            step, :meth:`matting_core.methods.Method.train_step`): called as
            ``step_fn(batch, optimizer, step, total_steps, scheduler=, scaler=, autocast_dtype=)``
            with ``step`` the 0-based index of the step being taken; returns detached terms.
        optimizer_parameters: ``() → parameters`` the optimiser holds, called once the model
            and ``modules`` are on the device (default: the model's parameters; a method adds
            its learned loss weights and leaves frozen parts out).
        aux_dataset: a second view stream, drawn alongside ``dataset`` with the same batch
            size and resumed the same way; its keys are merged into each batch with
            ``aux_prefix`` (MGM in the wild: the seg subset as ``natural_image``,
            ``natural_image_strong``, ``natural_mask``).
    """

    stage: str
    seg_count: int
    mat_count: int
    cell: str
    out_dir: Path
    model: nn.Module
    dataset: ViewDataset
    objective: Objective | None
    hyper: dict[str, Any]
    experiment: str
    input_key: str = "image"
    prepare_batch: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    after_step: Callable[[], None] | None = None
    modules: dict[str, nn.Module] = field(default_factory=dict)
    run_params: dict[str, Any] = field(default_factory=dict)
    fingerprint_extra: dict[str, Any] = field(default_factory=dict)
    num_workers: int = 0
    amp: bool = True
    method: str = "mlb"
    step_fn: StepFn | None = None
    optimizer_parameters: Callable[[], Any] | None = None
    aux_dataset: ViewDataset | None = None
    aux_prefix: str = "natural_"
    channels_last: bool = False

    def __post_init__(self) -> None:
        if (self.objective is None) == (self.step_fn is None):
            raise ValueError("a TrainingJob needs exactly one of objective and step_fn")

    @property
    def network(self) -> str:
        return self.model.network_spec["name"]

    @property
    def run_name(self) -> str:
        """``<stage>[-<method>]-<network>-seg<S>[-mat<M>]-seed<k>`` (the method only when not
        mlb; k the study seed)."""
        per_row = self.stage in ("pretrain", "control")
        budget = f"seg{self.seg_count}" if per_row else f"seg{self.seg_count}-mat{self.mat_count}"
        method = "" if self.method == "mlb" else f"-{self.method}"
        return f"{self.stage}{method}-{self.network}-{budget}-seed{self.hyper.get('study_seed', self.hyper['seed'])}"

    def fingerprint(self) -> str:
        """Hash of what a resumable state must agree on (not checkpoint/log cadence): the
        job's params, network and sample keys, the content of the shards it reads (their
        sha256 in the set's index) and ``fingerprint_extra`` (the init checkpoint's sha256,
        the pseudo-label index's, ...)."""
        hyper = {k: v for k, v in self.hyper.items() if k not in ("checkpoint_every", "log_every")}
        payload = {
            "stage": self.stage,
            "seg_count": self.seg_count,
            "mat_count": self.mat_count,
            "network_spec": self.model.network_spec,
            "hyper": hyper,
            "keys": hashlib.sha256("\n".join(self.dataset.reader.keys).encode()).hexdigest(),
            "set_dir": self.dataset.reader.set_dir.name,
            "data": self.dataset.reader.content_digest(),
            "roles": self.dataset.roles,
            "input_key": self.input_key,
            "extra": self.fingerprint_extra,
        }
        if self.method != "mlb":
            payload["method"] = self.method
        if self.dataset.guidance is not None:
            payload["guidance"] = [self.dataset.guidance_key, repr(self.dataset.guidance)]
        if self.channels_last:
            payload["channels_last"] = True
        if self.aux_dataset is not None:
            reader = self.aux_dataset.reader
            payload["aux"] = {
                "prefix": self.aux_prefix,
                "set_dir": reader.set_dir.name,
                "keys": hashlib.sha256("\n".join(reader.keys).encode()).hexdigest(),
                "data": reader.content_digest(),
                "roles": self.aux_dataset.roles,
                "seed": self.aux_dataset.seed,
            }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------- MLflow


class _RunLogger:
    """One MLflow run nested under the cell run; metrics buffered and sent in batches."""

    def __init__(self, job: TrainingJob, resume_run_id: str | None, params: dict[str, str],
                 abandoned_run_id: str | None = None):
        from mlflow.tracking import MlflowClient

        self.parent_id = tracking.get_or_create_cell_run(job.experiment, *_cell_budgets(job), job.network)
        self.client = MlflowClient()
        self.experiment_id = self.client.get_experiment_by_name(job.experiment).experiment_id
        self.run_id = None
        if resume_run_id:
            try:
                run = self.client.get_run(resume_run_id)
                if run.info.experiment_id == self.experiment_id:
                    self.run_id = resume_run_id
                    self.client.update_run(resume_run_id, status="RUNNING")
            except Exception:  # noqa: BLE001 - a run from another store: start a new one
                self.run_id = None
        self.resumed = self.run_id is not None
        if self.run_id is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=job.run_name,
                tags={
                    "mlflow.parentRunId": self.parent_id,
                    "run_kind": job.stage,
                    "cell": job.cell,
                    "seg_count": str(job.seg_count),
                    "mat_count": str(job.mat_count),
                    "network": job.network,
                    "method": job.method,
                },
            )
            self.run_id = run.info.run_id
            self._log_params(params)
        if abandoned_run_id and abandoned_run_id != self.run_id:
            self._close_abandoned(abandoned_run_id)
        self._buffer: list = []
        self._last_flush = time.monotonic()

    def _close_abandoned(self, run_id: str) -> None:
        """A run whose process was killed before it saved a resumable state stays RUNNING
        for ever; mark it KILLED and point at the run that replaces it."""
        try:
            if self.client.get_run(run_id).info.status != "RUNNING":
                return
            self.client.set_tag(run_id, "replaced_by", self.run_id)
            self.client.set_terminated(run_id, "KILLED")
        except Exception:  # noqa: BLE001 - a run from another store, or deleted: nothing to close
            return

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def add(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, int(step)) for k, v in values.items())
        if time.monotonic() - self._last_flush > _FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self.client.log_batch(self.run_id, metrics=chunk)
        self._last_flush = time.monotonic()

    def finish(self, status: str, artifact: Path | None = None, drop_after: int | None = None) -> None:
        """Flush, log ``artifact``, close the run. ``drop_after``: discard buffered metrics
        of later steps (a failed run resumes from that step and logs them again)."""
        if drop_after is not None:
            self._buffer = [m for m in self._buffer if m.step <= drop_after]
        self.flush()
        if artifact is not None:
            self.client.log_artifact(self.run_id, str(artifact), artifact_path="checkpoint")
        self.client.set_terminated(self.run_id, status)


def _cell_budgets(job: TrainingJob) -> tuple[int, int]:
    # pretrain depends on the seg budget only; it belongs to the seg-only cell (S, 0).
    return (job.seg_count, 0) if job.stage == "pretrain" else (job.seg_count, job.mat_count)


# ----------------------------------------------------------------------------- loop


def to_device(batch: dict[str, torch.Tensor], device: torch.device, channels_last: bool = False) -> dict[str, torch.Tensor]:
    """The batch on ``device``; its images in the channels-last layout when the model is."""
    image_format = torch.channels_last if channels_last else torch.preserve_format
    return {k: v.to(device, non_blocking=True, memory_format=image_format if v.dim() == 4 else torch.preserve_format)
            for k, v in batch.items()}


def place_model(model: nn.Module, device: torch.device, channels_last: bool = False) -> nn.Module:
    """``model`` on ``device``, its weights channels-last when asked (params ``train.channels_last``)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


@dataclass
class _Run:
    """The live state of one :func:`train` call, shared by its three parts."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    autocast_dtype: torch.dtype | None
    fingerprint: str
    state_path: Path
    model_path: Path
    start_step: int
    logger: _RunLogger | None = None
    run_info: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    saved_step: int = 0
    final_loss: float = math.nan

    def save_state(self, job: TrainingJob) -> None:
        save_training_state(
            self.state_path, self.model, self.optimizer, self.scheduler, self.step, scaler=self.scaler,
            modules=job.modules,
            extra={"fingerprint": self.fingerprint, "run_id": self.logger.run_id, "stage": job.stage},
        )
        self.saved_step = self.step

    def write_run_json(self, job: TrainingJob, status: str) -> None:
        write_json(Path(job.out_dir) / RUN_NAME, {**self.run_info, "status": status, "step": self.step})


def train(
    job: TrainingJob,
    device: torch.device,
    on_step: Callable[[int, dict[str, torch.Tensor], dict[str, torch.Tensor]], None] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) ``job`` to ``hyper["iters"]`` steps; write model.pt and run.json.

    Args:
        job: the training job.
        device: where to train.
        on_step: ``on_step(step, batch, terms)`` after every step (step counted from 1),
            after any checkpoint of that step is saved — a hook for tests and tools.
        progress: show a tqdm progress bar (loss and it/s) on stderr.

    Returns:
        ``{"run_id", "model_path", "start_step", "step", "resumed", "final_loss"}``.

    Raises:
        StageError: another live process is training the same output folder (its lock).
    """
    with instance_lock(Path(job.out_dir)):
        return _train_locked(job, device, on_step, progress)


LOCK_NAME = ".lock"


@contextlib.contextmanager
def instance_lock(out_dir: Path):
    """An exclusive ``flock`` on ``<out_dir>/.lock`` for the whole run, holding the owner's pid.

    Two processes training the same stage instance (a ``dvc repro`` started while an
    orphaned stage from a killed one still runs) would interleave their states and log two
    runs; the second is refused at once. The kernel drops the lock when its holder dies,
    so ``kill -9`` never leaves a stale lock behind.
    """
    import fcntl

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise StageError(
                f"another process (pid {owner}) is training {out_dir} right now; wait for it to finish or stop it "
                f"(`kill {owner}`), then run this again"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def result_fingerprint(job: TrainingJob) -> str:
    """What decides a finished model: the job's :meth:`~TrainingJob.fingerprint` and the code
    (the stage's file, ``matting_pipeline``, ``matting_core``), stored in ``model.pt``."""
    from matting_pipeline.atomic import code_digest

    stage_file = Path(__file__).resolve().parents[1] / "stages" / f"{job.stage}.py"
    code = code_digest(stage_file) if stage_file.is_file() else code_digest(__file__)
    return hashlib.sha256(f"{job.fingerprint()} {code}".encode()).hexdigest()


# A second name for the last finished model.pt (a hard link: no extra disk). DVC deletes a
# stage's outs before it runs the stage again, so a stage killed after finishing but before
# DVC recorded it would otherwise train again from scratch.
FINISHED_NAME = ".model.finished.pt"


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes ``src``'s content atomically: a hard link where the filesystem has them."""
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _already_trained(job: TrainingJob) -> dict[str, Any] | None:
    """The result of a finished run of this very job (``model.pt`` with the same
    :func:`result_fingerprint`), when its process was killed after writing ``model.pt`` but
    before DVC recorded the stage: training again would give the same weights and a second
    FINISHED MLflow run. What the killed process had left to do is done here: its MLflow
    run gets the checkpoint artifact and FINISHED, ``run.json`` says FINISHED, ``state.pt`` goes."""
    out_dir = Path(job.out_dir)
    model_path = out_dir / MODEL_NAME
    wanted = result_fingerprint(job)
    for candidate in (model_path, out_dir / FINISHED_NAME):
        try:
            extra = read_checkpoint(candidate).get("extra", {}) if candidate.is_file() else {}
        except CheckpointError:
            extra = {}
        if extra.get("result_fingerprint") == wanted and extra.get("run_id"):
            break
    else:
        return None
    if candidate != model_path:  # DVC removed its out before re-running the stage: put it back
        _link_or_copy(candidate, model_path)
    run_id, step = extra["run_id"], int(extra.get("step", 0))
    info = _run_info(job, run_id)
    try:
        from mlflow.tracking import MlflowClient

        tracking.setup(job.experiment)
        client = MlflowClient()
        run = client.get_run(run_id)
        info.update(parent_run_id=run.data.tags.get("mlflow.parentRunId"), experiment_id=run.info.experiment_id)
        if run.info.status != "FINISHED":
            client.log_artifact(run_id, str(model_path), artifact_path="checkpoint")
            client.set_terminated(run_id, "FINISHED")
    except Exception:  # noqa: BLE001 - a run in another store: the model stands on its own
        pass
    write_json(out_dir / RUN_NAME, {**info, "status": "FINISHED", "step": step})
    (out_dir / STATE_NAME).unlink(missing_ok=True)
    return {"run_id": run_id, "model_path": model_path, "start_step": step, "step": step,
            "resumed": False, "reused": True, "final_loss": extra.get("final_loss")}


def _train_locked(job: TrainingJob, device: torch.device, on_step, progress: bool) -> dict[str, Any]:
    done = _already_trained(job)
    if done is not None:
        print(f"[{job.stage}] {done['model_path']} is already the result of this configuration, data and code "
              f"(MLflow run {done['run_id']}); not training it again", flush=True)
        return done
    run = _resume(job, device)
    status = "FAILED"
    try:
        _loop(job, run, device, on_step, progress)
        _finish(job, run)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if status != "FINISHED":
            try:
                run.logger.finish(status, drop_after=run.saved_step)
                run.write_run_json(job, status)
            except Exception:  # noqa: BLE001 - never mask the original error
                pass
    return {
        "run_id": run.logger.run_id,
        "model_path": run.model_path,
        "start_step": run.start_step,
        "step": run.step,
        "resumed": run.start_step > 0,
        "final_loss": run.final_loss,
    }


def _run_info(job: TrainingJob, run_id: str, parent_run_id: str | None = None,
              experiment_id: str | None = None) -> dict[str, Any]:
    """The MLflow identity of a run as ``run.json`` records it (plus status and step)."""
    return {"run_id": run_id, "parent_run_id": parent_run_id, "experiment": job.experiment,
            "experiment_id": experiment_id, "run_name": job.run_name, "tracking_uri": tracking.tracking_uri()}


def _abandoned_run(out_dir: Path) -> str | None:
    """The MLflow run id of ``<out_dir>/run.json`` when it says RUNNING: the process that
    wrote it was killed (this one holds the stage lock, so no other live process has it)."""
    try:
        info = json.loads((out_dir / RUN_NAME).read_text())
    except (OSError, ValueError):
        return None
    return info.get("run_id") if isinstance(info, dict) and info.get("status") == "RUNNING" else None


def _resume(job: TrainingJob, device: torch.device) -> _Run:
    """Model, optimiser, schedule and scaler on ``device``; the saved state when its
    fingerprint matches (else step 0, said so); the MLflow run (continued when resumed)."""
    hyper = job.hyper
    iters = int(hyper["iters"])
    out_dir = Path(job.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / STATE_NAME

    torch.manual_seed(int(hyper["seed"]))
    model = place_model(job.model, device, job.channels_last)
    for module in job.modules.values():
        module.to(device)
    parameters = model.parameters() if job.optimizer_parameters is None else job.optimizer_parameters()
    optimizer = torch.optim.Adam(parameters, lr=float(hyper["lr"]))
    scheduler = cosine_schedule(optimizer, iters)
    autocast_dtype, needs_scaler = autocast_settings(device, job.amp)
    scaler = torch.amp.GradScaler("cuda") if needs_scaler else None

    fingerprint = job.fingerprint()
    start_step, resume_run_id = 0, None
    saved = None
    if state_path.is_file():
        try:
            saved = read_checkpoint(state_path)
        except CheckpointError as err:  # a resumable state is a cache: start over, say why
            print(f"[{job.stage}] ignoring {state_path}: {err}; training from step 0", flush=True)
    if saved is not None:
        saved_extra = saved.get("extra", {})
        if saved_extra.get("fingerprint") == fingerprint:
            start_step = load_training_state(
                state_path, model, optimizer, scheduler, scaler=scaler, modules=job.modules
            )
            resume_run_id = saved_extra.get("run_id")
            print(f"[{job.stage}] resuming {state_path} at step {start_step}/{iters}", flush=True)
        else:
            print(
                f"[{job.stage}] ignoring {state_path}: it belongs to another configuration; training from step 0",
                flush=True,
            )
        del saved

    params = {
        "stage": job.stage,
        "method": job.method,
        "seg_count": job.seg_count,
        "mat_count": job.mat_count,
        "network": job.network,
        "cell": job.cell,
        "device": device.type,
        "amp": str(autocast_dtype).replace("torch.", "") if autocast_dtype else "off",
        "train_samples": len(job.dataset),
        "input_view": job.input_key,
        **tracking.flatten_params({k: list(v) if isinstance(v, tuple) else v for k, v in hyper.items()}),
        **tracking.flatten_params({"network_spec": dict(job.model.network_spec)}),
        **{k: str(v) for k, v in job.run_params.items()},
    }
    run = _Run(
        model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, autocast_dtype=autocast_dtype,
        fingerprint=fingerprint, state_path=state_path, model_path=out_dir / MODEL_NAME,
        start_step=start_step, step=start_step, saved_step=start_step,
    )
    run.logger = _RunLogger(job, resume_run_id, params, abandoned_run_id=_abandoned_run(out_dir))
    run.run_info = _run_info(job, run.logger.run_id, run.logger.parent_id, run.logger.experiment_id)
    run.write_run_json(job, "RUNNING")
    return run


def _loop(job: TrainingJob, run: _Run, device: torch.device, on_step, progress: bool) -> None:
    """The steps from ``run.step`` to ``iters``: windowed means to MLflow, a state every
    ``checkpoint_every`` steps, a tqdm bar; a non-finite loss stops with a clear error."""
    from tqdm.auto import tqdm

    hyper = job.hyper
    iters, batch_size = int(hyper["iters"]), int(hyper["batch_size"])
    checkpoint_every, log_every = int(hyper["checkpoint_every"]), int(hyper["log_every"])
    model, optimizer, scheduler, logger = run.model, run.optimizer, run.scheduler, run.logger
    window: dict[str, list[torch.Tensor]] = {}
    bar = tqdm(
        total=iters, initial=run.start_step, desc=job.run_name, unit="it", disable=not progress,
        dynamic_ncols=True, mininterval=0.5,
    )
    loader_iter = aux_iter = None
    try:
        if run.step < iters:
            loader_iter = _batches(job.dataset, batch_size, run.step, job.num_workers)
            if job.aux_dataset is not None:
                aux_iter = _batches(job.aux_dataset, batch_size, run.step, job.num_workers)
        while run.step < iters:
            batch = to_device(next(loader_iter), device, job.channels_last)
            if aux_iter is not None:
                aux = to_device(next(aux_iter), device, job.channels_last)
                batch.update({f"{job.aux_prefix}{k}": v for k, v in aux.items()})
            if job.prepare_batch is not None:
                batch = job.prepare_batch(batch)
            lr = optimizer.param_groups[0]["lr"]
            if job.step_fn is not None:
                terms = job.step_fn(
                    batch, optimizer, run.step, iters,
                    scheduler=scheduler, scaler=run.scaler, autocast_dtype=run.autocast_dtype,
                )
            else:
                terms = train_step(
                    model, optimizer, batch, job.objective, input_key=job.input_key,
                    scheduler=scheduler, scaler=run.scaler, autocast_dtype=run.autocast_dtype,
                )
            if job.after_step is not None:
                job.after_step()
            run.step += 1
            step = run.step
            for key, value in terms.items():
                window.setdefault(key, []).append(value)
            window.setdefault("_lr", []).append(torch.tensor(lr))
            if step % log_every == 0 or step == iters:
                means = {k: float(torch.stack(v).float().mean()) for k, v in window.items()}
                window = {}
                if not math.isfinite(means["total"]):
                    raise FloatingPointError(
                        f"{job.run_name}: loss is {means['total']} at step {step}; lower the learning rate "
                        f"(train.{job.stage}.lr) or check the data"
                    )
                run.final_loss = means["total"]
                logger.add(step, {("lr" if k == "_lr" else f"loss/{k}"): v for k, v in means.items()})
                bar.set_postfix(loss=f"{run.final_loss:.4f}", refresh=False)
            bar.update(1)
            if step % checkpoint_every == 0 and step < iters:
                run.save_state(job)
                logger.flush()
            if on_step is not None:
                on_step(step, batch, terms)
    finally:
        bar.close()
        for it in (loader_iter, aux_iter):
            if isinstance(it, Prefetcher):
                it.close()


def _spare_core() -> bool:
    """Whether this process may use more cores than torch's math threads take."""
    from matting_pipeline.shards import usable_cores

    return torch.get_num_threads() < usable_cores()


def _batches(dataset: ViewDataset, batch_size: int, start_step: int, num_workers: int):
    """The loader's batches from ``start_step``. Without workers and with a core the math
    threads leave free, the next batch is made in a thread while the step runs
    (:class:`~matting_pipeline.views.Prefetcher`; where the math threads take every core,
    the thread only takes time from them: measured by ``benchmarks/bench_training.py``)."""
    batches = iter(make_loader(dataset, batch_size, start_step, num_workers))
    return Prefetcher(batches) if num_workers == 0 and _spare_core() else batches


def _finish(job: TrainingJob, run: _Run) -> None:
    """``model.pt`` with its provenance, the MLflow artifact and FINISHED, the state removed."""
    extra = {
        "stage": job.stage,
        "method": job.method,
        "seg_count": job.seg_count,
        "mat_count": job.mat_count,
        "cell": job.cell,
        "step": run.step,
        "run_id": run.logger.run_id,
        "final_loss": run.final_loss,
        "result_fingerprint": result_fingerprint(job),
        "hyper": {k: list(v) if isinstance(v, tuple) else v for k, v in job.hyper.items()},
        **{k: v for k, v in job.run_params.items() if isinstance(v, (str, int, float, bool))},
    }
    save_checkpoint(run.model_path, run.model, run.model.network_spec, extra)
    _link_or_copy(run.model_path, run.model_path.with_name(FINISHED_NAME))
    run.logger.finish("FINISHED", artifact=run.model_path)
    run.write_run_json(job, "FINISHED")
    run.state_path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- stage entry


def set_math_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)`` (params ``train.threads``; 0 leaves torch's default).

    The runner's OMP_NUM_THREADS must not decide the result: a 1-thread and a 2-thread run of
    the same stage train different weights (CPU reductions sum in a thread-dependent order)."""
    if threads > 0:
        torch.set_num_threads(int(threads))


def apply_train_settings(job: TrainingJob, params) -> TrainingJob:
    """The ``train`` params every stage's job shares: the memory layout
    (``train.channels_last``) and the decoded-sample cache of its view streams
    (``train.cache_mb``, which does not change results)."""
    job.channels_last = bool(params.train.channels_last)
    for dataset in (job.dataset, job.aux_dataset):
        if dataset is not None:
            dataset.enable_cache(int(params.train.cache_mb) << 20)
    return job


def run_training_stage(stage: str, build_job: Callable[..., Any], args, label: str | None = None) -> int:
    """The ``run`` of every training stage: load params, read the shard sets from
    ``data.shard_url`` when set (:func:`matting_pipeline.shard_store.activate`), pick the device,
    build the job with ``build_job(args, params, device)``, train, report where the model went."""
    from matting_pipeline import shard_store
    from matting_pipeline.config import load_params

    def body():
        params = load_params(args.params)
        shard_store.activate(params.data.shard_url, args.data_root)  # where the shard sets are read
        tracking.check_reachable()  # seconds, not minutes of retries after the data is loaded
        set_math_threads(params.train.threads)
        device = resolve_device(args.device or params.train.device)
        result = train(apply_train_settings(build_job(args, params, device), params), device)
        print(f"{label or stage}: wrote {result['model_path']} (MLflow run {result['run_id']})")

    return run_stage(stage, body)


def step_hyper(step_cfg, iters: int | None, study_seed: int = 0) -> dict[str, Any]:
    """The step's hyper-parameters as a plain dict, with the ``--iters`` override applied and
    the study seed added to the step's ``seed`` (``study_seed`` kept beside it)."""
    hyper = step_cfg.model_dump(mode="python")
    hyper["seed"] = int(hyper["seed"]) + int(study_seed)
    hyper["study_seed"] = int(study_seed)
    if iters is not None:
        if iters < 1:
            raise StageError(f"--iters must be >= 1, got {iters}")
        hyper["iters"] = int(iters)
    return hyper
