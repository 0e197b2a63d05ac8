"""The report stage: grid tables, heatmaps, findings F1-F3, summary, offline HTML, atomicity.

Metrics files are written in the evaluate stage's format for the 2 x 2 (non-zero) grid of
the default params (seg {0, 60, 240} x mat {0, 8, 32}: 8 cells) and two study seeds, with
per-image errors around numbers chosen so the findings hold, and variants where one does
not or where the intervals cannot tell.
"""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from matting_core import report as core
from stages import report as stage
from matting_pipeline.config import parse_params

REPO = Path(__file__).resolve().parents[2]
SEG, MAT = [60, 240], [8, 32]
CELLS = [(s, m) for s in (0, *SEG) for m in (0, *MAT) if (s, m) != (0, 0)]

# natural-set MSE (raw) per cell and model: whole, boundary. Chosen so that F1-F3 hold:
# mat-only collapses on natural photos, any matte budget helps the boundary, and the MLB
# student beats the seg-only teacher and the fine-tuned teacher.
HOLDING = {
    (60, 0): {"pretrain": (0.0140, 0.0620)},
    (240, 0): {"pretrain": (0.0120, 0.0580)},
    (0, 8): {"teacher": (0.0520, 0.0710)},
    (0, 32): {"teacher": (0.0450, 0.0650)},
    (60, 8): {"student": (0.0080, 0.0360), "teacher": (0.0095, 0.0400), "control": (0.0110, 0.0560)},
    (60, 32): {"student": (0.0070, 0.0330), "teacher": (0.0088, 0.0370), "control": (0.0110, 0.0560)},
    (240, 8): {"student": (0.0062, 0.0310), "teacher": (0.0079, 0.0350), "control": (0.0100, 0.0520)},
    (240, 32): {"student": (0.0050, 0.0290), "teacher": (0.0069, 0.0330), "control": (0.0100, 0.0520)},
}
SEEDS = [0, 1]
N_IMAGES = 16
PRIMARY = {"seg_only": "pretrain", "mat_only": "teacher", "both": "student"}


def _block(mse: float, pixels: float) -> dict:
    """Plausible SAD/Grad/Conn (/1000) for an MSE over ``pixels`` pixels."""
    return {"sad": round(mse ** 0.5 * pixels / 1000 * 0.6, 4), "mse": mse,
            "grad": round(mse * pixels / 1000 * 3.0, 4), "conn": round(mse ** 0.5 * pixels / 1000 * 0.55, 4)}


def _per_image(mse: float, seed: int, salt: str) -> list[float]:
    """16 per-image errors with mean exactly ``mse``: a spread shared by every model (image
    difficulty) times +-10 % noise of this model and seed."""
    import numpy as np

    shared = np.random.default_rng(7).uniform(0.5, 1.5, N_IMAGES)
    own = np.random.default_rng([seed, sum(map(ord, salt))]).uniform(0.9, 1.1, N_IMAGES)
    values = shared * own
    return [float(v) for v in values * mse / values.mean()]


def _sets(whole: float, boundary: float, seed: int = 0, salt: str = "") -> dict:
    px = 512 * 512
    return {
        "natural": {"n": N_IMAGES, "whole": _block(whole, px), "boundary": _block(boundary, px * 0.08),
                    "per_image": {"key": [f"val-{i:06d}" for i in range(N_IMAGES)],
                                  "whole_mse": _per_image(whole, seed, salt + "w"),
                                  "boundary_mse": _per_image(boundary, seed, salt + "b")}},
        "composited": {"n": 40, "whole": _block(whole * 0.6, px), "boundary": _block(boundary * 0.8, px * 0.08),
                       "unknown": _block(boundary * 0.9, px * 0.12)},
    }


