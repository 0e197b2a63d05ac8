"""ONNX parity of a guided method: MGM's band fusion exports with dynamic N, H, W (STYLE.md §8)."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

from matting_core.models.onnx_export import GuidedAlpha

from . import build_tiny

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def test_mgm_exports_with_dynamic_sizes_and_matches_onnxruntime():
    from torch.export import Dim

    model = GuidedAlpha(build_tiny("mgm", test_band_widths=[3, 2])).eval()
    g = torch.Generator().manual_seed(0)
    sample = (torch.rand(2, 3, 72, 88, generator=g), (torch.rand(2, 1, 72, 88, generator=g) > 0.5).float())
    dynamic = {name: {0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC} for name in ("image", "guidance")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            program = torch.onnx.export(model, sample, input_names=["image", "mask"], output_names=["alpha"],
                                        dynamic_shapes=dynamic, dynamo=True, opset_version=18, verbose=False)
        finally:
            logging.disable(logging.NOTSET)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    image = torch.rand(1, 3, 50, 61, generator=g)  # another batch size and a size that needs padding
    yy, xx = torch.meshgrid(torch.arange(50.0), torch.arange(61.0), indexing="ij")
    mask = (((yy - 25) ** 2 + (xx - 30) ** 2) < 15**2).float()[None, None]
    with torch.no_grad():
        expected = model(image, mask).numpy()
    got = session.run(None, {"image": image.numpy(), "mask": mask.numpy()})[0]
    assert got.shape == (1, 1, 50, 61)
    np.testing.assert_allclose(got, expected, atol=1e-5)
