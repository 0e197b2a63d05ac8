"""matting_pipeline.layout: the per-seed tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from matting_pipeline.layout import Layout, seed_name


def test_for_seed_puts_models_metrics_eval_and_pseudolabels_under_the_seed():
    root = Layout(data="d", models="m", metrics="x", eval="e", reports="r")
    seeded = root.for_seed(2)
    assert seeded.model_path("pretrain", 60) == Path("m/seed2/pretrain/seg60/model.pt")
    assert seeded.model_path("control", 60) == Path("m/seed2/control/seg60/model.pt")
    assert seeded.model_path("student", 60, 8) == Path("m/seed2/student/seg60-mat8/model.pt")
    assert seeded.method_dir("dim", 60, 8) == Path("m/seed2/methods/dim/seg60-mat8")
    assert seeded.cell_metrics(60, 8) == Path("x/seed2/seg60-mat8.json")
    assert seeded.method_metrics("dim") == Path("x/seed2/methods/dim.json")
    assert seeded.cell_eval_dir(0, 8) == Path("e/seed2/seg0-mat8")
    assert seeded.pseudolabel_dir(60, 8) == Path("d/pseudolabels/seed2/seg60-mat8")
    # the data every seed shares, and the report, stay where they are
    assert seeded.shard_set("seg") == root.shard_set("seg") == Path("d/shards/seg")
    assert seeded.composite_set("train") == Path("d/composite/train") and seeded.reports == Path("r")
    # without a seed: the roots as given
    assert root.model_path("pretrain", 60) == Path("m/pretrain/seg60/model.pt")


def test_seed_errors():
    with pytest.raises(ValueError, match=">= 0"):
        Layout().for_seed(-1)
    with pytest.raises(ValueError, match="already"):
        Layout().for_seed(0).for_seed(1)
    with pytest.raises(ValueError, match="pretrain, control, teacher or student"):
        Layout().model_dir("methods", 1)
    assert seed_name(3) == "seed3"