def make_cell(s: int, m: int, models: dict[str, tuple[float, float]], methods: dict | None = None,
              seed: int = 0) -> dict:
    """One seed's record; its means are the given numbers x (1 + 0.02) for seed 0 and
    x (1 - 0.02) for seed 1, so the seed mean is exactly the given numbers."""
    kind = core.cell_kind(s, m)
    k = 1.0 + 0.02 * (1 if seed % 2 == 0 else -1)
    salt = core.cell_name(s, m)
    record = {
        "cell": core.cell_name(s, m), "seg_count": s, "mat_count": m, "kind": kind, "primary": PRIMARY[kind],
        "seed": seed,
        "models": {
            role: {"checkpoint": f"models/seed{seed}/{role}/{core.cell_name(s, m)}/model.pt", "network": "unet_r18x0.5",
                   "params": 3_321_554, "fps": 41.7, "fps_size": 512, "device": "cpu",
                   "sets": _sets(wb[0] * k, wb[1] * k, seed, salt + role)}
            for role, wb in models.items()
        },
    }
    if methods:
        record["methods"] = methods
    return record


def write_study(metrics_dir: Path, numbers: dict = HOLDING, skip: tuple = (), methods: bool = False,
                seeds: list[int] = SEEDS) -> Path:
    """Write metrics/seed<k>/<cell>.json for every cell of the 2 x 2 grid (except ``skip``) and seed."""
    for seed in seeds:
        folder = metrics_dir / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        for cell, models in numbers.items():
            if cell in skip:
                continue
            extra = None
            if methods and cell == (240, 32):
                extra = {"mgm": {"sets": _sets(0.0061, 0.0300), "fps": 12.5},
                         "modnet": {"sets": _sets(0.0090, 0.0420), "fps": 30.1}}
            (folder / f"{core.cell_name(*cell)}.json").write_text(json.dumps(make_cell(*cell, models, extra, seed)))
    return metrics_dir


def params(seeds=SEEDS):
    return parse_params({"study": {"seg": SEG, "mat": MAT, "seeds": seeds, "bootstrap": 500}})


def with_change(cell, role, whole=None, boundary=None):
    numbers = {k: dict(v) for k, v in HOLDING.items()}
    w, b = numbers[cell][role]
    numbers[cell][role] = (w if whole is None else whole, b if boundary is None else boundary)
    return numbers


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    write_study(root / "metrics", methods=True)
    result = stage.build_report(params(), root / "metrics", root / "reports")
    return root / "reports", result


def by_id(findings):
    return {f["id"]: f for f in findings}


# --------------------------------------------------------------------------- tables


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def test_tables_put_values_in_the_right_row_and_column(built):
    reports, _ = built
    rows = read_csv(reports / "tables" / "natural-boundary-mse.csv")
    assert rows[0] == ["seg \\ mat (MSE x1e3)", "0", "8", "32"]
    assert [r[0] for r in rows[1:]] == ["0", "60", "240"]
    grid = {(int(r[0]), int(c)): v for r in rows[1:] for c, v in zip(rows[0][1:], r[1:])}
    assert grid[(0, 0)] == "—"
    assert float(grid[(60, 0)]) == pytest.approx(62.0)  # pretrain boundary 0.0620 -> x1e3
    assert float(grid[(0, 32)]) == pytest.approx(65.0)  # mat-only teacher
    assert float(grid[(240, 8)]) == pytest.approx(31.0)  # the student, not the teacher (35.0)
    assert float(grid[(60, 32)]) == pytest.approx(33.0)
    sad = read_csv(reports / "tables" / "natural-whole-sad.csv")
    assert sad[0][0] == "seg \\ mat (SAD /1e3)"
    expected = _block(0.0050, 512 * 512)["sad"]  # SAD is already /1000: printed as is (seed mean)
    assert float(sad[3][3]) == pytest.approx(expected, rel=1e-3)


def test_markdown_table_is_labelled_and_marks_best(built):
    reports, _ = built
    md = (reports / "tables" / "natural-whole-mse.md").read_text()
    assert "MSE ×1e3" in md and "| seg \\ mat (MSE ×1e3) | 0 | 8 | 32 |" in md
    lines = [line for line in md.splitlines() if line.startswith("| 0 |") or line.startswith("| 240 |")]
    assert lines[0] == "| 0 | — | 52.000 | 45.000 |"
    assert lines[1] == "| 240 | 12.000 | 6.200 | **5.000** |"


