"""Pure part of the study report: grids of metrics over the label budgets (the findings: matting_core/findings.py).

Input is the evaluate stage's per-cell record (one ``metrics/<cell>.json`` each, already
parsed into a dict)::

    {"cell": "seg60-mat8", "seg_count": 60, "mat_count": 8, "kind": "both",
     "primary": "student",
     "models": {"student": {"network": ..., "params": int, "fps": float,
                            "sets": {"natural": {"n": int,
                                                 "whole": {"sad", "mse", "grad", "conn"},
                                                 "boundary": {...}, "unknown": {...}}}},
                "teacher": {...}},
     "methods": {"<method>": {"sets": {...}, "fps": float}}}      # optional

Compared methods may also come separately (``metrics/methods/<name>.json``, one model
entry each with ``method``, ``seg_count``, ``mat_count``, ``required_input``,
``guidance_rule``); :func:`method_rows` takes them as ``methods``.

``cells`` below maps ``(seg_count, mat_count)`` to that dict; a grid cell whose file is
absent is simply not a key. Units: SAD, Grad, Conn are /1000 already; MSE is raw and is
shown ×1e3 (:data:`DISPLAY_SCALE`). Lower is better for every metric.

Nothing here reads files or knows a params.yaml key; ``stages/report.py`` does the I/O.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from matting_core.grid import cell_kind, cell_name

__all__ = [
    "DASH",
    "DISPLAY_SCALE",
    "METRICS",
    "MISSING",
    "NOT_AVAILABLE",
    "REGIONS",
    "Grid",
    "build_grid",
    "cell_kind",
    "cell_name",
    "discover_sets",
    "format_budget",
    "format_value",
    "grid_axes",
    "metric_label",
    "metric_value",
    "method_rows",
    "methods_markdown",
    "primary_role",
    "safe_name",
    "summary_metrics",
]

Cells = Mapping[tuple[int, int], Mapping[str, Any]]

METRICS: tuple[str, ...] = ("mse", "sad", "grad", "conn")
REGIONS: tuple[str, ...] = ("whole", "boundary", "unknown")
# multiply the stored value by this to get the number tables and figures print
DISPLAY_SCALE: dict[str, float] = {"mse": 1e3, "sad": 1.0, "grad": 1.0, "conn": 1.0}
_LABELS = {"mse": ("MSE", "×1e3"), "sad": ("SAD", "/1e3"), "grad": ("Grad", "/1e3"), "conn": ("Conn", "/1e3")}
_PRIMARY_BY_KIND = {"seg_only": "pretrain", "mat_only": "teacher", "both": "student"}

DASH = "—"  # the (0, 0) cell: no labels, not part of the study
MISSING = "missing"  # the cell's metrics file is absent (or unreadable)
NOT_AVAILABLE = "n/a"  # the file exists but lacks this set / region / metric


def safe_name(name: str) -> str:
    """``name`` with anything but letters, digits, ``_.-`` replaced by ``_`` (file names, ids)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "_"


def grid_axes(seg: Sequence[int], mat: Sequence[int]) -> tuple[list[int], list[int]]:
    """Row and column budgets of the grid: ``[0, *seg]`` and ``[0, *mat]``."""
    return [0, *[int(s) for s in seg if s != 0]], [0, *[int(m) for m in mat if m != 0]]


def metric_label(metric: str, ascii_only: bool = False) -> str:
    """``"MSE ×1e3"``, ``"SAD /1e3"``... (``"MSE x1e3"`` with ``ascii_only``)."""
    name, unit = _LABELS.get(metric, (metric.upper(), ""))
    text = f"{name} {unit}".strip()
    return text.replace("×", "x") if ascii_only else text


def format_value(value: float) -> str:
    """Three decimals for the usual range, three significant digits outside it."""
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.3f}"
    return f"{value:.3g}"


