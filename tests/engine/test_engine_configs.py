"""conf/engine, conf/optim and conf/logger build what they say, with the keys engine.setup() takes."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_cases import make_data, make_model, train_steps, trainable
from hydra.utils import instantiate
from omegaconf import OmegaConf

from psr.engine import DeepSpeedEngine, TorchEngine
from psr.logging import MetricLogger

CONF = Path(__file__).resolve().parents[2] / "conf"


def _load(group: str, name: str) -> dict:
    path = CONF / group / f"{name}.yaml"
    assert path.read_text().startswith("# "), f"{path} must start with a comment saying what it is"
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


def test_torch_engine_config_with_adamw_trains() -> None:
    engine = instantiate(_load("engine", "torch"))
    assert isinstance(engine, TorchEngine) and engine.precision == "fp32"
    model = make_model()
    engine.setup(
        model, trainable(model), **_load("optim", "adamw"), total_steps=10, grad_accum=1, micro_batch_size=4
    )
    out = train_steps(engine, *make_data(), steps=2)
    assert [o["lr"] for o in out] == [1e-4, 1e-4] and out[0]["skipped"] == 0.0


@pytest.mark.parametrize("name, stage", [("ds_zero2", 2), ("ds_zero3", 3)])
def test_deepspeed_engine_configs(name: str, stage: int, ds_env: None) -> None:
    cfg = _load("engine", name)
    cfg["precision"] = "fp32"  # bf16 on CPU works but is slow; the stage is what this test checks
    engine = instantiate(cfg)
    assert isinstance(engine, DeepSpeedEngine) and engine.stage == stage
    model = make_model()
    optim = {**_load("optim", "adamw"), "schedule": "cosine", "warmup_steps": 1}
    engine.setup(model, trainable(model), **optim, total_steps=10, grad_accum=2, micro_batch_size=4)
    assert engine.ds_config["train_batch_size"] == 8 and engine.ds_config["gradient_clipping"] == 1.0
    train_steps(engine, *make_data(), steps=1, micro=2)


@pytest.mark.parametrize("name", ["jsonl", "wandb", "tensorboard"])
def test_logger_configs(name: str, tmp_path: Path) -> None:
    cfg = _load("logger", name)
    assert cfg["_target_"] == "psr.logging.MetricLogger" and "jsonl" in cfg["backends"]
    if name == "jsonl":
        logger = instantiate(cfg, run_dir=str(tmp_path), run_config={"a": 1}, rank=0)
        assert isinstance(logger, MetricLogger)
        logger.log({"x": 1.0}, step=0)
        logger.close()
        assert (tmp_path / "metrics.jsonl").is_file()
    else:  # construction is covered by tests/test_logging.py; the keys must be constructor arguments
        instantiate(cfg, run_dir=str(tmp_path), rank=1)  # rank 1: builds nothing, checks the keys
