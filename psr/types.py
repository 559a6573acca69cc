"""Typed containers passed between the policy, the sampler, the rewards and the objectives.

Dimension letters: B batch, G group size, K sampling steps, N tokens, C channels, L text tokens,
R reference tokens, H W pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class Conditioning:
    """Everything the transformer needs besides the noisy target, for ONE prompt group.

    Computed once per prompt (text encoders + VAE on the references) and expanded to the group
    inside the forward, never recomputed per sample or per step.
    """

    prompt_embeds: Tensor  # [1, L, D_t5]
    pooled_prompt_embeds: Tensor  # [1, D_clip]
    text_ids: Tensor  # [L, 3]
    ref_tokens: Tensor  # [1, R, C_packed] packed clean reference latents, references concatenated
    ref_ids: Tensor  # [R, 3] RoPE ids of the reference tokens (see psr.models.positions)
    img_ids: Tensor  # [N, 3] RoPE ids of the target tokens
    height: int  # target height in pixels
    width: int  # target width in pixels
    guidance: float | None = None  # distilled guidance scale; None for models without it
    num_references: int = 0
    prompt: str = ""

    @property
    def num_target_tokens(self) -> int:
        return int(self.img_ids.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditioning:
        def move(t: Tensor) -> Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return replace(
            self,
            prompt_embeds=move(self.prompt_embeds),
            pooled_prompt_embeds=move(self.pooled_prompt_embeds),
            text_ids=self.text_ids.to(device),
            ref_tokens=move(self.ref_tokens),
            ref_ids=self.ref_ids.to(device),
            img_ids=self.img_ids.to(device),
        )


@dataclass(frozen=True)
class Flux2KleinConditioning:
    """What FLUX.2 klein's transformer needs besides the noisy target, for ONE prompt group.

    Position ids have 4 axes (T, H, W, L) as in diffusers' ``Flux2KleinPipeline``: text tokens
    ``(0, 0, 0, l)``, target tokens ``(0, r, c, 0)``, reference k = 0, 1, ... ``(10 + 10 k, r, c, 0)``.
    """

    prompt_embeds: Tensor  # [1, L, 3 D_qwen3] Qwen3 hidden states of 3 layers, side by side
    text_ids: Tensor  # [L, 4]
    ref_tokens: Tensor  # [1, R, C] packed, batch-normalized clean reference latents, concatenated
    ref_ids: Tensor  # [R, 4]
    img_ids: Tensor  # [N, 4]
    height: int
    width: int
    negative_prompt_embeds: Tensor | None = None  # [1, L, 3 D_qwen3] the "" prompt, for true CFG
    guidance_scale: float | None = None  # true CFG scale; None: the conditional branch alone
    num_references: int = 0
    prompt: str = ""

    @property
    def num_target_tokens(self) -> int:
        return int(self.img_ids.shape[0])


@dataclass(frozen=True)
class QwenImageEditConditioning:
    """What Qwen-Image-Edit-Plus's transformer needs besides the noisy target, for ONE prompt group.

    The text encoder (Qwen2.5-VL) sees the references too, so the prompt embeddings depend on them.
    Position ids are made inside the transformer from ``img_shapes``: image i of the list (target
    first, then the references in order) is "frame" i of a video-like 3-axis RoPE.
    """

    prompt_embeds: Tensor  # [1, L, D_vl] last hidden states of Qwen2.5-VL, the template's prefix dropped
    prompt_mask: Tensor | None  # [1, L] 1 = token, 0 = padding; None when every token is valid
    ref_tokens: Tensor  # [1, R, C] packed, normalized clean reference latents, concatenated
    img_shapes: tuple[tuple[int, int, int], ...]  # (1, rows, cols) of the target, then each reference
    height: int
    width: int
    negative_prompt_embeds: Tensor | None = None  # [1, L', D_vl] the negative prompt, for true CFG
    negative_prompt_mask: Tensor | None = None  # [1, L']
    true_cfg_scale: float | None = None  # None: the conditional branch alone
    num_references: int = 0
    prompt: str = ""

    @property
    def num_target_tokens(self) -> int:
        _, rows, cols = self.img_shapes[0]
        return rows * cols


# every backbone's conditioning (psr.models.policy.Policy.condition returns its own)
AnyConditioning = Conditioning | Flux2KleinConditioning | QwenImageEditConditioning


@dataclass(frozen=True)
class Trajectory:
    """A batch of SDE/ODE rollouts of one prompt group, with what is needed to recompute log-probs."""

    latents: Tensor  # [B, K+1, N, C] packed latents x_0 (noise) ... x_K (clean), model dtype
    log_probs: Tensor  # [B, K] fp32, log p(x_{k+1} | x_k) under the sampling policy (0 on ODE steps)
    sigmas: Tensor  # [K+1] fp32, 1 = s_0 > ... > s_K = 0
    sde_mask: Tensor  # [K] bool, True where the step was stochastic (and trainable)
    images: Tensor  # [B, 3, H, W] in [0, 1], fp32
    group_ids: Tensor  # [B] long, which prompt group each sample belongs to
    cond: AnyConditioning  # the policy's own conditioning type (psr.models.policy.Policy)
    noise_level: float = 0.0
    method: str = "flow_grpo"  # the sampling method (sampler.method), see psr.sampling.sde

    @property
    def batch_size(self) -> int:
        return int(self.latents.shape[0])

    @property
    def num_steps(self) -> int:
        return int(self.sigmas.shape[0] - 1)


@dataclass
class Batch:
    """A supervised (SFT) batch: one target with its references and prompt, already on device."""

    target: Tensor  # [B, 3, H, W] in [0, 1]
    references: list[list[Tensor]]  # B lists of [3, h_i, w_i] in [0, 1]
    prompts: list[str]
    meta: list[dict] = field(default_factory=list)
