"""Stage ``prompts``: the text-to-image prompt with all subjects, one new-scene prompt per subject,
and an edit instruction for the kinds the ``edit`` stage changes (docs/method.md §8 step 2).

Settings (``prompts.*``):
    model: a prompter spec (``_target_``): :class:`~data_pipeline.models.text.TemplatePrompter`
        (default) or :class:`~data_pipeline.models.text.CausalLMPrompter` (local weights).
    edited_kinds: kinds whose attribute/action the edit stage adds (``${edit.kinds}``).
    batch_size: plans per model call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_pipeline.models import describe
from data_pipeline.shards import Outcome, Shard, reject
from data_pipeline.stages.common import build, open_run, stage_inputs


def run(out_dir: str | Path, shard: Shard, settings: dict[str, Any], seed: int) -> dict[str, Any]:
    job = open_run(out_dir, "prompts", shard, settings, seed)
    if job.is_done():
        return job.summary()
    inputs = stage_inputs(Path(out_dir), "prompts", shard)
    prompter = build(settings["model"], edited_kinds=list(settings.get("edited_kinds") or []))

    def process(batch: list[dict[str, Any]]) -> list[Outcome]:
        with job.clock.model("prompter"):
            results = prompter.write(batch)
        out = []
        for r, res in zip(batch, results, strict=True):
            if isinstance(res, str):
                out.append(reject(r, f"prompts: {res}"))
                continue
            rec = {**r, **res, "provenance": {**r["provenance"], "prompts": {"model": describe(prompter)}}}
            out.append(Outcome(rec))
        return out

    return job.run(inputs, process, batch_size=int(settings.get("batch_size", 16)))
