"""Training engines: one interface (:class:`Engine`), two implementations.

* :class:`~psr.engine.torch.TorchEngine`: one process, or data parallel over gloo (CPU) / nccl (GPU)
  when launched by ``torchrun`` or ``srun`` (``WORLD_SIZE`` > 1).
* :class:`~psr.engine.deepspeed.DeepSpeedEngine`: ZeRO stage 2 or 3, its config rendered from the
  trainer's own keys (:func:`deepspeed_config`). :mod:`psr.engine.deepspeed` is the only module
  that touches deepspeed, and imports it lazily.

Both hold the same small pieces from :mod:`psr.engine.common` (settings, schedule, EMA, update
ledger, checks) and share no base class. Pick one with a Hydra ``_target_`` (``conf/engine/``).

How a trainer drives either one::

    engine = TorchEngine(precision="bf16", ema_decay=0.999)      # or DeepSpeedEngine(stage=3)
    engine.setup(model, trainable_params, lr=1e-4, schedule="cosine", warmup_steps=100,
                 total_steps=2000, grad_clip=1.0, grad_accum=2, micro_batch_size=4)
    for batches in loader:                       # one optimizer step = len(batches) micro-batches
        for batch in batches:
            with engine.autocast():
                loss = compute_loss(engine.unwrap(), batch)
            engine.backward(loss / len(batches))  # the caller scales: backward() only accumulates
        metrics = engine.step()                  # {"grad_norm", "lr", "skipped"}: always one update

Accumulation semantics: ``backward(loss)`` adds ``d loss / d params`` to the gradients and never
rescales; ``step()`` is the accumulation boundary: average over ranks, clip to ``grad_clip``
(global L2 norm), set this update's learning rate, AdamW update, zero the gradients, update the EMA.
``grad_accum`` and ``micro_batch_size`` only fill DeepSpeed's batch-size bookkeeping. A trainable
parameter without a gradient at ``step()`` counts as a zero gradient (as in DeepSpeed's flat
buffers), so every rank and both engines update the same set. An update whose gradient norm is
not finite is skipped (``"skipped": 1.0``; the schedule does not advance); a non-finite loss
should be caught before ``backward`` and dropped with ``zero_grad()``.

Learning rate: update ``u`` (0-based count of applied updates) uses ``lr_at(u, ...)``: linear warmup
``lr * (u + 1) / warmup_steps`` for ``u < warmup_steps``, then ``constant`` or a half cosine from
``lr`` to ``min_lr_ratio * lr`` reached at ``u = total_steps``.

State: ``trainable_state_dict()`` holds fp32 copies of the trainable weights (safetensors-ready);
``state_dict()`` the rest (AdamW moments and step per parameter name, update count, EMA), in one
format shared by both engines and independent of the world size, so a checkpoint written by
two ZeRO-2 processes resumes on one TorchEngine. Resume: ``load_trainable_state_dict`` first,
then ``load_state_dict``. Calls marked *collective* must be made by every rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

# torch's names are imported one by one: in this package ``torch`` names the submodule
# psr.engine.torch (set when it is imported below), not the library.
from torch import Tensor, nn
from torch import device as Device

from psr.engine.common import EMA, STATE_FORMAT, lr_at
from psr.engine.deepspeed import DeepSpeedEngine, deepspeed_config
from psr.engine.torch import TorchEngine

__all__ = [
    "Engine",
    "TorchEngine",
    "DeepSpeedEngine",
    "EMA",
    "build_engine",
    "deepspeed_config",
    "lr_at",
    "STATE_FORMAT",
]


@runtime_checkable
class Engine(Protocol):
    """What trainers and objectives call on an engine; the module docstring gives the call order.

    Attributes:
        rank: global rank of this process (0 without a process group).
        world_size: number of processes.
        local_rank: rank on this node (the CUDA device index).
        device: where the trained module and its inputs live.
        precision: ``fp32`` or ``bf16`` (forwards under :meth:`autocast`).
    """

    rank: int
    world_size: int
    local_rank: int
    device: Device
    precision: str

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the rank that logs and writes files)."""
        ...

    def setup(self, model: nn.Module, params: Sequence[nn.Parameter], *, lr: float, **optim: Any) -> None:
        """Build the optimizer over ``params`` (trainable parameters of ``model``, in order).

        ``optim``: ``betas``, ``weight_decay``, ``eps``, ``schedule`` (constant | cosine),
        ``warmup_steps``, ``total_steps``, ``min_lr_ratio``, ``grad_clip`` (None/0: off),
        ``grad_accum``, ``micro_batch_size``; checked by :class:`~psr.engine.common.OptimSettings`.
        """
        ...

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Context for forwards of the trained module (bf16 autocast under ``precision=bf16``)."""
        ...

    def backward(self, loss: Tensor) -> None:
        """Add ``d loss / d params`` to the gradients; never rescales (the caller divides)."""
        ...

    def zero_grad(self) -> None:
        """Drop the gradients accumulated since the last :meth:`step` (e.g. after a non-finite loss)."""
        ...

    def step(self) -> dict[str, float]:
        """The accumulation boundary (collective): one update; ``{"grad_norm", "lr", "skipped"}``."""
        ...

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """fp32 CPU copies of the full trainable weights by parameter name (collective)."""
        ...

    def load_trainable_state_dict(self, tensors: dict[str, Tensor]) -> None:
        """Set the trainable weights (names and shapes must match); the EMA restarts (collective)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """AdamW moments and steps by name, update count, EMA; world-size independent (collective)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` from either engine, any world size (after the weights)."""
        ...

    def gathered_parameters(self) -> contextlib.AbstractContextManager[nn.Module]:
        """The full module for no-grad forwards outside training, e.g. rollouts (collective)."""
        ...

    def ema_swap(self) -> contextlib.AbstractContextManager[None]:
        """The EMA weights in the module inside the block (a no-op without EMA; collective)."""
        ...

    def unwrap(self) -> nn.Module:
        """The trained module itself (forwards go through it or the policy holding it)."""
        ...

    def barrier(self) -> None:
        """Wait for every rank (collective)."""
        ...

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order (collective)."""
        ...

    def all_gather_tensor(self, tensor: Tensor) -> Tensor:
        """Every rank's ``tensor`` concatenated along dim 0 in rank order; sizes may differ (collective)."""
        ...

    def all_reduce_mean(self, tensor: Tensor) -> Tensor:
        """Mean of ``tensor`` over ranks, a new tensor on its device (collective)."""
        ...

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (collective)."""
        ...

    def cleanup(self) -> None:
        """Leave the process group if this engine joined it."""
        ...


def build_engine(name: str, **kwargs: Any) -> Engine:
    """``torch`` | ``ds_zero2`` | ``ds_zero3`` with constructor ``kwargs`` (the ``conf/engine`` keys)."""
    if name == "torch":
        return TorchEngine(**kwargs)
    if name in ("ds_zero2", "ds_zero3"):
        return DeepSpeedEngine(stage=int(name[-1]), **kwargs)
    raise ValueError(f"engine={name!r}; expected torch, ds_zero2 or ds_zero3")
