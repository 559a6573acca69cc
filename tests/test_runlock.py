"""One writer per run directory (psr/runlock.py): real second processes fail at once naming the
holder; stale locks (SIGKILLed holder, finished Slurm job, requeued job) are taken over; a lock that
cannot be judged is refused with the file to delete; of several processes racing for one stale lock
exactly one wins."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from psr.runlock import RUN_LOCK, Holder, RunLock, RunLockError, lock_run_dir

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# a process that takes a lock, says so, and holds it for argv[4] seconds
HOLD = """
import sys, time
from psr.runlock import RunLock
lock = RunLock(sys.argv[1], command=sys.argv[2], name=sys.argv[3]).acquire()
print("locked", flush=True)
time.sleep(float(sys.argv[4]))
lock.release()
"""

# one of several racers: waits for the start file, tries the lock, reports, holds it a while if won
RACE = """
import os, sys, time
from psr.runlock import RunLock, RunLockError
go = sys.argv[2]
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
try:
    lock = RunLock(sys.argv[1], command="racer").acquire()
except RunLockError as err:
    print("HELD", err, flush=True)
else:
    print("WON", flush=True)
    time.sleep(3.0)  # long enough for every other racer to find it held
    lock.release()
"""


def env() -> dict[str, str]:
    out = {
        k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "SLURM_"))
    }
    out.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    return out


def hold(
    directory: Path, command: str = "psr-rl", name: str = RUN_LOCK, seconds: float = 60
) -> subprocess.Popen:
    """A child process holding the lock (returns once it does)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(directory), command, name, str(seconds)],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked", proc.communicate()[0]
    return proc


def dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def write_lock(directory: Path, **fields) -> Path:
    """A lock file as another process would have left it."""
    holder = {
        "host": "node-a",
        "pid": 4242,
        "slurm_job_id": None,
        "slurm_array_task": None,
        "started": "2026-01-01T00:00:00+00:00",
        "command": "psr-rl",
        "token": "f" * 32,
        **fields,
    }
    path = directory / RUN_LOCK
    path.write_text(json.dumps(holder))
    return path


