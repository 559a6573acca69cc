"""Image embedders: ``embed(images) -> [N, D]`` L2-normalized, one forward for the whole list.

- :func:`dino_vits16`: DINO ViT-S/16 (transformers ``ViTModel``), CLS token; PSRBench's embedder and
  preprocessing (resize 256 bicubic, center-crop 224, ImageNet mean/std);
- :func:`dinov2`: DINOv2 (``Dinov2Model``), CLS token, same preprocessing;
- :func:`clip_image`: CLIP (``CLIPVisionModelWithProjection``), projected image embedding,
  resize/crop to the model's size with CLIP mean/std.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from rewards.base import resolve_dtype
from rewards.imaging import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, ImageTransform, as_image_list
from rewards.loading import hf_from_pretrained

__all__ = ["Embedder", "HFImageEmbedder", "dino_vits16", "dinov2", "clip_image"]

OUTPUTS = ("cls", "mean", "image_embeds", "pooler")


@runtime_checkable
class Embedder(Protocol):
    """``embed(images [N,3,H,W] or N x [3,h,w] in [0,1]) -> [N, D]`` float32, unit L2 norm."""

    def embed(self, images: Tensor | Sequence[Tensor]) -> Tensor: ...


class HFImageEmbedder:
    """A transformers vision model as an embedder.

    Args:
        model: ``ViTModel`` / ``Dinov2Model`` (``output="cls"``: ``last_hidden_state[:, 0]``, the
            final-norm CLS token; ``output="mean"``: the mean of all output tokens, CLS and
            patches, as OmniRef-Bench's DINOv2 score takes it), ``CLIPVisionModelWithProjection`` (``output="image_embeds"``), or any
            model with a ``pooler_output`` (``output="pooler"``).
        transform: preprocessing from [0, 1] pixels to the model's input.
        max_batch: images per forward (None: all in one); bounds memory, same results.
        device, dtype: where and in which precision the model runs (outputs are float32).
    """

    def __init__(
        self,
        model: Any,
        transform: ImageTransform,
        *,
        output: str = "cls",
        max_batch: int | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
    ) -> None:
        if output not in OUTPUTS:
            raise ValueError(f"HFImageEmbedder: output={output!r}; expected one of {OUTPUTS}")
        self.device, self.dtype = torch.device(device), resolve_dtype(dtype)
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.transform, self.output, self.max_batch = transform, output, max_batch

    @torch.no_grad()
    def embed(self, images: Tensor | Sequence[Tensor]) -> Tensor:
        if isinstance(images, Tensor) and images.ndim == 4:
            batch: Tensor | list[Tensor] = images
        else:
            batch = as_image_list(images, "HFImageEmbedder")
        if len(batch) == 0:
            return torch.zeros(0, 0, device=self.device)
        if self.max_batch and len(batch) > self.max_batch:
            return torch.cat(
                [self.embed(batch[i : i + self.max_batch]) for i in range(0, len(batch), self.max_batch)]
            )
        pixels = self.transform(batch, device=self.device).to(self.dtype)  # [N, 3, S, S]
        out = self.model(pixel_values=pixels)
        if self.output == "cls":
            feats = out.last_hidden_state[:, 0]
        elif self.output == "mean":
            feats = out.last_hidden_state.float().mean(dim=1)
        elif self.output == "image_embeds":
            feats = out.image_embeds
        else:
            feats = out.pooler_output
        return F.normalize(feats.float(), dim=-1)


def _processor_stats(
    path: str, default_mean: tuple[float, ...], default_std: tuple[float, ...]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``image_mean``/``image_std`` of a local ``preprocessor_config.json`` if there is one."""
    cfg_file = Path(path).expanduser() / "preprocessor_config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        return tuple(cfg.get("image_mean", default_mean)), tuple(cfg.get("image_std", default_std))
    return default_mean, default_std


def dino_vits16(
    path: str,
    *,
    resize: int = 256,
    crop: int = 224,
    max_batch: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> HFImageEmbedder:
    """DINO ViT-S/16 from ``path`` (a local copy of ``facebook/dino-vits16``), CLS token, PSRBench's
    preprocessing."""
    from transformers import ViTModel

    model = hf_from_pretrained(
        ViTModel,
        path,
        owner="dino_vits16",
        key="reward.embedder.path",
        expected="a ViT directory (facebook/dino-vits16) with config.json and model.safetensors",
        add_pooling_layer=False,
    )
    return _imagenet_embedder(model, resize, crop, max_batch, device, dtype)


def dinov2(
    path: str,
    *,
    resize: int = 256,
    crop: int = 224,
    max_batch: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> HFImageEmbedder:
    """DINOv2 from ``path`` (a local copy of e.g. ``facebook/dinov2-base``), CLS token, the DINOv2
    processor's preprocessing (resize 256 bicubic, crop 224, ImageNet mean/std)."""
    from transformers import Dinov2Model

    model = hf_from_pretrained(
        Dinov2Model,
        path,
        owner="dinov2",
        key="reward.embedder.path",
        expected="a DINOv2 directory (e.g. facebook/dinov2-base) with config.json and model.safetensors",
    )
    return _imagenet_embedder(model, resize, crop, max_batch, device, dtype)


def _imagenet_embedder(
    model: Any, resize: int, crop: int, max_batch: int | None, device: str, dtype: str
) -> HFImageEmbedder:
    """CLS embeddings after resize (bicubic), center crop and ImageNet mean/std."""
    return HFImageEmbedder(
        model,
        ImageTransform(resize, crop, IMAGENET_MEAN, IMAGENET_STD),
        max_batch=max_batch,
        device=device,
        dtype=dtype,
    )


def clip_image(
    path: str, *, max_batch: int | None = None, device: str = "cpu", dtype: str = "float32"
) -> HFImageEmbedder:
    """CLIP image embeddings from ``path`` (a local copy of e.g. ``openai/clip-vit-large-patch14``):
    resize to the model's image size (bicubic), center-crop, mean/std from the directory's
    ``preprocessor_config.json`` when present, else OpenAI CLIP's."""
    from transformers import CLIPVisionModelWithProjection

    model = hf_from_pretrained(
        CLIPVisionModelWithProjection,
        path,
        owner="clip_image",
        key="reward.embedder.path",
        expected="a CLIP directory with config.json and model.safetensors (vision tower + projection)",
    )
    size = int(model.config.image_size)
    mean, std = _processor_stats(path, CLIP_MEAN, CLIP_STD)
    return HFImageEmbedder(
        model,
        ImageTransform(size, size, mean, std),
        output="image_embeds",
        max_batch=max_batch,
        device=device,
        dtype=dtype,
    )
