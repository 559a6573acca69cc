"""Stage ``crop``: find each subject in the target by its category and crop it (docs/method.md §8 step 4).

A record is rejected here, with the reason, when a subject is not found exactly once (after
per-category non-maximum suppression), when its box is too small, when two subjects' boxes overlap
too much, or when the target cannot be read.

Settings (``crop.*``):
    detector: a detector spec in the ``rewards.detectors`` interface (Grounding DINO, OWLv2, or the
        quickstart's :class:`~data_pipeline.models.procedural.ColourKeyDetector`).
    nms_iou: boxes of one category overlapping more than this are one detection (the best kept).
    min_box: smallest box side as a fraction of the target's shorter side.
    max_overlap: largest IoU allowed between two subjects' boxes.
    margin: the crop extends the box by this fraction of its size on every side (context for the
        single-subject model).
    batch_size: targets per detector call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.images import expand_box, load_image, save_png, to_tensor
from data_pipeline.models import describe
from data_pipeline.shards import Outcome, Shard, reject
from data_pipeline.stages.common import build, image_path, open_run, stage_inputs
from rewards.boxes import box_iou, nms


def locate(
    detections: Any,
    categories: list[str],
    *,
    nms_iou: float,
    min_side: float,
    max_overlap: float,
) -> tuple[list[list[float]], list[float]] | str:
    """One box per subject from a detector's output for one image, or the reason there is none.

    Args:
        detections: ``rewards.detectors.Detections`` with labels indexing ``categories``.
        categories: the record's categories (distinct).
        nms_iou, max_overlap: see the module docstring.
        min_side: smallest box side in pixels.

    Returns:
        ``(boxes xyxy, scores)`` in subject order, or a rejection reason.
    """
    boxes = detections.boxes.detach().float().cpu().numpy()
    scores = detections.scores.detach().float().cpu().numpy()
    labels = detections.labels.detach().cpu().numpy()
    found, conf = [], []
    for k, cat in enumerate(categories):
        idx = np.flatnonzero(labels == k)
        kept = [idx[i] for i in nms(boxes[idx], scores[idx], nms_iou).tolist()] if len(idx) else []
        if len(kept) != 1:
            return f"{cat!r} found {len(kept)} times (need exactly 1)"
        box = [float(v) for v in boxes[kept[0]]]
        if min(box[2] - box[0], box[3] - box[1]) < min_side:
            return f"{cat!r} box {[round(v, 1) for v in box]} is smaller than {min_side:.1f} px"
        found.append(box)
        conf.append(float(scores[kept[0]]))
    for a in range(len(found)):
        for b in range(a + 1, len(found)):
            o = box_iou(found[a], found[b])
            if o > max_overlap:
                return (
                    f"boxes of {categories[a]!r} and {categories[b]!r} overlap (IoU {o:.2f} > {max_overlap})"
                )
    return found, conf


def run(out_dir: str | Path, shard: Shard, settings: dict[str, Any], seed: int) -> dict[str, Any]:
    out_dir = Path(out_dir)
    job = open_run(out_dir, "crop", shard, settings, seed)
    if job.is_done():
        return job.summary()
    inputs = stage_inputs(out_dir, "crop", shard)
    detector = build(settings["detector"])
    nms_iou, max_overlap = float(settings.get("nms_iou", 0.5)), float(settings.get("max_overlap", 0.3))
    min_box, margin = float(settings.get("min_box", 0.08)), float(settings.get("margin", 0.1))

    def process(batch: list[dict[str, Any]]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(batch)
        images, todo = [], []
        for i, r in enumerate(batch):
            im, why = load_image(out_dir / r["target"])
            if im is None:
                outcomes[i] = reject(r, f"crop: target {why}")
            elif len(set(r["categories"])) != len(r["categories"]):
                outcomes[i] = reject(
                    r, f"crop: categories repeat {r['categories']}; subjects would be ambiguous"
                )
            else:
                images.append(im)
                todo.append(i)
        if todo:
            with job.clock.model("detector"):
                dets = detector.detect(
                    [to_tensor([im])[0] for im in images], [batch[i]["categories"] for i in todo]
                )
            for i, im, det in zip(todo, images, dets, strict=True):
                r = batch[i]
                w, h = im.size
                found = locate(
                    det,
                    r["categories"],
                    nms_iou=nms_iou,
                    min_side=min_box * min(w, h),
                    max_overlap=max_overlap,
                )
                if isinstance(found, str):
                    outcomes[i] = reject(r, f"crop: {found}")
                    continue
                boxes, conf = found
                crops = []
                for k, box in enumerate(boxes):
                    path, rel = image_path(out_dir, "crop", r["id"], f"crop{k}.png")
                    save_png(im.crop(expand_box(box, margin, w, h)), path)
                    crops.append(rel)
                scores = {**r["scores"], **{f"detection_{k}": c for k, c in enumerate(conf)}}
                prov = {**r["provenance"], "crop": {"model": describe(detector)}}
                outcomes[i] = Outcome(
                    {**r, "boxes": boxes, "crops": crops, "scores": scores, "provenance": prov}
                )
        return [o for o in outcomes if o is not None]

    return job.run(inputs, process, batch_size=int(settings.get("batch_size", 8)))
