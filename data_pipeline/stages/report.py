"""Stage ``report``: what the pipeline did, from the export and the stages' ``done.json`` files.

Writes ``<out_dir>/report/``:

    report.json      per stage: inputs, accepted, rejected, model loading, seconds, model seconds; rejection reasons
                     (numbers and quoted names masked so that alike reasons count together);
                     per score: count, mean, min, max
    report.md        the same as tables
    hist_<score>.png a histogram of each score over accepted (blue) and filter-rejected (red) records
    contact_sheet.png accepted records, one row each: target, then the references
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from data_pipeline.images import load_image
from data_pipeline.shards import read_jsonl, shard_dirs
from data_pipeline.stages.common import ORDER
from data_pipeline.stages.export import SHARDED


def reason_key(reason: str) -> str:
    """A rejection reason with its specifics masked: ``crop: 'dog' found 2 times`` -> ``crop: <name> found <n> times``."""
    s = re.sub(r"'[^']*'|\"[^\"]*\"", "<name>", reason)
    s = re.sub(r"\[[^\]]*\]", "<list>", s)
    s = re.sub(r"/\S+", "<path>", s)
    return re.sub(r"-?\d+(\.\d+)?(e-?\d+)?", "<n>", s)


def histogram_png(path: Path, title: str, groups: dict[str, list[float]], bins: int = 20) -> None:
    """A bar histogram of each group's values on shared bins (PIL only)."""
    colours = {"accepted": (60, 110, 220), "rejected": (220, 70, 60)}
    values = [v for vs in groups.values() for v in vs]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    counts = {g: np.histogram(vs, bins=edges)[0] for g, vs in groups.items()}
    top = max([int(c.max()) for c in counts.values()] + [1])
    w, h, pad = 480, 260, 30
    im = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(im)
    draw.text((pad, 6), f"{title}  (n={len(values)})", fill="black")
    slot = (w - 2 * pad) / bins
    for g_i, (g, c) in enumerate(counts.items()):
        for b in range(bins):
            bar = (h - 2 * pad) * c[b] / top
            x0 = pad + b * slot + g_i * slot / len(counts)
            draw.rectangle(
                [x0, h - pad - bar, x0 + slot / len(counts) - 1, h - pad],
                fill=colours.get(g, (120, 120, 120)),
            )
    draw.line([pad, h - pad, w - pad, h - pad], fill="black")
    draw.text((pad, h - pad + 6), f"{lo:.3g}", fill="black")
    draw.text((w - pad - 40, h - pad + 6), f"{hi:.3g}", fill="black")
    draw.text((w // 2 - 60, h - pad + 6), " ".join(f"{g}:{len(v)}" for g, v in groups.items()), fill="black")
    im.save(path)


def contact_sheet(
    path: Path, export_dir: Path, samples: list[dict[str, Any]], *, rows: int = 16, cell: int = 96
) -> int:
    """Accepted records as rows of thumbnails (target, then references); returns the rows drawn."""
    chosen = samples[:rows]
    cols = 1 + max([len(s["subjects"]) for s in chosen] + [1])
    sheet = Image.new("RGB", (cols * cell, max(1, len(chosen)) * (cell + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, s in enumerate(chosen):
        y = r * (cell + 14)
        paths = [s["target"]] + [sub["reference"] for sub in s["subjects"]]
        for c, p in enumerate(paths):
            im, _ = load_image(export_dir / p)
            if im is not None:
                im.thumbnail((cell - 2, cell - 2))
                sheet.paste(im, (c * cell + 1, y + 1))
        draw.text(
            (2, y + cell), f"{s['id']} [{s['kind']}] {s['instruction']}"[: cols * cell // 6], fill="black"
        )
    sheet.save(path)
    return len(chosen)


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "count": len(values),
        "mean": float(np.mean(values)),
        "min": float(np.min(values)),
        "max": float(np.max(values)),
    }


def run(out_dir: str | Path, settings: dict[str, Any], seed: int) -> dict[str, Any]:
    """Write the report (always rewritten: it is cheap and reflects the current outputs)."""
    out_dir = Path(out_dir)
    export_dir = out_dir / "export"
    if not (export_dir / "done.json").is_file():
        raise RuntimeError(f"report needs a finished export in {export_dir}; run psr-data stage=export first")
    samples = read_jsonl(export_dir / "manifest.jsonl")
    rejects = read_jsonl(export_dir / "rejects.jsonl")
    report_dir = out_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)

    stages = {}
    for stage in SHARDED:
        summaries = [json.loads((d / "done.json").read_text()) for d in shard_dirs(out_dir, stage).values()]
        model: Counter[str] = Counter()
        for s in summaries:
            model.update(s["model_seconds"])
        stages[stage] = {
            "shards": len(summaries),
            **{k: sum(s[k] for s in summaries) for k in ("inputs", "accepted", "rejected")},
            "setup_seconds": round(sum(s.get("setup_seconds", 0.0) for s in summaries), 3),
            "seconds": round(sum(s["seconds"] for s in summaries), 3),
            "model_seconds": {k: round(v, 3) for k, v in model.items()},
        }
    reasons: dict[str, Counter[str]] = {}
    for row in rejects:
        reasons.setdefault(row["stage"], Counter())[reason_key(row["reason"])] += 1

    accepted_scores: dict[str, list[float]] = {}
    for s in samples:
        for k, v in s["scores"].items():
            accepted_scores.setdefault(re.sub(r"_\d+$", "", k), []).append(v)
    rejected_scores: dict[str, list[float]] = {}
    for row in rejects:
        if row["stage"] == "filter":
            for k, v in row["scores"].items():
                rejected_scores.setdefault(re.sub(r"_\d+$", "", k), []).append(v)
    histograms = []
    for name in sorted(set(accepted_scores) | set(rejected_scores)):
        png = report_dir / f"hist_{name}.png"
        histogram_png(
            png, name, {"accepted": accepted_scores.get(name, []), "rejected": rejected_scores.get(name, [])}
        )
        histograms.append(png.name)
    sheet_rows = contact_sheet(
        report_dir / "contact_sheet.png", export_dir, samples, rows=int(settings.get("contact_rows", 16))
    )

    report = {
        "records_planned": stages["plan"]["accepted"],
        "records_exported": len(samples),
        "stages": stages,
        "rejections": {st: dict(c.most_common()) for st, c in reasons.items()},
        "scores": {k: _stats(v) for k, v in sorted(accepted_scores.items())},
        "kinds": dict(Counter(s["kind"] for s in samples)),
        "histograms": histograms,
        "contact_sheet_rows": sheet_rows,
    }
    (report_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        "# Data pipeline report",
        "",
        f"{len(samples)} of {stages['plan']['accepted']} planned records exported.",
        "",
    ]
    lines += ["| stage | in | kept | rejected | load s | s | in models s |", "|---|---|---|---|---|---|---|"]
    for st, v in stages.items():
        model_s = sum(v["model_seconds"].values())
        lines.append(
            f"| {st} | {v['inputs']} | {v['accepted']} | {v['rejected']} | {v['setup_seconds']:.2f} | {v['seconds']:.2f} | {model_s:.2f} |"
        )
    lines += ["", "| stage | rejection reason | count |", "|---|---|---|"]
    for st in ORDER:
        for reason, n in reasons.get(st, Counter()).most_common():
            lines.append(f"| {st} | {reason} | {n} |")
    (report_dir / "report.md").write_text("\n".join(lines) + "\n")
    return report
