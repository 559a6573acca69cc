"""A cheap, weight-free reward: how close the generated image's colour statistics are to its
references'. Used by learning tests and the tiny quickstart, where no reward model is available.

Features of an image: its per-channel mean (3 values in [0, 1]) and, with ``use_std``, its
per-channel standard deviation (3 values in [0, 0.5]). The references' features are the average of
each reference's features (every reference weighs the same, whatever its size). The score is minus
the root-mean-square difference of the features:

``score = -sqrt(mean_f (phi_f(x) - mean_k phi_f(ref_k))^2)``, in [-1, 0] (0: identical statistics).

A sample without references gets NaN. Batched: one reduction over the B images.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rewards.base import RewardInputs, check_images

__all__ = ["ColorReward", "color_features"]


def color_features(images: Tensor, use_std: bool = False) -> Tensor:
    """``[N, 3, H, W]`` -> ``[N, 3]`` channel means (``[N, 6]`` with the population stds), float64."""
    x = images.detach().to(torch.float64).flatten(2)  # [N, 3, HW]
    feats = [x.mean(-1)]
    if use_std:
        feats.append(x.std(-1, correction=0))
    return torch.cat(feats, dim=-1)


class ColorReward:
    """Colour-statistics closeness to the references (see the module docstring).

    Args:
        use_std: also match the per-channel standard deviations.
    """

    def __init__(self, use_std: bool = False) -> None:
        self.use_std = bool(use_std)

    @torch.no_grad()
    def __call__(self, images: Tensor, inputs: RewardInputs) -> dict[str, Tensor]:
        check_images(images, inputs, "ColorReward")
        gen = color_features(images, self.use_std).cpu()  # [B, F]
        score = torch.full((len(inputs),), float("nan"), dtype=torch.float64)
        for b, refs in enumerate(inputs.references):
            if refs:
                target = torch.stack([color_features(r[None], self.use_std)[0].cpu() for r in refs]).mean(0)
                score[b] = -((gen[b] - target) ** 2).mean().sqrt()
        return {"score": score.to(device=images.device, dtype=torch.float32)}
