"""Console entry points: ``psr-sft``, ``psr-rl``, ``psr-eval``, ``psr-data``.

Each is a ``@hydra.main`` over the primary config of the same name in ``conf/``; all outputs go
under Hydra's run directory (``hydra.run.dir=PATH``). Everything below the entry point takes plain
typed arguments; only these functions and the trainers' ``setup()`` read the config.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

CONF_DIR = os.environ.get("PSR_CONF_DIR", str(Path(__file__).resolve().parent.parent / "conf"))


def _entry(config_name: str, run: Callable[[object], None], conf_dir: str = CONF_DIR) -> None:
    import hydra

    if not Path(conf_dir, f"{config_name}.yaml").is_file():
        raise SystemExit(
            f"psr: config directory {conf_dir} has no {config_name}.yaml; install psr from a checkout "
            f"(pip install -e .) or set PSR_CONF_DIR"
        )
    os.environ.setdefault("WANDB_MODE", "offline")
    main = hydra.main(version_base="1.3", config_path=conf_dir, config_name=config_name)(run)
    main()


def _rl(cfg: object) -> None:
    from psr.trainers.rl import main

    main(cfg)  # type: ignore[arg-type]


def _sft(cfg: object) -> None:
    from psr.trainers.sft import main

    main(cfg)  # type: ignore[arg-type]


def _eval(cfg: object) -> None:
    from psr.evaluate import main

    main(cfg)  # type: ignore[arg-type]


def _data(cfg: object) -> None:
    from data_pipeline.cli import main

    main(cfg)  # type: ignore[arg-type]


def rl() -> None:
    """``psr-rl``: GRPO / DPO post-training with the pairwise subject-consistency reward."""
    _entry("rl", _rl)


def sft() -> None:
    """``psr-sft``: supervised multi-reference fine-tuning with the flow-matching loss."""
    _entry("sft", _sft)


def evaluate() -> None:
    """``psr-eval``: sample a benchmark (PSRBench JSON or a manifest) and score it."""
    _entry("eval", _eval)


def data() -> None:
    """``psr-data``: the multi-subject data pipeline (``stage=...``, ``shard.index=i shard.count=n``)."""
    _entry("data", _data, conf_dir=str(Path(CONF_DIR, "pipeline")))
