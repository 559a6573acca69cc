"""The two RL objectives as small modules: what one update does with a step's trajectories.

The numerics live in :mod:`psr.objectives.grpo`, :mod:`psr.objectives.dpo` and
:mod:`psr.sampling.sde`; these classes only decide which steps and samples go through the network,
accumulate gradients over groups x steps x micro-batches, and call ``engine.step()`` once per inner
epoch. A non-finite loss or log-prob skips the whole update (gradients dropped) and is reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from psr.data.dataset import derive_seed
from psr.objectives.dpo import (
    diffusion_dpo_loss,
    flow_matching_errors,
    focus_weights,
    make_pairs,
    patch_reference_similarity,
)
from psr.objectives.grpo import grpo_step_loss, select_train_steps
from psr.sampling.sampler import step_log_prob
from psr.sampling.sde import kl_gaussian_means, noise_std
from psr.types import Trajectory


def merge_metrics(acc: dict[str, list[float]]) -> dict[str, float]:
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


def _step(engine, acc: dict[str, list[float]]) -> None:
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


def _accumulate(
    engine,
    work: list[Any],
    filler: Callable[[], Any],
    units: Callable[[Any], int],
    losses: Callable[[Any, int], Iterator[tuple[Tensor, dict, int, bool, str]]],
    inner_epochs: int,
) -> tuple[float, dict[str, float]]:
    """The update loop both objectives share: accumulate every piece's loss, then one engine step
    per inner epoch.

    Ranks must agree: all skip, or all run the same number of forwards (ZeRO-3 gathers parameters
    in each), backwards (ZeRO-2/3 communicate inside backward) and steps, so a rank with less work
    pads with zero-weight pieces (``filler()`` when it has none). Each loss is weighted by its share
    of all ranks' units (samples or pairs): every rank divides by the mean count per rank and the
    engine averages gradients over ranks. ``losses(piece, epoch)`` yields ``(loss, metrics, units,
    finite, where)``; a non-finite one still runs its backward, then every rank drops the update.
    """
    n_pieces = int(_reduce_max(len(work)))
    if n_pieces == 0:
        return 0.0, {"train/skipped_update": 1.0}
    weights = [1.0] * len(work) + [0.0] * (n_pieces - len(work))
    if len(work) < n_pieces:
        pad = work[0] if work else filler()
        work = work + [pad] * (n_pieces - len(work))
    n_units = _reduce_mean(sum(units(piece) * w for piece, w in zip(work, weights, strict=True)))
    acc: dict[str, list[float]] = {}
    total = 0.0
    for epoch in range(inner_epochs):
        bad = None
        for piece, weight in zip(work, weights, strict=True):
            for loss, metrics, n, finite, where in losses(piece, epoch):
                finite = finite and bool(torch.isfinite(loss))
                if not finite:
                    bad = bad or where
                engine.backward(loss * (weight * n / n_units))
                if weight and finite:
                    total += float(loss.detach()) * n / n_units
                    for key, v in metrics.items():
                        acc.setdefault(key, []).append(float(v))
        if _reduce_max(bad is not None):
            engine.zero_grad()
            return math.nan, {"nonfinite_where": bad or "another rank"}  # type: ignore[dict-item]
        _step(engine, acc)
    return total / inner_epochs, merge_metrics(acc)


def _chunks(index: Tensor, size: int) -> list[Tensor]:
    return [index[i : i + size] for i in range(0, len(index), size)]


@dataclass
class GRPOObjective:
    """Clipped surrogate on per-step ratios + beta KL to the adapters-disabled reference (§4)."""

    clip_eps: float = 1e-4
    beta: float = 0.0
    train_steps: str = "first_fraction"
    train_fraction: float = 0.99
    num_train_steps: int | None = None
    kl_std: str = "transition"
    micro_batch: int = 8
    inner_epochs: int = 1

    def __post_init__(self) -> None:
        if self.kl_std not in ("transition", "diffusion"):
            raise ValueError(f"algo.kl_std={self.kl_std!r}; expected transition or diffusion")

    def update(
        self, policy, engine, trajs: list[Trajectory], advantages: list[Tensor], seed: int = 0
    ) -> tuple[float, dict[str, float]]:
        """One GRPO update; returns (loss summed over the accumulated pieces, metrics). Trained
        steps are drawn from ``(seed, group id)``, independent of how groups are spread over ranks."""
        # only samples with a non-zero advantage carry signal (zero-variance groups are skipped)
        work: list[tuple[Trajectory, Tensor, int, Tensor]] = []
        for traj, adv in zip(trajs, advantages, strict=True):
            idx = torch.nonzero(adv != 0).flatten()
            if len(idx):
                gen = torch.Generator().manual_seed(derive_seed(seed, int(traj.group_ids[0])))
                steps = select_train_steps(
                    traj.sde_mask.cpu(),
                    mode=self.train_steps,
                    fraction=self.train_fraction,
                    num=self.num_train_steps,
                    generator=gen,
                )
                work.extend((traj, adv, int(k), mb) for k in steps for mb in _chunks(idx, self.micro_batch))

        def filler() -> tuple:
            traj = trajs[0]
            k = int(torch.nonzero(traj.sde_mask).flatten()[0])
            return (
                traj,
                advantages[0],
                k,
                torch.arange(min(self.micro_batch, traj.batch_size), device=traj.latents.device),
            )

        def losses(piece: tuple, epoch: int) -> Iterator[tuple[Tensor, dict, int, bool, str]]:
            traj, adv, k, mb = piece
            with engine.autocast():
                out = step_log_prob(policy, traj, k, mb)
            kl = None
            if self.beta > 0:
                with torch.no_grad(), policy.adapters_disabled(), engine.autocast():
                    ref_mean = step_log_prob(policy, traj, k, mb).mean
                std = out.std
                if self.kl_std == "diffusion":  # Flow-GRPO's value: divide by sigma_t^2, not std^2
                    s = traj.sigmas
                    std = noise_std(traj.kind, s[k], s[k + 1], traj.noise_level, s[1])
                kl = kl_gaussian_means(out.mean, ref_mean, std)
            loss, m = grpo_step_loss(
                out.log_prob, traj.log_probs[mb, k], adv[mb], self.clip_eps, kl=kl, beta=self.beta
            )
            where = f"step k={k} of group {int(traj.group_ids[0])} ('{traj.cond.prompt[:40]}')"
            yield loss, m, len(mb), bool(torch.isfinite(out.log_prob).all()), where

        return _accumulate(engine, work, filler, lambda piece: len(piece[3]), losses, self.inner_epochs)


@dataclass
class DPOObjective:
    """Online Diffusion-DPO on in-group pairs (best vs worst, or all pairs above a margin)."""

    beta: float = 2000.0
    pairs: str = "best_worst"
    margin: float = 0.0
    timesteps_per_pair: int = 2
    focus: bool = False
    focus_strength: float = 1.0
    focus_schedule: str = "linear"
    micro_batch: int = 8
    inner_epochs: int = 1

    def update(
        self, policy, engine, trajs: list[Trajectory], rewards: list[Tensor], seed: int = 0
    ) -> tuple[float, dict[str, float]]:
        """One DPO update; (t, noise) per piece from ``(seed, group id, piece, epoch)``, so the
        draws do not depend on how groups are spread over ranks."""
        work: list[tuple[Trajectory, Tensor, int]] = []
        for traj, r in zip(trajs, rewards, strict=True):
            ok = torch.nonzero(~torch.isnan(r)).flatten()  # NaN: the reward does not apply; never paired
            pairs = make_pairs(r[ok], torch.zeros_like(ok), mode=self.pairs, margin=self.margin)
            pairs = ok[pairs] if len(pairs) else pairs
            chunks = _chunks(pairs, max(1, self.micro_batch // 2))
            work.extend((traj, p, j) for j, p in enumerate(chunks))

        def filler() -> tuple:
            return trajs[0], torch.tensor([[0, 1]], device=trajs[0].latents.device), 0

        def losses(piece: tuple, epoch: int) -> Iterator[tuple[Tensor, dict, int, bool, str]]:
            traj, pairs, j = piece
            gen = torch.Generator().manual_seed(derive_seed(seed, int(traj.group_ids[0]), j, epoch))
            where = f"DPO pairs of group {int(traj.group_ids[0])} ('{traj.cond.prompt[:40]}')"
            for _ in range(self.timesteps_per_pair):
                loss, m = self._pair_loss(policy, engine, traj, pairs, gen)
                yield loss, m, len(pairs), True, where

        return _accumulate(
            engine,
            work,
            filler,
            lambda piece: len(piece[1]) * self.timesteps_per_pair,
            losses,
            self.inner_epochs,
        )

    def _pair_loss(
        self, policy, engine, traj: Trajectory, pairs: Tensor, gen: torch.Generator
    ) -> tuple[Tensor, dict]:
        """Shared (t, noise) for winner and loser, as Diffusion-DPO prescribes."""
        x0 = traj.latents[:, -1]  # [G, N, C] clean latents
        win, lose = pairs[:, 0], pairs[:, 1]
        p = len(pairs)
        t = torch.rand(p, generator=gen).to(x0.device)
        noise = torch.randn(p, *x0.shape[1:], generator=gen).to(x0.device)
        x = torch.cat([x0[win], x0[lose]])  # [2P, N, C]
        eps = torch.cat([noise, noise])
        tt = torch.cat([t, t])
        x_t = (1 - tt[:, None, None]) * x + tt[:, None, None] * eps
        target = eps - x
        weights = None
        if self.focus:
            sim = patch_reference_similarity(x.float(), traj.cond.ref_tokens.float())
            weights = focus_weights(sim, tt, strength=self.focus_strength, schedule=self.focus_schedule)
        with engine.autocast():
            v = policy.velocity(x_t, tt, traj.cond).float()
        with torch.no_grad(), policy.adapters_disabled(), engine.autocast():
            v_ref = policy.velocity(x_t, tt, traj.cond).float()
        err = flow_matching_errors(v, target, weights)
        err_ref = flow_matching_errors(v_ref, target, weights)
        return diffusion_dpo_loss(err[:p], err_ref[:p], err[p:], err_ref[p:], self.beta)
