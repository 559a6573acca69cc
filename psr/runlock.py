"""One writer per run directory: an exclusive lock file that holds on shared filesystems.

Who locks what:
  - ``psr-rl``, ``psr-sft``, ``psr-eval``: their run directory (``<run_dir>/.psr.lock``), taken in
    ``setup()`` before anything is written there and released in ``cleanup()``. All ranks of one job
    share the run directory, so only global rank 0 holds the lock, for all of them
    (:func:`lock_run_dir`: the other ranks learn rank 0's outcome and fail with it).
  - ``psr-data``: each shard it works on (``<out_dir>/.psr-data.shard-00003-of-00008.lock``) and the
    export (``<out_dir>/.psr-data.export.lock``): array tasks write different shards of one
    ``out_dir`` in parallel by design, so the unit of exclusion is the shard, not the directory.

How: the lock is a file created atomically with its content (JSON naming the holder, written to a
unique file and hard-linked to the lock's name; the link fails if the name exists, atomically on NFS
and Lustre too; where hard links are not supported, ``O_CREAT | O_EXCL``). ``flock`` is not used: it
is not reliable across the clients of a network filesystem. A second process fails at once with a
:class:`RunLockError` naming the holder (host, pid, Slurm job) and the lock file.

A lock whose holder is gone is taken over:
  - same host: its pid is gone (or is another process now: start time differs; or the host has
    rebooted since), or it is this very process (an earlier attempt in it that never released);
  - our own ``SLURM_JOB_ID`` (another host): a requeued job, whose earlier run Slurm has ended, so
    requeue + ``resume=auto`` keeps working;
  - another Slurm job of this cluster that ``squeue`` / ``scontrol`` report as no longer running.
Anything else (another host without Slurm, or Slurm that cannot tell) is refused, with the file to
delete once the holder is known to be gone.

Takeover is race-free: of the processes that judge one stale lock (identified by the random token
inside it), only the one that creates the marker ``<lock>.takeover-<token>`` with ``O_EXCL`` removes
it; it re-reads the lock first and removes it only if it still holds that token. Then everyone races
to create a fresh lock, and exactly one wins; the others see a live holder and fail.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["Holder", "RunLock", "RunLockError", "lock_run_dir", "slurm_job_running"]

log = logging.getLogger(__name__)

RUN_LOCK = ".psr.lock"
# Slurm states in which the job's processes may still be running (and writing)
_LIVE_STATES = {
    "RUNNING",
    "COMPLETING",
    "SUSPENDED",
    "CONFIGURING",
    "SIGNALING",
    "STAGE_OUT",
    "STOPPED",
    "RESIZING",
}
_MARKER_TIMEOUT_S = 10.0  # a takeover takes milliseconds; a marker this old was left by a killed taker


class RunLockError(RuntimeError):
    """The directory is held by another live process (or one whose state cannot be told)."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: what the lock file's JSON says."""

    host: str
    pid: int
    slurm_job_id: str | None
    slurm_array_task: str | None  # "<array job id>_<task id>" for an array task
    started: str  # ISO 8601, UTC
    command: str
    token: str  # random: tells two locks apart even with the same host and pid
    boot_id: str | None = None  # Linux: changes on reboot (a pid from before a reboot is gone)
    pid_start: int | None = None  # Linux: the process's start time in clock ticks since boot
    slurm_cluster: str | None = None

    @classmethod
    def current(cls, command: str) -> Holder:
        env = os.environ
        array = env.get("SLURM_ARRAY_JOB_ID")
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            slurm_job_id=env.get("SLURM_JOB_ID") or None,
            slurm_array_task=f"{array}_{env.get('SLURM_ARRAY_TASK_ID')}" if array else None,
            started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            command=command,
            token=uuid.uuid4().hex,
            boot_id=_boot_id(),
            pid_start=_pid_start(os.getpid()),
            slurm_cluster=env.get("SLURM_CLUSTER_NAME") or None,
        )

    @classmethod
    def from_json(cls, text: str) -> Holder:
        data: dict[str, Any] = json.loads(text)
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def describe(self) -> str:
        job = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ", not under Slurm"
        if self.slurm_array_task:
            job += f" (array task {self.slurm_array_task})"
        return f"{self.command} on host {self.host}, pid {self.pid}{job}, started {self.started}"


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (state first), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def _pid_start(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None  # field 22 of proc(5)


def _process_alive(pid: int, pid_start: int | None) -> bool:
    """Whether ``pid`` runs on this host and is the process that was started at ``pid_start``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    fields = _proc_stat(pid)
    if fields is None:
        return True  # no /proc: trust the signal test
    if fields[0] in ("Z", "X"):
        return False  # killed, not yet reaped by its parent: writes nothing any more
    return pid_start is None or _pid_start(pid) == pid_start  # else the pid was reused


def _run_quiet(cmd: list[str]) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None


def slurm_job_running(job_id: str) -> bool | None:
    """Whether Slurm job ``job_id`` may still have running processes: ``squeue``, else ``scontrol``.

    Returns:
        True (a live state), False (finished, pending, or unknown to Slurm), None (neither command
        exists or could answer, e.g. the controller is unreachable).
    """
    if shutil.which("squeue"):
        done = _run_quiet(["squeue", "-h", "-j", str(job_id), "-o", "%T"])
        if done is not None:
            if done.returncode == 0:
                states = done.stdout.split()
                return bool(states) and states[0].upper() in _LIVE_STATES
            if "invalid job id" in done.stderr.lower():
                return False
    if shutil.which("scontrol"):
        done = _run_quiet(["scontrol", "show", "job", str(job_id)])
        if done is not None:
            if done.returncode == 0:
                found = re.search(r"JobState=(\w+)", done.stdout)
                if found:
                    return found.group(1).upper() in _LIVE_STATES
            elif "invalid job id" in done.stderr.lower():
                return False
    return None


def holder_gone(holder: Holder, me: Holder) -> tuple[bool | None, str]:
    """Whether the process that wrote a lock is gone: True, False, or None (cannot tell); and why."""
    if holder.host == me.host:
        if holder.boot_id and me.boot_id and holder.boot_id != me.boot_id:
            return True, f"host {holder.host} has rebooted since"
        if holder.pid == me.pid:
            return True, "this process took it earlier and did not release it"
        if _process_alive(holder.pid, holder.pid_start):
            return False, f"pid {holder.pid} is running on this host"
        return True, f"pid {holder.pid} is no longer running on host {holder.host}"
    if holder.slurm_job_id and holder.slurm_job_id == me.slurm_job_id:
        return True, f"it is this Slurm job {me.slurm_job_id} (requeued; its earlier run has ended)"
    if holder.slurm_job_id and holder.slurm_cluster == me.slurm_cluster:
        running = slurm_job_running(holder.slurm_job_id)
        if running is not None:
            state = "is still running" if running else "is no longer running"
            return (not running), f"Slurm job {holder.slurm_job_id} {state}"
        return None, f"squeue / scontrol cannot say whether Slurm job {holder.slurm_job_id} still runs"
    where = f"Slurm job {holder.slurm_job_id} of another cluster" if holder.slurm_job_id else "no Slurm job"
    return None, f"it was taken on another host ({holder.host}, {where}), where its pid cannot be checked"


class RunLock:
    """An exclusive lock on a directory, held by one process; a context manager.

    Args:
        directory: the directory to lock (created if missing).
        command: what holds it, for the messages (``psr-rl``, ``psr-data``, ...).
        key: the setting that chooses the directory, named in the message of a refused lock.
        name: the lock file's name inside ``directory``.

    ``acquire`` raises :class:`RunLockError` when another live process holds the lock. The lock is
    released by :meth:`release`, on leaving a ``with`` block (exceptions included) and at interpreter
    exit; a process killed outright leaves a stale lock that the next run takes over.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        command: str,
        key: str = "run_dir",
        name: str = RUN_LOCK,
    ) -> None:
        self.directory = Path(directory)
        self.path = self.directory / name
        self.command, self.key = command, key
        self.holder: Holder | None = None  # set while this process holds the lock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self.holder is not None

    # -- acquire / release --------------------------------------------------------------------------
    def acquire(self, timeout: float = _MARKER_TIMEOUT_S) -> RunLock:
        """Take the lock, or raise :class:`RunLockError` naming its holder. Returns ``self``."""
        if self.holder is not None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        me = Holder.current(self.command)
        deadline = time.monotonic() + timeout
        while True:
            if self._create(me):
                self.holder = me
                atexit.register(self.release)
                return self
            holder = self._read()
            if holder is not None:  # None: released (or taken over) meanwhile; try again
                gone, why = holder_gone(holder, me)
                if gone is False:
                    raise RunLockError(
                        f"{self.directory} is in use by {holder.describe()} ({why}). One process writes "
                        f"a run directory at a time: wait for it to end, stop it, or choose another "
                        f"{self.key}. Lock file: {self.path}"
                    )
                if gone is None:
                    raise RunLockError(
                        f"{self.directory} is locked by {holder.describe()}, and whether it still runs "
                        f"cannot be told from {me.host}: {why}. If it has ended, delete {self.path} and "
                        f"start again; if it still runs, choose another {self.key}"
                    )
                log.warning(
                    "%s: taking over the lock %s of %s: %s", self.command, self.path, holder.describe(), why
                )
                self._take_over(holder)
            if time.monotonic() > deadline:
                raise RunLockError(f"could not take the lock {self.path} within {timeout:.0f} s; try again")
            time.sleep(0.02)

    def release(self) -> None:
        """Remove the lock if this process still holds it (a no-op otherwise)."""
        if self.holder is None:
            return
        atexit.unregister(self.release)
        current = self._read(wait=0.0)
        if current is not None and current.token == self.holder.token:
            self.path.unlink(missing_ok=True)
        elif current is None or (current.host, current.pid) != (self.holder.host, self.holder.pid):
            # (a later lock of this same process, e.g. a second trainer after a failed set-up: its own)
            log.warning("%s: the lock %s is no longer this process's; left as it is", self.command, self.path)
        self.holder = None

    # -- the file -----------------------------------------------------------------------------------
    def _create(self, me: Holder) -> bool:
        """Create the lock holding ``me``'s JSON, complete or not at all; False if it exists."""
        text = json.dumps(asdict(me), indent=1) + "\n"
        # the ``.tmp-`` prefix of psr's temp entries: one left by a kill is cleaned up like the others
        tmp = self.path.with_name(f".tmp-{self.path.name}.{me.token}")
        with tmp.open("x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                pass
            except OSError as err:
                if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV):
                    raise
                return self._create_exclusive(text)  # no hard links on this filesystem
            # over NFS a retransmitted link may report an error after it succeeded: the link count tells
            return os.stat(tmp).st_nlink == 2
        finally:
            tmp.unlink(missing_ok=True)

    def _create_exclusive(self, text: str) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self, wait: float = 1.0) -> Holder | None:
        """The holder in the lock file; None if there is no lock file. A file still being written
        (``O_EXCL`` fallback) is read again for up to ``wait`` seconds before it counts as broken."""
        deadline = time.monotonic() + wait
        while True:
            try:
                text = self.path.read_text(encoding="utf-8")
            except FileNotFoundError:
                return None
            try:
                return Holder.from_json(text)
            except (ValueError, TypeError) as err:
                if time.monotonic() > deadline:
                    raise RunLockError(
                        f"the lock file {self.path} is not readable ({err}); if no process writes "
                        f"{self.directory} now, delete it and start again"
                    ) from err
            time.sleep(0.05)

    def _take_over(self, stale: Holder) -> None:
        """Remove the lock file if it still holds ``stale``; only one process does so (see the module
        docstring). Returns without removing it when another process is doing the same."""
        marker = self.path.with_name(f"{self.path.name}.takeover-{stale.token}")
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - marker.stat().st_mtime > _MARKER_TIMEOUT_S:
                    raise RunLockError(
                        f"a takeover of the stale lock {self.path} was interrupted; delete {marker} and "
                        f"{self.path} and start again"
                    ) from None
            return
        try:
            current = self._read()
            if current is not None and current.token == stale.token:
                self.path.unlink(missing_ok=True)
        finally:
            # safe to drop now: the stale token is gone from the lock, so a late taker that wins
            # this marker re-reads another token and removes nothing
            marker.unlink(missing_ok=True)


def lock_run_dir(directory: str | os.PathLike[str], command: str, *, rank: int = 0) -> RunLock:
    """Lock a trainer's or evaluator's run directory for a job of one or more ranks (collective).

    Global rank 0 takes the lock for every rank of its job (they share the run directory); its
    outcome is broadcast, so on a refused lock every rank raises the same :class:`RunLockError`
    instead of waiting for rank 0 at the next collective.

    Args:
        directory: the run directory.
        command: ``psr-rl``, ``psr-sft`` or ``psr-eval``, for the messages.
        rank: this process's global rank.

    Returns:
        The lock (held on rank 0 only); call :meth:`RunLock.release` in ``cleanup()``.
    """
    from psr.distributed import broadcast_object

    lock = RunLock(directory, command=command, key="run_dir (or hydra.run.dir)")
    error = None
    if rank == 0:
        try:
            lock.acquire()
        except RunLockError as err:
            error = str(err)
    error = broadcast_object(error)
    if error is not None:
        lock.release()
        raise RunLockError(error)
    return lock
