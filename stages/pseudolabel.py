"""Stage ``pseudolabel``: the frozen teacher labels a cell's seg subset, MLB blends (Ray Data).

    python -m stages.pseudolabel --seg S --mat M [--params params.yaml]
                                 [--data-root data] [--models-root models] [--force]

For grid cell ``seg<S>-mat<M>`` (both > 0), the teacher ``models/seed<k>/teacher/seg<S>-mat<M>/model.pt``
labels the nested seg subset (the first S keys of ``data/shards/seg``'s seeded order) and
Matte Label Blending turns its output and the seg mask into the student's label
(METHOD.md §1, offline mode):

    alpha'_t, b'_t = teacher(weak view);  beta = sigmoid(b'_t);  M~ = beta*alpha'_t + (1-beta)*S

Weak view: the image exactly as stored, at its own size, no augmentation (the network pads
to its stride inside and crops back). Blend mode/dilate: ``train.student.blend``. Labels come
from :func:`matting_core.pseudolabel.label_images`, i.e. :func:`matting_core.training.mlb_labels`,
the function the student stage uses for in-process labels (CUDA autocast per ``train.amp``).

Ray Data job: ``read_webdataset`` reads the shards that hold the subset (keeping only subset
members; shard sha256s are checked against the index first), ``map_batches`` sends
``pseudolabel.batch_size`` samples at a time through an actor pool
(``ActorPoolStrategy(size=pseudolabel.num_actors)``) whose actors load the teacher once; one
GPU per actor (``pseudolabel.gpus_per_actor``) when the cluster has GPUs, CPU actors
otherwise. The driver writes the results as a shard set (``matting_pipeline.shards.ShardWriter``), so
the output lands in this workspace whatever the cluster.

Ray: a local Ray (``pseudolabel.num_cpus`` CPUs, no dashboard, auth disabled) unless
``RAY_ADDRESS`` names a cluster to join (the code in ``stages/``, ``matting_pipeline/`` and ``matting_core/`` is
shipped to it; run the stage on a node of that cluster: shards are read on the driver's
node, ``ray://`` client addresses are refused). An already-initialised Ray is reused.
With ``data.shard_url`` (:mod:`matting_pipeline.shard_store`) the seg tars come from object
storage, fetched and verified into the driver's shard cache, which the readers then read;
the labels are published there once written.

Output ``data/pseudolabels/seed<k>/seg<S>-mat<M>/`` (docs/FORMATS.md): one sample per subset key, in
the subset's order, with members ``image`` and ``mask`` (bytes copied from the seg shard),
``teacher_alpha``, ``teacher_boundary``, ``blended`` (uint16 PNG, /65535) and the meta
(``<key>.json``: the seg meta plus ``pseudolabel`` provenance); ``index.json`` like every
shard set, with a ``fingerprint`` of the inputs (teacher, seg index, keys, blend, code) --
an up-to-date set is skipped unless ``--force``.

Exactly once: the keys written are checked against the subset (missing / extra / repeated
keys fail the stage, listed); a dead actor is restarted and its unfinished batches retried
(``pseudolabel.max_restarts``). The set is built in a temporary sibling directory and
renamed into place, so an interrupted run leaves no half-written labels.
Progress: Ray Data's progress bar, plus one line per shard written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DESCRIPTION = __doc__

# Test-only fault injection (read by the stage; never set in normal use):
#   KILL_ONCE_ENV="<marker path>[:<n>]": the actor that reaches its n-th batch (default 1)
#     while <marker path> does not exist creates it and SIGKILLs its own process (once).
#   AFTER_SHARD_ENV="raise:<n>" | "hang:<n>": after the driver wrote n shards, raise
#     (an exception mid-write) or sleep for good (to be killed mid-write).
KILL_ONCE_ENV = "MATTING_TEST_PSEUDOLABEL_KILL_ONCE"
AFTER_SHARD_ENV = "MATTING_TEST_PSEUDOLABEL_AFTER_SHARD"

LABEL_ROLES = ("teacher_alpha", "teacher_boundary", "blended")
COPIED_ROLES = ("image", "mask")
OUTPUT_COLUMNS = ("key", "meta", *COPIED_ROLES, *LABEL_ROLES)
_REPO = Path(__file__).resolve().parents[1]
_MAX_LISTED_KEYS = 20


class PseudolabelError(RuntimeError):
    """The stage cannot run or its result is wrong; the message says what to do."""


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    """Everything the job needs, resolved from params and paths (no Ray, no torch)."""

    seg_count: int
    mat_count: int
    cell: str
    seg_dir: Path
    out_dir: Path
    teacher_path: Path
    teacher_sha256: str
    keys: tuple[str, ...]
    shard_paths: tuple[str, ...]
    samples_per_shard: int
    subset_seed: int
    blend_mode: str
    blend_dilate: int
    amp: bool
    fingerprint: str
    provenance: dict = field(default_factory=dict)


def make_plan(
    params, seg_count: int, mat_count: int, data_root: str | Path, models_root: str | Path, seed: int = 0
) -> Plan:
    """Resolve the cell's inputs; verify the seg shards that hold the subset (sha256).

    Raises:
        PseudolabelError: a budget is 0, the teacher checkpoint is missing.
        matting_pipeline.shards.ShardError: the seg set is missing, inconsistent, too small or corrupt.
    """
    from matting_pipeline import shards
    from matting_core.checkpoint import model_identity
    from matting_pipeline.atomic import code_digest, file_sha256
    from matting_pipeline.jobs import mlb_only_message
    from matting_pipeline.layout import Layout, cell_name

    seg_count, mat_count = int(seg_count), int(mat_count)
    if params.method != "mlb":
        raise PseudolabelError(mlb_only_message("pseudolabel", params.method, seg_count, mat_count))
    if seg_count <= 0 or mat_count <= 0:
        raise PseudolabelError(
            f"--seg {seg_count} --mat {mat_count}: pseudo-labels need both budgets > 0 (a teacher "
            "trained on matte labels, and seg images to label); seg-only and mat-only cells have no "
            "pseudolabel stage"
        )
    cell = cell_name(seg_count, mat_count)
    layout = Layout(data=data_root, models=models_root).for_seed(seed)
    seg_dir = layout.shard_set("seg")
    index = shards.read_index(seg_dir)
    keys = shards.subset_keys(seg_dir, seg_count)
    teacher_path = layout.model_path("teacher", seg_count, mat_count)
    if not teacher_path.is_file():
        raise PseudolabelError(
            f"{teacher_path} not found; train the teacher first: `matting teacher --seg {seg_count} --mat {mat_count}`"
        )
    # verified local tars: the set's own, or (data.shard_url) copies fetched into the shard cache
    needed = {index["shard_of"][k] for k in keys}
    shard_paths = [str(path.resolve()) for path in shards.shard_files(seg_dir, needed)]
    blend = params.train.student.blend
    # the teacher's weights, not its file: two runs training the same teacher write the same labels
    teacher_sha256 = model_identity(teacher_path)
    code = code_digest(__file__)
    amp = bool(getattr(params.train, "amp", False))
    payload = {
        "teacher_sha256": teacher_sha256,
        "seg_index_sha256": file_sha256(seg_dir / "index.json"),
        "keys": keys,
        "blend": {"mode": blend.mode, "dilate": int(blend.dilate)},
        "samples_per_shard": int(params.shard.samples_per_shard),
        "amp": amp,
        "code": code,
    }
    fingerprint = hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()
    provenance = {
        "cell": cell,
        "teacher": teacher_path.as_posix(),
        "teacher_sha256": teacher_sha256,
        "blend_mode": blend.mode,
        "blend_dilate": int(blend.dilate),
        "weak_view": "stored image, own size, no augmentation",
    }
    return Plan(
        seg_count=seg_count,
        mat_count=mat_count,
        cell=cell,
        seg_dir=seg_dir,
        out_dir=layout.pseudolabel_dir(seg_count, mat_count),
        teacher_path=teacher_path,
        teacher_sha256=teacher_sha256,
        keys=tuple(keys),
        shard_paths=tuple(shard_paths),
        samples_per_shard=int(params.shard.samples_per_shard),
        subset_seed=int(index["subset_seed"]),
        blend_mode=blend.mode,
        blend_dilate=int(blend.dilate),
        amp=amp,
        fingerprint=fingerprint,
        provenance=provenance,
    )


def is_up_to_date(plan: Plan) -> bool:
    """True when ``plan.out_dir`` already holds the labels this plan would write."""
    from matting_pipeline import shards

    try:
        index = shards.read_index(plan.out_dir, local=True)
    except shards.ShardError:
        return False
    return index.get("fingerprint") == plan.fingerprint and tuple(index["order"]) == plan.keys


# ----------------------------------------------------------------------------- resources


@dataclass(frozen=True)
class ActorResources:
    """What each actor asks Ray for, and how it runs the teacher."""

    num_actors: int
    num_cpus: float
    num_gpus: float
    device: str  # "cuda" | "cpu"
    torch_threads: int
    notes: tuple[str, ...] = ()


def actor_resources(cfg, cluster: Mapping[str, float]) -> ActorResources:
    """Size the actor pool for ``cluster`` (``ray.cluster_resources()``).

    GPU actors (``cluster["GPU"] > 0`` and ``cfg.gpus_per_actor > 0``): ``gpus_per_actor`` GPUs
    and ``cpus_per_actor`` (default 1) CPUs each, at most as many actors as the GPUs hold.
    CPU actors: ``cpus_per_actor`` or ``(CPUs - read_cpus) / num_actors`` each, so the shard
    readers always find ``read_cpus`` free (reserving every CPU for actors hangs the job).

    Raises:
        PseudolabelError: the cluster cannot hold one actor plus a reader.
    """
    total_cpus = float(cluster.get("CPU", 0.0))
    total_gpus = float(cluster.get("GPU", 0.0))
    num_actors = int(cfg.num_actors)
    notes: list[str] = []
    if total_gpus > 0 and cfg.gpus_per_actor > 0:
        gpus = float(cfg.gpus_per_actor)
        fit = int(total_gpus // gpus + 1e-9)
        if fit < 1:
            raise PseudolabelError(
                f"pseudolabel.gpus_per_actor={gpus} but the cluster has only {total_gpus:g} GPU(s)"
            )
        if num_actors > fit:
            notes.append(f"{num_actors} actors asked for, {fit} fit on {total_gpus:g} GPU(s) at {gpus:g} each")
            num_actors = fit
        cpus = float(cfg.cpus_per_actor) if cfg.cpus_per_actor is not None else 1.0
        device = "cuda"
    else:
        gpus = 0.0
        spare = total_cpus - float(cfg.read_cpus)
        cpus = float(cfg.cpus_per_actor) if cfg.cpus_per_actor is not None else spare / max(num_actors, 1)
        device = "cpu"
        if cpus <= 0:
            raise PseudolabelError(
                f"the cluster has {total_cpus:g} CPU(s): not enough for the readers "
                f"(pseudolabel.read_cpus={cfg.read_cpus}) and one actor"
            )
    if cpus * num_actors + float(cfg.read_cpus) > total_cpus + 1e-9:
        fit = int((total_cpus - float(cfg.read_cpus)) // cpus + 1e-9)
        if fit < 1:
            raise PseudolabelError(
                f"pseudolabel.cpus_per_actor={cpus:g} plus read_cpus={cfg.read_cpus} exceed the "
                f"cluster's {total_cpus:g} CPU(s)"
            )
        notes.append(f"{num_actors} actors asked for, {fit} fit on {total_cpus:g} CPU(s) at {cpus:g} each")
        num_actors = fit
    return ActorResources(
        num_actors=num_actors,
        num_cpus=round(cpus, 4),
        num_gpus=gpus,
        device=device,
        torch_threads=max(1, int(round(cpus))),  # 1.75 CPUs (one actor on 2 cores) -> 2 threads
        notes=tuple(notes),
    )


# ----------------------------------------------------------------------------- Ray


def connect_ray(cfg, quiet: bool = True) -> bool:
    """Start or join Ray; returns True when this call initialised it (the caller shuts it down).

    - Ray already initialised in this process: reused (returns False).
    - ``RAY_ADDRESS`` set: join that cluster, shipping ``stages/`` and ``matting_core/`` as
      ``py_modules`` (the nodes need the dependencies, not the project), and the shard-store
      variables (``data.shard_url``) as ``env_vars``. ``ray://`` client
      addresses are refused: the driver must run on a cluster node, where it reads the shards.
    - Otherwise: a new local Ray with ``cfg.num_cpus`` CPUs (all when None), no dashboard,
      ``RAY_AUTH_MODE=disabled`` and usage stats off (unless the environment says otherwise).
    """
    import ray

    from matting_pipeline import shard_store

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": not quiet}
    if quiet:
        kwargs["logging_level"] = logging.WARNING
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address:
        if address.startswith("ray://"):
            raise PseudolabelError(
                f"RAY_ADDRESS={address}: Ray Client (ray://) is not supported -- the driver reads the "
                "shards and writes the labels on its own disk. Run the stage on a node of the cluster "
                "(ssh to the head node, or `ray job submit`) with RAY_ADDRESS=auto or <head-ip>:6379"
            )
        runtime_env: dict[str, Any] = {
            "py_modules": [str(_REPO / pkg) for pkg in ("stages", "matting_pipeline", "matting_core")]
        }
        shard_env = shard_store.env_vars()  # data.shard_url: the cluster's workers read the same sets
        if shard_env:
            runtime_env["env_vars"] = shard_env
        ray.init(address=address, runtime_env=runtime_env, **kwargs)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # address="local": a new Ray of its own even inside a Ray task of the flows' ray runner
        # (a plain ray.init() there joins the surrounding cluster and refuses num_cpus).
        ray.init(address="local", num_cpus=cfg.num_cpus or os.cpu_count() or 1, include_dashboard=False, **kwargs)
    return True


# ----------------------------------------------------------------------------- labelling


def samples_from_batch(batch: Mapping[str, np.ndarray]) -> list[dict]:
    """Rows of a ``read_webdataset`` batch (``decoder=None``) -> ``{"key", "members": {role: (ext, bytes)}}``.

    Column names are WebDataset suffixes (``json``, ``image.png``, ``mask.png``); each member
    name is re-checked with :func:`matting_pipeline.shards.parse_member_name`.
    """
    from matting_pipeline.shards import parse_member_name

    keys = [str(k) for k in batch["__key__"]]
    urls = batch["__url__"] if "__url__" in batch else ["?"] * len(keys)
    columns = [c for c in batch if not c.startswith("__")]
    samples = []
    for i, key in enumerate(keys):
        members: dict[str, tuple[str, bytes]] = {}
        for column in columns:
            value = batch[column][i]
            if value is None or (isinstance(value, float) and np.isnan(value)):
                continue  # a member this sample lacks (the frame has it for another row)
            _, role, ext = parse_member_name(f"{key}.{column}", os.path.basename(str(urls[i])))
            members[role] = (ext, bytes(value))
        samples.append({"key": key, "members": members})
    return samples


def label_encoded_samples(
    teacher,
    samples: list[dict],
    blend_mode: str,
    blend_dilate: int,
    device: str = "cpu",
    autocast_dtype=None,
    provenance: Mapping[str, Any] | None = None,
) -> list[dict[str, tuple[str, bytes]]]:
    """Label encoded seg samples; returns the output members ``{role: (ext, bytes)}`` per sample.

    ``image`` and ``mask`` are copied byte for byte; ``teacher_alpha``, ``teacher_boundary``
    and ``blended`` are encoded as uint16 PNG; the meta is the seg meta plus
    ``{"pseudolabel": provenance}`` (and ``key``). :func:`label_in_process` calls it too.
    """
    from matting_core.pseudolabel import label_images
    from matting_pipeline.shards import ShardError, decode_member, encode_member

    images, masks = [], []
    for sample in samples:
        missing = [r for r in ("meta", *COPIED_ROLES) if r not in sample["members"]]
        if missing:
            raise ShardError(f"seg sample {sample['key']!r} lacks member(s) {missing}")
        images.append(decode_member("image", *sample["members"]["image"]))
        masks.append(decode_member("mask", *sample["members"]["mask"]))
    labels = label_images(
        teacher, images, masks, mode=blend_mode, dilate=blend_dilate, device=device, autocast_dtype=autocast_dtype
    )
    out = []
    for sample, label in zip(samples, labels):
        meta = decode_member("meta", *sample["members"]["meta"])
        meta = {**meta, "pseudolabel": dict(provenance or {}), "key": sample["key"]}
        members = {"meta": encode_member("meta", meta)}
        for role in COPIED_ROLES:
            members[role] = sample["members"][role]
        for role in LABEL_ROLES:
            members[role] = encode_member(role, label[role])
        out.append(members)
    return out


def label_in_process(plan: Plan, out_dir: Path | None = None, batch_size: int = 8, device: str = "cpu") -> dict:
    """The stage's labels without Ray: one process reads ``plan``'s seg shards, labels
    ``batch_size`` samples at a time with :func:`label_encoded_samples` and writes them with
    :func:`write_labels` (to ``out_dir``, default ``plan.out_dir``). Same labels as the Ray
    job (the benchmarks compare the two paths and time training on these shards); returns
    the written set's index."""
    from matting_core.checkpoint import load_model
    from matting_pipeline.shards import iter_encoded_samples

    teacher, _ = load_model(plan.teacher_path, map_location=device)
    teacher.requires_grad_(False)

    def label(batch: list[dict]) -> dict[str, np.ndarray]:
        encoded = label_encoded_samples(
            teacher, batch, plan.blend_mode, plan.blend_dilate, device=device, provenance=plan.provenance
        )
        return output_rows(batch, encoded)

    def batches():
        batch: list[dict] = []
        for sample in iter_encoded_samples(plan.seg_dir, plan.keys):
            batch.append({"key": sample["key"], "members": sample["members"]})
            if len(batch) == batch_size:
                yield label(batch)
                batch = []
        if batch:
            yield label(batch)

    return write_labels(plan, batches(), progress=False, out_dir=out_dir)