@pytest.fixture
def no_slurm(monkeypatch, tmp_path):
    """No Slurm variables, and no squeue / scontrol on PATH."""
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def fake_squeue(monkeypatch, tmp_path: Path, state: str) -> None:
    """``squeue -h -j ID -o %T`` printing ``state`` ("" : a job Slurm no longer knows)."""
    bin_dir = tmp_path / "slurm-bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "squeue"
    script.write_text(f"#!/bin/sh\necho '{state}'\n" if state else "#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))


# ---------------------------------------------------------------------------------------------- real CLIs


@pytest.mark.parametrize(
    "script, args",
    [
        ("psr-rl", ["experiment=quickstart", "train.steps=1"]),
        ("psr-eval", ["experiment=quickstart"]),
    ],
)
def test_second_cli_on_a_held_run_dir_fails_at_once_naming_the_holder(tmp_path, script, args):
    run_dir = tmp_path / "run"
    holder = hold(run_dir, script)
    try:
        start = time.monotonic()
        done = subprocess.run(
            [str(BIN / script), *args, f"hydra.run.dir={run_dir}"],
            cwd=tmp_path,
            env=env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        seconds = time.monotonic() - start
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode != 0, done.stdout[-2000:]
    for word in (f"pid {holder.pid}", socket.gethostname(), str(run_dir / RUN_LOCK), "not under Slurm"):
        assert word in done.stderr, f"{word!r} not in:\n{done.stderr[-3000:]}"
    assert seconds < 60, f"{script} took {seconds:.0f} s to refuse"
    # nothing of a run was written (Hydra's own .hydra/ and log file come before the app starts)
    assert not {"checkpoints", "metrics.jsonl", "scores.jsonl", "samples"} & {
        p.name for p in run_dir.iterdir()
    }


def test_second_psr_data_on_one_shard_fails_at_once_and_a_killed_one_is_taken_over(tmp_path):
    from data_pipeline.cli import data_lock

    out = tmp_path / "data"
    lock = out / ".psr-data.shard-00000-of-00001.lock"
    holder = hold(out, "psr-data", lock.name)  # what a running psr-data on shard 0 of 1 holds
    try:
        second = subprocess.run(
            [
                str(BIN / "psr-data"),
                "experiment=quickstart",
                f"out_dir={out}",
                f"hydra.run.dir={tmp_path / 'h'}",
            ],
            cwd=tmp_path,
            env=env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert holder.poll() is None
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert second.returncode != 0
    for word in ("psr-data shard-00000-of-00001", f"pid {holder.pid}", str(lock), "out_dir"):
        assert word in second.stderr, f"{word!r} not in:\n{second.stderr[-3000:]}"
    assert sorted(p.name for p in out.iterdir()) == [lock.name]  # no stage was started
    # the SIGKILLed holder left its lock behind; the next run on this host takes it over
    assert json.loads(lock.read_text())["pid"] == holder.pid
    with data_lock(out, "shard-00000-of-00001") as mine:
        assert json.loads(lock.read_text())["token"] == mine.holder.token
    assert not lock.exists()


# ---------------------------------------------------------------------------------------------- stale locks


def test_lock_of_a_sigkilled_process_is_taken_over(tmp_path):
    holder = hold(tmp_path)
    with pytest.raises(RunLockError, match=f"pid {holder.pid} is running"):
        RunLock(tmp_path, command="psr-rl").acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = RunLock(tmp_path, command="psr-rl").acquire()
    assert json.loads((tmp_path / RUN_LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / RUN_LOCK).exists()


def test_lock_of_a_dead_pid_on_this_host_is_taken_over(tmp_path):
    write_lock(tmp_path, host=socket.gethostname(), pid=dead_pid())
    with RunLock(tmp_path, command="psr-rl") as lock:
        assert lock.held


def test_lock_from_another_host_without_slurm_is_refused_with_the_removal_hint(tmp_path, no_slurm):
    path = write_lock(tmp_path, host="node-a", pid=4242)
    with pytest.raises(RunLockError) as err:
        RunLock(tmp_path, command="psr-rl").acquire()
    message = str(err.value)
    for word in ("node-a", "pid 4242", "not under Slurm", f"delete {path}", "another run_dir"):
        assert word in message, message
    assert json.loads(path.read_text())["pid"] == 4242  # left as it was


def test_slurm_job_of_another_host_that_slurm_cannot_judge_is_refused(tmp_path, no_slurm):
    path = write_lock(tmp_path, slurm_job_id="777")
    with pytest.raises(
        RunLockError, match=f"squeue / scontrol cannot say whether Slurm job 777.*delete {path}"
    ):
        RunLock(tmp_path, command="psr-rl").acquire()


def test_requeued_slurm_job_takes_over_its_own_lock(tmp_path, no_slurm, monkeypatch):
    write_lock(tmp_path, host="node-a", slurm_job_id="777")
    monkeypatch.setenv("SLURM_JOB_ID", "777")  # the same job, requeued onto another node
    with RunLock(tmp_path, command="psr-rl") as lock:
        assert json.loads((tmp_path / RUN_LOCK).read_text())["token"] == lock.holder.token
    assert not (tmp_path / RUN_LOCK).exists()


@pytest.mark.parametrize(
    "state, taken", [("RUNNING", False), ("COMPLETING", False), ("PENDING", True), ("", True)]
)
def test_slurm_job_of_another_host_is_judged_by_squeue(tmp_path, no_slurm, monkeypatch, state, taken):
    write_lock(tmp_path, slurm_job_id="888", slurm_array_task="880_8")
    fake_squeue(monkeypatch, tmp_path, state)
    lock = RunLock(tmp_path, command="psr-rl", key="out_dir")
    if taken:
        lock.acquire().release()
    else:
        with pytest.raises(
            RunLockError, match=r"Slurm job 888 \(array task 880_8\).*still running.*another out_dir"
        ):
            lock.acquire()


def test_concurrent_takeover_of_one_stale_lock_has_exactly_one_winner(tmp_path):
    write_lock(tmp_path, host=socket.gethostname(), pid=dead_pid())
    go = tmp_path / "go"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(tmp_path), str(go)],
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(6)
    ]
    for proc in racers:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    go.touch()
    outputs = [proc.communicate(timeout=60)[0] for proc in racers]
    # one result line each (a racer that took over the stale lock also logs a warning)
    results = [next(line for line in o.splitlines() if line.startswith(("WON", "HELD"))) for o in outputs]
    assert sorted(r.split()[0] for r in results) == ["HELD"] * 5 + ["WON"], outputs
    assert all("is in use by racer" in r for r in results if r.startswith("HELD")), outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go"]  # released; no markers or temp files left


def test_takeover_does_not_remove_a_lock_renewed_meanwhile(tmp_path):
    """A process that judged the old lock stale finds a fresh one in its place: it removes nothing."""
    stale = Holder.from_json(write_lock(tmp_path, host=socket.gethostname(), pid=dead_pid()).read_text())
    fresh = RunLock(tmp_path, command="psr-rl").acquire()  # took it over
    RunLock(tmp_path, command="psr-rl")._take_over(stale)
    assert json.loads((tmp_path / RUN_LOCK).read_text())["token"] == fresh.holder.token
    fresh.release()


# ---------------------------------------------------------------------------------------------- release


def test_released_on_exceptions_and_never_removes_another_holders_lock(tmp_path):
    with pytest.raises(KeyError), RunLock(tmp_path, command="psr-rl"):
        raise KeyError("a failure inside the run")
    assert not (tmp_path / RUN_LOCK).exists()
    lock = RunLock(tmp_path, command="psr-rl").acquire()
    write_lock(tmp_path, host="node-a")  # someone deleted ours by hand and another run took it
    lock.release()
    assert json.loads((tmp_path / RUN_LOCK).read_text())["host"] == "node-a"


def test_only_global_rank_zero_locks(tmp_path):
    other = lock_run_dir(tmp_path, "psr-rl", rank=1)
    assert not other.held and not (tmp_path / RUN_LOCK).exists()
    main = lock_run_dir(tmp_path, "psr-rl", rank=0)
    assert main.held and json.loads((tmp_path / RUN_LOCK).read_text())["command"] == "psr-rl"
    main.release()
