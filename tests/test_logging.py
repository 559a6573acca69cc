"""MetricLogger (JSONL, wandb offline, tensorboard), image grids, progress bars, step timing."""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from psr.logging import MetricLogger, StepTimer, make_grid, progress


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_jsonl_lines_are_flushed_as_logged(tmp_path: Path) -> None:
    logger = MetricLogger(tmp_path, run_config={"lr": 1e-4})
    logger.log(
        {"train/loss": torch.tensor(0.25), "train/count": 3, "train/ok": True, "reward/nan": float("nan")},
        step=1,
    )
    lines = _lines(tmp_path)  # readable before close: a killed run keeps what it logged
    assert lines[0]["step"] == 1 and lines[0]["train/loss"] == 0.25 and lines[0]["train/count"] == 3
    assert lines[0]["train/ok"] == 1 and lines[0]["reward/nan"] is None  # strict JSON: no NaN token
    logger.log({"train/loss": np.float32(0.5)}, step=2)
    assert [line["train/loss"] for line in _lines(tmp_path)] == [0.25, 0.5]
    logger.close()
    MetricLogger(tmp_path).log({"train/loss": 1.0}, step=3)  # a resumed run appends
    assert [line["step"] for line in _lines(tmp_path)] == [1, 2, 3]


def test_only_rank_zero_writes(tmp_path: Path) -> None:
    logger = MetricLogger(tmp_path / "run", rank=1)
    logger.log({"x": 1.0}, step=1)
    assert logger.log_images("g", Image.new("RGB", (4, 4)), step=1) is None
    logger.close()
    assert not (tmp_path / "run").exists()


def test_bad_metrics_and_backends_are_named(tmp_path: Path) -> None:
    logger = MetricLogger(tmp_path)
    with pytest.raises(ValueError, match="train/vec"):
        logger.log({"train/vec": torch.ones(3)}, step=1)
    with pytest.raises(TypeError, match="train/obj"):
        logger.log({"train/obj": object()}, step=1)
    with pytest.raises(ValueError, match="logger.backends"):
        MetricLogger(tmp_path, backends=("jsonl", "mlflow"))


def test_wandb_offline_writes_under_the_run_dir(tmp_path: Path) -> None:
    logger = MetricLogger(tmp_path, backends=("wandb",), run_config={"seed": 0}, wandb_name="test")
    logger.log({"train/loss": 1.5}, step=1)
    logger.log_images("train/grid", Image.new("RGB", (8, 8), "red"), step=1)
    logger.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
    assert _lines(tmp_path)[0]["train/loss"] == 1.5  # jsonl is always on


def test_tensorboard_is_optional_with_a_clear_error(tmp_path: Path) -> None:
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ImportError, match="logger.backends includes tensorboard"):
            MetricLogger(tmp_path, backends=("tensorboard",))
    else:
        logger = MetricLogger(tmp_path, backends=("tensorboard",))
        logger.log({"train/loss": 1.0}, step=1)
        logger.close()
        assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_log_images_saves_a_png(tmp_path: Path) -> None:
    logger = MetricLogger(tmp_path)
    path = logger.log_images("train/grid", Image.new("RGB", (6, 4), "blue"), step=12)
    assert path == tmp_path / "images" / "train_grid_000012.png"
    assert Image.open(path).size == (6, 4)


def _solid(rgb: tuple[float, float, float], h: int, w: int) -> torch.Tensor:
    return torch.tensor(rgb).view(3, 1, 1).expand(3, h, w).clone()


def test_make_grid_layout_resizes_rows_of_any_length() -> None:
    red, green, blue = _solid((1, 0, 0), 16, 16), _solid((0, 1, 0), 32, 64), _solid((0, 0, 1), 8, 8)
    grid = make_grid([[red, green], [blue]], cell_height=16, pad=2)
    # row 1: 16x16 and 32x16 (aspect kept); row 2: 16x16; widths = cells + pads
    assert grid.size == (2 + 16 + 2 + 32 + 2, 2 + 16 + 2 + 16 + 2)
    px = np.asarray(grid)
    assert tuple(px[2 + 8, 2 + 8]) == (255, 0, 0)
    assert tuple(px[2 + 8, 2 + 16 + 2 + 16]) == (0, 255, 0)
    assert tuple(px[2 + 16 + 2 + 8, 2 + 8]) == (0, 0, 255)
    assert tuple(px[2 + 16 + 2 + 8, 2 + 16 + 2 + 8]) == (255, 255, 255)  # short row: background
    default = make_grid([[red, green]])  # default height: the tallest cell
    assert default.size[1] == 4 + 32 + 4


def test_make_grid_captions_are_drawn_below_cells() -> None:
    cells = [[_solid((1, 1, 1), 16, 16), _solid((1, 1, 1), 16, 16)]]
    plain = make_grid(cells, pad=0)
    captioned = make_grid(cells, captions=[["ref 1", "0.731 a long caption that wraps"]], pad=0)
    assert captioned.size[0] == plain.size[0] and captioned.size[1] > plain.size[1]
    text_band = np.asarray(captioned)[16:]
    assert (text_band < 128).any()  # some dark text pixels under the white cells
    with pytest.raises(ValueError, match="captions per row"):
        make_grid(cells, captions=[["only one"]])
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        make_grid([[torch.zeros(2, 4, 4)]])


def test_progress_shows_on_rank_zero_only() -> None:
    assert list(progress(range(3), "x", rank=0)) == [0, 1, 2]
    hidden = progress(range(3), "x", rank=1)
    assert hidden.disable and list(hidden) == [0, 1, 2]
    bar = progress(5, "total", rank=0)
    bar.update(2)
    assert bar.n == 2 and bar.total == 5
    bar.close()


def test_step_timer_sums_sections_and_resets() -> None:
    timer = StepTimer()
    for _ in range(2):
        with timer("rollout"):
            time.sleep(0.02)
    with timer("update"):
        pass
    out = timer.pop()
    assert set(out) == {"time/rollout", "time/update"}
    assert 0.04 <= out["time/rollout"] < 0.5 and out["time/update"] < 0.02
    assert timer.pop() == {}
    with pytest.raises(RuntimeError), timer("reward"):
        raise RuntimeError("fails inside")
    assert math.isfinite(timer.pop()["time/reward"])  # counted even when the block raises
