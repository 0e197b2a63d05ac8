"""Matting networks and the name → network factory used at the config boundary.

>>> model = build_network("unet_r18x0.25")
>>> out = model(torch.rand(1, 3, 70, 50))
>>> out["alpha"].shape, out["boundary_logits"].shape
(torch.Size([1, 1, 70, 50]), torch.Size([1, 1, 70, 50]))

``NETWORKS`` maps a name (the ``network`` key in params.yaml) to the constructor arguments of
:class:`UNetMatting`. ``network_spec(name, **overrides)`` gives the full, plain-typed dict
(str/int/float/list) that rebuilds the same network; checkpoints store it, and
``build_network_from_spec(spec)`` turns it back into a module.

Parameter counts (``count_parameters``; trainable, default arguments; tested). Of unet_r18's
17.87 M, the encoder holds 11.18 M, the ASPP 4.13 M and decoder + heads 2.56 M:

================  ===========
name              parameters
================  ===========
unet_r18x0.25         1.12 M
unet_r18x0.5          4.47 M
unet_r18             17.87 M
unet_r34             27.98 M
unet_r50             43.93 M
unet_r101            62.92 M
================  ===========
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .aspp import ASPP
from .resnet import RESNET_LAYOUTS, BasicBlock, Bottleneck, ResNetBackbone, scaled_channels
from .unet import DEFAULT_DECODER_CHANNELS, AlphaOnly, UNetMatting, pad_to_multiple

__all__ = [
    "ASPP",
    "AlphaOnly",
    "BasicBlock",
    "Bottleneck",
    "NETWORKS",
    "RESNET_LAYOUTS",
    "ResNetBackbone",
    "UNetMatting",
    "build_network",
    "build_network_from_spec",
    "count_parameters",
    "network_spec",
    "pad_to_multiple",
    "scaled_channels",
]

# name -> constructor arguments of UNetMatting that differ between entries.
NETWORKS: dict[str, dict[str, Any]] = {
    "unet_r18x0.25": {"depth": 18, "width": 0.25},  # tiny: tests only
    "unet_r18x0.5": {"depth": 18, "width": 0.5},  # the real-time student
    "unet_r18": {"depth": 18, "width": 1.0},
    "unet_r34": {"depth": 34, "width": 1.0},
    "unet_r50": {"depth": 50, "width": 1.0},
    "unet_r101": {"depth": 101, "width": 1.0},
}

# Every constructor argument with its default; the keys a spec or an override may carry.
_DEFAULTS: dict[str, Any] = {
    "depth": 18,
    "width": 1.0,
    "aspp_rates": [3, 6, 9],
    "aspp_channels": 256,
    "decoder_channels": list(DEFAULT_DECODER_CHANNELS),
    "pad_multiple": 32,
}


def _unknown_name(name: object) -> ValueError:
    return ValueError(f"unknown network {name!r}; valid names: {', '.join(NETWORKS)}")


def network_spec(name: str, **overrides: Any) -> dict[str, Any]:
    """The plain dict that rebuilds network ``name`` (with ``overrides`` applied).

    Keys: ``name`` plus every :class:`UNetMatting` argument (``depth``, ``width``,
    ``aspp_rates``, ``aspp_channels``, ``decoder_channels``, ``pad_multiple``). Values are
    str/int/float/list only, so the dict survives JSON, YAML, MLflow params and
    ``torch.load(weights_only=True)``.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names) or unknown override key.
    """
    if name not in NETWORKS:
        raise _unknown_name(name)
    unknown = sorted(set(overrides) - set(_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown network option(s) {unknown}; valid options: {', '.join(_DEFAULTS)}")
    spec: dict[str, Any] = {"name": name, **_DEFAULTS, **NETWORKS[name], **overrides}
    spec["depth"] = int(spec["depth"])
    spec["width"] = float(spec["width"])
    spec["aspp_rates"] = [int(r) for r in spec["aspp_rates"]]
    spec["aspp_channels"] = int(spec["aspp_channels"])
    spec["decoder_channels"] = [int(c) for c in spec["decoder_channels"]]
    spec["pad_multiple"] = int(spec["pad_multiple"])
    return spec


def build_network(name: str, **overrides: Any) -> nn.Module:
    """Build network ``name`` from :data:`NETWORKS` (see :func:`network_spec` for overrides).

    The module gets a ``network_spec`` attribute holding the spec it was built from.

    Raises:
        ValueError: unknown name, listing the valid names.
    """
    spec = network_spec(name, **overrides)
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    model = UNetMatting(**kwargs)
    model.network_spec = spec
    return model


def build_network_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Inverse of :func:`network_spec`: ``build_network(spec["name"], **rest)``."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"a network spec is a dict with a 'name' key, got {spec!r}")
    rest = {k: v for k, v in spec.items() if k != "name"}
    return build_network(spec["name"], **rest)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters in ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


