"""Training recipes (``psr-sft``: :mod:`psr.trainers.sft`, ``psr-rl``: :mod:`psr.trainers.rl`) and how
an entry point runs one: the run directory, ``setup`` / ``train`` / ``cleanup``, the closing report.

A recipe is one class read top to bottom: ``__init__`` reads scalars, ``setup()`` builds each
component (its own ``_setup_*`` methods), ``train()``, ``save_checkpoint()``, ``cleanup()``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Protocol

__all__ = ["Recipe", "resolve_run_dir", "run_trainer", "print_outputs"]


class Recipe(Protocol):
    """What :func:`run_trainer` needs of a trainer."""

    run_dir: Path
    engine: Any

    def setup(self) -> None: ...
    def train(self) -> None: ...
    def cleanup(self) -> None: ...


def resolve_run_dir(run_dir: str | os.PathLike | None) -> Path:
    """``run_dir`` (the ``run_dir`` key) if set, else Hydra's output directory of this run; created."""
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    path = Path(os.path.expanduser(str(run_dir))).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_trainer(trainer: Recipe, name: str) -> None:
    """``setup``, ``train``, ``cleanup`` (always), then the report of where the outputs are."""
    trainer.setup()
    start = time.time()
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    if trainer.engine.is_main:
        print_outputs(name, trainer.run_dir, time.time() - start)


def print_outputs(name: str, run_dir: Path, seconds: float, extra: dict[str, Any] | None = None) -> None:
    """Print where a run's outputs are: checkpoints (and LoRA exports), metrics, image grids, config."""
    from psr.checkpoint import latest_checkpoint

    lines = [f"{name}: done in {seconds:.1f} s; outputs under {run_dir}"]
    latest = latest_checkpoint(run_dir / "checkpoints")
    if latest is not None:
        lines.append(f"  checkpoint:  {latest}")
        if (latest / "lora").is_dir():
            lines.append(f"  LoRA (diffusers): {latest / 'lora'}")
    for label, rel in (
        ("metrics", "metrics.jsonl"),
        ("image grids", "images"),
        ("config", ".hydra/config.yaml"),
    ):
        if (run_dir / rel).exists():
            lines.append(f"  {label + ':':<12} {run_dir / rel}")
    for k, v in (extra or {}).items():
        lines.append(f"  {k + ':':<12} {v}")
    print("\n".join(lines), flush=True)
