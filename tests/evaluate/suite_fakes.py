"""Weight-free stand-ins for the PSRBench suite's models, importable as Hydra targets
(``reward.detector._target_=tests.evaluate.suite_fakes.ColourDetector``).

- :class:`ColourDetector`: a category is a colour name; its boxes are the connected regions of
  that colour, in raster order (the order the released script would take them in);
- :class:`MeanEmbedder`: per-channel mean and std and the crop size, L2-normalised;
- :class:`FakeJudge`: meets the judge API (``with_template``, the reward contract, ``complete``);
  a fixed score per template, a failure for prompts containing ``[unreadable]``;
- :class:`FakeHPS`: ten times the mean pixel value (so ``/10`` is the mean pixel).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from rewards.base import RewardInputs
from rewards.detectors import Detections

COLOURS = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "black": (0.0, 0.0, 0.0),
}
TEMPLATE_SCORES = {
    "psrbench_attribute": 7.0,
    "psrbench_action": 6.0,
    "psrbench_background": 5.0,
    "psrbench_complex": 9.0,
}


class ColourDetector:
    def detect(self, images, queries):
        from scipy import ndimage

        out = []
        for im, qs in zip(images, queries, strict=True):
            x = im.detach().float().cpu()
            boxes, labels = [], []
            for k, q in enumerate(qs):
                colour = torch.tensor(COLOURS[q]).view(3, 1, 1)
                mask = ((x - colour).abs().amax(0) < 0.05).numpy()
                labelled, _ = ndimage.label(mask)
                for sl in ndimage.find_objects(labelled):
                    boxes.append([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop])
                    labels.append(k)
            out.append(Detections.from_boxes(boxes, labels))
        return out


class MeanEmbedder:
    def embed(self, images):
        rows = []
        for im in images:
            x = im.double()
            size = torch.tensor([im.shape[1] / 10, im.shape[2] / 10], dtype=torch.float64)
            rows.append(torch.cat([x.mean((1, 2)), x.std((1, 2), unbiased=False), size]))
        return torch.nn.functional.normalize(torch.stack(rows).float(), dim=-1)


class FakeJudge:
    def __init__(self, template: str = "psrbench_complex") -> None:
        self.template = template

    def with_template(self, name: str) -> FakeJudge:
        return FakeJudge(name)

    def __call__(self, images: Tensor, inputs: RewardInputs) -> dict[str, Tensor]:
        raw = torch.tensor(
            [math.nan if "[unreadable]" in p else TEMPLATE_SCORES[self.template] for p in inputs.prompts]
        )
        return {"score": raw / 10, "raw": raw, "failed": torch.isnan(raw).float()}

    def complete(self, images: list[list[Tensor]], texts: list[str]) -> list[str | None]:
        return [None if "[unreadable]" in t else "[Thought]: fine [Score]: 8" for t in texts]


class FakeHPS:
    def __call__(self, images: Tensor, inputs: RewardInputs) -> dict[str, Tensor]:
        return {"score": 10 * images.float().mean((1, 2, 3))}


def canvas(size: int, pieces: list[tuple[str, tuple[int, int, int, int]]]) -> np.ndarray:
    """A white ``[size, size, 3]`` uint8 image with a filled rectangle of each colour at its xyxy box."""
    arr = np.full((size, size, 3), 255, dtype=np.uint8)
    for colour, (x1, y1, x2, y2) in pieces:
        arr[y1:y2, x1:x2] = (np.array(COLOURS[colour]) * 255).astype(np.uint8)
    return arr
