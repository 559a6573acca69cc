r"""Rewards to per-sample advantages for group-relative RL (docs/method.md §4).

Pure functions:

- :func:`combine_rewards`: ``R_i = sum_j w_j r_ij`` over reward components (PSR: 0.4 R_PSR +
  0.4 R_semantic + 0.2 R_HPSv3), optionally z-scoring each component within its prompt group first
  so that rewards of different scales (a 0-10 VLM score next to a cosine similarity) weigh as
  their weights say. The weighted sum is :func:`rewards.base.weighted_score`, the one NaN-aware
  combination (a NaN component means "does not apply to this sample": it contributes nothing and
  the weights of the components that do apply are rescaled to the full weight total, per sample).
- :func:`reward_components`, :func:`component_weights`: a weighted reward's per-reward scores and
  weights, read from its output and from the reward.
- :func:`group_advantages`: ``A_i = (R_i - mean_g R) / (std + eps)``, the std taken within the
  group g (default) or over the whole batch (``global_std``, Flow-GRPO's FLUX Kontext setting),
  then clipped to ``[-clip, clip]``.
- :func:`narrow_groups`, :func:`difficulty_weights`: optional reward shaping on the groups of a
  step (off by default in GRPO): groups whose reward range is below a threshold are dropped, and
  the advantages of each group are scaled by ``(1 - mean_g score)^gamma``, so that groups the policy
  does not solve yet weigh more than solved ones (docs/method.md §4).

**Std convention.** Population std (``unbiased=False``, divide by n), as Flow-GRPO's
``PerPromptStatTracker`` (``np.std``, ddof 0, ``+ 1e-4``); with G = 6 the unbiased std would be
``sqrt(6/5)`` times larger and every advantage ``sqrt(5/6)`` times smaller.

**Zero-variance groups** (all G rewards equal up to ``zero_var_tol``) rank nothing: their
advantages are set to exactly 0 (not left to ``(R - mean) / eps``, which would amplify rounding
noise by 1e4 in per-group mode) and they are counted in ``adv/zero_var_frac``. The mask of the
samples in such groups is :func:`zero_variance_groups`; the GRPO objective skips samples with
``A == 0``, which covers them (a sample of a varying group whose advantage is exactly 0 carries no
policy gradient either).

All statistics are computed in float64 (rewards from different models may be float16/32); results
come back in the input's float dtype (float32 for integer inputs).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from rewards.base import weighted_score

__all__ = [
    "combine_rewards",
    "advantage_summary",
    "component_weights",
    "difficulty_weights",
    "group_advantages",
    "narrow_groups",
    "reward_components",
    "zero_variance_groups",
]


def _check_batch(name: str, t: Tensor, batch: int | None = None) -> None:
    if t.ndim != 1:
        raise ValueError(f"advantages: {name} must be 1-D [B]; got shape {tuple(t.shape)}")
    if batch is not None and t.shape[0] != batch:
        raise ValueError(f"advantages: {name} has {t.shape[0]} entries, expected B={batch} (one per sample)")


def _group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary group ids to ``0..G-1``; returns (inverse ``[B]`` long, G)."""
    _check_batch("group_ids", group_ids)
    if group_ids.is_floating_point() or group_ids.is_complex():
        raise ValueError(f"advantages: group_ids must be an integer tensor; got {group_ids.dtype}")
    if group_ids.numel() == 0:
        raise ValueError("advantages: empty batch (group_ids has no entries)")
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(inverse.max()) + 1


def _group_moments(values: Tensor, inverse: Tensor, num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group mean, population std and count over the non-NaN entries of ``values`` (float64 ``[B]``).

    Two-pass (mean first, then squared deviations) for accuracy. Groups with no entry get mean and
    std NaN and count 0.
    """
    present = ~torch.isnan(values)
    w = present.to(values.dtype)
    v = torch.where(present, values, torch.zeros_like(values))
    count = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, inverse, w)
    total = torch.zeros_like(count).index_add_(0, inverse, v)
    mean = total / count  # NaN for empty groups (0 / 0)
    dev2 = w * (v - torch.nan_to_num(mean)[inverse]) ** 2
    var = torch.zeros_like(count).index_add_(0, inverse, dev2) / count
    return mean, var.sqrt(), count


def _out_dtype(t: Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.float32


def zero_variance_groups(rewards: Tensor, group_ids: Tensor, *, tol: float = 1e-6) -> Tensor:
    """Which samples belong to a group whose rewards are all equal (population std <= ``tol``).

    Args:
        rewards: ``[B]`` finite rewards.
        group_ids: ``[B]`` integer prompt-group ids (any values; equal id = same group).
        tol: absolute std tolerance, >= 0.

    Returns:
        ``[B]`` bool, True for samples of zero-variance groups (a group of one sample included).
    """
    inverse, num_groups = _group_index(group_ids)
    _check_batch("rewards", rewards, group_ids.shape[0])
    _, std, _ = _group_moments(rewards.detach().to(torch.float64), inverse, num_groups)
    return (std <= tol)[inverse]


def combine_rewards(
    components: Mapping[str, Tensor],
    weights: Mapping[str, float],
    group_ids: Tensor,
    *,
    normalize_per_reward: bool = False,
    eps: float = 1e-4,
    zero_var_tol: float = 1e-6,
) -> Tensor:
    """Weighted sum of reward components per sample, NaN-aware (:func:`rewards.base.weighted_score`).

    ``R_i = (W / W_i) sum_{j applies to i} w_j r_ij`` with ``W = sum_j w_j`` and ``W_i`` the sum of
    the weights of the components that apply to sample i (non-NaN): when every component applies
    this is ``sum_j w_j r_ij``; when one does not, the others are scaled up so the total weight
    stays ``W``, keeping R on one scale across samples. A sample to which no weighted component
    applies gets NaN.

    With ``normalize_per_reward``, each component is first replaced by its within-group z-score
    ``(r - mean_g) / (std_g + eps)`` (population std over the group's non-NaN entries); a component
    that is constant within a group (std <= ``zero_var_tol``) contributes 0 there, since it ranks
    nothing.

    Args:
        components: name -> ``[B]`` scores (higher is better, NaN where the reward does not apply).
        weights: name -> weight >= 0; must name exactly the components (``reward.weights``).
        group_ids: ``[B]`` integer prompt-group ids.
        normalize_per_reward: z-score each component within its group before weighting
            (``algo.normalize_per_reward``).
        eps: added to the group std in the z-score.
        zero_var_tol: std at or below which a component counts as constant in a group.

    Returns:
        ``[B]`` combined reward on ``group_ids``' device, float32 (float64 if a component is float64).
    """
    if eps < 0:
        raise ValueError(f"combine_rewards: eps={eps} must be >= 0")
    inverse, num_groups = _group_index(group_ids)
    batch = group_ids.shape[0]
    dtype = functools.reduce(torch.promote_types, (_out_dtype(c) for c in components.values()), torch.float32)
    prepared: dict[str, Tensor] = {}
    for name, comp in components.items():
        _check_batch(f"reward component '{name}'", comp, batch)
        r = comp.detach().to(device=group_ids.device, dtype=torch.float64)
        if normalize_per_reward and not torch.isinf(r).any():  # weighted_score names infinite values
            mean, std, _ = _group_moments(r, inverse, num_groups)
            z = (r - mean[inverse]) / (std[inverse] + eps)
            # a constant component ranks nothing: exactly 0, not rounding noise / eps
            z = torch.where(std[inverse] <= zero_var_tol, torch.zeros_like(z), z)
            r = torch.where(torch.isnan(r), r, z)
        prepared[name] = r
    return weighted_score(prepared, weights).to(dtype)


def reward_components(scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The per-reward scores of a weighted reward's output (``<name>/score``, see
    :class:`rewards.base.WeightedReward`), by name; ``{}`` for a single reward."""
    return {k[: -len("/score")]: v for k, v in scores.items() if k.endswith("/score")}


def component_weights(reward: Any, components: Mapping[str, Tensor]) -> dict[str, float]:
    """The weights of ``components`` in a weighted reward (its ``weights``, ``reward.weights``)."""
    if not components:
        return {}
    weights = getattr(reward, "weights", None)
    if weights is None or set(components) - set(weights):
        raise ValueError(
            f"reward components {sorted(components)} have no weights in {type(reward).__name__} (reward.weights)"
        )
    return {k: float(weights[k]) for k in components}


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    global_std: bool = False,
    eps: float = 1e-4,
    clip: float = 5.0,
    zero_var_tol: float = 1e-6,
    global_rewards: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Group-normalized, clipped advantages.

    ``A_i = clip((R_i - mean_g R) / (std + eps), -clip, clip)``, ``std`` the population std of the
    group g (default) or of all rewards (``global_std``); samples of zero-variance groups get
    exactly 0 (module docstring).

    Args:
        rewards: ``[B]`` finite combined rewards (this rank's samples; a group never straddles ranks).
        group_ids: ``[B]`` integer prompt-group ids.
        global_std: divide by the std over the whole batch instead of the group's
            (``algo.global_std``; Flow-GRPO's FLUX Kontext config uses it).
        eps: added to the std (``algo.eps``; Flow-GRPO 1e-4).
        clip: ``A_max`` > 0 (``algo.clip``; 5); ``math.inf`` disables clipping.
        zero_var_tol: a group whose reward std is <= this is a zero-variance group.
        global_rewards: with ``global_std``, the rewards of all ranks (``[B_total]``) whose std is
            used; None uses ``rewards``. Ignored without ``global_std``.

    Returns:
        ``(advantages [B]`` in the rewards' float dtype, ``metrics)`` with float values:
        ``adv/mean``, ``adv/std``, ``adv/min``, ``adv/max`` (after clipping), ``adv/clip_frac``
        (fraction of samples clipped), ``adv/zero_var_frac`` (fraction of groups with zero
        variance), ``adv/reward_std`` (the divisor's std: global, or the mean over valid groups).
    """
    inverse, num_groups = _group_index(group_ids)
    _check_batch("rewards", rewards, group_ids.shape[0])
    if not torch.isfinite(rewards).all():
        bad = int((~torch.isfinite(rewards)).sum())
        raise ValueError(
            f"group_advantages: {bad} of {rewards.numel()} rewards are not finite; "
            "resolve NaN ('does not apply') before computing advantages"
        )
    if eps < 0:
        raise ValueError(f"group_advantages: eps={eps} must be >= 0 (algo.eps)")
    if not clip > 0:
        raise ValueError(f"group_advantages: clip={clip} must be > 0 (algo.clip)")
    if not eps > 0 and not global_std and zero_var_tol <= 0:
        raise ValueError("group_advantages: eps=0 with zero_var_tol=0 divides by zero for constant groups")

    r = rewards.detach().to(torch.float64)
    mean, std, _ = _group_moments(r, inverse, num_groups)
    zero_var = std <= zero_var_tol  # [G]
    if global_std:
        pool = (
            r if global_rewards is None else global_rewards.detach().to(device=r.device, dtype=torch.float64)
        )
        if pool.ndim != 1 or not torch.isfinite(pool).all():
            raise ValueError(
                "group_advantages: global_rewards must be a finite 1-D tensor of all ranks' rewards"
            )
        denom_std = pool.std(unbiased=False)
        denom = denom_std + eps  # scalar
        reward_std = float(denom_std)
    else:
        denom = (std + eps)[inverse]
        valid_std = std[~zero_var]
        reward_std = float(valid_std.mean()) if valid_std.numel() else 0.0
    raw = (r - mean[inverse]) / denom
    raw = torch.where(zero_var[inverse], torch.zeros_like(raw), raw)
    adv = raw.clamp(-clip, clip)

    metrics = {
        **advantage_summary(adv),
        "adv/clip_frac": float((raw.abs() > clip).double().mean()),
        "adv/zero_var_frac": float(zero_var.double().mean()),
        "adv/reward_std": reward_std,
    }
    return adv.to(_out_dtype(rewards)), metrics


def advantage_summary(advantages: Tensor) -> dict[str, float]:
    """``adv/mean``, ``adv/std`` (population), ``adv/min``, ``adv/max`` of ``[B]`` advantages (B >= 1)."""
    adv = advantages.detach()
    return {
        "adv/mean": float(adv.mean()),
        "adv/std": float(adv.std(unbiased=False)),
        "adv/min": float(adv.min()),
        "adv/max": float(adv.max()),
    }


def narrow_groups(scores: Tensor, group_ids: Tensor, *, min_range: float) -> Tensor:
    """Which samples belong to a group whose reward range ``max - min`` is below ``min_range``.

    Such a group barely ranks its samples: its advantages would be reward noise scaled up by the
    std. The range is taken over the group's non-NaN scores; a group with fewer than two of them
    has range 0.

    Args:
        scores: ``[B]`` rewards, NaN where the reward does not apply.
        group_ids: ``[B]`` integer prompt-group ids.
        min_range: threshold >= 0 (``algo.min_group_range``); 0 drops nothing.

    Returns:
        ``[B]`` bool, True for every sample (NaN ones included) of a group with range < ``min_range``.
    """
    inverse, num_groups = _group_index(group_ids)
    _check_batch("scores", scores, group_ids.shape[0])
    if not min_range >= 0:
        raise ValueError(f"narrow_groups: min_range={min_range} must be >= 0 (algo.min_group_range)")
    s = scores.detach().to(torch.float64)
    present = ~torch.isnan(s)
    inf = torch.full((num_groups,), math.inf, dtype=s.dtype, device=s.device)
    top = (-inf).scatter_reduce(0, inverse[present], s[present], "amax")
    low = inf.scatter_reduce(0, inverse[present], s[present], "amin")
    count = torch.zeros_like(inf).index_add_(0, inverse, present.to(s.dtype))
    span = torch.where(count >= 2, top - low, torch.zeros_like(top))  # [G]
    return (span < min_range)[inverse]


def difficulty_weights(
    scores: Tensor,
    group_ids: Tensor,
    *,
    gamma: float,
    clip: tuple[float, float] = (0.1, 1.0),
) -> tuple[Tensor, dict[str, float]]:
    """Per-sample weights that favour the groups the policy does not solve yet.

    For group g with mean score ``m_g`` over its non-NaN scores (scores meant in [0, 1], e.g. a
    similarity):

        u_g = clip(max(1 - m_g, 0)^gamma, lo, hi),        w_g = u_g / mean_h u_h

    the mean taken over the groups with at least one non-NaN score, so the weights average 1 over
    those groups and the step's advantages keep their scale. ``lo > 0`` keeps a nearly solved group
    in the update and bounds the ratio of the heaviest to the lightest group by ``hi / lo``; the
    base is floored at 0 so a score above 1 does not give a complex power. ``gamma = 0`` gives
    every group weight exactly 1.

    Args:
        scores: ``[B]`` rewards, NaN where the reward does not apply (excluded from ``m_g``).
        group_ids: ``[B]`` integer prompt-group ids.
        gamma: exponent >= 0 (``algo.difficulty_gamma``).
        clip: ``(lo, hi)`` with ``0 < lo <= hi`` (``algo.difficulty_clip``), applied before the
            renormalization.

    Returns:
        ``(weights [B]`` float64, NaN for samples of groups with no non-NaN score, ``metrics)``:
        ``adv/difficulty_weight_min`` and ``adv/difficulty_weight_max`` over the groups (absent
        when no group has a score).
    """
    inverse, num_groups = _group_index(group_ids)
    _check_batch("scores", scores, group_ids.shape[0])
    lo, hi = clip
    if not (gamma >= 0 and math.isfinite(gamma)):
        raise ValueError(f"difficulty_weights: gamma={gamma} must be finite and >= 0 (algo.difficulty_gamma)")
    if not (0 < lo <= hi < math.inf):
        raise ValueError(
            f"difficulty_weights: clip={clip} must be (lo, hi) with 0 < lo <= hi (algo.difficulty_clip)"
        )
    mean, _, count = _group_moments(scores.detach().to(torch.float64), inverse, num_groups)
    scored = count > 0  # [G]
    raw = (1.0 - mean).clamp(min=0.0) ** gamma
    raw = raw.clamp(lo, hi)
    weights = torch.full_like(raw, math.nan)
    if not bool(scored.any()):
        return weights[inverse], {}
    weights[scored] = raw[scored] / raw[scored].mean()
    metrics = {
        "adv/difficulty_weight_min": float(weights[scored].min()),
        "adv/difficulty_weight_max": float(weights[scored].max()),
    }
    return weights[inverse], metrics
