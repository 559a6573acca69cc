"""The pairwise subject-consistency reward (docs/method.md §5).

For each subject i of a sample, the pair (reference i, subject i in the generated image):

1. an open-vocabulary detector looks for every subject's category in the generated image, and for
   the subject's category in its reference;
2. the boxes are cropped and embedded (DINO ViT-S/16 CLS in PSRBench), cosine similarity per pair;
3. subjects of one category are assigned to that category's detections by optimal matching
   (Hungarian, maximizing the summed similarity) rather than by detection order, so which of two
   dogs is "first" does not matter and a dog is never scored against the other dog's reference
   when the right one is in the image;
4. the sample score is the mean over its subjects. A subject with no detection left for it gets
   ``missing_penalty`` (default 0) and is flagged (``detected_<i>`` = 0, ``detected_frac``);
   nothing falls back silently to the whole image.

Where a reference shows no detection of its category, ``missing_reference`` decides: ``full_image``
(default; references are usually single-subject pictures) embeds the whole reference, ``penalty``
scores the subject as missing. Either way ``ref_detected_frac`` reports it.

Compared with PSRBench's released script: same detector thresholds, embedder and preprocessing;
``assignment="order"`` reproduces its pairing of same-category subjects with detections in score
order; its whole-image fallback on failures is not reproduced.

Optional terms, off by default (weights 0): cross-subject leakage (the highest similarity of a
subject's crop to another subject's reference, subtracted with ``leakage_weight``) and the identity
margin (own similarity minus that highest other, added with ``margin_weight``).

Optional rescaling, off by default (``sigmoid_k=None``): the sample score ``s`` becomes
``sigmoid(k (s - sigmoid_tau))`` with ``k = sigmoid_k (1 + sigmoid_k_per_reference (n - 1))`` for a
sample of n references (:func:`sigmoid_rescale`). It applies to the final score, not to each
subject: the mean over n subjects varies less than one similarity does, so the slope grows with n
to keep spreading the scores of a group apart; the per-subject values stay raw cosines
(``subject_<i>``) and the score before rescaling is reported as ``similarity``.

Cost: one detector forward over the B images and the distinct references together (two when
``reference_detector`` is separate), and one embedder forward over all crops; both grow linearly
with the number of subjects (crops), the Hungarian step is negligible.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rewards.base import RewardInputs, check_images
from rewards.boxes import nms
from rewards.detectors import Detections, Detector
from rewards.embedders import Embedder
from rewards.imaging import crop_box

__all__ = ["SubjectConsistencyReward", "psrbench_score", "assign", "sigmoid_rescale"]

ASSIGNMENTS = ("hungarian", "order")
MISSING_REFERENCE = ("full_image", "penalty")


def psrbench_score(crop_embeddings: Tensor, ref_embeddings: Tensor) -> Tensor:
    """PSRBench's subject-consistency score of one sample: the mean over subjects of the cosine
    similarity between subject i's crop and reference i.

    Args:
        crop_embeddings, ref_embeddings: ``[S, D]`` (any norm), row i = subject i.

    Returns:
        A float64 scalar tensor in [-1, 1].
    """
    if (
        crop_embeddings.shape != ref_embeddings.shape
        or crop_embeddings.ndim != 2
        or crop_embeddings.shape[0] == 0
    ):
        raise ValueError(
            f"psrbench_score: embeddings must both be [S, D] with S >= 1, got {tuple(crop_embeddings.shape)} "
            f"and {tuple(ref_embeddings.shape)}"
        )
    c, r = crop_embeddings.double(), ref_embeddings.double()
    cos = (c * r).sum(-1) / (c.norm(dim=-1) * r.norm(dim=-1))
    return cos.mean()


def assign(similarity: Tensor, method: str = "hungarian") -> list[tuple[int, int]]:
    """Pairs (subject row, detection column) for one category.

    ``hungarian``: the assignment maximizing the summed similarity (scipy's
    ``linear_sum_assignment``); with more detections than subjects the best subset is used.
    ``order``: subject k takes detection k (detections sorted by score), as PSRBench does.

    Args:
        similarity: ``[S_c, K]`` cosine similarities of the category's subjects to its detections.
    """
    s, k = similarity.shape
    if s == 0 or k == 0:
        return []
    if method == "order":
        return [(i, i) for i in range(min(s, k))]
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(similarity.detach().double().cpu().numpy(), maximize=True)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True)]


def sigmoid_rescale(
    score: Tensor, num_references: Tensor, *, k: float, tau: float, k_per_reference: float
) -> Tensor:
    """``sigmoid(k_n (score - tau))`` with ``k_n = k (1 + k_per_reference (n - 1))``.

    A steep sigmoid around ``tau`` spreads scores near the threshold apart and flattens the far
    ends; the slope grows with the number of references n because a mean over more subjects
    spreads less. ``k_per_reference = 1`` makes ``k_n = k n``; 0 keeps one slope for every n.

    Args:
        score: ``[B]`` scores (NaN stays NaN).
        num_references: ``[B]`` references per sample (>= 1 where the score is not NaN).
        k: slope for one reference, > 0.
        tau: the score mapped to 0.5.
        k_per_reference: growth of the slope per extra reference, >= 0.

    Returns:
        ``[B]`` in (0, 1), in ``score``'s dtype.
    """
    n = num_references.to(score.dtype)
    slope = k * (1.0 + k_per_reference * (n - 1.0))
    return torch.sigmoid(slope * (score - tau))


class SubjectConsistencyReward:
    """The PSR reward; see the module docstring.

    Args:
        detector: finds subjects by category (``reward.detector``).
        embedder: embeds crops (``reward.embedder``).
        reference_detector: a different detector for references (None: ``detector``).
        detect_references: crop references to their detected subject (False: whole references).
        missing_penalty: score of a subject not found in the generated image.
        missing_reference: ``full_image`` | ``penalty`` when a reference shows no detection.
        assignment: ``hungarian`` | ``order`` (PSRBench's pairing, for reproducing its numbers).
        nms_iou: IoU above which a lower-scored detection of the same category is dropped as a
            duplicate before matching (None: no suppression).
        max_candidates: detections per category kept for matching (at least the category's subject
            count), highest scores first.
        leakage_weight, margin_weight: weights of the optional terms (>= 0; 0 = off and not reported).
        max_subjects: ``subject_<i>``/``detected_<i>`` are reported for i = 1..max(this, most in batch).
        sigmoid_k: slope k > 0 of the optional rescaling of the score for one reference
            (:func:`sigmoid_rescale`); None: off.
        sigmoid_tau: the score mapped to 0.5 by the rescaling.
        sigmoid_k_per_reference: growth of the slope per extra reference (>= 0; 1: k times n).
    """

    def __init__(
        self,
        detector: Detector,
        embedder: Embedder,
        *,
        reference_detector: Detector | None = None,
        detect_references: bool = True,
        missing_penalty: float = 0.0,
        missing_reference: str = "full_image",
        assignment: str = "hungarian",
        nms_iou: float | None = 0.5,
        max_candidates: int = 4,
        leakage_weight: float = 0.0,
        margin_weight: float = 0.0,
        max_subjects: int = 4,
        sigmoid_k: float | None = None,
        sigmoid_tau: float = 0.5,
        sigmoid_k_per_reference: float = 1.0,
    ) -> None:
        if assignment not in ASSIGNMENTS:
            raise ValueError(
                f"SubjectConsistencyReward: assignment={assignment!r}; expected one of {ASSIGNMENTS}"
            )
        if missing_reference not in MISSING_REFERENCE:
            raise ValueError(
                f"SubjectConsistencyReward: missing_reference={missing_reference!r}; expected one of {MISSING_REFERENCE}"
            )
        if nms_iou is not None and not 0.0 < nms_iou <= 1.0:
            raise ValueError(f"SubjectConsistencyReward: nms_iou={nms_iou} must be in (0, 1] or null")
        if max_candidates < 1:
            raise ValueError(f"SubjectConsistencyReward: max_candidates={max_candidates} must be >= 1")
        if not math.isfinite(missing_penalty):
            raise ValueError(f"SubjectConsistencyReward: missing_penalty={missing_penalty} must be finite")
        if leakage_weight < 0 or margin_weight < 0:
            raise ValueError("SubjectConsistencyReward: leakage_weight and margin_weight must be >= 0")
        if sigmoid_k is not None and not (0 < sigmoid_k < math.inf):
            raise ValueError(
                f"SubjectConsistencyReward: sigmoid_k={sigmoid_k} must be finite and > 0, or null (off)"
            )
        if not math.isfinite(sigmoid_tau):
            raise ValueError(f"SubjectConsistencyReward: sigmoid_tau={sigmoid_tau} must be finite")
        if not 0 <= sigmoid_k_per_reference < math.inf:
            raise ValueError(
                f"SubjectConsistencyReward: sigmoid_k_per_reference={sigmoid_k_per_reference} must be finite and >= 0"
            )
        self.detector, self.embedder = detector, embedder
        self.reference_detector = reference_detector
        self.detect_references = bool(detect_references)
        self.missing_penalty = float(missing_penalty)
        self.missing_reference, self.assignment = missing_reference, assignment
        self.nms_iou, self.max_candidates = nms_iou, int(max_candidates)
        self.leakage_weight, self.margin_weight = float(leakage_weight), float(margin_weight)
        self.max_subjects = int(max_subjects)
        self.sigmoid_k = None if sigmoid_k is None else float(sigmoid_k)
        self.sigmoid_tau, self.sigmoid_k_per_reference = float(sigmoid_tau), float(sigmoid_k_per_reference)

    # ------------------------------------------------------------------ steps
    def _candidates(self, dets: Detections, label: int, needed: int) -> Tensor:
        """Boxes ``[K, 4]`` of one query, best first, duplicates suppressed, at most the budget."""
        sel = dets.select(dets.labels == label)
        order = sel.scores.argsort(descending=True)
        boxes, scores = sel.boxes[order], sel.scores[order]
        if self.nms_iou is not None and len(boxes) > 1:
            keep = nms(boxes, scores, self.nms_iou).to(boxes.device)  # indices sorted by score
            boxes = boxes[keep]
        budget = needed if self.assignment == "order" else max(self.max_candidates, needed)
        return boxes[
            :budget
        ].cpu()  # cropping reads coordinates as Python numbers: one transfer, not one per box

    def _detect(
        self, images: Tensor, queries: list[list[str]], refs: list[Tensor], ref_queries: list[list[str]]
    ) -> tuple[list[Detections], list[Detections]]:
        """Detections in the generated images and in the references: one forward when one detector
        serves both."""
        if not self.detect_references or not refs:
            return self.detector.detect(images, queries), []
        if self.reference_detector is not None:
            return self.detector.detect(images, queries), self.reference_detector.detect(refs, ref_queries)
        dets = self.detector.detect(list(images.unbind(0)) + refs, queries + ref_queries)
        return dets[: images.shape[0]], dets[images.shape[0] :]

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(self, images: Tensor, inputs: RewardInputs) -> dict[str, Tensor]:
        check_images(images, inputs, "SubjectConsistencyReward")
        batch = len(inputs)
        for b, (refs_b, subs) in enumerate(zip(inputs.references, inputs.subjects, strict=True)):
            if subs and not refs_b:
                raise ValueError(
                    f"SubjectConsistencyReward: sample {b} has subjects {[s.name for s in subs]} but no references"
                )
        queries = [list(dict.fromkeys(s.category for s in subs)) for subs in inputs.subjects]

        # distinct references (a prompt repeated G times in a group shares its tensors): detect and embed once
        ref_slot: dict[tuple[int, str], int] = {}
        refs: list[Tensor] = []
        ref_queries: list[list[str]] = []
        for refs_b, subs in zip(inputs.references, inputs.subjects, strict=True):
            for ref, sub in zip(refs_b, subs, strict=True):
                if (id(ref), sub.category) not in ref_slot:
                    ref_slot[(id(ref), sub.category)] = len(refs)
                    refs.append(ref)
                    ref_queries.append([sub.category])
        gen_dets, ref_dets = self._detect(images, queries, refs, ref_queries)

        # crops: generated candidates per (sample, category), then one crop per distinct reference
        crops: list[Tensor] = []
        cand: dict[tuple[int, int], list[int]] = {}
        for b in range(batch):
            cats = [s.category for s in inputs.subjects[b]]
            for q, category in enumerate(queries[b]):
                boxes = self._candidates(gen_dets[b], q, cats.count(category))
                cand[(b, q)] = list(range(len(crops), len(crops) + len(boxes)))
                crops.extend(crop_box(images[b], box) for box in boxes)
        n_gen = len(crops)
        ref_found = torch.ones(len(refs), dtype=torch.bool)
        for r, ref in enumerate(refs):
            if self.detect_references:
                d = ref_dets[r]
                if len(d):
                    crops.append(crop_box(ref, d.boxes[d.scores.argmax()]))
                    continue
                ref_found[r] = False
            crops.append(ref)
        emb = self.embedder.embed(crops) if crops else torch.zeros(0, 1)
        emb = emb.float().cpu()
        gen_emb, ref_emb = emb[:n_gen], emb[n_gen:]

        width = max([self.max_subjects, *inputs.num_subjects])
        nan = float("nan")
        values = torch.full((batch, width), nan, dtype=torch.float64)
        detected = torch.full((batch, width), nan, dtype=torch.float64)
        ref_ok = torch.full((batch, width), nan, dtype=torch.float64)
        leakage = torch.full((batch,), nan, dtype=torch.float64)
        margin = torch.full((batch,), nan, dtype=torch.float64)
        for b in range(batch):
            subs = inputs.subjects[b]
            if not subs:
                continue
            slots = [
                ref_slot[(id(ref), sub.category)] for ref, sub in zip(inputs.references[b], subs, strict=True)
            ]
            usable = [bool(ref_found[s]) or self.missing_reference == "full_image" for s in slots]
            own_ref = ref_emb[slots].double()  # [S, D]
            crop_of: dict[int, int] = {}
            for q, category in enumerate(queries[b]):
                members = [i for i, s in enumerate(subs) if s.category == category and usable[i]]
                cols = cand[(b, q)]
                if not members or not cols:
                    continue
                sim = own_ref[members] @ gen_emb[cols].double().T  # [S_c, K]
                for row, col in assign(sim, self.assignment):
                    crop_of[members[row]] = cols[col]
            for i in range(len(subs)):
                ref_ok[b, i] = float(ref_found[slots[i]])
                detected[b, i] = float(i in crop_of)
                values[b, i] = (
                    float(own_ref[i] @ gen_emb[crop_of[i]].double()) if i in crop_of else self.missing_penalty
                )
            if (self.leakage_weight or self.margin_weight) and len(subs) > 1 and crop_of:
                leak, marg = [], []
                for i, c in crop_of.items():
                    sims = (
                        own_ref @ gen_emb[c].double()
                    )  # [S]: this crop against every reference of the sample
                    others = torch.cat([sims[:i], sims[i + 1 :]])
                    leak.append(others.max())
                    marg.append(sims[i] - others.max())
                leakage[b], margin[b] = torch.stack(leak).mean(), torch.stack(marg).mean()

        counts = torch.tensor(inputs.num_subjects, dtype=torch.float64)
        score = torch.nansum(values, dim=1) / counts  # NaN (0/0) for samples without subjects
        score = (
            score
            - self.leakage_weight * torch.nan_to_num(leakage)
            + self.margin_weight * torch.nan_to_num(margin)
        )
        out = {"score": score}
        if self.sigmoid_k is not None:
            out["similarity"] = score
            out["score"] = sigmoid_rescale(
                score,
                counts,
                k=self.sigmoid_k,
                tau=self.sigmoid_tau,
                k_per_reference=self.sigmoid_k_per_reference,
            )
        for i in range(width):
            out[f"subject_{i + 1}"] = values[:, i]
        out["detected_frac"] = torch.nansum(detected, dim=1) / counts
        for i in range(width):
            out[f"detected_{i + 1}"] = detected[:, i]
        if self.detect_references:
            out["ref_detected_frac"] = torch.nansum(ref_ok, dim=1) / counts
        if self.leakage_weight:
            out["leakage"] = leakage
        if self.margin_weight:
            out["margin"] = margin
        return {k: v.to(device=images.device, dtype=torch.float32) for k, v in out.items()}
