"""conf/reward/*.yaml: documented, composable by Hydra, keys equal to constructor arguments and
defaults, and the weight-free ones build and run."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from rewards.base import RewardInputs, Subject
from rewards.cli import DEFAULT_CONFIG_DIR, reward_config

CONFIGS = sorted((DEFAULT_CONFIG_DIR / "reward").glob("*.yaml"))
NO_WEIGHTS = ("color", "tiny_psr")


def test_all_expected_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {
        "psr",
        "clip",
        "imagereward",
        "hps",
        "hpsv3",
        "face_identity",
        "pickscore",
        "spatial",
        "color",
        "tiny_psr",
        "weighted",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_is_documented_and_composes(path: Path):
    text = path.read_text()
    assert text.startswith("# "), f"{path.name} must begin with a comment saying what it is"
    assert "Used by:" in text.split("\n_target_")[0].split("\ndefaults")[0]
    cfg = reward_config(path.stem, [])
    assert "_target_" in cfg


def _check_node(node: DictConfig, where: str) -> None:
    from hydra._internal.utils import _locate

    target = _locate(node._target_)
    params = inspect.signature(target).parameters
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key in node:
        if key.startswith("_"):
            continue
        assert var_kw or key in params, f"{where}.{key} is not an argument of {node._target_}"
        value = node._get_node(key)
        if isinstance(value, DictConfig) and "_target_" in value:
            _check_node(value, f"{where}.{key}")
        elif (
            key in params
            and params[key].default is not inspect.Parameter.empty
            and not OmegaConf.is_missing(node, key)
            and not isinstance(value, DictConfig)
            and "${" not in str(value._value())  # env-var interpolations are paths, not defaults
        ):
            assert node[key] == params[key].default, (
                f"{where}.{key}={node[key]} differs from the default {params[key].default} of {node._target_}"
            )


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_keys_are_constructor_arguments_with_their_defaults(path: Path):
    cfg = reward_config(path.stem, [])
    if path.stem == "weighted":
        for name, sub in cfg.rewards.items():
            _check_node(sub, f"reward.rewards.{name}")
    else:
        _check_node(cfg, "reward")


def test_weighted_is_the_papers_composition():
    cfg = reward_config("weighted", [])
    assert dict(cfg.weights) == {"psr": 0.4, "semantic": 0.4, "preference": 0.2}
    assert cfg.rewards.psr._target_ == "rewards.subject_consistency.SubjectConsistencyReward"
    assert cfg.rewards.semantic._target_ == "rewards.text_alignment.clip_t"
    assert cfg.rewards.preference._target_ == "rewards.preference.hps_v21"


def test_real_model_configs_require_a_path():
    from omegaconf.errors import MissingMandatoryValue

    with pytest.raises(Exception) as err:  # noqa: PT011 - Hydra wraps or re-raises depending on the node
        instantiate(reward_config("psr", []))
    assert isinstance(err.value, MissingMandatoryValue) or "MissingMandatoryValue" in repr(err.value)
    assert "reward.detector.path" in str(err.value)


@pytest.mark.parametrize("name", NO_WEIGHTS)
def test_weight_free_configs_build_and_run(name):
    reward = instantiate(reward_config(name, []))
    refs = [torch.rand(3, 30, 30), torch.rand(3, 40, 20)]
    inputs = RewardInputs(
        ["a dog and a cat"] * 2, [refs, refs], [[Subject("dog", "dog"), Subject("cat", "cat")]] * 2
    )
    out = reward(torch.rand(2, 3, 64, 64), inputs)
    assert out["score"].shape == (2,) and torch.isfinite(out["score"]).all()


def test_device_and_dtype_reach_every_component():
    from rewards.cli import set_everywhere

    cfg = reward_config("weighted", [])
    set_everywhere(cfg, "device", "cuda:1")
    set_everywhere(cfg, "dtype", "bfloat16")
    for node in (
        cfg.rewards.psr.detector,
        cfg.rewards.psr.embedder,
        cfg.rewards.semantic,
        cfg.rewards.preference,
    ):
        assert node.device == "cuda:1" and node.dtype == "bfloat16"
    assert "device" not in cfg.rewards.psr  # only keys that exist are set
