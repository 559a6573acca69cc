"""Stage ``edit`` (optional): an editing model adds the attribute or action to the target for the kinds
listed in ``edit.kinds`` (docs/method.md §8 step 6). References were made from the unedited crops,
so the edited subject differs from its reference only by what the edit added.

Records of other kinds pass through unchanged (``edit.kinds: []`` turns the stage into a copy).

Settings (``edit.*``):
    kinds: task kinds to edit (default ``[attribute, action]``); ``prompts.edited_kinds`` follows it.
    model: an editor spec: :class:`~data_pipeline.models.diffusion.FluxKontextEditor` or the
        quickstart's :class:`~data_pipeline.models.procedural.AccessoryEditor`.
    batch_size: targets per model call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_pipeline.images import load_image, save_png
from data_pipeline.models import describe
from data_pipeline.shards import Outcome, Shard, derive_seed, reject
from data_pipeline.stages.common import build, image_path, open_run, stage_inputs


def _edited_box(record: dict[str, Any]) -> list[float] | None:
    modifier = (record.get("parts") or {}).get("modifier")
    return record["boxes"][modifier["subject"]] if modifier is not None else None


def run(out_dir: str | Path, shard: Shard, settings: dict[str, Any], seed: int) -> dict[str, Any]:
    out_dir = Path(out_dir)
    job = open_run(out_dir, "edit", shard, settings, seed)
    if job.is_done():
        return job.summary()
    inputs = stage_inputs(out_dir, "edit", shard)
    kinds = set(settings.get("kinds") or [])
    wanted = [r for r in inputs if r["kind"] in kinds and r.get("edit")]
    model = build(settings["model"]) if wanted else None  # no model load when nothing is edited

    def process(batch: list[dict[str, Any]]) -> list[Outcome]:
        outcomes: dict[int, Outcome] = {}
        todo, images = [], []
        for i, r in enumerate(batch):
            if r["kind"] not in kinds or not r.get("edit"):
                outcomes[i] = Outcome(r)
                continue
            im, why = load_image(out_dir / r["target"])
            if im is None:
                outcomes[i] = reject(r, f"edit: target {why}")
            else:
                todo.append(i)
                images.append(im)
        if todo:
            assert model is not None  # built above whenever a record of the shard needs an edit
            seeds = [derive_seed(batch[i]["seed"], "edit") for i in todo]
            with job.clock.model("editor"):
                edited = model.edit(
                    images, [batch[i]["edit"] for i in todo], seeds, [_edited_box(batch[i]) for i in todo]
                )
            for i, s, before, after in zip(todo, seeds, images, edited, strict=True):
                r = batch[i]
                if after.size != before.size:
                    after = after.resize(before.size)  # boxes are in target pixels
                path, rel = image_path(out_dir, "edit", r["id"], "target.png")
                save_png(after, path)
                prov = {
                    **r["provenance"],
                    "edit": {"model": describe(model), "seed": s, "instruction": r["edit"]},
                }
                outcomes[i] = Outcome(
                    {**r, "target": rel, "target_unedited": r["target"], "provenance": prov}
                )
        return [outcomes[i] for i in range(len(batch))]

    return job.run(inputs, process, batch_size=int(settings.get("batch_size", 4)))
