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


def test_a_mam_checkpoint_exports_its_prompt_box_as_a_region_mask(tmp_path, capsys):
    """MAM's prompt enters the graph as ``prompt_mask``, the box drawn as a 0/1 region: ONNX
    Runtime's alpha equals PyTorch's MAM with the box prompt itself; a point prompt has no
    region (its connected component does not trace) and says so."""
    from matting_core.methods import get_method
    from matting_core.methods.mam import box_prompt, point_prompt, prompt_mask

    torch.manual_seed(0)
    m = get_method("mam")
    model = m.build(m.method_spec(network="unet_r18x0.25")).eval()
    checkpoint = save_checkpoint(tmp_path / "mam.pt", model)
    output = tmp_path / "mam.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(output)]) == 0
    assert "method mam, inputs image + prompt_mask" in capsys.readouterr().out
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image", "prompt_mask"]
    image = torch.rand(2, 3, 58, 83, generator=torch.Generator().manual_seed(4))
    boxes = torch.from_numpy(np.stack([box_prompt(5, 4, 60, 50), box_prompt(20, 0, 82, 30)]))
    with torch.no_grad():
        expected = model(image, boxes)["alpha"].numpy()
    (got,) = session.run(["alpha"], {"image": image.numpy(), "prompt_mask": prompt_mask(boxes, image).numpy()})
    np.testing.assert_allclose(got, expected, atol=1e-4)
    with pytest.raises(ValueError, match="a point prompt has no region mask"):
        prompt_mask(torch.from_numpy(point_prompt(3, 4))[None], image[:1])


# ----------------------------------------------------------------------------- int8


@pytest.fixture(scope="module")
def calibration_set(tmp_path_factory):
    """A composite-like shard set (image + alpha of a soft disc over noise), 14 samples of
    varied sizes, written by the real shard writer."""
    from matting_pipeline.shards import write_shard_set

    rng = np.random.default_rng(0)
    samples = []
    for i in range(14):
        h, w = int(rng.integers(48, 80)), int(rng.integers(48, 80))
        yy, xx = np.mgrid[:h, :w].astype(np.float32)
        alpha = np.clip((min(h, w) * 0.3 - np.hypot(yy - h / 2, xx - w / 2)) / 4 + 0.5, 0, 1).astype(np.float32)
        fg, bg = rng.integers(150, 255, 3), rng.integers(0, 100, (h, w, 3))
        image = np.round(alpha[..., None] * fg + (1 - alpha[..., None]) * bg).astype(np.uint8)
        samples.append((f"train-{i:06d}", {"set": "train"}, {"image": image, "alpha": alpha}))
    root = tmp_path_factory.mktemp("calibration") / "train"
    write_shard_set(root, "train", samples, samples_per_shard=5)
    return root


def test_int8_export_writes_a_quantized_dynamic_model_that_agrees_with_fp32(exported, calibration_set, capsys):
    """Issue 15 item 2: `matting export --int8` (static quantization calibrated on shard
    images) writes an int8 QDQ model with the same dynamic interface, after the fp32 parity
    check and an int8 agreement check on held-out images."""
    model, fp32_path = exported
    checkpoint = fp32_path.parent.parent / "model.pt"
    output = fp32_path.parent / "model.int8.onnx"
    capsys.readouterr()
    rc = main(["export", "--checkpoint", str(checkpoint), "--output", str(output), "--int8",
               "--calibration", str(calibration_set), "--calibration-count", "8", "--check-count", "4"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "onnxruntime vs PyTorch: max abs alpha difference" in out  # the fp32 check still runs
    assert "int8 vs fp32 on 4 held-out images" in out and ", int8, opset" in out
    proto = onnx.load(str(output))
    ops = {node.op_type for node in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["network_spec"])["name"] == "unet_r18x0.25"
    assert meta["quantization"].startswith("int8 static") and meta["calibration_feeds"] == "8"
    assert output.stat().st_size < 0.5 * fp32_path.stat().st_size  # int8 weights
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(5)
    for n, h, w in [(1, 64, 96), (2, 50, 70)]:
        image = torch.rand(n, 3, h, w, generator=generator)
        (alpha,) = session.run(["alpha"], {"image": image.numpy()})
        with torch.inference_mode():
            expected = model(image)["alpha"].numpy()
        assert alpha.shape == (n, 1, h, w) and alpha.min() >= 0 and alpha.max() <= 1
        assert np.abs(alpha - expected).mean() < 0.05  # int8, not fp32: close, not equal
        assert np.abs(alpha - expected).max() > 0


def test_an_int8_model_that_fails_its_agreement_check_is_not_written(exported, calibration_set, capsys):
    _, fp32_path = exported
    output = fp32_path.parent / "strict.int8.onnx"
    rc = main(["export", "--checkpoint", str(fp32_path.parent.parent / "model.pt"), "--output", str(output), "--int8",
               "--calibration", str(calibration_set), "--calibration-count", "4", "--check-count", "2",
               "--int8-tolerance", "0"])
    assert rc == 1 and not output.exists()
    assert "int8 agreement check failed; nothing written" in capsys.readouterr().err


def test_int8_without_a_calibration_set_is_a_clear_error(exported, tmp_path, capsys):
    _, fp32_path = exported
    rc = main(["export", "--checkpoint", str(fp32_path.parent.parent / "model.pt"), "--output",
               str(tmp_path / "m.onnx"), "--int8", "--calibration", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert rc == 2 and "nowhere: no shard set here" in err and "--calibration" in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("method, guidance", [("dim", "trimap")])  # a mask: the same path, its format tested below
def test_a_guided_method_exports_int8_with_guidance_made_from_the_sets_alpha(tmp_path, calibration_set, capsys,
                                                                            method, guidance):
    from matting_core.methods import get_method

    torch.manual_seed(0)
    m = get_method(method)
    checkpoint = save_checkpoint(tmp_path / "model.pt", m.build(m.method_spec(network="unet_r18x0.25")).eval())
    output = tmp_path / "model.onnx"
    rc = main(["export", "--checkpoint", str(checkpoint), "--output", str(output), "--int8",
               "--calibration", str(calibration_set), "--calibration-count", "4", "--check-count", "2"])
    assert rc == 0 and f"int8, opset 18, network unet_r18x0.25, method {method}, inputs image + {guidance}" in \
        capsys.readouterr().out
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image", guidance]


def test_calibration_guidance_is_the_methods_format():
    from matting_core.models.onnx_quant import guidance_from_alpha

    alpha = np.zeros((40, 40), np.float32)
    alpha[10:30, 10:30] = 1.0
    alpha[10:30, 20] = 0.5
    trimap = guidance_from_alpha("trimap", alpha, band=3)
    assert trimap.shape == (1, 1, 40, 40) and set(np.unique(trimap)) == {0.0, 0.5, 1.0}
    assert trimap[0, 0, 20, 17] == 0.5 and trimap[0, 0, 20, 12] == 1.0 and trimap[0, 0, 0, 0] == 0.0
    mask = guidance_from_alpha("mask", alpha)
    assert set(np.unique(mask)) == {0.0, 1.0} and mask[0, 0, 20, 20] == 1.0
    region = guidance_from_alpha("prompt_mask", alpha)  # MAM's evaluation box, grown 5 %, as a region
    assert region[0, 0, 9:31, 9:31].all() and region.sum() == 22 * 22
    with pytest.raises(ValueError, match="'trimap', 'mask' or 'prompt_mask'"):
        guidance_from_alpha("prompt", alpha)
