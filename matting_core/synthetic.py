"""Embedded procedural dataset: people with hair, people-free backgrounds, "natural" photos.

The project trains human matting from a few exact matte labels and many coarse segmentation
labels. This module makes a self-contained stand-in for both kinds of data, reproducing the
*problem* the method exists for:

* ``make_foreground`` -- a matte label: an RGB person cut-out ``F`` with its exact alpha
  ``alpha``. Core body alpha is exactly 1, background exactly 0, and a realistic boundary
  band (anti-aliased silhouette, thin sub-pixel hair strands, flyaways, sometimes a
  translucent garment) is fractional.
* ``make_background`` -- a people-free background ``B`` for DIM-style compositing
  ``I = alpha * F + (1 - alpha) * B``.
* ``make_natural_scene`` -- a "natural photo": a person rendered into a cluttered scene
  (person-like distractors, objects near the figure, occluders) under a shared light
  (colour cast, exposure, light direction, colour spill), then camera effects (defocus or
  motion blur, vignetting, sensor noise, JPEG). It returns the exact alpha the image shows
  and a cheap, coarse segmentation label ``coarse_mask`` in {0, 1}. These images are
  deliberately unlike plain composites of ``make_foreground`` over ``make_background``:
  that is the synthetic-to-natural domain gap a teacher trained on composites must cross.

Conventions
-----------
* ``size`` is an ``int`` (square ``size x size``) or an ``(H, W)`` tuple, each >= 16.
* Images are RGB ``uint8 (H, W, 3)``; alphas are ``float32 (H, W)`` in ``[0, 1]`` quantised
  to multiples of 1/255 (so an 8-bit PNG stores them losslessly; exact 0 and exact 1 are
  present); masks are ``uint8 (H, W)`` in ``{0, 1}``.
* Every random function takes an explicit ``rng: np.random.Generator``; there is no global
  random state and no file I/O.
* Deterministic per-item seeding: item ``i`` of kind ``k`` is drawn from
  ``np.random.default_rng([seed, KIND_IDS[k], i])`` (see :func:`item_rng`), so any single
  item can be regenerated alone and adding items never changes earlier ones.

Example
-------
>>> fg, alpha = foreground_item(seed=0, i=3, size=128)
>>> fg.shape, alpha.dtype, float(alpha.max())
((128, 128, 3), dtype('float32'), 1.0)
>>> image, alpha, coarse = natural_item(seed=0, i=7, size=(96, 160))
>>> image.shape, coarse.dtype
((96, 160, 3), dtype('uint8'))
"""

from __future__ import annotations

import math
from typing import Union

import cv2
import numpy as np

__all__ = [
    "KIND_IDS",
    "Size",
    "item_rng",
    "make_foreground",
    "make_background",
    "make_natural_scene",
    "make_coarse_mask",
    "foreground_item",
    "background_item",
    "natural_item",
]

Size = Union[int, tuple[int, int]]

#: Kind name -> id used in the per-item seed ``[seed, kind_id, i]``.
KIND_IDS: dict[str, int] = {"foreground": 0, "background": 1, "natural": 2}

_SS = 4  # supersampling factor for the alpha rasteriser (strands 1 px wide at 4x -> ~0.3 px)
_SHIFT = 4  # fixed-point bits for sub-pixel vertex positions in cv2 drawing calls
_FP = float(1 << _SHIFT)


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------
def _hw(size: Size) -> tuple[int, int]:
    """Normalise ``size`` (int or (H, W)) to ``(H, W)``; raise on bad values."""
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        try:
            h, w = (int(v) for v in size)  # type: ignore[union-attr]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"size must be an int or an (H, W) pair, got {size!r}") from exc
    if h < 16 or w < 16:
        raise ValueError(f"size must be at least 16x16, got (H, W) = ({h}, {w})")
    return h, w


