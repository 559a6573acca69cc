"""Detectors: post-processing checked on stand-in models with chosen outputs; tiny real models batched."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rewards.detectors import (
    BoxesDetector,
    Detections,
    ForegroundDetector,
    GroundingDinoDetector,
    Owlv2Detector,
)
from rewards.testing import tiny_bert_tokenizer


class _Fixed(nn.Module):
    """Returns the given logits / boxes and records its inputs."""

    def __init__(self, logits: torch.Tensor, boxes: torch.Tensor, config: SimpleNamespace) -> None:
        super().__init__()
        self.register_buffer("logits", logits)
        self.register_buffer("boxes", boxes)
        self.config = config
        self.seen: dict = {}

    def forward(self, **kwargs):
        self.seen = kwargs
        return SimpleNamespace(logits=self.logits, pred_boxes=self.boxes)


def test_grounding_dino_caption_tokens_equal_the_joined_caption():
    tok = tiny_bert_tokenizer()
    det = GroundingDinoDetector(
        _Fixed(torch.zeros(1, 1, 32), torch.zeros(1, 1, 4), SimpleNamespace(max_text_len=32)), tok
    )
    ids, mask, spans = det._encode_text([["Dog", "teddy bear"], ["cat"]])
    joined = tok("dog . teddy bear .")["input_ids"]
    assert ids[0, : len(joined)].tolist() == joined and mask[0].sum() == len(joined)
    assert ids[0, 0] == 101 and ids[0, len(joined) - 1] == 102 and ids[0, 2] == 1012
    assert spans[0][0] == (1, 2) and tok.decode(ids[0, spans[0][1][0] : spans[0][1][1]]) == "teddy bear"
    assert tok("cat .")["input_ids"] == ids[1, : mask[1].sum()].tolist()


def test_grounding_dino_thresholds_labels_and_pixel_boxes():
    # caption "[CLS] dog . cat . [SEP]": dog = token 1, cat = token 3, "." = 2 and 4
    logit = lambda p: torch.log(torch.tensor(p) / (1 - torch.tensor(p)))  # noqa: E731
    logits = torch.full((1, 4, 8), -float("inf"))
    logits[0, :, :6] = logit(0.01)
    logits[0, 0, 3] = logit(0.8)  # box 0: cat at 0.8 -> kept, label 1
    logits[0, 1, 1] = logit(0.3)  # box 1: dog at 0.3 -> below box threshold 0.35
    logits[0, 2, 2] = logit(0.9)  # box 2: "." at 0.9 passes the box threshold, no query token passes 0.25
    logits[0, 3, 1] = logit(0.5)  # box 3: dog at 0.5 -> kept, label 0
    boxes = torch.tensor(
        [[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.5, 0.5, 0.5, 0.5], [0.25, 0.75, 0.5, 0.5]]]
    )
    model = _Fixed(logits, boxes, SimpleNamespace(max_text_len=8))
    det = GroundingDinoDetector(model, tiny_bert_tokenizer(), size=40)
    image = torch.rand(3, 20, 40)  # H=20, W=40: resized to 20 x 40 inside a 40 x 40 padded square
    (out,) = det.detect([image], [["dog", "cat"]])
    assert out.labels.tolist() == [1, 0]
    assert out.scores.tolist() == pytest.approx([0.8, 0.5], abs=1e-6)
    # fractions of the unpadded image (W=40, H=20), clipped to it
    assert torch.allclose(
        out.boxes, torch.tensor([[16.0, 6.0, 24.0, 14.0], [0.0, 10.0, 20.0, 20.0]]), atol=1e-5
    )
    assert model.seen["pixel_mask"][0].sum() == 20 * 40 and model.seen["pixel_values"].shape == (1, 3, 40, 40)


def test_owlv2_masks_padded_queries_and_scales_to_the_padded_square():
    logits = torch.tensor(
        [[[2.0, -1.0], [-3.0, 1.0], [-5.0, -4.0]], [[0.5, 9.0], [-1.0, 9.0], [-9.0, 9.0]]]
    )  # [B=2, P=3, Q=2]
    boxes = torch.tensor([[[0.5, 0.25, 0.2, 0.1]] * 3, [[0.5, 0.5, 1.0, 1.0]] * 3])
    cfg = SimpleNamespace(
        vision_config=SimpleNamespace(image_size=16), text_config=SimpleNamespace(max_position_embeddings=8)
    )
    model = _Fixed(logits, boxes, cfg)
    from rewards.testing import clip_tokenizer

    det = Owlv2Detector(model, clip_tokenizer(8), threshold=0.5)
    out = det.detect([torch.rand(3, 10, 40), torch.rand(3, 30, 30)], [["dog", "cat"], ["cup"]])
    assert (
        model.seen["input_ids"].shape == (4, 8) and model.seen["input_ids"][3].abs().sum() == 0
    )  # the missing query row
    assert out[0].labels.tolist() == [0, 1] and out[0].scores.tolist() == pytest.approx(
        [torch.sigmoid(torch.tensor(2.0)).item(), torch.sigmoid(torch.tensor(1.0)).item()]
    )
    # image 0 is padded to 40 x 40: the box is a fraction of that square, clipped to the 10-high image
    assert out[0].boxes[0].tolist() == pytest.approx([16.0, 8.0, 24.0, 10.0])
    assert out[1].labels.tolist() == [0] and out[1].scores.item() == pytest.approx(
        torch.sigmoid(torch.tensor(0.5)).item()
    )


@pytest.mark.parametrize("kind", ["grounding_dino", "owlv2"])
def test_tiny_detectors_batch_equals_single_calls(kind):
    from rewards.testing import tiny_grounding_dino, tiny_owlv2

    det = (
        tiny_grounding_dino(0, box_threshold=0.3)
        if kind == "grounding_dino"
        else tiny_owlv2(0, threshold=0.3)
    )
    g = torch.Generator().manual_seed(0)
    images = [
        torch.rand(3, 64, 64, generator=g),
        torch.rand(3, 48, 80, generator=g),
        torch.rand(3, 90, 40, generator=g),
    ]
    queries = [["dog", "cat"], ["cup"], ["teddy bear", "dog", "mug"]]
    batched = det.detect(images, queries)
    assert sum(len(d) for d in batched) > 0
    for im, q, d in zip(images, queries, batched, strict=True):
        (single,) = det.detect([im], [q])
        assert torch.equal(single.labels, d.labels)
        assert torch.allclose(single.boxes, d.boxes, atol=1e-3) and torch.allclose(
            single.scores, d.scores, atol=1e-5
        )
        h, w = im.shape[-2:]
        assert (d.boxes[:, 0::2] <= w).all() and (d.boxes[:, 1::2] <= h).all() and (d.boxes >= 0).all()
        assert (d.labels < len(q)).all()


def test_foreground_detector_finds_pasted_subjects(patch, paste):
    canvas = torch.ones(3, 60, 80)
    box_a = paste(canvas, patch(1, 10, 20), 5, 5)
    box_b = paste(canvas, patch(2, 25, 15), 50, 30)
    (out,) = ForegroundDetector().detect([canvas], [["dog", "cat"]])
    found = sorted(map(tuple, out.boxes.tolist()))
    assert found == sorted([tuple(box_a), tuple(box_b)] * 2)  # each region for each query
    assert sorted(out.labels.tolist()) == [0, 0, 1, 1]
    assert out.scores[out.labels == 0].sum().item() == pytest.approx(1.0)


def test_boxes_detector_returns_given_boxes():
    det = BoxesDetector([{"dog": [[1, 2, 3, 4]], "cat": [[5, 6, 7, 8], [0, 0, 1, 1]]}])
    (out,) = det.detect(torch.rand(1, 3, 10, 10), [["cat", "bird"]])
    assert out.boxes.tolist() == [[5, 6, 7, 8], [0, 0, 1, 1]] and out.labels.tolist() == [0, 0]
    with pytest.raises(ValueError, match="boxes for 1 images, called with 2"):
        det.detect(torch.rand(2, 3, 10, 10), [["cat"], ["dog"]])
    with pytest.raises(ValueError, match=r"\[D, 4\]"):
        Detections(torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, dtype=torch.long))


def test_max_batch_chunks_give_the_same_detections():
    from rewards.testing import tiny_grounding_dino

    whole = tiny_grounding_dino(0, box_threshold=0.3)
    chunked = tiny_grounding_dino(0, box_threshold=0.3)
    chunked.max_batch = 2
    images = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    queries = [["dog"], ["cat", "dog"], ["cup"], ["dog"], ["mug", "cat"]]
    for a, b in zip(whole.detect(images, queries), chunked.detect(images, queries), strict=True):
        assert len(a) > 0  # boxes in every image (9-16 at this threshold): no empty-vs-empty comparison
        assert torch.equal(a.labels, b.labels) and torch.allclose(a.boxes, b.boxes, atol=1e-3)
