"""The plain-PyTorch engine: one process, or data parallel over gloo (CPU) / nccl (GPU).

Gradients are averaged over ranks inside :meth:`TorchEngine.step` (bucketed all-reduce) rather than
by the DDP wrapper, so the forward may go through any object that holds the module (the policy,
peft) and is still synchronized. The contract is :mod:`psr.engine`'s.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from psr import distributed
from psr.engine.common import (
    ADAM_KEYS,
    EMA,
    OptimSettings,
    UpdateLedger,
    adamw,
    autocast,
    check_names,
    check_precision,
    check_shapes,
    named_trainable,
)

__all__ = ["TorchEngine"]


class TorchEngine:
    """Plain PyTorch: AdamW, LR schedule, clipping, EMA; data parallel over ranks when launched so.

    Args:
        precision: ``fp32``, or ``bf16``: trainable parameters are kept in fp32 (cast in ``setup``)
            and forwards run under :meth:`autocast`, the usual mixed-precision recipe.
        ema_decay: EMA decay of the trainable weights, or ``None`` for no EMA.
        backend: process-group backend when ``WORLD_SIZE`` > 1 (``None``: nccl on CUDA, else gloo).
        device: where the model lives; ``None``: ``cuda:LOCAL_RANK`` if CUDA is available, else CPU.
        bucket_numel: gradient elements per all-reduce message.
    """

    # the collectives are psr.distributed's (no-ops in one process)
    barrier = staticmethod(distributed.barrier)
    all_gather_object = staticmethod(distributed.all_gather_object)
    all_gather_tensor = staticmethod(distributed.all_gather_tensor)
    all_reduce_mean = staticmethod(distributed.all_reduce_mean)
    broadcast_object = staticmethod(distributed.broadcast_object)

    def __init__(
        self,
        precision: str = "fp32",
        ema_decay: float | None = None,
        backend: str | None = None,
        device: str | None = None,
        bucket_numel: int = 2**25,
    ) -> None:
        self.precision = check_precision(precision)
        self.ema_decay = ema_decay
        info, self._owns_group = distributed.init_distributed(backend, force=False)
        self.rank, self.world_size, self.local_rank = info.rank, info.world_size, info.local_rank
        if device is None:
            device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.bucket_numel = int(bucket_numel)
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.AdamW | None = None
        self._params: dict[str, nn.Parameter] = {}
        self._ledger: UpdateLedger | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_updates(self) -> int:
        """Updates applied so far (skipped ones do not count)."""
        return 0 if self._ledger is None else self._ledger.num_updates

    @property
    def ema(self) -> EMA | None:
        """The EMA of the trainable weights (``None`` without ``ema_decay`` or before ``setup``)."""
        return None if self._ledger is None else self._ledger.ema

    def setup(self, model: nn.Module, params: Sequence[nn.Parameter], *, lr: float, **optim: Any) -> None:
        """Move ``model`` to the device and build AdamW over ``params`` (trainable ones only).

        Keyword args: ``lr``, ``betas``, ``weight_decay``, ``eps``, ``schedule`` (constant | cosine),
        ``warmup_steps``, ``total_steps``, ``min_lr_ratio``, ``grad_clip`` (None/0: off),
        ``grad_accum``, ``micro_batch_size`` (see :class:`~psr.engine.common.OptimSettings`).
        Frozen modules (text encoders) never come here.
        """
        settings = OptimSettings(lr, **optim)
        self._params = named_trainable(model, params)
        self.model = model.to(self.device)
        with torch.no_grad():
            for p in self._params.values():
                if self.precision == "bf16" and p.dtype != torch.float32:
                    p.data = p.data.float()  # fp32 master weights; autocast computes in bf16
                if self.world_size > 1:  # every rank starts from rank 0's weights, as DDP does
                    torch.distributed.broadcast(p.data, src=0)
        self.optimizer = adamw(list(self._params.values()), settings)
        self._ledger = UpdateLedger(settings, self.ema_decay, lambda: dict(self._params))

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Context for forwards of the trained module: bf16 autocast when ``precision=bf16``."""
        return autocast(self.precision, self.device)

    def backward(self, loss: Tensor) -> None:
        """Accumulate ``d loss / d params`` (no rescaling; see :mod:`psr.engine`)."""
        loss.backward()

    def zero_grad(self) -> None:
        """Drop the gradients accumulated since the last ``step()``."""
        for p in self._params.values():
            p.grad = None

    @torch.no_grad()
    def _average_gradients(self, params: list[nn.Parameter]) -> None:
        grads = [p.grad for p in params if p.grad is not None]  # step() gave every one a gradient
        # buckets of consecutive gradients of one dtype, each one all-reduce
        i = 0
        while i < len(grads):
            bucket: list[Tensor] = []
            numel, dtype = 0, grads[i].dtype
            while i < len(grads) and grads[i].dtype == dtype and (not bucket or numel < self.bucket_numel):
                bucket.append(grads[i])
                numel += grads[i].numel()
                i += 1
            flat = torch.cat([g.reshape(-1) for g in bucket])
            torch.distributed.all_reduce(flat)
            flat /= self.world_size
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def step(self) -> dict[str, float]:
        """The accumulation boundary: average, clip, AdamW update at this update's LR, zero grads, EMA."""
        assert self.optimizer is not None and self._ledger is not None, "call setup() first"
        params = list(self._params.values())
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.world_size > 1:
            self._average_gradients(params)
        clip = self._ledger.optim.grad_clip
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm=clip if clip else float("inf")))
        lr = self._ledger.lr()
        skipped = not math.isfinite(grad_norm)
        if not skipped:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self._ledger.record_update(lambda: dict(self._params))
        self.zero_grad()
        return {"grad_norm": grad_norm, "lr": lr, "skipped": float(skipped)}

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """fp32 CPU copies of the trainable weights, by parameter name."""
        return {n: p.detach().float().cpu().contiguous().clone() for n, p in self._params.items()}

    @torch.no_grad()
    def load_trainable_state_dict(self, tensors: dict[str, Tensor]) -> None:
        """Set the trainable weights (every name must match); the EMA restarts from them."""
        check_names("trainable weights", list(self._params), list(tensors))
        check_shapes("trainable weights", self._params, tensors)
        for n, p in self._params.items():
            p.copy_(tensors[n])
        if self._ledger is not None:
            self._ledger.restart_ema(lambda: dict(self._params))

    def state_dict(self) -> dict[str, Any]:
        """Optimizer moments and steps by parameter name, update count, EMA (plain tensors)."""
        assert self.optimizer is not None and self._ledger is not None, "call setup() first"
        opt: dict[str, Any] = {"step": {}, "exp_avg": {}, "exp_avg_sq": {}}
        for n, p in self._params.items():
            st = self.optimizer.state.get(p)
            if st:
                opt["step"][n] = float(st["step"])
                for k in ADAM_KEYS:
                    opt[k][n] = st[k].detach().float().cpu().clone()
        return self._ledger.state_dict(opt)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (from either engine, any world size)."""
        assert self.optimizer is not None and self._ledger is not None, "call setup() first"
        self._ledger.check_state(state)
        opt = state["optimizer"]
        if opt["step"]:
            check_names("optimizer state", list(self._params), list(opt["step"]))
        self.optimizer.state.clear()
        for n in opt["step"]:
            p = self._params[n]
            self.optimizer.state[p] = {
                "step": torch.tensor(opt["step"][n], dtype=torch.float32),
                **{k: opt[k][n].to(device=p.device, dtype=p.dtype).clone() for k in ADAM_KEYS},
            }
        self._ledger.load_state_dict(state)

    @contextlib.contextmanager
    def gathered_parameters(self) -> Iterator[nn.Module]:
        """The full model for forwards outside the training path (a no-op here)."""
        yield self.unwrap()

    @contextlib.contextmanager
    def ema_swap(self) -> Iterator[None]:
        """Evaluate with the EMA weights inside the block (a no-op without EMA)."""
        ema = self.ema
        if ema is None:
            yield
            return
        with torch.no_grad():
            backup = {n: p.detach().clone() for n, p in self._params.items()}
            for n, p in self._params.items():
                p.copy_(ema.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self._params.items():
                    p.copy_(backup[n])

    def unwrap(self) -> nn.Module:
        assert self.model is not None, "call setup() first"
        return self.model

    def cleanup(self) -> None:
        """Leave the process group if this engine joined it."""
        if self._owns_group:
            distributed.destroy()
            self._owns_group = False
