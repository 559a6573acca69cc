"""The Policy protocol every backbone meets, and FlowPolicy: a FLUX.1 Kontext transformer that takes
any number of reference images.

Backbones: :class:`FlowPolicy` (FLUX.1 Kontext, here), :class:`psr.models.flux2_klein.Flux2KleinPolicy`
(FLUX.2 klein), :class:`psr.models.qwen_image_edit.QwenImageEditPolicy` (Qwen-Image-Edit-Plus).
Samplers, objectives and trainers use only what :class:`Policy` lists.

The transformer accepts any number of tokens; only diffusers' pipeline is limited to one context
image. The policy packs each reference's VAE latent into tokens, appends them after the target
tokens, and gives them position ids from :mod:`psr.models.positions`. Reference tokens are clean
context at every step; outputs are read on the target tokens only.

Text embeddings are cached per prompt and reference latents are computed once per prompt group
(:meth:`FlowPolicy.condition`), never per sample or step.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from psr.models.positions import SCHEMES, fit_to_area, grid_ids, reference_ids
from psr.types import Conditioning


class Policy(Protocol):
    """What the sampler (:mod:`psr.sampling.rollout`), the objectives and the trainers use of a backbone.

    A conditioning is the backbone's own frozen dataclass (:mod:`psr.types`); the code outside the
    backbone reads only its ``prompt``, ``height``, ``width``, ``num_references``,
    ``num_target_tokens`` and ``ref_tokens`` (``[1, R, C]`` clean reference tokens in the target
    tokens' space, for FocusDPO's patch weighting).
    """

    transformer: Any  # the trained network: LoRA targets, engine, checkpoints, merges
    scheduler_config: dict[str, Any]  # the scheduler's config (SFT's "flux" timestep shift reads it)

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def condition(self, prompt: str, references: Sequence[Tensor], height: int, width: int) -> Any:
        """Text and reference encodings of one prompt group, once (references ``[3, h, w]`` in [0, 1])."""
        ...

    def velocity(self, x: Tensor, sigma: Tensor | float, cond: Any) -> Tensor:
        """Velocity ``[B, N, C]`` on noisy target tokens ``x`` ``[B, N, C]`` at ``sigma`` (scalar or
        ``[B]``), guidance as the model defines it (distilled, or true CFG with both branches)."""
        ...

    def schedule(self, cond: Any, num_steps: int) -> Tensor:
        """``[K+1]`` fp32 sigmas ``1 = s_0 > ... > s_K = 0``, as the model's own pipeline makes them."""
        ...

    def initial_noise(
        self, cond: Any, batch: int, generator: torch.Generator | None, same_noise: bool = False
    ) -> Tensor:
        """``[B, N, C]`` fp32 noise, drawn in the layout the model's pipeline draws it."""
        ...

    def encode_images(self, images: Tensor) -> Tensor:
        """Pixels ``[B, 3, H, W]`` in [0, 1] -> clean target tokens ``[B, N, C]``."""
        ...

    def decode(self, tokens: Tensor, height: int, width: int) -> Tensor:
        """Target tokens ``[B, N, C]`` -> images ``[B, 3, H, W]`` in [0, 1], fp32."""
        ...

    def stack_conditionings(self, conds: list[Any]) -> list[tuple[list[int], Any]]:
        """Per-sample conditionings grouped into batched ones that one forward takes (SFT)."""
        ...

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def reference_policy(self) -> AbstractContextManager[None]:
        """Within the block the policy is the reference policy (adapters off, or the frozen copy)."""
        ...

    def keep_reference_copy(self) -> None:
        """Full fine-tuning: keep a frozen copy of the transformer as the reference policy."""
        ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...


