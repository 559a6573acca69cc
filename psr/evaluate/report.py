"""``psr-report RUN_DIR... [--out DIR]``: the runs next to the paper's table.

Every ``RUN_DIR`` is a psr-eval run (``summary.json`` + ``scores.jsonl``) or a training run
(``metrics.jsonl``); both kinds may be given together. Written under ``--out`` (default: the first
run's ``report/``):

- ``report.md`` and ``report.csv``: one row per evaluation run (its checkpoint), the paper's
  columns (subject consistency, aesthetics HPSv3 / 10, semantic alignment; the official protocol's
  subject consistency per subset) and, below, the paper's own PSRBench rows, marked as quoted
  (docs/method.md §7). Overall values are means over subsets (``summary.json`` ``overall``), as in
  the paper; a run evaluated on something else than the seven subsets shows its plain means.
  The OmniContext and OmniRef columns (:data:`SUITE_COLUMNS`) appear when a run has them; a
  suite's own released aggregate (``summary.json`` ``released``: OmniRef's mean over subject
  pairs) takes the place of the mean;
- ``bars_<metric>.png``: per subset, one bar per run;
- ``contact_<metric>.png``: per evaluation run and metric, the lowest- and highest-scoring samples;
- ``curves.png``: the training reward and held-out reward (``reward/score``,
  ``eval/reward/score``) of every training run on one plot.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["PAPER_ROWS", "COLUMNS", "SUITE_COLUMNS", "collect", "write_report", "main"]

SUBSETS = ("attribute", "action", "background", "position", "complex", "three", "four")

COLUMNS = (
    ("score", "score (the run's reward)"),
    ("sc_official", "subject consistency (official)"),
    ("sc_strict", "subject consistency (strict)"),
    ("hps_div10", "HPSv3 / 10"),
    ("semantic_official", "semantic alignment (official)"),
    ("semantic", "semantic alignment (failures excluded)"),
    ("semantic_failed", "judge failures (fraction)"),
    ("sc_official_fallbacks", "whole-image fallbacks per sample"),
)
"""(summary key, column title) of the table, in order; a run without a key shows an empty cell."""

SUITE_COLUMNS = (
    ("omnicontext_overall", "OmniContext overall sqrt(PF x SC), 0-10"),
    ("omnicontext_pf", "OmniContext prompt following, 0-10"),
    ("omnicontext_sc", "OmniContext subject consistency, 0-10"),
    ("omnicontext_sc_failed", "OmniContext unreadable SC replies (fraction)"),
    ("omniref_clip_i", "OmniRef CLIP-I (mean over subject pairs)"),
    ("omniref_dino", "OmniRef DINOv2 (mean over subject pairs)"),
    ("omniref_detected_frac", "OmniRef subjects found (fraction)"),
)
"""Other suites' columns (docs/method.md §7), shown when some run has them."""

PAPER_ROWS: list[dict[str, Any]] = [
    {"run": "FLUX.1 Kontext", "sc_official": 0.497, "hps_div10": 0.870, "semantic_official": 0.583},
    {"run": "UNO", "sc_official": 0.523, "hps_div10": 1.009, "semantic_official": 0.667},
    {"run": "OmniGen2", "sc_official": 0.587, "hps_div10": 1.020, "semantic_official": 0.758},
    {"run": "XVerse", "sc_official": 0.587, "hps_div10": 0.893, "semantic_official": 0.669},
    {"run": "PSR (SFT)", "sc_official": 0.559, "hps_div10": 0.794, "semantic_official": 0.712},
    {
        "run": "PSR (RL)",
        "sc_official": 0.673,
        "hps_div10": 1.124,
        "semantic_official": 0.783,
        "sc_official/three": 0.615,
        "sc_official/four": 0.571,
    },
]
"""The paper's PSRBench overall rows (docs/method.md §7), quoted; HPS read as raw HPSv3 / 10."""

CURVES = ("reward/score", "eval/reward/score")


def _mean(block: dict[str, Any], key: str) -> float | None:
    value = block.get(key, {}).get("mean") if isinstance(block.get(key), dict) else None
    return None if value is None else float(value)


