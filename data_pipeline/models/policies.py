"""The psr backbones as the pipeline's single-subject model and editor: image + instruction -> image
with a :class:`psr.models.policy.Policy`'s ODE rollout.

FLUX.2 klein (:mod:`psr.models.flux2_klein`) and Qwen-Image-Edit-Plus (:mod:`psr.models.qwen_image_edit`)
are natively multi-reference: diffusers' ``Flux2KleinPipeline`` and ``QwenImageEditPlusPipeline``
read a list of images as the references of *one* prompt, and the Qwen pipeline fixes the areas a
reference is seen and encoded at (384^2, 1024^2). The policies' ODE rollouts equal those pipelines
(tests/models/test_flux2_klein.py, tests/models/test_qwen_image_edit.py) and take every setting as a
key, so the stages call them here: one conditioning per image (its prompt, the image as the one
reference), conditionings with the same token layout stacked into one batch (FLUX.2: letterboxed
crops; Qwen: each alone, its prompt length varies), and each image's initial noise drawn from its
own ``torch.Generator`` seeded from its record, so an image does not depend on what else is in the
batch.

Builders: :func:`flux2_klein_policy` and :func:`qwen_image_edit_plus_policy` load a local
diffusers-layout checkpoint (``paths.klein``, ``paths.qwen_image_edit``; never downloaded) and name
that key in their errors; tests use ``psr.models.flux2_klein.tiny_flux2_klein`` and
``psr.models.qwen_image_edit.tiny_qwen_image_edit_plus``.
"""

from __future__ import annotations

import os
from typing import Any

from PIL import Image

from data_pipeline.models.diffusion import letterbox as letterbox_image

PROMPT_CACHE_SIZE = 16  # every scene prompt is new: a FLUX.2 prompt embedding is ~8 MB (4B, bf16)


class PolicyEditor:
    """Image + instruction -> image with a psr policy (any backbone behind the Policy protocol).

    References (``letterbox: true``): crops of any shape are fitted into ``input_size`` squares, which
    keeps the subject's proportions and gives every crop one token layout (FLUX.2 stacks them into
    one batch). Edits (``letterbox: false``): each target goes in at its own size (the policy scales
    it as its pipeline does) and the output is ``height x width``, the target's size.

    Args:
        policy: a built policy (``flux2_klein_policy``, ``qwen_image_edit_plus_policy``, a tiny one).
        input_size: side of the letterbox square (multiple of 16); the default output size.
        height, width: output size in pixels (multiples of 16; Qwen: 16 as well); None = ``input_size``.
        num_inference_steps: K ODE steps (klein-base and Qwen: 50 in their pipelines; distilled klein: 4).
        letterbox: fit inputs into squares (True) or pass them at their own size (False).
    """

    def __init__(
        self,
        policy: Any,
        *,
        input_size: int = 1024,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        letterbox: bool = True,
    ) -> None:
        self.policy = policy.eval()
        self.input_size, self.letterbox = input_size, letterbox
        self.height, self.width = height or input_size, width or input_size
        for key, value in (("height", self.height), ("width", self.width), ("input_size", input_size)):
            if value <= 0 or value % policy.multiple:
                raise ValueError(f"model.{key}={value} must be a positive multiple of {policy.multiple}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"model.num_inference_steps={num_inference_steps!r} must be an int >= 1")
        self.steps = num_inference_steps
        path = getattr(getattr(policy.transformer, "config", None), "_name_or_path", "")
        self.description = (
            f"{type(policy).__name__}[ODE, {num_inference_steps} steps]({path or 'in-memory components'})"
        )

    def edit(
        self,
        images: list[Image.Image],
        prompts: list[str],
        seeds: list[int],
        boxes: list[list[float] | None] | None = None,
    ) -> list[Image.Image]:
        from data_pipeline.images import to_pil

        return to_pil(self.sample(images, prompts, seeds))

    def sample(self, images: list[Image.Image], prompts: list[str], seeds: list[int]) -> Any:
        """fp32 images ``[B, 3, height, width]`` in [0, 1] (what :meth:`edit` rounds to 8 bits)."""
        import torch

        from data_pipeline.images import to_tensor
        from psr.sampling.rollout import rollout

        if not len(images) == len(prompts) == len(seeds):
            raise ValueError(f"{len(images)} images, {len(prompts)} prompts and {len(seeds)} seeds")
        policy, device = self.policy, self.policy.device
        inputs = [letterbox_image(im, self.input_size) if self.letterbox else im for im in images]
        out = torch.empty(len(images), 3, self.height, self.width)
        with torch.no_grad():
            conds = [
                policy.condition(p, [to_tensor([im])[0]], self.height, self.width)
                for im, p in zip(inputs, prompts, strict=True)
            ]
            for idx, cond in policy.stack_conditionings(conds):
                # each image's noise from its own seed, as if it were sampled alone
                noise = [
                    policy.initial_noise(conds[i], 1, torch.Generator(device).manual_seed(int(seeds[i])))
                    for i in idx
                ]
                traj = rollout(
                    policy, cond, len(idx), num_steps=self.steps, method="ode", latents=torch.cat(noise)
                )
                out[idx] = traj.images.float().cpu()
        return out


def flux2_klein_policy(
    path: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    device: str = "cuda",
    text_encoder_device: str | None = None,
    config_key: str = "paths.klein",
    guidance_scale: float = 4.0,
    is_distilled: bool | None = None,
    reference_max_area: int = 1024 * 1024,
    max_sequence_length: int = 512,
    text_encoder_out_layers: tuple[int, ...] = (9, 18, 27),
) -> Any:
    """FLUX.2 klein from a local diffusers-layout folder (``config_key`` in errors), for inference.

    Same settings as :func:`psr.models.flux2_klein.flux2_klein`; ``is_distilled: null`` reads
    ``model_index.json`` (distilled: no CFG, 4 steps), and the prompt cache is kept small.
    """
    from psr.models.flux2_klein import Flux2KleinPolicy, flux2_klein_components

    comps = flux2_klein_components(
        path, dtype=dtype, device=device, text_encoder_device=text_encoder_device, config_key=config_key
    )
    distilled = comps.pop("is_distilled")
    return Flux2KleinPolicy(
        **comps,
        is_distilled=distilled if is_distilled is None else is_distilled,
        guidance_scale=guidance_scale,
        reference_max_area=reference_max_area,
        max_sequence_length=max_sequence_length,
        text_encoder_out_layers=tuple(text_encoder_out_layers),
        prompt_cache_size=PROMPT_CACHE_SIZE,
    )


def qwen_image_edit_plus_policy(
    path: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    device: str = "cuda",
    text_encoder_device: str | None = None,
    config_key: str = "paths.qwen_image_edit",
    true_cfg_scale: float = 4.0,
    negative_prompt: str = " ",
    condition_area: int = 384 * 384,
    reference_area: int = 1024 * 1024,
) -> Any:
    """Qwen-Image-Edit-2509 / 2511 from a local diffusers-layout folder (``config_key`` in errors);
    settings as :func:`psr.models.qwen_image_edit.qwen_image_edit_plus`."""
    from psr.models.qwen_image_edit import QwenImageEditPolicy, qwen_image_edit_plus_components

    comps = qwen_image_edit_plus_components(
        path, dtype=dtype, device=device, text_encoder_device=text_encoder_device, config_key=config_key
    )
    return QwenImageEditPolicy(
        **comps,
        true_cfg_scale=true_cfg_scale,
        negative_prompt=negative_prompt,
        condition_area=condition_area,
        reference_area=reference_area,
    )
