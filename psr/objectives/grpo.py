r"""The GRPO objective on one trained sampling step (PSR_METHOD.md §4), as pure tensor math.

Per trained step k and sample i, with the per-step log-probs of :mod:`psr.sampling.sde`
(Gaussian log-densities mean-reduced over latent dims, fp32):

    r_i = exp(logp_theta_i - logp_old_i)
    L_policy = mean_i max(-A_i r_i, -A_i clip(r_i, 1 - eps, 1 + eps))        (PPO clipped surrogate)
    L = L_policy + beta * mean_i KL_i

``KL_i`` is the closed-form KL between the policy's and the reference policy's (adapters disabled)
Gaussian transitions, :func:`psr.sampling.sde.kl_gaussian_means`; it is computed by the caller and
passed in, so that no log-prob or KL math is written twice.

Which steps are trained is :func:`select_train_steps`. Log-probs and KL are not recomputed here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["clipped_surrogate", "grpo_step_loss", "select_train_steps", "TRAIN_STEP_MODES"]

TRAIN_STEP_MODES = ("all", "first_fraction", "random_subset")


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
