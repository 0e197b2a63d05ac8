"""Load ImageNet ResNet checkpoints (torchvision / timm key layout) into the project's backbone.

>>> model = build_network("unet_r18")
>>> report = load_backbone_weights(model, "resnet18-f37072fd.pth")   # doctest: +SKIP
>>> print(report.summary())                                          # doctest: +SKIP

**Key mapping** (:func:`torchvision_key_map`; project backbone key → torchvision key; timm's
``resnet18/34/50/101`` use the same names):

=====================================  =====================================
project (:class:`ResNetBackbone`)      torchvision / timm
=====================================  =====================================
``stem.0.weight``                      ``conv1.weight``
``stem.1.{weight,bias,running_mean,    ``bn1.{...}``
running_var,num_batches_tracked}``
``layerN.i.convK.weight``              ``layerN.i.convK.weight``
``layerN.i.bnK.{...}``                 ``layerN.i.bnK.{...}``
``layerN.i.downsample.0.weight``       ``layerN.i.downsample.0.weight``
``layerN.i.downsample.1.{...}``        ``layerN.i.downsample.1.{...}``
=====================================  =====================================

``fc.weight`` / ``fc.bias`` (the classifier) have no project counterpart: reported unused.

**Differences from the ImageNet network** (``resnet.py``): the project's stem has no 3x3/2
max-pool; its ``layer1`` is strided instead (BasicBlock: stride on ``conv1``; Bottleneck:
stride on ``conv2`` and on the projection shortcut). The weights have the same shapes, so they
load, but ``layer1`` and deeper see a learned stride-2 step instead of a max — the pretrained
features are a starting point that fine-tuning adapts. With BasicBlocks (R18/R34) the strided
first block of ``layer1`` needs a 1x1 projection shortcut (``layer1.0.downsample.*``, 6
tensors) that torchvision's R18/R34 do not have: it has no entry in the key map, is reported
``missing`` and keeps its fresh initialisation (``strict`` does not count it).

**Exact shapes only**: a tensor is copied when its shape equals the file's. Width-multiplied
backbones (``unet_r18x0.5``) and guided method encoders (stem with 3 + g input channels) get
their mismatches reported, never a crash; no channel slicing or zero-padding is done here
(``matting_core.methods.common.transfer_unet_weights`` zero-pads the stem's guidance channels
when initialising from a project U-Net).

**Reading a file** (:func:`read_state_dict`): ``torch.load(path, map_location="cpu",
weights_only=True)`` — a file holding pickled objects (e.g. a timm training checkpoint with
its ``argparse.Namespace``) is refused. Accepted payloads:

1. a plain state dict ``{key: tensor}``;
2. a dict wrapping one: while the dict holds no tensor, descend into its ``"state_dict"``
   (preferred) or ``"model"`` entry when that is a dict (``{"state_dict": ...}``,
   ``{"model": ...}``, ``{"model": {"state_dict": ...}}``); non-tensor entries are dropped.

**Prefix rule**: the ResNet is located by the key ``P + "layer1.0.conv1.weight"``. Exactly one
such prefix ``P`` must exist: ``""`` for torchvision/timm files, ``"module."`` after
DataParallel/DDP, ``"backbone."`` / ``"encoder."`` / ``"module.encoder_q."`` … in detection,
segmentation or self-supervised checkpoints. ``P`` is stripped from the keys under it; other
keys keep their full names (reported unused). Several prefixes (e.g. MoCo's ``encoder_q`` and
``encoder_k``) raise a ValueError listing them. A file in the project's own layout
(``P + "stem.0.weight"``, i.e. a saved UNetMatting) is refused: use ``load_model`` or
``Method.init_from_network`` for those.

Errors name the file: ``FileNotFoundError`` for a missing file, ``ValueError`` for everything
else (not a checkpoint, pickle payload refused, no / several ResNets in it, a different
architecture, ``strict`` failures).
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .resnet import Bottleneck, ResNetBackbone

__all__ = [
    "BackboneLoadReport",
    "find_backbone",
    "load_backbone_weights",
    "read_state_dict",
    "torchvision_key_map",
]

ANCHOR_KEY = "layer1.0.conv1.weight"  # present in every torchvision/timm ResNet, marks its prefix
EXPECTED_KEYS = ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer4.0.downsample.0.weight")
_WRAPPER_KEYS = ("state_dict", "model")
_COUNTER = "num_batches_tracked"
_LIST_LIMIT = 5  # items shown per list in summaries / error messages


# ----------------------------------------------------------------------------- report


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(s) for s in shape) + "]"


def _some(items: list[str], limit: int = _LIST_LIMIT) -> str:
    """``a, b, c and N more``."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _module_names(keys: list[str]) -> list[str]:
    """``a.b.weight, a.b.bias, c.weight`` → ``a.b.*, c.*`` (order kept)."""
    return list(dict.fromkeys(k.rsplit(".", 1)[0] + ".*" for k in keys))


