"""The METHODS table and the uniform API the pipeline calls: specs, rebuild, init, predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from matting_core.checkpoint import read_checkpoint, save_checkpoint
from matting_core.methods import (
    METHODS,
    build,
    build_from_spec,
    get_method,
    method_of,
    normalize_guidance,
    predict,
    apply_known_regions,
    predict_image,
)
from matting_core.methods.common import GuidedEncoderDecoder
from matting_core.methods.mam import box_prompt, point_prompt
from matting_core.models import UNetMatting, build_network, network_spec

from . import NETWORK, build_tiny, disc_alpha, make_batch

GUIDED = ["dim", "adamatting", "mgm", "mgm_wild", "mam"]


def test_table_names_and_inputs():
    assert set(METHODS) == {"mlb", "dim", "adamatting", "mgm", "mgm_wild", "mam"}
    assert {n: m.required_input for n, m in METHODS.items()} == {
        "mlb": None, "dim": "trimap", "adamatting": "trimap", "mgm": "mask", "mgm_wild": "mask", "mam": "prompt",
    }
    with pytest.raises(ValueError, match="valid methods: mlb, dim, adamatting, mgm, mgm_wild, mam"):
        get_method("modnet")


@pytest.mark.parametrize("name", GUIDED)
def test_spec_is_plain_and_rebuilds_the_same_network(name, tmp_path):
    method = get_method(name)
    spec = method.method_spec(network=NETWORK)
    assert spec["method"] == name and spec["name"] == NETWORK
    assert json.loads(json.dumps(spec)) == spec
    model = build_tiny(name)
    assert model.network_spec == spec
    save_checkpoint(tmp_path / "m.pt", model, extra={"method": name})
    payload = read_checkpoint(tmp_path / "m.pt")  # weights_only load
    rebuilt = build_from_spec(payload["network_spec"])
    rebuilt.load_state_dict(payload["state_dict"], strict=True)
    assert method_of(rebuilt) is method
    batch = make_batch(name, n=1, height=40, width=36)
    guidance = batch[method.required_input]
    torch.testing.assert_close(
        method.predict(rebuilt, batch["image"], guidance), method.predict(model, batch["image"], guidance)
    )


def test_spec_options_and_errors():
    dim = get_method("dim")
    spec = dim.method_spec(network="unet_r18x0.5", width=0.25, refine_channels=32)
    assert spec["width"] == 0.25 and spec["refine_channels"] == 32
    assert build(spec).refinement.conv1.out_channels == 8
    with pytest.raises(ValueError, match="unknown dim option.*valid options"):
        dim.method_spec(network=NETWORK, propagation_steps=2)
    with pytest.raises(ValueError, match="unknown network"):
        dim.method_spec(network="vgg16")
    with pytest.raises(ValueError, match="unknown dim spec key"):
        build({**spec, "colour": "red"})
    with pytest.raises(ValueError, match="not 'mgm'"):
        get_method("mgm").build(spec)
    assert get_method("adamatting").method_spec(NETWORK, propagation_steps=0)["propagation_steps"] == 0


def test_plain_network_specs_are_the_main_method():
    spec = get_method("mlb").method_spec(network=NETWORK)
    assert spec == network_spec(NETWORK)
    model = build_from_spec(spec)
    assert isinstance(model, UNetMatting) and method_of(model).name == "mlb"
    out = predict(model, torch.rand(1, 3, 33, 35))
    assert out.shape == (1, 1, 33, 35)
    with pytest.raises(ValueError, match="stages"):
        get_method("mlb").make_loss()


@pytest.mark.parametrize(
    ("name", "children"),
    [
        ("dim", ["body", "decoder", "head", "refinement"]),
        ("adamatting", ["body", "trimap_decoder", "alpha_decoder", "trimap_head", "alpha_head", "propagation"]),
        ("mgm", ["body", "decoder", "head_os8", "head_os4", "head_os1"]),
    ],
)
def test_guided_networks_build_encoder_then_decoders_then_heads(name, children):
    # Construction order fixes the seeded initial weights and the state-dict keys checkpoints use.
    model = build_tiny(name)
    assert isinstance(model, GuidedEncoderDecoder)
    assert [n for n, _ in model.named_children()] == children
    assert model.body.guidance_name == get_method(name).required_input
    with pytest.raises(TypeError):
        type(model)(18)  # the method's own options are keyword-only; backbone options go by name


@pytest.mark.parametrize("name", ["dim", "adamatting", "mgm"])
def test_init_from_the_pretrained_unet(name):
    torch.manual_seed(1)
    source = build_network(NETWORK)
    model = build_tiny(name)
    report = get_method(name).init_from_network(model, source)
    assert "body.encoder.stem.0.weight" in report["expanded"]
    stem = model.body.encoder.stem[0].weight
    torch.testing.assert_close(stem[:, :3], source.encoder.stem[0].weight)
    assert torch.equal(stem[:, 3:], torch.zeros_like(stem[:, 3:]))  # the guidance channel starts at 0
    torch.testing.assert_close(model.body.aspp.project[0].weight, source.aspp.project[0].weight)
    decoder = model.decoder if name != "adamatting" else model.alpha_decoder
    torch.testing.assert_close(decoder.dec1.body[0].weight, source.dec1.body[0].weight)
    assert not any(k.startswith(("head", "refinement", "propagation")) for k in report["copied"])


def test_init_mam_from_the_seg_network():
    source = build_network(NETWORK)
    model = build_tiny("mam")
    report = get_method("mam").init_from_network(model, source)
    assert report["copied"] and not report["expanded"]
    for key, value in source.state_dict().items():
        assert torch.equal(model.segmenter.network.state_dict()[key], value)


@pytest.mark.parametrize("name", GUIDED)
def test_predict_needs_guidance_and_says_which(name):
    method = get_method(name)
    model = build_tiny(name)
    flag = {"trimap": "--trimap", "mask": "--mask", "prompt": "--box"}[method.required_input]
    with pytest.raises(ValueError, match=flag):
        method.predict(model, torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=flag):
        predict_image(model, np.zeros((20, 20, 3), np.uint8))


@pytest.mark.parametrize("name", GUIDED)
def test_predict_image_resizes_image_and_guidance(name):
    method = get_method(name)
    model = build_tiny(name)
    alpha = disc_alpha(60, 44, 30, 22, 14)
    image = (np.random.default_rng(0).random((60, 44, 3)) * 255).astype(np.uint8)
    if method.required_input == "trimap":
        guidance = (method.make_guidance(alpha, train=False)[0] * 255).round().astype(np.uint8)
    elif method.required_input == "mask":
        guidance = ((alpha > 0.5) * 255).astype(np.uint8)
    else:
        guidance = box_prompt(8, 10, 36, 50)
    out = predict_image(model, image, guidance, short_side=32)
    assert out.shape == (60, 44) and out.dtype == np.float32
    assert 0 <= out.min() and out.max() <= 1
    assert model.training  # mode restored


@pytest.mark.parametrize("name", ["dim", "adamatting"])
def test_trimap_methods_keep_the_trimaps_known_regions(name):
    """DIM/AdaMatting protocol: the network's alpha only fills the trimap's unknown band."""
    model = build_tiny(name)
    with torch.no_grad():  # push the raw output away from 0 and 1 so the rule is visible
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    alpha = disc_alpha(60, 44, 30, 22, 14)
    image = (np.random.default_rng(1).random((60, 44, 3)) * 255).astype(np.uint8)
    trimap = (get_method(name).make_guidance(alpha, train=False)[0] * 255).round().astype(np.uint8)
    assert (trimap == 0).any() and (trimap == 255).any() and (trimap == 128).any()
    out = predict_image(model, image, trimap, short_side=32)
    np.testing.assert_array_equal(out[trimap == 0], 0.0)
    np.testing.assert_array_equal(out[trimap == 255], 1.0)
    band = out[trimap == 128]
    assert np.any((band > 0) & (band < 1))  # the unknown band is the network's


def test_apply_known_regions():
    alpha = np.full((1, 5), 0.4, np.float32)
    trimap = np.array([[0.0, 0.2, 0.5, 0.8, 1.0]], np.float32)
    np.testing.assert_array_equal(apply_known_regions(alpha, trimap), np.float32([[0, 0, 0.4, 1, 1]]))
    with pytest.raises(ValueError, match="trimap"):
        apply_known_regions(alpha, trimap[:, :4])


def test_normalize_guidance():
    trimap = np.array([[0, 128, 255]], np.uint8)
    np.testing.assert_allclose(normalize_guidance("trimap", trimap), [[[0, 128 / 255, 1]]])
    np.testing.assert_array_equal(normalize_guidance("mask", np.array([[0, 127, 128]], np.uint8)), [[[0, 0, 1]]])
    np.testing.assert_array_equal(normalize_guidance("mask", np.array([[0.2, 0.7]])), [[[0, 1]]])
    np.testing.assert_array_equal(normalize_guidance("prompt", point_prompt(3, 4)), point_prompt(3, 4))
    with pytest.raises(ValueError, match="prompt"):
        normalize_guidance("prompt", np.zeros(4))
    with pytest.raises(ValueError, match="valid"):
        normalize_guidance("scribble", trimap)


def test_train_step_names_missing_batch_keys():
    method = get_method("dim")
    model = build_tiny("dim")
    batch = make_batch("dim")
    del batch["fg"]
    with pytest.raises(ValueError, match=r"batch keys \['fg'\]"):
        method.train_step(model, method.make_loss(model), batch, torch.optim.Adam(model.parameters()))


def test_guidance_for_evaluation_is_deterministic():
    alpha = disc_alpha(40, 40, 20, 20, 10)
    for name in GUIDED:
        method = get_method(name)
        a = method.make_guidance(alpha, None, train=False)
        b = method.make_guidance(alpha[None], np.random.default_rng(1), train=False)
        np.testing.assert_array_equal(a, b)
