"""The OmniRef-Bench suite (DyRef's multi-reference benchmark, docs/method.md §7): its released
metadata read into records, and its subject-fidelity dimension (CLIP-I and DINOv2 of a grounded
crop of every subject against the subject's reference).

``psr-eval suite=omniref data.root=OmniRef-Bench`` (``conf/suite/omniref.yaml``) reads the released
metadata (``benchmark.json``, :func:`load_omniref`): a JSON list of ``{"image", "prompt",
"edit_image": [reference paths], "index", "category"}``, paths relative to the test-set folder.
A record is one entry: id ``omniref-<position>``, kind ``category`` (``subject``,
``subject_style``, ``subject_bg_style``, ...), every ``edit_image`` entry a reference in its
order (the model under test is given all of them). As released, a reference is a subject when its
path contains ``transfer_subjects``; the subject's detector query is its file name up to the first
``.`` (``transfer_subjects/a wild rabbit.png`` -> ``a wild rabbit``). The other references (style,
background, lighting, pose) get an empty category and are not scored here. With
``eval.source=results`` a record's image is ``<position>.png`` under ``eval.results_root`` (the
released scripts read ``<generated_images>/<position>.png``).

:class:`OmniRefScorer`, per subject of a sample: the detector's highest-scoring box for the
subject's query (Grounding DINO, box threshold 0.35, text threshold 0.25), cast with ``int()``,
widened by 10 pixels on each side and cut to the image; CLIP-I (ViT-B/16 projected image
embedding) and DINOv2 (mean of every output token of ``dinov2-base``,
:func:`dinov2_mean_tokens`) cosine between that crop and the whole reference. A subject that is
not found scores 0 in both. Per sample: ``omniref_clip_i`` and ``omniref_dino`` (means over the
sample's subjects), ``omniref_subjects``, ``omniref_detected_frac``; ``score`` = ``omniref_dino``.
The released number is the mean over all (subject, reference) pairs of the benchmark, not over
samples: the summary's ``released`` block (:meth:`OmniRefScorer.released_summary`) holds it, and
``psr-report`` shows it.

Known differences from the released script: it cuts the crop from an OpenCV (BGR) read, so its
crops reach CLIP and DINOv2 with red and blue swapped while the references do not
(``bgr_crops=true`` reproduces this); it segments with SAM 2 but crops by the box alone, as here;
a subject it does not find breaks its bookkeeping of crops and references (the zero it intends is
used here); the embedders resize float tensors where the released processors resize 8-bit images.
Only the subject-fidelity dimension is implemented; background, style, lighting, pose and the VLM
scores are not.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from psr.data.manifest import Sample, Subject
from psr.data.sources import Records, verify_images
from rewards.base import RewardInputs, check_images
from rewards.detectors import Detector
from rewards.embedders import Embedder, HFImageEmbedder
from rewards.imaging import IMAGENET_MEAN, IMAGENET_STD, ImageTransform

__all__ = ["SUBJECT_MARK", "load_omniref", "subject_query", "crop_box", "dinov2_mean_tokens", "OmniRefScorer"]

SUBJECT_MARK = "transfer_subjects"
"""A reference whose path contains this is a subject (the released rule)."""
ROLES = ("background", "style", "lighting", "pose")
MARGIN = 10


def subject_query(path: str) -> str:
    """The detector query of a subject reference: its file name up to the first ``.``."""
    return path.split("/")[-1].split(".")[0]


def _role(path: str) -> str:
    parts = path.lower().split("/")[:-1]
    return next((r for r in ROLES if r in parts), "reference")


def load_omniref(
    root: str,
    metadata: str | None = None,
    categories: Sequence[str] | None = None,
    check_images: bool = True,
    heldout: int = 0,
    run_dir: str | os.PathLike | None = None,
) -> Records:
    """OmniRef-Bench records (``data`` of ``suite=omniref``; module docstring).

    Args:
        root: the test-set folder the ``edit_image`` paths are relative to.
        metadata: the released ``benchmark.json`` (absolute, or relative to ``root``); None:
            ``<root>/benchmark.json``.
        categories: keep these categories (None: all); an unknown name is an error.
        check_images: open every reference now.
        heldout: must be 0.
        run_dir: unused.
    """
    folder = Path(os.path.expanduser(root)).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"data.root={root} is not a folder (the OmniRef-Bench test set)")
    if heldout:
        raise ValueError(f"data.heldout={heldout}: the OmniRef suite evaluates every record (set it to 0)")
    meta = folder / "benchmark.json" if metadata is None else folder / os.path.expanduser(metadata)
    if not meta.is_file():
        raise FileNotFoundError(
            f"data.metadata={metadata}: no {meta} (the released metadata/benchmark.json; set data.metadata)"
        )
    entries = json.loads(meta.read_text(encoding="utf-8"))
    if not isinstance(entries, list):
        raise ValueError(f"{meta}: expected a JSON list of samples, got {type(entries).__name__}")
    present = sorted({str(e.get("category", "")) for e in entries if isinstance(e, dict)})
    unknown = [c for c in categories or [] if c not in present]
    if unknown:
        raise ValueError(f"data.categories: {unknown} not in {meta} (categories there: {present})")
    samples = []
    for pos, e in enumerate(entries):
        where = f"{meta}: entry {pos}"
        if not isinstance(e, dict):
            raise ValueError(f"{where}: expected an object, got {type(e).__name__}")
        for field in ("prompt", "edit_image"):
            if field not in e:
                raise ValueError(
                    f"{where}: no field {field!r} (entries have image, prompt, edit_image, index, category)"
                )
        refs = e["edit_image"]
        if not isinstance(refs, list) or not refs or not all(isinstance(p, str) and p for p in refs):
            raise ValueError(
                f"{where}: field 'edit_image' must be a non-empty list of paths, got {refs!r:.80}"
            )
        category = str(e.get("category", ""))
        if categories is not None and category not in categories:
            continue
        subjects = [
            Subject(name=subject_query(p), category=subject_query(p), reference=p)
            if SUBJECT_MARK in p
            else Subject(name=_role(p), category="", reference=p)
            for p in refs
        ]
        provenance = {
            "omniref": {"index": e.get("index"), "image": e.get("image")},
            "result_path": f"{pos}.png",
        }
        samples.append(
            Sample(f"omniref-{pos:04d}", str(e["prompt"]), None, subjects, category, {}, provenance)
        )
    if not samples:
        raise ValueError(f"{meta}: no entries left (data.categories={categories})")
    if check_images:
        verify_images(samples, folder, f"data.root={root}")
    return Records(samples, [], folder)


# ---------------------------------------------------------------------------------------------- embedders


def dinov2_mean_tokens(
    path: str,
    *,
    resize: int = 256,
    crop: int = 224,
    max_batch: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> HFImageEmbedder:
    """DINOv2 from ``path`` (a local copy of ``facebook/dinov2-base``), the mean of its output
    tokens, the DINOv2 processor's preprocessing (resize 256 bicubic, crop 224, ImageNet mean/std)."""
    from transformers import Dinov2Model

    from rewards.loading import hf_from_pretrained

    model = hf_from_pretrained(
        Dinov2Model,
        path,
        owner="dinov2_mean_tokens",
        key="reward.dino.path",
        expected="a DINOv2 directory (facebook/dinov2-base) with config.json and model.safetensors",
    )
    transform = ImageTransform(resize, crop, IMAGENET_MEAN, IMAGENET_STD)
    return HFImageEmbedder(model, transform, output="mean", max_batch=max_batch, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------- scorer


def crop_box(
    box: Sequence[float] | Tensor, height: int, width: int, margin: int = MARGIN
) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` slice bounds of the released crop: the box cast with ``int()``, widened
    by ``margin`` and cut to the image (``[max(0, y1 - m), min(h - 1, y2 + m) + 1)``)."""
    x1, y1, x2, y2 = (int(float(v)) for v in box)
    return (
        max(0, y1 - margin),
        min(height - 1, y2 + margin) + 1,
        max(0, x1 - margin),
        min(width - 1, x2 + margin) + 1,
    )


class OmniRefScorer:
    """Subject fidelity of OmniRef-Bench samples (module docstring).

    Args:
        detector: an open-vocabulary detector (Grounding DINO), one query per call.
        clip: CLIP image embedder (``rewards.embedders.clip_image``, ViT-B/16 as released).
        dino: DINOv2 embedder (:func:`dinov2_mean_tokens`, ``dinov2-base`` as released).
        margin: pixels added on each side of the box.
        bgr_crops: swap red and blue of the crops, as the released script's OpenCV read does.
    """

    def __init__(
        self,
        detector: Detector,
        clip: Embedder,
        dino: Embedder,
        *,
        margin: int = MARGIN,
        bgr_crops: bool = False,
    ) -> None:
        self.detector, self.clip, self.dino = detector, clip, dino
        self.margin, self.bgr_crops = int(margin), bool(bgr_crops)

    @torch.no_grad()
    def score(
        self, images: Tensor, inputs: RewardInputs, kinds: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        """``{key: [B]}`` for a batch ``[B, 3, H, W]`` in [0, 1] (kinds are not needed)."""
        check_images(images, inputs, "OmniRefScorer")
        batch = len(inputs)
        jobs = [
            (b, k)
            for b in range(batch)
            for k, sub in enumerate(inputs.subjects[b])
            if sub.category and k < len(inputs.references[b])
        ]
        gen = images.detach().float().cpu()
        dets = (
            self.detector.detect(
                [gen[b] for b, _ in jobs], [[inputs.subjects[b][k].category] for b, k in jobs]
            )
            if jobs
            else []
        )
        crops: list[Tensor] = []
        refs: list[Tensor] = []
        found: list[int] = []  # index into jobs of each crop
        for j, ((b, k), d) in enumerate(zip(jobs, dets, strict=True)):
            mine = d.labels == 0
            if not bool(mine.any()):
                continue
            scores = d.scores[mine]
            box = d.boxes[mine][int(scores.argmax())].cpu()
            h, w = gen.shape[-2:]
            y0, y1, x0, x1 = crop_box(box, h, w, self.margin)
            if y1 <= y0 or x1 <= x0:
                continue
            crop = gen[b, :, y0:y1, x0:x1]
            crops.append(crop[[2, 1, 0]] if self.bgr_crops else crop)
            refs.append(inputs.references[b][k].detach().float().cpu())
            found.append(j)
        clip = torch.zeros(len(jobs), dtype=torch.float64)
        dino = torch.zeros(len(jobs), dtype=torch.float64)
        if crops:
            for table, embedder in ((clip, self.clip), (dino, self.dino)):
                a = embedder.embed(crops).double().cpu()
                r = embedder.embed(refs).double().cpu()
                sims = F.cosine_similarity(a, r, dim=-1)
                table[torch.tensor(found)] = sims
        counts = torch.zeros(batch, dtype=torch.float64)
        detected = torch.zeros(batch, dtype=torch.float64)
        clip_sum = torch.zeros(batch, dtype=torch.float64)
        dino_sum = torch.zeros(batch, dtype=torch.float64)
        hit = set(found)
        for j, (b, _) in enumerate(jobs):
            counts[b] += 1
            detected[b] += float(j in hit)
            clip_sum[b] += clip[j]
            dino_sum[b] += dino[j]
        none = counts == 0  # no subject reference: the sample has no subject-fidelity score
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        per = counts.clamp(min=1)
        out = {
            "omniref_clip_i": torch.where(none, nan, clip_sum / per),
            "omniref_dino": torch.where(none, nan, dino_sum / per),
            "omniref_subjects": counts,
            "omniref_detected_frac": torch.where(none, nan, detected / per),
        }
        out["score"] = out["omniref_dino"]
        return {key: v.to(device=images.device, dtype=torch.float32) for key, v in out.items()}

    def __call__(self, images: Tensor, inputs: RewardInputs) -> dict[str, Tensor]:
        return self.score(images, inputs)

    @staticmethod
    def released_summary(rows: Sequence[dict[str, Any]]) -> dict[str, float | int | None]:
        """The released aggregate over scores-file rows: CLIP-I and DINOv2 averaged over every
        (subject, reference) pair of the benchmark (each sample weighs by its subject count)."""
        pairs, found = 0.0, 0.0
        sums = {"omniref_clip_i": 0.0, "omniref_dino": 0.0}
        for r in rows:
            s = r.get("scores") or {}
            n = s.get("omniref_subjects")
            if not n or s.get("omniref_clip_i") is None:
                continue
            pairs += n
            found += s["omniref_detected_frac"] * n
            for key in sums:
                sums[key] += s[key] * n
        out: dict[str, float | int | None] = {k: (v / pairs if pairs else None) for k, v in sums.items()}
        out["omniref_subject_pairs"] = int(round(pairs))
        out["omniref_detected_frac"] = found / pairs if pairs else None
        return out
