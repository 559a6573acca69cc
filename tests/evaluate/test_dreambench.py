"""DreamBench (psr/evaluate/dreambench.py): the released ``prompts_and_classes.txt`` format, the
records built from it, and DINO / CLIP-I / CLIP-T against numpy on a small synthetic layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.evaluate.suite_fakes import MeanEmbedder

# the released file's format, shortened: two object prompts, two live prompts
TABLE = """Classes

subject_name,class
backpack,backpack
dog2,dog
bear_plushie,stuffed animal

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a cube shaped {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the snow'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token)
]
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dreambench")
    (root / "prompts_and_classes.txt").write_text(TABLE)
    rng = np.random.default_rng(0)
    for subject in ("backpack", "dog2", "bear_plushie"):
        (root / subject).mkdir()
        for k in range(3):
            arr = rng.integers(0, 256, size=(10 + k, 12, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / subject / f"{k:02d}.png")
    return root


def test_records_from_the_released_layout(dataset):
    from psr.evaluate.dreambench import load_dreambench

    train, heldout, root = load_dreambench(str(dataset))
    assert heldout == [] and root == dataset.resolve()
    assert [(s.id, s.instruction, s.kind) for s in train] == [
        ("backpack-00", "a backpack in the jungle", "object"),
        ("backpack-01", "a cube shaped backpack", "object"),
        ("dog2-00", "a dog in the snow", "live"),
        ("dog2-01", "a dog wearing a red hat", "live"),
        ("bear_plushie-00", "a stuffed animal in the jungle", "object"),
        ("bear_plushie-01", "a cube shaped stuffed animal", "object"),
    ]
    assert train[2].subjects[0].reference == "dog2/00.png"
    token = load_dreambench(str(dataset), token="sks", subjects=["dog2"])[0]
    assert [s.instruction for s in token] == ["a sks dog in the snow", "a sks dog wearing a red hat"]
    with pytest.raises(ValueError, match=r"data\.subjects: \['cat'\]"):
        load_dreambench(str(dataset), subjects=["cat"])
    with pytest.raises(FileNotFoundError, match="prompts_and_classes.txt"):
        load_dreambench(str(dataset / "dog2"))


def test_parser_names_a_missing_section():
    from psr.evaluate.dreambench import parse_prompts_and_classes

    with pytest.raises(ValueError, match="Live Subject Prompts"):
        parse_prompts_and_classes(TABLE.split("Live Subject Prompts")[0], "x.txt")


class PromptLength:
    """A stand-in CLIP-T: the prompt's length / 100."""

    def __call__(self, images, inputs):
        return {"score": torch.tensor([len(p) / 100 for p in inputs.prompts])}


def test_scores_are_mean_cosines_to_every_photograph(dataset):
    from psr.evaluate.dreambench import DreamBenchScorer
    from rewards.base import RewardInputs, Subject

    scorer = DreamBenchScorer(str(dataset), MeanEmbedder(), MeanEmbedder(), PromptLength())
    rng = np.random.default_rng(1)
    gen = rng.integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    images = torch.from_numpy(gen).permute(0, 3, 1, 2).float() / 255
    inputs = RewardInputs(
        ["a dog in the snow", "a backpack"],
        [[], []],
        [[Subject("dog2", "dog")], [Subject("backpack", "backpack")]],
    )
    out = scorer(images, inputs)

    def feats(arr: np.ndarray) -> np.ndarray:
        x = arr.astype(np.float64) / 255
        f = np.concatenate([x.mean((0, 1)), x.std((0, 1)), [arr.shape[0] / 10, arr.shape[1] / 10]])
        return f / np.linalg.norm(f)

    for b, subject in enumerate(("dog2", "backpack")):
        photos = [np.asarray(Image.open(p)) for p in sorted((dataset / subject).glob("*.png"))]
        expected = np.mean([feats(gen[b]) @ feats(p) for p in photos])
        assert float(out["dino"][b]) == pytest.approx(expected, abs=1e-6)
        assert float(out["clip_i"][b]) == pytest.approx(expected, abs=1e-6)
    assert out["clip_t"].tolist() == pytest.approx([0.17, 0.10])
    torch.testing.assert_close(out["score"], out["dino"])


def test_suite_config_composes(dataset):
    from psr.config import check_config, compose

    cfg = compose("eval", ["suite=dreambench", f"data.root={dataset}"])
    check_config(cfg, "eval")
    assert cfg.reward.root == str(dataset) and cfg.eval.samples_per_prompt == 4
