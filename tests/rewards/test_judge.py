"""The VLM judge (rewards/judge.py): score parsing, the expected score, templates, the in-process
backend on a tiny random Qwen2.5-VL (batched = one by one; the logit mode against the model's own
logits), the same model served by ``transformers serve`` (identical greedy replies), and the server
client against a stub server (timeouts, garbage, dropped connections, retries, concurrency, API key)."""

from __future__ import annotations

import base64
import io
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rewards.base import RewardInputs
from rewards.judge import VLMJudge, expected_score, load_template, parse_score, parse_yes_no
from rewards.testing import StubChatServer, chat_reply, logprobs_reply

# ------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("[Thought]: a dog in a red hat. [Score]: 7", 7.0),
        ("[Thought]: fine.\n[Score]:8.5", 8.5),
        ("[Score]: 10", 10.0),
        ("[Score]: 0", 0.0),
        ("[Score]: 7.5.", 7.5),  # a sentence-ending period
        ("[Score]: 3 ... on reflection [Score]: 9", 3.0),  # the first match, as PSRBench's re.search
        ("[Thought]: looks right. Score: 8", None),  # no "[Score]:"
        ("[score]: 8", None),  # case-sensitive, as PSRBench's pattern
        ("[Score]: 11", None),  # out of range
        ("[Score]: 10.5", None),
        ("[Score]: -3", None),  # the pattern reads no sign
        ("[Score]: .", None),
        ("[Score]: 7..5", None),
        ("[Score]: seven", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_score(reply, expected):
    assert parse_score(reply) == expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Yes", 10.0),
        ("yes, it does.", 10.0),
        ("  NO.", 0.0),
        ("No", 0.0),
        ("Nope", None),
        ("It is yes", None),
        ("", None),
    ],
)
def test_parse_yes_no(reply, expected):
    assert parse_yes_no(reply) == expected


def test_expected_score_by_hand():
    # digits 0..9 only, "10" one token: P(3) = 0.2, P(7) = 0.3, P(10) = 0.1 -> (0.6 + 2.1 + 1.0) / 0.6
    digits = [0.0] * 10
    digits[3], digits[7] = 0.2, 0.3
    value, mass = expected_score(digits, ten=0.1)
    assert mass == pytest.approx(0.6) and value == pytest.approx(3.7 / 0.6)
    # "10" = "1" then "0": P("1") = 0.4 splits into P(1) = 0.4 * 0.75 = 0.3 and P(10) = 0.4 * 0.25 = 0.1
    digits = [0.0] * 10
    digits[1], digits[5] = 0.4, 0.1
    value, mass = expected_score(digits, zero_after_one=0.25)
    assert mass == pytest.approx(0.5) and value == pytest.approx((0.3 * 1 + 0.1 * 10 + 0.1 * 5) / 0.5)
    assert math.isnan(expected_score([0.0] * 10)[0])
    with pytest.raises(ValueError, match="P\\(0\\)..P\\(9\\)"):
        expected_score([0.1] * 9)


def test_templates(tmp_path):
    for name in ("psrbench_attribute", "psrbench_action", "psrbench_background", "psrbench_complex"):
        text = load_template(name)
        assert text.count("{description}") == 1
        assert "[Thought]:" in text and "[Score]:" in text and "Rule 4" in text
    assert (
        load_template("psrbench_three") == load_template("psrbench_four") == load_template("psrbench_complex")
    )
    assert "Yes or No" in load_template("yes_no")
    own = tmp_path / "mine.txt"
    own.write_text("Rate it 0-10 as [Score]: n. {description}")
    assert load_template(str(own)).endswith("{description}")
    with pytest.raises(ValueError, match="neither a shipped template"):
        load_template("psrbench_colour")
    own.write_text("no slot here")
    with pytest.raises(ValueError, match="mine.txt must contain the slot"):
        load_template(str(own))


