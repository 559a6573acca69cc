"""psr-rl and psr-sft under each engine (torch, DeepSpeed ZeRO-2, ZeRO-3; one CPU process, fp32): the same
rollouts, losses, gradient norms and held-out rewards, with LoRA and with full fine-tuning.

ZeRO-3 partitions parameters and gathers them for every forward (rollout, log-probs, evaluation);
ZeRO-2 partitions gradients and optimizer state. In fp32 on one process both must reproduce the
plain engine up to summation order (measured: relative differences below 1e-6).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
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
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_"))
    }
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    cmd = [str(BIN / "psr-rl"), *COMMON, f"hydra.run.dir={run_dir}", *overrides]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stderr[-4000:]}"
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.update({(rec["step"], k): rec[k] for k in KEYS if k in rec})
    return out


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
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "SLURM_"))
        }
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), WANDB_MODE="offline", HF_HUB_OFFLINE="1")
        cmd = [
            str(BIN / "psr-sft"), "experiment=sft_quickstart", "data=synthetic", "train.steps=4",
            "validation.every=2", f"engine={engine}", "engine.precision=fp32", f"hydra.run.dir={run_dir}",
        ]  # fmt: skip
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
        out = {}
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            out.update({(rec["step"], k): rec[k] for k in ("train/loss", "val/loss") if k in rec})
        return out

    expected = run(tmp_path / "torch", "torch")
    assert len(expected) == 4 + 3  # 4 training steps, validation at 0, 2, 4
    got = run(tmp_path / "zero3", "ds_zero3")
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key
