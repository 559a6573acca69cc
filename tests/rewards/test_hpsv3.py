"""HPSv3 on a tiny random Qwen2-VL written in the published checkpoint layout (rewards.testing) and
loaded the way a user does, through conf/reward/hpsv3.yaml. The reference is the published inference
written out here: PIL bicubic resize and the processor's own rescaling, transformers' ``Qwen2VLModel``
holding the checkpoint's tensors under its own names, the decoder run with positions 0..N-1, the
state at ``<|Reward|>`` and the head's three linear layers applied by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from PIL import Image
from safetensors.torch import load_file, save_file

from rewards import testing
from rewards.base import RewardInputs
from rewards.cli import reward_config
from rewards.loading import WeightsNotFoundError
from rewards.preference import HPSV3_REWARD_TOKEN, hpsv3

PROMPTS = ["a corgi wearing a chef's hat", "two cats on a sofa", "a red mug on a wooden table, morning light"]
PIXELS = 56 * 84
# 48 x 96 images with min = max = 56 * 84 pixels: both sides rounded to multiples of 28 give 56 x 84,
# within the budget (4 x 6 patches of 14 px, 6 tokens after the 2 x 2 merge). The processor's own
# resize (at least 56 * 56 pixels) then leaves it alone, as it leaves the published 448 x 448.
H, W, RESIZED = 48, 96, (56, 84)


def _images(b: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(
        torch.rand(b, 3, 6, 6, generator=g), size=(H, W), mode="bilinear", align_corners=False
    )


def _load(base, checkpoint, instruction, *overrides: str):
    cfg = reward_config(
        "hpsv3",
        [
            f"path={base}",
            f"checkpoint={checkpoint}",
            f"instruction={instruction}",
            "dtype=float32",
            f"min_pixels={PIXELS}",
            f"max_pixels={PIXELS}",
            *overrides,
        ],
    )
    return instantiate(cfg)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    return testing.tiny_hpsv3_checkpoint(tmp_path_factory.mktemp("hpsv3"), seed=0)


@pytest.fixture(scope="module")
def reward(published):
    return _load(*published)


@pytest.fixture(scope="module")
def reference(published):
    """``f(batch) -> [B, 2]`` and ``encode(images, prompts) -> batch``: the published inference."""
    from transformers import AutoProcessor, Qwen2VLModel

    base, checkpoint, instruction = published
    template = instruction.read_text(encoding="utf-8")  # the user turn, {prompt} filled below
    sd = load_file(str(checkpoint))
    config = testing.tiny_qwen_vl_config("qwen2_vl")  # the in-code config, not the flat config.json
    config.text_config.vocab_size = sd["model.embed_tokens.weight"].shape[0]
    qwen = Qwen2VLModel(config).eval()
    backbone = {k: v for k, v in sd.items() if not k.startswith(("rm_head.", "lm_head."))}
    # published names: visual.* is Qwen2VLModel's visual.*, model.* its language_model.*
    qwen.load_state_dict(
        {
            ("language_model." + k[len("model.") :] if k.startswith("model.") else k): v
            for k, v in backbone.items()
        },
        strict=True,
    )
    processor = AutoProcessor.from_pretrained(base, local_files_only=True, padding_side="right")
    processor.tokenizer.add_special_tokens({"additional_special_tokens": [HPSV3_REWARD_TOKEN]})
    reward_id = processor.tokenizer.convert_tokens_to_ids(HPSV3_REWARD_TOKEN)

    def encode(images, prompts):
        pil = [
            Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).resize(
                RESIZED[::-1], Image.Resampling.BICUBIC
            )
            for im in images
        ]
        turns = [
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": p},
                        {"type": "text", "text": template.replace("{prompt}", t)},
                    ],
                }
            ]
            for p, t in zip(pil, prompts, strict=True)
        ]
        text = processor.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return processor(text=text, images=pil, padding=True, return_tensors="pt")

    @torch.no_grad()
    def forward(batch):
        ids = batch["input_ids"]
        positions = torch.arange(ids.shape[1]).expand_as(ids)  # the published decoder's positions
        hidden = qwen(
            input_ids=ids,
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            position_ids=positions,
        ).last_hidden_state
        at = [int((row == reward_id).nonzero()) for row in ids]
        h = hidden[torch.arange(len(at)), at]  # [B, D]
        h = F.relu(F.linear(h, sd["rm_head.0.weight"], sd["rm_head.0.bias"]))
        h = F.relu(F.linear(h, sd["rm_head.3.weight"], sd["rm_head.3.bias"]))
        return F.linear(h, sd["rm_head.5.weight"], sd["rm_head.5.bias"])  # [B, 2]: mu, log sigma

    return encode, forward


def test_hpsv3_equals_the_published_forward(reward, reference):
    encode, forward = reference
    images = _images()
    ours = reward.encode(images, PROMPTS)
    theirs = encode(images, PROMPTS)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert ours["image_grid_thw"].tolist() == [[1, RESIZED[0] // 14, RESIZED[1] // 14]] * 3
    # PIL's 8-bit bicubic vs ours on floats, in CLIP-normalized units (1/255 is 0.015 of them)
    assert (ours["pixel_values"] - theirs["pixel_values"]).abs().max() < 0.1
    # the model on the same inputs: positions, image scatter, reward-token state, head; float rounding
    expected = forward(ours)
    assert torch.allclose(reward.model(**ours), expected, atol=1e-5)
    out = reward(images, RewardInputs.from_prompts(PROMPTS))
    assert set(out) == {"score", "raw", "sigma"}
    assert torch.allclose(out["raw"], expected[:, 0], atol=1e-5)
    assert torch.allclose(out["sigma"], expected[:, 1].exp(), atol=1e-5)
    assert torch.equal(out["score"], out["raw"])  # scale 1
    # the whole published path, its own preprocessing included: measured 3e-4 apart (8-bit PIL
    # pixels), while the three images' scores spread over 2e-2
    published = forward(theirs)[:, 0]
    assert torch.allclose(out["raw"], published, atol=1e-3)
    assert (published.max() - published.min()) > 1e-2
    same_prompt = reward(images, RewardInputs.from_prompts([PROMPTS[0]] * 3))["raw"]
    assert same_prompt.max() - same_prompt.min() > 10 * 2e-4


def test_hpsv3_batch_equals_one_by_one_and_scale(published, reward):
    images = _images()
    batched = reward(images, RewardInputs.from_prompts(PROMPTS))
    for i in range(3):
        alone = reward(images[i : i + 1], RewardInputs.from_prompts(PROMPTS[i : i + 1]))
        for key in ("raw", "sigma"):
            assert torch.allclose(alone[key], batched[key][i : i + 1], atol=1e-5), key
    scaled = _load(*published, "scale=0.1")(images, RewardInputs.from_prompts(PROMPTS))
    assert torch.allclose(scaled["score"], 0.1 * batched["raw"], atol=1e-6)
    assert torch.allclose(scaled["raw"], batched["raw"], atol=1e-6)


def test_hpsv3_depends_on_the_prompt(reward):
    image = _images(1).expand(2, -1, -1, -1)
    raw = reward(image, RewardInputs.from_prompts([PROMPTS[0], PROMPTS[1]]))["raw"]
    assert (raw[0] - raw[1]).abs() > 1e-4, raw  # float noise is ~1e-7


def test_hpsv3_reads_the_nested_layout(published, reward, tmp_path):
    """A checkpoint re-saved by transformers >= 4.52 (model.visual.*, model.language_model.*)."""
    sd = load_file(str(published[1]))
    nested = {
        ("model." + k if k.startswith("visual.") else k.replace("model.", "model.language_model.", 1)): v
        for k, v in sd.items()
    }
    save_file(nested, str(tmp_path / "HPSv3.safetensors"))
    other = _load(published[0], tmp_path, published[2])  # a directory holding HPSv3.safetensors
    images = _images()
    inputs = RewardInputs.from_prompts(PROMPTS)
    assert torch.equal(other(images, inputs)["raw"], reward(images, inputs)["raw"])


def _error(base, checkpoint, instruction, error=WeightsNotFoundError) -> str:
    """The loader's message (called directly: Hydra would wrap the error in its own)."""
    with pytest.raises(error) as info:
        hpsv3(str(base), str(checkpoint), str(instruction), dtype="float32")
    return str(info.value)


