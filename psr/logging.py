"""Rank-0 telemetry: metrics (JSONL always; wandb, tensorboard optional), image grids, progress bars,
step timing.

``MetricLogger`` appends one JSON object per ``log`` call to ``run_dir/metrics.jsonl`` and flushes
it, so a killed run keeps every line it logged. Non-finite numbers are written as ``null`` (strict
JSON). On ranks other than 0 every method does nothing, so trainers call it unconditionally.
wandb runs offline by default with its files under ``run_dir``; tensorboard is imported only when
asked for.

Kills and resumes: opening the file cuts off a torn last line (a kill mid-write), and a resumed
trainer calls :meth:`MetricLogger.resume_at` with its checkpoint's step before logging, which drops
the lines logged after that checkpoint (they are logged again), so every step appears once. wandb
continues the same run: its id is kept in ``run_dir/wandb_run_id``. tensorboard hides the events
after the checkpoint (``purge_step``).

Usage::

    logger = MetricLogger(run_dir, backends=("jsonl", "wandb"), run_config=cfg_dict, rank=engine.rank)
    logger.resume_at(step)                                          # 0 for a fresh start
    timer = StepTimer()
    with timer("rollout"):
        ...
    logger.log({"train/loss": loss, **timer.pop()}, step=step)      # "time/rollout": seconds
    logger.log_images("train/grid", make_grid(rows, captions), step=step)
    logger.close()
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from psr.fileio import atomic_write

__all__ = ["MetricLogger", "build_logger", "reward_metrics", "StepTimer", "make_grid", "progress", "BACKENDS"]

BACKENDS = ("jsonl", "wandb", "tensorboard")
METRICS = "metrics.jsonl"
WANDB_ID = "wandb_run_id"  # in run_dir: every start of the run continues this wandb run


def _scalar(key: str, value: Any) -> float | int | str | None:
    """A JSON-ready number from a float, int, bool, numpy scalar or one-element tensor."""
    if isinstance(value, str):
        return value
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {key!r} is a tensor of shape {tuple(value.shape)}; log one number")
        value = value.detach().float().item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"metric {key!r} has type {type(value).__name__}; expected a number or a 1-element tensor"
        ) from err
    return number if math.isfinite(number) else None


class MetricLogger:
    """Rank-0 metric and image logging to JSONL, and optionally wandb and tensorboard.

    Args:
        run_dir: the run directory (``metrics.jsonl``, ``images/``, ``wandb/``, ``tensorboard/``).
        backends: any of ``jsonl`` (always added), ``wandb``, ``tensorboard``.
        run_config: the run's resolved config, stored by wandb / tensorboard (not ``config``: that
            name is taken by ``hydra.utils.instantiate``'s first argument).
        rank: this process's rank; only rank 0 logs.
        wandb_project, wandb_name, wandb_entity, wandb_tags: passed to ``wandb.init``.
        wandb_mode: ``offline`` (default; sync later with ``wandb sync``), ``online`` or ``disabled``.
    """

    def __init__(
        self,
        run_dir: str | Path,
        backends: Sequence[str] = ("jsonl",),
        run_config: dict[str, Any] | None = None,
        rank: int = 0,
        wandb_project: str = "psr",
        wandb_name: str | None = None,
        wandb_entity: str | None = None,
        wandb_tags: Sequence[str] = (),
        wandb_mode: str = "offline",
    ) -> None:
        unknown = sorted(set(backends) - set(BACKENDS))
        if unknown:
            raise ValueError(f"logger.backends has {unknown}; expected a subset of {list(BACKENDS)}")
        self.run_dir = Path(run_dir)
        self.enabled = rank == 0
        self.backends = tuple(dict.fromkeys(("jsonl", *backends)))
        self.path = self.run_dir / METRICS
        self.run_config = run_config
        self._wandb: Any = None
        self._tb: Any = None
        self._file: Any = None
        self._logged = False
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(self.path)  # else the next line would be glued to the torn one
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        if "wandb" in self.backends:
            import wandb

            self._wandb = wandb.init(
                project=wandb_project,
                name=wandb_name,
                entity=wandb_entity,
                tags=list(wandb_tags),
                mode=wandb_mode,  # type: ignore[arg-type]
                dir=str(self.run_dir),
                config=run_config or {},
                id=self._wandb_id(),
                resume="allow",
                reinit="finish_previous",
            )
        if "tensorboard" in self.backends:
            try:
                import torch.utils.tensorboard  # noqa: F401 (fail now, not at the first log)
            except ImportError as err:
                raise ImportError(
                    "logger.backends includes tensorboard but the tensorboard package is not installed: "
                    "pip install 'psr-rl[tensorboard]', or use logger=jsonl / logger=wandb"
                ) from err

    def _wandb_id(self) -> str:
        """This run directory's wandb run id: made at the first start, read back at every later one."""
        path = self.run_dir / WANDB_ID
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        run_id = secrets.token_hex(6)  # wandb ids: lowercase letters and digits
        atomic_write(path, run_id + "\n")
        return run_id

    def _tensorboard(self, purge_step: int | None = None) -> Any:
        """The tensorboard writer, made at first use: a resumed run hides the events from
        ``purge_step`` on that its killed predecessor wrote after the checkpoint."""
        if self._tb is None and "tensorboard" in self.backends and self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge_step)
            if self.run_config and not purge_step:
                self._tb.add_text(
                    "config", f"```\n{json.dumps(self.run_config, indent=2, default=str)}\n```", 0
                )
        return self._tb

    def resume_at(self, step: int) -> int:
        """Make ``metrics.jsonl`` hold the steps up to ``step`` only, before a run continues after it.

        Lines of later steps were logged by a run killed after its checkpoint at ``step``; this run
        logs them again. ``step`` 0 is a fresh start (no checkpoint), which logs everything again,
        step 0 included. Lines that are not JSON objects with a ``step`` (a torn line left in the
        middle by an older version) are dropped too. Call it before the first :meth:`log`.

        Args:
            step: the step of the checkpoint the run resumed from; 0 when it starts from scratch.

        Returns:
            How many lines were dropped (0 on ranks other than 0).
        """
        if self._logged:
            raise RuntimeError("MetricLogger.resume_at must come before the first log")
        if not self.enabled:
            return 0
        self._file.close()
        kept, dropped = [], 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                line_step = int(row["step"])
            except (ValueError, TypeError, KeyError):
                dropped += 1
                continue
            if step > 0 and line_step <= step:
                kept.append(line + "\n")
            else:
                dropped += 1
        if dropped:
            atomic_write(self.path, "".join(kept))  # a kill now leaves the old file or the new one
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        if "tensorboard" in self.backends:
            self._tensorboard(purge_step=step + 1 if step > 0 else 0)
        return dropped

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Append ``{"step": step, "time": unix seconds, **metrics}`` to metrics.jsonl (and the others)."""
        if not self.enabled:
            return
        self._logged = True
        values = {k: _scalar(k, v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": int(step), "time": time.time(), **values}) + "\n")
        self._file.flush()
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if self._wandb is not None:
            self._wandb.log(numbers, step=int(step))
        if self._tensorboard() is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, int(step))

    def log_images(self, name: str, grid: Image.Image, step: int) -> Path | None:
        """Save ``run_dir/images/{name}_{step:06d}.png`` (``/`` in ``name`` becomes ``_``) and send it on."""
        if not self.enabled:
            return None
        path = self.run_dir / "images" / f"{name.replace('/', '_')}_{int(step):06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Image(str(path))}, step=int(step))
        if self._tensorboard() is not None:
            import numpy as np

            self._tb.add_image(name, np.asarray(grid.convert("RGB")), int(step), dataformats="HWC")
        return path

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _drop_torn_tail(path: Path) -> None:
    """Cut ``path`` after its last newline: what follows is a line a killed writer did not finish."""
    if not path.is_file():
        return
    with path.open("r+b") as f:
        size = f.seek(0, 2)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)


# ---------------------------------------------------------------------------------------------- grids


def _to_pil(image: Tensor) -> Image.Image:
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"make_grid: a cell must be [3, H, W] (or [1, H, W]), got {tuple(image.shape)}")
    x = image.detach().float().cpu().clamp(0, 1).expand(3, -1, -1)
    return Image.fromarray((x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def _wrap(text: str, draw: ImageDraw.ImageDraw, font: Any, width: int) -> list[str]:
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            trial = f"{line} {word}".strip()
            if line and draw.textlength(trial, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def make_grid(
    rows: Sequence[Sequence[Tensor]],
    captions: Sequence[Sequence[str]] | None = None,
    cell_height: int | None = None,
    pad: int = 4,
) -> Image.Image:
    """One image of rows of cells with optional captions under each cell.

    Args:
        rows: rows of images ``[3, H, W]`` in ``[0, 1]`` (clamped); rows may differ in length and
            cells in size: every cell is resized to ``cell_height`` keeping its aspect ratio.
        captions: same nesting as ``rows`` (e.g. "ref 1", scores), drawn with PIL's default font
            and wrapped to the cell width.
        cell_height: pixel height of every cell; default: the tallest cell.
        pad: pixels between cells.

    Returns:
        An RGB ``PIL.Image`` on a white background.
    """
    if not rows or not any(len(r) for r in rows):
        raise ValueError("make_grid: no images")
    if captions is not None and [len(c) for c in captions] != [len(r) for r in rows]:
        raise ValueError(
            f"make_grid: captions per row {[len(c) for c in captions]} != images per row {[len(r) for r in rows]}"
        )
    height = cell_height or max(int(im.shape[-2]) for r in rows for im in r)
    cells = [
        [
            (pil := _to_pil(im)).resize(
                (max(1, round(pil.width * height / pil.height)), height), Image.Resampling.BILINEAR
            )
            for im in r
        ]
        for r in rows
    ]
    font = ImageFont.load_default()
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(scratch.textbbox((0, 0), "Ag", font=font)[3]) + 2
    wrapped = [
        [_wrap(str(c), scratch, font, cell.width) for c, cell in zip(caps, r, strict=True)]
        for caps, r in zip(captions or [[""] * len(r) for r in cells], cells, strict=True)
    ]
    row_heights = [
        height + (max((len(w) for w in ws), default=0) * line_h if captions else 0) for ws in wrapped
    ]
    width = max(sum(c.width for c in r) + pad * (len(r) + 1) for r in cells)
    grid = Image.new("RGB", (width, sum(row_heights) + pad * (len(rows) + 1)), "white")
    draw = ImageDraw.Draw(grid)
    y = pad
    for r, ws, row_h in zip(cells, wrapped, row_heights, strict=True):
        x = pad
        for cell, lines in zip(r, ws, strict=True):
            grid.paste(cell, (x, y))
            for k, line in enumerate(lines if captions else []):
                draw.text((x, y + height + k * line_h), line, fill="black", font=font)
            x += cell.width + pad
        y += row_h + pad
    return grid


def build_logger(
    node: Mapping[str, Any], run_dir: str | Path, *, run_config: dict[str, Any], rank: int
) -> MetricLogger:
    """The logger of a ``logger`` config node (``_target_`` and its keyword arguments, plain values),
    with the run's resolved config attached.

    Called directly, not through ``hydra.utils.instantiate``: the run config holds ``_target_``
    nodes of its own, which instantiate would build.
    """
    from hydra.utils import get_method

    kwargs = dict(node)
    make = get_method(kwargs.pop("_target_", "psr.logging.MetricLogger"))
    return make(run_dir, run_config=run_config, rank=rank, **kwargs)  # type: ignore[no-any-return]


def reward_metrics(scores: Mapping[str, Tensor]) -> dict[str, float]:
    """``{"reward/<key>": mean over samples where it applies}`` (NaN = does not apply), the std of
    the combined and of each component score (``reward/score_std``, ``reward/<name>/score_std``),
    and the fraction of samples where the combined score applies.

    Args:
        scores: ``[B]`` per key, as a reward returns them (``"score"``, ``"<name>/score"``, ...).
    """
    out = {}
    for k, v in scores.items():
        v = v.detach().float()
        ok = ~torch.isnan(v)
        out[f"reward/{k}"] = float(v[ok].mean()) if bool(ok.any()) else float("nan")
        if k == "score" or k.endswith("/score"):
            out[f"reward/{k}_std"] = float(v[ok].std(unbiased=False)) if bool(ok.any()) else float("nan")
    if "score" in scores:
        out["reward/applies_frac"] = float((~torch.isnan(scores["score"].float())).float().mean())
    return out


# ---------------------------------------------------------------------------------------------- progress, timing


def progress(iterable: Iterable[Any] | int, desc: str = "", rank: int = 0, **tqdm_kwargs: Any) -> Any:
    """A tqdm bar over ``iterable`` (or ``range``-less ``total`` when given an int), shown on rank 0 only."""
    from tqdm.auto import tqdm

    if isinstance(iterable, int):
        return tqdm(total=iterable, desc=desc, disable=rank != 0, dynamic_ncols=True, **tqdm_kwargs)
    return tqdm(iterable, desc=desc, disable=rank != 0, dynamic_ncols=True, **tqdm_kwargs)


class StepTimer:
    """Wall-clock seconds per named section, summed until :meth:`pop`.

    ``with timer("rollout"): ...`` adds the block's duration to "rollout". On CUDA the device is
    synchronized at the edges of each block (``sync_cuda``), so queued kernels are counted where
    they were launched.
    """

    def __init__(self, sync_cuda: bool = True) -> None:
        self.sync_cuda = sync_cuda and torch.cuda.is_available()
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.sync_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync_cuda:
                torch.cuda.synchronize()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    def pop(self, prefix: str = "time/") -> dict[str, float]:
        """``{prefix + name: seconds}`` of every section since the last pop; then start over."""
        out = {f"{prefix}{k}": v for k, v in self.totals.items()}
        self.totals = {}
        return out
