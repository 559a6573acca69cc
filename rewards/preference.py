"""Human-preference rewards: ImageReward, HPS v2.1, PickScore. Each loads offline from local files.

- **ImageReward** (Xu et al. 2023): BLIP ViT-L/16 image encoder, a BERT-base text encoder with
  cross-attention to the image tokens, and an MLP on the text [CLS] state; the output is
  standardized with the published mean/std. The ``image-reward`` package does not install beside
  this stack, so the architecture is built from transformers' maintained BLIP classes
  (``BlipVisionModel``; ``BlipTextModel``, transformers' port of BLIP's cross-attention BERT, whose
  cross-attention takes the 1024-wide image tokens, which ``BertModel`` cannot) and the published
  ``ImageReward.pt`` is loaded through :func:`imagereward_state_dict`, a key mapping.
- **HPS v2.1** (Wu et al. 2023): open_clip ViT-H-14 fine-tuned on human preferences; score = cosine
  of image and prompt embeddings (no logit scale), about 0.2-0.35 for real images.
- **PickScore** (Kirstain et al. 2023): a transformers ``CLIPModel``; score = ``logit_scale.exp()``
  times the cosine, about 15-25.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rewards.base import RewardInputs, check_images, resolve_dtype
from rewards.imaging import CLIP_MEAN, CLIP_STD, ImageTransform
from rewards.loading import hf_from_pretrained, load_state_dict_file, weights_error
from rewards.text_alignment import ClipTextAlignment, load_open_clip

__all__ = [
    "ImageRewardModel",
    "ImageReward",
    "imagereward_state_dict",
    "imagereward",
    "HPSv2",
    "hps_v21",
    "PickScore",
    "pickscore",
]

# standardization of the MLP output, from the published ImageReward model
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_MAX_LENGTH = 35


class _Preference:
    """Shared plumbing: model on device/dtype, eval, no grad."""

    def _setup(self, model: Any, device: str | torch.device, dtype: str | torch.dtype) -> None:
        self.device, self.dtype = torch.device(device), resolve_dtype(dtype)
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- ImageReward


def imagereward_mlp(width: int) -> nn.Sequential:
    """The published head: five linear layers without activations, dropout between the first four
    (indices 0, 2, 4, 6, 7 hold the weights)."""
    return nn.Sequential(
        nn.Linear(width, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


class ImageRewardModel(nn.Module):
    """BLIP image encoder + cross-attention text encoder + MLP head -> standardized reward ``[B]``."""

    def __init__(self, vision_config: Any, text_config: Any) -> None:
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        if not text_config.is_decoder or text_config.encoder_hidden_size != vision_config.hidden_size:
            raise ValueError(
                "ImageRewardModel: text_config needs is_decoder=True (to build the cross-attention layers) and "
                f"encoder_hidden_size == vision hidden_size ({vision_config.hidden_size})"
            )
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = imagereward_mlp(text_config.hidden_size)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state  # [B, 1 + N, D_img]
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        # is_decoder=False: bidirectional self-attention + cross-attention, BLIP's "multimodal" encoder mode
        text = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        ).last_hidden_state
        raw = self.mlp(text[:, 0].to(self.mlp[0].weight.dtype))
        return ((raw.float() - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).squeeze(-1)


_VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.fc([12])\.", r"encoder.layers.\1.mlp.fc\2."),
    (r"^norm\.", "post_layernorm."),
]
# in the published file but not used for scoring (BLIP's contrastive projections, buffers)
_IGNORED = (r"^blip\.(vision_proj|text_proj)\.", r"^blip\.text_encoder\.embeddings\.position_ids$")


def imagereward_state_dict(published: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map the published ``ImageReward.pt`` keys onto :class:`ImageRewardModel`.

    ``blip.visual_encoder.*`` (timm-style ViT) -> ``vision.*``; ``blip.text_encoder.*`` (BLIP's
    ``med.py`` BERT, the same names as ``BlipTextModel``) -> ``text.*``; ``mlp.layers.*`` -> ``mlp.*``.

    Raises:
        ValueError: for a key that is neither mapped nor known to be unused.
    """
    out, unknown = {}, []
    for key, value in published.items():
        if any(re.match(p, key) for p in _IGNORED):
            continue
        if key.startswith("blip.visual_encoder."):
            name = key[len("blip.visual_encoder.") :]
            for pattern, repl in _VISION_RENAMES:
                if re.match(pattern, name):
                    out["vision." + re.sub(pattern, repl, name)] = value
                    break
            else:
                unknown.append(key)
        elif key.startswith("blip.text_encoder."):
            out["text." + key[len("blip.text_encoder.") :]] = value
        elif key.startswith("mlp.layers."):
            out["mlp." + key[len("mlp.layers.") :]] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"imagereward_state_dict: unexpected keys in the checkpoint: {unknown[:10]}")
    return out


