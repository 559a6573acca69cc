"""What a run starts from (``init_from``: :func:`load_initial_weights`) and what a restarted run
resumes, and the checks that keep it exactly the run it started as.

A trainer's ``setup()`` calls, in order::

    resumed = load_resume(cfg.resume, ckpt_root, "psr-rl", rank)   # before the model is built
    path, pinned = pin_init_from(cfg.init_from, resumed)           # the base model, fixed at the first start
    ...                                                            # model, engine, data
    state = finish_resume(resumed, engine, run_dir, ckpt_root, config, "psr-rl")

- ``resume=auto`` reads the newest complete checkpoint; one whose files cannot be read is reported
  (naming the file) and the previous one is tried. A checkpoint named by ``resume=<path>`` that cannot
  be read is an error.
- A checkpoint keeps its timeline: after resuming step S, the checkpoints at or after S of the
  branch left behind (and, at a fresh start, every earlier checkpoint) are moved to
  ``checkpoints/abandoned/``, so ``keep_last`` prunes only the resumed timeline and ``resume=auto``,
  ``init_from`` and ``psr-eval checkpoint=`` never pick the stale branch.
- ``init_from=RUN_DIR`` is resolved once, at the first start; every checkpoint records the checkpoint
  it resolved to and its fingerprint, and a resume loads exactly that one (gone or changed: an error
  naming both it and what ``init_from`` resolves to now).
- The first start's config is kept as ``run_dir/config.first.yaml`` (Hydra rewrites ``.hydra/`` on
  every start); a resume whose config differs in a key outside :data:`RESUME_MAY_CHANGE` is refused
  with every difference listed (old -> new).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml

from psr.checkpoint import (
    STATE,
    WEIGHTS,
    CorruptCheckpointError,
    check_fingerprint,
    checkpoint_fingerprint,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_torch_file,
    load_training_checkpoint,
    read_checkpoint_file,
    recover_interrupted_saves,
    resolve_resume,
    set_aside,
)

__all__ = [
    "start_from",
    "load_initial_weights",
    "RESUME_MAY_CHANGE",
    "FIRST_CONFIG",
    "load_resume",
    "pin_init_from",
    "finish_resume",
    "config_changes",
]

FIRST_CONFIG = "config.first.yaml"

# Keys a resume may change (a key or a prefix of keys): how long to train, where to log, how often to
# evaluate, draw grids and save, how to load data; and the per-rank batch split (train.prompts_per_step
# under RL, train.grad_accum under SFT) so a run can resume on another number of processes.
# Everything else (model, init_from, optimizer, algorithm, reward, data, seed, LoRA) defines the run.
RESUME_MAY_CHANGE = (
    "resume",
    "run_dir",
    "logger",
    "requeue_on_preemption",
    "peak_tflops",  # telemetry only
    "reward_device",  # runs started before reward_serving replaced it
    "reward_serving",  # where the reward runs, overlap: the scores are the same (rewards.serving)
    "train.steps",
    "train.checkpoint_every",
    "train.keep_last",
    "train.export_lora",
    "train.eval_every",
    "train.eval_prompts",
    "train.grid_every",
    "train.log_every",
    "train.prompts_per_step",
    "train.grad_accum",
    "validation.every",
    "loader",
    "data.check_images",
)
_ABSENT = "<absent>"


def load_resume(resume: str | None, ckpt_root: Path, name: str, rank: int = 0) -> dict[str, Any] | None:
    """Read the checkpoint ``resume`` names (on the CPU), or None for a fresh start (collective).

    Args:
        resume: ``auto`` (the newest readable complete checkpoint under ``ckpt_root``, or none yet),
            null, or a checkpoint directory (or a directory holding them).
        ckpt_root: this run's ``checkpoints/`` directory.
        name: the command, for messages.
        rank: this process's rank (which RNG file to read).

    Returns:
        :func:`psr.checkpoint.load_checkpoint`'s dict.

    Raises:
        CorruptCheckpointError: a named checkpoint, or under ``auto`` every one, cannot be read.
    """
    from psr.distributed import all_gather_object, barrier

    if rank == 0:  # the run's lock is held: what a killed save left is this run's own
        for line in recover_interrupted_saves(ckpt_root):
            print(f"{name}: {ckpt_root}: {line}", flush=True)
    barrier()
    if str(resume) != "auto":
        path = resolve_resume(resume, ckpt_root)
        return None if path is None else load_checkpoint(path, rank=rank)
    candidates = list_checkpoints(ckpt_root)[::-1]
    for i, path in enumerate(candidates):
        try:
            state, error = load_checkpoint(path, rank=rank), None
        except CorruptCheckpointError as err:
            state, error = None, str(err)
        errors = [e for e in all_gather_object(error) if e]  # every rank must fall back together
        if not errors:
            return state
        if rank == 0:
            after = (
                f"the previous complete one, {candidates[i + 1]}" if i + 1 < len(candidates) else "none left"
            )
            print(f"{name}: resume=auto: {errors[0]}; falling back to {after}", flush=True)
    if candidates:
        raise CorruptCheckpointError(
            f"{name}: resume=auto: no checkpoint under {ckpt_root} can be read (see above)"
        )
    return None


def start_from(policy: Any, init_from: str, resumed: dict[str, Any] | None) -> None:
    """Load the ``init_from`` checkpoint this run is pinned to into ``policy``'s base weights, and
    record it on the policy (``init_from``, ``init_from_fingerprint``: every checkpoint of the run
    stores them, as a LoRA of this run is a delta on top of that model).

    Call it before adapters are added and before the engine: the base weights of fresh and resumed
    runs alike, and the reference policy.
    """
    path, pinned = pin_init_from(str(init_from), resumed)
    policy.init_from = str(load_initial_weights(policy, path, fingerprint=pinned))
    policy.init_from_fingerprint = pinned


def pin_init_from(init_from: str, resumed: dict[str, Any] | None) -> tuple[Path, dict[str, Any]]:
    """The checkpoint ``init_from`` stands for in this run, and its fingerprint.

    At a fresh start ``init_from`` (a checkpoint or a run directory: its newest checkpoint) is
    resolved now; a resumed run uses the checkpoint its own checkpoint recorded, which must still
    exist unchanged. A run directory that saved a newer checkpoint since does not change the base
    model of a run.

    Raises:
        FileNotFoundError / ValueError: the pinned checkpoint is gone / was saved again; the message
            names it and what ``init_from`` resolves to now.
    """
    recorded = (resumed["training_state"].get("model") or {}) if resumed else {}
    pinned = recorded.get("init_from_fingerprint")
    if pinned is None:
        # a fresh start, or a checkpoint written before fingerprints: its recorded directory as is
        path = find_checkpoint(recorded.get("init_from") or init_from)
        return path, checkpoint_fingerprint(path)
    try:
        return check_fingerprint(pinned, f"the checkpoint {resumed['path']} resumed here"), pinned  # type: ignore[index]
    except (FileNotFoundError, ValueError) as err:
        try:
            now = f"{find_checkpoint(init_from)}"
        except FileNotFoundError:
            now = "no checkpoint"
        raise type(err)(
            f"init_from={init_from}: {err}; init_from now resolves to {now}. The base model of a run "
            "cannot change: restore that checkpoint, or train into a new run_dir"
        ) from err


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``{"a.b.c": leaf}`` (an empty mapping is a leaf)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in RESUME_MAY_CHANGE)


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(refused, allowed)``: the keys that differ between two configs, as ``"key: old -> new"``
    lines, split by :data:`RESUME_MAY_CHANGE`."""
    a, b = flatten(old), flatten(new)
    refused: list[str] = []
    allowed: list[str] = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, _ABSENT) != b.get(key, _ABSENT):
            line = f"{key}: {a.get(key, _ABSENT)!r} -> {b.get(key, _ABSENT)!r}"
            (allowed if _may_change(key) else refused).append(line)
    return refused, allowed


