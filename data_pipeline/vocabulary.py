"""The category vocabulary the ``plan`` stage draws from (default: Objects365's 365 names)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_VOCABULARY = Path(__file__).resolve().parent / "objects365.txt"


def read_vocabulary(path: str | Path | None = None) -> list[str]:
    """Category names, one per line (``#`` comments and blank lines skipped); default: Objects365."""
    p = Path(path) if path else DEFAULT_VOCABULARY
    if not p.is_file():
        raise FileNotFoundError(f"plan.vocabulary={path}: no such file (one category name per line)")
    names = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"plan.vocabulary={p}: duplicate categories {dupes[:5]}")
    return names