def test_templates_ship_as_package_data():
    """The templates live inside the ``rewards`` package, so the package-data globs ship them."""
    from setuptools import find_namespace_packages

    import rewards

    root = Path(rewards.__file__).parent.parent
    assert "rewards.templates.judge" in find_namespace_packages(str(root), include=["rewards*"])
    shipped = {p.stem for p in (root / "rewards" / "templates" / "judge").glob("*.txt")}
    subsets = ("attribute", "action", "background", "complex")
    assert {f"psrbench_{s}" for s in subsets} | {"yes_no"} <= shipped


# ------------------------------------------------------------------------------------------ in-process


@pytest.fixture(scope="module")
def tiny_vl_path(tmp_path_factory):
    """A tiny random Qwen2.5-VL saved as a user's folder (model + processor).

    Random weights emit special tokens (<|video_pad|>, <|endoftext|>) mid-reply, which servers render
    differently (``transformers serve`` keeps them in the text, vLLM drops them); the saved generation
    config suppresses all but <|im_end|>, in both backends, so that replies compare as text."""
    from rewards.testing import QWEN_SPECIAL_TOKENS, tiny_qwen_vl

    model, processor = tiny_qwen_vl("qwen2_5_vl", seed=0)
    special = [t for t in QWEN_SPECIAL_TOKENS if t != "<|im_end|>"]
    model.generation_config.suppress_tokens = processor.tokenizer.convert_tokens_to_ids(special)
    path = tmp_path_factory.mktemp("tiny_qwen2_5_vl")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def local_judge(tiny_vl_path):
    return VLMJudge(path=tiny_vl_path, dtype="float32", max_new_tokens=12, batch_size=4)


