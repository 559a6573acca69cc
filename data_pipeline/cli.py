"""``psr-data``: run one stage, or all of them, on one shard.

    psr-data experiment=quickstart                                 # everything, CPU, tiny models
    psr-data stage=target shard.index=3 shard.count=64 out_dir=/data/psr-syn paths.flux=/models/FLUX.1-dev
    psr-data --multirun shard.index='range(0,4)' shard.count=4     # four shards, one after another
    torchrun --nproc_per_node 4 --no-python psr-data shard.index=auto shard.count=auto out_dir=...   # in parallel
    python -m data_pipeline.cli ...                                # the same without the console script

``stage=all`` runs the sharded stages (plan ... filter) for this shard, then ``export`` and
``report`` if every shard of ``filter`` is done (otherwise it says which are missing; run
``stage=export`` once they are). Finished shards are skipped, unfinished ones resume (see
:mod:`data_pipeline.shards`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from data_pipeline.shards import Shard, StageInputError, shard_dirs
from data_pipeline.stages.common import ORDER
from data_pipeline.stages.export import SHARDED
from psr.runlock import RunLock, RunLockError

log = logging.getLogger("data_pipeline")


def resolve_out_dir(out_dir: str | None) -> Path:
    """``out_dir``, or Hydra's run directory (single run) / sweep directory (multirun: every shard
    of a sweep writes into one dataset)."""
    if out_dir:
        return Path(out_dir).expanduser().resolve()
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        raise ValueError("out_dir is null and no Hydra run is active; pass out_dir=PATH")
    hc = HydraConfig.get()
    return Path(hc.sweep.dir if hc.mode == RunMode.MULTIRUN else hc.runtime.output_dir).resolve()


def stage_settings(cfg: Any, stage: str) -> dict[str, Any]:
    """The ``<stage>`` section of the config as plain, resolved Python data."""
    from omegaconf import OmegaConf

    if stage not in cfg:
        raise KeyError(f"the config has no section {stage!r}")
    return OmegaConf.to_container(cfg[stage], resolve=True)  # type: ignore[return-value]


def filter_complete(out_dir: Path) -> tuple[bool, list[int]]:
    """Whether every shard of ``filter`` is published, and which are missing."""
    done = shard_dirs(out_dir, "filter")
    counts = {c for _, c in done}
    if len(counts) != 1:
        return False, []
    n = counts.pop()
    missing = [i for i in range(n) if (i, n) not in done]
    return not missing, missing


def shard_from_env(index: Any, count: Any) -> Shard:
    """``shard.index`` / ``shard.count``; ``auto`` takes them from the launcher: a Slurm array task
    (``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT``), a torchrun rank
    (``RANK`` of ``WORLD_SIZE``) or an srun task (``SLURM_PROCID`` of ``SLURM_NTASKS``); else 0 of 1."""
    if str(index) != "auto" and str(count) != "auto":
        return Shard(int(index), int(count))
    if str(index) != "auto" or str(count) != "auto":
        raise ValueError(f"shard.index={index} shard.count={count}: set both to auto, or neither")
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        return Shard(int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"]))
    if "WORLD_SIZE" in env:
        return Shard(int(env.get("RANK", 0)), int(env["WORLD_SIZE"]))
    if "SLURM_NTASKS" in env:
        return Shard(int(env.get("SLURM_PROCID", 0)), int(env["SLURM_NTASKS"]))
    return Shard(0, 1)


def data_lock(out_dir: Path, what: str, *, acquire: bool = True) -> RunLock:
    """The lock ``<out_dir>/.psr-data.<what>.lock`` (``what``: a shard's name, or ``export`` for export
    and report), taken unless ``acquire`` is False; see :mod:`psr.runlock`."""
    lock = RunLock(out_dir, command="psr-data", key="out_dir", name=f".psr-data.{what}.lock")
    return lock.acquire() if acquire else lock


def run_stage(stage: str, out_dir: Path, shard: Shard, cfg: Any) -> dict[str, Any]:
    """Run one stage (sharded ones on ``shard``); returns its summary."""
    import importlib

    module = importlib.import_module(f"data_pipeline.stages.{stage}")
    settings = stage_settings(cfg, stage)
    seed = int(cfg.seed)
    if stage in SHARDED:
        return module.run(out_dir, shard, settings, seed)
    return module.run(out_dir, settings, seed)


def main(cfg: Any) -> dict[str, dict[str, Any]]:
    """Entry point for a composed config (``conf/pipeline/data.yaml``); returns each stage's summary."""
    stage = str(cfg.stage)
    if stage != "all" and stage not in ORDER:
        raise ValueError(f"stage={stage!r}; expected 'all' or one of {list(ORDER)}")
    shard = shard_from_env(cfg.shard.index, cfg.shard.count)
    if cfg.get("num_threads"):
        import torch

        torch.set_num_threads(int(cfg.num_threads))
    out_dir = resolve_out_dir(cfg.get("out_dir"))
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("psr-data: stage=%s %s out_dir=%s", stage, shard.name, out_dir)
    summaries: dict[str, dict[str, Any]] = {}
    # one writer per shard (array tasks write other shards of this out_dir in parallel) and one for
    # the unsharded export + report; held until the stages end, exceptions included
    with contextlib.ExitStack() as locks:
        if stage not in ("export", "report"):
            try:
                locks.enter_context(data_lock(out_dir, shard.name))
            except RunLockError as err:
                raise SystemExit(f"psr-data {shard.name}: {err}") from err
        tail = data_lock(out_dir, "export", acquire=False)  # taken when export is reached
        locks.callback(tail.release)
        for name in ORDER if stage == "all" else (stage,):
            if stage == "all" and name == "export":
                complete, missing = filter_complete(out_dir)
                if not complete:
                    log.info(
                        "export waits for filter shards %s; run psr-data stage=export when they are done",
                        missing,
                    )
                    break
            if name not in SHARDED and not tail.held:
                try:
                    tail.acquire()
                except RunLockError as err:
                    if stage != "all":
                        raise SystemExit(f"psr-data stage={name}: {err}") from err
                    log.warning("export and report are left to the process that holds them: %s", err)
                    break
            try:
                summaries[name] = run_stage(name, out_dir, shard, cfg)
            except StageInputError as err:
                raise SystemExit(f"psr-data stage={name}: {err}") from err
            s = summaries[name]
            if "inputs" in s:
                model = sum(s["model_seconds"].values())
                log.info(
                    "%-10s %s: %d in, %d kept, %d rejected, %.1f s (%.1f s in models)",
                    name,
                    shard.name,
                    s["inputs"],
                    s["accepted"],
                    s["rejected"],
                    s["seconds"],
                    model,
                )
            elif name == "export":
                log.info(
                    "export: %d records, %d rejects -> %s", s["records"], s["rejected"], out_dir / "export"
                )
            elif name == "report":
                log.info("report: %s", out_dir / "report" / "report.md")
    return summaries


def hydra_entry() -> None:
    """``python -m data_pipeline.cli``: ``main`` under ``@hydra.main`` over ``conf/pipeline/data.yaml``."""
    import hydra

    conf = Path(os.environ.get("PSR_CONF_DIR", Path(__file__).resolve().parent.parent / "conf")) / "pipeline"
    if not (conf / "data.yaml").is_file():
        raise SystemExit(f"psr-data: no {conf / 'data.yaml'}; run from a checkout or set PSR_CONF_DIR")
    hydra.main(version_base="1.3", config_path=str(conf), config_name="data")(main)()


if __name__ == "__main__":
    hydra_entry()
