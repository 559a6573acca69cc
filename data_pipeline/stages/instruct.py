"""Stage ``instruct``: the final instruction, written from the (edited) target without describing the
subjects' appearance, so that a model trained on it must take appearance from the references
(docs/method.md §8 step 7).

Settings (``instruct.*``):
    model: an instructor spec: :class:`~data_pipeline.models.text.TemplateInstructor` (default) or
        :class:`~data_pipeline.models.text.VisionLanguageInstructor` (local weights).
    batch_size: targets per model call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_pipeline.images import load_image
from data_pipeline.models import describe
from data_pipeline.models.text import TemplateInstructor
from data_pipeline.shards import Outcome, Shard, reject
from data_pipeline.stages.common import build, open_run, stage_inputs


def run(out_dir: str | Path, shard: Shard, settings: dict[str, Any], seed: int) -> dict[str, Any]:
    out_dir = Path(out_dir)
    job = open_run(out_dir, "instruct", shard, settings, seed)
    if job.is_done():
        return job.summary()
    inputs = stage_inputs(out_dir, "instruct", shard)
    model = build(settings["model"])

    def process(batch: list[dict[str, Any]]) -> list[Outcome]:
        outcomes: dict[int, Outcome] = {}
        todo, images = [], []
        for i, r in enumerate(batch):
            im, why = load_image(out_dir / r["target"])
            if im is None:
                outcomes[i] = reject(r, f"instruct: target {why}")
            else:
                todo.append(i)
                images.append(im)
        if todo:
            with job.clock.model("instructor"):
                results = model.instruct(images, [batch[i] for i in todo])
            for i, (text, why) in zip(todo, results, strict=True):
                r = batch[i]
                if text is None:
                    outcomes[i] = reject(r, f"instruct: {why}")
                    continue
                prov = {**r["provenance"], "instruct": {"model": describe(model)}}
                if isinstance(model, TemplateInstructor) and not r.get("parts"):
                    prov["instruct"]["source"] = "the text-to-image prompt (no template parts)"
                outcomes[i] = Outcome({**r, "instruction": text, "provenance": prov})
        return [outcomes[i] for i in range(len(batch))]

    return job.run(inputs, process, batch_size=int(settings.get("batch_size", 8)))