def finish_resume(
    resumed: dict[str, Any] | None,
    engine: Any,
    run_dir: Path,
    ckpt_root: Path,
    config: dict[str, Any],
    name: str,
) -> dict[str, Any] | None:
    """Restore ``resumed`` into the set-up engine (RNG states too) after checking ``config`` against
    the first start's, then set the stale branch aside (collective).

    Args:
        resumed: what :func:`load_resume` read, or None (a fresh start: ``config`` becomes the first
            start's config, and earlier checkpoints in ``ckpt_root`` are set aside).
        config: this start's whole config, resolved to plain values.

    Returns:
        :func:`psr.checkpoint.load_training_checkpoint`'s dict, or None for a fresh start.

    Raises:
        ValueError: the config differs from the first start's in keys a resume may not change.
    """
    first = run_dir / FIRST_CONFIG
    state = None
    if resumed is not None:
        state = load_training_checkpoint(resumed, engine)  # a shape that does not fit names its key first
        if first.is_file():
            refused, allowed = config_changes(yaml.safe_load(first.read_text()), config)
            if refused:
                raise ValueError(
                    f"{name}: resuming from {resumed['path']} with a config that differs from the first "
                    f"start's ({first}) in keys a resume may not change (old -> new):\n  "
                    + "\n  ".join(refused)
                    + f"\nTrain into a new run_dir, or set them back. Keys that may change: {', '.join(RESUME_MAY_CHANGE)}"
                )
            if allowed and engine.is_main:
                print(f"{name}: resumed with changed settings (old -> new): {'; '.join(allowed)}", flush=True)
    if engine.is_main:
        if resumed is None or not first.is_file():
            first.write_text(yaml.safe_dump(config, sort_keys=False))
        set_aside(ckpt_root, None if resumed is None else resumed["path"], name)
        if state is not None:
            print(f"{name}: resumed from {resumed['path']} at step {state['step']}", flush=True)  # type: ignore[index]
    engine.barrier()
    return state


