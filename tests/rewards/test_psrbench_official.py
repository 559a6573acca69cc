"""PSRBench's released rules (rewards/psrbench_official.py) against hand-made expectations.

A scripted detector returns fixed boxes, in a fixed order, for each (image, category); a tiny
embedder turns a crop into a few statistics. The expected crops are written out as numpy slices
here, the expected features and cosines computed with numpy, independently of the module.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rewards.base import RewardInputs, Subject
from rewards.detectors import Detections
from rewards.psrbench_official import (
    OfficialPosition,
    OfficialSubjectConsistency,
    box_indices,
    crop_official,
    find_relation,
    position_score,
)

H, W = 16, 20


def tagged(tag: int, seed: int) -> np.ndarray:
    """A random ``[H, W, 3]`` uint8 image whose top-left red value is ``tag`` (how the fake detector
    knows which image it is given)."""
    arr = np.random.default_rng(seed).integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    arr[0, 0, 0] = tag
    return arr


def as_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0


class ScriptedDetector:
    """``script[(tag, category)]`` = boxes (xyxy pixels) and scores, returned in that order."""

    def __init__(self, script: dict[tuple[int, str], list[tuple[list[float], float]]]) -> None:
        self.script = script
        self.calls: list[tuple[int, list[str]]] = []

    def detect(self, images, queries):
        out = []
        for im, qs in zip(images, queries, strict=True):
            tag = int(round(float(im[0, 0, 0]) * 255))
            self.calls.append((tag, list(qs)))
            assert len(qs) == 1, "one category per call, as released"
            given = self.script.get((tag, qs[0]), [])
            out.append(Detections.from_boxes([b for b, _ in given], [0] * len(given), [s for _, s in given]))
        return out


def features(arr: np.ndarray) -> np.ndarray:
    """Per-channel mean and std, height and width of an ``[h, w, 3]`` uint8 crop (float64)."""
    x = arr.astype(np.float64) / 255.0
    return np.concatenate([x.mean((0, 1)), x.std((0, 1)), [arr.shape[0] / 10, arr.shape[1] / 10]])


class StatsEmbedder:
    """The same statistics in torch, L2-normalised (the embedder contract)."""

    def embed(self, images):
        rows = []
        for im in images:
            x = im.double()
            rows.append(
                torch.cat(
                    [
                        x.mean((1, 2)),
                        x.std((1, 2), unbiased=False),
                        torch.tensor([im.shape[1] / 10, im.shape[2] / 10]),
                    ]
                )
            )
        return torch.nn.functional.normalize(torch.stack(rows).float(), dim=-1)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    fa, fb = features(a), features(b)
    return float(fa @ fb / np.linalg.norm(fa) / np.linalg.norm(fb))


@pytest.fixture(scope="module")
def case():
    """Five samples: distinct categories (a box past the left edge, a float box, a reference with no
    box), two dogs (boxes 0 and 1), three subjects with two dogs (both box 0; an empty crop), two
    dogs with a single dog box, and a sample without subjects."""
    gen = {t: tagged(t, t) for t in (1, 2, 3, 4, 5)}
    ref = {t: tagged(t, 100 + t) for t in (11, 12, 21, 22, 31, 32, 33, 41, 42)}
    script = {
        # listed first although scored lower: the released script takes box 0 as output, unsorted
        (1, "dog"): [([2.6, 3.2, 9.9, 12.7], 0.40), ([0, 0, 20, 16], 0.90)],
        (1, "cat"): [([-4.5, 1.0, 20.0, 9.0], 0.80)],  # int(-4.5) = -4: columns 16..20
        (11, "dog"): [([1.99, 2.01, 14.5, 15.9], 0.7)],
        (12, "cat"): [],  # not found: the whole reference
        (2, "dog"): [([0, 0, 8, 8], 0.5), ([10, 4, 20, 16], 0.9)],
        (21, "dog"): [([3, 3, 9, 9], 0.5)],
        (22, "dog"): [([5, 2, 17, 13], 0.5), ([0, 0, 4, 4], 0.9)],
        (3, "dog"): [([4, 4, 12, 12], 0.6), ([12, 0, 20, 8], 0.9)],
        (3, "cat"): [([10.0, 2.0, 5.0, 9.0], 0.9)],  # x2 < x1: an empty slice, the whole image
        (31, "dog"): [([0, 0, 10, 10], 0.5)],
        (32, "dog"): [([6, 6, 16, 16], 0.5)],
        (33, "cat"): [([2, 2, 18, 14], 0.5)],
        (4, "dog"): [([1, 1, 9, 9], 0.5)],  # one dog box for two dogs: subject 2 falls back
        (41, "dog"): [([0, 0, 5, 5], 0.5)],
        (42, "dog"): [([2, 2, 12, 12], 0.5)],
    }
    inputs = RewardInputs(
        prompts=["p1", "p2", "p3", "p4", "p5"],
        references=[
            [as_tensor(ref[11]), as_tensor(ref[12])],
            [as_tensor(ref[21]), as_tensor(ref[22])],
            [as_tensor(ref[31]), as_tensor(ref[32]), as_tensor(ref[33])],
            [as_tensor(ref[41]), as_tensor(ref[42])],
            [],
        ],
        subjects=[
            [Subject("dog", "dog"), Subject("cat", "cat")],
            [Subject("dog", "dog"), Subject("dog", "dog")],
            [Subject("dog", "dog"), Subject("dog", "dog"), Subject("cat", "cat")],
            [Subject("dog", "dog"), Subject("dog", "dog")],
            [],
        ],
    )
    images = torch.stack([as_tensor(gen[t]) for t in (1, 2, 3, 4, 5)])
    detector = ScriptedDetector(script)
    out = OfficialSubjectConsistency(detector, StatsEmbedder())(images, inputs)
    return gen, ref, out, detector


def test_official_scores_match_hand_written_crops(case):
    gen, ref, out, _ = case
    pairs = {  # (sample, subject): (generated crop, reference crop), written by hand
        (0, 0): (gen[1][3:12, 2:9], ref[11][2:15, 1:14]),
        (0, 1): (gen[1][1:9, 16:20], ref[12]),  # -4 wraps to column 16; no reference box: whole
        (1, 0): (gen[2][0:8, 0:8], ref[21][3:9, 3:9]),  # same category, 2 subjects: box 0 ...
        (1, 1): (gen[2][4:16, 10:20], ref[22][2:13, 5:17]),  # ... and box 1; the reference box 0
        (2, 0): (gen[3][4:12, 4:12], ref[31][0:10, 0:10]),  # 3 subjects: box 0 for both dogs
        (2, 1): (gen[3][4:12, 4:12], ref[32][6:16, 6:16]),
        (2, 2): (gen[3], ref[33][2:14, 2:18]),  # empty slice: the whole generated image
        (3, 0): (gen[4][1:9, 1:9], ref[41][0:5, 0:5]),
        (3, 1): (gen[4], ref[42][2:12, 2:12]),  # box 1 does not exist: the whole image
    }
    expected_subject = {k: cosine(a, b) for k, (a, b) in pairs.items()}
    for (b, k), value in expected_subject.items():
        assert float(out[f"subject_{k + 1}"][b]) == pytest.approx(value, abs=1e-5), (b, k)
    for b, n in ((0, 2), (1, 2), (2, 3), (3, 2)):
        mean = sum(expected_subject[(b, k)] for k in range(n)) / n
        assert float(out["score"][b]) == pytest.approx(mean, abs=1e-5)
    assert math.isnan(float(out["score"][4])) and float(out["excluded"][4]) == 1.0
    assert out["excluded"][:4].tolist() == [0.0] * 4
    # fallbacks: generated (sample 2 subject 3, sample 3 subject 2), references (sample 0 subject 2)
    assert out["fallback_3"][2] == 1 and out["fallback_2"][3] == 1 and out["ref_fallback_2"][0] == 1
    assert out["fallbacks"].tolist()[:4] == [1.0, 0.0, 1.0, 1.0]
    assert out["fallback_1"][:4].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_one_detector_call_per_image_and_category(case):
    *_, detector = case
    calls = [(tag, q[0]) for tag, q in detector.calls]
    assert len(calls) == len(set(calls))  # the two dogs of an image share one call
    assert (3, "dog") in calls and (3, "cat") in calls and (12, "cat") in calls


def test_box_indices_follow_the_released_scripts():
    assert box_indices(["dog", "cat"]) == [0, 0]
    assert box_indices(["dog", "dog"]) == [0, 1]
    assert box_indices(["dog", "Dog"]) == [0, 0]  # exact string equality
    assert box_indices(["dog", "dog", "dog"]) == [0, 0, 0]
    assert box_indices(["dog", "dog", "cat", "cat"]) == [0, 0, 0, 0]


def test_crop_truncates_and_slices_like_numpy():
    arr = np.arange(5 * 6 * 1).reshape(5, 6, 1)
    np.testing.assert_array_equal(crop_official(arr, [1.9, 0.5, 4.99, 2.2]), arr[0:2, 1:4])
    np.testing.assert_array_equal(crop_official(arr, [-2.7, -3.1, 6, 5]), arr[-3:5, -2:6])
    assert crop_official(arr, [4, 0, 2, 3]) is None  # x2 < x1
    assert crop_official(arr, [-1.0, 0, 3, 3]) is None  # -1 -> columns 5..3: empty
    assert crop_official(arr, [-0.9, 0, 3, 3]).shape == (3, 3, 1)  # int(-0.9) = 0


# ---------------------------------------------------------------------------------------------- position


def test_find_relation_takes_the_list_order_not_the_text_order():
    assert find_relation("a cat above a dog to the left of a tree") == "to the left of"
    assert find_relation("a cat on top of a dog") == "on top of"
    assert find_relation("a cat under the thunder") == "under"
    assert find_relation("thunder") == "under"  # a substring, as released
    assert find_relation("Above all, a cat") is None  # case-sensitive
    assert find_relation("a cat next to a dog") is None


@pytest.mark.parametrize(
    "box1, box2, expected",
    [
        # subject 1 right of subject 2: c1 = (70, 10), c2 = (10, 10): dx = -60, dy = 0, IoU 0
        (
            (60, 0, 80, 20),
            (0, 0, 20, 20),
            {
                "to the right of": 1,
                "on the right of": 1,
                "to the left of": 0,
                "on the left of": 0,
                "above": 0,
                "on top of": 0,
                "below": 0,
                "under": 0,
            },
        ),
        (
            (0, 0, 20, 20),
            (60, 0, 80, 20),
            {"to the left of": 1, "on the left of": 1, "to the right of": 0, "above": 0, "below": 0},
        ),
        # subject 1 above subject 2: dy = 40
        (
            (0, 0, 20, 20),
            (0, 40, 20, 60),
            {"above": 1, "on top of": 1, "below": 0, "under": 0, "to the left of": 0, "to the right of": 0},
        ),
        ((0, 40, 20, 60), (0, 0, 20, 20), {"below": 1, "under": 1, "above": 0, "on top of": 0}),
        # overlapping: dx = 5, dy = 0, intersection 50, union 150, IoU 1/3 -> 0.1 / (1/3) = 0.3
        (
            (0, 0, 10, 10),
            (5, 0, 15, 10),
            {"to the left of": 0.3, "to the right of": 0, "above": 0, "below": 0},
        ),
        # dx = 5 but dy = 20: |dx| < |dy|, not left; above needs only dy > 0
        ((0, 0, 10, 10), (5, 20, 15, 30), {"to the left of": 0, "above": 1, "below": 0}),
        # dy = 2 > 0 with IoU = 80 / 120: above scores 0.1 / (2/3) = 0.15
        ((0, 0, 10, 10), (0, 2, 10, 12), {"above": 0.15, "on top of": 0.15, "under": 0}),
    ],
)
def test_position_rule_by_hand(box1, box2, expected):
    for relation, value in expected.items():
        assert position_score(relation, box1, box2) == pytest.approx(value, abs=1e-12), relation


def test_position_rule_edge_cases():
    assert position_score("above", None, (0, 0, 1, 1)) == 0.0  # a missing box
    assert position_score("above", (5, 5, 5, 5), (5, 9, 5, 9)) == 0.0  # zero union (raises when released)
    with pytest.raises(ValueError, match="next to"):
        position_score("next to", (0, 0, 1, 1), (2, 2, 3, 3))


def test_position_reward_uses_first_truncated_boxes():
    """Truncation flips the answer: as floats subject 2's centre is 0.15 px lower (above holds), as
    ints both centres are at y = 5 (dy = 0: it does not). The first box of a category is used even
    when a later one scores higher."""
    images = torch.stack([as_tensor(tagged(t, t)) for t in (1, 2, 3, 4)])
    script = {
        (1, "cat"): [([0, 0, 10, 10.8], 0.4), ([0, 30, 10, 40], 0.9)],
        (1, "dog"): [([20, 0.9, 30, 10.2], 0.9)],
        (2, "cat"): [([0, 0, 10, 10], 0.4), ([40, 0, 50, 10], 0.9)],
        (2, "dog"): [([20, 0, 30, 10], 0.9)],
        (3, "cat"): [([0, 0, 10, 10], 0.9)],
    }
    inputs = RewardInputs(
        prompts=["a cat above a dog", "a cat to the left of a dog", "a cat below a dog", "a cat and a dog"],
        references=[[] for _ in range(4)],
        subjects=[[Subject("cat", "cat"), Subject("dog", "dog")] for _ in range(4)],
    )
    out = OfficialPosition(ScriptedDetector(script))(images, inputs)
    assert out["score"][:3].tolist() == [0.0, 1.0, 0.0]  # 3: no dog box
    assert math.isnan(float(out["score"][3]))  # no relation word: no score
    assert out["relation_found"].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert out["detected"][:3].tolist() == [1.0, 1.0, 0.0]
    assert position_score("above", (0, 0, 10, 10.8), (20, 0.9, 30, 10.2)) == 1.0  # as floats it would hold


def test_grounding_dino_clip_boxes_option():
    """``clip_boxes=False`` returns the same boxes, in the same order, without the clamp."""
    from rewards.testing import tiny_grounding_dino

    detector = tiny_grounding_dino(0, box_threshold=0.0, text_threshold=0.0)
    image = torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(0))
    a = detector.detect([image], [["dog"]])[0]
    detector.clip_boxes = False
    b = detector.detect([image], [["dog"]])[0]
    assert len(a) == len(b) > 0
    torch.testing.assert_close(a.scores, b.scores)
    expected = b.boxes.clone()
    expected[:, 0::2] = expected[:, 0::2].clamp(0, 64)
    expected[:, 1::2] = expected[:, 1::2].clamp(0, 48)
    torch.testing.assert_close(a.boxes, expected)
    assert not torch.equal(a.boxes, b.boxes), "the random model predicts no box past an edge"
