"""Data pipeline tests: one torch thread (the tiny models gain nothing from more, and on a busy CPU
extra threads stall), restored afterwards for the rest of the suite."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
