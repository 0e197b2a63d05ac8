"""The training loop shared by ``pretrain``, ``teacher``, ``student`` and ``method``.

One call of :func:`train` runs (or resumes) one training job:

- **Data**: :class:`ShardReader` indexes the tar shards once (key → member offset and size,
  from ``tarfile``'s ``offset_data``) and reads samples by seek, so the sets need not fit
  in memory (the paper's 50K seg images). :class:`ViewDataset` turns a sample into the
  training views (:func:`matting_core.training.make_views`); :class:`PositionSampler`
  draws an endless seeded sequence of epochs. The augmentation randomness of the ``p``-th
  sample of a run is ``default_rng([seed, p])``, so a resumed run sees exactly the batches
  an uninterrupted run would, whatever ``num_workers``.
- **Optimisation**: Adam, cosine decay (:func:`matting_core.training.cosine_schedule`),
  mixed precision on CUDA (bfloat16 where supported, else float16 with a GradScaler). A
  related method (:mod:`stages.method`) brings its own step (``TrainingJob.step_fn``:
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
  (the MLflow run id).
- **MLflow**: one run per job, nested under the grid cell's parent run
  (:func:`stages.tracking.get_or_create_cell_run`), named
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

import hashlib
import json
import math
import os
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from matting_core.checkpoint import read_checkpoint, save_checkpoint, save_training_state, load_training_state
from matting_core.training import (
    collate_views,
    cosine_schedule,
    make_views,
    sample_rng,
    train_step,
)
from stages import tracking
from stages.atomic import write_json
from stages.shards import ShardError, decode_member, parse_member_name, read_index

__all__ = [
    "PositionSampler",
    "ShardReader",
    "TrainingJob",
    "ViewDataset",
    "add_common_arguments",
    "autocast_settings",
    "file_sha256",
    "resolve_device",
    "train",
]

STATE_NAME = "state.pt"
MODEL_NAME = "model.pt"
RUN_NAME = "run.json"
_FLUSH_SECONDS = 30.0


# ------------------------------------------------------------------------------ CLI


def add_common_arguments(parser, mat_required: bool = True) -> None:
    """Arguments every training stage takes."""
    parser.add_argument("--seg", type=int, required=True, help="segmentation label budget S (subset size)")
    parser.add_argument(
        "--mat", type=int, required=mat_required, default=0, help="matte label budget M (subset size)"
    )
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--data-root", default="data", help="data folder (default: data)")
    parser.add_argument("--models-root", default="models", help="models folder (default: models)")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default=None,
        help="override train.device (auto = CUDA when available)",
    )
    parser.add_argument("--iters", type=int, default=None, help="override the step's iters")


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


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- data


class ShardReader:
    """Random access to samples of one shard set without loading it.

    The constructor reads ``index.json`` and walks each needed tar's headers once, keeping
    ``key → role → (shard, byte offset, size, ext)``. :meth:`read` then seeks straight to a
    sample's members. Member names are checked as the shard reader does
    (:func:`stages.shards.parse_member_name`), so unsafe or unexpected names are refused.
    File handles are opened lazily per process (safe with DataLoader workers).

    Args:
        set_dir: the shard set directory.
        keys: the samples to expose, in this order (default: every key, storage order).
        verify: check each needed shard's sha256 against the index first (one read of
            the bytes; corrupt data fails here rather than hours into training).
    """

    def __init__(self, set_dir: str | Path, keys: Sequence[str] | None = None, verify: bool = True):
        self.set_dir = Path(set_dir)
        index = read_index(self.set_dir)
        self.keys: list[str] = list(index["keys"] if keys is None else keys)
        unknown = [k for k in self.keys if k not in index["shard_of"]]
        if unknown:
            raise ShardError(f"{self.set_dir}: {len(unknown)} unknown key(s), e.g. {unknown[:3]}")
        wanted = set(self.keys)
        needed = {index["shard_of"][k] for k in self.keys}
        self._members: dict[str, dict[str, tuple[str, int, int, str]]] = {}
        for shard in index["shards"]:
            name = shard["name"]
            if name not in needed:
                continue
            path = self.set_dir / name
            if verify and file_sha256(path) != shard["sha256"]:
                raise ShardError(
                    f"{path}: sha256 does not match the index; the shard is corrupt or was modified -- rebuild the set"
                )
            with tarfile.open(path, mode="r:") as tf:
                for member in tf:
                    key, role, ext = parse_member_name(member.name, name)
                    if not member.isfile():
                        raise ShardError(f"{name}: refused member {member.name!r}: not a regular file")
                    if index["shard_of"].get(key) != name:
                        raise ShardError(f"{name}: refused member {member.name!r}: key not in this shard's index")
                    if key in wanted:
                        self._members.setdefault(key, {})[role] = (name, member.offset_data, member.size, ext)
        missing = [k for k in self.keys if k not in self._members]
        if missing:
            raise ShardError(f"{self.set_dir}: indexed sample(s) missing from the tars, e.g. {missing[:3]}")
        self._handles: dict[str, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def roles(self, key: str) -> list[str]:
        return sorted(self._members[key])

    def _read_bytes(self, shard: str, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():  # forked worker: never share file offsets
            self._handles, self._pid = {}, os.getpid()
        fh = self._handles.get(shard)
        if fh is None:
            fh = self._handles[shard] = open(self.set_dir / shard, "rb")
        fh.seek(offset)
        data = fh.read(size)
        if len(data) != size:
            raise ShardError(f"{self.set_dir / shard}: truncated at byte {offset} (wanted {size})")
        return data

    def read(self, key: str, roles: Sequence[str] | None = None) -> dict[str, Any]:
        """Decode one sample: ``{"key", "meta", role: array}`` (as :func:`stages.shards.iter_samples`)."""
        members = self._members[key]
        wanted = list(members) if roles is None else ["meta", *roles]
        out: dict[str, Any] = {"key": key}
        for role in wanted:
            if role not in members:
                raise ShardError(f"{self.set_dir}: sample {key!r} has no {role!r} member (has {sorted(members)})")
            shard, offset, size, ext = members[role]
            try:
                out[role] = decode_member(role, ext, self._read_bytes(shard, offset, size))
            except ShardError as err:
                raise ShardError(f"{self.set_dir / shard}: {key}.{role}: {err}") from None
        return out

    def restrict(self, keys: Sequence[str]) -> "ShardReader":
        """A reader over ``keys`` (a subset of this one's), sharing the member table."""
        unknown = [k for k in keys if k not in self._members]
        if unknown:
            raise ShardError(f"{self.set_dir}: key(s) not in this reader, e.g. {unknown[:3]}")
        other = object.__new__(ShardReader)
        other.__dict__.update(self.__getstate__())
        other.keys = list(keys)
        other._members = {k: self._members[k] for k in keys}
        other._pid = os.getpid()
        return other

    def meta(self, key: str) -> dict:
        return self.read(key, roles=[])["meta"]

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles = {}


class ViewDataset(Dataset):
    """Map-style dataset of training views, indexed by ``(sample index, draw position)``.

    ``dataset[(i, p)]`` reads sample ``keys[i]`` and returns
    ``make_views(sample, default_rng([seed, p]), crop, scale_range, roles, strong)``.
    With ``guidance`` (a related method's input, see :mod:`stages.method`) the view also
    gets ``views[guidance_key] = guidance(views["alpha"], rng)``, drawn from the same
    generator after the geometry, so it is as reproducible as the crop (and made from the
    cropped GT alpha, as the methods make theirs).
    """

    def __init__(
        self,
        reader: ShardReader,
        roles: Sequence[str],
        crop: int,
        scale_range: tuple[float, float],
        seed: int,
        strong: bool = False,
        guidance_key: str | None = None,
        guidance: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
    ):
        self.reader = reader
        self.roles = list(roles)
        self.crop = int(crop)
        self.scale_range = tuple(scale_range)
        self.seed = int(seed)
        self.strong = bool(strong)
        if (guidance_key is None) != (guidance is None):
            raise ValueError("guidance_key and guidance go together")
        if guidance is not None and "alpha" not in self.roles:
            raise ValueError("guidance is made from the GT alpha: add 'alpha' to the roles")
        self.guidance_key = guidance_key
        self.guidance = guidance

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, np.ndarray]:
        index, position = item
        sample = self.reader.read(self.reader.keys[index], roles=["image", *self.roles])
        rng = sample_rng(self.seed, position)
        views = make_views(sample, rng, self.crop, self.scale_range, self.roles, self.strong)
        if self.guidance is not None:
            views[self.guidance_key] = np.ascontiguousarray(self.guidance(views["alpha"], rng), dtype=np.float32)
        return views


