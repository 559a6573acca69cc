"""``psr-rl``: online GRPO or DPO on group rollouts, scored by the configured reward.

One step, top to bottom (:meth:`RLTrainer.train`):
  1. this rank's prompt groups (a group never straddles ranks, so its statistics are whole);
  2. ``rollout`` of G samples per group with per-step log-probs (SDE on the configured window);
  3. the reward of each group, submitted as soon as its images exist: with ``reward_serving.overlap``
     it runs while the next group is sampled (a thread, or worker processes: :mod:`rewards.serving`),
     one call per group either way, so the scores do not depend on the overlap;
  4. group advantages (GRPO) or in-group pairs (DPO);
  5. the objective's update through the engine (gradient accumulation over groups, steps, samples);
  6. telemetry, image grid, held-out evaluation, checkpoint; a preemption signal saves and exits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from psr.checkpoint import checkpoint_or_stop, save_training_checkpoint
from psr.config import (
    OptimSettings,
    RewardServingSettings,
    RLTrainSettings,
    SamplerSettings,
    check_schedule,
    settings,
)
from psr.data.dataset import BatchStream, PromptDataset, PromptRecord
from psr.data.sources import load_records
from psr.distributed import gather_scores, split_evenly
from psr.logging import MetricLogger, StepTimer, build_logger, make_grid, progress, reward_metrics
from psr.models.lora import make_trainable
from psr.objectives.accumulate import merge_metrics
from psr.objectives.advantages import component_weights, reward_components
from psr.objectives.protocol import ANOTHER_RANK, Objective, StepRewards, UpdateResult
from psr.plan import StepFlops, perf_metrics
from psr.preemption import PreemptionHandler
from psr.resume import finish_resume, load_resume, start_from
from psr.runlock import lock_run_dir
from psr.sampling.rollout import rollout
from psr.seeding import derive_seed, seed_everything
from psr.trainers import resolve_run_dir, run_trainer
from psr.types import Trajectory
from rewards.base import RewardInputs
from rewards.serving import (
    InlineRewards,
    Pending,
    RewardService,
    RewardWorkers,
    build_served_reward,
    concat_scores,
    overlap_by_default,
    serve,
)


class NonFiniteError(RuntimeError):
    """Raised after ``train.max_nonfinite`` updates were skipped for a non-finite loss or log-prob."""


def _merge_over_ranks(result: UpdateResult) -> UpdateResult:
    """The objective's report for the whole step: each metric's mean over ranks (``*_min`` /
    ``*_max``: min / max), over the ranks that report it (a rank whose groups all had zero variance
    reports none); the place of a non-finite value from a rank that saw one."""
    from psr.distributed import all_gather_object

    parts: list[UpdateResult] = all_gather_object(result)
    if len(parts) == 1:
        return result
    values: dict[str, list[float]] = {}
    for part in parts:
        for key, v in part.metrics.items():
            values.setdefault(key, []).append(v)
    places = [p.nonfinite_where for p in parts if p.nonfinite_where is not None]
    seen_here = [w for w in places if w != ANOTHER_RANK]
    where = (seen_here or places)[0] if places else None
    return UpdateResult(merge_metrics(values), where)


class RLTrainer:
    """GRPO / DPO recipe. ``__init__`` reads scalars; ``setup`` builds; ``train`` runs."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.seed = int(cfg.seed)
        # the typed sections (psr.schema): a value of the wrong type or out of range fails here,
        # before anything is built, naming its key
        self.train_settings = t = settings(cfg.train, RLTrainSettings, "train")
        self.sampling = settings(cfg.sampler, SamplerSettings, "sampler")
        self.optim = settings(cfg.optim, OptimSettings, "optim")
        self.serving = settings(cfg.reward_serving, RewardServingSettings, "reward_serving")
        check_schedule(self.optim, t.steps)
        self.total_steps = t.steps
        self.prompts_per_step = t.prompts_per_step
        self.group_size = t.group_size
        self.resolution = t.resolution
        self.micro_batch_size = t.micro_batch_size
        self.max_nonfinite = t.max_nonfinite
        self.eval_every, self.grid_every = t.eval_every, t.grid_every
        self.checkpoint_every, self.keep_last = t.checkpoint_every, t.keep_last
        self.eval_prompts, self.export_lora = t.eval_prompts, t.export_lora
        self.sampler_kwargs = dataclasses.asdict(self.sampling)  # rollout's keyword arguments
        self.peak_tflops = cfg.get("peak_tflops")  # perf/tflops and perf/mfu when set
        self.step = 0
        self.nonfinite = 0

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.run_dir = resolve_run_dir(cfg.run_dir)
        self.engine = instantiate(cfg.engine)  # device, rank and precision everything below is built for
        self.run_lock = lock_run_dir(self.run_dir, "psr-rl", rank=self.engine.rank)  # before any write there
        seed_everything(self.seed, self.engine.rank)
        self.ckpt_root = self.run_dir / "checkpoints"
        # read before the model is built: a resumed checkpoint fixes the init_from checkpoint it starts from
        self.resumed = load_resume(cfg.resume, self.ckpt_root, "psr-rl", self.engine.rank)
        self.objective = self._build_objective(cfg.algo)
        self._check_sampler_serves_objective()
        self.policy, params = self._setup_policy(cfg.model, cfg.init_from)
        self._setup_engine(params)
        self.reward, self.overlap = self._setup_reward(cfg.reward)
        self._setup_data(cfg.data)
        self.logger = self._setup_logger(cfg)
        self.timer = StepTimer()
        # FLOPs per prompt group from one symbolic step on the meta device, once per reference count
        self.step_flops = StepFlops(cfg, "rl") if self.peak_tflops else None
        self.preemption = PreemptionHandler(requeue=bool(cfg.requeue_on_preemption))
        self._resume(cfg)
        self.logger.resume_at(self.step)  # drop what a killed run logged after its checkpoint

    def _setup_policy(self, cfg_model: DictConfig, init_from: str | None) -> tuple[Any, list[nn.Parameter]]:
        """The model on the engine's device and its trainable parameters (``train.mode``, ``train.lora``);
        under full fine-tuning, a frozen copy for an objective that needs the reference policy."""
        policy = instantiate(cfg_model, device=str(self.engine.device))
        if init_from:  # before adapters and engine (psr.resume.start_from)
            start_from(policy, init_from, self.resumed)
        lora = dataclasses.asdict(self.train_settings.lora)
        keep_reference = self.objective.needs_reference
        mode = self.train_settings.mode
        return policy, make_trainable(policy, mode, **lora, keep_reference=keep_reference)

    def _setup_engine(self, params: list[nn.Parameter]) -> None:
        """The transformer, its trainable parameters and the ``optim`` settings go to the engine."""
        self.engine.setup(
            self.policy.transformer,
            params,
            **dataclasses.asdict(self.optim),
            total_steps=self.total_steps,
            grad_accum=1,  # one engine.step() per inner epoch; the objective accumulates inside it
            micro_batch_size=self.micro_batch_size,
        )

    def _setup_reward(self, cfg_reward: DictConfig) -> tuple[Any, bool]:
        """The reward (in this process, or its worker processes) on ``reward_serving.device`` (default:
        the engine's), and whether it scores beside the rollout (``reward_serving.overlap``)."""
        s = self.serving
        device = s.device or str(self.engine.device)
        first = self.engine.rank * s.workers  # a device list spreads the ranks' workers over it
        reward = build_served_reward(cfg_reward, device, s.workers, s.timeout, first)
        overlap = (
            overlap_by_default(cfg_reward, device, s.workers, self.engine.device)
            if s.overlap == "auto"
            else bool(s.overlap)
        )
        return reward, overlap

    def _setup_data(self, cfg_data: DictConfig) -> None:
        """Training prompts (loaded on access), held-out ones (loaded now), this rank's batch stream."""
        train, heldout, root = load_records(cfg_data, self.run_dir)  # the source data._target_ names
        self.records, held = PromptDataset(train, root), PromptDataset(heldout, root)
        self.heldout = [held[i] for i in range(len(held))]
        self.batches = BatchStream(
            len(self.records),
            prompts_per_step=self.prompts_per_step,
            rank=self.engine.rank,
            world_size=self.engine.world_size,
            seed=self.seed,
            dataset=self.records,  # type: ignore[arg-type]  # indexable with len(): all BatchStream uses
        )

    def _setup_logger(self, cfg: DictConfig) -> MetricLogger:
        run_config: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        return build_logger(run_config["logger"], self.run_dir, run_config=run_config, rank=self.engine.rank)

    def _build_objective(self, algo: DictConfig) -> Objective:
        """``algo`` (its ``_target_``) with the batch settings of ``train``."""
        return instantiate(
            algo,
            micro_batch_size=self.train_settings.micro_batch_size,
            inner_epochs=self.train_settings.inner_epochs,
        )

    def _check_sampler_serves_objective(self) -> None:
        """A run whose objective trains on SDE steps that the sampler never takes would never update."""
        if not self.objective.needs_sde_steps:
            return
        s = self.sampling  # (an empty sampler.sde_window is refused with the other sampler settings)
        problem = (
            "sampler.method=ode takes no stochastic step"
            if s.method == "ode"
            else f"sampler.noise_level={s.noise_level:g} makes every step deterministic"
            if s.noise_level == 0
            else None
        )
        if problem:
            raise ValueError(
                f"psr-rl: {problem}, and {type(self.objective).__name__} trains on the log-probs of SDE "
                f"steps: nothing would ever update (use sampler=sde with noise_level > 0, or algo=dpo)"
            )

    def _resume(self, cfg: DictConfig) -> None:
        """Restore the checkpoint :func:`~psr.resume.load_resume` read (after checking this start's config
        against the first start's), or record this config as the first start's."""
        config: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        state = finish_resume(self.resumed, self.engine, self.run_dir, self.ckpt_root, config, "psr-rl")
        self.resumed = None  # the CPU copy of the checkpoint is no longer needed
        if state is not None:
            self.step = int(state["step"])
            self.nonfinite = int(state.get("nonfinite", 0))
            self.batches.load_state_dict(state["data"])

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        bar = progress(range(self.step, self.total_steps), "psr-rl", self.engine.rank, initial=self.step)
        with serve(self.reward, self.overlap, self.serving.timeout) as rewards:
            for step in bar:
                self.step = step
                records = self.batches.next_batch()
                trajs, scores, reward_s = self.rollout_and_score(records, step, rewards)
                with self.timer("update"):
                    metrics = self.update(trajs, scores)
                metrics.update({**self.timer.pop(), "time/reward_compute": reward_s})
                if self.step_flops is not None:  # every sample counted as trained: an upper bound
                    flops = self.step_flops([len(r.references) for r in records])
                    seconds = sum(metrics.get(f"time/{k}", 0.0) for k in ("rollout", "reward", "update"))
                    metrics.update(perf_metrics(flops, seconds, self.peak_tflops))
                self.step = step + 1
                self.preemption.poll()  # collective: every rank stops at the same step
                self.logger.log(metrics, step=self.step)
                if self.grid_every and self.step % self.grid_every == 0:
                    self.log_grid(trajs, records, scores["score"], "train/grid")
                if self.eval_every and self.step % self.eval_every == 0:
                    self.evaluate()
                due = self.step % self.checkpoint_every == 0 or self.step == self.total_steps
                if checkpoint_or_stop("psr-rl", self.step, due, self.preemption, self.save_checkpoint):
                    return

    def rollout_and_score(
        self, records: list[PromptRecord], step: int, rewards: RewardService
    ) -> tuple[list[Trajectory], dict[str, Tensor], float]:
        """The step's groups, each submitted to ``rewards`` as soon as it is sampled; its scores
        (``[P*G]`` per key, in order) and the reward's compute seconds. Timed: ``time/rollout``, and
        ``time/reward``, the reward time the rollout did not hide (all of it without overlap)."""
        pending: list[Pending] = []

        def submit(traj: Trajectory, rec: PromptRecord) -> None:
            pending.append(rewards.submit(traj.images, self._reward_inputs(rec, traj.batch_size)))

        with self.timer("rollout"):
            trajs = self.rollout(records, step, on_group=submit)
        with self.timer("reward"):
            scores = concat_scores(pending, trajs[0].images.device)
        return trajs, scores, sum(p.seconds for p in pending)

    def rollout(
        self,
        records: list[PromptRecord],
        step: int,
        first_group: int | None = None,
        on_group: Callable[[Trajectory, PromptRecord], None] | None = None,
        **overrides: Any,
    ) -> list[Trajectory]:
        """G samples for each record. Group ids are global (rank r holds groups ``r P .. r P + P - 1``)
        and the generator is a function of (seed, step, group id), so a resumed run draws exactly the
        noise an uninterrupted one would, and 2 ranks draw what 1 rank with the same batch would.
        ``on_group(traj, record)`` is called after each group (the reward is submitted there)."""
        kwargs = {**self.sampler_kwargs, **overrides}
        if first_group is None:
            first_group = self.engine.rank * self.prompts_per_step
        self.policy.eval()
        trajs = []
        # one gathering for all records (ZeRO-3): ranks may hold different numbers of records
        with self.engine.gathered_parameters():
            for i, rec in enumerate(records):
                gid = first_group + i
                cond = self.policy.condition(rec.prompt, rec.references, self.resolution, self.resolution)
                gen = torch.Generator(self.engine.device).manual_seed(
                    derive_seed(self.seed, "rollout", step, gid)
                )
                with self.engine.autocast():
                    trajs.append(
                        rollout(self.policy, cond, self.group_size, generator=gen, group_id=gid, **kwargs)
                    )
                if on_group is not None:
                    on_group(trajs[-1], rec)
        return trajs

    @torch.no_grad()
    def score(self, trajs: list[Trajectory], records: list[PromptRecord]) -> dict[str, Tensor]:
        """The reward of every group in turn, one call per group as :meth:`train` makes them (with or
        without overlap); ``[P*G]`` per key."""
        rewards = InlineRewards(self.reward)
        pending = [
            rewards.submit(t.images, self._reward_inputs(r, t.batch_size))
            for t, r in zip(trajs, records, strict=True)
        ]
        return concat_scores(pending, trajs[0].images.device)

    @staticmethod
    def _reward_inputs(record: PromptRecord, group_size: int) -> RewardInputs:
        return RewardInputs.from_records([record] * group_size)

    def update(self, trajs: list[Trajectory], scores: dict[str, Tensor]) -> dict[str, float]:
        """The objective's update on the step's rewards. Rewards of every rank are gathered (in rank
        order), so the objective's statistics (GRPO's advantages) and the logged reward statistics
        are those of the whole step's batch."""
        gather = self.engine.all_gather_tensor
        local_ids = torch.cat([t.group_ids for t in trajs])
        group_ids = gather(local_ids)
        scores = {k: gather(v) for k, v in scores.items()}
        components = reward_components(scores)
        rewards = StepRewards(
            scores=scores["score"],  # combined once, by the reward (rewards.base.weighted_score)
            group_ids=group_ids,
            is_local=torch.isin(group_ids, local_ids),  # this rank's samples in the gathered order
            components=components,
            weights=component_weights(self.reward, components),
        )
        self.policy.train()
        seed = derive_seed(self.seed, "objective", self.step)
        result = _merge_over_ranks(self.objective.update(self.policy, self.engine, trajs, rewards, seed))
        metrics = {**reward_metrics(scores), **result.metrics}
        if result.nonfinite_where is not None:
            self.nonfinite += 1
            metrics["train/nonfinite_skipped"] = float(self.nonfinite)
            if self.nonfinite >= self.max_nonfinite:
                raise NonFiniteError(
                    f"psr-rl: {self.nonfinite} updates skipped for a non-finite loss or log-prob (last at step "
                    f"{self.step}, {result.nonfinite_where}); lower optim.lr or raise train.max_nonfinite"
                )
        return metrics

    # ------------------------------------------------------------------ eval, grids, checkpoints
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """ODE samples of held-out prompts, scored by the same reward (deterministic noise).

        Each rank samples a contiguous share of the prompts; group ids are the prompts' global indices
        and scores are gathered in rank order, so the metrics are those one process would log. The
        grid shows rank 0's share.
        """
        if not self.heldout:
            return {}
        records = self.heldout[: self.eval_prompts]
        share, _ = split_evenly(len(records), self.engine.rank, self.engine.world_size)
        mine = records[share.start : share.stop]  # may be empty: fewer prompts than ranks
        with self.engine.ema_swap():  # the EMA weights when the engine keeps an EMA
            trajs = self.rollout(mine, step=-1, first_group=share.start, method="ode")
        local = self.score(trajs, mine) if mine else {}
        scores = gather_scores(local, self.engine.device)
        metrics = {k.replace("reward/", "eval/reward/"): v for k, v in reward_metrics(scores).items()}
        self.logger.log(metrics, step=self.step)
        if mine:
            self.log_grid(trajs, mine, local["score"], "eval/grid")
        return metrics

    def log_grid(
        self, trajs: list[Trajectory], records: list[PromptRecord], scores: Tensor, name: str
    ) -> None:
        if not self.engine.is_main:
            return
        rows, captions = [], []
        for traj, rec, s in zip(trajs, records, scores.split([t.batch_size for t in trajs]), strict=True):
            rows.append([r.float().cpu() for r in rec.references] + [im.cpu() for im in traj.images])
            captions.append(
                [f"ref {k + 1}" for k in range(len(rec.references))] + [f"{v:.3f}" for v in s.tolist()]
            )
        self.logger.log_images(name, make_grid(rows, captions), step=self.step)

    def save_checkpoint(self) -> Path:
        return save_training_checkpoint(
            self.ckpt_root,
            self.step,
            self.policy,
            self.engine,
            data_state=self.batches.state_dict(),
            extra={"nonfinite": self.nonfinite},
            keep_last=self.keep_last,
            export_lora=self.export_lora,
        )

    def cleanup(self) -> None:
        if isinstance(self.reward, RewardWorkers):
            self.reward.close()
        self.preemption.uninstall()
        self.logger.close()
        self.engine.cleanup()
        self.run_lock.release()  # last: the run's checkpoints and logs are complete


def main(cfg: DictConfig) -> None:
    """Entry point of ``psr-rl`` (see :mod:`psr.cli`)."""
    run_trainer(RLTrainer(cfg), "psr-rl")
