"""Sharded stage runs: deterministic sharding, resume without duplicates, atomic publish, guards."""

from __future__ import annotations

import json

import pytest

from data_pipeline.shards import (
    Outcome,
    Shard,
    StageInputError,
    StageRun,
    append_jsonl,
    derive_seed,
    read_jsonl,
    read_stage_output,
    reject,
)


class Crash(RuntimeError):
    pass


def _inputs(n: int, shard: Shard = Shard()) -> list[dict]:
    return [{"index": i, "id": f"r{i}"} for i in range(n) if shard.owns(i)]


def _square(batch: list[dict], calls: list, crash_on: int | None = None) -> list[Outcome]:
    calls.append([r["index"] for r in batch])
    if crash_on is not None and any(r["index"] == crash_on for r in batch):
        raise Crash("killed")
    return [
        Outcome({**r, "y": r["index"] ** 2}) if r["index"] % 5 else reject(r, "multiple of five", v=1.5)
        for r in batch
    ]


def test_shard_validation_and_ownership():
    with pytest.raises(ValueError, match="shard.count=0"):
        Shard(0, 0)
    with pytest.raises(ValueError, match=r"shard.index=3 must be in \[0, shard.count=3\)"):
        Shard(3, 3)
    owned = [[i for i in range(10) if Shard(k, 3).owns(i)] for k in range(3)]
    assert owned == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert Shard(2, 12).name == "shard-00002-of-00012"


def test_derive_seed_is_stable_and_sensitive():
    # stable across processes and Python versions (psr.seeding: sha256, not hash())
    assert derive_seed(0, "record", 3) == derive_seed(0, "record", 3)
    assert derive_seed(0, "record", 3) != derive_seed(0, "record", 4) != derive_seed(1, "record", 3)
    assert 0 <= derive_seed(0, "x") < 2**63


def test_torn_last_line_is_repaired(tmp_path):
    p = tmp_path / "r.jsonl"
    append_jsonl(p, [{"id": "a"}, {"id": "b"}])
    with p.open("a") as f:
        f.write('{"id": "c", "x": ')  # a writer killed mid-line
    with pytest.raises(ValueError, match="incomplete"):
        read_jsonl(p)
    assert [r["id"] for r in read_jsonl(p, repair=True)] == ["a", "b"]
    assert p.read_text().endswith("}\n")


def test_run_publishes_atomically_with_done_marker(tmp_path):
    calls: list = []
    job = StageRun(tmp_path, "sq", Shard(), {"k": 1})
    summary = job.run(_inputs(12), lambda b: _square(b, calls), batch_size=4)
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert (summary["inputs"], summary["accepted"], summary["rejected"]) == (12, 9, 3)
    assert not (tmp_path / "sq" / "shard-00000-of-00001.partial").exists()
    acc, rej = read_stage_output(tmp_path, "sq", Shard())
    assert [r["y"] for r in acc] == [i * i for i in range(12) if i % 5]
    assert [(r["id"], r["stage"], r["reason"], r["scores"]) for r in rej][0] == (
        "r0",
        "sq",
        "multiple of five",
        {"v": 1.5},
    )
    # a finished shard is not run again
    again = StageRun(tmp_path, "sq", Shard(), {"k": 1})
    assert again.is_done() and again.summary() == summary


