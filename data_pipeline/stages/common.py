"""What every stage shares: building its models, finding its inputs, naming its image files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from data_pipeline.shards import Shard, StageRun, read_stage_output

ORDER = ("plan", "prompts", "target", "crop", "references", "edit", "instruct", "filter", "export", "report")
"""The stages in pipeline order; each sharded stage reads the accepted records of the one before."""


def build(spec: Any, **kwargs: Any) -> Any:
    """A model from a Hydra spec (a mapping with ``_target_``), or ``spec`` itself if already built."""
    if isinstance(spec, dict) and "_target_" in spec:
        from hydra.utils import instantiate

        return instantiate(spec, **kwargs)
    if kwargs:
        raise ValueError(f"cannot pass {sorted(kwargs)} to an already built model {type(spec).__name__}")
    return spec


def settings_key(settings: dict[str, Any], seed: int) -> dict[str, Any]:
    """The part of a stage's settings that determines its outputs (built objects by their type)."""

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {str(k): plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if x is None or isinstance(x, (str, int, float, bool)):
            return x
        return getattr(x, "description", type(x).__name__)

    return {"seed": seed, **plain(settings)}


def previous(stage: str) -> str:
    return ORDER[ORDER.index(stage) - 1]


def stage_inputs(out_dir: Path, stage: str, shard: Shard) -> list[dict[str, Any]]:
    """The accepted records of the stage before ``stage`` that belong to ``shard``, in index order."""
    return read_stage_output(out_dir, previous(stage), shard)[0]


def image_path(out_dir: Path, stage: str, record_id: str, name: str) -> tuple[Path, str]:
    """``(absolute path, path relative to out_dir)`` of an image a stage writes for a record."""
    rel = f"{stage}/images/{record_id}/{name}"
    return Path(out_dir) / rel, rel


def open_run(
    out_dir: str | os.PathLike, stage: str, shard: Shard, settings: dict[str, Any], seed: int
) -> StageRun:
    return StageRun(out_dir, stage, shard, settings_key(settings, seed))
