"""A tiny regression problem shared by the engine tests and the 2-process worker.

Tolerances used against it: fp32 runs of the same update in a different summation order (ZeRO's flat
buffers, all-reduce of two half-batch gradients) agree to ~1e-8 per step here; tests allow 1e-6.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

# weight decay, clipping that binds (grad norms are ~1-3), warmup then cosine: every branch of step()
OPTIM: dict[str, Any] = dict(
    lr=3e-2,
    betas=(0.9, 0.99),
    weight_decay=0.05,
    eps=1e-8,
    schedule="cosine",
    warmup_steps=1,
    total_steps=8,
    grad_clip=0.5,
)


def make_model(seed: int = 0) -> nn.Module:
    """Linear-Tanh-Linear with one frozen parameter (it must stay out of the optimizer)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    model[0].bias.requires_grad_(False)
    return model


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_data(n: int = 8, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randn(n, 3, generator=g)


def loss_fn(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return (model(x) - y).pow(2).mean()


def train_steps(engine: Any, x: Tensor, y: Tensor, steps: int, micro: int = 1) -> list[dict[str, float]]:
    """``steps`` optimizer steps, each over ``micro`` equal micro-batches of (x, y).

    Returns per step the mean micro-batch loss (before the update) and the engine's step metrics.
    """
    out = []
    for _ in range(steps):
        losses = []
        for xb, yb in zip(x.chunk(micro), y.chunk(micro), strict=True):
            with engine.autocast():
                loss = loss_fn(engine.unwrap(), xb.to(engine.device), yb.to(engine.device))
            engine.backward(loss / micro)
            losses.append(float(loss.detach()))
        out.append({"loss": sum(losses) / micro, **engine.step()})
    return out
