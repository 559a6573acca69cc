"""A synthetic prompt set made in code: coloured shapes as subjects, written as a real manifest.

This is what ``data=synthetic`` (the RL quickstart) trains on when no manifest is given. It goes
through the same manifest reader as real data, so the quickstart exercises the user's data path.
Each record has 2-3 subjects; subject k's reference is a flat-coloured shape on a white canvas and
the target (for SFT) places all of them on one canvas at known boxes.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from psr.data.manifest import Sample, Subject, write_manifest

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("square", "disc", "triangle")


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour: tuple[int, int, int]
) -> None:
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "disc":
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=colour)


def write_synthetic_manifest(
    out_dir: str | Path,
    *,
    num_records: int = 16,
    num_subjects: tuple[int, ...] = (2, 3),
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write ``out_dir/manifest.jsonl`` with images under ``out_dir/images``; returns the manifest path.

    Deterministic in ``seed``; an existing complete manifest is reused.
    """
    out = Path(out_dir)
    manifest = out / "manifest.jsonl"
    if manifest.is_file():
        return manifest
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    samples = []
    size = image_size
    for i in range(num_records):
        n = rng.choice(list(num_subjects))
        colours = rng.sample(sorted(COLOURS), n)
        shapes = [rng.choice(SHAPES) for _ in range(n)]
        target = Image.new("RGB", (size, size), (255, 255, 255))
        tdraw = ImageDraw.Draw(target)
        cell = size // n
        subjects = []
        for k, (colour, shape) in enumerate(zip(colours, shapes, strict=True)):
            ref = Image.new("RGB", (size, size), (255, 255, 255))
            m = size // 6
            draw_shape(ImageDraw.Draw(ref), shape, (m, m, size - m, size - m), COLOURS[colour])
            ref_path = f"images/{i:05d}_ref{k}.png"
            ref.save(out / ref_path)
            box = (k * cell + 2, size // 4, (k + 1) * cell - 2, size // 4 + cell - 4)
            draw_shape(tdraw, shape, box, COLOURS[colour])
            subjects.append(
                Subject(
                    name=f"{colour} {shape}", category=shape, reference=ref_path, box=[float(v) for v in box]
                )
            )
        target_path = f"images/{i:05d}_target.png"
        target.save(out / target_path)
        names = " and ".join(f"the {s.name}" for s in subjects)
        samples.append(
            Sample(
                id=f"synthetic-{seed}-{i:05d}",
                instruction=f"{names} side by side on a white table",
                target=target_path,
                subjects=subjects,
                kind="three" if n == 3 else "position",
                scores={},
                provenance={"generator": "psr.data.synthetic", "seed": seed},
            )
        )
    write_manifest(manifest, samples)
    return manifest


def image_to_tensor(path: str | Path):  # noqa: ANN201 - torch imported lazily
    """A PNG/JPEG as ``[3, H, W]`` float32 in [0, 1]."""
    import torch

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
