"""Stage ``target``: a text-to-image model renders the multi-subject target (docs/method.md §8 step 3).

Settings (``target.*``):
    model: a renderer spec: :class:`~data_pipeline.models.diffusion.FluxText2Image` (FLUX.1 through
        ``psr.models.builders``) or the quickstart's
        :class:`~data_pipeline.models.procedural.CompositeRenderer`.
    batch_size: prompts per model call.

Each record gets its own seed for the render, ``derive_seed(record seed, "target")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_pipeline.images import save_png
from data_pipeline.models import describe
from data_pipeline.shards import Outcome, Shard, derive_seed
from data_pipeline.stages.common import build, image_path, open_run, stage_inputs


def run(out_dir: str | Path, shard: Shard, settings: dict[str, Any], seed: int) -> dict[str, Any]:
    out_dir = Path(out_dir)
    job = open_run(out_dir, "target", shard, settings, seed)
    if job.is_done():
        return job.summary()
    inputs = stage_inputs(out_dir, "target", shard)
    renderer = build(settings["model"])

    def process(batch: list[dict[str, Any]]) -> list[Outcome]:
        seeds = [derive_seed(r["seed"], "target") for r in batch]
        with job.clock.model("renderer"):
            rendered = renderer.render([r["prompt"] for r in batch], seeds, [r["categories"] for r in batch])
        out = []
        for r, s, res in zip(batch, seeds, rendered, strict=True):
            path, rel = image_path(out_dir, "target", r["id"], "target.png")
            save_png(res.image, path)
            prov = {"model": describe(renderer), "seed": s, **res.info}
            w, h = res.image.size
            out.append(
                Outcome(
                    {
                        **r,
                        "target": rel,
                        "target_size": [h, w],
                        "provenance": {**r["provenance"], "target": prov},
                    }
                )
            )
        return out

    return job.run(inputs, process, batch_size=int(settings.get("batch_size", 4)))
