"""Sharded, resumable stage runs: where each stage reads its inputs and how it publishes its outputs.

Layout under ``out_dir`` (every path in a work record is relative to ``out_dir``)::

    <stage>/shard-00003-of-00008.partial/records.jsonl   accepted records, appended per batch
                                         rejects.jsonl   rejected records with their reason and scores
    <stage>/shard-00003-of-00008/...                     the same, published by one rename, + done.json
    <stage>/images/<record id>/...png                    images (each written atomically; the temp
                                                         files of a killed run go at the next run)

Sharding: record ``index`` belongs to shard ``index % count``. A stage reads the published shard
of the previous stage with the same ``(index, count)``; when the previous stage ran with another
shard count it reads all of that stage's shards (which must then all be done) and keeps its own
indices, so stages may be re-sharded (e.g. ``plan`` on 1 shard, ``target`` on 64).

Resume: a ``.partial`` directory holds whole batches of finished records (a torn last line from a
kill is cut off). A rerun recomputes a batch only if one of its records is missing and appends only
the missing ones. Batches are fixed slices of the shard's sorted input, so a resumed run calls the
models on exactly the batches an uninterrupted run would, and writes the same bytes.

One writer per shard: ``psr-data`` holds ``<out_dir>/.psr-data.<shard name>.lock`` while it works on
a shard, and ``.psr-data.export.lock`` for export and report (:func:`data_pipeline.cli.data_lock`),
so a second process on the same shard fails at once instead of appending to the same ``.partial``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psr import seeding
from psr.fileio import process_start_time, remove_stale_temps

DONE = "done.json"
RECORDS = "records.jsonl"
REJECTS = "rejects.jsonl"


class StageInputError(RuntimeError):
    """A stage's input is not there (the previous stage has not run or not finished)."""


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the records whose index is ``index`` modulo ``count``."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"shard.count={self.count} must be >= 1")
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard.index={self.index} must be in [0, shard.count={self.count})")

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}-of-{self.count:05d}"

    def owns(self, record_index: int) -> bool:
        return record_index % self.count == self.index


def derive_seed(seed: int, *parts: int | str) -> int:
    """A stage's seed: :func:`psr.seeding.derive_seed` in the ``pipeline`` domain.

    Args:
        seed: the run's ``seed`` or a record's seed derived from it.
        parts: what the draw is for: stage names, indices, record ids.

    Returns:
        An int in ``[0, 2**63)``, stable across processes and Python versions.
    """
    return seeding.derive_seed(seed, "pipeline", *parts)