def test_resume_after_crash_recomputes_only_unfinished_batches(tmp_path):
    calls: list = []
    with pytest.raises(Crash):
        StageRun(tmp_path / "a", "sq", Shard(), {}).run(
            _inputs(12), lambda b: _square(b, calls, crash_on=9), batch_size=4
        )
    partial = tmp_path / "a" / "sq" / "shard-00000-of-00001.partial"
    assert len(read_jsonl(partial / "records.jsonl")) + len(read_jsonl(partial / "rejects.jsonl")) == 8
    # a kill can also tear the last line of a batch: the torn record is recomputed with its batch
    lines = (partial / "records.jsonl").read_text().splitlines(keepends=True)
    (partial / "records.jsonl").write_text("".join(lines[:-1]) + lines[-1][:10])
    calls.clear()
    StageRun(tmp_path / "a", "sq", Shard(), {}).run(_inputs(12), lambda b: _square(b, calls), batch_size=4)
    assert calls == [[4, 5, 6, 7], [8, 9, 10, 11]]
    StageRun(tmp_path / "b", "sq", Shard(), {}).run(_inputs(12), lambda b: _square(b, []), batch_size=4)
    for name in ("records.jsonl", "rejects.jsonl"):
        resumed = (tmp_path / "a/sq/shard-00000-of-00001" / name).read_bytes()
        assert resumed == (tmp_path / "b/sq/shard-00000-of-00001" / name).read_bytes()


def test_other_settings_or_shard_count_are_refused(tmp_path):
    StageRun(tmp_path, "sq", Shard(0, 2), {"k": 1}).run(
        _inputs(6, Shard(0, 2)), lambda b: _square(b, []), batch_size=2
    )
    with pytest.raises(RuntimeError, match="other sq settings"):
        StageRun(tmp_path, "sq", Shard(0, 2), {"k": 2}).is_done()
    with pytest.raises(RuntimeError, match="shard.count=2"):
        StageRun(tmp_path, "sq", Shard(0, 3), {"k": 1}).run(
            _inputs(6, Shard(0, 3)), lambda b: _square(b, []), batch_size=2
        )


def test_next_stage_may_use_another_shard_count(tmp_path):
    for k in range(3):
        StageRun(tmp_path, "a", Shard(k, 3), {}).run(
            _inputs(10, Shard(k, 3)), lambda b: _square(b, []), batch_size=2
        )
    got = [read_stage_output(tmp_path, "a", Shard(k, 2))[0] for k in range(2)]
    assert [[r["index"] for r in g] for g in got] == [[2, 4, 6, 8], [1, 3, 7, 9]]
    assert [r["index"] for r in read_stage_output(tmp_path, "a")[1]] == [0, 5]


def test_missing_input_shards_are_named(tmp_path):
    with pytest.raises(StageInputError, match="run psr-data stage=a first"):
        read_stage_output(tmp_path, "a", Shard())
    StageRun(tmp_path, "a", Shard(1, 3), {}).run(
        _inputs(9, Shard(1, 3)), lambda b: _square(b, []), batch_size=2
    )
    with pytest.raises(StageInputError, match=r"shards \[0, 2\] of 3 are missing"):
        read_stage_output(tmp_path, "a", Shard(0, 1))
    done = json.loads((tmp_path / "a/shard-00001-of-00003/done.json").read_text())
    assert done["shard"] == {"index": 1, "count": 3}


def test_a_partial_publish_left_by_a_kill_is_ignored(tmp_path):
    """A kill between writing done.json into ``shard-...partial`` and the rename leaves that folder:
    it is not a published shard, and it does not break listing the stage."""
    from data_pipeline.shards import DONE, shard_dirs, stage_dir

    d = stage_dir(tmp_path, "target")
    (d / "shard-00000-of-00001.partial").mkdir(parents=True)
    (d / "shard-00000-of-00001.partial" / DONE).write_text("{}")
    assert shard_dirs(tmp_path, "target") == {}
    (d / "shard-00000-of-00001").mkdir()
    (d / "shard-00000-of-00001" / DONE).write_text("{}")
    assert list(shard_dirs(tmp_path, "target")) == [(0, 1)]


def test_decompression_bomb_is_a_reject_reason(tmp_path, monkeypatch):
    from PIL import Image

    from data_pipeline.images import load_image

    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 4096 px > 2 x 100: PIL refuses to decode it
    image, reason = load_image(path)
    assert image is None and "big.png" in reason and "DecompressionBombError" in reason
