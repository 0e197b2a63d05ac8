"""AdaMatting: propagation unit shapes and unrolling, uncertainty weighting and its gradients."""

from __future__ import annotations

import math

import pytest
import torch

from matting_core.methods import get_method
from matting_core.methods.adamatting import (
    AdaMattingLoss,
    ConvLSTMCell,
    PropagationUnit,
    gt_trimap_classes,
)

from . import build_tiny, make_batch, train_losses


def _inputs(n=2, h=20, w=16):
    torch.manual_seed(1)
    image = torch.rand(n, 3, h, w)
    trimap_prob = torch.softmax(torch.randn(n, 3, h, w), dim=1)
    raw_alpha = torch.rand(n, 1, h, w)
    return image, trimap_prob, raw_alpha


def test_forward_outputs():
    model = build_tiny("adamatting").eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 45, 33), torch.rand(2, 1, 45, 33))
    assert out["alpha"].shape == out["raw_alpha"].shape == (2, 1, 45, 33)
    assert out["trimap_logits"].shape == out["trimap_adapted"].shape == (2, 3, 45, 33)
    torch.testing.assert_close(out["trimap_adapted"].sum(1), torch.ones(2, 45, 33))
    assert 0 <= float(out["alpha"].min()) and float(out["alpha"].max()) <= 1
    assert model.propagation.steps == 3


def test_convlstm_cell_shapes_and_equations():
    cell = ConvLSTMCell(5, 4)
    x, h, c = torch.rand(2, 5, 6, 7), torch.rand(2, 4, 6, 7), torch.rand(2, 4, 6, 7)
    h1, c1 = cell(x, (h, c))
    assert h1.shape == c1.shape == (2, 4, 6, 7)
    i, f, o, g = torch.chunk(cell.gates(torch.cat([x, h], 1)), 4, 1)
    expected_c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    torch.testing.assert_close(c1, expected_c)
    torch.testing.assert_close(h1, torch.sigmoid(o) * torch.tanh(expected_c))


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_propagation_unrolls_t_steps_and_the_hidden_state_changes(steps):
    unit = PropagationUnit(steps=steps, channels=6)
    with torch.no_grad():
        alpha, states = unit(*_inputs(), return_states=True)
    assert alpha.shape == (2, 1, 20, 16)
    assert len(states) == steps
    assert all(s.shape == (2, 6, 20, 16) for s in states)
    assert float(states[0].abs().max()) > 0  # h_1 moved away from h_0 = 0
    for before, after in zip(states, states[1:]):
        assert not torch.allclose(before, after)
    # the refined alpha is read from the last hidden state
    torch.testing.assert_close(alpha, torch.sigmoid(unit.out(states[-1])))


def test_propagation_t0_returns_the_raw_alpha_and_more_steps_change_the_output():
    image, prob, raw = _inputs()
    unit0 = PropagationUnit(steps=0, channels=6)
    alpha0, states0 = unit0(image, prob, raw, return_states=True)
    assert states0 == [] and torch.equal(alpha0, raw)
    torch.manual_seed(3)
    unit1 = PropagationUnit(steps=1, channels=6)
    unit3 = PropagationUnit(steps=3, channels=6)
    unit3.load_state_dict(unit1.state_dict())  # same weights, only T differs
    with torch.no_grad():
        unit1.out.weight.normal_(std=0.5)
        unit3.out.weight.copy_(unit1.out.weight)
    assert not torch.allclose(unit1(image, prob, raw), unit3(image, prob, raw))


def test_gt_trimap_classes():
    alpha = torch.zeros(1, 1, 9, 9)
    alpha[..., 3:6, 3:6] = 1.0
    alpha[..., 4, 4] = 0.5
    classes = gt_trimap_classes(alpha, band_px=1)
    assert classes.shape == (1, 9, 9)
    assert classes[0, 4, 4] == 1 and classes[0, 3, 3] == 1  # soft pixel and its 1-px dilation
    assert classes[0, 0, 0] == 0
    alpha[..., 4, 4] = 1.0
    assert gt_trimap_classes(alpha, band_px=1)[0, 4, 4] == 2


def test_uncertainty_loss_formula_and_log_variances_receive_gradients():
    loss = AdaMattingLoss()
    with torch.no_grad():
        loss.log_var_trimap.fill_(0.3)
        loss.log_var_alpha.fill_(-0.2)
    gt = torch.zeros(1, 1, 8, 8)
    gt[..., 2:6, 2:6] = 1.0
    logits = torch.randn(1, 3, 8, 8, requires_grad=True)
    alpha = torch.rand(1, 1, 8, 8, requires_grad=True)
    terms = loss({"trimap_logits": logits, "alpha": alpha}, {"alpha": gt})
    ce = torch.nn.functional.cross_entropy(logits, gt_trimap_classes(gt, 3))
    l1 = (alpha - gt).abs().mean()
    expected = math.exp(-0.3) * ce + math.exp(0.2) * l1 + 0.5 * (0.3 - 0.2)
    torch.testing.assert_close(terms["total"], expected)
    assert float(terms["log_var_trimap"]) == pytest.approx(0.3)
    assert float(terms["weight_alpha"]) == pytest.approx(math.exp(0.2))
    terms["total"].backward()
    for s, term in ((loss.log_var_trimap, ce), (loss.log_var_alpha, l1)):
        assert s.grad is not None
        # ∂L/∂s = −exp(−s)·term + 1/2
        assert float(s.grad) == pytest.approx(float(-torch.exp(-s.detach()) * term.detach() + 0.5), rel=1e-5)
    assert loss.log_variances() == pytest.approx({"log_var_trimap": 0.3, "log_var_alpha": -0.2})


def test_train_step_moves_the_log_variances_and_lowers_the_loss():
    method = get_method("adamatting")
    model = build_tiny("adamatting")
    loss = method.make_loss(model)
    assert {id(p) for p in loss.parameters()} <= {id(p) for p in method.optimizer_parameters(model, loss)}
    totals = train_losses("adamatting", model, loss, make_batch("adamatting"), steps=5, lr=1e-2)
    assert totals[-1] < totals[0]
    values = loss.log_variances()
    assert values["log_var_trimap"] != 0.0 and values["log_var_alpha"] != 0.0


def test_train_step_refuses_an_optimizer_without_the_log_variances():
    method = get_method("adamatting")
    model = build_tiny("adamatting")
    loss = method.make_loss(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="optimizer_parameters"):
        method.train_step(model, loss, make_batch("adamatting"), optimizer)


def test_unknown_region_option():
    loss = AdaMattingLoss(alpha_region="unknown")
    gt = torch.zeros(1, 1, 8, 8)
    logits = torch.zeros(1, 3, 8, 8)
    logits[:, 0] = 5.0  # adapted trimap: all background → no unknown pixels, and GT has none
    terms = loss({"trimap_logits": logits, "alpha": torch.ones(1, 1, 8, 8)}, {"alpha": gt})
    assert float(terms["l1"]) == 0.0
    with pytest.raises(ValueError):
        AdaMattingLoss(alpha_region="boundary")
