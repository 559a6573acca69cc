"""Files that other users of a shared cluster can read, written so that a kill never leaves half of one.

``tempfile.mkstemp`` / ``mkdtemp`` create 0600 / 0700 entries whatever the umask, and ``os.replace``
keeps that mode, so a file published through a temp name would stay private. Every temp entry made
here gets the mode an ordinary ``open`` / ``mkdir`` would have given it (``0o666 & ~umask`` /
``0o777 & ~umask``: 0644 / 0755 under umask 022) before it is published.

Temp entries are named ``.tmp-<name>.<random>`` next to their destination. A killed writer leaves
them behind; :func:`remove_stale_temps` deletes those older than the current process, called by the
next run of the same command on the same directory (which holds that directory's lock, so no live
writer owns them).

Usage::

    atomic_write(out_dir / "manifest.jsonl", text)          # str or bytes
    with atomic_open(path, "wb") as f:                     # any writer that takes a file object
        image.save(f, format="PNG")
    tmp = make_temp_dir(out_dir, "export")                 # publish later with os.replace(tmp, final)
    remove_stale_temps(out_dir, before=process_start_time())
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "TEMP_PREFIX",
    "umask",
    "file_mode",
    "dir_mode",
    "atomic_write",
    "atomic_open",
    "make_temp_dir",
    "process_start_time",
    "remove_stale_temps",
]

TEMP_PREFIX = ".tmp-"
# names of temp entries made before they were all called ``.tmp-*``: mkstemp files ``.<name>.XXXX.tmp``
# and psr-data's export directories ``export.partial-XXXX`` (a shard's ``*.partial`` is resume state)
_LEGACY_FILE_SUFFIX = ".tmp"
_LEGACY_DIR_PREFIX = "export.partial-"

_UMASK_LOCK = threading.Lock()
_IMPORTED = time.time()


def umask() -> int:
    """The process's current umask, read without changing it where the OS allows.

    Linux reports it in ``/proc/self/status``; elsewhere it is set and restored under a lock
    (``os.umask`` is process-wide, so two threads doing that at once could leave it at 0).
    """
    with contextlib.suppress(OSError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666 & ~umask``."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """The mode ``mkdir`` gives a new directory: ``0o777 & ~umask``."""
    return 0o777 & ~umask()


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"
) -> Iterator[IO[Any]]:
    """A file object whose contents replace ``path`` in one rename when the block ends without error.

    Readers see the old file or the whole new one; the new file is fsynced and has the mode of an
    ordinary file. On an error the temp file is removed and ``path`` is left as it was.

    Args:
        path: the destination; its parent directories are created.
        mode: ``"w"`` (text) or ``"wb"`` (bytes).
        encoding: for text mode.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode={mode!r}; expected 'w' or 'wb'")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{p.name}.", dir=p.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`); returns the path."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return Path(path)


def make_temp_dir(parent: str | os.PathLike, name: str) -> Path:
    """A new empty directory ``parent/.tmp-<name>.<random>`` with an ordinary directory's mode, to be
    filled and then published with ``os.replace`` (the caller removes it on failure)."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{name}.", dir=parent))
    tmp.chmod(dir_mode())
    return tmp


def process_start_time() -> float:
    """When this process started (Unix seconds), from ``/proc``; elsewhere when this module was imported."""
    with contextlib.suppress(OSError, ValueError, IndexError, StopIteration):
        with open("/proc/self/stat", encoding="ascii") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time after boot
        with open("/proc/stat", encoding="ascii") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    return _IMPORTED


def _is_temp(entry: os.DirEntry[str]) -> bool:
    name = entry.name
    if name.startswith(TEMP_PREFIX):
        return True
    if entry.is_dir(follow_symlinks=False):
        return name.startswith(_LEGACY_DIR_PREFIX)
    return name.startswith(".") and name.endswith(_LEGACY_FILE_SUFFIX)


def remove_stale_temps(directory: str | os.PathLike, *, before: float) -> list[Path]:
    """Delete the temp entries (files and directories) directly in ``directory`` last modified before
    ``before``: what a killed writer left. Returns what was deleted.

    Call it only while holding ``directory``'s lock (nobody else writes there), with ``before`` the
    start of this process (:func:`process_start_time`), so this run's own temp entries are never
    touched. A missing directory is fine (nothing to do).
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(os.fspath(directory)))
    except FileNotFoundError:
        return removed
    for entry in entries:
        try:
            if not _is_temp(entry) or entry.stat(follow_symlinks=False).st_mtime >= before:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except FileNotFoundError:  # gone meanwhile
            continue
        removed.append(Path(entry.path))
    return removed