def _maybe_kill_self(spec: str | None, calls: int) -> None:
    """Test hook (KILL_ONCE_ENV): SIGKILL this process once, at its n-th batch."""
    if not spec:
        return
    marker, _, nth = spec.rpartition(":")
    if not nth.isdigit():
        marker, nth = spec, "1"
    if calls < int(nth):
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


class TeacherLabeler:
    """``map_batches`` callable class: one teacher per actor, loaded in ``__init__``.

    The checkpoint travels as bytes through the object store (``checkpoint_ref``, a one-item
    list so Ray hands the reference over unresolved), so actors on other nodes need no copy
    of ``models/``; it is loaded with ``torch.load(weights_only=True)``.
    """

    def __init__(
        self,
        checkpoint_ref: list,
        blend_mode: str,
        blend_dilate: int,
        device: str,
        torch_threads: int,
        amp: bool,
        provenance: dict,
        kill_once: str | None = None,
    ) -> None:
        import ray
        import torch

        from matting_core.checkpoint import load_model
        from matting_pipeline.trainer import autocast_settings

        torch.set_num_threads(int(torch_threads))
        self.device = torch.device(device)
        data = ray.get(checkpoint_ref[0])
        with tempfile.TemporaryDirectory(prefix="teacher-") as tmp:
            path = Path(tmp) / "model.pt"
            path.write_bytes(data)
            self.teacher, _ = load_model(path, map_location=self.device)
        self.teacher.requires_grad_(False).eval()
        self.autocast_dtype, _ = autocast_settings(self.device, amp)
        self.blend_mode, self.blend_dilate = blend_mode, int(blend_dilate)
        self.provenance = provenance
        self.kill_once = kill_once
        self.calls = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        _maybe_kill_self(self.kill_once, self.calls)
        samples = samples_from_batch(batch)
        encoded = label_encoded_samples(
            self.teacher,
            samples,
            self.blend_mode,
            self.blend_dilate,
            device=str(self.device),
            autocast_dtype=self.autocast_dtype,
            provenance=self.provenance,
        )
        return output_rows(samples, encoded)