def format_budget(n: int) -> str:
    """Axis label of a budget as the paper writes it: 50, 200, 2K, 2.5K, 50K."""
    if n >= 1000 and n % 100 == 0:
        k = n / 1000
        return f"{k:g}K"
    return str(n)


def primary_role(cell: Mapping[str, Any]) -> str:
    """Which model is the cell's result: the record's ``primary``, else from its kind."""
    role = cell.get("primary")
    if role:
        return str(role)
    kind = cell.get("kind") or cell_kind(int(cell["seg_count"]), int(cell["mat_count"]))
    return _PRIMARY_BY_KIND[kind]


def _lookup(sets: Any, valset: str, region: str, metric: str) -> float | None:
    try:
        value = sets[valset][region][metric]
    except (KeyError, TypeError):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def metric_value(
    cell: Mapping[str, Any], valset: str, region: str, metric: str, role: str | None = None
) -> float | None:
    """Raw value of ``metric`` for model ``role`` (default: primary); None where absent."""
    role = role or primary_role(cell)
    model = (cell.get("models") or {}).get(role)
    if not isinstance(model, Mapping):
        return None
    return _lookup(model.get("sets"), valset, region, metric)


def discover_sets(cells: Cells, preferred: Sequence[str] = ("natural", "composited")) -> dict[str, list[str]]:
    """Validation sets of the primary models and the regions each one has.

    Order: ``preferred`` names first, then the others alphabetically; regions in
    :data:`REGIONS` order (``unknown`` only where some cell has it).
    """
    found: dict[str, set[str]] = {}
    for cell in cells.values():
        model = (cell.get("models") or {}).get(primary_role(cell))
        sets = model.get("sets") if isinstance(model, Mapping) else None
        if not isinstance(sets, Mapping):
            continue
        for name, regions in sets.items():
            if isinstance(regions, Mapping):
                found.setdefault(str(name), set()).update(r for r in regions if r in REGIONS)
    order = [s for s in preferred if s in found] + sorted(s for s in found if s not in preferred)
    return {s: [r for r in REGIONS if r in found[s]] for s in order}


