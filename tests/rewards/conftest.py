"""Fixtures for the reward tests: tiny random backbones (built once per session) and image helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image


def _patch(seed: int, h: int, w: int) -> torch.Tensor:
    """A distinctive texture ``[3, h, w]`` in [0.1, 0.9] (coarse noise upsampled, so crops and resizes
    keep its identity), never equal to a white or black background."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(2, h // 6), max(2, w // 6), generator=g)
    return (0.1 + 0.8 * F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False))[0]


@pytest.fixture
def patch():
    return _patch


@pytest.fixture
def paste():
    def paste(canvas: torch.Tensor, piece: torch.Tensor, x: int, y: int) -> list[float]:
        """Paste ``piece`` into ``canvas`` ``[3, H, W]`` at (x, y) in place; returns its xyxy box."""
        h, w = piece.shape[-2:]
        canvas[:, y : y + h, x : x + w] = piece
        return [float(x), float(y), float(x + w), float(y + h)]

    return paste


# Preprocessing constants written out here rather than imported from rewards, so that the references
# below share no code with the transforms they check.
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP_MEAN_STD = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def _to_pil(image: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` in [0, 1] as an 8-bit RGB image, the input every published pipeline reads."""
    return Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


@pytest.fixture
def to_pil():
    return _to_pil


@pytest.fixture
def psrbench_pixels():
    """PSRBench's DINO preprocessing written out with torchvision on PIL images: Resize(shorter side,
    bicubic), CenterCrop, ToTensor, Normalize(ImageNet). Returns ``f(images, resize, crop) -> [N, 3,
    crop, crop]``."""
    from torchvision import transforms as T

    def pixels(images, resize: int, crop: int) -> torch.Tensor:
        tf = T.Compose(
            [
                T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(crop),
                T.ToTensor(),
                T.Normalize(*IMAGENET_MEAN_STD),
            ]
        )
        return torch.stack([tf(_to_pil(im)) for im in images])

    return pixels


@pytest.fixture
def psrbench_embed(psrbench_pixels):
    """Unit-norm CLS embeddings of a DINO-layout ``model`` on :func:`psrbench_pixels`: the reference
    for the PSR reward that shares no code with :mod:`rewards.embedders` or :mod:`rewards.imaging`.
    Returns ``f(model, crops, resize=40, crop=32) -> [N, D]`` (40 -> 32 px: the tiny DINO's sizes)."""

    def embed(model, crops, resize: int = 40, crop: int = 32) -> torch.Tensor:
        with torch.no_grad():
            cls = model(pixel_values=psrbench_pixels(crops, resize, crop)).last_hidden_state[:, 0]
        return F.normalize(cls, dim=-1)

    return embed


@pytest.fixture
def clip_pixels():
    """transformers' CLIP preprocessing (its PIL backend) built from an explicit config, no hub files:
    resize the shorter side to ``size`` (bicubic), center-crop ``size``, OpenAI CLIP mean/std.
    Returns ``f(images, size) -> [N, 3, size, size]``."""
    from transformers import CLIPImageProcessorPil

    def pixels(images, size: int) -> torch.Tensor:
        processor = CLIPImageProcessorPil(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            resample=Image.Resampling.BICUBIC,
            image_mean=list(OPENAI_CLIP_MEAN_STD[0]),
            image_std=list(OPENAI_CLIP_MEAN_STD[1]),
        )
        return processor(images=[_to_pil(im) for im in images], return_tensors="pt")["pixel_values"]

    return pixels


@pytest.fixture
def dinov2_pixels():
    """transformers' DINOv2 preprocessing (``BitImageProcessor``, PIL backend) from an explicit
    config: resize the shorter side to ``resize`` (bicubic), center-crop ``crop``, ImageNet mean/std.
    Returns ``f(images, resize, crop) -> [N, 3, crop, crop]``."""
    from transformers import BitImageProcessorPil

    def pixels(images, resize: int, crop: int) -> torch.Tensor:
        processor = BitImageProcessorPil(
            size={"shortest_edge": resize},
            crop_size={"height": crop, "width": crop},
            resample=Image.Resampling.BICUBIC,
            image_mean=list(IMAGENET_MEAN_STD[0]),
            image_std=list(IMAGENET_MEAN_STD[1]),
        )
        return processor(images=[_to_pil(im) for im in images], return_tensors="pt")["pixel_values"]

    return pixels


@pytest.fixture(scope="session")
def tiny_dino():
    from rewards.testing import tiny_dino

    return tiny_dino(0)


@pytest.fixture(scope="session")
def tiny_gd():
    from rewards.testing import tiny_grounding_dino

    return tiny_grounding_dino(0)