def output_rows(samples: list[dict], encoded: list[dict[str, tuple[str, bytes]]]) -> dict[str, np.ndarray]:
    """Labelled samples as the job's output columns (``OUTPUT_COLUMNS``), what
    :func:`write_labels` takes."""
    out = {"key": np.array([s["key"] for s in samples], dtype=object)}
    for role in OUTPUT_COLUMNS[1:]:
        # object arrays keep bytes exact (a fixed-width "S" array would drop trailing NULs)
        column = np.empty(len(encoded), dtype=object)
        column[:] = [members[role][1] for members in encoded]
        out[role] = column
    return out


def build_dataset(plan: Plan, cfg, resources: ActorResources, checkpoint_ref, node_id: str | None):
    """The lazy Ray Dataset of encoded output rows (``OUTPUT_COLUMNS``), in the input's order."""
    import ray.data

    wanted = frozenset(plan.keys)

    def select_member(name: str) -> bool:  # WebDataset `fileselect`: only subset members are read
        return name.partition(".")[0] in wanted

    read_kwargs: dict[str, Any] = {}
    if node_id is not None:
        # the shards are on the driver's disk: read them there, wherever the actors are
        read_kwargs["label_selector"] = {"ray.io/node-id": node_id}
    ds = ray.data.read_webdataset(
        list(plan.shard_paths),
        decoder=None,
        fileselect=select_member,
        num_cpus=float(cfg.read_cpus),
        **read_kwargs,
    )
    remote: dict[str, Any] = {"num_cpus": resources.num_cpus}
    if resources.num_gpus > 0:
        remote["num_gpus"] = resources.num_gpus
    with warnings.catch_warnings():
        # Ray 2.60 has no named map_batches parameter for actor fault tolerance and marks
        # **ray_remote_args deprecated (removal planned for 2.64, whose default is unbounded
        # restarts and retries). Bounded here, so a batch that always kills its actor fails.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return _map_batches(ds, plan, cfg, resources, checkpoint_ref, remote)


