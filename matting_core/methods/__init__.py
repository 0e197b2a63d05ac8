"""The related methods as options of the same pipeline: name → :class:`Method` table.

``METHODS`` maps the params.yaml ``method:`` value to a :class:`Method`:

==========  ==============  ===========================================================
name        required_input  what it is (module)
==========  ==============  ===========================================================
mlb         —               the main method: UNetMatting + MLB stages (matting_core.models)
dim         trimap          Deep Image Matting (dim.py)
adamatting  trimap          AdaMatting (adamatting.py)
mgm         mask            Mask-Guided Matting (mgm.py)
mgm_wild    mask            MGM in the wild: MGM + instance composites + EMA self-training
mam         prompt          Matting Anything: prompt → segmenter → M2M (mam.py)
==========  ==============  ===========================================================

How the pipeline uses it (every function is pure; nothing reads params.yaml or a path)::

    method = get_method(name)                    # ValueError listing the valid names
    spec = method.method_spec(network="unet_r18x0.5", **architecture_options)
    model = method.build(spec)                   # model.network_spec == spec (plain dict)
    method.init_from_network(model, pretrained)  # optional: seg-pretrained UNetMatting weights
    loss = method.make_loss(model, **recipe_options)       # nn.Module; .to(device) it
    optimizer = Adam(method.optimizer_parameters(model, loss), lr)
    # data: views as today, then per sample (numpy, after the geometry):
    views[method.required_input] = method.make_guidance(views["alpha"], rng, train=True)
    terms = method.train_step(model, loss, batch, optimizer, generator, step, total_steps,
                              scheduler=..., scaler=..., autocast_dtype=...)  # detached dict
    alpha = method.predict(model, image, guidance)         # (N,1,H,W) in [0,1]
    alpha = predict_image(model, image_hw3, user_guidance) # numpy, test-time resize

Checkpoints: ``save_checkpoint(path, model)`` stores ``model.network_spec``;
:func:`build_from_spec` rebuilds any spec — a method spec (has a ``method`` key) or a plain
network spec (the main method). ``matting_core.checkpoint.load_model`` calls
``models.build_network_from_spec`` today, which refuses a method spec with
"unknown network option(s) ['method', ...]"; the one-line change there is to call
``matting_core.methods.build_from_spec`` instead (it delegates plain network specs to
``build_network_from_spec``, so existing checkpoints load unchanged).

Specs are flat plain dicts: ``{"method", "name" (the backbone network), depth, width,
aspp_rates, aspp_channels, decoder_channels, pad_multiple, <method options>}``; for MAM the
network keys describe the default segmenter (the project's seg network).

Guidance formats (what ``make_guidance`` returns per sample and ``predict`` takes batched):
trimap (1,H,W) float32 in {0, 128/255, 1}; mask (1,H,W) float32 in {0,1}; prompt (5,)
float32 ``[kind, x0, y0, x1, y1]`` (see mam.py). :func:`normalize_guidance` turns user files
(uint8 trimaps/masks) into these.

Parameter counts (all parameters, default options, measured with ``count_parameters`` on the
current backbone — strides 2/4/8/16/32, 5-level decoder; MAM's frozen segmenter is the
same-named UNetMatting and is listed separately):

===============  ==========  ==========  ============================================
method           r18×0.5     r18         note
===============  ==========  ==========  ============================================
mlb (unet)       4.47 M      17.87 M     matting_core.models
dim              4.50 M      17.95 M     refinement stage 0.02 M / 0.08 M
adamatting       5.12 M      20.46 M     two decoders + propagation unit
mgm / mgm_wild   4.49 M      17.94 M     three heads (strides 8/4/1), no boundary head
mam              0.70 M      2.71 M      trainable M2M (MAM: ~2.7 M); + frozen segmenter
===============  ==========  ==========  ============================================
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from matting_core.models import build_network, build_network_from_spec, network_spec

from . import adamatting, dim, mam, mgm, mgm_wild
from .common import transfer_unet_weights

__all__ = [
    "METHODS",
    "Method",
    "build",
    "build_from_spec",
    "get_method",
    "method_of",
    "normalize_guidance",
    "optimizer_parameters",
    "predict",
    "predict_image",
    "apply_known_regions",
]

GUIDANCE_HELP = {
    "trimap": "a trimap per image (0 background, 128 unknown, 255 foreground; CLI: --trimap DIR)",
    "mask": "a coarse mask of the person per image (0/255 or [0, 1]; CLI: --mask DIR)",
    "prompt": "a box X0,Y0,X1,Y1 or a point X,Y in image pixels (CLI: --box X0,Y0,X1,Y1 or --point X,Y)",
}


@dataclass(frozen=True)
class Method:
    """One method's factory functions (see the module doc for how they fit together).

    Attributes:
        name: the params.yaml value.
        summary: one line for reports and CLI messages.
        required_input: ``"trimap"`` | ``"mask"`` | ``"prompt"`` | ``None`` (mlb).
        batch_keys / optional_batch_keys: what :meth:`train_step` reads from the batch.
        network: constructor of the network (spec keys → kwargs); None for MAM/mlb builders.
        spec_defaults: the method's architecture options and their defaults.
        guidance: ``(alpha, rng, train, **options) → guidance`` for one sample.
        loss: ``(model, **options) → loss module``.
        step: ``(model, loss, batch, optimizer, generator, step, total_steps, **amp)``.
        pretrained_key_map: target prefix → UNetMatting prefix for :meth:`init_from_network`.
        frozen_prefixes: parameter-name prefixes that never train (MAM's segmenter).
    """

    name: str
    summary: str
    required_input: str | None
    batch_keys: tuple[str, ...] = ()
    optional_batch_keys: tuple[str, ...] = ()
    network: Callable[..., nn.Module] | None = None
    spec_defaults: Mapping[str, Any] = field(default_factory=dict)
    guidance: Callable[..., np.ndarray] | None = None
    loss: Callable[..., nn.Module] | None = None
    step: Callable[..., dict[str, torch.Tensor]] | None = None
    pretrained_key_map: Mapping[str, str] = field(default_factory=dict)
    frozen_prefixes: tuple[str, ...] = ()
    builder: Callable[[dict[str, Any]], nn.Module] | None = None

    # ------------------------------------------------------------------ specs and models

    @property
    def guidance_help(self) -> str:
        """What the user must give at prediction time (for CLI error messages)."""
        if self.required_input is None:
            return "no guidance (RGB only)"
        return GUIDANCE_HELP[self.required_input]

    def method_spec(self, network: str = "unet_r18x0.5", **options: Any) -> dict[str, Any]:
        """The plain dict that rebuilds this method's network (JSON/YAML/weights_only safe).

        ``network``: a name in ``matting_core.models.NETWORKS`` (the backbone; for MAM the
        default segmenter). ``options``: network keys (depth, width, …) and this method's
        :attr:`spec_defaults` keys. Unknown keys raise a ValueError listing the valid ones.
        """
        net_keys = set(network_spec(network)) - {"name"}
        net_options = {k: v for k, v in options.items() if k in net_keys}
        own = {k: v for k, v in options.items() if k not in net_keys}
        unknown = sorted(set(own) - set(self.spec_defaults))
        if unknown:
            valid = sorted(net_keys | set(self.spec_defaults))
            raise ValueError(f"unknown {self.name} option(s) {unknown}; valid options: {', '.join(valid)}")
        spec = network_spec(network, **net_options)
        if self.name == "mlb":
            return spec
        spec = {"method": self.name, **spec, **copy.deepcopy(dict(self.spec_defaults)), **own}
        return _plain_spec(spec)

    def build(self, spec: Mapping[str, Any]) -> nn.Module:
        """Build the network of ``spec`` (from :meth:`method_spec`); sets ``.network_spec``."""
        spec = dict(spec)
        if self.name == "mlb":
            return build_network_from_spec({k: v for k, v in spec.items() if k != "method"})
        if spec.get("method") != self.name:
            raise ValueError(f"spec is for method {spec.get('method')!r}, not {self.name!r}")
        expected = set(self.method_spec(spec.get("name", "unet_r18x0.5")))
        unknown = sorted(set(spec) - expected)
        if unknown:
            raise ValueError(f"unknown {self.name} spec key(s) {unknown}; valid keys: {', '.join(sorted(expected))}")
        spec = {**self.method_spec(spec["name"]), **spec}
        if self.builder is not None:
            model = self.builder(spec)
        else:
            kwargs = {k: v for k, v in spec.items() if k not in ("method", "name")}
            model = self.network(**kwargs)
        model.network_spec = spec
        return model

    def init_from_network(
        self, model: nn.Module, source: nn.Module | Mapping[str, torch.Tensor]
    ) -> dict[str, list[str]]:
        """Copy a (seg-)pretrained UNetMatting's weights into ``model`` where they fit.

        Encoder, ASPP and decoder blocks are copied; the stem gets zeros for the guidance
        channel(s); heads and method-specific modules keep their initialisation. For MAM the
        source becomes the frozen segmenter. Returns ``{"copied", "expanded", "skipped"}``.
        For mgm_wild, create the loss (EMA teacher) afterwards or call its ``reset_teacher``.
        """
        if self.name == "mlb":
            raise ValueError("mlb networks load pretrained weights with load_state_dict directly")
        state = source.state_dict() if isinstance(source, nn.Module) else source
        return transfer_unet_weights(model, state, self.pretrained_key_map)

    # ------------------------------------------------------------------ training

    def make_guidance(
        self, alpha: np.ndarray, rng: np.random.Generator | None = None, train: bool = True, **options: Any
    ) -> np.ndarray:
        """The method's guidance for one sample from its GT alpha (H, W) or (1, H, W).

        Training (``train=True``) is random and needs ``rng``; evaluation is deterministic.
        Returns a trimap/mask (1, H, W) float32 or a prompt (5,) float32.
        """
        if self.guidance is None:
            raise ValueError(f"method {self.name!r} takes no guidance")
        return self.guidance(alpha, rng, train, **options)

    def make_loss(self, model: nn.Module | None = None, **options: Any) -> nn.Module:
        """The method's loss module (it also carries the training recipe's options)."""
        if self.loss is None:
            raise ValueError(f"method {self.name!r} trains through the pretrain/teacher/student stages")
        return self.loss(model, **options)

    def optimizer_parameters(self, model: nn.Module, loss_module: nn.Module | None = None) -> list[nn.Parameter]:
        """Everything the optimiser must hold: the model (minus frozen parts) + learned loss weights.

        DIM's phase freezing toggles ``requires_grad`` per step, so all DIM parameters are
        listed; MAM's segmenter is never listed; AdaMatting's log-variances are.
        """
        params = [p for n, p in model.named_parameters() if not n.startswith(self.frozen_prefixes)]
        if loss_module is not None:
            params += [p for p in loss_module.parameters() if p.requires_grad]
        seen: set[int] = set()
        return [p for p in params if not (id(p) in seen or seen.add(id(p)))]

    def train_step(
        self,
        model: nn.Module,
        loss_module: nn.Module,
        batch: Mapping[str, torch.Tensor],
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator | None = None,
        step: int = 0,
        total_steps: int = 1,
        *,
        scheduler: Any | None = None,
        scaler: Any | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """One optimisation step; returns the detached loss terms (with ``total``).

        Args:
            batch: tensors on the model's device, keys :attr:`batch_keys` (+ optional ones).
            generator: CPU ``torch.Generator`` for in-step randomness (MGM band widths); None
                → seeded with ``step``.
            step, total_steps: position in the run (DIM phases, MGM warm-up, self-training).
            scheduler, scaler, autocast_dtype: as ``matting_core.training.train_step``.
        """
        if self.step is None:
            raise ValueError(f"method {self.name!r} trains through the pretrain/teacher/student stages")
        missing = [k for k in self.batch_keys if k not in batch]
        if missing:
            raise ValueError(f"{self.name} training needs batch keys {missing}; the batch has {sorted(batch)}")
        return self.step(
            model, loss_module, batch, optimizer, generator, int(step), int(total_steps),
            scheduler=scheduler, scaler=scaler, autocast_dtype=autocast_dtype,
        )

    # ------------------------------------------------------------------ inference

    def predict(self, model: nn.Module, image: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """Alpha (N,1,H,W) in [0,1] for image (N,3,H,W) in [0,1] and the batched guidance.

        Runs in eval mode without gradients (the model's mode is restored). Raises a
        ValueError saying what is needed when the guidance is missing.
        """
        if self.required_input is not None and guidance is None:
            raise ValueError(f"a {self.name} model needs {self.guidance_help}")
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                if self.required_input is None:
                    out = model(image)
                else:
                    dtype = image.dtype if self.required_input != "prompt" else torch.float32
                    out = model(image, guidance.to(image.device, dtype))
        finally:
            model.train(was_training)
        return out["alpha"]


def _plain_spec(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain_spec(v) for v in value]
    if isinstance(value, list):
        return [_plain_spec(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain_spec(v) for k, v in value.items()}
    return value


def _build_mam(spec: dict[str, Any]) -> nn.Module:
    net_kwargs = {k: spec[k] for k in network_spec(spec["name"]) if k != "name"}
    if spec["segmenter"] == "own":
        segmenter: Any = mam.OwnSegmenter(
            build_network(spec["name"], **net_kwargs), spec["feature_module"], spec["mask_threshold"]
        )
    elif spec["segmenter"] == "sam":
        segmenter = mam.SamSegmenter(spec["sam_checkpoint"], spec["sam_model_type"])
    else:
        raise ValueError(f"unknown segmenter {spec['segmenter']!r}; valid: own, sam")
    m2m = mam.MaskToMatte(
        segmenter.feature_channels,
        width=spec["width"],
        channels=spec["m2m_channels"],
        blocks=spec["m2m_blocks"],
        head_channels=spec["head_channels"],
        pad_multiple=spec["pad_multiple"],
        spectral=spec["spectral_norm"],
        test_band_widths=spec["test_band_widths"],
    )
    return mam.MAMNet(segmenter, m2m)


_BODY_KEYS = {"body.encoder.": "encoder.", "body.aspp.": "aspp."}
_MGM_DEFAULTS = {"head_channels": 32, "test_band_widths": list(mgm.DEFAULT_TEST_BAND_WIDTHS)}

METHODS: dict[str, Method] = {
    "mlb": Method(
        name="mlb",
        summary="Matte Label Blending: trimap-free U-Net, pretrain → teacher → MLB student (main method)",
        required_input=None,
    ),
    "dim": Method(
        name="dim",
        summary="Deep Image Matting: RGB + trimap encoder-decoder with a refinement stage",
        required_input="trimap",
        batch_keys=("image", "trimap", "alpha", "fg", "bg"),
        network=dim.DIMNet,
        spec_defaults={"refine_channels": 64},
        guidance=dim.dim_guidance,
        loss=lambda model=None, **options: dim.DIMLoss(**options),
        step=dim.dim_train_step,
        pretrained_key_map={**_BODY_KEYS, "decoder.": ""},
    ),
    "adamatting": Method(
        name="adamatting",
        summary="AdaMatting: trimap adaptation + alpha decoders, ConvLSTM propagation, uncertainty loss",
        required_input="trimap",
        batch_keys=("image", "trimap", "alpha"),
        network=adamatting.AdaMattingNet,
        spec_defaults={"propagation_steps": 3, "propagation_channels": 16},
        guidance=adamatting.adamatting_guidance,
        loss=lambda model=None, **options: adamatting.AdaMattingLoss(**options),
        step=adamatting.adamatting_train_step,
        pretrained_key_map={**_BODY_KEYS, "trimap_decoder.": "", "alpha_decoder.": ""},
    ),
    "mgm": Method(
        name="mgm",
        summary="Mask-Guided Matting: RGB + coarse mask, progressive refinement at strides 8/4/1",
        required_input="mask",
        batch_keys=("image", "mask", "alpha"),
        optional_batch_keys=("fg", "bg"),
        network=mgm.MGMNet,
        spec_defaults=_MGM_DEFAULTS,
        guidance=mgm.mgm_guidance,
        loss=lambda model=None, **options: mgm.MGMLoss(**options),
        step=mgm.mgm_train_step,
        pretrained_key_map={**_BODY_KEYS, "decoder.": ""},
    ),
    "mgm_wild": Method(
        name="mgm_wild",
        summary="MGM in the wild: MGM + two-instance composites + EMA self-training on natural photos",
        required_input="mask",
        batch_keys=("image", "mask", "alpha"),
        optional_batch_keys=("fg", "bg", *mgm_wild.NATURAL_KEYS),
        network=mgm.MGMNet,
        spec_defaults=_MGM_DEFAULTS,
        guidance=mgm.mgm_guidance,
        loss=lambda model, **options: mgm_wild.MGMWildLoss(model, **options),
        step=mgm_wild.mgm_wild_train_step,
        pretrained_key_map={**_BODY_KEYS, "decoder.": ""},
    ),
    "mam": Method(
        name="mam",
        summary="Matting Anything: box/point prompt → frozen segmenter mask → light mask-to-matte module",
        required_input="prompt",
        batch_keys=("image", "prompt", "alpha"),
        optional_batch_keys=("fg", "bg"),
        spec_defaults={
            "segmenter": "own",
            "feature_module": "dec16",
            "mask_threshold": 0.5,
            "sam_checkpoint": "",
            "sam_model_type": "vit_b",
            "m2m_channels": [128, 64, 32],
            "m2m_blocks": [3, 3, 2],
            "head_channels": 32,
            "spectral_norm": True,
            "test_band_widths": list(mgm.DEFAULT_TEST_BAND_WIDTHS),
        },
        guidance=mam.prompt_from_alpha,
        loss=lambda model=None, **options: mgm.MGMLoss(**options),
        step=mam.mam_train_step,
        pretrained_key_map={"segmenter.network.": ""},
        frozen_prefixes=("segmenter.",),
        builder=_build_mam,
    ),
}


def get_method(name: str) -> Method:
    """Look ``name`` up in :data:`METHODS`; an unknown name raises a ValueError listing them."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}") from None


