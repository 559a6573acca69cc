"""Weight-free stand-ins with documented outputs, for the CPU quickstart and tests.

A tiny random FLUX renders smooth noise in which no detector can find a dog. So that every stage
still does its real job on CPU, the quickstart draws each category as a **sprite**: a flat shape in
the category's key colour (one distinct saturated colour per vocabulary entry, see
:func:`key_colour`). Then:

- :class:`CompositeRenderer` (stage ``target``): sprites at seeded, non-overlapping random places on
  a background (a flat colour, or an image from another renderer such as the tiny FLUX). The layout
  goes into the record's provenance, but no later stage reads it.
- :class:`ColourKeyDetector` (stages ``crop`` and ``filter``): finds each query's key colour and
  returns one box per connected region; a detector in the ``rewards.detectors`` interface. Sprites
  that touch, a key colour in the background, or an edit that hides a sprite make it fail, and the
  stage rejects the record with the reason, as with a real detector.
- :class:`PasteOnScene` (stage ``references``): the crop pasted at a seeded scale and place on a new
  background: the single-subject model stand-in (perfect identity, new surroundings).
- :class:`AccessoryEditor` (stage ``edit``): paints a band (a "hat") over the top of the edited
  subject's box.
- :class:`ColourHistogramEmbedder` (stage ``filter``): L2-normalized colour histograms, an embedder
  in the ``rewards.embedders`` interface that tells sprites of different colours apart.
"""

from __future__ import annotations

import colorsys
import hashlib
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from data_pipeline.models import Rendered
from data_pipeline.vocabulary import read_vocabulary

SHAPES = ("disc", "square", "triangle", "diamond")


def _palette() -> list[tuple[int, int, int]]:
    """384 distinct saturated colours: 64 hues x 3 values x 2 saturations.

    Saturation >= 0.8 keeps them away from the greyish images a random tiny FLUX decodes.
    """
    out: list[tuple[int, int, int]] = []
    for sat in (1.0, 0.8):
        for val in (1.0, 0.8, 0.6):
            for h in range(64):
                rgb = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(h / 64, sat, val))
                if rgb not in out:
                    out.append(rgb)  # type: ignore[arg-type]
    return out


PALETTE = _palette()


class KeyColours:
    """Category -> key colour: the i-th vocabulary entry gets palette colour i (one-to-one)."""

    def __init__(self, vocabulary: str | Path | None = None) -> None:
        names = read_vocabulary(vocabulary)
        if len(names) > len(PALETTE):
            raise ValueError(
                f"the colour-key stand-ins support at most {len(PALETTE)} categories, the vocabulary has {len(names)}"
            )
        self.colour = {n: PALETTE[i] for i, n in enumerate(names)}

    def __call__(self, category: str) -> tuple[int, int, int]:
        if category not in self.colour:
            raise KeyError(f"category {category!r} is not in the vocabulary of the colour-key stand-ins")
        return self.colour[category]


def shape_of(category: str) -> str:
    return SHAPES[hashlib.sha256(category.encode("utf-8")).digest()[0] % len(SHAPES)]


