"""MetricLogger (JSONL, wandb offline, tensorboard), image grids, progress bars, step timing."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from psr.logging import MetricLogger, StepTimer, build_logger, make_grid, progress, reward_metrics


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


def test_tensorboard_event_file_holds_the_logged_scalars_and_image(tmp_path: Path) -> None:
    # tensorboard is in the dev extra: read the event file back with tensorboard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricLogger(tmp_path, backends=("tensorboard",), run_config={"seed": 7})
    logger.log({"train/loss": 0.25, "train/count": 3, "reward/nan": float("nan")}, step=1)
    logger.log({"train/loss": torch.tensor(0.5)}, step=2)
    pixels = np.zeros((4, 6, 3), dtype=np.uint8)  # H=4, W=6; one pixel of each channel set apart
    pixels[0, 0] = (255, 0, 0)
    pixels[3, 5] = (0, 0, 255)
    logger.log_images("train/grid", Image.fromarray(pixels), step=2)
    logger.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    # NaN is logged as null in JSONL and not sent on: tensorboard gets only the numbers
    assert set(events.Tags()["scalars"]) == {"train/loss", "train/count"}
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([0.25, 0.5], abs=0)  # both exact in float32
    assert [(e.step, e.value) for e in events.Scalars("train/count")] == [(1, 3.0)]
    (image,) = events.Images("train/grid")
    assert image.step == 2 and (image.width, image.height) == (6, 4)
    decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(decoded, pixels)  # PNG is lossless: the same pixels come back


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


def test_build_logger_calls_the_target_with_the_run_config(tmp_path: Path) -> None:
    run_config = {"seed": 3, "reward": {"_target_": "rewards.color.ColorReward"}}  # not instantiated
    node = {"_target_": "psr.logging.MetricLogger", "backends": ["jsonl"]}
    logger = build_logger(node, tmp_path, run_config=run_config, rank=0)
    assert isinstance(logger, MetricLogger) and logger.backends == ("jsonl",)
    logger.log({"train/loss": 1.0}, step=1)
    logger.close()
    assert (tmp_path / "metrics.jsonl").is_file()
    assert not build_logger(node, tmp_path / "r1", run_config=run_config, rank=1).enabled


def test_reward_metrics_skip_samples_where_a_reward_does_not_apply() -> None:
    nan = float("nan")
    scores = {
        "score": torch.tensor([1.0, 3.0, nan, nan]),
        "color/score": torch.tensor([0.0, 2.0, 4.0, nan]),
        "spatial/flag": torch.tensor([nan, nan, nan, nan]),
    }
    m = reward_metrics(scores)
    assert m["reward/score"] == 2.0 and m["reward/score_std"] == 1.0  # mean and population std of 1, 3
    assert m["reward/color/score"] == 2.0 and m["reward/color/score_std"] == pytest.approx(math.sqrt(8 / 3))
    assert math.isnan(m["reward/spatial/flag"]) and "reward/spatial/flag_std" not in m
    assert m["reward/applies_frac"] == 0.5


# ---------------------------------------------------------------------------------------------- kills, resumes


def _write(run_dir: Path, steps: list[int], torn: str = "") -> None:
    """metrics.jsonl with a train line per step and an eval line at even steps, and a torn tail."""
    rows = []
    for s in steps:
        rows.append({"step": s, "train/loss": float(s)})
        if s % 2 == 0:
            rows.append({"step": s, "eval/reward": -float(s)})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + torn)


def test_torn_last_line_is_cut_before_appending(tmp_path: Path) -> None:
    _write(tmp_path, [1, 2], torn='{"step": 3, "train/lo')  # killed in the middle of a write
    logger = MetricLogger(tmp_path)
    logger.log({"train/loss": 3.0}, step=3)
    logger.close()
    assert [(r["step"], next(iter(set(r) - {"step", "time"}))) for r in _lines(tmp_path)] == [
        (1, "train/loss"),
        (2, "train/loss"),
        (2, "eval/reward"),
        (3, "train/loss"),
    ]


def test_resume_at_keeps_every_line_up_to_the_checkpoint_and_drops_later_ones(tmp_path: Path) -> None:
    """A run killed after logging step 5 resumes from its checkpoint at step 4: steps 1-4 (both lines
    of step 4, train and eval) stay, step 5 and the torn line go, and step 5 is logged again once."""
    _write(tmp_path, [1, 2, 3, 4, 5], torn='{"step": 6, "tr')
    logger = MetricLogger(tmp_path)
    assert logger.resume_at(4) == 1
    logger.log({"train/loss": 50.0}, step=5)
    logger.close()
    rows = _lines(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 2, 3, 4, 4, 5]
    assert rows[-1]["train/loss"] == 50.0
    # a fresh start (no checkpoint: step 0) logs everything again, so nothing is kept
    logger = MetricLogger(tmp_path)
    logger.resume_at(0)
    logger.log({"val/loss": 1.0}, step=0)
    logger.close()
    assert [r["step"] for r in _lines(tmp_path)] == [0]
    logger = MetricLogger(tmp_path)
    logger.log({"x": 1.0}, step=1)
    with pytest.raises(RuntimeError, match="before the first log"):
        logger.resume_at(0)
    logger.close()


def test_wandb_continues_the_run_of_the_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    for step in (1, 2):  # two starts of the same run (a kill and a resume in between)
        logger = MetricLogger(tmp_path, backends=("wandb",), wandb_name="test")
        logger.resume_at(step - 1)
        logger.log({"train/loss": float(step)}, step=step)
        logger.close()
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert run_id and len(runs) == 2  # wandb keeps one folder per start; `wandb sync` joins them by id
    # two starts within one second: wandb appends "-1" to the second folder's name
    assert all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", r.name) for r in runs), runs
    other = tmp_path / "other"
    MetricLogger(other, backends=("wandb",)).close()
    assert (other / "wandb_run_id").read_text().strip() != run_id  # another run directory: another run


def test_tensorboard_hides_the_steps_logged_after_the_checkpoint(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricLogger(tmp_path, backends=("tensorboard",))
    for step in (1, 2, 3):
        logger.log({"train/loss": float(step)}, step=step)
    logger.close()
    time.sleep(1.1)  # event files are named by the second they were opened in
    logger = MetricLogger(tmp_path, backends=("tensorboard",))
    logger.resume_at(2)
    logger.log({"train/loss": 30.0}, step=3)
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]


TINY_RL = [
    "experiment/rl=quickstart",
    "data.num_records=8",
    "data.heldout=2",
    "data.image_size=32",
    "train.resolution=32",
    "train.prompts_per_step=2",
    "train.group_size=4",
    "train.micro_batch_size=4",
    "train.eval_every=1",  # a train line and an eval line at every step
    "train.eval_prompts=2",
    "train.grid_every=0",
    "train.checkpoint_every=2",
    "train.export_lora=false",
    "sampler.num_steps=4",
    "train.steps=6",
]


def _rl_child(run_dir: Path) -> subprocess.Popen:
    conf = Path(__file__).resolve().parents[1] / "conf"
    code = textwrap.dedent(
        f"""
        from hydra import compose, initialize_config_dir
        from psr.trainers.rl import main
        with initialize_config_dir(config_dir={str(conf)!r}, version_base="1.3"):
            main(compose("rl", overrides={[*TINY_RL, f"run_dir={run_dir}"]!r}))
        """
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": root,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


@pytest.mark.slow
def test_sigkilled_rl_run_resumed_logs_each_step_once(tmp_path: Path) -> None:
    """Real psr-rl runs killed with SIGKILL after their checkpoints (and so after logging steps past
    them), a torn line added as a kill mid-write leaves it, then resumed to the end: metrics.jsonl
    holds steps 1-6, each with its train and its eval line, once, and only valid lines."""
    run_dir = tmp_path / "run"
    for step in (2, 4):
        child = _rl_child(run_dir)
        deadline = time.time() + 300
        while not (run_dir / "checkpoints" / f"step_{step:08d}" / "COMPLETE").is_file():
            assert child.poll() is None, child.stdout.read().decode()[-3000:]  # type: ignore[union-attr]
            assert time.time() < deadline, f"no checkpoint of step {step} within 300 s"
            time.sleep(0.05)
        while child.poll() is None and max(r["step"] for r in _lines(run_dir)) <= step:
            time.sleep(0.05)  # let it log past its checkpoint: the lines a resume must drop
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        with (run_dir / "metrics.jsonl").open("a") as f:
            f.write('{"step": 99, "train/lo')
    child = _rl_child(run_dir)
    out, _ = child.communicate(timeout=600)
    assert child.returncode == 0, out.decode()[-3000:]
    rows = _lines(run_dir)  # every line parses
    train = [r["step"] for r in rows if "train/loss" in r]
    evals = [r["step"] for r in rows if any(k.startswith("eval/") for k in r)]
    assert train == [1, 2, 3, 4, 5, 6]
    assert sorted(evals) == [1, 2, 3, 4, 5, 6]
