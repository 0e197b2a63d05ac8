"""MGM in the wild: two-instance targets (visible alpha), EMA teacher self-training step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from matting_core.methods import get_method
from matting_core.methods.mgm_wild import MGMWildLoss, two_instance_sample
from matting_core.training import collate_views, make_views

from . import build_tiny, disc_alpha, make_batch, smooth_colour, train_losses


def _instances(seed=0, h=48, w=64):
    rng = np.random.default_rng(seed)
    alpha_a = disc_alpha(h, w, 24, 22, 12, 4.0)  # front, overlapping B on its right
    alpha_b = disc_alpha(h, w, 24, 38, 14, 4.0)
    return (smooth_colour(rng, h, w), alpha_a, smooth_colour(rng, h, w), alpha_b, smooth_colour(rng, h, w))


@pytest.mark.parametrize("target", ["front", "back"])
def test_visible_alpha_targets_and_exact_composition(target):
    fg_a, alpha_a, fg_b, alpha_b, bg = _instances()
    s = two_instance_sample(fg_a, alpha_a, fg_b, alpha_b, bg, np.random.default_rng(0), target=target)
    assert s["target"] == target
    expected_image = alpha_a[..., None] * fg_a + (1 - alpha_a[..., None]) * (
        alpha_b[..., None] * fg_b + (1 - alpha_b[..., None]) * bg
    )
    np.testing.assert_allclose(s["image"], expected_image, atol=1e-6)
    visible = alpha_a if target == "front" else alpha_b * (1 - alpha_a)
    np.testing.assert_allclose(s["alpha"], visible, atol=1e-7)
    np.testing.assert_array_equal(s["fg"], fg_a if target == "front" else fg_b)
    # the sample's own (alpha, fg, bg) re-composite the image: the composition loss is exact
    rebuilt = s["alpha"][..., None] * s["fg"] + (1 - s["alpha"][..., None]) * s["bg"]
    np.testing.assert_allclose(rebuilt, s["image"], atol=1e-5)
    assert s["bg"].min() >= 0 and s["bg"].max() <= 1
    # the guidance is a binary mask of the target instance
    assert s["mask"].shape == alpha_a.shape and set(np.unique(s["mask"])) <= {0.0, 1.0}
    for key in ("image", "alpha", "fg", "bg", "mask"):
        assert s[key].dtype == np.float32


def test_back_target_excludes_the_occluded_part():
    fg_a, alpha_a, fg_b, alpha_b, bg = _instances()
    back = two_instance_sample(fg_a, alpha_a, fg_b, alpha_b, bg, np.random.default_rng(0), target="back")
    front = two_instance_sample(fg_a, alpha_a, fg_b, alpha_b, bg, np.random.default_rng(0), target="front")
    overlap = (alpha_a == 1) & (alpha_b == 1)
    assert overlap.any()
    assert np.all(back["alpha"][overlap] == 0)  # fully hidden behind A
    np.testing.assert_allclose(front["alpha"] + back["alpha"], alpha_a + alpha_b * (1 - alpha_a), atol=1e-6)


def test_the_target_is_drawn_from_the_rng():
    args = _instances()
    targets = {two_instance_sample(*args, np.random.default_rng(s), guidance=False)["target"] for s in range(20)}
    assert targets == {"front", "back"}
    one = two_instance_sample(*args, np.random.default_rng(5))
    two = two_instance_sample(*args, np.random.default_rng(5))
    assert one["target"] == two["target"] and np.array_equal(one["mask"], two["mask"])
    with pytest.raises(ValueError, match="target"):
        two_instance_sample(*args, np.random.default_rng(0), target="left")


def test_sample_feeds_make_views():
    s = two_instance_sample(*_instances(), np.random.default_rng(0))
    roles = {k: s[k] for k in ("image", "alpha", "fg", "bg", "mask")}
    views = make_views(roles, np.random.default_rng(1), 32, (1.0, 1.0))
    batch = collate_views([views])
    assert batch["image"].shape == (1, 3, 32, 32) and batch["mask"].shape == (1, 1, 32, 32)


def _natural_batch(n=2, seed=3):
    """Weak and strong views of 'natural photos' with seg masks, through matting_core's views."""
    rng = np.random.default_rng(seed)
    views = []
    for _ in range(n):
        alpha = disc_alpha(48, 48, 24, 24, 12, 2.0)
        image = (np.clip(alpha[..., None] * smooth_colour(rng, 48, 48) + (1 - alpha[..., None]) * 0.3, 0, 1) * 255)
        sample = {"image": image.astype(np.uint8), "mask": (alpha > 0.5).astype(np.float32)}
        views.append(make_views(sample, rng, 48, (1.0, 1.0), roles=["mask"], strong=True))
    batch = collate_views(views)
    return {
        "natural_image": batch["image"],
        "natural_image_strong": batch["image_strong"],
        "natural_mask": batch["mask"],
    }


