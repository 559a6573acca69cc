"""The colour reward against a numpy computation of its formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rewards.base import RewardInputs, Subject
from rewards.color import ColorReward


def _expected(image: torch.Tensor, refs: list[torch.Tensor], use_std: bool) -> float:
    def feats(x: torch.Tensor) -> np.ndarray:
        a = x.double().numpy().reshape(3, -1)
        return np.concatenate([a.mean(1), a.std(1)]) if use_std else a.mean(1)

    target = np.mean([feats(r) for r in refs], axis=0)
    return -float(np.sqrt(np.mean((feats(image) - target) ** 2)))


@pytest.mark.parametrize("use_std", [False, True])
def test_color_reward_matches_formula_and_batch(use_std):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 16, 12, generator=g)
    refs = [
        [torch.rand(3, 8, 8, generator=g), torch.rand(3, 20, 10, generator=g)],
        [torch.rand(3, 5, 7, generator=g)],
        [],
    ]
    subjects = [[Subject("a", "a"), Subject("b", "b")], [Subject("c", "c")], []]
    inputs = RewardInputs(["x", "y", "z"], refs, subjects)
    reward = ColorReward(use_std=use_std)
    out = reward(images, inputs)["score"]
    for b in range(2):
        assert out[b].item() == pytest.approx(_expected(images[b], refs[b], use_std), abs=1e-6)
        assert out[b].item() == pytest.approx(
            reward(images[b : b + 1], inputs.select([b]))["score"].item(), abs=1e-7
        )
    assert math.isnan(out[2].item())


def test_color_reward_range():
    white, black = torch.ones(1, 3, 4, 4), torch.zeros(3, 4, 4)
    inputs = RewardInputs(["x"], [[black]], [[Subject("a", "a")]])
    assert ColorReward()(white, inputs)["score"].item() == pytest.approx(-1.0)  # the farthest possible
    same = RewardInputs(["x"], [[white[0]]], [[Subject("a", "a")]])
    assert ColorReward(use_std=True)(white, same)["score"].item() == 0.0
