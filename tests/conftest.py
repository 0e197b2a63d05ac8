"""Fixtures shared across the test packages."""

from __future__ import annotations

import pytest


@pytest.fixture
def one_thread():
    """Run the test with one torch thread (small nets on 2 cores: threads only add overhead and noise)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
