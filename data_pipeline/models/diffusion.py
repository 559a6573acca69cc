"""FLUX.1 through diffusers' own pipelines: text-to-image targets, Kontext references and edits.

The components come from :mod:`psr.models.builders` (``flux_kontext_components(path, ...)`` for a
local checkpoint, ``tiny_flux_kontext_components(seed)`` for tests), given as a dict or built by
Hydra from a nested ``_target_``. Every call is batched; every image gets its own
``torch.Generator`` seeded from its record, so an image does not depend on what else is in the batch.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from data_pipeline.models import Rendered


def _generators(seeds: list[int], device: str) -> list[Any]:
    import torch

    gen_device = "cpu" if str(device).startswith("mps") else device
    return [torch.Generator(gen_device).manual_seed(int(s)) for s in seeds]


def _pipeline(cls: Any, components: dict[str, Any]) -> Any:
    """A diffusers FLUX pipeline on the builders' components, without progress bars."""
    from psr.models.builders import COMPONENTS

    pipe = cls(**{k: components[k] for k in COMPONENTS})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _describe(components: dict[str, Any], label: str) -> str:
    cfg = getattr(components.get("transformer"), "config", None)
    path = getattr(cfg, "_name_or_path", "") if cfg is not None else ""
    return f"{label}({path or 'in-memory components'})"


def letterbox(image: Image.Image, size: int, fill: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Fit ``image`` inside a ``size x size`` square (aspect kept, centred, ``fill`` around it).

    Kontext batches need one input size; padding keeps the subject's proportions where a plain
    resize would stretch it.
    """
    w, h = image.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(
        image.convert("RGB").resize((nw, nh), Image.Resampling.BICUBIC), ((size - nw) // 2, (size - nh) // 2)
    )
    return canvas


class _FluxSampling:
    """What both wrappers share: a diffusers pipeline on the components, the output size, the
    sampling settings, and the call with them."""

    def __init__(
        self,
        pipeline_cls: Any,
        components: dict[str, Any],
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        max_sequence_length: int,
    ) -> None:
        self.pipe = _pipeline(pipeline_cls, components)
        self.height, self.width = height, width
        self.steps, self.guidance, self.max_len = num_inference_steps, guidance_scale, max_sequence_length
        self.description = _describe(
            components, f"{pipeline_cls.__name__}[{num_inference_steps} steps, cfg {guidance_scale}]"
        )

    def _sample(self, prompts: list[str], seeds: list[int], **extra: Any) -> list[Image.Image]:
        return self.pipe(
            prompt=list(prompts),
            height=self.height,
            width=self.width,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            max_sequence_length=self.max_len,
            generator=_generators(seeds, str(self.pipe.device)),
            output_type="pil",
            **extra,
        ).images


class FluxText2Image(_FluxSampling):
    """Text-to-image with ``diffusers.FluxPipeline`` (FLUX.1-dev/-schnell/Kontext components).

    Args:
        components: the pipeline components (see the module docstring).
        height, width: output size in pixels (multiples of 16).
        num_inference_steps, guidance_scale: FLUX sampling settings (FLUX.1-dev: 28, 3.5).
        max_sequence_length: T5 tokens (512 for FLUX.1-dev; the tiny model uses 32).
    """

    def __init__(
        self,
        components: dict[str, Any],
        *,
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int = 28,
        guidance_scale: float = 3.5,
        max_sequence_length: int = 512,
    ) -> None:
        from diffusers import FluxPipeline

        super().__init__(
            FluxPipeline, components, height, width, num_inference_steps, guidance_scale, max_sequence_length
        )

    def render(
        self, prompts: list[str], seeds: list[int], categories: list[list[str]] | None = None
    ) -> list[Rendered]:
        return [Rendered(im, {}) for im in self._sample(prompts, seeds)]


class FluxKontextEditor(_FluxSampling):
    """Image + instruction -> image with ``diffusers.FluxKontextPipeline`` (one input image each).

    Used for the references (a crop re-rendered in a new scene) and for edits of the target. A
    batch needs one input size: with ``letterbox`` (references: crops of any shape) inputs are fitted
    into ``input_size`` squares; without it (edits: targets, all one size) they are resized to
    ``height x width``, which keeps the target's geometry and so its boxes.

    Args:
        components: the pipeline components.
        input_size: side of the square the inputs are letterboxed into (multiple of 16).
        height, width: output size; None = ``input_size``.
        letterbox: fit inputs into squares (True) or resize them to the output size (False).
        num_inference_steps, guidance_scale, max_sequence_length: Kontext settings (dev: 28, 2.5, 512).
    """

    def __init__(
        self,
        components: dict[str, Any],
        *,
        input_size: int = 1024,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        guidance_scale: float = 2.5,
        max_sequence_length: int = 512,
        letterbox: bool = True,
    ) -> None:
        from diffusers import FluxKontextPipeline

        super().__init__(
            FluxKontextPipeline,
            components,
            height or input_size,
            width or input_size,
            num_inference_steps,
            guidance_scale,
            max_sequence_length,
        )
        self.input_size, self.letterbox = input_size, letterbox

    def edit(
        self,
        images: list[Image.Image],
        prompts: list[str],
        seeds: list[int],
        boxes: list[list[float] | None] | None = None,
    ) -> list[Image.Image]:
        if self.letterbox:
            inputs = [letterbox(im, self.input_size) for im in images]
        else:
            inputs = [
                im.convert("RGB").resize((self.width, self.height), Image.Resampling.BICUBIC) for im in images
            ]
        # without max_area and _auto_resize Kontext rescales every input to ~1024^2 (diffusers' sizes)
        return self._sample(
            prompts, seeds, image=inputs, max_area=self.height * self.width, _auto_resize=False
        )
