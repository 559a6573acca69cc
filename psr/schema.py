"""What each primary reads: one frozen dataclass per plain section per primary, and per primary.

Fields are the keys, with the types and defaults of today's YAML; a field made with :func:`target`
holds a ``_target_`` node, whose keys are the parameters of its callable instead. The top-level
classes (:class:`RLConfig`, :class:`SFTConfig`, :class:`EvalConfig`, :class:`DataConfig`) are the
keys each primary reads. :func:`psr.config.check_config` checks a composed run against them, and
:func:`psr.config.settings` builds a section's object for the code that reads it.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from psr.models.lora import DEFAULT_TARGETS


def target(optional: bool = False) -> Any:
    """A schema field holding a ``_target_`` node (checked against the callable's parameters)."""
    return field(default=None, metadata={"target": "optional" if optional else "required"})


# --- Range checks ------------------------------------------------------------------------------
# Each section checks its values in __post_init__, so an object that exists is a valid one, and a
# bad value fails when the run starts (psr.config.check_config builds every section), not at the
# step that first uses it.


class SettingsError(ValueError):
    """Values of one section out of their range.

    Attributes:
        problems: one line per value, relative to the section (``"steps=0: must be >= 1"``);
            :func:`psr.config.settings` prefixes the section's path.
    """

    def __init__(self, section: str, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n  ".join(f"{section}.{p}" for p in self.problems))


def _rule(ok: bool, key: str, value: Any, rule: str) -> list[str]:
    return [] if ok else [f"{key}={value!r}: {rule}"]


def _at_least(obj: Any, low: float, *keys: str) -> list[str]:
    return [p for k in keys for p in _rule(getattr(obj, k) >= low, k, getattr(obj, k), f"must be >= {low}")]


def _in_unit(obj: Any, key: str, low_open: bool = False, high_open: bool = False) -> list[str]:
    """``key`` within [0, 1] (``(`` / ``)`` where open)."""
    v = getattr(obj, key)
    ok = (v > 0 if low_open else v >= 0) and (v < 1 if high_open else v <= 1)
    rng = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
    return _rule(ok, key, v, f"must be in {rng}")


def _positive(obj: Any, *keys: str) -> list[str]:
    return [
        p
        for k in keys
        for p in _rule(
            getattr(obj, k) > 0 and math.isfinite(getattr(obj, k)), k, getattr(obj, k), "must be > 0"
        )
    ]


def _resolution(obj: Any, key: str) -> list[str]:
    v = getattr(obj, key)
    return _rule(
        v >= 16 and v % 16 == 0, key, v, "must be a positive multiple of 16 (VAE factor 8 x 2x2 packing)"
    )


def _raise(section: str, problems: list[str]) -> None:
    if problems:
        raise SettingsError(section, problems)


# --- Shared sections ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSettings:
    """``train.lora``: the adapter injected when ``train.mode=lora``."""

    rank: int = 64
    alpha: float = 64
    init: str | bool = "gaussian"  # peft init_lora_weights (B = 0: training starts at the base model)
    targets: tuple[str, ...] = DEFAULT_TARGETS  # psr.models.lora: FLUX joint-attention projections

    def __post_init__(self) -> None:
        _raise(
            "train.lora",
            [
                *_at_least(self, 1, "rank"),
                *_positive(self, "alpha"),
                *_rule(len(self.targets) > 0, "targets", list(self.targets), "must name at least one module"),
            ],
        )


@dataclass(frozen=True)
class SamplerSettings:
    """psr-rl ``sampler``: how rollouts are sampled (``psr.sampling``)."""

    method: typing.Literal["ode", "flow_grpo", "dance", "cps"] = "flow_grpo"
    noise_level: float = 0.7
    num_steps: int = 28
    sde_window: tuple[int, int] | None = None  # [start, end): SDE steps, ODE elsewhere; None = all
    same_noise: bool = False

    def __post_init__(self) -> None:
        _raise(
            "sampler", [*_at_least(self, 1, "num_steps"), *self._noise_problems(), *self._window_problems()]
        )

    def _noise_problems(self) -> list[str]:
        """The noise level's range per method (psr.sampling.sde). cps: ``s = s_next sin(a pi / 2)``
        is monotone on [0, 1] only. flow_grpo and dance: the SDE step's mean keeps ``x`` with the
        factor ``1 - a^2 / 2`` on the extreme step (flow_grpo's first, dance's last), which must stay
        positive, so a < sqrt(2) (typical: flow_grpo 0.7, dance 0.3). ode: ignored, >= 0."""
        a, key = self.noise_level, "noise_level"
        if self.method == "cps":
            return _rule(0 <= a <= 1, key, a, "must be in [0, 1] for sampler.method=cps")
        if self.method in ("flow_grpo", "dance"):
            return _rule(
                0 <= a < math.sqrt(2),
                key,
                a,
                f"must be in [0, sqrt(2)) for sampler.method={self.method} (the step's mean keeps x with "
                "the factor 1 - a^2/2; typical: flow_grpo 0.7, dance 0.3)",
            )
        return _rule(a >= 0, key, a, "must be >= 0")

    def _window_problems(self) -> list[str]:
        w = self.sde_window
        if w is None:
            return []
        return _rule(
            len(w) == 2 and 0 <= w[0] < w[1] <= self.num_steps,
            "sde_window",
            list(w),
            f"must be [start, end) with 0 <= start < end <= sampler.num_steps={self.num_steps}",
        )


@dataclass(frozen=True)
class OptimSettings:
    """``optim``: AdamW, its learning-rate schedule and gradient clipping."""

    lr: float = 1.0e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1.0e-8
    schedule: typing.Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        _raise(
            "optim",
            [
                *_positive(self, "lr", "eps"),
                *_rule(
                    len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                    "betas",
                    list(self.betas),
                    "must be two numbers in [0, 1)",
                ),
                *_at_least(self, 0, "weight_decay", "warmup_steps"),
                *_in_unit(self, "min_lr_ratio"),
                *_rule(
                    self.grad_clip is None or self.grad_clip >= 0,
                    "grad_clip",
                    self.grad_clip,
                    "must be >= 0 (0 or null: no clipping)",
                ),
            ],
        )


def check_schedule(optim: OptimSettings, steps: int) -> None:
    """The one check across sections: a cosine schedule must reach past its warmup.

    Raises:
        SettingsError: ``optim.warmup_steps`` >= ``train.steps`` under ``optim.schedule=cosine``.
    """
    if optim.schedule == "cosine" and optim.warmup_steps >= steps:
        raise SettingsError(
            "optim",
            [
                f"warmup_steps={optim.warmup_steps}: must be < train.steps={steps} under optim.schedule=cosine "
                "(lower optim.warmup_steps or raise train.steps)"
            ],
        )


# --- psr-rl ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RLTrainSettings:
    """psr-rl ``train``."""

    steps: int = 100
    prompts_per_step: int = 2  # prompt groups per rank per step
    group_size: int = 6  # G samples per prompt
    resolution: int = 512
    inner_epochs: int = 1
    micro_batch_size: int = 6  # samples per forward in the update
    mode: typing.Literal["lora", "full"] = "lora"
    lora: LoraSettings = field(default_factory=LoraSettings)
    max_nonfinite: int = 5
    eval_every: int = 50
    eval_prompts: int = 4
    grid_every: int = 10
    checkpoint_every: int = 25
    keep_last: int = 3
    export_lora: bool = True

    def __post_init__(self) -> None:
        _raise(
            "train",
            [
                *_at_least(self, 1, "steps", "prompts_per_step", "inner_epochs", "micro_batch_size"),
                *_rule(
                    self.group_size >= 2,
                    "group_size",
                    self.group_size,
                    "must be >= 2: a group of one sample never updates (GRPO's advantage is its reward "
                    "minus its group's mean, 0; DPO has no pair)",
                ),
                *_resolution(self, "resolution"),
                *_at_least(self, 1, "max_nonfinite", "checkpoint_every", "keep_last"),
                *_at_least(self, 0, "eval_every", "grid_every"),
                *_rule(
                    self.eval_prompts >= 1 or self.eval_every == 0,
                    "eval_prompts",
                    self.eval_prompts,
                    "must be >= 1 (or train.eval_every=0: no evaluation)",
                ),
            ],
        )


@dataclass(frozen=True)
class RewardServingSettings:
    """psr-rl ``reward_serving``: where the reward runs and whether it scores beside the rollout
    (``rewards.serving``; docs/cluster.md)."""

    device: str | tuple[str, ...] | None = None  # None: the trainer's device; a list: one per worker, in turn
    workers: int = 0  # 0: in the trainer's process; N: N spawn-started worker processes
    overlap: bool | typing.Literal["auto"] = "auto"  # auto: rewards.serving.overlap_by_default
    timeout: float | None = None  # seconds to wait for one group's reward (None: no limit)

    def __post_init__(self) -> None:
        devices = [self.device] if isinstance(self.device, str) or self.device is None else list(self.device)
        _raise(
            "reward_serving",
            [
                *_at_least(self, 0, "workers"),
                *_rule(
                    len(devices) == 1 or self.workers >= 1,
                    "device",
                    self.device,
                    "a list of devices needs reward_serving.workers >= 1 (one in-process reward runs on one device)",
                ),
                *_rule(len(devices) > 0, "device", self.device, "must name a device (or null)"),
                *(_positive(self, "timeout") if self.timeout is not None else []),
            ],
        )


@dataclass(frozen=True)
class RLConfig:
    """Every key ``psr-rl`` reads (``conf/rl.yaml`` and its groups)."""

    run_dir: str = "${hydra:runtime.output_dir}"
    seed: int = 0
    resume: str | None = "auto"
    init_from: str | None = None
    reward_serving: RewardServingSettings = field(default_factory=RewardServingSettings)
    requeue_on_preemption: bool = True
    peak_tflops: float | None = None  # one GPU's peak TFLOP/s: logs perf/tflops and perf/mfu (psr.plan)
    train: RLTrainSettings = field(default_factory=RLTrainSettings)
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    model: Any = target()
    algo: Any = target()  # the objective (GRPO owns its advantage settings)
    reward: Any = target()
    engine: Any = target()
    logger: Any = target()
    data: Any = target()


# --- psr-sft -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SFTTrainSettings:
    """psr-sft ``train``."""

    steps: int = 2000
    micro_batch_size: int = 4  # records per micro-batch per rank
    grad_accum: int = 1
    mode: typing.Literal["lora", "full"] = "lora"
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(rank=512, alpha=512))
    log_every: int = 1
    checkpoint_every: int = 250
    keep_last: int = 3
    export_lora: bool = True

    def __post_init__(self) -> None:
        keys = ("steps", "micro_batch_size", "grad_accum", "log_every", "checkpoint_every", "keep_last")
        _raise("train", _at_least(self, 1, *keys))


@dataclass(frozen=True)
class DatasetSettings:
    """psr-sft ``dataset``: how records become training samples (``psr.data.dataset``)."""

    resolution: int = 512
    aspect_ratios: tuple[float, ...] = (1.0,)
    num_references: tuple[int, ...] = (2, 3, 4)
    num_references_probs: tuple[float, ...] = (0.9, 0.05, 0.05)
    shuffle_references: bool = True
    reference_dropout: float = 0.0
    reference_tags: bool = False

    def __post_init__(self) -> None:
        counts, probs = list(self.num_references), list(self.num_references_probs)
        _raise(
            "dataset",
            [
                *_resolution(self, "resolution"),
                *_rule(
                    len(self.aspect_ratios) > 0 and all(0 < r < math.inf for r in self.aspect_ratios),
                    "aspect_ratios",
                    list(self.aspect_ratios),
                    "must be one or more numbers > 0 (width / height)",
                ),
                *_rule(all(n >= 0 for n in counts), "num_references", counts, "must be counts >= 0"),
                *_rule(
                    len(probs) == len(counts)
                    and all(0 <= p <= 1 for p in probs)
                    and (not probs or sum(probs) > 0),
                    "num_references_probs",
                    probs,
                    f"must be probabilities in [0, 1] with a positive sum, one per dataset.num_references={counts}",
                ),
                *_in_unit(self, "reference_dropout", high_open=True),
            ],
        )


@dataclass(frozen=True)
class LoaderSettings:
    """psr-sft ``loader``: the torch DataLoader."""

    num_workers: int = 2
    prefetch_factor: int = 2
    pin_memory: bool = True

    def __post_init__(self) -> None:
        _raise("loader", [*_at_least(self, 0, "num_workers"), *_at_least(self, 1, "prefetch_factor")])


@dataclass(frozen=True)
class ValidationSettings:
    """psr-sft ``validation``: held-out loss, ODE samples scored by a reward, a grid."""

    every: int = 250
    records: int = 4
    num_steps: int = 28
    reward: Any = target(optional=True)

    def __post_init__(self) -> None:
        _raise(
            "validation",
            [
                *_at_least(self, 0, "every"),
                *_rule(
                    self.records >= 1 or self.every == 0,
                    "records",
                    self.records,
                    "must be >= 1 (or validation.every=0: no validation)",
                ),
                *_at_least(self, 1, "num_steps"),
            ],
        )


@dataclass(frozen=True)
class SFTConfig:
    """Every key ``psr-sft`` reads (``conf/sft.yaml`` and its groups)."""

    run_dir: str = "${hydra:runtime.output_dir}"
    seed: int = 0
    resume: str | None = "auto"
    init_from: str | None = None
    requeue_on_preemption: bool = True
    peak_tflops: float | None = None  # one GPU's peak TFLOP/s: logs perf/tflops and perf/mfu (psr.plan)
    train: SFTTrainSettings = field(default_factory=SFTTrainSettings)
    dataset: DatasetSettings = field(default_factory=DatasetSettings)
    loader: LoaderSettings = field(default_factory=LoaderSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    objective: Any = target()
    model: Any = target()
    engine: Any = target()
    logger: Any = target()
    data: Any = target()


# --- psr-eval ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings:
    """psr-eval ``eval``."""

    split: typing.Literal["all", "train", "heldout"] = "all"
    limit: int | None = None
    samples_per_prompt: int = 4
    resolution: int = 512
    num_steps: int = 28
    records_per_batch: int = 4  # records per reward call and per flush
    grid_records: int = 8
    source: typing.Literal["sample", "results"] = "sample"  # results: score each record's result_path
    results_root: str | None = None  # folder relative result_path entries resolve against

    def __post_init__(self) -> None:
        _raise(
            "eval",
            [
                *_rule(
                    self.limit is None or self.limit >= 1, "limit", self.limit, "must be >= 1 (or null: all)"
                ),
                *_at_least(self, 1, "samples_per_prompt", "num_steps", "records_per_batch"),
                *_resolution(self, "resolution"),
                *_at_least(self, 0, "grid_records"),
            ],
        )


@dataclass(frozen=True)
class EvalConfig:
    """Every key ``psr-eval`` reads (``conf/eval.yaml`` and its groups)."""

    run_dir: str = "${hydra:runtime.output_dir}"
    seed: int = 0
    device: str | None = None
    checkpoint: str | None = None
    lora: str | None = None
    eval: EvalSettings = field(default_factory=EvalSettings)
    model: Any = target()
    reward: Any = target()
    data: Any = target()


# --- psr-data (conf/pipeline/data.yaml) --------------------------------------------------------


@dataclass(frozen=True)
class ShardSettings:
    """psr-data ``shard``: this process's share of the records (``auto``: from the launcher)."""

    index: int | str = 0
    count: int | str = 1


@dataclass(frozen=True)
class PathSettings:
    """psr-data ``paths``: local model directories (``???`` until a chosen model needs one)."""

    flux: str | None = None
    kontext: str | None = None
    klein: str | None = None  # FLUX.2 klein (single_subject / editor=flux2_klein)
    qwen_image_edit: str | None = None  # Qwen-Image-Edit-Plus (single_subject / editor=qwen_image_edit_plus)
    grounding_dino: str | None = None
    owlv2: str | None = None
    dino: str | None = None
    dinov2: str | None = None
    clip: str | None = None
    lm: str | None = None
    vlm: str | None = None


@dataclass(frozen=True)
class PlanSettings:
    """psr-data ``plan``."""

    num_records: int = 1000
    kinds: dict[str, int] = field(default_factory=dict)  # kind: number of subjects
    weights: dict[str, float] | None = None
    vocabulary: str | None = None
    exclude: tuple[str, ...] = ("person",)

    def __post_init__(self) -> None:
        _raise("plan", _at_least(self, 1, "num_records"))


@dataclass(frozen=True)
class PromptsSettings:
    """psr-data ``prompts``."""

    edited_kinds: tuple[str, ...] = ()
    batch_size: int = 16
    model: Any = target()

    def __post_init__(self) -> None:
        _raise("prompts", _at_least(self, 1, "batch_size"))


@dataclass(frozen=True)
class TargetSettings:
    """psr-data ``target``."""

    batch_size: int = 4
    model: Any = target()

    def __post_init__(self) -> None:
        _raise("target", _at_least(self, 1, "batch_size"))


@dataclass(frozen=True)
class CropSettings:
    """psr-data ``crop``."""

    nms_iou: float = 0.5
    min_box: float = 0.08
    max_overlap: float = 0.3
    margin: float = 0.1
    batch_size: int = 8
    detector: Any = target()

    def __post_init__(self) -> None:
        _raise(
            "crop",
            [
                *(p for k in ("nms_iou", "min_box", "max_overlap", "margin") for p in _in_unit(self, k)),
                *_at_least(self, 1, "batch_size"),
            ],
        )


@dataclass(frozen=True)
class ReferencesSettings:
    """psr-data ``references``."""

    batch_size: int = 4
    images_per_call: int = 8
    model: Any = target()

    def __post_init__(self) -> None:
        _raise("references", _at_least(self, 1, "batch_size", "images_per_call"))


@dataclass(frozen=True)
class EditSettings:
    """psr-data ``edit``."""

    kinds: tuple[str, ...] = ("attribute", "action")
    batch_size: int = 4
    model: Any = target()

    def __post_init__(self) -> None:
        _raise("edit", _at_least(self, 1, "batch_size"))


@dataclass(frozen=True)
class InstructSettings:
    """psr-data ``instruct``."""

    batch_size: int = 8
    model: Any = target()

    def __post_init__(self) -> None:
        _raise("instruct", _at_least(self, 1, "batch_size"))


@dataclass(frozen=True)
class FilterSettings:
    """psr-data ``filter``."""

    reward: Any = target()
    threshold: float = 0.6
    require_reference_detection: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # name: {reward: {_target_: ...}, min: float | None}
    batch_size: int = 8

    def __post_init__(self) -> None:
        _raise("filter", _at_least(self, 1, "batch_size"))


@dataclass(frozen=True)
class ExportSettings:
    """psr-data ``export`` (no settings)."""


@dataclass(frozen=True)
class ReportSettings:
    """psr-data ``report``."""

    contact_rows: int = 16

    def __post_init__(self) -> None:
        _raise("report", _at_least(self, 1, "contact_rows"))


@dataclass(frozen=True)
class DataConfig:
    """Every key ``psr-data`` reads (``conf/pipeline/data.yaml`` and its groups)."""

    stage: str = "all"
    shard: ShardSettings = field(default_factory=ShardSettings)
    out_dir: str | None = None
    seed: int = 0
    device: str = "cuda"
    dtype: str = "bfloat16"
    num_threads: int | None = None
    paths: PathSettings = field(default_factory=PathSettings)
    plan: PlanSettings = field(default_factory=PlanSettings)
    prompts: PromptsSettings = field(default_factory=PromptsSettings)
    target: TargetSettings = field(default_factory=TargetSettings)
    crop: CropSettings = field(default_factory=CropSettings)
    references: ReferencesSettings = field(default_factory=ReferencesSettings)
    edit: EditSettings = field(default_factory=EditSettings)
    instruct: InstructSettings = field(default_factory=InstructSettings)
    filter: FilterSettings = field(default_factory=FilterSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    report: ReportSettings = field(default_factory=ReportSettings)


SCHEMAS: dict[str, type] = {"rl": RLConfig, "sft": SFTConfig, "eval": EvalConfig, "data": DataConfig}
