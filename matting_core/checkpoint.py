"""Checkpoints that load with ``torch.load(weights_only=True)``.

Two kinds of file, both a plain dict of tensors / dicts / lists / tuples / str / int /
float / bool / None (nothing that needs pickle's arbitrary-object machinery):

* **model checkpoint** (``save_checkpoint`` / ``load_model``)::

      {"format": "matting-model", "version": 1,
       "network_spec": {...},      # network_spec(...) or a method spec — rebuilds the net
       "state_dict": {...},        # CPU tensors
       "extra": {...}}             # caller's metadata (stage, step, metrics, params...)

* **training state** (``save_training_state`` / ``load_training_state``): model, optimizer,
  scheduler (and optional AMP GradScaler / extra modules such as an EMA teacher) state
  dicts, the step, and the RNG states of torch (CPU uint8 tensor, CUDA when present), of
  Python's ``random`` and of numpy's legacy global state and an optional
  ``np.random.Generator`` (``bit_generator.state`` is a nested dict of ints; its 128-bit
  ints are stored as decimal strings, so nothing depends on how pickle encodes long ints).

Writes are atomic: ``torch.save`` into a temporary sibling, fsync, ``os.replace``. A killed
process leaves the previous file intact.

Loading always uses ``weights_only=True``: a file holding arbitrary pickled objects is
refused (``pickle.UnpicklingError``), so a checkpoint from an untrusted source cannot run
code.

Integrity: every file (version 2) stores ``tensors_sha256``, a sha256 over the names,
dtypes, shapes and bytes of its weights (a model checkpoint's ``state_dict``; a training
state's ``model`` and ``modules``), and every read recomputes it: flipped bytes inside a
tensor, which ``torch.load`` itself does not notice, raise :class:`CheckpointError` naming
the file instead of silently giving wrong mattes. Version-1 files (written before the
digest existed) still load.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from matting_core.files import created_mode
from matting_core.methods import build_from_spec

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "tensors_digest",
    "TRAINING_STATE_FORMAT",
    "load_model",
    "load_training_state",
    "read_checkpoint",
    "save_checkpoint",
    "save_training_state",
    "model_identity",
]

CHECKPOINT_FORMAT = "matting-model"
TRAINING_STATE_FORMAT = "matting-training-state"
VERSION = 2
DIGEST_KEY = "tensors_sha256"


class CheckpointError(ValueError):
    """A checkpoint file that is not one of ours, is newer than this code, or is corrupt."""


def tensors_digest(tensors: Mapping[str, Any]) -> str:
    """sha256 over ``name, dtype, shape, bytes`` of every tensor in a (nested) mapping, in key order."""
    import hashlib

    digest = hashlib.sha256()

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key in sorted(value, key=str):
                walk(f"{prefix}{key}.", value[key])
        elif isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"{prefix}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")

    walk("", tensors)
    return digest.hexdigest()


def model_identity(path: str | os.PathLike[str]) -> str:
    """sha256 of what a model *is*: its verified weights digest and network spec, not the
    file's bytes (``extra`` holds the MLflow run id, which differs between two runs that
    train the same weights). Outputs derived from a model are keyed by this."""
    import hashlib
    import json

    ckpt = read_checkpoint(path)
    weights = ckpt.get(DIGEST_KEY) or tensors_digest(_weights_of(ckpt))  # version 1: no stored digest
    text = json.dumps({"weights": weights, "spec": ckpt.get("network_spec")}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _weights_of(payload: Mapping[str, Any]) -> dict[str, Any]:
    if payload.get("format") == CHECKPOINT_FORMAT:
        return {"state_dict": payload.get("state_dict") or {}}
    return {"model": payload.get("model") or {}, "modules": payload.get("modules") or {}}


# ----------------------------------------------------------------------------- plumbing


def _plain(value: Any, where: str) -> Any:
    """Validate (and lightly normalise) a value for a weights_only checkpoint.

    numpy scalars become Python scalars, numpy arrays become tensors, Paths become str.
    Anything else outside tensors/dict/list/tuple/str/int/float/bool/None → TypeError.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: dict keys must be str or int, got {type(key).__name__} {key!r}")
            out[key] = _plain(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        items = [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    raise TypeError(
        f"{where}: {type(value).__name__} cannot be stored in a weights_only checkpoint; "
        "use tensors, dicts, lists, tuples, str, int, float, bool or None"
    )


def _atomic_torch_save(payload: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, created_mode())  # mkstemp's 0600 would survive the rename: respect the umask
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def _cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def read_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with a check that it is one of our dicts and
    that its weights still match the digest stored when it was written."""
    name = os.fspath(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - truncated zip, pickle payload, not a torch file...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{name} cannot be read as a checkpoint ({reason[:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") not in (CHECKPOINT_FORMAT, TRAINING_STATE_FORMAT):
        raise CheckpointError(f"{name} is not a matting checkpoint (no 'format' key of a known kind)")
    version = payload.get("version", 0)
    if version > VERSION:
        raise CheckpointError(f"{name}: checkpoint version {version} is newer than {VERSION}")
    stored = payload.get(DIGEST_KEY)
    if version >= 2 and stored is None:
        raise CheckpointError(f"{name}: a version-{version} checkpoint without its weights digest; the file was modified")
    if stored is not None and tensors_digest(_weights_of(payload)) != stored:
        raise CheckpointError(
            f"{name}: its weights do not match the digest stored when it was written: the file is corrupt or was "
            "modified; restore it or re-run the stage that wrote it"
        )
    return payload


# ----------------------------------------------------------------------------- model checkpoints


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    network_spec: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights plus the spec that rebuilds it, atomically.

    Args:
        path: destination file (``.pt``); parent folders are created.
        model: the network (any device; weights are stored on CPU).
        network_spec: the dict from ``matting_core.models.network_spec``; defaults to
            ``model.network_spec`` (set by ``build_network``).
        extra: metadata (plain types only; numpy scalars/arrays and paths are converted).

    Raises:
        TypeError: ``extra`` or the spec holds something weights_only cannot load.
        ValueError: no spec given and the model has none.
    """
    if network_spec is None:
        network_spec = getattr(model, "network_spec", None)
    if network_spec is None:
        raise ValueError("save_checkpoint needs network_spec (the model has no .network_spec attribute)")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": VERSION,
        "network_spec": _plain(dict(network_spec), "network_spec"),
        "state_dict": _cpu_state_dict(model),
        "extra": _plain(dict(extra or {}), "extra"),
    }
    payload[DIGEST_KEY] = tensors_digest(_weights_of(payload))
    return _atomic_torch_save(payload, path)


def load_model(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network saved by :func:`save_checkpoint` (or inside a training state).

    Returns ``(model, info)``: the model in eval mode on ``map_location``, and
    ``info = {"network_spec", "extra", "path", "format"}`` (plus ``"step"`` for a training
    state). Loading uses ``torch.load(weights_only=True)``; pickled objects are refused.
    """
    payload = read_checkpoint(path, map_location)
    spec = payload.get("network_spec")
    if spec is None:
        raise ValueError(f"{os.fspath(path)} holds no network_spec; cannot rebuild the model")
    state = payload["state_dict"] if payload["format"] == CHECKPOINT_FORMAT else payload["model"]
    model = build_from_spec(dict(spec))  # any method's spec; a plain network spec is the main method
    model.load_state_dict(state, strict=True)
    model.to(map_location).eval()
    info = {
        "network_spec": dict(spec),
        "extra": payload.get("extra", {}),
        "path": os.fspath(path),
        "format": payload["format"],
    }
    if "step" in payload:
        info["step"] = payload["step"]
    return model, info


# ----------------------------------------------------------------------------- training state


def _numpy_state_to_plain(state: Any) -> Any:
    """bit_generator.state → weights_only-safe (ints as str to carry 128-bit values)."""
    if isinstance(state, dict):
        return {k: _numpy_state_to_plain(v) for k, v in state.items()}
    if isinstance(state, np.ndarray):
        return {"__ndarray__": state.tolist(), "dtype": str(state.dtype)}
    if isinstance(state, (bool, np.bool_)):
        return bool(state)
    if isinstance(state, (int, np.integer)):
        return {"__int__": str(int(state))}
    return state


def _numpy_state_from_plain(state: Any) -> Any:
    if isinstance(state, dict):
        if "__int__" in state:
            return int(state["__int__"])
        if "__ndarray__" in state:
            return np.asarray(state["__ndarray__"], dtype=state["dtype"])
        return {k: _numpy_state_from_plain(v) for k, v in state.items()}
    return state


def _rng_states(numpy_rng: np.random.Generator | None) -> dict[str, Any]:
    legacy = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy_global": {
            "name": legacy[0],
            "keys": torch.from_numpy(np.asarray(legacy[1], dtype=np.int64)),
            "pos": int(legacy[2]),
            "has_gauss": int(legacy[3]),
            "cached_gaussian": float(legacy[4]),
        },
        "numpy_generator": None if numpy_rng is None else _numpy_state_to_plain(numpy_rng.bit_generator.state),
    }
    if torch.cuda.is_available():
        states["cuda"] = list(torch.cuda.get_rng_state_all())
    return states


def _restore_rng_states(states: Mapping[str, Any], numpy_rng: np.random.Generator | None) -> None:
    torch.set_rng_state(states["torch"].cpu())
    python_state = states["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    legacy = states["numpy_global"]
    np.random.set_state(
        (
            legacy["name"],
            legacy["keys"].numpy().astype(np.uint32),
            legacy["pos"],
            legacy["has_gauss"],
            legacy["cached_gaussian"],
        )
    )
    if numpy_rng is not None and states.get("numpy_generator") is not None:
        numpy_rng.bit_generator.state = _numpy_state_from_plain(states["numpy_generator"])
    if states.get("cuda") and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in states["cuda"]][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda_states)


def save_training_state(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    step: int = 0,
    *,
    numpy_rng: np.random.Generator | None = None,
    scaler: Any = None,
    modules: Mapping[str, nn.Module] | None = None,
    network_spec: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically write everything needed to resume training at ``step``.

    Args:
        model, optimizer, scheduler: their ``state_dict()`` s are stored (scheduler optional).
        step: the number of optimisation steps completed.
        numpy_rng: the loop's ``np.random.Generator``, whose state is stored too.
        scaler: an AMP ``GradScaler`` (optional).
        modules: further modules to keep, e.g. ``{"ema_teacher": teacher}``.
        network_spec: defaults to ``model.network_spec``; lets ``load_model`` read this file.
        extra: plain metadata (e.g. the run id, params).
    """
    if network_spec is None:
        network_spec = getattr(model, "network_spec", None)
    payload = {
        "format": TRAINING_STATE_FORMAT,
        "version": VERSION,
        "step": int(step),
        "network_spec": None if network_spec is None else _plain(dict(network_spec), "network_spec"),
        "model": _cpu_state_dict(model),
        "optimizer": _plain(optimizer.state_dict(), "optimizer"),
        "scheduler": None if scheduler is None else _plain(scheduler.state_dict(), "scheduler"),
        "scaler": None if scaler is None else _plain(scaler.state_dict(), "scaler"),
        "modules": {name: _cpu_state_dict(m) for name, m in (modules or {}).items()},
        "rng": _rng_states(numpy_rng),
        "extra": _plain(dict(extra or {}), "extra"),
    }
    payload[DIGEST_KEY] = tensors_digest(_weights_of(payload))
    return _atomic_torch_save(payload, path)


def load_training_state(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    *,
    numpy_rng: np.random.Generator | None = None,
    scaler: Any = None,
    modules: Mapping[str, nn.Module] | None = None,
    restore_rng: bool = True,
    map_location: str | torch.device = "cpu",
) -> int:
    """Restore a state written by :func:`save_training_state` in place; return its step.

    The model's parameters keep their device (``load_state_dict`` copies into them); the
    optimizer state is moved to the parameters' device by torch. RNG states (torch, CUDA,
    Python, numpy global and ``numpy_rng``) are restored unless ``restore_rng=False``.
    Metadata (``extra``) is available via :func:`read_checkpoint`.
    """
    payload = read_checkpoint(path, map_location)
    if payload["format"] != TRAINING_STATE_FORMAT:
        raise ValueError(f"{os.fspath(path)} is a model checkpoint, not a training state")
    model.load_state_dict(payload["model"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload.get("scheduler") is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if scaler is not None and payload.get("scaler") is not None:
        scaler.load_state_dict(payload["scaler"])
    for name, module in (modules or {}).items():
        if name not in payload["modules"]:
            raise KeyError(f"{os.fspath(path)} holds no module {name!r}; it has {sorted(payload['modules'])}")
        module.load_state_dict(payload["modules"][name], strict=True)
    if restore_rng:
        _restore_rng_states(payload["rng"], numpy_rng)
    return int(payload["step"])
