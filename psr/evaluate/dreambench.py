"""The DreamBench suite (DreamBooth's benchmark): 30 subjects x 25 prompts, scored by DINO, CLIP-I
and CLIP-T.

``psr-eval suite=dreambench data.root=dreambooth/dataset`` (``conf/suite/dreambench.yaml``) reads the
released layout (:func:`load_dreambench`): one folder of photographs per subject and
``prompts_and_classes.txt`` (the subject -> class table, then the object prompts and the live-subject
prompts, each a line ``'a {0} {1} in the jungle'.format(unique_token, class_token),``). A record is
one subject and one prompt (``{0}`` = ``data.token``, empty by default as for models conditioned on a
reference image; ``{1}`` = the class), with the subject's first photograph as its reference; live
subjects (class cat or dog) take the live prompts. ``eval.samples_per_prompt`` seeds per record.

:class:`DreamBenchScorer`, per sample: ``dino`` and ``clip_i``, the mean cosine between the sample's
embedding and each real photograph of its subject (every photograph of the folder, the reference
included), and ``clip_t`` (a text-alignment reward, e.g. ``rewards.text_alignment.clip_t``, on the
prompt). ``score`` is ``dino``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from psr.data.dataset import open_image, to_tensor
from psr.data.manifest import Sample, Subject
from psr.data.sources import Records, verify_images
from rewards.base import Reward, RewardInputs, check_images
from rewards.embedders import Embedder

__all__ = ["parse_prompts_and_classes", "load_dreambench", "DreamBenchScorer"]

PROMPTS_FILE = "prompts_and_classes.txt"
LIVE_CLASSES = ("cat", "dog")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_PROMPT = re.compile(r"""^\s*'(.*)'\.format\(\s*unique_token\s*,\s*class_token\s*\)\s*,?\s*$""")


def parse_prompts_and_classes(
    text: str, where: str = PROMPTS_FILE
) -> tuple[dict[str, str], list[str], list[str]]:
    """``(subject -> class, object prompt templates, live-subject prompt templates)`` of DreamBench's
    ``prompts_and_classes.txt``; templates keep ``{0}`` (token) and ``{1}`` (class).

    Raises:
        ValueError: a section is missing or empty, naming the file.
    """
    classes: dict[str, str] = {}
    prompts: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    for line in text.splitlines():
        s = line.strip()
        if s == "Classes":
            section = "classes"
        elif s == "Object Prompts":
            section = "object"
        elif s == "Live Subject Prompts":
            section = "live"
        elif section == "classes" and "," in s and s != "subject_name,class":
            name, cls = (p.strip() for p in s.split(",", 1))
            classes[name] = cls
        elif section in prompts and (m := _PROMPT.match(line)):
            prompts[section].append(m.group(1))
    for what, found in (
        ("Classes", classes),
        ("Object Prompts", prompts["object"]),
        ("Live Subject Prompts", prompts["live"]),
    ):
        if not found:
            raise ValueError(
                f"{where}: no '{what}' section with entries (the DreamBooth dataset's prompts_and_classes.txt)"
            )
    return classes, prompts["object"], prompts["live"]


def _photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def load_dreambench(
    root: str,
    token: str = "",
    subjects: Sequence[str] | None = None,
    check_images: bool = True,
    heldout: int = 0,
    run_dir: str | os.PathLike | None = None,
) -> Records:
    """DreamBench records (``data`` of ``suite=dreambench``): subject x prompt, id ``<subject>-<pp>``,
    kind ``object`` or ``live``, the subject's first photograph (sorted by name) as reference.

    Args:
        root: the dataset folder (subject folders and ``prompts_and_classes.txt``).
        token: the ``{0}`` of the prompts (e.g. ``sks`` for a fine-tuned token); empty: none.
        subjects: a subset of the subjects (None: all of the class table).
        check_images: open every reference now.
        heldout: must be 0.
        run_dir: unused.
    """
    folder = Path(os.path.expanduser(root)).resolve()
    table = folder / PROMPTS_FILE
    if not table.is_file():
        raise FileNotFoundError(f"data.root={root} has no {PROMPTS_FILE} (the DreamBooth dataset folder)")
    if heldout:
        raise ValueError(f"data.heldout={heldout}: the DreamBench suite evaluates every record (set it to 0)")
    classes, object_prompts, live_prompts = parse_prompts_and_classes(
        table.read_text(encoding="utf-8"), str(table)
    )
    chosen = list(subjects) if subjects is not None else list(classes)
    unknown = [s for s in chosen if s not in classes]
    if unknown:
        raise ValueError(f"data.subjects: {unknown} are not in {table} (subjects: {sorted(classes)})")
    samples = []
    for name in chosen:
        photos = _photos(folder / name) if (folder / name).is_dir() else []
        if not photos:
            raise FileNotFoundError(f"data.root={root}: no photographs in {folder / name}")
        live = classes[name] in LIVE_CLASSES
        for p, template in enumerate(live_prompts if live else object_prompts):
            prompt = " ".join(template.format(token, classes[name]).split())
            samples.append(
                Sample(
                    id=f"{name}-{p:02d}",
                    instruction=prompt,
                    target=None,
                    subjects=[
                        Subject(
                            name=name, category=classes[name], reference=str(photos[0].relative_to(folder))
                        )
                    ],
                    kind="live" if live else "object",
                    provenance={"dreambench": {"subject": name, "prompt_index": p}},
                )
            )
    if check_images:
        verify_images(samples, folder, f"data.root={root}")
    return Records(samples, [], folder)


class DreamBenchScorer:
    """DINO, CLIP-I and CLIP-T of DreamBench samples (module docstring).

    Args:
        root: the dataset folder (the real photographs of each subject are read from it once).
        dino: DINO embedder (``rewards.embedders.dino_vits16``).
        clip_image: CLIP image embedder (``rewards.embedders.clip_image``); None: no ``clip_i``.
        clip_text: a text-alignment reward (CLIP-T); None: no ``clip_t``.
    """

    def __init__(
        self,
        root: str,
        dino: Embedder,
        clip_image: Embedder | None = None,
        clip_text: Reward | None = None,
    ) -> None:
        self.root = Path(os.path.expanduser(root)).resolve()
        self.embedders = {"dino": dino, "clip_i": clip_image}
        self.clip_text = clip_text
        self._real: dict[tuple[str, str], Tensor] = {}

    def real_embeddings(self, subject: str, metric: str) -> Tensor:
        """``[R, D]`` embeddings of every photograph of ``subject`` (cached)."""
        key = (subject, metric)
        if key not in self._real:
            photos = _photos(self.root / subject) if (self.root / subject).is_dir() else []
            if not photos:
                raise FileNotFoundError(f"DreamBenchScorer: no photographs of {subject!r} in {self.root}")
            images = [to_tensor(open_image(p, subject, "photograph")) for p in photos]
            embedder = self.embedders[metric]
            assert embedder is not None
            self._real[key] = embedder.embed(images).double().cpu()
        return self._real[key]

    @torch.no_grad()
    def __call__(self, images: Tensor, inputs: RewardInputs) -> dict[str, Tensor]:
        check_images(images, inputs, "DreamBenchScorer")
        for b, subs in enumerate(inputs.subjects):
            if len(subs) != 1:
                raise ValueError(f"DreamBenchScorer: sample {b} has {len(subs)} subjects; DreamBench has one")
        out: dict[str, Tensor] = {}
        for metric, embedder in self.embedders.items():
            if embedder is None:
                continue
            gen = embedder.embed(images).double().cpu()  # [B, D], unit norm
            out[metric] = torch.stack(
                [
                    (self.real_embeddings(subs[0].name, metric) @ gen[b]).mean()
                    for b, subs in enumerate(inputs.subjects)
                ]
            )
        if self.clip_text is not None:
            out["clip_t"] = self.clip_text(images, inputs)["score"].double().cpu()
        out["score"] = out["dino"]
        return {k: v.to(device=images.device, dtype=torch.float32) for k, v in out.items()}
