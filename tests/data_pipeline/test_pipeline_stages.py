"""Each stage on tiny models (or the weight-free stand-ins where a random model can only make noise)."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from PIL import Image
from pipeline_helpers import SETTINGS, run_stages, tiny_kontext, tiny_renderer

from data_pipeline.shards import Shard, read_stage_output
from data_pipeline.stages.plan import kind_sequence
from data_pipeline.vocabulary import read_vocabulary


@pytest.fixture(scope="module")
def cropped(tmp_path_factory):
    """plan -> prompts -> target (sprites) -> crop, 14 records (2 of each kind)."""
    out = tmp_path_factory.mktemp("cropped")
    run_stages(out, ["plan", "prompts", "target", "crop"])
    return out


def test_plan_is_balanced_seeded_and_shard_independent(tmp_path):
    seq = kind_sequence(23, {"a": 2, "b": 3, "c": 4}, None, seed=0)
    assert sorted(Counter(seq).values()) == [7, 8, 8]
    weighted = Counter(kind_sequence(40, {"a": 2, "b": 3}, {"a": 3, "b": 1}, seed=0))
    assert weighted == {"a": 30, "b": 10}
    run_stages(tmp_path / "one", ["plan"])
    for k in range(3):
        run_stages(tmp_path / "three", ["plan"], shard=Shard(k, 3))
    one = read_stage_output(tmp_path / "one", "plan")[0]
    three = read_stage_output(tmp_path / "three", "plan")[0]
    assert one == three and [r["index"] for r in one] == list(range(14))
    assert Counter(r["kind"] for r in one) == {
        k: 2 for k in ("attribute", "action", "background", "position", "complex", "three", "four")
    }
    vocab = set(read_vocabulary())
    for r in one:
        n = {"three": 3, "four": 4}.get(r["kind"], 2)
        assert len(r["categories"]) == len(set(r["categories"])) == n
        assert set(r["categories"]) <= vocab and "person" not in r["categories"]
    other = read_stage_output(run_stages(tmp_path / "s1", ["plan"], seed=1) and tmp_path / "s1", "plan")[0]
    assert [r["categories"] for r in other] != [r["categories"] for r in one]


def test_vocabulary_is_objects365():
    names = read_vocabulary()
    assert len(names) == 365 and len(set(names)) == 365
    assert names[:4] == ["person", "sneakers", "chair", "shoes"] and "dog" in names


def test_template_prompts_name_every_subject_and_defer_edits(cropped):
    recs = read_stage_output(cropped, "prompts")[0]
    for r in recs:
        assert all(c in r["prompt"] for c in r["categories"])
        assert len(r["scene_prompts"]) == len(r["categories"])
        assert all(c in sp for c, sp in zip(r["categories"], r["scene_prompts"], strict=True))
        modifier = r["parts"].get("modifier")
        if r["kind"] in ("attribute", "action"):
            assert modifier["text"] in r["edit"] and modifier["text"] not in r["prompt"]
        else:
            assert r["edit"] is None
            if modifier is not None:  # complex: stated in the prompt itself
                assert modifier["text"] in r["prompt"]


def test_target_renders_with_tiny_flux(tmp_path):
    run_stages(tmp_path, ["plan", "prompts"], plan={"num_records": 3})
    s = run_stages(tmp_path, ["target"], target={"model": tiny_renderer(), "batch_size": 2})["target"]
    assert (s["inputs"], s["accepted"]) == (3, 3) and "renderer" in s["model_seconds"]
    for r in read_stage_output(tmp_path, "target")[0]:
        with Image.open(tmp_path / r["target"]) as im:
            assert im.size == (64, 64)
        assert r["target_size"] == [64, 64] and r["provenance"]["target"]["model"].startswith("FluxPipeline")


def test_crop_finds_each_sprite_at_its_layout(cropped):
    recs = read_stage_output(cropped, "crop")[0]
    assert len(recs) == 14  # flat backgrounds, separated sprites: every subject found once
    for r in recs:
        layout = r["provenance"]["target"]["layout"]
        for box, truth, crop in zip(r["boxes"], layout, r["crops"], strict=True):
            # the detector's region [x0, x1) vs the drawn inclusive box [x0, x1]: one pixel apart at most
            assert max(abs(a - b) for a, b in zip(box, truth, strict=True)) <= 1.0
            with Image.open(cropped / crop) as im:
                assert im.size[0] >= box[2] - box[0]


def test_crop_rejects_unreadable_and_missing_targets(tmp_path):
    run_stages(tmp_path, ["plan", "prompts", "target"], plan={"num_records": 6, "kinds": {"background": 2}})
    recs = read_stage_output(tmp_path, "target")[0]
    (tmp_path / recs[1]["target"]).write_bytes(
        (tmp_path / recs[1]["target"]).read_bytes()[:60]
    )  # truncated PNG
    (tmp_path / recs[2]["target"]).unlink()
    (tmp_path / recs[3]["target"]).write_text("not an image")
    s = run_stages(tmp_path, ["crop"])["crop"]
    assert (s["accepted"], s["rejected"]) == (3, 3)
    reasons = {r["id"]: r["reason"] for r in read_stage_output(tmp_path, "crop")[1]}
    assert reasons[recs[1]["id"]].startswith("crop: target unreadable image")
    assert reasons[recs[2]["id"]].startswith("crop: target missing image")
    assert reasons[recs[3]["id"]].startswith("crop: target unreadable image")


def test_crop_rejects_repeated_categories(cropped, tmp_path):
    from pipeline_helpers import publish

    rec = dict(read_stage_output(cropped, "target")[0][0])
    rec["target"] = str(cropped / rec["target"])  # absolute: the image stays where it is
    rec["categories"] = [rec["categories"][0]] * 2
    publish(tmp_path, "target", [rec])
    run_stages(tmp_path, ["crop"])
    (row,) = read_stage_output(tmp_path, "crop")[1]
    assert row["reason"].startswith("crop: categories repeat")


def test_crop_with_tiny_grounding_dino_rejects_with_reasons(tmp_path):
    # tiny random FLUX targets and a tiny random Grounding DINO: boxes are noise, so most records fail
    # the found-exactly-once rule; each rejection must say why. Short names fit the tiny text budget.
    (tmp_path / "vocab.txt").write_text("dog\ncat\ncup\nhat\nbook\n")
    plan = {"num_records": 4, "kinds": {"background": 2}, "vocabulary": str(tmp_path / "vocab.txt")}
    run_stages(
        tmp_path, ["plan", "prompts", "target"], plan=plan, target={"model": tiny_renderer(), "batch_size": 4}
    )
    s = run_stages(
        tmp_path,
        ["crop"],
        crop={"detector": {"_target_": "rewards.testing.tiny_grounding_dino"}, "batch_size": 4},
    )["crop"]
    assert s["accepted"] + s["rejected"] == 4 and "detector" in s["model_seconds"]
    pattern = re.compile(
        r"crop: ('.+' found \d+ times \(need exactly 1\)|'.+' box .* is smaller than|boxes of .* overlap)"
    )
    rejected = read_stage_output(tmp_path, "crop")[1]
    assert rejected and all(pattern.match(r["reason"]) for r in rejected)


def test_references_with_tiny_kontext(cropped, tmp_path):
    import shutil

    shutil.copytree(cropped, tmp_path / "run")
    out = tmp_path / "run"
    s = run_stages(
        out, ["references"], references={"model": tiny_kontext(), "batch_size": 3, "images_per_call": 4}
    )["references"]
    recs = read_stage_output(out, "references")[0]
    assert s["accepted"] == 14 and sum(len(r["references"]) for r in recs) == sum(
        len(r["categories"]) for r in recs
    )
    for r in recs[:3]:
        for p in r["references"]:
            with Image.open(out / p) as im:
                assert im.size == (64, 64)
        assert len(r["provenance"]["references"]["seeds"]) == len(r["categories"])


def test_edit_changes_only_edited_kinds_and_keeps_geometry(cropped, tmp_path):
    import shutil

    shutil.copytree(cropped, tmp_path / "run")
    out = tmp_path / "run"
    run_stages(out, ["references"])
    s = run_stages(
        out, ["edit"], edit={"kinds": ["attribute", "action"], "model": tiny_kontext(96, letterbox=False)}
    )["edit"]
    assert s["accepted"] == 14 and "editor" in s["model_seconds"]
    before = {r["id"]: r for r in read_stage_output(out, "references")[0]}
    for r in read_stage_output(out, "edit")[0]:
        if r["kind"] in ("attribute", "action"):
            assert r["target"].startswith("edit/") and r["target_unedited"] == before[r["id"]]["target"]
            with Image.open(out / r["target"]) as a, Image.open(out / r["target_unedited"]) as b:
                assert a.size == b.size
        else:
            assert r == before[r["id"]]


def test_instruct_templates_restate_scene_without_appearance(cropped, tmp_path):
    import shutil

    shutil.copytree(cropped, tmp_path / "run")
    out = tmp_path / "run"
    run_stages(out, ["references", "edit", "instruct"])
    for r in read_stage_output(out, "instruct")[0]:
        ins = r["instruction"]
        assert all(f"the {c}" in ins for c in r["categories"]) and r["parts"]["scene"] in ins
        assert "photo" not in ins.lower() and "colours" not in ins  # no render or appearance words
        modifier = r["parts"].get("modifier")
        if modifier is not None:
            assert modifier["text"] in ins  # the edit / attribute is what the instruction asks for
    assert SETTINGS["instruct"]["model"]["_target_"].endswith("TemplateInstructor")


def test_report_groups_alike_rejection_reasons():
    from data_pipeline.stages.report import reason_key

    a = reason_key("crop: 'dog' found 2 times (need exactly 1)")
    assert (
        a
        == reason_key("crop: 'fire hydrant' found 0 times (need exactly 1)")
        == "crop: <name> found <n> times (need exactly <n>)"
    )
    assert (
        reason_key("filter: 'cup' similarity to its reference 0.412 < 0.6")
        == "filter: <name> similarity to its reference <n> < <n>"
    )
    assert reason_key("crop: target missing image /data/x/target.png") == "crop: target missing image <path>"
