"""matting_core.findings: seed means, per-image alignment, step counts, the regime block."""

from __future__ import annotations

import numpy as np
import pytest

from matting_core import findings
from matting_pipeline.config import parse_params


def record(seed: int, whole: list[float], keys: list[str] | None = None, **extra) -> dict:
    keys = keys or [f"k{i}" for i in range(len(whole))]
    natural = {"n": len(whole), "whole": {"mse": float(np.mean(whole))}, "boundary": {"mse": 2 * float(np.mean(whole))},
               "per_image": {"key": keys, "whole_mse": whole, "boundary_mse": [2 * w for w in whole]}, **extra}
    return {"seed": seed, "primary": "pretrain", "kind": "seg_only", "models": {"pretrain": {"fps": 10.0 + seed,
            "network": "unet_r18x0.5", "sets": {"natural": natural}}}}


def test_mean_record_averages_numbers_and_drops_per_image():
    mean = findings.mean_record([record(0, [0.1, 0.3]), record(1, [0.3, 0.5])])
    entry = mean["models"]["pretrain"]
    assert entry["sets"]["natural"]["whole"]["mse"] == pytest.approx(0.3)
    assert entry["fps"] == pytest.approx(10.5) and entry["network"] == "unet_r18x0.5"
    assert "per_image" not in entry["sets"]["natural"] and mean["seeds"] == [0, 1]
    with pytest.raises(ValueError):
        findings.mean_record([])


def test_per_image_errors_align_images_by_key_across_seeds():
    a = record(0, [0.1, 0.2, 0.3], ["a", "b", "c"])
    b = record(1, [0.3, 0.1, 0.2], ["c", "a", "b"])  # same images, another order
    x = findings.per_image_errors([a, b], "pretrain", "natural", "whole")
    assert x.shape == (2, 3)
    np.testing.assert_allclose(x, [[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]])
    other = record(1, [0.1, 0.2, 0.3], ["a", "b", "z"])
    assert findings.per_image_errors([a, other], "pretrain", "natural", "whole") is None
    assert findings.per_image_errors([a], "student", "natural", "whole") is None


def test_model_steps_count_pretraining_and_the_own_step():
    params = parse_params({"train": {"pretrain": {"iters": 1000, "lr": 1e-3}, "teacher": {"iters": 600, "lr": 1e-3},
                                     "student": {"iters": 500, "lr": 1e-3}}})
    assert findings.model_steps(params, "pretrain", 240) == 1000
    assert findings.model_steps(params, "student", 240) == findings.model_steps(params, "control", 240) == 1500
    assert findings.model_steps(params, "teacher", 240) == 1600
    assert findings.model_steps(params, "teacher", 0) == 600  # mat-only: from scratch


def test_regime_reports_label_ratios_and_beta():
    seg_only = record(0, [0.04, 0.06], labels={"mask": {"whole": {"mse": 0.02}, "boundary": {"mse": 0.2}}})
    both = {"seed": 0, "primary": "student", "models": {
        "student": {"sets": {"natural": {"whole": {"mse": 0.03}, "boundary": {"mse": 0.1}}}},
        "teacher": {"sets": {
            "natural": {"whole": {"mse": 0.05}, "boundary": {"mse": 0.12},
                        "beta": {"band": 0.4, "fg": 0.1, "bg": 0.05, "outside": 0.07},
                        "labels": {"mask": {"whole": {"mse": 0.02}, "boundary": {"mse": 0.2}},
                                   "blended": {"whole": {"mse": 0.015}, "boundary": {"mse": 0.08}}}},
            "composited": {"beta": {"band": 0.6, "fg": 0.2, "bg": 0.1, "outside": 0.15}}}}}}
    out = findings.regime({(240, 0): [seg_only], (240, 32): [both]})
    seg = out["seg_only"]["cells"]["seg240-mat0"]["model_vs_label"]
    assert seg["whole"]["ratio"] == pytest.approx(0.05 / 0.02) and seg["boundary"]["ratio"] == pytest.approx(0.1 / 0.2)
    cell = out["both"]["cells"]["seg240-mat32"]
    assert cell["model_vs_label"]["boundary"]["ratio"] == pytest.approx(0.1 / 0.08)
    assert cell["blended_vs_mask"]["boundary"]["ratio"] == pytest.approx(0.08 / 0.2)
    assert out["both"]["beta_band"] == pytest.approx(0.6) and out["both"]["beta_outside"] == pytest.approx(0.15)
    assert out["mat_only"] == {"cells": {}}
