"""The real-model route's configs, loaded from tiny checkpoints saved on disk: a user's local
checkpoints are the only difference (FLUX / FLUX Kontext in diffusers layout, Grounding DINO and
DINO in transformers layout)."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from pipeline_helpers import compose

from data_pipeline.images import to_tensor


@pytest.fixture(scope="module")
def real_route(tiny_checkpoint, tmp_path_factory):
    from rewards.testing import tiny_dino, tiny_grounding_dino

    root = tmp_path_factory.mktemp("checkpoints")
    gd = tiny_grounding_dino(0)
    gd.model.save_pretrained(root / "gd")
    gd.tokenizer.save_pretrained(root / "gd")
    tiny_dino(0).model.save_pretrained(root / "dino")
    return compose(
        [
            "device=cpu",
            "dtype=float32",
            f"paths.flux={tiny_checkpoint}",
            f"paths.kontext={tiny_checkpoint}",
            f"paths.grounding_dino={root / 'gd'}",
            f"paths.dino={root / 'dino'}",
            "target.model.height=64",
            "target.model.width=64",
            "target.model.num_inference_steps=2",
            "target.model.max_sequence_length=64",
            "references.model.input_size=64",
            "references.model.height=64",
            "references.model.width=64",
            "references.model.num_inference_steps=2",
            "references.model.max_sequence_length=64",
            "edit.model.num_inference_steps=2",
            "edit.model.max_sequence_length=64",
            "+crop.detector.size=256",  # the tiny Grounding DINO's input size
            "filter.reward.embedder.resize=40",
            "filter.reward.embedder.crop=32",
        ]
    )


def test_flux_configs_load_a_local_checkpoint_and_render(real_route):
    renderer = instantiate(real_route.target.model)
    (target,) = renderer.render(["a dog and a cup"], [0], [["dog", "cup"]])
    assert target.image.size == (64, 64)
    references = instantiate(real_route.references.model)
    (ref,) = references.edit([Image.new("RGB", (40, 24), (200, 10, 10))], ["place the dog on a beach"], [1])
    assert ref.size == (64, 64)
    editor = instantiate(real_route.edit.model)  # output size follows target.model (64 x 64 here)
    (edited,) = editor.edit([target.image], ["give the dog a hat"], [2], [[0.0, 0.0, 10.0, 10.0]])
    assert edited.size == (64, 64)


def test_detector_and_reward_configs_load_local_weights(real_route):
    detector = instantiate(real_route.crop.detector)
    image = to_tensor([Image.new("RGB", (64, 64), (120, 30, 30))])
    (dets,) = detector.detect(image, [["dog", "cup"]])
    assert dets.boxes.shape[1] == 4 and set(dets.labels.tolist()) <= {0, 1}
    reward = instantiate(real_route.filter.reward)
    from rewards.base import RewardInputs, Subject

    out = reward(
        image, RewardInputs(["x"], [[image[0], image[0]]], [[Subject("dog", "dog"), Subject("cup", "cup")]])
    )
    assert out["score"].shape == (1,) and torch.isfinite(out["score"]).all()


def test_missing_path_names_the_config_key():
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationToMissingValueError

    cfg = compose(["device=cpu"])
    with pytest.raises(InterpolationToMissingValueError, match="paths.kontext"):
        OmegaConf.to_container(cfg.references, resolve=True)
