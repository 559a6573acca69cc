"""Every bad setting is refused when the run starts, naming its key and the allowed range: through
:func:`psr.config.check_config` (what each console script runs first), the trainers' ``__init__``
(:func:`psr.config.settings`), the objectives' own checks, and the manifest's images, all listed at
once by ``psr-sft`` / ``psr-rl`` before any step runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from psr.config import ConfigError, EvalSettings, SettingsError, check_config, compose, settings

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# (primary, override, text the message must hold: the full key, and for some the reason)
BAD = [
    ("rl", "train.checkpoint_every=0", r"train\.checkpoint_every=0: must be >= 1"),
    ("rl", "train.group_size=0", r"train\.group_size=0: must be >= 2"),
    ("rl", "train.group_size=1", r"train\.group_size=1: must be >= 2: a group of one sample never updates"),
    ("rl", "sampler.noise_level=1000", r"sampler\.noise_level=1000: must be in \[0, sqrt\(2\)\)"),
    ("rl", "sampler.noise_level=-0.1", r"sampler\.noise_level=-0\.1"),
    ("rl", "sampler.method=cps sampler.noise_level=1.5", r"sampler\.noise_level=1\.5: must be in \[0, 1\]"),
    ("rl", "train.steps=abc", r"train\.steps='abc': expected int"),
    ("rl", "algo.clip_eps=abc", r"algo\.clip_eps='abc': expected float"),
    ("rl", "data.num_records=abc", r"data\.num_records='abc': expected int"),
    ("rl", "train.steps=0", r"train\.steps=0: must be >= 1"),
    ("rl", "train.resolution=100", r"train\.resolution=100: must be a positive multiple of 16"),
    ("rl", "optim.lr=0", r"optim\.lr=0: must be > 0"),
    ("rl", "optim.min_lr_ratio=2", r"optim\.min_lr_ratio=2: must be in \[0, 1\]"),
    ("rl", "train.keep_last=0", r"train\.keep_last=0: must be >= 1"),
    ("rl", "train.eval_every=-1", r"train\.eval_every=-1: must be >= 0"),
    ("rl", "train.grid_every=-1", r"train\.grid_every=-1: must be >= 0"),
    ("rl", "train.micro_batch_size=0", r"train\.micro_batch_size=0: must be >= 1"),
    ("rl", "train.lora.rank=0", r"train\.lora\.rank=0: must be >= 1"),
    ("rl", "sampler.num_steps=0", r"sampler\.num_steps=0: must be >= 1"),
    ("rl", "sampler.sde_window=[2,40]", r"sampler\.sde_window=\[2, 40\]: .*<= sampler\.num_steps=28"),
    ("sft", "train.grad_accum=0", r"train\.grad_accum=0: must be >= 1"),
    ("sft", "dataset.resolution=100", r"dataset\.resolution=100: must be a positive multiple of 16"),
    ("sft", "dataset.reference_dropout=1.5", r"dataset\.reference_dropout=1\.5: must be in \[0, 1\)"),
    ("sft", "dataset.num_references_probs=[0.5,2,0.1]", r"dataset\.num_references_probs=\[0\.5, 2, 0\.1\]"),
    ("sft", "validation.num_steps=0", r"validation\.num_steps=0: must be >= 1"),
    ("sft", "loader.prefetch_factor=0", r"loader\.prefetch_factor=0: must be >= 1"),
    ("eval", "eval.resolution=100", r"eval\.resolution=100: must be a positive multiple of 16"),
    ("eval", "eval.samples_per_prompt=0", r"eval\.samples_per_prompt=0: must be >= 1"),
    ("eval", "eval.limit=0", r"eval\.limit=0: must be >= 1"),
]


@pytest.mark.parametrize(("primary", "overrides", "message"), BAD, ids=[f"{p}:{o}" for p, o, _ in BAD])
def test_a_bad_setting_fails_the_config_check_naming_its_key(primary, overrides, message):
    cfg = compose(primary, overrides.split())
    with pytest.raises(ConfigError, match=message):
        check_config(cfg, primary)


def test_every_bad_value_is_listed_at_once():
    cfg = compose("rl", ["train.steps=0", "train.group_size=1", "sampler.noise_level=1000", "optim.lr=-1"])
    with pytest.raises(ConfigError) as err:
        check_config(cfg, "rl")
    assert len(err.value.problems) == 4, err.value.problems


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.checkpoint_every=0"], r"train\.checkpoint_every=0"),
        (["sampler.noise_level=1000"], r"sampler\.noise_level=1000"),
        (
            ["optim.schedule=cosine", "optim.warmup_steps=200"],
            r"optim\.warmup_steps=200: must be < train\.steps",
        ),
    ],
)
def test_the_rl_trainer_refuses_bad_settings_before_building_anything(tmp_path, overrides, message):
    from psr.trainers.rl import RLTrainer

    with pytest.raises((ConfigError, SettingsError), match=message):
        RLTrainer(compose("rl", [f"run_dir={tmp_path}", *overrides]))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sampler=ode"], r"sampler\.method=ode takes no stochastic step"),
        (["sampler.noise_level=0"], r"sampler\.noise_level=0 makes every step deterministic"),
    ],
)
def test_grpo_refuses_a_sampler_without_sde_steps_dpo_does_not(tmp_path, overrides, message):
    """GRPO trains on SDE log-probs: with none, no run would ever update. DPO re-noises final images."""
    from psr.trainers.rl import RLTrainer

    base = ["experiment/rl=quickstart", "data.num_records=6", "data.image_size=32", "train.resolution=32"]
    trainer = RLTrainer(compose("rl", [f"run_dir={tmp_path / 'grpo'}", *base, *overrides]))
    try:
        with pytest.raises(ValueError, match=message):
            trainer.setup()
    finally:
        trainer.run_lock.release()
    dpo = RLTrainer(compose("rl", [f"run_dir={tmp_path / 'dpo'}", *base, "algo=dpo", *overrides]))
    dpo.setup()
    dpo.cleanup()


def test_the_sft_trainer_and_the_evaluator_read_typed_sections(tmp_path):
    from psr.evaluate import Evaluator
    from psr.trainers.sft import SFTTrainer

    with pytest.raises(ConfigError, match=r"validation\.records=0: must be >= 1 \(or validation\.every=0"):
        SFTTrainer(compose("sft", [f"run_dir={tmp_path}", "data.manifest=/m.jsonl", "validation.records=0"]))
    trainer = SFTTrainer(
        compose("sft", [f"run_dir={tmp_path}", "data.manifest=/m.jsonl", "validation.every=0"])
    )
    assert trainer.val_every == 0 and trainer.loader.num_workers == 2
    evaluator = Evaluator(compose("eval", [f"run_dir={tmp_path}", "eval.limit=3"]))
    assert evaluator.limit == 3 and evaluator.resolution == 512
    with pytest.raises(ConfigError, match=r"eval\.resolution=40"):
        settings({"resolution": 40}, EvalSettings, "eval")


@pytest.mark.parametrize(
    ("algo", "key", "value"),
    [
        ("grpo", "clip_eps", 0.0),
        ("grpo", "beta", -1.0),
        ("grpo", "train_fraction", 0.0),
        ("grpo", "train_fraction", 1.5),
        ("grpo", "clip", 0.0),
        ("grpo", "eps", -1.0),
        ("dpo", "beta", 0.0),
        ("dpo", "margin", -1.0),
        ("dpo", "focus_strength", -1.0),
    ],
)
def test_objective_settings_out_of_range_are_named(algo, key, value):
    from hydra.utils import instantiate

    cfg = compose("rl", [f"algo={algo}", f"algo.{key}={value}"])
    with pytest.raises(Exception, match=rf"algo\.{key}={value}"):
        instantiate(cfg.algo, micro_batch_size=4)


def test_random_subset_needs_its_step_count():
    from psr.objectives.grpo import GRPOObjective

    with pytest.raises(ValueError, match=r"algo\.num_train_steps=None"):
        GRPOObjective(micro_batch_size=1, train_steps="random_subset")


# --- The manifest's images, checked up front ------------------------------------------------------


@pytest.fixture(scope="module")
def broken_manifest(tmp_path_factory) -> tuple[Path, list[str]]:
    """A synthetic manifest with 2 missing images and 1 corrupt one; the 3 record ids."""
    from psr.data.manifest import read_manifest, resolve
    from psr.data.synthetic import write_synthetic_manifest

    path = write_synthetic_manifest(
        tmp_path_factory.mktemp("data"), num_records=8, num_subjects=(2,), image_size=32, seed=0
    )
    samples = read_manifest(path)
    resolve(samples[1].target, path.parent).unlink()
    resolve(samples[3].subjects[1].reference, path.parent).unlink()
    corrupt = resolve(samples[5].target, path.parent)
    corrupt.write_bytes(corrupt.read_bytes()[:40])  # a truncated PNG
    return path, [samples[1].id, samples[3].id, samples[5].id]


@pytest.mark.parametrize("cli", ["psr-sft", "psr-rl"])
def test_every_bad_image_is_listed_before_any_step(cli, broken_manifest, tmp_path):
    manifest, ids = broken_manifest
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [
            str(BIN / cli),
            "data=manifest",
            f"data.manifest={manifest}",
            "data.heldout=2",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode != 0
    assert "3 image(s) cannot be read" in done.stderr, done.stderr[-3000:]
    for rid, fld in zip(ids, ("'target'", "subjects[1].reference", "'target'"), strict=True):
        assert any(rid in line and fld.strip("'") in line for line in done.stderr.splitlines()), rid
    assert "data.check_images=false" in done.stderr
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
    assert not (run_dir / "metrics.jsonl").exists()


def test_check_images_false_skips_the_check(broken_manifest):
    from psr.data.dataset import ImageLoadError
    from psr.data.sources import load_manifest

    manifest, _ = broken_manifest
    with pytest.raises(ImageLoadError, match="3 image"):
        load_manifest(str(manifest), heldout=2)
    train, heldout, _ = load_manifest(str(manifest), heldout=2, check_images=False)
    assert len(train) + len(heldout) == 8
