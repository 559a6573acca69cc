"""Loaders: real-model entry points load tiny checkpoints saved in the published layouts, offline, and
fail with the config key and the expected files named."""

from __future__ import annotations

import json

import pytest
import torch

from rewards import detectors, embedders, preference, testing, text_alignment
from rewards.base import RewardInputs, Subject
from rewards.loading import WeightsNotFoundError

LOADERS = [
    (detectors.grounding_dino, {}, "reward.detector.path", "config.json"),
    (detectors.owlv2, {}, "reward.detector.path", "config.json"),
    (embedders.dino_vits16, {}, "reward.embedder.path", "config.json"),
    (embedders.dinov2, {}, "reward.embedder.path", "config.json"),
    (embedders.clip_image, {}, "reward.embedder.path", "config.json"),
    (text_alignment.clip_t, {"model_name": "ViT-B-32"}, "reward.path", "open_clip_model.safetensors"),
    (preference.hps_v21, {}, "reward.path", "open_clip_model.safetensors"),
    (preference.pickscore, {}, "reward.path", "config.json"),
    (preference.imagereward, {"tokenizer_path": None}, "reward.path", "ImageReward.pt"),
]


@pytest.mark.parametrize(
    ("loader", "kwargs", "key", "expected"), LOADERS, ids=lambda x: getattr(x, "__name__", None)
)
@pytest.mark.parametrize("where", ["unset", "missing", "empty"])
def test_loaders_name_the_config_key_and_expected_files(tmp_path, loader, kwargs, key, expected, where):
    path = {"unset": "???", "missing": str(tmp_path / "nope"), "empty": str(tmp_path)}[where]
    if loader is preference.imagereward:
        testing.tiny_bert_tokenizer().save_pretrained(tmp_path / "bert")
        kwargs = {"tokenizer_path": str(tmp_path / "bert")}
    with pytest.raises(WeightsNotFoundError) as err:
        loader(path, **kwargs)
    message = str(err.value)
    assert key in message and expected in message and "Nothing is downloaded" in message


def test_hub_id_without_cache_is_a_clear_error():
    with pytest.raises(WeightsNotFoundError, match=r"reward\.detector\.path='some-org/not-in-cache'.*cache"):
        detectors.grounding_dino("some-org/not-in-cache")


def test_grounding_dino_and_dino_load_saved_checkpoints(tmp_path):
    det = testing.tiny_grounding_dino(0)
    det.model.save_pretrained(tmp_path / "gd")
    det.tokenizer.save_pretrained(tmp_path / "gd")
    loaded = detectors.grounding_dino(str(tmp_path / "gd"), size=256)
    emb = testing.tiny_dino(0)
    emb.model.save_pretrained(tmp_path / "dino")
    loaded_emb = embedders.dino_vits16(str(tmp_path / "dino"), resize=40, crop=32)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for a, b in zip(
        det.detect(images, [["dog"], ["cat", "dog"]]),
        loaded.detect(images, [["dog"], ["cat", "dog"]]),
        strict=True,
    ):
        assert len(a) > 0  # boxes in both images (12 and 17): the comparison is not empty vs empty
        assert torch.equal(a.labels, b.labels) and torch.allclose(a.boxes, b.boxes, atol=1e-4)
    assert torch.allclose(emb.embed(images), loaded_emb.embed(images), atol=1e-6)


def test_owlv2_and_pickscore_load_saved_checkpoints(tmp_path):
    owl = testing.tiny_owlv2(0)
    owl.model.save_pretrained(tmp_path / "owl")
    owl.tokenizer.save_pretrained(tmp_path / "owl")
    loaded = detectors.owlv2(str(tmp_path / "owl"), threshold=0.1)
    images = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    for a, b in zip(
        owl.detect(images, [["dog"], ["cup"]]), loaded.detect(images, [["dog"], ["cup"]]), strict=True
    ):
        assert len(a) > 0  # boxes in both images (11 and 13): the comparison is not empty vs empty
        assert torch.equal(a.labels, b.labels) and torch.allclose(a.boxes, b.boxes, atol=1e-4)
    pick = testing.tiny_pickscore(0)
    pick.model.save_pretrained(tmp_path / "pick")
    pick.tokenizer.save_pretrained(tmp_path / "tok")
    loaded_pick = preference.pickscore(str(tmp_path / "pick"), str(tmp_path / "tok"))
    inputs = RewardInputs.from_prompts(["a dog", "a cat"])
    assert torch.allclose(pick(images, inputs)["score"], loaded_pick(images, inputs)["score"], atol=1e-5)


def test_open_clip_rewards_load_checkpoints(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    model, _ = testing.tiny_open_clip(0)
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    local = tmp_path / "clip"
    local.mkdir()
    (local / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file(model.state_dict(), local / "open_clip_model.safetensors")
    clip = text_alignment.clip_t(model_name=f"local-dir:{local}")
    # HPS: a named architecture + a {"state_dict": ...} checkpoint, as HPS_v2.1_compressed.pt is
    (tmp_path / "arch").mkdir()
    (tmp_path / "arch" / "psr-test-tiny.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "arch")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "hps.pt")
    hps = preference.hps_v21(str(tmp_path / "hps.pt"), model_name="psr-test-tiny")
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    inputs = RewardInputs(["a dog", "a cat"], [[], []], [[Subject("dog", "dog")], []])
    expected = testing.tiny_clip_t(0)(images, inputs)["score"]
    assert torch.allclose(clip(images, inputs)["score"], expected, atol=1e-5)
    assert torch.allclose(hps(images, inputs)["score"], expected, atol=1e-5)
    with pytest.raises(ValueError, match="not an open_clip architecture"):
        text_alignment.clip_t(str(tmp_path / "hps.pt"), model_name="no-such-arch")