def _map_batches(ds, plan: Plan, cfg, resources: ActorResources, checkpoint_ref, remote: dict):
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        TeacherLabeler,
        fn_constructor_kwargs={
            "checkpoint_ref": [checkpoint_ref],
            "blend_mode": plan.blend_mode,
            "blend_dilate": plan.blend_dilate,
            "device": resources.device,
            "torch_threads": resources.torch_threads,
            "amp": plan.amp,
            "provenance": plan.provenance,
            "kill_once": os.environ.get(KILL_ONCE_ENV) or None,
        },
        batch_size=int(cfg.batch_size),
        batch_format="numpy",
        compute=ActorPoolStrategy(size=resources.num_actors),
        max_restarts=int(cfg.max_restarts),
        max_task_retries=int(cfg.max_restarts),
        **remote,
    )


# ----------------------------------------------------------------------------- writing


def _after_shard_hook(shards_done: int) -> None:
    """Test hook (AFTER_SHARD_ENV): fail or hang once ``n`` shards are written."""
    spec = os.environ.get(AFTER_SHARD_ENV)
    if not spec:
        return
    action, _, n = spec.partition(":")
    if shards_done != int(n or 1):
        return
    if action == "raise":
        raise RuntimeError(f"{AFTER_SHARD_ENV}: injected failure after {shards_done} shard(s)")
    if action == "hang":
        print(f"pseudolabel: {AFTER_SHARD_ENV}: hanging after {shards_done} shard(s)", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)


