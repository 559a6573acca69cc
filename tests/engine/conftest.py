"""Engine tests: DeepSpeed runs as one local gloo process in the test process."""

from __future__ import annotations

import pytest


@pytest.fixture
def ds_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """One local process, whatever launcher variables the outer environment has (restored after)."""
    for key in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
