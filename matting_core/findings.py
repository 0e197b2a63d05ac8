"""Findings F1-F3 decided from intervals, and the study's training-regime figures.

Input: per grid cell, the list of per-seed metrics records the evaluate stage writes
(``metrics/seed<k>/<cell>.json``; each set summary holds ``per_image`` MSE by key). Every
comparison is "model A has a lower natural-set MSE than model B" on the same images:
``delta = mean(A) / mean(B) - 1`` with a 95 % interval from a paired bootstrap over images
and (independently for A and B) over seeds (:func:`matting_core.stats.compare`), and a
verdict from the interval alone: ``held`` (the whole interval below 0), ``not held`` (above
0) or ``inconclusive`` (it contains 0); ``not testable`` when a model or set is missing.

- **F1** (segmentation data makes the model robust on natural photos): for every mat budget
  M, the primary model of (S_max, M) vs the mat-only teacher (0, M), whole-image MSE.
- **F2** (even the smallest matte budget improves the boundary over seg-only): for every seg
  budget S, the primary model of (S, M_min) vs the S-only control student of row S (same
  start, steps and augmentation, label S: equal training steps), boundary MSE. Without a
  control (a related method's grid) the seg-only model (S, 0) is the baseline, and the
  finding says the step counts differ.
- **F3** (the MLB student beats the seg-only teacher and the fine-tuned teacher): per
  both-cell, the student vs the seg-only model (S, 0), vs the cell's teacher and vs the
  S-only control, whole and boundary MSE (6 comparisons).

A finding is ``held`` when every comparison is held, ``not held`` when any is not held,
else ``inconclusive`` (:func:`matting_core.stats.finding_verdict`); its ``delta`` / ``ci95``
are those of the least favourable comparison (the highest upper bound), named in
``decided_by``. Every model reference carries its training steps (``steps``: pre-train +
its own step), so the reader sees which comparisons are at equal budgets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from matting_core import stats
from matting_core.grid import cell_kind, cell_name

__all__ = [
    "CLAIMS",
    "NOT_TESTABLE",
    "check_findings",
    "finding_headline",
    "mean_record",
    "model_steps",
    "per_image_errors",
    "regime",
]

NOT_TESTABLE = "not testable"
CLAIMS = {
    "F1": "Segmentation data makes the model robust on natural photos (mat-only models collapse).",
    "F2": "Even the smallest matte budget sharply improves boundary-region error over seg-only.",
    "F3": "The MLB student beats both the seg-only teacher and the fine-tuned teacher on natural photos.",
}

Records = Mapping[tuple[int, int], Sequence[Mapping[str, Any]]]


# ----------------------------------------------------------------------------- records


def mean_record(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One metrics record whose numbers are the means over ``records`` (seeds).

    Same structure as one record; numeric leaves present in every record are averaged,
    others are taken from the first; ``per_image`` lists are left out (they are what the
    intervals use); ``seeds`` lists the seeds averaged.
    """
    if not records:
        raise ValueError("mean_record needs at least one record")

    def merge(values: list[Any]) -> Any:
        first = values[0]
        if isinstance(first, bool) or not isinstance(first, (dict, int, float)):
            return first
        if isinstance(first, dict):
            out = {}
            for key, value in first.items():
                if key == "per_image":
                    continue
                same = [v[key] for v in values if isinstance(v, dict) and key in v]
                out[key] = merge(same) if len(same) == len(values) else value
            return out
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return float(np.mean(values)) if isinstance(first, float) or len(set(values)) > 1 else first
        return first

    out = merge(list(records))
    out["seeds"] = [r.get("seed", 0) for r in records]
    return out


def _summary(record: Mapping[str, Any], role: str, valset: str) -> Mapping[str, Any]:
    return (((record.get("models") or {}).get(role) or {}).get("sets") or {}).get(valset) or {}


