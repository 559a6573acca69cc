"""Tensor preprocessing against torchvision and PIL (the pipelines the reward models were trained with)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rewards.imaging import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, box_to_pixels, crop_box


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, h // 8, w // 8, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]


@pytest.mark.parametrize(("h", "w"), [(300, 200), (200, 333), (256, 256)])
def test_psrbench_transform_matches_torchvision_tensor_pipeline(h, w):
    from torchvision.transforms import v2

    x = _image(h, w)
    ours = ImageTransform(256, 224, IMAGENET_MEAN, IMAGENET_STD)([x])[0]
    ref = v2.Compose(
        [v2.Resize(256, interpolation=v2.InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(224)]
    )(x)
    ref = v2.functional.normalize(ref.clamp(0, 1), IMAGENET_MEAN, IMAGENET_STD)
    assert ours.shape == (3, 224, 224)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_psrbench_transform_close_to_pil_pipeline():
    # PSRBench runs torchvision on PIL uint8 images: differences are uint8 rounding and PIL's filter
    from torchvision import transforms as T

    x = _image(320, 240, seed=1)
    pil = Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    ref = T.Compose(
        [
            T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )(pil)
    ours = ImageTransform(256, 224)([x])[0]
    assert (ours - ref).abs().mean() < 0.01  # in normalized units (~0.002 in pixel units)


def test_batched_and_listed_inputs_agree():
    x = torch.stack([_image(64, 48, s) for s in range(3)])
    t = ImageTransform(32, 32)
    assert torch.allclose(t(x), t(list(x)), atol=1e-6)


def test_box_rounding_keeps_partly_covered_pixels_and_clips():
    assert box_to_pixels([1.2, 2.7, 5.1, 6.0], 10, 10) == (1, 2, 6, 6)
    assert box_to_pixels([-3, -1, 50, 40], 20, 30) == (0, 0, 30, 20)
    assert box_to_pixels([4.0, 4.0, 4.0, 4.0], 10, 10) == (4, 4, 5, 5)  # degenerate box: one pixel
    image = torch.arange(3 * 10 * 12, dtype=torch.float32).reshape(3, 10, 12)
    assert torch.equal(crop_box(image, torch.tensor([2.0, 3.0, 7.0, 9.0])), image[:, 3:9, 2:7])
    with pytest.raises(ValueError, match="non-finite"):
        box_to_pixels([0, 0, float("nan"), 1], 4, 4)
