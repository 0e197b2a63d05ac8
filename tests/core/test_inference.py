"""matting_core.inference: test-time resize and back, cut-outs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from matting_core.inference import cutout_over, fit_cover, predict_alpha, resize_short_side
from matting_core.models import build_network

pytestmark = pytest.mark.usefixtures("one_thread")


class _ShapeProbe(nn.Module):
    """Returns alpha = red channel and records the size it was called with."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.seen = None

    def forward(self, image):
        self.seen = tuple(image.shape[-2:])
        return {"alpha": image[:, :1], "boundary_logits": image[:, :1]}


def test_predict_alpha_resizes_short_side_and_back():
    probe = _ShapeProbe()
    image = np.zeros((100, 150, 3), np.uint8)
    image[:, 75:, 0] = 255
    alpha = predict_alpha(probe, image, short_side=64)
    assert probe.seen == (64, 96)
    assert alpha.shape == (100, 150) and alpha.dtype == np.float32
    assert alpha[:, :70].max() < 0.05 and alpha[:, 80:].min() > 0.95
    predict_alpha(probe, image, short_side=None)
    assert probe.seen == (100, 150)


def test_predict_alpha_on_a_real_network_keeps_mode():
    model = build_network("unet_r18x0.25").train()
    alpha = predict_alpha(model, np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8), 32)
    assert alpha.shape == (37, 53) and 0 <= alpha.min() and alpha.max() <= 1
    assert model.training


def test_resize_short_side_and_fit_cover():
    assert resize_short_side(np.zeros((100, 300), np.uint8), 50).shape == (50, 150)
    assert resize_short_side(np.zeros((30, 20, 3), np.uint8), 40).shape == (60, 40, 3)
    assert fit_cover(np.zeros((10, 40, 3), np.uint8), (30, 30)).shape == (30, 30, 3)


def test_cutout_over_colour_and_image():
    image = np.full((4, 6, 3), 200, np.uint8)
    alpha = np.zeros((4, 6), np.float32)
    alpha[:, 3:] = 1.0
    alpha[0, 0] = 0.5
    out = cutout_over(image, alpha, (0, 255, 0))
    assert out.dtype == np.uint8 and out.shape == (4, 6, 3)
    assert out[1, 0].tolist() == [0, 255, 0] and out[1, 4].tolist() == [200, 200, 200]
    assert out[0, 0].tolist() == [100, 228, 100]
    bg = np.zeros((8, 8, 3), np.uint8)
    assert cutout_over(image, alpha, bg)[1, 0].tolist() == [0, 0, 0]
