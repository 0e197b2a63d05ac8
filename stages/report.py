"""Stage ``report``: the study's tables, heatmaps, findings F1-F3 and an offline HTML page.

Reads ``metrics/seed<k>/<cell>.json`` for every cell of the grid in params.yaml
(``study.seg`` x ``study.mat`` plus the 0 budgets, without (0, 0)) and every study seed,
and writes ``reports/`` whole, built in a temporary sibling and renamed into place (a crash
leaves the previous report intact). Tables, heatmaps and plots show the seed means; the
findings are decided from 95 % bootstrap intervals over images and seeds
(:mod:`matting_core.findings`)::

    reports/index.html                         everything on one page; opens offline
    reports/findings.json, findings.md         F1-F3: held / not held / inconclusive / not testable,
                                               delta, ci95, comparisons (with steps); the regime block
    reports/summary.json                       flat {"<set>/<region>/<metric>/<cell>": raw value}
    reports/tables/<set>-<region>-<metric>.csv/.md   the grid (rows seg, columns mat)
    reports/heatmaps/<set>-<region>-<metric>.png     Figure-9-style heatmaps (mse, sad)
    reports/plots/<set>-<region>-mse.csv       long format seg,mat,cell,mse_x1e3 (dvc plots)
    reports/plots/<set>-<region>-mse/seg<S>.csv      one line per seg budget (dvc plots)
    reports/methods.md, methods.csv            the method comparison (when methods were evaluated)

Each cell shows its primary model (seg-only: pre-trained, mat-only: teacher, both: MLB
student). MSE is printed x1e3 in tables and figures (raw in summary.json); SAD, Grad, Conn
are /1000. A cell whose metrics file is missing is shown as "missing" and warned about.

Method comparison: ``metrics/seed<k>/methods/<name>.json`` (the ``evaluate_method@<name>`` stage)
for every method in ``methods.compare`` at the comparison cell ``methods.cell``, side by
side with that cell's primary model (the MLB student): whole / boundary MSE and SAD on the
natural set, FPS, the input and the evaluation guidance. A compared method whose file is
missing is a row saying so (and a warning) once any compared method has a file (without
any, the section is left out); files of other methods or cells are ignored with a warning.

    python -m stages.report --params params.yaml [--metrics-dir metrics] [--out reports]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import html
import json
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from matting_core import report as core
from matting_core.findings import NOT_TESTABLE, check_findings, finding_headline, mean_record, regime
from matting_pipeline import atomic
from matting_pipeline.config import ConfigError, Params, load_params
from matting_pipeline.layout import Layout

DESCRIPTION = __doc__

HEATMAP_METRICS: tuple[str, ...] = ("mse", "sad")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (study.seg / study.mat give the grid)")
    parser.add_argument("--metrics-dir", default="metrics", help="folder of <cell>.json from the evaluate stage")
    parser.add_argument("--out", default="reports", help="report folder; replaced whole")
    parser.add_argument(
        "--natural-set", default="natural", help="validation set that findings F1-F3 are checked on (default: natural)"
    )
    parser.add_argument(
        "--heatmap-metrics",
        nargs="+",
        default=list(HEATMAP_METRICS),
        choices=list(core.METRICS),
        help="metrics drawn as heatmaps (tables are written for every metric)",
    )


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedCells:
    cells: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)  # seed means
    records: dict[tuple[int, int], list[dict[str, Any]]] = field(default_factory=dict)  # per seed
    paths: dict[tuple[int, int], list[Path]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # cell names with no usable file
    warnings: list[str] = field(default_factory=list)


def _read_cell(path: Path, s: int, m: int) -> dict[str, Any]:
    record = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(record, dict) or not isinstance(record.get("models"), dict):
        raise ValueError("no 'models' mapping")
    if (int(record.get("seg_count", s)), int(record.get("mat_count", m))) != (s, m):
        raise ValueError(f"it says seg_count={record.get('seg_count')}, mat_count={record.get('mat_count')}")
    return record


def load_cells(metrics_dir: Path, grid: Sequence[tuple[int, int]], seeds: Sequence[int] = (0,)) -> LoadedCells:
    """Read ``<metrics_dir>/seed<k>/<cell>.json`` for each grid cell and seed; the cell's
    table values are the seed means; absent or bad files become warnings."""
    out = LoadedCells()
    root = Layout(metrics=metrics_dir)
    for s, m in grid:
        name = core.cell_name(s, m)
        for seed in seeds:
            path = root.for_seed(seed).cell_metrics(s, m)
            if not path.is_file():
                out.warnings.append(f"missing cell {name} seed {seed}: {path} not found")
                continue
            try:
                record = _read_cell(path, s, m)
            except (OSError, ValueError, TypeError) as err:
                out.warnings.append(f"unreadable cell {name} seed {seed}: {path}: {err}")
                continue
            record.setdefault("seed", seed)
            out.records.setdefault((s, m), []).append(record)
            out.paths.setdefault((s, m), []).append(path)
        if (s, m) in out.records:
            out.cells[(s, m)] = mean_record(out.records[(s, m)])
        else:
            out.missing.append(name)
    expected = {f"{core.cell_name(s, m)}.json" for s, m in grid}
    folders = [root.for_seed(seed).metrics_dir for seed in seeds]
    out.warnings += _ignored_files(folders, "seg*-mat*.json", expected, "metrics files outside this grid")
    return out


def _ignored_files(folders: Sequence[Path], pattern: str, expected: set[str], what: str) -> list[str]:
    """One warning per folder holding ``pattern`` files not in ``expected``."""
    warnings = []
    for folder in folders:
        extra = sorted(p.name for p in folder.glob(pattern) if p.name not in expected) if folder.is_dir() else []
        if extra:
            warnings.append(f"ignored {what} in {folder}: " + ", ".join(extra))
    return warnings


@dataclass
class LoadedMethods:
    entries: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)  # cell -> name -> entry | None
    warnings: list[str] = field(default_factory=list)


def _read_method(path: Path, name: str, cell: tuple[int, int]) -> dict[str, Any]:
    record = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(record, dict) or not isinstance(record.get("sets"), dict):
        raise ValueError("no 'sets' mapping")
    if record.get("method") != name:
        raise ValueError(f"it is for method {record.get('method')!r}")
    at = (int(record.get("seg_count", -1)), int(record.get("mat_count", -1)))
    if at != tuple(cell):
        raise ValueError(f"it is for cell {core.cell_name(*at)}, methods.cell is {core.cell_name(*cell)}")
    return record


def load_methods(
    metrics_dir: Path, compare: Sequence[str], cell: tuple[int, int], seeds: Sequence[int] = (0,)
) -> LoadedMethods:
    """Read ``<metrics_dir>/seed<k>/methods/<name>.json`` of each compared method at ``cell``
    for every seed; a method's entry is its seed mean (see module doc)."""
    out = LoadedMethods()
    if not compare:
        return out
    found: dict[str, Any] = {}
    root = Layout(metrics=metrics_dir)
    for name in compare:
        records = []
        for seed in seeds:
            path = root.for_seed(seed).method_metrics(name)
            if not path.is_file():
                out.warnings.append(f"missing method {name} seed {seed}: {path} not found")
                continue
            try:
                records.append(_read_method(path, name, cell))
            except (OSError, ValueError, TypeError) as err:
                out.warnings.append(f"unreadable method {name} seed {seed}: {path}: {err}")
        found[name] = mean_record(records) if records else None
    if all(v is None for v in found.values()) and not any(w.startswith("unreadable") for w in out.warnings):
        return LoadedMethods()  # the comparison has not been run: no section, no warnings
    out.entries[tuple(cell)] = found
    folders = [root.for_seed(seed).method_metrics_dir for seed in seeds]
    out.warnings += _ignored_files(folders, "*.json", {f"{n}.json" for n in compare},
                                   "method metrics not in methods.compare")
    return out


