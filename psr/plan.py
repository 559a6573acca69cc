"""``psr-plan``: will a psr-rl or psr-sft run fit, and how long will a step take at best?

The configured model is built on the meta device (shapes, no weights: FLUX.1 Kontext-dev's published
sizes, or the ``config.json`` files under ``model.path``), made trainable as the run would
(:func:`psr.models.lora.make_trainable`, gradient checkpointing as configured), and ONE step of the
real code path runs on it symbolically, phase by phase:

* ``condition``: text encoders and the VAE on the references (:meth:`FlowPolicy.condition`);
* ``rollout``: :func:`psr.sampling.rollout.rollout` with all K steps (the transformer runs once per
  input shape, :func:`psr.flops.repeat_forwards`) and the VAE decode;
* ``reward``: not built on meta (detectors and judges branch on values); ``plan.reward_tflops_per_image``
  adds a configured count, otherwise 0 and the table says so;
* ``update``: one micro-batch of the objective's own per-piece work (GRPO: the recomputed step
  log-prob, the KL's reference forward when ``algo.beta > 0``, the loss, backward; DPO: the pair loss
  and backward; SFT: the flow-matching loss and backward) scaled to every trained step and sample.

FLOPs come from ``FlopCounterMode`` and activation bytes from the live-tensor peak
(:mod:`psr.flops`), both per GPU (each rank runs ``train.prompts_per_step`` groups). Parameter,
gradient and optimizer bytes follow the engine (:func:`model_state_bytes`). Times are lower bounds
at ``plan.gpu.peak_tflops``. Costs assume every sample trains (GRPO skips groups whose rewards are
all equal) and every record has ``plan.num_references`` references.

Where the code path reads tensor values, which meta tensors do not have, the planner supplies them:
the rollout's SDE mask is re-made on the CPU (:func:`~psr.sampling.rollout.sde_steps`),
``stack_conditionings`` is keyed with zero position ids of the right shapes, and the objectives'
``update`` (which picks samples, pairs and steps from reward values) is replaced by the work of one
of its pieces. Nothing in the trainers or models was changed for the meta device.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from psr.flops import Meter, flash_attention, repeat_forwards
from psr.models.flux2_klein import SCHEDULER_CONFIG as KLEIN_SCHEDULER
from psr.schema import SettingsError

__all__ = [
    "FLUX_KONTEXT_DEV",
    "EngineSpec",
    "GPUSettings",
    "Phase",
    "Plan",
    "PlannerSettings",
    "StepFlops",
    "format_table",
    "main",
    "meta_policy",
    "model_state_bytes",
    "perf_metrics",
    "plan_rl",
    "plan_sft",
]

GIB = 2**30

# FLUX.1 Kontext-dev as published (diffusers layout, the config.json of each subfolder)
FLUX_KONTEXT_DEV: dict[str, dict[str, Any]] = {
    "transformer": dict(
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),  # fmt: skip
    "vae": dict(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        norm_num_groups=32,
        act_fn="silu",
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    ),  # fmt: skip
    "text_encoder": dict(  # CLIP ViT-L/14 text tower
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    ),  # fmt: skip
    "text_encoder_2": dict(  # T5 v1.1 XXL encoder
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        tie_word_embeddings=False,
    ),  # fmt: skip
    "scheduler": dict(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ),  # fmt: skip
}
_CONFIG_FILES = {
    "transformer": "transformer/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "text_encoder_2": "text_encoder_2/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}

# FLUX.2 klein as published (diffusers layout): the transformer per variant, the FLUX.2 VAE
# (diffusers' AutoencoderKLFlux2 defaults), Qwen3-4B / Qwen3-8B as the text encoder
_QWEN3 = dict(vocab_size=151936, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
              max_position_embeddings=40960, rms_norm_eps=1e-6,
              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})  # fmt: skip
FLUX2_KLEIN: dict[str, dict[str, dict[str, Any]]] = {
    "4b": {  # FLUX.2 klein (base) 4B: 5 double + 20 single blocks, width 3072; Qwen3-4B
        "transformer": dict(num_layers=5, num_single_layers=20, num_attention_heads=24, attention_head_dim=128,
                            joint_attention_dim=7680, in_channels=128, mlp_ratio=3.0, guidance_embeds=False),
        "vae": {},
        "text_encoder": dict(_QWEN3, hidden_size=2560, intermediate_size=9728, tie_word_embeddings=True),
        "scheduler": KLEIN_SCHEDULER,
    },
    "9b": {  # FLUX.2 klein (base) 9B: 8 double + 24 single blocks, width 4096; Qwen3-8B
        "transformer": dict(num_layers=8, num_single_layers=24, num_attention_heads=32, attention_head_dim=128,
                            joint_attention_dim=12288, in_channels=128, mlp_ratio=3.0, guidance_embeds=False),
        "vae": {},
        "text_encoder": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False),
        "scheduler": KLEIN_SCHEDULER,
    },
}  # fmt: skip
# Qwen-Image-Edit(-Plus) as published: the Qwen-Image transformer and VAE (diffusers' defaults of
# QwenImageTransformer2DModel and AutoencoderKLQwenImage) and Qwen2.5-VL-7B-Instruct
QWEN_IMAGE_EDIT: dict[str, dict[str, Any]] = {
    "transformer": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56)),
    "vae": dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2),
    "text_encoder": dict(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                         rms_norm_eps=1e-6, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], in_chans=3),
        tie_word_embeddings=False,
    ),
    "scheduler": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                      base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                      time_shift_type="exponential"),
}  # fmt: skip
QWEN_VL_MAX_PIXELS = 12845056  # Qwen2.5-VL's processor: images up to this many pixels (min 56 * 56)
_BACKBONE_FILES = {
    "transformer": "transformer/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}


# --- Settings (conf/plan.yaml) -------------------------------------------------------------------


@dataclass(frozen=True)
class GPUSettings:
    """``plan.gpu``: one accelerator."""

    memory_gb: float = 80.0  # GiB usable per GPU
    peak_tflops: float = 989.0  # dense bf16 TFLOP/s (H100 SXM: 989; A100: 312)


@dataclass(frozen=True)
class PlannerSettings:
    """``plan``: what psr-plan assumes beyond the run's own config."""

    trainer: str = "rl"  # rl | sft: whose config the other overrides compose
    world_size: int = 8  # ranks (ZeRO partitions over them)
    gpu: GPUSettings = field(default_factory=GPUSettings)
    num_references: int = 2  # references per prompt / record
    reference_resolution: int | None = None  # side of the square reference images (null: the target's)
    reward_tflops_per_image: float | None = None  # reward cost if known (null: not counted)
    variant: str | None = None  # FLUX.2 klein without model.path: 4b (null) | 9b
    json: str | None = None  # also write the plan here

    def __post_init__(self) -> None:
        problems = []
        if self.trainer not in ("rl", "sft"):
            problems.append(f"trainer={self.trainer!r}: expected rl or sft (or psr-plan --sft)")
        if self.world_size < 1:
            problems.append(f"world_size={self.world_size}: must be >= 1")
        if self.num_references < 0:
            problems.append(f"num_references={self.num_references}: must be >= 0")
        if self.variant is not None and str(self.variant).lower() not in FLUX2_KLEIN:
            problems.append(
                f"variant={self.variant!r}: expected one of {sorted(FLUX2_KLEIN)} (FLUX.2 klein) or null"
            )
        if not (self.gpu.memory_gb > 0 and self.gpu.peak_tflops > 0):
            problems.append(f"gpu={self.gpu}: memory_gb and peak_tflops must be > 0")
        if problems:
            raise SettingsError("plan", problems)