@dataclass(frozen=True)
class Grid:
    """One metric over the budget grid: rows = seg budgets, columns = mat budgets.

    ``entries[(s, m)]`` is the raw value (float) or one of :data:`DASH`, :data:`MISSING`,
    :data:`NOT_AVAILABLE`.
    """

    valset: str
    region: str
    metric: str
    seg: list[int]
    mat: list[int]
    entries: dict[tuple[int, int], float | str] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return f"{self.valset} · {self.region} · {metric_label(self.metric)}"

    @property
    def stem(self) -> str:
        """File name stem: ``<valset>-<region>-<metric>``."""
        return f"{safe_name(self.valset)}-{self.region}-{self.metric}"

    def value(self, s: int, m: int) -> float | None:
        """Raw value of a cell, None when it has none."""
        v = self.entries.get((s, m), MISSING)
        return v if isinstance(v, float) else None

    def shown(self, s: int, m: int) -> float | None:
        """Display value (MSE ×1e3), None when the cell has none."""
        v = self.value(s, m)
        return None if v is None else v * DISPLAY_SCALE.get(self.metric, 1.0)

    def text(self, s: int, m: int) -> str:
        v = self.entries.get((s, m), MISSING)
        return format_value(v * DISPLAY_SCALE.get(self.metric, 1.0)) if isinstance(v, float) else v

    def values(self) -> list[float]:
        return [v for v in self.entries.values() if isinstance(v, float)]

    def best(self) -> tuple[int, int] | None:
        """The cell with the lowest value (every metric here is an error)."""
        present = [(v, k) for k, v in self.entries.items() if isinstance(v, float)]
        return min(present)[1] if present else None

    def corner(self, ascii_only: bool = False) -> str:
        return f"seg \\ mat ({metric_label(self.metric, ascii_only)})"

    def to_markdown(self) -> str:
        best = self.best()
        header = f"| {self.corner()} | " + " | ".join(str(m) for m in self.mat) + " |"
        rule = "|---:|" + "---:|" * len(self.mat)
        rows = []
        for s in self.seg:
            cells = []
            for m in self.mat:
                t = self.text(s, m)
                cells.append(f"**{t}**" if (s, m) == best else t)
            rows.append(f"| {s} | " + " | ".join(cells) + " |")
        note = (
            f"**{self.title}** (set · region · metric): lower is better, best in bold. "
            f"Rows: segmentation labels, columns: matte labels. Each cell shows its "
            f"primary model (seg-only: pre-trained, mat-only: teacher, both: MLB student); "
            f"{DASH} = (0, 0), not in the study."
        )
        return "\n".join([note, "", header, rule, *rows, ""])

    def to_csv(self) -> str:
        """Wide CSV with the display values (MSE ×1e3) and the unit in the corner cell."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([self.corner(ascii_only=True), *self.mat])
        for s in self.seg:
            row: list[str | int] = [s]
            for m in self.mat:
                v = self.shown(s, m)
                row.append(f"{v:.6g}" if v is not None else self.text(s, m))
            writer.writerow(row)
        return buf.getvalue()

    def long_rows(self) -> list[dict[str, Any]]:
        """``{"seg", "mat", "cell", <metric>_x1e3|<metric>}`` for every cell with a value."""
        key = "mse_x1e3" if self.metric == "mse" else self.metric
        return [
            {"seg": s, "mat": m, "cell": cell_name(s, m), key: round(self.shown(s, m), 6)}
            for s in self.seg
            for m in self.mat
            if self.value(s, m) is not None
        ]


def build_grid(
    cells: Cells, seg: Sequence[int], mat: Sequence[int], valset: str, region: str, metric: str
) -> Grid:
    """The grid of ``metric`` for each cell's primary model on ``valset`` / ``region``."""
    rows, cols = grid_axes(seg, mat)
    entries: dict[tuple[int, int], float | str] = {}
    for s in rows:
        for m in cols:
            if (s, m) == (0, 0):
                entries[(s, m)] = DASH
            elif (s, m) not in cells:
                entries[(s, m)] = MISSING
            else:
                v = metric_value(cells[(s, m)], valset, region, metric)
                entries[(s, m)] = NOT_AVAILABLE if v is None else v
    return Grid(valset, region, metric, rows, cols, entries)


