"""Every primary composes with each of its presets and each option of each of its groups, and holds
only keys its run reads; the PSR presets carry the paper's settings; presets and site settings
(``conf/local/``) reach only the primary they are meant for; and the user's loading path
(``model=flux_kontext model.path=DIR``) trains on a saved tiny checkpoint."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from psr.config import (
    PRESET_PRIMARIES,
    ConfigError,
    LoraSettings,
    RLTrainSettings,
    check_config,
    conf_dir,
    expand_experiment,
    settings,
)
from psr.config import compose as psr_compose

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PRIMARIES = ("rl", "sft", "eval", "data")
NEEDS = {
    "psr_rl": ["model.path=/ckpt", "data.manifest=/m.jsonl"],
    "psr_sft": ["model.path=/ckpt", "data.manifest=/m.jsonl"],
}


def compose(name: str, *overrides: str, config_dir: Path | None = None, hydra: bool = False):
    """The primary as its console script composes it (same conf dir, ``experiment=NAME`` included)."""
    return psr_compose(name, overrides, config_dir=config_dir, return_hydra_config=hydra)


def presets(primary: str) -> list[str]:
    folder = conf_dir(primary) / "experiment"
    if primary in PRESET_PRIMARIES:
        folder = folder / primary
    return sorted(p.stem for p in folder.glob("*.yaml"))


def group_options(primary: str) -> list[tuple[str, str]]:
    """(override key, option) for every option of every group in the primary's defaults list."""
    root = conf_dir(primary)
    defaults = yaml.safe_load((root / f"{primary}.yaml").read_text())["defaults"]
    out = []
    for entry in defaults:
        if not isinstance(entry, dict):
            continue  # _self_
        (key,) = entry
        group = key.split("@")[0]
        if key.startswith("optional ") or group.startswith("experiment"):
            continue
        out += [(key, p.stem) for p in sorted((root / group).glob("*.yaml"))]
    return out


@pytest.mark.parametrize(
    ("primary", "experiment"), [(p, e) for p in PRIMARIES for e in presets(p)], ids=lambda v: str(v)
)
def test_every_preset_composes_and_holds_only_keys_its_primary_reads(primary, experiment):
    cfg = compose(primary, f"experiment={experiment}", *NEEDS.get(experiment, []))
    check_config(cfg, primary)


@pytest.mark.parametrize(
    ("primary", "key", "option"), [(p, k, o) for p in PRIMARIES for k, o in group_options(p)], ids=str
)
def test_every_group_option_composes_and_holds_only_keys_its_primary_reads(primary, key, option):
    check_config(compose(primary, f"{key}={option}"), primary)


def test_each_primary_has_its_own_presets():
    assert presets("rl") == ["psr_rl", "quickstart"]
    assert presets("sft") == ["psr_sft", "quickstart"]
    assert presets("eval") == ["quickstart"]
    assert not list((CONF / "experiment").glob("*.yaml"))  # every preset belongs to one primary
    assert compose("rl", "experiment=quickstart").train.group_size == 4
    assert compose("sft", "experiment=quickstart").dataset.resolution == 64
    assert compose("eval", "experiment=quickstart").eval.samples_per_prompt == 2
    assert expand_experiment("rl", ["experiment=psr_rl", "seed=1"]) == ["experiment/rl=psr_rl", "seed=1"]
    assert expand_experiment("data", ["experiment=quickstart"]) == ["experiment=quickstart"]


@pytest.mark.parametrize(("primary", "other"), [("rl", "psr_sft"), ("sft", "psr_rl")])
def test_a_preset_of_another_primary_cannot_be_picked(primary, other):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match=f"Could not find 'experiment/{primary}/{other}'"):
        compose(primary, f"experiment={other}")


@pytest.mark.parametrize(
    ("experiment", "primary"),
    [
        ("quickstart", "rl"),
        ("psr_rl", "rl"),
        ("quickstart", "sft"),
        ("psr_sft", "sft"),
        ("quickstart", "eval"),
    ],
)
def test_experiments_compose(primary, experiment):
    extra = ["model.path=/ckpt", "data.manifest=/m.jsonl"] if experiment.startswith("psr_") else []
    cfg = compose(primary, f"experiment={experiment}", *extra)
    assert cfg.model._target_.startswith("psr.models.builders.")


def test_psr_presets_carry_the_paper_settings():
    rl = compose("rl", "experiment=psr_rl", "model.path=/ckpt", "data.manifest=/m.jsonl")
    assert rl.optim.lr == 1e-5 and rl.train.lora.rank == 64 and rl.train.group_size == 6
    assert rl.sampler.num_steps == 28 and rl.algo._target_ == "psr.objectives.grpo.GRPOObjective"
    assert dict(rl.reward.weights) == {"psr": 0.4, "semantic": 0.4, "preference": 0.2}
    sft = compose("sft", "experiment=psr_sft", "model.path=/ckpt", "data.manifest=/m.jsonl")
    assert sft.optim.lr == 1e-4 and sft.train.lora.rank == 512 and sft.dataset.resolution == 512