def _safe(name: str) -> str:
    """A validation-set name as a file-name / HTML-id part."""
    return core.safe_name(name)


# --------------------------------------------------------------------------- heatmaps


def render_heatmap(grid: core.Grid, path: Path) -> None:
    """Figure-9-style heatmap: seg budget (rows) x mat budget (columns), annotated values."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows, cols = grid.seg, grid.mat
    data = np.full((len(rows), len(cols)), np.nan)
    for i, s in enumerate(rows):
        for j, m in enumerate(cols):
            v = grid.shown(s, m)
            if v is not None:
                data[i, j] = v
    present = data[np.isfinite(data)]
    log = bool(present.size >= 2 and present.min() > 0 and present.max() / present.min() > 20)
    if present.size == 0:
        norm = Normalize(0, 1)
    elif log:
        norm = LogNorm(present.min(), present.max())
    else:
        lo, hi = float(present.min()), float(present.max())
        norm = Normalize(lo, hi if hi > lo else lo + 1e-12)
    cmap = colormaps["YlOrRd"].with_extremes(bad="#eeeeee")

    width = 2.6 + 1.05 * len(cols)
    height = 1.9 + 0.62 * len(rows)
    fig = Figure(figsize=(max(width, 5.2), max(height, 3.6)), dpi=130, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, norm=norm, aspect="auto")
    ax.set_xticks(range(len(cols)), [core.format_budget(m) for m in cols])
    ax.set_yticks(range(len(rows)), [core.format_budget(s) for s in rows])
    ax.set_xlabel("matte labels (mat budget)")
    ax.set_ylabel("segmentation labels (seg budget)")
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_xticks(np.arange(-0.5, len(cols)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(rows)), minor=True)
    ax.grid(which="minor", color="white", linewidth=2)
    ax.tick_params(which="minor", length=0)
    best = grid.best()
    for i, s in enumerate(rows):
        for j, m in enumerate(cols):
            v = data[i, j]
            if np.isfinite(v):
                r, g, b, _ = cmap(norm(v))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                weight = "bold" if (s, m) == best else "normal"
                ax.text(j, i, core.format_value(v), ha="center", va="center", fontsize=9.5,
                        color="white" if dark else "#1a1a1a", fontweight=weight)
            else:
                ax.text(j, i, grid.text(s, m), ha="center", va="center", fontsize=9, color="#777777")
    if best is not None:
        i, j = rows.index(best[0]), cols.index(best[1])
        ax.add_patch(Rectangle((j - 0.47, i - 0.47), 0.94, 0.94, fill=False, edgecolor="#1f4e9c", linewidth=2))
    label = core.metric_label(grid.metric) + (" (log colour scale)" if log else "")
    cbar = fig.colorbar(im, ax=ax, shrink=0.9, pad=0.02)
    if log:
        cbar.ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        cbar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        cbar.ax.yaxis.set_minor_formatter(NullFormatter())
    cbar.set_label(label)
    cbar.outline.set_visible(False)
    ax.set_title(f"{grid.valset} · {grid.region} region · {core.metric_label(grid.metric)}\n"
                 "lower is better; best cell outlined", fontsize=10.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Software": None})


# --------------------------------------------------------------------------- markdown


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:+.0%}"


def _ci(c: Mapping[str, Any]) -> str:
    ci = c.get("ci95")
    return "" if not ci else f"[{ci[0]:+.0%}, {ci[1]:+.0%}]"


def _who(ref: Mapping[str, Any]) -> str:
    steps = ref.get("steps")
    return f"{ref['cell']} {ref.get('model') or ''}" + (f" ({steps} steps)" if steps is not None else "")


def _comparison_rows(f: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """(label, candidate, MSE, baseline, MSE, change, 95 % CI, verdict) per comparison."""
    rows = []
    for c in f["comparisons"]:
        a, b = c["candidate"], c["baseline"]
        label = f"{c['label']}, {c['region']}" if f["id"] == "F3" else c["label"]
        rows.append((label, _who(a), _fmt_ref(a), _who(b), _fmt_ref(b), _pct(c.get("delta")), _ci(c),
                     c["verdict"] if c["verdict"] != NOT_TESTABLE else f"not testable: {c.get('problem', '')}"))
    return rows


COMPARISON_HEAD = ("comparison", "candidate (steps)", "MSE x1e3", "baseline (steps)", "MSE x1e3",
                   "change", "95 % CI", "verdict")


def findings_markdown(findings: Sequence[Mapping[str, Any]]) -> str:
    lines = ["# Findings F1-F3 on this run", "",
             "Checked on this run's numbers (METHOD.md §1). MSE is shown x1e3 (seed means); lower is better. "
             "change = mean(candidate)/mean(baseline) - 1 with a 95 % paired bootstrap interval over images "
             "and seeds; held / not held when the interval lies below / above 0, else inconclusive.", ""]
    for f in findings:
        lines += [f"## {f['id']}: **{f['verdict']}**", "", f"_{f['claim']}_", "", f"Rule: {f['rule']}.", ""]
        if f.get("delta") is not None:
            lines += [f"Least favourable comparison ({f['decided_by']}): change {_pct(f['delta'])}, "
                      f"95 % CI {_ci(f)}.", ""]
        if f.get("reason"):
            lines += [f"Not testable: {f['reason']}.", ""]
        if f.get("note"):
            lines += [f"Note: {f['note']}.", ""]
        lines += ["| " + " | ".join(COMPARISON_HEAD) + " |", "|---|---|---:|---|---:|---:|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in _comparison_rows(f)]
        lines.append("")
    return "\n".join(lines)


def _fmt_ref(ref: Mapping[str, Any]) -> str:
    v = ref.get("mse_x1e3")
    return core.MISSING if v is None else core.format_value(v)


# --------------------------------------------------------------------------- HTML

_CSS = """
:root{--ink:#1d2433;--muted:#5b6475;--line:#e3e6ec;--bg:#f6f7f9;--card:#fff;--accent:#1f4e9c;
--ok:#17803d;--okbg:#e6f4ea;--bad:#b42318;--badbg:#fdecea;--na:#6b7280;--nabg:#eef0f3}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
color:var(--ink);background:var(--bg)}
header{background:#15213a;color:#fff;padding:28px 40px 22px}
header h1{margin:0 0 4px;font-size:26px;font-weight:650;letter-spacing:-.01em}
header p{margin:0;color:#c6cfdf}
nav{position:sticky;top:0;z-index:2;background:#fff;border-bottom:1px solid var(--line);padding:10px 40px;
display:flex;flex-wrap:wrap;gap:6px 18px;font-size:14px}
nav a{color:var(--accent);text-decoration:none}nav a:hover{text-decoration:underline}
main{max-width:1240px;margin:0 auto;padding:24px 40px 60px}
section{margin:0 0 34px}
h2{font-size:21px;margin:0 0 12px;padding-bottom:6px;border-bottom:2px solid var(--line)}
h3{font-size:16px;margin:20px 0 10px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:16px 20px;margin:0 0 14px}
.finding h3{margin:0 0 6px;display:flex;align-items:center;gap:10px;flex-wrap:wrap}
.finding h3 .sum{font-weight:500;font-size:14px;color:var(--muted)}
.finding .cols{display:grid;grid-template-columns:minmax(240px,1fr) minmax(0,2.3fr);gap:8px 28px;align-items:start}
@media (max-width:900px){.finding .cols{grid-template-columns:1fr}}
.pill{display:inline-block;font-size:12px;font-weight:700;text-transform:uppercase;letter-spacing:.04em;
border-radius:999px;padding:2px 10px}
.pill.held{color:var(--ok);background:var(--okbg)}.pill.not-held{color:var(--bad);background:var(--badbg)}
.pill.not-testable{color:var(--na);background:var(--nabg)}
.claim{font-style:italic;margin:0 0 6px}.rule{color:var(--muted);font-size:13px;margin:0 0 10px}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;font-size:13.5px}
th,td{padding:4px 8px;border-bottom:1px solid var(--line);text-align:right;white-space:nowrap}
th{font-weight:600;color:var(--muted);background:#fafbfc}
td.l,th.l{text-align:left}
td.rowh{font-weight:600;color:var(--muted);background:#fafbfc}
td.best{font-weight:700;color:var(--accent)}
td.empty{color:#9aa1ad}
td.yes{color:var(--ok);font-weight:700}td.no{color:var(--bad);font-weight:700}
.scroll{overflow-x:auto}
.figs{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:14px;margin-bottom:12px}
.figs img{width:100%;height:auto;border:1px solid var(--line);border-radius:8px;background:#fff}
.tables{display:grid;gap:12px}
@media (max-width:800px){.tables{grid-template-columns:1fr!important}}
.tables .card{padding:10px 12px;margin:0}.tables table{width:100%}
.tables h4{margin:0 0 6px;font-size:13.5px}
.dl{font-size:12px;color:var(--muted);margin-top:6px}.dl a{color:var(--accent)}
.warn{background:#fff8e6;border:1px solid #f2d48a;border-radius:10px;padding:12px 18px;margin:0 0 20px}
.warn h2{border:0;margin:0 0 6px;font-size:16px;padding:0}.warn ul{margin:0;padding-left:20px}
.note{color:var(--muted);font-size:13px}
pre{background:#0f172a;color:#e2e8f0;padding:14px 16px;border-radius:8px;overflow-x:auto;font-size:12.5px;line-height:1.45}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.92em}
dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:4px 18px;margin:0}
dl.kv dt{color:var(--muted)}dl.kv dd{margin:0}
details summary{cursor:pointer;color:var(--accent);margin:8px 0}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _href(path: str) -> str:
    return quote(path, safe="/.-_")


def _grid_table(grid: core.Grid) -> str:
    best = grid.best()
    head = '<tr><th class="l">seg \\ mat</th>' + "".join(f"<th>{m}</th>" for m in grid.mat) + "</tr>"
    body = []
    for s in grid.seg:
        tds = []
        for m in grid.mat:
            cls = "best" if (s, m) == best else ("empty" if grid.value(s, m) is None else "")
            tds.append(f'<td class="{cls}">{_e(grid.text(s, m))}</td>')
        body.append(f'<tr><td class="rowh">{s}</td>{"".join(tds)}</tr>')
    return f'<div class="scroll"><table>{head}{"".join(body)}</table></div>'


def _finding_html(f: Mapping[str, Any]) -> str:
    status = f["verdict"]
    summary = "" if f.get("delta") is None else f"least favourable: {_pct(f['delta'])} {_ci(f)}"
    parts = [f'<div class="card finding" id="{_e(f["id"])}">',
             f'<h3>{_e(f["id"])} <span class="pill {status.replace(" ", "-")}">{_e(status)}</span>'
             f'<span class="sum">{_e(summary)}</span></h3>',
             '<div class="cols"><div>',
             f'<p class="claim">{_e(f["claim"])}</p>',
             f'<p class="rule">Rule: {_md_code(f["rule"])}.</p>']
    if f.get("decided_by"):
        parts.append(f'<p class="note">Decided by {_e(f["decided_by"])}.</p>')
    if f.get("reason"):
        parts.append(f'<p class="note">Not testable: {_md_code(f["reason"])}.</p>')
    if f.get("note"):
        parts.append(f'<p class="note">{_e(f["note"])}.</p>')
    parts.append("</div><div>")
    head = "<tr>" + "".join(f'<th class="{"l" if i in (0, 1, 3, 7) else ""}">{_e(h)}</th>'
                            for i, h in enumerate(COMPARISON_HEAD)) + "</tr>"
    rows = []
    for row in _comparison_rows(f):
        verdict = row[-1]
        cls = {"held": "yes", "not held": "no"}.get(verdict, "empty")
        tds = "".join(f'<td class="{"l" if i in (0, 1, 3) else ""}">{_e(v)}</td>' for i, v in enumerate(row[:-1]))
        rows.append(f'<tr>{tds}<td class="l {cls}">{_e(verdict)}</td></tr>')
    parts.append(f'<div class="scroll"><table>{head}{"".join(rows)}</table></div>')
    parts.append("</div></div></div>")
    return "".join(parts)


def regime_rows(regime_block: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """(cell, model vs its label whole/boundary, blended label vs S, teacher beta band/outside
    composited, natural) per cell; numbers as text."""
    def ratio(entry: Mapping[str, Any] | None, model_key: str, label_key: str) -> str:
        if not entry:
            return "n/a"
        parts = []
        for region in ("whole", "boundary"):
            r = entry[region]
            parts.append(f"{r[model_key]:.1f} / {r[label_key]:.1f} = {r['ratio']:.2f}" if r["ratio"] is not None
                         else "n/a")
        return "; ".join(parts)

    def beta(b: Mapping[str, Any] | None) -> str:
        if not b or b.get("band") is None:
            return "n/a"
        return f"{b['band']:.2f} / {b.get('outside', float('nan')):.2f}"

    rows = []
    for kind in ("seg_only", "mat_only", "both"):
        for cell, entry in (regime_block.get(kind) or {}).get("cells", {}).items():
            betas = entry.get("beta") or {}
            rows.append((
                cell, kind.replace("_", "-"),
                ratio(entry.get("model_vs_label"), "model_mse_x1e3", "label_mse_x1e3"),
                ratio(entry.get("blended_vs_mask"), "blended_mse_x1e3", "mask_mse_x1e3") if kind == "both" else "",
                beta(betas.get("composited")) if kind != "seg_only" else "",
                beta(betas.get("natural")) if kind != "seg_only" else "",
            ))
    return rows


REGIME_HEAD = ("cell", "kind", "model vs its label, MSE x1e3 whole; boundary (ratio)",
               "blended label M̃ vs S (what the teacher adds)", "teacher β band / outside, composited",
               "β band / outside, natural")


def _regime_html(regime_block: Mapping[str, Any], params: Params, natural: str) -> str:
    train = params.train
    steps = (f"pre-train {train.pretrain.iters}, teacher {train.teacher.iters}, student and S-only control "
             f"{train.student.iters} steps (batch {train.student.batch_size}, {train.student.crop} px crops)")
    rows = regime_rows(regime_block)
    out = ['<section id="regime"><h2>Training regime</h2>',
           f'<p class="note">Is this run in a regime where the study can answer its question? {_e(steps)}. '
           f"A model's error on <code>{_e(natural)}</code> next to the error of the label it was trained on "
           "(a seg-only model learns S; an MLB student learns the blended M̃): a ratio well above 1 means the model "
           "has not yet learnt what its labels hold (under-training). The teacher's β = sigmoid(b′) should be high "
           "in the GT boundary band and low outside it, else M̃ mixes the teacher in everywhere. Labels are scored "
           "only on sets that ship coarse masks.</p>"]
    if not rows:
        out.append('<p class="note">No regime figures (no cell files).</p></section>')
        return "".join(out)
    head = "<tr>" + "".join(f'<th class="l">{_e(h)}</th>' for h in REGIME_HEAD) + "</tr>"
    body = "".join("<tr>" + "".join(f'<td class="l">{_e(v)}</td>' for v in row) + "</tr>" for row in rows)
    out.append(f'<div class="scroll"><table>{head}{body}</table></div></section>')
    return "".join(out)


def regime_markdown(regime_block: Mapping[str, Any]) -> str:
    lines = ["# Training regime", "", "| " + " | ".join(REGIME_HEAD) + " |", "|" + "---|" * len(REGIME_HEAD)]
    lines += ["| " + " | ".join(row) + " |" for row in regime_rows(regime_block)]
    return "\n".join(lines) + "\n"


def _md_code(text: str) -> str:
    """Escape ``text`` and render its `backtick` spans as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", _e(text))


def _methods_html(rows: Sequence[Mapping[str, Any]], natural: str) -> str:
    head = ('<tr><th class="l">cell</th><th class="l">method</th><th class="l">input</th><th>whole MSE ×1e3</th>'
            "<th>boundary MSE ×1e3</th><th>whole SAD /1e3</th><th>boundary SAD /1e3</th><th>FPS</th>"
            '<th class="l">evaluation guidance</th></tr>')

    def num(v: float | None, scale: float = 1.0, digits: int | None = None) -> str:
        if v is None:
            return '<td class="empty">n/a</td>'
        return f"<td>{_e(f'{v * scale:.{digits}f}' if digits is not None else core.format_value(v * scale))}</td>"

    body = "".join(
        f'<tr><td class="l">{_e(r["cell"])}</td><td class="l">{_e(r["method"])}</td>'
        f'<td class="l">{_e(r.get("input") or "")}</td>'
        + num(r["whole_mse"], 1e3) + num(r["boundary_mse"], 1e3) + num(r["whole_sad"]) + num(r["boundary_sad"])
        + num(r["fps"], digits=1) + f'<td class="l">{_e(r.get("guidance") or "")}</td></tr>'
        for r in rows
    )
    return (f'<section id="methods"><h2>Method comparison</h2><p class="note">On the <code>{_e(natural)}</code> set; '
            "lower is better except FPS. Each related method is trained at the cell shown on the same matte "
            "subset (from the same seg-pretrained network) and gets the guidance listed, made from the "
            "validation ground truth; the MLB row is the cell's primary model. "
            '<a href="methods.md">Markdown</a> · <a href="methods.csv">CSV</a></p>'
            f'<div class="card scroll"><table>{head}{body}</table></div></section>')


def _cells_html(loaded: LoadedCells, grid_cells: Sequence[tuple[int, int]]) -> str:
    head = ('<tr><th class="l">cell</th><th class="l">kind</th><th class="l">primary</th><th class="l">network</th>'
            '<th>params</th><th>FPS</th><th class="l">sets (n)</th><th class="l">checkpoint</th></tr>')
    rows = []
    for s, m in grid_cells:
        name = core.cell_name(s, m)
        cell = loaded.cells.get((s, m))
        if cell is None:
            rows.append(f'<tr><td class="l">{name}</td><td class="l">{core.cell_kind(s, m)}</td>'
                        f'<td class="l empty" colspan="6">missing</td></tr>')
            continue
        role = core.primary_role(cell)
        model = cell["models"].get(role) or {}
        sets = model.get("sets") or {}
        set_txt = ", ".join(f"{k} ({v.get('n', '?')})" for k, v in sets.items() if isinstance(v, Mapping))
        params = model.get("params")
        fps = model.get("fps")
        rows.append(
            f'<tr><td class="l">{name}</td><td class="l">{_e(cell.get("kind") or core.cell_kind(s, m))}</td>'
            f'<td class="l">{_e(role)}</td><td class="l">{_e(model.get("network", ""))}</td>'
            f'<td>{_e(f"{params:,}" if isinstance(params, int) else "")}</td>'
            f'<td>{_e(f"{fps:.1f}" if isinstance(fps, (int, float)) else "")}</td>'
            f'<td class="l">{_e(set_txt)}</td><td class="l"><code>{_e(model.get("checkpoint", ""))}</code></td></tr>'
        )
    return f'<div class="card scroll"><table>{head}{"".join(rows)}</table></div>'


def _table_columns(n_tables: int, n_mat: int, content_px: int = 1160) -> int:
    """Tables per row: all in one row when they fit, else two, else one (no ragged last row)."""
    need = 96 + 60 * (n_mat + 1)
    for k in (n_tables, 2, 1):
        if k * need + (k - 1) * 12 <= content_px:
            return k
    return 1


@dataclass
class SetSection:
    valset: str
    regions: list[str]
    grids: dict[tuple[str, str], core.Grid]  # (region, metric) -> grid
    heatmaps: dict[tuple[str, str], str]  # (region, metric) -> relative png path


def render_html(
    *,
    sections: Sequence[SetSection],
    findings: Sequence[Mapping[str, Any]],
    loaded: LoadedCells,
    grid_cells: Sequence[tuple[int, int]],
    params: Params,
    command: str,
    metrics_dir: str,
    natural: str,
    methods: Sequence[Mapping[str, Any]],
    generated: str,
    regime_block: Mapping[str, Any] | None = None,
) -> str:
    study = params.study
    n_cells = len(grid_cells)
    nav = ['<a href="#findings">Findings</a>', '<a href="#regime">Training regime</a>'] + [
        f'<a href="#set-{_e(_safe(sec.valset))}">{_e(sec.valset)}</a>' for sec in sections
    ]
    if methods:
        nav.append('<a href="#methods">Methods</a>')
    nav += ['<a href="#cells">Cells</a>', '<a href="#provenance">How this was produced</a>']

    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Label-efficiency study · {_e(study.experiment)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<header><h1>Label-efficiency study</h1>",
        f"<p>{_e(study.experiment)} · {len(loaded.cells)} of {n_cells} cells · "
        f"seg {{0, {_e(', '.join(map(str, study.seg)))}}} × mat {{0, {_e(', '.join(map(str, study.mat)))}}} · "
        f"network {_e(params.model.network)} · generated {_e(generated)}</p></header>",
        f'<nav>{"".join(nav)}</nav><main>',
    ]
    if loaded.warnings:
        items = "".join(f"<li>{_e(w)}</li>" for w in loaded.warnings)
        out.append(f'<div class="warn" id="warnings"><h2>Warnings</h2><ul>{items}</ul></div>')

    out.append('<section id="findings"><h2>Findings F1–F3 on this run</h2>')
    out.append(f'<p class="note">The paper\'s findings (METHOD.md §1), checked on the <code>{_e(natural)}</code> set. '
               "MSE ×1e3, lower is better.</p>")
    out.append("".join(_finding_html(f) for f in findings) + "</section>")
    out.append(_regime_html(regime_block or {}, params, natural))

    for sec in sections:
        sid = _safe(sec.valset)
        out.append(f'<section id="set-{_e(sid)}"><h2>Validation set <code>{_e(sec.valset)}</code></h2>')
        out.append('<p class="note">Rows: segmentation labels; columns: matte labels. Each cell is its primary '
                   "model (seg-only: pre-trained, mat-only: teacher from scratch, both: MLB student). "
                   "MSE ×1e3; SAD, Grad, Conn /1e3; lower is better, best in blue; — = (0, 0), not in the study.</p>")
        for region in sec.regions:
            out.append(f'<h3 id="{_e(sid)}-{_e(region)}">{_e(region)} region</h3>')
            imgs = [
                f'<img src="{_href(sec.heatmaps[(region, metric)])}" alt="{_e(sec.valset)} {_e(region)} '
                f'{_e(core.metric_label(metric))} heatmap" loading="lazy">'
                for metric in core.METRICS
                if (region, metric) in sec.heatmaps
            ]
            if imgs:
                wide = len(sec.grids[(region, "mse")].mat) > 4  # big grids: one heatmap per row
                style = ' style="grid-template-columns:minmax(0,960px)"' if wide else ""
                out.append(f'<div class="figs"{style}>' + "".join(imgs) + "</div>")
            cards = []
            for metric in core.METRICS:
                grid = sec.grids[(region, metric)]
                dl = (f'<div class="dl"><a href="{_href("tables/" + grid.stem + ".csv")}">CSV</a> · '
                      f'<a href="{_href("tables/" + grid.stem + ".md")}">Markdown</a></div>')
                cards.append(f'<div class="card"><h4>{_e(core.metric_label(metric))}</h4>{_grid_table(grid)}{dl}</div>')
            k = _table_columns(len(cards), len(sec.grids[(region, "mse")].mat))
            out.append(f'<div class="tables" style="grid-template-columns:repeat({k},minmax(0,1fr))">'
                       + "".join(cards) + "</div>")
        out.append("</section>")

    if methods:
        out.append(_methods_html(methods, natural))

    out.append('<section id="cells"><h2>Cells</h2>')
    out.append(_cells_html(loaded, grid_cells))
    out.append("</section>")

    params_yaml = yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    files = [("findings.json", "findings"), ("findings.md", "findings (Markdown)"), ("summary.json", "flat metrics")]
    file_links = " · ".join(f'<a href="{_href(p)}">{_e(label)}</a>' for p, label in files)
    out.append('<section id="provenance"><h2>How this was produced</h2><div class="card"><dl class="kv">')
    out.append(f"<dt>command</dt><dd><code>{_e(command)}</code></dd>")
    out.append(f"<dt>grid</dt><dd>seg {{0, {_e(', '.join(map(str, study.seg)))}}} × "
               f"mat {{0, {_e(', '.join(map(str, study.mat)))}}} without (0, 0): {n_cells} cells "
               f"({len(loaded.cells)} found)</dd>")
    out.append(f"<dt>inputs</dt><dd><code>{_e(metrics_dir)}/&lt;cell&gt;.json</code> from the evaluate stage</dd>")
    out.append(f"<dt>training</dt><dd>pretrain {params.train.pretrain.iters} iters @ lr {params.train.pretrain.lr:g}, "
               f"teacher {params.train.teacher.iters} @ {params.train.teacher.lr:g}, "
               f"student {params.train.student.iters} @ {params.train.student.lr:g} "
               f"({_e(params.train.student.label_mode)} labels, {_e(params.train.student.blend.mode)} β)</dd>")
    out.append(f"<dt>data</dt><dd>{_e(params.data.source)}; evaluation at shorter side {params.evaluate.short_side}</dd>")
    out.append(f"<dt>files</dt><dd>{file_links}</dd>")
    out.append(f"<dt>generated</dt><dd>{_e(generated)}</dd></dl>")
    out.append(f"<details><summary>all parameters (params.yaml, validated)</summary><pre>{_e(params_yaml)}</pre></details>")
    out.append("</div></section></main></body></html>")
    return "\n".join(out)


# --------------------------------------------------------------------------- the stage


@dataclass
class ReportResult:
    findings: list[dict[str, Any]]
    warnings: list[str]
    cells_found: int
    cells_expected: int
    out: Path


def build_report(
    params: Params,
    metrics_dir: str | Path,
    out: str | Path,
    *,
    natural: str = "natural",
    heatmap_metrics: Sequence[str] = HEATMAP_METRICS,
    command: str = "python -m stages.report",
) -> ReportResult:
    """Write the whole report folder atomically; returns the findings and warnings."""
    metrics_dir, out = Path(metrics_dir), Path(out)
    study = params.study
    grid_cells = study.cells()
    loaded = load_cells(metrics_dir, grid_cells, study.seeds)
    if not loaded.cells:
        example = Layout(metrics=metrics_dir).for_seed(study.seeds[0]).cell_metrics(*grid_cells[0])
        raise FileNotFoundError(
            f"no metrics file for any of the {len(grid_cells)} cells in {metrics_dir}/ "
            f"(expected e.g. {example}); run the evaluate stage first"
        )
    sets = core.discover_sets(loaded.cells, preferred=(natural, "composited"))
    for (s, m), cell in sorted(loaded.cells.items()):
        model = cell["models"].get(core.primary_role(cell)) or {}
        lacking = [v for v in sets if v not in (model.get("sets") or {})]
        if lacking:
            loaded.warnings.append(f"cell {core.cell_name(s, m)} has no {', '.join(lacking)} results (shown as n/a)")
    findings = check_findings(loaded.records, study.seg, study.mat, natural, params, study.bootstrap)
    regime_block = regime(loaded.records, natural)
    compared = load_methods(metrics_dir, params.methods.compare, params.comparison_cell(), study.seeds)
    loaded.warnings.extend(compared.warnings)
    methods = core.method_rows(loaded.cells, natural, compared.entries)
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    with atomic.atomic_dir(out) as tmp:
        sections: list[SetSection] = []
        for valset, regions in sets.items():
            sec = SetSection(valset, regions, {}, {})
            for region in regions:
                for metric in core.METRICS:
                    grid = core.build_grid(loaded.cells, study.seg, study.mat, valset, region, metric)
                    sec.grids[(region, metric)] = grid
                    (tmp / "tables").mkdir(exist_ok=True)
                    (tmp / "tables" / f"{grid.stem}.csv").write_text(grid.to_csv(), encoding="utf-8")
                    (tmp / "tables" / f"{grid.stem}.md").write_text(grid.to_markdown(), encoding="utf-8")
                    if metric in heatmap_metrics:
                        rel = f"heatmaps/{grid.stem}.png"
                        render_heatmap(grid, tmp / rel)
                        sec.heatmaps[(region, metric)] = rel
                _write_plots(tmp / "plots", sec.grids[(region, "mse")])
            sections.append(sec)

        (tmp / "summary.json").write_text(
            json.dumps(core.summary_metrics(loaded.cells, sets), indent=2) + "\n", encoding="utf-8"
        )
        findings_doc = {
            "set": natural,
            "grid": {"seg": [0, *study.seg], "mat": [0, *study.mat]},
            "seeds": list(study.seeds),
            "interval": f"95 % paired bootstrap over images and seeds, {study.bootstrap} replicates",
            "steps": {"pretrain": params.train.pretrain.iters, "teacher": params.train.teacher.iters,
                      "student": params.train.student.iters, "control": params.train.student.iters},
            "cells_found": len(loaded.cells),
            "cells_expected": len(grid_cells),
            "missing": loaded.missing,
            **{f["id"]: {k: f.get(k) for k in ("verdict", "delta", "ci95", "decided_by")} for f in findings},
            "findings": findings,
            "regime": regime_block,
        }
        (tmp / "findings.json").write_text(json.dumps(findings_doc, indent=2) + "\n", encoding="utf-8")
        (tmp / "findings.md").write_text(findings_markdown(findings) + "\n" + regime_markdown(regime_block),
                                         encoding="utf-8")
        if methods:
            _write_methods(tmp, methods, natural)
        page = render_html(
            sections=sections, findings=findings, loaded=loaded, grid_cells=grid_cells, params=params,
            command=command, metrics_dir=str(metrics_dir), natural=natural, methods=methods, generated=generated,
            regime_block=regime_block,
        )
        (tmp / "index.html").write_text(page, encoding="utf-8")
    return ReportResult(findings, loaded.warnings, len(loaded.cells), len(grid_cells), out)


def _write_methods(folder: Path, rows: Sequence[Mapping[str, Any]], natural: str) -> None:
    """``methods.md`` and ``methods.csv`` (raw values: MSE not scaled, SAD /1000)."""
    import csv

    (folder / "methods.md").write_text(core.methods_markdown(rows, natural), encoding="utf-8")
    with open(folder / "methods.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(core.METHOD_COLUMNS), lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _write_plots(folder: Path, grid: core.Grid) -> None:
    """Long ``<stem>.csv`` (seg,mat,cell,mse_x1e3) and one ``<stem>/seg<S>.csv`` per seg budget."""
    import csv

    folder.mkdir(parents=True, exist_ok=True)
    rows = grid.long_rows()
    with open(folder / f"{grid.stem}.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["seg", "mat", "cell", "mse_x1e3"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    per_seg = folder / grid.stem
    per_seg.mkdir(exist_ok=True)
    for s in grid.seg:
        line = [r for r in rows if r["seg"] == s]
        if not line:
            continue
        with open(per_seg / f"seg{s}.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["mat", "mse_x1e3"], lineterminator="\n", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(line)


def run(args: argparse.Namespace) -> int:
    try:
        params = load_params(args.params)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    command = "python -m stages.report " + " ".join(
        shlex.quote(a) for a in ("--params", args.params, "--metrics-dir", args.metrics_dir, "--out", args.out)
    )
    try:
        result = build_report(
            params, args.metrics_dir, args.out, natural=args.natural_set,
            heatmap_metrics=args.heatmap_metrics, command=command,
        )
    except FileNotFoundError as err:
        print(f"report: {err}", file=sys.stderr)
        return 1
    print(f"report: {result.cells_found}/{result.cells_expected} cells -> {result.out / 'index.html'}")
    for f in result.findings:
        print("  " + finding_headline(f))
    for w in result.warnings:
        print(f"  warning: {w}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from matting_pipeline.cli import run_module

    run_module("report")
