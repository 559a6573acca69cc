"""psr-rl and psr-sft under each engine (torch, DeepSpeed ZeRO-2, ZeRO-3; one CPU process, fp32): the same
rollouts, losses, gradient norms and held-out rewards, with LoRA and with full fine-tuning.

ZeRO-3 partitions parameters and gathers them for every forward (rollout, log-probs, evaluation);
ZeRO-2 partitions gradients and optimizer state. In fp32 on one process both must reproduce the
plain engine up to summation order (measured: relative differences below 1e-6).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from trainer_helpers import BIN, metric_table, run_cli

COMMON = [
    "experiment=quickstart",
    "train.steps=2",
    "train.resolution=32",
    "data.image_size=32",
    "train.eval_every=1",
    "train.grid_every=0",
    "train.export_lora=false",
    "engine.precision=fp32",
]
KEYS = ("reward/score", "train/loss", "train/grad_norm", "eval/reward/score")


def _run(run_dir: Path, *overrides: str) -> dict[tuple[int, str], float]:
    run_cli([str(BIN / "psr-rl"), *COMMON, f"hydra.run.dir={run_dir}", *overrides])
    return metric_table(run_dir, KEYS)


@pytest.mark.parametrize(("mode", "engines"), [("lora", ("ds_zero2", "ds_zero3")), ("full", ("ds_zero3",))])
def test_deepspeed_engines_reproduce_the_torch_engine(tmp_path, mode, engines):
    expected = _run(tmp_path / "torch", "engine=torch", f"train.mode={mode}")
    assert len(expected) == 2 * len(KEYS)
    for engine in engines:
        got = _run(tmp_path / engine, f"engine={engine}", f"train.mode={mode}")
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-8), (engine, key)


def test_sft_under_zero3_reproduces_the_torch_engine(tmp_path):
    """The same check for psr-sft (validation loss included: it runs under the gathered weights)."""

    def run(run_dir: Path, engine: str) -> dict[tuple[int, str], float]:
        cmd = [
            str(BIN / "psr-sft"), "experiment=quickstart", "data=synthetic", "train.steps=4",
            "validation.every=2", f"engine={engine}", "engine.precision=fp32", f"hydra.run.dir={run_dir}",
        ]  # fmt: skip
        run_cli(cmd)
        return metric_table(run_dir, ("train/loss", "val/loss"))

    expected = run(tmp_path / "torch", "torch")
    assert len(expected) == 4 + 3  # 4 training steps, validation at 0, 2, 4
    got = run(tmp_path / "zero3", "ds_zero3")
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key
