"""The console scripts as a user runs them: --help, --cfg job, a sweep, and bad input that exits
non-zero with a message naming the key or the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = [
    "experiment=quickstart",
    "data.num_records=6",
    "data.heldout=2",
    "data.image_size=32",
    "train.resolution=32",
    "train.steps=1",
    "train.group_size=2",
    "train.micro_batch_size=2",
    "train.eval_every=0",
    "train.grid_every=0",
    "sampler.num_steps=2",
]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(BIN / "psr-rl"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_help_and_cfg_job():
    done = run("--help")
    assert done.returncode == 0, done.stderr
    assert "algo: dpo, grpo" in done.stdout
    assert "model: flux2_klein, flux_kontext, qwen_image_edit_plus, tiny, tiny_flux2_klein" in done.stdout
    done = run("--cfg", "job", "experiment=quickstart", "algo=dpo", "train.group_size=3")
    assert done.returncode == 0, done.stderr
    assert "_target_: psr.objectives.dpo.DPOObjective" in done.stdout and "group_size: 3" in done.stdout


def test_unknown_key_names_it():
    done = run("experiment=quickstart", "train.grup_size=3")
    assert done.returncode != 0
    assert "train.grup_size" in done.stderr


def test_a_key_no_reader_takes_fails_before_anything_is_built(tmp_path):
    """An added key (``+``) gets past Hydra; psr.config.check_config stops it, naming the closest key."""
    done = run(
        "experiment=quickstart",
        "+train.stepz=3",
        "algo=dpo",
        "+algo.advantage_clip=3",
        f"hydra.run.dir={tmp_path}",
    )
    assert done.returncode != 0
    assert "train.stepz: not a key of train (RLTrainSettings) (did you mean train.steps?)" in done.stderr
    assert "algo.advantage_clip: not a key of psr.objectives.dpo" in done.stderr
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing was built or run


def test_each_cli_picks_its_own_preset():
    done = run("--cfg", "job", "experiment=psr_sft")
    assert done.returncode != 0
    assert "Could not find 'experiment/rl/psr_sft'" in done.stderr and "psr_rl" in done.stderr
    env = {**os.environ, "WANDB_MODE": "offline"}
    for cli, steps in (("psr-rl", 12), ("psr-sft", 100)):
        done = subprocess.run(
            [str(BIN / cli), "--cfg", "job", "experiment=quickstart"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert f"steps: {steps}" in done.stdout


def test_unreadable_reference_image_names_the_file(tmp_path):
    from psr.data.synthetic import write_synthetic_manifest

    manifest = write_synthetic_manifest(tmp_path / "data", num_records=6, num_subjects=(2,), image_size=32)
    last = json.loads(manifest.read_text().splitlines()[-1])  # a held-out record: loaded at set-up
    bad = manifest.parent / last["subjects"][1]["reference"]
    bad.write_bytes(b"not a png")
    tiny = [a for a in TINY if not a.startswith(("data.num_records", "data.image_size"))]
    # the up-front check of every image (tests/test_settings.py) is off: this is the loader's own error
    done = run(
        *tiny,
        "data=manifest",
        f"data.manifest={manifest}",
        "data.check_images=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert done.returncode != 0
    assert str(bad.name) in done.stderr and "cannot read" in done.stderr, done.stderr[-2000:]


def test_multirun_sweeps_locally(tmp_path):
    done = run("--multirun", *TINY, "seed=0,1", f"hydra.sweep.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    rewards = []
    for job in ("0", "1"):
        lines = (tmp_path / job / "metrics.jsonl").read_text().splitlines()
        rewards.append(json.loads(lines[0])["reward/score"])
    assert rewards[0] != rewards[1]  # the two seeds are two different runs
