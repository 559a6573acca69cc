"""FLUX.2 klein (4B / 9B) as a multi-reference policy, equal to diffusers' ``Flux2KleinPipeline``.

FLUX.2 is natively multi-reference (docs/method.md, "Backbones"): each reference's VAE latent is
patchified 2x2, batch-normalized with the VAE's running statistics and packed into tokens appended
after the target tokens, with 4-axis position ids ``(T, H, W, L)``: target ``(0, r, c, 0)``,
reference k = 0, 1, ... ``(10 + 10 k, r, c, 0)``, text ``(0, 0, 0, l)``. The prompt goes through
Qwen3 in its chat template; the hidden states of three layers (9, 18, 27 for the 4B encoder) are
concatenated per token. The schedule is ``linspace(1, 1/K, K)`` shifted with an "empirical" mu of
the token count and the step count. klein-base (``is_distilled: false`` in ``model_index.json``)
uses true CFG against the empty prompt, ``v = v_neg + g (v_pos - v_neg)`` (two branches, one
batched forward); the step-distilled klein (``is_distilled: true``) runs the conditional branch alone.

Builders: :func:`flux2_klein` (a local diffusers-layout folder or a filled HF cache, never
downloads) and :func:`tiny_flux2_klein` (random toy weights built in code, for tests).
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from psr.models.builders import TINY_VAE_WEIGHTS, load_components, parse_dtype
from psr.models.policy import PolicyBase, pack_latents, unpack_latents
from psr.types import Flux2KleinConditioning

__all__ = [
    "COMPONENTS",
    "LORA_TARGETS",
    "SCHEDULER_CONFIG",
    "Flux2KleinPolicy",
    "empirical_mu",
    "flux2_klein",
    "flux2_klein_components",
    "klein_reference_size",
    "save_flux2_klein_components",
    "tiny_flux2_klein",
    "tiny_flux2_klein_components",
]

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
_EXPECTED_LAYOUT = (
    "a diffusers-layout FLUX.2 klein directory with model_index.json and the subfolders transformer/, "
    "vae/, text_encoder/, tokenizer/, scheduler/"
)
# the published klein scheduler (scheduler/scheduler_config.json), also the tiny model's
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    time_shift_type="exponential",
)
# double blocks: the FLUX joint-attention projections; single blocks: the fused QKV + MLP input
# projection (FLUX.2's single blocks have no separate to_q/to_k/to_v)
LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_qkv_mlp_proj",
)
REFERENCE_T_SCALE = 10  # reference k's T coordinate is 10 + 10 k (Flux2KleinPipeline._prepare_image_ids)


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's schedule shift mu, fitted on the token count N and step count K
    (``compute_empirical_mu`` of diffusers' FLUX.2 pipelines): linear in K between the fits at
    K = 10 and K = 200 for N <= 4300, linear in N alone above."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


def klein_reference_size(height: int, width: int, max_area: int, multiple: int = 16) -> tuple[int, int]:
    """The pixel size Flux2KleinPipeline encodes a reference at: scaled down (never up) to
    ``max_area`` keeping the aspect (sides truncated), then each side floored to ``multiple``."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if height * width > max_area:
        scale = math.sqrt(max_area / (width * height))
        width, height = int(width * scale), int(height * scale)
    return max(multiple, height // multiple * multiple), max(multiple, width // multiple * multiple)


def _grid_ids(height: int, width: int, t: int = 0) -> Tensor:
    """``[height * width, 4]`` ids ``(t, r, c, 0)`` in row-major order."""
    ids = torch.zeros(height, width, 4)
    ids[..., 0] = float(t)
    ids[..., 1] = torch.arange(height, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(width, dtype=torch.float32)[None, :]
    return ids.reshape(height * width, 4)


class Flux2KleinPolicy(PolicyBase):
    """FLUX.2 klein meeting :class:`psr.models.policy.Policy`. Only the transformer is trained."""

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
        scheduler: Any,
        *,
        is_distilled: bool = False,
        guidance_scale: float = 4.0,
        reference_max_area: int = 1024 * 1024,
        max_sequence_length: int = 512,
        text_encoder_out_layers: Sequence[int] = (9, 18, 27),
        gradient_checkpointing: bool = False,
        prompt_cache_size: int = 4096,
    ) -> None:
        super().__init__()
        if guidance_scale < 0 or not math.isfinite(guidance_scale):
            raise ValueError(f"model.guidance_scale={guidance_scale} must be finite and >= 0")
        n_hidden = int(text_encoder.config.num_hidden_layers)
        bad = [k for k in text_encoder_out_layers if not 0 <= int(k) <= n_hidden]
        if bad:
            raise ValueError(
                f"model.text_encoder_out_layers={list(text_encoder_out_layers)}: {bad} outside the text "
                f"encoder's hidden states 0..{n_hidden}"
            )
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler.config)
        self.is_distilled = is_distilled
        # as Flux2KleinPipeline.do_classifier_free_guidance: scale > 1 on a non-distilled model
        self.guidance_scale = guidance_scale if guidance_scale > 1 and not is_distilled else None
        self.reference_max_area = reference_max_area
        self.max_sequence_length = max_sequence_length
        self.text_encoder_out_layers = tuple(int(k) for k in text_encoder_out_layers)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.lora_targets = LORA_TARGETS
        self._prompt_cache: OrderedDict[str, Tensor] = OrderedDict()
        self._prompt_cache_size = prompt_cache_size
        self._freeze(gradient_checkpointing)

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> Tensor:
        """``[1, L, 3 D]``: Qwen3's hidden states of ``text_encoder_out_layers``, cached per prompt."""
        if prompt in self._prompt_cache:
            self._prompt_cache.move_to_end(prompt)
            return self._prompt_cache[prompt]
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )
        inputs = self.tokenizer(
            text,
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=self.max_sequence_length,
        )
        device = self.text_encoder.device
        out = self.text_encoder(
            input_ids=inputs["input_ids"].to(device),
            attention_mask=inputs["attention_mask"].to(device),
            output_hidden_states=True,
            use_cache=False,
        )
        hidden = torch.stack([out.hidden_states[k] for k in self.text_encoder_out_layers], dim=1)
        b, n, length, d = hidden.shape  # [1, layers, L, D] -> [1, L, layers * D], layer-major per token
        embeds = hidden.permute(0, 2, 1, 3).reshape(b, length, n * d).to(device=self.device, dtype=self.dtype)
        self._prompt_cache[prompt] = embeds
        if len(self._prompt_cache) > self._prompt_cache_size:
            self._prompt_cache.popitem(last=False)
        return embeds

    # ------------------------------------------------------------------ images <-> tokens
    def _bn_stats(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The VAE's batch-norm mean and std per patchified channel ``[4 C_latent]``, fp32."""
        bn = self.vae.bn
        mean = bn.running_mean.to(device=device, dtype=torch.float32)
        std = torch.sqrt(
            bn.running_var.to(device=device, dtype=torch.float32) + self.vae.config.batch_norm_eps
        )
        return mean, std

    def _encode(self, pixels: Tensor) -> Tensor:
        """Pixels ``[B, 3, H, W]`` in [-1, 1] -> normalized packed tokens ``[B, N, 4 C_latent]``."""
        latents = self.vae.encode(pixels).latent_dist.mode()  # argmax, as the pipeline
        tokens = pack_latents(latents)  # FLUX.2's patchify + pack: channel order (c, dy, dx)
        mean, std = self._bn_stats(tokens.device)
        return ((tokens.to(mean.dtype) - mean) / std).to(self.dtype)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Pixels ``[B, 3, H, W]`` in [0, 1] (H, W multiples of 16) -> target tokens ``[B, N, C]``."""
        return self._encode(self.preprocess(images, images.shape[-2], images.shape[-1]))

    def decode(self, tokens: Tensor, height: int, width: int) -> Tensor:
        """Target tokens ``[B, N, C]`` -> images ``[B, 3, H, W]`` in [0, 1], fp32."""
        h, w = self.token_grid(height, width)
        mean, std = self._bn_stats(tokens.device)
        tokens = (tokens.float() * std + mean).to(self.vae.dtype)
        image = self.vae.decode(unpack_latents(tokens, 2 * h, 2 * w), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_references(self, references: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Clean reference tokens ``[1, R, C]`` and their ids ``[R, 4]``; each reference at its own size
        (:func:`klein_reference_size`), equal sizes through the VAE in one batch."""
        sizes = [
            klein_reference_size(int(r.shape[-2]), int(r.shape[-1]), self.reference_max_area, self.multiple)
            for r in references
        ]
        tokens: list[Tensor] = [torch.empty(0)] * len(references)
        for size in dict.fromkeys(sizes):
            idx = [i for i, s in enumerate(sizes) if s == size]
            packed = self._encode(torch.cat([self.preprocess(references[i], *size) for i in idx]))
            for j, i in enumerate(idx):
                tokens[i] = packed[j : j + 1]
        channels = self.transformer.config.in_channels
        ref_tokens = torch.cat(tokens, dim=1) if tokens else torch.zeros(1, 0, channels)
        ids = [
            _grid_ids(h // self.multiple, w // self.multiple, t=REFERENCE_T_SCALE * (k + 1))
            for k, (h, w) in enumerate(sizes)
        ]
        ref_ids = torch.cat(ids) if ids else torch.zeros(0, 4)
        return ref_tokens.to(device=self.device, dtype=self.dtype), ref_ids.to(self.device)

    def condition(
        self, prompt: str, references: Sequence[Tensor], height: int, width: int
    ) -> Flux2KleinConditioning:
        """Everything needed to denoise a ``height x width`` target for one prompt group."""
        if height % self.multiple or width % self.multiple:
            raise ValueError(
                f"target size {height}x{width} must be a multiple of {self.multiple} "
                "(train.resolution, dataset.resolution or eval.resolution)"
            )
        embeds = self.encode_prompt(prompt)
        negative = self.encode_prompt("") if self.guidance_scale is not None else None
        ref_tokens, ref_ids = self.encode_references(references)
        length = embeds.shape[1]
        text_ids = torch.zeros(length, 4, device=self.device)
        text_ids[:, 3] = torch.arange(length, dtype=torch.float32, device=self.device)
        return Flux2KleinConditioning(
            prompt_embeds=embeds,
            text_ids=text_ids,
            ref_tokens=ref_tokens,
            ref_ids=ref_ids,
            img_ids=_grid_ids(*self.token_grid(height, width)).to(self.device),
            height=height,
            width=width,
            negative_prompt_embeds=negative,
            guidance_scale=self.guidance_scale,
            num_references=len(references),
            prompt=prompt,
        )

    @staticmethod
    def stack_conditionings(
        conds: list[Flux2KleinConditioning],
    ) -> list[tuple[list[int], Flux2KleinConditioning]]:
        """Group conditionings with the same token layout into stacked ones (text and reference
        tensors concatenated along the batch), which :meth:`velocity` takes as is; see
        :func:`psr.models.policy.stack_conditionings`."""
        groups: dict[tuple, list[int]] = {}
        for i, c in enumerate(conds):
            key = (
                c.height,
                c.width,
                tuple(c.text_ids.shape),
                c.ref_ids.cpu().numpy().tobytes(),
                c.guidance_scale,
            )
            groups.setdefault(key, []).append(i)
        out = []
        for idx in groups.values():
            first = conds[idx[0]]
            negative = None
            if first.negative_prompt_embeds is not None:
                negative = torch.cat([conds[i].negative_prompt_embeds for i in idx])  # type: ignore[misc]
            stacked = Flux2KleinConditioning(
                prompt_embeds=torch.cat([conds[i].prompt_embeds for i in idx]),
                text_ids=first.text_ids,
                ref_tokens=torch.cat([conds[i].ref_tokens for i in idx]),
                ref_ids=first.ref_ids,
                img_ids=first.img_ids,
                height=first.height,
                width=first.width,
                negative_prompt_embeds=negative,
                guidance_scale=first.guidance_scale,
                num_references=first.num_references,
                prompt=first.prompt,
            )
            out.append((idx, stacked))
        return out

    # ------------------------------------------------------------------ sampling
    def schedule(self, cond: Flux2KleinConditioning, num_steps: int) -> Tensor:
        """``[K+1]`` fp32 sigmas as Flux2KleinPipeline sets them: ``linspace(1, 1/K, K)`` shifted by
        the scheduler with ``mu = empirical_mu(N, K)`` (dynamic shifting) or its static ``shift``."""
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"sampler num_steps={num_steps!r} must be an int >= 1")
        cfg = self.scheduler_config
        unsupported = [
            k
            for k in ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
            if cfg.get(k)
        ]
        if unsupported or cfg.get("invert_sigmas") or cfg.get("use_flow_sigmas"):
            raise ValueError(f"scheduler options {unsupported or 'invert/flow sigmas'} are not supported")
        # numpy float32, in the scheduler's order of operations (torch's scalar / tensor rounds differently)
        base = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
        if cfg.get("use_dynamic_shifting", False):
            mu = empirical_mu(cond.num_target_tokens, num_steps)
            if cfg.get("time_shift_type", "exponential") == "exponential":
                sigmas = math.exp(mu) / (math.exp(mu) + (1 / base - 1) ** 1.0)
            else:
                sigmas = mu / (mu + (1 / base - 1) ** 1.0)
        else:
            shift = float(cfg.get("shift", 1.0))
            sigmas = shift * base / (1 + (shift - 1) * base)
        return torch.cat([torch.from_numpy(np.asarray(sigmas, dtype=np.float32)), torch.zeros(1)])

    def initial_noise(
        self,
        cond: Flux2KleinConditioning,
        batch: int,
        generator: torch.Generator | None,
        same_noise: bool = False,
    ) -> Tensor:
        """``[B, N, C]`` fp32 noise drawn as ``[B, C, h, w]`` (patchified layout), as the pipeline does."""
        h, w = self.token_grid(cond.height, cond.width)
        channels = self.transformer.config.in_channels
        n = 1 if same_noise else batch
        noise = torch.randn(n, channels, h, w, generator=generator, device=self.device, dtype=torch.float32)
        return noise.reshape(n, channels, h * w).permute(0, 2, 1).expand(batch, -1, -1).contiguous()

    # ------------------------------------------------------------------ the network
    def velocity(self, x: Tensor, sigma: Tensor | float, cond: Flux2KleinConditioning) -> Tensor:
        """Velocity ``[B, N, C]`` (model dtype) on noisy target tokens ``x`` ``[B, N, C]``.

        With true CFG (``cond.guidance_scale``) the conditional and the empty-prompt branches run
        as one forward of batch 2B: ``v = v_neg + g (v_pos - v_neg)``; gradients reach both.
        """
        b, n = x.shape[0], x.shape[1]
        sigma_t = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        # the pipeline passes timestep = (sigma * 1000) / 1000 in the latents' dtype; the same here
        timestep = ((sigma_t * 1000).expand(b) / 1000).to(self.dtype)
        hidden = x.to(self.dtype)
        if cond.ref_tokens.shape[1]:
            hidden = torch.cat([hidden, cond.ref_tokens.expand(b, -1, -1)], dim=1)
        text = cond.prompt_embeds.expand(b, -1, -1)
        guided = cond.guidance_scale is not None and cond.negative_prompt_embeds is not None
        if guided:
            assert cond.negative_prompt_embeds is not None
            hidden = torch.cat([hidden, hidden])
            timestep = torch.cat([timestep, timestep])
            text = torch.cat([text, cond.negative_prompt_embeds.expand(b, -1, -1)])
        out = self.transformer(
            hidden_states=hidden,
            timestep=timestep,
            guidance=None,
            encoder_hidden_states=text,
            txt_ids=cond.text_ids,
            img_ids=torch.cat([cond.img_ids, cond.ref_ids], dim=0),
            return_dict=False,
        )[0][:, :n]
        if not guided:
            return out
        pos, neg = out[:b], out[b:]
        return neg + float(cond.guidance_scale) * (pos - neg)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- builders


def flux2_klein_components(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "bfloat16",
    text_encoder_dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    text_encoder_device: str | torch.device | None = None,
    config_key: str = "model.path",
) -> dict[str, Any]:
    """The components of a FLUX.2 klein checkpoint in diffusers layout, offline, plus ``is_distilled``
    from its ``model_index.json`` (what ``Flux2KleinPipeline(**components)`` takes)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    loaders: dict[str, tuple[Any, str | None]] = {
        "transformer": (Flux2Transformer2DModel, "torch_dtype"),
        "vae": (AutoencoderKLFlux2, "torch_dtype"),
        "text_encoder": (Qwen3ForCausalLM, "dtype"),
        "tokenizer": (AutoTokenizer, None),
        "scheduler": (FlowMatchEulerDiscreteScheduler, None),
    }
    root, comps = load_components(
        path,
        loaders,
        layout=_EXPECTED_LAYOUT,
        dtype=dtype,
        text_encoder_dtype=text_encoder_dtype,
        device=device,
        text_encoder_device=text_encoder_device,
        config_key=config_key,
    )
    index = root / "model_index.json"
    comps["is_distilled"] = (
        bool(json.loads(index.read_text()).get("is_distilled", False)) if index.is_file() else False
    )
    return comps


def flux2_klein(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "bfloat16",
    text_encoder_dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    text_encoder_device: str | torch.device | None = None,
    guidance_scale: float = 4.0,
    is_distilled: bool | None = None,
    reference_max_area: int = 1024 * 1024,
    max_sequence_length: int = 512,
    text_encoder_out_layers: Sequence[int] = (9, 18, 27),
    gradient_checkpointing: bool = False,
) -> Flux2KleinPolicy:
    """FLUX.2 klein (4B or 9B, base or step-distilled) as a multi-reference policy.

    Args:
        path: local diffusers directory or a hub id already in the HF cache (``model.path``).
        dtype: transformer and VAE dtype; log-prob math is fp32 regardless.
        guidance_scale: true CFG scale of klein-base (pipeline default 4.0); ignored (no CFG) when
            the checkpoint is step-distilled.
        is_distilled: None = ``model_index.json``'s ``is_distilled``.
        reference_max_area: references above this pixel area are scaled down (the pipeline's 1024^2).
        text_encoder_out_layers: Qwen3 hidden states concatenated per token (9, 18, 27 for klein).
        text_encoder_device: where Qwen3 runs (default ``device``; prompts are encoded once, cached).
    """
    comps = flux2_klein_components(
        path,
        dtype=dtype,
        text_encoder_dtype=text_encoder_dtype,
        device=device,
        text_encoder_device=text_encoder_device,
    )
    distilled = comps.pop("is_distilled")
    return Flux2KleinPolicy(
        **comps,
        is_distilled=distilled if is_distilled is None else is_distilled,
        guidance_scale=guidance_scale,
        reference_max_area=reference_max_area,
        max_sequence_length=max_sequence_length,
        text_encoder_out_layers=text_encoder_out_layers,
        gradient_checkpointing=gradient_checkpointing,
    )


TINY_OUT_LAYERS = (1, 2, 3)  # hidden states of the tiny 3-layer Qwen3 given to the transformer
TINY_MAX_SEQUENCE_LENGTH = 64


def tiny_flux2_klein_components(seed: int = 0, *, fitted_vae: bool = True) -> dict[str, Any]:
    """Every FLUX.2 klein component at toy size with random weights, deterministic in ``seed``.

    Shapes: 1 double + 1 single block, 2 heads x 16 dims, RoPE axes (4, 4, 4, 4); the tiny VAE
    (8x downsampling, 4 latent channels, so tokens have 16 channels) with batch-norm statistics
    drawn away from (0, 1); Qwen3 with 3 layers of width 32 over :func:`rewards.testing.qwen_tokenizer`,
    so prompt embeddings are 3 x 32 = 96 wide. 64x64 pixels -> 16 target tokens.

    Args:
        fitted_vae: the encoder/decoder weights of the shipped tiny VAE fitted on coloured shapes
            (``psr/models/assets/tiny_vae.safetensors``; the architecture is FLUX.1's tiny VAE plus
            FLUX.2's batch norm), so that images depend on the latents.
    """
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from rewards.testing import qwen_tokenizer

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=96,
        timestep_guidance_channels=32,
        mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )
    vae: Any = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    if fitted_vae:
        from safetensors.torch import load_file

        missing, unexpected = vae.load_state_dict(load_file(TINY_VAE_WEIGHTS), strict=False)
        if unexpected or any(not k.startswith("bn.") for k in missing):
            raise RuntimeError(f"tiny VAE weights do not fit: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.2 * torch.randn(16))
        vae.bn.running_var.copy_(0.5 + torch.rand(16))
    tokenizer = qwen_tokenizer()
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    comps: dict[str, Any] = {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }
    for name in ("transformer", "vae", "text_encoder"):
        comps[name].requires_grad_(False).eval()
    return comps


def save_flux2_klein_components(
    components: dict[str, Any], path: str | os.PathLike, *, is_distilled: bool = False
) -> str | os.PathLike:
    """Write components in diffusers layout (what :func:`flux2_klein` and ``Flux2KleinPipeline`` load)."""
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline(**{k: components[k] for k in COMPONENTS}, is_distilled=is_distilled)
    pipe.save_pretrained(path)  # type: ignore[attr-defined]
    return path


def tiny_flux2_klein(
    seed: int = 0,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    guidance_scale: float = 4.0,
    is_distilled: bool = False,
    reference_max_area: int = 1024 * 1024,
    fitted_vae: bool = True,
    gradient_checkpointing: bool = False,
) -> Flux2KleinPolicy:
    """A tiny random FLUX.2 klein (see :func:`tiny_flux2_klein_components`); klein-base with true
    CFG at ``guidance_scale`` unless ``is_distilled``."""
    comps = tiny_flux2_klein_components(seed, fitted_vae=fitted_vae)
    dt = parse_dtype(dtype)
    for name in ("transformer", "vae", "text_encoder"):
        comps[name].to(device=device, **({} if dt == torch.float32 else {"dtype": dt}))
    return Flux2KleinPolicy(
        **comps,
        is_distilled=is_distilled,
        guidance_scale=guidance_scale,
        reference_max_area=reference_max_area,
        max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
        text_encoder_out_layers=TINY_OUT_LAYERS,
        gradient_checkpointing=gradient_checkpointing,
    )
