"""Records per second of each data pipeline stage on the tiny models, and the share of time in model calls.

    python benchmarks/data_pipeline.py [--records 32] [--threads 1] [--out DIR]

Two tables:
1. each stage with its tiny-model variant (tiny FLUX / FLUX Kontext, tiny Grounding DINO, the tiny
   PSR reward, a tiny causal LM and VLM), run on the same inputs: the records of the quickstart
   route's previous stage, so that random detectors rejecting everything does not starve the
   stages after them;
2. the quickstart route end to end (``experiment=quickstart`` stand-ins).

records/s = records in / stage seconds, excluding model loading (shown as load s); "in models" is
the share of stage seconds spent inside model calls (the rest: image I/O, JSON, crops, PNG writes).
Numbers depend on the CPU and its load; the tiny models say nothing about real-model throughput
(on a GPU the FLUX stages dominate by far).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY_FLUX = {"_target_": "psr.models.builders.tiny_flux_kontext_components", "seed": 0}
PATH_KEYS = ("target", "target_unedited")
# short names: the tiny Grounding DINO reads at most 32 tokens, one per letter for unknown words
SHORT_VOCABULARY = [
    "dog",
    "cat",
    "cup",
    "hat",
    "book",
    "vase",
    "lamp",
    "sofa",
    "bowl",
    "fork",
    "kite",
    "bus",
    "car",
    "boat",
    "bag",
    "shoe",
    "ball",
    "cake",
    "pear",
    "lemon",
]


def quickstart_settings(records: int, vocabulary: Path) -> dict[str, dict[str, Any]]:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "conf" / "pipeline"), version_base="1.3"):
        cfg = compose(
            config_name="data",
            overrides=[
                "experiment=quickstart",
                f"plan.num_records={records}",
                f"plan.vocabulary={vocabulary}",
            ],
        )
    from data_pipeline.stages.common import ORDER

    return {s: OmegaConf.to_container(cfg[s], resolve=True) for s in ORDER}  # type: ignore[misc]


def tiny_settings(lm: Path, vlm: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    kontext = {
        "_target_": "data_pipeline.models.diffusion.FluxKontextEditor",
        "components": TINY_FLUX,
        "input_size": 64,
        "num_inference_steps": 4,
        "max_sequence_length": 256,
    }
    return {
        "prompts": (
            "tiny causal LM (1 layer, 16 new tokens)",
            {
                "model": {
                    "_target_": "data_pipeline.models.text.CausalLMPrompter",
                    "path": str(lm),
                    "max_new_tokens": 16,
                    "dtype": "float32",
                },
                "batch_size": 16,
            },
        ),
        "target": (
            "tiny FLUX, 64 px, 4 steps",
            {
                "model": {
                    "_target_": "data_pipeline.models.diffusion.FluxText2Image",
                    "components": TINY_FLUX,
                    "height": 64,
                    "width": 64,
                    "num_inference_steps": 4,
                    "max_sequence_length": 256,
                },
                "batch_size": 4,
            },
        ),
        "crop": (
            "tiny Grounding DINO (256 px input)",
            {"detector": {"_target_": "rewards.testing.tiny_grounding_dino"}, "batch_size": 8},
        ),
        "references": (
            "tiny FLUX Kontext, 64 px, 4 steps",
            {"model": kontext, "batch_size": 4, "images_per_call": 8},
        ),
        "edit": (
            "tiny FLUX Kontext, target size, 4 steps",
            {
                "kinds": ["attribute", "action"],
                "model": {**kontext, "height": 128, "width": 128, "letterbox": False},
                "batch_size": 4,
            },
        ),
        "instruct": (
            "tiny VLM (LLaVA layout, 16 new tokens)",
            {
                "model": {
                    "_target_": "data_pipeline.models.text.VisionLanguageInstructor",
                    "path": str(vlm),
                    "max_new_tokens": 16,
                    "dtype": "float32",
                },
                "batch_size": 8,
            },
        ),
        "filter": (
            "tiny PSR reward (tiny Grounding DINO + tiny DINO)",
            {"reward": {"_target_": "rewards.testing.tiny_psr"}, "threshold": 0.5, "batch_size": 8},
        ),
    }


def absolute(record: dict[str, Any], base: Path) -> dict[str, Any]:
    """The record with its image paths made absolute, so another out_dir can read them."""
    r = dict(record)
    for key in PATH_KEYS:
        if r.get(key):
            r[key] = str(base / r[key])
    for key in ("crops", "references"):
        if r.get(key):
            r[key] = [str(base / p) for p in r[key]]
    return r


def row(stage: str, model: str, s: dict[str, Any]) -> str:
    model_s = sum(s["model_seconds"].values())
    rate = s["inputs"] / s["seconds"] if s["seconds"] > 0 else float("inf")
    share = model_s / s["seconds"] if s["seconds"] > 0 else 0.0
    return f"| {stage} | {model} | {s['inputs']} | {s['setup_seconds']:.2f} | {s['seconds']:.2f} | {rate:.1f} | {share:.0%} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="keep the outputs here (default: a temp dir)")
    args = ap.parse_args()

    import importlib
    import logging

    import torch

    from data_pipeline.shards import Outcome, Shard, StageRun
    from data_pipeline.stages.common import ORDER, previous
    from data_pipeline.testing import save_tiny_causal_lm, save_tiny_vlm

    logging.disable(logging.WARNING)  # the tiny text encoders' truncation notices
    torch.set_num_threads(args.threads)
    root = args.out or Path(tempfile.mkdtemp(prefix="bench-data-"))
    root.mkdir(parents=True, exist_ok=True)
    base = root / "quickstart"
    header = "| stage | model | records | load s | stage s | records/s | in models |\n|---|---|---|---|---|---|---|"

    vocabulary = root / "vocabulary.txt"
    vocabulary.write_text("\n".join(SHORT_VOCABULARY) + "\n")
    qs = quickstart_settings(args.records, vocabulary)
    lines = []
    for stage in ORDER[: ORDER.index("filter") + 1]:
        s = importlib.import_module(f"data_pipeline.stages.{stage}").run(base, Shard(), qs[stage], 0)
        model = qs[stage].get("model") or qs[stage].get("detector") or qs[stage].get("reward") or {}
        lines.append(row(stage, str(model.get("_target_", "-")).rsplit(".", 1)[-1], s))

    lm, vlm = save_tiny_causal_lm(root / "lm"), save_tiny_vlm(root / "vlm")
    tiny_lines = []
    from data_pipeline.shards import read_stage_output

    for stage, (label, settings) in tiny_settings(lm, vlm).items():
        d = root / "tiny" / stage
        shutil.rmtree(d, ignore_errors=True)
        inputs = [absolute(r, base) for r in read_stage_output(base, previous(stage))[0]]
        # the previous stage's records, published as-is into a fresh out_dir
        StageRun(d, previous(stage), Shard(), {"copied": True}).run(
            inputs, lambda b: [Outcome(r) for r in b], batch_size=1024
        )
        s = importlib.import_module(f"data_pipeline.stages.{stage}").run(d, Shard(), settings, 0)
        tiny_lines.append(row(stage, label, s))

    print(f"torch threads: {args.threads}; records: {args.records}; outputs: {root}\n")
    print("Tiny models, each stage on the quickstart route's inputs\n")
    print(header + "\n" + "\n".join(tiny_lines) + "\n")
    print("Quickstart route (experiment=quickstart), end to end\n")
    print(header + "\n" + "\n".join(lines))
    if args.out is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