def _images(n: int, seed: int = 0) -> list[torch.Tensor]:
    """Images of different sizes (so batches need padding), 8-bit exact."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(56, 56), (64, 96), (112, 84), (70, 70), (56, 112)]
    return [(torch.rand(3, *sizes[i % len(sizes)], generator=g) * 255).round() / 255 for i in range(n)]


REQUEST_TEXTS = ["a dog in a hat", "Rate the image: a cat to the left of a mug, on a table", "two birds"]


def test_batched_greedy_equals_one_by_one(local_judge):
    images = _images(3)
    requests = [[images[0]], [images[1], images[2]], []]  # one, two and no images
    batched = local_judge.complete(requests, REQUEST_TEXTS)
    alone = [local_judge.complete([r], [t])[0] for r, t in zip(requests, REQUEST_TEXTS, strict=True)]
    assert batched == alone
    assert all(isinstance(r, str) and r for r in batched)


def test_score_path_on_crafted_replies(local_judge, monkeypatch, caplog):
    replies = ["[Thought]: ok. [Score]: 7", "[Thought]: no score here", "[Score]: 12", "[Score]: 8.5."]
    monkeypatch.setattr(local_judge.local, "complete", lambda requests, **kw: replies[: len(requests)])
    images = torch.stack([_images(1)[0]] * 4)
    with caplog.at_level("WARNING", logger="rewards.judge"):
        out = local_judge(images, RewardInputs.from_prompts(["p"] * 4))
    raw = out["raw"].tolist()
    assert raw[0] == 7.0 and raw[3] == 8.5 and math.isnan(raw[1]) and math.isnan(raw[2])
    assert torch.allclose(out["score"], out["raw"] / 10, equal_nan=True)
    assert out["failed"].tolist() == [0.0, 1.0, 1.0, 0.0]
    assert {k: v.dtype for k, v in out.items()} == dict.fromkeys(("score", "raw", "failed"), torch.float32)
    assert "2 of 4 samples got no score" in caplog.text


def test_reward_sends_the_filled_template(local_judge, monkeypatch):
    seen = []

    def fake(requests, **kw):
        seen.extend(requests)
        return ["[Score]: 5"] * len(requests)

    monkeypatch.setattr(local_judge.local, "complete", fake)
    images = torch.stack(_images(2)[:1] * 2)
    attribute = local_judge.with_template("psrbench_attribute")
    assert attribute.local is local_judge.local  # the model is not loaded again
    attribute(images, RewardInputs.from_prompts(["a red hat", "a blue scarf"]))
    assert [len(imgs) for imgs, _ in seen] == [1, 1] and torch.equal(seen[1][0][0], images[1])
    assert seen[1][1] == load_template("psrbench_attribute").replace("{description}", "a blue scarf")


def _hand_answer_probs(path: str, image: torch.Tensor, text: str, prefill: str, first_token: int):
    """Softmax of the model's raw logits at the answer position and, after forcing ``first_token``,
    at the next one: two greedy steps of ``generate`` with a KV cache, independent of the judge's
    single forward over an appended token."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(
        path, local_files_only=True, dtype=torch.float32
    ).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    chat = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + prefill
    pil = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    enc = processor(text=[chat], images=[pil], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=2,
            do_sample=False,
            prefix_allowed_tokens_fn=lambda b, ids: [first_token],
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.logits[0][0].float().softmax(-1), out.logits[1][0].float().softmax(-1), processor.tokenizer


def test_logit_mode_equals_hand_computation(tiny_vl_path):
    judge = VLMJudge(
        path=tiny_vl_path, dtype="float32", mode="logit", template="psrbench_action", batch_size=2
    )
    images = _images(3)
    same = [im[:, :56, :56] for im in images]  # the reward scores a [B, 3, H, W] batch
    batch = torch.stack(same)
    prompts = ["a cat jumping", "a dog sitting next to a vase", "a bird"]
    out = judge(batch, RewardInputs.from_prompts(prompts))
    tok = judge.local.tokenizer
    one, zero = tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("0")
    assert len(tok("10", add_special_tokens=False)["input_ids"]) == 2  # the two-token "10" path
    for b in range(3):
        text = load_template("psrbench_action").replace("{description}", prompts[b])
        p, q, _ = _hand_answer_probs(tiny_vl_path, batch[b], text, "[Score]: ", one)
        digit = [float(p[tok.convert_tokens_to_ids(str(d))]) for d in range(10)]
        probs = {d: digit[d] for d in range(10)}
        probs[10] = digit[1] * float(q[zero])
        probs[1] = digit[1] * (1 - float(q[zero]))
        mass = sum(probs.values())
        value = sum(s * v for s, v in probs.items()) / mass
        assert out["raw"][b].item() == pytest.approx(value, rel=1e-4)
        assert out["answer_mass"][b].item() == pytest.approx(mass, rel=1e-4)
    assert out["failed"].sum() == 0 and torch.allclose(out["score"], out["raw"] / 10)

    yes_no = judge.with_template("yes_no")
    out = yes_no(batch[:1], RewardInputs.from_prompts(prompts[:1]))
    p, _, _ = _hand_answer_probs(
        tiny_vl_path, batch[0], load_template("yes_no").replace("{description}", prompts[0]), "", one
    )
    yes = sum(float(p[tok.convert_tokens_to_ids(t)]) for t in ("Yes", "yes"))
    no = float(p[tok.convert_tokens_to_ids("No")])  # "no" is two tokens in the tiny vocabulary
    assert out["raw"][0].item() == pytest.approx(10 * yes / (yes + no), rel=1e-4)


def test_config_errors(tiny_vl_path):
    with pytest.raises(ValueError, match="mode='greedy'"):
        VLMJudge(path=tiny_vl_path, mode="greedy")
    with pytest.raises(ValueError, match="backend='vllm'"):
        VLMJudge("vllm")
    with pytest.raises(ValueError, match="needs model"):
        VLMJudge("openai", base_url="http://127.0.0.1:9/v1")
    with pytest.raises(ValueError, match="base_url is not set"):
        VLMJudge("openai", model="m", base_url="???")
    with pytest.raises(FileNotFoundError, match="path="):
        VLMJudge(path="/does/not/exist")


# ------------------------------------------------------------------------------------------ served


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(tiny_vl_path):
    """``transformers serve`` on localhost, pinned to the tiny model's folder, offline, on the CPU."""
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
    if exe is None:
        pytest.skip("the `transformers` CLI is not installed (pip install 'transformers[serving]')")
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [exe, "serve", tiny_vl_path, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    cmd += ["--dtype", "float32"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import httpx

    deadline = time.monotonic() + 240
    while True:
        if proc.poll() is not None:
            pytest.fail(f"transformers serve exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("transformers serve did not answer /health within 240 s")
        time.sleep(0.5)
    yield f"http://127.0.0.1:{port}/v1"
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.mark.slow
def test_served_greedy_replies_equal_in_process(served, local_judge, tiny_vl_path):
    client = VLMJudge(
        "openai",
        base_url=served,
        model=tiny_vl_path,
        max_new_tokens=12,
        timeout=120,
        retries=0,
        concurrency=2,
    )
    images = _images(3)
    requests = [[images[0]], [images[1], images[2]]]
    texts = REQUEST_TEXTS[:2]
    assert client.complete(requests, texts) == local_judge.complete(requests, texts)


# ------------------------------------------------------------------------------------------ client


def _client(url: str, **kw) -> VLMJudge:
    kw = {"timeout": 5.0, "retries": 2, "backoff": 0.01, "max_backoff": 0.05, "concurrency": 4, **kw}
    return VLMJudge("openai", base_url=url, model="judge", **kw)


def _inputs(n: int) -> tuple[torch.Tensor, RewardInputs]:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(n)), RewardInputs.from_prompts(
        [f"prompt {i}" for i in range(n)]
    )


def test_client_sends_psrbench_message_and_parses():
    with StubChatServer(lambda body, h: (200, chat_reply("[Thought]: fine [Score]: 6"))) as stub:
        images, inputs = _inputs(2)
        out = _client(stub.base_url, temperature=0.2, max_new_tokens=64)(images, inputs)
    assert out["raw"].tolist() == [6.0, 6.0] and out["failed"].tolist() == [0.0, 0.0]
    body = sorted(stub.bodies, key=lambda b: b["messages"][0]["content"][1]["text"])[1]
    assert body["model"] == "judge" and body["temperature"] == 0.2 and body["max_tokens"] == 64
    (message,) = body["messages"]
    image_part, text_part = message["content"]  # the image first, then the text, one user message
    assert message["role"] == "user" and text_part["text"].endswith("[Prompt]: prompt 1")
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    assert np.array_equal(decoded, (images[1].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def test_client_logit_mode_against_stub():
    """vLLM's layout: the first request (prefilled "[Score]: ") returns P(first token); "10" is not a
    token, so a second request prefilled "[Score]: 1" returns P("0" | "1")."""

    def respond(body, headers):
        assert body["logprobs"] is True and body["max_tokens"] == 1 and body["top_logprobs"] == 5
        assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
        prefill = body["messages"][-1]["content"]
        if prefill == "[Score]: ":
            return 200, logprobs_reply({"7": 0.5, " 8": 0.2, "1": 0.1, "[": 0.15, "Score": 0.05})
        assert prefill == "[Score]: 1"
        return 200, logprobs_reply({"0": 0.6, ".": 0.3, "\n": 0.1})

    with StubChatServer(respond) as stub:
        images, inputs = _inputs(1)
        out = _client(stub.base_url, mode="logit", top_logprobs=5)(images, inputs)
    # P(7) = 0.5, P(8) = 0.2, P(1) = 0.1 * 0.4 = 0.04, P(10) = 0.1 * 0.6 = 0.06; mass 0.8
    expected = (7 * 0.5 + 8 * 0.2 + 1 * 0.04 + 10 * 0.06) / 0.8
    assert out["raw"].item() == pytest.approx(expected, rel=1e-6)
    assert out["answer_mass"].item() == pytest.approx(0.8, rel=1e-6) and out["failed"].item() == 0
    assert len(stub.bodies) == 2


def test_client_logit_mode_without_logprobs_fails_loudly():
    # what `transformers serve` does: it ignores logprobs and answers with text only
    with StubChatServer(lambda body, h: (200, chat_reply("7"))) as stub:
        out = _client(stub.base_url, mode="logit")(*_inputs(1))
    assert math.isnan(out["score"].item()) and out["failed"].item() == 1.0


def test_client_timeout_retries_then_nan_in_bounded_time():
    with StubChatServer(lambda body, h: (200, chat_reply("[Score]: 5")), delay=1.0) as stub:
        start = time.monotonic()
        out = _client(stub.base_url, timeout=0.2, retries=2)(*_inputs(1))
        elapsed = time.monotonic() - start
    assert math.isnan(out["score"].item()) and out["failed"].item() == 1.0
    assert len(stub.bodies) == 3  # the first attempt and 2 retries
    assert elapsed < 3 * 0.2 + 2 * 0.05 + 1.0  # attempts x timeout + backoffs + slack


@pytest.mark.parametrize(
    "payload",
    [b"<html>502 Bad Gateway</html>", {"choices": []}, {"choices": [{"message": {"content": None}}]}, [1, 2]],
)
def test_client_garbage_is_nan_without_retry(payload):
    with StubChatServer(lambda body, h: (200, payload)) as stub:
        out = _client(stub.base_url)(*_inputs(1))
    assert math.isnan(out["score"].item()) and out["failed"].item() == 1.0
    assert len(stub.bodies) == 1


def test_client_refused_request_is_nan_without_retry():
    with StubChatServer(lambda body, h: (400, {"error": "image too large"})) as stub:
        out = _client(stub.base_url)(*_inputs(1))
    assert out["failed"].item() == 1.0 and len(stub.bodies) == 1


def test_client_dropped_connection_retries_then_nan():
    with StubChatServer(lambda body, h: (200, "drop")) as stub:
        out = _client(stub.base_url, retries=1)(*_inputs(1))
    assert out["failed"].item() == 1.0 and len(stub.bodies) == 2


def test_client_retries_429_and_500_then_succeeds():
    statuses = [429, 500, 200]

    def respond(body, headers):
        status = statuses.pop(0)
        return status, chat_reply("[Score]: 9") if status == 200 else {"error": "busy"}

    with StubChatServer(respond) as stub:
        out = _client(stub.base_url, retries=2)(*_inputs(1))
    assert out["raw"].item() == 9.0 and out["failed"].item() == 0.0 and len(stub.bodies) == 3


def test_client_concurrency_bound():
    with StubChatServer(lambda body, h: (200, chat_reply("[Score]: 4")), delay=0.2) as stub:
        out = _client(stub.base_url, concurrency=3)(*_inputs(8))
    assert out["raw"].tolist() == [4.0] * 8
    assert stub.max_active == 3


def test_client_api_key_is_sent_and_never_shown(monkeypatch, caplog):
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("PSR_TEST_JUDGE_KEY", secret)
    with StubChatServer(lambda body, h: (401, {"error": f"invalid key {secret}"})) as stub:
        judge = _client(stub.base_url, api_key_env="PSR_TEST_JUDGE_KEY")
        with caplog.at_level("WARNING", logger="rewards.judge"):
            out = judge(*_inputs(1))
    assert stub.headers[0]["authorization"] == f"Bearer {secret}"
    assert out["failed"].item() == 1.0
    assert "HTTP 401" in caplog.text and secret not in caplog.text
    assert secret not in repr(judge) and secret not in repr(judge.client) and secret not in str(vars(judge))
    with StubChatServer(lambda body, h: (200, chat_reply("[Score]: 1"))) as stub:
        _client(stub.base_url, api_key_env="PSR_UNSET_KEY_VARIABLE")(*_inputs(1))
    assert "authorization" not in stub.headers[0]


def test_client_decoded_with_prefill_parses_prefill_and_reply():
    def respond(body, headers):
        assert body["messages"][-1] == {"role": "assistant", "content": "[Score]: "}
        assert body["continue_final_message"] is True and "logprobs" not in body
        return 200, chat_reply("8")

    with StubChatServer(respond) as stub:
        out = _client(stub.base_url, prefill="[Score]: ", max_new_tokens=3)(*_inputs(1))
    assert out["raw"].item() == 8.0 and stub.bodies[0]["max_tokens"] == 3


def test_config_builds_a_weighted_component(tiny_vl_path):
    """conf/reward/judge.yaml with a local path, inside a WeightedReward next to another reward."""
    from hydra.utils import instantiate

    from rewards.base import WeightedReward
    from rewards.cli import reward_config

    cfg = reward_config("judge", [f"path={tiny_vl_path}", "dtype=float32", "mode=logit", "batch_size=2"])
    judge = instantiate(cfg)
    assert isinstance(judge, VLMJudge) and judge.prefill == "[Score]: "

    def constant(images, inputs):
        return {"score": torch.ones(images.shape[0])}

    weighted = WeightedReward({"semantic": judge, "other": constant}, {"semantic": 0.4, "other": 0.6})
    images, inputs = torch.rand(2, 3, 56, 56), RewardInputs.from_prompts(["a dog", "a cat"])
    out = weighted(images, inputs)
    semantic = out["semantic/score"]
    assert torch.allclose(out["score"], 0.4 * semantic + 0.6) and set(out) >= {
        "semantic/failed",
        "semantic/raw",
    }


def test_qwen3_vl_in_process(tmp_path):
    """The Qwen3-VL classes through the same path: batched greedy = one by one, logit = hand computation."""
    from rewards.testing import tiny_qwen3_vl

    model, processor = tiny_qwen3_vl(seed=0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    judge = VLMJudge(path=str(tmp_path), dtype="float32", max_new_tokens=6, batch_size=4)
    assert type(judge.local.model).__name__ == "Qwen3VLForConditionalGeneration"
    images = [im[:, :64, :64] for im in _images(2)] + [torch.rand(3, 96, 64)]
    requests, texts = [[images[0]], [images[1]], [images[2]]], REQUEST_TEXTS
    assert judge.complete(requests, texts) == [
        judge.complete([r], [t])[0] for r, t in zip(requests, texts, strict=True)
    ]
    logit = VLMJudge(path=str(tmp_path), dtype="float32", mode="logit", template="yes_no")
    out = logit(images[0][None], RewardInputs.from_prompts(["a dog"]))
    tok = logit.local.tokenizer
    p, _, _ = _hand_answer_probs(
        str(tmp_path), images[0], load_template("yes_no").replace("{description}", "a dog"), "", 0
    )
    yes = sum(float(p[tok.convert_tokens_to_ids(t)]) for t in ("Yes", "yes"))
    no = float(p[tok.convert_tokens_to_ids("No")])
    assert out["raw"].item() == pytest.approx(10 * yes / (yes + no), rel=1e-4)


def test_client_decoded_yes_no():
    replies = iter(["Yes, it does.", "No.", "Maybe"])
    with StubChatServer(lambda body, h: (200, chat_reply(next(replies)))) as stub:
        judge = _client(stub.base_url, template="yes_no", concurrency=1)
        out = judge(*_inputs(3))
    assert (
        judge.answer == "yes_no"
        and out["raw"][:2].tolist() == [10.0, 0.0]
        and out["failed"].tolist() == [0, 0, 1]
    )
    assert stub.bodies[0]["messages"][0]["content"][1]["text"].endswith("Answer with one word, Yes or No.")
