"""What the trainer tests share: running a trainer in a child process or through its console
script, killing it after a checkpoint, sending a real preemption signal, reading metrics.jsonl."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
BIN = Path(sys.executable).parent


def clean_env() -> dict[str, str]:
    """This environment without launcher variables (a test's child is one process unless it uses
    torchrun), offline, one thread per process."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_"))
    }
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    return env


def run_cli(
    cmd: list[str], timeout: int = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a console script (or torchrun) from the checkout; fails the test with its stderr.

    The command runs in its own process group: past ``timeout`` (a collective that waits forever)
    the whole group is killed, torchrun's workers included, and the test fails instead of blocking.
    ``env`` adds variables to :func:`clean_env`.
    """
    child = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**clean_env(), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        out, err = child.communicate()
        raise AssertionError(
            f"{' '.join(cmd)} did not finish in {timeout} s:\n{out[-2000:]}\n{err[-4000:]}"
        ) from None
    done = subprocess.CompletedProcess(cmd, child.returncode, out, err)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def launch(script: str, nproc: int, args: list[str]) -> list[str]:
    """The command running console script ``script`` (psr-rl, psr-sft) with ``args``: directly for one
    process, under ``torchrun`` (a local rendezvous on a free port; gloo on CPU) for more."""
    from psr.distributed import free_port

    if nproc == 1:
        return [str(BIN / script), *args]
    return [
        str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "--no-python", str(BIN / script), *args,
    ]  # fmt: skip


def metric(run_dir: Path, key: str) -> dict[int, float]:
    """``step -> value`` of ``key`` in metrics.jsonl; a step logged twice (by a killed run and its
    resume) keeps the last."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if key in rec:
            out[rec["step"]] = rec[key]
    return out


def metric_table(run_dir: Path, keys: tuple[str, ...]) -> dict[tuple[int, str], float]:
    """``(step, key) -> value`` for every key of ``keys`` logged in metrics.jsonl."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.update({(rec["step"], k): rec[k] for k in keys if k in rec})
    return out


def start_trainer(primary: str, overrides: list[str]) -> subprocess.Popen:
    """``psr.trainers.<primary>.main`` on ``conf/<primary>.yaml`` + overrides, in a child process."""
    code = textwrap.dedent(
        f"""
        import torch
        torch.set_num_threads({torch.get_num_threads()})
        from hydra import compose, initialize_config_dir
        from psr.trainers.{primary} import main
        with initialize_config_dir(config_dir={str(CONF)!r}, version_base="1.3"):
            cfg = compose({primary!r}, overrides={overrides!r})
        main(cfg)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def kill_after_checkpoint(child: subprocess.Popen, run_dir: Path, step: int = 2, timeout: float = 180) -> int:
    """SIGKILL ``child`` once the checkpoint of ``step`` is complete; returns the newest complete
    checkpoint's step (the child may have written more before the kill landed)."""
    deadline = time.time() + timeout
    while not (run_dir / "checkpoints" / f"step_{step:08d}" / "COMPLETE").is_file():
        assert child.poll() is None, child.stdout.read().decode()[-3000:]
        assert time.time() < deadline, f"no checkpoint within {timeout} s"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    return max(
        int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file()
    )


def signal_at(trainer: Any, at: int, key: str) -> None:
    """Send this process a real SIGUSR1 when ``trainer`` logs ``key`` at step ``at``: the trainer's
    handler sees it at the step boundary, saves a checkpoint and stops."""
    log = trainer.logger.log

    def log_and_signal(values: dict, step: int) -> None:  # the logger's own signature
        log(values, step)
        if step == at and key in values:
            os.kill(os.getpid(), signal.SIGUSR1)

    trainer.logger.log = log_and_signal


def trained_policy(cfg: Any, checkpoint: Path) -> Any:
    """The model of a run's ``cfg`` with the trainable weights of ``checkpoint``, built on the CPU the
    way the trainers build it (``train.mode``, ``train.lora``)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from psr.models.lora import make_trainable

    policy = instantiate(cfg.model, device="cpu")
    make_trainable(policy, str(cfg.train.mode), **OmegaConf.to_container(cfg.train.lora, resolve=True))
    weights = load_file(str(checkpoint / "trainable.safetensors"))
    missing, unexpected = policy.transformer.load_state_dict(weights, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    return policy


def velocities_with_exported_lora(policy: Any, lora_dir: Path) -> tuple[Any, Any, Any, Any]:
    """``(ours, theirs, x, cond)``: the velocity of ``policy`` (trained weights loaded) and of
    ``FluxKontextPipeline``'s transformer on the tiny model with the exported LoRA loaded by
    ``load_lora_weights``, on the same noisy target tokens, one reference, t = 0.6."""
    from diffusers import FluxKontextPipeline

    from psr.models.builders import tiny_flux_kontext_components

    pipe = FluxKontextPipeline(**tiny_flux_kontext_components(seed=0))
    pipe.load_lora_weights(lora_dir)
    cond = policy.condition("the red disc", [torch.rand(3, 64, 64)], 64, 64)
    x = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = policy.velocity(x, 0.6, cond)
    theirs = pipe.transformer(
        hidden_states=torch.cat([x, cond.ref_tokens], dim=1),
        timestep=torch.tensor([0.6]),
        guidance=torch.tensor([2.5]),
        pooled_projections=cond.pooled_prompt_embeds,
        encoder_hidden_states=cond.prompt_embeds,
        txt_ids=cond.text_ids,
        img_ids=torch.cat([cond.img_ids, cond.ref_ids]),
        return_dict=False,
    )[0][:, :16]
    return ours, theirs, x, cond
