"""Open-vocabulary detectors behind one interface: ``detect(images, queries) -> list[Detections]``.

- :class:`GroundingDinoDetector` (transformers ``GroundingDinoForObjectDetection``; PSRBench's
  detector, box threshold 0.35, text threshold 0.25),
- :class:`Owlv2Detector` (transformers ``Owlv2ForObjectDetection``),
- :class:`BoxesDetector`: returns boxes given in advance (dataset annotations, precomputed PSRBench
  boxes, tests),
- :class:`ForegroundDetector`: weight-free, connected regions that differ from the background
  colour (subjects on a blank canvas: synthetic data, tests).

All take a batch ``[B, 3, H, W]`` or a list of ``[3, h_i, w_i]`` images in [0, 1] and run one forward
over the batch; boxes come back as xyxy pixels of each input image. Preprocessing (resize, normalize,
tokenize) is written here so that no processor files from the hub are needed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from rewards.base import resolve_dtype
from rewards.imaging import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, as_image_list, normalize
from rewards.loading import hf_from_pretrained

__all__ = [
    "Detections",
    "Detector",
    "GroundingDinoDetector",
    "Owlv2Detector",
    "BoxesDetector",
    "ForegroundDetector",
    "grounding_dino",
    "owlv2",
]


@dataclass(frozen=True)
class Detections:
    """Detections in one image.

    Attributes:
        boxes: ``[D, 4]`` float32, xyxy in pixels of the image given to ``detect``.
        scores: ``[D]`` float32 confidence in [0, 1].
        labels: ``[D]`` int64, index of the query (in that image's query list) the box matches.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        d = self.scores.shape[0] if self.scores.ndim == 1 else -1
        if self.boxes.shape != (d, 4) or self.labels.shape != (d,):
            raise ValueError(
                f"Detections: boxes {tuple(self.boxes.shape)}, scores {tuple(self.scores.shape)} and labels "
                f"{tuple(self.labels.shape)} must be [D, 4], [D], [D]"
            )

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @classmethod
    def empty(cls, device: torch.device | str = "cpu") -> Detections:
        return cls(
            torch.zeros(0, 4, device=device),
            torch.zeros(0, device=device),
            torch.zeros(0, dtype=torch.long, device=device),
        )

    @classmethod
    def from_boxes(
        cls, boxes: Sequence[Sequence[float]], labels: Sequence[int], scores: Sequence[float] | None = None
    ) -> Detections:
        n = len(boxes)
        return cls(
            torch.tensor([list(map(float, b)) for b in boxes], dtype=torch.float32).reshape(n, 4),
            torch.tensor(list(scores) if scores is not None else [1.0] * n, dtype=torch.float32),
            torch.tensor(list(labels), dtype=torch.long),
        )

    def select(self, index: Tensor) -> Detections:
        return Detections(self.boxes[index], self.scores[index], self.labels[index])


@runtime_checkable
class Detector(Protocol):
    """``detect(images, queries)``: ``queries[b]`` are the texts to look for in image b."""

    def detect(
        self, images: Tensor | Sequence[Tensor], queries: Sequence[Sequence[str]]
    ) -> list[Detections]: ...


def _check_queries(n: int, queries: Sequence[Sequence[str]], owner: str) -> list[list[str]]:
    if len(queries) != n:
        raise ValueError(f"{owner}: {n} images but {len(queries)} query lists")
    out = [[str(q).strip() for q in qs] for qs in queries]
    for b, qs in enumerate(out):
        if any(not q for q in qs):
            raise ValueError(f"{owner}: image {b} has an empty query in {qs}")
    return out


def _chunked(detect: Callable, ims: list[Tensor], qs: list[list[str]], size: int) -> list[Detections]:
    """``detect`` over chunks of at most ``size`` images: fixed-size inputs make this equal to one call."""
    return [d for i in range(0, len(ims), size) for d in detect(ims[i : i + size], qs[i : i + size])]


def _cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def _scale_and_clip(
    boxes: Tensor, scale_w: float, scale_h: float, width: int | None, height: int | None
) -> Tensor:
    """Normalized xyxy -> pixels, clipped to the image (a box that spills over the edge still crops);
    ``width``/``height`` None: not clipped."""
    out = boxes.float() * torch.tensor([scale_w, scale_h, scale_w, scale_h], device=boxes.device)
    if width is not None and height is not None:
        out[:, 0::2] = out[:, 0::2].clamp(0, width)
        out[:, 1::2] = out[:, 1::2].clamp(0, height)
    return out


# ---------------------------------------------------------------------------------------------- Grounding DINO


class GroundingDinoDetector:
    """Grounding DINO on a batch, with the queries of each image joined into one caption.

    Caption of image b: ``"q1 . q2 . ... ."`` (lower case, as Grounding DINO was trained), tokenized
    by a BERT WordPiece tokenizer. A box is kept when its highest token probability exceeds
    ``box_threshold`` (Grounding DINO's rule); its label is the query whose tokens reach the highest
    probability, and that probability (its score) must exceed ``text_threshold``. Where the original
    would return a merged phrase for a box matching two queries, this returns the better one.

    Preprocessing: resize (bilinear, aspect kept) so the longer side is ``size``, ImageNet mean/std,
    zero-pad to ``size`` x ``size`` with a pixel mask; predicted boxes are fractions of each unpadded
    image. For square images this is the processor's rule (shorter side 800); padding every image to
    the same square (instead of to the batch's largest, as the processor does) makes a detection
    independent of the other images in the batch, so one forward serves any mix of sizes.

    Args:
        model: a ``GroundingDinoForObjectDetection``.
        tokenizer: its BERT tokenizer (``[CLS]``=101, ``[SEP]``=102, "."=1012: the model treats
            these ids as separators).
        box_threshold, text_threshold: in [0, 1].
        size: side of the square input in pixels.
        max_batch: images per forward (None: all in one); bounds memory, same results.
        device, dtype: where and in which precision the model runs.
        clip_boxes: clip boxes to the image (False: as predicted, possibly past the edges, which
            PSRBench's released evaluation slices as they are; docs/method.md §6.2).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        size: int = 800,
        max_batch: int | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        clip_boxes: bool = True,
    ) -> None:
        for name, v in (("box_threshold", box_threshold), ("text_threshold", text_threshold)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"GroundingDinoDetector: {name}={v} must be in [0, 1]")
        self.device, self.dtype = torch.device(device), resolve_dtype(dtype)
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.box_threshold, self.text_threshold = float(box_threshold), float(text_threshold)
        self.size = int(size)
        self.max_batch = max_batch
        self.clip_boxes = bool(clip_boxes)
        self.max_text_len = int(model.config.max_text_len)

    def _encode_text(self, queries: list[list[str]]) -> tuple[Tensor, Tensor, list[list[tuple[int, int]]]]:
        """Token ids ``[B, T]``, attention mask ``[B, T]`` and, per image, the token span of each query.

        The ids are built by concatenating per-query tokenizations, which equals tokenizing the joined
        caption: BERT splits on whitespace and punctuation before WordPiece."""
        tok = self.tokenizer
        dot = tok.convert_tokens_to_ids(".")
        ids_list, spans_list = [], []
        for qs in queries:
            ids, spans = [tok.cls_token_id], []
            pieces = tok([q.lower() for q in qs], add_special_tokens=False)["input_ids"] if qs else []
            for q, piece in zip(qs, pieces, strict=True):
                if not piece:
                    raise ValueError(f"GroundingDinoDetector: query {q!r} tokenizes to nothing")
                spans.append((len(ids), len(ids) + len(piece)))
                ids += list(piece) + [dot]
            ids.append(tok.sep_token_id)
            if len(ids) > self.max_text_len:
                raise ValueError(
                    f"GroundingDinoDetector: the caption for queries {qs} has {len(ids)} tokens; the model "
                    f"takes at most {self.max_text_len}"
                )
            ids_list.append(ids)
            spans_list.append(spans)
        length = max(len(i) for i in ids_list)
        input_ids = torch.full((len(ids_list), length), int(tok.pad_token_id or 0), dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for b, ids in enumerate(ids_list):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            mask[b, : len(ids)] = 1
        return input_ids.to(self.device), mask.to(self.device), spans_list

    def _encode_images(self, images: list[Tensor]) -> tuple[Tensor, Tensor]:
        """``[N, 3, size, size]`` normalized pixels (each image resized to fit, zero-padded at the
        bottom/right) and the ``[N, size, size]`` mask of real pixels."""
        n, s = len(images), self.size
        pixels = torch.zeros(n, 3, s, s, device=self.device)
        pixel_mask = torch.zeros(n, s, s, dtype=torch.long, device=self.device)
        for b, im in enumerate(images):
            h, w = im.shape[-2:]
            scale = s / max(h, w)
            rh, rw = max(1, min(s, round(h * scale))), max(1, min(s, round(w * scale)))
            x = im[None].to(self.device, torch.float32)
            if (rh, rw) != (h, w):
                x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
            pixels[b, :, :rh, :rw] = normalize(x, IMAGENET_MEAN, IMAGENET_STD)[0]
            pixel_mask[b, :rh, :rw] = 1
        return pixels.to(self.dtype), pixel_mask

    @torch.no_grad()
    def detect(self, images: Tensor | Sequence[Tensor], queries: Sequence[Sequence[str]]) -> list[Detections]:
        ims = as_image_list(images, "GroundingDinoDetector")
        qs = _check_queries(len(ims), queries, "GroundingDinoDetector")
        if self.max_batch and len(ims) > self.max_batch:
            return _chunked(self.detect, ims, qs, self.max_batch)
        if not ims:
            return []
        input_ids, attention_mask, spans = self._encode_text(qs)
        pixels, pixel_mask = self._encode_images(ims)
        out = self.model(
            pixel_values=pixels, input_ids=input_ids, attention_mask=attention_mask, pixel_mask=pixel_mask
        )
        probs = out.logits.float().sigmoid()  # [B, Q, max_text_len]; -inf (prob 0) past the caption
        boxes = _cxcywh_to_xyxy(out.pred_boxes.float())  # [B, Q, 4], fractions of each unpadded image
        results = []
        for b, im in enumerate(ims):
            if not spans[b]:
                results.append(Detections.empty(self.device))
                continue
            phrase = torch.stack([probs[b, :, s:e].max(-1).values for s, e in spans[b]], dim=-1)  # [Q, P]
            score, label = phrase.max(-1)
            keep = (probs[b].max(-1).values > self.box_threshold) & (score > self.text_threshold)
            h, w = im.shape[-2:]
            limit = (w, h) if self.clip_boxes else (None, None)
            results.append(
                Detections(_scale_and_clip(boxes[b][keep], w, h, *limit), score[keep], label[keep])
            )
        return results


# ---------------------------------------------------------------------------------------------- OWLv2


class Owlv2Detector:
    """OWLv2 on a batch: every query of an image is a separate text embedding.

    Preprocessing (the processor's): pad each image to a square at the bottom/right with grey 0.5,
    resize to the model's image size (bilinear), CLIP mean/std. Boxes are fractions of the padded
    square. Images with fewer queries than the batch's most get all-zero query rows, which the model
    masks out. A box is kept when the sigmoid of its best query logit exceeds ``threshold``.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        threshold: float = 0.1,
        max_batch: int | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
    ) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"Owlv2Detector: threshold={threshold} must be in [0, 1]")
        self.device, self.dtype = torch.device(device), resolve_dtype(dtype)
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.threshold = float(threshold)
        self.max_batch = max_batch
        self.image_size = int(model.config.vision_config.image_size)
        self.max_query_length = int(model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def detect(self, images: Tensor | Sequence[Tensor], queries: Sequence[Sequence[str]]) -> list[Detections]:
        ims = as_image_list(images, "Owlv2Detector")
        qs = _check_queries(len(ims), queries, "Owlv2Detector")
        if self.max_batch and len(ims) > self.max_batch:
            return _chunked(self.detect, ims, qs, self.max_batch)
        if not ims:
            return []
        n_max = max(1, max(len(q) for q in qs))
        flat = [q for image_qs in qs for q in image_qs]
        ids = torch.zeros(len(ims) * n_max, self.max_query_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        mask[:, 0] = 1  # padded query rows attend to their first token only (no all-masked softmax)
        if flat:
            tok = self.tokenizer(
                flat,
                padding="max_length",
                truncation=True,
                max_length=self.max_query_length,
                return_tensors="pt",
            )
            rows = [b * n_max + k for b, image_qs in enumerate(qs) for k in range(len(image_qs))]
            ids[rows], mask[rows] = tok["input_ids"], tok["attention_mask"]
        pixels = []
        for im in ims:
            h, w = im.shape[-2:]
            side = max(h, w)
            square = torch.full((1, 3, side, side), 0.5, device=self.device)
            square[0, :, :h, :w] = im.to(self.device, torch.float32)
            pixels.append(
                F.interpolate(
                    square, size=(self.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False
                )
            )
        pixel_values = normalize(torch.cat(pixels), CLIP_MEAN, CLIP_STD).to(self.dtype)
        out = self.model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), pixel_values=pixel_values
        )
        logits = out.logits.float()  # [B, P, n_max]
        boxes = _cxcywh_to_xyxy(out.pred_boxes.float())  # [B, P, 4], fractions of the padded square
        results = []
        for b, im in enumerate(ims):
            n = len(qs[b])
            if n == 0:
                results.append(Detections.empty(self.device))
                continue
            best, label = logits[b, :, :n].max(-1)
            score = best.sigmoid()
            keep = score > self.threshold
            h, w = im.shape[-2:]
            side = max(h, w)
            results.append(
                Detections(_scale_and_clip(boxes[b][keep], side, side, w, h), score[keep], label[keep])
            )
        return results


# ---------------------------------------------------------------------------------------------- given boxes


class BoxesDetector:
    """Returns boxes known in advance: ``boxes[b][query]`` lists the xyxy pixel boxes of ``query`` in
    the b-th image of a call (score 1). Queries without an entry have no detection.

    A callable ``boxes(b, image, queries) -> Detections`` may be given instead of a list.
    """

    def __init__(
        self,
        boxes: Sequence[Mapping[str, Sequence[Sequence[float]]]]
        | Callable[[int, Tensor, list[str]], Detections],
    ) -> None:
        self.boxes = boxes

    def detect(self, images: Tensor | Sequence[Tensor], queries: Sequence[Sequence[str]]) -> list[Detections]:
        ims = as_image_list(images, "BoxesDetector")
        qs = _check_queries(len(ims), queries, "BoxesDetector")
        if callable(self.boxes):
            return [self.boxes(b, im, q) for b, (im, q) in enumerate(zip(ims, qs, strict=True))]
        if len(self.boxes) != len(ims):
            raise ValueError(f"BoxesDetector: boxes for {len(self.boxes)} images, called with {len(ims)}")
        out = []
        for b, image_qs in enumerate(qs):
            given = self.boxes[b]
            pairs = [(box, k) for k, q in enumerate(image_qs) for box in given.get(q, [])]
            out.append(Detections.from_boxes([p[0] for p in pairs], [p[1] for p in pairs]))
        return out


class ForegroundDetector:
    """Weight-free: each connected region whose colour differs from the background by more than
    ``tolerance`` (max over channels) and covers at least ``min_area`` pixels is one box, reported for
    every query (it cannot tell categories apart), scored by its share of the image's foreground.

    The background is ``background`` (RGB in [0, 1]) or, when None, the median colour of the four
    corner pixels. Meant for subjects on a blank canvas (synthetic data, tests), not for photos.
    """

    def __init__(
        self, background: Sequence[float] | None = None, tolerance: float = 0.1, min_area: int = 4
    ) -> None:
        self.background = (
            None if background is None else torch.tensor([float(v) for v in background]).view(3, 1, 1)
        )
        self.tolerance, self.min_area = float(tolerance), int(min_area)

    def detect(self, images: Tensor | Sequence[Tensor], queries: Sequence[Sequence[str]]) -> list[Detections]:
        from scipy import ndimage

        ims = as_image_list(images, "ForegroundDetector")
        qs = _check_queries(len(ims), queries, "ForegroundDetector")
        out = []
        for im, image_qs in zip(ims, qs, strict=True):
            x = im.detach().float().cpu()
            bg = self.background
            if bg is None:
                corners = torch.stack([x[:, 0, 0], x[:, 0, -1], x[:, -1, 0], x[:, -1, -1]], dim=1)
                bg = corners.median(dim=1).values.view(3, 1, 1)
            fg = ((x - bg).abs().amax(0) > self.tolerance).numpy()
            labelled, count = ndimage.label(fg)
            regions = ndimage.find_objects(labelled)
            total = max(int(fg.sum()), 1)
            boxes, scores = [], []
            for i, sl in enumerate(regions):
                area = int((labelled[sl] == i + 1).sum())
                if area >= self.min_area:
                    boxes.append([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop])
                    scores.append(area / total)
            pairs = [(box, s, k) for k in range(len(image_qs)) for box, s in zip(boxes, scores, strict=True)]
            out.append(
                Detections.from_boxes([p[0] for p in pairs], [p[2] for p in pairs], [p[1] for p in pairs])
            )
        return out


# ---------------------------------------------------------------------------------------------- loaders


def grounding_dino(
    path: str,
    *,
    box_threshold: float = 0.35,
    text_threshold: float = 0.25,
    size: int = 800,
    max_batch: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    clip_boxes: bool = True,
) -> GroundingDinoDetector:
    """Grounding DINO from ``path`` (e.g. a local copy of ``IDEA-Research/grounding-dino-tiny``: the
    SwinT-OGC weights PSRBench uses): model and BERT tokenizer files from the same directory."""
    from transformers import AutoTokenizer, GroundingDinoForObjectDetection

    expected = "a Grounding DINO directory with config.json, model.safetensors and tokenizer files (vocab.txt or tokenizer.json)"
    key = "reward.detector.path"
    model = hf_from_pretrained(
        GroundingDinoForObjectDetection, path, owner="grounding_dino", key=key, expected=expected
    )
    tokenizer = hf_from_pretrained(AutoTokenizer, path, owner="grounding_dino", key=key, expected=expected)
    return GroundingDinoDetector(
        model,
        tokenizer,
        box_threshold=box_threshold,
        text_threshold=text_threshold,
        size=size,
        max_batch=max_batch,
        device=device,
        dtype=dtype,
        clip_boxes=clip_boxes,
    )


def owlv2(
    path: str,
    *,
    threshold: float = 0.1,
    max_batch: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> Owlv2Detector:
    """OWLv2 from ``path`` (e.g. a local copy of ``google/owlv2-base-patch16-ensemble``)."""
    from transformers import AutoTokenizer, Owlv2ForObjectDetection

    expected = "an OWLv2 directory with config.json, model.safetensors and CLIP tokenizer files (vocab.json, merges.txt)"
    key = "reward.detector.path"
    model = hf_from_pretrained(Owlv2ForObjectDetection, path, owner="owlv2", key=key, expected=expected)
    tokenizer = hf_from_pretrained(AutoTokenizer, path, owner="owlv2", key=key, expected=expected)
    return Owlv2Detector(
        model, tokenizer, threshold=threshold, max_batch=max_batch, device=device, dtype=dtype
    )
