"""MGM: band fusion only inside the band, (2·os1 + os4 + os8)/5, band widths, warm-up, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from matting_core.losses import matte_loss
from matting_core.methods import get_method
from matting_core.methods.mgm import (
    MGMLoss,
    band_mode,
    mgm_guidance,
    progressive_fusion,
    sample_band_widths,
    uncertain_band_per_sample,
    weighted_output_loss,
)
from matting_core.regions import uncertain_band_torch

from . import build_tiny, disc_alpha, make_batch, train_losses


def _disc(h=64, w=48, cy=30.0, cx=24.0, r=15.0, soft=2.0) -> torch.Tensor:
    return torch.from_numpy(disc_alpha(h, w, cy, cx, r, soft))[None, None]


def test_fusion_keeps_the_coarse_alpha_outside_the_bands():
    os8 = _disc()
    g = torch.Generator().manual_seed(0)
    os4 = torch.rand(os8.shape, generator=g)
    os1 = torch.rand(os8.shape, generator=g)
    out = progressive_fusion(os8, os4, os1, 3, 2)
    band4, band1 = out["band_os4"] > 0, out["band_os1"] > 0
    assert torch.equal(band4, uncertain_band_torch(os8, 3))
    assert torch.equal(band1, uncertain_band_torch(out["alpha_fused_os4"], 2))
    assert band4.any() and (~band4).any()
    # stage 1: os4 exactly inside band4, os8 exactly outside
    assert torch.equal(out["alpha_fused_os4"][band4], os4[band4])
    assert torch.equal(out["alpha_fused_os4"][~band4], os8[~band4])
    # stage 2: os1 inside band1, the stage-1 result outside
    assert torch.equal(out["alpha"][band1], os1[band1])
    assert torch.equal(out["alpha"][~band1], out["alpha_fused_os4"][~band1])
    outside = ~(band4 | band1)
    assert torch.equal(out["alpha"][outside], os8[outside])


def test_per_sample_band_widths():
    alpha = torch.cat([_disc(), _disc()])
    bands = uncertain_band_per_sample(alpha, [1, 6])
    assert torch.equal(bands[:1], uncertain_band_torch(alpha[:1], 1))
    assert torch.equal(bands[1:], uncertain_band_torch(alpha[1:], 6))
    assert int(bands[1].sum()) > int(bands[0].sum())
    with pytest.raises(ValueError, match="band widths"):
        uncertain_band_per_sample(alpha, [1, 2, 3])


class _FixedAlpha(nn.Module):
    """Stands in for the stride-8 head: a fixed alpha at the padded input size."""

    def __init__(self, alpha: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("alpha", alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha.expand(x.shape[0], -1, -1, -1)


def test_perturbing_the_stride4_head_only_changes_pixels_inside_the_bands():
    model = build_tiny("mgm", test_band_widths=[3, 2]).eval()
    # A disc with hard inside/outside regions as the stride-8 output (padded size 64x64 for 64x48)
    model.head_os8 = _FixedAlpha(_disc(64, 64, 30, 24, 14, 2.0))
    image, mask = torch.rand(2, 3, 64, 48), (_disc(r=14.0) > 0.5).float().expand(2, 1, 64, 48)
    with torch.no_grad():
        before = model(image, mask)
        model.head_os4.out.weight.add_(torch.randn_like(model.head_os4.out.weight))
        model.head_os4.out.bias.add_(0.3)
        after = model(image, mask)
    band4 = before["band_os4"] > 0
    assert torch.equal(band4, after["band_os4"] > 0)  # the band comes from the unchanged os8
    changed4 = before["alpha_fused_os4"] != after["alpha_fused_os4"]
    assert changed4.any()  # the perturbation is visible inside the band
    assert not (changed4 & ~band4).any()  # and nowhere else
    bands = band4 | (before["band_os1"] > 0) | (after["band_os1"] > 0)
    changed = before["alpha"] != after["alpha"]
    assert changed.any() and not (changed & ~bands).any()
    assert (~bands).any()


def test_forward_uses_the_given_band_widths():
    model = build_tiny("mgm").eval()
    image, mask = torch.rand(2, 3, 40, 40), torch.rand(2, 1, 40, 40).round()
    with torch.no_grad():
        out = model(image, mask, band_widths=([0, 4], [1, 1]))
    expected = torch.cat([uncertain_band_torch(out["alpha_os8"][:1], 0), uncertain_band_torch(out["alpha_os8"][1:], 4)])
    assert torch.equal(out["band_os4"] > 0, expected)
    assert model.test_band_widths == (15, 7)


def test_loss_weighting_two_os1_plus_os4_plus_os8_over_five():
    gt = torch.zeros(1, 1, 16, 16)
    pred = {
        "alpha_os8": torch.full((1, 1, 16, 16), 0.2),
        "alpha_os4": torch.full((1, 1, 16, 16), 0.5),
        "alpha_os1": torch.full((1, 1, 16, 16), 0.9),
    }
    ones = torch.ones_like(gt)
    terms = weighted_output_loss(pred, gt, bands=(ones, ones))
    # constants: L1 is the value, the Laplacian bands of a constant are ~0
    assert float(terms["os8"]) == pytest.approx(0.2, abs=1e-5)
    assert float(terms["os4"]) == pytest.approx(0.5, abs=1e-5)
    assert float(terms["os1"]) == pytest.approx(0.9, abs=1e-5)
    assert float(terms["total"]) == pytest.approx((2 * 0.9 + 0.5 + 0.2) / 5, abs=1e-5)
    assert float(terms["l1"]) == pytest.approx((2 * 0.9 + 0.5 + 0.2) / 5, abs=1e-6)
    torch.testing.assert_close(terms["total"], (2 * terms["os1"] + terms["os4"] + terms["os8"]) / 5)


def test_loss_regions_and_composition_follow_the_bands():
    batch = make_batch("mgm", n=1)
    gt = batch["alpha"]
    g = torch.Generator().manual_seed(0)
    pred = {k: torch.rand(gt.shape, generator=g) for k in ("alpha_os8", "alpha_os4", "alpha_os1")}
    band4 = uncertain_band_torch(gt, 2).float()
    band1 = uncertain_band_torch(gt, 1).float()
    pred.update({"band_os4": band4, "band_os1": band1})
    terms = MGMLoss()(pred, batch)
    assert "composition" in terms
    os4 = torch.where(band4 > 0, pred["alpha_os4"], pred["alpha_os8"])
    os1 = torch.where(band1 > 0, pred["alpha_os1"], os4)
    args = {"image": batch["image"], "fg": batch["fg"], "bg": batch["bg"]}
    expected = {
        "os8": matte_loss(pred["alpha_os8"], gt, **args)["total"],
        "os4": matte_loss(os4, gt, weight=band4, **args)["total"],
        "os1": matte_loss(os1, gt, weight=band1, **args)["total"],
    }
    for key, value in expected.items():
        torch.testing.assert_close(terms[key], value)
    torch.testing.assert_close(terms["total"], (2 * expected["os1"] + expected["os4"] + expected["os8"]) / 5)
    no_fb = MGMLoss()(pred, {"alpha": gt})
    assert "composition" not in no_fb


def test_band_widths_are_drawn_inclusively_from_an_explicit_generator():
    w4, w1 = sample_band_widths(2000, torch.Generator().manual_seed(0))
    assert min(w4) == 1 and max(w4) == 30 and min(w1) == 1 and max(w1) == 15
    again = sample_band_widths(2000, torch.Generator().manual_seed(0))
    assert (w4, w1) == again


def test_warmup_band_mode():
    g = torch.Generator().manual_seed(0)
    assert band_mode(0, 1000, 0.05, g) == "gt" and band_mode(49, 1000, 0.05, g) == "gt"
    assert band_mode(150, 1000, 0.05, g) == "pred"
    window = {band_mode(100, 1000, 0.05, g) for _ in range(50)}
    assert window == {"gt", "pred"}
    assert band_mode(0, 1000, 0.0, g) == "pred"


def test_guidance_masks():
    alpha = disc_alpha(64, 48, 30, 24, 14, 4.0)
    train = mgm_guidance(alpha, np.random.default_rng(0), train=True)
    assert train.shape == (1, 64, 48) and set(np.unique(train)) <= {0.0, 1.0}
    np.testing.assert_array_equal(mgm_guidance(alpha, train=False)[0], (alpha >= 0.5).astype(np.float32))
    masks = [mgm_guidance(alpha, np.random.default_rng(s)) for s in range(6)]
    assert any(not np.array_equal(masks[0], m) for m in masks[1:])  # random per seed


def test_a_few_steps_lower_the_loss():
    model = build_tiny("mgm")
    loss = get_method("mgm").make_loss(model)
    totals = train_losses("mgm", model, loss, make_batch("mgm"), steps=6)
    assert totals[-1] < totals[0]


def test_train_step_after_warmup_uses_predicted_bands():
    method = get_method("mgm")
    model = build_tiny("mgm")
    loss = method.make_loss(model, warmup_fraction=0.1)
    optimizer = torch.optim.Adam(method.optimizer_parameters(model, loss), lr=1e-3)
    terms = method.train_step(model, loss, make_batch("mgm"), optimizer, torch.Generator().manual_seed(0),
                              step=90, total_steps=100)
    assert {"os8", "os4", "os1", "l1", "composition", "laplacian", "total"} <= set(terms)
    assert all(torch.isfinite(v) for v in terms.values())
