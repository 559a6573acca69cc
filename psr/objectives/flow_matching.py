r"""Flow-matching math (written here once: SFT's loss and Diffusion-DPO's errors use it) and the
supervised flow-matching objective of the SFT stage (docs/method.md §1-3).

Rectified flow in diffusers' convention: a noise level ``t = sigma`` in [0, 1],

    x_t = (1 - t) x_0 + t eps,    eps ~ N(0, I),    target velocity u = eps - x_0

(:func:`noisy_latents`, :func:`target_velocity`), per-sample errors
``e_b = mean_{n,c} (v_bnc - u_bnc)^2`` (:func:`flow_matching_errors`), and the SFT loss is the (optionally weighted) mean squared error between the policy's velocity at
``(x_t, t)`` and ``u``, on the **target tokens only**: the reference tokens are clean context that
the policy appends from the conditioning at every call (:meth:`psr.models.policy.FlowPolicy.velocity`
returns the target tokens alone), so they are never noised and never scored.

Timestep sampling (:func:`sample_sigmas`):
  - ``logit_normal``: ``t = sigmoid(n)``, ``n ~ N(mean, std)`` (SD3, arXiv 2403.03206 §3.1);
  - ``uniform``: ``t ~ U(0, 1)``;
  then optionally a shift towards high noise: ``flux`` applies the model scheduler's
  resolution-dependent shift ``e^mu / (e^mu + 1/t - 1)`` with ``mu`` linear in the number of target
  tokens (the same rule the sampler uses, :func:`psr.sampling.sde.calculate_shift`); a number ``s``
  applies the static shift ``s t / (1 + (s - 1) t)``. "Shifted uniform with the FLUX shift" is
  ``kind="uniform", shift="flux"``.

Loss weightings (:func:`loss_weights`, SD3's schemes as diffusers' training scripts name them):
``none`` (1), ``sigma_sqrt`` (``t^-2``), ``cosmap`` (``2 / (pi (1 - 2t + 2t^2))``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from psr.sampling.sde import calculate_shift, time_shift
from psr.types import Conditioning

TIMESTEP_KINDS = ("logit_normal", "uniform")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
# Keep t away from 0 and 1: at t = 0 the input is the clean target (nothing to learn, and
# sigma_sqrt weighting divides by zero); at t = 1 the input carries no data.
_T_MIN, _T_MAX = 1e-5, 1.0 - 1e-5


def shift_sigmas(
    t: Tensor,
    shift: float | str | None,
    *,
    image_seq_len: int | None = None,
    scheduler_config: Mapping[str, Any] | None = None,
) -> Tensor:
    """Move noise levels towards 1 (more training at high noise), elementwise.

    Args:
        t: any shape, values in (0, 1), float32 or float64.
        shift: None (identity), ``"flux"`` (dynamic shift from ``image_seq_len`` and the scheduler
            config's ``base_image_seq_len``, ``max_image_seq_len``, ``base_shift``, ``max_shift``), or
            a number ``s > 0`` (static shift ``s t / (1 + (s - 1) t)``).
        image_seq_len: number of packed target tokens N (needed for ``"flux"``).
        scheduler_config: the model scheduler's config (``FlowPolicy.scheduler_config``).

    Returns:
        Shifted noise levels, same shape and dtype as ``t``.
    """
    if shift is None or shift == "none":
        return t
    if shift == "flux":
        if image_seq_len is None:
            raise ValueError("objective.shift=flux needs the number of target tokens (image_seq_len)")
        cfg = dict(scheduler_config or {})
        mu = calculate_shift(
            image_seq_len,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        return time_shift(mu, t, 1.0)
    try:
        s = float(shift)
    except (TypeError, ValueError):
        raise ValueError(f"objective.shift={shift!r}; expected null, 'flux' or a number > 0") from None
    if s <= 0:
        raise ValueError(f"objective.shift={shift!r} must be > 0")
    return s * t / (1.0 + (s - 1.0) * t)


def sample_sigmas(
    batch: int,
    *,
    kind: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float | str | None = None,
    image_seq_len: int | None = None,
    scheduler_config: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Draw one noise level per sample.

    Returns:
        ``[batch]`` float32 in ``[1e-5, 1 - 1e-5]``.
    """
    if kind == "logit_normal":
        if logit_std <= 0:
            raise ValueError(f"objective.logit_std={logit_std} must be > 0")
        n = torch.randn(batch, generator=generator, device=device, dtype=torch.float32)
        t = torch.sigmoid(logit_mean + logit_std * n)
    elif kind == "uniform":
        t = torch.rand(batch, generator=generator, device=device, dtype=torch.float32)
    else:
        raise ValueError(f"objective.timestep_sampling={kind!r}; expected one of {TIMESTEP_KINDS}")
    t = shift_sigmas(t, shift, image_seq_len=image_seq_len, scheduler_config=scheduler_config)
    return t.clamp(_T_MIN, _T_MAX)


def loss_weights(sigmas: Tensor, scheme: str = "none") -> Tensor:
    """Per-sample loss weights ``[B]`` for noise levels ``sigmas`` ``[B]`` (same dtype)."""
    if scheme == "none":
        return torch.ones_like(sigmas)
    if scheme == "sigma_sqrt":
        return sigmas**-2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigmas + 2.0 * sigmas**2))
    raise ValueError(f"objective.weighting={scheme!r}; expected one of {WEIGHTINGS}")


def noisy_latents(x0: Tensor, noise: Tensor, sigmas: Tensor) -> Tensor:
    """``x_t = (1 - t) x_0 + t eps`` for ``x0, noise`` ``[B, N, C]`` and ``sigmas`` ``[B]`` (in x0's dtype)."""
    t = sigmas.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1.0 - t) * x0 + t * noise