def test_every_set_region_metric_has_a_table(built):
    reports, _ = built
    names = {p.name for p in (reports / "tables").iterdir()}
    for valset, regions in (("natural", ("whole", "boundary")), ("composited", ("whole", "boundary", "unknown"))):
        for region in regions:
            for metric in ("mse", "sad", "grad", "conn"):
                assert f"{valset}-{region}-{metric}.csv" in names and f"{valset}-{region}-{metric}.md" in names
    assert not any(n.startswith("natural-unknown") for n in names)  # natural has no trimaps


# --------------------------------------------------------------------------- heatmaps


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_heatmaps_are_valid_pngs_of_sensible_size(built):
    reports, _ = built
    pngs = sorted((reports / "heatmaps").glob("*.png"))
    assert {p.name for p in pngs} >= {"natural-whole-mse.png", "natural-boundary-sad.png", "composited-unknown-mse.png"}
    for p in pngs:
        w, h = png_size(p)
        assert 500 <= w <= 2500 and 350 <= h <= 2000, (p.name, w, h)
    from PIL import Image

    with Image.open(reports / "heatmaps" / "natural-whole-mse.png") as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # drawn, not blank


# --------------------------------------------------------------------------- findings


def test_findings_hold_on_the_holding_numbers(built):
    reports, result = built
    doc = json.loads((reports / "findings.json").read_text())
    found = by_id(doc["findings"])
    assert [found[k]["verdict"] for k in ("F1", "F2", "F3")] == ["held", "held", "held"]
    assert doc["seeds"] == SEEDS and {"F1", "F2", "F3", "regime"} <= set(doc)
    for fid in ("F1", "F2", "F3"):
        lo, hi = doc[fid]["ci95"]
        assert doc[fid]["verdict"] == "held" and lo <= doc[fid]["delta"] <= hi < 0
    f1 = found["F1"]["comparisons"]
    assert [(c["candidate"]["cell"], c["baseline"]["cell"]) for c in f1] == [
        ("seg240-mat8", "seg0-mat8"), ("seg240-mat32", "seg0-mat32")]
    assert f1[0]["candidate"]["mse_x1e3"] == pytest.approx(6.2) and f1[0]["baseline"]["mse_x1e3"] == pytest.approx(52.0)
    assert f1[0]["delta"] == pytest.approx(6.2 / 52.0 - 1) and f1[0]["n_seeds"] == [2, 2] and f1[0]["n_images"] == 16
    f2 = found["F2"]["comparisons"]
    # equal training steps: the student against the S-only control of its row
    assert [(c["candidate"]["cell"], c["baseline"]["model"]) for c in f2] == [
        ("seg60-mat8", "control"), ("seg240-mat8", "control")]
    assert f2[0]["candidate"]["steps"] == f2[0]["baseline"]["steps"] == 200 + 100
    assert found["F2"]["equal_steps"] is True
    assert f2[0]["delta"] == pytest.approx(0.036 / 0.056 - 1)
    f3 = found["F3"]
    assert f3["tested"] == 24 and f3["held_count"] == 24 and [c["verdict"] for c in f3["cells"]] == ["held"] * 4
    first = f3["cells"][0]["comparisons"]
    assert [(c["baseline"]["cell"], c["baseline"]["model"], c["region"]) for c in first] == [
        ("seg60-mat0", "pretrain", "whole"), ("seg60-mat8", "teacher", "whole"), ("seg60-mat8", "control", "whole"),
        ("seg60-mat0", "pretrain", "boundary"), ("seg60-mat8", "teacher", "boundary"),
        ("seg60-mat8", "control", "boundary")]
    md = (reports / "findings.md").read_text()
    assert "## F1: **held**" in md and "## F3: **held**" in md and "52.000" in md and "95 % CI" in md


