"""Preemption: signals become a flag, ranks agree on it, and rank 0 requeues the Slurm job."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest

from psr.preemption import PreemptionHandler


def test_sigusr1_sets_the_flag_and_handlers_are_restored() -> None:
    previous = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler() as handler:
        assert not handler.triggered and not handler.poll(lambda v: v)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.triggered and handler.signal_name == "SIGUSR1"
        assert handler.poll(lambda v: v)
    assert signal.getsignal(signal.SIGUSR1) is previous


def test_poll_agrees_when_only_a_peer_was_signalled() -> None:
    with PreemptionHandler(install=False) as handler:
        assert handler.poll(lambda v: max(v, 1.0))  # what all_reduce_max returns when a peer got SIGTERM
        assert handler.triggered and handler.signal_name == "SIGTERM"
    with PreemptionHandler(install=False) as handler:
        handler.signal_name = "SIGTERM"
        assert handler.poll(lambda v: max(v, 2.0))  # a peer got SIGUSR1: the requeue request wins
        assert handler.signal_name == "SIGUSR1"


def test_exit_requeues_the_slurm_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "calls"
    fake = tmp_path / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    handler = PreemptionHandler(requeue=True, install=False)
    handler.signal_name = "SIGTERM"  # scancel, or Slurm's own preemption (which requeues by itself)
    handler.exit("stopping", rank=0)
    assert not log.exists()
    handler.signal_name = "SIGUSR1"  # the sbatch templates' --signal=USR1@120 before the time limit
    handler.exit("stopping", rank=1)  # only rank 0 requeues
    assert not log.exists()
    handler.exit("stopping", rank=0)
    assert log.read_text().split() == ["requeue", "4242"]
    fake.write_text("#!/bin/sh\necho 'Requested operation is presently disabled' >&2\nexit 1\n")
    with pytest.raises(RuntimeError, match="--requeue"):
        handler.exit("stopping", rank=0)
