"""Shared builders for the data pipeline tests: settings for each stage and records seeded into a stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_pipeline.shards import Outcome, Shard, StageRun

CONF = Path(__file__).resolve().parents[2] / "conf" / "pipeline"

TINY_FLUX = {"_target_": "psr.models.builders.tiny_flux_kontext_components", "seed": 0}


def tiny_renderer(size: int = 64) -> dict[str, Any]:
    return {
        "_target_": "data_pipeline.models.diffusion.FluxText2Image",
        "components": TINY_FLUX,
        "height": size,
        "width": size,
        "num_inference_steps": 2,
        "max_sequence_length": 128,
    }


def tiny_kontext(size: int = 64, *, letterbox: bool = True) -> dict[str, Any]:
    return {
        "_target_": "data_pipeline.models.diffusion.FluxKontextEditor",
        "components": TINY_FLUX,
        "input_size": size,
        "height": size,
        "width": size,
        "num_inference_steps": 2,
        "max_sequence_length": 128,
        "letterbox": letterbox,
    }


def composite(size: int = 96) -> dict[str, Any]:
    """Sprites on flat backgrounds: no model, so it is fast and the layout is exact."""
    return {"_target_": "data_pipeline.models.procedural.CompositeRenderer", "height": size, "width": size}


COLOUR_KEY = {"_target_": "data_pipeline.models.procedural.ColourKeyDetector"}

SETTINGS: dict[str, dict[str, Any]] = {
    "plan": {"num_records": 14, "exclude": ["person"]},
    "prompts": {
        "model": {"_target_": "data_pipeline.models.text.TemplatePrompter"},
        "edited_kinds": ["attribute", "action"],
    },
    "target": {"model": composite(), "batch_size": 4},
    "crop": {"detector": COLOUR_KEY},
    "references": {
        "model": {"_target_": "data_pipeline.models.procedural.PasteOnScene", "size": 64},
        "batch_size": 4,
    },
    "edit": {
        "kinds": ["attribute", "action"],
        "model": {"_target_": "data_pipeline.models.procedural.AccessoryEditor"},
    },
    "instruct": {"model": {"_target_": "data_pipeline.models.text.TemplateInstructor"}},
    "filter": {
        "reward": {
            "_target_": "rewards.subject_consistency.SubjectConsistencyReward",
            "detector": COLOUR_KEY,
            "embedder": {"_target_": "data_pipeline.models.procedural.ColourHistogramEmbedder"},
        },
        "threshold": 0.8,
    },
}


def run_stages(
    out_dir: Path, stages: list[str], *, seed: int = 0, shard: Shard = Shard(), **overrides: Any
) -> dict[str, Any]:
    """Run the named stages in order with :data:`SETTINGS` (``overrides[stage]`` replaces a stage's settings)."""
    import importlib

    out = {}
    for stage in stages:
        settings = overrides.get(stage, SETTINGS[stage])
        out[stage] = importlib.import_module(f"data_pipeline.stages.{stage}").run(
            out_dir, shard, settings, seed
        )
    return out


def publish(out_dir: Path, stage: str, records: list[dict[str, Any]], shard: Shard = Shard()) -> None:
    """Publish ``records`` as if ``stage`` had produced them (the input of the next stage)."""
    StageRun(out_dir, stage, shard, {"seeded": True}).run(
        records, lambda b: [Outcome(r) for r in b], batch_size=64
    )


def compose(overrides: list[str]) -> Any:
    """The composed ``conf/pipeline/data.yaml`` with ``overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="data", overrides=overrides)