@pytest.mark.parametrize(
    "numbers, failing",
    [
        # F1: with the most seg labels, (240, 32) is worse on natural whole MSE than mat-only (0, 32)
        (with_change((240, 32), "student", whole=0.0600), "F1"),
        # F2: 8 matte labels make the boundary worse than the control for seg 60
        (with_change((60, 8), "student", boundary=0.0750), "F2"),
    ],
)
def test_a_broken_finding_is_not_held(tmp_path, numbers, failing):
    write_study(tmp_path / "metrics", numbers)
    result = stage.build_report(params(), tmp_path / "metrics", tmp_path / "reports", heatmap_metrics=())
    verdicts = {f["id"]: f["verdict"] for f in result.findings}
    assert verdicts[failing] == "not held", verdicts
    finding = by_id(result.findings)[failing]
    failed = [c for c in finding["comparisons"] if c["verdict"] == "not held"]
    assert len(failed) == 1 and finding["ci95"][0] > 0 and finding["delta"] > 0


def test_a_tie_is_inconclusive_not_a_difference(tmp_path):
    # the (60, 8) student equals its control on the boundary: one small difference either
    # way must not decide F2; the interval contains 0
    write_study(tmp_path / "metrics", with_change((60, 8), "student", boundary=0.0560))
    f2 = by_id(stage.build_report(params(), tmp_path / "metrics", tmp_path / "reports", heatmap_metrics=()).findings)["F2"]
    assert f2["verdict"] == "inconclusive"
    lo, hi = f2["ci95"]
    assert lo < 0 < hi and "seg60-mat8" in f2["decided_by"]


def test_f3_not_held_when_a_teacher_beats_its_student(tmp_path):
    numbers = {k: dict(v) for k, v in HOLDING.items()}
    numbers[(240, 32)]["teacher"] = (0.0069, 0.0200)
    write_study(tmp_path / "metrics", numbers)
    f3 = by_id(stage.build_report(params(), tmp_path / "metrics", tmp_path / "reports", heatmap_metrics=()).findings)["F3"]
    assert f3["verdict"] == "not held"
    assert [c["verdict"] for c in f3["cells"]] == ["held", "held", "held", "not held"]
    assert f3["decided_by"] == "seg240-mat32 student vs seg240-mat32 teacher, boundary"


def test_one_seed_still_gives_intervals(tmp_path):
    write_study(tmp_path / "metrics", seeds=[0])
    found = by_id(stage.build_report(params([0]), tmp_path / "metrics", tmp_path / "reports",
                                     heatmap_metrics=()).findings)
    assert found["F1"]["verdict"] == "held" and found["F1"]["comparisons"][0]["n_seeds"] == [1, 1]


def test_a_missing_seed_is_warned_and_the_rest_used(tmp_path):
    write_study(tmp_path / "metrics")
    (tmp_path / "metrics" / "seed1" / "seg60-mat8.json").unlink()
    result = stage.build_report(params(), tmp_path / "metrics", tmp_path / "reports", heatmap_metrics=())
    assert any("seg60-mat8 seed 1" in w for w in result.warnings)
    f2 = by_id(result.findings)["F2"]["comparisons"][0]
    assert f2["n_seeds"] == [1, 1] and f2["verdict"] == "held"


def test_findings_not_testable_without_mat_only_cells(tmp_path):
    write_study(tmp_path / "metrics", skip=((0, 8), (0, 32)))
    found = by_id(stage.build_report(params(), tmp_path / "metrics", tmp_path / "reports", heatmap_metrics=()).findings)
    assert found["F1"]["verdict"] == "not testable" and "seg0-mat8" in found["F1"]["reason"]
    assert found["F2"]["verdict"] == "held" and found["F3"]["verdict"] == "held"


def test_f2_without_controls_falls_back_to_seg_only_and_says_steps_differ(tmp_path):
    numbers = {k: {r: v for r, v in roles.items() if r != "control"} for k, roles in HOLDING.items()}
    write_study(tmp_path / "metrics", numbers)
    found = by_id(stage.build_report(params(), tmp_path / "metrics", tmp_path / "reports", heatmap_metrics=()).findings)
    f2 = found["F2"]
    assert f2["equal_steps"] is False and "more training steps" in f2["rule"]
    assert [c["baseline"]["cell"] for c in f2["comparisons"]] == ["seg60-mat0", "seg240-mat0"]
    assert found["F3"]["note"].startswith("8 comparison(s) not testable")