def eval_row(run_dir: Path) -> dict[str, Any]:
    """The table row of one psr-eval run: overall (or plain) means and per-subset means."""
    summary = json.loads((run_dir / "summary.json").read_text())
    settings_file = run_dir / "eval_settings.json"
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    checkpoint = (
        settings.get("checkpoint_resolved.path") or settings.get("checkpoint") or settings.get("lora")
    )
    step = settings.get("checkpoint_resolved.step")
    row: dict[str, Any] = {
        "run": run_dir.name,
        "checkpoint": f"{checkpoint} (step {step})" if step is not None else (checkpoint or "base model"),
        "source": summary.get("source", "sample"),
        "samples": summary.get("count"),
        "excluded": summary.get("excluded", 0),
    }
    overall = summary.get("overall") or {}
    metrics = summary.get("metrics", {})
    keys = {k for k, _ in COLUMNS} | set(metrics) | set(overall)
    for key in keys:
        # a run over the seven subsets: the mean over subsets; otherwise the mean over samples
        value = _mean(overall, key) if len(summary.get("by_kind", {})) > 1 else None
        row[key] = value if value is not None else _mean(metrics, key)
    for kind, block in summary.get("by_kind", {}).items():
        for key, stats in block["metrics"].items():
            row[f"{key}/{kind}"] = stats["mean"]
    for key, value in (summary.get("released") or {}).items():  # a suite's released aggregate wins
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            row[key] = float(value)
    return row


