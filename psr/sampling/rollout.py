"""Group rollouts of a :class:`~psr.models.policy.Policy` with per-step log-probs.

``rollout`` samples G images of one prompt group with the SDE on a window of steps (ODE elsewhere)
and stores every latent, so :func:`step_log_prob` can recompute the log-prob of any stored step
with gradients for the policy update. All transition math is :mod:`psr.sampling.sde` (fp32).
"""

from __future__ import annotations

import torch
from torch import Tensor

from psr.models.policy import Policy
from psr.sampling import sde
from psr.types import AnyConditioning, Trajectory


def schedule(policy: Policy, cond: AnyConditioning, num_steps: int) -> Tensor:
    """``[K+1]`` fp32 sigmas with the model scheduler's shift rule for this target size."""
    return policy.schedule(cond, num_steps)


def sde_steps(num_steps: int, window: tuple[int, int] | None, method: str) -> Tensor:
    """``[K]`` bool: which steps are stochastic (and so carry a log-prob and can be trained)."""
    mask = torch.zeros(num_steps, dtype=torch.bool)
    if method == "ode":
        return mask
    start, end = window if window is not None else (0, num_steps)
    if not 0 <= start < end <= num_steps:
        raise ValueError(
            f"sampler.sde_window={window} must satisfy 0 <= start < end <= num_steps={num_steps}"
        )
    mask[start:end] = True
    return mask


def initial_noise(
    policy: Policy,
    cond: AnyConditioning,
    batch: int,
    generator: torch.Generator | None,
    same_noise: bool = False,
) -> Tensor:
    """Packed ``[B, N, C]`` fp32 noise, drawn in the layout the model's own pipeline draws it."""
    return policy.initial_noise(cond, batch, generator, same_noise)


@torch.no_grad()
def rollout(
    policy: Policy,
    cond: AnyConditioning,
    group_size: int,
    *,
    num_steps: int = 28,
    method: str = "flow_grpo",
    noise_level: float = 0.7,
    sde_window: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
    same_noise: bool = False,
    latents: Tensor | None = None,
    decode: bool = True,
    group_id: int = 0,
) -> Trajectory:
    """Sample ``group_size`` images for one prompt group.

    Args:
        policy: the model; run in eval mode, no gradients.
        cond: from the policy's ``condition``.
        num_steps: K denoising steps.
        method: ``flow_grpo`` | ``dance`` | ``cps`` | ``ode`` (see :mod:`psr.sampling.sde`).
        noise_level: a (Flow-GRPO, CPS) or eta (DanceGRPO).
        sde_window: ``(start, end)``: SDE on steps start..end-1, ODE elsewhere; None = all steps.
        generator: drives the initial noise and the SDE noise (reproducible rollouts).
        same_noise: every member of the group starts from the same initial noise.
        latents: explicit initial noise ``[G, N, C]`` (overrides the generator for x_0).

    Returns:
        A :class:`Trajectory` with fp32 latents ``[G, K+1, N, C]`` and log-probs ``[G, K]``.
    """
    if method not in sde.METHODS:
        raise ValueError(f"sampler.method={method!r}; expected one of {sde.METHODS}")
    sigmas = schedule(policy, cond, num_steps).to(policy.device)
    mask = sde_steps(num_steps, sde_window, method)
    x = initial_noise(policy, cond, group_size, generator, same_noise) if latents is None else latents.float()
    xs = [x]
    log_probs = torch.zeros(group_size, num_steps, device=policy.device)
    for k in range(num_steps):
        v = policy.velocity(x, sigmas[k], cond)
        if mask[k]:
            step = sde.sde_step(
                x,
                v,
                sigmas[k],
                sigmas[k + 1],
                method=method,
                noise_level=noise_level,
                sigma_1=sigmas[1],
                generator=generator,
            )
            x, log_probs[:, k] = step.prev_sample, step.log_prob
        else:
            x = sde.ode_step(x.float(), v.float(), sigmas[k], sigmas[k + 1])
        xs.append(x)
    images = policy.decode(x, cond.height, cond.width) if decode else torch.zeros(group_size, 3, 0, 0)
    return Trajectory(
        latents=torch.stack(xs, dim=1),
        log_probs=log_probs,
        sigmas=sigmas.float(),
        sde_mask=mask.to(policy.device),
        images=images,
        group_ids=torch.full((group_size,), group_id, dtype=torch.long, device=policy.device),
        cond=cond,
        noise_level=noise_level,
        method=method,
    )


def step_log_prob(
    policy: Policy, traj: Trajectory, step: int, index: Tensor | slice | None = None
) -> sde.SDEStep:
    """Recompute ``log p(x_{k+1} | x_k)`` of stored samples under the current policy, with gradients.

    Args:
        step: k, one of the SDE steps of ``traj``.
        index: which samples (default all).

    Returns:
        :class:`psr.sampling.sde.SDEStep`; ``log_prob`` is ``[B]`` fp32, ``mean`` is what the KL uses.
    """
    if not bool(traj.sde_mask[step]):
        raise ValueError(f"step {step} was sampled with the ODE; it has no log-prob (sampler.sde_window)")
    index = slice(None) if index is None else index
    x = traj.latents[index, step]
    x_next = traj.latents[index, step + 1]
    sigma, sigma_next = traj.sigmas[step], traj.sigmas[step + 1]
    v = policy.velocity(x, sigma, traj.cond)
    return sde.sde_step(
        x,
        v,
        sigma,
        sigma_next,
        method=traj.method,
        noise_level=traj.noise_level,
        sigma_1=traj.sigmas[1],
        prev_sample=x_next,
    )
