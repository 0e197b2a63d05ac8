"""MAM: prompts, prompt → mask (box / point), mask → matte shapes, frozen segmenter, SAM errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from matting_core.methods import get_method
from matting_core.methods.mam import (
    MaskToMatte,
    OwnSegmenter,
    SamSegmenter,
    Segmenter,
    SegmenterUnavailable,
    box_prompt,
    point_prompt,
    prompt_from_alpha,
    prompt_region,
    restrict_to_prompt,
    scale_prompt,
)
from matting_core.models import build_network

from . import build_tiny, disc_alpha, make_batch, train_losses


def _prompts(*prompts):
    return torch.from_numpy(np.stack(prompts))


def test_box_restriction_zeroes_the_mask_outside_the_box():
    mask = torch.ones(2, 1, 20, 30)
    prompt = _prompts(box_prompt(5, 2, 12, 9), box_prompt(0, 0, 29, 19))
    out = restrict_to_prompt(mask, prompt)
    inside = torch.zeros(20, 30, dtype=torch.bool)
    inside[2:10, 5:13] = True  # inclusive pixel indices
    assert torch.equal(out[0, 0] > 0, inside)
    assert torch.equal(out[1], mask[1])
    assert torch.equal(prompt_region(prompt, mask)[0, 0], inside)


def test_point_keeps_the_connected_component_or_the_nearest_one():
    mask = torch.zeros(1, 1, 20, 30)
    mask[..., 2:6, 2:6] = 1  # component A
    mask[..., 10:15, 20:28] = 1  # component B
    on_b = restrict_to_prompt(mask, _prompts(point_prompt(22, 12)))
    assert float(on_b[..., 10:15, 20:28].min()) == 1 and float(on_b.sum()) == 40
    near_a = restrict_to_prompt(mask, _prompts(point_prompt(8, 3)))  # on background, closest to A
    assert float(near_a[..., 2:6, 2:6].min()) == 1 and float(near_a.sum()) == 16
    empty = restrict_to_prompt(torch.zeros(1, 1, 5, 5), _prompts(point_prompt(2, 2)))
    assert float(empty.sum()) == 0


def test_prompts_from_alpha():
    alpha = np.zeros((40, 50), np.float32)
    alpha[10:20, 15:35] = 1.0
    evaluation = prompt_from_alpha(alpha, train=False)
    # bbox x 15..34, y 10..19 grown by 5 % of its side (1 px, 0.5 px), rounded outwards
    assert evaluation[0] == 0 and tuple(evaluation[1:]) == (14.0, 9.0, 35.0, 20.0)
    np.testing.assert_array_equal(prompt_from_alpha(alpha, train=False), evaluation)
    kinds, boxes = set(), []
    for seed in range(40):
        p = prompt_from_alpha(alpha, np.random.default_rng(seed))
        kinds.add(int(p[0]))
        if p[0] == 1:
            assert alpha[int(p[2]), int(p[1])] == 1.0  # points land on the person
        else:
            assert 0 <= p[1] <= p[3] <= 49 and 0 <= p[2] <= p[4] <= 39
            boxes.append(p[1:])
    assert kinds == {0, 1}
    assert np.ptp(np.array(boxes), axis=0).max() > 0  # noisy boxes
    empty = prompt_from_alpha(np.zeros((8, 9), np.float32), np.random.default_rng(0))
    assert tuple(empty) == (0, 0, 0, 8, 7)
    with pytest.raises(ValueError, match="rng"):
        prompt_from_alpha(alpha, None, train=True)


def test_scale_prompt_maps_pixel_centres():
    p = scale_prompt(box_prompt(0, 0, 9, 19), 2.0, 0.5)
    np.testing.assert_allclose(p, [0, 0.5, -0.25, 18.5, 9.25])  # (x + 0.5)·s − 0.5
    with pytest.raises(ValueError):
        box_prompt(5, 0, 1, 1)


def test_prompt_to_mask_to_matte_shapes():
    model = build_tiny("mam").eval()
    assert isinstance(model.segmenter, Segmenter)
    image = torch.rand(2, 3, 50, 38)
    prompt = _prompts(box_prompt(4, 4, 20, 30), point_prompt(10, 10))
    with torch.no_grad():
        mask, features = model.segment(image, prompt)
        out = model(image, prompt)
    assert mask.shape == (2, 1, 50, 38)
    assert features.shape[:2] == (2, model.segmenter.feature_channels)
    assert float(mask[0, :, :4].sum()) == 0 and float(mask[0, :, 31:].sum()) == 0  # outside the box
    assert torch.equal(out["mask"], mask)
    for key in ("alpha", "alpha_os8", "alpha_os4", "alpha_os1", "band_os4", "band_os1"):
        assert out[key].shape == (2, 1, 50, 38), key
    assert 0 <= float(out["alpha"].min()) and float(out["alpha"].max()) <= 1


def test_mask_to_matte_takes_features_of_any_size():
    m2m = MaskToMatte(256, width=0.125).eval()
    image, mask = torch.rand(1, 3, 70, 45), torch.ones(1, 1, 70, 45)
    with torch.no_grad():
        for size in ((64, 64), (5, 3)):  # a SAM-like embedding, a tiny one
            out = m2m(image, mask, torch.rand(1, 256, *size))
            assert out["alpha"].shape == (1, 1, 70, 45)
    with pytest.raises(ValueError, match="features"):
        m2m(image, mask, torch.rand(1, 12, 4, 4))


def test_own_segmenter_reads_the_network_features_and_stays_frozen():
    network = build_network("unet_r18x0.25")
    segmenter = OwnSegmenter(network)
    assert all(not p.requires_grad for p in network.parameters())
    segmenter.train()
    assert not segmenter.training and not network.training
    image = torch.rand(1, 3, 64, 64)
    mask, features = segmenter.segment(image, _prompts(box_prompt(0, 0, 63, 63)))
    assert features.shape == (1, segmenter.feature_channels, 4, 4)  # dec16: stride 16
    with torch.no_grad():
        expected = (network(image)["alpha"] >= 0.5).float()
    torch.testing.assert_close(mask, expected)
    with pytest.raises(ValueError, match="submodule"):
        OwnSegmenter(network, feature_module="nope")


def test_training_updates_only_the_mask_to_matte_module():
    method = get_method("mam")
    model = build_tiny("mam")
    loss = method.make_loss(model)
    names = {id(p) for p in method.optimizer_parameters(model, loss)}
    assert names == {id(p) for p in model.m2m.parameters()}
    segmenter_before = {k: v.clone() for k, v in model.segmenter.state_dict().items()}
    m2m_before = {k: v.clone() for k, v in model.m2m.state_dict().items()}
    totals = train_losses("mam", model, loss, make_batch("mam"), steps=5, lr=1e-2)
    assert totals[-1] < totals[0]
    assert all(torch.equal(v, model.segmenter.state_dict()[k]) for k, v in segmenter_before.items())
    assert any(not torch.equal(v, model.m2m.state_dict()[k]) for k, v in m2m_before.items())


def test_sam_segmenter_errors_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(SegmenterUnavailable, match=r"pip install '\.\[sam\]'"):
        SamSegmenter(None)
    with pytest.raises(SegmenterUnavailable, match="is not a file"):
        SamSegmenter(tmp_path / "missing.pth")
    checkpoint = tmp_path / "sam.pth"
    checkpoint.write_bytes(b"not really")
    monkeypatch.setitem(sys.modules, "segment_anything", None)  # not importable
    with pytest.raises(SegmenterUnavailable, match=r"cannot import segment_anything.*pip install '\.\[sam\]'"):
        SamSegmenter(checkpoint)
    method = get_method("mam")
    spec = method.method_spec("unet_r18x0.25", segmenter="sam", sam_checkpoint=str(checkpoint))
    with pytest.raises(SegmenterUnavailable, match="checkpoint path"):
        method.build(spec)


def test_guidance_prompt_from_the_registry():
    alpha = disc_alpha(40, 30, 20, 15, 8)
    p = get_method("mam").make_guidance(alpha, np.random.default_rng(0), train=True)
    assert p.shape == (5,) and p.dtype == np.float32
