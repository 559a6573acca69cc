"""rewards.boxes against independent computations: IoU by hand and against torchvision's pairwise
box_iou; NMS against a greedy loop written here (ties included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rewards.boxes import box_iou, nms


def test_iou_by_hand_and_against_torchvision():
    # [0,2]x[0,2] and [1,3]x[1,3]: intersection 1, union 4 + 4 - 1 = 7
    assert box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0  # disjoint
    assert box_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0  # empty boxes: no division by zero
    from torchvision.ops import box_iou as pairwise

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(20, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 1 + torch.rand(20, 2, generator=g) * 30], dim=1).double()
    expected = pairwise(boxes, boxes)
    got = torch.tensor([[box_iou(a, b) for b in boxes] for a in boxes], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def _greedy(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # Python's sort is stable
    keep: list[int] = []
    for i in order:
        ious = []
        for j in keep:
            ix = max(0.0, min(boxes[i][2], boxes[j][2]) - max(boxes[i][0], boxes[j][0]))
            iy = max(0.0, min(boxes[i][3], boxes[j][3]) - max(boxes[i][1], boxes[j][1]))
            area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
            ious.append(ix * iy / (area(boxes[i]) + area(boxes[j]) - ix * iy))
        if all(v <= threshold for v in ious):
            keep.append(i)
    return keep


@pytest.mark.parametrize("seed", range(5))
def test_nms_equals_a_greedy_loop_ties_in_input_order(seed):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 20, size=(40, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(2, 12, size=(40, 2))], axis=1)
    scores = rng.choice([0.1, 0.3, 0.5, 0.9], size=40)  # many ties
    for threshold in (0.1, 0.3, 0.5):
        expected = _greedy(boxes, scores, threshold)
        assert nms(boxes, scores, threshold).tolist() == expected
        assert nms(torch.tensor(boxes).float(), torch.tensor(scores).float(), threshold).tolist() == expected
    assert len(_greedy(boxes, scores, 0.1)) < 40  # the boxes overlap: something was suppressed
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []
