"""The training manifest: the one contract between ``data_pipeline`` and the trainers.

A manifest is a JSONL file, one :class:`Sample` per line; image paths inside it are relative to
the manifest's directory (absolute paths are allowed and kept). A line looks like::

    {"id": "rec-0000012", "instruction": "the dog and the chair in a sunlit garden",
     "target": "images/rec-0000012/target.png", "kind": "background",
     "subjects": [{"name": "dog", "category": "dog", "reference": "images/rec-0000012/ref0.png",
                   "box": [12.0, 40.0, 210.0, 300.0]}, ...],
     "scores": {"subject_min": 0.81}, "provenance": {"target": {"model": "...", "seed": 7}}}

``box`` is the subject's box in the target, ``[x0, y0, x1, y1]`` in target pixels, or null.
``scores`` are finite numbers; ``provenance`` is free-form JSON (models, seeds, stage versions).

PSRBench (the paper's benchmark) stores a JSON list of ``{"instruction", "input_path": [reference
paths], "category1".."category4", "result_path"}``; :func:`read_psrbench` / :func:`write_psrbench`
convert between it and :class:`Sample`.

Pure Python + PIL: the trainers and the data pipeline import this without torch.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psr.fileio import atomic_write
from rewards.psrbench import record_id as psrbench_record_id

KINDS = ("attribute", "action", "background", "position", "complex", "three", "four")
"""The seven task kinds of PSRBench and of the synthesized data (any other string is allowed)."""

_SAMPLE_KEYS = ("id", "instruction", "target", "subjects", "kind", "scores", "provenance")
_SUBJECT_KEYS = ("name", "category", "reference", "box")


class ManifestError(ValueError):
    """A malformed manifest or PSRBench record; the message names file, line, record id and field."""


@dataclass
class Subject:
    """One subject of a record.

    Attributes:
        name: how the instruction refers to it (e.g. ``"dog"``, ``"red teapot"``).
        category: the detector query (an Objects365 name for synthesized data).
        reference: path of its reference image, relative to the manifest's directory.
        box: ``[x0, y0, x1, y1]`` of the subject in the target, in target pixels; None if unknown.
    """

    name: str
    category: str
    reference: str
    box: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "category": self.category, "reference": self.reference, "box": self.box}


@dataclass
class Sample:
    """One record: an instruction, an optional target image and 1+ subjects with references.

    Attributes:
        id: unique within the manifest.
        instruction: the text prompt the model is trained / evaluated with.
        target: path of the target image (relative to the manifest's directory); None for prompt-only
            records (RL, benchmarks).
        subjects: in the order the record defines; reference ``k`` belongs to subject ``k``.
        kind: task kind (one of :data:`KINDS` for synthesized data; free text otherwise).
        scores: finite numbers (filter scores, detector confidences, ...).
        provenance: free-form JSON: models, seeds and settings that made the record.
    """

    id: str
    instruction: str
    target: str | None
    subjects: list[Subject]
    kind: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "instruction": self.instruction,
            "target": self.target,
            "subjects": [s.to_dict() for s in self.subjects],
            "kind": self.kind,
            "scores": dict(self.scores),
            "provenance": self.provenance,
        }


# ---------------------------------------------------------------------------------------------- validation


def _fail(where: str, record_id: str | None, fld: str, problem: str) -> ManifestError:
    rid = f"record {record_id!r}" if record_id is not None else "record (no id)"
    return ManifestError(f"{where}: {rid}: field {fld!r}: {problem}")


def _check_str(value: Any, where: str, rid: str | None, fld: str, *, empty: bool = True) -> str:
    if not isinstance(value, str):
        raise _fail(where, rid, fld, f"expected a string, got {type(value).__name__} {value!r:.60}")
    if not empty and not value.strip():
        raise _fail(where, rid, fld, "must not be empty")
    return value


def _check_box(value: Any, where: str, rid: str | None, fld: str) -> list[float] | None:
    if value is None:
        return None
    ok = isinstance(value, list) and len(value) == 4
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok:
        raise _fail(where, rid, fld, f"expected null or [x0, y0, x1, y1] numbers, got {value!r:.80}")
    box = [float(v) for v in value]
    if not all(math.isfinite(v) for v in box) or box[2] < box[0] or box[3] < box[1]:
        raise _fail(where, rid, fld, f"expected finite x0 <= x1 and y0 <= y1, got {box}")
    return box


def sample_from_dict(obj: Any, where: str = "<record>") -> Sample:
    """Validate a decoded JSON object and build a :class:`Sample`.

    Args:
        obj: one decoded manifest line.
        where: ``"file:line"`` for error messages.

    Raises:
        ManifestError: naming ``where``, the record id and the offending field (``subjects[1].box``).
    """
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    rid = obj.get("id") if isinstance(obj.get("id"), str) else None
    for key in ("id", "instruction", "target", "subjects"):
        if key not in obj:
            raise _fail(where, rid, key, "missing")
    unknown = sorted(set(obj) - set(_SAMPLE_KEYS))
    if unknown:
        # strict on purpose: a misspelt key ("refrence") would otherwise vanish silently
        raise _fail(
            where,
            rid,
            unknown[0],
            f"unknown key; a record has {list(_SAMPLE_KEYS)} (free-form data goes in 'provenance')",
        )
    rid = _check_str(obj["id"], where, rid, "id", empty=False)
    instruction = _check_str(obj["instruction"], where, rid, "instruction", empty=False)
    target = obj["target"]
    if target is not None:
        target = _check_str(target, where, rid, "target", empty=False)
    subjects_raw = obj["subjects"]
    if not isinstance(subjects_raw, list) or not subjects_raw:
        raise _fail(where, rid, "subjects", f"expected a non-empty list, got {subjects_raw!r:.60}")
    subjects = []
    for k, sub in enumerate(subjects_raw):
        fld = f"subjects[{k}]"
        if not isinstance(sub, dict):
            raise _fail(where, rid, fld, f"expected an object, got {type(sub).__name__}")
        for key in ("name", "category", "reference"):
            if key not in sub:
                raise _fail(where, rid, f"{fld}.{key}", "missing")
        unknown = sorted(set(sub) - set(_SUBJECT_KEYS))
        if unknown:
            raise _fail(
                where, rid, f"{fld}.{unknown[0]}", f"unknown key; a subject has {list(_SUBJECT_KEYS)}"
            )
        subjects.append(
            Subject(
                name=_check_str(sub["name"], where, rid, f"{fld}.name", empty=False),
                category=_check_str(sub["category"], where, rid, f"{fld}.category", empty=False),
                reference=_check_str(sub["reference"], where, rid, f"{fld}.reference", empty=False),
                box=_check_box(sub.get("box"), where, rid, f"{fld}.box"),
            )
        )
    kind = _check_str(obj.get("kind", ""), where, rid, "kind")
    scores_raw = obj.get("scores", {})
    if not isinstance(scores_raw, dict):
        raise _fail(where, rid, "scores", f"expected an object of numbers, got {type(scores_raw).__name__}")
    scores = {}
    for name, value in scores_raw.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _fail(where, rid, f"scores.{name}", f"expected a finite number, got {value!r:.40}")
        scores[name] = float(value)
    provenance = obj.get("provenance", {})
    if not isinstance(provenance, dict):
        raise _fail(where, rid, "provenance", f"expected an object, got {type(provenance).__name__}")
    return Sample(rid, instruction, target, subjects, kind, scores, provenance)


# ---------------------------------------------------------------------------------------------- JSONL I/O


def read_manifest(path: str | os.PathLike) -> list[Sample]:
    """Read and validate a manifest (JSONL; blank lines are skipped).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ManifestError: on invalid JSON, a malformed record, or a duplicate id (naming both lines).
    """
    p = Path(path)
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ManifestError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from err
            s = sample_from_dict(obj, where)
            if s.id in seen:
                raise _fail(where, s.id, "id", f"duplicate; first seen at line {seen[s.id]}")
            seen[s.id] = lineno
            samples.append(s)
    return samples


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one (with an
    ordinary file's mode: others can read it under umask 022)."""
    atomic_write(path, text)


def write_manifest(path: str | os.PathLike, samples: Iterable[Sample]) -> Path:
    """Write samples as JSONL atomically (temp file + rename); every record is validated first.

    Raises:
        ManifestError: for a record that :func:`read_manifest` would reject (so a written manifest
            always reads back), or a duplicate id.
    """
    p = Path(path)
    lines, seen = [], set()
    for i, s in enumerate(samples):
        d = s.to_dict()
        sample_from_dict(json.loads(json.dumps(d)), f"{p} (record {i} being written)")
        if s.id in seen:
            raise _fail(f"{p} (record {i} being written)", s.id, "id", "duplicate")
        seen.add(s.id)
        lines.append(json.dumps(d, ensure_ascii=False, allow_nan=False))
    _atomic_write_text(p, "".join(line + "\n" for line in lines))
    return p


# ---------------------------------------------------------------------------------------------- PSRBench


def _psrbench_records(data: Any, where: str) -> list[tuple[str | None, Any]]:
    if isinstance(data, list):
        return [(None, r) for r in data]
    if isinstance(data, dict):
        return [(str(k), r) for k, r in data.items()]
    raise ManifestError(f"{where}: expected a JSON list of records (or an object of id -> record)")


def read_psrbench(json_path: str | os.PathLike, *, kind: str | None = None) -> list[Sample]:
    """Read a PSRBench JSON into samples without targets.

    Each record needs ``instruction``, ``input_path`` (list of reference paths, kept as written:
    relative paths resolve against the benchmark root the caller chooses) and ``category1..N``, one
    per reference. ``result_path`` and any other keys go into ``provenance["psrbench"]``. The id is
    the record's ``id`` key, its key in an object, or ``<file stem>-<index>``.

    Args:
        json_path: the benchmark file.
        kind: task kind for every record; default: the file stem if it names one of :data:`KINDS`
            (``attribute.json``), else the record's ``kind`` key or ``""``.
    """
    p = Path(json_path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ManifestError(f"{p}: not valid JSON ({err.msg} at line {err.lineno})") from err
    stem_kind = p.stem.lower() if p.stem.lower() in KINDS else None
    samples = []
    for i, (key, rec) in enumerate(_psrbench_records(data, str(p))):
        where = f"{p} record {i}"
        if not isinstance(rec, dict):
            raise ManifestError(f"{where}: expected an object, got {type(rec).__name__}")
        rid = psrbench_record_id(rec, key, i, p.stem)  # the id psr-score gives it too
        for fld in ("instruction", "input_path"):
            if fld not in rec:
                raise _fail(where, rid, fld, "missing")
        refs = rec["input_path"]
        if isinstance(refs, str):
            refs = [refs]
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r for r in refs):
            raise _fail(where, rid, "input_path", f"expected a non-empty list of paths, got {refs!r:.80}")
        subjects = []
        for k, ref in enumerate(refs, start=1):
            cat = rec.get(f"category{k}")
            if not isinstance(cat, str) or not cat.strip():
                raise _fail(
                    where, rid, f"category{k}", f"missing or empty; input_path has {len(refs)} references"
                )
            subjects.append(Subject(name=cat.strip(), category=cat.strip(), reference=ref))
        extra = {
            k: v
            for k, v in rec.items()
            if k not in ("id", "instruction", "input_path") and not k.startswith("category")
        }
        rec_kind = kind or stem_kind or str(rec.get("kind", ""))
        samples.append(
            sample_from_dict(
                Sample(
                    id=rid,
                    instruction=_check_str(rec["instruction"], where, rid, "instruction", empty=False),
                    target=None,
                    subjects=subjects,
                    kind=rec_kind,
                    provenance={"psrbench": {"file": p.name, **extra}}
                    if extra
                    else {"psrbench": {"file": p.name}},
                ).to_dict(),
                where,
            )
        )
    return samples


def write_psrbench(
    path: str | os.PathLike,
    samples: Sequence[Sample],
    *,
    result_paths: Sequence[str] | None = None,
) -> Path:
    """Write samples as a PSRBench JSON list (atomically).

    Each record: ``id``, ``kind``, ``instruction``, ``input_path`` (the references as stored in the
    samples), ``category1..N`` and ``result_path`` (``result_paths[i]``, else ``""`` for the model
    under test to fill).
    """
    if result_paths is not None and len(result_paths) != len(samples):
        raise ValueError(f"result_paths has {len(result_paths)} entries for {len(samples)} samples")
    out = []
    for i, s in enumerate(samples):
        rec: dict[str, Any] = {"id": s.id, "kind": s.kind, "instruction": s.instruction}
        rec["input_path"] = [sub.reference for sub in s.subjects]
        for k, sub in enumerate(s.subjects, start=1):
            rec[f"category{k}"] = sub.category
        rec["result_path"] = result_paths[i] if result_paths is not None else ""
        out.append(rec)
    p = Path(path)
    _atomic_write_text(p, json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    return p


# ---------------------------------------------------------------------------------------------- paths


def resolve(path: str | os.PathLike, root: str | os.PathLike) -> Path:
    """An image path of a record: absolute as written, else relative to ``root`` (the manifest's dir)."""
    p = Path(os.path.expanduser(str(path)))
    return p if p.is_absolute() else Path(root) / p


def image_paths(sample: Sample, root: str | os.PathLike) -> dict[str, Path]:
    """Every image a sample names, resolved: ``{"target": ..., "subjects[0].reference": ..., ...}``."""
    out = {}
    if sample.target is not None:
        out["target"] = resolve(sample.target, root)
    for k, sub in enumerate(sample.subjects):
        out[f"subjects[{k}].reference"] = resolve(sub.reference, root)
    return out


def check_images(sample: Sample, root: str | os.PathLike) -> list[str]:
    """Problems with a sample's images (missing, unreadable, truncated), one message each; [] if fine."""
    from PIL import Image, UnidentifiedImageError

    problems = []
    for fld, p in image_paths(sample, root).items():
        try:
            with Image.open(p) as im:
                im.load()  # decode fully: a truncated file fails only here
        except FileNotFoundError:
            problems.append(f"{fld}: missing file {p}")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            problems.append(f"{fld}: unreadable image {p} ({type(err).__name__}: {err})")
    return problems