def item_rng(seed: int, kind: str, i: int) -> np.random.Generator:
    """Generator for item ``i`` of ``kind`` ('foreground' | 'background' | 'natural').

    ``np.random.default_rng([seed, KIND_IDS[kind], i])``; ``seed`` and ``i`` must be >= 0.
    """
    if kind not in KIND_IDS:
        raise ValueError(f"unknown kind {kind!r}; valid kinds: {sorted(KIND_IDS)}")
    if int(seed) < 0 or int(i) < 0:
        raise ValueError(f"seed and i must be non-negative, got seed={seed}, i={i}")
    return np.random.default_rng([int(seed), KIND_IDS[kind], int(i)])


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _quantise_alpha(alpha: np.ndarray) -> np.ndarray:
    """Round to multiples of 1/255 (exact 0 and 1 survive), float32 in [0, 1]."""
    return (np.round(np.clip(alpha, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def _to_fp(pts: np.ndarray, scale: float) -> np.ndarray:
    """Float (N, 2) pixel coords -> int32 fixed-point (N, 1, 2) for cv2 with ``_SHIFT``."""
    return np.round(np.asarray(pts, np.float64) * (scale * _FP)).astype(np.int32).reshape(-1, 1, 2)


def _fill(canvas: np.ndarray, polys: list[np.ndarray], value: float, scale: float) -> None:
    """Anti-aliased fill of float (N, 2) polygons (output-pixel units) on ``canvas``.

    One ``fillPoly`` call per polygon: a single call with several polygons uses an
    even-odd rule and would punch holes where they overlap.
    """
    for p in polys:
        cv2.fillPoly(canvas, [_to_fp(p, scale)], value, cv2.LINE_AA, _SHIFT)


def _rot(pts: np.ndarray, cx: float, cy: float, ang: float) -> np.ndarray:
    """Rotate (N, 2) points by ``ang`` radians about (cx, cy) (image coords, y down)."""
    c, s = math.cos(ang), math.sin(ang)
    d = np.asarray(pts, np.float64) - (cx, cy)
    return np.stack([cx + c * d[:, 0] - s * d[:, 1], cy + s * d[:, 0] + c * d[:, 1]], 1)


def _ellipse(
    cx: float,
    cy: float,
    rx: float,
    ry: float,
    ang: float = 0.0,
    n: int = 64,
    rng: np.random.Generator | None = None,
    wobble: float = 0.0,
) -> np.ndarray:
    """(n, 2) ellipse polygon; ``wobble`` > 0 modulates the radius with random harmonics."""
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    r = np.ones_like(t)
    if rng is not None and wobble > 0:
        for k in (2, 3, 5, 7, 11):
            r += wobble / k**0.7 * rng.normal() * np.cos(k * t + rng.uniform(0, 2 * math.pi))
        r = np.maximum(r, 0.4)
    pts = np.stack([rx * r * np.cos(t), ry * r * np.sin(t)], 1)
    return _rot(pts, 0.0, 0.0, ang) + (cx, cy)


def _capsule(p0, p1, r0: float, r1: float, n: int = 10) -> np.ndarray:
    """Tapered capsule polygon from p0 (radius r0) to p1 (radius r1): a limb segment."""
    p0 = np.asarray(p0, np.float64)
    p1 = np.asarray(p1, np.float64)
    a = math.atan2(p1[1] - p0[1], p1[0] - p0[0])
    t1 = np.linspace(a - math.pi / 2, a + math.pi / 2, n)
    t0 = np.linspace(a + math.pi / 2, a + 3 * math.pi / 2, n)
    arc1 = p1 + r1 * np.stack([np.cos(t1), np.sin(t1)], 1)
    arc0 = p0 + r0 * np.stack([np.cos(t0), np.sin(t0)], 1)
    return np.concatenate([arc1, arc0], 0)


def _bezier(p0, p1, p2, n: int = 12) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    p0, p1, p2 = (np.asarray(p, np.float64) for p in (p0, p1, p2))
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _value_noise(
    rng: np.random.Generator, h: int, w: int, cell: float, octaves: int = 3, gain: float = 0.5
) -> np.ndarray:
    """Multi-octave value noise, float32 (h, w), roughly in [0, 1]; ``cell`` = coarsest period."""
    out = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    for _ in range(octaves):
        gh = max(2, int(round(h / max(cell, 1.0))) + 2)
        gw = max(2, int(round(w / max(cell, 1.0))) + 2)
        grid = rng.random((gh, gw), dtype=np.float32)
        out += amp * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
        total += amp
        amp *= gain
        cell = max(cell / 2.0, 2.0)
    return np.clip(out / total, 0.0, 1.0)


def _hsv_colour(rng: np.random.Generator, h=(0, 1), s=(0, 1), v=(0, 1)) -> np.ndarray:
    """Random RGB colour (3,) float32 in [0, 1] from HSV ranges (hue in turns)."""
    hh = _u(rng, *h) % 1.0
    ss = _u(rng, *s)
    vv = _u(rng, *v)
    i = int(hh * 6) % 6
    f = hh * 6 - int(hh * 6)
    p, q, t = vv * (1 - ss), vv * (1 - f * ss), vv * (1 - (1 - f) * ss)
    rgb = [(vv, t, p), (q, vv, p), (p, vv, t), (p, q, vv), (t, p, vv), (vv, p, q)][i]
    return np.asarray(rgb, np.float32)


def _gauss_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0.05:
        return img
    k = int(2 * math.ceil(3 * sigma) + 1)
    return cv2.GaussianBlur(img, (k, k), sigma, borderType=cv2.BORDER_REFLECT)


# --------------------------------------------------------------------------------------
# colours and textures
# --------------------------------------------------------------------------------------
_SKIN_TONES = np.asarray(
    [
        (255, 224, 196), (241, 194, 167), (234, 192, 134), (224, 172, 105), (198, 134, 66),
        (170, 110, 70), (141, 85, 36), (110, 70, 45), (92, 60, 40), (70, 45, 32),
    ],
    np.float32,
) / 255.0

_HAIR_COLOURS = np.asarray(
    [
        (22, 18, 16), (35, 26, 20), (60, 40, 28), (90, 62, 40), (120, 85, 55),
        (190, 160, 105), (225, 200, 140), (140, 60, 30), (170, 168, 162), (235, 235, 230),
    ],
    np.float32,
) / 255.0


_HAIR_WEIGHTS = np.asarray([0.18, 0.16, 0.16, 0.13, 0.1, 0.07, 0.06, 0.06, 0.05, 0.03])
_HAIR_WEIGHTS = _HAIR_WEIGHTS / _HAIR_WEIGHTS.sum()


def _skin_colour(rng: np.random.Generator) -> np.ndarray:
    """A skin tone (3,) in [0, 1]: palette from light to dark, jittered."""
    c = _SKIN_TONES[rng.integers(len(_SKIN_TONES))]
    return np.clip(c * _u(rng, 0.92, 1.06) + rng.normal(0, 0.015, 3), 0, 1).astype(np.float32)


def _hair_colour(rng: np.random.Generator) -> np.ndarray:
    """Hair colour: natural palette (black .. blond, red, grey) or, rarely, dyed."""
    if rng.random() < 0.08:
        return _hsv_colour(rng, (0, 1), (0.5, 0.9), (0.35, 0.85))
    c = _HAIR_COLOURS[rng.choice(len(_HAIR_COLOURS), p=_HAIR_WEIGHTS)]
    return np.clip(c * _u(rng, 0.85, 1.15), 0, 1).astype(np.float32)


def _fabric(rng: np.random.Generator, h: int, w: int, u: float) -> np.ndarray:
    """Clothing texture (h, w, 3) float32 in [0, 1]: base colour, a pattern, fold shading."""
    base = _hsv_colour(rng, (0, 1), (0.0, 0.85), (0.12, 0.95))
    img = np.broadcast_to(base, (h, w, 3)).astype(np.float32).copy()
    kind = rng.choice(["plain", "stripes", "checks", "dots", "print"], p=[0.3, 0.25, 0.15, 0.1, 0.2])
    if kind != "plain":
        other = _hsv_colour(rng, (0, 1), (0.0, 0.9), (0.1, 1.0))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        ang = _u(rng, 0, math.pi)
        period = _u(rng, 0.03, 0.12) * u
        proj = xx * math.cos(ang) + yy * math.sin(ang)
        if kind == "stripes":
            m = (np.sin(2 * math.pi * proj / period) > _u(rng, -0.5, 0.5)).astype(np.float32)
        elif kind == "checks":
            proj2 = -xx * math.sin(ang) + yy * math.cos(ang)
            m = ((np.floor(proj / period) + np.floor(proj2 / period)) % 2).astype(np.float32)
        elif kind == "dots":
            proj2 = -xx * math.sin(ang) + yy * math.cos(ang)
            d = (np.mod(proj, period) - period / 2) ** 2 + (np.mod(proj2, period) - period / 2) ** 2
            m = (d < (period * _u(rng, 0.15, 0.3)) ** 2).astype(np.float32)
        else:
            m = (_value_noise(rng, h, w, _u(rng, 0.04, 0.15) * u, 2) > 0.5).astype(np.float32)
        m = _gauss_blur(m, 0.5)
        img = img * (1 - m[..., None]) + other * m[..., None]
    folds = _value_noise(rng, h, w, _u(rng, 0.15, 0.4) * u, 2)
    img *= (0.75 + 0.45 * folds)[..., None]
    img += rng.normal(0, 0.015, (h, w, 1)).astype(np.float32)  # weave grain
    return np.clip(img, 0, 1)


def _skin_texture(rng: np.random.Generator, h: int, w: int, u: float, tone: np.ndarray) -> np.ndarray:
    blotch = _value_noise(rng, h, w, 0.1 * u, 2)
    img = tone[None, None, :] * (0.93 + 0.12 * blotch)[..., None]
    return np.clip(img, 0, 1).astype(np.float32)


def _hair_texture(
    rng: np.random.Generator, h: int, w: int, u: float, colour: np.ndarray
) -> np.ndarray:
    """Streaky hair colour (h, w, 3): strands of lighter/darker shades over the base colour."""
    shade = np.full((h, w), 0.5, np.float32)
    n = int(40 + 0.8 * (h + w))
    p0 = rng.uniform(0, 1, (n, 2)) * (w, h)
    ang = rng.normal(math.pi / 2, 0.6, n)
    length = rng.uniform(0.05, 0.3, n) * u
    p1 = p0 + length[:, None] * np.stack([np.cos(ang), np.sin(ang)], 1)
    segs = np.round(np.stack([p0, p1], 1) * _FP).astype(np.int32)  # (n, 2, 2) fixed point
    vals = rng.uniform(0.2, 0.85, n)
    for lo, hi in ((0.0, 0.4), (0.4, 0.6), (0.6, 1.0)):
        sel = segs[(vals >= lo) & (vals < hi)]
        if len(sel):
            cv2.polylines(shade, list(sel), False, float((lo + hi) / 2), 1, cv2.LINE_AA, _SHIFT)
    shade = _gauss_blur(shade, 0.6)
    img = colour[None, None, :] * (0.7 + 0.6 * shade)[..., None] + 0.08 * (shade - 0.5)[..., None]
    return np.clip(img, 0, 1).astype(np.float32)


# --------------------------------------------------------------------------------------
# foreground
# --------------------------------------------------------------------------------------
def _figure_layers(rng: np.random.Generator, h: int, w: int) -> dict:
    """Random pose -> polygons (output-pixel float coords) per depth layer + head params.

    Random choices: framing (portrait, 75%: head-and-torso leaving the frame at the bottom;
    else half/full body with legs), position and scale, body lean, head tilt, shoulder
    width, arm pose (down / bent / hand on hip / raised), sleeve length, facing the camera
    or away (back of the head is all hair).
    """
    u = float(min(h, w))
    portrait = rng.random() < 0.75
    if portrait:
        ry = u * _u(rng, 0.095, 0.14)
        hx = w * _u(rng, 0.3, 0.7)
        hy = h * _u(rng, 0.2, 0.36)
    else:
        ry = u * _u(rng, 0.045, 0.065)
        hx = w * _u(rng, 0.25, 0.75)
        hy = h * _u(rng, 0.1, 0.2)
    hy = max(hy, 1.25 * ry)
    rx = ry * _u(rng, 0.74, 0.86)
    neck = ry * _u(rng, 1.25, 1.5)
    ax, ay = hx, hy + neck  # anchor: centre of the shoulder line
    lean = rng.normal(0, math.radians(5))
    tilt = rng.normal(0, math.radians(9))
    sw = rx * _u(rng, 2.1, 2.8)  # shoulder half-width
    nw = rx * _u(rng, 0.38, 0.48)  # neck half-width
    aw = sw * _u(rng, 0.26, 0.34)  # upper-arm radius*2
    facing = rng.random() < 0.8

    def body(p):  # local (anchor-relative) -> image, with lean
        return _rot(np.asarray(p, np.float64) + (ax, ay), ax, ay, lean)

    # torso (clothing): shoulders, flanks, waist, then down beyond the frame or to the hips
    waist = _u(rng, 0.78, 0.95)
    bottom_y = (2.0 * h) if portrait else ry * _u(rng, 3.1, 3.5)
    hip_w = _u(rng, 0.85, 1.0)
    half = np.concatenate([
        _bezier((-nw * 1.1, -0.25 * ry), (-sw * 0.85, -0.12 * ry), (-sw, 0.55 * ry), 10),
        np.array([[-sw * 0.97, 1.6 * ry], [-sw * waist, 2.9 * ry], [-sw * hip_w, bottom_y]]),
    ])
    torso_local = np.concatenate([half, half[::-1] * (-1, 1)])
    torso = body(torso_local)
    neck_poly = body(_capsule((0, -neck + 0.3 * ry), (0, 0.1 * ry), nw, nw * 1.08))

    clothes, skin, legs, bare_legs = [torso], [neck_poly], [], []
    long_sleeve = rng.random() < 0.5
    hands = []
    for side in (-1.0, 1.0):
        sh = np.array([side * (sw - aw * 0.45), 0.4 * ry])
        r = rng.random()
        if r < 0.12:  # raised arm (waving)
            a1 = math.radians(_u(rng, 95, 160))
            bend = math.radians(_u(rng, -40, 40))
        elif r < 0.3:  # hand on hip
            a1 = math.radians(_u(rng, 30, 50))
            bend = math.radians(_u(rng, -120, -80))
        else:  # hanging or slightly bent
            a1 = math.radians(_u(rng, 4, 25))
            bend = math.radians(_u(rng, -60, 15))
        la = ry * _u(rng, 2.2, 2.7)
        lf = la * _u(rng, 0.85, 1.0)
        el = sh + la * np.array([side * math.sin(a1), math.cos(a1)])
        a2 = a1 + bend
        wr = el + lf * np.array([side * math.sin(a2), math.cos(a2)])
        upper = body(_capsule(sh, el, aw / 2, aw * 0.42))
        fore = body(_capsule(el, wr, aw * 0.42, aw * 0.32))
        clothes.append(upper)
        (clothes if long_sleeve else skin).append(fore)
        hand = body(_ellipse(*(wr + np.array([side * math.sin(a2), math.cos(a2)]) * aw * 0.3),
                             aw * 0.36, aw * 0.48, a2 * -side))
        hands.append(hand)
    skin.extend(hands)

    if not portrait:  # hips, legs, feet
        hip_y = bottom_y - 0.2 * ry
        skirt = rng.random() < 0.3
        for side in (-1.0, 1.0):
            hp = np.array([side * sw * waist * 0.5, hip_y])
            a = math.radians(_u(rng, -6, 14))
            kn = hp + ry * _u(rng, 2.3, 2.6) * np.array([side * math.sin(a), math.cos(a)])
            a2 = a + math.radians(_u(rng, -10, 10))
            an = kn + ry * _u(rng, 2.2, 2.5) * np.array([side * math.sin(a2), math.cos(a2)])
            lr = sw * waist * 0.46
            (bare_legs if skirt else legs).append(body(_capsule(hp, kn, lr, lr * 0.75)))
            (bare_legs if skirt else legs).append(body(_capsule(kn, an, lr * 0.75, lr * 0.5)))
            legs.append(body(_ellipse(an[0] + side * lr * 0.5, an[1] + lr * 0.35, lr * 0.9, lr * 0.45)))
        if skirt:
            sk = np.array([[-sw * waist, hip_y - ry], [sw * waist, hip_y - ry],
                           [sw * _u(rng, 1.1, 1.5), hip_y + 2.2 * ry],
                           [-sw * _u(rng, 1.1, 1.5), hip_y + 2.2 * ry]])
            clothes.append(body(sk))

    # head group: rotated by tilt about the neck top, then by the body lean
    ntx, nty = ax, ay - neck + 0.4 * ry

    def head(p):
        p = np.asarray(p, np.float64) + (hx, hy)
        return _rot(_rot(p, ntx, nty, tilt), ax, ay, lean)

    head_poly = head(_ellipse(0, 0, rx, ry, 0, 64, rng, 0.02))
    skin.append(head_poly)
    ears = [head(_ellipse(s * rx * 0.97, 0.05 * ry, rx * 0.16, ry * 0.24)) for s in (-1, 1)]
    skin.extend(ears)
    hc = head(np.zeros((1, 2)))[0]
    return dict(
        u=u, rx=rx, ry=ry, sw=sw, head_centre=hc, head=head, body=body, lean=lean,
        tilt=tilt, facing=facing, portrait=portrait, clothes=clothes, skin=skin, legs=legs,
        bare_legs=bare_legs,
        neck=neck, anchor=(ax, ay),
    )


def _hair_layers(rng: np.random.Generator, fig: dict) -> dict:
    """Hair masses (behind the body and over the head) as polygons, plus the style.

    Styles model short, medium, long (falling behind the shoulders), curly/afro volume,
    tied-up (bun) and near-bald heads. Facing away: the whole head is covered.
    """
    rx, ry, head = fig["rx"], fig["ry"], fig["head"]
    style = rng.choice(["short", "medium", "long", "curly", "bun", "bald"],
                       p=[0.22, 0.22, 0.28, 0.13, 0.1, 0.05])
    vol = _u(rng, 1.04, 1.16)
    back, front, cut = [], [], []
    if style == "bald":
        return dict(style=style, back=back, front=front, cut=cut, vol=1.0)
    if style == "curly":
        vol = _u(rng, 1.3, 1.7)
    cap = head(_ellipse(0, -0.12 * ry * vol, rx * vol, ry * (vol * 0.98), 0, 72, rng,
                        0.05 if style != "curly" else 0.09))
    front.append(cap)
    if style == "bun":
        front.append(head(_ellipse(_u(rng, -0.3, 0.3) * rx, -ry * 1.05, rx * 0.5, ry * 0.42,
                                   0, 40, rng, 0.05)))
    if style in ("medium", "long", "curly"):
        length = {"medium": _u(rng, 1.0, 1.6), "long": _u(rng, 2.4, 4.2), "curly": _u(rng, 1.0, 1.8)}[style]
        width = rx * vol * (_u(rng, 1.0, 1.35) if style != "curly" else 1.1)
        poly = np.array([
            [-rx * vol, -0.2 * ry], [-width, 0.6 * ry], [-width * _u(rng, 0.95, 1.4), length * ry],
            [width * _u(rng, 0.95, 1.4), length * ry], [width, 0.6 * ry], [rx * vol, -0.2 * ry],
        ])
        # jagged lower edge: locks of different length
        n_locks = 9
        xs = np.linspace(poly[2, 0], poly[3, 0], n_locks)
        ys = length * ry * (1 + rng.uniform(-0.15, 0.15, n_locks))
        poly = np.concatenate([poly[:2], np.stack([xs, ys], 1), poly[4:]])
        back.append(head(poly))
        # side locks in front of the ears/face edge
        for s in (-1, 1):
            if rng.random() < 0.7:
                lock_len = min(length, _u(rng, 0.8, 1.6)) * ry
                back_or_front = front if rng.random() < 0.6 else back
                back_or_front.append(head(np.array([
                    [s * rx * 0.75, -0.5 * ry], [s * rx * vol * 1.05, -0.2 * ry],
                    [s * rx * _u(rng, 1.0, 1.25), lock_len], [s * rx * _u(rng, 0.7, 0.9), lock_len * 0.9],
                ])))
    if fig["facing"]:
        # face opening: hairline with a random fringe height; side parting shifts it sideways
        fringe = _u(rng, -0.55, -0.2) if style != "curly" else _u(rng, -0.5, -0.3)
        cut.append(head(_ellipse(_u(rng, -0.08, 0.08) * rx, 0.2 * ry + fringe * 0.3 * ry,
                                 rx * 0.93, ry * (0.8 - fringe * 0.35), 0, 48)))
    return dict(style=style, back=back, front=front, cut=cut, vol=vol)


def _strand_paths(
    rng: np.random.Generator,
    roots: np.ndarray,
    dirs: np.ndarray,
    lengths: np.ndarray,
    curl: float,
    gravity: float,
    n_pts: int = 14,
) -> np.ndarray:
    """(N, n_pts, 2) hair strand polylines: random walks on the heading angle with a pull
    towards 'down' (gravity), starting at ``roots`` heading along ``dirs``."""
    n = len(roots)
    theta0 = np.arctan2(dirs[:, 1], dirs[:, 0])
    dtheta = rng.normal(0.0, curl, (n, n_pts - 1))
    theta = theta0[:, None] + np.cumsum(dtheta, 1)
    step = (lengths / (n_pts - 1))[:, None]
    k = np.arange(1, n_pts)[None, :] / (n_pts - 1)
    vx = np.cos(theta) * step
    vy = np.sin(theta) * step + gravity * step * k
    pts = np.zeros((n, n_pts, 2))
    pts[:, 0] = roots
    pts[:, 1:, 0] = roots[:, None, 0] + np.cumsum(vx, 1)
    pts[:, 1:, 1] = roots[:, None, 1] + np.cumsum(vy, 1)
    return pts


def make_foreground(rng: np.random.Generator, size: Size) -> tuple[np.ndarray, np.ndarray]:
    """A person-like matte foreground: RGB colour ``F`` and its exact alpha.

    Args:
        rng: the only source of randomness.
        size: ``int`` (square) or ``(H, W)``.

    Returns:
        foreground: ``(H, W, 3) uint8`` RGB. Defined everywhere: inside the figure the
            colour of the visible layer (under hair strands: the hair colour; under a
            translucent garment: the mixed colour), outside it a smooth extension of the
            border colours (what DIM-style foreground estimation would give).
        alpha: ``(H, W) float32`` in ``[0, 1]``, multiples of 1/255; exactly 1 in the body
            core, exactly 0 in the background, fractional on a 1-2 px anti-aliased
            silhouette, on sub-pixel hair strands and flyaways, and on translucent cloth.

    The figure is rasterised at ``4x`` supersampling with anti-aliasing and area-downsampled,
    layer by layer (back to front: long hair behind the body, legs (trousers, or bare under
    a skirt), clothing, skin, a translucent shawl, hair over the head, loose strands), and
    composited with the *over* operator, so ``alpha * F`` equals the premultiplied colour
    (up to the 8-bit rounding of both).
    Random choices model pose and framing (see ``_figure_layers``), hair style and colour,
    skin tone, clothing colour/pattern, strand count/length/curl, edge softness (a slight
    extra blur of 0.25-0.7 px: focus and motion of a real matte) and a translucent shawl
    (25%).
    """
    h, w = _hw(size)
    fig = _figure_layers(rng, h, w)
    hair = _hair_layers(rng, fig)
    u, rx, ry = fig["u"], fig["rx"], fig["ry"]
    ss = _SS
    hs, ws = h * ss, w * ss

    def raster(polys: list[np.ndarray], cut: list[np.ndarray] | None = None) -> np.ndarray:
        can = np.zeros((hs, ws), np.uint8)
        _fill(can, polys, 255, ss)
        if cut:
            _fill(can, cut, 0, ss)
        return cv2.resize(can, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0

    edge_sigma = _u(rng, 0.25, 0.7)

    def soften(c: np.ndarray) -> np.ndarray:
        return _gauss_blur(c, edge_sigma)

    layers: list[tuple[np.ndarray, np.ndarray]] = []  # (coverage (H, W), colour (H, W, 3))
    hair_col = _hair_colour(rng)
    hair_tex = _hair_texture(rng, h, w, u, hair_col)

    body_cov_parts = []  # coverages that get the rounded-volume shading below
    if hair["back"]:
        cov = _gauss_blur(raster(hair["back"]), edge_sigma + 0.6)
        layers.append((cov, hair_tex * 0.85))
    tone = _skin_colour(rng)
    skin_tex = _skin_texture(rng, h, w, u, tone)
    if fig["bare_legs"]:
        cov = soften(raster(fig["bare_legs"]))
        layers.append((cov, skin_tex))
        body_cov_parts.append(cov)
    if fig["legs"]:
        cov = soften(raster(fig["legs"]))
        layers.append((cov, _fabric(rng, h, w, u)))
        body_cov_parts.append(cov)
    cov_clothes = soften(raster(fig["clothes"]))
    layers.append((cov_clothes, _fabric(rng, h, w, u)))
    body_cov_parts.append(cov_clothes)
    if fig["facing"]:
        _draw_face(rng, skin_tex, fig)
    cov_skin = soften(raster(fig["skin"]))
    layers.append((cov_skin, skin_tex))
    body_cov_parts.append(cov_skin)

    if rng.random() < 0.25:  # translucent shawl / veil over the shoulders
        ax, ay = fig["anchor"]
        sw = fig["sw"]
        over = _u(rng, 1.04, 1.15)
        shawl_local = np.concatenate([
            _bezier((-sw * 0.45, -0.35 * ry), (-sw * over * 1.05, -0.3 * ry), (-sw * over, 0.8 * ry), 10),
            np.array([[-sw * over * _u(rng, 0.95, 1.05), _u(rng, 1.5, 3.0) * ry],
                      [sw * over * _u(rng, 0.95, 1.05), _u(rng, 1.5, 3.0) * ry]]),
            _bezier((sw * over, 0.8 * ry), (sw * over * 1.05, -0.3 * ry), (sw * 0.45, -0.35 * ry), 10),
        ])
        cov = soften(raster([fig["body"](shawl_local)]))
        opacity = _u(rng, 0.35, 0.75)
        col = _fabric(rng, h, w, u)
        layers.append((cov * opacity, col))

    hair_sigma = edge_sigma + _u(rng, 0.2, 1.0)  # unresolved fine hair: a softer mass edge
    if hair["front"]:
        cov = _gauss_blur(raster(hair["front"], hair["cut"]), hair_sigma)
        layers.append((cov, hair_tex))

    # loose strands from the hair-mass outline; flyaways leave the silhouette
    if hair["back"] or hair["front"]:
        body_now = np.maximum.reduce(body_cov_parts) > 0.5
        strands = _make_strands(rng, hair, body_now, fig, h, w)
        if strands is not None:
            can = np.zeros((hs, ws), np.uint8)
            for paths, val, thick in strands:
                if len(paths):
                    fp = np.round(paths * (ss * _FP)).astype(np.int32)
                    cv2.polylines(can, list(fp), False, val, thick, cv2.LINE_AA, _SHIFT)
            cov = cv2.resize(can, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
            cov = _gauss_blur(cov, edge_sigma * 0.5)
            layers.append((cov, np.clip(hair_tex * _u(rng, 1.0, 1.2), 0, 1)))

    # rounded-volume shading of skin and clothes from the distance to the body outline
    body_mask = (np.maximum.reduce(body_cov_parts) > 0.5).astype(np.uint8)
    dist = cv2.distanceTransform(body_mask, cv2.DIST_L2, 3)
    shade = 0.72 + 0.28 * np.clip(dist / (0.45 * rx), 0, 1) ** 0.6

    premult = np.zeros((h, w, 3), np.float32)
    acc = np.zeros((h, w), np.float32)
    for cov, col in layers:
        if any(cov is c for c in body_cov_parts):
            col = col * shade[..., None]
        cov = np.clip(cov, 0.0, 1.0)
        premult = col * cov[..., None] + premult * (1.0 - cov[..., None])
        acc = cov + acc * (1.0 - cov)

    alpha = _quantise_alpha(acc)
    fg = _unpremultiply(premult, acc, u)
    return (np.clip(fg * 255.0 + 0.5, 0, 255)).astype(np.uint8), alpha


def _unpremultiply(premult: np.ndarray, acc: np.ndarray, u: float) -> np.ndarray:
    """F = premult / alpha where alpha > 0; elsewhere the nearby border colours.

    The extension is a coarse-to-fine normalised convolution: each pixel outside takes
    the alpha-weighted mean colour at the smallest scale (1.5, 4, u/12 px) that reaches
    the figure, so F continues the colours just inside the silhouette.
    """
    inside = acc > 1e-3
    fg = premult / np.maximum(acc, 1e-3)[..., None]
    mean = premult.reshape(-1, 3).sum(0) / max(float(acc.sum()), 1e-6)
    ext = np.broadcast_to(mean, premult.shape).astype(np.float32).copy()
    filled = np.zeros(acc.shape, bool)
    h, w = acc.shape
    for sigma in (1.5, 4.0, max(8.0, u / 12)):
        if sigma > 4.0:  # wide scale: blur at quarter resolution (same result, 16x cheaper)
            small = (max(1, w // 4), max(1, h // 4))
            den = cv2.resize(_gauss_blur(cv2.resize(acc, small, interpolation=cv2.INTER_AREA), sigma / 4),
                             (w, h), interpolation=cv2.INTER_LINEAR)
        else:
            den = _gauss_blur(acc, sigma)
        ok = (den > 0.02) & ~filled
        if ok.any():
            if sigma > 4.0:
                num = cv2.resize(_gauss_blur(cv2.resize(premult, small, interpolation=cv2.INTER_AREA), sigma / 4),
                                 (w, h), interpolation=cv2.INTER_LINEAR)
            else:
                num = _gauss_blur(premult, sigma)
            ext[ok] = num[ok] / den[ok][:, None]
            filled |= ok
        if filled.all():
            break
    fg = np.where(inside[..., None], fg, ext)
    return np.clip(fg, 0.0, 1.0)


def _draw_face(rng: np.random.Generator, skin_tex: np.ndarray, fig: dict) -> None:
    """Paint eyes, brows and mouth on the skin colour (in place)."""
    rx, ry, head = fig["rx"], fig["ry"], fig["head"]
    dark = np.array([0.12, 0.09, 0.08], np.float32) * _u(rng, 0.6, 1.4)
    look = _u(rng, -0.06, 0.06) * rx
    polys_eye = [head(_ellipse(s * rx * 0.36 + look, -0.02 * ry, rx * 0.07, ry * 0.055, 0, 16)) for s in (-1, 1)]
    white = [head(_ellipse(s * rx * 0.36, -0.02 * ry, rx * 0.17, ry * 0.065, 0, 16)) for s in (-1, 1)]
    brows = [head(_capsule((s * rx * 0.55, -0.2 * ry), (s * rx * 0.18, -0.23 * ry), ry * 0.035, ry * 0.04))
             for s in (-1, 1)]
    mouth = head(_ellipse(0, 0.5 * ry, rx * _u(rng, 0.25, 0.38), ry * 0.05, 0, 20))
    lip = np.array([0.55, 0.25, 0.25], np.float32) * _u(rng, 0.7, 1.1)
    cv2.fillPoly(skin_tex, [_to_fp(p, 1.0) for p in white], (0.85, 0.85, 0.82), cv2.LINE_AA, _SHIFT)
    cv2.fillPoly(skin_tex, [_to_fp(p, 1.0) for p in polys_eye], dark.tolist(), cv2.LINE_AA, _SHIFT)
    cv2.fillPoly(skin_tex, [_to_fp(p, 1.0) for p in brows], (dark * 1.5).tolist(), cv2.LINE_AA, _SHIFT)
    cv2.fillPoly(skin_tex, [_to_fp(mouth, 1.0)], lip.tolist(), cv2.LINE_AA, _SHIFT)


def _make_strands(rng, hair, body_mask, fig, h, w):
    """Groups of (paths, intensity, thickness) for loose strands and flyaways.

    Roots lie on the visible outline of the hair mass: not inside another hair polygon,
    not on the hairline around the face (strands would cross the face), and for hair
    behind the body not where the body hides it.
    """
    u, ry = fig["u"], fig["ry"]
    ker = np.ones((3, 3), np.uint8)
    m = np.zeros((h, w), np.uint8)
    _fill(m, hair["back"] + hair["front"], 1, 1.0)
    face = np.zeros((h, w), np.uint8)
    _fill(face, hair["cut"], 1, 1.0)
    face = cv2.dilate(face, ker, iterations=max(1, int(ry * 0.12)))
    edge = cv2.dilate(m, ker) - cv2.erode(m, ker)
    step = max(2.0, ry * 0.05)
    outline = []
    for polys, hidden in ((hair["back"], body_mask), (hair["front"], None)):
        for p in polys:
            pts = _resample_closed(p, step)
            ok = (pts[:, 0] > -5) & (pts[:, 0] < w + 5) & (pts[:, 1] > -5) & (pts[:, 1] < h + 5)
            xi = np.clip(np.round(pts[:, 0]).astype(int), 0, w - 1)
            yi = np.clip(np.round(pts[:, 1]).astype(int), 0, h - 1)
            ok &= (edge[yi, xi] > 0) & (face[yi, xi] == 0)
            if hidden is not None:
                ok &= ~hidden[yi, xi]
            outline.append(pts[ok])
    outline = np.concatenate(outline) if outline else np.zeros((0, 2))
    if len(outline) < 4:
        return None
    style = hair["style"]
    hc = np.asarray(fig["head_centre"])
    perim_px = len(outline) * step
    density = {"short": 0.9, "medium": 1.2, "long": 1.4, "curly": 2.0, "bun": 0.8}[style]
    n = int(np.clip(perim_px * density * _u(rng, 0.6, 1.4), 12, 3000))
    idx = rng.integers(0, len(outline), n)
    roots = outline[idx]
    radial = roots - hc
    radial /= np.linalg.norm(radial, axis=1, keepdims=True) + 1e-6
    # strands lie mostly along the hair surface (tangent, combed downwards), a bit outwards
    tangent = np.stack([-radial[:, 1], radial[:, 0]], 1)
    tangent *= np.where(tangent[:, 1:2] >= 0, 1.0, -1.0)  # combed towards 'down'
    out_w = rng.uniform(0.15, 0.6 if style != "curly" else 1.0, (n, 1))
    dirs = radial * out_w + tangent * (1 - out_w)
    roots = roots - radial * rng.uniform(0.3, 1.5, (n, 1)) * max(1.0, ry * 0.06)  # start inside
    curl = {"curly": 0.6, "short": 0.2}.get(style, 0.12)
    gravity = {"long": 0.5, "medium": 0.35, "curly": 0.0}.get(style, 0.15)
    max_len = ry * {"curly": 0.45, "short": 0.3, "bun": 0.3}.get(str(style), 0.6)
    lengths = max_len * rng.uniform(0.15, 1.0, n) ** 1.5
    paths = _strand_paths(rng, roots, dirs, lengths, curl, gravity, 10)
    # flyaways: few, long, thin, wandering away from the silhouette
    nf = int(rng.integers(1, 4 + n // 40))
    fr = outline[rng.integers(0, len(outline), nf)]
    frad = fr - hc
    frad /= np.linalg.norm(frad, axis=1, keepdims=True) + 1e-6
    fpaths = _strand_paths(rng, fr - frad * max(1.0, ry * 0.05), frad + rng.normal(0, 0.5, (nf, 2)),
                           ry * rng.uniform(0.3, 0.9, nf), 0.25, _u(rng, -0.1, 0.4), 16)
    split = int(n * _u(rng, 0.5, 0.8))
    return [
        (paths[:split], 255, 1),  # single sub-pixel strands
        (paths[split:], 255, 2),  # thicker locks (~0.5 px after downsampling)
        (fpaths, int(rng.integers(150, 256)), 1),  # flyaways, fainter
    ]


def _resample_closed(poly: np.ndarray, step: float) -> np.ndarray:
    """Points every ~``step`` px along the closed polygon ``poly`` (N, 2)."""
    p = np.asarray(poly, np.float64)
    closed = np.concatenate([p, p[:1]])
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(closed, axis=0), axis=1))])
    t = np.arange(0.0, arc[-1], step)
    return np.stack([np.interp(t, arc, closed[:, 0]), np.interp(t, arc, closed[:, 1])], 1)


# --------------------------------------------------------------------------------------
# backgrounds
# --------------------------------------------------------------------------------------
_INDOOR_WALLS = np.asarray(
    [(235, 230, 218), (214, 204, 186), (190, 200, 205), (160, 150, 140), (120, 110, 100),
     (215, 190, 160), (170, 185, 165), (90, 95, 110), (240, 240, 240), (200, 170, 150)],
    np.float32,
) / 255.0


def _scene_gradient(rng, h, w, c0, c1):
    ang = _u(rng, 0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (xx / w - 0.5) * math.cos(ang) + (yy / h - 0.5) * math.sin(ang)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]


def _random_shapes(rng, img, n, u, palette, blur_max):
    """Draw ``n`` random rectangles / ellipses / polygons / stripes, each maybe blurred."""
    h, w = img.shape[:2]
    for _ in range(n):
        col = palette(rng)
        layer = np.zeros((h, w), np.float32)
        kind = rng.integers(4)
        cx, cy = _u(rng, -0.1, 1.1) * w, _u(rng, -0.1, 1.1) * h
        sz = _u(rng, 0.05, 0.45) * u
        if kind == 0:
            pts = np.array([[cx - sz, cy - sz * _u(rng, 0.3, 2)], [cx + sz, cy - sz * _u(rng, 0.3, 2)],
                            [cx + sz, cy + sz], [cx - sz, cy + sz]])
            pts = _rot(pts, cx, cy, rng.normal(0, 0.1))
        elif kind == 1:
            pts = _ellipse(cx, cy, sz, sz * _u(rng, 0.3, 1.5), _u(rng, 0, math.pi), 40)
        elif kind == 2:
            k = int(rng.integers(3, 7))
            pts = np.stack([cx + rng.normal(0, sz, k), cy + rng.normal(0, sz, k)], 1)
        else:  # long bar / stripe (door frame, pole, shelf)
            ang = _u(rng, 0, math.pi) if rng.random() < 0.4 else rng.choice([0.0, math.pi / 2])
            d = np.array([math.cos(ang), math.sin(ang)]) * 2 * u
            pts = _capsule((cx, cy) - d, (cx, cy) + d, sz * 0.1, sz * 0.1, 4)
        cv2.fillPoly(layer, [_to_fp(pts, 1.0)], 1.0, cv2.LINE_AA, _SHIFT)
        layer = _gauss_blur(layer, _u(rng, 0, blur_max))
        op = _u(rng, 0.5, 1.0)
        shade = (0.85 + 0.3 * _value_noise(rng, h, w, sz + 4, 2))[..., None]
        img[:] = img * (1 - op * layer[..., None]) + (col * shade) * (op * layer[..., None])


def _palette_indoor(rng):
    if rng.random() < 0.6:
        c = _INDOOR_WALLS[rng.integers(len(_INDOOR_WALLS))]
        return np.clip(c * _u(rng, 0.6, 1.1), 0, 1)
    return _hsv_colour(rng, (0, 1), (0.1, 0.7), (0.15, 0.9))


def _palette_outdoor(rng):
    r = rng.random()
    if r < 0.45:  # foliage
        return _hsv_colour(rng, (0.18, 0.42), (0.35, 0.85), (0.15, 0.7))
    if r < 0.7:  # sky / water
        return _hsv_colour(rng, (0.52, 0.65), (0.1, 0.6), (0.55, 1.0))
    if r < 0.9:  # earth, stone, buildings
        return _hsv_colour(rng, (0.03, 0.14), (0.05, 0.5), (0.25, 0.85))
    return _hsv_colour(rng, (0, 1), (0.3, 0.9), (0.4, 1.0))


def make_background(rng: np.random.Generator, size: Size) -> np.ndarray:
    """A people-free textured scene: ``(H, W, 3) uint8`` RGB.

    Random scene type models where portraits are taken: ``indoor`` (wall gradient, floor,
    furniture-like rectangles, frames, windows), ``outdoor`` (sky gradient, hills, foliage
    noise, ground), ``bokeh`` (dark night scene with soft out-of-focus light discs),
    ``urban`` (facades with window grids, stripes) and ``studio`` (smooth backdrop with a
    faint texture). On top: multi-scale noise texture of random strength and an optional
    depth-of-field blur. Images are clean (no sensor noise, no JPEG); that is the look of
    the composite training set.
    """
    h, w = _hw(size)
    u = float(min(h, w))
    kind = rng.choice(["indoor", "outdoor", "bokeh", "urban", "studio"], p=[0.3, 0.25, 0.15, 0.15, 0.15])
    yy = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    if kind == "indoor":
        wall = _palette_indoor(rng)
        img = _scene_gradient(rng, h, w, wall * _u(rng, 0.7, 1.0), np.clip(wall * _u(rng, 0.9, 1.25), 0, 1))
        horizon = _u(rng, 0.55, 0.9)
        floor = _hsv_colour(rng, (0.04, 0.12), (0.2, 0.7), (0.15, 0.6))
        grain = _value_noise(rng, h, w, _u(rng, 0.05, 0.2) * u, 3)
        floor_img = floor[None, None] * (0.75 + 0.5 * grain)[..., None]
        m = (yy > horizon).astype(np.float32)
        img = img * (1 - m) + floor_img * m
        _random_shapes(rng, img, int(rng.integers(3, 9)), u, _palette_indoor, 1.5)
        if rng.random() < 0.5:  # bright window
            x0, y0 = _u(rng, 0, 0.8) * w, _u(rng, 0, 0.5) * h
            x1, y1 = x0 + _u(rng, 0.15, 0.4) * w, y0 + _u(rng, 0.2, 0.45) * h
            win = _hsv_colour(rng, (0.5, 0.65), (0.0, 0.3), (0.85, 1.0))
            img[int(y0):int(y1), int(x0):int(x1)] = win
            img[int(y0):int(y1), int((x0 + x1) / 2) - 1:int((x0 + x1) / 2) + 1] *= 0.4
    elif kind == "outdoor":
        sky = _hsv_colour(rng, (0.53, 0.63), (0.15, 0.65), (0.65, 1.0))
        img = np.broadcast_to(sky, (h, w, 3)).astype(np.float32) * (0.8 + 0.25 * yy)
        horizon = _u(rng, 0.2, 0.7)
        ridge = horizon + 0.08 * (_value_noise(rng, 1, w, _u(rng, 0.1, 0.4) * w, 3)[0] - 0.5) * 2
        hill = _palette_outdoor(rng) * 0.7
        m = (yy[..., 0] > ridge[None, :]).astype(np.float32)
        img = img * (1 - m[..., None]) + hill * m[..., None]
        fol = _value_noise(rng, h, w, _u(rng, 0.05, 0.2) * u, 4)
        thr = _u(rng, 0.45, 0.65)
        leaf = np.clip((fol - thr) * 8, 0, 1) * (yy[..., 0] > ridge[None, :] - 0.1)
        green = _hsv_colour(rng, (0.18, 0.4), (0.35, 0.85), (0.15, 0.6))
        tex = (0.6 + 0.8 * _value_noise(rng, h, w, 0.03 * u + 2, 2))[..., None]
        img = img * (1 - leaf[..., None]) + green * tex * leaf[..., None]
        _random_shapes(rng, img, int(rng.integers(1, 6)), u, _palette_outdoor, 2.5)
    elif kind == "bokeh":
        base = _hsv_colour(rng, (0, 1), (0.2, 0.8), (0.03, 0.3))
        img = _scene_gradient(rng, h, w, base, base * _u(rng, 0.3, 1.5))
        light = np.zeros((h, w, 3), np.float32)
        for _ in range(int(rng.integers(8, 40))):
            col = _hsv_colour(rng, (0, 1), (0.2, 0.9), (0.6, 1.0))
            disc = np.zeros((h, w), np.float32)
            r = _u(rng, 0.02, 0.1) * u
            cv2.circle(disc, (int(_u(rng, 0, w) * _FP), int(_u(rng, 0, h) * _FP)), int(r * _FP), 1.0,
                       -1, cv2.LINE_AA, _SHIFT)
            light += disc[..., None] * col * _u(rng, 0.2, 0.7)
        img = img + _gauss_blur(light, _u(rng, 0.5, 2.0))
    elif kind == "urban":
        facade = _palette_outdoor(rng) if rng.random() < 0.5 else _palette_indoor(rng)
        img = _scene_gradient(rng, h, w, facade, np.clip(facade * _u(rng, 0.6, 1.3), 0, 1))
        cell = _u(rng, 0.08, 0.2) * u
        win_col = _hsv_colour(rng, (0.5, 0.7), (0.0, 0.4), (0.1, 0.9))
        off = rng.uniform(0, cell, 2)
        for yc in np.arange(-off[1], h, cell):
            for xc in np.arange(-off[0], w, cell):
                if rng.random() < 0.85:
                    x0, y0 = int(xc + 0.2 * cell), int(yc + 0.2 * cell)
                    x1, y1 = int(xc + 0.8 * cell), int(yc + 0.75 * cell)
                    img[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = win_col * _u(rng, 0.6, 1.2)
        _random_shapes(rng, img, int(rng.integers(0, 4)), u, _palette_outdoor, 1.0)
    else:  # studio backdrop
        c = _hsv_colour(rng, (0, 1), (0.0, 0.5), (0.2, 0.95))
        img = _scene_gradient(rng, h, w, c, np.clip(c * _u(rng, 0.5, 1.4), 0, 1))
        yy2, xx2 = np.mgrid[0:h, 0:w].astype(np.float32)
        r2 = ((xx2 / w - 0.5) ** 2 + (yy2 / h - 0.4) ** 2)
        img *= (1.1 - _u(rng, 0.2, 0.6) * r2)[..., None]
        _random_shapes(rng, img, int(rng.integers(0, 3)), u, _palette_indoor, 4.0)
    texture = _value_noise(rng, h, w, _u(rng, 0.02, 0.3) * u + 4, 3) - 0.5
    img = img * (1 + _u(rng, 0.0, 0.35) * texture[..., None])
    if rng.random() < 0.5:  # depth of field
        img = _gauss_blur(img, _u(rng, 0.3, 2.5) * u / 128)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------------------
# natural scenes
# --------------------------------------------------------------------------------------
def _motion_kernel(rng: np.random.Generator, length: float) -> np.ndarray:
    k = int(2 * math.ceil(length / 2) + 1)
    ker = np.zeros((k, k), np.float32)
    ang = _u(rng, 0, math.pi)
    c = (k - 1) / 2
    d = np.array([math.cos(ang), math.sin(ang)]) * length / 2
    cv2.line(ker, (int((c - d[0]) * _FP), int((c - d[1]) * _FP)), (int((c + d[0]) * _FP), int((c + d[1]) * _FP)),
             1.0, 1, cv2.LINE_AA, _SHIFT)
    return ker / ker.sum()


def _natural_background(rng: np.random.Generator, h: int, w: int, alpha: np.ndarray) -> np.ndarray:
    """Background of a natural photo, float (H, W, 3): a scene plus clutter near the figure
    and person-like distractors (bystanders, more or less defocused)."""
    u = float(min(h, w))
    bg = make_background(rng, (h, w)).astype(np.float32) / 255.0
    # bystanders: other people, smaller and off to the side (not part of the target alpha)
    for _ in range(int(rng.choice([0, 1, 2], p=[0.45, 0.4, 0.15]))):
        # rendered small (cheap), then pasted: scale s, anywhere along the width, feet low
        s = _u(rng, 0.35, 0.85)
        sh, sw_ = max(16, int(h * s)), max(16, int(w * s))
        f2, a2 = make_foreground(rng, (sh, sw_))
        x0 = int(_u(rng, -0.3, 1.0) * w - 0.35 * sw_)
        y0 = h - sh + int(_u(rng, -0.1, 0.25) * sh)
        ys0, xs0 = max(y0, 0), max(x0, 0)
        ys1, xs1 = min(y0 + sh, h), min(x0 + sw_, w)
        if ys1 <= ys0 or xs1 <= xs0:
            continue
        fa = a2[ys0 - y0:ys1 - y0, xs0 - x0:xs1 - x0, None]
        ff = f2[ys0 - y0:ys1 - y0, xs0 - x0:xs1 - x0].astype(np.float32) / 255.0 * _u(rng, 0.5, 1.0)
        bg[ys0:ys1, xs0:xs1] = fa * ff + (1 - fa) * bg[ys0:ys1, xs0:xs1]
    # clutter adjacent to the figure's outline (plants, chair backs, lamps, door frames)
    solid = (alpha > 0.5).astype(np.uint8)
    ys, xs = np.nonzero(solid - cv2.erode(solid, np.ones((3, 3), np.uint8)))
    n_obj = int(rng.integers(1, 5)) if rng.random() < 0.8 else 0
    for _ in range(n_obj if len(ys) else 0):
        k = rng.integers(len(ys))
        cx, cy = xs[k] + rng.normal(0, 0.1 * u), ys[k] + rng.normal(0, 0.1 * u)
        col = _palette_outdoor(rng) if rng.random() < 0.5 else _palette_indoor(rng)
        layer = np.zeros((h, w), np.float32)
        kind = rng.integers(3)
        sz = _u(rng, 0.08, 0.3) * u
        if kind == 0:  # plant: a cluster of leaf ellipses
            polys = [_ellipse(cx + rng.normal(0, sz * 0.6), cy + rng.normal(0, sz * 0.6), sz * 0.3, sz * 0.1,
                              _u(rng, 0, math.pi), 12) for _ in range(int(rng.integers(6, 16)))]
            col = _hsv_colour(rng, (0.2, 0.4), (0.4, 0.9), (0.15, 0.6))
        elif kind == 1:  # chair back / furniture
            polys = [np.array([[cx - sz * 0.6, cy - sz], [cx + sz * 0.6, cy - sz],
                               [cx + sz * 0.6, cy + 3 * sz], [cx - sz * 0.6, cy + 3 * sz]])]
        else:  # pole / lamp stand
            polys = [_capsule((cx, cy - 2 * u), (cx, cy + 2 * u), sz * 0.12, sz * 0.12, 4),
                     _ellipse(cx, cy - sz, sz * 0.5, sz * 0.35, 0, 24)]
        _fill(layer, polys, 1.0, 1.0)
        tex = (0.7 + 0.5 * _value_noise(rng, h, w, sz * 0.3 + 2, 2))[..., None]
        bg = bg * (1 - layer[..., None]) + col * tex * layer[..., None]
    return bg


def make_coarse_mask(rng: np.random.Generator, alpha: np.ndarray) -> np.ndarray:
    """A cheap human-segmentation label made from the exact alpha: ``(H, W) uint8 {0, 1}``.

    Models an annotator / automatic segmenter: threshold ``alpha >= t`` (t ~ U(0.35, 0.65)),
    then one coarsening style -- polygon annotation (contours simplified by
    ``approxPolyDP``), low-resolution prediction (area-downsample by 3-8x, bilinear
    upsample, re-threshold), or a smooth segmenter (Gaussian blur + threshold) -- followed
    by a morphological open (drops hair strands and thin structures) and close (fills
    gaps), a smooth random boundary displacement of ~0.5-2.5 px per 128 px, and an
    optional 1-2 px dilation or erosion (over/under-segmentation bias). Error sizes scale
    with the image and shrink for small figures (down to 0.4x).
    """
    h, w = alpha.shape
    u = float(min(h, w))
    m = (alpha >= _u(rng, 0.35, 0.65)).astype(np.uint8)
    # error scale: px per 128 px of image, smaller for small figures (an annotator zooms in)
    scale = u / 128.0 * float(np.clip(math.sqrt(m.mean()) / 0.55, 0.4, 1.0))
    style = rng.choice(["polygon", "lowres", "smooth"], p=[0.4, 0.35, 0.25])
    if style == "polygon":
        contours, hier = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
        out = np.zeros_like(m)
        eps = _u(rng, 0.6, 2.0) * scale
        outer = [cv2.approxPolyDP(c, eps, True) for i, c in enumerate(contours) if hier[0][i][3] < 0]
        holes = [cv2.approxPolyDP(c, eps, True) for i, c in enumerate(contours) if hier[0][i][3] >= 0]
        cv2.fillPoly(out, outer, 1)
        if holes:
            cv2.fillPoly(out, holes, 0)
        m = out
    elif style == "lowres":
        f = max(2.0, _u(rng, 3.0, 8.0) * scale)
        sh, sw_ = max(4, int(round(h / f))), max(4, int(round(w / f)))
        small = cv2.resize(m.astype(np.float32), (sw_, sh), interpolation=cv2.INTER_AREA)
        m = (cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR) >= 0.5).astype(np.uint8)
    else:
        m = (_gauss_blur(m.astype(np.float32), _u(rng, 1.0, 2.5) * scale) >= 0.5).astype(np.uint8)
    k = max(3, int(round(_u(rng, 2.0, 5.0) * scale)) | 1)
    ker = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    m = cv2.morphologyEx(m, cv2.MORPH_OPEN, ker)
    m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, ker)
    amp = _u(rng, 0.5, 2.5) * scale
    cell = _u(rng, 0.08, 0.25) * u
    dx = (_value_noise(rng, h, w, cell, 2) - 0.5) * 2 * amp
    dy = (_value_noise(rng, h, w, cell, 2) - 0.5) * 2 * amp
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    m = cv2.remap(m, gx + dx, gy + dy, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE)
    r = rng.random()
    if r < 0.3:
        m = cv2.dilate(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)),
                       iterations=int(rng.integers(1, 3)))
    elif r < 0.5:
        m = cv2.erode(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)), iterations=1)
    return (m > 0).astype(np.uint8)