def per_image_errors(
    records: Sequence[Mapping[str, Any]], role: str, valset: str, region: str
) -> np.ndarray | None:
    """``(n_seeds, n_images)`` per-image MSE of ``role`` on ``valset``/``region``, images
    aligned by key across seeds (None when any seed lacks them)."""
    rows, keys = [], None
    for record in records:
        per = _summary(record, role, valset).get("per_image") or {}
        values = per.get(f"{region}_mse")
        if not values or not per.get("key"):
            return None
        by_key = dict(zip(per["key"], values))
        if keys is None:
            keys = sorted(by_key)
        if sorted(by_key) != keys:
            return None
        rows.append([by_key[k] for k in keys])
    return np.asarray(rows, dtype=np.float64) if rows else None


def model_steps(params: Any, role: str, seg_count: int) -> int:
    """Optimiser steps behind a model of a cell: pre-training (when S > 0) plus its own step."""
    train = params.train
    pre = int(train.pretrain.iters) if seg_count > 0 else 0
    own = {"pretrain": 0, "teacher": int(train.teacher.iters), "student": int(train.student.iters),
           "control": int(train.student.iters)}
    return pre + own.get(role, 0)


# ----------------------------------------------------------------------------- comparisons


def _primary(records: Sequence[Mapping[str, Any]]) -> str | None:
    return records[0].get("primary") if records else None


def _ref(records: Records, cell: tuple[int, int], role: str | None, params: Any) -> dict[str, Any]:
    recs = records.get(cell) or []
    role = role or _primary(recs)
    ref: dict[str, Any] = {"cell": cell_name(*cell), "model": role}
    if recs and role in (recs[0].get("models") or {}):
        ref["steps"] = model_steps(params, role, cell[0]) if params is not None else None
    return ref


def _compare(
    label: str, region: str, records: Records, a: tuple[tuple[int, int], str | None],
    b: tuple[tuple[int, int], str | None], valset: str, params: Any, n_boot: int,
) -> dict[str, Any]:
    cand, base = _ref(records, a[0], a[1], params), _ref(records, b[0], b[1], params)
    out: dict[str, Any] = {"label": label, "region": region, "candidate": cand, "baseline": base}
    xa = per_image_errors(records.get(a[0]) or [], cand["model"], valset, region) if cand["model"] else None
    xb = per_image_errors(records.get(b[0]) or [], base["model"], valset, region) if base["model"] else None
    missing = [f"{r['cell']} {r['model'] or 'model'}" for r, x in ((cand, xa), (base, xb)) if x is None]
    if missing:
        out["verdict"] = NOT_TESTABLE
        out["problem"] = f"no per-image `{valset}` {region} MSE for " + " and ".join(missing)
        return out
    if xa.shape[1] != xb.shape[1]:
        out["verdict"] = NOT_TESTABLE
        out["problem"] = f"{cand['cell']} and {base['cell']} were scored on different images"
        return out
    result = stats.compare(xa, xb, expect="lower", n_boot=n_boot, seed=0)
    cand["mse_x1e3"], base["mse_x1e3"] = result["mean_a"] * 1e3, result["mean_b"] * 1e3
    out.update(delta=result["delta"], ci95=result["ci95"], verdict=result["verdict"],
               n_images=result["n_images"], n_seeds=result["n_seeds"])
    return out


def _decide(fid: str, valset: str, rule: str, comparisons: list[dict], **extra) -> dict[str, Any]:
    tested = [c for c in comparisons if c["verdict"] != NOT_TESTABLE]
    finding: dict[str, Any] = {"id": fid, "claim": CLAIMS[fid], "set": valset, "metric": "mse", "rule": rule}
    if not tested:
        problems = "; ".join(dict.fromkeys(c.get("problem", "") for c in comparisons)) or "no comparison"
        finding.update(verdict=NOT_TESTABLE, delta=None, ci95=None, reason=problems)
    else:
        verdict = stats.finding_verdict([c["verdict"] for c in tested])
        worst = max(tested, key=lambda c: c["ci95"][1])
        finding.update(verdict=verdict, delta=worst["delta"], ci95=worst["ci95"],
                       decided_by=f"{worst['candidate']['cell']} {worst['candidate']['model']} vs "
                                  f"{worst['baseline']['cell']} {worst['baseline']['model']}, {worst['region']}")
        untested = [c for c in comparisons if c["verdict"] == NOT_TESTABLE]
        if untested:
            finding["note"] = f"{len(untested)} comparison(s) not testable: " + "; ".join(
                dict.fromkeys(c["problem"] for c in untested))
    finding["tested"] = len(tested)
    finding["held_count"] = sum(c["verdict"] == stats.HELD for c in tested)
    finding["comparisons"] = comparisons
    finding.update(extra)
    return finding


