"""A small world for the benchmarks that need real pipeline data (not timed by them).

:func:`synthetic_data` runs the pipeline's own ingest → shard → composite on the embedded
synthetic generator into ``<root>/data``, with the repository's ``params.yaml`` (only the
data set's size and the given overrides changed), and returns the parsed params.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def synthetic_data(root: Path, counts: dict[str, int], train: dict[str, Any] | None = None,
                   network: str = "unet_r18x0.5", val_composited: bool = False):
    """Params (params.yaml with ``counts`` for ``data.synthetic``, ``network``, the
    ``train`` overrides merged per section) and the data under ``root / "data"``."""
    import yaml

    from matting_pipeline.config import parse_params
    from stages.composite import composite_all
    from stages.ingest import ingest
    from stages.shard import shard_all

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["synthetic"].update(counts)
    raw["composite"]["val_composited"] = val_composited
    raw["model"]["network"] = network
    raw["train"]["device"] = "cpu"
    for key, value in (train or {}).items():
        if isinstance(value, dict):
            raw["train"][key].update(value)
        else:
            raw["train"][key] = value
    params = parse_params(raw)
    data = root / "data"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ingest(params.data, data, progress=False)
        shard_all(params.shard, data, progress=False)
        composite_all(params.composite, data, params.shard.samples_per_shard, progress=False)
    return params
