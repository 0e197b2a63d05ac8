"""DIM: refinement residual, unknown-region ε-losses, three-phase schedule and freezing, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from matting_core.methods import get_method
from matting_core.methods.dim import (
    DIM_PHASE_MODULES,
    DIMLoss,
    DIMRefinement,
    dim_guidance,
    dim_phase,
    set_dim_phase,
)
from matting_core.regions import eval_trimap

from . import HEIGHT, WIDTH, build_tiny, disc_alpha, make_batch, train_losses


def test_forward_shapes_ranges_and_odd_sizes():
    model = build_tiny("dim").eval()
    out = model(torch.rand(2, 3, 37, 29), torch.rand(2, 1, 37, 29))
    assert set(out) == {"alpha", "alpha_stage1"}
    for v in out.values():
        assert v.shape == (2, 1, 37, 29)
        assert float(v.detach().min()) >= 0 and float(v.detach().max()) <= 1
    with pytest.raises(ValueError, match="trimap"):
        model(torch.rand(1, 3, 8, 8), torch.rand(1, 1, 8, 9))


def test_refinement_is_stage1_plus_residual_and_zero_last_conv_gives_stage1():
    torch.manual_seed(0)
    model = build_tiny("dim").eval()
    with torch.no_grad():
        model.refinement.conv4.weight.normal_(std=0.05)
        model.refinement.conv4.bias.fill_(0.01)
    image, trimap = torch.rand(2, 3, 40, 36), torch.rand(2, 1, 40, 36)
    with torch.no_grad():
        out = model(image, trimap)
        residual = model.refinement.residual(image, out["alpha_stage1"])
        expected = torch.clamp(out["alpha_stage1"] + residual, 0, 1)
    torch.testing.assert_close(out["alpha"], expected)
    assert float((out["alpha"] - out["alpha_stage1"]).abs().max()) > 1e-3  # the residual does act

    with torch.no_grad():
        model.refinement.conv4.weight.zero_()
        model.refinement.conv4.bias.zero_()
        out = model(image, trimap)
    torch.testing.assert_close(out["alpha"], out["alpha_stage1"], rtol=0, atol=0)


def test_refinement_output_is_clamped():
    refinement = DIMRefinement(8)
    with torch.no_grad():
        refinement.conv4.bias.fill_(5.0)
    out = refinement(torch.rand(1, 3, 8, 8), torch.rand(1, 1, 8, 8))
    assert torch.equal(out, torch.ones_like(out))


def test_phase_schedule():
    assert [dim_phase(s, 8) for s in range(8)] == ["encoder_decoder"] * 4 + ["refinement"] * 2 + ["joint"] * 2
    assert dim_phase(0, 10, (0.0, 0.0)) == "joint"
    assert dim_phase(9, 10, (1.0, 0.0)) == "encoder_decoder"
    with pytest.raises(ValueError):
        dim_phase(0, 10, (0.8, 0.5))


@pytest.mark.parametrize("phase", ["encoder_decoder", "refinement", "joint"])
def test_set_phase_freezes_the_right_parameters(phase):
    model = build_tiny("dim").train()
    set_dim_phase(model, phase)
    for name, module in model.named_children():
        trains = name in DIM_PHASE_MODULES[phase]
        assert all(p.requires_grad == trains for p in module.parameters()), name
        assert module.training == trains, name
    with pytest.raises(ValueError, match="valid phases"):
        set_dim_phase(model, "warmup")


@pytest.mark.parametrize(
    ("step", "phase"), [(0, "encoder_decoder"), (5, "refinement"), (7, "joint")]
)
def test_train_step_updates_only_the_phase_parameters(step, phase):
    method = get_method("dim")
    model = build_tiny("dim")
    loss = method.make_loss(model)
    batch = make_batch("dim")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(method.optimizer_parameters(model, loss), lr=1e-2)
    terms = method.train_step(model, loss, batch, optimizer, None, step=step, total_steps=8)
    assert int(terms["phase"]) == ("encoder_decoder", "refinement", "joint").index(phase)
    after = model.state_dict()
    for name in ("body", "decoder", "head", "refinement"):
        changed = any(not torch.equal(before[k], after[k]) for k in before if k.startswith(name + "."))
        assert changed == (name in DIM_PHASE_MODULES[phase]), (name, phase)


def test_loss_is_the_eps_smoothed_mix_over_the_unknown_region_only():
    loss = DIMLoss()
    gt = torch.zeros(1, 1, 4, 4)
    trimap = torch.zeros(1, 1, 4, 4)
    trimap[..., :2, :] = 128 / 255  # unknown: top half
    fg, bg = torch.ones(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    batch = {"alpha": gt, "trimap": trimap, "image": gt * fg + (1 - gt) * bg, "fg": fg, "bg": bg}
    pred_alpha = torch.full((1, 1, 4, 4), 0.5)
    pred_alpha[..., 2:, :] = 0.9  # outside the unknown region: must not count
    refined = torch.full((1, 1, 4, 4), 0.25)
    terms = loss({"alpha_stage1": pred_alpha, "alpha": refined}, batch, "encoder_decoder")
    stage1 = float(np.sqrt(0.5**2 + 1e-12))  # |0.5 − 0| inside U; the 0.9s outside do not count
    refined_loss = float(np.sqrt(0.25**2 + 1e-12))
    assert float(terms["alpha_stage1"]) == pytest.approx(stage1, rel=1e-6)
    assert float(terms["composition_stage1"]) == pytest.approx(stage1, rel=1e-6)  # |α·1 + (1−α)·0 − 0| = α
    assert float(terms["total"]) == pytest.approx(0.5 * stage1 + 0.5 * stage1, rel=1e-6)
    assert float(terms["alpha_refined"]) == pytest.approx(refined_loss, rel=1e-6)
    refinement = loss({"alpha_stage1": pred_alpha, "alpha": refined}, batch, "refinement")
    assert float(refinement["total"]) == pytest.approx(refined_loss, rel=1e-6)
    joint = loss({"alpha_stage1": pred_alpha, "alpha": refined}, batch, "joint")
    assert float(joint["total"]) == pytest.approx(stage1 + refined_loss, rel=1e-6)
    # a perfect prediction costs ε, not 0
    perfect = loss({"alpha_stage1": gt, "alpha": gt}, batch, "joint")
    assert float(perfect["alpha_refined"]) == pytest.approx(1e-6, rel=1e-3)


def test_guidance_train_random_eval_fixed():
    alpha = disc_alpha(HEIGHT, WIDTH, 30, 24, 14, soft=3)
    train = dim_guidance(alpha, np.random.default_rng(0), train=True)
    assert train.shape == (1, HEIGHT, WIDTH) and train.dtype == np.float32
    values = np.unique(train)
    assert all(np.isclose(values, v).any() for v in values) and np.all(
        np.isclose(values[:, None], [0.0, 128 / 255, 1.0]).any(axis=1)
    )
    soft = (alpha > 1e-6) & (alpha < 1 - 1e-6)
    assert np.all(np.abs(train[0][soft] - 128 / 255) < 1e-6)  # the soft region is always unknown
    evaluation = dim_guidance(alpha, None, train=False)
    np.testing.assert_array_equal(evaluation[0], eval_trimap(alpha, 15).astype(np.float32) / 255)
    with pytest.raises(ValueError, match="rng"):
        dim_guidance(alpha, None, train=True)


def test_a_few_steps_lower_the_loss():
    model = build_tiny("dim")
    loss = get_method("dim").make_loss(model)
    totals = train_losses("dim", model, loss, make_batch("dim"), steps=6)
    assert totals[-1] < totals[0]