# --- Stray keys fail, by full path, with the closest valid key -------------------------------------


def test_a_stray_section_key_is_named_with_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"train\.stepz: .*did you mean train\.steps\?"):
        check_config(compose("rl", "+train.stepz=3"), "rl")


def test_a_grpo_key_under_dpo_is_named():
    cfg = compose("rl", "algo=dpo", "+algo.advantage_clip=3")
    with pytest.raises(ConfigError, match=r"algo\.advantage_clip: not a key of psr\.objectives\.dpo"):
        check_config(cfg, "rl")
    check_config(compose("rl", "algo=dpo", "algo.beta=100"), "rl")  # its own keys pass


def test_every_stray_key_is_listed_at_once():
    cfg = compose(
        "sft", "+train.stepz=3", "+dataset.resolutoin=64", "+loader.workers=1", "+sampler.num_steps=3"
    )
    with pytest.raises(ConfigError) as err:
        check_config(cfg, "sft")
    assert [line.split(":")[0] for line in err.value.problems] == [
        "train.stepz",
        "dataset.resolutoin",
        "loader.workers",
        "sampler",
    ]
    assert "did you mean dataset.resolution?" in str(err.value) and "read by psr-rl" in str(err.value)


def test_a_key_of_another_primary_in_a_preset_fails(tmp_path):
    conf = copy_conf(tmp_path)
    (conf / "experiment" / "rl" / "stray.yaml").write_text(
        "# @package _global_\n# a psr-sft key in a psr-rl preset\ndataset:\n  resolution: 64\n"
    )
    with pytest.raises(ConfigError, match=r"dataset: not a key of psr-rl.*; read by psr-sft, not psr-rl"):
        check_config(compose("rl", "experiment=stray", config_dir=conf), "rl")


def test_a_wrong_type_and_a_missing_target_are_named():
    with pytest.raises(ConfigError, match=r"train\.group_size='six': expected int"):
        check_config(compose("rl", "train.group_size=six"), "rl")
    with pytest.raises(ConfigError, match=r"model: expected a node with _target_"):
        check_config(compose("rl", "~model._target_"), "rl")


def test_settings_builds_the_typed_section():
    train = settings(compose("rl", "experiment=quickstart").train, RLTrainSettings, "train")
    assert isinstance(train, RLTrainSettings) and isinstance(train.lora, LoraSettings)
    assert train.steps == 12 and train.lora.rank == 8 and isinstance(train.lora.targets, tuple)
    assert settings({}, RLTrainSettings, "train") == RLTrainSettings()  # the YAML's defaults
    with pytest.raises(ConfigError, match=r"train\.stepz: .*did you mean train\.steps\?"):
        settings({"stepz": 3}, RLTrainSettings, "train")
    with pytest.raises(ConfigError, match=r"train\.lora\.rank=1\.5: expected int"):
        settings({"lora": {"rank": 1.5}}, RLTrainSettings, "train")


# --- Site settings: conf/local/default.yaml wins, and must be global ------------------------------


def copy_conf(tmp_path: Path) -> Path:
    """A copy of conf/ without anyone's own local/ settings."""
    return Path(shutil.copytree(CONF, tmp_path / "conf", ignore=shutil.ignore_patterns("local")))


def test_local_settings_win_over_the_primary_and_its_preset(tmp_path):
    conf = copy_conf(tmp_path)
    (conf / "local").mkdir()
    (conf / "local" / "default.yaml").write_text("# @package _global_\nseed: 7\ntrain:\n  steps: 3\n")
    for overrides in ([], ["experiment=quickstart"]):
        cfg = compose("rl", *overrides, config_dir=conf)
        assert cfg.seed == 7 and cfg.train.steps == 3
        check_config(cfg, "rl")
    assert compose("rl", "train.steps=5", config_dir=conf).train.steps == 5  # the command line wins last


def test_local_settings_without_the_global_package_are_named(tmp_path):
    conf = copy_conf(tmp_path)
    (conf / "local").mkdir()
    (conf / "local" / "default.yaml").write_text("seed: 7\n")
    cfg = compose("rl", config_dir=conf)
    assert cfg.seed == 0
    with pytest.raises(
        ConfigError, match=r"local: not a key of psr-rl.*must start with '# @package _global_'"
    ):
        check_config(cfg, "rl")


def documented(name: str) -> str:
    """The example ``<name>`` in docs/cluster.md, verbatim."""
    text = (ROOT / "docs" / "cluster.md").read_text()
    found = re.findall(r"```yaml\n(# @package _global_\n# " + re.escape(name) + r" .*?)```", text, re.DOTALL)
    assert len(found) == 1, f"docs/cluster.md has no single example of {name}"
    return found[0]


