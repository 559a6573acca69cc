r"""The GRPO objective (docs/method.md §4): the per-step loss as pure tensor math, and
:class:`GRPOObjective`, the update that turns a step's rewards into advantages and trains on them.

Per trained step k and sample i, with the per-step log-probs of :mod:`psr.sampling.sde`
(Gaussian log-densities mean-reduced over latent dims, fp32):

    r_i = exp(logp_theta_i - logp_old_i)
    L_policy = mean_i max(-A_i r_i, -A_i clip(r_i, 1 - eps, 1 + eps))        (PPO clipped surrogate)
    L = L_policy + beta * mean_i KL_i

``KL_i`` is the closed-form KL between the policy's and the reference policy's (adapters disabled)
Gaussian transitions, :func:`psr.sampling.sde.kl_gaussian_means`; it is computed by the caller and
passed in, so that no log-prob or KL math is written twice.

Which steps are trained is :func:`select_train_steps`; advantages are
:func:`psr.objectives.advantages.group_advantages` of the whole step's rewards, optionally shaped
(off by default) by dropping groups of narrow reward range and weighting groups by difficulty.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from psr.objectives.accumulate import LossPiece, accumulate, check_batch_settings, chunks
from psr.objectives.advantages import (
    advantage_summary,
    difficulty_weights,
    group_advantages,
    narrow_groups,
)
from psr.objectives.protocol import StepRewards, UpdateResult
from psr.sampling.rollout import step_log_prob
from psr.sampling.sde import kl_gaussian_means, noise_std
from psr.seeding import derive_seed
from psr.types import Trajectory

if TYPE_CHECKING:
    from psr.engine import Engine
    from psr.models.policy import FlowPolicy

__all__ = [
    "GRPOObjective",
    "KL_STDS",
    "TRAIN_STEP_MODES",
    "clipped_surrogate",
    "grpo_step_loss",
    "select_train_steps",
]

TRAIN_STEP_MODES = ("all", "first_fraction", "random_subset")
KL_STDS = ("transition", "diffusion")


def _compute_dtype(*ts: Tensor) -> torch.dtype:
    # fp32 at least: ratios of bf16 log-probs would round |r - 1| ~ 1e-4 (the clip range) to 0
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def clipped_surrogate(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_eps: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate on per-sample log-prob ratios.

    Args:
        log_prob: ``[B]`` log-probs of the stored transitions under the current policy (with grad).
        old_log_prob: ``[B]`` log-probs under the sampling policy (treated as data, detached).
        advantages: ``[B]`` advantages (treated as data, detached).
        clip_eps: clip range eps > 0 on ``|r - 1|`` (``algo.clip_eps``; ~1e-4 with mean-reduced
            log-probs).

    Returns:
        ``(loss, metrics)``: ``loss`` a 0-dim tensor in fp32 (fp64 for fp64 inputs),
        ``mean(max(-A r, -A clip(r, 1-eps, 1+eps)))``; ``metrics`` detached 0-dim tensors:
        ``train/ratio_mean``, ``train/ratio_std`` (population std, 0 for B = 1),
        ``train/ratio_min``, ``train/ratio_max``, ``train/clipfrac`` (fraction with
        ``|r - 1| > eps``), ``train/approx_kl`` (``mean(0.5 (logp - logp_old)^2)``: the "k2"
        estimator of KL(old || new), low-bias for small log-ratio; the one Flow-GRPO logs).
    """
    if log_prob.ndim != 1:
        raise ValueError(f"clipped_surrogate: log_prob must be [B]; got shape {tuple(log_prob.shape)}")
    for name, t in (("old_log_prob", old_log_prob), ("advantages", advantages)):
        if t.shape != log_prob.shape:
            raise ValueError(
                f"clipped_surrogate: {name} {tuple(t.shape)} must have log_prob's shape {tuple(log_prob.shape)}"
            )
    if log_prob.numel() == 0:
        raise ValueError("clipped_surrogate: empty batch")
    if not (clip_eps > 0 and math.isfinite(clip_eps)):
        raise ValueError(f"clipped_surrogate: clip_eps={clip_eps} must be finite and > 0 (algo.clip_eps)")

    dtype = _compute_dtype(log_prob, old_log_prob, advantages)
    log_ratio = log_prob.to(dtype) - old_log_prob.detach().to(dtype)  # [B]
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(dtype)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = torch.maximum(unclipped, clipped).mean()

    with torch.no_grad():
        r = ratio.detach()
        metrics = {
            "train/ratio_mean": r.mean(),
            "train/ratio_std": r.std(unbiased=False),
            "train/ratio_min": r.min(),
            "train/ratio_max": r.max(),
            "train/clipfrac": ((r - 1.0).abs() > clip_eps).to(dtype).mean(),
            "train/approx_kl": (0.5 * log_ratio.detach() ** 2).mean(),
        }
    return loss, metrics


