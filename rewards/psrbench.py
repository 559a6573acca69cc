"""PSRBench JSON conventions shared by ``psr-score`` (here) and ``psr-eval`` (``psr.data.manifest``).

A PSRBench file is a JSON list of records (``instruction``, ``input_path``, ``category1..N``,
``result_path``) or an object mapping an id to a record. Both commands name a record the same way,
so their outputs (``scores.json`` of psr-score, ``scores.jsonl`` of psr-eval) join on ``id``.
Pure Python: ``psr.data.manifest`` imports this without torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["record_id"]


def record_id(record: Mapping[str, Any], key: str | None, index: int, stem: str) -> str:
    """The id of one PSRBench record.

    Rule: the record's own ``id`` field; else its key when the file is an object of id -> record;
    else ``<file stem>-<index>`` with a 4-digit index (``three.json`` record 7 -> ``three-0007``),
    which stays unique when the seven subset files are scored together.

    Args:
        record: the record (a JSON object).
        key: its key in a top-level JSON object, None when the file is a list.
        index: its 0-based position in the file.
        stem: the file name without its suffix.
    """
    if "id" in record:
        return str(record["id"])
    return key if key is not None else f"{stem}-{index:04d}"