def key_mismatch(expected: Iterable[str], written: Iterable[str]) -> dict[str, list[str]]:
    """``{"missing", "extra", "repeated"}`` keys of ``written`` against ``expected`` (sorted)."""
    expected_set = set(expected)
    seen: set[str] = set()
    repeated: set[str] = set()
    for key in written:
        if key in seen:
            repeated.add(key)
        seen.add(key)
    return {
        "missing": sorted(expected_set - seen),
        "extra": sorted(seen - expected_set),
        "repeated": sorted(repeated),
    }


def _mismatch_message(plan: Plan, mismatch: dict[str, list[str]]) -> str:
    parts = []
    for kind, keys in mismatch.items():
        if keys:
            shown = ", ".join(keys[:_MAX_LISTED_KEYS]) + (" ..." if len(keys) > _MAX_LISTED_KEYS else "")
            parts.append(f"{len(keys)} {kind}: {shown}")
    return (
        f"{plan.out_dir}: the labelled keys do not match the seg subset of {len(plan.keys)} "
        f"({'; '.join(parts)}); nothing was written"
    )


def write_labels(
    plan: Plan, batches: Iterable[Mapping[str, np.ndarray]], progress: bool = True, out_dir: Path | None = None
) -> dict:
    """Write the output rows as a shard set (to ``out_dir``, default ``plan.out_dir``),
    atomically, after the exactly-once check.

    Repeated or unexpected keys are not written; any mismatch with ``plan.keys`` raises
    :class:`PseudolabelError` (listing the keys) inside the writer, so no directory appears.
    Returns the index.
    """
    from matting_pipeline.shards import ShardWriter

    iterator = iter(batches)
    try:
        target = plan.out_dir if out_dir is None else out_dir
        with ShardWriter(target, plan.cell, plan.samples_per_shard, plan.subset_seed, plan.fingerprint) as writer:
            _write_rows(plan, iterator, writer, progress)
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:  # stop a Ray execution we leave early (its actors free their CPUs/GPUs)
            close()
    return writer.index


