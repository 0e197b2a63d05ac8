"""ONNX export of a matting network: ``image`` (N,3,H,W) float32 RGB in [0,1] → ``alpha``.

Uses torch's default (``dynamo=True``, torch.export-based) exporter, which needs
``onnxscript``. N, H and W are dynamic: the padding to a multiple of 32, the cropping back
and the ASPP image pooling are traced as symbolic shape arithmetic, not constants
(see ``unet.py``). Opset 18 is the exporter's native opset; others go through ONNX's
version converter.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .unet import AlphaOnly

__all__ = ["DEFAULT_OPSET", "export_onnx", "onnx_parity"]

DEFAULT_OPSET = 18
INPUT_NAME = "image"
OUTPUT_NAME = "alpha"


def export_onnx(
    model: nn.Module,
    opset: int = DEFAULT_OPSET,
    sample_hw: tuple[int, int] = (72, 88),
    metadata: Mapping[str, Any] | None = None,
) -> bytes:
    """Serialise ``model`` (a network returning ``{"alpha", ...}``) as ONNX bytes.

    Input ``image`` float32 (N, 3, H, W), dynamic N/H/W; output ``alpha`` (N, 1, H, W) in [0, 1].
    ``metadata`` (e.g. the network spec) is written to the model's metadata_props as JSON
    strings. The model is exported on CPU in eval mode (BN uses running statistics); the
    caller's module is not modified.
    """
    from torch.export import Dim

    wrapper = AlphaOnly(model).to("cpu").eval()
    # Sample size not a multiple of 32 and batch 2, so nothing specialises to a constant.
    sample = torch.rand(2, 3, *sample_hw, generator=torch.Generator().manual_seed(0))
    # Dim.DYNAMIC (not named Dims): torch 2.13's constraint solver fails on the derived pad
    # expressions with named Dims at sample sizes that are not multiples of 32.
    dynamic = {INPUT_NAME: {0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC}}
    # The exporter logs harmless warnings about optional torchvision ops; keep the CLI quiet.
    quiet = [logging.getLogger(n) for n in ("torch.onnx._internal.exporter._registration", "torch.onnx")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper,
                (sample,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=dynamic,
                opset_version=opset,
                verbose=False,
            )
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    proto = program.model_proto
    _name_dynamic_dims(proto)
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key = str(key)
        entry.value = value if isinstance(value, str) else json.dumps(value)
    return proto.SerializeToString()


def _name_dynamic_dims(proto: Any) -> None:
    """Give the dynamic axes readable names: image (batch, 3, height, width) → alpha (batch, 1, height, width).

    torch.export names them s0, s1, ... and writes the output's size as the (equivalent)
    padding expression; both are cosmetic in ONNX, but tools display them.
    """
    (image,) = [v for v in proto.graph.input if v.name == INPUT_NAME]
    names = ("batch", None, "height", "width")
    rename = {}
    for dim, name in zip(image.type.tensor_type.shape.dim, names):
        if name is not None and dim.dim_param:
            rename[dim.dim_param] = name
            dim.dim_param = name
    for output in proto.graph.output:
        if output.name == OUTPUT_NAME:
            for dim, name in zip(output.type.tensor_type.shape.dim, names):
                if name is not None:
                    dim.Clear()
                    dim.dim_param = name
    for value in proto.graph.value_info:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


def onnx_parity(
    onnx_model: bytes | str,
    model: nn.Module,
    shapes: Iterable[tuple[int, int, int]] = ((1, 64, 96), (2, 100, 70)),
    seed: int = 0,
) -> float:
    """Max |alpha_onnxruntime − alpha_torch| over random inputs of the given (N, H, W).

    ``onnx_model`` is ONNX bytes or a file path. Runs onnxruntime on CPU, torch in eval mode.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_model, providers=["CPUExecutionProvider"])
    model = model.to("cpu").eval()
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for n, h, w in shapes:
        image = torch.rand(n, 3, h, w, generator=generator)
        with torch.inference_mode():
            expected = model(image)["alpha"].numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: image.numpy()})
        if got.shape != expected.shape:
            raise AssertionError(f"ONNX output shape {got.shape} != torch {expected.shape} for input {(n, 3, h, w)}")
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst
