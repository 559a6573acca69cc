"""Reward combination and group advantages against hand computations and a float64 loop reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from psr.objectives.advantages import (
    combine_rewards,
    difficulty_weights,
    group_advantages,
    narrow_groups,
    zero_variance_groups,
)

EPS = 1e-4

# Two groups, interleaved, with non-contiguous ids:
#   group 7: rewards 1, 3       -> mean 2, population std 1
#   group 3: rewards 2, 6, 2, 6 -> mean 4, population std 2
GROUPS = torch.tensor([7, 7, 3, 3, 3, 3])
REWARDS = torch.tensor([1.0, 3.0, 2.0, 6.0, 2.0, 6.0])


def test_two_groups_by_hand():
    adv, m = group_advantages(REWARDS, GROUPS, eps=EPS)
    a0 = 1 / (1 + EPS)  # |R - 2| / (1 + eps) in group 7
    a1 = 2 / (2 + EPS)  # |R - 4| / (2 + eps) in group 3
    expected = torch.tensor([-a0, a0, -a1, a1, -a1, a1])
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-7)
    assert adv.dtype == torch.float32
    assert m["adv/zero_var_frac"] == 0.0
    assert m["adv/clip_frac"] == 0.0
    assert m["adv/reward_std"] == pytest.approx(1.5)  # mean of the group stds 1 and 2


def test_global_std_by_hand():
    # all six rewards: mean 10/3, squared deviations sum 210/9, population variance 35/9
    std = math.sqrt(35) / 3
    adv, m = group_advantages(REWARDS, GROUPS, global_std=True, eps=EPS)
    d = std + EPS
    expected = torch.tensor([-1 / d, 1 / d, -2 / d, 2 / d, -2 / d, 2 / d])
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-7)
    assert m["adv/reward_std"] == pytest.approx(std)


def test_global_rewards_of_all_ranks_set_the_std():
    # this rank holds group 7 only; the other rank's rewards enter the std, not the group mean
    adv, _ = group_advantages(REWARDS[:2], GROUPS[:2], global_std=True, eps=EPS, global_rewards=REWARDS)
    d = math.sqrt(35) / 3 + EPS
    torch.testing.assert_close(adv, torch.tensor([-1 / d, 1 / d]), rtol=0, atol=1e-7)


def test_clipping_an_outlier():
    # one success among 36: std = sqrt(35)/36, so the outlier's advantage is ~sqrt(35) = 5.92 > 5
    r = torch.zeros(36)
    r[4] = 1.0
    adv, m = group_advantages(r, torch.zeros(36, dtype=torch.long), eps=EPS, clip=5.0)
    assert adv[4].item() == 5.0
    others = -(1 / 36) / (math.sqrt(35) / 36 + EPS)  # -0.16893...: inside the clip range, unchanged
    torch.testing.assert_close(adv[torch.arange(36) != 4], torch.full((35,), others), rtol=0, atol=1e-7)
    assert m["adv/clip_frac"] == pytest.approx(1 / 36)
    assert m["adv/max"] == 5.0
    unclipped, _ = group_advantages(r, torch.zeros(36, dtype=torch.long), eps=EPS, clip=math.inf)
    assert unclipped[4].item() == pytest.approx((35 / 36) / (math.sqrt(35) / 36 + EPS), rel=1e-6)


@pytest.mark.parametrize("global_std", [False, True])
def test_zero_variance_group_is_counted_and_zeroed(global_std):
    # groups 0 and 2 vary, group 1 is constant (a third of the groups)
    r = torch.tensor([0.0, 1.0, 4.0, 4.0, 4.0, 2.0, 5.0])
    g = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    adv, m = group_advantages(r, g, global_std=global_std, eps=EPS)
    assert m["adv/zero_var_frac"] == pytest.approx(1 / 3)
    assert torch.equal(adv[2:5], torch.zeros(3))
    assert (adv[[0, 1, 5, 6]] != 0).all()
    assert torch.equal(
        zero_variance_groups(r, g), torch.tensor([False, False, True, True, True, False, False])
    )


def test_zero_variance_group_with_rounding_noise_is_zero_not_amplified():
    # float32 noise of 1e-7 in a constant group would become ~1e-3 advantages with std + eps = 1e-4
    r = torch.tensor([0.3, 0.3 + 1e-7, 0.3, 1.0, 2.0])
    g = torch.tensor([0, 0, 0, 1, 1])
    adv, m = group_advantages(r, g, eps=EPS)
    assert torch.equal(adv[:3], torch.zeros(3))
    assert m["adv/zero_var_frac"] == 0.5


def test_matches_a_loop_reference_on_random_groups():
    # independent reference: Flow-GRPO's PerPromptStatTracker formula (numpy, ddof 0, + 1e-4), looped
    rng = np.random.default_rng(0)
    g = rng.integers(0, 5, size=40)
    r = rng.normal(size=40) * rng.uniform(0.1, 3, size=40)
    for global_std in (False, True):
        ref = np.zeros(40)
        for gid in np.unique(g):
            sel = g == gid
            std = np.std(r) if global_std else np.std(r[sel])
            ref[sel] = (r[sel] - np.mean(r[sel])) / (std + EPS)
        ref = np.clip(ref, -5, 5)
        adv, _ = group_advantages(torch.from_numpy(r), torch.from_numpy(g), global_std=global_std, eps=EPS)
        assert adv.dtype == torch.float64
        np.testing.assert_allclose(adv.numpy(), ref, rtol=1e-12, atol=1e-12)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="not finite"):
        group_advantages(torch.tensor([1.0, math.nan]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="expected B=3"):
        group_advantages(torch.tensor([1.0, 2.0]), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="integer"):
        group_advantages(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
    with pytest.raises(ValueError, match="algo.clip"):
        group_advantages(torch.tensor([1.0, 2.0]), torch.tensor([0, 0]), clip=0.0)


# ---------------------------------------------------------------------------------- combine_rewards
def test_weighted_sum_without_normalization():
    a = torch.tensor([1.0, 3.0, 2.0, 6.0, 2.0, 6.0])
    b = torch.tensor([10.0, 10.0, 0.0, 1.0, 1.0, 0.0])
    r = combine_rewards({"a": a, "b": b}, {"a": 1.0, "b": 2.0}, GROUPS)
    torch.testing.assert_close(r, torch.tensor([21.0, 23.0, 2.0, 8.0, 4.0, 6.0]), rtol=0, atol=0)


def test_per_reward_normalization_by_hand():
    a = torch.tensor([1.0, 3.0, 2.0, 6.0, 2.0, 6.0])  # z: group 7 +-1/(1+eps), group 3 +-2/(2+eps)
    b = torch.tensor([10.0, 10.0, 0.0, 1.0, 1.0, 0.0])  # z: group 7 constant -> 0, group 3 +-0.5/(0.5+eps)
    r = combine_rewards({"a": a, "b": b}, {"a": 1.0, "b": 2.0}, GROUPS, normalize_per_reward=True, eps=EPS)
    za0, za1, zb1 = 1 / (1 + EPS), 2 / (2 + EPS), 0.5 / (0.5 + EPS)
    expected = torch.tensor([-za0, za0, -za1 - 2 * zb1, za1 + 2 * zb1, -za1 + 2 * zb1, za1 - 2 * zb1])
    torch.testing.assert_close(r, expected, rtol=0, atol=1e-6)
    # scale invariance: multiplying a component by 1000 does not change the normalized result
    r_scaled = combine_rewards(
        {"a": 1000 * a, "b": b}, {"a": 1.0, "b": 2.0}, GROUPS, normalize_per_reward=True, eps=0.0
    )
    r_plain = combine_rewards(
        {"a": a, "b": b}, {"a": 1.0, "b": 2.0}, GROUPS, normalize_per_reward=True, eps=0.0
    )
    torch.testing.assert_close(r_scaled, r_plain, rtol=1e-6, atol=1e-6)


def test_nan_components_renormalize_the_remaining_weights():
    # weights a = 1, b = 3 (total 4); NaN = the reward does not apply to the sample
    a = torch.tensor([1.0, 2.0, math.nan, math.nan])
    b = torch.tensor([3.0, math.nan, math.nan, 5.0])
    r = combine_rewards({"a": a, "b": b}, {"a": 1.0, "b": 3.0}, torch.zeros(4, dtype=torch.long))
    assert r[0].item() == 1 * 1 + 3 * 3  # both apply: the plain weighted sum, 10
    assert r[1].item() == 1 * 2 * 4 / 1  # only a applies: 8
    assert math.isnan(r[2].item())  # nothing applies
    assert r[3].item() == 3 * 5 * 4 / 3  # only b applies: 20


def test_nan_components_with_per_reward_normalization():
    # group stats ignore the NaN entry: a's group values 1, 3 -> z = -+1/(1+eps); the NaN sample keeps b alone
    a = torch.tensor([1.0, 3.0, math.nan])
    b = torch.tensor([0.0, 0.0, 4.0])  # z over [0, 0, 4]: mean 4/3, std sqrt(32)/3
    r = combine_rewards(
        {"a": a, "b": b},
        {"a": 1.0, "b": 1.0},
        torch.zeros(3, dtype=torch.long),
        normalize_per_reward=True,
        eps=EPS,
    )
    sb = math.sqrt(32) / 3 + EPS
    za = 1 / (1 + EPS)
    expected = torch.tensor([-za - (4 / 3) / sb, za - (4 / 3) / sb, 2 * (8 / 3) / sb])
    torch.testing.assert_close(r, expected, rtol=0, atol=1e-6)


def test_combine_rewards_rejects_mismatched_weights():
    comps = {"psr": torch.ones(2), "hps": torch.ones(2)}
    with pytest.raises(ValueError, match=r"missing weights for \['hps'\]"):
        combine_rewards(comps, {"psr": 1.0}, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"without a component: \['clip'\]"):
        combine_rewards(comps, {"psr": 1.0, "hps": 1.0, "clip": 1.0}, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=">= 0"):
        combine_rewards(comps, {"psr": 1.0, "hps": -1.0}, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="infinite"):
        combine_rewards(
            {"psr": torch.tensor([1.0, math.inf])}, {"psr": 1.0}, torch.zeros(2, dtype=torch.long)
        )


def test_one_combination_by_hand():
    """rewards.base.weighted_score is the one NaN-aware combination: the reward's score and
    combine_rewards without normalization are it."""
    from rewards.base import WeightedReward, weighted_score

    # weights 0.5 / 0.3 / 0.2 (total 1)
    #   sample 0, all apply:      0.5 * 1 + 0.3 * 2 + 0.2 * 3 = 1.7
    #   sample 1, a is NaN:       (0.3 * 4 + 0.2 * 5) * 1 / 0.5 = 4.4
    #   sample 2, only c applies: 0.2 * 10 * 1 / 0.2 = 10
    #   sample 3, none applies:   NaN
    nan = math.nan
    comps = {
        "a": torch.tensor([1.0, nan, nan, nan]),
        "b": torch.tensor([2.0, 4.0, nan, nan]),
        "c": torch.tensor([3.0, 5.0, 10.0, nan]),
    }
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    r = weighted_score(comps, weights)
    assert r.dtype == torch.float32
    torch.testing.assert_close(r[:3], torch.tensor([1.7, 4.4, 10.0]), rtol=0, atol=1e-6)
    assert math.isnan(r[3].item())
    torch.testing.assert_close(
        combine_rewards(comps, weights, torch.zeros(4, dtype=torch.long)), r, equal_nan=True
    )

    class Fixed:
        def __init__(self, values):
            self.values = values

        def __call__(self, images, inputs):
            return {"score": self.values}

    from rewards.base import RewardInputs

    reward = WeightedReward({k: Fixed(v) for k, v in comps.items()}, weights)
    out = reward(torch.rand(4, 3, 2, 2), RewardInputs.from_prompts(["p"] * 4))
    torch.testing.assert_close(out["score"], r, equal_nan=True)
    assert weighted_score({"a": comps["a"].double()}, {"a": 1.0}).dtype == torch.float64


# ------------------------------------------------------------------------------------ shaping
# group 5: scores 0.2, 0.4 (and one NaN)  -> mean 0.3,  1 - mean = 0.7,  range 0.2
# group 2: scores 0.8, 0.8, 0.9           -> mean 5/6,  1 - mean = 1/6,  range 0.1
SHAPE_GROUPS = torch.tensor([5, 2, 5, 2, 2, 5])
SHAPE_SCORES = torch.tensor([0.2, 0.8, 0.4, 0.8, 0.9, math.nan], dtype=torch.float64)


def test_difficulty_weights_by_hand():
    # gamma 1: u = (0.7, 1/6), mean 13/30 -> w = (21/13, 5/13), mean 1 over the two groups
    w, m = difficulty_weights(SHAPE_SCORES, SHAPE_GROUPS, gamma=1.0, clip=(0.1, 1.0))
    a, b = 21 / 13, 5 / 13
    torch.testing.assert_close(w, torch.tensor([a, b, a, b, b, a], dtype=torch.float64), rtol=1e-12, atol=0)
    assert m == {"adv/difficulty_weight_min": pytest.approx(b), "adv/difficulty_weight_max": pytest.approx(a)}
    # gamma 2: u = (0.49, 1/36) and 1/36 is raised to the floor 0.1 -> w = (0.49, 0.1) / 0.295
    w2, _ = difficulty_weights(SHAPE_SCORES, SHAPE_GROUPS, gamma=2.0, clip=(0.1, 1.0))
    a2, b2 = 98 / 59, 20 / 59
    torch.testing.assert_close(
        w2, torch.tensor([a2, b2, a2, b2, b2, a2], dtype=torch.float64), rtol=1e-12, atol=0
    )
    # gamma 0: every group weighs exactly 1
    ones, _ = difficulty_weights(SHAPE_SCORES, SHAPE_GROUPS, gamma=0.0)
    assert ones.tolist() == [1.0] * 6


def test_difficulty_weights_edge_groups():
    # a group with no score gets NaN and is out of the mean; a score above 1 has base 0 -> the floor
    scores = torch.tensor([0.5, 0.5, math.nan, math.nan, 1.2, 1.4], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    w, m = difficulty_weights(scores, groups, gamma=1.0, clip=(0.25, 1.0))
    # u = (0.5, -, 0.25), mean 0.375 -> (4/3, -, 2/3)
    assert w[[0, 1, 4, 5]].tolist() == pytest.approx([4 / 3, 4 / 3, 2 / 3, 2 / 3], rel=1e-12)
    assert torch.isnan(w[2:4]).all()
    assert m["adv/difficulty_weight_max"] == pytest.approx(4 / 3)
    none, m_none = difficulty_weights(torch.full((2,), math.nan), torch.tensor([0, 0]), gamma=1.0)
    assert torch.isnan(none).all() and m_none == {}
    with pytest.raises(ValueError, match="algo.difficulty_gamma"):
        difficulty_weights(scores, groups, gamma=-1.0)
    with pytest.raises(ValueError, match="algo.difficulty_clip"):
        difficulty_weights(scores, groups, gamma=1.0, clip=(0.0, 1.0))


def test_narrow_groups_by_hand():
    # ranges 0.2 (group 5, NaN ignored) and 0.1 (group 2)
    assert narrow_groups(SHAPE_SCORES, SHAPE_GROUPS, min_range=0.15).tolist() == [
        False, True, False, True, True, False
    ]  # fmt: skip
    assert not narrow_groups(SHAPE_SCORES, SHAPE_GROUPS, min_range=0.0).any()  # 0: off
    assert narrow_groups(SHAPE_SCORES, SHAPE_GROUPS, min_range=0.25).all()
    # a group with a single score has range 0
    lone = narrow_groups(torch.tensor([0.3, math.nan, 0.1, 0.9]), torch.tensor([0, 0, 1, 1]), min_range=1e-3)
    assert lone.tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="algo.min_group_range"):
        narrow_groups(SHAPE_SCORES, SHAPE_GROUPS, min_range=-1.0)
