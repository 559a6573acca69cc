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
class Trajectory:
    """A batch of SDE/ODE rollouts of one prompt group, with what is needed to recompute log-probs."""

    latents: Tensor  # [B, K+1, N, C] packed latents x_0 (noise) ... x_K (clean), model dtype
    log_probs: Tensor  # [B, K] fp32, log p(x_{k+1} | x_k) under the sampling policy (0 on ODE steps)
    sigmas: Tensor  # [K+1] fp32, 1 = s_0 > ... > s_K = 0
    sde_mask: Tensor  # [K] bool, True where the step was stochastic (and trainable)
    images: Tensor  # [B, 3, H, W] in [0, 1], fp32
    group_ids: Tensor  # [B] long, which prompt group each sample belongs to
    cond: Conditioning
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