def summary_metrics(cells: Cells, sets: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Flat ``{"<valset>/<region>/<metric>/<cell>": raw value}`` of every primary model.

    The names follow the MLflow metric names (``natural/boundary/mse``) plus the cell; the
    values are raw (MSE not scaled), as in ``metrics/<cell>.json``.
    """
    out: dict[str, float] = {}
    for valset, regions in sets.items():
        for region in regions:
            for metric in METRICS:
                for (s, m), cell in sorted(cells.items()):
                    v = metric_value(cell, valset, region, metric)
                    if v is not None:
                        out[f"{valset}/{region}/{metric}/{cell_name(s, m)}"] = v
    return out


# --------------------------------------------------------------------------- other methods

METHOD_COLUMNS: tuple[str, ...] = (
    "cell", "method", "input", "whole_mse", "boundary_mse", "whole_sad", "boundary_sad", "fps", "guidance",
)


def method_rows(
    cells: Cells,
    valset: str = "natural",
    methods: Mapping[tuple[int, int], Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Rows of the method comparison: per cell with compared methods, its primary + each method.

    Args:
        cells: the grid's cell records; a cell's own ``methods`` mapping (if any) is used too.
        valset: the validation set of the numbers (the natural one).
        methods: ``{(seg, mat): {name: entry}}`` with entries as ``metrics/methods/<name>.json``
            (``sets``, ``fps``, optional ``required_input`` and ``guidance_rule``); ``None``
            for an expected method whose file is missing (its row says so).

    Each row: cell, method, input (``RGB`` / ``trimap`` / ``mask`` / ``prompt``), whole and
    boundary MSE (raw) and SAD (/1000) on ``valset``, fps, guidance (the evaluation rule);
    None where absent. The main method's row comes first (``MLB (<role>)``; ``MLB (missing)``
    when the cell has no metrics file). Empty when no cell has compared methods.
    """
    per_cell: dict[tuple[int, int], dict[str, Any]] = {}
    for key, cell in cells.items():
        own = cell.get("methods")
        if isinstance(own, Mapping) and own:
            per_cell.setdefault(key, {}).update(own)
    for key, entries in (methods or {}).items():
        if entries:
            per_cell.setdefault(tuple(key), {}).update(entries)
    rows: list[dict[str, Any]] = []
    for (s, m), entries in sorted(per_cell.items()):
        cell = cells.get((s, m))
        if cell is not None:
            role = primary_role(cell)
            main: tuple[str, Any] = (f"MLB ({role})", (cell.get("models") or {}).get(role) or {})
        else:
            main = ("MLB (missing)", None)
        named = [(str(k), v if isinstance(v, Mapping) else None) for k, v in entries.items()]
        for name, entry in [main, *named]:
            row: dict[str, Any] = {"cell": cell_name(s, m), "method": name}
            if entry is None:
                if name != main[0]:
                    row["method"] = f"{name} (missing)"
                entry = {}
            sets = entry.get("sets")
            fps = entry.get("fps")
            row.update(
                {
                    "input": "RGB" if name == main[0] else entry.get("required_input"),
                    "whole_mse": _lookup(sets, valset, "whole", "mse"),
                    "boundary_mse": _lookup(sets, valset, "boundary", "mse"),
                    "whole_sad": _lookup(sets, valset, "whole", "sad"),
                    "boundary_sad": _lookup(sets, valset, "boundary", "sad"),
                    "fps": float(fps) if isinstance(fps, (int, float)) and not isinstance(fps, bool) else None,
                    "guidance": _set_guidance(entry, valset),
                }
            )
            rows.append(row)
    return rows


def _set_guidance(entry: Mapping[str, Any], valset: str) -> str | None:
    """The guidance a method got on ``valset`` (as evaluated), else its rule, else None."""
    try:
        used = entry["sets"][valset]["guidance"]
        if isinstance(used, str) and used:
            return used
    except (KeyError, TypeError):
        pass
    rule = entry.get("guidance_rule")
    return rule if isinstance(rule, str) and rule else None


def methods_markdown(rows: Sequence[Mapping[str, Any]], valset: str) -> str:
    """The method comparison as a Markdown table (MSE ×1e3, SAD /1e3, FPS)."""
    lines = [
        f"# Method comparison on the `{valset}` set",
        "",
        "MSE x1e3 and SAD /1e3, whole image and boundary region (0.05 < alpha < 0.95); lower is better "
        "except FPS. Each related method is trained at the cell shown, on the same matte subset, and gets "
        "the guidance listed, made from the validation set's ground truth.",
        "",
        "| cell | method | input | whole MSE x1e3 | boundary MSE x1e3 | whole SAD | boundary SAD | FPS | guidance |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]

    def num(v: float | None, scale: float = 1.0) -> str:
        return NOT_AVAILABLE if v is None else format_value(v * scale)

    for r in rows:
        fps = NOT_AVAILABLE if r.get("fps") is None else f"{r['fps']:.1f}"
        lines.append(
            f"| {r['cell']} | {r['method']} | {r.get('input') or ''} | {num(r['whole_mse'], 1e3)} | "
            f"{num(r['boundary_mse'], 1e3)} | {num(r['whole_sad'])} | {num(r['boundary_sad'])} | {fps} | "
            f"{r.get('guidance') or ''} |"
        )
    return "\n".join(lines) + "\n"
