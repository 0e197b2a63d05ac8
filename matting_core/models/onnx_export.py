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

__all__ = ["DEFAULT_OPSET", "GUIDANCE_INPUTS", "export_onnx", "guidance_input", "onnx_parity", "sample_guidance"]

DEFAULT_OPSET = 18
INPUT_NAME = "image"
OUTPUT_NAME = "alpha"


GUIDANCE_INPUTS = ("trimap", "mask", "prompt_mask")


def guidance_input(model: nn.Module) -> str | None:
    """The second ONNX input of ``model``'s method: None (MLB), ``trimap``, ``mask`` or, for
    MAM's prompt, ``prompt_mask``."""
    from matting_core.methods import method_of

    kind = method_of(model).required_input
    return "prompt_mask" if kind == "prompt" else kind


class GuidedAlpha(nn.Module):
    """Export wrapper of a guided method: ``(image (N,3,H,W), guidance (N,1,H,W)) → alpha``.

    ``kind`` ``prompt_mask`` (MAM): the prompt as a region mask, through
    :meth:`matting_core.methods.mam.MAMNet.forward_region` (a box prompt's region gives the
    box prompt's alpha)."""

    def __init__(self, model: nn.Module, kind: str = "trimap") -> None:
        super().__init__()
        self.model = model
        self.kind = kind

    def forward(self, image: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        if self.kind == "prompt_mask":
            return self.model.forward_region(image, guidance)["alpha"]
        return self.model(image, guidance)["alpha"]


def sample_guidance(kind: str, n: int, h: int, w: int, generator: torch.Generator) -> torch.Tensor:
    """A random guidance of ``kind`` in the model's format: a trimap of 0 / 0.5 / 1 regions,
    or a 0/1 mask, (N, 1, H, W) float32 (blocky, so every class covers whole patches); a
    ``prompt_mask``: a random box covering at least a quarter of each side, as a 0/1 mask."""
    if kind == "prompt_mask":
        out = torch.zeros(n, 1, h, w)
        for i in range(n):
            y0, x0 = (int(torch.randint(0, max(1, s // 2), (1,), generator=generator)) for s in (h, w))
            y1 = min(h, y0 + max(1, h // 4) + int(torch.randint(0, max(1, h // 2), (1,), generator=generator)))
            x1 = min(w, x0 + max(1, w // 4) + int(torch.randint(0, max(1, w // 2), (1,), generator=generator)))
            out[i, 0, y0:y1, x0:x1] = 1.0
        return out
    coarse = torch.randint(0, 3 if kind == "trimap" else 2, (n, 1, max(1, h // 8), max(1, w // 8)), generator=generator)
    full = torch.nn.functional.interpolate(coarse.float(), size=(h, w), mode="nearest")
    return full / 2.0 if kind == "trimap" else full


def export_onnx(
    model: nn.Module,
    opset: int = DEFAULT_OPSET,
    sample_hw: tuple[int, int] = (72, 88),
    metadata: Mapping[str, Any] | None = None,
    guidance: str | None = None,
) -> bytes:
    """Serialise ``model`` (a network returning ``{"alpha", ...}``) as ONNX bytes.

    Input ``image`` float32 (N, 3, H, W), dynamic N/H/W; output ``alpha`` (N, 1, H, W) in [0, 1].
    ``guidance``: ``"trimap"``, ``"mask"`` or ``"prompt_mask"`` for a guided method (DIM,
    AdaMatting: trimap; MGM, MGM in the wild: mask; MAM: the prompt box as a 0/1 region
    mask): a second input of that name, float32 (N, 1, H, W) in the model's format (trimap
    0 / 0.5 / 1, masks 0 / 1), same dynamic axes.
    ``metadata`` (e.g. the network spec) is written to the model's metadata_props as JSON
    strings. The model is exported on CPU in eval mode (BN uses running statistics); the
    caller's module is not modified.
    """
    from torch.export import Dim

    if guidance is not None and guidance not in GUIDANCE_INPUTS:
        raise ValueError(f"guidance input must be one of {GUIDANCE_INPUTS}, got {guidance!r}")
    generator = torch.Generator().manual_seed(0)
    # Sample size not a multiple of 32 and batch 2, so nothing specialises to a constant.
    sample = torch.rand(2, 3, *sample_hw, generator=generator)
    # Dim.DYNAMIC (not named Dims): torch 2.13's constraint solver fails on the derived pad
    # expressions with named Dims at sample sizes that are not multiples of 32.
    dynamic = {INPUT_NAME: {0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC}}
    if guidance is None:
        wrapper: nn.Module = AlphaOnly(model).to("cpu").eval()
        args: tuple = (sample,)
        names = [INPUT_NAME]
    else:
        wrapper = GuidedAlpha(model, guidance).to("cpu").eval()
        args = (sample, sample_guidance(guidance, 2, *sample_hw, generator))
        names = [INPUT_NAME, guidance]
        dynamic = {"image": dynamic[INPUT_NAME], "guidance": {0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC}}
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
                args,
                dynamo=True,
                input_names=names,
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
    for value in [*proto.graph.value_info, *proto.graph.input]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


def onnx_parity(
    onnx_model: bytes | str,
    model: nn.Module,
    shapes: Iterable[tuple[int, int, int]] = ((1, 64, 96), (2, 100, 70)),
    seed: int = 0,
    guidance: str | None = None,
) -> float:
    """Max |alpha_onnxruntime − alpha_torch| over random inputs of the given (N, H, W)
    (with a random ``guidance`` trimap or mask for a guided method, :func:`export_onnx`).

    ``onnx_model`` is ONNX bytes or a file path. Runs onnxruntime on CPU, torch in eval mode.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_model, providers=["CPUExecutionProvider"])
    model = model.to("cpu").eval()
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for n, h, w in shapes:
        image = torch.rand(n, 3, h, w, generator=generator)
        feeds = {INPUT_NAME: image.numpy()}
        with torch.inference_mode():
            if guidance is None:
                expected = model(image)["alpha"].numpy()
            else:
                guide = sample_guidance(guidance, n, h, w, generator)
                feeds[guidance] = guide.numpy()
                expected = GuidedAlpha(model, guidance)(image, guide).numpy()
        (got,) = session.run([OUTPUT_NAME], feeds)
        if got.shape != expected.shape:
            raise AssertionError(f"ONNX output shape {got.shape} != torch {expected.shape} for input {(n, 3, h, w)}")
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst
