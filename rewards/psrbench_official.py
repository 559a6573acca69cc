"""PSRBench's released evaluation rules, reproduced exactly (docs/method.md §6.1, §6.2): the
``official`` protocol, next to psr's principled subject-consistency reward (``strict``,
:mod:`rewards.subject_consistency`).

**Subject consistency** (:class:`OfficialSubjectConsistency`), per sample:

1. one detector call per subject, the caption being that subject's category (Grounding DINO, box
   threshold 0.35, text threshold 0.25), on the generated image and on the subject's reference;
2. subject k takes one box in the detector's output order, not sorted by score
   (:func:`box_indices`): box 0, except that a 2-subject sample whose two categories are equal
   gives subject 1 box 0 and subject 2 box 1 (the 3- and 4-subject scripts take box 0 for every
   subject, so two dogs are both scored on the first dog); a reference takes box 0;
3. the box (xyxy pixels, not clipped to the image) is cast with ``int()`` (truncation toward
   zero) and cut as a numpy slice ``pixels[y1:y2, x1:x2]`` (:func:`crop_official`), so a negative
   coordinate counts from the far edge as numpy slicing does;
4. no box at that index or an empty slice: the whole uncropped image is embedded instead, counted
   as a fallback (``fallback_<k>`` for the generated image, ``ref_fallback_<k>`` for the reference);
5. DINO ViT-S/16 CLS of every crop (resize 256 bicubic, center crop 224, ImageNet mean/std, fp32),
   L2-normalised, dot product per subject; the sample score is the mean over its subjects.

A sample that cannot be scored (no subjects or no references) gets NaN and ``excluded`` = 1; the
released script drops such samples from the mean, and NaN does the same in the summaries.

**Position** (:class:`OfficialPosition`): the first relation word of :data:`SPATIAL_VOCAB` (list
order, case-sensitive substring) found in the instruction, the first box of category 1 and of
category 2 (``int()``-truncated), ``dx = cx2 - cx1``, ``dy = cy2 - cy1`` (y down) and their IoU
give :func:`position_score`; no relation word: NaN (no score).

Known differences from the released code, all below the precision the table is reported at: the
detector's preprocessing resizes the longer side to 800 (the released one the shorter side to 800,
longer <= 1333: identical for square images) and keeps a box only if its best query-token
probability also passes the text threshold (the released ``predict`` filters boxes by the box
threshold alone: with one category per caption the two differ only for a box reaching the box
threshold through a separator token); the embedder resizes float tensors (antialiased bicubic)
where the released code resizes the 8-bit PIL image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from rewards.base import RewardInputs, check_images
from rewards.detectors import Detections, Detector
from rewards.embedders import Embedder

__all__ = [
    "SPATIAL_VOCAB",
    "box_indices",
    "truncate_box",
    "crop_official",
    "find_relation",
    "position_score",
    "OfficialSubjectConsistency",
    "OfficialPosition",
]

SPATIAL_VOCAB = (
    "to the left of",
    "to the right of",
    "on the left of",
    "on the right of",
    "above",
    "on top of",
    "below",
    "under",
)
"""The released position script's relation words, in the order they are looked for."""

_RIGHT = ("to the right of", "on the right of")
_LEFT = ("to the left of", "on the left of")
_BELOW = ("below", "under")
_ABOVE = ("above", "on top of")


def box_indices(categories: Sequence[str]) -> list[int]:
    """The detection index each subject takes (detector output order).

    ``[0, 1]`` for two subjects of one category (exact string equality), else 0 for every subject.
    """
    if len(categories) == 2 and categories[0] == categories[1]:
        return [0, 1]
    return [0] * len(categories)


def truncate_box(box: Sequence[float] | Tensor) -> tuple[int, int, int, int]:
    """An xyxy box cast with ``int()`` per coordinate (truncation toward zero: -2.7 -> -2)."""
    x1, y1, x2, y2 = (int(float(v)) for v in box)
    return x1, y1, x2, y2


def crop_official(pixels: np.ndarray, box: Sequence[float] | Tensor) -> np.ndarray | None:
    """``pixels[y1:y2, x1:x2]`` of an ``[H, W, C]`` array with the truncated box, numpy's slicing
    rules included (negative bounds count from the end, bounds past the edge are cut); None where
    the slice is empty (the released script then falls back to the whole image)."""
    x1, y1, x2, y2 = truncate_box(box)
    crop = pixels[y1:y2, x1:x2]
    return crop if crop.size else None


def find_relation(instruction: str) -> str | None:
    """The first word of :data:`SPATIAL_VOCAB` (in that order) that occurs in ``instruction`` as a
    case-sensitive substring, as released ("under" also matches "thunder"); None if none does."""
    for word in SPATIAL_VOCAB:
        if word in instruction:
            return word
    return None


def position_score(
    relation: str,
    box1: Sequence[float] | None,
    box2: Sequence[float] | None,
    iou_threshold: float = 0.1,
) -> float:
    """The released position rule for subject 1 ``relation`` subject 2.

    With box centres c1, c2 (xyxy, y down), ``dx = c2x - c1x`` and ``dy = c2y - c1y``:
    right of: ``dx < 0`` and ``|dx| > |dy|``; left of: ``dx > 0`` and ``|dx| > |dy|``;
    below / under: ``dy < 0``; above / on top of: ``dy > 0``. A satisfied relation scores 1 if the
    boxes' IoU is below ``iou_threshold``, else ``iou_threshold / IoU``; anything else scores 0 (a
    missing box, or boxes with zero union, which raise in the released script).

    Args:
        relation: a word of :data:`SPATIAL_VOCAB`.
        box1, box2: xyxy boxes (already truncated by the caller, as released), or None if missing.
    """
    if relation not in SPATIAL_VOCAB:
        raise ValueError(f"position_score: relation={relation!r}; expected one of {SPATIAL_VOCAB}")
    if box1 is None or box2 is None:
        return 0.0
    ax1, ay1, ax2, ay2 = box1
    bx1, by1, bx2, by2 = box2
    dx = (bx1 + bx2) / 2 - (ax1 + ax2) / 2
    dy = (by1 + by2) / 2 - (ay1 + ay2) / 2
    inter = max(0, min(ax2, bx2) - max(ax1, bx1)) * max(0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    if union == 0:
        return 0.0
    iou = inter / union
    if relation in _RIGHT:
        holds = dx < 0 and abs(dx) > abs(dy)
    elif relation in _LEFT:
        holds = dx > 0 and abs(dx) > abs(dy)
    elif relation in _BELOW:
        holds = dy < 0
    else:
        holds = dy > 0
    if not holds:
        return 0.0
    return 1.0 if iou < iou_threshold else iou_threshold / iou


def _pixels(image: Tensor) -> np.ndarray:
    """``[3, H, W]`` in [0, 1] -> ``[H, W, 3]`` uint8 (the 8-bit values the released script reads)."""
    return (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _tensor(pixels: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float() / 255.0


class _Calls:
    """Distinct (image, category) detector calls of a batch, run as one ``detect`` (each image with
    its own one-query caption, as the released script calls the detector per subject)."""

    def __init__(self) -> None:
        self.slot: dict[tuple[int, str], int] = {}
        self.images: list[Tensor] = []
        self.queries: list[list[str]] = []

    def add(self, image: Tensor, category: str) -> int:
        key = (id(image), category)
        if key not in self.slot:
            self.slot[key] = len(self.images)
            self.images.append(image)
            self.queries.append([category])
        return self.slot[key]

    def run(self, detector: Detector) -> list[Detections]:
        return detector.detect(self.images, self.queries) if self.images else []


def _box(dets: Detections, index: int) -> Tensor | None:
    """Box ``index`` in the detector's output order (boxes of query 0: one query per call)."""
    boxes = dets.boxes[dets.labels == 0]
    return boxes[index].cpu() if index < len(boxes) else None


class OfficialSubjectConsistency:
    """PSRBench's released subject-consistency score (module docstring).

    Args:
        detector: called with one category per image; must return boxes in its own output order,
            not clipped to the image (``rewards.detectors.grounding_dino(..., clip_boxes=False)``).
        embedder: DINO ViT-S/16 CLS with PSRBench's preprocessing (``rewards.embedders.dino_vits16``).
        max_subjects: ``subject_<k>`` and the fallback flags are reported for k = 1..max(this, most
            in the batch).

    Returns (``__call__``): ``score`` ``[B]`` (NaN where excluded), ``subject_<k>``, ``fallback_<k>``
    and ``ref_fallback_<k>`` (1 where the whole image was embedded), ``fallbacks`` (number of
    generated-image and reference crops of the sample that fell back) and ``excluded``.
    """

    def __init__(self, detector: Detector, embedder: Embedder, *, max_subjects: int = 4) -> None:
        self.detector, self.embedder = detector, embedder
        self.max_subjects = int(max_subjects)

    @torch.no_grad()
    def __call__(self, images: Tensor, inputs: RewardInputs) -> dict[str, Tensor]:
        check_images(images, inputs, "OfficialSubjectConsistency")
        batch = len(inputs)
        usable = [
            bool(subs) and bool(refs) for subs, refs in zip(inputs.subjects, inputs.references, strict=True)
        ]
        gen_images = list(images.unbind(0))
        calls = _Calls()
        jobs: list[tuple[int, int, int, int]] = []  # (sample, subject, generated call, reference call)
        for b in range(batch):
            if not usable[b]:
                continue
            for k, (sub, ref) in enumerate(zip(inputs.subjects[b], inputs.references[b], strict=True)):
                jobs.append((b, k, calls.add(gen_images[b], sub.category), calls.add(ref, sub.category)))
        dets = calls.run(self.detector)

        crops: list[Tensor] = []
        width = max([self.max_subjects, *inputs.num_subjects])
        nan = float("nan")
        fallback = torch.full((batch, width), nan, dtype=torch.float64)
        ref_fallback = torch.full((batch, width), nan, dtype=torch.float64)
        pixel_cache: dict[int, np.ndarray] = {}
        for b, k, gen_call, ref_call in jobs:
            index = box_indices([s.category for s in inputs.subjects[b]])[k]
            for source, call, box_index, flags in (
                (gen_images[b], gen_call, index, fallback),
                (inputs.references[b][k], ref_call, 0, ref_fallback),
            ):
                if id(source) not in pixel_cache:
                    pixel_cache[id(source)] = _pixels(source)
                pixels = pixel_cache[id(source)]
                box = _box(dets[call], box_index)
                crop = crop_official(pixels, box) if box is not None else None
                flags[b, k] = float(crop is None)
                crops.append(_tensor(crop if crop is not None else pixels))
        emb = self.embedder.embed(crops).double().cpu() if crops else torch.zeros(0, 1, dtype=torch.float64)
        emb = emb / emb.norm(dim=-1, keepdim=True)  # the released script normalises again

        values = torch.full((batch, width), nan, dtype=torch.float64)
        for j, (b, k, _, _) in enumerate(jobs):
            values[b, k] = emb[2 * j] @ emb[2 * j + 1]
        counts = torch.tensor(inputs.num_subjects, dtype=torch.float64)
        score = torch.where(
            torch.tensor(usable), torch.nansum(values, dim=1) / counts.clamp(min=1), torch.tensor(nan)
        )
        out: dict[str, Tensor] = {"score": score}
        for k in range(width):
            out[f"subject_{k + 1}"] = values[:, k]
        for k in range(width):
            out[f"fallback_{k + 1}"] = fallback[:, k]
        for k in range(width):
            out[f"ref_fallback_{k + 1}"] = ref_fallback[:, k]
        out["fallbacks"] = torch.nansum(fallback, dim=1) + torch.nansum(ref_fallback, dim=1)
        out["excluded"] = torch.tensor([0.0 if u else 1.0 for u in usable], dtype=torch.float64)
        return {key: v.to(device=images.device, dtype=torch.float32) for key, v in out.items()}


class OfficialPosition:
    """PSRBench's released position rule (module docstring) on a batch: one detector call per
    category (the first box of category 1 and of category 2).

    Args:
        detector: as for :class:`OfficialSubjectConsistency` (raw output order, unclipped boxes).
        iou_threshold: the released 0.1.

    Returns (``__call__``): ``score`` ``[B]`` (NaN without a relation word or with fewer than two
    subjects), ``relation_found`` (1 where a relation word was found) and ``detected`` (1 where
    both boxes were found; NaN without a relation word).
    """

    def __init__(self, detector: Detector, *, iou_threshold: float = 0.1) -> None:
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"OfficialPosition: iou_threshold={iou_threshold} must be in (0, 1]")
        self.detector = detector
        self.iou_threshold = float(iou_threshold)

    @torch.no_grad()
    def __call__(self, images: Tensor, inputs: RewardInputs) -> dict[str, Tensor]:
        check_images(images, inputs, "OfficialPosition")
        batch = len(inputs)
        relations = [find_relation(p) for p in inputs.prompts]
        gen_images = list(images.unbind(0))
        calls = _Calls()
        jobs = []
        for b in range(batch):
            subs = inputs.subjects[b]
            if relations[b] is not None and len(subs) >= 2:
                jobs.append(
                    (
                        b,
                        calls.add(gen_images[b], subs[0].category),
                        calls.add(gen_images[b], subs[1].category),
                    )
                )
        dets = calls.run(self.detector)
        nan = float("nan")
        score = torch.full((batch,), nan, dtype=torch.float64)
        detected = torch.full((batch,), nan, dtype=torch.float64)
        for b, first, second in jobs:
            boxes = [_box(dets[first], 0), _box(dets[second], 0)]
            b1, b2 = (truncate_box(x) if x is not None else None for x in boxes)
            detected[b] = float(b1 is not None and b2 is not None)
            relation = relations[b]
            assert relation is not None
            score[b] = position_score(relation, b1, b2, self.iou_threshold)
        found = torch.tensor([float(r is not None) for r in relations], dtype=torch.float64)
        out = {"score": score, "relation_found": found, "detected": detected}
        return {key: v.to(device=images.device, dtype=torch.float32) for key, v in out.items()}
