"""What psr-data writes honours the umask like an ordinary file (others on a shared cluster can read
the dataset), and the temp files of a killed run are removed by the next run on the same directory."""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pipeline_helpers import SETTINGS, run_stages

from data_pipeline.stages import export
from data_pipeline.stages.export import SHARDED


@pytest.fixture
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    before = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(before)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(
    ("umask", "file_mode", "dir_mode"),
    [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)],
    indirect=["umask"],
    ids=["umask022", "umask027"],
)
def test_everything_exported_has_the_modes_of_ordinary_files(tmp_path, umask, file_mode, dir_mode):
    out = tmp_path / "data"
    run_stages(out, list(SHARDED))
    export.run(out, {}, seed=0)
    final = out / "export"
    manifest = [json.loads(line) for line in (final / "manifest.jsonl").read_text().splitlines()]
    assert manifest
    images = [final / s["target"] for s in manifest] + [
        final / sub["reference"] for s in manifest for sub in s["subjects"]
    ]
    files = [final / "manifest.jsonl", final / "psrbench.json", final / "done.json", *images]
    files += list(out.glob("*/images/*/*.png"))  # the stage outputs (the export's images link to them)
    files += list(out.glob("*/shard-*/*.json*"))
    dirs = [
        final,
        final / "images",
        *{p.parent for p in images},
        *out.glob("*/shard-*"),
        *out.glob("*/images/*"),
    ]
    assert {str(p.relative_to(out)): oct(_mode(p)) for p in files if _mode(p) != file_mode} == {}
    assert {str(p.relative_to(out)): oct(_mode(p)) for p in dirs if _mode(p) != dir_mode} == {}
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-") or p.name.endswith(".tmp")]


def _stale(path: Path, *, is_dir: bool = False) -> Path:
    """A temp entry as a killed run leaves it: made before this process started."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        path.mkdir()
        (path / "images").mkdir()
    else:
        path.write_bytes(b"half a png")
    old = time.time() - 24 * 3600
    os.utime(path, (old, old))
    return path


def test_temp_files_of_a_killed_run_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "data"
    run_stages(out, ["plan", "prompts"])
    ids = [
        json.loads(line)["id"]
        for line in next(out.glob("prompts/shard-*/records.jsonl")).read_text().splitlines()
    ]
    images = out / "target" / "images"
    stale = [
        _stale(images / ids[0] / ".tmp-target.png.k2j4h1"),  # atomic_open's temp file
        _stale(images / ids[1] / ".target.png.x8z1q0.tmp"),  # the temp file name used before
    ]
    live = images / ids[2] / ".tmp-target.png.a0b1c2"  # newer than this process: not a dead run's
    live.parent.mkdir(parents=True)
    live.write_bytes(b"being written")
    kept = _stale(images / ids[0] / "notes.txt")  # not a temp file
    run_stages(out, ["target", "crop", "references", "edit", "instruct", "filter"], target=SETTINGS["target"])
    assert [p for p in stale if p.exists()] == [] and live.exists() and kept.exists()

    dead_exports = [
        _stale(out / ".tmp-export.q1w2e3", is_dir=True),
        _stale(out / "export.partial-r4t5y6", is_dir=True),
    ]
    export.run(out, {}, seed=0)
    assert [p for p in dead_exports if p.exists()] == []
    assert (out / "export" / "done.json").is_file()