def pack_latents(latents: Tensor) -> Tensor:
    """``[B, C, h, w]`` -> ``[B, (h/2)(w/2), 4C]`` (FLUX's 2x2 patch packing, row-major)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """``[B, (h/2)(w/2), 4C]`` -> ``[B, C, h, w]``; h, w are the latent (not token) sizes."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def stack_conditionings(conds: list[Conditioning]) -> list[tuple[list[int], Conditioning]]:
    """Group per-sample conditionings that share their token layout into stacked ones.

    Samples whose references give the same position ids (same number and grid sizes) and whose
    targets have the same size go through the transformer in one forward: their text and reference
    tensors are concatenated along the batch dimension (``prompt_embeds`` ``[g, L, D]``,
    ``pooled_prompt_embeds`` ``[g, D]``, ``ref_tokens`` ``[g, R, C]``), which
    :meth:`FlowPolicy.velocity` accepts as is.

    Returns:
        ``[(sample indices, stacked conditioning), ...]`` covering every index once, in first-seen order.
    """
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(conds):
        key = (
            c.height,
            c.width,
            tuple(c.text_ids.shape),
            tuple(c.ref_ids.shape),
            c.ref_ids.float().cpu().numpy().tobytes(),
        )
        groups.setdefault(key, []).append(i)
    out = []
    for idx in groups.values():
        first = conds[idx[0]]
        out.append(
            (
                idx,
                Conditioning(
                    prompt_embeds=torch.cat([conds[i].prompt_embeds for i in idx]),
                    pooled_prompt_embeds=torch.cat([conds[i].pooled_prompt_embeds for i in idx]),
                    text_ids=first.text_ids,
                    ref_tokens=torch.cat([conds[i].ref_tokens for i in idx]),
                    ref_ids=first.ref_ids,
                    img_ids=first.img_ids,
                    height=first.height,
                    width=first.width,
                    guidance=first.guidance,
                    num_references=first.num_references,
                    prompt=first.prompt,
                ),
            )
        )
    return out


class PolicyBase(nn.Module):
    """What every backbone's policy shares: a trained ``transformer`` beside frozen encoders (named in
    ``frozen``), device / dtype of the transformer, the pixel multiple, train mode for the transformer
    only, and the reference policy (adapters off, or a frozen copy for full fine-tuning)."""

    transformer: Any
    vae: Any
    vae_scale_factor: int
    frozen: tuple[str, ...] = ()  # attribute names of the modules kept frozen and in eval mode

    def _freeze(self, gradient_checkpointing: bool) -> None:
        """Freeze the modules named in ``frozen``; gradient checkpointing on the transformer if asked."""
        for name in self.frozen:
            getattr(self, name).requires_grad_(False)
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def multiple(self) -> int:
        """Pixel sizes must be multiples of this (VAE factor x 2x2 packing)."""
        return self.vae_scale_factor * 2

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """Pixel size -> token grid (rows, cols), as diffusers' pipelines compute it."""
        return height // self.multiple, width // self.multiple

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> Any:
        """Train mode for the transformer only: the frozen encoders and VAE stay in eval mode (text
        encoder dropout would otherwise change cached prompt embeddings between runs; FLUX.2's VAE
        batch norm its statistics)."""
        super().train(mode)
        for name in self.frozen:
            getattr(self, name).eval()
        return self

    def preprocess(self, image: Tensor, height: int, width: int) -> Tensor:
        """The VAE's input: ``[3, h, w]`` or ``[B, 3, h, w]`` in [0, 1] -> ``[B, 3, height, width]`` in [-1, 1]."""
        if image.dim() == 3:
            image = image[None]
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(
                f"expected an RGB image [3, H, W] or [B, 3, H, W], got shape {tuple(image.shape)}"
            )
        image = image.to(device=self.device, dtype=torch.float32)
        if tuple(image.shape[-2:]) != (height, width):
            image = F.interpolate(
                image, size=(height, width), mode="bicubic", antialias=True, align_corners=False
            )
        return (image.clamp(0, 1) * 2 - 1).to(self.vae.dtype)

    def velocity(self, x: Tensor, sigma: Tensor | float, cond: Any) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Any) -> Tensor:
        return self.velocity(x, sigma, cond)

    @contextmanager
    def reference_policy(self) -> Iterator[None]:
        """Within the block, this policy is the reference policy (for KL and DPO): the same network
        with its LoRA adapters switched off, or, for full fine-tuning, the frozen copy made by
        :meth:`keep_reference_copy`."""
        reference = self.__dict__.get("_reference")
        if reference is not None:
            live = self.transformer
            self.transformer = reference
            try:
                yield
            finally:
                self.transformer = live
            return
        if not getattr(self.transformer, "peft_config", None):
            raise RuntimeError(
                "the reference policy needs LoRA adapters (train.mode=lora) or, with train.mode=full, "
                "a frozen copy (keep_reference_copy)"
            )
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()

    def keep_reference_copy(self) -> None:
        """Keep a frozen copy of the transformer as the reference policy (full fine-tuning with a KL
        term or DPO); it is not a registered submodule, so it is in no state dict or optimizer."""
        import copy

        self.__dict__["_reference"] = copy.deepcopy(self.transformer).requires_grad_(False).eval()