@dataclass
class BackboneLoadReport:
    """What :func:`load_backbone_weights` did. Names are backbone-relative project keys.

    Attributes:
        path: the file read.
        loaded: project keys filled from the file.
        shape_mismatch: ``(project key, file shape, project shape)`` of tensors not loaded.
        missing: project keys the file has no entry for; includes ``no_counterpart``.
        unused: file keys (full names, as stored) not used, e.g. ``fc.weight``.
        no_counterpart: the ``missing`` keys no torchvision ResNet has (BasicBlock backbones:
            ``layer1.0.downsample.*``, see the module doc); never a ``strict`` failure.
        backbone: where the backbone sits in the model (``"encoder"``, ``"body.encoder"``).
        total: number of tensors in the backbone's state dict.
        notes: structural remarks (widths, input channels, stem) for :meth:`summary`.
    """

    path: str
    loaded: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    no_counterpart: list[str] = field(default_factory=list)
    backbone: str = ""
    total: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One human paragraph: counts, what was not loaded and why (long lists truncated)."""
        total = self.total or len(self.loaded) + len(self.shape_mismatch) + len(self.missing)
        where = f" ({self.backbone}.*)" if self.backbone else ""
        parts = [f"loaded {len(self.loaded)}/{total} backbone tensors{where} from {self.path}"]
        if self.loaded and all(k.endswith(_COUNTER) for k in self.loaded):
            parts.append("only BatchNorm step counters (num_batches_tracked) matched, no weight")
        if self.shape_mismatch:
            items = [f"{name} {_shape(f)} vs {_shape(p)}" for name, f, p in self.shape_mismatch]
            parts.append(f"not loaded (shape, file vs network): {_some(items)}")
        counters = [k for k in self.missing if k.endswith(_COUNTER) and k not in self.no_counterpart]
        absent = [k for k in self.missing if k not in self.no_counterpart and k not in counters]
        if absent:
            parts.append(f"not in the file (kept their initialisation): {_some(absent)}")
        if counters:
            parts.append(f"{len(counters)} BatchNorm num_batches_tracked counter(s) not in the file (harmless)")
        if self.no_counterpart:
            parts.append(
                f"{', '.join(_module_names(self.no_counterpart))} ({len(self.no_counterpart)} tensors) "
                "kept their initialisation: no torchvision counterpart (the projection shortcut of the "
                "strided layer1 that replaces the stem max-pool)"
            )
        if self.unused:
            parts.append(f"unused file entries: {_some(self.unused)}")
        parts.extend(self.notes)
        return "; ".join(parts) + "."


# ----------------------------------------------------------------------------- model side


def find_backbone(model: nn.Module) -> ResNetBackbone:
    """The one :class:`ResNetBackbone` inside ``model`` (``model`` itself if it is one).

    Works for :class:`UNetMatting` (``encoder``), the guided method networks (``body.encoder``),
    MAM's own segmenter (``segmenter.network.encoder`` — frozen there) and wrappers.

    Raises:
        ValueError: no backbone (naming the model's class), or several (naming their paths).
    """
    return _find_backbone(model)[1]


def _find_backbone(model: nn.Module) -> tuple[str, ResNetBackbone]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"expected a torch network, got {type(model).__name__}")
    hits = [(name, m) for name, m in model.named_modules() if isinstance(m, ResNetBackbone)]
    if not hits:
        raise ValueError(
            f"{type(model).__name__} holds no ResNetBackbone; ImageNet ResNet weights cannot be loaded into it"
        )
    if len(hits) > 1:
        names = ", ".join(name or "<the model>" for name, _ in hits)
        raise ValueError(f"{type(model).__name__} holds {len(hits)} ResNetBackbones ({names}); pass the one to load")
    return hits[0]


def torchvision_key_map(backbone: ResNetBackbone) -> dict[str, str]:
    """Project backbone state-dict key → torchvision (= timm) ResNet key (module doc table).

    Keys with no torchvision counterpart (``layer1.0.downsample.*`` of a BasicBlock backbone)
    are left out. Works for any width (names do not depend on it).
    """
    if not isinstance(backbone, ResNetBackbone):
        raise ValueError(f"expected a ResNetBackbone, got {type(backbone).__name__}")
    basic = not isinstance(backbone.layer1[0], Bottleneck)
    mapping: dict[str, str] = {}
    for key in backbone.state_dict():
        if key.startswith("stem.0."):
            mapping[key] = "conv1." + key[len("stem.0."):]
        elif key.startswith("stem.1."):
            mapping[key] = "bn1." + key[len("stem.1."):]
        elif key.startswith("layer1.0.downsample.") and basic:
            continue  # torchvision's R18/R34 layer1 is not strided: no projection shortcut
        elif key.startswith(("layer1.", "layer2.", "layer3.", "layer4.")):
            mapping[key] = key
        else:  # a module added to ResNetBackbone later: no known counterpart
            continue
    return mapping


# ----------------------------------------------------------------------------- file side


def _refusal_detail(message: str) -> str:
    """The unpickler's own reason inside torch's long weights_only message, on one line."""
    match = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Please use|Check the documentation|$)", message, re.S)
    detail = match.group(1) if match else message
    return " ".join(detail.split())[:200]


def _load_payload(path: str) -> object:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file (ImageNet ResNet weights expected)")
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a file (ImageNet ResNet weights expected)")
    if path.endswith(".safetensors"):
        raise ValueError(
            f"{path} is a safetensors file, which torch.load cannot read; convert it once with "
            "torch.save(safetensors.torch.load_file(path), 'weights.pth') and point to the .pth"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _refusal_detail(str(exc))
        if "Weights only load failed" in str(exc) and "global" in detail.lower():
            raise ValueError(
                f"{path} holds pickled Python objects besides tensors, refused by "
                f"torch.load(weights_only=True) ({detail}); if you trust the file, "
                "re-save just its state dict: torch.save(torch.load(path, weights_only=False)"
                "['state_dict'], 'weights.pth')"
            ) from exc
        raise ValueError(
            f"{path} is not a PyTorch checkpoint, or not one torch.load(weights_only=True) can read ({detail})"
        ) from exc
    except Exception as exc:  # torch.load raises KeyError / EOFError / RuntimeError on non-checkpoints
        raise ValueError(f"{path} is not a PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc


def _unwrap(payload: object, path: str) -> dict[str, torch.Tensor]:
    if not isinstance(payload, Mapping):
        raise ValueError(f"{path} holds a {type(payload).__name__}, not a state dict")
    current: Mapping = payload
    while not any(isinstance(v, torch.Tensor) for v in current.values()):
        inner = next((current[k] for k in _WRAPPER_KEYS if isinstance(current.get(k), Mapping)), None)
        if inner is None:
            break
        current = inner
    return {k: v for k, v in current.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _no_resnet_error(path: str, keys: list[str]) -> ValueError:
    seen = _some(keys) if keys else "no tensors at all"
    return ValueError(
        f"{path}: no ResNet keys found; expected torchvision/timm names such as {', '.join(EXPECTED_KEYS)} "
        f"(optionally all under one prefix such as 'module.'); the file holds {len(keys)} tensor(s): {seen}"
    )


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a torchvision/timm ResNet file, with the ResNet's prefix stripped.

    See the module doc for the accepted payloads and the prefix rule. Keys outside the ResNet's
    prefix are kept under their full names (they end up ``unused``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a checkpoint; pickled objects refused; no ResNet keys (listing the
            expected names); several ResNets; the project's own layout. Each names the file.
    """
    path = os.fspath(path)
    tensors = _unwrap(_load_payload(path), path)
    keys = list(tensors)
    prefixes = sorted({k[: -len(ANCHOR_KEY)] for k in keys if k.endswith(ANCHOR_KEY)})
    if not prefixes:
        raise _no_resnet_error(path, keys)
    if len(prefixes) > 1:
        raise ValueError(
            f"{path} holds {len(prefixes)} ResNets (key prefixes {', '.join(repr(p) for p in prefixes)}); "
            "save the one to load on its own"
        )
    prefix = prefixes[0]
    if prefix + "stem.0.weight" in tensors and prefix + "conv1.weight" not in tensors:
        raise ValueError(
            f"{path} is in this project's own network layout ({prefix}stem.0.weight), not a torchvision/timm "
            "ResNet; load it with matting_core.checkpoint.load_model or initialise a method with "
            "Method.init_from_network"
        )
    if not prefix:
        return tensors
    out = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    for k, v in tensors.items():
        if k.startswith(prefix):
            continue
        if k in out:
            raise ValueError(f"{path}: key {k!r} exists both inside and outside the ResNet prefix {prefix!r}")
        out[k] = v
    return out


def _file_layout(state: Mapping[str, torch.Tensor]) -> tuple[bool, tuple[int, ...]] | None:
    """(bottleneck?, blocks per stage) of a torchvision-layout ResNet; None if incomplete."""
    counts = []
    for n in range(1, 5):
        indices = [int(m.group(1)) for k in state if (m := re.fullmatch(rf"layer{n}\.(\d+)\.conv1\.weight", k))]
        if not indices:
            return None
        counts.append(max(indices) + 1)
    return "layer1.0.conv3.weight" in state, tuple(counts)


def _describe(bottleneck: bool, counts: tuple[int, ...]) -> str:
    depth = 2 + sum(counts) * (3 if bottleneck else 2)
    block = "Bottleneck" if bottleneck else "BasicBlock"
    return f"ResNet-{depth} ({block}, blocks {'/'.join(str(c) for c in counts)})"


# ----------------------------------------------------------------------------- loading


def load_backbone_weights(
    model: nn.Module, path: str | os.PathLike[str], strict: bool = False
) -> BackboneLoadReport:
    """Copy the tensors of an ImageNet ResNet file into ``model``'s backbone, in place.

    Every backbone tensor whose torchvision counterpart (:func:`torchvision_key_map`) is in the
    file with the same shape is copied (cast to the backbone's dtype/device); everything else
    keeps its value. Nothing is modified when an error is raised.

    Args:
        model: any project network holding one :class:`ResNetBackbone` (:func:`find_backbone`),
            or the backbone itself.
        path: a torchvision/timm ResNet state dict (see :func:`read_state_dict`).
        strict: raise unless every backbone tensor with a torchvision counterpart loaded
            (missing BatchNorm ``num_batches_tracked`` counters, absent from older torchvision
            files, are tolerated, as BatchNorm's own loading does).

    Returns:
        :class:`BackboneLoadReport`; ``report.summary()`` is a one-paragraph log line.

    Raises:
        ValueError: the file holds a ResNet of another depth/block layout (naming both); nothing
            could be loaded from a file whose layout is incomplete; ``strict`` and something did
            not load (naming the file and the tensors); plus the errors of :func:`read_state_dict`.
            The same layout at another width (``unet_r18x0.5`` from an R18 file) is not an error
            without ``strict``: the report lists the mismatches.
    """
    path = os.fspath(path)
    where, backbone = _find_backbone(model)
    state = read_state_dict(path)
    ours = backbone.state_dict()

    file_layout = _file_layout(state)
    our_layout = (
        isinstance(backbone.layer1[0], Bottleneck),
        tuple(len(layer) for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4)),
    )
    if file_layout is not None and file_layout != our_layout:
        raise ValueError(
            f"{path} holds a {_describe(*file_layout)}, but the network's backbone is a "
            f"{_describe(*our_layout)}; nothing loaded"
        )

    key_map = torchvision_key_map(backbone)
    report = BackboneLoadReport(path=path, backbone=where, total=len(ours))
    used: set[str] = set()
    to_copy: list[tuple[torch.Tensor, torch.Tensor]] = []
    for key, tensor in ours.items():
        file_key = key_map.get(key)
        if file_key is None or file_key not in state:
            report.missing.append(key)
            continue
        used.add(file_key)
        src = state[file_key]
        if tuple(src.shape) != tuple(tensor.shape):
            report.shape_mismatch.append((key, tuple(src.shape), tuple(tensor.shape)))
            continue
        report.loaded.append(key)
        to_copy.append((tensor, src))
    report.unused = [k for k in state if k not in used]
    report.no_counterpart = [k for k in report.missing if k not in key_map]
    _add_notes(report, backbone, state)

    # A complete file of the same layout at another width gives a report, not an error.
    if not report.loaded and file_layout is None:
        raise ValueError(f"{path}: nothing could be loaded into the network's backbone: {report.summary()}")
    if strict:
        failed = [f"{name} {_shape(f)} vs {_shape(p)}" for name, f, p in report.shape_mismatch]
        failed += [
            f"{k} (not in the file)"
            for k in report.missing
            if k not in report.no_counterpart and not k.endswith(_COUNTER)
        ]
        if failed:
            raise ValueError(
                f"{path}: strict loading failed, {len(failed)} backbone tensor(s) not loaded: {_some(failed, 10)}"
            )

    with torch.no_grad():
        for dst, src in to_copy:
            dst.copy_(src)
    return report


def _add_notes(report: BackboneLoadReport, backbone: ResNetBackbone, state: Mapping[str, torch.Tensor]) -> None:
    stem = state.get("conv1.weight")
    ours = backbone.stem[0].weight
    if stem is None:
        deep = "conv1.0.weight" in state
        report.notes.append(
            "the file has no conv1.weight" + (" (a deep-stem ResNet-D: conv1.0/1/3 are not mapped)" if deep else "")
        )
    elif stem.dim() == 4:
        if stem.shape[0] != ours.shape[0]:
            report.notes.append(
                f"widths differ: the file's stem has {stem.shape[0]} channels, the network's {ours.shape[0]} "
                f"(width x{backbone.width:g}); only tensors of equal shape are copied, no channel slicing"
            )
        if stem.shape[1] != ours.shape[1]:
            report.notes.append(
                f"the network's stem takes {ours.shape[1]} input channels, the file's {stem.shape[1]}: "
                "stem.0.weight not loaded (no zero-padding of extra guidance channels here)"
            )
    if any(not k.endswith(_COUNTER) for k in report.loaded):
        report.notes.append(
            "no stem max-pool here (layer1 is strided): the loaded weights are a fine-tuning start, "
            "not the exact ImageNet network"
        )
