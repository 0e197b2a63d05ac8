"""matting_core.models: shapes at odd sizes, strides, width multiplier, factory, gradients."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from matting_core.models import (
    NETWORKS,
    ResNetBackbone,
    UNetMatting,
    build_network,
    build_network_from_spec,
    count_parameters,
    network_spec,
    pad_to_multiple,
)

# Exact trainable parameter counts (documented in matting_core/models/__init__.py).
EXPECTED_PARAMETERS = {
    "unet_r18x0.25": 1_121_798,
    "unet_r18x0.5": 4_474_858,
    "unet_r18": 17_874_770,
    "unet_r34": 27_982_930,
    "unet_r50": 43_927_762,
    "unet_r101": 62_919_890,
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_output_shapes_and_ranges_at_odd_size(depth):
    model = build_network("unet_r18x0.25", depth=depth, width=0.125).eval()
    image = torch.rand(2, 3, 70, 50)
    with torch.inference_mode():
        out = model(image)
    assert set(out) == {"alpha", "boundary_logits"}
    assert out["alpha"].shape == (2, 1, 70, 50)
    assert out["boundary_logits"].shape == (2, 1, 70, 50)
    assert out["alpha"].min() >= 0 and out["alpha"].max() <= 1
    assert torch.isfinite(out["boundary_logits"]).all()


@pytest.mark.parametrize("size", [(33, 31), (64, 96)])
def test_training_mode_works_at_batch_one(size):
    # the ASPP image-pooling branch has no BatchNorm, which would fail on a (1, C, 1, 1) map
    # in training; (33, 31) pads to 64x32, a 2x1 map at stride 32
    model = build_network("unet_r18x0.25").train()
    out = model(torch.rand(1, 3, *size))
    assert out["alpha"].shape == (1, 1, *size)


def test_tiny_inputs_work_in_eval_mode():
    model = build_network("unet_r18x0.25").eval()
    with torch.inference_mode():
        assert model(torch.rand(1, 3, 1, 1))["alpha"].shape == (1, 1, 1, 1)
        assert model(torch.rand(2, 3, 5, 40))["alpha"].shape == (2, 1, 5, 40)


@pytest.mark.parametrize(
    ("depth", "expansion"), [(18, 1), (34, 1), (50, 4), (101, 4)]
)
def test_backbone_feature_strides_and_widths(depth, expansion):
    backbone = ResNetBackbone(depth=depth, width=0.25).eval()
    assert backbone.feature_strides == (2, 4, 8, 16, 32)
    assert backbone.feature_channels == (16, 16 * expansion, 32 * expansion, 64 * expansion, 128 * expansion)
    with torch.inference_mode():
        feats = backbone(torch.rand(1, 3, 64, 96))
    assert len(feats) == 5
    for f, stride, channels in zip(feats, backbone.feature_strides, backbone.feature_channels):
        assert f.shape == (1, channels, 64 // stride, 96 // stride)


def test_stem_has_no_max_pool():
    backbone = ResNetBackbone(depth=18)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in backbone.modules())


def test_block_counts_match_resnet_depths():
    for depth, expected in {18: 8, 34: 16, 50: 16, 101: 33}.items():
        backbone = ResNetBackbone(depth=depth, width=0.125)
        blocks = sum(len(layer) for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4))
        assert blocks == expected, depth


def _count_on_meta(name: str, **overrides) -> int:
    """Parameter count without allocating or initialising weights (fast for R101)."""
    with torch.device("meta"):
        return count_parameters(build_network(name, **overrides))


def test_encoders_match_torchvision_resnet_sizes():
    # torchvision's resnet18/50/101 minus their fc layers (512*1000+1000, 2048*1000+1000);
    # R18 adds the 1x1 projection shortcut (64*64 + BN 2*64) of its strided layer1
    with torch.device("meta"):
        assert count_parameters(ResNetBackbone(18)) == 11_689_512 - 513_000 + 64 * 64 + 2 * 64
        assert count_parameters(ResNetBackbone(50)) == 25_557_032 - 2_049_000
        assert count_parameters(ResNetBackbone(101)) == 44_549_160 - 2_049_000


def test_width_multiplier_scales_parameters_quadratically():
    full = _count_on_meta("unet_r18")
    half = _count_on_meta("unet_r18x0.5")
    assert 3.6 < full / half < 4.4
    assert 3.6 < _count_on_meta("unet_r50") / _count_on_meta("unet_r50", width=0.5) < 4.4


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMETERS))
def test_parameter_counts(name):
    assert _count_on_meta(name) == EXPECTED_PARAMETERS[name]


def test_factory_lists_valid_names_on_unknown_name():
    with pytest.raises(ValueError, match="unknown network 'unet_r19'") as info:
        build_network("unet_r19")
    for name in NETWORKS:
        assert name in str(info.value)


def test_factory_rejects_unknown_option_and_bad_values():
    with pytest.raises(ValueError, match="unknown network option"):
        build_network("unet_r18", widht=0.5)
    with pytest.raises(ValueError, match="depth"):
        build_network("unet_r18", depth=19)
    with pytest.raises(ValueError, match="pad_multiple"):
        build_network("unet_r18x0.25", pad_multiple=48)
    with pytest.raises(ValueError, match="decoder_channels"):
        build_network("unet_r18x0.25", decoder_channels=[16, 8])
    with pytest.raises(ValueError, match="width"):
        build_network("unet_r18", width=0)


def test_spec_is_plain_and_rebuilds_the_same_network():
    spec = network_spec("unet_r18x0.5", width=0.25, aspp_rates=(2, 4))
    assert json.loads(json.dumps(spec)) == spec
    assert spec["name"] == "unet_r18x0.5" and spec["width"] == 0.25 and spec["aspp_rates"] == [2, 4]
    assert network_spec("unet_r101")["depth"] == 101 and network_spec("unet_r18x0.5")["width"] == 0.5
    model = build_network("unet_r18x0.5", width=0.25, aspp_rates=(2, 4))
    assert model.network_spec == spec
    rebuilt = build_network_from_spec(spec)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    image = torch.rand(1, 3, 40, 36)
    with torch.inference_mode():
        torch.testing.assert_close(model.eval()(image)["alpha"], rebuilt.eval()(image)["alpha"])


def test_padding_is_replicate_at_bottom_right_and_output_is_cropped_back():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).view(1, 2, 5, 3)
    padded = pad_to_multiple(x, 4)
    assert padded.shape == (1, 2, 8, 4)
    torch.testing.assert_close(padded[..., :5, :3], x)
    torch.testing.assert_close(padded[..., 5:, :3], x[..., 4:5, :].expand(1, 2, 3, 3))
    assert pad_to_multiple(torch.rand(1, 1, 32, 64), 32).shape == (1, 1, 32, 64)

    # The network's output at 70x50 is its output on the explicitly padded 96x64 image,
    # cropped at the top-left (normalisation commutes with replicate padding).
    model = build_network("unet_r18x0.25").eval()
    image = torch.rand(1, 3, 70, 50)
    manual = F.pad(image, [0, 14, 0, 26], mode="replicate")
    with torch.inference_mode():
        small = model(image)
        big = model(manual)
    torch.testing.assert_close(small["alpha"], big["alpha"][..., :70, :50])
    torch.testing.assert_close(small["boundary_logits"], big["boundary_logits"][..., :70, :50])


def test_normalisation_is_inside_the_model():
    model = build_network("unet_r18x0.25")
    assert isinstance(model, UNetMatting)
    torch.testing.assert_close(model.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    torch.testing.assert_close(model.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))
    assert "mean" not in model.state_dict()  # constants, not weights


def test_rejects_non_rgb_input():
    model = build_network("unet_r18x0.25")
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.rand(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.rand(3, 32, 32))


def test_gradients_reach_every_parameter():
    model = build_network("unet_r18x0.25").train()
    out = model(torch.rand(2, 3, 48, 40))
    (out["alpha"].mean() + out["boundary_logits"].mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero


def test_eval_is_deterministic_and_batch_independent():
    model = build_network("unet_r18x0.25").eval()
    images = torch.rand(2, 3, 45, 61)
    with torch.inference_mode():
        both = model(images)["alpha"]
        first = model(images[:1])["alpha"]
        again = model(images)["alpha"]
    torch.testing.assert_close(both, again, rtol=0, atol=0)
    torch.testing.assert_close(both[:1], first, rtol=1e-5, atol=1e-6)
