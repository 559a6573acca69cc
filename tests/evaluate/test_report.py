"""``psr-report``: tables against means computed here, the quoted paper rows, the charts, the
contact sheets' choice of samples and the training curves, on run directories written by hand."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from psr.evaluate import summarize

SC = {"attribute": [0.2, 0.4], "position": [0.9, 0.7], "three": [0.5, 0.1]}


def eval_run(path: Path, shift: float) -> list[dict]:
    """A psr-eval run of 6 samples over three subsets (sc_official = SC + shift, hps = 10 x that)."""
    (path / "samples").mkdir(parents=True)
    rows = []
    for kind, values in SC.items():
        for i, v in enumerate(values):
            rid = f"{kind}-{i}"
            level = int(255 * (v + shift))
            Image.fromarray(np.full((8, 8, 3), level, dtype=np.uint8)).save(path / "samples" / f"{rid}_0.png")
            scores = {"sc_official": v + shift, "hps_div10": 10 * (v + shift) / 10, "semantic": None}
            rows.append(
                {"id": rid, "kind": kind, "sample": 0, "image": f"samples/{rid}_0.png", "scores": scores}
            )
    rows.append(
        {"id": "three-9", "kind": "three", "sample": 0, "image": "", "error": "missing", "scores": {}}
    )
    (path / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps(summarize(rows)))
    settings = {"checkpoint_resolved.path": "/runs/rl/checkpoints/step_8", "checkpoint_resolved.step": 8}
    (path / "eval_settings.json").write_text(json.dumps(settings))
    return rows


def train_run(path: Path, slope: float) -> None:
    path.mkdir(parents=True)
    lines = [{"step": s, "reward/score": slope * s} for s in range(1, 6)]
    lines += [{"step": s, "eval/reward/score": slope * s / 2} for s in (2, 4)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from psr.evaluate.report import write_report

    root = tmp_path_factory.mktemp("runs")
    eval_run(root / "a" / "eval", 0.0)
    eval_run(root / "b" / "eval", 0.1)
    train_run(root / "rl1", 0.1)
    train_run(root / "rl2", 0.2)
    runs = [root / "a" / "eval", root / "b" / "eval", root / "rl1", root / "rl2"]
    return write_report(runs, root / "out", contact=2)


def test_table_rows_are_means_over_subsets(report):
    with (report / "report.csv").open() as f:
        table = list(csv.DictReader(f))
    measured = [r for r in table if r["quoted"] == "0"]
    assert [r["run"] for r in measured] == ["a/eval", "b/eval"]  # same names: told apart by the parent
    for row, shift in zip(measured, (0.0, 0.1), strict=True):
        subset_means = [np.mean(v) + shift for v in SC.values()]
        assert float(row["sc_official"]) == pytest.approx(np.mean(subset_means), abs=1e-3)
        assert float(row["sc_official/position"]) == pytest.approx(0.8 + shift, abs=1e-3)
        assert row["excluded"] == "1" and row["samples"] == "7"
        assert row["checkpoint"] == "/runs/rl/checkpoints/step_8 (step 8)"
        assert row["semantic"] == ""  # no value in any sample: an empty cell
    quoted = {r["run"]: r for r in table if r["quoted"] == "1"}
    assert float(quoted["PSR (RL)"]["sc_official"]) == 0.673
    assert float(quoted["PSR (RL)"]["sc_official/three"]) == 0.615
    assert float(quoted["FLUX.1 Kontext"]["semantic_official"]) == 0.583
    text = (report / "report.md").read_text()
    assert "PSR (RL) (quoted)" in text and "| a/eval |" in text


def test_charts_contact_sheets_and_curves(report):
    assert Image.open(report / "bars_sc_official.png").size[0] > 0
    assert not (report / "bars_semantic.png").exists()  # no run has a semantic value
    assert Image.open(report / "curves.png").size[0] > 0
    sheet = report / "contact_a_eval_sc_official.png"
    assert sheet.is_file()
    from psr.evaluate.report import contact_sheets

    # the chosen samples: the two lowest (0.1, 0.2) and the two highest (0.9, 0.7), darkest first
    out = report / "sheet_check"
    out.mkdir()
    path = contact_sheets(out, [report.parent / "a" / "eval"], count=2)[0]
    arr = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    assert arr.min() < 30  # the 0.1-level cell (25) is there
    assert (arr > 225).mean() > 0.1 and (np.abs(arr - 229) < 3).any()  # the 0.9-level cell (229)


def test_console_entry_and_bad_directory(report, tmp_path, monkeypatch):
    """``psr-report`` is ``psr.cli:report`` (pyproject.toml): its argv parsed as a user types it."""
    from psr.cli import report as entry
    from psr.evaluate.report import write_report

    argv = ["psr-report", str(report.parent / "a" / "eval"), "--out", str(tmp_path / "r"), "--contact", "0"]
    monkeypatch.setattr(sys, "argv", argv)
    entry()
    assert (tmp_path / "r" / "report.md").is_file()
    assert not list((tmp_path / "r").glob("contact_*.png"))
    with pytest.raises(FileNotFoundError, match="neither summary.json"):
        write_report([tmp_path / "r"])
