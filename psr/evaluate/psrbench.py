"""The PSRBench suite (docs/method.md §7): its seven subsets read from the released layout, and
every sample scored on the paper's three dimensions.

``psr-eval suite=psrbench data.root=PSRBench`` (``conf/suite/psrbench.yaml``) reads
``Attribute.json`` ... ``Four.json`` under ``data.root`` (:func:`load_subsets`) and scores with
:class:`PSRBenchScorer`:

- subject consistency, ``sc_official`` (PSRBench's released script, bit for bit:
  :class:`rewards.psrbench_official.OfficialSubjectConsistency`, whole-image fallbacks counted in
  ``sc_official_fallbacks``) and ``sc_strict`` (psr's reward: Hungarian matching, a missing subject
  scores ``missing_penalty`` and is counted in ``sc_strict_detected_frac``); ``protocol`` picks one
  or both;
- semantic alignment, ``semantic``: the VLM judge with the subset's template (score / 10, NaN and
  ``semantic_failed`` = 1 where no score could be parsed) and ``semantic_official`` (the released
  fallback of 5 / 10 in place of a failure); the Position subset instead takes the released
  geometric rule (``position``, :class:`rewards.psrbench_official.OfficialPosition`), in both
  semantic columns. Without a judge the semantic columns of the other subsets are absent;
- aesthetics, ``hps`` (the configured preference reward's raw output: its ``raw`` key when it has
  one, as ``rewards.preference.hpsv3`` does, else its ``score``) and ``hps_div10`` (raw / 10, the
  scale of the paper's table), when ``aesthetic`` is configured.

``score`` is ``sc_official`` when computed, else ``sc_strict``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from psr.data.manifest import read_psrbench
from psr.data.sources import Records, verify_images
from rewards.base import Reward, RewardInputs
from rewards.detectors import Detector
from rewards.embedders import Embedder
from rewards.psrbench_official import OfficialPosition, OfficialSubjectConsistency
from rewards.subject_consistency import SubjectConsistencyReward

__all__ = ["SUBSETS", "TEMPLATES", "load_subsets", "PSRBenchScorer"]

SUBSETS = ("attribute", "action", "background", "position", "complex", "three", "four")
"""The seven subsets, in the paper's order; the released files are ``Attribute.json`` etc."""

TEMPLATES = {
    "attribute": "psrbench_attribute",
    "action": "psrbench_action",
    "background": "psrbench_background",
    "complex": "psrbench_complex",
    "three": "psrbench_complex",
    "four": "psrbench_complex",
}
"""The judge template of each subset (Complex, Three and Four ask about all content)."""

PROTOCOLS = ("official", "strict", "both")
JUDGE_FALLBACK = 5.0  # the released semantic scripts' score when the reply cannot be parsed


def load_subsets(
    root: str,
    subsets: Sequence[str] = SUBSETS,
    check_images: bool = True,
    heldout: int = 0,
    run_dir: str | os.PathLike | None = None,
) -> Records:
    """The records of the chosen subsets of a PSRBench folder (``data`` of ``suite=psrbench``).

    Subset ``attribute`` is read from ``<root>/Attribute.json`` (any capitalisation of the name);
    records get ids ``Attribute-0000`` ... (unique across the files) and the subset as their kind.
    ``input_path`` entries are relative to ``root``, as in the released scripts.

    Args:
        root: the PSRBench folder.
        subsets: names from :data:`SUBSETS` (any other name is read the same way).
        check_images: open every reference now, listing all bad ones.
        heldout: must be 0 (a benchmark is evaluated whole).
        run_dir: unused (every data source takes it).
    """
    folder = Path(os.path.expanduser(root)).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"data.root={root} is not a folder (the PSRBench folder with Attribute.json ...)"
        )
    if heldout:
        raise ValueError(f"data.heldout={heldout}: the PSRBench suite evaluates every record (set it to 0)")
    if not subsets:
        raise ValueError("data.subsets is empty; name at least one of " + ", ".join(SUBSETS))
    files = {p.stem.lower(): p for p in folder.glob("*.json")}
    samples = []
    for subset in subsets:
        path = files.get(str(subset).lower())
        if path is None:
            raise FileNotFoundError(
                f"data.subsets: no {str(subset).capitalize()}.json in data.root={root} "
                f"(JSON files there: {sorted(p.name for p in files.values()) or 'none'})"
            )
        samples += read_psrbench(path, kind=str(subset).lower())
    if check_images:
        verify_images(samples, folder, f"data.root={root}")
    return Records(samples, [], folder)


