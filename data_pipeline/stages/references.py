"""Stage ``references``: the single-subject model re-renders each crop in its new scene (docs/method.md
§8 step 5). These images become the subjects' references.

Settings (``references.*``):
    model: an editor spec: :class:`~data_pipeline.models.diffusion.FluxKontextEditor` (FLUX.1
        Kontext) or the quickstart's :class:`~data_pipeline.models.procedural.PasteOnScene`.
    batch_size: records per batch (a unit of resume); their 2-4 crops each are rendered together,
        at most ``images_per_call`` per model call.
    images_per_call: the model's batch size in images.

Subject k of a record is rendered with seed ``derive_seed(record seed, "references", k)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_pipeline.images import load_image, save_png
from data_pipeline.models import describe
from data_pipeline.shards import Outcome, Shard, derive_seed, reject
from data_pipeline.stages.common import build, image_path, open_run, stage_inputs


def run(out_dir: str | Path, shard: Shard, settings: dict[str, Any], seed: int) -> dict[str, Any]:
    out_dir = Path(out_dir)
    job = open_run(out_dir, "references", shard, settings, seed)
    if job.is_done():
        return job.summary()
    inputs = stage_inputs(out_dir, "references", shard)
    model = build(settings["model"])
    per_call = int(settings.get("images_per_call", 8))

    def process(batch: list[dict[str, Any]]) -> list[Outcome]:
        outcomes: dict[int, Outcome] = {}
        crops, prompts, seeds, owners = [], [], [], []
        for i, r in enumerate(batch):
            loaded = [load_image(out_dir / c) for c in r["crops"]]
            bad = next((why for im, why in loaded if im is None), None)
            if bad is not None:
                outcomes[i] = reject(r, f"references: crop {bad}")
                continue
            for k, (im, _) in enumerate(loaded):
                crops.append(im)
                prompts.append(r["scene_prompts"][k])
                seeds.append(derive_seed(r["seed"], "references", k))
                owners.append((i, k))
        images = []
        for at in range(0, len(crops), per_call):
            with job.clock.model("single_subject"):
                images += model.edit(
                    crops[at : at + per_call], prompts[at : at + per_call], seeds[at : at + per_call]
                )
        refs: dict[int, list[str]] = {}
        for (i, k), im in zip(owners, images, strict=True):
            path, rel = image_path(out_dir, "references", batch[i]["id"], f"ref{k}.png")
            save_png(im, path)
            refs.setdefault(i, []).append(rel)
        for i, r in enumerate(batch):
            if i not in outcomes:
                prov = {
                    **r["provenance"],
                    "references": {
                        "model": describe(model),
                        "seeds": [derive_seed(r["seed"], "references", k) for k in range(len(r["crops"]))],
                    },
                }
                outcomes[i] = Outcome({**r, "references": refs[i], "provenance": prov})
        return [outcomes[i] for i in range(len(batch))]

    return job.run(inputs, process, batch_size=int(settings.get("batch_size", 4)))
