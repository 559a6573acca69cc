"""Full-state checkpoints in a run directory, written atomically; resume; ``init_from`` chains.

Layout of one checkpoint (``ckpt_root/step_00000100/``)::

    trainable.safetensors    trainable weights (fp32), by parameter name
    state.pt                 {"step", "training_state", "data_state"}: plain tensors / numbers / dicts
    rng/rank_00000.pt        Python, numpy and torch (CPU, CUDA) RNG states of each rank
    meta.json                step, world size, time, file list (for people and tools)
    <extra files>            e.g. a diffusers-format LoRA written by a callable of the trainer
    COMPLETE                 written last: a directory without it is not a checkpoint

Everything is written to ``ckpt_root/.tmp-step_00000100`` and published with one ``os.replace``,
so a killed job leaves either a complete checkpoint or a temp directory that
:func:`latest_checkpoint` ignores (and the next save removes). Every ``.pt`` file loads with
``torch.load(weights_only=True)``: RNG states are stored as tensors and numbers.

Several ranks: every rank calls :func:`save_checkpoint` with the same ``step`` (the directory must
be on a filesystem all ranks see); rank 0 writes the shared files, each rank its RNG file, and
``barrier`` (a callable, e.g. ``engine.barrier``) orders the phases.

Two layers: :func:`save_checkpoint` / :func:`load_checkpoint` know nothing of engines (tensors, dicts,
a rank and a world size); :func:`save_training_checkpoint` and :func:`psr.resume.load_initial_weights` are what
trainers call, with the policy and the engine; :mod:`psr.resume` decides what a restarted run resumes::

    resumed = load_resume(cfg.resume, ckpt_root, "psr-sft", rank)   # auto | None | a path
    ...
    due = step % every == 0 or step == total_steps
    if checkpoint_or_stop("psr-sft", step, due, preemption, save):
        return                     # at a step boundary, on every rank: saved, then stop

A file that cannot be read raises :class:`CorruptCheckpointError` naming it. A checkpoint is named by
its :func:`checkpoint_fingerprint` (path, step, hash of its ``meta.json``, which holds the save time),
so a run that recorded one can tell when the directory now holds another checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "recover_interrupted_saves",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "resolve_resume",
    "find_checkpoint",
    "save_training_checkpoint",
    "load_training_checkpoint",
    "checkpoint_fingerprint",
    "check_fingerprint",
    "set_aside",
    "CorruptCheckpointError",
    "checkpoint_or_stop",
    "rng_state",
    "restore_rng",
]

COMPLETE = "COMPLETE"
WEIGHTS = "trainable.safetensors"
STATE = "state.pt"
META = "meta.json"
RNG_DIR = "rng"
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_RESERVED = {COMPLETE, WEIGHTS, STATE, META, RNG_DIR}
ABANDONED = "abandoned"  # ckpt_root/abandoned/<time>-step_N: newer checkpoints of a branch a resume left


class CorruptCheckpointError(RuntimeError):
    """A file of a complete checkpoint cannot be read (truncated, overwritten, bad disk)."""


def read_checkpoint_file(path: Path, reader: Callable[[Path], Any]) -> Any:
    """``reader(path)``, with any failure to read reported as the file that failed."""
    try:
        return reader(path)
    except Exception as err:  # torch / safetensors / json each raise their own types for a torn file
        raise CorruptCheckpointError(
            f"{path}: cannot be read ({type(err).__name__}: {err}); the checkpoint {path.parent} is "
            "truncated or corrupt"
        ) from err


def load_torch_file(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def _rng_file(rank: int) -> str:
    return f"{RNG_DIR}/rank_{rank:05d}.pt"


# ---------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """This process's Python, numpy and torch RNG states, as tensors and numbers."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    state: dict[str, Any] = {
        "python_version": int(version),
        "python_state": torch.tensor(internal, dtype=torch.int64),  # 625 words < 2**32
        "python_gauss": gauss,  # float or None
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss),
        "numpy_cached_gaussian": float(cached),
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set this process's RNGs from :func:`rng_state`'s output."""
    random.setstate(
        (
            state["python_version"],
            tuple(int(v) for v in state["python_state"].tolist()),
            state["python_gauss"],
        )
    )
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch_cpu"])
    cuda = state["torch_cuda"]
    if cuda:
        if not torch.cuda.is_available() or torch.cuda.device_count() != len(cuda):
            raise RuntimeError(
                f"checkpoint has CUDA RNG states of {len(cuda)} devices; this process sees "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}"
            )
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------------- save


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _check_extra_name(name: str) -> None:
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or not parts or parts[0] in _RESERVED:
        raise ValueError(
            f"extra_files key {name!r} must be a relative path inside the checkpoint, not {sorted(_RESERVED)}"
        )


def save_checkpoint(
    ckpt_root: str | Path,
    step: int,
    *,
    trainable: dict[str, Tensor],
    training_state: dict[str, Any],
    data_state: dict[str, Any] | None = None,
    rng: bool = True,
    extra_files: dict[str, Callable[[Path], Any]] | None = None,
    keep_last: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
) -> Path:
    """Write ``ckpt_root/step_{step:08d}/`` atomically; call on every rank (see the module docstring).

    Args:
        ckpt_root: directory holding the checkpoints of one run (created if missing).
        step: number of optimizer steps done; names the directory.
        trainable: trainable weights by name (any rank's copy: rank 0 writes them).
        training_state: optimizer / schedule / EMA state and trainer counters; plain tensors,
            numbers, strings, lists and dicts only (it must load with ``weights_only=True``).
        data_state: the data position (sampler state) to resume from.
        rng: save every rank's RNG states.
        extra_files: ``{relative path: writer}``; rank 0 calls ``writer(path)`` with the path
            inside the temp directory (a file or a directory the writer creates).
        keep_last: keep the newest N complete checkpoints, delete older ones (``None``: keep all).
        rank: this process's rank; world_size: number of processes.
        barrier: waits for all ranks; required when ``world_size > 1``.

    Returns:
        The published checkpoint directory.
    """
    from safetensors.torch import save_file

    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last={keep_last} must be >= 1 (or null to keep every checkpoint)")
    if world_size > 1 and barrier is None:
        raise ValueError("save_checkpoint: world_size > 1 needs a barrier callable (e.g. engine.barrier)")
    sync = barrier or (lambda: None)
    root = Path(ckpt_root)
    final, tmp = root / step_dirname(step), root / f".tmp-{step_dirname(step)}"
    for name in extra_files or {}:
        _check_extra_name(name)

    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt at this step
        (tmp / RNG_DIR).mkdir(parents=True)
    sync()
    if rng:
        torch.save(rng_state(), tmp / _rng_file(rank))
    if rank == 0:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / WEIGHTS))
        torch.save(
            {"step": int(step), "training_state": training_state, "data_state": data_state}, tmp / STATE
        )
        for name, write in (extra_files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            write(tmp / name)
    sync()
    if rank == 0:
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        meta = {
            "step": int(step),
            "world_size": int(world_size),
            "rng": bool(rng),
            "time": time.time(),
            "files": files,
        }
        (tmp / META).write_text(json.dumps(meta, indent=2))
        _fsync_tree(tmp)
        (tmp / COMPLETE).write_text(f"{step}\n")
        if final.exists():  # the same step saved again (e.g. a preemption right after a resume)
            old = root / f".old-{step_dirname(step)}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _prune(root, keep_last)
    sync()
    return final


def _prune(root: Path, keep_last: int | None) -> None:
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last is None:
        return
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old)


def recover_interrupted_saves(ckpt_root: str | Path) -> list[str]:
    """Finish or undo what a save killed mid-way left under ``ckpt_root``; returns what was done.

    A re-save of an existing step moves the old directory to ``.old-step_N`` before publishing
    ``.tmp-step_N``: killed between the two renames, the step has no directory. The complete new
    one is published if it is there, else the old one is put back. Every ``.tmp-step_*`` left
    (an unfinished save) is then deleted. Call it on one rank, while holding the run's lock.
    """
    root = Path(ckpt_root)
    done: list[str] = []
    for old in sorted(root.glob(".old-step_*")):
        final = root / old.name[len(".old-") :]
        tmp = root / f".tmp-{final.name}"
        if not final.exists():
            source = tmp if (tmp / COMPLETE).is_file() else old
            os.replace(source, final)
            done.append(
                f"{final.name}: published {'the finished save' if source is tmp else 'the previous one'}"
            )
        shutil.rmtree(old, ignore_errors=True)
    for stale in sorted(root.glob(".tmp-step_*")):
        shutil.rmtree(stale, ignore_errors=True)
        done.append(f"removed the unfinished {stale.name}")
    return done


# ---------------------------------------------------------------------------------------------- find, load


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete checkpoints under ``ckpt_root``, oldest first (temp / unfinished ones left out)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_RE.match(path.name)
        if match and path.is_dir() and (path / COMPLETE).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``ckpt_root``, or ``None``."""
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def resolve_resume(resume: str | Path | None, ckpt_root: str | Path) -> Path | None:
    """What ``resume=...`` means: ``auto`` (newest complete under ``ckpt_root``, or none yet),
    ``None``/``"null"``/``""`` (start fresh), or a checkpoint directory (or a root holding them)."""
    if resume is None or str(resume).strip().lower() in ("", "null", "none"):
        return None
    if str(resume) == "auto":
        return latest_checkpoint(ckpt_root)
    path = Path(os.path.expanduser(str(resume)))
    if (path / COMPLETE).is_file():
        return path
    if path.is_dir() and (latest := latest_checkpoint(path)) is not None:
        return latest
    raise FileNotFoundError(
        f"resume={resume}: not a complete checkpoint directory (no {COMPLETE}) nor a directory holding one"
    )


def load_checkpoint(path: str | Path, *, rank: int = 0) -> dict[str, Any]:
    """Load a checkpoint on the CPU.

    Returns:
        ``{"path", "step", "meta", "trainable", "training_state", "data_state", "rng"}``; ``rng`` is
        this rank's RNG state, or ``None`` when the checkpoint has none for ``rank`` (written by fewer
        ranks: that rank keeps its seeded streams).
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    state = read_checkpoint_file(path / STATE, load_torch_file)
    rng_path = path / _rng_file(rank)
    return {
        "path": path,
        "step": int(state["step"]),
        "meta": read_checkpoint_file(path / META, lambda p: json.loads(p.read_text())),
        "trainable": read_checkpoint_file(path / WEIGHTS, lambda p: load_file(str(p))),
        "training_state": state["training_state"],
        "data_state": state["data_state"],
        "rng": read_checkpoint_file(rng_path, load_torch_file) if rng_path.is_file() else None,
    }


def checkpoint_fingerprint(path: str | Path) -> dict[str, Any]:
    """What names one checkpoint for good: ``{"path", "step", "sha256"}``, the hash of its ``meta.json``
    and ``COMPLETE`` (``meta.json`` holds the save time, so the same step saved again differs)."""
    path = Path(path).resolve()
    digest = hashlib.sha256()
    for name in (META, COMPLETE):
        digest.update(read_checkpoint_file(path / name, lambda p: p.read_bytes()))
    return {"path": str(path), "step": int(path.name.split("_")[-1]), "sha256": digest.hexdigest()}


def check_fingerprint(expected: dict[str, Any], what: str) -> Path:
    """The checkpoint ``expected`` (a :func:`checkpoint_fingerprint`) names, unchanged; else a
    FileNotFoundError / ValueError naming ``what`` recorded it, the checkpoint and what is there now."""
    path = Path(expected["path"])
    pinned = f"{path} (step {expected['step']}, sha256 {expected['sha256'][:12]})"
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{what} was made from {pinned}, which no longer exists")
    now = checkpoint_fingerprint(path)
    if now != {**expected, "path": str(path.resolve())}:
        raise ValueError(
            f"{what} was made from {pinned}, which has changed since (now step {now['step']}, sha256 "
            f"{now['sha256'][:12]}): it was saved again"
        )
    return path


def set_aside(ckpt_root: str | Path, resumed: str | Path | None, name: str) -> list[Path]:
    """Move the checkpoints of ``ckpt_root`` at or after ``resumed``'s step (other than ``resumed``;
    with ``resumed=None``, a fresh start: all of them) to ``ckpt_root/abandoned/<time>-step_N/``: a
    branch the run left, which ``keep_last`` must not keep in place of the new checkpoints and
    ``resume=auto`` / ``init_from`` / ``psr-eval checkpoint=`` must not pick.

    Returns:
        Where they went (newest first).
    """
    root = Path(ckpt_root)
    here = None if resumed is None else Path(resumed).resolve()
    step = 0 if here is None else int(here.name.split("_")[-1])
    stale = [p for p in list_checkpoints(root) if int(p.name[5:]) >= step and p.resolve() != here]
    why = "a fresh start" if here is None else f"resumed from {here}"
    moved = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for path in reversed(stale):
        dest = root / ABANDONED / f"{stamp}-{path.name}"
        dest.parent.mkdir(exist_ok=True)
        os.replace(path, dest)
        moved.append(dest)
        print(f"{name}: {why}: the checkpoint {path} of another branch is set aside as {dest}", flush=True)
    return moved


# ---------------------------------------------------------------------------------------------- training runs


def save_training_checkpoint(
    ckpt_root: Path,
    step: int,
    policy: Any,
    engine: Any,
    *,
    data_state: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
    keep_last: int | None = None,
    export_lora: bool = False,
) -> Path:
    """Full training state at ``step`` (collective): weights, optimizer, schedule, EMA, RNG, data position.

    ``training_state`` holds ``{"engine": engine.state_dict(), "trainer": extra, "model": {"mode",
    "init_from", "init_from_fingerprint", "lora"}}`` (what :func:`psr.resume.load_initial_weights` needs). With ``export_lora`` (LoRA runs
    only: full weights are in ``trainable.safetensors`` already) a diffusers-format
    ``lora/pytorch_lora_weights.safetensors`` is written next to it, from the EMA weights when the
    engine keeps an EMA (what inference should use), else from the live weights.
    """
    from psr.models.lora import export_diffusers_lora, lora_config

    trainable = engine.trainable_state_dict()
    lora = lora_config(policy.transformer)
    meta = {
        "mode": "full" if lora is None else "lora",
        "init_from": getattr(policy, "init_from", None),
        "init_from_fingerprint": getattr(policy, "init_from_fingerprint", None),  # pinned: psr.resume
    }
    if lora is not None:
        meta["lora"] = lora
    extra_files: dict[str, Callable[[Path], Any]] = {}
    if export_lora and lora is not None:
        ema = getattr(engine, "ema", None)
        weights = ema.shadow if ema is not None else trainable
        extra_files["lora"] = functools.partial(export_diffusers_lora, policy.transformer, weights)
    return save_checkpoint(
        ckpt_root,
        step,
        trainable=trainable,
        training_state={"engine": engine.state_dict(), "trainer": dict(extra or {}), "model": meta},
        data_state=data_state,
        extra_files=extra_files,
        keep_last=keep_last,
        rank=engine.rank,
        world_size=engine.world_size,
        barrier=engine.barrier,
    )


def load_training_checkpoint(checkpoint: Path | dict[str, Any], engine: Any) -> dict[str, Any]:
    """Restore what :func:`save_training_checkpoint` wrote into a set-up engine; restore RNG states.

    Args:
        checkpoint: a checkpoint directory, or what :func:`load_checkpoint` read from one.

    Returns:
        ``{"step", "data", **trainer extras}``.
    """
    state = load_checkpoint(checkpoint, rank=engine.rank) if isinstance(checkpoint, Path) else checkpoint
    path = state["path"]
    try:
        engine.load_trainable_state_dict(state["trainable"])
        engine.load_state_dict(state["training_state"]["engine"])
    except (KeyError, ValueError, RuntimeError) as err:
        raise type(err)(f"resuming from {path}: {err}") from err
    if state["rng"] is not None:
        restore_rng(state["rng"])
    return {"step": state["step"], "data": state["data_state"], **state["training_state"].get("trainer", {})}


def checkpoint_or_stop(name: str, step: int, due: bool, preemption: Any, save: Callable[[], Any]) -> bool:
    """At a step boundary (after ``preemption.poll()``): ``save()`` when ``due`` (the trainer's
    schedule) or on a preemption signal; True when the signal asks the run to stop (after reporting it)."""
    if due or preemption.triggered:
        save()
    if preemption.triggered:
        preemption.exit(f"{name}: {preemption.signal_name} at step {step}: checkpoint saved")
        return True
    return False


def find_checkpoint(path: str | os.PathLike, key: str = "init_from") -> Path:
    """A checkpoint directory from a checkpoint, a run directory or a ``checkpoints/`` directory
    (``key``: the setting that named it, for the message)."""
    p = Path(os.path.expanduser(str(path)))
    if (p / COMPLETE).is_file():
        return p
    for root in (p / "checkpoints", p):
        latest = latest_checkpoint(root)
        if latest is not None:
            return latest
    raise FileNotFoundError(f"{key}={path}: no complete checkpoint there, nor under {p / 'checkpoints'}")
