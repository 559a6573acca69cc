r"""Flow-matching sampling math: sigma schedules, ODE and SDE transitions with exact log-probs.

Pure functions on tensors (no model code); used by :mod:`psr.sampling.rollout` and the GRPO
objective. Formulas: docs/method.md §3.

Conventions (diffusers' rectified flow)
---------------------------------------
The noise level is ``t = sigma`` in [0, 1], ``x_t = (1 - t) x_0 + t eps`` with ``eps ~ N(0, I)``,
and the network predicts the velocity ``v(x, t) ≈ E[eps - x_0 | x_t = x]``. A schedule
``1 = s_0 > s_1 > ... > s_K = 0`` is walked from noise to data, so ``dt = s_{k+1} - s_k < 0``.

Score from velocity
-------------------
Write ``x0_hat = E[x_0 | x]`` and ``eps_hat = E[eps | x]``. Then ``x = (1 - t) x0_hat + t eps_hat``
and ``v = eps_hat - x0_hat``, hence ``x0_hat = x - t v`` and ``eps_hat = x + (1 - t) v``. Tweedie's
formula for the Gaussian corruption ``x_t | x_0 ~ N((1 - t) x_0, t^2 I)`` gives
``score(x, t) = grad log p_t(x) = -eps_hat / t = -(x + (1 - t) v) / t``.

Marginal-preserving SDE
-----------------------
``dx = v dt`` (the probability-flow ODE) transports p_1 = N(0, I) to the data along the marginals
p_t. For any diffusion coefficient ``sigma_t``, adding ``(sigma_t^2 / 2) grad log p_t`` to the drift and
``sigma_t dW`` keeps every marginal (the two extra Fokker-Planck terms cancel). Run backwards in t
(``dt < 0``, Brownian increments of variance ``|dt|``) the correction enters with a minus sign:

    dx = [v - (sigma_t^2 / 2) score] dt + sigma_t dW
       = [v + sigma_t^2 / (2 t) (x + (1 - t) v)] dt + sigma_t dW.

One Euler-Maruyama step from ``x_k`` (at ``t = s_k``) is the Gaussian transition

    mean = x (1 + sigma_t^2 dt / (2 t)) + v (1 + sigma_t^2 (1 - t) / (2 t)) dt,   std = sigma_t sqrt(-dt).

``sigma_t`` per method (:func:`noise_std`): Flow-GRPO ``a sqrt(t / (1 - t))`` (``1 - s_1`` replaces
``1 - t`` at ``t = 1``), DanceGRPO a constant ``eta``, ODE 0. CPS (coefficient-preserving sampling)
is defined directly as a transition, not through ``sigma_t``; see :func:`sde_step`. CPS keeps the
coefficients of ``x_0`` and ``eps`` exact only when ``x0_hat`` is exact; with a posterior-mean
``x0_hat`` it shrinks variance (measured on a 2-D Gaussian mixture with the exact velocity, a = 0.7,
28 uniform steps: variances 14-26% low, against 6-8% for the Euler ODE and 1-2% for Flow-GRPO).

Numerics: every transition is computed in float32 (float64 if the inputs are float64), whatever the
dtype of ``x`` and ``v``: bf16 overflows and loses the small ``std`` terms. Results come back in that
compute dtype; callers cast.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

METHODS = ("flow_grpo", "dance", "cps", "ode")
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class SDEStep(NamedTuple):
    """One transition ``x_k -> x_{k+1}``.

    Attributes:
        prev_sample: ``x_{k+1}``, shape of ``x``, compute dtype (fp32, or fp64 for fp64 inputs).
        log_prob: ``[B]`` compute dtype; Gaussian log-density of ``prev_sample`` under
            ``N(mean, std^2)`` per element, mean-reduced over all non-batch dims. 0 where std == 0.
        mean: transition mean, shape of ``x``; differentiable w.r.t. ``v`` (what the KL uses).
        std: transition std, 0-dim or ``[B, 1, ..., 1]`` (broadcastable to ``x``), >= 0.
    """

    prev_sample: Tensor
    log_prob: Tensor
    mean: Tensor
    std: Tensor


# ----------------------------------------------------------------------------------------------
# Schedules (FlowMatchEulerDiscreteScheduler, as FluxPipeline / FluxKontextPipeline call it)
# ----------------------------------------------------------------------------------------------


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """``mu`` of the dynamic shift: linear in the number of target tokens (diffusers' rule)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def time_shift(mu: float, sigmas: Tensor, exponent: float = 1.0) -> Tensor:
    """Exponential time shift ``e^mu / (e^mu + (1 / s - 1)^exponent)``, elementwise.

    Mirrors the float32 operation order of diffusers' ``_time_shift_exponential`` (its ``sigma``
    argument is ``exponent`` here) so that schedules agree bit for bit.

    Args:
        mu: shift; larger moves more steps to high noise.
        sigmas: any shape, values in [0, 1]; computed in this dtype.
        exponent: exponent of ``(1 / s - 1)``; 1.0 for FLUX.

    Returns:
        Shifted sigmas, same shape and dtype; 1 stays 1 and 0 stays 0.
    """
    e_mu = torch.tensor(math.exp(mu), dtype=sigmas.dtype, device=sigmas.device)
    # torch.div rather than `scalar / tensor`, which torch evaluates as reciprocal * scalar
    # (a different rounding from numpy's true division).
    return torch.div(e_mu, e_mu + (torch.div(1.0, sigmas) - 1.0) ** exponent)


def flow_sigmas(
    num_steps: int,
    image_seq_len: int | None = None,
    *,
    shift: float | None = None,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> Tensor:
    """The ``[K+1]`` float32 sigma schedule ``1 = s_0 > ... > s_K = 0`` of FLUX pipelines.

    Equal to ``FlowMatchEulerDiscreteScheduler.sigmas`` after the call FluxPipeline and
    FluxKontextPipeline make: ``set_timesteps(sigmas=linspace(1, 1/K, K), mu=calculate_shift(N))``.
    Pass exactly one of ``image_seq_len`` (dynamic shift, ``use_dynamic_shifting=True`` as in FLUX's
    scheduler config) or ``shift`` (static shift ``shift s / (1 + (shift - 1) s)``, a scheduler with
    ``use_dynamic_shifting=False`` given the same linspace; SD3's own pipeline instead lets the
    scheduler make its grid from the shifted training sigmas, which differs slightly).

    Args:
        num_steps: K >= 1 denoising steps.
        image_seq_len: number of packed target tokens N (references excluded, as in the pipeline).
        shift: static shift factor > 0.
        base_seq_len, max_seq_len, base_shift, max_shift: the scheduler config's
            ``base_image_seq_len``, ``max_image_seq_len``, ``base_shift``, ``max_shift``.

    Returns:
        ``[K+1]`` float32 on the CPU, strictly decreasing from 1 to 0.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"sampler num_steps={num_steps!r} must be an int >= 1")
    if (image_seq_len is None) == (shift is None):
        raise ValueError(
            "flow_sigmas: pass exactly one of image_seq_len (dynamic shift, scheduler "
            "use_dynamic_shifting=True) or shift (static shift); "
            f"got image_seq_len={image_seq_len!r}, shift={shift!r}"
        )
    # numpy's linspace, cast to float32, exactly as the pipeline builds it.
    base = torch.from_numpy(np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32))
    if image_seq_len is not None:
        if image_seq_len < 1:
            raise ValueError(f"flow_sigmas: image_seq_len={image_seq_len} must be >= 1")
        mu = calculate_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
        sigmas = time_shift(mu, base, 1.0)
    else:
        assert shift is not None
        if shift <= 0:
            raise ValueError(f"flow_sigmas: scheduler shift={shift} must be > 0")
        sigmas = shift * base / (1.0 + (shift - 1.0) * base)
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float32)])


# ----------------------------------------------------------------------------------------------
# Transitions
# ----------------------------------------------------------------------------------------------


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _per_sample(value: Tensor | float, x: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    """A scalar or ``[B]`` value as a 0-dim or ``[B, 1, ..., 1]`` tensor that broadcasts against x."""
    value = torch.as_tensor(value, device=x.device).to(dtype)
    if value.ndim == 0:
        return value
    if value.ndim == 1 and value.shape[0] in (1, x.shape[0]):
        return value.reshape(-1, *([1] * (x.ndim - 1)))
    raise ValueError(f"sde: {name} must be a scalar or of shape [B={x.shape[0]}]; got {tuple(value.shape)}")


def noise_std(
    method: str,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    noise_level: float,
    sigma_max_step: Tensor | float | None,
) -> Tensor:
    """The diffusion coefficient ``sigma_t`` of a method (docs/method.md §3).

    ``flow_grpo``: ``a sqrt(t / (1 - t))``, with ``1 - sigma_max_step`` (= ``1 - s_1``) replacing
    ``1 - t`` where ``t == 1``; ``dance``: the constant ``eta = noise_level``; ``ode``: 0.
    ``cps`` is a transition rather than an SDE: for it this returns the transition std itself,
    ``s_{k+1} sin(a pi / 2)``.

    Args:
        method: one of :data:`METHODS`.
        sigma: t = s_k, scalar or broadcastable tensor, in (0, 1].
        sigma_next: s_{k+1} < s_k (used by ``cps`` and, when ``sigma_max_step`` is None, by
            ``flow_grpo``).
        noise_level: a (flow_grpo, cps) or eta (dance), >= 0.
        sigma_max_step: s_1, the first step's target sigma. None: use ``sigma_next``, which equals
            s_1 on the only step where ``t == 1`` (the first one).

    Returns:
        Tensor broadcast from ``sigma`` and ``sigma_next``, in their (float) dtype.
    """
    _check_method(method, noise_level)
    t = torch.as_tensor(sigma)
    t, t_next = torch.broadcast_tensors(t, torch.as_tensor(sigma_next, device=t.device).to(t.dtype))
    if method == "flow_grpo":
        s1 = t_next if sigma_max_step is None else torch.as_tensor(sigma_max_step, device=t.device)
        one_minus_t = 1 - torch.where(t == 1, s1.to(t.dtype), t)
        return torch.sqrt(t / one_minus_t) * noise_level
    if method == "dance":
        return torch.full_like(t, noise_level)
    if method == "cps":
        return t_next * math.sin(noise_level * math.pi / 2)
    return torch.zeros_like(t)


def _check_method(method: str, noise_level: float) -> None:
    if method not in METHODS:
        raise ValueError(f"sampler.method={method!r}; expected one of {METHODS}")
    if not noise_level >= 0:
        raise ValueError(f"sampler.noise_level={noise_level} must be >= 0")
    if method == "cps" and noise_level > 1:
        raise ValueError(
            f"sampler.noise_level={noise_level} must be in [0, 1] for method='cps' (s = s_next sin(a pi/2))"
        )


def ode_step(x: Tensor, v: Tensor, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
    """Euler step ``x + (s_{k+1} - s_k) v`` of the probability-flow ODE.

    Args:
        x: ``[B, ...]`` current latent at ``t = sigma``.
        v: velocity, shape of ``x``.
        sigma, sigma_next: scalars or ``[B]``.

    Returns:
        ``x_{k+1}`` in the compute dtype (fp32; fp64 for fp64 inputs). Same operation order as
        diffusers' ``FlowMatchEulerDiscreteScheduler.step`` (``sample + dt * model_output``).
    """
    dtype = _compute_dtype(x, v)
    dt = _per_sample(sigma_next, x, dtype, "sigma_next") - _per_sample(sigma, x, dtype, "sigma")
    return x.to(dtype) + dt * v.to(dtype)


def _sde_mean(
    x: Tensor, v: Tensor, sigma: Tensor, dt: Tensor, g: Tensor, correction_scale: float = 1.0
) -> Tensor:
    """Euler-Maruyama mean of the marginal-preserving SDE (module docstring).

    ``correction_scale`` multiplies the score correction: 1 is the marginal-preserving SDE, -1 the
    forward-time one. Other values exist so tests can show that sampling a known distribution
    rejects a wrong drift.
    """
    g2 = g**2
    return (
        x * (1 + correction_scale * g2 * dt / (2 * sigma))
        + v * (1 + correction_scale * g2 * (1 - sigma) / (2 * sigma)) * dt
    )


def sde_step(
    x: Tensor,
    v: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    *,
    method: str = "flow_grpo",
    noise_level: float = 0.7,
    sigma_1: Tensor | float | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    prev_sample: Tensor | None = None,
) -> SDEStep:
    """One stochastic transition ``x_k -> x_{k+1}`` and its log-probability.

    ``flow_grpo`` / ``dance`` / ``ode``: Euler-Maruyama step of the marginal-preserving SDE (module
    docstring). ``cps``: ``x0_hat = x - t v``, ``eps_hat = x + (1 - t) v``, ``s = s_{k+1} sin(a pi/2)``,
    ``mean = (1 - s_{k+1}) x0_hat + sqrt(s_{k+1}^2 - s^2) eps_hat``, ``std = s``. With a zero noise
    level every method is the Euler ODE step (exactly for flow_grpo/dance/ode, up to rounding for cps).

    Sampling (``prev_sample`` None): ``prev_sample = mean + std * noise``, the noise drawn from
    ``generator`` unless given. Recompute (``prev_sample`` given, e.g. a stored rollout latent): only
    its log-prob under the current ``v`` is computed, with gradients through ``mean``; ``prev_sample``
    is treated as data (detached).

    Where std == 0 (the ODE, a zero noise level, the last CPS step) the transition is deterministic:
    a sampled ``prev_sample`` equals ``mean`` and ``log_prob`` is 0 (no density, no gradient).

    Args:
        x: ``[B, ...]`` latent at ``t = sigma`` (e.g. ``[B, N, C]`` packed tokens), any float dtype.
        v: predicted velocity, shape of ``x``, any float dtype.
        sigma: s_k in (0, 1], scalar or ``[B]``.
        sigma_next: s_{k+1} in [0, s_k), scalar or ``[B]``.
        method: one of :data:`METHODS`.
        noise_level: a (flow_grpo, cps; 0.7 typical) or eta (dance; 0.3 typical).
        sigma_1: s_1 of the schedule, for flow_grpo's ``t == 1`` case; None uses ``sigma_next``
            (correct on the first step, the only one with ``t == 1``).
        noise: standard-normal noise of ``x``'s shape (reproducibility); excludes ``prev_sample``.
        generator: for drawing the noise when neither ``noise`` nor ``prev_sample`` is given.
        prev_sample: ``x_{k+1}`` whose log-prob to compute instead of sampling.

    Returns:
        :class:`SDEStep` in the compute dtype: float32 (float64 if ``x`` or ``v`` is float64).
        ``prev_sample`` is NOT cast back to ``x.dtype``; the caller casts if it stores latents lower.
    """
    _check_method(method, noise_level)
    if x.ndim < 2:
        raise ValueError(
            f"sde_step: x must be [B, ...] with at least one non-batch dim; got {tuple(x.shape)}"
        )
    if v.shape != x.shape:
        raise ValueError(f"sde_step: v {tuple(v.shape)} must have the shape of x {tuple(x.shape)}")
    if noise is not None and prev_sample is not None:
        raise ValueError("sde_step: pass noise (to sample) or prev_sample (to score it), not both")
    for name, t in (("noise", noise), ("prev_sample", prev_sample)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"sde_step: {name} {tuple(t.shape)} must have the shape of x {tuple(x.shape)}")

    dtype = _compute_dtype(x, v)
    x, v = x.to(dtype), v.to(dtype)
    t = _per_sample(sigma, x, dtype, "sigma")
    t_next = _per_sample(sigma_next, x, dtype, "sigma_next")
    dt = t_next - t

    if method == "cps":
        std = noise_std("cps", t, t_next, noise_level, None)
        x0_hat = x - t * v
        eps_hat = x + (1 - t) * v
        # clamp: rounding may make s_next^2 - s^2 a hair negative at a = 1
        mean = (1 - t_next) * x0_hat + torch.sqrt((t_next**2 - std**2).clamp_min(0)) * eps_hat
    elif method == "ode":
        std = torch.zeros_like(t)
        mean = x + dt * v
    else:
        s1 = None if sigma_1 is None else _per_sample(sigma_1, x, dtype, "sigma_1")
        g = noise_std(method, t, t_next, noise_level, s1)
        mean = _sde_mean(x, v, t, dt, g)
        std = g * torch.sqrt(-dt)

    if prev_sample is None:
        if noise is None:
            gen_device = generator.device if generator is not None else x.device
            noise = torch.randn(x.shape, generator=generator, device=gen_device, dtype=dtype).to(x.device)
        prev_sample = mean + std * noise.to(dtype)
    prev_sample = prev_sample.detach().to(dtype)
    return SDEStep(prev_sample, gaussian_log_prob(prev_sample, mean, std), mean, std)


def _mean_non_batch(t: Tensor) -> Tensor:
    return t.mean(dim=tuple(range(1, t.ndim)))


def gaussian_log_prob(sample: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``log N(sample; mean, std^2)`` per element, mean-reduced over non-batch dims -> ``[B]``.

    The mean (not sum) over latent dims keeps ratios near 1 at any resolution (docs/method.md §3).
    Elements with std == 0 contribute 0; a safe std keeps their gradients finite.
    """
    positive = std > 0
    safe = torch.where(positive, std, torch.ones_like(std))
    lp = -((sample - mean) ** 2) / (2 * safe**2) - torch.log(safe) - _HALF_LOG_2PI
    return _mean_non_batch(torch.where(positive, lp, torch.zeros_like(lp)))


def kl_gaussian_means(mean: Tensor, mean_ref: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean, std^2) || N(mean_ref, std^2)) per element, mean-reduced over non-batch dims -> ``[B]``.

    With ``std = SDEStep.std`` (the transition std) this is the exact per-dimension KL between the
    policy's and the reference's transitions. Flow-GRPO's code divides by the diffusion coefficient
    ``sigma_t^2`` instead (its ``std_dev_t``), i.e. its KL is this one times ``|dt|``; pass
    ``noise_std(...)`` to reproduce it. Elements with std == 0 contribute 0 (deterministic steps
    carry no log-prob either).

    Args:
        mean, mean_ref: ``[B, ...]``, same shape.
        std: broadcastable to ``mean`` (0-dim or ``[B, 1, ..., 1]``), >= 0.
    """
    if mean.shape != mean_ref.shape:
        raise ValueError(f"kl_gaussian_means: mean {tuple(mean.shape)} != mean_ref {tuple(mean_ref.shape)}")
    positive = std > 0
    safe = torch.where(positive, std, torch.ones_like(std))
    kl = (mean - mean_ref) ** 2 / (2 * safe**2)
    return _mean_non_batch(torch.where(positive, kl, torch.zeros_like(kl)))
