"""AdaMatting (Cai et al., ICCV 2019) on the project's backbone (METHOD.md §3).

Network (:class:`AdaMattingNet`)::

    image (N,3,H,W) RGB in [0,1], user trimap (N,1,H,W) in [0,1]
      shared encoder: GuidedEncoder(4 input channels) + ASPP            f0..f4, aspp
      trimap-adaptation decoder: U-Net decoder → conv3x3 → trimap_logits (N,3,H,W)
                                 classes 0 background, 1 unknown, 2 foreground
      alpha decoder:             U-Net decoder → conv3x3 → sigmoid → raw_alpha (N,1,H,W)
      propagation unit: x = cat(image, softmax(trimap_logits), raw_alpha)      (N,7,H,W)
          features u = ReLU(conv3x3(C→C)(ReLU(conv3x3(7→C)(x))))     (computed once)
          h₀ = c₀ = 0;  for t = 1..T:  (h_t, c_t) = ConvLSTMCell(u, h_{t−1}, c_{t−1})
              gates [i, f, o, g] = conv3x3(cat(u, h_{t−1}))     i, f, o = σ(·), g = tanh(·)
              c_t = f ⊙ c_{t−1} + i ⊙ g;   h_t = o ⊙ tanh(c_t)
          alpha = sigmoid(conv3x3(h_T))            (T = 0: alpha = raw_alpha, no refinement)
      → {"alpha", "raw_alpha", "trimap_logits", "trimap_adapted" (softmax)}

Multi-task loss with learned uncertainty (:class:`AdaMattingLoss`; Kendall et al. in the
stable log-variance form; s = log σ² are ``nn.Parameter`` s of the loss module, init 0)::

    L = exp(−s₁)·CE(trimap_logits, T_gt) + exp(−s₂)·L1(alpha, α_gt) + (s₁ + s₂)/2

T_gt (project choice, the paper's GT trimap): unknown where 1/255 ≤ α_gt ≤ 1 − 1/255 dilated
by ``trimap_band_px`` (3 px), else foreground where α_gt ≥ 0.5, background otherwise. L1 is
the mean over the whole image (``alpha_region="image"``, project choice) or over the adapted
trimap's unknown region ∪ T_gt's unknown region (``"unknown"``). The loss dict carries
``log_var_trimap`` / ``log_var_alpha`` (s₁, s₂), so the pipeline logs them to MLflow with
the other terms as they evolve; :meth:`AdaMattingLoss.log_variances` gives them as floats.

The optimiser must hold the loss module's parameters: build it from
``matting_core.methods.optimizer_parameters("adamatting", model, loss_module)``.

Changes from the paper (and why):

* ResNet-50 encoder with GCN shortcuts and sub-pixel (PixelShuffle) decoders → the project's
  ResNet (4-channel stem) + ASPP, shared, and two U-Net decoders (bilinear ×2 + convs with
  skips). Same backbone and decoder family for every compared method; bilinear decoders are
  export-tested in this project.
* The propagation unit's input feature extractor is two conv3x3-ReLU layers (the public
  re-implementation uses two bottleneck blocks); no BatchNorm inside the recurrence.
  Channels C = hidden = round(16·width) (project choice: the unit runs at full resolution).
* T (``propagation_steps``) defaults to 3 (project choice; the paper unrolls "a few" steps).
* L1 over the whole image by default (the pipeline evaluates whole-image and boundary error);
  the unknown-region variant is kept as an option.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from matting_core.losses import weighted_mean
from matting_core.models import scaled_channels
from matting_core.regions import uncertain_band_torch

from .common import (
    GuidedEncoderDecoder,
    check_optimizer_covers,
    crop_to,
    init_decoder_modules,
    init_output_conv,
    optimise,
)
from .dim import dim_guidance

__all__ = [
    "AdaMattingLoss",
    "AdaMattingNet",
    "ConvLSTMCell",
    "PropagationUnit",
    "adamatting_guidance",
    "adamatting_train_step",
    "gt_trimap_classes",
]

TRIMAP_CLASSES = 3  # 0 background, 1 unknown, 2 foreground


class ConvLSTMCell(nn.Module):
    """Convolutional LSTM cell (Shi et al., 2015), gates from one conv3x3.

    ``forward(x (N,Cx,H,W), (h, c) each (N,Ch,H,W))`` → ``(h', c')``:
    ``[i, f, o, g] = conv(cat(x, h))``; ``c' = σ(f)·c + σ(i)·tanh(g)``; ``h' = σ(o)·tanh(c')``.
    The forget-gate bias starts at 1 (common LSTM practice).
    """

    def __init__(self, input_channels: int, hidden_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.hidden_channels = int(hidden_channels)
        self.gates = nn.Conv2d(
            input_channels + hidden_channels, 4 * hidden_channels, kernel_size, padding=kernel_size // 2
        )
        nn.init.xavier_uniform_(self.gates.weight)
        with torch.no_grad():
            self.gates.bias.zero_()
            self.gates.bias[hidden_channels : 2 * hidden_channels] = 1.0

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        i, f, o, g = torch.chunk(self.gates(torch.cat([x, h], dim=1)), 4, dim=1)
        c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_next = torch.sigmoid(o) * torch.tanh(c_next)
        return h_next, c_next


class PropagationUnit(nn.Module):
    """AdaMatting's propagation unit: a ConvLSTM cell unrolled ``steps`` times (module doc).

    Args:
        steps: T ≥ 0 (T = 0 returns the raw alpha unchanged).
        channels: feature and hidden width.

    ``forward(image, trimap_prob, raw_alpha, return_states=False)``: image (N,3,H,W),
    trimap_prob (N,3,H,W) softmax, raw_alpha (N,1,H,W) → refined alpha (N,1,H,W) in [0,1];
    with ``return_states`` also the list of the T hidden states h_1..h_T (N,channels,H,W).
    """

    def __init__(self, steps: int = 3, channels: int = 16) -> None:
        super().__init__()
        if int(steps) < 0:
            raise ValueError(f"propagation steps must be >= 0, got {steps}")
        self.steps = int(steps)
        self.channels = int(channels)
        in_channels = 3 + TRIMAP_CLASSES + 1
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        init_decoder_modules([self.features])
        self.cell = ConvLSTMCell(channels, channels)
        self.out = nn.Conv2d(channels, 1, 3, padding=1)
        init_output_conv(self.out, std=1e-2)

    def forward(
        self,
        image: torch.Tensor,
        trimap_prob: torch.Tensor,
        raw_alpha: torch.Tensor,
        return_states: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        states: list[torch.Tensor] = []
        if self.steps == 0:
            return (raw_alpha, states) if return_states else raw_alpha
        u = self.features(torch.cat([image, trimap_prob, raw_alpha], dim=1))
        h = torch.zeros_like(u)  # features and hidden state have the same width
        c = torch.zeros_like(u)
        for _ in range(self.steps):
            h, c = self.cell(u, (h, c))
            states.append(h)
        alpha = torch.sigmoid(self.out(h))
        return (alpha, states) if return_states else alpha


class AdaMattingNet(GuidedEncoderDecoder):
    """AdaMatting: shared encoder, trimap-adaptation and alpha decoders, propagation unit.

    Args:
        propagation_steps: T of the propagation unit.
        propagation_channels: its width before the width multiplier.
        backbone: depth, width, aspp_rates, aspp_channels, decoder_channels, pad_multiple —
            the shared encoder-decoder's options (:class:`~.common.GuidedEncoderDecoder`).

    Modules, in construction order: ``body``, ``trimap_decoder``, ``alpha_decoder`` (the
    base), ``trimap_head`` (conv3x3 → 3), ``alpha_head`` (conv3x3 → 1), ``propagation``.

    ``forward(image, trimap)``: image (N,3,H,W) RGB in [0,1], trimap (N,1,H,W) in [0,1] →
    ``{"alpha", "raw_alpha"}`` (N,1,H,W) in [0,1], ``"trimap_logits"`` (N,3,H,W),
    ``"trimap_adapted"`` (N,3,H,W) softmax probabilities.
    """

    required_input = "trimap"
    decoder_names = ("trimap_decoder", "alpha_decoder")

    def __init__(self, *, propagation_steps: int = 3, propagation_channels: int = 16, **backbone: Any) -> None:
        super().__init__(**backbone)
        self.trimap_head = nn.Conv2d(self.trimap_decoder.channels[1], TRIMAP_CLASSES, 3, padding=1)
        self.alpha_head = nn.Conv2d(self.alpha_decoder.channels[1], 1, 3, padding=1)
        init_output_conv(self.trimap_head, self.alpha_head)
        self.propagation = PropagationUnit(propagation_steps, scaled_channels(propagation_channels, self.width))

    def forward(self, image: torch.Tensor, trimap: torch.Tensor) -> dict[str, torch.Tensor]:
        trimap_decoded, alpha_decoded = self.decode(image, trimap)
        trimap_logits = crop_to(self.trimap_head(trimap_decoded[1]), image)
        raw_alpha = crop_to(torch.sigmoid(self.alpha_head(alpha_decoded[1])), image)
        trimap_adapted = torch.softmax(trimap_logits, dim=1)
        alpha = self.propagation(image, trimap_adapted, raw_alpha)
        return {
            "alpha": alpha,
            "raw_alpha": raw_alpha,
            "trimap_logits": trimap_logits,
            "trimap_adapted": trimap_adapted,
        }


def gt_trimap_classes(alpha: torch.Tensor, band_px: int = 3) -> torch.Tensor:
    """Target classes of the trimap-adaptation decoder from the GT alpha.

    alpha (N,1,H,W) in [0,1] → (N,H,W) int64: 1 (unknown) where 1/255 ≤ α ≤ 1 − 1/255 dilated
    by ``band_px`` (:func:`matting_core.regions.uncertain_band_torch`), else 2 (foreground)
    where α ≥ 0.5, else 0 (background).
    """
    unknown = uncertain_band_torch(alpha, band_px)
    classes = torch.where(alpha >= 0.5, 2, 0)
    classes = torch.where(unknown, 1, classes)
    return classes[:, 0].long()


class AdaMattingLoss(nn.Module):
    """Uncertainty-weighted multi-task loss with learned log-variances (module doc).

    Args:
        trimap_band_px: dilation of the GT unknown band for the CE target.
        alpha_region: ``"image"`` (default) or ``"unknown"`` (see module doc).
        init_log_var: initial s₁ = s₂.

    ``forward(pred, batch)``: pred from :class:`AdaMattingNet`, batch with ``alpha``
    (N,1,H,W). Returns ``{"ce", "l1", "log_var_trimap", "log_var_alpha", "weight_trimap",
    "weight_alpha", "total"}`` (log-variances and weights detached copies, for logging).
    """

    def __init__(self, trimap_band_px: int = 3, alpha_region: str = "image", init_log_var: float = 0.0) -> None:
        super().__init__()
        if alpha_region not in ("image", "unknown"):
            raise ValueError(f"alpha_region must be 'image' or 'unknown', got {alpha_region!r}")
        self.trimap_band_px = int(trimap_band_px)
        self.alpha_region = alpha_region
        self.log_var_trimap = nn.Parameter(torch.tensor(float(init_log_var)))
        self.log_var_alpha = nn.Parameter(torch.tensor(float(init_log_var)))

    def log_variances(self) -> dict[str, float]:
        """Current ``{"log_var_trimap": s₁, "log_var_alpha": s₂}`` as floats (MLflow)."""
        return {
            "log_var_trimap": float(self.log_var_trimap.detach()),
            "log_var_alpha": float(self.log_var_alpha.detach()),
        }

    def forward(self, pred: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "alpha" not in batch:
            raise ValueError(f"the AdaMatting loss needs batch key 'alpha'; it has {sorted(batch)}")
        gt = batch["alpha"].float()
        target = gt_trimap_classes(gt, self.trimap_band_px)
        ce = F.cross_entropy(pred["trimap_logits"], target)
        if self.alpha_region == "image":
            region = None
        else:
            adapted_unknown = (pred["trimap_logits"].argmax(dim=1, keepdim=True) == 1).to(gt.dtype)
            region = torch.maximum(adapted_unknown, (target[:, None] == 1).to(gt.dtype))
        l1 = weighted_mean((pred["alpha"] - gt).abs(), region)
        s1, s2 = self.log_var_trimap, self.log_var_alpha
        total = torch.exp(-s1) * ce + torch.exp(-s2) * l1 + 0.5 * (s1 + s2)
        return {
            "ce": ce,
            "l1": l1,
            "log_var_trimap": s1.detach().clone(),
            "log_var_alpha": s2.detach().clone(),
            "weight_trimap": torch.exp(-s1).detach(),
            "weight_alpha": torch.exp(-s2).detach(),
            "total": total,
        }


def adamatting_guidance(
    alpha: np.ndarray, rng: np.random.Generator | None = None, train: bool = True, **options: Any
) -> np.ndarray:
    """The user trimap AdaMatting refines: the DIM trimap rule (see :func:`dim_guidance`)."""
    return dim_guidance(alpha, rng, train, **options)


def adamatting_train_step(
    model: AdaMattingNet,
    loss_module: AdaMattingLoss,
    batch: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator | None = None,
    step: int = 0,
    total_steps: int = 1,
    **amp: Any,
) -> dict[str, torch.Tensor]:
    """One AdaMatting step (network and log-variances updated together).

    ``generator``, ``step``, ``total_steps`` are unused. Raises if the optimiser does not hold
    the loss module's log-variances.
    """
    check_optimizer_covers(optimizer, loss_module.parameters(), "AdaMatting loss (its log-variances)")
    model.train()
    return optimise(
        optimizer,
        lambda: model(batch["image"], batch["trimap"]),
        lambda pred: loss_module(pred, batch),
        device_type=batch["image"].device.type,
        **amp,
    )

