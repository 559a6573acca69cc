"""The models the stages call, behind small protocols so that any of them is one ``_target_`` away.

- :class:`Prompter` (stage ``prompts``): plan -> text-to-image prompt, one scene prompt per subject,
  an edit instruction for edited kinds (:mod:`.text`: templates or a local language model).
- :class:`Renderer` (stage ``target``): prompts -> images (:mod:`.diffusion`: FLUX.1 text-to-image;
  :mod:`.procedural`: the quickstart's composite scenes).
- :class:`Editor` (stages ``references`` and ``edit``): image + instruction -> image
  (:mod:`.diffusion`: FLUX.1 Kontext; :mod:`.policies`: FLUX.2 klein, Qwen-Image-Edit-Plus or any
  psr policy; :mod:`.procedural`: paste-on-scene and accessory stand-ins).
- :class:`Instructor` (stage ``instruct``): target + record -> final instruction (:mod:`.text`).
- detectors (stages ``crop`` and ``filter``): ``rewards.detectors`` or
  :class:`.procedural.ColourKeyDetector`.

Every model has a ``description`` string that goes into each record's provenance.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

from PIL import Image


class Rendered(NamedTuple):
    """A rendered target and what the renderer knows about it (e.g. a composite's layout)."""

    image: Image.Image
    info: dict[str, Any]


class Prompter(Protocol):
    description: str

    def write(self, plans: list[dict[str, Any]]) -> list[dict[str, Any] | str]:
        """One result per plan (``{"prompt", "scene_prompts", "edit", "parts"}``) or a rejection reason."""
        ...


class Renderer(Protocol):
    description: str

    def render(self, prompts: list[str], seeds: list[int], categories: list[list[str]]) -> list[Rendered]: ...


class Editor(Protocol):
    description: str

    def edit(
        self,
        images: list[Image.Image],
        prompts: list[str],
        seeds: list[int],
        boxes: list[list[float] | None] | None = None,
    ) -> list[Image.Image]: ...


class Instructor(Protocol):
    description: str

    def instruct(
        self, images: list[Image.Image], records: list[dict[str, Any]]
    ) -> list[tuple[str | None, str | None]]:
        """One ``(instruction, None)`` or ``(None, rejection reason)`` per record."""
        ...


def describe(model: Any) -> str:
    """The provenance string of a model (its ``description``, else its class name)."""
    return str(getattr(model, "description", type(model).__name__))
