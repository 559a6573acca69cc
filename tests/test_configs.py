"""Every shipped experiment composes, the PSR presets carry the paper's settings, and the user's
loading path (``model=flux_kontext model.path=DIR``) trains on a saved tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose(name: str, *overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(name, overrides=list(overrides))


@pytest.mark.parametrize(
    ("primary", "experiment"),
    [
        ("rl", "quickstart"),
        ("rl", "psr_rl"),
        ("sft", "sft_quickstart"),
        ("sft", "psr_sft"),
        ("eval", "eval_quickstart"),
    ],
)
def test_experiments_compose(primary, experiment):
    extra = ["model.path=/ckpt", "data.manifest=/m.jsonl"] if experiment.startswith("psr_") else []
    cfg = compose(primary, f"experiment={experiment}", *extra)
    assert cfg.model._target_.startswith("psr.models.builders.")


def test_psr_presets_carry_the_paper_settings():
    rl = compose("rl", "experiment=psr_rl", "model.path=/ckpt", "data.manifest=/m.jsonl")
    assert rl.optim.lr == 1e-5 and rl.train.lora.rank == 64 and rl.train.group_size == 6
    assert rl.sampler.num_steps == 28 and rl.algo.name == "grpo"
    assert dict(rl.reward.weights) == {"psr": 0.4, "semantic": 0.4, "preference": 0.2}
    sft = compose("sft", "experiment=psr_sft", "model.path=/ckpt", "data.manifest=/m.jsonl")
    assert sft.optim.lr == 1e-4 and sft.train.lora.rank == 512 and sft.dataset.resolution == 512


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
        "train.micro_batch=2",
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
        a = saved.rollout(saved.sampler.next_batch(), 0)
        b = tiny.rollout(tiny.sampler.next_batch(), 0)
        torch.testing.assert_close(a[0].latents, b[0].latents, rtol=1e-5, atol=1e-5)
        saved.train()
        assert (tmp_path / "saved" / "checkpoints" / "step_00000001" / "COMPLETE").is_file()
    finally:
        saved.cleanup()
        tiny.cleanup()


def test_build_reward_places_every_nested_model_on_the_device():
    """A PSR reward's detector and embedder, and a weighted reward's components, all go where the
    trainer says (reward_device or the engine's device), not where the YAML's default put them."""
    from omegaconf import OmegaConf

    from psr.trainers.common import build_reward

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
    assert build_reward(cfg, "cpu") is not None  # the real tiny PSR reward builds through the same path
