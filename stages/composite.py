"""Stage ``composite``: DIM-style composites, two-instance samples and composited validation.

Reads ``<data-root>/shards/matte`` and ``<data-root>/shards/background`` and params
``composite``; writes two shard sets (docs/FORMATS.md):

- ``<data-root>/composite/train``: every *training* foreground over
  ``backgrounds_per_fg`` backgrounds (DIM), plus ``round(two_instance_ratio * singles)``
  instance-wise samples with two foregrounds on one background (MGM in the wild).
- ``<data-root>/composite/val-composited`` (when ``val_composited``): each held-out
  foreground over ``val_backgrounds_per_fg`` held-out backgrounds (Distinctions-646 style).

Hold-outs: the *last* ``val_foregrounds`` keys of the matte set's subset order are the
validation foregrounds, so they are never in a training subset ``subset_keys(matte, M)``
for ``M <= count - val_foregrounds``; the last ``val_backgrounds`` keys of the background
order are kept for validation only (0 = validation shares the training backgrounds).

Each sample: ``image`` (uint8 RGB), ``alpha``, ``fg``, ``bg`` with
``image = round(255 * (alpha * fg + (1 - alpha) * bg))`` (fg, bg as stored / 255), so the
only error of the composite is its 8-bit quantisation (at most 0.5/255 per channel).
Single-instance samples copy the matte alpha and fg members bit-exactly; ``bg`` is the
background after ``fit_background`` (random scale, random crop to the foreground size).
Meta: ``fg_keys`` (``fg_keys[0]`` is the target's matte key), ``bg_key``, ``two_instance``,
``target`` (``"single"``, ``"front"`` or ``"back"``: the target's layer).

Two-instance samples (project choices, params ``composite.two_instance_scale``): the
target is a training foreground at position ``p >= 1`` of the matte order and its partner
is drawn from positions ``< p``, so ``fg_keys[0]`` in ``subset_keys(matte, M)`` implies
every ``fg_keys`` entry is too (a budget-M teacher never sees another alpha). The partner
is scaled to fit the target's canvas times ``U(two_instance_scale)`` and placed at a random
position (up to half outside left/right); front/back is drawn at random (swapped to front
when less than 30% of the target would stay visible). The target alpha is its *visible*
alpha (``alpha_A`` in front, ``alpha_B * (1 - alpha_A)`` behind), stored as uint16; ``bg``
is the *effective* background seen behind the target (the other instance over the
background), so ``image = alpha * fg + (1 - alpha) * bg`` holds for every sample and the
composition loss needs no special case.

RGBA cutouts: their RGB is used as the foreground colour as is (straight colour).

With ``data.shard_url`` set, the matte and background sets are read from there (verified) and
both outputs are published there (``matting_pipeline.shard_store``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np

from matting_core.compositing import composite, composite_two_instances, fit_background, layer_two_instances
from matting_pipeline import shard_store, shards
from matting_pipeline.config import CompositeConfig, load_params
from matting_pipeline.atomic import code_digest
from matting_pipeline.layout import Layout
from matting_pipeline.shards import default_workers

DESCRIPTION = __doc__

TRAIN_SET = "train"
VAL_SET = "val-composited"
MIN_VISIBLE_FRACTION = 0.3
_KIND_IDS = {"single": 0, "two": 1, "val": 2}


class CompositeError(RuntimeError):
    """The inputs cannot give the requested composites (too few foregrounds/backgrounds)."""


# ---------------------------------------------------------------------------- planning


def _choose(rng: np.random.Generator, pool: list[str], n: int) -> list[str]:
    """``n`` distinct items of ``pool`` when possible, else with replacement."""
    idx = rng.choice(len(pool), size=n, replace=n > len(pool))
    return [pool[int(i)] for i in idx]


def plan(matte_order: list[str], background_order: list[str], cfg: CompositeConfig) -> dict[str, list[dict]]:
    """Decide every composite sample: which foregrounds, background, layering and seed.

    Args:
        matte_order, background_order: the sets' subset orders (``index["order"]``).
    Returns:
        ``{"train": [job, ...], "val-composited": [job, ...]}``; a job is
        ``{"key", "kind": single|two|val, "fg_keys", "bg_key", "target", "seed": [int, int, int]}``.
    Raises:
        CompositeError: the hold-outs leave no training foreground/background.
    """
    n_fg, n_bg = len(matte_order), len(background_order)
    hold_fg = cfg.held_out_foregrounds
    if n_fg - hold_fg < 1:
        raise CompositeError(
            f"composite.val_foregrounds ({hold_fg}) leaves no training foreground: the matte set has {n_fg}"
        )
    if cfg.val_composited and hold_fg == 0:
        raise CompositeError("composite.val_composited is true but composite.val_foregrounds is 0")
    hold_bg = cfg.val_backgrounds if (cfg.val_composited and hold_fg) else 0
    if n_bg - hold_bg < 1:
        raise CompositeError(
            f"composite.val_backgrounds ({hold_bg}) leaves no training background: the background set has {n_bg}"
        )
    train_fgs, val_fgs = matte_order[: n_fg - hold_fg], matte_order[n_fg - hold_fg :]
    train_bgs = background_order[: n_bg - hold_bg]
    val_bgs = background_order[n_bg - hold_bg :] if hold_bg else background_order
    rng = np.random.default_rng([cfg.seed, 7])
    train: list[dict] = []
    for fg in train_fgs:
        for bg in _choose(rng, train_bgs, cfg.backgrounds_per_fg):
            train.append({"kind": "single", "fg_keys": [fg], "bg_key": bg, "target": "single"})
    n_two = int(round(cfg.two_instance_ratio * len(train))) if len(train_fgs) >= 2 else 0
    for _ in range(n_two):
        pos = int(rng.integers(1, len(train_fgs)))
        partner = int(rng.integers(0, pos))
        bg = train_bgs[int(rng.integers(0, len(train_bgs)))]
        layer = "front" if rng.random() < 0.5 else "back"
        train.append({"kind": "two", "fg_keys": [train_fgs[pos], train_fgs[partner]], "bg_key": bg, "target": layer})
    val: list[dict] = []
    for fg in val_fgs:
        for bg in _choose(rng, val_bgs, cfg.val_backgrounds_per_fg):
            val.append({"kind": "val", "fg_keys": [fg], "bg_key": bg, "target": "single"})
    for set_name, jobs in ((TRAIN_SET, train), (VAL_SET, val)):
        for i, job in enumerate(jobs):
            job["key"] = f"{set_name}-{i:06d}"
            job["seed"] = [int(cfg.seed), _KIND_IDS[job["kind"]], i]
    return {TRAIN_SET: train, VAL_SET: val}


# ---------------------------------------------------------------------------- rendering


def _to_unit(image_u8: np.ndarray) -> np.ndarray:
    return image_u8.astype(np.float64) / 255.0


def _quantise(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def place_instance(
    fg: np.ndarray, alpha: np.ndarray, size_hw: tuple[int, int], rng: np.random.Generator, scale_range: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Scale a foreground to fit ``size_hw`` times ``U(scale_range)`` and paste it at a random place.

    Args:
        fg: ``(h, w, 3) uint8``; alpha: ``(h, w) float`` in [0, 1].
    Returns:
        ``fg: (H, W, 3) uint8`` (0 outside the instance), ``alpha: (H, W) float64`` in [0, 1].
        The top edge is uniform in ``[0, H - h']``; the left edge in ``[-w'/2, W - w'/2]``
        (up to half the instance may fall outside, it is cut).
    """
    H, W = size_hw
    h, w = alpha.shape
    s = min(H / h, W / w) * float(rng.uniform(*scale_range))
    nh, nw = max(1, min(H, int(round(h * s)))), max(1, int(round(w * s)))
    interp = cv2.INTER_AREA if s < 1.0 else cv2.INTER_LINEAR
    fg_s = cv2.resize(fg, (nw, nh), interpolation=interp)
    a_s = np.clip(cv2.resize(alpha.astype(np.float64), (nw, nh), interpolation=interp), 0.0, 1.0)
    top = int(rng.integers(0, H - nh + 1))
    left = int(rng.integers(-(nw // 2), W - nw // 2 + 1))
    out_fg = np.zeros((H, W, 3), np.uint8)
    out_a = np.zeros((H, W), np.float64)
    x0, x1 = max(0, left), min(W, left + nw)
    if x1 > x0:
        out_fg[top : top + nh, x0:x1] = fg_s[:, x0 - left : x1 - left]
        out_a[top : top + nh, x0:x1] = a_s[:, x0 - left : x1 - left]
    return out_fg, out_a


def render(job: dict, payload: dict, cfg: CompositeConfig) -> dict[str, tuple[str, bytes]]:
    """Render one planned sample; returns its encoded members.

    ``payload``: ``{"fg": [members of fg_keys[0], (partner)], "bg": (ext, bytes)}`` with the
    matte members ``fg``/``alpha`` as stored in the matte shards.
    """
    rng = np.random.default_rng(job["seed"])
    target = payload["fg"][0]
    fg_u8 = shards.decode_member("fg", *target["fg"])
    alpha = shards.decode_member("alpha", *target["alpha"]).astype(np.float64)
    size_hw = alpha.shape
    if fg_u8.shape[:2] != size_hw:
        raise CompositeError(f"{job['fg_keys'][0]}: fg {fg_u8.shape[:2]} and alpha {size_hw} differ")
    bg_u8 = fit_background(shards.decode_member("bg", *payload["bg"]), size_hw, rng, cfg.background_scale)
    F, B = _to_unit(fg_u8), _to_unit(bg_u8)
    meta = {
        "set": TRAIN_SET if job["kind"] != "val" else VAL_SET,
        "fg_keys": list(job["fg_keys"]),
        "bg_key": job["bg_key"],
        "two_instance": job["kind"] == "two",
        "target": job["target"],
        "width": int(size_hw[1]),
        "height": int(size_hw[0]),
    }
    if job["kind"] != "two":
        image = _quantise(composite(F, B, alpha))
        return {
            "meta": shards.encode_member("meta", {**meta, "key": job["key"]}),
            "image": shards.encode_member("image", image),
            "alpha": target["alpha"],  # bit-exact copy of the matte alpha
            "fg": target["fg"],
            "bg": shards.encode_member("bg", bg_u8),
        }
    partner = payload["fg"][1]
    p_fg, p_alpha = place_instance(
        shards.decode_member("fg", *partner["fg"]),
        shards.decode_member("alpha", *partner["alpha"]),
        size_hw,
        rng,
        cfg.two_instance_scale,
    )
    P = _to_unit(p_fg)
    layer = job["target"]
    if layer == "back":
        _, visible, _ = layer_two_instances(p_alpha, alpha)
        if visible.sum() < MIN_VISIBLE_FRACTION * alpha.sum():
            layer = "front"
    if layer == "front":
        image2, _ = composite_two_instances(F, alpha, P, p_alpha, B)
        visible = alpha
    else:
        image2, _ = composite_two_instances(P, p_alpha, F, alpha, B)
        _, visible, _ = layer_two_instances(p_alpha, alpha)
    # effective background behind the target: image2 = v*F + (1 - v)*B_eff
    v = visible[..., None]
    open_ = (1.0 - v) > 1e-6
    b_eff = np.where(open_, (image2 - v * F) / np.where(open_, 1.0 - v, 1.0), B)
    b_eff_u8 = _quantise(np.clip(b_eff, 0.0, 1.0))
    alpha_ext, alpha_png = shards.encode_member("alpha", visible.astype(np.float64))
    v_stored = shards.decode_member("alpha", alpha_ext, alpha_png).astype(np.float64)
    image = _quantise(composite(F, _to_unit(b_eff_u8), v_stored))
    meta["target"] = layer
    return {
        "meta": shards.encode_member("meta", {**meta, "key": job["key"]}),
        "image": shards.encode_member("image", image),
        "alpha": (alpha_ext, alpha_png),
        "fg": target["fg"],
        "bg": shards.encode_member("bg", b_eff_u8),
    }


def _render_job(args: tuple[dict, dict, CompositeConfig]) -> dict[str, tuple[str, bytes]]:
    return render(*args)


# ---------------------------------------------------------------------------- the stage


def fingerprint(matte_index: dict, background_index: dict, cfg: CompositeConfig, samples_per_shard: int) -> str:
    """Digest of the inputs of both output sets: input shard digests, params and code."""
    h = hashlib.sha256()
    h.update(str(samples_per_shard).encode())
    for index in (matte_index, background_index):
        h.update(json.dumps([s["sha256"] for s in index["shards"]] + index["order"]).encode())
    h.update(json.dumps(cfg.model_dump(), sort_keys=True).encode())
    h.update(code_digest(__file__).encode())
    return h.hexdigest()


def composite_all(
    cfg: CompositeConfig,
    data_root: str | Path = "data",
    samples_per_shard: int = 64,
    workers: int | None = None,
    progress: bool = True,
    force: bool = False,
) -> dict[str, dict]:
    """Run the stage; returns ``{set name: index}`` of the sets written or up to date."""
    workers = default_workers() if workers is None else max(1, int(workers))
    layout = Layout(data=data_root)
    matte_dir, bg_dir = layout.shard_set("matte"), layout.shard_set("background")
    matte_index, bg_index = shards.read_index(matte_dir), shards.read_index(bg_dir)
    jobs = plan(matte_index["order"], bg_index["order"], cfg)
    digest = fingerprint(matte_index, bg_index, cfg, samples_per_shard)
    out_root = layout.composite_root
    wanted = [TRAIN_SET] + ([VAL_SET] if cfg.val_composited else [])
    todo = []
    indexes = {}
    for set_name in wanted:
        try:
            index = None if force else shards.read_index(out_root / set_name, local=True)
        except shards.ShardError:
            index = None
        if index is not None and index.get("fingerprint") == digest:
            indexes[set_name] = index
            print(f"{set_name:<16} {index['count']:>7} samples  (up to date)")
        else:
            todo.append(set_name)
    if todo:
        # encoded members of just the foregrounds/backgrounds used (about their size on disk)
        need_fg = {k for name in todo for job in jobs[name] for k in job["fg_keys"]}
        need_bg = {job["bg_key"] for name in todo for job in jobs[name]}
        fgs = {s["key"]: s["members"] for s in shards.iter_encoded_samples(matte_dir, keys=need_fg)}
        bgs = {s["key"]: s["members"]["image"] for s in shards.iter_encoded_samples(bg_dir, keys=need_bg)}
    for set_name in todo:
        set_jobs = jobs[set_name]
        args = [
            (job, {"fg": [fgs[k] for k in job["fg_keys"]], "bg": bgs[job["bg_key"]]}, cfg) for job in set_jobs
        ]
        with shards.ShardWriter(out_root / set_name, set_name, samples_per_shard, cfg.seed, digest) as writer:
            results = shards.parallel_map(_render_job, args, workers=workers, desc=f"composite {set_name}", progress=progress)
            for job, members in zip(set_jobs, results):
                writer.add_encoded(job["key"], members)
            writer.set_order(shards.seeded_order([j["key"] for j in set_jobs], cfg.seed, set_name))
        indexes[set_name] = writer.index
        n_two = sum(1 for j in set_jobs if j["kind"] == "two")
        print(f"{set_name:<16} {writer.index['count']:>7} samples  ({n_two} two-instance)  written")
    stale = out_root / VAL_SET
    if not cfg.val_composited and stale.is_dir():
        shutil.rmtree(stale)
        print(f"{VAL_SET:<16} removed (composite.val_composited is false)")
    return indexes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--data-root", default="data", help="data folder (default: data/)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPUs, at most 8)")
    parser.add_argument("--force", action="store_true", help="rebuild sets that are up to date")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    shard_store.activate(params.data.shard_url, args.data_root)  # matte/background read from there when set
    try:
        indexes = composite_all(
            params.composite, args.data_root, params.shard.samples_per_shard, args.workers, not args.no_progress, args.force
        )
        layout = Layout(data=args.data_root)
        shard_store.publish_stage_sets(params.data.shard_url, args.data_root,
                                       [layout.composite_set(name) for name in indexes], progress=not args.no_progress)
    except (CompositeError, shards.ShardError) as err:
        print(f"matting composite: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from matting_pipeline.cli import run_module

    run_module("composite")
