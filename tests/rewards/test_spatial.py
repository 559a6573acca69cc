"""Spatial relations: parsing, the box rule on hand-placed boxes, and the reward with an oracle detector."""

from __future__ import annotations

import math

import pytest
import torch

from rewards.base import RewardInputs, Subject
from rewards.detectors import BoxesDetector
from rewards.spatial import SpatialReward, StatedRelation, parse_relation, relation_holds

DOG, CAT, CORGI = Subject("dog", "dog"), Subject("cat", "cat"), Subject("corgi", "dog")


@pytest.mark.parametrize(
    ("prompt", "subjects", "expected"),
    [
        ("A dog to the left of a cat", [DOG, CAT], StatedRelation("left of", 0, 1)),
        ("the cat sits on the right side of the dog", [DOG, CAT], StatedRelation("right of", 1, 0)),
        (
            "a corgi under a table next to a cat",
            [CORGI, CAT],
            StatedRelation("next to", 0, 1),
        ),  # "under a table" skipped
        ("cats above dogs", [DOG, CAT], StatedRelation("above", 1, 0)),
        ("a dog beside the cat", [DOG, CAT], StatedRelation("next to", 0, 1)),
        ("a corgi on top of a cat", [CORGI, CAT], StatedRelation("above", 0, 1)),
    ],
)
def test_parse_relation(prompt, subjects, expected):
    phrase, rel = parse_relation(prompt, subjects)
    assert phrase == expected.relation and rel == expected


def test_parse_relation_without_phrase_or_subjects():
    assert parse_relation("a dog and a cat in a park", [DOG, CAT]) == (None, None)
    assert parse_relation("a dog left of the fence", [DOG, CAT]) == ("left of", None)
    assert parse_relation("a dog left of the big old wooden fence and a cat", [DOG, CAT]) == ("left of", None)
    assert parse_relation("a dog next to another dog", [DOG]) == ("next to", None)  # one subject


@pytest.mark.parametrize(
    ("relation", "a", "b", "holds"),
    [
        ("left of", [0, 40, 20, 60], [60, 40, 80, 60], True),
        ("right of", [0, 40, 20, 60], [60, 40, 80, 60], False),
        ("right of", [60, 40, 80, 60], [0, 40, 20, 60], True),
        ("above", [40, 0, 60, 20], [40, 60, 60, 80], True),
        ("below", [40, 60, 60, 80], [40, 0, 60, 20], True),
        # centres 3 px apart horizontally, boxes 20 wide: the margin (0.1 x 40 = 4 px) swallows it
        ("left of", [37, 0, 57, 20], [40, 40, 60, 60], False),
        ("above", [37, 0, 57, 20], [40, 40, 60, 60], True),
        # mostly diagonal: offset (30, 25) -> u_x = (30 - 4) / 39.05 = 0.67 > 0.5 -> right of, and below (0.54)
        ("right of", [30, 25, 50, 45], [0, 0, 20, 20], True),
        ("below", [30, 25, 50, 45], [0, 0, 20, 20], True),
        # heavy overlap (IoU 0.68): no relation at all
        ("left of", [0, 0, 20, 20], [2, 0, 22, 20], False),
        ("next to", [0, 0, 20, 20], [25, 0, 45, 20], True),  # gap 5 <= 0.5 x 20
        ("next to", [0, 0, 20, 20], [40, 0, 60, 20], False),  # gap 20 > 10
    ],
)
def test_relation_rule(relation, a, b, holds):
    assert relation_holds(relation, a, b) is holds


def test_spatial_reward_with_oracle_boxes():
    boxes = [
        {"dog": [[0, 40, 20, 60]], "cat": [[60, 40, 80, 60]]},  # dog left of cat: 1
        {"dog": [[60, 40, 80, 60]], "cat": [[0, 40, 20, 60]]},  # swapped: 0
        {"dog": [[0, 0, 10, 10]]},  # no cat detected: 0, detected = 0
        {"dog": [[50, 10, 70, 30], [0, 10, 20, 30]]},  # two dogs side by side: either ordering
    ]  # the 4th prompt states no relation: its image is not sent to the detector, its score is NaN
    reward = SpatialReward(BoxesDetector(boxes))
    prompts = ["a dog left of a cat"] * 3 + ["a dog and a cat", "a corgi to the left of a dog"]
    subjects = [[DOG, CAT]] * 4 + [[CORGI, DOG]]
    out = reward(torch.rand(5, 3, 80, 80), RewardInputs(prompts, [[]] * 5, subjects))
    assert (
        out["score"][:3].tolist() == [1.0, 0.0, 0.0]
        and math.isnan(out["score"][3])
        and out["score"][4] == 1.0
    )
    assert out["stated"].tolist() == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert out["detected"][:3].tolist() == [1.0, 1.0, 0.0] and math.isnan(out["detected"][3])


def test_spatial_reward_runs_on_the_tiny_detector():
    from rewards.testing import tiny_spatial

    out = tiny_spatial(0)(
        torch.rand(2, 3, 64, 64), RewardInputs(["a dog above a cat", "a cat"], [[], []], [[DOG, CAT], [CAT]])
    )
    assert (
        out["stated"].tolist() == [1.0, 0.0] and out["score"][0] in (0.0, 1.0) and math.isnan(out["score"][1])
    )
