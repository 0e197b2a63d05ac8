"""matting_core.models.pretrained: ImageNet ResNet files (torchvision layout) into the project backbone.

The files are built here with torchvision's key names and shapes written out independently
of the module under test (``torchvision_resnet_state``), filled with random tensors, saved
with ``torch.save`` and read back. No download, no mock.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from matting_core.methods import get_method
from matting_core.models import ResNetBackbone, build_network
from matting_core.models.pretrained import (
    BackboneLoadReport,
    find_backbone,
    load_backbone_weights,
    read_state_dict,
    torchvision_key_map,
)

R18 = (False, (2, 2, 2, 2))
R50 = (True, (3, 4, 6, 3))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def torchvision_resnet_state(bottleneck: bool, counts: tuple[int, ...], seed: int = 0) -> dict[str, torch.Tensor]:
    """torchvision.models.resnet's state dict layout (ImageNet, 1000 classes), random values.

    Written from torchvision's ResNet: conv1 7x7/2 3→64, bn1, maxpool, layer1..4 with planes
    64/128/256/512 (stride 1, 2, 2, 2), BasicBlock conv1 3x3 (strided) / conv2 3x3 or
    Bottleneck conv1 1x1 / conv2 3x3 (strided) / conv3 1x1 (×4), a ``downsample`` (1x1 conv,
    BN) on a block's first unit when the stride is not 1 or the channels change, then fc.
    """
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def conv(name: str, out_ch: int, in_ch: int, k: int) -> None:
        state[f"{name}.weight"] = torch.randn(out_ch, in_ch, k, k, generator=gen) * 0.05

    def bn(name: str, ch: int) -> None:
        state[f"{name}.weight"] = torch.rand(ch, generator=gen) + 0.5
        state[f"{name}.bias"] = torch.randn(ch, generator=gen) * 0.1
        state[f"{name}.running_mean"] = torch.randn(ch, generator=gen) * 0.1
        state[f"{name}.running_var"] = torch.rand(ch, generator=gen) + 0.5
        state[f"{name}.num_batches_tracked"] = torch.tensor(int(torch.randint(1, 10**6, (1,), generator=gen)))

    expansion = 4 if bottleneck else 1
    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    inplanes = 64
    for n, (planes, blocks) in enumerate(zip((64, 128, 256, 512), counts), start=1):
        stride = 1 if n == 1 else 2
        for i in range(blocks):
            p = f"layer{n}.{i}"
            if bottleneck:
                conv(f"{p}.conv1", planes, inplanes, 1)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3)
                bn(f"{p}.bn2", planes)
                conv(f"{p}.conv3", planes * 4, planes, 1)
                bn(f"{p}.bn3", planes * 4)
            else:
                conv(f"{p}.conv1", planes, inplanes, 3)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3)
                bn(f"{p}.bn2", planes)
            if i == 0 and (stride != 1 or inplanes != planes * expansion):
                conv(f"{p}.downsample.0", planes * expansion, inplanes, 1)
                bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    state["fc.weight"] = torch.randn(1000, 512 * expansion, generator=gen) * 0.01
    state["fc.bias"] = torch.zeros(1000)
    return state


def project_tensor(backbone: ResNetBackbone, tv_key: str) -> torch.Tensor:
    """The project tensor that holds torchvision's ``tv_key`` (written out here, not the module's map)."""
    module_path, attr = tv_key.rsplit(".", 1)
    if module_path == "conv1":
        module = backbone.stem[0]
    elif module_path == "bn1":
        module = backbone.stem[1]
    else:  # layerN.i.convK / bnK / downsample.j: same module tree in the project
        module = backbone.get_submodule(module_path)
    return getattr(module, attr)


@pytest.fixture(scope="module")
def r18_state():
    return torchvision_resnet_state(*R18)


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory, r18_state):
    path = tmp_path_factory.mktemp("tv") / "resnet18.pth"
    torch.save(r18_state, path)
    return path


@pytest.fixture(scope="module")
def r50_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tv") / "resnet50.pth"
    torch.save(torchvision_resnet_state(*R50, seed=1), path)
    return path


def _forward_ok(model: nn.Module, size: int = 64) -> None:
    out = model.eval()(torch.rand(1, 3, size, size - 16))
    assert out["alpha"].shape == (1, 1, size, size - 16)
    assert torch.isfinite(out["alpha"]).all() and torch.isfinite(out["boundary_logits"]).all()


# ----------------------------------------------------------------------------- the file layout itself


def test_the_test_file_has_torchvision_names_and_shapes(r18_state):
    expected = {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_mean": (64,),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer4.1.bn2.weight": (512,),
        "fc.weight": (1000, 512),
    }
    for key, shape in expected.items():
        assert tuple(r18_state[key].shape) == shape, key
    assert "layer1.0.downsample.0.weight" not in r18_state  # torchvision's R18 layer1 is not strided
    assert len(r18_state) == 122  # 120 backbone entries + fc.weight + fc.bias


def test_key_map_names_torchvision_keys(r18_state):
    mapping = torchvision_key_map(ResNetBackbone(depth=18))
    assert mapping["stem.0.weight"] == "conv1.weight"
    assert mapping["stem.1.running_mean"] == "bn1.running_mean"
    assert mapping["stem.1.num_batches_tracked"] == "bn1.num_batches_tracked"
    assert mapping["layer1.0.conv1.weight"] == "layer1.0.conv1.weight"
    assert mapping["layer2.0.downsample.0.weight"] == "layer2.0.downsample.0.weight"
    assert mapping["layer4.1.bn2.weight"] == "layer4.1.bn2.weight"
    assert not any(k.startswith("layer1.0.downsample.") for k in mapping)  # no torchvision counterpart
    # every torchvision backbone key is the image of exactly one project key
    assert sorted(mapping.values()) == sorted(k for k in r18_state if not k.startswith("fc."))
    # Bottleneck: layer1.0 has a projection shortcut in torchvision too; names do not depend on width
    r50 = torchvision_key_map(ResNetBackbone(depth=50, width=0.125))
    assert r50["layer1.0.downsample.0.weight"] == "layer1.0.downsample.0.weight"
    assert r50["layer3.5.conv3.weight"] == "layer3.5.conv3.weight"
    assert len(r50) == len(ResNetBackbone(depth=50, width=0.125).state_dict())


# ----------------------------------------------------------------------------- loading


def test_r18_file_loads_into_unet_r18(r18_file, r18_state):
    torch.manual_seed(0)
    model = build_network("unet_r18")
    backbone = model.encoder
    shortcut_before = {k: v.clone() for k, v in backbone.layer1[0].downsample.state_dict().items()}

    report = load_backbone_weights(model, r18_file)

    assert isinstance(report, BackboneLoadReport)
    assert report.path == str(r18_file)
    assert report.shape_mismatch == []
    assert sorted(report.unused) == ["fc.bias", "fc.weight"]
    # exactly the documented stem difference: layer1's projection shortcut has no counterpart
    assert sorted(report.missing) == sorted(
        f"layer1.0.downsample.{k}"
        for k in ("0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked")
    )
    assert len(report.loaded) == 120 and len(backbone.state_dict()) == 126
    assert report.no_counterpart == report.missing
    for key, value in r18_state.items():
        if not key.startswith("fc."):
            assert torch.equal(project_tensor(backbone, key), value), key
    for k, v in backbone.layer1[0].downsample.state_dict().items():
        assert torch.equal(v, shortcut_before[k]), k  # kept its initialisation
    summary = report.summary()
    assert summary.startswith(f"loaded 120/126 backbone tensors (encoder.*) from {r18_file}")
    assert "layer1.0.downsample" in summary and "fc.weight" in summary
    _forward_ok(model)


def test_strict_accepts_a_complete_file_and_the_documented_stem_difference(r18_file):
    report = load_backbone_weights(build_network("unet_r18"), r18_file, strict=True)
    assert len(report.loaded) == 120


def test_width_multiplied_network_gets_a_report_not_a_crash(r18_file):
    model = build_network("unet_r18x0.5")
    report = load_backbone_weights(model, r18_file)
    assert ("layer1.0.conv1.weight", (64, 64, 3, 3), (32, 32, 3, 3)) in report.shape_mismatch
    assert ("stem.0.weight", (64, 3, 7, 7), (32, 3, 7, 7)) in report.shape_mismatch
    assert len(report.shape_mismatch) == 100  # every weight and statistic; only step counters match
    assert all(k.endswith("num_batches_tracked") for k in report.loaded)
    summary = report.summary()
    assert "stem.0.weight [64,3,7,7] vs [32,3,7,7]" in summary
    assert "and 95 more" in summary
    assert "widths differ" in summary and "x0.5" in summary
    _forward_ok(model)


def test_strict_failure_names_the_file_and_the_tensors_and_changes_nothing(r18_file):
    model = build_network("unet_r18x0.5")
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    with pytest.raises(ValueError, match="strict") as err:
        load_backbone_weights(model, r18_file, strict=True)
    assert str(r18_file) in str(err.value)
    assert "stem.0.weight [64,3,7,7] vs [32,3,7,7]" in str(err.value)
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_strict_reports_a_tensor_missing_from_the_file(tmp_path, r18_state):
    path = tmp_path / "partial.pth"
    torch.save({k: v for k, v in r18_state.items() if k != "layer4.1.bn2.weight"}, path)
    report = load_backbone_weights(build_network("unet_r18"), path)
    assert "layer4.1.bn2.weight" in report.missing and len(report.loaded) == 119
    assert "layer4.1.bn2.weight" not in report.no_counterpart
    assert "not in the file (kept their initialisation): layer4.1.bn2.weight" in report.summary()
    with pytest.raises(ValueError, match=r"layer4\.1\.bn2\.weight \(not in the file\)"):
        load_backbone_weights(build_network("unet_r18"), path, strict=True)


def test_files_without_batchnorm_counters_still_load_strictly(tmp_path, r18_state):
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in r18_state.items() if not k.endswith("num_batches_tracked")}, path)
    report = load_backbone_weights(build_network("unet_r18"), path, strict=True)
    assert len(report.loaded) == 100
    assert "num_batches_tracked" in report.summary()


def test_r50_file_loads_into_unet_r50_and_is_refused_by_r18(r50_file):
    model = build_network("unet_r50")
    report = load_backbone_weights(model, r50_file, strict=True)
    assert report.missing == [] and report.shape_mismatch == []
    assert len(report.loaded) == len(model.encoder.state_dict())
    assert sorted(report.unused) == ["fc.bias", "fc.weight"]
    state = torch.load(r50_file, weights_only=True)
    for key in ("conv1.weight", "layer1.0.downsample.0.weight", "layer3.5.conv3.weight", "layer4.2.bn3.running_var"):
        assert torch.equal(project_tensor(model.encoder, key), state[key]), key
    _forward_ok(model, size=32)

    r18 = build_network("unet_r18")
    with pytest.raises(ValueError, match="ResNet-50.*ResNet-18") as err:
        load_backbone_weights(r18, r50_file)
    assert str(r50_file) in str(err.value)


def test_method_network_backbone_and_its_guidance_stem(r18_file):
    method = get_method("dim")
    model = method.build(method.method_spec(network="unet_r18"))
    assert find_backbone(model) is model.body.encoder
    report = load_backbone_weights(model, r18_file)
    assert report.shape_mismatch == [("stem.0.weight", (64, 3, 7, 7), (64, 4, 7, 7))]
    assert len(report.loaded) == 119
    assert "input channels" in report.summary() and "(body.encoder.*)" in report.summary()
    with pytest.raises(ValueError, match="strict"):
        load_backbone_weights(model, r18_file, strict=True)


def test_find_backbone_errors_name_the_model():
    with pytest.raises(ValueError, match="Sequential holds no ResNetBackbone"):
        find_backbone(nn.Sequential(nn.Conv2d(3, 3, 1)))
    pair = nn.ModuleDict({"a": ResNetBackbone(18, 0.125), "b": ResNetBackbone(18, 0.125)})
    with pytest.raises(ValueError, match="2 ResNetBackbones"):
        find_backbone(pair)
    backbone = ResNetBackbone(18, 0.125)
    assert find_backbone(backbone) is backbone


# ----------------------------------------------------------------------------- reading files


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}, "epoch": 90},
        lambda s: {"model": s, "step": 3},
        lambda s: {"model": {"state_dict": s}},
    ],
    ids=["state_dict+module", "model", "model+state_dict"],
)
def test_wrapped_files_load(tmp_path, r18_state, wrap):
    path = tmp_path / "wrapped.pth"
    torch.save(wrap(r18_state), path)
    state = read_state_dict(path)
    assert set(state) == set(r18_state)
    model = build_network("unet_r18")
    report = load_backbone_weights(model, path)
    assert len(report.loaded) == 120
    assert torch.equal(model.encoder.stem[0].weight, r18_state["conv1.weight"])
    assert torch.equal(model.encoder.layer4[1].bn2.weight, r18_state["layer4.1.bn2.weight"])


def test_a_backbone_prefix_is_stripped_and_other_keys_reported_by_full_name(tmp_path, r18_state):
    path = tmp_path / "seg.pth"
    payload = {f"backbone.{k}": v for k, v in r18_state.items() if not k.startswith("fc.")}
    payload["decode_head.conv_seg.weight"] = torch.zeros(2, 8, 1, 1)
    torch.save(payload, path)
    report = load_backbone_weights(build_network("unet_r18"), path)
    assert len(report.loaded) == 120
    assert report.unused == ["decode_head.conv_seg.weight"]


def test_two_resnets_in_one_file_are_ambiguous(tmp_path, r18_state):
    path = tmp_path / "moco.pth"
    torch.save({f"{q}.{k}": v for q in ("encoder_q", "encoder_k") for k, v in r18_state.items()}, path)
    with pytest.raises(ValueError, match="2 ResNets.*'encoder_k.', 'encoder_q.'"):
        read_state_dict(path)


def test_pickled_objects_are_refused_naming_the_file(tmp_path, r18_state):
    path = tmp_path / "training.pth"
    torch.save({"state_dict": r18_state, "args": _Namespace()}, path)
    with pytest.raises(ValueError, match="weights_only") as err:
        read_state_dict(path)
    assert str(path) in str(err.value)


class _Namespace:  # a pickled non-tensor object, like a timm training checkpoint's argparse args
    lr = 0.1


def test_missing_and_non_checkpoint_files(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_state_dict(missing)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint") as err:
        read_state_dict(text)
    assert str(text) in str(err.value)
    listing = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        read_state_dict(listing)


def test_a_non_resnet_state_dict_names_the_expected_keys(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(8, 3, 4, 4), "head.bias": torch.zeros(10)}, path)
    with pytest.raises(ValueError, match="no ResNet keys found") as err:
        load_backbone_weights(build_network("unet_r18x0.25"), path)
    message = str(err.value)
    assert str(path) in message
    assert "conv1.weight" in message and "layer1.0.conv1.weight" in message and "patch_embed.proj.weight" in message


def test_a_project_network_file_is_pointed_elsewhere(tmp_path):
    path = tmp_path / "unet.pth"
    torch.save({"state_dict": build_network("unet_r18x0.25").state_dict()}, path)
    with pytest.raises(ValueError, match="own network layout"):
        read_state_dict(path)