class PositionSampler(Sampler):
    """Endless ``(sample index, position)`` pairs starting at ``start``.

    Position ``p`` belongs to epoch ``e = p // n``, whose order is
    ``default_rng([seed, e, 1]).permutation(n)``: a pure function of ``(seed, p)``, so
    starting at ``step · batch_size`` resumes the exact sequence.
    """

    def __init__(self, num_samples: int, seed: int, start: int = 0):
        if num_samples < 1:
            raise ValueError("cannot sample from an empty training set")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.start = int(start)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, 1]).permutation(self.num_samples)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start
        epoch = position // self.num_samples
        order = self._epoch_order(epoch)
        while True:
            e, offset = divmod(position, self.num_samples)
            if e != epoch:
                epoch, order = e, self._epoch_order(e)
            yield int(order[offset]), position
            position += 1


def _worker_init(_: int) -> None:
    import cv2

    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def make_loader(dataset: ViewDataset, batch_size: int, start_step: int, num_workers: int) -> DataLoader:
    """Endless loader of collated batches, resuming at ``start_step``.

    Workers start from a fork server, not a plain fork: forking a process whose OpenCV or
    OpenMP thread pools are live (any process that already decoded or trained) can
    deadlock the child on its first threaded call.
    """
    import multiprocessing

    sampler = PositionSampler(len(dataset), dataset.seed, start=start_step * batch_size)
    return DataLoader(
        dataset,
        multiprocessing_context=multiprocessing.get_context("forkserver") if num_workers > 0 else None,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        collate_fn=collate_views,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        persistent_workers=False,
        pin_memory=False,
    )


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

    def __post_init__(self) -> None:
        if (self.objective is None) == (self.step_fn is None):
            raise ValueError("a TrainingJob needs exactly one of objective and step_fn")

    @property
    def network(self) -> str:
        return self.model.network_spec["name"]

    @property
    def run_name(self) -> str:
        """``<stage>[-<method>]-<network>-seg<S>[-mat<M>]-seed<k>`` (the method only when not mlb)."""
        budget = f"seg{self.seg_count}" if self.stage == "pretrain" else f"seg{self.seg_count}-mat{self.mat_count}"
        method = "" if self.method == "mlb" else f"-{self.method}"
        return f"{self.stage}{method}-{self.network}-{budget}-seed{self.hyper['seed']}"

    def fingerprint(self) -> str:
        """Hash of what a resumable state must agree on (not checkpoint/log cadence)."""
        hyper = {k: v for k, v in self.hyper.items() if k not in ("checkpoint_every", "log_every")}
        payload = {
            "stage": self.stage,
            "seg_count": self.seg_count,
            "mat_count": self.mat_count,
            "network_spec": self.model.network_spec,
            "hyper": hyper,
            "keys": hashlib.sha256("\n".join(self.dataset.reader.keys).encode()).hexdigest(),
            "set_dir": self.dataset.reader.set_dir.name,
            "roles": self.dataset.roles,
            "input_key": self.input_key,
            "extra": self.fingerprint_extra,
        }
        if self.method != "mlb":
            payload["method"] = self.method
        if self.dataset.guidance is not None:
            payload["guidance"] = [self.dataset.guidance_key, repr(self.dataset.guidance)]
        if self.aux_dataset is not None:
            reader = self.aux_dataset.reader
            payload["aux"] = {
                "prefix": self.aux_prefix,
                "set_dir": reader.set_dir.name,
                "keys": hashlib.sha256("\n".join(reader.keys).encode()).hexdigest(),
                "roles": self.aux_dataset.roles,
                "seed": self.aux_dataset.seed,
            }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------- MLflow