class FlowPolicy(PolicyBase):
    """The multi-reference flow model. Only the transformer (or its LoRA) is ever trained."""

    # diffusers / transformers modules (typed loosely: their configs are dynamic attributes)
    transformer: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    frozen = ("vae", "text_encoder", "text_encoder_2")

    def __init__(
        self,
        transformer: Any,
        vae: Any,
        text_encoder: Any,
        text_encoder_2: Any,
        tokenizer: Any,
        tokenizer_2: Any,
        scheduler: Any,
        *,
        position_scheme: str = "framewise",
        reference_max_area: int | None = None,
        guidance: float | None = 2.5,
        max_sequence_length: int = 512,
        gradient_checkpointing: bool = False,
        prompt_cache_size: int = 4096,
    ) -> None:
        super().__init__()
        if position_scheme not in SCHEMES:
            raise ValueError(f"model.position_scheme={position_scheme!r}; expected one of {SCHEMES}")
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.scheduler_config = dict(scheduler.config)
        self.position_scheme = position_scheme
        self.reference_max_area = reference_max_area
        self.guidance = guidance if transformer.config.guidance_embeds else None
        self.max_sequence_length = max_sequence_length
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._prompt_cache: OrderedDict[str, tuple[Tensor, Tensor, Tensor]] = OrderedDict()
        self._prompt_cache_size = prompt_cache_size
        self._freeze(gradient_checkpointing)

    # ------------------------------------------------------------------ schedule and noise
    def schedule(self, cond: Conditioning, num_steps: int) -> Tensor:
        """``[K+1]`` fp32 sigmas with the scheduler's shift rule for this target size (FluxKontextPipeline's)."""
        from psr.sampling import sde

        cfg = self.scheduler_config
        if cfg.get("use_dynamic_shifting", False):
            return sde.flow_sigmas(
                num_steps,
                image_seq_len=cond.num_target_tokens,
                base_seq_len=cfg.get("base_image_seq_len", 256),
                max_seq_len=cfg.get("max_image_seq_len", 4096),
                base_shift=cfg.get("base_shift", 0.5),
                max_shift=cfg.get("max_shift", 1.15),
            )
        return sde.flow_sigmas(num_steps, shift=cfg.get("shift", 1.0))

    def initial_noise(
        self, cond: Conditioning, batch: int, generator: torch.Generator | None, same_noise: bool = False
    ) -> Tensor:
        """Packed ``[B, N, C]`` fp32 noise drawn in the unpacked ``[B, C/4, 2h, 2w]`` layout, as diffusers does."""
        h, w = self.token_grid(cond.height, cond.width)
        channels = self.transformer.config.in_channels // 4
        n = 1 if same_noise else batch
        noise = torch.randn(
            n, channels, 2 * h, 2 * w, generator=generator, device=self.device, dtype=torch.float32
        )
        return pack_latents(noise).expand(batch, -1, -1).contiguous()

    stack_conditionings = staticmethod(stack_conditionings)

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> tuple[Tensor, Tensor, Tensor]:
        """(T5 embeds ``[1, L, D]``, CLIP pooled ``[1, D_clip]``, text ids ``[L, 3]``), cached per prompt."""
        if prompt in self._prompt_cache:
            self._prompt_cache.move_to_end(prompt)
            return self._prompt_cache[prompt]
        device = self.device
        clip_ids = self.tokenizer(
            [prompt],
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        pooled = self.text_encoder(
            clip_ids.to(self.text_encoder.device), output_hidden_states=False
        ).pooler_output
        t5_ids = self.tokenizer_2(
            [prompt],
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        embeds = self.text_encoder_2(t5_ids.to(self.text_encoder_2.device), output_hidden_states=False)[0]
        out = (
            embeds.to(device=device, dtype=self.dtype),
            pooled.to(device=device, dtype=self.dtype),
            torch.zeros(embeds.shape[1], 3, device=device, dtype=self.dtype),
        )
        self._prompt_cache[prompt] = out
        if len(self._prompt_cache) > self._prompt_cache_size:
            self._prompt_cache.popitem(last=False)
        return out

    # ------------------------------------------------------------------ images <-> latents
    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Pixels ``[B, 3, H, W]`` in [0, 1] (H, W multiples of 16) -> packed latents ``[B, N, C]``."""
        x = self.preprocess(images, images.shape[-2], images.shape[-1])
        latents = self.vae.encode(x).latent_dist.mode()  # argmax, as FluxKontextPipeline
        latents = (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        return pack_latents(latents).to(self.dtype)

    def decode(self, tokens: Tensor, height: int, width: int) -> Tensor:
        """Packed latents ``[B, N, C]`` -> images ``[B, 3, H, W]`` in [0, 1], fp32."""
        h, w = self.token_grid(height, width)
        latents = unpack_latents(tokens.to(self.vae.dtype), 2 * h, 2 * w)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def reference_size(self, ref: Tensor, height: int, width: int) -> tuple[int, int]:
        """The pixel size a reference is encoded at: area budget, aspect kept, multiples of 16."""
        area = self.reference_max_area or height * width
        return fit_to_area(int(ref.shape[-2]), int(ref.shape[-1]), area, self.multiple)

    @torch.no_grad()
    def encode_references(
        self, references: Sequence[Tensor], height: int, width: int
    ) -> tuple[Tensor, Tensor]:
        """Clean reference tokens ``[1, R, C]`` and their ids ``[R, 3]`` for a ``height x width`` target.

        References of equal encoded size go through the VAE in one batch.
        """
        sizes = [self.reference_size(r, height, width) for r in references]
        tokens: list[Tensor | None] = [None] * len(references)
        for size in dict.fromkeys(sizes):
            idx = [i for i, s in enumerate(sizes) if s == size]
            batch = torch.cat([self.preprocess(references[i], *size) for i in idx])
            latents = self.vae.encode(batch).latent_dist.mode()
            latents = (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor
            packed = pack_latents(latents).to(self.dtype)
            for j, i in enumerate(idx):
                tokens[i] = packed[j : j + 1]
        channels = self.transformer.config.in_channels
        ref_tokens = torch.cat(tokens, dim=1) if tokens else torch.zeros(1, 0, channels)  # type: ignore[arg-type]
        grids = [(h // self.multiple, w // self.multiple) for h, w in sizes]
        ids = reference_ids(self.token_grid(height, width), grids, self.position_scheme)
        return ref_tokens.to(device=self.device, dtype=self.dtype), ids.to(
            device=self.device, dtype=self.dtype
        )

    def condition(self, prompt: str, references: Sequence[Tensor], height: int, width: int) -> Conditioning:
        """Everything needed to denoise a ``height x width`` target for one prompt group."""
        if height % self.multiple or width % self.multiple:
            raise ValueError(
                f"target size {height}x{width} must be a multiple of {self.multiple} "
                "(train.resolution, dataset.resolution or eval.resolution)"
            )
        embeds, pooled, text_ids = self.encode_prompt(prompt)
        ref_tokens, ref_ids = self.encode_references(references, height, width)
        h, w = self.token_grid(height, width)
        return Conditioning(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            text_ids=text_ids,
            ref_tokens=ref_tokens,
            ref_ids=ref_ids,
            img_ids=grid_ids(h, w).to(device=self.device, dtype=self.dtype),
            height=height,
            width=width,
            guidance=self.guidance,
            num_references=len(references),
            prompt=prompt,
        )

    # ------------------------------------------------------------------ the network
    def velocity(self, x: Tensor, sigma: Tensor | float, cond: Conditioning) -> Tensor:
        """Predicted velocity ``v ~ eps - x_0`` on the target tokens.

        Args:
            x: noisy target tokens ``[B, N, C]``.
            sigma: noise level in [0, 1], scalar or ``[B]``.
            cond: the group's conditioning (expanded to B here, not copied per sample).

        Returns:
            ``[B, N, C]`` in the model dtype.
        """
        b, n = x.shape[0], x.shape[1]
        dtype = self.dtype
        sigma_t = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        # diffusers passes timestep = (sigma * 1000) / 1000 in the latents' dtype; do the same for parity.
        timestep = ((sigma_t * 1000).expand(b) / 1000).to(dtype)
        hidden = x.to(dtype)
        if cond.ref_tokens.shape[1]:
            hidden = torch.cat([hidden, cond.ref_tokens.expand(b, -1, -1)], dim=1)
        guidance = None
        if cond.guidance is not None:
            guidance = torch.full((b,), float(cond.guidance), device=x.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=hidden,
            timestep=timestep,
            guidance=guidance,
            pooled_projections=cond.pooled_prompt_embeds.expand(b, -1),
            encoder_hidden_states=cond.prompt_embeds.expand(b, -1, -1),
            txt_ids=cond.text_ids,
            img_ids=torch.cat([cond.img_ids, cond.ref_ids], dim=0),
            return_dict=False,
        )[0]
        return out[:, :n]