@torch.no_grad()
def load_initial_weights(
    policy: Any,
    path: str | os.PathLike,
    *,
    use_ema: bool = True,
    fingerprint: dict[str, Any] | None = None,
    key: str = "init_from",
    _depth: int = 0,
) -> Path:
    """Start ``policy`` from the weights of an SFT (or RL) checkpoint; what ``init_from=`` does.

    ``path`` is a checkpoint directory, or a run directory (its newest complete checkpoint). A LoRA
    checkpoint is **merged** into the transformer's base weights (:func:`psr.models.lora.merge_lora`,
    ``W += (alpha / r) B A``); a full checkpoint replaces them. Adapters already on ``policy`` (e.g.
    the fresh RL LoRA) are left as they are, so the adapted model starts equal to the checkpoint's
    model and the adapters-disabled reference policy is that model too. With ``use_ema`` the
    checkpoint's EMA weights are used when it has them. A LoRA run that itself started from
    ``init_from`` (RL on an SFT run) recorded it: that model is loaded first, then this run's delta.

    With ``fingerprint`` (a :func:`checkpoint_fingerprint`: a run pins its ``init_from`` checkpoint at
    its first start) exactly that checkpoint is read, and a missing or changed one is an error; a
    checkpoint whose run recorded the fingerprint of its own ``init_from`` is checked the same way.

    ``key`` is the setting that named ``path`` (``init_from``; psr-eval's ``checkpoint``), for messages.

    Returns:
        The checkpoint directory that was read.
    """
    from safetensors.torch import load_file

    from psr.models.lora import merge_lora

    ckpt_dir = (
        find_checkpoint(path, key) if fingerprint is None else check_fingerprint(fingerprint, f"{key}={path}")
    )
    state = read_checkpoint_file(ckpt_dir / STATE, load_torch_file)["training_state"]
    weights = read_checkpoint_file(ckpt_dir / WEIGHTS, lambda p: load_file(str(p)))
    ema = state["engine"].get("ema")
    if use_ema and ema is not None:
        weights = ema["shadow"]
    meta = state.get("model") or {}
    if meta.get("mode") == "lora" and meta.get("init_from"):
        # this run's LoRA is a delta on the model it started from (e.g. RL on SFT): that one first
        if _depth >= 8:
            raise ValueError(f"{ckpt_dir}: init_from chain longer than 8 checkpoints (a cycle?)")
        pinned = meta.get("init_from_fingerprint")
        load_initial_weights(
            policy, meta["init_from"], use_ema=use_ema, fingerprint=pinned, _depth=_depth + 1
        )
    transformer = policy.transformer
    if meta.get("mode") == "lora":
        scale = float(meta["lora"]["alpha"]) / int(meta["lora"]["rank"])
        merge_lora(transformer, weights, scale, source=str(ckpt_dir))
    elif meta.get("mode") == "full":
        base = {
            k.replace(".base_layer.", "."): v
            for k, v in transformer.state_dict(keep_vars=True).items()
            if "lora_" not in k
        }
        missing, unknown = sorted(set(base) - set(weights)), sorted(set(weights) - set(base))
        if missing or unknown:
            raise KeyError(
                f"{ckpt_dir}: full checkpoint does not fit the model: missing {missing[:3]}, unknown {unknown[:3]}"
            )
        for k, v in weights.items():
            base[k].copy_(v.to(base[k].dtype))
    else:
        raise ValueError(f"{ckpt_dir}: checkpoint has no model metadata (mode lora | full)")
    return ckpt_dir