def draw_sprite(
    draw: ImageDraw.ImageDraw, shape: str, box: Sequence[int], colour: tuple[int, int, int]
) -> None:
    """A flat, un-antialiased shape filling ``box`` (xyxy, inclusive pixels)."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    if shape == "disc":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (cx, y0), (x1, y1)], fill=colour)
    else:
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)


def _background(size: tuple[int, int], seed: int) -> Image.Image:
    """A flat light grey-ish colour, seeded (never saturated: cannot match a key colour)."""
    rng = random.Random(seed)
    base = rng.randrange(150, 235)
    return Image.new("RGB", size, (base, base - rng.randrange(0, 12), base - rng.randrange(0, 12)))


class CompositeRenderer:
    """Targets composed of category sprites at seeded random places (see the module docstring).

    Args:
        height, width: target size.
        background: a renderer whose images become the backgrounds (e.g. the tiny FLUX); None = flat.
        min_size, max_size: sprite side as a fraction of the shorter image side.
        vocabulary: the category list that defines key colours (the plan's vocabulary).
    """

    def __init__(
        self,
        *,
        height: int = 128,
        width: int = 128,
        background: Any = None,
        min_size: float = 0.22,
        max_size: float = 0.34,
        vocabulary: str | None = None,
    ) -> None:
        if not 0 < min_size <= max_size < 0.5:
            raise ValueError(
                f"CompositeRenderer: need 0 < min_size <= max_size < 0.5, got {min_size}, {max_size}"
            )
        self.height, self.width = height, width
        self.background, self.min_size, self.max_size = background, min_size, max_size
        self.keys = KeyColours(vocabulary)
        bg = "flat" if background is None else getattr(background, "description", type(background).__name__)
        self.description = f"CompositeRenderer(sprites on {bg})"

    def layout(self, n: int, seed: int) -> list[list[int]]:
        """``n`` non-overlapping boxes with a 2-pixel gap (rejection sampling, seeded)."""
        rng = random.Random(seed)
        side = min(self.height, self.width)
        for _ in range(1000):
            boxes: list[list[int]] = []
            for _ in range(n):
                s = rng.randint(round(self.min_size * side), round(self.max_size * side))
                x0, y0 = rng.randint(0, self.width - s - 1), rng.randint(0, self.height - s - 1)
                box = [x0, y0, x0 + s, y0 + s]
                if all(
                    box[0] > b[2] + 2 or box[2] < b[0] - 2 or box[1] > b[3] + 2 or box[3] < b[1] - 2
                    for b in boxes
                ):
                    boxes.append(box)
            if len(boxes) == n:
                return boxes
        raise ValueError(
            f"CompositeRenderer: cannot place {n} sprites of size >= {self.min_size} on {self.width}x{self.height}"
        )

    def render(self, prompts: list[str], seeds: list[int], categories: list[list[str]]) -> list[Rendered]:
        if self.background is not None:
            backs = [
                r.image.convert("RGB").resize((self.width, self.height))
                for r in self.background.render(prompts, seeds, categories)
            ]
        else:
            backs = [_background((self.width, self.height), s) for s in seeds]
        out = []
        for back, seed, cats in zip(backs, seeds, categories, strict=True):
            boxes = self.layout(len(cats), seed)
            draw = ImageDraw.Draw(back)
            for cat, box in zip(cats, boxes, strict=True):
                draw_sprite(draw, shape_of(cat), box, self.keys(cat))
            out.append(Rendered(back, {"layout": [[float(v) for v in b] for b in boxes]}))
        return out


class ColourKeyDetector:
    """Finds sprites by key colour: each connected region of pixels within ``tolerance`` of the
    query's key colour and at least ``min_area`` pixels is one detection (score = its share of the
    sprite-coloured pixels in the image). Implements ``rewards.detectors.Detector``.

    Args:
        tolerance: max absolute difference per channel, in [0, 255] units.
        min_area: smallest region in pixels (specks in a background are ignored).
        vocabulary: the category list that defines key colours.
    """

    def __init__(self, *, tolerance: int = 6, min_area: int = 12, vocabulary: str | None = None) -> None:
        self.tolerance, self.min_area = tolerance, min_area
        self.keys = KeyColours(vocabulary)
        self.description = f"ColourKeyDetector(tolerance={tolerance}, min_area={min_area})"

    def detect(self, images: Any, queries: Sequence[Sequence[str]]) -> list[Any]:
        from scipy import ndimage

        from rewards.detectors import Detections

        ims = list(images)
        if len(ims) != len(queries):
            raise ValueError(f"ColourKeyDetector: {len(ims)} images but {len(queries)} query lists")
        out = []
        for im, qs in zip(ims, queries, strict=True):
            pixels = (
                (im.detach().float().cpu().clamp(0, 1) * 255).round().permute(1, 2, 0).numpy()
            )  # [H, W, 3]
            boxes, scores, labels = [], [], []
            for k, q in enumerate(qs):
                mask = (np.abs(pixels - np.array(self.keys(q), dtype=np.float32)) <= self.tolerance).all(-1)
                labelled, _ = ndimage.label(mask)
                total = max(int(mask.sum()), 1)
                for i, sl in enumerate(ndimage.find_objects(labelled)):
                    area = int((labelled[sl] == i + 1).sum())
                    if area >= self.min_area:
                        boxes.append([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop])
                        scores.append(area / total)
                        labels.append(k)
            out.append(Detections.from_boxes(boxes, labels, scores))
        return out


class PasteOnScene:
    """Reference stand-in: the crop pasted at ``scale`` x the canvas (seeded jitter) on a new background.

    ``edit(crops, scene_prompts, seeds)`` as :class:`~data_pipeline.models.Editor`. The background is
    a flat seeded colour, or an image from ``background`` (a renderer, e.g. the tiny FLUX, given the
    scene prompt).
    """

    def __init__(
        self, *, size: int = 96, scale: tuple[float, float] = (0.55, 0.8), background: Any = None
    ) -> None:
        self.size, self.scale, self.background = size, tuple(scale), background
        bg = "flat" if background is None else getattr(background, "description", type(background).__name__)
        self.description = f"PasteOnScene(on {bg})"

    def edit(
        self, images: list[Image.Image], prompts: list[str], seeds: list[int], boxes: Any = None
    ) -> list[Image.Image]:
        if self.background is not None:
            backs = [
                r.image.convert("RGB").resize((self.size, self.size))
                for r in self.background.render(prompts, seeds, [[] for _ in seeds])
            ]
        else:
            backs = [_background((self.size, self.size), s + 1) for s in seeds]
        out = []
        for crop, back, seed in zip(images, backs, seeds, strict=True):
            rng = random.Random(seed)
            w, h = crop.size
            side = rng.uniform(*self.scale) * self.size
            f = side / max(w, h)
            nw, nh = max(1, round(w * f)), max(1, round(h * f))
            # nearest keeps the key colour exact inside the sprite
            piece = crop.resize((nw, nh), Image.Resampling.NEAREST)
            back.paste(piece, (rng.randint(0, self.size - nw), rng.randint(0, self.size - nh)))
            out.append(back)
        return out


class AccessoryEditor:
    """Edit stand-in: paints a dark band over the top fifth of the edited subject's box (a "hat")."""

    description = "AccessoryEditor(band over the subject's top fifth)"

    def edit(
        self, images: list[Image.Image], prompts: list[str], seeds: list[int], boxes: Any = None
    ) -> list[Image.Image]:
        if boxes is None:
            raise ValueError("AccessoryEditor needs the edited subject's box for each image")
        out = []
        for im, box in zip(images, boxes, strict=True):
            im = im.copy()
            if box is not None:
                x0, y0, x1, y1 = box
                ImageDraw.Draw(im).rectangle([x0, y0, x1, y0 + (y1 - y0) / 5], fill=(40, 30, 30))
            out.append(im)
        return out


class ColourHistogramEmbedder:
    """Joint RGB histogram (``bins`` per channel) of each image, L2-normalized: ``embed -> [N, bins^3]``.

    Weight-free and deterministic; implements ``rewards.embedders.Embedder``. Two crops of the same
    sprite score ~1, sprites of different key colours score near the background's share.
    """

    def __init__(self, bins: int = 8) -> None:
        self.bins = bins
        self.description = f"ColourHistogramEmbedder(bins={bins})"

    def embed(self, images: Any) -> Any:
        import torch

        feats = []
        for im in images:
            q = (im.detach().float().cpu().clamp(0, 1) * (self.bins - 1e-6)).long()  # [3, H, W] bin ids
            idx = (q[0] * self.bins + q[1]) * self.bins + q[2]
            feats.append(torch.bincount(idx.flatten(), minlength=self.bins**3).float())
        return torch.nn.functional.normalize(torch.stack(feats), dim=-1)
