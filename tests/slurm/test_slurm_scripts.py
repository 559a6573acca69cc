"""The sbatch templates and Hydra launcher configs without a cluster: syntax, the lines that matter, and
the scripts run top to bottom by bash with stand-ins for srun, scontrol and the psr commands."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "slurm"
SCRIPTS = ["rl.sbatch", "sft.sbatch", "data_array.sbatch", "eval.sbatch"]
TRAINERS = {"rl.sbatch": "psr-rl", "sft.sbatch": "psr-sft"}


def sbatch_options(script: str) -> list[str]:
    return [
        opt
        for line in (SLURM / script).read_text().splitlines()
        if line.startswith("#SBATCH ")
        for opt in line.split()[1:]
    ]


@pytest.mark.parametrize("name", [*SCRIPTS, "env.sh", "submit.sh"])
def test_bash_syntax(name):
    done = subprocess.run(["bash", "-n", str(SLURM / name)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_sbatch_header_is_minimal_and_requeueable(script):
    opts = sbatch_options(script)
    assert "--requeue" in opts and "--open-mode=append" in opts
    # site settings come from the environment / conf/local, never from the template
    assert not [o for o in opts if re.match(r"--(partition|account|qos|gpus|gres|time|mem)", o)], opts
    text = (SLURM / script).read_text()
    assert 'source "${PSR_ROOT:-$SLURM_SUBMIT_DIR}/slurm/env.sh"' in text
    assert "psr_job_setup" in text
    assert text.rstrip().endswith('"$@"'), "Hydra overrides must pass through last"


@pytest.mark.parametrize("script", list(TRAINERS))
def test_trainer_sbatch_signal_and_resume(script):
    # USR1 to every task of the step (not B:, the batch shell, which would have to pass it on)
    assert "--signal=USR1@120" in sbatch_options(script)
    last = (SLURM / script).read_text().rstrip().splitlines()[-1]
    assert last == f'psr_srun {TRAINERS[script]} resume=auto hydra.run.dir="$PSR_RUN_DIR" "$@"'
    assert (
        "PSR_RUN_DIR=${PSR_RUN_DIR:-$PSR_RUN_ROOT/$SLURM_JOB_NAME-$SLURM_JOB_ID}"
        in (SLURM / script).read_text()
    )


def test_data_array_shards_by_array_task():
    text = (SLURM / "data_array.sbatch").read_text()
    assert 'shard.index="$SLURM_ARRAY_TASK_ID" shard.count="$SLURM_ARRAY_TASK_COUNT"' in text
    assert 'out_dir="$PSR_DATA_OUT"' in text
    assert "PSR_DATA_OUT=${PSR_DATA_OUT:-$base/data}" in text and "$SLURM_ARRAY_JOB_ID" in text


def test_env_derivations():
    text = (SLURM / "env.sh").read_text()
    assert "srun --kill-on-bad-exit=1 bash -c" in text
    assert (
        "'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID; exec \"$@\"'" in text
    )
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in text
    assert "MASTER_PORT=${PSR_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 40000))}" in text


# ------------------------------------------------------------------ the scripts run by bash, with stand-ins

FAKE_SRUN = """#!/bin/bash
# one task of a 2-task step on the second node, as srun would start it
[ "$1" = --kill-on-bad-exit=1 ] && shift
echo "srun $*" >> "$FAKE_LOG"
SLURM_PROCID=3 SLURM_NTASKS=4 SLURM_LOCALID=1 exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$FAKE_LOG"
if [ "$1 $2" = "show hostnames" ]; then printf 'node-a\\nnode-b\\n'; fi
"""
# a psr command: records its arguments and environment
FAKE_TRAINER = """#!/bin/bash
{ echo "argv $*"; for v in RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT CUDA_VISIBLE_DEVICES; do
    echo "env $v=${!v-<unset>}"; done; } >> "$FAKE_LOG"
