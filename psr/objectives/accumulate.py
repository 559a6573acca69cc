"""The update loop every RL objective shares: accumulate the loss of each piece of work, then one
engine step per inner epoch, with ranks kept in step and non-finite values agreed on.

An objective turns its inputs into a list of pieces (GRPO: (group, step, micro-batch); DPO: (group,
pair chunk)) and a function that yields each piece's :class:`LossPiece`; :func:`accumulate` does the
rest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import Tensor

from psr.objectives.protocol import ANOTHER_RANK, UpdateResult

if TYPE_CHECKING:
    from psr.engine import Engine

__all__ = ["LossPiece", "accumulate", "check_batch_settings", "chunks", "merge_metrics"]

W = TypeVar("W")


@dataclass(frozen=True)
class LossPiece:
    """One forward's loss.

    Attributes:
        loss: 0-dim loss with gradients, the mean over the piece's ``units``.
        metrics: float or 0-dim tensor metrics of the piece (merged by :func:`merge_metrics`).
        units: samples (GRPO) or pairs (DPO) the loss averages over: its weight among all pieces.
        finite: False when an input of the loss was already non-finite (a recomputed log-prob);
            a non-finite ``loss`` is caught without it.
        where: where the piece comes from, for the report of a non-finite value.
    """

    loss: Tensor
    metrics: Mapping[str, Tensor | float]
    units: int
    finite: bool = True
    where: str = ""


def merge_metrics(acc: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Each key's values merged: ``*_min`` by min, ``*_max`` by max, the rest by mean."""
    out = {}
    for k, vs in acc.items():
        if k.endswith("_min"):
            out[k] = min(vs)
        elif k.endswith("_max"):
            out[k] = max(vs)
        else:
            out[k] = sum(vs) / len(vs)
    return out


def check_batch_settings(micro_batch_size: int, inner_epochs: int) -> None:
    """The two ``train`` settings every objective's loop takes from the trainer, checked once."""
    if micro_batch_size < 1 or inner_epochs < 1:
        raise ValueError(
            f"train.micro_batch_size={micro_batch_size} and train.inner_epochs={inner_epochs} must be >= 1"
        )


def chunks(index: Tensor, size: int) -> list[Tensor]:
    """``index`` cut into consecutive pieces of at most ``size`` entries."""
    return [index[i : i + size] for i in range(0, len(index), size)]


def _step(engine: Engine, acc: dict[str, list[float]]) -> None:
    """``engine.step()`` (clip, optimizer, schedule, EMA) with its report added to ``acc``."""
    out = engine.step()
    acc.setdefault("train/grad_norm", []).append(float(out["grad_norm"]))
    acc.setdefault("train/lr", []).append(float(out["lr"]))
    acc.setdefault("train/skipped_step", []).append(float(out["skipped"]))


def _reduce_max(value: float) -> float:
    from psr.distributed import all_reduce_max

    return all_reduce_max(float(value))


def _reduce_mean(value: float) -> float:
    from psr.distributed import all_reduce_mean

    return float(all_reduce_mean(torch.tensor([float(value)], dtype=torch.float64)))


def accumulate(
    engine: Engine,
    work: Sequence[W],
    filler: Callable[[], W],
    units: Callable[[W], int],
    losses: Callable[[W, int], Iterable[LossPiece]],
    inner_epochs: int,
) -> UpdateResult:
    """Accumulate every piece's loss, then one engine step per inner epoch.

    Ranks must agree: all skip, or all run the same number of forwards (ZeRO-3 gathers parameters
    in each), backwards (ZeRO-2/3 communicate inside backward) and steps, so a rank with less work
    pads with zero-weight pieces (``filler()`` when it has none). Each loss is weighted by its share
    of all ranks' units (samples or pairs): every rank divides by the mean count per rank and the
    engine averages gradients over ranks. ``losses(piece, epoch)`` yields :class:`LossPiece` s; a
    non-finite one still runs its backward, then every rank drops the update.

    Args:
        engine: the training engine (``backward``, ``step``, ``zero_grad``).
        work: this rank's pieces of work.
        filler: a piece to pad with when this rank has none (run with weight 0).
        units: a piece's number of samples or pairs, known before its forward.
        losses: ``(piece, epoch) -> LossPiece`` s of the piece.
        inner_epochs: passes over the work, one engine step each (``train.inner_epochs``).

    Returns:
        :class:`~psr.objectives.protocol.UpdateResult`: ``train/loss`` is the units-weighted mean
        loss of this rank's pieces times this rank's share of the units (so the mean over ranks is
        the step's loss), averaged over epochs.
    """
    n_pieces = int(_reduce_max(len(work)))
    if n_pieces == 0:
        return UpdateResult({"train/skipped_update": 1.0})
    weights = [1.0] * len(work) + [0.0] * (n_pieces - len(work))
    if len(work) < n_pieces:
        pad = work[0] if work else filler()
        work = [*work, *[pad] * (n_pieces - len(work))]
    n_units = _reduce_mean(sum(units(piece) * w for piece, w in zip(work, weights, strict=True)))
    acc: dict[str, list[float]] = {}
    total = 0.0
    for epoch in range(inner_epochs):
        bad = None
        for piece, weight in zip(work, weights, strict=True):
            for p in losses(piece, epoch):
                finite = p.finite and bool(torch.isfinite(p.loss))
                if not finite:
                    bad = bad or p.where
                engine.backward(p.loss * (weight * p.units / n_units))
                if weight and finite:
                    total += float(p.loss.detach()) * p.units / n_units
                    for key, v in p.metrics.items():
                        acc.setdefault(key, []).append(float(v))
        if _reduce_max(bad is not None):
            engine.zero_grad()
            return UpdateResult({"train/loss": math.nan}, nonfinite_where=bad or ANOTHER_RANK)
        _step(engine, acc)
    return UpdateResult({**merge_metrics(acc), "train/loss": total / inner_epochs})
