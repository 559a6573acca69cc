"""Atomic writes with the modes of ordinary files, and removal of the temp files of killed writers."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from psr.fileio import atomic_open, atomic_write, make_temp_dir, process_start_time, remove_stale_temps, umask


def test_atomic_files_and_temp_dirs_follow_the_umask(tmp_path: Path) -> None:
    before = os.umask(0o027)
    try:
        assert umask() == 0o027
        path = atomic_write(tmp_path / "a" / "x.txt", "hello")
        tmp = make_temp_dir(tmp_path, "export")
    finally:
        os.umask(before)
    assert path.read_text() == "hello" and stat.S_IMODE(path.stat().st_mode) == 0o640
    assert tmp.name.startswith(".tmp-export.") and stat.S_IMODE(tmp.stat().st_mode) == 0o750


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = atomic_write(tmp_path / "x.bin", b"old")
    with pytest.raises(RuntimeError), atomic_open(path, "wb") as f:
        f.write(b"new")
        raise RuntimeError("killed")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_only_temp_entries_older_than_the_process_are_removed(tmp_path: Path) -> None:
    old = time.time() - 3600
    dead = [tmp_path / ".tmp-a.png.123", tmp_path / ".b.png.456.tmp", tmp_path / ".tmp-export.789"]
    dead[0].write_bytes(b"")
    dead[1].write_bytes(b"")
    dead[2].mkdir()
    keep = [tmp_path / "a.png", tmp_path / "shard-00000-of-00001.partial"]
    keep[0].write_bytes(b"")
    keep[1].mkdir()
    for p in [*dead, *keep]:
        os.utime(p, (old, old))
    live = tmp_path / ".tmp-c.png.000"  # made after this process started: its own, or a live writer's
    live.write_bytes(b"")
    assert sorted(remove_stale_temps(tmp_path, before=process_start_time())) == sorted(dead)
    assert sorted(tmp_path.iterdir()) == sorted([*keep, live])
    assert remove_stale_temps(tmp_path / "missing", before=time.time()) == []
