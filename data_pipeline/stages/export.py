"""Stage ``export``: the dataset, once every ``filter`` shard is done. Not sharded.

Writes ``<out_dir>/export/`` (self-contained: copy or tar this folder alone)::

    manifest.jsonl    the training manifest (schema: psr/data/manifest.py), records in index order
    psrbench.json     the same records as a PSRBench-style benchmark (result_path left empty)
    rejects.jsonl     every record rejected by any stage: stage, reason, scores, the record so far
    images/<id>/      target.png and ref<k>.png (hard links to the stage outputs where possible)
    done.json         counts and the settings fingerprint

A manifest subject is ``name`` = ``category`` = the planned category, ``reference`` = its
reference image, ``box`` = its box in the target (from ``crop``; an edit keeps the geometry).
``provenance`` keeps every stage's model and seed, the prompts and the edit instruction.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from data_pipeline.shards import DONE, fingerprint, read_stage_output, shard_dirs
from data_pipeline.stages.common import ORDER, settings_key
from psr.data.manifest import Sample, Subject, write_manifest, write_psrbench
from psr.fileio import make_temp_dir, process_start_time, remove_stale_temps

SHARDED = ORDER[: ORDER.index("filter") + 1]


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def to_sample(record: dict[str, Any], settings: dict[str, str] | None = None) -> Sample:
    """A filtered work record as a manifest :class:`Sample` with paths under ``images/<id>/``.

    ``settings``: stage -> settings fingerprint, stored in the provenance.
    """
    rid = record["id"]
    subjects = [
        Subject(
            name=cat,
            category=cat,
            reference=f"images/{rid}/ref{k}.png",
            box=[float(v) for v in record["boxes"][k]],
        )
        for k, cat in enumerate(record["categories"])
    ]
    provenance = {
        **record["provenance"],
        "record_seed": record["seed"],
        "index": record["index"],
        "prompt": record["prompt"],
        "scene_prompts": record["scene_prompts"],
        "edit_instruction": record.get("edit") if "target_unedited" in record else None,
        "settings": dict(settings or {}),
    }
    return Sample(
        id=rid,
        instruction=record["instruction"],
        target=f"images/{rid}/target.png",
        subjects=subjects,
        kind=record["kind"],
        scores=dict(record["scores"]),
        provenance=provenance,
    )


def all_rejects(out_dir: Path) -> list[dict[str, Any]]:
    """Rejected rows of every sharded stage, in pipeline order then record index."""
    rows = []
    for stage in SHARDED:
        rows += read_stage_output(out_dir, stage)[1]
    return rows


def run(out_dir: str | Path, settings: dict[str, Any], seed: int) -> dict[str, Any]:
    """Export the dataset; a finished export is left as it is. Returns its ``done.json``."""
    out_dir = Path(out_dir)
    final = out_dir / "export"
    if (final / DONE).is_file():
        return json.loads((final / DONE).read_text())
    records = read_stage_output(out_dir, "filter")[0]  # raises unless every filter shard is done
    rejects = all_rejects(out_dir)
    hashes = {}
    for stage in SHARDED:
        first = sorted(shard_dirs(out_dir, stage).values())[0]
        hashes[stage] = json.loads((first / DONE).read_text())["fingerprint"]
    # what a killed export left (this process holds out_dir's export lock, so no live exporter owns it)
    remove_stale_temps(out_dir, before=process_start_time())
    tmp = make_temp_dir(out_dir, "export")  # an ordinary directory's mode once renamed to export/
    try:
        samples = []
        for r in records:
            s = to_sample(r, hashes)
            _link(out_dir / r["target"], tmp / s.target)  # type: ignore[operator]
            for src, sub in zip(r["references"], s.subjects, strict=True):
                _link(out_dir / src, tmp / sub.reference)
            samples.append(s)
        write_manifest(tmp / "manifest.jsonl", samples)
        write_psrbench(tmp / "psrbench.json", samples)
        with (tmp / "rejects.jsonl").open("w", encoding="utf-8") as f:
            for row in rejects:
                f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        summary = {
            "records": len(samples),
            "rejected": len(rejects),
            "fingerprint": fingerprint(settings_key(settings, seed)),
        }
        (tmp / DONE).write_text(json.dumps(summary, indent=1) + "\n")
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / DONE).is_file():  # not a concurrent exporter that finished first
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return json.loads((final / DONE).read_text())
