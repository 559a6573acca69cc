"""Spatial-relation reward: does the image place two subjects as the prompt states?

**Parsing.** The first relation phrase in the prompt (case-insensitive): "left of" ("to/on/at the
left (side) of"), "right of", "above" ("on top of"), "below" ("under", "underneath", "beneath"),
"next to" ("beside", "alongside"). Subject A is the subject mentioned (by name or category, plural
"s"/"es" allowed) last before the phrase, subject B the first one mentioned after it within four
words: "a corgi to the left of a cat" -> (corgi, left of, cat); a phrase followed by something else
("under a table") is skipped for the next one. A prompt without a phrase, or with none between two
different subjects, gets NaN ("does not apply"); ``stated`` reports which.

**Rule** (PSRBench's position check uses detected boxes, IoU and distance; its thresholds are
settings here). With A's and B's best boxes a and b:

1. ``IoU(a, b) > iou_max``: the two boxes are one region, no relation holds;
2. directions (the GenEval convention): the centre offset ``d = c_a - c_b`` is shrunk on each axis
   by ``margin`` times the two boxes' summed extent on that axis, ``d' = sign(d) max(|d| - margin
   (s_a + s_b), 0)``; with ``u = d' / |d|``: left of ``u_x < -0.5``, right of ``u_x > 0.5``, above
   ``u_y < -0.5``, below ``u_y > 0.5`` (image y grows downwards);
3. next to: the gap between the rectangles (0 when they touch or overlap) is at most ``next_to_gap``
   times the mean of the two boxes' square-root areas.

Score 1 when the relation holds, 0 when it does not or a subject is not detected (``detected`` = 0),
NaN when no relation applies. ``stated`` is 1 where the prompt has a relation phrase (NaN score
with ``stated`` = 1: the phrase's subjects could not be resolved). Two subjects of one category cannot be told apart by boxes alone: the
relation holds if it holds for either ordering of the two best boxes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rewards.base import RewardInputs, Subject, check_images
from rewards.boxes import box_iou, nms
from rewards.detectors import Detections, Detector

__all__ = ["StatedRelation", "parse_relation", "relation_holds", "SpatialReward", "RELATIONS"]

RELATIONS = ("left of", "right of", "above", "below", "next to")
_PHRASES = [
    (r"\b(?:to|on|at) the left (?:side |hand side )?of\b|\bleft of\b", "left of"),
    (r"\b(?:to|on|at) the right (?:side |hand side )?of\b|\bright of\b", "right of"),
    (r"\babove\b|\bon top of\b", "above"),
    (r"\bbelow\b|\bunderneath\b|\bunder\b|\bbeneath\b", "below"),
    (r"\bnext to\b|\bbeside\b|\balongside\b", "next to"),
]


@dataclass(frozen=True)
class StatedRelation:
    """``subjects[first]`` is ``relation`` ``subjects[second]``."""

    relation: str
    first: int
    second: int


def _mentions(prompt: str, subject: Subject) -> list[tuple[int, int]]:
    """Spans of the subject's name in the prompt, else of its category (a corgi named "corgi" is not
    also every "dog" of the prompt)."""
    for term in (subject.name.lower().strip(), subject.category.lower().strip()):
        spans = (
            [m.span() for m in re.finditer(r"\b" + re.escape(term) + r"(?:s|es)?\b", prompt)] if term else []
        )
        if spans:
            return spans
    return []


def parse_relation(
    prompt: str, subjects: Sequence[Subject], max_gap_words: int = 4
) -> tuple[str | None, StatedRelation | None]:
    """``(relation phrase, resolved relation)``; ``(None, None)`` without a phrase.

    Phrases are tried in prompt order; the first that sits between two different subjects wins: A is
    the subject mentioned last before it, B the first mentioned after it with at most
    ``max_gap_words`` words in between ("left of a small brown cat"), so that in "a corgi under a
    table next to a cat", "under" (followed by a non-subject) is skipped for "next to". When no phrase
    resolves, the first phrase is returned with ``None``.
    """
    text = prompt.lower()
    found = sorted(
        (m.start(), -(m.end() - m.start()), m.end(), rel)
        for pattern, rel in _PHRASES
        for m in re.finditer(pattern, text)
    )
    if not found:
        return None, None
    mentions = [(s, e, i) for i, subject in enumerate(subjects) for s, e in _mentions(text, subject)]
    for start, _, end, relation in found:
        before = max(((e, i) for s, e, i in mentions if e <= start), default=None)
        after = min(
            ((s, i) for s, e, i in mentions if s >= end and len(text[end:s].split()) <= max_gap_words),
            default=None,
        )
        if before is not None and after is not None and before[1] != after[1]:
            return relation, StatedRelation(relation, before[1], after[1])
    return found[0][3], None


def relation_holds(
    relation: str,
    box_a: Sequence[float] | Tensor,
    box_b: Sequence[float] | Tensor,
    *,
    iou_max: float = 0.5,
    margin: float = 0.1,
    next_to_gap: float = 0.5,
) -> bool:
    """Whether xyxy ``box_a`` stands in ``relation`` to ``box_b`` (rule in the module docstring)."""
    if relation not in RELATIONS:
        raise ValueError(f"relation_holds: relation={relation!r}; expected one of {RELATIONS}")
    a = torch.as_tensor([float(v) for v in box_a], dtype=torch.float64)
    b = torch.as_tensor([float(v) for v in box_b], dtype=torch.float64)
    if box_iou(a, b) > iou_max:
        return False
    size_a, size_b = a[2:] - a[:2], b[2:] - b[:2]
    if relation == "next to":
        gap = torch.clamp(torch.maximum(a[:2] - b[2:], b[:2] - a[2:]), min=0).norm()
        scale = 0.5 * (math.sqrt(float(size_a.prod())) + math.sqrt(float(size_b.prod())))
        return bool(gap <= next_to_gap * scale)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    norm = float(offset.norm())
    if norm == 0:
        return False
    shrunk = torch.sign(offset) * torch.clamp(offset.abs() - margin * (size_a + size_b), min=0)
    ux, uy = (shrunk / norm).tolist()
    return {"left of": ux < -0.5, "right of": ux > 0.5, "above": uy < -0.5, "below": uy > 0.5}[relation]


class SpatialReward:
    """Spatial-relation reward (see the module docstring); one detector forward over the images
    whose prompts state a relation.

    Args:
        detector: open-vocabulary detector (``reward.detector``).
        iou_max, margin, next_to_gap: the rule's thresholds.
        nms_iou: duplicate suppression between the two best boxes of one category.
    """

    def __init__(
        self,
        detector: Detector,
        *,
        iou_max: float = 0.5,
        margin: float = 0.1,
        next_to_gap: float = 0.5,
        nms_iou: float = 0.5,
    ) -> None:
        self.detector = detector
        self.iou_max, self.margin, self.next_to_gap, self.nms_iou = (
            float(iou_max),
            float(margin),
            float(next_to_gap),
            float(nms_iou),
        )

    def _best(self, dets: Detections, label: int, k: int) -> Tensor:
        sel = dets.select(dets.labels == label)
        if len(sel) == 0:
            return sel.boxes
        keep = nms(sel.boxes, sel.scores, self.nms_iou).to(sel.boxes.device)
        return sel.boxes[keep][:k]

    @torch.no_grad()
    def __call__(self, images: Tensor, inputs: RewardInputs) -> dict[str, Tensor]:
        check_images(images, inputs, "SpatialReward")
        batch = len(inputs)
        nan = float("nan")
        score = torch.full((batch,), nan, dtype=torch.float64)
        detected = torch.full((batch,), nan, dtype=torch.float64)
        results = [parse_relation(p, s) for p, s in zip(inputs.prompts, inputs.subjects, strict=True)]
        stated = torch.tensor([float(phrase is not None) for phrase, _ in results], dtype=torch.float64)
        parsed = [rel for _, rel in results]
        todo = [b for b in range(batch) if parsed[b] is not None]
        if todo:
            queries = []
            for b in todo:
                rel, subs = parsed[b], inputs.subjects[b]
                queries.append(list(dict.fromkeys([subs[rel.first].category, subs[rel.second].category])))  # type: ignore[union-attr]
            dets = self.detector.detect([images[b] for b in todo], queries)
            for b, qs, d in zip(todo, queries, dets, strict=True):
                rel = parsed[b]
                assert rel is not None
                if len(qs) == 1:  # one category: the two best distinct boxes, either order
                    boxes = self._best(d, 0, 2)
                    pairs = [(boxes[0], boxes[1]), (boxes[1], boxes[0])] if len(boxes) == 2 else []
                else:
                    a, bb = self._best(d, 0, 1), self._best(d, 1, 1)
                    pairs = [(a[0], bb[0])] if len(a) and len(bb) else []
                detected[b] = float(bool(pairs))
                holds = any(
                    relation_holds(
                        rel.relation,
                        x,
                        y,
                        iou_max=self.iou_max,
                        margin=self.margin,
                        next_to_gap=self.next_to_gap,
                    )
                    for x, y in pairs
                )
                score[b] = float(holds)
        return {
            k: v.to(device=images.device, dtype=torch.float32)
            for k, v in {"score": score, "stated": stated, "detected": detected}.items()
        }
