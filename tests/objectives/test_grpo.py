"""The GRPO clipped surrogate, its KL term, the trained-step selection and the objective's
advantages, computed by hand."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from psr.objectives.advantages import combine_rewards, group_advantages
from psr.objectives.grpo import GRPOObjective, clipped_surrogate, grpo_step_loss, select_train_steps
from psr.objectives.protocol import StepRewards

E = math.e


def _loss(delta: float, adv: float, eps: float = 0.2) -> float:
    old = torch.tensor([-3.0], dtype=torch.float64)
    loss, _ = clipped_surrogate(old + delta, old, torch.tensor([adv], dtype=torch.float64), eps)
    return loss.item()


def test_ratio_e_and_one_over_e_by_hand():
    # logp - logp_old = 1 -> r = e, outside [0.8, 1.2]
    #   A = +1: max(-e, -1.2) = -1.2 (the clip removes the incentive to push r further up)
    #   A = -1: max(e, 1.2) = e      (the pessimistic bound keeps the unclipped, larger loss)
    assert _loss(1.0, +1.0) == pytest.approx(-1.2, abs=1e-12)
    assert _loss(1.0, -1.0) == pytest.approx(E, abs=1e-12)
    # logp - logp_old = -1 -> r = 1/e
    #   A = +1: max(-1/e, -0.8) = -1/e;  A = -1: max(1/e, 0.8) = 0.8
    assert _loss(-1.0, +1.0) == pytest.approx(-1 / E, abs=1e-12)
    assert _loss(-1.0, -1.0) == pytest.approx(0.8, abs=1e-12)
    # a batch is the mean of its samples
    old = torch.zeros(2, dtype=torch.float64)
    loss, m = clipped_surrogate(old + 1.0, old, torch.tensor([1.0, -1.0], dtype=torch.float64), 0.2)
    assert loss.item() == pytest.approx((-1.2 + E) / 2, abs=1e-12)
    assert m["train/clipfrac"].item() == 1.0
    assert m["train/approx_kl"].item() == pytest.approx(0.5, abs=1e-12)  # 0.5 * 1^2


def test_ratio_one_gives_minus_mean_advantage():
    logp = torch.tensor([-1.3, 0.2, 5.0])
    adv = torch.tensor([0.5, -2.0, 3.5])
    loss, m = clipped_surrogate(logp, logp.clone(), adv, 1e-4)
    assert loss.item() == pytest.approx(-2.0 / 3.0, abs=1e-7)  # -mean(0.5, -2, 3.5)
    assert m["train/ratio_mean"].item() == 1.0
    assert m["train/ratio_std"].item() == 0.0
    assert m["train/clipfrac"].item() == 0.0
    assert m["train/approx_kl"].item() == 0.0


def test_gradient_directions():
    # inside the clip range (r = 1): dL/dlogp_i = -A_i r_i / B, so a positive advantage pushes logp up
    old = torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    logp = old.clone().requires_grad_(True)
    adv = torch.tensor([2.0, 0.5, -1.0, 0.0], dtype=torch.float64)
    clipped_surrogate(logp, old, adv, 0.2)[0].backward()
    torch.testing.assert_close(logp.grad, -adv / 4, rtol=0, atol=1e-15)
    assert logp.grad[0] < 0 and logp.grad[1] < 0
    # outside it (r = e): A = +1 is clipped (no gradient), A = -1 is not (dL/dlogp = e / B)
    logp = (old[:2] + 1.0).requires_grad_(True)
    clipped_surrogate(logp, old[:2], torch.tensor([1.0, -1.0], dtype=torch.float64), 0.2)[0].backward()
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, E / 2], dtype=torch.float64), rtol=0, atol=1e-12)


def test_ratio_metrics_and_clipfrac():
    deltas = torch.tensor([0.0, 0.1, -0.3, 0.5], dtype=torch.float64)
    # |r - 1| = 0, 0.105, 0.259, 0.649: two of four beyond eps = 0.2
    _, m = clipped_surrogate(
        deltas, torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), 0.2
    )
    r = torch.exp(deltas)
    assert m["train/clipfrac"].item() == 0.5
    assert m["train/approx_kl"].item() == pytest.approx(0.5 * (0.01 + 0.09 + 0.25) / 4, abs=1e-15)
    assert m["train/ratio_min"].item() == pytest.approx(math.exp(-0.3))
    assert m["train/ratio_max"].item() == pytest.approx(math.exp(0.5))
    assert m["train/ratio_mean"].item() == pytest.approx(r.mean().item())
    assert m["train/ratio_std"].item() == pytest.approx(r.numpy().std())  # population std (ddof 0)


def test_surrogate_upcasts_low_precision_inputs():
    # bf16 inputs would round a 1e-4 log-ratio; the math runs in fp32
    logp = torch.tensor([0.0, 0.0], dtype=torch.bfloat16)
    loss, _ = clipped_surrogate(logp, logp, torch.tensor([1.0, 1.0]), 1e-4)
    assert loss.dtype == torch.float32


def test_kl_term_against_torch_distributions():
    from psr.sampling.sde import kl_gaussian_means

    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64).requires_grad_(True)
    mean_ref = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    std = torch.tensor([0.3, 0.7, 1.5], dtype=torch.float64).view(3, 1, 1)
    kl = kl_gaussian_means(mean, mean_ref, std)  # [B]
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean.detach(), std.expand_as(mean)),
        torch.distributions.Normal(mean_ref, std.expand_as(mean)),
    ).mean(dim=(1, 2))
    torch.testing.assert_close(kl.detach(), ref, rtol=1e-12, atol=1e-12)
    # and the closed form (m1 - m2)^2 / (2 s^2), mean-reduced
    torch.testing.assert_close(kl.detach(), ((mean.detach() - mean_ref) ** 2 / (2 * std**2)).mean(dim=(1, 2)))

    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
    beta = 0.04
    loss, m = grpo_step_loss(logp, logp.clone(), adv, 1e-4, kl=kl, beta=beta)
    expected_policy = -adv.mean()  # on-policy: r = 1
    assert loss.item() == pytest.approx((expected_policy + beta * ref.mean()).item(), abs=1e-12)
    assert m["train/loss/policy"].item() == pytest.approx(expected_policy.item(), abs=1e-12)
    assert m["train/loss/kl"].item() == pytest.approx(beta * ref.mean().item(), abs=1e-12)
    assert m["train/kl"].item() == pytest.approx(ref.mean().item(), abs=1e-12)
    assert m["train/loss"].item() == pytest.approx(loss.item())
    # the KL pulls the policy's mean towards the reference: d(beta mean KL)/d mean = beta (m - m_ref) / (s^2 D B)
    loss.backward()
    expected_grad = beta * (mean.detach() - mean_ref) / (std**2 * 20 * 3)
    torch.testing.assert_close(mean.grad, expected_grad, rtol=1e-12, atol=1e-15)


def test_kl_weight_zero_and_missing_kl():
    logp = torch.zeros(2)
    loss, m = grpo_step_loss(logp, logp, torch.ones(2), 1e-4, kl=None, beta=0.0)
    assert loss.item() == -1.0 and m["train/loss/kl"].item() == 0.0
    kl = torch.tensor([5.0, 7.0])
    loss0, m0 = grpo_step_loss(logp, logp, torch.ones(2), 1e-4, kl=kl, beta=0.0)
    assert loss0.item() == -1.0 and m0["train/kl"].item() == 6.0  # logged, not added
    with pytest.raises(ValueError, match="beta > 0 needs"):
        grpo_step_loss(logp, logp, torch.ones(2), 1e-4, kl=None, beta=0.1)
    with pytest.raises(ValueError, match="algo.beta"):
        grpo_step_loss(logp, logp, torch.ones(2), 1e-4, kl=kl, beta=-1.0)
    with pytest.raises(ValueError, match="algo.clip_eps"):
        clipped_surrogate(logp, logp, torch.ones(2), 0.0)


def test_on_policy_recompute_gives_ratio_one():
    # the sampler's log-prob of its own sample, recomputed from prev_sample, is the same number
    from psr.sampling.sde import sde_step

    gen = torch.Generator().manual_seed(1)
    x, v = torch.randn(4, 6, 8, generator=gen), torch.randn(4, 6, 8, generator=gen)
    sampled = sde_step(x, v, 0.8, 0.6, method="flow_grpo", noise_level=0.7, generator=gen)
    again = sde_step(x, v, 0.8, 0.6, method="flow_grpo", noise_level=0.7, prev_sample=sampled.prev_sample)
    loss, m = clipped_surrogate(again.log_prob, sampled.log_prob, torch.tensor([1.0, -1.0, 0.5, 0.5]), 1e-4)
    assert m["train/ratio_min"].item() == 1.0 and m["train/ratio_max"].item() == 1.0
    assert loss.item() == pytest.approx(-0.25, abs=1e-7)


# ------------------------------------------------------------------------------- select_train_steps
def test_select_all_and_first_fraction_on_a_full_sde_rollout():
    mask = torch.ones(28, dtype=torch.bool)
    assert torch.equal(select_train_steps(mask, mode="all"), torch.arange(28))
    # Flow-GRPO: int(28 * 0.99) = 27 steps, the last one left out
    assert torch.equal(select_train_steps(mask, mode="first_fraction", fraction=0.99), torch.arange(27))
    assert torch.equal(select_train_steps(mask, mode="first_fraction", fraction=1.0), torch.arange(28))
    assert torch.equal(select_train_steps(mask, mode="first_fraction", fraction=0.5), torch.arange(14))
    # 0.29 * 100 = 28.999999999999996 in floats: still 29 steps
    assert (
        len(select_train_steps(torch.ones(100, dtype=torch.bool), mode="first_fraction", fraction=0.29)) == 29
    )


def test_select_within_an_sde_window():
    # ODE on steps 0-2 and 7-9, SDE on the window 3..6 (Flow-GRPO-Fast / MixGRPO)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[3:7] = True
    assert select_train_steps(mask, mode="all").tolist() == [3, 4, 5, 6]
    assert select_train_steps(mask, mode="first_fraction", fraction=0.5).tolist() == [3, 4]
    assert select_train_steps(mask, mode="first_fraction", fraction=0.1).tolist() == [3]  # at least one
    seen = set()
    for seed in range(50):
        steps = select_train_steps(
            mask, mode="random_subset", num=2, generator=torch.Generator().manual_seed(seed)
        )
        assert steps.dtype == torch.long and len(steps) == 2
        assert steps.tolist() == sorted(set(steps.tolist()))  # distinct, increasing
        assert set(steps.tolist()) <= {3, 4, 5, 6}
        seen.update(steps.tolist())
    assert seen == {3, 4, 5, 6}
    a = select_train_steps(mask, mode="random_subset", num=3, generator=torch.Generator().manual_seed(7))
    b = select_train_steps(mask, mode="random_subset", num=3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_select_rejects_bad_settings():
    mask = torch.zeros(6, dtype=torch.bool)
    with pytest.raises(ValueError, match="no stochastic step"):
        select_train_steps(mask, mode="all")
    mask[2:4] = True
    with pytest.raises(ValueError, match="algo.num_train_steps"):
        select_train_steps(mask, mode="random_subset", num=3)
    with pytest.raises(ValueError, match="algo.num_train_steps"):
        select_train_steps(mask, mode="random_subset")
    with pytest.raises(ValueError, match="algo.train_fraction"):
        select_train_steps(mask, mode="first_fraction", fraction=0.0)
    with pytest.raises(ValueError, match="algo.train_steps"):
        select_train_steps(mask, mode="window")
    with pytest.raises(ValueError, match="bool"):
        select_train_steps(torch.ones(6), mode="all")


# ------------------------------------------------------------------------------------ GRPOObjective
CONF_ALGO = Path(__file__).resolve().parents[2] / "conf" / "algo"


def _step_rewards() -> StepRewards:
    # the step's batch over two ranks: group 0 (3 samples, one without a reward) on the other rank,
    # group 1 (2 samples) on this one
    return StepRewards(
        scores=torch.tensor([1.0, 3.0, math.nan, 0.0, 4.0]),
        group_ids=torch.tensor([0, 0, 0, 1, 1]),
        is_local=torch.tensor([False, False, False, True, True]),
    )


def test_advantages_from_step_rewards_by_hand():
    rewards = _step_rewards()
    eps = 1e-4
    # global std over the 4 rewards that apply, [1, 3, 0, 4]: mean 2, population variance
    # (1 + 1 + 4 + 4) / 4 = 2.5; group means 2 and 2; the NaN sample gets 0 and enters no statistic
    s = math.sqrt(2.5) + eps
    objective = GRPOObjective(micro_batch_size=2, global_std=True, clip=5.0, eps=eps)
    adv, m = objective.advantages(rewards)
    expected = torch.tensor([-1 / s, 1 / s, 0.0, -2 / s, 2 / s])
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-6)
    assert m["adv/reward_std"] == pytest.approx(math.sqrt(2.5))
    # the same as group_advantages on the gathered batch without the NaN
    valid = torch.tensor([0, 1, 3, 4])
    direct, direct_m = group_advantages(
        rewards.scores[valid], rewards.group_ids[valid], global_std=True, eps=eps, clip=5.0
    )
    torch.testing.assert_close(adv[valid], direct, rtol=0, atol=0)
    assert m == direct_m
    # this rank's share, per trajectory
    (mine,) = rewards.split_local(adv, [SimpleNamespace(batch_size=2)])
    torch.testing.assert_close(mine, torch.tensor([-2 / s, 2 / s]), rtol=0, atol=1e-6)
    # per-group std: group 0 has std 1, group 1 std 2
    per_group, _ = GRPOObjective(micro_batch_size=2, global_std=False, eps=eps).advantages(rewards)
    expected = torch.tensor([-1 / (1 + eps), 1 / (1 + eps), 0.0, -2 / (2 + eps), 2 / (2 + eps)])
    torch.testing.assert_close(per_group, expected, rtol=0, atol=1e-6)


def test_advantages_with_per_reward_normalization_use_the_z_scored_combination():
    a = torch.tensor([1.0, 3.0, 2.0, 6.0])
    b = torch.tensor([10.0, 30.0, 5.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1])
    weights = {"a": 1.0, "b": 2.0}
    rewards = StepRewards(
        scores=torch.zeros(4),  # the reward's own combination: unused when normalizing
        group_ids=groups,
        is_local=torch.ones(4, dtype=torch.bool),
        components={"a": a, "b": b},
        weights=weights,
    )
    z = combine_rewards({"a": a, "b": b}, weights, groups, normalize_per_reward=True)
    adv, _ = GRPOObjective(micro_batch_size=4, normalize_per_reward=True).advantages(rewards)
    expected, _ = group_advantages(z, groups, global_std=True, eps=1e-4, clip=5.0)
    torch.testing.assert_close(adv, expected)
    # without it the reward's score is used as is (all equal here: no signal)
    flat, m = GRPOObjective(micro_batch_size=4).advantages(rewards)
    assert flat.abs().max() == 0 and m["adv/zero_var_frac"] == 1.0


def test_no_reward_applies_gives_zero_advantages_and_no_metrics():
    rewards = StepRewards(
        torch.full((3,), math.nan), torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.bool)
    )
    adv, m = GRPOObjective(micro_batch_size=2).advantages(rewards)
    assert adv.tolist() == [0.0, 0.0, 0.0] and m == {}


def _shaping_rewards() -> StepRewards:
    # group 0: 0.2, 0.4 (mean 0.3, range 0.2); group 1: 0.8, 0.8, 0.9 (mean 5/6, range 0.1); a NaN in group 0
    return StepRewards(
        scores=torch.tensor([0.2, 0.4, math.nan, 0.8, 0.8, 0.9], dtype=torch.float64),
        group_ids=torch.tensor([0, 0, 0, 1, 1, 1]),
        is_local=torch.ones(6, dtype=torch.bool),
    )


def test_shaping_defaults_leave_advantages_unchanged():
    rewards = _shaping_rewards()
    plain, m = GRPOObjective(micro_batch_size=2).advantages(rewards)
    explicit, m_explicit = GRPOObjective(
        micro_batch_size=2, min_group_range=0.0, difficulty_gamma=0.0, difficulty_clip=(0.5, 0.5)
    ).advantages(rewards)
    assert torch.equal(plain, explicit) and m == m_explicit
    valid = torch.tensor([0, 1, 3, 4, 5])
    direct, direct_m = group_advantages(rewards.scores[valid], rewards.group_ids[valid], global_std=True)
    assert torch.equal(plain[valid], direct) and m == direct_m


def test_difficulty_weights_multiply_the_advantages():
    rewards = _shaping_rewards()
    plain, _ = GRPOObjective(micro_batch_size=2, global_std=False).advantages(rewards)
    adv, m = GRPOObjective(micro_batch_size=2, global_std=False, difficulty_gamma=1.0).advantages(rewards)
    # (1 - 0.3, 1 - 5/6) = (0.7, 1/6), mean 13/30 -> weights 21/13 and 5/13
    weights = torch.tensor([21 / 13, 21 / 13, 0.0, 5 / 13, 5 / 13, 5 / 13], dtype=torch.float64)
    torch.testing.assert_close(adv, plain * weights, rtol=1e-12, atol=0)
    assert adv[2] == 0
    assert m["adv/difficulty_weight_min"] == pytest.approx(5 / 13)
    assert m["adv/difficulty_weight_max"] == pytest.approx(21 / 13)
    assert m["adv/max"] == pytest.approx(float(adv.max())) and m["adv/min"] == pytest.approx(float(adv.min()))


def test_narrow_groups_are_dropped_and_counted():
    rewards = _shaping_rewards()
    eps = 1e-4
    adv, m = GRPOObjective(micro_batch_size=2, global_std=True, eps=eps, min_group_range=0.15).advantages(
        rewards
    )
    # group 1 (range 0.1) is dropped; the global std is then group 0's alone, 0.1
    a = 0.1 / (0.1 + eps)
    torch.testing.assert_close(
        adv, torch.tensor([-a, a, 0, 0, 0, 0], dtype=torch.float64), rtol=1e-12, atol=0
    )
    assert m["adv/filtered_frac"] == 0.5 and m["adv/reward_std"] == pytest.approx(0.1)
    # with difficulty weights on the one group left, its weight is 1
    both, m_both = GRPOObjective(
        micro_batch_size=2, eps=eps, min_group_range=0.15, difficulty_gamma=2.0
    ).advantages(rewards)
    assert torch.equal(both, adv) and m_both["adv/difficulty_weight_max"] == 1.0
    # everything dropped: zero advantages, only the count
    none, m_none = GRPOObjective(micro_batch_size=2, min_group_range=1.0).advantages(rewards)
    assert none.abs().max() == 0 and m_none == {"adv/filtered_frac": 1.0}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("min_group_range", -0.1),
        ("difficulty_gamma", -1.0),
        ("difficulty_gamma", math.nan),
        ("difficulty_clip", (0.0, 1.0)),
        ("difficulty_clip", (0.5, 0.2)),
        ("difficulty_clip", (0.1,)),
        ("difficulty_clip", 0.1),
    ],
)
def test_shaping_settings_are_checked(key, value):
    with pytest.raises(ValueError, match=f"algo.{key}"):
        GRPOObjective(micro_batch_size=2, **{key: value})


def test_grpo_yaml_instantiates_the_objective():
    cfg = OmegaConf.load(CONF_ALGO / "grpo.yaml")
    objective = instantiate(cfg, micro_batch_size=3, inner_epochs=2)
    assert isinstance(objective, GRPOObjective)
    assert (objective.micro_batch_size, objective.inner_epochs) == (3, 2)
    keys = {k for k in cfg if k != "_target_"}
    # every constructor argument but the two train.* ones is a documented key, with its value
    assert keys == {f.name for f in fields(GRPOObjective)} - {"micro_batch_size", "inner_epochs"}
    for key in keys:
        assert getattr(objective, key) == cfg[key], key
    with pytest.raises(Exception, match="algo.kl_std"):  # hydra wraps the ValueError
        instantiate(cfg, micro_batch_size=3, inner_epochs=1, kl_std="other")
