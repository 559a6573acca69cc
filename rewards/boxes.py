"""Box arithmetic shared by the rewards and the data pipeline, written once: IoU and greedy
non-maximum suppression on ``xyxy`` boxes (pixels or normalized, as long as both boxes agree)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["box_iou", "nms"]


def box_iou(a: Sequence[float] | Tensor, b: Sequence[float] | Tensor) -> float:
    """Intersection over union of two ``xyxy`` boxes; 0 when both are empty."""
    ax0, ay0, ax1, ay1 = (float(v) for v in a)
    bx0, by0, bx1, by1 = (float(v) for v in b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union > 0 else 0.0


def nms(boxes: Tensor | Any, scores: Tensor | Any, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression: the indices kept, best score first (ties keep input order).

    A box is dropped when its IoU with a kept, better-scoring box is above ``iou_threshold``.

    Args:
        boxes: ``[K, 4]`` ``xyxy`` boxes (tensor or array).
        scores: ``[K]`` scores.
        iou_threshold: IoU above which the lower-scoring box is suppressed.

    Returns:
        ``[K']`` int64 indices into ``boxes`` (on the CPU).
    """
    from torchvision.ops import nms as tv_nms

    b = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4).cpu()
    s = torch.as_tensor(scores, dtype=torch.float64).reshape(-1).cpu()
    if len(b) == 0:
        return torch.zeros(0, dtype=torch.int64)
    # torchvision orders by score with a stable sort, so equal scores keep their input order
    return tv_nms(b, s, float(iou_threshold))
