"""Fixtures for the reward tests: tiny random backbones (built once per session) and image helpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


def _patch(seed: int, h: int, w: int) -> torch.Tensor:
    """A distinctive texture ``[3, h, w]`` in [0.1, 0.9] (coarse noise upsampled, so crops and resizes
    keep its identity), never equal to a white or black background."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(2, h // 6), max(2, w // 6), generator=g)
    return (0.1 + 0.8 * F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False))[0]


@pytest.fixture
def patch():
    return _patch


@pytest.fixture
def paste():
    def paste(canvas: torch.Tensor, piece: torch.Tensor, x: int, y: int) -> list[float]:
        """Paste ``piece`` into ``canvas`` ``[3, H, W]`` at (x, y) in place; returns its xyxy box."""
        h, w = piece.shape[-2:]
        canvas[:, y : y + h, x : x + w] = piece
        return [float(x), float(y), float(x + w), float(y + h)]

    return paste


@pytest.fixture(scope="session")
def tiny_dino():
    from rewards.testing import tiny_dino

    return tiny_dino(0)


@pytest.fixture(scope="session")
def tiny_gd():
    from rewards.testing import tiny_grounding_dino

    return tiny_grounding_dino(0)
