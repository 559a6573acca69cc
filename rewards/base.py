"""The reward contract: what a reward takes (:class:`RewardInputs`), what it returns, and how several
rewards combine (:class:`WeightedReward`).

A reward is any callable ``reward(images, inputs) -> dict[str, Tensor]``:

- ``images``: ``[B, 3, H, W]`` float in [0, 1] (any float dtype, any device);
- ``inputs``: a :class:`RewardInputs` with B entries (prompt, reference images, subjects);
- returns ``"score"`` ``[B]`` float32 (higher is better, NaN where the reward does not apply to a
  sample) plus any other ``[B]`` values worth logging (per-subject similarities, flags).

Rewards keep no state across calls, run without gradients and score the whole batch with one forward
per model. A reward that draws random numbers uses its own ``torch.Generator``, never the global RNG:
psr-rl runs rewards beside the rollout (a thread or worker processes, :mod:`rewards.serving`) and
checks that the global RNG did not move. This module imports only torch so that configs and data code
stay light.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "Subject",
    "RewardInputs",
    "Reward",
    "WeightedReward",
    "build_reward",
    "weighted_score",
    "check_images",
    "resolve_dtype",
]


@dataclass(frozen=True)
class Subject:
    """One subject of a sample: ``name`` as the prompt says it ("corgi"), ``category`` as a detector
    should look for it ("dog")."""

    name: str
    category: str


@dataclass(frozen=True)
class RewardInputs:
    """Per-sample conditioning a reward may need, as lists of length B.

    Attributes:
        prompts: B instructions.
        references: B lists of reference images, each ``[3, h, w]`` float in [0, 1] (sizes may
            differ); ``references[b][i]`` shows ``subjects[b][i]``. A sample may have no references
            (an empty list), for rewards that only need the prompt.
        subjects: B lists of :class:`Subject`, in the order of the references.
    """

    prompts: list[str]
    references: list[list[Tensor]]
    subjects: list[list[Subject]]

    def __post_init__(self) -> None:
        b = len(self.prompts)
        if len(self.references) != b or len(self.subjects) != b:
            raise ValueError(
                f"RewardInputs: prompts ({b}), references ({len(self.references)}) and subjects "
                f"({len(self.subjects)}) must all have one entry per sample"
            )
        for i, (refs, subs) in enumerate(zip(self.references, self.subjects, strict=True)):
            if refs and len(refs) != len(subs):
                raise ValueError(
                    f"RewardInputs: sample {i} has {len(refs)} references but {len(subs)} subjects; "
                    "give one reference per subject (or none)"
                )
            for k, ref in enumerate(refs):
                if not (
                    isinstance(ref, Tensor)
                    and ref.ndim == 3
                    and ref.shape[0] == 3
                    and ref.is_floating_point()
                ):
                    shape = tuple(ref.shape) if isinstance(ref, Tensor) else type(ref).__name__
                    raise ValueError(
                        f"RewardInputs: reference {k} of sample {i} must be a float tensor [3, h, w] in [0, 1], "
                        f"got {shape}"
                    )

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_subjects(self) -> list[int]:
        """Subjects per sample, ``[B]``."""
        return [len(s) for s in self.subjects]

    def select(self, indices: Sequence[int]) -> RewardInputs:
        """The samples at ``indices`` (in that order), e.g. one sample for a single call."""
        return RewardInputs(
            prompts=[self.prompts[i] for i in indices],
            references=[self.references[i] for i in indices],
            subjects=[self.subjects[i] for i in indices],
        )

    @classmethod
    def from_prompts(cls, prompts: Sequence[str]) -> RewardInputs:
        """Prompt-only inputs (no references, no subjects)."""
        return cls(list(prompts), [[] for _ in prompts], [[] for _ in prompts])

    @classmethod
    def from_records(cls, records: Iterable[Any]) -> RewardInputs:
        """Build from per-sample records, read by duck typing (objects or mappings):

        - prompt: ``prompt`` or ``instruction``;
        - references: ``references`` (list of ``[3, h, w]`` tensors), optional;
        - subjects: ``subjects`` (items with ``name``/``category``, objects or mappings), or parallel
          lists ``names`` and ``categories`` (a missing name defaults to the category).
        """
        prompts, references, subjects = [], [], []
        for i, rec in enumerate(records):
            prompt = _field(rec, "prompt", _field(rec, "instruction", None))
            if prompt is None:
                raise ValueError(f"RewardInputs.from_records: record {i} has no 'prompt' or 'instruction'")
            refs = list(_field(rec, "references", None) or [])
            subs_field = _field(rec, "subjects", None)
            if subs_field is not None:
                subs = [
                    Subject(
                        name=str(_field(s, "name", None) or _field(s, "category", "")),
                        category=str(_field(s, "category", None) or _field(s, "name", "")),
                    )
                    for s in subs_field
                ]
            else:
                categories = list(_field(rec, "categories", None) or [])
                names = list(_field(rec, "names", None) or categories)
                if len(names) != len(categories):
                    raise ValueError(
                        f"RewardInputs.from_records: record {i} has {len(names)} names but "
                        f"{len(categories)} categories"
                    )
                subs = [Subject(str(n), str(c)) for n, c in zip(names, categories, strict=True)]
            prompts.append(str(prompt))
            references.append(refs)
            subjects.append(subs)
        return cls(prompts, references, subjects)


def _field(record: Any, name: str, default: Any) -> Any:
    if isinstance(record, Mapping):
        return record.get(name, default)
    return getattr(record, name, default)


@runtime_checkable
class Reward(Protocol):
    """``reward(images [B,3,H,W] in [0,1], inputs) -> {"score": [B], ...}`` (see the module docstring)."""

    def __call__(self, images: Tensor, inputs: RewardInputs) -> dict[str, Tensor]: ...


def check_images(images: Tensor, inputs: RewardInputs, owner: str) -> None:
    """Raise a ``ValueError`` naming ``owner`` unless ``images`` is ``[B, 3, H, W]`` float in [0, 1]
    with B = ``len(inputs)``. The range check catches the common [-1, 1] mix-up (1e-3 slack for
    rounding in low precision)."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{owner}: images must be a tensor [B, 3, H, W], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"{owner}: images must be float in [0, 1], got dtype {images.dtype}")
    if images.shape[0] != len(inputs):
        raise ValueError(f"{owner}: {images.shape[0]} images but {len(inputs)} samples in the inputs")
    if images.numel():
        lo, hi = float(images.min()), float(images.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"{owner}: images must be in [0, 1], got values in [{lo:.3f}, {hi:.3f}]")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` (or a ``torch.dtype``) as a ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype={dtype!r}; expected float32, bfloat16 or float16")
    return resolved


def build_reward(node: Any, device: torch.device | str) -> Reward:
    """Instantiate a reward config node (``_target_``: a ``conf/reward/*.yaml``) on ``device``.

    Every ``device`` key in the node's tree (a weighted reward's components, a PSR reward's detector
    and embedder) is set to ``device``, on a copy: the run's config is left as written.
    """
    import copy

    from hydra.utils import instantiate

    from rewards.cli import set_everywhere

    if "_target_" not in node:
        raise ValueError(f"a reward config needs _target_ (conf/reward/*.yaml); got keys {sorted(node)}")
    node = copy.deepcopy(node)
    set_everywhere(node, "device", str(device))
    return instantiate(node)  # type: ignore[no-any-return]


def weighted_score(components: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """NaN-aware weighted sum of ``[B]`` component scores: the one place rewards are combined.

    ``R_b = (W / W_b) * sum_{j applies to b} w_j r_jb`` with ``W = sum_j w_j`` and ``W_b`` the total
    weight of the components that are not NaN for sample b. When every component applies this is
    the plain weighted sum; when one does not (NaN: "does not apply"), it contributes nothing and the
    others are scaled up so the total weight stays W, keeping R on one scale across samples. A sample
    to which no component with positive weight applies gets NaN. :class:`WeightedReward` uses it as
    is; psr's ``combine_rewards`` first z-scores each component within its prompt group.

    Args:
        components: name -> ``[B]`` scores (higher is better, NaN where the reward does not apply;
            never infinite), all on one device.
        weights: name -> weight, finite and >= 0, naming exactly the components, at least one > 0.

    Returns:
        ``[B]`` float32 (float64 if a component is float64), computed in float64.
    """
    if not components:
        raise ValueError("weighted_score: no reward components given")
    missing = sorted(set(components) - set(weights))
    extra = sorted(set(weights) - set(components))
    if missing or extra:
        raise ValueError(
            f"weighted_score: weights must name exactly the reward components {sorted(components)}; "
            f"missing weights for {missing}, weights without a component: {extra} (check reward.weights)"
        )
    for name, w in weights.items():
        if not (math.isfinite(float(w)) and float(w) >= 0):
            raise ValueError(
                f"weighted_score: weight of reward '{name}' is {w}; weights must be finite and >= 0"
            )
    total = sum(float(w) for w in weights.values())
    if total <= 0:
        raise ValueError(
            f"weighted_score: the reward weights {dict(weights)} sum to 0; give one a positive weight"
        )
    out_dtype = torch.float32
    weighted_sum: Tensor | None = None
    applied: Tensor | None = None
    for name, comp in components.items():
        if comp.ndim != 1:
            raise ValueError(
                f"weighted_score: reward component '{name}' must be [B]; got {tuple(comp.shape)}"
            )
        if comp.dtype == torch.float64:
            out_dtype = torch.float64
        r = comp.detach().to(torch.float64)
        if torch.isinf(r).any():
            raise ValueError(
                f"weighted_score: reward component '{name}' has infinite values; use NaN for 'does not apply'"
            )
        applies = ~torch.isnan(r)
        w = float(weights[name])
        term = torch.where(applies, w * r, torch.zeros_like(r))
        weight_here = applies.to(torch.float64) * w
        weighted_sum = term if weighted_sum is None else weighted_sum + term
        applied = weight_here if applied is None else applied + weight_here
    assert weighted_sum is not None and applied is not None  # components is not empty
    # 0/0 -> NaN where nothing with positive weight applies
    return (weighted_sum * total / applied).to(out_dtype)


class WeightedReward:
    """Named rewards combined with weights: ``R = sum_j w_j r_j`` (NaN-aware, see :func:`weighted_score`).

    Every key of every component is reported as ``"<name>/<key>"`` (e.g. ``psr/score``,
    ``psr/subject_1``, ``clip/score``), next to the combined ``"score"``. Trainers that combine the
    components themselves (per-reward group normalization) read ``<name>/score`` and
    :attr:`weights`.

    Args:
        rewards: name -> reward (``reward.rewards.<name>`` in the config). Names may not contain "/".
        weights: name -> weight >= 0, naming exactly the rewards (``reward.weights.<name>``); at least
            one positive.
    """

    def __init__(self, rewards: Mapping[str, Reward], weights: Mapping[str, float]) -> None:
        rewards = dict(rewards.items())
        weights = {str(k): float(v) for k, v in weights.items()}
        if not rewards:
            raise ValueError("WeightedReward: reward.rewards is empty; name at least one reward")
        missing, extra = sorted(set(rewards) - set(weights)), sorted(set(weights) - set(rewards))
        if missing or extra:
            raise ValueError(
                f"WeightedReward: reward.weights must name exactly the rewards {sorted(rewards)}; "
                f"missing weights: {missing}, weights without a reward: {extra}"
            )
        for name, w in weights.items():
            if "/" in name:
                raise ValueError(f"WeightedReward: reward name {name!r} may not contain '/'")
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(
                    f"WeightedReward: reward.weights.{name}={w}; weights must be finite and >= 0"
                )
            if not callable(rewards[name]):
                raise ValueError(
                    f"WeightedReward: reward.rewards.{name} is not callable ({type(rewards[name]).__name__})"
                )
        if sum(weights.values()) <= 0:
            raise ValueError(f"WeightedReward: reward.weights {weights} sum to 0; give one a positive weight")
        self.rewards: dict[str, Reward] = rewards
        self.weights: dict[str, float] = {n: weights[n] for n in rewards}

    @torch.no_grad()
    def __call__(self, images: Tensor, inputs: RewardInputs) -> dict[str, Tensor]:
        batch = images.shape[0]
        out: dict[str, Tensor] = {}
        components: dict[str, Tensor] = {}
        for name, reward in self.rewards.items():
            result = reward(images, inputs)
            if "score" not in result:
                raise ValueError(
                    f"WeightedReward: reward '{name}' returned no 'score' (keys: {sorted(result)})"
                )
            for key, value in result.items():
                if value.shape != (batch,):
                    raise ValueError(
                        f"WeightedReward: reward '{name}' returned '{key}' of shape {tuple(value.shape)}; expected [{batch}]"
                    )
                out[f"{name}/{key}"] = value.float()
            components[name] = result["score"]
        out["score"] = weighted_score(components, self.weights).to(device=images.device, dtype=torch.float32)
        return out

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {self.weights[n]:g} x {type(r).__name__}" for n, r in self.rewards.items())
        return f"WeightedReward({parts})"
