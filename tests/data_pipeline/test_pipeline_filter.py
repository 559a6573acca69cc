"""The filter keeps a record whose target shows its references and rejects one where a subject was
removed or two references were swapped, with the reasons and scores kept.

Detector: :class:`ColourKeyDetector` (finds each category's key colour: category-aware, from the
pixels). Embedders: the weight-free colour histogram, and the rewards' tiny random DINO ViT
(``rewards.testing.tiny_dino``, seeds 0 and 1). Measured on these images: a reference against its
own pasted copy scores 1.00 with every embedder; a swapped reference (another sprite, embedded whole
because its category is not in it) scores 0.64-0.82 with the random DINO and 0.0 with the histogram,
so thresholds 0.9 (DINO) and 0.8 (histogram) separate them.
"""

from __future__ import annotations

import pytest
from PIL import Image, ImageDraw
from pipeline_helpers import COLOUR_KEY, publish, run_stages

from data_pipeline.models.procedural import KeyColours, draw_sprite, shape_of
from data_pipeline.shards import read_stage_output
from data_pipeline.stages.filter import verdict

CATS = ["dog", "chair", "cup"]
PLACES = [(6, 10), (70, 62), (8, 70)]


def _sprite(cat: str) -> Image.Image:
    im = Image.new("RGB", (64, 64), (255, 255, 255))
    draw_sprite(ImageDraw.Draw(im), shape_of(cat), (8, 8, 55, 55), KeyColours()(cat))
    return im


def _record(out, rid: str, index: int, pasted: list[str], refs: list[str]) -> dict:
    """Target = the ``pasted`` references on a grey canvas; subject k = CATS[k] with reference ``refs[k]``."""
    folder = out / "imgs" / rid
    folder.mkdir(parents=True)
    canvas = Image.new("RGB", (128, 128), (200, 200, 200))
    for cat in pasted:
        canvas.paste(_sprite(cat).resize((48, 48), Image.Resampling.NEAREST), PLACES[CATS.index(cat)])
    canvas.save(folder / "target.png")
    paths = []
    for k, cat in enumerate(refs):
        _sprite(cat).save(folder / f"ref{k}.png")
        paths.append(f"imgs/{rid}/ref{k}.png")
    return {
        "index": index,
        "id": rid,
        "seed": index,
        "kind": "three",
        "categories": CATS,
        "instruction": "the dog, the chair and the cup on a table",
        "target": f"imgs/{rid}/target.png",
        "references": paths,
        "scores": {},
        "provenance": {},
    }


def _filter_settings(embedder: dict, threshold: float) -> dict:
    return {
        "reward": {
            "_target_": "rewards.subject_consistency.SubjectConsistencyReward",
            "detector": COLOUR_KEY,
            "embedder": embedder,
        },
        "threshold": threshold,
    }


@pytest.mark.parametrize(
    ("embedder", "threshold"),
    [
        ({"_target_": "data_pipeline.models.procedural.ColourHistogramEmbedder"}, 0.8),
        ({"_target_": "rewards.testing.tiny_dino", "seed": 0}, 0.9),
        ({"_target_": "rewards.testing.tiny_dino", "seed": 1}, 0.9),
    ],
)
def test_filter_accepts_pasted_and_rejects_removed_or_swapped(tmp_path, embedder, threshold):
    records = [
        _record(tmp_path, "good", 0, pasted=CATS, refs=CATS),
        _record(tmp_path, "removed", 1, pasted=["dog", "cup"], refs=CATS),
        _record(tmp_path, "swapped", 2, pasted=CATS, refs=["chair", "dog", "cup"]),
        _record(tmp_path, "corrupt", 3, pasted=CATS, refs=CATS),
    ]
    (tmp_path / "imgs/corrupt/ref1.png").write_bytes(b"garbage")
    publish(tmp_path, "instruct", records)
    summary = run_stages(tmp_path, ["filter"], filter=_filter_settings(embedder, threshold))["filter"]
    assert (summary["accepted"], summary["rejected"]) == (1, 3)
    (kept,) = read_stage_output(tmp_path, "filter")[0]
    assert kept["id"] == "good" and min(kept["scores"][f"psr_subject_{k}"] for k in range(3)) > 0.99
    rejected = {r["id"]: r for r in read_stage_output(tmp_path, "filter")[1]}
    assert rejected["removed"]["reason"] == "filter: 'chair' not found in the target"
    assert rejected["removed"]["scores"]["psr_detected_1"] == 0.0
    # the swapped reference shows no dog: it is embedded whole (the reward's full_image rule) and the
    # similarity rule rejects it before the reference-detection rule is reached
    assert rejected["swapped"]["reason"].startswith("filter: 'dog' similarity to its reference")
    assert (
        rejected["swapped"]["scores"]["psr_subject_0"] < threshold
        and rejected["swapped"]["scores"]["psr_subject_2"] > 0.99
    )
    assert (
        rejected["corrupt"]["reason"].startswith("filter: unreadable image")
        and "ref1.png" in rejected["corrupt"]["reason"]
    )


def test_verdict_rules():
    ok = {"psr_detected_0": 1.0, "psr_subject_0": 0.9, "psr_ref_detected_frac": 1.0, "clip": 0.3}
    kw = {"threshold": 0.5, "require_reference_detection": True, "minimums": {"clip": 0.25}}
    assert verdict(["dog"], ok, **kw) is None
    assert (
        verdict(["dog"], {**ok, "psr_ref_detected_frac": 0.0}, **kw)
        == "filter: a reference shows no detection of its category"
    )
    assert (
        verdict(["dog"], {**ok, "psr_ref_detected_frac": 0.0}, **{**kw, "require_reference_detection": False})
        is None
    )
    assert verdict(["dog"], {**ok, "clip": 0.2}, **kw) == "filter: clip 0.200 < 0.25"
    assert verdict(["dog"], {**ok, "clip": float("nan")}, **kw) == "filter: clip nan < 0.25"
