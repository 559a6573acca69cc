"""Shared fixtures: tiny models built from configs in code, seeded, on the CPU."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# one thread per test process: the tiny models are too small to gain from more, and under load
# two threads contend badly
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_components():
    from psr.models.builders import tiny_flux_kontext_components

    return tiny_flux_kontext_components(seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_components):
    """The tiny model saved in diffusers layout: the path users' checkpoints take."""
    from psr.models.builders import save_components

    return save_components(tiny_components, tmp_path_factory.mktemp("tiny_flux_kontext"))


@pytest.fixture
def tiny_policy():
    from psr.models.builders import tiny_flux_kontext

    return tiny_flux_kontext(seed=0)


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests need CUDA; without it they are skipped with that reason."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
