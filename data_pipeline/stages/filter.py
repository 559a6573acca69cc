"""Stage ``filter``: keep a record only if every reference still matches its subject in the (edited)
target, scored by the PSR reward itself (docs/method.md §5: detector + embedder, same-category
subjects matched optimally), plus optional text-alignment / quality scores. The paper names no
filter; this one is psr's (§8).

A record is rejected, with the reason and all its scores, when
- a subject is not detected in the target (``psr_detected_<k>`` = 0),
- a subject's similarity to its reference is below ``threshold``,
- ``require_reference_detection`` and a reference shows no detection of its category (the
  single-subject model lost the subject),
- an extra score is below its ``min``,
- an image cannot be read.

Settings (``filter.*``):
    reward: a ``rewards.subject_consistency.SubjectConsistencyReward`` spec (its detector and
        embedder; PSRBench's are Grounding DINO and DINO ViT-S/16).
    threshold: the lowest per-subject cosine similarity kept.
    require_reference_detection: see above.
    extra: name -> ``{reward: <reward spec>, min: <float or null>}``: more rewards (CLIP-T,
        HPS, ...) whose ``score`` is recorded as ``<name>`` and, with ``min``, thresholded.
    batch_size: records per reward call.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from data_pipeline.images import load_images, to_tensor
from data_pipeline.models import describe
from data_pipeline.shards import Outcome, Shard, reject
from data_pipeline.stages.common import build, open_run, stage_inputs


def verdict(
    categories: list[str],
    scores: dict[str, float],
    *,
    threshold: float,
    require_reference_detection: bool,
    minimums: dict[str, float | None],
) -> str | None:
    """The first reason to reject a record from its filter scores, or None to keep it."""
    for k, cat in enumerate(categories):
        if scores[f"psr_detected_{k}"] < 1:
            return f"filter: {cat!r} not found in the target"
        if scores[f"psr_subject_{k}"] < threshold:
            return (
                f"filter: {cat!r} similarity to its reference {scores[f'psr_subject_{k}']:.3f} < {threshold}"
            )
    if require_reference_detection and scores.get("psr_ref_detected_frac", 1.0) < 1:
        return "filter: a reference shows no detection of its category"
    for name, lo in minimums.items():
        if lo is not None and not scores[name] >= lo:  # `not >=` also rejects NaN
            return f"filter: {name} {scores[name]:.3f} < {lo}"
    return None


def run(out_dir: str | Path, shard: Shard, settings: dict[str, Any], seed: int) -> dict[str, Any]:
    from rewards.base import RewardInputs, Subject

    out_dir = Path(out_dir)
    job = open_run(out_dir, "filter", shard, settings, seed)
    if job.is_done():
        return job.summary()
    inputs = stage_inputs(out_dir, "filter", shard)
    reward = build(settings["reward"])
    extra = {name: build(spec["reward"]) for name, spec in (settings.get("extra") or {}).items()}
    minimums = {name: spec.get("min") for name, spec in (settings.get("extra") or {}).items()}
    threshold = float(settings.get("threshold", 0.5))
    need_ref = bool(settings.get("require_reference_detection", True))
    provenance = {
        "reward": describe(reward),
        "detector": describe(getattr(reward, "detector", None)),
        "embedder": describe(getattr(reward, "embedder", None)),
        "threshold": threshold,
        **{n: describe(m) for n, m in extra.items()},
    }

    def score(
        records: list[dict[str, Any]], targets: list[Any], refs: list[list[Any]]
    ) -> list[dict[str, float]]:
        """Per-record scores for records whose targets share one size."""
        images = to_tensor(targets)  # [B, 3, H, W]
        ri = RewardInputs(
            prompts=[r["instruction"] for r in records],
            references=[[to_tensor([im])[0] for im in rs] for rs in refs],
            subjects=[[Subject(c, c) for c in r["categories"]] for r in records],
        )
        with job.clock.model("psr_reward"):
            out = {k: v.double().tolist() for k, v in reward(images, ri).items()}
        extras = {}
        for name, model in extra.items():
            with job.clock.model(name):
                extras[name] = model(images, ri)["score"].double().tolist()
        rows = []
        for b, r in enumerate(records):
            s = {"psr_score": out["score"][b]}
            for k in range(len(r["categories"])):
                s[f"psr_subject_{k}"] = out[f"subject_{k + 1}"][b]
                s[f"psr_detected_{k}"] = out[f"detected_{k + 1}"][b]
            if "ref_detected_frac" in out:
                s["psr_ref_detected_frac"] = out["ref_detected_frac"][b]
            s.update({name: vals[b] for name, vals in extras.items()})
            rows.append(s)
        return rows

    def process(batch: list[dict[str, Any]]) -> list[Outcome]:
        outcomes: dict[int, Outcome] = {}
        groups: dict[tuple[int, int], list[tuple[int, Any, list[Any]]]] = {}
        for i, r in enumerate(batch):
            target, why = load_images([out_dir / r["target"]])
            refs, why_ref = load_images([out_dir / p for p in r["references"]])
            if why or why_ref:
                outcomes[i] = reject(r, f"filter: {why or why_ref}")
            else:
                groups.setdefault(target[0].size, []).append((i, target[0], refs))
        for members in groups.values():
            rows = score(
                [batch[i] for i, _, _ in members], [t for _, t, _ in members], [rs for _, _, rs in members]
            )
            for (i, _, _), s in zip(members, rows, strict=True):
                r = batch[i]
                finite = {
                    k: v for k, v in s.items() if math.isfinite(v)
                }  # NaN = "does not apply": not stored
                rec = {
                    **r,
                    "scores": {**r["scores"], **finite},
                    "provenance": {**r["provenance"], "filter": provenance},
                }
                why = verdict(
                    r["categories"],
                    s,
                    threshold=threshold,
                    require_reference_detection=need_ref,
                    minimums=minimums,
                )
                outcomes[i] = Outcome(rec) if why is None else reject(rec, why, **finite)
        return [outcomes[i] for i in range(len(batch))]

    return job.run(inputs, process, batch_size=int(settings.get("batch_size", 8)))