def make_natural_scene(
    rng: np.random.Generator, size: Size
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A "natural photo" of a person with its exact alpha and a coarse segmentation label.

    Args:
        rng: the only source of randomness.
        size: ``int`` (square) or ``(H, W)``.

    Returns:
        image: ``(H, W, 3) uint8`` RGB, JPEG-decoded.
        alpha: ``(H, W) float32`` in ``[0, 1]`` (multiples of 1/255): the alpha the image
            actually shows -- the person's matte, minus any occluder in front, blurred
            with the same kernel as the image when a lens/motion blur was applied.
        coarse_mask: ``(H, W) uint8`` in ``{0, 1}``, see :func:`make_coarse_mask`.

    Pipeline and what each random choice models:
      1. Person (``make_foreground``), optionally mirrored.
      2. Cluttered background: a scene, bystanders (person-like distractors, 55%), objects
         right next to the figure's outline (80%), a soft cast shadow (50%), depth-of-field
         blur of the background only (60%).
      3. Shared light: a light direction shades the figure (Lambert term from the outline
         normal, plus a gradient across the body) and the background; environment colour
         spill on the figure's edges (50%); an occluder in front of the person (15%:
         table edge, railing, foliage) that cuts the alpha.
      4. Camera: lens defocus (Gaussian) or motion blur of the whole frame (45%, the alpha
         is blurred with the same kernel), white balance cast, exposure, gamma, saturation,
         vignetting, unsharp-mask sharpening halos (30%), signal-dependent sensor noise
         (always, sigma 1.5-5 / 255 plus shot noise, sometimes chroma), JPEG at quality 40-95.
    """
    h, w = _hw(size)
    u = float(min(h, w))
    fg_u8, alpha = make_foreground(rng, (h, w))
    if rng.random() < 0.5:
        fg_u8, alpha = fg_u8[:, ::-1], alpha[:, ::-1]
    fg = fg_u8.astype(np.float32) / 255.0
    alpha = np.ascontiguousarray(alpha, np.float32)
    bg = _natural_background(rng, h, w, alpha)

    # light direction (image plane) and strength
    ang = _u(rng, 0, 2 * math.pi)
    ld = np.array([math.cos(ang), math.sin(ang)], np.float32)
    strength = _u(rng, 0.1, 0.45)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = ((xx / w - 0.5) * ld[0] + (yy / h - 0.5) * ld[1]) * 2  # [-1, 1] along the light

    if rng.random() < 0.5:  # soft cast shadow of the person on the background
        off = -ld * _u(rng, 0.02, 0.1) * u
        M = np.float32([[1, 0, off[0]], [0, 1, off[1]]])
        sh = cv2.warpAffine(alpha, M, (w, h), borderMode=cv2.BORDER_CONSTANT)
        sh = _gauss_blur(sh, _u(rng, 0.02, 0.06) * u)
        bg = bg * (1 - _u(rng, 0.2, 0.5) * sh[..., None])
    if rng.random() < 0.6:  # background defocus (depth of field)
        bg = _gauss_blur(bg, _u(rng, 0.5, 3.0) * u / 128)
    bg = bg * (1 + 0.5 * strength * ramp[..., None])

    # shading of the figure: outline normals from the blurred alpha, Lambert-like term
    sm = _gauss_blur(alpha, max(1.0, 0.04 * u))
    gx = cv2.Sobel(sm, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(sm, cv2.CV_32F, 0, 1, ksize=3)
    gn = np.sqrt(gx**2 + gy**2) + 1e-6
    # outward normal = -grad(alpha); lit where it faces the light (ld points to the light)
    lambert = (-gx * ld[0] - gy * ld[1]) / gn * np.clip(gn / (gn.max() + 1e-6) * 3, 0, 1)
    shade = 1 + strength * (0.8 * lambert + 0.6 * ramp)
    fg = fg * shade[..., None]
    if rng.random() < 0.5:  # colour spill from the environment on the edges
        env = _gauss_blur(bg, 0.08 * u)
        rim = np.clip(1 - _gauss_blur(alpha, 0.02 * u + 0.5) ** 2, 0, 1) * _u(rng, 0.2, 0.6)
        fg = fg * (1 - rim[..., None]) + env * rim[..., None]

    img = alpha[..., None] * fg + (1 - alpha[..., None]) * bg

    if rng.random() < 0.15:  # occluder in front of the person
        occ = np.zeros((h * _SS, w * _SS), np.uint8)
        kind = rng.integers(3)
        if kind == 0:  # table / desk edge at the bottom
            y0 = _u(rng, 0.78, 0.92) * h
            pts = np.array([[-5, y0 + rng.normal(0, 0.03 * h)], [w + 5, y0 + rng.normal(0, 0.03 * h)],
                            [w + 5, h + 5], [-5, h + 5]])
            _fill(occ, [pts], 255, _SS)
        elif kind == 1:  # railing / pole
            x0 = _u(rng, 0.1, 0.9) * w
            _fill(occ, [_capsule((x0, -10), (x0 + rng.normal(0, 0.1 * w), h + 10), 0.03 * u, 0.03 * u)], 255, _SS)
        else:  # foreground leaves
            cx, cy = rng.choice([0.0, float(w)]), _u(rng, 0.3, 1.0) * h
            _fill(occ, [_ellipse(cx + rng.normal(0, 0.08 * u), cy + rng.normal(0, 0.1 * u), 0.12 * u, 0.04 * u,
                                 _u(rng, 0, math.pi), 16) for _ in range(int(rng.integers(4, 10)))], 255, _SS)
        o = cv2.resize(occ, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        o = _gauss_blur(o, _u(rng, 0.3, 2.0) * u / 128)
        col = _palette_indoor(rng) if rng.random() < 0.5 else _palette_outdoor(rng)
        tex = (0.7 + 0.5 * _value_noise(rng, h, w, 0.1 * u, 3))[..., None]
        img = img * (1 - o[..., None]) + col * tex * o[..., None]
        alpha = alpha * (1 - o)

    r = rng.random()
    if r < 0.3:  # lens defocus of the whole frame
        s = _u(rng, 0.4, 1.2) * max(1.0, u / 384)
        img, alpha = _gauss_blur(img, s), _gauss_blur(alpha, s)
    elif r < 0.45:  # camera / subject motion
        ker = _motion_kernel(rng, _u(rng, 2.0, 4.5) * max(1.0, u / 384))
        img = cv2.filter2D(img, -1, ker, borderType=cv2.BORDER_REFLECT)
        alpha = cv2.filter2D(alpha, -1, ker, borderType=cv2.BORDER_REFLECT)

    # global light / camera colour response (pixel-wise: does not change alpha)
    temp = _u(rng, -1, 1)
    cast = np.array([1 + 0.15 * temp, 1.0, 1 - 0.17 * temp], np.float32) * (1 + rng.normal(0, 0.04, 3))
    tint = _hsv_colour(rng, (0, 1), (0.2, 0.8), (0.8, 1.0))
    img = img * cast.astype(np.float32) * _u(rng, 0.65, 1.3)
    img = img * (1 - 0.12 * rng.random()) + tint * 0.12 * rng.random() * img.mean()
    gray = img.mean(2, keepdims=True)
    img = gray + (img - gray) * _u(rng, 0.6, 1.25)
    img = np.clip(img, 0, 1) ** _u(rng, 0.75, 1.3)
    r2 = ((xx / w - 0.5) ** 2 + (yy / h - 0.5) ** 2) * 2
    img = img * (1 - _u(rng, 0.0, 0.45) * r2)[..., None]
    if rng.random() < 0.3:  # phone-style sharpening halos
        img = img + _u(rng, 0.3, 1.0) * (img - _gauss_blur(img, _u(rng, 0.8, 1.6)))
    # sensor noise: read noise + shot noise, sometimes colour (chroma) noise
    sigma = _u(rng, 1.5, 5.0) / 255.0
    shot = _u(rng, 0.0, 0.0015)
    std = np.sqrt(sigma**2 + shot * np.clip(img, 0, 1))
    if rng.random() < 0.5:
        noise = rng.standard_normal((h, w, 1), dtype=np.float32)
    else:
        noise = rng.standard_normal((h, w, 3), dtype=np.float32)
    img = img + std * noise
    out = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    q = int(rng.integers(40, 96))
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(out[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, q])
    if not ok:  # pragma: no cover - cv2 always encodes uint8 BGR
        raise RuntimeError("JPEG encoding failed")
    image = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].copy()

    alpha = _quantise_alpha(alpha)
    coarse = make_coarse_mask(rng, alpha)
    return image, alpha, coarse


# --------------------------------------------------------------------------------------
# deterministic per-item entry points
# --------------------------------------------------------------------------------------
def foreground_item(seed: int, i: int, size: Size) -> tuple[np.ndarray, np.ndarray]:
    """Foreground ``i`` of dataset ``seed``: ``make_foreground(item_rng(seed, 'foreground', i), size)``."""
    return make_foreground(item_rng(seed, "foreground", i), size)


def background_item(seed: int, i: int, size: Size) -> np.ndarray:
    """Background ``i`` of dataset ``seed``: ``make_background(item_rng(seed, 'background', i), size)``."""
    return make_background(item_rng(seed, "background", i), size)


def natural_item(seed: int, i: int, size: Size) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Natural scene ``i`` of dataset ``seed``: ``make_natural_scene(item_rng(seed, 'natural', i), size)``."""
    return make_natural_scene(item_rng(seed, "natural", i), size)
