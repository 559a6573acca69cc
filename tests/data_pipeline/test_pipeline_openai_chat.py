"""Prompt and instruction writers behind an OpenAI-compatible server (data_pipeline/models/openai_chat.py),
against the stub server of rewards.testing: the requests sent, replies parsed or rejected with reasons,
failed requests rejecting their records, and the pipeline configs composing into them."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
from hydra.utils import instantiate
from PIL import Image
from pipeline_helpers import compose, publish, run_stages

from data_pipeline.models.openai_chat import OpenAIInstructor, OpenAIPrompter
from data_pipeline.shards import read_stage_output
from rewards.testing import StubChatServer, chat_reply

GOOD = {
    "prompt": "A dog next to a cup on a table",
    "scenes": ["the dog on a beach", "the cup in snow"],
    "edit": None,
}


def test_prompter_sends_the_request_and_parses_replies():
    def respond(body, headers):
        (message,) = body["messages"]
        if "dog" in message["content"]:
            return 200, chat_reply("Here: " + json.dumps(GOOD))
        return 200, chat_reply("no json")

    with StubChatServer(respond) as stub:
        prompter = OpenAIPrompter(stub.base_url, "lm", max_new_tokens=64, temperature=0.7, retries=0)
        plans = [
            {"seed": 5, "kind": "position", "categories": ["dog", "cup"]},
            {"seed": 6, "kind": "three", "categories": ["a", "b", "c"]},
        ]
        good, bad = prompter.write(plans)
    assert good == {**{k: GOOD[k] for k in ("prompt", "edit")}, "scene_prompts": GOOD["scenes"], "parts": {}}
    assert isinstance(bad, str) and bad.startswith("language model reply has no JSON object")
    body = next(b for b in stub.bodies if "dog" in b["messages"][0]["content"])
    assert body["model"] == "lm" and body["max_tokens"] == 64 and body["temperature"] == 0.7
    assert body["seed"] == 5 and body["messages"][0]["content"] == prompter.request(plans[0])
    assert "Subjects: dog, cup" in body["messages"][0]["content"]


def test_failed_requests_reject_their_records():
    with StubChatServer(lambda body, h: (503, {"error": "overloaded"})) as stub:
        prompter = OpenAIPrompter(stub.base_url, "lm", retries=1)
        prompter.client.backoff = 0.01
        (out,) = prompter.write([{"seed": 1, "kind": "three", "categories": ["a", "b", "c"]}])
    assert (
        out.startswith("language model request failed: HTTP 503 after 2 attempts") and len(stub.bodies) == 2
    )


def test_instructor_sends_the_image_and_checks_names(tmp_path):
    def respond(body, headers):
        text = body["messages"][0]["content"][1]["text"]
        return 200, chat_reply("  Show the dog   next to the cat on a sofa. " if "dog" in text else "A sofa.")

    red = Image.new("RGB", (40, 24), (200, 10, 30))
    with StubChatServer(respond) as stub:
        inst = OpenAIInstructor(stub.base_url, "vlm", retries=0)
        out = inst.instruct([red, red], [{"categories": ["dog", "cat"]}, {"categories": ["cup", "hat"]}])
        assert out[0] == ("Show the dog next to the cat on a sofa.", None)
        assert out[1][0] is None and out[1][1].startswith(
            "vision-language instruction does not name ['cup', 'hat']"
        )
        url = stub.bodies[0]["messages"][0]["content"][0]["image_url"]["url"]
        sent = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
        assert np.array_equal(sent, np.asarray(red))
        # through the stage, from the config group
        cfg = compose(
            ["instructor=openai", f"instruct.model.base_url={stub.base_url}", "instruct.model.model=vlm"]
        )
        assert isinstance(instantiate(cfg.instruct.model), OpenAIInstructor)
        red.save(tmp_path / "t.png")
        rec = {"index": 0, "id": "r0", "seed": 0, "kind": "three", "categories": ["dog", "cat"]}
        publish(tmp_path, "edit", [{**rec, "target": "t.png", "scores": {}, "provenance": {}}])
        run_stages(tmp_path, ["instruct"], instruct={"model": dict(cfg.instruct.model)})
    (row,) = read_stage_output(tmp_path, "instruct")[0]
    assert row["instruction"] == "Show the dog next to the cat on a sofa."


def test_prompter_config_composes():
    cfg = compose(
        ["prompter=openai", "prompts.model.base_url=http://127.0.0.1:9/v1", "prompts.model.model=lm"]
    )
    prompter = instantiate(cfg.prompts.model, edited_kinds=["attribute"])
    assert isinstance(prompter, OpenAIPrompter) and prompter.edited_kinds == ("attribute",)
    assert prompter.client.url == "http://127.0.0.1:9/v1/chat/completions"
