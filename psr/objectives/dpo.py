r"""Online Diffusion-DPO for flow models, with FocusDPO-style patch weighting (docs/method.md §4):
the math as pure functions, and :class:`DPOObjective`, the update that makes pairs from a step's
rewards and trains on them.

Pairs come from the rollouts of one prompt group (:func:`make_pairs`). For a pair (w, l) noised
with a shared t and noise (:func:`psr.objectives.flow_matching.noisy_latents`), u the target
velocity ``eps - x_0`` and e the per-sample errors of
:func:`psr.objectives.flow_matching.flow_matching_errors`:

    e_w = |v_theta(x^w_t) - u^w|^2,   e_ref_w = |v_ref(x^w_t) - u^w|^2   (mean over tokens/channels)
    L = -log sigmoid(-(beta/2) [(e_w - e_ref_w) - (e_l - e_ref_l)])

(Diffusion-DPO, arXiv 2311.12908, eq. 14, with the velocity error of rectified flow in place of
the noise error). Lowering the winner's error relative to the reference, or raising the loser's,
lowers the loss; with equal errors L = log 2.

Focus weighting (option, after FocusDPO, arXiv 2509.01181): the per-token squared errors are
reweighted towards the target patches that correspond to a subject of the references
(:func:`patch_reference_similarity`), more so at low noise (:func:`focus_weights`), the weights
normalized to mean 1 per sample so the loss keeps its scale.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from psr.objectives.accumulate import LossPiece, accumulate, check_batch_settings, chunks
from psr.objectives.flow_matching import flow_matching_errors, noisy_latents, target_velocity
from psr.objectives.protocol import StepRewards, UpdateResult
from psr.seeding import derive_seed
from psr.types import Trajectory

if TYPE_CHECKING:
    from psr.engine import Engine
    from psr.models.policy import Policy

__all__ = [
    "DPOObjective",
    "FOCUS_SCHEDULES",
    "PAIR_MODES",
    "diffusion_dpo_loss",
    "focus_weights",
    "make_pairs",
    "patch_reference_similarity",
]

PAIR_MODES = ("best_worst", "all_pairs")
FOCUS_SCHEDULES = ("linear", "constant")


def make_pairs(rewards: Tensor, group_ids: Tensor, *, mode: str, margin: float = 0.0) -> Tensor:
    """Preference pairs inside each prompt group.

    A pair (i, j) is kept only if ``r_i - r_j > margin`` (strictly; ties never form a pair).

    Args:
        rewards: ``[B]`` finite rewards.
        group_ids: ``[B]`` integer prompt-group ids; pairs never cross groups.
        mode: ``best_worst`` (one pair per group: the highest vs the lowest reward, the lowest index
            on ties) or ``all_pairs`` (every ordered pair in the group above the margin)
            (``algo.pairs``).
        margin: >= 0, minimal reward gap (``algo.margin``).

    Returns:
        ``[P, 2]`` long (winner index, loser index) into the batch, groups in increasing id order,
        within a group in increasing (winner, loser) order; ``[0, 2]`` when no pair qualifies.
    """
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"make_pairs: rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must both be [B]"
        )
    if group_ids.is_floating_point():
        raise ValueError(f"make_pairs: group_ids must be an integer tensor; got {group_ids.dtype}")
    if not torch.isfinite(rewards).all():
        raise ValueError("make_pairs: rewards must be finite; resolve NaN ('does not apply') before pairing")
    if not (margin >= 0 and math.isfinite(margin)):
        raise ValueError(f"make_pairs: margin={margin} must be finite and >= 0 (algo.margin)")
    if mode not in PAIR_MODES:
        raise ValueError(f"make_pairs: mode={mode!r}; expected one of {PAIR_MODES} (algo.pairs)")

    r = rewards.detach().to(torch.float64)
    pairs: list[Tensor] = []
    for g in torch.unique(group_ids):  # sorted
        idx = torch.nonzero(group_ids == g).flatten()  # [G] increasing
        rg = r[idx]
        if mode == "best_worst":
            # argmax/argmin of the first occurrence: deterministic on ties
            best = int(torch.nonzero(rg == rg.max())[0])
            worst = int(torch.nonzero(rg == rg.min())[0])
            if rg[best] - rg[worst] > margin:
                pairs.append(torch.stack([idx[best], idx[worst]])[None])
        else:
            gap = rg[:, None] - rg[None, :]  # [G, G], gap[a, b] = r_a - r_b
            wi, li = torch.nonzero(gap > margin, as_tuple=True)  # row-major: increasing (winner, loser)
            pairs.append(torch.stack([idx[wi], idx[li]], dim=1))
    if not pairs:
        return torch.zeros(0, 2, dtype=torch.long, device=rewards.device)
    return torch.cat(pairs).to(device=rewards.device, dtype=torch.long)


def diffusion_dpo_loss(
    err_w: Tensor, err_ref_w: Tensor, err_l: Tensor, err_ref_l: Tensor, beta: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Diffusion-DPO loss from per-sample flow-matching errors (module docstring).

    Args:
        err_w, err_l: ``[P]`` policy errors of winners / losers (with grad).
        err_ref_w, err_ref_l: ``[P]`` reference-policy errors on the same inputs (detached).
        beta: > 0 (``algo.beta``; ~2000-5000 with mean-reduced errors).

    Returns:
        ``(loss, metrics)``: the 0-dim mean over pairs in fp32 (fp64 for fp64 inputs), computed
        with ``F.logsigmoid`` (no overflow for large beta); detached metrics ``train/loss``,
        ``train/dpo/implicit_acc`` (fraction of pairs with a positive implicit reward margin,
        i.e. ranked as the rewards rank them), ``train/dpo/margin`` (mean of
        ``-(beta/2)[(e_w - e_ref_w) - (e_l - e_ref_l)]``), ``train/dpo/err_diff_w`` and
        ``train/dpo/err_diff_l`` (mean of ``e - e_ref`` for winners / losers).
    """
    if err_w.ndim != 1 or err_w.numel() == 0:
        raise ValueError(f"diffusion_dpo_loss: err_w must be a non-empty [P]; got shape {tuple(err_w.shape)}")
    for name, t in (("err_ref_w", err_ref_w), ("err_l", err_l), ("err_ref_l", err_ref_l)):
        if t.shape != err_w.shape:
            raise ValueError(
                f"diffusion_dpo_loss: {name} {tuple(t.shape)} must have err_w's shape {tuple(err_w.shape)}"
            )
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"diffusion_dpo_loss: beta={beta} must be finite and > 0 (algo.beta)")
    dtype = (
        torch.float64
        if torch.float64 in (err_w.dtype, err_l.dtype, err_ref_w.dtype, err_ref_l.dtype)
        else torch.float32
    )
    diff_w = err_w.to(dtype) - err_ref_w.detach().to(dtype)
    diff_l = err_l.to(dtype) - err_ref_l.detach().to(dtype)
    inside = -0.5 * beta * (diff_w - diff_l)  # [P] implicit reward margin
    loss = -F.logsigmoid(inside).mean()
    metrics = {
        "train/loss": loss.detach(),
        "train/dpo/implicit_acc": (inside.detach() > 0).to(dtype).mean(),
        "train/dpo/margin": inside.detach().mean(),
        "train/dpo/err_diff_w": diff_w.detach().mean(),
        "train/dpo/err_diff_l": diff_l.detach().mean(),
    }
    return loss, metrics


