"""matting_pipeline.tools.export: checkpoint → ONNX with dynamic N/H/W, parity with PyTorch in onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from matting_core.checkpoint import save_checkpoint
from matting_core.models import build_network
from matting_pipeline.cli import main


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One tiny network exported once through the CLI (export is the slow part)."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = build_network("unet_r18x0.25").eval()
    with torch.no_grad():  # non-trivial BN statistics so eval-mode folding is exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    checkpoint = save_checkpoint(root / "model.pt", model)
    output = root / "out" / "model.onnx"
    rc = main(["export", "--checkpoint", str(checkpoint), "--output", str(output)])
    assert rc == 0
    return model, output


def test_onnx_matches_pytorch_at_two_sizes_and_batches(exported):
    model, output = exported
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1)
    for n, h, w in [(1, 64, 96), (2, 100, 70), (1, 33, 7)]:
        image = torch.rand(n, 3, h, w, generator=generator)
        with torch.inference_mode():
            expected = model(image)["alpha"].numpy()
        (alpha,) = session.run(["alpha"], {"image": image.numpy()})
        assert alpha.shape == (n, 1, h, w)
        assert alpha.min() >= 0 and alpha.max() <= 1
        assert np.abs(alpha - expected).max() < 1e-4


def test_onnx_interface_is_named_and_dynamic(exported):
    _, output = exported
    proto = onnx.load(str(output))
    onnx.checker.check_model(proto)
    (inp,) = proto.graph.input
    (out,) = proto.graph.output
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert inp.name == "image" and dims(inp) == ["batch", 3, "height", "width"]
    assert out.name == "alpha" and dims(out) == ["batch", 1, "height", "width"]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["network_spec"])["name"] == "unet_r18x0.25"
    assert [p.name for p in output.parent.iterdir()] == ["model.onnx"]  # atomic: no temp left


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    rc = main(["export", "--checkpoint", str(tmp_path / "none.pt"), "--output", str(tmp_path / "m.onnx")])
    assert rc == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


class Payload:  # an object only pickle's arbitrary-object machinery can rebuild
    pass


def test_a_corrupted_or_pickled_checkpoint_is_refused_naming_the_file(tmp_path, capsys):
    from tests.core.test_checkpoint import _flip_tensor_bytes

    torch.manual_seed(0)
    model = build_network("unet_r18x0.25")
    path = save_checkpoint(tmp_path / "model.pt", model)
    _flip_tensor_bytes(path, max(model.state_dict().values(), key=lambda t: t.numel()))
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(path), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("matting export: error: ") and "model.pt: its weights do not match" in err
    assert "Traceback" not in err and not out.exists()
    # predict refuses it the same way, before writing anything
    photo = tmp_path / "in.png"
    from tests.images import rgb, save

    save(photo, rgb(32, 32, 1))
    assert main(["predict", "--checkpoint", str(path), "--input", str(photo), "--output", str(tmp_path / "a"),
                 "--device", "cpu"]) == 2
    assert "its weights do not match" in capsys.readouterr().err and not (tmp_path / "a").exists()

    evil = tmp_path / "evil.pt"
    torch.save({"format": "matting-model", "version": 2, "x": Payload()}, evil)
    assert main(["export", "--checkpoint", str(evil), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "evil.pt cannot be read as a checkpoint" in err and "Traceback" not in err
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(save_checkpoint(tmp_path / "ok.pt", model).read_bytes()[:1500])
    assert main(["export", "--checkpoint", str(truncated), "--output", str(out)]) == 2
    assert "cut.pt cannot be read as a checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("method, guidance", [("dim", "trimap"), ("adamatting", "trimap"), ("mgm", "mask"),
                                              ("mgm_wild", "mask")])
def test_every_guided_method_exports_its_guidance_as_a_named_input(tmp_path, capsys, method, guidance):
    """Issue 15 item 4: a related method's checkpoint exports with its guidance as a second
    ONNX input and passes the same parity check (ONNX Runtime vs PyTorch) at new sizes."""
    from matting_core.methods import get_method
    from matting_core.models.onnx_export import sample_guidance

    torch.manual_seed(0)
    m = get_method(method)
    model = m.build(m.method_spec(network="unet_r18x0.25")).eval()
    checkpoint = save_checkpoint(tmp_path / "model.pt", model)
    output = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(output)]) == 0
    assert f"inputs image + {guidance}" in capsys.readouterr().out
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image", guidance]
    generator = torch.Generator().manual_seed(3)
    image = torch.rand(1, 3, 45, 77, generator=generator)
    guide = sample_guidance(guidance, 1, 45, 77, generator)
    with torch.no_grad():
        expected = model(image, guide)["alpha"].numpy()
    (got,) = session.run(["alpha"], {"image": image.numpy(), guidance: guide.numpy()})
    assert got.shape == (1, 1, 45, 77)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_a_mam_checkpoint_is_refused_with_the_reason(tmp_path, capsys):
    from matting_core.methods import get_method

    m = get_method("mam")
    checkpoint = save_checkpoint(tmp_path / "mam.pt", m.build(m.method_spec(network="unet_r18x0.25")))
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "mam.onnx")]) == 2
    assert "is a MAM model" in capsys.readouterr().err and not (tmp_path / "mam.onnx").exists()
