"""What an RL objective is: :class:`Objective`, what it is given (:class:`StepRewards`) and what it
gives back (:class:`UpdateResult`).

The trainer rolls out, scores and gathers the step's rewards from every rank; the objective does
everything else with them (GRPO: advantages; DPO: pairs), decides which steps and samples go through
the network, accumulates gradients and calls ``engine.step()``, keeping ranks in step. Objectives
are picked by ``_target_`` in ``conf/algo/*.yaml``; their keys are constructor arguments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from psr.objectives.advantages import combine_rewards
from psr.types import Trajectory

if TYPE_CHECKING:
    from psr.engine import Engine
    from psr.models.policy import FlowPolicy

__all__ = ["Objective", "StepRewards", "UpdateResult", "ANOTHER_RANK"]

# what a rank reports as the place of a non-finite value that another rank saw
ANOTHER_RANK = "another rank"


@dataclass(frozen=True)
class StepRewards:
    """The rewards of one training step, gathered over all ranks in rank order.

    A prompt group never straddles ranks, so this rank's samples are whole groups; the statistics an
    objective needs (GRPO's global std) are over all of them.

    Attributes:
        scores: ``[B_all]`` float, the reward's combined score (``"score"``: higher is better, NaN
            where no reward applies to the sample).
        group_ids: ``[B_all]`` long, global prompt-group ids.
        is_local: ``[B_all]`` bool, True for this rank's samples; in the gathered order they are
            this rank's trajectories concatenated in order.
        components: name -> ``[B_all]`` per-reward scores of a weighted reward (``<name>/score``),
            empty for a single reward.
        weights: name -> weight of each component (``reward.weights``), empty for a single reward.
    """

    scores: Tensor
    group_ids: Tensor
    is_local: Tensor
    components: Mapping[str, Tensor] = field(default_factory=dict)
    weights: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        b = self.scores.shape
        if len(b) != 1 or self.group_ids.shape != b or self.is_local.shape != b:
            raise ValueError(
                f"StepRewards: scores {tuple(self.scores.shape)}, group_ids {tuple(self.group_ids.shape)} and "
                f"is_local {tuple(self.is_local.shape)} must all be [B_all]"
            )
        if self.is_local.dtype != torch.bool:
            raise ValueError(f"StepRewards: is_local must be a bool mask; got {self.is_local.dtype}")
        for name, comp in self.components.items():
            if comp.shape != b:
                raise ValueError(
                    f"StepRewards: component '{name}' {tuple(comp.shape)} must be [B_all] = {tuple(b)}"
                )

    def combined(self, *, normalize_per_reward: bool) -> Tensor:
        """``[B_all]`` rewards to rank samples by: the reward's own score, or, with
        ``normalize_per_reward`` and several components, their weighted sum after z-scoring each
        within its prompt group (:func:`psr.objectives.advantages.combine_rewards`). NaN where no
        reward applies."""
        if normalize_per_reward and len(self.components) > 1:
            return combine_rewards(self.components, self.weights, self.group_ids, normalize_per_reward=True)
        return self.scores

    def split_local(self, values: Tensor, trajs: Sequence[Trajectory]) -> list[Tensor]:
        """This rank's share of ``values`` (``[B_all]``), one ``[B_i]`` tensor per trajectory."""
        mine = values[self.is_local]
        sizes = [t.batch_size for t in trajs]
        if mine.shape[0] != sum(sizes):
            raise ValueError(
                f"StepRewards: {mine.shape[0]} samples are marked local but the trajectories hold {sum(sizes)}"
            )
        return list(mine.split(sizes))


@dataclass(frozen=True)
class UpdateResult:
    """What one update reports.

    Attributes:
        metrics: float metrics of this rank: ``train/loss`` (the loss averaged over the step's
            pieces, weighted by their share of samples or pairs; NaN when the update was skipped for
            a non-finite value; absent when no rank had anything to train), the objective's own
            (``train/clipfrac``, ``adv/*``, ...), the engine's (``train/grad_norm``, ``train/lr``)
            and ``train/skipped_update`` (1.0) when there was nothing to train.
        nonfinite_where: None, or, when the update was skipped for a non-finite loss or log-prob,
            where this rank saw it (e.g. "step k=3 of group 5 ('a corgi ...')"), or
            :data:`ANOTHER_RANK`. Every rank skips together.
    """

    metrics: dict[str, float]
    nonfinite_where: str | None = None


class Objective(Protocol):
    """One RL update on a step's trajectories (``conf/algo/*.yaml``, built with ``_target_``)."""

    @property
    def needs_reference(self) -> bool:
        """Whether :meth:`update` runs the reference policy (``FlowPolicy.reference_policy``): under
        full fine-tuning the trainer then keeps a frozen copy of the transformer."""
        ...

    @property
    def needs_sde_steps(self) -> bool:
        """Whether :meth:`update` trains on the log-probs of stochastic rollout steps (the trainer
        refuses a sampler without any: ``sampler.method=ode`` or a zero noise level)."""
        ...

    def update(
        self,
        policy: FlowPolicy,
        engine: Engine,
        trajs: Sequence[Trajectory],
        rewards: StepRewards,
        seed: int,
    ) -> UpdateResult:
        """Train on this rank's trajectories ``trajs`` (whole prompt groups, in the order of
        ``rewards.is_local``), with one ``engine.step()`` per inner epoch; a collective: every rank
        calls it. ``seed`` is the step's objective seed (``derive_seed(seed, "objective", step)``);
        draws inside are derived from it and group ids, never from the rank."""
        ...