# --- The model on the meta device ----------------------------------------------------------------


def flux_kontext_configs(path: str | os.PathLike | None) -> dict[str, dict[str, Any]]:
    """Component configs from ``path``'s config.json files, or :data:`FLUX_KONTEXT_DEV` without a path."""
    if path is None:
        return {k: dict(v) for k, v in FLUX_KONTEXT_DEV.items()}
    from psr.models.builders import resolve_checkpoint

    root = resolve_checkpoint(path)
    out = {}
    for name, rel in _CONFIG_FILES.items():
        file = root / rel
        if not file.is_file():
            raise FileNotFoundError(f"model.path={path}: no {rel} (psr-plan reads the component configs)")
        out[name] = {k: v for k, v in json.loads(file.read_text()).items() if not k.startswith("_")}
    return out


def _meta_flux_components(configs: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        comps = {
            "transformer": FluxTransformer2DModel.from_config(configs["transformer"]),
            "vae": AutoencoderKL.from_config(configs["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
            "text_encoder_2": T5EncoderModel(T5Config(**configs["text_encoder_2"])),
        }
    comps["tokenizer"] = _PaddingTokenizer(int(configs["text_encoder"].get("max_position_embeddings", 77)))
    comps["tokenizer_2"] = _PaddingTokenizer(512)
    comps["scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(configs["scheduler"])
    return comps


def backbone_configs(
    backbone: str, path: str | os.PathLike | None, variant: str | None = None
) -> dict[str, dict[str, Any]]:
    """Component configs of ``flux2_klein`` (``variant`` 4b | 9b, default 4b) or ``qwen_image_edit_plus``:
    the published sizes without a path, else ``path``'s config.json files (the variant is then the
    checkpoint's; ``is_distilled`` from its model_index.json)."""
    if path is None:
        if backbone == "qwen_image_edit_plus":
            return {k: dict(v) for k, v in QWEN_IMAGE_EDIT.items()}
        key = (variant or "4b").lower()
        if key not in FLUX2_KLEIN:
            raise ValueError(f"plan.variant={variant!r}: FLUX.2 klein is 4b or 9b")
        return {k: dict(v) for k, v in FLUX2_KLEIN[key].items()}
    from psr.models.builders import resolve_checkpoint

    root = resolve_checkpoint(path)
    out: dict[str, dict[str, Any]] = {}
    for name, rel in _BACKBONE_FILES.items():
        file = root / rel
        if not file.is_file():
            raise FileNotFoundError(f"model.path={path}: no {rel} (psr-plan reads the component configs)")
        out[name] = {k: v for k, v in json.loads(file.read_text()).items() if not k.startswith("_")}
    index = root / "model_index.json"
    out["index"] = json.loads(index.read_text()) if index.is_file() else {}
    return out


class _ChatPaddingTokenizer:
    """Qwen3's tokenizer as Flux2KleinPolicy calls it: the chat template, then ids padded to
    ``max_length`` (their values never change a shape; the mask marks a few tokens as real, so the
    text encoder builds its padding mask as it does for a real prompt)."""

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], **kwargs: Any) -> str:
        return "".join(m["content"] for m in messages)

    def __call__(self, text: str, *, max_length: int, **kwargs: Any) -> dict[str, Tensor]:
        mask = torch.zeros(1, max_length, dtype=torch.long)
        mask[:, : min(max_length, 16)] = 1
        return {"input_ids": torch.zeros(1, max_length, dtype=torch.long), "attention_mask": mask}


class _VLProcessor:
    """Qwen2.5-VL's processor for the planner: the real ``Qwen2_5_VLProcessor`` (image resizing to
    patches, the image-pad expansion: the token count per reference is exact) over a small byte-level
    tokenizer, whose prompt-template prefix is re-cut to Qwen's 64 tokens
    (``PROMPT_TEMPLATE_DROP``) so the text length after the drop is the real one up to the
    prompt's own words."""

    def __init__(self) -> None:
        from psr.models.qwen_image_edit import PROMPT_TEMPLATE
        from rewards.testing import tiny_qwen_vl_processor

        self.processor = tiny_qwen_vl_processor("qwen2_5_vl", max_pixels=QWEN_VL_MAX_PIXELS)
        self.tokenizer = self.processor.tokenizer
        self.prefix = len(self.tokenizer(PROMPT_TEMPLATE.split("{}")[0]).input_ids)

    def __call__(self, **kwargs: Any) -> Any:
        from psr.models.qwen_image_edit import PROMPT_TEMPLATE_DROP

        out = self.processor(**kwargs)
        for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
            if key in out:
                value = out[key]
                head = torch.full((value.shape[0], PROMPT_TEMPLATE_DROP), int(key == "attention_mask"))
                out[key] = torch.cat([head.to(value.dtype), value[:, self.prefix :]], dim=1)
        return out


class _MetaVisionLanguage(torch.nn.Module):
    """Qwen2.5-VL on the meta device, called as QwenImageEditPolicy calls its text encoder.

    Its ``device`` is the CPU, so the processor's ids, masks and image grids keep their values; the
    parts of ``Qwen2_5_VLModel.forward`` that read values (the vision tower's window and sequence
    indices, the image-token scatter) are computed here from them on the CPU, and every layer (the
    vision tower, the language model, the LM head, as the real forward runs them) runs on meta.
    A prompt without padding runs without a mask (causal), as transformers does."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None = None,
                image_grid_thw: Tensor | None = None, **kwargs: Any) -> Any:  # fmt: skip
        from transformers.vision_utils import (
            get_vision_attention_seqlens,
            get_vision_position_ids,
            get_vision_window_index,
        )

        inner = self.model.model
        embeds = inner.get_input_embeddings()(input_ids.to("meta"))
        if pixel_values is not None and image_grid_thw is not None:
            visual = inner.visual
            grid = image_grid_thw.cpu()
            cu, max_len = get_vision_attention_seqlens(grid, visual.config)
            window, cu_window = get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                                        window_size=visual.window_size, patch_size=visual.patch_size)  # fmt: skip
            images = visual(
                pixel_values.to("meta", visual.dtype),
                grid_thw=grid,
                position_ids=get_vision_position_ids(grid, visual.spatial_merge_size).to("meta"),
                cu_seqlens=cu,
                max_seqlen=max_len,
                window_index=window,
                cu_window_seqlens=cu_window,
            ).pooler_output
            where = (input_ids[0] == self.config.image_token_id).nonzero()[:, 0]
            if len(where) != images.shape[0]:
                raise ValueError(f"{len(where)} image tokens for {images.shape[0]} image features")
            embeds = embeds.clone()
            embeds[0, where] = images.to(embeds.dtype)
        mask = None if bool(attention_mask.all()) else attention_mask.to("meta")
        out = inner.language_model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True,
                                   use_cache=False)  # fmt: skip
        self.model.lm_head(out.last_hidden_state)  # the real forward computes every token's logits
        return SimpleNamespace(hidden_states=out.hidden_states)


def _meta_klein_components(configs: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.device("meta"):
        comps = {
            "transformer": Flux2Transformer2DModel.from_config(configs["transformer"]),
            "vae": AutoencoderKLFlux2.from_config(configs["vae"]),
            "text_encoder": Qwen3ForCausalLM(Qwen3Config(**configs["text_encoder"])),
        }
    comps["tokenizer"] = _ChatPaddingTokenizer()
    comps["scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(configs["scheduler"])
    return comps


def _meta_qwen_components(configs: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    processor = _VLProcessor()
    tokens = {name: processor.tokenizer.convert_tokens_to_ids(f"<|{name}|>")
              for name in ("image_pad", "video_pad", "vision_start")}  # fmt: skip
    te = dict(configs["text_encoder"])
    # the special tokens of the planner's processor (the real ones sit at other ids of the real vocabulary)
    te.update(image_token_id=tokens["image_pad"], video_token_id=tokens["video_pad"],
              vision_start_token_id=tokens["vision_start"])  # fmt: skip
    with torch.device("meta"):
        comps = {
            "transformer": QwenImageTransformer2DModel.from_config(configs["transformer"]),
            "vae": AutoencoderKLQwenImage.from_config(configs["vae"]),
            "text_encoder": _MetaVisionLanguage(Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**te))),
        }
    comps["tokenizer"] = processor.tokenizer
    comps["processor"] = processor
    comps["scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(configs["scheduler"])
    return comps


@contextmanager
def meta_padding_masks() -> Iterator[None]:
    """Inside, transformers builds the causal mask of a padded prompt on meta as it does for real
    values: its check "is every token real, so the mask can be skipped?" reads values; on meta the
    answer is no (the planner's prompts are padded, as FLUX.2 klein pads them to 512)."""
    from transformers import masking_utils

    original = masking_utils._ignore_causal_mask_sdpa

    def ignore(padding_mask: Tensor | None, *args: Any, **kwargs: Any) -> bool:
        if padding_mask is not None and padding_mask.device.type == "meta":
            return False
        return bool(original(padding_mask, *args, **kwargs))

    masking_utils._ignore_causal_mask_sdpa = ignore
    try:
        yield
    finally:
        masking_utils._ignore_causal_mask_sdpa = original


class _PaddingTokenizer:
    """Token ids of the padded length FlowPolicy asks for: prompts are padded to the maximum length,
    so the ids' values never change a shape (ids 0: the real vocabularies are not needed)."""

    def __init__(self, model_max_length: int, vocab_size: int = 49408) -> None:
        self.model_max_length = model_max_length
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, texts: Sequence[str], *, max_length: int, **kwargs: Any) -> Any:
        return SimpleNamespace(input_ids=torch.zeros(len(texts), max_length, dtype=torch.long))


def meta_policy(model: Mapping[str, Any], variant: str | None = None) -> Any:
    """The policy ``model`` (a ``model`` config node as a mapping) describes, on the meta device.

    Knows :func:`psr.models.builders.flux_kontext`, :func:`psr.models.flux2_klein.flux2_klein`
    (``variant`` 4b | 9b without a path) and :func:`psr.models.qwen_image_edit.qwen_image_edit_plus`
    (``path`` optional for all three: the published sizes), and
    :func:`~psr.models.builders.tiny_flux_kontext`.
    """
    from psr.models.builders import parse_dtype, tiny_flux_kontext_components
    from psr.models.policy import FlowPolicy

    target = str(model.get("_target_", ""))
    name = target.rsplit(".", 1)[-1]
    if name in ("flux2_klein", "qwen_image_edit_plus"):
        return _meta_backbone(name, model, variant)
    if name == "tiny_flux_kontext":
        from unittest import mock

        from psr.models import builders

        # the tiny builder's CLIP tokenizer takes seconds to build from its BPE file; only shapes matter
        with (
            torch.device("meta"),
            mock.patch.object(builders, "clip_tokenizer_offline", lambda: _PaddingTokenizer(77)),
        ):
            comps = tiny_flux_kontext_components(int(model.get("seed", 0)), fitted_vae=False)
        max_length = 32
    elif name == "flux_kontext":
        comps = _meta_flux_components(flux_kontext_configs(model.get("path")))
        max_length = int(model.get("max_sequence_length", 512))
    else:
        raise ValueError(
            f"model._target_={target}: psr-plan builds psr.models.builders.flux_kontext, tiny_flux_kontext, "
            "psr.models.flux2_klein.flux2_klein and psr.models.qwen_image_edit.qwen_image_edit_plus on the meta device"
        )
    dtype = parse_dtype(model.get("dtype", "float32"))
    te_dtype = parse_dtype(model.get("text_encoder_dtype") or dtype)
    for key, dt in (
        ("transformer", dtype),
        ("vae", dtype),
        ("text_encoder", te_dtype),
        ("text_encoder_2", te_dtype),
    ):
        if any(p.dtype != dt for p in comps[key].parameters()):
            comps[key].to(dtype=dt)
        comps[key].requires_grad_(False).eval()
    return FlowPolicy(
        **comps,
        position_scheme=str(model.get("position_scheme", "framewise")),
        reference_max_area=model.get("reference_max_area"),
        guidance=model.get("guidance", 2.5),
        max_sequence_length=max_length,
        gradient_checkpointing=bool(model.get("gradient_checkpointing", False)),
    )


def _meta_backbone(name: str, model: Mapping[str, Any], variant: str | None) -> Any:
    """FLUX.2 klein or Qwen-Image-Edit-Plus on meta, with the builder's own policy arguments."""
    from psr.models.builders import parse_dtype

    configs = backbone_configs(name, model.get("path"), variant)
    if name == "flux2_klein":
        from psr.models.flux2_klein import Flux2KleinPolicy

        comps = _meta_klein_components(configs)
        distilled = model.get("is_distilled")
        if distilled is None:
            distilled = bool(configs.get("index", {}).get("is_distilled", False))
        extra: dict[str, Any] = dict(
            is_distilled=bool(distilled),
            guidance_scale=float(model.get("guidance_scale", 4.0)),
            reference_max_area=int(model.get("reference_max_area", 1024 * 1024)),
            max_sequence_length=int(model.get("max_sequence_length", 512)),
            text_encoder_out_layers=tuple(model.get("text_encoder_out_layers", (9, 18, 27))),
        )
        cls: Any = Flux2KleinPolicy
    else:
        from psr.models.qwen_image_edit import QwenImageEditPolicy

        comps = _meta_qwen_components(configs)
        extra = dict(
            true_cfg_scale=float(model.get("true_cfg_scale", 4.0)),
            negative_prompt=str(model.get("negative_prompt", " ")),
            condition_area=int(model.get("condition_area", 384 * 384)),
            reference_area=int(model.get("reference_area", 1024 * 1024)),
        )
        cls = QwenImageEditPolicy
    dtype = parse_dtype(model.get("dtype", "bfloat16"))
    te_dtype = parse_dtype(model.get("text_encoder_dtype") or dtype)
    for key, dt in (("transformer", dtype), ("vae", dtype), ("text_encoder", te_dtype)):
        comps[key].to(dtype=dt).requires_grad_(False).eval()
    return cls(**comps, **extra, gradient_checkpointing=bool(model.get("gradient_checkpointing", False)))


# --- Model states per GPU ------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineSpec:
    """What the memory of model states depends on (``conf/engine/*.yaml``)."""

    kind: str  # torch | zero2 | zero3
    precision: str = "bf16"
    ema: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False

    @classmethod
    def from_config(cls, engine: Mapping[str, Any]) -> EngineSpec:
        target = str(engine.get("_target_", ""))
        if target.endswith("TorchEngine"):
            kind = "torch"
        elif target.endswith("DeepSpeedEngine"):
            kind = f"zero{int(engine.get('stage', 2))}"
        else:
            raise ValueError(f"engine._target_={target}: expected psr.engine.TorchEngine or DeepSpeedEngine")
        return cls(
            kind,
            str(engine.get("precision", "fp32")),
            engine.get("ema_decay") is not None,
            bool(engine.get("offload_optimizer", False)),
            bool(engine.get("offload_params", False)),
        )


def model_state_bytes(
    engine: EngineSpec,
    *,
    frozen: int,
    trainable: int,
    world_size: int,
    frozen_bytes: int = 2,
    trainable_bytes: int = 4,
    largest_layer: int = 0,
) -> dict[str, float]:
    """Bytes per GPU of the trained module's weights, gradients, optimizer states and EMA.

    DeepSpeed (bf16) follows its own estimators' accounting (``estimate_zero2/3_model_states_mem_needs``,
    no offload): per trainable parameter 2 bytes of bf16 weight, 2 + 4 of bf16 and fp32 gradient and
    4 + 8 of fp32 master weight and AdamW moments; ZeRO-2 partitions the last four over the ranks,
    ZeRO-3 all of them (frozen weights too) plus a gathered largest layer (4 bytes per element).
    The plain engine keeps everything on every rank: AdamW moments in the trainable dtype, which is
    fp32 under ``precision=bf16`` (fp32 master weights, bf16 autocast).

    Args:
        frozen, trainable: parameter counts of the trained module.
        frozen_bytes, trainable_bytes: bytes per element as built (e.g. bf16 base, fp32 LoRA).
        largest_layer: most parameters of one module (ZeRO-3's gathered layer).

    Returns:
        ``{"weights", "grads", "optimizer", "ema"}`` in bytes.
    """
    n = world_size
    ema = 4.0 * trainable if engine.ema else 0.0
    if engine.kind == "torch":
        tb = 4 if engine.precision == "bf16" else trainable_bytes
        return {
            "weights": float(frozen * frozen_bytes + trainable * tb),
            "grads": float(trainable * tb),
            "optimizer": float(2 * trainable * tb),
            "ema": ema,
        }
    pb = 2 if engine.precision == "bf16" else 4  # DeepSpeed casts the module to bf16
    total = frozen + trainable
    if engine.kind == "zero2":
        weights = float(total * pb)
        grads = trainable * ((pb + 4) if pb == 2 else 4) / n
    else:
        weights = 0.0 if engine.offload_params else total * pb / n
        weights += 2 * pb * largest_layer
        grads = trainable * 4 / n
    optimizer = 12.0 * trainable / n
    if engine.offload_optimizer:  # master weights, moments and fp32 gradients live on the CPU
        optimizer, grads = 0.0, 0.0
    return {"weights": weights, "grads": grads, "optimizer": optimizer, "ema": ema}


# --- The plan ------------------------------------------------------------------------------------


@dataclass
class Phase:
    """One phase of a step on one GPU.

    Attributes:
        flops: FLOPs per step on this GPU.
        static: bytes of model states resident in this phase.
        activations: measured peak of live tensors (``batch`` samples), plus what other groups hold.
        per_sample: activation bytes per sample of the phase's batch (for the largest batch).
        batch: the batch the phase runs at (rollout: G; update: micro-batch samples).
        note: how the phase was counted.
    """

    name: str
    flops: float
    resident: str = "none"  # which model states are on the GPU: forward | rollout | update | none
    static: float = 0.0
    activations: float = 0.0
    per_sample: float = 0.0
    batch: int = 0
    note: str = ""

    @property
    def peak(self) -> float:
        return self.static + self.activations


@dataclass
class Plan:
    """The whole step: phases, the model-state breakdown and the settings it was made for."""

    trainer: str
    world_size: int
    memory_gb: float
    peak_tflops: float
    phases: list[Phase]
    sizes: dict[str, int]
    setting: dict[str, Any]
    engine: EngineSpec
    notes: list[str] = field(default_factory=list)
    states: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.states = account(self.sizes, self.engine, self.world_size)
        for p in self.phases:
            p.static = _static(self.states, p.resident) if p.resident != "none" else 0.0

    def with_engine(self, engine: EngineSpec, world_size: int | None = None) -> Plan:
        """The same measured step under another engine or world size (same compute dtype)."""
        return dataclasses.replace(
            self,
            engine=engine,
            world_size=world_size or self.world_size,
            phases=[dataclasses.replace(p) for p in self.phases],
            setting={**self.setting, "engine": engine.kind, "precision": engine.precision},
        )

    @property
    def flops(self) -> float:
        return sum(p.flops for p in self.phases)

    def seconds(self, phase: Phase | None = None) -> float:
        """Lower bound of the time at the peak rate (the step's without ``phase``)."""
        flops = self.flops if phase is None else phase.flops
        return flops / (self.peak_tflops * 1e12)

    def fits(self, phase: Phase) -> bool:
        return phase.peak <= self.memory_gb * GIB

    def max_batch(self, phase: Phase) -> int | None:
        """Largest batch of the phase that fits (activations linear in the batch), None if not batched."""
        if not phase.batch or phase.per_sample <= 0:
            return None
        fixed = phase.peak - phase.per_sample * phase.batch
        return max(0, int((self.memory_gb * GIB - fixed) // phase.per_sample))

    def to_dict(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in dataclasses.asdict(self).items() if k not in ("phases", "engine")},
            "engine": dataclasses.asdict(self.engine),
            "step_tflops": self.flops / 1e12,
            "step_seconds_at_peak": self.seconds(),
            "phases": [
                {
                    **dataclasses.asdict(p),
                    "peak_bytes": p.peak,
                    "fits": self.fits(p),
                    "seconds_at_peak": self.seconds(p),
                    "max_batch": self.max_batch(p),
                }
                for p in self.phases
            ],
        }


class _NoEngine:
    """The engine calls an objective makes in a forward (autocast is emulated by the model's dtype)."""

    @staticmethod
    @contextmanager
    def autocast() -> Iterator[None]:
        yield


@contextmanager
def _measure(meter: Meter, out: dict[str, float]) -> Iterator[None]:
    """FLOPs, live bytes at the start and the peak of live bytes of a block, into ``out``."""
    flops, live = meter.flops, meter.bytes.live
    meter.bytes.reset_peak()
    with meter:
        yield
    out.update(flops=meter.flops - flops, start=live, peak=meter.bytes.peak, end=meter.bytes.live)


def _count(params: Sequence[Tensor]) -> int:
    return int(sum(p.numel() for p in params))


def _prepare(policy: Any, mode: str, lora: Mapping[str, Any], keep_reference: bool, engine: EngineSpec,
             model: Mapping[str, Any]) -> tuple[dict[str, int], list[Any]]:  # fmt: skip
    """Make the policy trainable as the trainers do; parameter counts and bytes as built, grad hooks."""
    from psr.models.lora import make_trainable

    params = make_trainable(policy, mode, **lora, keep_reference=keep_reference)
    ids = {id(p) for p in params}
    transformer = list(policy.transformer.parameters())
    frozen = [p for p in transformer if id(p) not in ids]
    text_encoders = [getattr(policy, n) for n in ("text_encoder", "text_encoder_2") if hasattr(policy, n)]
    encoders = [p for m in text_encoders for p in m.parameters()]
    device = str(model.get("text_encoder_device") or "cuda")
    reference = policy.__dict__.get("_reference")
    sizes = {
        "transformer": _count(transformer),
        "trainable": _count(params),
        "frozen": _count(frozen),
        "frozen_bytes": frozen[0].element_size() if frozen else 2,
        "trainable_bytes": params[0].element_size(),
        "largest_layer": max(_count(list(m.parameters(recurse=False))) for m in policy.transformer.modules()),
        "text_encoders": _count(encoders),
        "vae": _count(list(policy.vae.parameters())),
        "text_encoder_bytes": _bytes(encoders) if device.startswith("cuda") else 0,
        "vae_bytes": _bytes(list(policy.vae.parameters())),
        "reference_copy_bytes": _bytes(list(reference.parameters())) if reference is not None else 0,
    }
    if engine.precision == "bf16":  # what autocast computes in; model states are accounted as built
        policy.transformer.to(torch.bfloat16)
    # each gradient is freed once accumulated: gradient memory is in the model states, not the activations
    hooks = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in params]
    return sizes, hooks


def _bytes(params: Sequence[Tensor]) -> int:
    return int(sum(p.numel() * p.element_size() for p in params))


def account(sizes: Mapping[str, int], engine: EngineSpec, world_size: int) -> dict[str, float]:
    """Model-state bytes per GPU (:func:`model_state_bytes` plus the frozen encoders, VAE, copies)."""
    states = model_state_bytes(
        engine,
        frozen=sizes["frozen"],
        trainable=sizes["trainable"],
        world_size=world_size,
        frozen_bytes=sizes["frozen_bytes"],
        trainable_bytes=sizes["trainable_bytes"],
        largest_layer=sizes["largest_layer"],
    )
    states["text_encoders"] = float(sizes["text_encoder_bytes"])
    states["vae"] = float(sizes["vae_bytes"])
    states["reference_copy"] = float(sizes["reference_copy_bytes"])
    if engine.kind == "zero3":  # rollouts gather the whole transformer once (engine.gathered_parameters)
        states["gathered_for_rollout"] = float(2 * sizes["transformer"])
    return states


def _static(states: Mapping[str, float], resident: str) -> float:
    """Model states resident in a phase: gradients only in the update (freed at each optimizer
    step), ZeRO-3's gathered copy only in rollouts."""
    keep = ["weights", "optimizer", "ema", "text_encoders", "vae", "reference_copy"]
    keep += {"update": ["grads"], "rollout": ["gathered_for_rollout"]}.get(resident, [])
    return sum(states.get(k, 0.0) for k in keep)


def _references(n: int, side: int, policy: Any = None) -> list[Tensor]:
    """Reference images on meta; on the CPU (zeros) for a policy that reads their pixels before the
    device (Qwen-Image-Edit: PIL images for its processor)."""
    if type(policy).__name__ == "QwenImageEditPolicy":
        return [torch.zeros(3, side, side) for _ in range(n)]
    return [torch.empty(3, side, side, device="meta") for _ in range(n)]


def plan_rl(cfg: Any, plan: PlannerSettings) -> Plan:
    """One psr-rl step per GPU for the composed psr-rl config ``cfg``."""
    from hydra.utils import instantiate

    from psr.config import RLTrainSettings, SamplerSettings, settings
    from psr.objectives.grpo import grpo_step_loss, select_train_steps
    from psr.sampling.rollout import rollout, sde_steps, step_log_prob
    from psr.sampling.sde import kl_gaussian_means, noise_std

    train = settings(cfg.train, RLTrainSettings, "train")
    sampler = settings(cfg.sampler, SamplerSettings, "sampler")
    objective = instantiate(
        cfg.algo, micro_batch_size=train.micro_batch_size, inner_epochs=train.inner_epochs
    )
    engine, model = EngineSpec.from_config(_plain(cfg.engine)), _plain(cfg.model)
    policy = meta_policy(model, plan.variant)
    sizes, hooks = _prepare(
        policy, train.mode, dataclasses.asdict(train.lora), objective.needs_reference, engine, model
    )
    meter = Meter(exclude=_existing(policy))
    groups, g, res = train.prompts_per_step, train.group_size, train.resolution
    cond_m: dict[str, float] = {}
    roll_m: dict[str, float] = {}
    upd_m: dict[str, float] = {}
    notes = _backbone_notes(policy)
    with flash_attention(), meta_padding_masks():
        policy.eval()
        with _measure(meter, cond_m):
            cond = policy.condition(
                "a photo",
                _references(plan.num_references, plan.reference_resolution or res, policy),
                res,
                res,
            )
        with repeat_forwards(policy.transformer, meter), _measure(meter, roll_m):
            traj = rollout(policy, cond, g, **dataclasses.asdict(sampler))
        # the mask on the CPU, as rollout made it before moving it to the device: step_log_prob reads it
        traj = dataclasses.replace(
            traj, sde_mask=sde_steps(sampler.num_steps, sampler.sde_window, sampler.method)
        )
        policy.train()
        if hasattr(objective, "clip_eps"):  # GRPO: GRPOObjective.update's work for one micro-batch
            steps = select_train_steps(traj.sde_mask, mode=objective.train_steps, fraction=objective.train_fraction,
                                       num=objective.num_train_steps, generator=torch.Generator().manual_seed(0))  # fmt: skip
            batch = min(train.micro_batch_size, g)
            mb, k = torch.arange(batch, device="meta"), int(steps[0])
            with _measure(meter, upd_m):
                out = step_log_prob(policy, traj, k, mb)
                kl = None
                if objective.beta > 0:
                    with torch.no_grad(), policy.reference_policy():
                        ref_mean = step_log_prob(policy, traj, k, mb).mean
                    std = out.std
                    if objective.kl_std == "diffusion":
                        s = traj.sigmas
                        std = noise_std(traj.method, s[k], s[k + 1], traj.noise_level, s[1])
                    kl = kl_gaussian_means(out.mean, ref_mean, std)
                adv = torch.ones(batch, device="meta")
                loss, _ = grpo_step_loss(
                    out.log_prob, traj.log_probs[mb, k], adv, objective.clip_eps, kl=kl, beta=objective.beta
                )
                loss.backward()
            samples = len(steps) * g
            notes.append(
                f"update: {len(steps)} trained steps x G={g} samples per group (all advantages non-zero)"
            )
        else:  # DPO: DPOObjective._pair_loss for one chunk of pairs
            per_group = 1 if objective.pairs == "best_worst" else g * (g - 1) // 2
            pairs = min(max(1, train.micro_batch_size // 2), per_group)
            if objective.focus:
                objective = dataclasses.replace(objective, focus=False)
                notes.append("update: DPO focus weights (one [N, R] product per sample) not counted")
            index = torch.zeros(pairs, 2, dtype=torch.long, device="meta")
            with _measure(meter, upd_m):
                loss, _ = objective._pair_loss(
                    policy, _NoEngine(), traj, index, torch.Generator().manual_seed(0)
                )
                loss.backward()
            batch, samples = 2 * pairs, 2 * per_group * objective.timesteps_per_pair
            notes.append(f"update: {per_group} pair(s) x {objective.timesteps_per_pair} timesteps per group")
    for h in hooks:
        h.remove()
    held = roll_m["end"] - cond_m["start"]  # one group's conditioning and trajectory, kept until the update
    reward = plan.reward_tflops_per_image
    phases = [
        Phase("condition", cond_m["flops"] * groups, "rollout", activations=cond_m["peak"], note="text encoders + VAE on the references"),
        Phase("rollout", roll_m["flops"] * groups, "rollout", 0.0, roll_m["peak"] + (groups - 1) * held,
              (roll_m["peak"] - roll_m["start"]) / g, g, f"{sampler.num_steps} steps at batch G + VAE decode"),
        Phase("reward", (reward or 0.0) * 1e12 * groups * g,
              note="configured" if reward is not None else "not counted (plan.reward_tflops_per_image)"),
        Phase("update", upd_m["flops"] / batch * samples * groups * train.inner_epochs, "update", 0.0,
              upd_m["peak"] + (groups - 1) * held, (upd_m["peak"] - upd_m["start"]) / batch, batch,
              f"micro-batch {batch}, {type(objective).__name__}"),
    ]  # fmt: skip
    setting = {"resolution": res, "group_size": g, "prompts_per_step": groups, "num_steps": sampler.num_steps,
               "sde_window": sampler.sde_window, "mode": train.mode, "lora_rank": train.lora.rank,
               "engine": engine.kind, "precision": engine.precision, "num_references": plan.num_references,
               "tokens": {"target": cond.num_target_tokens, "references": int(cond.ref_tokens.shape[1]),
                          "text": int(cond.prompt_embeds.shape[1])}}  # fmt: skip
    return Plan(
        "rl", plan.world_size, plan.gpu.memory_gb, plan.gpu.peak_tflops, phases, sizes, setting, engine, notes
    )


def plan_sft(cfg: Any, plan: PlannerSettings) -> Plan:
    """One psr-sft optimizer step per GPU for the composed psr-sft config ``cfg``."""
    from hydra.utils import instantiate

    from psr.config import DatasetSettings, SFTTrainSettings, settings

    train = settings(cfg.train, SFTTrainSettings, "train")
    res = settings(cfg.dataset, DatasetSettings, "dataset").resolution
    objective = instantiate(cfg.objective)
    engine, model = EngineSpec.from_config(_plain(cfg.engine)), _plain(cfg.model)
    policy = meta_policy(model, plan.variant)
    sizes, hooks = _prepare(policy, train.mode, dataclasses.asdict(train.lora), False, engine, model)
    meter = Meter(exclude=_existing(policy))
    b = train.micro_batch_size
    enc_m: dict[str, float] = {}
    upd_m: dict[str, float] = {}
    with flash_attention(), meta_padding_masks():
        policy.train()
        with _measure(meter, enc_m):  # SFTTrainer.batch_loss: targets, then one conditioning per record
            x0 = policy.encode_images(torch.empty(b, 3, res, res, device="meta"))
            side = plan.reference_resolution or res
            conds = [
                policy.condition(f"record {i}", _references(plan.num_references, side, policy), res, res)
                for i in range(b)
            ]
            sigmas = objective.sample(b, x0.shape[1], policy.scheduler_config, None, "meta")
            noise = torch.empty(x0.shape, device="meta")
        # stack_conditionings keys records by their position ids' values; on meta every record of the
        # plan has the same layout, so the key is built from zeros of the same shapes
        if hasattr(conds[0], "ref_ids"):
            keyed = [dataclasses.replace(c, ref_ids=torch.zeros(c.ref_ids.shape)) for c in conds]
            stacked = [
                (idx, dataclasses.replace(s, ref_ids=conds[idx[0]].ref_ids))
                for idx, s in policy.stack_conditionings(keyed)
            ]
        else:  # Qwen-Image-Edit: one conditioning per record, nothing keyed
            stacked = policy.stack_conditionings(conds)
        with _measure(meter, upd_m):
            for idx, cond in stacked:
                loss, _ = objective(policy, x0[idx], cond, sigmas=sigmas[idx], noise=noise[idx])
                (loss * (len(idx) / b)).backward()
    for h in hooks:
        h.remove()
    steps = train.grad_accum
    phases = [
        Phase("condition", enc_m["flops"] * steps, "forward", activations=enc_m["peak"],
              note="VAE on targets and references, text encoders, per record"),
        Phase("update", upd_m["flops"] * steps, "update", 0.0, upd_m["peak"],
              (upd_m["peak"] - enc_m["start"]) / b, b, f"micro-batch {b} x grad_accum {steps}, flow matching"),
    ]  # fmt: skip
    setting = {"resolution": res, "micro_batch_size": b, "grad_accum": steps, "mode": train.mode,
               "lora_rank": train.lora.rank, "engine": engine.kind, "precision": engine.precision,
               "num_references": plan.num_references,
               "tokens": {"target": conds[0].num_target_tokens, "references": int(conds[0].ref_tokens.shape[1]),
                          "text": int(conds[0].prompt_embeds.shape[1])}}  # fmt: skip
    return Plan(
        "sft", plan.world_size, plan.gpu.memory_gb, plan.gpu.peak_tflops, phases, sizes, setting, engine,
        _backbone_notes(policy),
    )  # fmt: skip


def _backbone_notes(policy: Any) -> list[str]:
    """What the planner supplies for a backbone's value-reading steps (see :func:`meta_policy`)."""
    kind = type(policy).__name__
    if kind == "Flux2KleinPolicy":
        cfg = "true CFG: one batch-2B forward per velocity" if policy.guidance_scale else "no CFG (distilled)"
        return [
            f"FLUX.2 klein, {cfg}; Qwen3 prompt padded to {policy.max_sequence_length} tokens (shape-only tokenizer)"
        ]
    if kind == "QwenImageEditPolicy":
        cfg = "true CFG: two forwards per velocity" if policy.true_cfg_scale else "no CFG"
        return [
            f"Qwen-Image-Edit, {cfg}; references as CPU zeros for the processor; Qwen2.5-VL's index glue "
            "on the CPU, its layers on meta; prompt words counted by a small byte-level tokenizer"
        ]
    return []


def _existing(policy: Any) -> list[Tensor]:
    """Parameters and buffers (the reference copy's too): never counted as activations."""
    modules = [policy, policy.__dict__.get("_reference")]
    return [t for m in modules if m is not None for t in (*m.parameters(), *m.buffers())]


def _plain(node: Any) -> dict[str, Any]:
    """A config node as a dict; ``???`` values (e.g. an unset ``model.path``) become None."""
    from omegaconf import OmegaConf

    if not OmegaConf.is_config(node):
        return dict(node)
    out = {}
    for key in node:
        try:
            value = OmegaConf.select(node, str(key), throw_on_missing=True)
        except Exception:  # noqa: BLE001 - omegaconf's MissingMandatoryValue or an unresolvable default
            value = None
        if value == "???":  # ${oc.env:NAME,???} with NAME unset
            value = None
        out[str(key)] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return out


# --- Telemetry -----------------------------------------------------------------------------------


class StepFlops:
    """FLOPs of one training step on one GPU, from the number of references of its prompts/records.

    Measured on the meta device once per reference count (psr-rl: per prompt group; psr-sft: per
    record) and cached, so a step's FLOPs are the sum over its groups or records. psr-rl counts every
    sample as trained (an upper bound when GRPO skips equal-reward groups); rewards are not counted.

    Args:
        cfg: the composed psr-rl or psr-sft config.
        trainer: ``rl`` | ``sft``.
    """

    def __init__(self, cfg: Any, trainer: str) -> None:
        from omegaconf import OmegaConf

        self.trainer = trainer
        one = (
            {"train.prompts_per_step": 1}
            if trainer == "rl"
            else {"train.micro_batch_size": 1, "train.grad_accum": 1}
        )
        self.cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in one.items()]))
        self._cache: dict[int, float] = {}

    def per_unit(self, num_references: int) -> float:
        """FLOPs of one prompt group (psr-rl) or one record (psr-sft) with this many references."""
        if num_references not in self._cache:
            run = plan_rl if self.trainer == "rl" else plan_sft
            self._cache[num_references] = run(
                self.cfg, PlannerSettings(trainer=self.trainer, num_references=num_references)
            ).flops
        return self._cache[num_references]

    def __call__(self, reference_counts: Sequence[int]) -> float:
        """FLOPs of a step whose groups or records have these reference counts."""
        return float(sum(self.per_unit(int(n)) for n in reference_counts))


def perf_metrics(flops: float, seconds: float, peak_tflops: float | None) -> dict[str, float]:
    """``perf/tflops`` (achieved TFLOP/s on this GPU) and ``perf/mfu`` (its fraction of ``peak_tflops``)."""
    if seconds <= 0 or not math.isfinite(seconds):
        return {}
    tflops = flops / seconds / 1e12
    out = {"perf/tflops": tflops}
    if peak_tflops:
        out["perf/mfu"] = tflops / peak_tflops
    return out


# --- Output and entry point ----------------------------------------------------------------------


def format_table(plan: Plan) -> str:
    """The plan as a text table (GiB = 2^30 bytes)."""
    s = plan.setting
    lines = [
        f"psr-plan: psr-{plan.trainer}, {plan.world_size} x {plan.memory_gb:g} GiB at {plan.peak_tflops:g} TFLOP/s, "
        f"engine {s['engine']} ({s['precision']}), {s['mode']}"
        + (f" rank {s['lora_rank']}" if s["mode"] == "lora" else "")
        + f", {s['num_references']} references at {s['resolution']} px, tokens {s['tokens']}",
        "parameters: " + ", ".join(
            f"{k} {v / 1e9:.3f} B" if v > 1e7 else f"{k} {v / 1e6:.2f} M"
            for k, v in plan.sizes.items() if k in ("transformer", "trainable", "text_encoders", "vae", "largest_layer")
        ),
        "model states per GPU (GiB): " + ", ".join(f"{k} {v / GIB:.4g}" for k, v in plan.states.items()),
        f"{'phase':<10} {'TFLOPs':>10} {'time >= s':>10} {'static GiB':>11} {'act GiB':>9} {'peak GiB':>9} {'fits':>5} {'max batch':>10}  note",
    ]  # fmt: skip
    for p in plan.phases:
        mb = plan.max_batch(p)
        lines.append(
            f"{p.name:<10} {p.flops / 1e12:>10.4g} {plan.seconds(p):>10.4g} {p.static / GIB:>11.4g} "
            f"{p.activations / GIB:>9.4g} {p.peak / GIB:>9.4g} {'yes' if plan.fits(p) else 'NO':>5} "
            f"{'-' if mb is None else f'{mb} (now {p.batch})':>10}  {p.note}"
        )
    lines.append(
        f"{'step':<10} {plan.flops / 1e12:>10.4g} {plan.seconds():>10.4g}  (lower bound at peak; per GPU)"
    )
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def make_plan(overrides: Sequence[str]) -> tuple[Plan, PlannerSettings]:
    """Compose ``plan.*`` overrides with conf/plan.yaml and the rest with psr-rl's (or psr-sft's) config,
    check both strictly, and plan."""
    from psr.config import check_config, compose, settings

    mine = [o for o in overrides if o.lstrip("+~").startswith("plan.")]
    rest = [o for o in overrides if o not in mine]
    plan = settings(compose("plan", mine).plan, PlannerSettings, "plan")
    cfg = compose(plan.trainer, rest)
    check_config(cfg, plan.trainer)
    return (plan_rl if plan.trainer == "rl" else plan_sft)(cfg, plan), plan


PAPER_BASE = ("experiment=psr_rl",)  # FLUX.1 Kontext-dev, Flow-GRPO, G = 6, 28 steps, LoRA 64, bf16


def paper_table(
    world_size: int = 8, memory_gb: float = 80.0, peak_tflops: float = 989.0, overrides: Sequence[str] = ()
) -> str:
    """The paper's RL settings under each engine: 2 and 4 references, 512 and 1024 px, all 28 steps
    trained or a 2-step SDE window (``sampler.sde_window=[0,2]``), LoRA 64 or full fine-tuning;
    ``overrides`` pick another backbone (``model=flux2_klein plan.variant=9b``, ``model=qwen_image_edit_plus``).

    One symbolic step per (references, resolution, mode); the engines reuse it (same bf16 compute)
    and the window changes only how many steps train, so its update FLOPs are the all-steps ones
    times 2/28 (the update is linear in the number of trained steps by construction).
    """
    rows = [
        "| refs | px | trained steps | mode | engine | step TFLOPs/GPU | step s >= | rollout GiB | update GiB "
        "(micro-batch 6) | fits | max micro-batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    gpu = [
        f"plan.world_size={world_size}",
        f"plan.gpu.memory_gb={memory_gb}",
        f"plan.gpu.peak_tflops={peak_tflops}",
    ]
    for refs in (2, 4):
        for px in (512, 1024):
            for mode in ("lora", "full"):
                base, _ = make_plan([*PAPER_BASE, *gpu, f"plan.num_references={refs}", f"train.resolution={px}",
                                     f"train.mode={mode}", "algo.train_steps=all", *overrides])  # fmt: skip
                for window in (28, 2):
                    for kind in ("torch", "zero2", "zero3"):
                        plan = base.with_engine(dataclasses.replace(base.engine, kind=kind))
                        update = next(p for p in plan.phases if p.name == "update")
                        update.flops *= window / 28
                        rollout = next(p for p in plan.phases if p.name == "rollout")
                        fits = "yes" if plan.fits(update) and plan.fits(rollout) else "NO"
                        rows.append(
                            f"| {refs} | {px} | {window} | {mode} | {kind} | {plan.flops / 1e12:,.0f} | "
                            f"{plan.seconds():.1f} | {rollout.peak / GIB:.1f} | {update.peak / GIB:.1f} | {fits} | "
                            f"{plan.max_batch(update)} |"
                        )
    return "\n".join(rows)


_USAGE = """usage: psr-plan [--sft] [plan.KEY=VALUE ...] [psr-rl or psr-sft overrides ...]

  psr-plan experiment=psr_rl engine=ds_zero2 plan.world_size=8 plan.gpu.memory_gb=80 plan.gpu.peak_tflops=989
  psr-plan --sft experiment=psr_sft engine=ds_zero3 plan.json=plan.json
  psr-plan --paper      (the paper's RL settings on 8 x 80 GiB at 989 TFLOP/s: docs/benchmarks.md)
  psr-plan --paper model=flux2_klein plan.variant=9b      (or model=qwen_image_edit_plus)

plan.* keys (conf/plan.yaml): trainer, world_size, gpu.memory_gb, gpu.peak_tflops, num_references,
reference_resolution, reward_tflops_per_image, variant (FLUX.2 klein: 4b | 9b), json. Prints FLOPs, memory per GPU, whether each
phase fits, a lower bound of its time and the largest batch that fits."""


def main(argv: Sequence[str] | None = None) -> None:
    """``psr-plan [--sft] [plan.KEY=VALUE ...] [psr-rl / psr-sft overrides ...]``."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from psr.config import ConfigError

    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(_USAGE)
        return
    if "--paper" in args:
        print(paper_table(overrides=[a for a in args if a != "--paper"]), flush=True)
        return
    if "--sft" in args:
        args = [a for a in args if a != "--sft"] + ["plan.trainer=sft"]
    try:
        plan, settings_ = make_plan(args)
    except (
        ConfigError,
        SettingsError,
        HydraException,
        OmegaConfBaseException,
        FileNotFoundError,
        ValueError,
    ) as err:
        raise SystemExit(f"psr-plan: {type(err).__name__}: {err}") from err
    print(format_table(plan), flush=True)
    if settings_.json:
        Path(settings_.json).parent.mkdir(parents=True, exist_ok=True)
        Path(settings_.json).write_text(json.dumps(plan.to_dict(), indent=2, default=str))
        print(f"psr-plan: wrote {settings_.json}")