def test_the_documented_local_settings_work_verbatim(tmp_path):
    from omegaconf import OmegaConf

    conf = copy_conf(tmp_path)
    (conf / "local").mkdir()
    (conf / "local" / "default.yaml").write_text(documented("conf/local/default.yaml"))
    expected = yaml.safe_load(documented("conf/local/default.yaml"))["hydra"]
    for primary in ("rl", "sft", "eval"):
        cfg = compose(primary, config_dir=conf, hydra=True)
        check_config(cfg, primary)
        assert OmegaConf.to_container(cfg.hydra.run)["dir"] == expected["run"]["dir"]
        assert OmegaConf.to_container(cfg.hydra.sweep)["dir"] == expected["sweep"]["dir"]

    pipeline = conf / "pipeline"
    (pipeline / "local").mkdir()
    (pipeline / "local" / "default.yaml").write_text(documented("conf/pipeline/local/default.yaml"))
    paths = yaml.safe_load(documented("conf/pipeline/local/default.yaml"))["paths"]
    for overrides in ([], ["experiment=quickstart"]):
        cfg = compose("data", *overrides, config_dir=pipeline)
        check_config(cfg, "data")
        assert {k: cfg.paths[k] for k in paths} == paths


def test_local_settings_are_git_ignored():
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "conf/local/" in ignored and "conf/pipeline/local/" in ignored


# --- The user's loading path ----------------------------------------------------------------------


def test_missing_model_path_names_the_key(monkeypatch):
    from hydra.utils import instantiate
    from omegaconf.errors import MissingMandatoryValue

    monkeypatch.delenv("PSR_FLUX_KONTEXT_PATH", raising=False)
    cfg = compose("rl", "model=flux_kontext")
    with pytest.raises(MissingMandatoryValue, match="model.path"):
        instantiate(cfg.model)
    with pytest.raises(Exception, match=r"model.path=/nowhere does not exist; expected a diffusers-layout"):
        instantiate(cfg.model, path="/nowhere")


def test_rl_trains_from_a_saved_checkpoint_through_the_user_path(tiny_checkpoint, tmp_path):
    """psr-rl model=flux_kontext model.path=DIR: the builder users take, on the tiny model saved in
    diffusers layout; one step runs and its rollout matches the in-code tiny model's."""
    import torch

    from psr.trainers.rl import RLTrainer

    common = [
        "experiment=quickstart",
        "train.steps=1",
        "train.resolution=32",
        "data.image_size=32",
        "train.group_size=2",
        "train.micro_batch_size=2",
        "train.eval_every=0",
        "train.grid_every=0",
        "sampler.num_steps=3",
    ]
    user_path = [
        "model=flux_kontext",
        f"model.path={tiny_checkpoint}",
        "model.device=cpu",
        "model.dtype=float32",
        "model.text_encoder_dtype=float32",
        "model.gradient_checkpointing=false",
        "model.max_sequence_length=32",  # what the in-code tiny model uses
        "model.reference_max_area=null",
    ]
    saved = RLTrainer(compose("rl", *common, *user_path, f"run_dir={tmp_path / 'saved'}"))
    saved.setup()
    tiny = RLTrainer(compose("rl", *common, f"run_dir={tmp_path / 'tiny'}"))
    tiny.setup()
    try:
        a = saved.rollout(saved.batches.next_batch(), 0)
        b = tiny.rollout(tiny.batches.next_batch(), 0)
        torch.testing.assert_close(a[0].latents, b[0].latents, rtol=1e-5, atol=1e-5)
        saved.train()
        assert (tmp_path / "saved" / "checkpoints" / "step_00000001" / "COMPLETE").is_file()
    finally:
        saved.cleanup()
        tiny.cleanup()


def test_build_reward_places_every_nested_model_on_the_device():
    """A PSR reward's detector and embedder, and a weighted reward's components, all go where the
    trainer says (reward_serving.device or the engine's device), not where the YAML's default put them."""
    from omegaconf import OmegaConf

    from rewards.base import build_reward

    node = OmegaConf.create(
        {
            "_target_": "builtins.dict",
            "psr": {"_target_": "builtins.dict", "detector": {"_target_": "builtins.dict", "device": "cpu"}},
            "text": {"_target_": "builtins.dict", "device": "cpu", "scale": 1.0},
        }
    )
    built = build_reward(node, "cuda:1")
    assert built["psr"]["detector"]["device"] == "cuda:1" and built["text"]["device"] == "cuda:1"
    assert node.text.device == "cpu"  # the config itself is unchanged
    cfg = compose("rl", "reward=tiny_psr")
    assert (
        build_reward(cfg.reward, "cpu") is not None
    )  # the real tiny PSR reward builds through the same path
