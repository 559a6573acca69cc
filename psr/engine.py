"""Training engines: one interface (:class:`Engine`), two implementations.

* :class:`TorchEngine`: one process, or data parallel over gloo (CPU) / nccl (GPU) when launched
  by ``torchrun`` or ``srun`` (``WORLD_SIZE`` > 1). Gradients are averaged over ranks inside
  :meth:`~TorchEngine.step` (bucketed all-reduce) rather than by the DDP wrapper, so the forward
  may go through any object that holds the module (the policy, peft) and is still synchronized.
* :class:`DeepSpeedEngine`: ZeRO stage 2 or 3. Its DeepSpeed config is rendered from the
  trainer's own keys (:func:`deepspeed_config`; no ``"auto"`` values) and it is given a torch
  ``AdamW`` object, so no CPU-Adam extension is compiled. This is the only place that imports
  deepspeed, lazily.

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
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from psr import distributed

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

STATE_FORMAT = "psr.engine/1"
PRECISIONS = ("fp32", "bf16")
SCHEDULES = ("constant", "cosine")
_ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def lr_at(
    update: int,
    *,
    lr: float,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    min_lr_ratio: float = 0.0,
) -> float:
    """Learning rate of update number ``update`` (0-based); see the module docstring."""
    if update < warmup_steps:
        return lr * (update + 1) / warmup_steps
    if schedule == "constant":
        return lr
    assert total_steps is not None  # checked in _check_optim
    progress = min(1.0, (update - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _check_optim(o: dict[str, Any]) -> None:
    """Cross-field checks of the optimizer keys; errors name the config key to change."""
    if not o["lr"] > 0:
        raise ValueError(f"optim.lr={o['lr']} must be > 0")
    if len(o["betas"]) != 2 or not all(0 <= b < 1 for b in o["betas"]):
        raise ValueError(f"optim.betas={list(o['betas'])} must be two numbers in [0, 1)")
    if o["schedule"] not in SCHEDULES:
        raise ValueError(f"optim.schedule={o['schedule']!r}; expected one of {SCHEDULES}")
    if o["warmup_steps"] < 0:
        raise ValueError(f"optim.warmup_steps={o['warmup_steps']} must be >= 0")
    if o["schedule"] == "cosine" and (o["total_steps"] is None or o["total_steps"] <= o["warmup_steps"]):
        raise ValueError(
            f"optim.schedule=cosine needs total_steps ({o['total_steps']}, the trainer's train.steps) "
            f"> optim.warmup_steps ({o['warmup_steps']})"
        )
    if not 0.0 <= o["min_lr_ratio"] <= 1.0:
        raise ValueError(f"optim.min_lr_ratio={o['min_lr_ratio']} must be in [0, 1]")
    if o["grad_clip"] is not None and o["grad_clip"] < 0:
        raise ValueError(f"optim.grad_clip={o['grad_clip']} must be >= 0 (0 or null: no clipping)")
    if o["grad_accum"] < 1 or o["micro_batch_size"] < 1:
        raise ValueError(
            f"grad_accum={o['grad_accum']} and micro_batch_size={o['micro_batch_size']} must be >= 1"
        )


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"engine.precision={precision!r}; expected one of {PRECISIONS}")
    return precision


def _named(model: nn.Module, params: Sequence[nn.Parameter]) -> dict[str, nn.Parameter]:
    """Names of ``params`` inside ``model``, in the given order."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, nn.Parameter] = {}
    for i, p in enumerate(params):
        if id(p) not in names:
            raise ValueError(
                f"setup(params): parameter #{i} {tuple(p.shape)} is not a parameter of the model"
            )
        if not p.requires_grad:
            raise ValueError(
                f"setup(params): {names[id(p)]} has requires_grad=False; pass trainable parameters only"
            )
        if names[id(p)] in out:
            raise ValueError(f"setup(params): {names[id(p)]} is given twice")
        out[names[id(p)]] = p
    if not out:
        raise ValueError("setup(params): no trainable parameters")
    return out


def _check_names(kind: str, expected: Sequence[str], got: Sequence[str]) -> None:
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or unexpected:
        raise KeyError(
            f"{kind}: missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})"
        )


