"""RewardInputs and WeightedReward (sums checked against a hand computation)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from rewards.base import RewardInputs, Subject, WeightedReward, weighted_score


class Constant:
    """A reward returning fixed per-sample values (NaN allowed) and an extra key."""

    def __init__(self, values: list[float]) -> None:
        self.values = torch.tensor(values)

    def __call__(self, images, inputs):
        return {"score": self.values.clone(), "extra": self.values * 2}


def _inputs(b: int) -> RewardInputs:
    return RewardInputs.from_prompts([f"p{i}" for i in range(b)])


def test_weighted_reward_sums_as_configured():
    reward = WeightedReward(
        {"a": Constant([1.0, 2.0, 3.0]), "b": Constant([10.0, 20.0, 30.0])}, {"a": 0.4, "b": 0.6}
    )
    out = reward(torch.rand(3, 3, 4, 4), _inputs(3))
    expected = [0.4 * 1 + 0.6 * 10, 0.4 * 2 + 0.6 * 20, 0.4 * 3 + 0.6 * 30]
    assert out["score"].tolist() == pytest.approx(expected)
    assert set(out) == {"score", "a/score", "a/extra", "b/score", "b/extra"}
    assert out["b/extra"].tolist() == [20.0, 40.0, 60.0]


def test_nan_component_is_dropped_and_weights_renormalized():
    nan = float("nan")
    reward = WeightedReward(
        {"a": Constant([1.0, nan, nan]), "b": Constant([2.0, 4.0, nan]), "c": Constant([3.0, 5.0, nan])},
        {"a": 0.5, "b": 0.3, "c": 0.2},
    )
    score = reward(torch.rand(3, 3, 2, 2), _inputs(3))["score"].tolist()
    assert score[0] == pytest.approx(0.5 * 1 + 0.3 * 2 + 0.2 * 3)
    # a does not apply: b and c keep the total weight 1.0 -> (0.3 * 4 + 0.2 * 5) / 0.5
    assert score[1] == pytest.approx((0.3 * 4 + 0.2 * 5) / 0.5)
    assert math.isnan(score[2])


def test_zero_weight_component_is_reported_but_not_scored():
    reward = WeightedReward({"a": Constant([1.0]), "b": Constant([100.0])}, {"a": 1.0, "b": 0.0})
    out = reward(torch.rand(1, 3, 2, 2), _inputs(1))
    assert out["score"].item() == pytest.approx(1.0)
    assert out["b/score"].item() == 100.0
    nan_a = weighted_score(
        {"a": torch.tensor([float("nan")]), "b": torch.tensor([5.0])}, {"a": 1.0, "b": 0.0}
    )
    assert math.isnan(nan_a.item())  # only a zero-weight component applies


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ({"a": 1.0}, "missing weights"),
        ({"a": 1.0, "b": 1.0, "c": 1.0}, "without a reward"),
        ({"a": -1.0, "b": 1.0}, "reward.weights.a"),
        ({"a": 0.0, "b": 0.0}, "sum to 0"),
    ],
)
def test_weighted_reward_rejects_bad_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        WeightedReward({"a": Constant([1.0]), "b": Constant([1.0])}, weights)


def test_weighted_reward_checks_component_shapes():
    reward = WeightedReward({"a": Constant([1.0, 2.0])}, {"a": 1.0})
    with pytest.raises(ValueError, match=r"reward 'a' returned 'score' of shape \(2,\); expected \[3\]"):
        reward(torch.rand(3, 3, 2, 2), _inputs(3))


def test_weighted_reward_from_hydra_config():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "_target_": "rewards.base.WeightedReward",
            "rewards": {
                "color": {"_target_": "rewards.color.ColorReward"},
                "std": {"_target_": "rewards.color.ColorReward", "use_std": True},
            },
            "weights": {"color": 0.25, "std": 0.75},
        }
    )
    reward = instantiate(cfg)
    ref = torch.full((3, 4, 4), 0.5)
    images = torch.rand(2, 3, 8, 8)
    out = reward(images, RewardInputs(["a", "b"], [[ref], [ref]], [[Subject("x", "x")]] * 2))
    assert torch.allclose(out["score"], 0.25 * out["color/score"] + 0.75 * out["std/score"])


@dataclass
class _Record:  # the shape of psr's PromptRecord
    prompt: str
    references: list
    names: list
    categories: list


def test_reward_inputs_from_records_and_select():
    ref = torch.rand(3, 5, 6)
    records = [
        _Record("a corgi", [ref], ["corgi"], ["dog"]),
        {"instruction": "a mug", "references": [ref], "subjects": [{"name": "mug", "category": "cup"}]},
        {"prompt": "text only"},
    ]
    inputs = RewardInputs.from_records(records)
    assert inputs.prompts == ["a corgi", "a mug", "text only"]
    assert inputs.subjects[0] == [Subject("corgi", "dog")] and inputs.subjects[1] == [Subject("mug", "cup")]
    assert inputs.num_subjects == [1, 1, 0]
    sel = inputs.select([2, 0])
    assert sel.prompts == ["text only", "a corgi"] and sel.references[1][0] is ref


def test_reward_inputs_validation():
    with pytest.raises(ValueError, match="one entry per sample"):
        RewardInputs(["a", "b"], [[]], [[], []])
    with pytest.raises(ValueError, match="2 references but 1 subjects"):
        RewardInputs(["a"], [[torch.rand(3, 2, 2)] * 2], [[Subject("x", "x")]])
    with pytest.raises(ValueError, match=r"\[3, h, w\]"):
        RewardInputs(["a"], [[torch.rand(2, 2)]], [[Subject("x", "x")]])
    with pytest.raises(ValueError, match="record 0 has no 'prompt'"):
        RewardInputs.from_records([{"text": "a"}])
