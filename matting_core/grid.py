"""The label-budget grid: cell names and kinds (the one definition every layer uses)."""

from __future__ import annotations

__all__ = ["cell_kind", "cell_name"]


def cell_name(seg_count: int, mat_count: int) -> str:
    """Canonical name of a grid cell: ``seg<S>-mat<M>`` (also its metrics file, model folders and MLflow tag)."""
    return f"seg{int(seg_count)}-mat{int(mat_count)}"


def cell_kind(seg_count: int, mat_count: int) -> str:
    """``seg_only`` (S, 0), ``mat_only`` (0, M) or ``both``; (0, 0) and negative budgets are not cells."""
    if seg_count < 0 or mat_count < 0 or (seg_count, mat_count) == (0, 0):
        raise ValueError(f"no such grid cell: seg={seg_count}, mat={mat_count} ((0, 0) is not a cell)")
    if mat_count == 0:
        return "seg_only"
    if seg_count == 0:
        return "mat_only"
    return "both"
