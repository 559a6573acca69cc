"""The scores file of a psr-eval run and its summary: pure functions over plain rows (no torch), shared
by the run (:mod:`psr.evaluate.runner`) and the report (:mod:`psr.evaluate.report`).

A row is one sample: ``id``, ``kind``, ``sample``, ``image`` and ``scores`` (key -> value, null where
the key does not apply), plus ``error`` for a record that could not be scored (excluded).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["json_value", "read_scores", "drop_torn_tail", "summarize", "print_summary"]


def json_value(v: float) -> float | None:
    """NaN (the reward does not apply) as JSON null."""
    return None if math.isnan(v) else v


def read_scores(path: Path) -> list[dict[str, Any]]:
    """The lines of a scores file; a torn last line (a run killed mid-write) is ignored.

    Raises:
        ValueError: a line other than an unterminated last one is not JSON.
    """
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:  # no newline after it: the write was cut short
                continue
            raise ValueError(
                f"{path} line {i + 1} is not JSON ({err.msg}); delete the line to rescore it"
            ) from err
    return out


def drop_torn_tail(path: Path) -> None:
    """Truncate ``path`` after its last newline, so appended lines do not join a torn one."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean, population std and count per reward key over the samples where it applies (not null),
    overall and per task kind (records with an empty kind only count overall)."""

    def stats(subset: Sequence[dict[str, Any]]) -> dict[str, dict[str, float | int | None]]:
        values: dict[str, list[float]] = defaultdict(list)
        for r in subset:
            for k, v in r["scores"].items():
                if v is not None:
                    values[k].append(float(v))
        keys = sorted({k for r in subset for k in r["scores"]})
        out: dict[str, dict[str, float | int | None]] = {}
        for k in keys:
            arr = np.asarray(values[k], dtype=np.float64)
            out[k] = {  # null mean / std: the key applies to no sample here
                "mean": float(arr.mean()) if arr.size else None,
                "std": float(arr.std()) if arr.size else None,
                "count": int(arr.size),
            }
        return out

    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("kind"):
            by_kind[r["kind"]].append(r)
    kinds: dict[str, dict[str, Any]] = {
        k: {"count": len(v), "metrics": stats(v)} for k, v in sorted(by_kind.items())
    }
    overall: dict[str, dict[str, float | int | None]] = {}
    for key in sorted({m for block in kinds.values() for m in block["metrics"]}):
        means = [
            b["metrics"][key]["mean"]
            for b in kinds.values()
            if key in b["metrics"] and b["metrics"][key]["mean"] is not None
        ]
        overall[key] = {"mean": float(np.mean(means)) if means else None, "kinds": len(means)}
    return {
        "count": len(rows),
        "records": len({r["id"] for r in rows}),
        "excluded": sum(1 for r in rows if r.get("error")),
        "metrics": stats(rows),
        "overall": overall,
        "by_kind": kinds,
    }


def print_summary(summary: dict[str, Any]) -> None:
    """The summary as a table: key, mean, std, count; then per kind the combined score."""

    def row(key: str, s: dict[str, Any]) -> str:
        mean, std = (f"{s[k]:>9.4f}" if s[k] is not None else f"{'n/a':>9}" for k in ("mean", "std"))
        return f"{key:<32} {mean} {std} {s['count']:>6}"

    lines = [f"{'key':<32} {'mean':>9} {'std':>9} {'n':>6}"]
    lines += [row(k, s) for k, s in summary["metrics"].items()]
    for kind, block in summary["by_kind"].items():
        if "score" in block["metrics"]:
            lines.append(row(f"score [{kind}]", block["metrics"]["score"]))
    print("\n".join(lines), flush=True)
