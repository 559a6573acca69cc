"""Process-group set-up and the few collectives the trainers use, with no DeepSpeed in sight.

Where ranks come from, in order:
  1. ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (``torchrun``, ``deepspeed``, or an sbatch script
     that exports them);
  2. ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID`` (``srun`` with one task per GPU); the
     sbatch script must then export ``MASTER_ADDR`` (the first host of the allocation) and
     ``MASTER_PORT``;
  3. otherwise one process (rank 0 of 1).

Every collective below is a no-op (or the identity) when no process group is initialized, so the
same code runs in a single process without ``torch.distributed``. All ranks must call a collective
the same number of times in the same order; the docstrings say which functions are collective.
"""

from __future__ import annotations

import importlib
import math
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DistInfo",
    "env_info",
    "init_distributed",
    "rank",
    "world_size",
    "is_main",
    "barrier",
    "all_gather_object",
    "all_gather_tensor",
    "all_reduce_mean",
    "all_reduce_max",
    "broadcast_object",
    "gather_scores",
    "destroy",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, number of processes, rank on this node."""

    rank: int
    world_size: int
    local_rank: int


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)  # type: ignore[arg-type]
            except ValueError as err:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from err
    return None


def env_info() -> DistInfo:
    """Rank, world size and local rank from the launcher's environment (see the module docstring)."""
    if os.environ.get("RANK") not in (None, ""):
        rank_, world = _env_int("RANK"), _env_int("WORLD_SIZE")
        local = _env_int("LOCAL_RANK")
    elif os.environ.get("SLURM_STEP_ID") not in (None, ""):
        # a task of an srun step; the batch shell (and salloc) also has SLURM_PROCID / SLURM_NTASKS
        # but is one process, so without a step id they are not ranks
        rank_, world = _env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS")
        local = _env_int("SLURM_LOCALID")
    else:
        rank_, world, local = None, None, None
    rank_ = 0 if rank_ is None else rank_
    world = 1 if world is None else world
    local = rank_ if local is None else local
    if not 0 <= rank_ < world:
        raise ValueError(
            f"rank {rank_} is outside world size {world} (check RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS)"
        )
    return DistInfo(rank=rank_, world_size=world, local_rank=local)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(
    backend: str | None = None, *, force: bool = False, timeout_s: float = 1800.0
) -> tuple[DistInfo, bool]:
    """Join the process group of this job (idempotent).

    Args:
        backend: ``"gloo"`` or ``"nccl"``; ``None`` picks nccl when CUDA is available, else gloo.
        force: initialize a group even for one process (DeepSpeed needs one).
        timeout_s: collective timeout; a rank that never arrives fails the job after this long
            instead of hanging it forever.

    Returns:
        ``(this process's DistInfo, whether this call created the group)``; whoever created the group
        ends it (:func:`destroy`).
    """
    info = env_info()
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), info.local_rank), False
    if info.world_size == 1 and not force:
        return info, False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"engine.backend={backend!r}; expected gloo, nccl or null")
    have_master = "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ
    if info.world_size > 1 and not have_master:
        raise RuntimeError(
            f"{info.world_size} processes but MASTER_ADDR or MASTER_PORT is not set: launch with torchrun, or export "
            "MASTER_ADDR (first host of the allocation) and MASTER_PORT in the sbatch script"
        )
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    init_method = None
    if info.world_size == 1 and not have_master:
        # A lone process picks a fresh local port each time, so parallel runs and re-initialization
        # after destroy() never collide on one.
        init_method = f"tcp://127.0.0.1:{free_port()}"
    # torch._dynamo keeps a reference to the process group that exists when it is first imported
    # (torch.optim imports it when the first optimizer is built), so destroy() would leave that group's
    # threads running into interpreter teardown. Imported first, it holds none.
    importlib.import_module("torch._dynamo")

    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=info.rank,
        world_size=info.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    return info, True


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else env_info().rank


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on global rank 0."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (collective)."""
    if _active():
        dist.barrier()


def _comm_device() -> torch.device:
    # nccl moves CUDA tensors only; gloo moves CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order (collective)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_tensor(tensor: Tensor) -> Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order (collective).

    Ranks may hold different sizes along dim 0 (e.g. uneven groups); the other dims and the dtype
    must agree. Returns a tensor on ``tensor``'s device.
    """
    if not _active():
        return tensor
    device = _comm_device()
    t = tensor.detach().to(device).contiguous()
    if t.dim() == 0:
        t = t.reshape(1)
    shapes = all_gather_object(tuple(t.shape))
    if any(s[1:] != tuple(t.shape[1:]) for s in shapes):
        raise ValueError(f"all_gather_tensor: shapes differ beyond dim 0 across ranks: {shapes}")
    sizes = [s[0] for s in shapes]
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]).to(tensor.device)


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """Mean of ``tensor`` over ranks (collective); a new tensor on ``tensor``'s device."""
    if not _active():
        return tensor.detach().clone()
    t = tensor.detach().to(
        _comm_device(), dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32
    )
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / dist.get_world_size()).to(device=tensor.device, dtype=tensor.dtype)


def all_reduce_max(value: float) -> float:
    """Maximum of a Python number over ranks (collective)."""
    if not _active():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (collective)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_scores(local: dict[str, Tensor], device: torch.device | str) -> dict[str, Tensor]:
    """Every rank's ``[n_r]`` scores concatenated in rank order (collective).

    A rank that scored nothing passes ``{}``; the keys come from the first rank that has some, and
    ``device`` is where such a rank's empty tensors (and so its result) live.
    """
    keys: list[str] = next((k for k in all_gather_object(sorted(local)) if k), [])
    empty = torch.empty(0, device=device)
    return {k: all_gather_tensor(local.get(k, empty)) for k in keys}


def split_evenly(n: int, rank: int, world_size: int) -> tuple[range, int]:
    """This rank's contiguous share of ``n`` items (rank 0 first, so concatenating the shares in rank
    order restores the items' order) and the largest share, which ranks that must run equally many
    forwards pad to. A share may be empty when ``n`` < ``world_size``."""
    size = math.ceil(n / world_size)
    return range(min(rank * size, n), min((rank + 1) * size, n)), size


def destroy() -> None:
    """Leave the process group if one is initialized, with every sub-group made from it.

    When a DeepSpeed engine ran in this process, DeepSpeed's own teardown is used: it also drops the
    sub-groups DeepSpeed caches (ZeRO's data-parallel groups), so a later engine builds fresh ones and
    no group's communication threads outlive this call.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    # imported here: psr.engine imports this module; psr.engine.deepspeed is the one place that
    # touches deepspeed (and it imports nothing when no engine loaded it)
    from psr.engine.deepspeed import destroy_process_group

    if not destroy_process_group():
        dist.destroy_process_group()