def _check_shapes(kind: str, params: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Every tensor has its parameter's full shape (ZeRO-3 parameters report it as ``ds_shape``)."""
    bad = [
        f"{n}: checkpoint {tuple(tensors[n].shape)} vs model {tuple(getattr(p, 'ds_shape', p.shape))}"
        for n, p in params.items()
        if tuple(tensors[n].shape) != tuple(getattr(p, "ds_shape", p.shape))
    ]
    if bad:
        raise ValueError(
            f"{kind}: {len(bad)} shape(s) differ, e.g. {bad[0]}; check train.lora.rank / train.lora.targets "
            "/ train.mode against the run being resumed"
        )


class EMA:
    """Exponential moving average of the trainable weights, in fp32.

    After each applied update: ``shadow <- decay * shadow + (1 - decay) * param``; the shadow starts
    as a copy of the weights at ``setup`` (or at ``load_trainable_state_dict``).
    """

    def __init__(self, decay: float, weights: dict[str, Tensor]) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"engine.ema_decay={decay} must be in (0, 1) (or null for no EMA)")
        self.decay = float(decay)
        self.shadow = {n: w.detach().float().clone() for n, w in weights.items()}

    @torch.no_grad()
    def update(self, weights: dict[str, Tensor]) -> None:
        for n, w in weights.items():
            self.shadow[n].lerp_(w.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": {n: t.cpu().clone() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_names("EMA state", list(self.shadow), list(state["shadow"]))
        for n, t in state["shadow"].items():
            self.shadow[n].copy_(t)


@runtime_checkable
class Engine(Protocol):
    """What the trainers use; see the module docstring for the call order and semantics."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    precision: str

    @property
    def is_main(self) -> bool: ...
    def setup(self, model: nn.Module, params: Sequence[nn.Parameter], *, lr: float, **optim: Any) -> None: ...
    def autocast(self) -> contextlib.AbstractContextManager[None]: ...
    def backward(self, loss: Tensor) -> None: ...
    def zero_grad(self) -> None: ...
    def step(self) -> dict[str, float]: ...
    def trainable_state_dict(self) -> dict[str, Tensor]: ...
    def load_trainable_state_dict(self, tensors: dict[str, Tensor]) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def gathered_parameters(self) -> contextlib.AbstractContextManager[nn.Module]: ...
    def ema_swap(self) -> contextlib.AbstractContextManager[None]: ...
    def unwrap(self) -> nn.Module: ...
    def barrier(self) -> None: ...
    def all_gather_object(self, obj: Any) -> list[Any]: ...
    def all_gather_tensor(self, tensor: Tensor) -> Tensor: ...
    def all_reduce_mean(self, tensor: Tensor) -> Tensor: ...
    def broadcast_object(self, obj: Any, src: int = 0) -> Any: ...
    def cleanup(self) -> None: ...


class _Shared:
    """Plumbing both engines share word for word: rank facts, collectives, the schedule, autocast.

    Holds no numerics of the update; those live in each engine's ``step`` so each reads on its own.
    """

    precision: str
    device: torch.device

    def _init_common(
        self, precision: str, ema_decay: float | None, backend: str | None, force_group: bool
    ) -> None:
        self.precision = _check_precision(precision)
        self.ema_decay = ema_decay
        info, self._owns_group = distributed.init_distributed(backend, force=force_group)
        self.rank, self.world_size, self.local_rank = info.rank, info.world_size, info.local_rank
        self.num_updates = 0
        self.ema: EMA | None = None
        self._params: dict[str, nn.Parameter] = {}
        self._optim: dict[str, Any] = {}

    @staticmethod
    def _optim_kwargs(
        lr: float,
        betas: Sequence[float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        schedule: str = "constant",
        warmup_steps: int = 0,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        grad_clip: float | None = None,
        grad_accum: int = 1,
        micro_batch_size: int = 1,
    ) -> dict[str, Any]:
        o = dict(locals())
        o["betas"] = tuple(float(b) for b in betas)
        o["grad_clip"] = float(grad_clip) if grad_clip else None
        _check_optim(o)
        return o

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def current_lr(self) -> float:
        o = self._optim
        return lr_at(
            self.num_updates,
            lr=o["lr"],
            schedule=o["schedule"],
            warmup_steps=o["warmup_steps"],
            total_steps=o["total_steps"],
            min_lr_ratio=o["min_lr_ratio"],
        )

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Context for forwards of the trained module: bf16 autocast when ``precision=bf16``."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _engine_state(self, optimizer: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "num_updates": self.num_updates,
            "optimizer": optimizer,
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def _check_state(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"engine state has format {state.get('format')!r}; expected {STATE_FORMAT!r}")
        if (state["ema"] is None) != (self.ema is None):
            raise ValueError(
                f"checkpoint {'has' if state['ema'] is not None else 'has no'} EMA but engine.ema_decay="
                f"{self.ema_decay}; set engine.ema_decay to match the run being resumed"
            )

    def barrier(self) -> None:
        distributed.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        return distributed.all_gather_object(obj)

    def all_gather_tensor(self, tensor: Tensor) -> Tensor:
        return distributed.all_gather_tensor(tensor)

    def all_reduce_mean(self, tensor: Tensor) -> Tensor:
        return distributed.all_reduce_mean(tensor)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return distributed.broadcast_object(obj, src)

    def cleanup(self) -> None:
        """Leave the process group if this engine joined it."""
        if self._owns_group:
            distributed.destroy()
            self._owns_group = False


class TorchEngine(_Shared):
    """Plain PyTorch: AdamW, LR schedule, clipping, EMA; data parallel over ranks when launched so.

    Args:
        precision: ``fp32``, or ``bf16``: trainable parameters are kept in fp32 (cast in ``setup``)
            and forwards run under :meth:`autocast`, the usual mixed-precision recipe.
        ema_decay: EMA decay of the trainable weights, or ``None`` for no EMA.
        backend: process-group backend when ``WORLD_SIZE`` > 1 (``None``: nccl on CUDA, else gloo).
        device: where the model lives; ``None``: ``cuda:LOCAL_RANK`` if CUDA is available, else CPU.
        bucket_numel: gradient elements per all-reduce message.
    """

    def __init__(
        self,
        precision: str = "fp32",
        ema_decay: float | None = None,
        backend: str | None = None,
        device: str | None = None,
        bucket_numel: int = 2**25,
    ) -> None:
        self._init_common(precision, ema_decay, backend, force_group=False)
        if device is None:
            device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.bucket_numel = int(bucket_numel)
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.AdamW | None = None

    def setup(self, model: nn.Module, params: Sequence[nn.Parameter], *, lr: float, **optim: Any) -> None:
        """Move ``model`` to the device and build AdamW over ``params`` (trainable ones only).

        Keyword args: ``lr``, ``betas``, ``weight_decay``, ``eps``, ``schedule`` (constant | cosine),
        ``warmup_steps``, ``total_steps``, ``min_lr_ratio``, ``grad_clip`` (None/0: off),
        ``grad_accum``, ``micro_batch_size``. Frozen modules (text encoders) never come here.
        """
        self._optim = self._optim_kwargs(lr, **optim)
        self._params = _named(model, params)
        self.model = model.to(self.device)
        with torch.no_grad():
            for p in self._params.values():
                if self.precision == "bf16" and p.dtype != torch.float32:
                    p.data = p.data.float()  # fp32 master weights; autocast computes in bf16
                if self.world_size > 1:  # every rank starts from rank 0's weights, as DDP does
                    torch.distributed.broadcast(p.data, src=0)
        o = self._optim
        self.optimizer = torch.optim.AdamW(
            list(self._params.values()),
            lr=o["lr"],
            betas=o["betas"],
            eps=o["eps"],
            weight_decay=o["weight_decay"],
        )
        if self.ema_decay is not None:
            self.ema = EMA(self.ema_decay, dict(self._params))

    def backward(self, loss: Tensor) -> None:
        """Accumulate ``d loss / d params`` (no rescaling; see the module docstring)."""
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
        assert self.optimizer is not None, "call setup() first"
        params = list(self._params.values())
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.world_size > 1:
            self._average_gradients(params)
        clip = self._optim["grad_clip"]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm=clip if clip else float("inf")))
        lr = self.current_lr()
        skipped = not math.isfinite(grad_norm)
        if not skipped:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.num_updates += 1
            if self.ema is not None:
                self.ema.update(dict(self._params))
        self.zero_grad()
        return {"grad_norm": grad_norm, "lr": lr, "skipped": float(skipped)}

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """fp32 CPU copies of the trainable weights, by parameter name."""
        return {n: p.detach().float().cpu().contiguous().clone() for n, p in self._params.items()}

    @torch.no_grad()
    def load_trainable_state_dict(self, tensors: dict[str, Tensor]) -> None:
        """Set the trainable weights (every name must match); the EMA restarts from them."""
        _check_names("trainable weights", list(self._params), list(tensors))
        _check_shapes("trainable weights", self._params, tensors)
        for n, p in self._params.items():
            p.copy_(tensors[n])
        if self.ema is not None:
            self.ema = EMA(self.ema.decay, dict(self._params))

    def state_dict(self) -> dict[str, Any]:
        """Optimizer moments and steps by parameter name, update count, EMA (plain tensors)."""
        assert self.optimizer is not None, "call setup() first"
        opt: dict[str, Any] = {"step": {}, "exp_avg": {}, "exp_avg_sq": {}}
        for n, p in self._params.items():
            st = self.optimizer.state.get(p)
            if st:
                opt["step"][n] = float(st["step"])
                for k in _ADAM_KEYS:
                    opt[k][n] = st[k].detach().float().cpu().clone()
        return self._engine_state(opt)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (from either engine, any world size)."""
        assert self.optimizer is not None, "call setup() first"
        self._check_state(state)
        opt = state["optimizer"]
        if opt["step"]:
            _check_names("optimizer state", list(self._params), list(opt["step"]))
        self.optimizer.state.clear()
        for n in opt["step"]:
            p = self._params[n]
            self.optimizer.state[p] = {
                "step": torch.tensor(opt["step"][n], dtype=torch.float32),
                **{k: opt[k][n].to(device=p.device, dtype=p.dtype).clone() for k in _ADAM_KEYS},
            }
        self.num_updates = int(state["num_updates"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    @contextlib.contextmanager
    def gathered_parameters(self) -> Iterator[nn.Module]:
        """The full model for forwards outside the training path (a no-op here)."""
        yield self.unwrap()

    @contextlib.contextmanager
    def ema_swap(self) -> Iterator[None]:
        """Evaluate with the EMA weights inside the block (a no-op without EMA)."""
        if self.ema is None:
            yield
            return
        with torch.no_grad():
            backup = {n: p.detach().clone() for n, p in self._params.items()}
            for n, p in self._params.items():
                p.copy_(self.ema.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self._params.items():
                    p.copy_(backup[n])

    def unwrap(self) -> nn.Module:
        assert self.model is not None, "call setup() first"
        return self.model


def deepspeed_config(
    *,
    stage: int,
    precision: str,
    grad_clip: float | None,
    grad_accum: int,
    micro_batch_size: int,
    world_size: int,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    zero3_persistence_threshold: int | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config, rendered from the trainer's keys: every value explicit, no ``"auto"``.

    ``managed_gradient_accumulation: false`` makes every ``step()`` the accumulation boundary, the
    same contract as :class:`TorchEngine` (DeepSpeed's own counter would otherwise decide).
    """
    if stage not in (2, 3):
        raise ValueError(f"engine.stage={stage}; expected 2 or 3")
    if offload_params and stage != 3:
        raise ValueError("engine.offload_params needs engine.stage=3")
    zero: dict[str, Any] = {"stage": stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if stage == 3 and zero3_persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = int(zero3_persistence_threshold)
    return {
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "gradient_accumulation_steps": int(grad_accum),
        "train_batch_size": int(micro_batch_size) * int(grad_accum) * int(world_size),
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(grad_clip or 0.0),
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        # a torch AdamW object is passed in: no DeepSpeed optimizer, no CPU-Adam compilation
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine(_Shared):
    """DeepSpeed ZeRO-2/3 behind the :class:`Engine` interface.

    Args:
        stage: ZeRO stage, 2 (optimizer state and gradients partitioned) or 3 (also parameters).
        precision: ``bf16`` (module weights in bf16, fp32 master weights in the optimizer) or ``fp32``.
        ema_decay: EMA decay of the trainable weights, or ``None``. The EMA is a full fp32 copy on
            every rank, gathered after each update (cheap for LoRA, costly for full ZeRO-3 runs).
        offload_optimizer: keep optimizer state and master weights on the CPU.
        offload_params: ZeRO-3 only: keep partitioned parameters on the CPU.
        zero3_persistence_threshold: ZeRO-3 leaves parameters with at most this many elements
            unpartitioned (DeepSpeed's default when ``None``).
        backend: process-group backend (``None``: nccl on CUDA, else gloo). The group is created
            here, also for one process, so ``deepspeed.init_distributed`` (which compiles a
            shared-memory op on CPUs) never runs.

    Forwards call the module itself (``unwrap()``, or the policy holding it), never DeepSpeed's
    wrapper; hooks on the root module run DeepSpeed's per-forward bookkeeping. Under ZeRO-3 every
    forward outside :meth:`gathered_parameters` gathers weights layer by layer, a collective: all
    ranks must run the same such forwards.
    """

    def __init__(
        self,
        stage: int = 2,
        precision: str = "bf16",
        ema_decay: float | None = None,
        offload_optimizer: bool = False,
        offload_params: bool = False,
        zero3_persistence_threshold: int | None = None,
        backend: str | None = None,
    ) -> None:
        if int(stage) not in (2, 3):
            raise ValueError(f"engine.stage={stage}; expected 2 or 3")
        self._init_common(precision, ema_decay, backend, force_group=True)
        # DeepSpeed reads these even when the group exists (srun sets only SLURM_* names)
        for key, value in (
            ("RANK", self.rank),
            ("WORLD_SIZE", self.world_size),
            ("LOCAL_RANK", self.local_rank),
        ):
            os.environ.setdefault(key, str(value))
        self.stage = int(stage)
        self.offload = {"offload_optimizer": bool(offload_optimizer), "offload_params": bool(offload_params)}
        self.zero3_persistence_threshold = zero3_persistence_threshold
        self.device = torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")
        self.ds: Any = None
        self.ds_config: dict[str, Any] = {}

    def setup(self, model: nn.Module, params: Sequence[nn.Parameter], *, lr: float, **optim: Any) -> None:
        """Wrap ``model`` with ``deepspeed.initialize``; same keyword args as :meth:`TorchEngine.setup`."""
        import deepspeed
        import deepspeed.ops

        self._optim = o = self._optim_kwargs(lr, **optim)
        self._params = _named(model, params)
        self.ds_config = deepspeed_config(
            stage=self.stage,
            precision=self.precision,
            grad_clip=o["grad_clip"],
            grad_accum=o["grad_accum"],
            micro_batch_size=o["micro_batch_size"],
            world_size=self.world_size,
            zero3_persistence_threshold=self.zero3_persistence_threshold,
            **self.offload,
        )
        if self.device.type == "cpu":
            # The CPU accelerator would JIT-compile a shared-memory all-reduce op (~45 s) that only
            # inference uses; DeepSpeed reads this table before building it.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        optimizer = torch.optim.AdamW(
            list(self._params.values()),
            lr=o["lr"],
            betas=o["betas"],
            eps=o["eps"],
            weight_decay=o["weight_decay"],
        )
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        self._forward_hooks = self._route_forwards(model)
        if self.ema_decay is not None:
            self.ema = EMA(self.ema_decay, self._full_fp32())

    def _route_forwards(self, model: nn.Module) -> list[Any]:
        """Give direct calls of ``model`` what ``DeepSpeedEngine.forward`` adds around them.

        Trainers call the module itself (through the policy), not DeepSpeed's wrapper. DeepSpeed's
        forward first resets ZeRO's per-backward bookkeeping (without it ZeRO-3 overwrites instead
        of accumulating the gradients of a second micro-batch) and hooks the outputs so that the
        backward prologue runs; these two hooks on the root module do the same.
        """
        from deepspeed.runtime.utils import register_output_backward_hooks

        ds = self.ds

        def before(module: nn.Module, args: Any) -> None:
            if torch.is_grad_enabled():
                ds.optimizer.clear_backward_seen_flag()

        def after(module: nn.Module, args: Any, output: Any) -> None:
            if torch.is_grad_enabled():
                register_output_backward_hooks(
                    output,
                    preprocess_once_fn=ds._backward_prologue,
                    preprocess_per_tensor_fn=ds._backward_prologue_per_tensor,
                )

        return [model.register_forward_pre_hook(before), model.register_forward_hook(after)]

    # ------------------------------------------------------------------ the update
    def backward(self, loss: Tensor) -> None:
        """Accumulate gradients (no rescaling by ``grad_accum``; see the module docstring)."""
        self.ds.backward(loss, scale_wrt_gas=False)

    def zero_grad(self) -> None:
        """Drop the gradients accumulated since the last ``step()``."""
        zero = self.ds.optimizer
        zero.zero_grad(set_to_none=True)  # ZeRO-3 also restarts its accumulation counter here
        if self.stage == 2:
            # ZeRO-2 sums earlier backwards in these buffers; clear them as its skipped-step path does
            for buffers in (zero.averaged_gradients, zero.all_grad_tensors):
                for key in list(buffers):
                    buffers[key] = None

    def step(self) -> dict[str, float]:
        """The accumulation boundary (collective): reduce, clip, AdamW at this update's LR, EMA."""
        lr = self.current_lr()
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr
        self.ds.step()
        grad_norm = self.ds.get_global_grad_norm()
        grad_norm = float("nan") if grad_norm is None else float(grad_norm)
        skipped = not self.ds.was_step_applied()
        if not skipped:
            self.num_updates += 1
            if self.ema is not None:
                self.ema.update(self._full_fp32())
        return {"grad_norm": grad_norm, "lr": lr, "skipped": float(skipped)}

    # ------------------------------------------------------------------ state
    def _full_fp32(self) -> dict[str, Tensor]:
        """Full fp32 master weights by name (collective)."""
        from deepspeed.utils import safe_get_full_fp32_param

        return {n: safe_get_full_fp32_param(p) for n, p in self._params.items()}

    def _base_optimizer(self) -> torch.optim.Optimizer:
        return self.ds.optimizer.optimizer  # the AdamW over the flat fp32 partitions

    def _flat_partitions(self) -> list[Tensor]:
        """This rank's flat fp32 master partitions: the tensors AdamW's state is keyed by."""
        zero = self.ds.optimizer
        return list(
            zero.fp32_partitioned_groups_flat if self.stage == 3 else zero.single_partition_of_fp32_groups
        )

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """fp32 CPU copies of the full trainable (master) weights (collective)."""
        return {n: t.float().cpu().contiguous().clone() for n, t in self._full_fp32().items()}

    @torch.no_grad()
    def load_trainable_state_dict(self, tensors: dict[str, Tensor]) -> None:
        """Set master and module weights (collective); the EMA restarts from them."""
        from deepspeed.utils import safe_set_full_fp32_param

        _check_names("trainable weights", list(self._params), list(tensors))
        _check_shapes("trainable weights", self._params, tensors)
        for n, p in self._params.items():
            safe_set_full_fp32_param(p, tensors[n].to(self.device, torch.float32))
        with self._module_params(modify=True):
            for n, p in self._params.items():
                p.data.copy_(tensors[n].to(p.device, p.dtype))
        if self.ema is not None:
            self.ema = EMA(self.ema.decay, self._full_fp32())

    def state_dict(self) -> dict[str, Any]:
        """Same format as :meth:`TorchEngine.state_dict`, gathered from the partitions (collective)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        opt: dict[str, Any] = {"step": {}, "exp_avg": {}, "exp_avg_sq": {}}
        states = list(self._base_optimizer().state.values())
        if states:  # flat partitions share one step count
            step = float(states[0]["step"])
            for n, p in self._params.items():
                opt["step"][n] = step
                for k in _ADAM_KEYS:
                    opt[k][n] = safe_get_full_optimizer_state(p, k).float().cpu().clone()
        return self._engine_state(opt)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Scatter a :meth:`state_dict` (from either engine, any world size) into the partitions."""
        from deepspeed.utils import safe_set_full_optimizer_state

        self._check_state(state)
        opt = state["optimizer"]
        if opt["step"]:
            _check_names("optimizer state", list(self._params), list(opt["step"]))
            steps = set(opt["step"].values())
            if len(steps) != 1:
                raise ValueError(f"DeepSpeed keeps one AdamW step count; the checkpoint has {sorted(steps)}")
            step = steps.pop()
            base = self._base_optimizer()
            # AdamW creates its state lazily at the first update; create it (as AdamW would) so the
            # moments can be scattered into it, and let ZeRO-2 re-link its per-parameter views.
            for flat in self._flat_partitions():
                base.state[flat] = {
                    "step": torch.tensor(step, dtype=torch.float32),
                    **{k: torch.zeros_like(flat) for k in _ADAM_KEYS},
                }
            if self.stage == 2:
                self.ds.optimizer._hp_optimizer_states_linked = False
                self.ds.optimizer._lazy_init_hp_params_optimizer_state()
            for n, p in self._params.items():
                for k in _ADAM_KEYS:
                    safe_set_full_optimizer_state(p, opt[k][n].to(self.device, torch.float32), k)
        self.num_updates = int(state["num_updates"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    # ------------------------------------------------------------------ forwards outside training
    @contextlib.contextmanager
    def _module_params(self, modify: bool) -> Iterator[None]:
        """Full trainable module weights inside the block; ZeRO-3 re-partitions (rank 0's) on exit."""
        if self.stage != 3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(
            list(self._params.values()), modifier_rank=0 if modify else None
        ):
            yield

    @contextlib.contextmanager
    def gathered_parameters(self) -> Iterator[nn.Module]:
        """The full model for no-grad forwards that do not go through training (collective).

        ZeRO-3: gathers every parameter once and removes ZeRO's per-module fetch/release hooks for
        the block, so a rollout is as many plain forwards as it likes with no collective inside
        (ranks may run different numbers of them without hanging). No-op for ZeRO-2.
        """
        module = self.unwrap()
        if self.stage != 3:
            yield module
            return
        import deepspeed

        coordinator = self.ds.optimizer.parameter_offload
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            for hook in coordinator.forward_hooks + coordinator.backward_hooks:
                hook.remove()
            coordinator.forward_hooks, coordinator.backward_hooks = [], []
            try:
                yield module
            finally:
                coordinator._register_deepspeed_module(module)

    @contextlib.contextmanager
    def ema_swap(self) -> Iterator[None]:
        """Evaluate with the EMA weights inside the block (collective; a no-op without EMA)."""
        if self.ema is None:
            yield
            return
        with torch.no_grad(), self._module_params(modify=False):
            backup = {n: p.detach().clone() for n, p in self._params.items()}
        self._write_module({n: t for n, t in self.ema.shadow.items()})
        try:
            yield
        finally:
            self._write_module(backup)

    @torch.no_grad()
    def _write_module(self, values: dict[str, Tensor]) -> None:
        with self._module_params(modify=True):
            for n, p in self._params.items():
                p.data.copy_(values[n].to(p.device, p.dtype))

    def unwrap(self) -> nn.Module:
        assert self.ds is not None, "call setup() first"
        return self.ds.module


def build_engine(name: str, **kwargs: Any) -> Engine:
    """``torch`` | ``ds_zero2`` | ``ds_zero3`` with constructor ``kwargs`` (the ``conf/engine`` keys)."""
    if name == "torch":
        return TorchEngine(**kwargs)
    if name in ("ds_zero2", "ds_zero3"):
        return DeepSpeedEngine(stage=int(name[-1]), **kwargs)
    raise ValueError(f"engine={name!r}; expected torch, ds_zero2 or ds_zero3")
