"""Preemption: Slurm's SIGTERM / SIGUSR1 (sent before preemption or the time limit) turned into a flag
the trainer checks at step boundaries, so every rank saves a checkpoint at the same step and stops;
with ``--requeue``, rank 0 requeues the job and ``resume=auto`` picks the checkpoint up.

Usage (see :func:`psr.checkpoint.checkpoint_or_stop`)::

    preemption = PreemptionHandler(requeue=True)
    for step in ...:
        ...
        preemption.poll()                    # collective, once per step on every rank
        if checkpoint_or_stop(name, step, step % every == 0, preemption, save):
            return
    preemption.uninstall()
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["PreemptionHandler", "requeue_slurm_job"]


def requeue_slurm_job(job_id: str | None = None) -> None:
    """``scontrol requeue <job>`` for this Slurm job (``SLURM_JOB_ID``); raises with scontrol's output."""
    job_id = job_id or os.environ.get("SLURM_JOB_ID")
    if not job_id:
        raise RuntimeError("requeue asked for, but SLURM_JOB_ID is not set (not running under Slurm)")
    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"scontrol requeue {job_id} failed ({done.returncode}): {done.stderr.strip()} "
            "(is the job submitted with --requeue?)"
        )


class PreemptionHandler:
    """Turns SIGTERM / SIGUSR1 (what Slurm sends before preemption or the time limit) into a flag.

    The handler only records the signal; the trainer checks at step boundaries, saves a checkpoint,
    calls :meth:`exit` and returns normally. Handlers are installed on construction (main thread
    only) and the previous ones restored by :meth:`uninstall` or on leaving a ``with`` block.

    Args:
        signals: signal names to catch.
        requeue: in :meth:`exit`, rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` when under Slurm.
        install: install the handlers now.
    """

    def __init__(
        self, signals: Iterable[str] = ("SIGTERM", "SIGUSR1"), requeue: bool = False, install: bool = True
    ) -> None:
        self.signals = [
            getattr(signal, name) if isinstance(name, str) else signal.Signals(name) for name in signals
        ]
        self.requeue = bool(requeue)
        self.signal_name: str | None = None
        self._agreed = False
        self._previous: dict[int, Any] = {}
        if install:
            self.install()

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name

    def install(self) -> PreemptionHandler:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    @property
    def triggered(self) -> bool:
        """This process received a signal (or :meth:`poll` agreed that some rank did)."""
        return self.signal_name is not None or self._agreed

    def poll(self, reduce_max: Callable[[float], float] | None = None) -> bool:
        """Whether any rank was signalled (collective when distributed): call once per step, at the
        same point on every rank, so all ranks save and stop at the same step. Ranks also agree on
        which signal: SIGUSR1 (asks for a requeue) wins over SIGTERM (asks to stop)."""
        from psr.distributed import all_reduce_max

        reduce = reduce_max or all_reduce_max
        code = {None: 0.0, "SIGTERM": 1.0, "SIGUSR1": 2.0}.get(self.signal_name, 1.0)
        agreed = reduce(code)
        self._agreed = agreed > 0
        if self._agreed and self.signal_name != "SIGUSR1":
            self.signal_name = "SIGUSR1" if agreed >= 2 else (self.signal_name or "SIGTERM")
        return self._agreed

    def exit(self, message: str, rank: int | None = None) -> None:
        """Report the stop and, with ``requeue`` under Slurm, requeue the job from rank 0. Returns,
        so the trainer can close its logger and process group and return normally."""
        if rank is None:
            from psr.distributed import rank as current_rank

            rank = current_rank()
        print(message, file=sys.stderr, flush=True)
        # only SIGUSR1 (what the sbatch templates ask for before the time limit) requeues: SIGTERM
        # comes from scancel (stop) or from Slurm's own preemption/requeue, which requeues by itself
        if self.requeue and self.signal_name == "SIGUSR1" and rank == 0 and os.environ.get("SLURM_JOB_ID"):
            requeue_slurm_job()
            print(f"requeued Slurm job {os.environ['SLURM_JOB_ID']}", file=sys.stderr, flush=True)