def collect(run_dirs: Sequence[str | Path]) -> tuple[list[dict[str, Any]], list[Path], list[Path]]:
    """(rows of the evaluation runs, their directories, the training runs' directories).

    Raises:
        FileNotFoundError: a directory holds neither ``summary.json`` nor ``metrics.jsonl``.
    """
    rows, evals, trains = [], [], []
    for d in map(Path, run_dirs):
        if (d / "summary.json").is_file():
            rows.append(eval_row(d))
            evals.append(d)
        elif (d / "metrics.jsonl").is_file():
            trains.append(d)
        else:
            raise FileNotFoundError(
                f"psr-report: {d} holds neither summary.json (a psr-eval run) nor metrics.jsonl (a training run)"
            )
    names = [r["run"] for r in rows]
    for r, d in zip(rows, evals, strict=True):  # two runs named alike: tell them apart by their parent
        if names.count(r["run"]) > 1:
            r["run"] = f"{d.parent.name}/{d.name}"
    return rows, evals, trains


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def table_columns(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """The paper's columns, then subject consistency per subset for the subsets any run has."""
    subset_cols = [
        (f"sc_official/{s}", f"SC official: {s}")
        for s in SUBSETS
        if any(f"sc_official/{s}" in r for r in [*rows, *PAPER_ROWS])
    ]
    suite_cols = [c for c in SUITE_COLUMNS if any(c[0] in r for r in rows)]
    return [*COLUMNS, *suite_cols, *subset_cols]


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    cols = table_columns(rows)
    head = ["run", "checkpoint", "samples", "excluded", *(title for _, title in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], str(r["checkpoint"]), _fmt(r["samples"]), _fmt(r["excluded"])]
        lines.append("| " + " | ".join(cells + [_fmt(r.get(k)) for k, _ in cols]) + " |")
    for p in PAPER_ROWS:
        cells = [f"{p['run']} (quoted)", "paper, PSRBench overall", "350", ""]
        lines.append("| " + " | ".join(cells + [_fmt(p.get(k)) for k, _ in cols]) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    cols = table_columns(rows)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["run", "quoted", "checkpoint", "samples", "excluded", *(k for k, _ in cols)])
        for r in rows:
            w.writerow(
                [
                    r["run"],
                    0,
                    r["checkpoint"],
                    r["samples"],
                    r["excluded"],
                    *(_fmt(r.get(k)) for k, _ in cols),
                ]
            )
        for p in PAPER_ROWS:
            w.writerow([p["run"], 1, "paper", 350, "", *(_fmt(p.get(k)) for k, _ in cols)])


def bar_charts(out: Path, rows: Sequence[dict[str, Any]]) -> list[Path]:
    """``bars_<metric>.png``: per subset, a bar per run, for each column metric some run has per subset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, title in (*COLUMNS, *SUITE_COLUMNS):
        kinds = [k for k in SUBSETS if any(r.get(f"{key}/{k}") is not None for r in rows)]
        kinds += sorted(
            {c.split("/", 1)[1] for r in rows for c in r if c.startswith(f"{key}/") and r[c] is not None}
            - set(kinds)
        )
        if not kinds:
            continue
        fig, ax = plt.subplots(figsize=(2.0 + 1.1 * len(kinds), 3.6))
        width = 0.8 / max(len(rows), 1)
        for i, r in enumerate(rows):
            values = [r.get(f"{key}/{k}") for k in kinds]
            xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(kinds))]
            ax.bar(xs, [math.nan if v is None else v for v in values], width, label=r["run"])
        ax.set_xticks(range(len(kinds)), kinds)
        ax.set_title(title)
        ax.legend(
            fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=min(len(rows), 3), frameon=False
        )
        fig.tight_layout()
        path = out / f"bars_{key}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def contact_sheets(
    out: Path, run_dirs: Sequence[Path], count: int = 4, labels: Sequence[str] | None = None
) -> list[Path]:
    """``contact_<run>_<metric>.png``: the ``count`` lowest- then highest-scoring samples per metric
    (``labels``: the runs' names in the file names; default the directory names)."""
    from psr.data.dataset import open_image, to_tensor
    from psr.evaluate.scores import read_scores
    from psr.logging import make_grid

    written = []
    names = list(labels) if labels is not None else [d.name for d in run_dirs]
    for d, name in zip(run_dirs, names, strict=True):
        rows = [r for r in read_scores(d / "scores.jsonl") if not r.get("error")]
        for key, _ in (*COLUMNS, *SUITE_COLUMNS):
            scored = sorted(
                (r for r in rows if r["scores"].get(key) is not None), key=lambda r: r["scores"][key]
            )
            if len(scored) < 2:
                continue
            low, high = scored[:count], scored[-count:][::-1]
            cells, captions = [], []
            for label, group in (("lowest", low), ("highest", high)):
                cells.append([to_tensor(open_image(d / r["image"], r["id"], "sample")) for r in group])
                captions.append([f"{label} {r['id']} {r['scores'][key]:.3f}" for r in group])
            path = out / f"contact_{name.replace('/', '_')}_{key}.png"
            make_grid(cells, captions, cell_height=128).save(path)
            written.append(path)
    return written


def curves(out: Path, run_dirs: Sequence[Path], keys: Sequence[str] = CURVES) -> Path | None:
    """``curves.png``: ``keys`` against the step for every training run (None without any)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = []
    for d in run_dirs:
        lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()]
        for key in keys:
            points = [
                (int(x["step"]), float(x[key]))
                for x in lines
                if isinstance(x.get(key), (int, float)) and math.isfinite(float(x[key]))
            ]
            if points:
                series.append((f"{d.name}: {key}", points))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, points in series:
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(run_dirs: Sequence[str | Path], out: str | Path | None = None, contact: int = 4) -> Path:
    """Write the report (module docstring) and return its folder."""
    rows, evals, trains = collect(run_dirs)
    folder = Path(out) if out is not None else Path(run_dirs[0]) / "report"
    folder.mkdir(parents=True, exist_ok=True)
    text = ["# psr report", ""]
    if rows:
        text += ["## PSRBench columns", "", markdown(rows)]
        text += [
            "Rows marked (quoted) are the paper's PSRBench overall numbers (docs/method.md §7), not "
            "measured here; HPS is read as raw HPSv3 / 10. Overall values average the subsets.",
            "",
        ]
        write_csv(folder / "report.csv", rows)
        text += [f"![{p.stem}]({p.name})" for p in bar_charts(folder, rows)]
        if contact > 0:
            text += ["", "## Lowest and highest samples", ""]
            text += [
                f"![{p.stem}]({p.name})"
                for p in contact_sheets(folder, evals, contact, [r["run"] for r in rows])
            ]
    curve = curves(folder, trains) if trains else None
    if curve is not None:
        text += ["", "## Training curves", "", f"![curves]({curve.name})"]
    (folder / "report.md").write_text("\n".join(text) + "\n", encoding="utf-8")
    return folder


def main(argv: Sequence[str] | None = None) -> None:
    """``psr-report RUN_DIR... [--out DIR] [--contact N]``."""
    parser = argparse.ArgumentParser(prog="psr-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="psr-eval run directories and/or training run directories")
    parser.add_argument("--out", default=None, help="output folder (default: <first run>/report)")
    parser.add_argument(
        "--contact", type=int, default=4, help="samples per end of each contact sheet (0: none)"
    )
    args = parser.parse_args(argv)
    folder = write_report(args.runs, args.out, args.contact)
    print(f"psr-report: {folder / 'report.md'}", flush=True)
