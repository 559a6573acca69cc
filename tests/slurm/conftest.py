"""Fixtures of the Slurm tests. The ``slurm``-marked tests need the one-node cluster of
``scripts/slurm_local.sh`` (``.ci/run`` starts it); without a responding cluster they fail with the
reason, never skip."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_helpers import Slurm, cluster_problem


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    problem = cluster_problem()
    if problem:
        pytest.fail(f"the local Slurm cluster is not usable: {problem}", pytrace=False)


@pytest.fixture
def slurm(slurm_cluster: None, tmp_path: Path) -> Iterator[Slurm]:
    cluster = Slurm(tmp_path)
    yield cluster
    cluster.cancel_leftovers()
