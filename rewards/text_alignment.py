"""Text alignment: CLIP-T, the cosine similarity of the image and prompt embeddings (open_clip).

``score = scale * cos(E_img(x), E_txt(prompt))``. Papers report CLIP-T either as the raw cosine
(DreamBooth: ~0.30 for good samples, the default ``scale=1``) or multiplied by 100 (``scale=100``).
Cosines of real CLIP models lie in about [0.1, 0.4]; the score is not clipped.

:func:`load_open_clip` is shared with HPS (``rewards.preference``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rewards.base import RewardInputs, check_images, resolve_dtype
from rewards.imaging import ImageTransform
from rewards.loading import load_state_dict_file, weights_error

__all__ = ["ClipTextAlignment", "clip_t", "load_open_clip", "open_clip_transform"]

OPEN_CLIP_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
    "model.safetensors",
    "pytorch_model.bin",
)


def open_clip_transform(model: Any) -> ImageTransform:
    """The open_clip model's own evaluation preprocessing (resize shorter side, center crop)."""
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    size = int(min(size)) if isinstance(size, (tuple, list)) else int(size)
    mean = tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))
    std = tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))
    return ImageTransform(size, size, mean, std, str(cfg.get("interpolation", "bicubic")))


def load_open_clip(model_name: str, path: str | None, *, owner: str, key: str) -> tuple[Any, Any]:
    """An open_clip model and its tokenizer, offline.

    ``model_name`` is an open_clip architecture (``ViT-H-14``) whose weights come from ``path`` (a
    checkpoint file or a directory holding one of ``open_clip_model.safetensors``,
    ``open_clip_pytorch_model.bin``, ...), or ``local-dir:/dir`` with ``open_clip_config.json`` and
    weights (then ``path`` is unused). Built-in OpenAI-style tokenizers need no files.
    """
    import open_clip

    if str(model_name).startswith("local-dir:"):
        local = Path(str(model_name)[len("local-dir:") :]).expanduser()
        if not (local / "open_clip_config.json").is_file():
            raise weights_error(
                owner,
                key.replace("path", "model_name"),
                model_name,
                "a directory with open_clip_config.json and open_clip_model.safetensors",
            )
        return open_clip.create_model(f"local-dir:{local}"), open_clip.get_tokenizer(f"local-dir:{local}")
    if open_clip.get_model_config(model_name) is None:
        raise ValueError(
            f"{owner}: model_name={model_name!r} is not an open_clip architecture (see open_clip.list_models())"
        )
    state = load_state_dict_file(path, owner=owner, key=key, candidates=OPEN_CLIP_FILES)
    model = open_clip.create_model(model_name, pretrained=None)
    if next(iter(state)).startswith("module."):
        state = {k[len("module.") :]: v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise weights_error(
            owner,
            key,
            path,
            f"an open_clip {model_name} checkpoint",
            ValueError(
                f"missing keys {result.missing_keys[:5]}..., unexpected keys {result.unexpected_keys[:5]}..."
            ),
        )
    return model, open_clip.get_tokenizer(model_name)


class ClipTextAlignment:
    """CLIP-T reward (see the module docstring).

    Args:
        model: an open_clip ``CLIP`` (``encode_image``/``encode_text``).
        tokenizer: open_clip tokenizer, ``list[str] -> [N, 77]`` ids.
        scale: multiplies the cosine (1: raw cosine, 100: as many papers report it).
        device, dtype: where and in which precision the model runs.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        scale: float = 1.0,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
    ) -> None:
        self.device, self.dtype = torch.device(device), resolve_dtype(dtype)
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.tokenizer, self.scale = tokenizer, float(scale)
        self.transform = open_clip_transform(model)

    @torch.no_grad()
    def __call__(self, images: Tensor, inputs: RewardInputs) -> dict[str, Tensor]:
        check_images(images, inputs, type(self).__name__)
        pixels = self.transform(images, device=self.device).to(self.dtype)
        img = self.model.encode_image(pixels, normalize=True).float()
        txt = self.model.encode_text(
            self.tokenizer(list(inputs.prompts)).to(self.device), normalize=True
        ).float()
        return {"score": (self.scale * (img * txt).sum(-1)).to(images.device)}


def clip_t(
    path: str | None = None,
    *,
    model_name: str = "ViT-L-14",
    scale: float = 1.0,
    device: str = "cpu",
    dtype: str = "float32",
) -> ClipTextAlignment:
    """CLIP-T from an open_clip architecture ``model_name`` and a local checkpoint ``path`` (unused
    when ``model_name`` is ``local-dir:/folder``)."""
    model, tokenizer = load_open_clip(model_name, path, owner="clip_t", key="reward.path")
    return ClipTextAlignment(model, tokenizer, scale=scale, device=device, dtype=dtype)