class _RunLogger:
    """One MLflow run nested under the cell run; metrics buffered and sent in batches."""

    def __init__(self, job: TrainingJob, resume_run_id: str | None, params: dict[str, str]):
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
        self._buffer: list = []
        self._last_flush = time.monotonic()

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


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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
    """
    from tqdm.auto import tqdm

    hyper = job.hyper
    iters, batch_size = int(hyper["iters"]), int(hyper["batch_size"])
    checkpoint_every, log_every = int(hyper["checkpoint_every"]), int(hyper["log_every"])
    out_dir = Path(job.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path, model_path = out_dir / STATE_NAME, out_dir / MODEL_NAME

    torch.manual_seed(int(hyper["seed"]))
    model = job.model.to(device)
    for module in job.modules.values():
        module.to(device)
    parameters = model.parameters() if job.optimizer_parameters is None else job.optimizer_parameters()
    optimizer = torch.optim.Adam(parameters, lr=float(hyper["lr"]))
    scheduler = cosine_schedule(optimizer, iters)
    autocast_dtype, needs_scaler = autocast_settings(device, job.amp)
    scaler = torch.amp.GradScaler("cuda") if needs_scaler else None

    fingerprint = job.fingerprint()
    start_step, resume_run_id = 0, None
    if state_path.is_file():
        saved = read_checkpoint(state_path)
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
    logger = _RunLogger(job, resume_run_id, params)
    run_info = {
        "run_id": logger.run_id,
        "parent_run_id": logger.parent_id,
        "experiment": job.experiment,
        "experiment_id": logger.experiment_id,
        "run_name": job.run_name,
        "tracking_uri": tracking.tracking_uri(),
    }
    write_json(out_dir / RUN_NAME, {**run_info, "status": "RUNNING", "step": start_step})

    def save_state(step: int) -> None:
        save_training_state(
            state_path, model, optimizer, scheduler, step, scaler=scaler, modules=job.modules,
            extra={"fingerprint": fingerprint, "run_id": logger.run_id, "stage": job.stage},
        )

    status = "FAILED"
    step = saved_step = start_step
    window: dict[str, list[torch.Tensor]] = {}
    final_loss = math.nan
    bar = tqdm(
        total=iters, initial=start_step, desc=job.run_name, unit="it", disable=not progress,
        dynamic_ncols=True, mininterval=0.5,
    )
    loader_iter = aux_iter = None
    try:
        if start_step < iters:
            loader_iter = iter(make_loader(job.dataset, batch_size, start_step, job.num_workers))
            if job.aux_dataset is not None:
                aux_iter = iter(make_loader(job.aux_dataset, batch_size, start_step, job.num_workers))
        while step < iters:
            batch = _to_device(next(loader_iter), device)
            if aux_iter is not None:
                batch.update({f"{job.aux_prefix}{k}": v for k, v in _to_device(next(aux_iter), device).items()})
            if job.prepare_batch is not None:
                batch = job.prepare_batch(batch)
            lr = optimizer.param_groups[0]["lr"]
            if job.step_fn is not None:
                terms = job.step_fn(
                    batch, optimizer, step, iters,
                    scheduler=scheduler, scaler=scaler, autocast_dtype=autocast_dtype,
                )
            else:
                terms = train_step(
                    model, optimizer, batch, job.objective, input_key=job.input_key,
                    scheduler=scheduler, scaler=scaler, autocast_dtype=autocast_dtype,
                )
            if job.after_step is not None:
                job.after_step()
            step += 1
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
                final_loss = means["total"]
                logged = {("lr" if k == "_lr" else f"loss/{k}"): v for k, v in means.items()}
                logger.add(step, logged)
                bar.set_postfix(loss=f"{final_loss:.4f}", refresh=False)
            bar.update(1)
            if step % checkpoint_every == 0 and step < iters:
                save_state(step)
                saved_step = step
                logger.flush()
            if on_step is not None:
                on_step(step, batch, terms)
        bar.close()
        extra = {
            "stage": job.stage,
            "method": job.method,
            "seg_count": job.seg_count,
            "mat_count": job.mat_count,
            "cell": job.cell,
            "step": step,
            "run_id": logger.run_id,
            "final_loss": final_loss,
            "hyper": {k: list(v) if isinstance(v, tuple) else v for k, v in hyper.items()},
            **{k: v for k, v in job.run_params.items() if isinstance(v, (str, int, float, bool))},
        }
        save_checkpoint(model_path, model, model.network_spec, extra)
        logger.finish("FINISHED", artifact=model_path)
        status = "FINISHED"
        write_json(out_dir / RUN_NAME, {**run_info, "status": status, "step": step})
        state_path.unlink(missing_ok=True)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        bar.close()
        if status != "FINISHED":
            try:
                logger.finish(status, drop_after=saved_step)
                write_json(out_dir / RUN_NAME, {**run_info, "status": status, "step": step})
            except Exception:  # noqa: BLE001 - never mask the original error
                pass
    return {
        "run_id": logger.run_id,
        "model_path": model_path,
        "start_step": start_step,
        "step": step,
        "resumed": start_step > 0,
        "final_loss": final_loss,
    }


# ----------------------------------------------------------------------------- stage helpers


class StageError(RuntimeError):
    """A training stage cannot start (missing input, bad budget); the message says what to run."""


def run_stage(stage: str, build_and_train: Callable[[], Any]) -> int:
    """Run a stage body; known errors become one ``matting <stage>: error: ...`` line and exit 2."""
    import sys

    from stages.config import ConfigError

    try:
        build_and_train()
    except (StageError, ShardError, ConfigError, FloatingPointError) as err:
        print(f"matting {stage}: error: {err}", file=sys.stderr)
        return 2
    return 0


def run_training_stage(stage: str, build_job: Callable[..., Any], args, label: str | None = None) -> int:
    """The ``run`` of every training stage: load params, pick the device, build the job
    with ``build_job(args, params, device)``, train, report where the model went."""
    from stages.config import load_params

    def body():
        params = load_params(args.params)
        device = resolve_device(args.device or params.train.device)
        result = train(build_job(args, params, device), device)
        print(f"{label or stage}: wrote {result['model_path']} (MLflow run {result['run_id']})")

    return run_stage(stage, body)


def step_hyper(step_cfg, iters: int | None) -> dict[str, Any]:
    """The step's hyper-parameters as a plain dict, with the ``--iters`` override applied."""
    hyper = step_cfg.model_dump(mode="python")
    if iters is not None:
        if iters < 1:
            raise StageError(f"--iters must be >= 1, got {iters}")
        hyper["iters"] = int(iters)
    return hyper


def pretrain_dir(models_root: str | Path, seg_count: int) -> Path:
    """``models/pretrain/seg<S>``: pre-training depends on the seg budget only."""
    return Path(models_root) / "pretrain" / f"seg{int(seg_count)}"


def cell_dir(models_root: str | Path, stage: str, seg_count: int, mat_count: int) -> Path:
    """``models/<stage>/seg<S>-mat<M>``."""
    return Path(models_root) / stage / tracking.cell_name(seg_count, mat_count)


def require_checkpoint(path: Path, command: str) -> Path:
    if not path.is_file():
        raise StageError(f"{path} not found; make it first with `{command}`")
    return path


def budget_keys(set_dir: str | Path, count: int) -> list[str]:
    """``subset_keys(set_dir, count)``, with a budget larger than the set as a StageError."""
    from stages.shards import subset_keys

    try:
        return subset_keys(set_dir, count)
    except ShardError:
        raise
    except ValueError as err:
        raise StageError(str(err)) from None