def imagereward_configs(
    published: dict[str, Tensor], med_config: dict[str, Any] | None = None
) -> tuple[Any, Any]:
    """Vision and text configs read off the checkpoint's shapes (BLIP ViTs use 64-wide heads);
    ``med_config`` (the published ``med_config.json``) supplies text heads and epsilons."""
    from transformers import BlipTextConfig, BlipVisionConfig

    med = med_config or {}
    pos = published["blip.visual_encoder.pos_embed"]
    patch = int(published["blip.visual_encoder.patch_embed.proj.weight"].shape[-1])
    width = int(pos.shape[-1])
    depth = 1 + max(
        int(m.group(1)) for k in published if (m := re.match(r"blip\.visual_encoder\.blocks\.(\d+)\.", k))
    )
    grid = int(round((pos.shape[1] - 1) ** 0.5))
    vision = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=int(published["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=depth,
        num_attention_heads=max(1, width // 64),
        image_size=grid * patch,
        patch_size=patch,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )
    words = published["blip.text_encoder.embeddings.word_embeddings.weight"]
    hidden = int(words.shape[1])
    layers = 1 + max(
        int(m.group(1))
        for k in published
        if (m := re.match(r"blip\.text_encoder\.encoder\.layer\.(\d+)\.", k))
    )
    text = BlipTextConfig(
        vocab_size=int(words.shape[0]),
        hidden_size=hidden,
        encoder_hidden_size=width,
        intermediate_size=int(
            published["blip.text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0]
        ),
        num_hidden_layers=layers,
        num_attention_heads=int(med.get("num_attention_heads", max(1, hidden // 64))),
        max_position_embeddings=int(
            published["blip.text_encoder.embeddings.position_embeddings.weight"].shape[0]
        ),
        layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)),
        hidden_act=str(med.get("hidden_act", "gelu")),
        is_decoder=True,
        pad_token_id=int(med.get("pad_token_id", 0)),
        bos_token_id=None,
        sep_token_id=None,
    )
    return vision, text


def load_imagereward_model(path: str) -> ImageRewardModel:
    """:class:`ImageRewardModel` from the published ``ImageReward.pt`` (a file, or a directory with it
    and optionally ``med_config.json``)."""
    state = load_state_dict_file(
        path, owner="imagereward", key="reward.path", candidates=("ImageReward.pt", "ImageReward.safetensors")
    )
    med_file = (
        Path(path).expanduser() if Path(path).expanduser().is_dir() else Path(path).expanduser().parent
    ) / "med_config.json"
    med = json.loads(med_file.read_text()) if med_file.is_file() else None
    try:
        vision_cfg, text_cfg = imagereward_configs(state, med)
        mapped = imagereward_state_dict(state)
    except (KeyError, ValueError) as err:
        raise weights_error("imagereward", "reward.path", path, "the published ImageReward.pt", err) from err
    model = ImageRewardModel(vision_cfg, text_cfg)
    result = model.load_state_dict(mapped, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise weights_error(
            "imagereward",
            "reward.path",
            path,
            "the published ImageReward.pt",
            ValueError(f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"),
        )
    return model


class ImageReward(_Preference):
    """ImageReward on a batch: BLIP preprocessing (resize 224 bicubic, crop, CLIP mean/std), prompts
    padded to 35 tokens, one forward. Score: standardized reward, typically in [-2, 2]."""

    def __init__(
        self,
        model: ImageRewardModel,
        tokenizer: Any,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
    ) -> None:
        self._setup(model, device, dtype)
        self.tokenizer = tokenizer
        size = int(model.vision.config.image_size)  # type: ignore[arg-type]  # an int for BLIP
        self.transform = ImageTransform(size, size, CLIP_MEAN, CLIP_STD)

    @torch.no_grad()
    def __call__(self, images: Tensor, inputs: RewardInputs) -> dict[str, Tensor]:
        check_images(images, inputs, "ImageReward")
        tok = self.tokenizer(
            list(inputs.prompts),
            padding="max_length",
            truncation=True,
            max_length=IMAGEREWARD_MAX_LENGTH,
            return_tensors="pt",
        )
        pixels = self.transform(images, device=self.device).to(self.dtype)
        score = self.model(pixels, tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device))
        return {"score": score.float().to(images.device)}


def blip_tokenizer(tokenizer: Any) -> Any:
    """BLIP's additions to the bert-base-uncased tokenizer ([DEC] and [ENC], ids 30522/30523)."""
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def imagereward(
    path: str, tokenizer_path: str, *, device: str = "cpu", dtype: str = "float32"
) -> ImageReward:
    """ImageReward from ``path`` (``ImageReward.pt`` or a local copy of ``THUDM/ImageReward``) and a
    bert-base-uncased tokenizer at ``tokenizer_path``."""
    from transformers import BertTokenizer

    tokenizer = hf_from_pretrained(
        BertTokenizer,
        tokenizer_path,
        owner="imagereward",
        key="reward.tokenizer_path",
        expected="a bert-base-uncased directory with vocab.txt",
    )
    return ImageReward(load_imagereward_model(path), blip_tokenizer(tokenizer), device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------- HPS v2.1


class HPSv2(ClipTextAlignment):
    """HPS v2 / v2.1: cosine of open_clip image and prompt embeddings (CLIP-T's computation on the
    HPS-tuned weights, unscaled)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
    ) -> None:
        super().__init__(model, tokenizer, scale=1.0, device=device, dtype=dtype)


def hps_v21(path: str, *, model_name: str = "ViT-H-14", device: str = "cpu", dtype: str = "float32") -> HPSv2:
    """HPS v2.1 from ``path`` (``HPS_v2.1_compressed.pt``: ``{"state_dict": ...}`` of an open_clip
    ViT-H-14)."""
    model, tokenizer = load_open_clip(model_name, path, owner="hps_v21", key="reward.path")
    return HPSv2(model, tokenizer, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------- PickScore


class PickScore(_Preference):
    """PickScore: ``logit_scale.exp() * cos(image, prompt)`` with a transformers ``CLIPModel``;
    preprocessing of its processor (resize shorter side bicubic, center crop, CLIP mean/std)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
    ) -> None:
        self._setup(model, device, dtype)
        self.tokenizer = tokenizer
        size = int(model.config.vision_config.image_size)
        self.transform = ImageTransform(size, size, CLIP_MEAN, CLIP_STD)
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def __call__(self, images: Tensor, inputs: RewardInputs) -> dict[str, Tensor]:
        check_images(images, inputs, "PickScore")
        m = self.model
        pixels = self.transform(images, device=self.device).to(self.dtype)
        tok = self.tokenizer(
            list(inputs.prompts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        img = m.visual_projection(m.vision_model(pixel_values=pixels).pooler_output)
        txt = m.text_projection(
            m.text_model(
                input_ids=tok["input_ids"].to(self.device),
                attention_mask=tok["attention_mask"].to(self.device),
            ).pooler_output
        )
        cos = (F.normalize(img.float(), dim=-1) * F.normalize(txt.float(), dim=-1)).sum(-1)
        return {"score": (m.logit_scale.float().exp() * cos).to(images.device)}


def pickscore(
    path: str, tokenizer_path: str | None = None, *, device: str = "cpu", dtype: str = "float32"
) -> PickScore:
    """PickScore from ``path`` (a local copy of ``yuvalkirstain/PickScore_v1``) and the CLIP tokenizer
    at ``tokenizer_path`` (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; default: ``path``)."""
    from transformers import AutoTokenizer, CLIPModel

    model = hf_from_pretrained(
        CLIPModel,
        path,
        owner="pickscore",
        key="reward.path",
        expected="a CLIP directory (yuvalkirstain/PickScore_v1) with config.json and model weights",
    )
    tokenizer = hf_from_pretrained(
        AutoTokenizer,
        tokenizer_path or path,
        owner="pickscore",
        key="reward.tokenizer_path",
        expected="CLIP tokenizer files (vocab.json, merges.txt), e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    )
    return PickScore(model, tokenizer, device=device, dtype=dtype)