def check_findings(
    records: Records, seg: Sequence[int], mat: Sequence[int], natural: str = "natural",
    params: Any = None, n_boot: int = 2000,
) -> list[dict[str, Any]]:
    """F1, F2, F3 (module doc) from per-seed ``records``; ``params`` gives the step counts."""
    rows, cols = [0, *seg], [0, *mat]
    s_max, m_min = rows[-1], cols[1]
    f1 = [
        _compare(f"mat {m}", "whole", records, ((s_max, m), None), ((0, m), "teacher"), natural, params, n_boot)
        for m in cols[1:]
    ]
    f2, control_used = [], True
    for s in rows[1:]:
        cell = records.get((s, m_min)) or []
        has_control = bool(cell) and "control" in (cell[0].get("models") or {})
        control_used &= has_control
        base = ((s, m_min), "control") if has_control else ((s, 0), None)
        f2.append(_compare(f"seg {s}", "boundary", records, ((s, m_min), None), base, natural, params, n_boot))
    f3_cells, f3_all = [], []
    for s in rows[1:]:
        for m in cols[1:]:
            comps = []
            for region in ("whole", "boundary"):
                for label, base in (("vs seg-only model", ((s, 0), None)), ("vs fine-tuned teacher", ((s, m), "teacher")),
                                    ("vs S-only control", ((s, m), "control"))):
                    comps.append(_compare(label, region, records, ((s, m), "student"), base, natural, params, n_boot))
            tested = [c["verdict"] for c in comps if c["verdict"] != NOT_TESTABLE]
            f3_cells.append({"cell": cell_name(s, m), "verdict": stats.finding_verdict(tested) if tested else NOT_TESTABLE,
                             "comparisons": comps})
            f3_all.extend(comps)
    f2_rule = (
        f"for every seg budget S, the (S, {m_min}) model has a lower `{natural}` boundary MSE than "
        + ("the S-only control of row S (equal training steps)" if control_used
           else "the seg-only model (S, 0) (no S-only control here: the candidate had more training steps)")
    )
    findings = [
        _decide("F1", natural, f"for every mat budget M, the (S={s_max}, M) model has a lower `{natural}` whole MSE "
                "than the mat-only teacher (0, M)", f1, s_max=s_max),
        _decide("F2", natural, f2_rule, f2, m_min=m_min, equal_steps=control_used),
        _decide("F3", natural, f"per both-cell, the MLB student has a lower `{natural}` MSE, whole and boundary, than "
                "the seg-only model (S, 0), the cell's fine-tuned teacher and the S-only control", f3_all),
    ]
    findings[2]["cells"] = f3_cells
    return findings


# ----------------------------------------------------------------------------- regime


def _label_ratio(records: Sequence[Mapping[str, Any]], role: str, label: str, valset: str) -> dict | None:
    """Model MSE / its training label's own MSE on ``valset`` (whole, boundary), seed means.

    The mask label S is scored with every model; the blended label M̃ with the teacher."""
    label_role = "teacher" if label == "blended" else role
    out = {}
    for region in ("whole", "boundary"):
        model, lab = [], []
        for record in records:
            summary = _summary(record, role, valset)
            labels = _summary(record, label_role, valset).get("labels") or {}
            if region not in summary or label not in labels:
                return None
            model.append(summary[region]["mse"])
            lab.append(labels[label][region]["mse"])
        m, lab_mean = float(np.mean(model)), float(np.mean(lab))
        out[region] = {"model_mse_x1e3": m * 1e3, "label_mse_x1e3": lab_mean * 1e3,
                       "ratio": m / lab_mean if lab_mean > 0 else None}
    return out


