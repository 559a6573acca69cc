"""Helpers for the Slurm tests: submit psr's sbatch templates to a real cluster and wait for them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}


def _run(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def cluster_problem() -> str | None:
    """Why the local cluster cannot take jobs, or None when it can."""
    why = os.environ.get("PSR_SLURM_ERROR")  # set by .ci/run when install or start failed
    hint = "start it with: bash scripts/slurm_local.sh install && bash scripts/slurm_local.sh start"
    if shutil.which("sinfo") is None:
        return f"Slurm is not installed (no sinfo on PATH){': ' + why if why else ''}; {hint}"
    try:
        done = _run("sinfo", "-h", "-o", "%N %T", check=False, timeout=15)
    except subprocess.TimeoutExpired:
        return f"sinfo did not answer in 15 s (slurmctld down?); {hint}"
    if done.returncode != 0:
        return (
            f"sinfo failed: {done.stderr.strip() or done.stdout.strip()}{'; ' + why if why else ''}; {hint}"
        )
    states = [line.split()[-1] for line in done.stdout.splitlines() if line.strip()]
    if not any(re.match(r"(idle|mixed|allocated)\b", s) for s in states):
        return f"no node can take jobs (sinfo: {done.stdout.strip()!r}); {hint}"
    return None


def job_records(job_id: str) -> list[dict[str, str]]:
    """``scontrol show job -o`` as dicts, one per job (array tasks each get one)."""
    done = _run("scontrol", "show", "job", "-o", job_id, check=False)
    if done.returncode != 0:
        raise AssertionError(f"scontrol show job {job_id}: {done.stderr.strip()}")
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in done.stdout.splitlines() if line.strip()]


class Slurm:
    """Submits from the checkout with CPU settings and the test's venv; cancels what it leaves running."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.jobs: list[str] = []
        self.env = {
            **os.environ,
            "PSR_ROOT": str(REPO),
            "PSR_VENV": sys.prefix,
            "PSR_RUN_ROOT": str(root),
            "PSR_DEVICE": "cpu",
            "PYTHONUNBUFFERED": "1",
        }
        for name in ("PSR_RUN_DIR", "PSR_DATA_OUT", "PSR_PARTITION", "PSR_ACCOUNT", "PSR_QOS"):
            self.env.pop(name, None)

    def sbatch(self, script: str, *options: str, overrides: tuple[str, ...] = ()) -> str:
        """Submit ``slurm/<script>`` with sbatch ``options`` and Hydra ``overrides``; returns the job id."""
        out = f"--output={self.root}/%x-%j.out"
        cmd = ["sbatch", "--parsable", out, *options, f"slurm/{script}", *overrides]
        done = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"{' '.join(cmd)}: {done.stderr.strip()}"
        job_id = done.stdout.strip().split(";")[0]
        self.jobs.append(job_id)
        return job_id

    def output(self, job_id: str) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.root.glob(f"*-{job_id}*.out")))

    def wait(self, job_id: str, timeout: float) -> list[dict[str, str]]:
        """Poll until every job (or array task) of ``job_id`` ended; fails with the output on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            records = job_records(job_id)
            if records and all(r.get("JobState") in TERMINAL for r in records):
                return records
            if time.monotonic() > deadline:
                _run("scontrol", "update", f"JobId={job_id}", "Requeue=0", check=False)
                _run("scancel", job_id, check=False)
                states = [(r.get("JobId"), r.get("JobState"), r.get("Reason")) for r in records]
                raise AssertionError(
                    f"job {job_id} not done in {timeout:.0f} s: {states}\n{self.output(job_id)}"
                )
            time.sleep(0.5)

    def assert_completed(self, records: list[dict[str, str]], job_id: str) -> None:
        bad = [r for r in records if r.get("JobState") != "COMPLETED" or r.get("ExitCode") != "0:0"]
        assert not bad, (
            f"job {job_id}: {[(r.get('JobId'), r.get('JobState'), r.get('ExitCode')) for r in bad]}\n"
            f"{self.output(job_id)}"
        )

    def cancel_leftovers(self) -> None:
        for job_id in self.jobs:
            try:
                records = job_records(job_id)
            except AssertionError:  # already purged by slurmctld (MinJobAge)
                continue
            if any(r.get("JobState") not in TERMINAL for r in records):
                # no requeue first: a trainer that requeues on SIGTERM would bring a cancelled job back
                _run("scontrol", "update", f"JobId={job_id}", "Requeue=0", check=False)
                _run("scancel", job_id, check=False)


def read_metrics(run_dir: Path) -> dict[int, dict[str, Any]]:
    """metrics.jsonl as {step: values}, the last line per step (a resumed run logs the steps after its
    checkpoint again), wall-clock keys dropped."""
    path = run_dir / "metrics.jsonl"
    assert path.is_file(), f"no {path}"
    out: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        out[int(row["step"])] = {k: v for k, v in row.items() if k != "time" and not k.startswith("time/")}
    return out