class PSRBenchScorer:
    """Scores a batch of PSRBench samples of any subsets (module docstring).

    Args:
        detector: Grounding DINO returning unclipped boxes in its output order (shared by both
            protocols and the position rule).
        embedder: DINO ViT-S/16 with PSRBench's preprocessing.
        protocol: ``official`` | ``strict`` | ``both`` (subject consistency).
        missing_penalty: the strict protocol's score of a subject not found.
        judge: a VLM judge with ``with_template(name)`` and the reward contract (``score`` in
            [0, 1] or NaN, ``failed``); None: no semantic columns except Position's.
        templates: subset -> judge template (default :data:`TEMPLATES`).
        aesthetic: a preference reward (HPSv3; ``raw`` or else ``score`` is the raw output); None: none.
        max_subjects: per-subject keys reported for k = 1..max_subjects.
    """

    def __init__(
        self,
        detector: Detector,
        embedder: Embedder,
        *,
        protocol: str = "both",
        missing_penalty: float = 0.0,
        judge: Any | None = None,
        templates: Mapping[str, str] | None = None,
        aesthetic: Reward | None = None,
        max_subjects: int = 4,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"PSRBenchScorer: protocol={protocol!r}; expected one of {PROTOCOLS}")
        self.protocol = protocol
        self.official = (
            OfficialSubjectConsistency(detector, embedder, max_subjects=max_subjects)
            if protocol in ("official", "both")
            else None
        )
        self.strict = (
            SubjectConsistencyReward(
                detector, embedder, missing_penalty=missing_penalty, max_subjects=max_subjects
            )
            if protocol in ("strict", "both")
            else None
        )
        self.position = OfficialPosition(detector)
        self.judge = judge
        self.templates = dict(TEMPLATES if templates is None else templates)
        self.aesthetic = aesthetic
        self._judges: dict[str, Any] = {}

    def _judge_for(self, template: str) -> Any:
        if template not in self._judges:
            assert self.judge is not None
            self._judges[template] = self.judge.with_template(template)
        return self._judges[template]

    @torch.no_grad()
    def score(self, images: Tensor, inputs: RewardInputs, kinds: Sequence[str]) -> dict[str, Tensor]:
        """``{key: [B]}`` for a batch ``[B, 3, H, W]`` in [0, 1] whose samples belong to ``kinds``."""
        batch = len(inputs)
        if len(kinds) != batch:
            raise ValueError(f"PSRBenchScorer: {batch} samples but {len(kinds)} kinds")
        nan = torch.full((batch,), math.nan, dtype=torch.float64)
        out: dict[str, Tensor] = {}
        if self.official is not None:
            r = self.official(images, inputs)
            out["sc_official"] = r["score"].double().cpu()
            out["sc_official_fallbacks"] = r["fallbacks"].double().cpu()
        if self.strict is not None:
            r = self.strict(images, inputs)
            out["sc_strict"] = r["score"].double().cpu()
            out["sc_strict_detected_frac"] = r["detected_frac"].double().cpu()

        position = [b for b in range(batch) if kinds[b] == "position"]
        judged = [b for b in range(batch) if kinds[b] != "position"]
        out["position"] = nan.clone()
        if position:
            pos = self.position(images[position], inputs.select(position))["score"].double().cpu()
            out["position"][position] = pos
        if self.judge is not None or position:
            semantic, failed = nan.clone(), nan.clone()
            semantic[position] = out["position"][position]
            # the rule always gives a score where a relation word is found; none found: no score
            failed[position] = torch.where(out["position"][position].isnan(), math.nan, 0.0).double()
            if self.judge is not None:
                by_template: dict[str, list[int]] = {}
                for b in judged:
                    if kinds[b] not in self.templates:
                        raise ValueError(
                            f"PSRBenchScorer: no judge template for subset {kinds[b]!r}; "
                            f"reward.templates has {sorted(self.templates)}"
                        )
                    by_template.setdefault(self.templates[kinds[b]], []).append(b)
                for template, idx in by_template.items():
                    r = self._judge_for(template)(images[idx], inputs.select(idx))
                    semantic[idx] = r["score"].double().cpu()
                    failed[idx] = r["failed"].double().cpu()
            out["semantic"] = semantic
            out["semantic_failed"] = failed
            out["semantic_official"] = torch.where(
                failed == 1.0, torch.full_like(semantic, JUDGE_FALLBACK / 10), semantic
            )
        if self.aesthetic is not None:
            result = self.aesthetic(images, inputs)
            raw = result.get("raw", result["score"]).double().cpu()  # HPSv3 reports mu as raw
            out["hps"] = raw
            out["hps_div10"] = raw / 10
        out["score"] = out["sc_official"] if "sc_official" in out else out["sc_strict"]
        return {k: v.float() for k, v in out.items()}

    def __call__(self, images: Tensor, inputs: RewardInputs) -> dict[str, Tensor]:
        """As a plain reward (no subsets known): every sample scored as a Complex one."""
        return self.score(images, inputs, ["complex"] * len(inputs))
