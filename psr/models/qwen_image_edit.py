"""Qwen-Image-Edit-Plus (2509 / 2511) as a multi-reference policy, equal to diffusers'
``QwenImageEditPlusPipeline``.

Natively multi-reference (docs/method.md §2.1): each reference is seen twice. (1) Qwen2.5-VL reads
it, resized to about ``condition_area`` pixels, inside the prompt template ("Picture k:
<|vision_start|><|image_pad|><|vision_end|>" before the instruction); the last hidden states, minus
the template's 64-token system prefix, are the text tokens. (2) Its VAE latent (about
``reference_area`` pixels, sides multiples of 32) is normalized with the VAE's per-channel mean and
std, packed 2x2 into 64-channel tokens and appended after the target tokens; the transformer gives
image i of ``img_shapes`` (target first) the i-th "frame" of its 3-axis RoPE. Guidance is true CFG
against a negative prompt (which also sees the references), with the combined velocity rescaled per
token to the conditional branch's norm: ``v = c * |v_pos| / |c|``, ``c = v_neg + g (v_pos - v_neg)``.
The two prompts differ in length, so the branches are two forwards.

Builders: :func:`qwen_image_edit_plus` (a local diffusers-layout folder or a filled HF cache) and
:func:`tiny_qwen_image_edit_plus` (random toy weights built in code, for tests).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from psr.models.builders import load_components, parse_dtype
from psr.models.policy import PolicyBase, pack_latents, unpack_latents
from psr.sampling.sde import calculate_shift
from psr.types import QwenImageEditConditioning

__all__ = [
    "COMPONENTS",
    "PROMPT_TEMPLATE",
    "QwenImageEditPolicy",
    "area_dimensions",
    "qwen_image_edit_plus",
    "qwen_image_edit_plus_components",
    "tiny_qwen_image_edit_plus",
    "tiny_qwen_image_edit_plus_components",
]

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler")
_EXPECTED_LAYOUT = (
    "a diffusers-layout Qwen-Image-Edit-Plus directory with model_index.json and the subfolders "
    "transformer/, vae/, text_encoder/, tokenizer/, processor/, scheduler/"
)
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a "
    "new image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
PROMPT_TEMPLATE_DROP = 64  # tokens of the system prefix dropped from the hidden states (the pipeline's)
PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"


def area_dimensions(target_area: int, ratio: float) -> tuple[int, int]:
    """``(width, height)`` of about ``target_area`` pixels at aspect ``ratio = w / h``, sides rounded
    to multiples of 32 (the pipeline's ``calculate_dimensions``)."""
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


def _to_pil(image: Tensor) -> Any:
    """``[3, h, w]`` in [0, 1] -> an 8-bit PIL image (what the pipeline is given)."""
    from PIL import Image

    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image [3, H, W], got shape {tuple(image.shape)}")
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


class QwenImageEditPolicy(PolicyBase):
    """Qwen-Image-Edit-Plus meeting :class:`psr.models.policy.Policy`. Only the transformer is trained."""

    transformer: Any
    vae: Any
    text_encoder: Any
    frozen = ("vae", "text_encoder")

    def __init__(
        self,
        transformer: Any,
        vae: Any,
        text_encoder: Any,
        tokenizer: Any,
        processor: Any,
        scheduler: Any,
        *,
        true_cfg_scale: float = 4.0,
        negative_prompt: str = " ",
        condition_area: int = 384 * 384,
        reference_area: int = 1024 * 1024,
        gradient_checkpointing: bool = False,
    ) -> None:
        from diffusers.image_processor import VaeImageProcessor

        super().__init__()
        if true_cfg_scale < 0 or not math.isfinite(true_cfg_scale):
            raise ValueError(f"model.true_cfg_scale={true_cfg_scale} must be finite and >= 0")
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.processor = processor
        self.scheduler_config = dict(scheduler.config)
        self.true_cfg_scale = true_cfg_scale if true_cfg_scale > 1 else None
        self.negative_prompt = negative_prompt
        self.condition_area = condition_area
        self.reference_area = reference_area
        self.vae_scale_factor = 2 ** len(vae.temperal_downsample)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)
        self._freeze(gradient_checkpointing)

    # ------------------------------------------------------------------ text (with the references)
    @torch.no_grad()
    def encode_prompt(self, prompt: str, images: Sequence[Any]) -> tuple[Tensor, Tensor | None]:
        """(``[1, L, D]`` embeddings, ``[1, L]`` mask or None) of ``prompt`` with PIL ``images``."""
        pictures = "".join(PICTURE.format(i + 1) for i in range(len(images)))
        inputs = self.processor(
            text=[PROMPT_TEMPLATE.format(pictures + prompt)],
            images=list(images) or None,
            padding=True,
            return_tensors="pt",
        ).to(self.text_encoder.device)
        out = self.text_encoder(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
            output_hidden_states=True,
        )
        hidden = out.hidden_states[-1][0][inputs["attention_mask"][0].bool()][PROMPT_TEMPLATE_DROP:]
        return hidden[None].to(device=self.device, dtype=self.dtype), None  # one prompt: no padding

    # ------------------------------------------------------------------ images <-> tokens
    def _latent_stats(self, device: torch.device) -> tuple[Tensor, Tensor]:
        z = self.vae.config.z_dim
        mean = torch.tensor(self.vae.config.latents_mean, device=device).view(1, z, 1, 1, 1)
        std = torch.tensor(self.vae.config.latents_std, device=device).view(1, z, 1, 1, 1)
        return mean, std

    def _encode(self, pixels: Tensor) -> Tensor:
        """Pixels ``[B, 3, H, W]`` in [-1, 1] -> normalized packed tokens ``[B, N, 4 z]``."""
        pixels = pixels.to(device=self.device, dtype=self.vae.dtype)[:, :, None]  # one video frame
        latents = self.vae.encode(pixels).latent_dist.mode()  # [B, z, 1, h, w], argmax as the pipeline
        mean, std = self._latent_stats(latents.device)
        latents = (latents - mean.to(latents.dtype)) / std.to(latents.dtype)
        return pack_latents(latents[:, :, 0]).to(self.dtype)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Pixels ``[B, 3, H, W]`` in [0, 1] (H, W multiples of 16) -> target tokens ``[B, N, C]``."""
        return self._encode(images.float().clamp(0, 1) * 2 - 1)

    def decode(self, tokens: Tensor, height: int, width: int) -> Tensor:
        """Target tokens ``[B, N, C]`` -> images ``[B, 3, H, W]`` in [0, 1], fp32."""
        h, w = self.token_grid(height, width)
        latents = unpack_latents(tokens.to(self.vae.dtype), 2 * h, 2 * w)[:, :, None]
        mean, std = self._latent_stats(latents.device)
        # the pipeline's order of operations: divide by 1 / std, then add the mean
        latents = latents / (1.0 / std.to(latents.dtype)) + mean.to(latents.dtype)
        image = self.vae.decode(latents, return_dict=False)[0][:, :, 0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def condition(
        self, prompt: str, references: Sequence[Tensor], height: int, width: int
    ) -> QwenImageEditConditioning:
        """Everything needed to denoise a ``height x width`` target for one prompt group."""
        if height % self.multiple or width % self.multiple:
            raise ValueError(
                f"target size {height}x{width} must be a multiple of {self.multiple} "
                "(train.resolution, dataset.resolution or eval.resolution)"
            )
        pils = [_to_pil(r) for r in references]
        seen, tokens, shapes = [], [], []
        for img in pils:
            ratio = img.size[0] / img.size[1]
            cw, ch = area_dimensions(self.condition_area, ratio)
            seen.append(self.image_processor.resize(img, ch, cw))
            vw, vh = area_dimensions(self.reference_area, ratio)
            tokens.append(self._encode(self.image_processor.preprocess(img, vh, vw)))
            shapes.append((1, vh // self.multiple, vw // self.multiple))
        embeds, mask = self.encode_prompt(prompt, seen)
        negative, negative_mask = (
            self.encode_prompt(self.negative_prompt, seen)
            if self.true_cfg_scale is not None
            else (None, None)
        )
        channels = self.transformer.config.in_channels
        ref_tokens = torch.cat(tokens, dim=1) if tokens else torch.zeros(1, 0, channels, device=self.device)
        return QwenImageEditConditioning(
            prompt_embeds=embeds,
            prompt_mask=mask,
            ref_tokens=ref_tokens.to(self.dtype),
            img_shapes=((1, *self.token_grid(height, width)), *shapes),
            height=height,
            width=width,
            negative_prompt_embeds=negative,
            negative_prompt_mask=negative_mask,
            true_cfg_scale=self.true_cfg_scale,
            num_references=len(references),
            prompt=prompt,
        )

    @staticmethod
    def stack_conditionings(
        conds: list[QwenImageEditConditioning],
    ) -> list[tuple[list[int], QwenImageEditConditioning]]:
        """Every conditioning alone: prompt lengths differ with the prompt and the references, so
        samples go through the transformer one conditioning at a time."""
        return [([i], c) for i, c in enumerate(conds)]

    # ------------------------------------------------------------------ sampling
    def schedule(self, cond: QwenImageEditConditioning, num_steps: int) -> Tensor:
        """``[K+1]`` fp32 sigmas as the pipeline sets them: ``linspace(1, 1/K, K)`` shifted with FLUX's
        ``mu(N)`` (dynamic shifting) or the static ``shift``, then stretched to ``shift_terminal``."""
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"sampler num_steps={num_steps!r} must be an int >= 1")
        cfg = self.scheduler_config
        unsupported = [
            k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if cfg.get(k)
        ]
        if unsupported or cfg.get("invert_sigmas") or cfg.get("use_flow_sigmas"):
            raise ValueError(f"scheduler options {unsupported or 'invert/flow sigmas'} are not supported")
        base = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
        if cfg.get("use_dynamic_shifting", False):
            mu = calculate_shift(
                cond.num_target_tokens,
                cfg.get("base_image_seq_len", 256),
                cfg.get("max_image_seq_len", 4096),
                cfg.get("base_shift", 0.5),
                cfg.get("max_shift", 1.15),
            )
            if cfg.get("time_shift_type", "exponential") == "exponential":
                sigmas = math.exp(mu) / (math.exp(mu) + (1 / base - 1) ** 1.0)
            else:
                sigmas = mu / (mu + (1 / base - 1) ** 1.0)
        else:
            shift = float(cfg.get("shift", 1.0))
            sigmas = shift * base / (1 + (shift - 1) * base)
        if cfg.get("shift_terminal"):
            one_minus = 1 - sigmas
            sigmas = 1 - one_minus / (one_minus[-1] / (1 - cfg["shift_terminal"]))
        return torch.cat([torch.from_numpy(np.asarray(sigmas, dtype=np.float32)), torch.zeros(1)])

    def initial_noise(
        self,
        cond: QwenImageEditConditioning,
        batch: int,
        generator: torch.Generator | None,
        same_noise: bool = False,
    ) -> Tensor:
        """Packed ``[B, N, C]`` fp32 noise drawn as ``[B, 1, z, 2h, 2w]``, as the pipeline does."""
        h, w = self.token_grid(cond.height, cond.width)
        z = self.transformer.config.in_channels // 4
        n = 1 if same_noise else batch
        noise = torch.randn(n, z, 2 * h, 2 * w, generator=generator, device=self.device, dtype=torch.float32)
        return pack_latents(noise).expand(batch, -1, -1).contiguous()

    # ------------------------------------------------------------------ the network
    def _branch(
        self,
        hidden: Tensor,
        timestep: Tensor,
        text: Tensor,
        mask: Tensor | None,
        cond: QwenImageEditConditioning,
    ) -> Tensor:
        b, n = hidden.shape[0], cond.num_target_tokens
        return self.transformer(
            hidden_states=hidden,
            timestep=timestep,
            guidance=None,
            encoder_hidden_states_mask=None if mask is None else mask.expand(b, -1),
            encoder_hidden_states=text.expand(b, -1, -1),
            img_shapes=[list(cond.img_shapes)] * b,
            return_dict=False,
        )[0][:, :n]

    def velocity(self, x: Tensor, sigma: Tensor | float, cond: QwenImageEditConditioning) -> Tensor:
        """Velocity ``[B, N, C]`` (model dtype) on noisy target tokens ``x`` ``[B, N, C]``; with true CFG
        both branches run (two forwards) and the guided velocity is rescaled per token to the
        conditional branch's norm; gradients reach both branches."""
        b = x.shape[0]
        sigma_t = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        timestep = ((sigma_t * 1000).expand(b) / 1000).to(self.dtype)
        hidden = x.to(self.dtype)
        if cond.ref_tokens.shape[1]:
            hidden = torch.cat([hidden, cond.ref_tokens.expand(b, -1, -1)], dim=1)
        pos = self._branch(hidden, timestep, cond.prompt_embeds, cond.prompt_mask, cond)
        if cond.true_cfg_scale is None or cond.negative_prompt_embeds is None:
            return pos
        neg = self._branch(hidden, timestep, cond.negative_prompt_embeds, cond.negative_prompt_mask, cond)
        combined = neg + cond.true_cfg_scale * (pos - neg)
        return combined * (torch.norm(pos, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))


