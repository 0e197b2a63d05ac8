"""Pure training pieces (matting_core.training): views, MLB labels, EMA, cosine schedule, train step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from matting_core.models import build_network
from matting_core.training import (
    collate_views,
    cosine_factor,
    cosine_schedule,
    ema_update,
    make_views,
    mlb_labels,
    sample_rng,
    teacher_labels,
    train_step,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _sample(size=48, seed=0):
    """An image whose red channel IS the alpha (so alignment can be checked), a mask, fg, bg."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, : size + 8].astype(np.float32)
    alpha = np.clip((14 - np.hypot(yy - 20, xx - 30)) / 4 + 0.5, 0, 1).astype(np.float32)
    image = np.stack([np.round(alpha * 255), rng.integers(0, 255, alpha.shape), xx * 4], -1).astype(np.uint8)
    alpha = image[..., 0].astype(np.float32) / 255.0
    return {
        "image": image,
        "alpha": alpha,
        "mask": (alpha > 0.5).astype(np.float32),
        "fg": np.full(image.shape, 200, np.uint8),
        "bg": rng.integers(0, 255, image.shape).astype(np.uint8),
    }


# ----------------------------------------------------------------------------- views


def test_views_share_one_geometry_and_are_channel_first():
    views = make_views(_sample(), sample_rng(0, 5), 32, (0.75, 1.25), ["alpha", "mask", "fg", "bg"], strong=True)
    assert set(views) == {"image", "image_strong", "alpha", "mask", "fg", "bg"}
    assert views["image"].shape == views["image_strong"].shape == (3, 32, 32)
    assert views["alpha"].shape == views["mask"].shape == (1, 32, 32)
    for v in views.values():
        assert v.dtype == np.float32 and v.flags["C_CONTIGUOUS"] and 0 <= v.min() and v.max() <= 1
    # the alpha went through the same crop/scale/flip as the image's red channel
    np.testing.assert_allclose(views["alpha"][0], views["image"][0], atol=1.5 / 255)
    # the seg mask stays binary (nearest), the strong view is a different photo of the same crop
    assert set(np.unique(views["mask"])) <= {0.0, 1.0}
    assert np.abs(views["image_strong"] - views["image"]).mean() > 1e-3


def test_views_are_a_function_of_seed_and_position():
    sample = _sample()
    a = make_views(sample, sample_rng(3, 7), 32, (0.75, 1.25), ["alpha"], strong=True)
    b = make_views(sample, sample_rng(3, 7), 32, (0.75, 1.25), ["alpha"], strong=True)
    c = make_views(sample, sample_rng(3, 8), 32, (0.75, 1.25), ["alpha"], strong=True)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_views_reject_missing_or_unknown_roles():
    with pytest.raises(ValueError, match="lacks role"):
        make_views({"image": _sample()["image"]}, sample_rng(0, 0), 32, (1, 1), ["alpha"])
    with pytest.raises(ValueError, match="unknown role"):
        make_views(_sample(), sample_rng(0, 0), 32, (1, 1), ["weird"])


def test_collate_stacks_views():
    views = [make_views(_sample(seed=i), sample_rng(0, i), 32, (1, 1), ["mask"]) for i in range(3)]
    batch = collate_views(views)
    assert batch["image"].shape == (3, 3, 32, 32) and batch["mask"].shape == (3, 1, 32, 32)
    assert batch["image"].dtype == torch.float32


# ----------------------------------------------------------------------------- labels


