"""Fixtures of the stage tests."""

from __future__ import annotations

import pytest

from tests.images import messy_tree


@pytest.fixture
def messy(tmp_path) -> dict:
    """The messy folders under ``tmp_path / 'raw'`` plus their expectations."""
    return messy_tree(tmp_path / "raw")
