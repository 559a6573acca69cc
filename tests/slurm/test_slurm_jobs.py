"""psr's sbatch templates and submitit launcher on a real (one-node, loopback) Slurm cluster, on CPU.

Needs ``bash scripts/slurm_local.sh start`` (``.ci/run`` does it); fails, never skips, without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_helpers import REPO, Slurm, job_records, read_metrics

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]

# the RL quickstart cut down to seconds per step on a shared 2-core CPU
TINY_RL = (
    "experiment=quickstart",
    "train.steps=3",
    "train.checkpoint_every=2",
    "train.eval_every=0",
    "train.grid_every=0",
    "train.group_size=2",
    "train.prompts_per_step=1",
    "train.micro_batch_size=2",
    "train.resolution=32",
    "sampler.num_steps=3",
)
TINY_SFT = ("experiment=quickstart", "data=synthetic", "validation.every=0")


def test_rl_two_tasks(slurm: Slurm) -> None:
    """srun starts 2 ranks that meet at MASTER_ADDR:MASTER_PORT (gloo) and train to the end."""
    job = slurm.sbatch("rl.sbatch", "--ntasks-per-node=2", overrides=TINY_RL)
    slurm.assert_completed(slurm.wait(job, timeout=240), job)
    run_dir = slurm.root / f"psr-rl-{job}"
    assert sorted(read_metrics(run_dir)) == [1, 2, 3]
    last = run_dir / "checkpoints" / "step_00000003"
    assert (last / "COMPLETE").is_file()
    assert sorted(p.name for p in (last / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    assert f"job {job} (psr-rl) restart 0 on " in slurm.output(
        job
    ) and ": 2 tasks, device cpu" in slurm.output(job)


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_data_array_matches_one_process(slurm: Slurm, tmp_path: Path) -> None:
    """A 2-task array job (shard i of 2 per task, one out_dir) exports the same dataset, byte for byte,
    as one process running every shard."""
    overrides = ("experiment=quickstart", "plan.num_records=8")
    job = slurm.sbatch("data_array.sbatch", "--array=0-1", overrides=overrides)
    single = tmp_path / "single"
    done = subprocess.run(
        [
            str(Path(sys.prefix) / "bin" / "psr-data"),
            *overrides,
            f"out_dir={single}",
            f"hydra.run.dir={tmp_path / 'single-hydra'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = slurm.wait(job, timeout=240)
    slurm.assert_completed(records, job)
    assert len(records) == 2
    data = slurm.root / f"psr-data-{job}" / "data"
    assert sorted(p.name for p in (data / "filter").glob("shard-*")) == [
        "shard-00000-of-00002",
        "shard-00001-of-00002",
    ]
    manifest = (data / "export" / "manifest.jsonl").read_text()
    assert manifest.count("\n") >= 4, manifest  # the quickstart keeps most of its records
    assert manifest == (single / "export" / "manifest.jsonl").read_text()
    assert _tree_digest(data / "export" / "images") == _tree_digest(single / "export" / "images")


def test_eval_two_tasks_matches_one_process(slurm: Slurm, tmp_path: Path) -> None:
    """eval.sbatch with 2 tasks splits the records between its ranks and writes the scores and the
    summary one local process writes, sample for sample."""
    overrides = ("experiment=quickstart", "data.num_records=5", "eval.resolution=32", "eval.num_steps=3")
    job = slurm.sbatch("eval.sbatch", "--ntasks-per-node=2", overrides=overrides)
    single = tmp_path / "single"
    done = subprocess.run(
        [str(Path(sys.prefix) / "bin" / "psr-eval"), *overrides, f"hydra.run.dir={single}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    slurm.assert_completed(slurm.wait(job, timeout=240), job)
    run_dir = slurm.root / f"psr-eval-{job}"
    assert ": 2 tasks, device cpu" in slurm.output(job)
    rows = (run_dir / "scores.jsonl").read_text().splitlines()
    assert len(rows) == 10  # 5 records x 2 samples
    assert rows == (single / "scores.jsonl").read_text().splitlines()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary == json.loads((single / "summary.json").read_text())


def _wait_for(what: str, predicate, slurm: Slurm, job: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        state = job_records(job)[0].get("JobState")
        assert time.monotonic() < deadline and state not in ("COMPLETED", "FAILED", "CANCELLED"), (
            f"waiting for {what}: job {job} is {state}\n{slurm.output(job)}"
        )
        time.sleep(0.1)
    return value


def _complete_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*/COMPLETE"))


def _resumed_at(slurm: Slurm, job: str) -> list[int]:
    return [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", slurm.output(job))]


def test_preempted_job_resumes_to_the_same_metrics(slurm: Slurm) -> None:
    """Interrupted twice -- USR1 to the step's tasks (what --signal=USR1@120 sends before the time limit:
    checkpoint, then rank 0 requeues) and `scontrol requeue` (SIGTERM, as on preemption) -- the job
    resumes from its checkpoints (resume=auto, run dir keyed by the job id) and logs at every step the
    values of an uninterrupted run."""
    overrides = (*TINY_SFT, "train.steps=60", "train.checkpoint_every=5")
    reference = slurm.sbatch("sft.sbatch", "--ntasks-per-node=2", overrides=overrides)
    job = slurm.sbatch("sft.sbatch", "--ntasks-per-node=2", overrides=overrides)
    run_dir = slurm.root / f"psr-sft-{job}"

    _wait_for("a first checkpoint", lambda: _complete_steps(run_dir) if run_dir.exists() else [], slurm, job)
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
    first = _wait_for("the first resume", lambda: _resumed_at(slurm, job), slurm, job)[0]
    _wait_for("a checkpoint after the resume", lambda: max(_complete_steps(run_dir)) > first, slurm, job)
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)

    records = slurm.wait(job, timeout=240)
    slurm.assert_completed(records, job)
    log = slurm.output(job)
    assert records[0]["Restarts"] == "2", log
    assert "SIGUSR1 at step" in log and f"requeued Slurm job {job}" in log and "DUE TO JOB REQUEUE" in log, (
        log
    )
    resumed = _resumed_at(slurm, job)
    assert len(resumed) == 2 and 0 < resumed[0] < resumed[1] < 60, resumed
    slurm.assert_completed(slurm.wait(reference, timeout=120), reference)

    want = read_metrics(slurm.root / f"psr-sft-{reference}")
    got = read_metrics(run_dir)
    assert sorted(want) == sorted(got) == list(range(1, 61))
    for step in want:  # the same arithmetic in the same order after a resume: equal to the last bit
        assert got[step] == want[step], f"step {step}: {got[step]} != {want[step]}"


def test_scancel_stops_the_job(slurm: Slurm) -> None:
    """scancel (SIGTERM to every process) ends a job for good: the trainer saves a checkpoint but must
    not requeue a job its user cancelled."""
    job = slurm.sbatch("sft.sbatch", overrides=(*TINY_SFT, "train.steps=400", "train.checkpoint_every=5"))
    run_dir = slurm.root / f"psr-sft-{job}"
    _wait_for("a first checkpoint", lambda: _complete_steps(run_dir) if run_dir.exists() else [], slurm, job)
    subprocess.run(["scancel", job], check=True, timeout=30)
    time.sleep(15)  # longer than KillWait (10 s), so a requeue by the trainer would show
    record = job_records(job)[0]
    state = (record["JobState"], record["Restarts"])
    assert state == ("CANCELLED", "0"), f"(JobState, Restarts) = {state} after scancel\n{slurm.output(job)}"


def test_multirun_sweep_on_slurm(slurm: Slurm, tmp_path: Path) -> None:
    """--multirun with hydra/launcher=slurm submits one job per point (submitit) and waits for them."""
    sweep = tmp_path / "sweep"
    cmd = [
        str(Path(sys.prefix) / "bin" / "psr-sft"),
        "--multirun",
        "hydra/launcher=slurm",
        "seed=0,1",
        *TINY_SFT,
        "train.steps=4",
        "train.checkpoint_every=4",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PSR_", "SLURM_"))}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    submitted = re.findall(r"Submitted batch job (\d+)", done.stdout + done.stderr) or [
        p.name for p in (sweep / ".submitit").iterdir() if p.name.isdigit()
    ]
    slurm.jobs.extend(submitted)
    runs = [read_metrics(sweep / str(i)) for i in (0, 1)]
    assert [sorted(r) for r in runs] == [[1, 2, 3, 4], [1, 2, 3, 4]]
    assert runs[0][1]["train/loss"] != runs[1][1]["train/loss"], "seed=0 and seed=1 trained the same"
    assert sorted(p.name for p in (sweep / ".submitit").glob("*/*_result.pkl")) == [
        f"{submitted[0]}_0_0_result.pkl",
        f"{submitted[0]}_1_0_result.pkl",
    ]