def test_hpsv3_instruction_file_is_required_and_checked(published, tmp_path):
    base, checkpoint, _ = published
    msg = _error(base, checkpoint, tmp_path / "none.txt", FileNotFoundError)
    assert "reward.instruction" in msg and "none.txt" in msg
    bad = tmp_path / "bad.txt"
    bad.write_text("Rate {prompt} please", encoding="utf-8")  # no reward token
    msg = _error(base, checkpoint, bad, ValueError)
    assert "reward.instruction" in msg and HPSV3_REWARD_TOKEN in msg
    bad.write_text("{prompt} and {prompt} " + HPSV3_REWARD_TOKEN, encoding="utf-8")
    assert "{prompt} exactly once (found 2)" in _error(base, checkpoint, bad, ValueError)


def test_hpsv3_errors_name_the_file_keys_and_config_key(published, tmp_path):
    base, checkpoint, instruction = published

    def _weights_error(b, c) -> str:
        return _error(b, c, instruction)

    msg = _weights_error(base, tmp_path)  # an empty directory
    assert "reward.checkpoint" in msg and "HPSv3.safetensors" in msg
    msg = _weights_error(base, tmp_path / "nowhere.safetensors")
    assert "reward.checkpoint" in msg and "does not exist" in msg
    msg = _weights_error(tmp_path / "no-qwen", checkpoint)
    assert "reward.path" in msg and "Qwen2-VL-7B-Instruct" in msg

    sd = load_file(str(checkpoint))
    broken = tmp_path / "broken.safetensors"
    save_file({k: v for k, v in sd.items() if not k.startswith("rm_head.")}, str(broken))
    msg = _weights_error(base, broken)
    assert "reward.checkpoint" in msg and "missing 6 keys" in msg and "rm_head.0.weight" in msg
    save_file(sd | {"score_head.weight": torch.zeros(2, 64)}, str(broken))
    msg = _weights_error(base, broken)
    assert "reward.checkpoint" in msg and "score_head.weight" in msg
    save_file(sd | {"model.extra_norm.weight": torch.zeros(64)}, str(broken))
    msg = _weights_error(base, broken)  # a name under a known prefix that the model does not have
    assert "unexpected 1" in msg and "model.extra_norm.weight" in msg
    rows = {k: v[:-1] if k in ("model.embed_tokens.weight", "lm_head.weight") else v for k, v in sd.items()}
    save_file(rows, str(broken))  # embeddings without the <|Reward|> row
    msg = _weights_error(base, broken)
    assert "reward.checkpoint" in msg and "410 rows" in msg and "411 tokens" in msg