def method_of(spec_or_model: Mapping[str, Any] | nn.Module) -> Method:
    """The :class:`Method` of a spec or of a built model (no ``method`` key → mlb)."""
    spec = getattr(spec_or_model, "network_spec", spec_or_model)
    if not isinstance(spec, Mapping):
        raise ValueError("expected a network/method spec dict or a model with .network_spec")
    return get_method(spec.get("method", "mlb"))


def build(spec: Mapping[str, Any]) -> nn.Module:
    """Build any spec: a method spec (``method`` key) or a plain network spec (mlb)."""
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(f"a spec is a dict with a 'name' key, got {spec!r}")
    return method_of(spec).build(spec)


build_from_spec = build  # the name checkpoint loading should call (see the module doc)


def optimizer_parameters(name: str, model: nn.Module, loss_module: nn.Module | None = None) -> list[nn.Parameter]:
    """:meth:`Method.optimizer_parameters` of method ``name``."""
    return get_method(name).optimizer_parameters(model, loss_module)


def predict(model: nn.Module, image: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
    """:meth:`Method.predict` of the model's own method (read from ``model.network_spec``)."""
    return method_of(model).predict(model, image, guidance)


def normalize_guidance(required_input: str, value: Any) -> np.ndarray:
    """User guidance → the model's format (see the module doc).

    trimap: (H, W) uint8 0/128/255 (or float in [0, 1]) → (1, H, W) float32 /255;
    mask: (H, W) uint8 (≥ 128) or float (≥ 0.5) → (1, H, W) float32 {0, 1};
    prompt: a (5,) prompt (``mam.box_prompt`` / ``mam.point_prompt``) → float32 (5,).
    """
    array = np.asarray(value)
    if required_input == "prompt":
        if array.shape != (5,):
            raise ValueError(f"a prompt is a (5,) vector [kind, x0, y0, x1, y1], got shape {array.shape}")
        return array.astype(np.float32)
    if required_input not in ("trimap", "mask"):
        raise ValueError(f"unknown guidance kind {required_input!r}; valid: trimap, mask, prompt")
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        array = array[..., 0]  # grey PNG read as RGB(A): every channel is the same
    if array.ndim != 2:
        raise ValueError(f"a {required_input} must be (H, W), got shape {np.asarray(value).shape}")
    if array.dtype == np.uint8:
        scaled = array.astype(np.float32) / np.float32(255.0)
    elif array.dtype.kind == "f":
        scaled = np.clip(array.astype(np.float32), 0.0, 1.0)
    else:
        raise ValueError(f"a {required_input} must be uint8 or float, got {array.dtype}")
    if required_input == "mask":
        scaled = (scaled >= 0.5).astype(np.float32)
    return scaled[None]


def predict_image(
    model: nn.Module,
    image: np.ndarray,
    guidance: Any = None,
    short_side: int | None = 512,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Test-time prediction for one image with any method's model (METHOD.md §1 "Test time").

    The image is resized so its shorter side is ``short_side``; a trimap/mask is resized the
    same way with nearest-neighbour sampling, a prompt is mapped with :func:`mam.scale_prompt`;
    the alpha goes back to (H, W) bilinearly and is clipped to [0, 1]. With a trimap, its
    known regions are kept as given (0 background, 1 foreground; the network's alpha only
    fills the unknown region), as DIM's and AdaMatting's evaluation protocols do: the user
    stated them, so a network's error there is not an error of the matte.

    Args:
        model: a network built by :func:`build` (its spec says the method).
        image: (H, W, 3) RGB, uint8 or float in [0, 1].
        guidance: user guidance as :func:`normalize_guidance` accepts (None for mlb).

    Returns:
        (H, W) float32 alpha in [0, 1].
    """
    from matting_core.inference import predict_alpha, resize_short_side

    method = method_of(model)
    if method.required_input is None:
        return predict_alpha(model, image, short_side, device)
    if guidance is None:
        raise ValueError(f"a {method.name} model needs {method.guidance_help}")
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be an (H, W, 3) RGB array, got {getattr(image, 'shape', type(image))}")
    height, width = image.shape[:2]
    small = resize_short_side(image, short_side) if short_side else image  # convert only the small copy
    resized = small.astype(np.float32) / 255.0 if small.dtype == np.uint8 else np.clip(small.astype(np.float32), 0, 1)
    new_h, new_w = resized.shape[:2]
    g = normalize_guidance(method.required_input, guidance)
    known = g[0] if method.required_input == "trimap" else None
    if method.required_input == "prompt":
        g = mam.scale_prompt(g, new_w / width, new_h / height)[None]
    else:
        if g.shape[1:] != (height, width):
            raise ValueError(f"{method.required_input} is {g.shape[1:]}, the image is {(height, width)}")
        if (new_h, new_w) != (height, width):
            g = cv2.resize(g[0], (new_w, new_h), interpolation=cv2.INTER_NEAREST_EXACT)[None]
        g = g[None]
    if device is None:
        device = next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))[None].to(device)
    alpha = method.predict(model, x, torch.from_numpy(np.ascontiguousarray(g)))[0, 0].float().cpu().numpy()
    if alpha.shape != (height, width):
        alpha = cv2.resize(alpha, (width, height), interpolation=cv2.INTER_LINEAR)
    alpha = np.clip(alpha, 0.0, 1.0)
    if known is not None:
        alpha = apply_known_regions(alpha, known)
    return alpha.astype(np.float32)


def apply_known_regions(alpha: np.ndarray, trimap: np.ndarray) -> np.ndarray:
    """``alpha`` with the trimap's known regions set: 0 where trimap < ¼, 1 where > ¾.

    ``trimap`` is (H, W) in [0, 1] (0 background, 0.5 unknown, 1 foreground), the same size
    as ``alpha``; the thresholds keep a resized or JPEG-softened trimap's classes.
    """
    if trimap.shape != alpha.shape:
        raise ValueError(f"trimap is {trimap.shape}, alpha is {alpha.shape}")
    out = np.where(trimap < 0.25, 0.0, alpha)
    return np.where(trimap > 0.75, 1.0, out).astype(alpha.dtype, copy=False)
