"""A reward for the trainer tests whose value does not depend on the sample for some prompts.

``psr-rl reward=color reward._target_=tests.trainers.zero_variance_reward.ColourOrConstant
+reward.constant_for_subjects=3``: the colour reward (rewards/color.py), except that every image of a
record with ``constant_for_subjects`` subjects scores ``value``. Those groups have zero variance
through the real trainer (rollout, reward, gathered advantages, objective), not through a patched
reduction. Importable by torchrun's workers as ``tests.trainers...`` with the checkout on PYTHONPATH.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rewards.base import RewardInputs
from rewards.color import ColorReward


class ColourOrConstant:
    """The colour reward; ``value`` for every sample whose record has ``constant_for_subjects`` subjects.

    Args:
        constant_for_subjects: the subject count whose records get the constant.
        value: that constant (within [-1, 0], the colour reward's range).
        use_std: passed to :class:`~rewards.color.ColorReward`.
    """

    def __init__(self, constant_for_subjects: int, value: float = -0.5, use_std: bool = False) -> None:
        self.constant_for_subjects = int(constant_for_subjects)
        self.value = float(value)
        self.colour = ColorReward(use_std=use_std)

    @torch.no_grad()
    def __call__(self, images: Tensor, inputs: RewardInputs) -> dict[str, Tensor]:
        score = self.colour(images, inputs)["score"].clone()  # [B]
        constant = torch.tensor([len(s) == self.constant_for_subjects for s in inputs.subjects])
        score[constant.to(score.device)] = self.value
        return {"score": score}
