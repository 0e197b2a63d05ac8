"""Tests of matting_core.methods, plus the tiny synthetic data they share (made here, CPU)."""

from __future__ import annotations

import numpy as np
import torch

from matting_core.methods import get_method

HEIGHT, WIDTH = 64, 48
NETWORK = "unet_r18x0.25"


def disc_alpha(height: int, width: int, cy: float, cx: float, radius: float, soft: float = 3.0) -> np.ndarray:
    """A disc with a linear soft edge ``soft`` px wide: (H, W) float32 in [0, 1]."""
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    return np.clip((radius - np.hypot(yy - cy, xx - cx)) / soft + 0.5, 0.0, 1.0).astype(np.float32)


def smooth_colour(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random RGB image (a colour gradient): (H, W, 3) float32 in [0, 1]."""
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    a, b, c = rng.uniform(0.1, 0.9, (3, 3)).astype(np.float32)
    return np.clip(a + (b - a) * yy[..., None] / height * c + 0.1 * xx[..., None] / width, 0, 1).astype(np.float32)


def sample(rng: np.random.Generator, height: int = HEIGHT, width: int = WIDTH) -> dict[str, np.ndarray]:
    """One composite: alpha (H,W), fg/bg/image (H,W,3), all float32 in [0, 1]."""
    alpha = disc_alpha(height, width, rng.uniform(0.35, 0.65) * height, rng.uniform(0.35, 0.65) * width,
                       rng.uniform(0.22, 0.32) * min(height, width), soft=rng.uniform(2.0, 6.0))
    fg, bg = smooth_colour(rng, height, width), smooth_colour(rng, height, width)
    image = alpha[..., None] * fg + (1.0 - alpha[..., None]) * bg
    return {"alpha": alpha, "fg": fg, "bg": bg, "image": image.astype(np.float32)}


def make_batch(
    method: str, n: int = 2, seed: int = 0, height: int = HEIGHT, width: int = WIDTH
) -> dict[str, torch.Tensor]:
    """A training batch for ``method``: image/fg/bg (N,3,H,W), alpha (N,1,H,W) + its guidance."""
    rng = np.random.default_rng(seed)
    samples = [sample(rng, height, width) for _ in range(n)]
    batch = {
        "image": torch.from_numpy(np.stack([s["image"].transpose(2, 0, 1) for s in samples])),
        "fg": torch.from_numpy(np.stack([s["fg"].transpose(2, 0, 1) for s in samples])),
        "bg": torch.from_numpy(np.stack([s["bg"].transpose(2, 0, 1) for s in samples])),
        "alpha": torch.from_numpy(np.stack([s["alpha"][None] for s in samples])),
    }
    m = get_method(method)
    if m.required_input is not None:
        guidance = [m.make_guidance(s["alpha"], rng, train=True) for s in samples]
        batch[m.required_input] = torch.from_numpy(np.stack(guidance))
    return batch


def build_tiny(method: str, **options):
    """Method network on the ×0.25 test backbone, seeded."""
    torch.manual_seed(0)
    m = get_method(method)
    return m.build(m.method_spec(network=NETWORK, **options))


def train_losses(method: str, model, loss_module, batch, steps: int, total_steps: int = 10_000, lr: float = 1e-3,
                 start_step: int = 0) -> list[float]:
    """Train on one fixed batch; the in-step randomness is re-seeded identically each step."""
    m = get_method(method)
    optimizer = torch.optim.Adam(m.optimizer_parameters(model, loss_module), lr=lr)
    totals = []
    for k in range(steps):
        terms = m.train_step(model, loss_module, batch, optimizer, torch.Generator().manual_seed(0),
                             step=start_step + k, total_steps=total_steps)
        totals.append(float(terms["total"]))
    return totals
