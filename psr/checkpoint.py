"""Full-state checkpoints in a run directory, written atomically; resume resolution; preemption.

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
``barrier`` (a callable, e.g. ``engine.barrier``) orders the phases. This module knows nothing of
engines: the trainer passes tensors, dicts, its rank and world size.

Trainer flow::

    path = resolve_resume(cfg.resume, run_dir / "checkpoints")     # auto | None | a path
    if path is not None:
        ckpt = load_checkpoint(path, rank=engine.rank)
        engine.load_trainable_state_dict(ckpt["trainable"])
        engine.load_state_dict(ckpt["training_state"]["engine"])
        if ckpt["rng"] is not None:
            restore_rng(ckpt["rng"])
    ...
    if preemption.poll():          # at a step boundary, on every rank
        save_checkpoint(...); preemption.exit("saved"); return
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "resolve_resume",
    "rng_state",
    "restore_rng",
    "PreemptionHandler",
    "requeue_slurm_job",
]

COMPLETE = "COMPLETE"
WEIGHTS = "trainable.safetensors"
STATE = "state.pt"
META = "meta.json"
RNG_DIR = "rng"
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_RESERVED = {COMPLETE, WEIGHTS, STATE, META, RNG_DIR}


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
    extra_files: dict[str, Callable[[Path], None]] | None = None,
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
    state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    rng_path = path / _rng_file(rank)
    return {
        "path": path,
        "step": int(state["step"]),
        "meta": json.loads((path / META).read_text()),
        "trainable": load_file(str(path / WEIGHTS)),
        "training_state": state["training_state"],
        "data_state": state["data_state"],
        "rng": torch.load(rng_path, map_location="cpu", weights_only=True) if rng_path.is_file() else None,
    }


# ---------------------------------------------------------------------------------------------- preemption


def requeue_slurm_job(job_id: str | None = None) -> None:
    """``scontrol requeue <job>`` for this Slurm job (``SLURM_JOB_ID``); raises with scontrol's output."""
    job_id = job_id or os.environ.get("SLURM_JOB_ID")
    if not job_id:
        raise RuntimeError("requeue asked for, but SLURM_JOB_ID is not set (not running under Slurm)")
    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"scontrol requeue {job_id} failed ({done.returncode}): {done.stderr.strip()} "
            "(is the job submitted with --requeue?)"
        )


class PreemptionHandler:
    """Turns SIGTERM / SIGUSR1 (what Slurm sends before preemption or the time limit) into a flag.

    The handler only records the signal; the trainer checks at step boundaries, saves a checkpoint,
    calls :meth:`exit` and returns normally. Handlers are installed on construction (main thread
    only) and the previous ones restored by :meth:`uninstall` or on leaving a ``with`` block.

    Args:
        signals: signal names to catch.
        requeue: in :meth:`exit`, rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` when under Slurm.
        install: install the handlers now.
    """

    def __init__(
        self, signals: Iterable[str] = ("SIGTERM", "SIGUSR1"), requeue: bool = False, install: bool = True
    ) -> None:
        self.signals = [
            getattr(signal, name) if isinstance(name, str) else signal.Signals(name) for name in signals
        ]
        self.requeue = bool(requeue)
        self.signal_name: str | None = None
        self._agreed = False
        self._previous: dict[int, Any] = {}
        if install:
            self.install()

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name

    def install(self) -> PreemptionHandler:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    @property
    def triggered(self) -> bool:
        """This process received a signal (or :meth:`poll` agreed that some rank did)."""
        return self.signal_name is not None or self._agreed

    def poll(self, reduce_max: Callable[[float], float] | None = None) -> bool:
        """Whether any rank was signalled (collective when distributed): call once per step, at the
        same point on every rank, so all ranks save and stop at the same step. Ranks also agree on
        which signal: SIGUSR1 (asks for a requeue) wins over SIGTERM (asks to stop)."""
        from psr.distributed import all_reduce_max

        reduce = reduce_max or all_reduce_max
        code = {None: 0.0, "SIGTERM": 1.0, "SIGUSR1": 2.0}.get(self.signal_name, 1.0)
        agreed = reduce(code)
        self._agreed = agreed > 0
        if self._agreed and self.signal_name != "SIGUSR1":
            self.signal_name = "SIGUSR1" if agreed >= 2 else (self.signal_name or "SIGTERM")
        return self._agreed

    def exit(self, message: str, rank: int | None = None) -> None:
        """Report the stop and, with ``requeue`` under Slurm, requeue the job from rank 0. Returns,
        so the trainer can close its logger and process group and return normally."""
        if rank is None:
            from psr.distributed import rank as current_rank

            rank = current_rank()
        print(message, file=sys.stderr, flush=True)
        # only SIGUSR1 (what the sbatch templates ask for before the time limit) requeues: SIGTERM
        # comes from scancel (stop) or from Slurm's own preemption/requeue, which requeues by itself
        if self.requeue and self.signal_name == "SIGUSR1" and rank == 0 and os.environ.get("SLURM_JOB_ID"):
            requeue_slurm_job()
            print(f"requeued Slurm job {os.environ['SLURM_JOB_ID']}", file=sys.stderr, flush=True)
