"""Image preprocessing on tensors (so it runs on the reward's device, batched) and box crops.

The transforms reproduce the processors of the reward models without their hub files:
resize the shorter side (torchvision's rule: the longer side is ``int(size * long / short)``),
center-crop, normalize. Bicubic resizing of float tensors overshoots [0, 1] where PIL clips to
uint8, so results are clamped back to [0, 1] before normalizing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CLIP_MEAN",
    "CLIP_STD",
    "ImageTransform",
    "as_image_list",
    "resize_shorter",
    "center_crop",
    "normalize",
    "box_to_pixels",
    "crop_box",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# OpenAI CLIP's statistics, also used by OWLv2, PickScore, HPS and ImageReward's BLIP
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def as_image_list(images: Tensor | Sequence[Tensor], owner: str) -> list[Tensor]:
    """``[N, 3, H, W]`` or a sequence of ``[3, h, w]`` as a list of ``[3, h, w]`` float tensors."""
    items = list(images.unbind(0)) if isinstance(images, Tensor) and images.ndim == 4 else list(images)
    for i, im in enumerate(items):
        if not (isinstance(im, Tensor) and im.ndim == 3 and im.shape[0] == 3 and im.is_floating_point()):
            shape = tuple(im.shape) if isinstance(im, Tensor) else type(im).__name__
            raise ValueError(f"{owner}: image {i} must be a float tensor [3, h, w] in [0, 1], got {shape}")
        if im.shape[1] < 1 or im.shape[2] < 1:
            raise ValueError(f"{owner}: image {i} is empty ({tuple(im.shape)})")
    return items


def _resize(x: Tensor, size: tuple[int, int], interpolation: str) -> Tensor:
    """``x`` ``[N, C, H, W]`` float -> ``[N, C, *size]``, antialiased when shrinking (as PIL does)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    antialias = interpolation in ("bilinear", "bicubic")
    out = F.interpolate(
        x.float(),
        size=size,
        mode=interpolation,
        antialias=antialias,
        align_corners=False if antialias else None,
    )
    return out.clamp_(0.0, 1.0) if interpolation == "bicubic" else out


def resize_shorter(x: Tensor, size: int, interpolation: str = "bicubic") -> Tensor:
    """Resize ``[N, C, H, W]`` so the shorter side is ``size`` (torchvision ``Resize(int)``)."""
    h, w = x.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = size, int(size * long / short)
    new_h, new_w = (new_short, new_long) if h <= w else (new_long, new_short)
    return _resize(x, (new_h, new_w), interpolation)


def center_crop(x: Tensor, size: int) -> Tensor:
    """Center crop ``[N, C, H, W]`` to ``size`` x ``size`` (torchvision's rounding; zero-pads a
    smaller image first, as torchvision does)."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        ph, pw = max(size - h, 0), max(size - w, 0)
        x = F.pad(x, (pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2))
        h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top : top + size, left : left + size]


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


@dataclass(frozen=True)
class ImageTransform:
    """Resize the shorter side to ``resize``, center-crop ``crop`` (None: no crop), normalize.

    PSRBench's DINO transform is ``ImageTransform(256, 224, IMAGENET_MEAN, IMAGENET_STD)``; CLIP's is
    ``ImageTransform(224, 224, CLIP_MEAN, CLIP_STD)``.
    """

    resize: int
    crop: int | None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bicubic"

    def __call__(self, images: Tensor | Sequence[Tensor], device: torch.device | str | None = None) -> Tensor:
        """``[N, 3, H, W]`` or N tensors ``[3, h_i, w_i]`` in [0, 1] -> ``[N, 3, crop, crop]`` float32."""
        if isinstance(images, Tensor) and images.ndim == 4:
            batches = [images.to(device=device, dtype=torch.float32)]
        else:
            batches = [im.to(device=device, dtype=torch.float32)[None] for im in images]
        out = []
        for x in batches:
            x = resize_shorter(x, self.resize, self.interpolation)
            if self.crop is not None:
                x = center_crop(x, self.crop)
            out.append(x)
        if self.crop is None and len({tuple(o.shape[-2:]) for o in out}) > 1:
            raise ValueError("ImageTransform: images of different aspect ratios need crop to be set")
        return normalize(torch.cat(out), self.mean, self.std)


def box_to_pixels(box: Sequence[float] | Tensor, height: int, width: int) -> tuple[int, int, int, int]:
    """An xyxy box in pixel coordinates as integer slice bounds inside the image: floor the start,
    ceil the end (a box never loses a partly covered pixel), at least one pixel each way."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"box {[x0, y0, x1, y1]} has non-finite coordinates")
    ix0 = min(max(int(math.floor(x0)), 0), width - 1)
    iy0 = min(max(int(math.floor(y0)), 0), height - 1)
    ix1 = max(min(int(math.ceil(x1)), width), ix0 + 1)
    iy1 = max(min(int(math.ceil(y1)), height), iy0 + 1)
    return ix0, iy0, ix1, iy1


def crop_box(image: Tensor, box: Sequence[float] | Tensor) -> Tensor:
    """The pixels of ``image`` ``[3, H, W]`` inside the xyxy ``box`` (see :func:`box_to_pixels`)."""
    x0, y0, x1, y1 = box_to_pixels(box, image.shape[-2], image.shape[-1])
    return image[:, y0:y1, x0:x1]
