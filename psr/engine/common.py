"""What both engines hold and call, by composition: optimizer settings, the LR schedule, the EMA,
the update ledger and the checks on names and shapes. The update numerics stay in each engine's
``step``; see :mod:`psr.engine` for the contract they share.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "ADAM_KEYS",
    "EMA",
    "PRECISIONS",
    "SCHEDULES",
    "STATE_FORMAT",
    "OptimSettings",
    "UpdateLedger",
    "adamw",
    "autocast",
    "check_names",
    "check_precision",
    "check_shapes",
    "lr_at",
    "named_trainable",
]

STATE_FORMAT = "psr.engine/1"
PRECISIONS = ("fp32", "bf16")
SCHEDULES = ("constant", "cosine")
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def lr_at(
    update: int,
    *,
    lr: float,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    min_lr_ratio: float = 0.0,
) -> float:
    """Learning rate of update number ``update`` (0-based).

    Linear warmup ``lr * (update + 1) / warmup_steps`` for ``update < warmup_steps``, then
    ``constant``, or a half cosine from ``lr`` down to ``min_lr_ratio * lr`` at ``total_steps``.
    """
    if update < warmup_steps:
        return lr * (update + 1) / warmup_steps
    if schedule == "constant":
        return lr
    assert total_steps is not None  # checked by OptimSettings
    progress = min(1.0, (update - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class OptimSettings:
    """The keyword arguments of ``Engine.setup`` (``optim.*`` and the trainer's batch keys), checked.

    Attributes:
        lr: peak learning rate.
        betas: AdamW's two moment decays, each in [0, 1).
        weight_decay: AdamW's decoupled weight decay.
        eps: AdamW's denominator term.
        schedule: ``constant`` or ``cosine`` (see :func:`lr_at`).
        warmup_steps: updates of linear warmup.
        total_steps: the update at which the cosine reaches its floor (the trainer's ``train.steps``).
        min_lr_ratio: the cosine's floor as a fraction of ``lr``.
        grad_clip: global L2 norm to clip to; ``None`` (0 is read as ``None``): no clipping.
        grad_accum: micro-batches per update (DeepSpeed's batch-size bookkeeping only).
        micro_batch_size: samples per micro-batch (likewise).
    """

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)  # a list from the config is turned into a tuple
    weight_decay: float = 0.0
    eps: float = 1e-8
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None
    grad_accum: int = 1
    micro_batch_size: int = 1

    def __post_init__(self) -> None:
        # frozen: normalize through object.__setattr__ (config lists become tuples, 0 means off)
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "grad_clip", float(self.grad_clip) if self.grad_clip else None)
        self._check()

    def _check(self) -> None:
        """Cross-field checks; errors name the config key to change."""
        if not self.lr > 0:
            raise ValueError(f"optim.lr={self.lr} must be > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas={list(self.betas)} must be two numbers in [0, 1)")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r}; expected one of {SCHEDULES}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if self.schedule == "cosine" and (self.total_steps is None or self.total_steps <= self.warmup_steps):
            raise ValueError(
                f"optim.schedule=cosine needs total_steps ({self.total_steps}, the trainer's train.steps) "
                f"> optim.warmup_steps ({self.warmup_steps})"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip={self.grad_clip} must be >= 0 (0 or null: no clipping)")
        if self.grad_accum < 1 or self.micro_batch_size < 1:
            raise ValueError(
                f"grad_accum={self.grad_accum} and micro_batch_size={self.micro_batch_size} must be >= 1"
            )

    def lr_at(self, update: int) -> float:
        """Learning rate of update number ``update`` (0-based) under these settings."""
        return lr_at(
            update,
            lr=self.lr,
            schedule=self.schedule,
            warmup_steps=self.warmup_steps,
            total_steps=self.total_steps,
            min_lr_ratio=self.min_lr_ratio,
        )


def adamw(params: Sequence[nn.Parameter], optim: OptimSettings) -> torch.optim.AdamW:
    """The torch AdamW both engines step (DeepSpeed wraps it; no DeepSpeed optimizer is built)."""
    return torch.optim.AdamW(
        list(params), lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay
    )


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`; the error names ``engine.precision``."""
    if precision not in PRECISIONS:
        raise ValueError(f"engine.precision={precision!r}; expected one of {PRECISIONS}")
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Context for forwards of the trained module: bf16 autocast when ``precision=bf16``."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def named_trainable(model: nn.Module, params: Sequence[nn.Parameter]) -> dict[str, nn.Parameter]:
    """Names of ``params`` inside ``model``, in the given order; each must be trainable, once."""
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


def check_names(kind: str, expected: Sequence[str], got: Sequence[str]) -> None:
    """Raise a ``KeyError`` listing (up to 5 of) the missing and unexpected names."""
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or unexpected:
        raise KeyError(
            f"{kind}: missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})"
        )


def check_shapes(kind: str, params: dict[str, Any], tensors: dict[str, Tensor]) -> None:
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
        check_names("EMA state", list(self.shadow), list(state["shadow"]))
        for n, t in state["shadow"].items():
            self.shadow[n].copy_(t)


class UpdateLedger:
    """What both engines keep about their updates besides the optimizer itself.

    The optimizer settings, the count of applied updates (it picks the learning rate) and the EMA,
    and the engine-independent part of the engine state (``format``, ``num_updates``, ``ema``).
    Weights come in as callables because under DeepSpeed reading them is a collective, done only
    when an EMA needs them.

    Args:
        optim: the checked ``setup`` keywords.
        ema_decay: EMA decay (``engine.ema_decay``), or ``None`` for no EMA.
        weights: returns the trainable weights by name (fp32 master weights where the engine has them).
    """

    def __init__(
        self, optim: OptimSettings, ema_decay: float | None, weights: Callable[[], dict[str, Tensor]]
    ) -> None:
        self.optim = optim
        self.ema_decay = ema_decay
        self.num_updates = 0
        self.ema = EMA(ema_decay, weights()) if ema_decay is not None else None

    def lr(self) -> float:
        """Learning rate of the next update."""
        return self.optim.lr_at(self.num_updates)

    def record_update(self, weights: Callable[[], dict[str, Tensor]]) -> None:
        """Count an applied update and move the EMA towards the new ``weights()``."""
        self.num_updates += 1
        if self.ema is not None:
            self.ema.update(weights())

    def restart_ema(self, weights: Callable[[], dict[str, Tensor]]) -> None:
        """Start the EMA over from ``weights()`` (after loading trainable weights)."""
        if self.ema is not None:
            self.ema = EMA(self.ema.decay, weights())

    def state_dict(self, optimizer: dict[str, Any]) -> dict[str, Any]:
        """The engine state in :data:`STATE_FORMAT` around the engine's ``optimizer`` part."""
        return {
            "format": STATE_FORMAT,
            "num_updates": self.num_updates,
            "optimizer": optimizer,
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def check_state(self, state: dict[str, Any]) -> None:
        """Raise unless ``state`` has this format and an EMA exactly when this engine keeps one."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"engine state has format {state.get('format')!r}; expected {STATE_FORMAT!r}")
        if (state["ema"] is None) != (self.ema is None):
            raise ValueError(
                f"checkpoint {'has' if state['ema'] is not None else 'has no'} EMA but engine.ema_decay="
                f"{self.ema_decay}; set engine.ema_decay to match the run being resumed"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the update count and the EMA (the engine restores its optimizer part)."""
        self.num_updates = int(state["num_updates"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