def _write_rows(plan: Plan, batches: Iterable[Mapping[str, np.ndarray]], writer, progress: bool) -> None:
    """Add each new subset key's members to ``writer``; then check the keys (exactly once)."""
    expected = set(plan.keys)
    written: list[str] = []
    added: set[str] = set()
    shards_done = 0
    start = time.perf_counter()
    for batch in batches:
        for i, key in enumerate(batch["key"]):
            key = str(key)
            written.append(key)
            if key in added or key not in expected:
                continue  # reported below; never written twice
            members = {"meta": ("json", bytes(batch["meta"][i]))}
            for role in (*COPIED_ROLES, *LABEL_ROLES):
                members[role] = ("png", bytes(batch[role][i]))
            writer.add_encoded(key, members)
            added.add(key)
            if len(added) % plan.samples_per_shard and len(added) != len(plan.keys):
                continue
            shards_done += 1
            if progress:
                rate = len(added) / max(time.perf_counter() - start, 1e-9)
                print(
                    f"pseudolabel {plan.cell}: shard {plan.cell}-{shards_done - 1:06d}.tar done "
                    f"({len(added)}/{len(plan.keys)} samples, {rate:.1f} samples/s)",
                    file=sys.stderr, flush=True,
                )
            _after_shard_hook(shards_done)
    mismatch = key_mismatch(plan.keys, written)
    if any(mismatch.values()):
        raise PseudolabelError(_mismatch_message(plan, mismatch))
    writer.set_order(plan.keys)


