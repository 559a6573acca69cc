"""Console entry points: ``psr-sft``, ``psr-rl``, ``psr-eval``, ``psr-data`` (and ``psr-plan``, :mod:`psr.plan`).

Each is a ``@hydra.main`` over the primary config of the same name in ``conf/``; all outputs go
under Hydra's run directory (``hydra.run.dir=PATH``). ``experiment=NAME`` picks the primary's own
preset (``conf/experiment/<primary>/NAME.yaml``, see :func:`psr.config.expand_experiment`), and the
composed config is checked (:func:`psr.config.check_config`: a key no reader takes is an error)
before anything is built. Everything below the entry point takes plain typed arguments; only these
functions and the trainers' ``setup()`` read the config.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from psr.config import CONF_DIR, check_config, conf_dir, expand_experiment

__all__ = ["CONF_DIR", "data", "evaluate", "plan", "report", "rl", "sft"]


def _entry(primary: str, run: Callable[[object], None]) -> None:
    import hydra

    directory = conf_dir(primary)
    if not Path(directory, f"{primary}.yaml").is_file():
        raise SystemExit(
            f"psr: config directory {directory} has no {primary}.yaml; install psr from a checkout "
            f"(pip install -e .) or set PSR_CONF_DIR"
        )
    os.environ.setdefault("WANDB_MODE", "offline")
    sys.argv[1:] = expand_experiment(primary, sys.argv[1:])

    def checked(cfg: object) -> None:
        check_config(
            cfg, primary
        )  # before anything is built: a stray key fails in seconds, not after loading
        run(cfg)

    main = hydra.main(version_base="1.3", config_path=str(directory), config_name=primary)(checked)
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


def plan() -> None:
    """``psr-plan``: FLOPs, memory per GPU and a step-time bound of a psr-rl / psr-sft run (meta device).

    Not a ``@hydra.main``: it composes ``conf/plan.yaml`` with the ``plan.*`` overrides and psr-rl's
    (``--sft``: psr-sft's) config with the rest, each checked as its own command checks it."""
    from psr.plan import main

    main()


def data() -> None:
    """``psr-data``: the multi-subject data pipeline (``stage=...``, ``shard.index=i shard.count=n``)."""
    _entry("data", _data)


def report() -> None:
    """``psr-report RUN_DIR...``: tables, bar charts, contact sheets and curves over eval and training runs."""
    from psr.evaluate.report import main

    main()
