"""The shared update loop: loss weights, rank padding and the non-finite agreement, on a fake engine."""

from __future__ import annotations

import math

import pytest
import torch

from psr.objectives import accumulate as acc_module
from psr.objectives.accumulate import LossPiece, accumulate, merge_metrics
from psr.objectives.protocol import ANOTHER_RANK


class FakeEngine:
    """Records what the loop asks of an engine."""

    def __init__(self) -> None:
        self.backward_values: list[float] = []
        self.steps = 0
        self.zeroed = 0

    def backward(self, loss: torch.Tensor) -> None:
        self.backward_values.append(float(loss))

    def step(self) -> dict[str, float]:
        self.steps += 1
        return {"grad_norm": 1.0, "lr": 0.1, "skipped": 0.0}

    def zero_grad(self) -> None:
        self.zeroed += 1


def _losses(values: dict[str, float], bad: str | None = None):
    def losses(piece: tuple[str, int], epoch: int):
        name, units = piece
        loss = torch.tensor(values[name])
        yield LossPiece(
            loss, {"train/x": values[name], "train/x_max": values[name]}, units, name != bad, name
        )

    return losses


def test_pieces_weighted_by_their_units():
    engine = FakeEngine()
    work = [("a", 1), ("b", 3)]
    out = accumulate(engine, work, lambda: ("a", 1), lambda p: p[1], _losses({"a": 2.0, "b": 6.0}), 2)
    # each loss times its share of the 4 units: 2 * 1/4 and 6 * 3/4, in both epochs
    assert engine.backward_values == [0.5, 4.5, 0.5, 4.5]
    assert engine.steps == 2 and engine.zeroed == 0
    assert out.nonfinite_where is None
    assert out.metrics["train/loss"] == pytest.approx((2 * 1 + 6 * 3) / 4)  # 5, the units-weighted mean
    assert out.metrics["train/x"] == 4.0 and out.metrics["train/x_max"] == 6.0  # piece mean, max
    assert out.metrics["train/grad_norm"] == 1.0


def test_a_non_finite_piece_drops_the_update_after_its_backward():
    engine = FakeEngine()
    out = accumulate(
        engine, [("a", 1), ("b", 1)], lambda: ("a", 1), lambda p: p[1], _losses({"a": 1.0, "b": 1.0}, "b"), 3
    )
    assert len(engine.backward_values) == 2  # every backward ran (ZeRO communicates inside it)
    assert engine.steps == 0 and engine.zeroed == 1
    assert math.isnan(out.metrics["train/loss"]) and out.nonfinite_where == "b"
    # a NaN loss is caught without the flag
    out = accumulate(FakeEngine(), [("a", 1)], lambda: ("a", 1), lambda p: p[1], _losses({"a": math.nan}), 1)
    assert out.nonfinite_where == "a"


def test_ranks_agree(monkeypatch):
    # another rank saw a non-finite value: this one drops its update too
    monkeypatch.setattr(acc_module, "_reduce_max", lambda v: 1.0 if isinstance(v, bool) else float(v))
    engine = FakeEngine()
    out = accumulate(engine, [("a", 1)], lambda: ("a", 1), lambda p: p[1], _losses({"a": 1.0}), 1)
    assert out.nonfinite_where == ANOTHER_RANK and engine.steps == 0 and engine.zeroed == 1
    # a rank without work pads to the peers' piece count with zero-weight filler pieces
    monkeypatch.setattr(acc_module, "_reduce_max", lambda v: float(v) if isinstance(v, bool) else max(v, 2.0))
    monkeypatch.setattr(acc_module, "_reduce_mean", lambda v: float(v) + 2.0)  # the peers' units
    engine = FakeEngine()
    out = accumulate(engine, [], lambda: ("f", 5), lambda p: p[1], _losses({"f": 3.0}), 1)
    assert engine.backward_values == [0.0, 0.0] and engine.steps == 1
    assert out.metrics["train/loss"] == 0.0 and "train/x" not in out.metrics


def test_nothing_to_train_anywhere_skips():
    engine = FakeEngine()
    out = accumulate(engine, [], lambda: ("a", 1), lambda p: p[1], _losses({}), 1)
    assert out.metrics == {"train/skipped_update": 1.0} and out.nonfinite_where is None
    assert engine.steps == 0 and engine.backward_values == []


def test_merge_metrics():
    assert merge_metrics({"a": [1.0, 3.0], "r_min": [2.0, -1.0], "r_max": [2.0, 5.0]}) == {
        "a": 2.0,
        "r_min": -1.0,
        "r_max": 5.0,
    }