def grpo_step_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    clip_eps: float,
    *,
    kl: Tensor | None,
    beta: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate plus ``beta * mean(kl)`` for one trained step.

    Args:
        log_prob, old_log_prob, advantages, clip_eps: as in :func:`clipped_surrogate`.
        kl: ``[B]`` per-sample KL to the reference policy (with grad through the policy's mean),
            e.g. ``kl_gaussian_means(step.mean, ref_step.mean, step.std)``; None when ``beta == 0``
            (the reference forward is skipped).
        beta: KL weight >= 0 (``algo.beta``).

    Returns:
        ``(loss, metrics)``: the 0-dim loss and :func:`clipped_surrogate`'s metrics plus
        ``train/loss`` (total), ``train/loss/policy`` (surrogate), ``train/loss/kl``
        (``beta * mean(kl)``, 0 without kl) and, when kl is given, ``train/kl`` (``mean(kl)``).
    """
    if not (beta >= 0 and math.isfinite(beta)):
        raise ValueError(f"grpo_step_loss: beta={beta} must be finite and >= 0 (algo.beta)")
    if beta > 0 and kl is None:
        raise ValueError(
            "grpo_step_loss: beta > 0 needs the per-sample KL to the reference policy (kl=None given)"
        )
    policy_loss, metrics = clipped_surrogate(log_prob, old_log_prob, advantages, clip_eps)
    loss = policy_loss
    kl_term = torch.zeros((), dtype=policy_loss.dtype, device=policy_loss.device)
    if kl is not None:
        if kl.shape != log_prob.shape:
            raise ValueError(
                f"grpo_step_loss: kl {tuple(kl.shape)} must have log_prob's shape {tuple(log_prob.shape)}"
            )
        kl_mean = kl.to(policy_loss.dtype).mean()
        metrics["train/kl"] = kl_mean.detach()
        if beta > 0:
            # beta == 0 keeps the KL out of the graph (logged only)
            kl_term = beta * kl_mean
            loss = loss + kl_term
    metrics["train/loss/policy"] = policy_loss.detach()
    metrics["train/loss/kl"] = kl_term.detach()
    metrics["train/loss"] = loss.detach()
    return loss, metrics


def select_train_steps(
    sde_mask: Tensor,
    *,
    mode: str,
    fraction: float = 1.0,
    num: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Indices of the sampling steps to train on; only stochastic (SDE) steps are ever returned.

    Modes:
      - ``all``: every SDE step.
      - ``first_fraction``: the first ``floor(fraction * n_sde)`` SDE steps (at least one), as
        Flow-GRPO's ``int(num_steps * timestep_fraction)``: 0.99 of 28 steps trains steps 0..26,
        leaving out the last, nearly deterministic one. A 1e-9 tolerance absorbs float products
        such as ``0.29 * 100 = 28.999999999999996``.
      - ``random_subset``: ``num`` SDE steps drawn without replacement with ``generator``
        (Flow-GRPO-Fast / MixGRPO style when combined with an SDE window in ``sde_mask``).

    Args:
        sde_mask: ``[K]`` bool, True where the rollout step was stochastic (``Trajectory.sde_mask``).
        mode: one of :data:`TRAIN_STEP_MODES` (``algo.train_steps``).
        fraction: in (0, 1], for ``first_fraction`` (``algo.train_fraction``).
        num: >= 1 and <= the number of SDE steps, for ``random_subset`` (``algo.num_train_steps``).
        generator: random source for ``random_subset`` (CPU generator).

    Returns:
        ``[n]`` long step indices in increasing order, on ``sde_mask``'s device.
    """
    if sde_mask.ndim != 1 or sde_mask.dtype != torch.bool:
        raise ValueError(
            f"select_train_steps: sde_mask must be a [K] bool tensor; got {sde_mask.dtype} {tuple(sde_mask.shape)}"
        )
    sde_steps = torch.nonzero(sde_mask).flatten()  # increasing
    n_sde = int(sde_steps.numel())
    if n_sde == 0:
        raise ValueError(
            "select_train_steps: the rollout has no stochastic step (sde_mask all False); GRPO needs an SDE "
            "sampler on at least one step (sampler.noise_level > 0, sampler kind not 'ode')"
        )
    if mode == "all":
        return sde_steps
    if mode == "first_fraction":
        if not 0 < fraction <= 1:
            raise ValueError(
                f"select_train_steps: fraction={fraction} must be in (0, 1] (algo.train_fraction)"
            )
        n = max(1, math.floor(fraction * n_sde + 1e-9))
        return sde_steps[:n]
    if mode == "random_subset":
        if num is None or not 1 <= num <= n_sde:
            raise ValueError(
                f"select_train_steps: mode=random_subset needs 1 <= num <= {n_sde} (the SDE steps of the "
                f"rollout); got num={num} (algo.num_train_steps)"
            )
        pick = torch.randperm(n_sde, generator=generator)[:num].to(sde_steps.device)
        return sde_steps[pick.sort().values]
    raise ValueError(
        f"select_train_steps: mode={mode!r}; expected one of {TRAIN_STEP_MODES} (algo.train_steps)"
    )


# one GRPO piece of work: (trajectory, its advantages [G], trained step k, sample indices [M])
_Piece = tuple[Trajectory, Tensor, int, Tensor]


@dataclass
class GRPOObjective:
    """Flow-GRPO: group advantages, then the clipped surrogate on per-step ratios + beta KL to the
    reference policy (docs/method.md §4). Keys of ``conf/algo/grpo.yaml`` are these fields.

    Attributes:
        micro_batch_size: samples per forward (``train.micro_batch_size``).
        inner_epochs: passes over the step's samples, one optimizer step each (``train.inner_epochs``).
        clip_eps: clip range on per-step ratios (log-probs are mean-reduced over latent dims).
        beta: KL weight to the reference policy; 0 skips the reference forward.
        train_steps: which SDE steps train: ``first_fraction`` | ``random_subset`` | ``all``.
        train_fraction: for ``first_fraction``.
        num_train_steps: for ``random_subset``.
        kl_std: ``transition`` (exact KL of the two Gaussian steps) | ``diffusion`` (Flow-GRPO's,
            divided by sigma_t^2).
        global_std: advantages divide by the std over the whole step's batch (all ranks; Flow-GRPO's
            FLUX Kontext setting) instead of the group's.
        clip: advantages are clipped to ``[-clip, clip]``.
        eps: added to the std of the advantages.
        normalize_per_reward: rank by the weighted sum of each reward component z-scored within its
            group, instead of the reward's own combined score (for components of different ranges).
        min_group_range: groups whose reward range (max - min of the reward's score) is below this
            are dropped: advantage 0, out of every statistic, counted in ``adv/filtered_frac``
            (0: off).
        difficulty_gamma: advantages of group g are multiplied by ``(1 - mean_g score)^gamma``,
            clipped to ``difficulty_clip`` and renormalized to mean 1 over the step's groups (0: off).
        difficulty_clip: ``(lo, hi)``, ``0 < lo <= hi``: bounds of the weight before renormalizing.
    """

    micro_batch_size: int
    inner_epochs: int = 1
    clip_eps: float = 1e-4
    beta: float = 0.0
    train_steps: str = "first_fraction"
    train_fraction: float = 0.99
    num_train_steps: int | None = None
    kl_std: str = "transition"
    global_std: bool = True
    clip: float = 5.0
    eps: float = 1e-4
    normalize_per_reward: bool = False
    min_group_range: float = 0.0
    difficulty_gamma: float = 0.0
    difficulty_clip: tuple[float, float] = (0.1, 1.0)

    def __post_init__(self) -> None:
        if self.kl_std not in KL_STDS:
            raise ValueError(f"algo.kl_std={self.kl_std!r}; expected one of {KL_STDS}")
        if self.train_steps not in TRAIN_STEP_MODES:
            raise ValueError(f"algo.train_steps={self.train_steps!r}; expected one of {TRAIN_STEP_MODES}")
        check_batch_settings(self.micro_batch_size, self.inner_epochs)
        ranges = (
            ("clip_eps", self.clip_eps > 0, "> 0"),
            ("beta", self.beta >= 0, ">= 0"),
            ("train_fraction", 0 < self.train_fraction <= 1, "in (0, 1]"),
            ("clip", self.clip > 0, "> 0 (math.inf: no clipping)"),
            ("eps", 0 <= self.eps < math.inf, ">= 0"),
            ("min_group_range", 0 <= self.min_group_range < math.inf, ">= 0 (0: off)"),
            ("difficulty_gamma", 0 <= self.difficulty_gamma < math.inf, ">= 0 (0: off)"),
        )
        for key, ok, rule in ranges:
            if not ok or math.isnan(getattr(self, key)):
                raise ValueError(f"algo.{key}={getattr(self, key)} must be {rule}")
        clip = (
            tuple(self.difficulty_clip) if isinstance(self.difficulty_clip, Sequence) else ()
        )  # YAML: a list
        if len(clip) != 2 or not 0 < float(clip[0]) <= float(clip[1]) < math.inf:
            raise ValueError(
                f"algo.difficulty_clip={list(clip)} must be [lo, hi] with 0 < lo <= hi (bounds of the weight)"
            )
        self.difficulty_clip = (float(clip[0]), float(clip[1]))
        if self.train_steps == "random_subset" and (self.num_train_steps is None or self.num_train_steps < 1):
            raise ValueError(
                f"algo.num_train_steps={self.num_train_steps} must be >= 1 under algo.train_steps=random_subset"
            )

    @property
    def needs_reference(self) -> bool:
        """Whether the update runs the reference policy (the KL term)."""
        return self.beta > 0

    @property
    def needs_sde_steps(self) -> bool:
        """Always: the ratios are those of the log-probs of SDE steps."""
        return True

    def advantages(self, rewards: StepRewards) -> tuple[Tensor, dict[str, float]]:
        """Advantages of every sample of the step (``[B_all]``) and their ``adv/*`` metrics.

        Samples to which no reward applies (NaN) get advantage 0 and stay out of every statistic;
        the others get :func:`~psr.objectives.advantages.group_advantages` of the whole step's
        batch, so with ``global_std`` every rank divides by the same std.

        Shaping, when on, reads the reward's own score (``rewards.scores``, in its units, also under
        ``normalize_per_reward``): groups of range below ``min_group_range`` are left out before the
        statistics (as if not sampled) and keep advantage 0; the difficulty weights then multiply
        the clipped advantages of the remaining groups, and ``adv/mean|std|min|max`` describe the
        final advantages.
        """
        combined = rewards.combined(normalize_per_reward=self.normalize_per_reward)
        valid = ~torch.isnan(combined)
        advantages = torch.zeros_like(combined)
        shaping: dict[str, float] = {}
        if self.min_group_range > 0 and bool(valid.any()):
            narrow = narrow_groups(
                rewards.scores[valid], rewards.group_ids[valid], min_range=self.min_group_range
            )
            num_groups = int(torch.unique(rewards.group_ids[valid]).numel())
            dropped = int(torch.unique(rewards.group_ids[valid][narrow]).numel())
            shaping["adv/filtered_frac"] = dropped / num_groups
            kept = valid.clone()
            kept[valid] = ~narrow
            valid = kept
        if not bool(valid.any()):
            return advantages, shaping
        advantages[valid], metrics = group_advantages(
            combined[valid],
            rewards.group_ids[valid],
            global_std=self.global_std,
            eps=self.eps,
            clip=self.clip,
        )
        if self.difficulty_gamma > 0:
            weights, weight_metrics = difficulty_weights(
                rewards.scores[valid],
                rewards.group_ids[valid],
                gamma=self.difficulty_gamma,
                clip=self.difficulty_clip,
            )
            advantages[valid] = (advantages[valid].double() * weights).to(advantages.dtype)
            shaping.update(weight_metrics)
        if shaping:
            metrics.update(advantage_summary(advantages[valid]))
        return advantages, {**metrics, **shaping}

    def update(
        self,
        policy: FlowPolicy,
        engine: Engine,
        trajs: Sequence[Trajectory],
        rewards: StepRewards,
        seed: int,
    ) -> UpdateResult:
        """One GRPO update (:class:`~psr.objectives.protocol.Objective`). Trained steps are drawn
        from ``(seed, group id)``, independent of how groups are spread over ranks."""
        advantages, adv_metrics = self.advantages(rewards)
        work: list[_Piece] = []
        # only samples with a non-zero advantage carry signal (zero-variance groups are skipped)
        for traj, adv in zip(trajs, rewards.split_local(advantages, trajs), strict=True):
            idx = torch.nonzero(adv != 0).flatten()
            if len(idx):
                gen = torch.Generator().manual_seed(derive_seed(seed, "objective", int(traj.group_ids[0])))
                steps = select_train_steps(
                    traj.sde_mask.cpu(),
                    mode=self.train_steps,
                    fraction=self.train_fraction,
                    num=self.num_train_steps,
                    generator=gen,
                )
                work.extend(
                    (traj, adv, int(k), mb) for k in steps for mb in chunks(idx, self.micro_batch_size)
                )

        def filler() -> _Piece:
            traj = trajs[0]
            k = int(torch.nonzero(traj.sde_mask).flatten()[0])
            mb = torch.arange(min(self.micro_batch_size, traj.batch_size), device=traj.latents.device)
            return traj, torch.zeros(traj.batch_size, device=traj.latents.device), k, mb

        def losses(piece: _Piece, epoch: int) -> Iterator[LossPiece]:
            traj, adv, k, mb = piece
            with engine.autocast():
                out = step_log_prob(policy, traj, k, mb)
            kl = None
            if self.beta > 0:
                with torch.no_grad(), policy.reference_policy(), engine.autocast():
                    ref_mean = step_log_prob(policy, traj, k, mb).mean
                std = out.std
                if self.kl_std == "diffusion":  # Flow-GRPO's value: divide by sigma_t^2, not std^2
                    s = traj.sigmas
                    std = noise_std(traj.method, s[k], s[k + 1], traj.noise_level, s[1])
                kl = kl_gaussian_means(out.mean, ref_mean, std)
            loss, m = grpo_step_loss(
                out.log_prob, traj.log_probs[mb, k], adv[mb], self.clip_eps, kl=kl, beta=self.beta
            )
            where = f"step k={k} of group {int(traj.group_ids[0])} ('{traj.cond.prompt[:40]}')"
            yield LossPiece(loss, m, len(mb), bool(torch.isfinite(out.log_prob).all()), where)

        result = accumulate(engine, work, filler, lambda piece: len(piece[3]), losses, self.inner_epochs)
        return UpdateResult({**adv_metrics, **result.metrics}, result.nonfinite_where)