# --------------------------------------------------------------------------- summary, plots


def test_summary_is_flat_and_raw(built):
    reports, _ = built
    summary = json.loads((reports / "summary.json").read_text())
    assert summary["natural/boundary/mse/seg60-mat8"] == pytest.approx(0.036)
    assert summary["natural/whole/mse/seg0-mat8"] == pytest.approx(0.052)
    assert "composited/unknown/sad/seg240-mat0" in summary
    assert not any("seg0-mat0" in k for k in summary)
    assert len([k for k in summary if k.startswith("natural/whole/mse/")]) == 8
    assert all(isinstance(v, float) for v in summary.values())


def test_plot_files_are_long_format(built):
    reports, _ = built
    rows = list(csv.DictReader(open(reports / "plots" / "natural-boundary-mse.csv")))
    assert list(rows[0]) == ["seg", "mat", "cell", "mse_x1e3"] and len(rows) == 8
    row = next(r for r in rows if r["cell"] == "seg240-mat32")
    assert (row["seg"], row["mat"], float(row["mse_x1e3"])) == ("240", "32", pytest.approx(29.0))
    lines = sorted(p.name for p in (reports / "plots" / "natural-boundary-mse").iterdir())
    assert lines == ["seg0.csv", "seg240.csv", "seg60.csv"]


# --------------------------------------------------------------------------- HTML


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.refs.append(value)


def test_index_html_is_offline_and_every_link_exists(built):
    reports, _ = built
    text = (reports / "index.html").read_text()
    parser = _Links()
    parser.feed(text)
    assert "script" not in parser.tags and "link" not in parser.tags  # inline CSS only, no JS
    assert "@import" not in text and "url(" not in text  # the inline CSS pulls nothing in
    assert not [r for r in parser.refs if "://" in r or r.startswith("//")]  # no http(s), no CDN
    from urllib.parse import unquote

    local = [r for r in parser.refs if not r.startswith("#")]
    assert any(r.endswith(".png") for r in local) and any(r.endswith(".csv") for r in local)
    for ref in local:
        assert "://" not in ref and not ref.startswith("/"), ref
        assert (reports / unquote(ref)).is_file(), ref
    anchors = [r[1:] for r in parser.refs if r.startswith("#")]
    for anchor in anchors:
        assert f'id="{anchor}"' in text, anchor
    assert text.count("<img") == 10  # 5 set-regions x (mse, sad)
    for needle in ("Findings", "held", "How this was produced", "MSE ×1e3", "seg240-mat32", "Method comparison", "mgm"):
        assert needle in text, needle


def test_method_section_is_omitted_without_methods(tmp_path):
    write_study(tmp_path / "metrics")
    stage.build_report(params(), tmp_path / "metrics", tmp_path / "reports", heatmap_metrics=())
    text = (tmp_path / "reports" / "index.html").read_text()
    assert "Method comparison" not in text and 'href="#methods"' not in text


def test_method_rows():
    cells = {(240, 32): make_cell(240, 32, HOLDING[(240, 32)], {"mgm": {"sets": _sets(0.006, 0.03), "fps": 12.5}})}
    rows = core.method_rows(cells)
    assert [r["method"] for r in rows] == ["MLB (student)", "mgm"]
    assert rows[1]["whole_mse"] == pytest.approx(0.006) and rows[1]["fps"] == 12.5 and rows[0]["fps"] == 41.7


# --------------------------------------------------------------------------- robustness