"""


@pytest.fixture
def fake_job(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {
        "srun": FAKE_SRUN,
        "scontrol": FAKE_SCONTROL,
        "psr-rl": FAKE_TRAINER,
        "psr-sft": FAKE_TRAINER,
        "psr-data": FAKE_TRAINER,
        "psr-eval": FAKE_TRAINER,
    }.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "FAKE_LOG": str(tmp_path / "log"),
        "PSR_ROOT": str(REPO),
        "PSR_VENV": "none",
        "PSR_RUN_ROOT": str(tmp_path / "runs"),
        "PSR_DEVICE": "cpu",
        "SLURM_JOB_ID": "41234",
        "SLURM_JOB_NAME": "psr-rl",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_SUBMIT_DIR": str(REPO),
    }
    return env, tmp_path / "log"


def _log(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_rl_sbatch_runs_the_trainer_with_ranks_and_rendezvous(fake_job):
    env, log = fake_job
    done = subprocess.run(
        ["bash", str(SLURM / "rl.sbatch"), "experiment=quickstart", "train.steps=3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    lines = _log(log)
    run_dir = Path(env["PSR_RUN_ROOT"]) / "psr-rl-41234"
    assert f"argv resume=auto hydra.run.dir={run_dir} experiment=quickstart train.steps=3" in lines
    for expected in (
        "RANK=3",
        "WORLD_SIZE=4",
        "LOCAL_RANK=1",
        "MASTER_ADDR=node-a",
        f"MASTER_PORT={20000 + 41234 % 40000}",
        "CUDA_VISIBLE_DEVICES=",
    ):
        assert f"env {expected}" in lines, lines
    assert not [x for x in lines if x.startswith("scontrol requeue")]


def test_data_array_sbatch_passes_the_shard(fake_job):
    env, log = fake_job
    env.update(
        SLURM_JOB_NAME="psr-data",
        SLURM_ARRAY_JOB_ID="500",
        SLURM_ARRAY_TASK_ID="2",
        SLURM_ARRAY_TASK_COUNT="4",
        SLURM_ARRAY_TASK_MIN="0",
        SLURM_ARRAY_TASK_MAX="3",
    )
    done = subprocess.run(
        ["bash", str(SLURM / "data_array.sbatch"), "experiment=quickstart"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    base = Path(env["PSR_RUN_ROOT"]) / "psr-data-500"
    assert (
        f"argv device=cpu out_dir={base}/data shard.index=2 shard.count=4 "
        f"hydra.run.dir={base}/task-2 experiment=quickstart"
    ) in _log(log)
    # an array with a gap cannot be shards 0..n-1
    env.update(SLURM_ARRAY_TASK_MIN="1")
    done = subprocess.run(["bash", str(SLURM / "data_array.sbatch")], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "--array must be 0-<n-1>" in done.stderr


def test_not_under_slurm_says_so(fake_job):
    env, _ = fake_job
    del env["SLURM_JOB_ID"]
    done = subprocess.run(["bash", str(SLURM / "sft.sbatch")], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "submit it with sbatch" in done.stderr


def test_submit_sh_puts_site_settings_first(tmp_path, fake_job):
    env, log = fake_job
    (Path(env["PATH"].split(":")[0]) / "sbatch").write_text('#!/bin/bash\necho "sbatch $*" >> "$FAKE_LOG"\n')
    (Path(env["PATH"].split(":")[0]) / "sbatch").chmod(0o755)
    env.update(
        PSR_PARTITION="gpu",
        PSR_ACCOUNT="proj",
        PSR_TIME_MIN="600",
        PSR_GPUS_PER_NODE="8",
        PSR_DEVICE="gpu",
        PSR_SBATCH_ARGS="--exclusive",
    )
    done = subprocess.run(
        ["bash", str(SLURM / "submit.sh"), "--nodes=2", "slurm/rl.sbatch", "seed=1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert _log(log) == [
        "sbatch --partition=gpu --account=proj --time=600 --gpus-per-node=8 --ntasks-per-node=8 "
        f"--output={env['PSR_RUN_ROOT']}/logs/%x-%j.out --exclusive --nodes=2 slurm/rl.sbatch seed=1"
    ]


# ------------------------------------------------------------------ Hydra launcher configs


@pytest.mark.parametrize(("conf_dir", "config"), [("conf", "rl"), ("conf", "sft"), ("conf/pipeline", "data")])
def test_slurm_launcher_config(conf_dir, config, monkeypatch):
    for name, value in {
        "PSR_PARTITION": "gpu",
        "PSR_ACCOUNT": "proj",
        "PSR_TIME_MIN": "600",
        "PSR_GPUS_PER_NODE": "8",
        "PSR_NODES": "2",
    }.items():
        monkeypatch.setenv(name, value)
    with initialize_config_dir(config_dir=str(REPO / conf_dir), version_base="1.3"):
        cfg = compose(config, overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["partition"], launcher["account"], launcher["timeout_min"]) == ("gpu", "proj", 600)
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 8, 8)
    assert launcher["signal_delay_s"] == 120
    assert launcher["additional_parameters"] == {"requeue": True, "open-mode": "append"}
    assert any(line.startswith("export MASTER_ADDR=$(scontrol show hostnames") for line in launcher["setup"])
    assert "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 40000))" in launcher["setup"]


def test_slurm_launcher_defaults_without_site_settings(monkeypatch):
    for name in (
        "PSR_PARTITION",
        "PSR_ACCOUNT",
        "PSR_QOS",
        "PSR_TIME_MIN",
        "PSR_GPUS_PER_NODE",
        "PSR_NODES",
        "PSR_CPUS_PER_TASK",
        "PSR_MEM_GB",
    ):
        monkeypatch.delenv(name, raising=False)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("sft", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["partition"] is None and launcher["account"] is None and launcher["gpus_per_node"] is None
    assert (launcher["timeout_min"], launcher["nodes"], launcher["tasks_per_node"]) == (240, 1, 1)


@pytest.mark.parametrize(("conf_dir", "config"), [("conf", "rl"), ("conf/pipeline", "data")])
def test_local_launcher_config(conf_dir, config):
    with initialize_config_dir(config_dir=str(REPO / conf_dir), version_base="1.3"):
        cfg = compose(config, overrides=["hydra/launcher=local"], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
    assert launcher["tasks_per_node"] == 1