def target_velocity(x0: Tensor, noise: Tensor) -> Tensor:
    """The rectified-flow target ``u = eps - x_0`` (``[B, N, C]``), in float32 at least (float64
    for a float64 input): a bf16 difference would round away the small errors the loss compares."""
    dtype = torch.float64 if torch.float64 in (x0.dtype, noise.dtype) else torch.float32
    return noise.to(dtype) - x0.to(dtype)


def flow_matching_errors(v_pred: Tensor, target_v: Tensor, weights: Tensor | None = None) -> Tensor:
    """Per-sample mean squared velocity error, optionally weighted per token.

    ``e_b = mean_{n,c} w_bn (v_bnc - u_bnc)^2`` with ``w_b`` normalized to mean 1 over tokens, so
    uniform weights give the plain mean and any weighting keeps the error's scale.

    Args:
        v_pred: ``[B, N, C]`` predicted velocity (any float dtype; with grad).
        target_v: ``[B, N, C]`` target velocity ``eps - x_0`` (:func:`target_velocity`).
        weights: ``[B, N]`` >= 0 per-token weights with a positive sum per sample, or None. They
            are treated as data (detached): a focus says where to look, it is not learned.

    Returns:
        ``[B]`` in fp32 (fp64 when an input is fp64).
    """
    if v_pred.ndim != 3 or target_v.shape != v_pred.shape:
        raise ValueError(
            f"flow_matching_errors: v_pred {tuple(v_pred.shape)} and target_v {tuple(target_v.shape)} must both be [B, N, C]"
        )
    dtype = torch.float64 if torch.float64 in (v_pred.dtype, target_v.dtype) else torch.float32
    sq = (v_pred.to(dtype) - target_v.to(dtype)) ** 2  # [B, N, C]
    if weights is None:
        return sq.mean(dim=(1, 2))
    if weights.shape != v_pred.shape[:2]:
        raise ValueError(
            f"flow_matching_errors: weights {tuple(weights.shape)} must be [B, N] = {tuple(v_pred.shape[:2])}"
        )
    w = weights.detach().to(dtype)
    if (w < 0).any() or not torch.isfinite(w).all() or (w.sum(dim=1) <= 0).any():
        raise ValueError("flow_matching_errors: weights must be finite, >= 0, with a positive sum per sample")
    w = w / w.mean(dim=1, keepdim=True)
    return (sq.mean(dim=2) * w).mean(dim=1)


@dataclass
class FlowMatchingLoss:
    """Flow-matching loss on a batch of target latents under one (possibly stacked) conditioning.

    Config keys (``objective.*`` in ``conf/sft.yaml``) equal these fields.

    Attributes:
        timestep_sampling: ``logit_normal`` | ``uniform``.
        logit_mean, logit_std: the normal's parameters for ``logit_normal``.
        shift: None | ``"flux"`` | a number (see :func:`shift_sigmas`).
        weighting: ``none`` | ``sigma_sqrt`` | ``cosmap``.
    """

    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float | str | None = None
    weighting: str = "none"

    def __post_init__(self) -> None:
        if self.timestep_sampling not in TIMESTEP_KINDS:
            raise ValueError(
                f"objective.timestep_sampling={self.timestep_sampling!r}; expected one of {TIMESTEP_KINDS}"
            )
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"objective.weighting={self.weighting!r}; expected one of {WEIGHTINGS}")
        shift_sigmas(torch.full((1,), 0.5), self.shift, image_seq_len=1)  # validates the shift key early

    def sample(
        self, batch: int, image_seq_len: int, scheduler_config: Mapping[str, Any] | None, generator, device
    ) -> Tensor:
        """``[batch]`` float32 noise levels for targets of ``image_seq_len`` tokens."""
        return sample_sigmas(
            batch,
            kind=self.timestep_sampling,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            shift=self.shift,
            image_seq_len=image_seq_len,
            scheduler_config=scheduler_config,
            generator=generator,
            device=device,
        )

    def __call__(
        self,
        policy: Any,
        x0: Tensor,
        cond: Conditioning,
        *,
        generator: torch.Generator | None = None,
        sigmas: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of ``policy`` on clean target latents ``x0``.

        Args:
            policy: a :class:`~psr.models.policy.FlowPolicy` (anything with ``velocity(x, sigma, cond)``
                and ``scheduler_config``).
            x0: clean packed target latents ``[B, N, C]`` (``FlowPolicy.encode_images``).
            cond: conditioning of the B samples: leading dim 1 (shared) or B (stacked, see
                :func:`psr.models.policy.stack_conditionings`); ids shared.
            generator: draws ``sigmas`` and ``noise`` when they are not given (on ``x0``'s device).
            sigmas: ``[B]`` noise levels in (0, 1) to use instead of sampling.
            noise: ``[B, N, C]`` to use instead of sampling.

        Returns:
            ``(loss, per_sample)``: the scalar float32 batch mean (with gradients) and a dict with
            ``"mse"`` ``[B]`` (unweighted, detached) and ``"sigma"`` ``[B]``.
        """
        b, n = x0.shape[0], x0.shape[1]
        if sigmas is None:
            sigmas = self.sample(b, n, getattr(policy, "scheduler_config", None), generator, x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
        x0f = x0.float()
        x_t = noisy_latents(x0f, noise.float(), sigmas.float())  # [B, N, C] fp32; the policy casts
        pred = policy.velocity(x_t, sigmas, cond)  # [B, N, C] target tokens only
        mse = flow_matching_errors(pred, target_velocity(x0f, noise))
        per_sample = mse * loss_weights(sigmas.float(), self.weighting)
        return per_sample.mean(), {"mse": mse.detach(), "sigma": sigmas.detach()}