def test_mlb_labels_obey_the_blend_identity():
    torch.manual_seed(0)
    teacher = build_network("unet_r18x0.25")
    with torch.no_grad():  # make the boundary head confident somewhere and unsure elsewhere
        teacher.boundary_head.bias.fill_(0.3)
        teacher.boundary_head.weight.mul_(3000)
    teacher.train()
    images = torch.rand(2, 3, 32, 40)
    seg = (torch.rand(2, 1, 32, 40) > 0.5).float()
    labels = mlb_labels(teacher, images, seg)
    assert teacher.training, "teacher_labels must restore the module's mode"
    # recompute independently, in eval mode (BatchNorm running statistics)
    teacher.eval()
    with torch.no_grad():
        out = teacher(images)
    beta = torch.sigmoid(out["boundary_logits"])
    expected = beta * out["alpha"] + (1 - beta) * seg
    torch.testing.assert_close(labels["blended"], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(labels["teacher_boundary"], beta, atol=1e-6, rtol=0)
    assert 0.05 < beta.min() and beta.max() < 0.95 or beta.std() > 0.05  # not a degenerate β
    assert not labels["blended"].requires_grad


def test_hard_blend_mode_binarises_beta():
    teacher = build_network("unet_r18x0.25").eval()
    images, seg = torch.rand(1, 3, 32, 32), torch.ones(1, 1, 32, 32)
    labels = mlb_labels(teacher, images, seg, mode="hard")
    beta = (labels["teacher_boundary"] >= 0.5).float()
    torch.testing.assert_close(labels["blended"], beta * labels["teacher_alpha"] + (1 - beta) * seg)


def test_teacher_labels_are_detached_probabilities():
    teacher = build_network("unet_r18x0.25")
    alpha, prob = teacher_labels(teacher, torch.rand(2, 3, 32, 32))
    assert alpha.shape == prob.shape == (2, 1, 32, 32)
    assert not alpha.requires_grad and 0 <= float(prob.min()) and float(prob.max()) <= 1


# ----------------------------------------------------------------------------- EMA


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)


def test_ema_update_formula_on_params_and_buffers():
    torch.manual_seed(0)
    teacher, student = _Tiny(), _Tiny()
    with torch.no_grad():
        student.bn.running_mean.uniform_()
        student.bn.num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    m = 0.9
    ema_update(teacher, student, m)
    after, s = teacher.state_dict(), student.state_dict()
    for key in ("conv.weight", "conv.bias", "bn.weight", "bn.running_mean", "bn.running_var"):
        torch.testing.assert_close(after[key], m * before[key] + (1 - m) * s[key])
    assert int(after["bn.num_batches_tracked"]) == 7
    # the teacher moved towards the student, strictly
    assert not torch.equal(after["conv.weight"], before["conv.weight"])
    ema_update(teacher, student, 0.0)
    torch.testing.assert_close(teacher.state_dict()["conv.weight"], s["conv.weight"])


def test_ema_refuses_different_architectures_and_bad_momentum():
    with pytest.raises(ValueError, match="same architecture"):
        ema_update(_Tiny(), nn.Conv2d(3, 4, 3), 0.9)
    with pytest.raises(ValueError, match="momentum"):
        ema_update(_Tiny(), _Tiny(), 1.5)


# ----------------------------------------------------------------------------- schedule


def test_cosine_factor_values():
    assert cosine_factor(0, 100) == 1.0
    assert cosine_factor(50, 100) == pytest.approx(0.5)
    assert cosine_factor(100, 100) == pytest.approx(0.0)
    assert cosine_factor(250, 100) == pytest.approx(0.0)
    assert cosine_factor(25, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine_factor(100, 100, final_factor=0.1) == pytest.approx(0.1)


def test_cosine_schedule_drives_adam_lr():
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=1e-3)
    sched = cosine_schedule(opt, 10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[5] == pytest.approx(0.5e-3)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


# ----------------------------------------------------------------------------- step


def test_train_step_overfits_one_batch():
    torch.manual_seed(0)
    model = build_network("unet_r18x0.25")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    images = torch.rand(2, 3, 32, 32)
    target = (images[:, :1] > 0.5).float()

    def objective(pred, batch):
        err = (pred["alpha"] - batch["target"]) ** 2
        return {"mse": err.mean(), "total": err.mean()}

    batch = {"image": images, "target": target}
    losses = [float(train_step(model, opt, batch, objective)["total"]) for _ in range(15)]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


# ----------------------------------------------------------------------------- inference


def test_train_step_and_labels_under_autocast():
    """The mixed-precision path (CUDA uses it; CPU bfloat16 autocast exercises the same code)."""
    model = build_network("unet_r18x0.25")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = {"image": torch.rand(2, 3, 32, 32), "target": torch.rand(2, 1, 32, 32)}

    def objective(pred, b):
        assert pred["alpha"].dtype == torch.float32  # losses in full precision
        err = (pred["alpha"] - b["target"]).abs().mean()
        return {"l1": err, "total": err}

    terms = train_step(model, opt, batch, objective, autocast_dtype=torch.bfloat16)
    assert math.isfinite(float(terms["total"]))
    labels = mlb_labels(model, batch["image"], (batch["target"] > 0.5).float(), autocast_dtype=torch.bfloat16)
    assert labels["blended"].dtype == torch.float32
