"""psr-rl with the reward beside the rollout (rewards/serving.py): the same run with the reward in
turn, in a background thread and in a worker process logs the same metrics and ends with the same
weights, bit for bit; a run stopped with the reward in turn and resumed with it beside the rollout
is the run that never stopped; the step's time is split as documented.

The reward is the colour reward after a fixed sleep per call (:class:`SleepyColour`), so the thread
has something to hide behind the next group's rollout. Each run: 4 steps of 2 groups on the tiny
model (test_rl's settings), checkpoints at steps 2 and 4.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from pathlib import Path

import pytest
import torch
from torch import Tensor

from rewards.base import RewardInputs
from rewards.color import ColorReward

SLEEP_S = 0.1
REWARD = ["reward._target_=tests.trainers.test_rl_overlap.SleepyColour", f"+reward.seconds={SLEEP_S}"]
RUN = ["train.steps=4", *REWARD]
MODES = {
    "in_turn": ["reward_serving.overlap=false"],
    "thread": ["reward_serving.overlap=true"],
    "workers": ["reward_serving.workers=1"],  # overlap=auto: on for worker processes
}


class SleepyColour:
    """The colour reward (rewards/color.py) after sleeping ``seconds`` per call: a slow judge stand-in."""

    def __init__(self, seconds: float, use_std: bool = False) -> None:
        self.seconds, self.colour = float(seconds), ColorReward(use_std=use_std)

    def __call__(self, images: Tensor, inputs: RewardInputs) -> dict[str, Tensor]:
        time.sleep(self.seconds)
        return self.colour(images, inputs)


def records(run_dir: Path) -> dict[int, dict[str, float]]:
    """``step -> metrics`` of metrics.jsonl without wall-clock keys (the last record of a step wins)."""
    out: dict[int, dict[str, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        step = rec.pop("step")
        out.setdefault(step, {}).update(
            {k: v for k, v in rec.items() if k != "time" and not k.startswith("time/")}
        )
    return out


def same_number(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def assert_same_run(got: Path, expected: Path) -> None:
    """Every logged metric equal (not close) and every trainable tensor of the last checkpoint equal."""
    from safetensors.torch import load_file

    a, b = records(got), records(expected)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in b:
        assert a[step].keys() == b[step].keys(), step
        diff = {k: (a[step][k], v) for k, v in b[step].items() if not same_number(a[step][k], v)}
        assert not diff, (step, diff)
    weights = [
        load_file(str(run / "checkpoints" / "step_00000004" / "trainable.safetensors"))
        for run in (got, expected)
    ]
    assert weights[0].keys() == weights[1].keys() and weights[0]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same 4-step run in each mode (in this process, as psr-rl runs it)."""
    from test_rl import compose

    from psr.trainers.rl import main

    out = {}
    for mode, over in MODES.items():
        out[mode] = tmp_path_factory.mktemp(mode) / "run"
        before = set(multiprocessing.active_children())
        main(compose(out[mode], *RUN, *over))
        assert set(multiprocessing.active_children()) <= before  # the worker is stopped by cleanup()
    return out


@pytest.mark.parametrize("mode", ["thread", "workers"])
def test_the_reward_beside_the_rollout_gives_the_run_it_gives_in_turn(runs, mode):
    assert_same_run(runs[mode], runs["in_turn"])


def test_a_run_resumed_with_overlap_is_the_run_that_never_stopped(runs, tmp_path):
    """Steps 1-2 with the reward in turn, steps 3-4 beside the rollout (reward_serving may change on
    resume): equal to the uninterrupted runs, which are equal to each other."""
    from test_rl import compose

    from psr.trainers.rl import RLTrainer, main

    run = tmp_path / "run"
    main(compose(run, *RUN, *MODES["in_turn"], "train.steps=2"))
    trainer = RLTrainer(compose(run, *RUN, *MODES["thread"]))
    trainer.setup()
    try:
        assert trainer.step == 2 and trainer.overlap
        trainer.train()
    finally:
        trainer.cleanup()
    assert_same_run(run, runs["thread"])
    assert_same_run(run, runs["in_turn"])


def test_the_step_time_splits_into_rollout_hidden_and_waited_reward(runs):
    """In turn, ``time/reward`` is the whole reward (>= the compute it timed, SLEEP_S per group).
    Beside the rollout, the first group's reward runs while the second is sampled, so the step waits
    for less than the reward computed."""
    from trainer_helpers import metric

    for mode in ("in_turn", "thread"):
        waited, compute = metric(runs[mode], "time/reward"), metric(runs[mode], "time/reward_compute")
        assert sorted(waited) == sorted(compute) == [1, 2, 3, 4]
        assert metric(runs[mode], "time/rollout") and metric(runs[mode], "time/update")
        assert all(compute[s] >= 2 * SLEEP_S for s in compute), compute  # 2 groups per step
        if mode == "in_turn":
            assert all(waited[s] >= compute[s] for s in compute), (waited, compute)
    hidden = sum(compute.values()) - sum(waited.values())  # thread run: at least the 4 first groups' overlap
    assert hidden > 0.1, (waited, compute)


def test_overlap_auto_is_on_for_a_cpu_reward_and_a_device_list_needs_workers(tmp_path):
    """The default (auto) overlaps the CPU colour reward; a list of devices without workers is refused
    when the config is read."""
    from test_rl import compose, trainer_for

    from psr.config import ConfigError
    from psr.trainers.rl import RLTrainer

    trainer = trainer_for(tmp_path / "auto")
    try:
        assert trainer.overlap and trainer.serving.overlap == "auto" and trainer.serving.workers == 0
    finally:
        trainer.cleanup()
    with pytest.raises(ConfigError, match=r"reward_serving\.device=.*needs reward_serving\.workers >= 1"):
        RLTrainer(compose(tmp_path / "bad", "reward_serving.device=[cpu,cpu]"))