def focus_weights(
    ref_similarity: Tensor, sigma: Tensor, *, strength: float, schedule: str = "linear"
) -> Tensor:
    """Per-patch weights, larger on patches that look like a subject, mean 1 per sample.

    Rule: ``s_bn = (sim_bn - min_n sim_b) / (max_n sim_b - min_n sim_b)`` in [0, 1] (0 where a
    sample's similarities are all equal), focus ``lam_b = strength * (1 - sigma_b)`` (``linear``)
    or ``strength`` (``constant``), ``w_bn = (1 + lam_b s_bn) / mean_n (1 + lam_b s_bn)``.

    Why stronger at low noise: at high noise the prediction is about global layout, to which every
    patch contributes; subject identity (texture, markings, faces) is resolved at low noise, which
    is where FocusDPO's timestep-adaptive focus concentrates the preference signal. At ``sigma = 1``
    the linear schedule gives uniform weights; the max/min weight ratio within a sample is at most
    ``1 + lam_b``. Weights are monotone in the similarity (a higher similarity never gets a
    lower weight).

    Args:
        ref_similarity: ``[B, N]`` similarity of each target patch to the references
            (:func:`patch_reference_similarity`), any finite values.
        sigma: ``[B]`` noise levels in [0, 1] of the noised inputs.
        strength: >= 0 (``algo.focus_strength``); 0 gives uniform weights.
        schedule: ``linear`` | ``constant`` (``algo.focus_schedule``).

    Returns:
        ``[B, N]`` weights > 0 in fp32 (fp64 for fp64 input), detached, mean 1 over N.
    """
    if ref_similarity.ndim != 2:
        raise ValueError(f"focus_weights: ref_similarity must be [B, N]; got {tuple(ref_similarity.shape)}")
    if sigma.shape != ref_similarity.shape[:1]:
        raise ValueError(
            f"focus_weights: sigma {tuple(sigma.shape)} must be [B] = ({ref_similarity.shape[0]},)"
        )
    if not (strength >= 0 and math.isfinite(strength)):
        raise ValueError(f"focus_weights: strength={strength} must be finite and >= 0 (algo.focus_strength)")
    if schedule not in FOCUS_SCHEDULES:
        raise ValueError(
            f"focus_weights: schedule={schedule!r}; expected one of {FOCUS_SCHEDULES} (algo.focus_schedule)"
        )
    dtype = torch.float64 if ref_similarity.dtype == torch.float64 else torch.float32
    sim = ref_similarity.detach().to(dtype)
    if not torch.isfinite(sim).all():
        raise ValueError("focus_weights: ref_similarity has non-finite values")
    t = sigma.detach().to(device=sim.device, dtype=dtype)
    if ((t < 0) | (t > 1)).any():
        raise ValueError("focus_weights: sigma must lie in [0, 1]")
    lo = sim.min(dim=1, keepdim=True).values
    span = sim.max(dim=1, keepdim=True).values - lo
    s = torch.where(
        span > 0, (sim - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(sim)
    )
    lam = strength * (1 - t) if schedule == "linear" else torch.full_like(t, strength)
    w = 1 + lam[:, None] * s
    return w / w.mean(dim=1, keepdim=True)


def patch_reference_similarity(target_tokens: Tensor, ref_tokens: Tensor) -> Tensor:
    """Max cosine similarity of each target token to any reference token.

    A cheap correspondence proxy on packed VAE latents (2x2-patch tokens): a target patch that
    reproduces a patch of a reference subject has a latent pointing the same way. It is not a
    semantic feature match (DINO / attention correspondences would be); it needs no extra model
    and costs one ``[N, R]`` matmul per sample.

    Args:
        target_tokens: ``[B, N, C]`` clean target latents (packed).
        ref_tokens: ``[B, R, C]`` or ``[1, R, C]`` (shared by the batch) packed reference latents,
            all references concatenated along R.

    Returns:
        ``[B, N]`` in [-1, 1], fp32 (fp64 for fp64 input), detached.
    """
    if target_tokens.ndim != 3 or ref_tokens.ndim != 3:
        raise ValueError(
            f"patch_reference_similarity: target_tokens {tuple(target_tokens.shape)} must be [B, N, C] "
            f"and ref_tokens {tuple(ref_tokens.shape)} [B or 1, R, C]"
        )
    b, _, c = target_tokens.shape
    if ref_tokens.shape[2] != c or ref_tokens.shape[0] not in (1, b) or ref_tokens.shape[1] == 0:
        raise ValueError(
            f"patch_reference_similarity: ref_tokens {tuple(ref_tokens.shape)} must be [{b} or 1, R >= 1, {c}]"
        )
    dtype = torch.float64 if torch.float64 in (target_tokens.dtype, ref_tokens.dtype) else torch.float32
    with torch.no_grad():
        tgt = F.normalize(target_tokens.to(dtype), dim=-1)  # zero tokens stay 0 -> similarity 0
        ref = F.normalize(ref_tokens.to(dtype), dim=-1).expand(b, -1, -1)
        return torch.bmm(tgt, ref.transpose(1, 2)).amax(dim=2)  # [B, N, R] -> [B, N]


# one DPO piece of work: (trajectory, pairs [P, 2] of sample indices, chunk index)
_Piece = tuple[Trajectory, Tensor, int]


@dataclass
class DPOObjective:
    """Online Diffusion-DPO on in-group pairs (best vs worst, or all pairs above a margin)
    (docs/method.md §4). Keys of ``conf/algo/dpo.yaml`` are these fields.

    Attributes:
        micro_batch_size: samples per forward, i.e. ``micro_batch_size // 2`` pairs
            (``train.micro_batch_size``).
        inner_epochs: passes over the step's pairs, one optimizer step each (``train.inner_epochs``).
        beta: Diffusion-DPO beta (velocity errors are mean-reduced per sample).
        pairs: ``best_worst`` | ``all_pairs``.
        margin: pairs whose reward gap is not above this are skipped.
        timesteps_per_pair: shared (t, noise) draws per pair per update.
        focus: FocusDPO-style per-patch weighting towards subject patches.
        focus_strength: the focus's strength (:func:`focus_weights`).
        focus_schedule: ``linear`` | ``constant``.
        normalize_per_reward: rank by the weighted sum of each reward component z-scored within its
            group, instead of the reward's own combined score.
    """

    micro_batch_size: int
    inner_epochs: int = 1
    beta: float = 2000.0
    pairs: str = "best_worst"
    margin: float = 0.0
    timesteps_per_pair: int = 2
    focus: bool = False
    focus_strength: float = 1.0
    focus_schedule: str = "linear"
    normalize_per_reward: bool = False

    def __post_init__(self) -> None:
        if self.pairs not in PAIR_MODES:
            raise ValueError(f"algo.pairs={self.pairs!r}; expected one of {PAIR_MODES}")
        if self.focus_schedule not in FOCUS_SCHEDULES:
            raise ValueError(
                f"algo.focus_schedule={self.focus_schedule!r}; expected one of {FOCUS_SCHEDULES}"
            )
        if self.timesteps_per_pair < 1:
            raise ValueError(f"algo.timesteps_per_pair={self.timesteps_per_pair} must be >= 1")
        check_batch_settings(self.micro_batch_size, self.inner_epochs)
        ranges = (
            ("beta", self.beta > 0, "> 0"),
            ("margin", self.margin >= 0, ">= 0"),
            ("focus_strength", self.focus_strength >= 0, ">= 0"),
        )
        for key, ok, rule in ranges:
            if not (ok and math.isfinite(getattr(self, key))):
                raise ValueError(f"algo.{key}={getattr(self, key)} must be finite and {rule}")

    @property
    def needs_reference(self) -> bool:
        """Whether the update runs the reference policy (always: the DPO loss compares with it)."""
        return True

    @property
    def needs_sde_steps(self) -> bool:
        """Never: pairs are scored on the final images, re-noised at fresh times (ODE rollouts serve)."""
        return False

    def update(
        self,
        policy: Policy,
        engine: Engine,
        trajs: Sequence[Trajectory],
        rewards: StepRewards,
        seed: int,
    ) -> UpdateResult:
        """One DPO update (:class:`~psr.objectives.protocol.Objective`); (t, noise) per piece from
        ``(seed, group id, piece, epoch)``, so the draws do not depend on how groups are spread over
        ranks. Samples to which no reward applies (NaN) are never paired."""
        combined = rewards.combined(normalize_per_reward=self.normalize_per_reward)
        work: list[_Piece] = []
        for traj, r in zip(trajs, rewards.split_local(combined, trajs), strict=True):
            ok = torch.nonzero(~torch.isnan(r)).flatten()
            pairs = make_pairs(r[ok], torch.zeros_like(ok), mode=self.pairs, margin=self.margin)
            pairs = ok[pairs] if len(pairs) else pairs
            work.extend((traj, p, j) for j, p in enumerate(chunks(pairs, max(1, self.micro_batch_size // 2))))

        def filler() -> _Piece:
            return trajs[0], torch.tensor([[0, 1]], device=trajs[0].latents.device), 0

        def losses(piece: _Piece, epoch: int) -> Iterator[LossPiece]:
            traj, pairs, j = piece
            gen = torch.Generator().manual_seed(
                derive_seed(seed, "objective", int(traj.group_ids[0]), j, epoch)
            )
            where = f"DPO pairs of group {int(traj.group_ids[0])} ('{traj.cond.prompt[:40]}')"
            for _ in range(self.timesteps_per_pair):
                loss, m = self._pair_loss(policy, engine, traj, pairs, gen)
                yield LossPiece(loss, m, len(pairs), True, where)

        return accumulate(
            engine,
            work,
            filler,
            lambda piece: len(piece[1]) * self.timesteps_per_pair,
            losses,
            self.inner_epochs,
        )

    def _pair_loss(
        self, policy: Policy, engine: Engine, traj: Trajectory, pairs: Tensor, gen: torch.Generator
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Shared (t, noise) for winner and loser, as Diffusion-DPO prescribes."""
        x0 = traj.latents[:, -1]  # [G, N, C] clean latents
        win, lose = pairs[:, 0], pairs[:, 1]
        p = len(pairs)
        t = torch.rand(p, generator=gen).to(x0.device)
        noise = torch.randn(p, *x0.shape[1:], generator=gen).to(x0.device)
        x = torch.cat([x0[win], x0[lose]]).float()  # [2P, N, C]
        eps = torch.cat([noise, noise])
        tt = torch.cat([t, t])
        x_t = noisy_latents(x, eps, tt)
        target = target_velocity(x, eps)
        weights = None
        if self.focus:
            sim = patch_reference_similarity(x, traj.cond.ref_tokens.float())
            weights = focus_weights(sim, tt, strength=self.focus_strength, schedule=self.focus_schedule)
        with engine.autocast():
            v = policy.velocity(x_t, tt, traj.cond).float()
        with torch.no_grad(), policy.reference_policy(), engine.autocast():
            v_ref = policy.velocity(x_t, tt, traj.cond).float()
        err = flow_matching_errors(v, target, weights)
        err_ref = flow_matching_errors(v_ref, target, weights)
        return diffusion_dpo_loss(err[:p], err_ref[:p], err[p:], err_ref[p:], self.beta)
