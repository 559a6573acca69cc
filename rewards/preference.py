"""Human-preference rewards: ImageReward, HPS v2.1, PickScore, HPSv3. Each loads offline from local files.

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
- **HPSv3** (Ma et al. 2025): Qwen2-VL-7B-Instruct reads the image and an instruction holding the
  prompt; an MLP on the decoder's state at an added ``<|Reward|>`` token gives ``(mu, log sigma)``
  and the score is mu. The ``hpsv3`` package pins transformers 4.45, so the model is built from
  transformers' ``Qwen2VLModel`` and the published ``HPSv3.safetensors`` is loaded through
  :func:`hpsv3_state_dict`, a key mapping.
"""

from __future__ import annotations

import json
import os
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
    "HPSv3Model",
    "HPSv3Reward",
    "hpsv3_state_dict",
    "hpsv3",
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


# ---------------------------------------------------------------------------------------------- HPSv3

HPSV3_REWARD_TOKEN = "<|Reward|>"
# the published inference resizes every image to min_pixels = max_pixels = 256 * 28 * 28 (448 x 448
# for a square image: 256 tokens after Qwen2-VL's 2 x 2 merge), keeping the aspect ratio
HPSV3_PIXELS = 256 * 28 * 28


def read_hpsv3_instruction(path: str | os.PathLike, *, key: str = "reward.instruction") -> str:
    """The text of HPSv3's user turn (it follows the image), read from ``path``.

    HPSv3 was trained with one fixed instruction; scores are only comparable under that exact text, so
    psr ships none and reads the user's copy: a UTF-8 file holding the published instruction (the
    training data collator's text of the MizzenAI/HPSv3 repository) with ``{prompt}`` where the prompt
    goes, followed by the query that ends in ``<|Reward|>``, the token whose state the head reads.
    The file is used as is (no stripping: spaces and newlines are part of the model's input).
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"hpsv3: {key}={str(path)!r} is not a file; save HPSv3's published user-turn text there, with "
            f"{{prompt}} in place of the prompt and ending in {HPSV3_REWARD_TOKEN} (docs/method.md, HPSv3)"
        )
    text = file.read_text(encoding="utf-8")
    for needed in ("{prompt}", HPSV3_REWARD_TOKEN):
        if text.count(needed) != 1:
            raise ValueError(
                f"hpsv3: {key}={str(path)!r} must contain {needed} exactly once (found {text.count(needed)})"
            )
    return text


def hpsv3_head(width: int) -> nn.Sequential:
    """The published ``rm_head`` ("ranknet"): 1024 -> 16 -> 2 with ReLUs and a dropout (weights at
    indices 0, 3, 5); outputs ``(mu, log sigma)`` of a Gaussian preference score."""
    return nn.Sequential(
        nn.Linear(width, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(), nn.Linear(16, 2)
    )


class HPSv3Model(nn.Module):
    """Qwen2-VL (``Qwen2VLModel``: vision tower + decoder, no LM head) + ``rm_head`` on the decoder's
    last hidden state at the ``<|Reward|>`` token -> ``[B, 2]`` float32 ``(mu, log sigma)``."""

    def __init__(self, config: Any, reward_token_id: int) -> None:
        super().__init__()
        from transformers import Qwen2VLModel

        self.backbone = Qwen2VLModel(config)
        self.rm_head = hpsv3_head(int(config.text_config.hidden_size))
        self.reward_token_id = int(reward_token_id)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, image_grid_thw: Tensor
    ) -> Tensor:
        qwen = self.backbone
        embeds = qwen.get_input_embeddings()(input_ids)  # [B, N, D]
        features = qwen.get_image_features(pixel_values, image_grid_thw, return_dict=True).pooler_output
        image = torch.cat(list(features)).to(embeds.dtype)  # [image tokens in the batch, D]
        image_mask = input_ids == qwen.config.image_token_id
        if int(image_mask.sum()) != image.shape[0]:
            raise ValueError(
                f"HPSv3: {int(image_mask.sum())} image tokens for {image.shape[0]} image features"
            )
        embeds = embeds.masked_scatter(image_mask[..., None], image)
        # The published model runs its decoder with positions 0..N-1 on all three M-RoPE axes, not
        # Qwen2-VL's 2-D positions for image tokens: its forward embeds the image itself and leaves
        # position_ids to the text model. With right padding these are also the unpadded positions.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        hidden = qwen.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions
        ).last_hidden_state  # [B, N, D]
        at_token = input_ids == self.reward_token_id
        if not bool((at_token.sum(1) == 1).all()):
            raise ValueError(
                f"HPSv3: every sample needs exactly one {HPSV3_REWARD_TOKEN} token, found {at_token.sum(1).tolist()} "
                "(does a prompt contain it?)"
            )
        return self.rm_head(hidden[at_token].float())  # [B, 2]


# published name prefix -> HPSv3Model prefix. The published HPSv3.safetensors was saved with
# transformers 4.45's flat Qwen2-VL layout (visual.*, model.*); later versions nest both under model.
_HPSV3_PREFIXES = (
    ("model.visual.", "backbone.visual."),
    ("model.language_model.", "backbone.language_model."),
    ("visual.", "backbone.visual."),
    ("model.", "backbone.language_model."),
    ("rm_head.", "rm_head."),
)
_HPSV3_UNUSED = ("lm_head.weight",)  # the language-model head; a reward never decodes text


def hpsv3_state_dict(published: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map the published ``HPSv3.safetensors`` keys (``visual.*``, ``model.*``, ``lm_head.weight``,
    ``rm_head.*``; or the nested ``model.visual.*`` / ``model.language_model.*``) onto
    :class:`HPSv3Model`, dropping the unused ``lm_head.weight``.

    Raises:
        ValueError: naming keys that are neither mapped nor known to be unused.
    """
    out, unknown = {}, []
    for key, value in published.items():
        if key in _HPSV3_UNUSED:
            continue
        for old, new in _HPSV3_PREFIXES:
            if key.startswith(old):
                out[new + key[len(old) :]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{len(unknown)} unexpected keys in the checkpoint, e.g. {unknown[:5]}")
    return out


def _published_name(key: str) -> str:
    """An :class:`HPSv3Model` key as the published checkpoint names it."""
    for old, new in (("backbone.visual.", "visual."), ("backbone.language_model.", "model.")):
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def load_hpsv3_model(state: dict[str, Tensor], config: Any, reward_token_id: int, vocab: int) -> HPSv3Model:
    """:class:`HPSv3Model` holding the tensors of ``state`` (a published checkpoint; not copied).

    Args:
        config: the base model's ``Qwen2VLConfig``; its text vocabulary size is set to the
            checkpoint's (Qwen2-VL-7B-Instruct's config says 152064, HPSv3's embeddings have 151658
            rows: the tokenizer plus ``<|Reward|>``).
        vocab: the tokenizer's length with ``<|Reward|>`` added; the checkpoint must match it.

    Raises:
        ValueError: unexpected or missing keys, mismatched shapes or vocabulary (callers add which
            config key to set).
    """
    from accelerate import init_empty_weights

    mapped = hpsv3_state_dict(state)
    rows_key = "backbone.language_model.embed_tokens.weight"
    if rows_key not in mapped:
        raise ValueError("the checkpoint has no token embeddings ('model.embed_tokens.weight')")
    rows = int(mapped[rows_key].shape[0])
    if rows != vocab:
        raise ValueError(
            f"the checkpoint's embeddings have {rows} rows but the tokenizer with {HPSV3_REWARD_TOKEN} has "
            f"{vocab} tokens; HPSv3 needs Qwen2-VL-7B-Instruct's tokenizer (151658 with {HPSV3_REWARD_TOKEN})"
        )
    config.text_config.vocab_size = rows
    # parameters on the meta device, then the checkpoint's tensors assigned: no random 7B init
    with init_empty_weights(include_buffers=False):
        model = HPSv3Model(config, reward_token_id)
    try:
        result = model.load_state_dict(mapped, strict=False, assign=True)
    except RuntimeError as err:  # shape mismatch: a checkpoint of another model size
        raise ValueError(str(err).replace("\n", " ").replace("\t", "")) from err
    if result.missing_keys or result.unexpected_keys:
        missing = [_published_name(k) for k in result.missing_keys]
        unexpected = [_published_name(k) for k in result.unexpected_keys]
        raise ValueError(
            f"missing {len(missing)} keys, e.g. {missing[:4]}; unexpected {len(unexpected)}, e.g. {unexpected[:4]}"
        )
    return model.eval()


class HPSv3Reward(_Preference):
    """HPSv3 on a batch: images resized to ``min_pixels``..``max_pixels`` (multiples of 28, aspect
    kept; bicubic), one chat turn per sample (the image, then ``instruction`` with the prompt in its
    ``{prompt}`` slot, see :func:`read_hpsv3_instruction`), one forward.

    Returns ``score`` = ``scale`` x ``raw``, ``raw`` = mu (the published score; the paper's values of
    0.79-1.12 suggest ``scale: 0.1``, unverified), and ``sigma`` = exp(log sigma), the model's
    uncertainty.
    """

    def __init__(
        self,
        model: HPSv3Model,
        processor: Any,
        instruction: str,
        *,
        scale: float = 1.0,
        min_pixels: int = HPSV3_PIXELS,
        max_pixels: int = HPSV3_PIXELS,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "bfloat16",
    ) -> None:
        self._setup(model, device, dtype)
        self.model.rm_head.float()  # the published head runs in float32 on a bfloat16 backbone
        self.processor = processor
        self.instruction = instruction
        # right padding: the reward token keeps the position it has alone (see HPSv3Model.forward)
        processor.tokenizer.padding_side = "right"
        vision: Any = model.backbone.config.vision_config
        self.factor = int(vision.patch_size) * int(vision.spatial_merge_size)
        self.scale, self.min_pixels, self.max_pixels = float(scale), int(min_pixels), int(max_pixels)

    def text(self, prompt: str) -> str:
        """The text of the user turn for ``prompt`` (it follows the image)."""
        return self.instruction.replace("{prompt}", prompt)

    def encode(self, images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """``images`` ``[B, 3, H, W]`` in [0, 1] and B prompts -> the model's inputs on its device."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        h, w = images.shape[-2:]
        size = smart_resize(int(h), int(w), self.factor, self.min_pixels, self.max_pixels)
        x = images.float()
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        turns = [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.text(p)}]}]
            for p in prompts
        ]
        batch = self.processor(
            text=self.processor.apply_chat_template(turns, tokenize=False, add_generation_prompt=True),
            images=list(x.cpu()),
            padding=True,
            return_tensors="pt",
            images_kwargs={"do_resize": False, "do_rescale": False},
        )
        keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
        out = {k: batch[k].to(self.device) for k in keys}
        out["pixel_values"] = out["pixel_values"].to(self.dtype)
        return out

    @torch.no_grad()
    def __call__(self, images: Tensor, inputs: RewardInputs) -> dict[str, Tensor]:
        check_images(images, inputs, "HPSv3")
        mu, log_sigma = self.model(**self.encode(images, list(inputs.prompts))).unbind(-1)
        return {
            "score": (self.scale * mu).to(images.device),
            "raw": mu.to(images.device),
            "sigma": log_sigma.exp().to(images.device),
        }


def hpsv3(
    path: str,
    checkpoint: str,
    instruction: str,
    *,
    scale: float = 1.0,
    min_pixels: int = HPSV3_PIXELS,
    max_pixels: int = HPSV3_PIXELS,
    device: str = "cpu",
    dtype: str = "bfloat16",
) -> HPSv3Reward:
    """HPSv3 from ``path`` (a local copy of ``Qwen/Qwen2-VL-7B-Instruct``: its config, processor and
    tokenizer; its weights are not read) and ``checkpoint`` (``HPSv3.safetensors`` of
    ``MizzenAI/HPSv3``, the whole model, or a directory holding it); ``instruction`` is the file
    holding the published user-turn text (:func:`read_hpsv3_instruction`)."""
    from transformers import AutoConfig, AutoProcessor

    text = read_hpsv3_instruction(instruction)

    expected = "a Qwen2-VL-7B-Instruct directory (config.json, preprocessor_config.json, tokenizer files)"
    processor = hf_from_pretrained(AutoProcessor, path, owner="hpsv3", key="reward.path", expected=expected)
    config = hf_from_pretrained(AutoConfig, path, owner="hpsv3", key="reward.path", expected=expected)
    if config.model_type != "qwen2_vl":
        raise weights_error(
            "hpsv3",
            "reward.path",
            path,
            expected,
            ValueError(f"model_type is {config.model_type!r}, not 'qwen2_vl'"),
        )
    tokenizer = processor.tokenizer
    tokenizer.add_special_tokens({"additional_special_tokens": [HPSV3_REWARD_TOKEN]})
    state = load_state_dict_file(
        checkpoint, owner="hpsv3", key="reward.checkpoint", candidates=("HPSv3.safetensors", "HPSv3.pth")
    )
    try:
        model = load_hpsv3_model(
            state, config, tokenizer.convert_tokens_to_ids(HPSV3_REWARD_TOKEN), len(tokenizer)
        )
    except ValueError as err:
        raise weights_error(
            "hpsv3", "reward.checkpoint", checkpoint, "HPSv3.safetensors of MizzenAI/HPSv3", err, hub=False
        ) from err
    return HPSv3Reward(
        model,
        processor,
        text,
        scale=scale,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        device=device,
        dtype=dtype,
    )
