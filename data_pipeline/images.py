"""Image I/O for the stages: reads that report a reason instead of raising, atomic PNG writes, crops."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from psr.fileio import atomic_open


def load_image(path: str | os.PathLike) -> tuple[Image.Image | None, str | None]:
    """``(RGB image, None)``, or ``(None, reason)`` for a missing, unreadable or truncated file."""
    p = Path(path)
    try:
        with Image.open(p) as im:
            im.load()  # decode now: a truncated file fails here
            return im.convert("RGB"), None
    except FileNotFoundError:
        return None, f"missing image {p}"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return None, f"unreadable image {p} ({type(err).__name__}: {err})"


def load_images(paths: Sequence[str | os.PathLike]) -> tuple[list[Image.Image], str | None]:
    """All images of one record, or ``([], reason)`` at the first that cannot be read."""
    out = []
    for p in paths:
        im, reason = load_image(p)
        if im is None:
            return [], reason
        out.append(im)
    return out, None


def save_png(image: Image.Image, path: str | os.PathLike) -> None:
    """Write a PNG atomically (temp file + rename): a kill never leaves a truncated image behind, and
    the file has an ordinary file's mode (0644 under umask 022)."""
    with atomic_open(path, "wb") as f:
        image.save(f, format="PNG")


def expand_box(box: Sequence[float], margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """``box`` (xyxy pixels) grown by ``margin`` x its size on each side, clipped, as integer pixels.

    The result always has at least one pixel per side.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    dx, dy = (x1 - x0) * margin, (y1 - y0) * margin
    left = int(np.clip(np.floor(x0 - dx), 0, width - 1))
    top = int(np.clip(np.floor(y0 - dy), 0, height - 1))
    right = int(np.clip(np.ceil(x1 + dx), left + 1, width))
    bottom = int(np.clip(np.ceil(y1 + dy), top + 1, height))
    return left, top, right, bottom


def to_tensor(images: Sequence[Image.Image]) -> Any:
    """Same-size PIL images -> float32 tensor ``[B, 3, H, W]`` in [0, 1]."""
    import torch

    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise ValueError(f"images of several sizes {sorted(sizes)} cannot be stacked; resize first")
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def to_pil(batch: Any) -> list[Image.Image]:
    """Float tensor ``[B, 3, H, W]`` in [0, 1] -> PIL RGB images (rounded, clipped)."""
    import torch

    arr = batch.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]


def fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to ``(width, height)`` with bicubic filtering (no-op when already that size)."""
    return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)
