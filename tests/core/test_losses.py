"""matting_core.losses: golden values, region weights, dict contract, gradients, a tiny fit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from matting_core.losses import (
    LOSSES,
    boundary_bce,
    boundary_target,
    composition_l1,
    get_loss,
    l1_loss,
    laplacian_l1,
    laplacian_pyramid,
    matte_loss,
    mse_loss,
    student_loss,
    teacher_loss,
    weighted_mean,
)


def _map(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, 1, *torch.tensor(values).shape)


PRED = _map([[0.0, 0.5], [1.0, 0.25]])
GT = _map([[0.0, 1.0], [0.5, 0.25]])


def test_l1_golden_value():
    assert l1_loss(PRED, GT).item() == pytest.approx(0.25)  # (0 + .5 + .5 + 0) / 4


def test_region_weight_selects_pixels():
    assert l1_loss(PRED, GT, weight=_map([[1.0, 0.0], [0.0, 1.0]])).item() == 0.0
    assert l1_loss(PRED, GT, weight=_map([[0.0, 1.0], [0.0, 0.0]])).item() == pytest.approx(0.5)
    # soft weights: (0.5*0.5 + 1*0.5) / 1.5
    assert l1_loss(PRED, GT, weight=_map([[0.0, 0.5], [1.0, 0.0]])).item() == pytest.approx(0.5)
    # changing a prediction outside the region changes nothing
    weight = _map([[0.0, 1.0], [1.0, 0.0]])
    other = PRED.clone()
    other[..., 0, 0] = 0.9
    assert l1_loss(other, GT, weight).item() == l1_loss(PRED, GT, weight).item()


def test_empty_region_gives_zero_without_nan():
    pred = torch.rand(2, 1, 9, 7, requires_grad=True)
    gt = torch.rand(2, 1, 9, 7)
    zero = torch.zeros_like(gt)
    image, fg, bg = torch.rand(2, 3, 9, 7), torch.rand(2, 3, 9, 7), torch.rand(2, 3, 9, 7)
    logits = torch.randn(2, 1, 9, 7, requires_grad=True)
    terms = teacher_loss({"alpha": pred, "boundary_logits": logits}, gt, image=image, fg=fg, bg=bg, weight=zero)
    for name, value in terms.items():
        assert value.item() == 0.0, name
    terms["total"].backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() == 0
    assert mse_loss(pred, gt, zero)["total"].item() == 0.0


def test_weighted_mean_counts_channels():
    values = torch.ones(1, 3, 2, 2)
    values[:, :, 0, 0] = 4.0
    weight = torch.zeros(1, 1, 2, 2)
    weight[..., 0, :] = 1.0
    assert weighted_mean(values, weight).item() == pytest.approx((4 + 1) / 2)
    assert weighted_mean(values).item() == pytest.approx((4 + 3) / 4)


def test_composition_golden_values():
    alpha_gt = torch.rand(1, 1, 6, 5)
    alpha_pred = torch.rand(1, 1, 6, 5)
    fg = torch.full((1, 3, 6, 5), 0.8)
    bg = torch.full((1, 3, 6, 5), 0.2)
    image = alpha_gt * fg + (1 - alpha_gt) * bg
    # |(a_p - a_g)(F - B)| = 0.6 |a_p - a_g|
    expected = 0.6 * (alpha_pred - alpha_gt).abs().mean()
    assert composition_l1(alpha_pred, image, fg, bg).item() == pytest.approx(expected.item(), rel=1e-5)
    assert composition_l1(alpha_gt, image, fg, bg).item() == pytest.approx(0.0, abs=1e-7)


def test_matte_loss_terms_and_total():
    pred, gt = torch.rand(2, 1, 16, 12), torch.rand(2, 1, 16, 12)
    fg, bg = torch.rand(2, 3, 16, 12), torch.rand(2, 3, 16, 12)
    without = matte_loss(pred, gt)
    assert set(without) == {"l1", "laplacian", "total"}
    with_comp = matte_loss(pred, gt, fg=fg, bg=bg)
    assert set(with_comp) == {"l1", "composition", "laplacian", "total"}
    torch.testing.assert_close(
        with_comp["total"], with_comp["l1"] + with_comp["composition"] + with_comp["laplacian"]
    )
    # the image defaults to the ground-truth composite
    image = gt * fg + (1 - gt) * bg
    torch.testing.assert_close(matte_loss(pred, gt, image=image, fg=fg, bg=bg)["composition"], with_comp["composition"])
    with pytest.raises(ValueError, match="both fg and bg"):
        matte_loss(pred, gt, fg=fg)


def test_laplacian_zero_for_identical_inputs_and_constant_offsets():
    gt = torch.rand(2, 1, 37, 29)
    assert laplacian_l1(gt, gt).item() == 0.0
    # band-pass levels ignore a constant offset, at every size (borders included)
    for size in [(37, 29), (32, 32), (8, 8), (3, 1)]:
        base = torch.rand(1, 1, *size)
        assert laplacian_l1(base + 0.3, base).item() == pytest.approx(0.0, abs=1e-5), size
    assert laplacian_l1(torch.rand(2, 1, 37, 29), gt).item() > 0.1


def test_laplacian_pyramid_shapes_and_weights():
    bands = laplacian_pyramid(torch.rand(1, 1, 37, 29))
    assert [tuple(b.shape[-2:]) for b in bands] == [(37, 29), (19, 15), (10, 8), (5, 4), (3, 2)]
    # a difference only in level 0's band: loss is level-0 mean |band| (weight 2^0) plus
    # whatever leaks into coarser bands; check the documented 2^i level weights directly
    diff = torch.rand(1, 1, 32, 32)
    expected = sum((2.0**i) * band.abs().mean() for i, band in enumerate(laplacian_pyramid(diff)))
    assert laplacian_l1(diff, torch.zeros_like(diff)).item() == pytest.approx(expected.item(), rel=1e-6)
    # tiny inputs work
    assert torch.isfinite(laplacian_l1(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4)))


def test_laplacian_region_weight_is_subsampled_with_the_pyramid():
    pred, gt = torch.rand(1, 1, 40, 36), torch.rand(1, 1, 40, 36)
    weight = (torch.rand(1, 1, 40, 36) > 0.5).float()
    bands = laplacian_pyramid(pred - gt)
    expected = sum(
        (2.0**i) * ((band.abs() * weight[..., :: 2**i, :: 2**i]).sum() / weight[..., :: 2**i, :: 2**i].sum())
        for i, band in enumerate(bands)
    )
    assert laplacian_l1(pred, gt, weight).item() == pytest.approx(expected.item(), rel=1e-5)
    # the fine band is local: a change outside a region (and outside the blur's reach of it)
    # leaves level 0 untouched
    region = torch.zeros_like(gt)
    region[..., :, :8] = 1.0
    changed = pred.clone()
    changed[..., :, 20:] = torch.rand(1, 1, 40, 16)
    before = laplacian_pyramid(pred - gt)[0]
    after = laplacian_pyramid(changed - gt)[0]
    assert weighted_mean((after - before).abs(), region).item() == 0.0


def test_boundary_bce_matches_the_formula():
    logits = torch.randn(2, 1, 5, 4)
    target = (torch.rand(2, 1, 5, 4) > 0.5).float()
    p = torch.sigmoid(logits.double())
    expected = -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
    assert boundary_bce(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)
    assert boundary_bce(logits, target).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, target).item(), rel=1e-6
    )
    weight = torch.zeros_like(target)
    weight[0, 0, 0, 0] = 1.0
    x, y = logits[0, 0, 0, 0].item(), target[0, 0, 0, 0].item()
    single = -(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x))))
    assert boundary_bce(logits, target, weight).item() == pytest.approx(single, rel=1e-5)


def test_boundary_target_thresholds_are_strict():
    alpha = torch.tensor([0.0, 0.05, 0.06, 0.5, 0.94, 0.95, 1.0]).view(1, 1, 1, 7)
    assert boundary_target(alpha).flatten().tolist() == [0, 0, 1, 1, 1, 0, 0]


def test_teacher_loss_adds_lambda_times_bce():
    pred = {"alpha": torch.rand(2, 1, 12, 10), "boundary_logits": torch.randn(2, 1, 12, 10)}
    gt = torch.rand(2, 1, 12, 10)
    terms = teacher_loss(pred, gt, lambda_boundary=0.01)
    assert {"l1", "laplacian", "matte", "boundary_bce", "total"} <= set(terms)
    torch.testing.assert_close(terms["matte"], terms["l1"] + terms["laplacian"])
    torch.testing.assert_close(terms["total"], terms["matte"] + 0.01 * terms["boundary_bce"])
    # default boundary label = 1[0.05 < gt < 0.95]
    torch.testing.assert_close(
        terms["boundary_bce"], boundary_bce(pred["boundary_logits"], ((gt > 0.05) & (gt < 0.95)).float())
    )
    heavy = teacher_loss(pred, gt, lambda_boundary=1.0)
    torch.testing.assert_close(heavy["total"], heavy["matte"] + heavy["boundary_bce"])


def test_student_loss_targets_blended_label_and_its_band():
    logits = torch.randn(1, 1, 8, 8, requires_grad=True)
    alpha = torch.rand(1, 1, 8, 8, requires_grad=True)
    blended = torch.rand(1, 1, 8, 8, requires_grad=True)
    terms = student_loss({"alpha": alpha, "boundary_logits": logits}, blended, lambda_boundary=0.1)
    expected_matte = l1_loss(alpha, blended) + laplacian_l1(alpha, blended)
    torch.testing.assert_close(terms["matte"], expected_matte)
    band = ((blended > 0.05) & (blended < 0.95)).float()
    torch.testing.assert_close(terms["total"], expected_matte + 0.1 * boundary_bce(logits, band))
    terms["total"].backward()
    assert blended.grad is None  # the label is a constant target
    assert alpha.grad is not None and logits.grad is not None


def test_mse_loss_golden_and_dict():
    terms = mse_loss({"alpha": PRED}, GT)
    assert set(terms) == {"mse", "total"}
    assert terms["total"].item() == pytest.approx((0 + 0.25 + 0.25 + 0) / 4)


def test_shape_errors_and_factory():
    with pytest.raises(ValueError, match="gt_alpha"):
        l1_loss(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 5))
    with pytest.raises(ValueError, match="pred_alpha"):
        l1_loss(torch.rand(1, 4, 4), torch.rand(1, 4, 4))
    assert get_loss("teacher") is teacher_loss and set(LOSSES) == {"mse", "matte", "teacher", "student"}
    with pytest.raises(ValueError, match="valid names: mse, matte, teacher, student"):
        get_loss("bce")


def test_gradients_flow_through_every_term():
    alpha = torch.rand(1, 1, 20, 20, requires_grad=True)
    logits = torch.randn(1, 1, 20, 20, requires_grad=True)
    gt = torch.rand(1, 1, 20, 20)
    fg, bg = torch.rand(1, 3, 20, 20), torch.rand(1, 3, 20, 20)
    terms = teacher_loss({"alpha": alpha, "boundary_logits": logits}, gt, fg=fg, bg=bg)
    for name in ("l1", "composition", "laplacian", "boundary_bce"):
        (grad,) = torch.autograd.grad(terms[name], alpha if name != "boundary_bce" else logits, retain_graph=True)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_a_few_steps_on_one_batch_reduce_the_teacher_loss():
    from matting_core.models import build_network

    torch.manual_seed(0)
    model = build_network("unet_r18x0.25").train()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    image = torch.rand(2, 3, 32, 32)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    gt = torch.sigmoid((0.5 - (xx**2 + yy**2)) * 8).expand(2, 1, 32, 32).contiguous()
    losses = []
    for _ in range(8):
        terms = teacher_loss(model(image), gt)
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
        losses.append(terms["total"].item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert min(losses[1:]) < losses[0]


def test_matte_loss_kinds():
    assert set(matte_loss(PRED, GT, kind="mse")) == {"mse", "total"}
    assert matte_loss(PRED, GT, kind="mse")["total"].item() == pytest.approx(0.125)
    l1 = matte_loss(PRED, GT, kind="l1")
    assert set(l1) == {"l1", "total"} and l1["total"].item() == pytest.approx(0.25)
    assert set(matte_loss(PRED, GT)) == {"l1", "laplacian", "total"}  # conventional, no F/B
    with pytest.raises(ValueError, match="valid: conventional, l1, mse"):
        matte_loss(PRED, GT, kind="huber")


def test_teacher_and_student_loss_take_the_matte_kind():
    pred = {"alpha": PRED, "boundary_logits": torch.zeros_like(PRED)}
    terms = teacher_loss(pred, GT, lambda_boundary=0.1, matte="mse")
    assert terms["matte"].item() == pytest.approx(0.125) and "laplacian" not in terms
    torch.testing.assert_close(terms["total"], terms["matte"] + 0.1 * terms["boundary_bce"])
    student = student_loss(pred, GT, 0.1, matte="l1")
    assert student["matte"].item() == pytest.approx(0.25)


def test_boundary_bce_positive_weight():
    logits = torch.tensor([[[[0.3, -1.2], [2.0, 0.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    pos = -F.logsigmoid(logits) * target
    neg = -F.logsigmoid(-logits) * (1 - target)
    expected = (5.0 * pos + neg).mean()
    assert boundary_bce(logits, target, pos_weight=5.0).item() == pytest.approx(expected.item(), rel=1e-5)
    assert boundary_bce(logits, target, pos_weight=1.0).item() == pytest.approx((pos + neg).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="pos_weight"):
        boundary_bce(logits, target, pos_weight=0.0)
    # the weight reaches the teacher loss: more weight, larger loss on a missed boundary
    pred = {"alpha": PRED, "boundary_logits": torch.full_like(PRED, -3.0)}
    band = _map([[0.0, 0.5], [0.5, 0.25]])
    light = teacher_loss(pred, band, pos_weight=1.0)["boundary_bce"]
    heavy = teacher_loss(pred, band, pos_weight=5.0)["boundary_bce"]
    assert heavy.item() > 3 * light.item()