# ---------------------------------------------------------------------------------------------- builders


def qwen_image_edit_plus_components(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "bfloat16",
    text_encoder_dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    text_encoder_device: str | torch.device | None = None,
    config_key: str = "model.path",
) -> dict[str, Any]:
    """The components of a Qwen-Image-Edit-Plus checkpoint in diffusers layout, offline (what
    ``QwenImageEditPlusPipeline(**components)`` takes)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import AutoProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    loaders: dict[str, tuple[Any, str | None]] = {
        "transformer": (QwenImageTransformer2DModel, "torch_dtype"),
        "vae": (AutoencoderKLQwenImage, "torch_dtype"),
        "text_encoder": (Qwen2_5_VLForConditionalGeneration, "dtype"),
        "tokenizer": (AutoTokenizer, None),
        "processor": (AutoProcessor, None),
        "scheduler": (FlowMatchEulerDiscreteScheduler, None),
    }
    _, comps = load_components(
        path,
        loaders,
        layout=_EXPECTED_LAYOUT,
        dtype=dtype,
        text_encoder_dtype=text_encoder_dtype,
        device=device,
        text_encoder_device=text_encoder_device,
        config_key=config_key,
    )
    return comps


def qwen_image_edit_plus(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "bfloat16",
    text_encoder_dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    text_encoder_device: str | torch.device | None = None,
    true_cfg_scale: float = 4.0,
    negative_prompt: str = " ",
    condition_area: int = 384 * 384,
    reference_area: int = 1024 * 1024,
    gradient_checkpointing: bool = False,
) -> QwenImageEditPolicy:
    """Qwen-Image-Edit-2509 / 2511 (or any checkpoint in their layout) as a multi-reference policy.

    Args:
        path: local diffusers directory or a hub id already in the HF cache (``model.path``).
        true_cfg_scale: CFG scale against ``negative_prompt`` (pipeline default 4.0; <= 1: no CFG).
        condition_area, reference_area: pixel areas of a reference as Qwen2.5-VL sees it and as it is
            VAE-encoded (the pipeline's 384^2 and 1024^2).
        text_encoder_device: where Qwen2.5-VL runs (default ``device``).
    """
    comps = qwen_image_edit_plus_components(
        path,
        dtype=dtype,
        text_encoder_dtype=text_encoder_dtype,
        device=device,
        text_encoder_device=text_encoder_device,
    )
    return QwenImageEditPolicy(
        **comps,
        true_cfg_scale=true_cfg_scale,
        negative_prompt=negative_prompt,
        condition_area=condition_area,
        reference_area=reference_area,
        gradient_checkpointing=gradient_checkpointing,
    )


def tiny_qwen_image_edit_plus_components(seed: int = 0) -> dict[str, Any]:
    """Every Qwen-Image-Edit-Plus component at toy size with random weights, deterministic in ``seed``.

    Shapes: 1 transformer block, 2 heads x 16 dims, RoPE axes (4, 6, 6); a QwenImage VAE with base
    width 8 (8x downsampling, 16 latent channels, so tokens have 64 channels); the tiny Qwen2.5-VL of
    :func:`rewards.testing.tiny_qwen_vl` (width 64) and its processor.
    """
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    from rewards.testing import tiny_qwen_vl

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=64,
        axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    text_encoder, processor = tiny_qwen_vl("qwen2_5_vl", seed=seed)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    comps: dict[str, Any] = {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": processor.tokenizer,
        "processor": processor,
        "scheduler": scheduler,
    }
    for name in ("transformer", "vae", "text_encoder"):
        comps[name].requires_grad_(False).eval()
    return comps


def tiny_qwen_image_edit_plus(
    seed: int = 0,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    true_cfg_scale: float = 4.0,
    negative_prompt: str = " ",
    condition_area: int = 64 * 64,
    reference_area: int = 64 * 64,
    gradient_checkpointing: bool = False,
) -> QwenImageEditPolicy:
    """A tiny random Qwen-Image-Edit-Plus (see :func:`tiny_qwen_image_edit_plus_components`), with
    references seen and encoded at 64 x 64 pixels by default."""
    comps = tiny_qwen_image_edit_plus_components(seed)
    dt = parse_dtype(dtype)
    for name in ("transformer", "vae", "text_encoder"):
        comps[name].to(device=device, **({} if dt == torch.float32 else {"dtype": dt}))
    return QwenImageEditPolicy(
        **comps,
        true_cfg_scale=true_cfg_scale,
        negative_prompt=negative_prompt,
        condition_area=condition_area,
        reference_area=reference_area,
        gradient_checkpointing=gradient_checkpointing,
    )