def test_self_training_step_trains_the_student_and_ema_updates_the_teacher():
    method = get_method("mgm_wild")
    model = build_tiny("mgm_wild")
    loss = method.make_loss(model, ema_momentum=0.9, unsup_start_fraction=0.5)
    assert all(not p.requires_grad for p in loss.teacher.parameters())
    trainable = {id(p) for p in method.optimizer_parameters(model, loss)}
    assert not trainable & {id(p) for p in loss.teacher.parameters()}
    batch = {**make_batch("mgm_wild", n=2, height=48, width=48), **_natural_batch()}
    optimizer = torch.optim.Adam(method.optimizer_parameters(model, loss), lr=1e-2)
    teacher_before = {k: v.clone() for k, v in loss.teacher.state_dict().items()}

    terms = method.train_step(model, loss, batch, optimizer, torch.Generator().manual_seed(0), step=0, total_steps=10)
    assert float(terms["unsupervised"]) == 0.0  # before unsup_start_fraction
    terms = method.train_step(model, loss, batch, optimizer, torch.Generator().manual_seed(0), step=6, total_steps=10)
    assert float(terms["unsupervised"]) > 0.0
    torch.testing.assert_close(terms["total"], terms["supervised"] + terms["unsupervised"])
    assert not loss.teacher.training

    # θ_t ← m·θ_t + (1 − m)·θ_s after every step: check one weight exactly for the last step
    name = "head_os1.out.weight"
    student = model.state_dict()[name]
    teacher = loss.teacher.state_dict()[name]
    assert not torch.equal(teacher, teacher_before[name])
    assert not torch.equal(teacher, student)
    previous = teacher_before[name] * 0.9 + 0.1 * _student_after_first_step(method, batch)[name]
    torch.testing.assert_close(teacher, 0.9 * previous + 0.1 * student)


def _student_after_first_step(method, batch):
    """Re-run the first step from the same initialisation to get the intermediate student weights."""
    model = build_tiny("mgm_wild")
    loss = method.make_loss(model, ema_momentum=0.9, unsup_start_fraction=0.5)
    optimizer = torch.optim.Adam(method.optimizer_parameters(model, loss), lr=1e-2)
    method.train_step(model, loss, batch, optimizer, torch.Generator().manual_seed(0), step=0, total_steps=10)
    return model.state_dict()


def test_self_training_needs_all_natural_keys():
    model = build_tiny("mgm_wild")
    loss = MGMWildLoss(model, unsup_start_fraction=0.0)
    batch = {**make_batch("mgm_wild", height=48, width=48), **_natural_batch()}
    assert loss.self_training_active(batch, 0, 10)
    del batch["natural_image_strong"]
    assert not loss.self_training_active(batch, 0, 10)


def test_a_few_supervised_steps_lower_the_loss():
    model = build_tiny("mgm_wild")
    loss = get_method("mgm_wild").make_loss(model)
    totals = train_losses("mgm_wild", model, loss, make_batch("mgm_wild"), steps=6)
    assert totals[-1] < totals[0]