# ----------------------------------------------------------------------------- driver


def pseudolabel(plan: Plan, cfg, progress: bool = True) -> dict:
    """Run the Ray job for ``plan`` (Ray must be initialised) and write the labels.

    Returns ``{"count", "shards", "seconds", "samples_per_s", "actors", "device", "out_dir"}``.
    """
    import ray
    import ray.data

    resources = actor_resources(cfg, ray.cluster_resources())
    for note in resources.notes:
        print(f"pseudolabel {plan.cell}: {note}", file=sys.stderr, flush=True)
    node_id = ray.get_runtime_context().get_node_id()
    checkpoint_ref = ray.put(plan.teacher_path.read_bytes())
    context = ray.data.DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars)
    context.execution_options.preserve_order = True  # same order, same shards, every run
    context.enable_progress_bars = bool(progress)
    start = time.perf_counter()
    try:
        ds = build_dataset(plan, cfg, resources, checkpoint_ref, node_id)
        index = write_labels(plan, ds.iter_batches(batch_size=None, batch_format="numpy"), progress=progress)
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved
        del checkpoint_ref
    seconds = time.perf_counter() - start
    return {
        "count": index["count"],
        "shards": len(index["shards"]),
        "seconds": seconds,
        "samples_per_s": index["count"] / max(seconds, 1e-9),
        "actors": resources.num_actors,
        "device": resources.device,
        "out_dir": str(plan.out_dir),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from matting_pipeline.cli import add_seed_argument

    parser.add_argument("--seg", type=int, required=True, help="segmentation label budget S (subset size)")
    parser.add_argument("--mat", type=int, required=True, help="matte label budget M (selects the teacher)")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--data-root", default="data", help="data folder (default: data)")
    parser.add_argument("--models-root", default="models", help="models folder (default: models)")
    add_seed_argument(parser)
    parser.add_argument("--force", action="store_true", help="relabel even when the output is up to date")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or per-shard lines")


def run(args: argparse.Namespace) -> int:
    from matting_pipeline import shard_store
    from matting_pipeline.config import ConfigError, load_params
    from matting_pipeline.shards import ShardError

    try:
        params = load_params(args.params)
        shard_store.activate(params.data.shard_url, args.data_root)  # seg read from there, labels published
        plan = make_plan(params, args.seg, args.mat, args.data_root, args.models_root, args.seed)
        if not args.force and is_up_to_date(plan):
            print(f"pseudolabel {plan.cell}: {plan.out_dir} is up to date ({len(plan.keys)} samples; --force relabels)")
            shard_store.publish_stage_sets(params.data.shard_url, args.data_root, [plan.out_dir], progress=False)
            return 0
        started = connect_ray(params.pseudolabel)
        try:
            result = pseudolabel(plan, params.pseudolabel, progress=not args.no_progress)
        finally:
            if started:
                import ray

                ray.shutdown()
        shard_store.publish_stage_sets(params.data.shard_url, args.data_root, [plan.out_dir],
                                       progress=not args.no_progress)
    except (PseudolabelError, ShardError, ConfigError, ValueError) as err:
        print(f"matting pseudolabel: error: {err}", file=sys.stderr)
        return 2
    print(
        f"pseudolabel {plan.cell}: wrote {result['count']} samples in {result['shards']} shard(s) to "
        f"{result['out_dir']} ({result['samples_per_s']:.1f} samples/s, {result['actors']} "
        f"{result['device']} actor(s), {result['seconds']:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    from matting_pipeline.cli import run_module

    run_module("pseudolabel")