def _beta(records: Sequence[Mapping[str, Any]], valset: str) -> dict | None:
    values: dict[str, list[float]] = {}
    for record in records:
        beta = _summary(record, "teacher", valset).get("beta")
        if not beta:
            return None
        for key in ("band", "fg", "bg", "outside"):
            if beta.get(key) is not None:
                values.setdefault(key, []).append(beta[key])
    return {k: float(np.mean(v)) for k, v in values.items()}


def regime(records: Records, natural: str = "natural", composited: str = "composited") -> dict[str, Any]:
    """Per cell kind, per cell: the model-vs-label error ratio on ``natural`` and the teacher's
    β band/outside (on ``composited`` and ``natural``), seed means; plus the kind's mean.

    Labels (scored against the GT where the set ships coarse masks): a seg-only model vs
    its label S; a both-cell's student vs its blended label M̃ (and M̃ vs S: what the
    teacher adds); a mat-only teacher learns exact mattes (no label error, β only).
    """
    kinds: dict[str, dict[str, Any]] = {"seg_only": {}, "mat_only": {}, "both": {}}
    for (s, m), recs in sorted(records.items()):
        if not recs:
            continue
        kind, name = cell_kind(s, m), cell_name(s, m)
        entry: dict[str, Any] = {}
        if kind == "seg_only":
            entry["model_vs_label"] = _label_ratio(recs, "pretrain", "mask", natural)
        else:
            entry["beta"] = {valset: _beta(recs, valset) for valset in (composited, natural)}
        if kind == "both":
            entry["model_vs_label"] = _label_ratio(recs, "student", "blended", natural)
            entry["blended_vs_mask"] = _blended_vs_mask(recs, natural)
        kinds[kind][name] = entry
    for kind, cells in kinds.items():
        ratios = [c["model_vs_label"][r]["ratio"] for c in cells.values() if c.get("model_vs_label")
                  for r in ("whole", "boundary") if c["model_vs_label"][r]["ratio"] is not None]
        bands = [c["beta"][composited] for c in cells.values() if c.get("beta") and c["beta"].get(composited)]
        summary: dict[str, Any] = {}
        if ratios:
            summary["model_vs_label_ratio_mean"] = float(np.mean(ratios))
        if bands:
            summary["beta_band"] = float(np.mean([b["band"] for b in bands if "band" in b]))
            summary["beta_outside"] = float(np.mean([b["outside"] for b in bands if "outside" in b]))
        kinds[kind] = {"cells": cells, **summary}
    return kinds


def _blended_vs_mask(records: Sequence[Mapping[str, Any]], valset: str) -> dict | None:
    out = {}
    for region in ("whole", "boundary"):
        blended, mask = [], []
        for record in records:
            labels = _summary(record, "teacher", valset).get("labels") or {}
            if "blended" not in labels or "mask" not in labels:
                return None
            blended.append(labels["blended"][region]["mse"])
            mask.append(labels["mask"][region]["mse"])
        b, k = float(np.mean(blended)), float(np.mean(mask))
        out[region] = {"blended_mse_x1e3": b * 1e3, "mask_mse_x1e3": k * 1e3, "ratio": b / k if k > 0 else None}
    return out


def finding_headline(finding: Mapping[str, Any]) -> str:
    """One line: ``F2 held (2/2 held): least favourable seg 60, boundary: -12% [-20%, -5%]``."""
    fid, verdict = finding["id"], finding["verdict"]
    if verdict == NOT_TESTABLE:
        return f"{fid} not testable: {finding.get('reason', '')}"
    lo, hi = finding["ci95"]
    return (f"{fid} {verdict} ({finding['held_count']}/{finding['tested']} comparisons held); least favourable "
            f"{finding['decided_by']}: {finding['delta']:+.0%} [{lo:+.0%}, {hi:+.0%}]")
