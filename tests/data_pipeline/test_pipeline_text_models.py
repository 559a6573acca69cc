"""Prompt and instruction writers: reply parsing, and the model-backed writers loaded from local
directories (tiny random models: every reply is noise and must be rejected with its reason)."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from pipeline_helpers import publish, run_stages

from data_pipeline.models.text import (
    CausalLMPrompter,
    TemplatePrompter,
    VisionLanguageInstructor,
    parse_prompt_json,
)
from data_pipeline.shards import read_stage_output
from data_pipeline.testing import save_tiny_causal_lm, save_tiny_vlm


def test_parse_prompt_json_accepts_a_wrapped_object():
    reply = 'Sure! {"prompt": "A dog next to a red chair", "scenes": ["the dog on a beach", "the chair in snow"], "edit": null} Enjoy.'
    assert parse_prompt_json(reply, ["dog", "chair"], needs_edit=False) == {
        "prompt": "A dog next to a red chair",
        "scene_prompts": ["the dog on a beach", "the chair in snow"],
        "edit": None,
        "parts": {},
    }


@pytest.mark.parametrize(
    ("reply", "needs_edit", "reason"),
    [
        ("no json here", False, "no JSON object"),
        ('{"prompt": "a dog", "scenes": [', False, "no JSON object"),
        ('{"prompt": "a dog" "scenes": []}', False, "not valid JSON"),
        ('{"scenes": ["a", "b"]}', False, "no 'prompt' string"),
        ('{"prompt": "a dog and a chair", "scenes": ["a"]}', False, "needs 'scenes' with 2 strings"),
        ('{"prompt": "a dog alone", "scenes": ["a", "b"]}', False, "does not name ['chair']"),
        ('{"prompt": "a dog and a chair", "scenes": ["a", "b"], "edit": ""}', True, "no 'edit' instruction"),
    ],
)
def test_parse_prompt_json_rejects_with_reasons(reply, needs_edit, reason):
    out = parse_prompt_json(reply, ["dog", "chair"], needs_edit=needs_edit)
    assert isinstance(out, str) and reason in out


def test_template_prompter_is_seeded_per_record():
    p = TemplatePrompter(edited_kinds=["attribute"])
    plans = [
        {"seed": s, "kind": k, "categories": ["dog", "cup"]}
        for s, k in [(1, "attribute"), (2, "position"), (1, "attribute")]
    ]
    a, b, c = p.write(plans)
    assert a == c and a != b
    assert a["edit"].startswith("Make the") and a["parts"]["modifier"]["text"] not in a["prompt"]
    assert b["parts"]["relation"] in b["prompt"]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return save_tiny_causal_lm(tmp_path_factory.mktemp("lm"))


def test_causal_lm_prompter_loads_locally_and_rejects_noise(lm_dir, tmp_path):
    prompter = CausalLMPrompter(str(lm_dir), max_new_tokens=12, dtype="float32", edited_kinds=["attribute"])
    plans = [
        {"seed": 1, "kind": "attribute", "categories": ["dog", "cup"]},
        {"seed": 2, "kind": "three", "categories": ["a", "b", "c"]},
    ]
    assert "Subjects: dog, cup" in prompter.request(plans[0]) and prompter.request(plans[0]).endswith(
        "assistant: "
    )
    replies = prompter.write(plans)
    assert all(isinstance(r, str) and r.startswith("language model reply") for r in replies)
    # through the stage: every record rejected with the reason, none lost
    run_stages(tmp_path, ["plan"], plan={"num_records": 3})
    spec = {
        "_target_": "data_pipeline.models.text.CausalLMPrompter",
        "path": str(lm_dir),
        "max_new_tokens": 12,
        "dtype": "float32",
    }
    s = run_stages(tmp_path, ["prompts"], prompts={"model": spec, "batch_size": 2})["prompts"]
    assert (s["accepted"], s["rejected"]) == (0, 3)
    assert all(
        r["reason"].startswith("prompts: language model reply")
        for r in read_stage_output(tmp_path, "prompts")[1]
    )


def test_missing_local_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"paths.lm={tmp_path / 'nope'}: cannot load"):
        CausalLMPrompter(str(tmp_path / "nope"))


def test_vision_language_instructor_loads_locally_and_rejects_noise(tmp_path):
    vlm = save_tiny_vlm(tmp_path / "vlm")
    inst = VisionLanguageInstructor(str(vlm), max_new_tokens=6, dtype="float32")
    images = [Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (96, 48), (0, 0, 255))]
    out = inst.instruct(images, [{"categories": ["dog", "cat"]}, {"categories": ["cup", "hat", "book"]}])
    assert [text for text, _ in out] == [None, None]
    assert out[0][1].startswith("vision-language instruction does not name ['dog', 'cat']")
    # through the stage
    Image.new("RGB", (32, 32)).save(tmp_path / "t.png")
    rec = {
        "index": 0,
        "id": "r0",
        "seed": 0,
        "kind": "three",
        "categories": ["dog"],
        "target": "t.png",
        "scores": {},
        "provenance": {},
    }
    publish(tmp_path, "edit", [rec])
    spec = {
        "_target_": "data_pipeline.models.text.VisionLanguageInstructor",
        "path": str(vlm),
        "max_new_tokens": 4,
        "dtype": "float32",
    }
    run_stages(tmp_path, ["instruct"], instruct={"model": spec})
    (row,) = read_stage_output(tmp_path, "instruct")[1]
    assert row["reason"].startswith("instruct: vision-language")
    assert json.loads(json.dumps(row))["record"]["id"] == "r0"


def test_sampled_prompts_do_not_depend_on_batch_company(lm_dir):
    """With sampling, a record's text comes from its own seed: the same alone, second in a batch, or
    next to other records (so re-sharding or another batch size does not change the dataset)."""
    prompter = CausalLMPrompter(
        str(lm_dir), max_new_tokens=12, dtype="float32", do_sample=True, temperature=1.0
    )
    a = {"seed": 11, "kind": "position", "categories": ["dog", "cup"]}
    b = {"seed": 12, "kind": "three", "categories": ["a", "b", "c"]}
    c = {"seed": 13, "kind": "position", "categories": ["cat", "vase"]}
    alone = prompter.write([b])[0]
    assert prompter.write([a, b])[1] == alone
    assert prompter.write([c, a, b])[2] == alone
    assert prompter.write([a])[0] != prompter.write([c])[0]  # and the seed does matter