def test_missing_cell_is_shown_and_warned(tmp_path, capsys):
    write_study(tmp_path / "metrics", skip=((240, 32),))
    for seed in SEEDS:
        (tmp_path / "metrics" / f"seed{seed}" / "seg60-mat32.json").write_text("{not json")
    p = tmp_path / "params.yaml"
    p.write_text(f"study:\n  seg: {SEG}\n  mat: {MAT}\n  seeds: {SEEDS}\n  bootstrap: 500\n")
    args = _args(p, tmp_path)
    assert stage.run(args) == 0
    captured = capsys.readouterr()
    assert "missing cell seg240-mat32 seed 0" in captured.err and "unreadable cell seg60-mat32 seed 1" in captured.err
    assert "F1 not held" not in captured.out and "F1 held" in captured.out  # (240, 8) still decides
    rows = read_csv(tmp_path / "reports" / "tables" / "natural-whole-mse.csv")
    assert rows[3][3] == "missing" and rows[2][3] == "missing"
    found = json.loads((tmp_path / "reports" / "findings.json").read_text())
    assert found["missing"] == ["seg60-mat32", "seg240-mat32"]
    f1 = by_id(found["findings"])["F1"]
    assert f1["tested"] == 1 and "seg240-mat32" in f1["note"]
    html = (tmp_path / "reports" / "index.html").read_text()
    assert "missing cell seg240-mat32 seed 0" in html and "Warnings" in html


def test_no_metrics_at_all_fails_clearly(tmp_path, capsys):
    p = tmp_path / "params.yaml"
    p.write_text("{}\n")
    (tmp_path / "metrics").mkdir()
    assert stage.run(_args(p, tmp_path)) == 1
    assert "run the evaluate stage first" in capsys.readouterr().err
    assert not (tmp_path / "reports").exists()


def test_crash_mid_report_leaves_previous_report(tmp_path, monkeypatch):
    write_study(tmp_path / "metrics")
    stage.build_report(params(), tmp_path / "metrics", tmp_path / "reports", heatmap_metrics=("mse",))
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "reports").rglob("*") if p.is_file()}
    write_study(tmp_path / "metrics", with_change((240, 32), "student", whole=0.05))
    calls = []

    def crash(grid, path):
        calls.append(path)
        if len(calls) == 3:
            raise RuntimeError("killed mid-report")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")

    monkeypatch.setattr(stage, "render_heatmap", crash)
    with pytest.raises(RuntimeError):
        stage.build_report(params(), tmp_path / "metrics", tmp_path / "reports", heatmap_metrics=("mse",))
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "reports").rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics", "reports"]  # no temp dir left


def _args(params_path, root):
    import argparse

    parser = argparse.ArgumentParser()
    stage.add_arguments(parser)
    return parser.parse_args(["--params", str(params_path), "--metrics-dir", str(root / "metrics"),
                              "--out", str(root / "reports"), "--heatmap-metrics", "mse"])


def test_cli_module_prints_findings(tmp_path):
    write_study(tmp_path / "metrics", with_change((60, 8), "student", boundary=0.0750))
    (tmp_path / "params.yaml").write_text(f"study:\n  seg: {SEG}\n  mat: {MAT}\n  seeds: {SEEDS}\n  bootstrap: 500\n")
    proc = subprocess.run(
        [sys.executable, "-m", "stages.report", "--params", "params.yaml", "--heatmap-metrics", "mse"],
        cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "report: 8/8 cells -> reports/index.html"
    assert lines[1].startswith("  F1 held") and lines[2].startswith("  F2 not held") and lines[3].startswith("  F3 not held")
    assert "seg60-mat8 student vs seg60-mat8 control, boundary: +34%" in lines[2]
    assert (tmp_path / "reports" / "index.html").is_file()


# --------------------------------------------------------------------------- screenshot script


def test_screenshot_script_without_chromium_says_how_to_install(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "screenshot_report.py"), str(tmp_path / "index.html"),
         "--chromium", str(tmp_path / "no-chromium")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2 and "apt-get install -y chromium" in proc.stderr


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists() and not os.environ.get("CI"),
                    reason="chromium not installed (.ci/run installs it; CI never skips this)")
def test_index_html_renders_in_headless_chromium(built, tmp_path):
    reports, _ = built
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "screenshot_report.py"), str(reports / "index.html"),
         "--out", str(shot), "--height", "1600"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(shot)
    assert png_size(shot) == (1280, 1600)
    from PIL import Image

    with Image.open(shot) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200  # a rendered page, not a blank one