def fingerprint(config: Any) -> str:
    """A short hash of a stage's settings (JSON-serializable): what makes its outputs what they are."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- JSONL


def append_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append rows with one write + fsync, so a kill leaves whole rows and at most one torn line."""
    if not rows:
        return
    text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False, sort_keys=True) + "\n" for r in rows)
    with path.open("a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Rows of a JSONL file; with ``repair`` a torn last line (killed writer) is cut off the file."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        if not repair:
            raise ValueError(f"{path}: last line is incomplete (a writer was killed?)")
        with path.open("r+b") as f:
            f.truncate(end)
        data = data[:end]
    rows = []
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
    return rows


# ---------------------------------------------------------------------------------------------- timing


@dataclass
class Clock:
    """Wall time since creation and of each named model call inside it."""

    started: float = field(default_factory=time.perf_counter)
    calls: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def model(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.calls[name] = self.calls.get(name, 0.0) + time.perf_counter() - t0

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


# ---------------------------------------------------------------------------------------------- outcomes


@dataclass
class Outcome:
    """What a stage made of one input record: the updated record, or a rejection with its reason."""

    record: dict[str, Any]
    reason: str | None = None  # None: accepted
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        return self.reason is None


def reject(record: dict[str, Any], reason: str, **scores: float) -> Outcome:
    return Outcome(record, reason, dict(scores))


# ---------------------------------------------------------------------------------------------- stage runs


def stage_dir(out_dir: Path, stage: str) -> Path:
    return Path(out_dir) / stage


def shard_dirs(out_dir: Path, stage: str) -> dict[tuple[int, int], Path]:
    """Published shard directories of a stage, keyed by ``(index, count)``."""
    out = {}
    d = stage_dir(out_dir, stage)
    if d.is_dir():
        for p in d.iterdir():
            parts = p.name.split("-")
            if (
                p.is_dir()
                and len(parts) == 4
                and parts[0] == "shard"
                and parts[2] == "of"
                and parts[1].isdigit()
                and parts[3].isdigit()  # not a "...-of-00004.partial" left by a kill while publishing
                and (p / DONE).is_file()
            ):
                out[(int(parts[1]), int(parts[3]))] = p
    return out


def read_stage_output(out_dir: Path, stage: str, shard: Shard | None = None) -> tuple[list[dict], list[dict]]:
    """``(accepted, rejected)`` rows of a finished stage, for one shard or (``shard=None``) all shards.

    Raises:
        StageInputError: naming the stage and the missing shards when they are not all published.
    """
    done = shard_dirs(out_dir, stage)
    counts = sorted({c for _, c in done})
    if len(counts) > 1:
        raise StageInputError(
            f"{stage_dir(out_dir, stage)} holds shards of several shard.count values {counts}"
        )
    if shard is not None and (shard.index, shard.count) in done:
        d = done[(shard.index, shard.count)]
        return read_jsonl(d / RECORDS), read_jsonl(d / REJECTS)
    if not counts:
        raise StageInputError(
            f"stage {stage!r} has no finished shard in {stage_dir(out_dir, stage)}; run psr-data stage={stage} first"
        )
    n = counts[0]
    missing = [i for i in range(n) if (i, n) not in done]
    if missing:
        want = f"shard {shard.index}/{shard.count}" if shard else "all shards"
        raise StageInputError(
            f"stage {stage!r} is not finished for {want}: shards {missing[:10]} of {n} are missing in "
            f"{stage_dir(out_dir, stage)}; run psr-data stage={stage} shard.count={n} shard.index=<i> for them"
        )
    accepted, rejected = [], []
    for i in range(n):
        accepted += read_jsonl(done[(i, n)] / RECORDS)
        rejected += read_jsonl(done[(i, n)] / REJECTS)
    if shard is not None:
        accepted = [r for r in accepted if shard.owns(r["index"])]
        rejected = [r for r in rejected if shard.owns(r["index"])]
    accepted.sort(key=lambda r: r["index"])
    rejected.sort(key=lambda r: r["index"])
    return accepted, rejected


class StageRun:
    """One stage on one shard: resume, append outcomes batch by batch, publish atomically.

    Args:
        out_dir: the pipeline's output directory.
        stage: the stage name (its directory).
        shard: which shard.
        settings: the stage's settings; their :func:`fingerprint` is stored, and a rerun with other
            settings over a started or finished shard is refused (the outputs would mix).
    """

    def __init__(self, out_dir: str | os.PathLike, stage: str, shard: Shard, settings: Any) -> None:
        self.out_dir = Path(out_dir)
        self.stage, self.shard = stage, shard
        self.fingerprint = fingerprint(settings)
        self.dir = stage_dir(self.out_dir, stage)
        self.final = self.dir / shard.name
        self.partial = self.dir / f"{shard.name}.partial"
        self.clock = Clock()

    # -- state ------------------------------------------------------------------------------------
    def _check_fingerprint(self, found: str | None, where: Path) -> None:
        if found is not None and found != self.fingerprint:
            raise RuntimeError(
                f"{where} was made with other {self.stage} settings (fingerprint {found} != {self.fingerprint}); "
                f"use a new out_dir, or delete {self.dir} to redo stage {self.stage!r}"
            )

    def _check_count(self) -> None:
        other = sorted({c for _, c in shard_dirs(self.out_dir, self.stage)} - {self.shard.count})
        if other:
            raise RuntimeError(
                f"{self.dir} already has shards made with shard.count={other[0]}; rerun with "
                f"shard.count={other[0]}, or delete {self.dir} to re-shard stage {self.stage!r}"
            )

    def is_done(self) -> bool:
        """True if this shard was published (with the same settings; else raises)."""
        if not (self.final / DONE).is_file():
            return False
        self._check_fingerprint(json.loads((self.final / DONE).read_text())["fingerprint"], self.final)
        return True

    def summary(self) -> dict[str, Any]:
        return json.loads((self.final / DONE).read_text())

    # -- running ----------------------------------------------------------------------------------
    def run(
        self,
        inputs: Sequence[dict[str, Any]],
        process: Callable[[list[dict[str, Any]]], list[Outcome]],
        *,
        batch_size: int,
    ) -> dict[str, Any]:
        """Process ``inputs`` (this shard's records, in index order) in batches and publish.

        ``process`` maps a batch of records to one :class:`Outcome` per record, in order. It may
        raise only for a bug or a broken model; a bad record is an :class:`Outcome` with a reason.
        Returns the summary written to ``done.json``.
        """
        if batch_size < 1:
            raise ValueError(f"{self.stage}.batch_size={batch_size} must be >= 1")
        self._check_count()
        setup = self.clock.elapsed()  # model loading, between the stage's start and its first batch
        self.clock = Clock()
        self.partial.mkdir(parents=True, exist_ok=True)
        started = process_start_time()
        for r in inputs:  # temp PNGs of a killed run: a record's images are written by its own shard only
            remove_stale_temps(self.dir / "images" / str(r["id"]), before=started)
        stamp = self.partial / "fingerprint"
        if stamp.is_file():
            self._check_fingerprint(stamp.read_text().strip(), self.partial)
        else:
            stamp.write_text(self.fingerprint + "\n")
        finished = {r["id"] for r in read_jsonl(self.partial / RECORDS, repair=True)}
        finished |= {r["id"] for r in read_jsonl(self.partial / REJECTS, repair=True)}
        resumed = len(finished)
        for start in range(0, len(inputs), batch_size):
            batch = list(inputs[start : start + batch_size])
            if all(r["id"] in finished for r in batch):
                continue
            outcomes = process(batch)
            if len(outcomes) != len(batch):
                raise RuntimeError(
                    f"stage {self.stage}: {len(outcomes)} outcomes for a batch of {len(batch)}"
                )
            new = [o for o in outcomes if o.record["id"] not in finished]
            append_jsonl(self.partial / REJECTS, [self._reject_row(o) for o in new if not o.accepted])
            append_jsonl(self.partial / RECORDS, [o.record for o in new if o.accepted])
            finished |= {o.record["id"] for o in new}
        accepted = read_jsonl(self.partial / RECORDS)
        rejected = read_jsonl(self.partial / REJECTS)
        summary = {
            "stage": self.stage,
            "shard": {"index": self.shard.index, "count": self.shard.count},
            "fingerprint": self.fingerprint,
            "inputs": len(inputs),
            "accepted": len(accepted),
            "rejected": len(rejected),
            "resumed_records": resumed,
            "setup_seconds": round(setup, 4),
            "seconds": round(self.clock.elapsed(), 4),
            "model_seconds": {k: round(v, 4) for k, v in self.clock.calls.items()},
        }
        self.publish(summary)
        return summary

    def _reject_row(self, o: Outcome) -> dict[str, Any]:
        return {
            "id": o.record["id"],
            "index": o.record["index"],
            "stage": self.stage,
            "reason": o.reason,
            "scores": o.scores,
            "record": o.record,
        }

    def publish(self, summary: dict[str, Any]) -> None:
        """Write ``done.json`` into the partial directory and rename it into place (atomic)."""
        (self.partial / DONE).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        (self.partial / "fingerprint").unlink(missing_ok=True)
        os.replace(self.partial, self.final)
