"""Resume is exact about what it resumes (psr-rl on the tiny model, in process): the timeline of
checkpoints, the pinned init_from checkpoint, psr-eval's resolved checkpoint, the first start's config,
unreadable checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_rl import compose, trainer_for
from trainer_helpers import CONF

from psr.checkpoint import CorruptCheckpointError, latest_checkpoint, list_checkpoints

FAST = ["train.steps=4", "train.keep_last=2"]  # checkpoints at steps 2 and 4 (train.checkpoint_every=2)


def names(run_dir: Path) -> list[str]:
    return [p.name for p in list_checkpoints(run_dir / "checkpoints")]


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory) -> Path:
    from psr.trainers.rl import main

    run_dir = tmp_path_factory.mktemp("four") / "run"
    main(compose(run_dir, *FAST))
    assert names(run_dir) == ["step_00000002", "step_00000004"]
    return run_dir


@pytest.fixture
def run(four_steps, tmp_path) -> Path:
    """A copy of the 4-step run (a test may change it)."""
    shutil.copytree(four_steps, tmp_path / "run")
    return tmp_path / "run"


def test_resuming_an_older_checkpoint_sets_the_newer_branch_aside(run, capsys):
    """resume=<step 2> while step 4 exists: the new step 3 must survive keep_last=2 pruning (not the
    stale step 4), and resume=auto / init_from must then find step 3."""
    from psr.checkpoint import find_checkpoint
    from psr.trainers.rl import main

    main(compose(run, *FAST, f"resume={run / 'checkpoints' / 'step_00000002'}", "train.steps=3"))
    assert names(run) == ["step_00000002", "step_00000003"]
    assert latest_checkpoint(run / "checkpoints").name == "step_00000003"
    assert find_checkpoint(run).name == "step_00000003"
    aside = list((run / "checkpoints" / "abandoned").iterdir())
    assert len(aside) == 1 and aside[0].name.endswith("-step_00000004") and (aside[0] / "COMPLETE").is_file()
    assert "set aside" in capsys.readouterr().out


def test_a_changed_config_is_refused_key_by_key_and_the_first_one_kept(run, capsys):
    first = (run / "config.first.yaml").read_text()
    with pytest.raises(ValueError, match=r"(?s)optim\.lr: 0\.003 -> 0\.001.*seed: 0 -> 3") as err:
        trainer_for(run, *FAST, "optim.lr=1e-3", "seed=3", "train.steps=6")
    assert "train.steps" not in str(err.value).split("Keys that may change")[0]  # allowed to change
    assert names(run) == ["step_00000002", "step_00000004"]  # nothing set aside by a refused resume
    trainer = trainer_for(run, *FAST, "train.steps=6", "train.grid_every=3")
    trainer.cleanup()
    assert trainer.step == 4 and "train.steps: 4 -> 6" in capsys.readouterr().out
    assert (run / "config.first.yaml").read_text() == first


def test_an_unreadable_checkpoint_names_its_file_and_auto_falls_back(run, capsys):
    newest = run / "checkpoints" / "step_00000004"
    weights = newest / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a torn write
    with pytest.raises(CorruptCheckpointError, match=r"step_00000004/trainable\.safetensors"):
        trainer_for(run, *FAST, f"resume={newest}")
    trainer = trainer_for(run, *FAST)  # resume=auto
    trainer.cleanup()
    out = capsys.readouterr().out
    assert trainer.step == 2
    assert "trainable.safetensors" in out and "falling back to the previous complete one" in out
    assert names(run) == ["step_00000002"]  # the unreadable one is set aside, not picked again


def test_init_from_is_pinned_at_the_first_start_and_psr_eval_refuses_to_mix(tmp_path):
    """Steps 1-2 train on the init_from run's step 2; that run then saves step 4; the resumed run
    still starts from step 2, a resumed psr-eval of that run dir refuses, and once step 2 is gone the
    resume fails naming both checkpoints."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from psr.evaluate import main as evaluate
    from psr.models.builders import tiny_flux_kontext
    from psr.resume import load_initial_weights
    from psr.trainers.rl import main

    source, target, scores = tmp_path / "source", tmp_path / "target", tmp_path / "eval"
    main(compose(source, "train.steps=2"))
    over = [f"init_from={source}", "train.steps=2", "train.checkpoint_every=1"]
    main(compose(target, *over))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        eval_cfg = hydra_compose(
            "eval",
            overrides=[
                "experiment/eval=quickstart",
                "data.image_size=32",
                "eval.resolution=32",
                "eval.num_steps=2",
                "eval.samples_per_prompt=1",
                "eval.limit=1",
                f"checkpoint={source}",
                f"run_dir={scores}",
            ],
        )
    evaluate(eval_cfg)
    main(compose(source, "train.steps=4"))  # the init_from run goes on: its newest is step 4 now

    expected = tiny_flux_kontext(seed=0)
    load_initial_weights(expected, source / "checkpoints" / "step_00000002")
    trainer = trainer_for(target, *over, "train.steps=3")
    try:
        assert trainer.step == 2 and trainer.policy.init_from == str(source / "checkpoints" / "step_00000002")
        cond = expected.condition("the red disc", [torch.rand(3, 32, 32)], 32, 32)
        x = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(0))
        with trainer.policy.reference_policy():
            got = trainer.policy.velocity(x, 0.4, cond)
        torch.testing.assert_close(got, expected.velocity(x, 0.4, cond), rtol=1e-5, atol=1e-6)
    finally:
        trainer.cleanup()

    with pytest.raises(ValueError, match=r"checkpoint_resolved\.path: .*step_00000002.* -> .*step_00000004"):
        evaluate(eval_cfg)

    shutil.rmtree(source / "checkpoints" / "step_00000002")
    with pytest.raises(
        FileNotFoundError, match=r"(?s)step_00000002.*no longer exists.*resolves to .*step_00000004"
    ):
        trainer_for(target, *over, "train.steps=3")
