"""``psr-rl``: online GRPO or DPO on group rollouts, scored by the configured reward.

One step, top to bottom (:meth:`RLTrainer.train`):
  1. this rank's prompt groups (a group never straddles ranks, so its statistics are whole);
  2. ``rollout`` of G samples per group with per-step log-probs (SDE on the configured window);
  3. the reward on all images of the step in one batched call;
  4. group advantages (GRPO) or in-group pairs (DPO);
  5. the objective's update through the engine (gradient accumulation over groups, steps, samples);
  6. telemetry, image grid, held-out evaluation, checkpoint; a preemption signal saves and exits.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from psr import checkpoint as ckpt
from psr.data.dataset import PromptRecord
from psr.distributed import split_evenly
from psr.objectives.advantages import combine_rewards, group_advantages
from psr.objectives.rl import DPOObjective, GRPOObjective, merge_metrics
from psr.sampling.sampler import rollout
from psr.trainers import common
from psr.types import Trajectory


class NonFiniteError(RuntimeError):
    """Raised after ``train.max_nonfinite`` updates were skipped for a non-finite loss or log-prob."""


def _merge_over_ranks(loss: float, metrics: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """The loss and objective metrics of the whole step: means over ranks (``*_min`` / ``*_max``:
    min / max), each over the ranks that report it (a rank whose groups all had zero variance
    reports none)."""
    from psr.distributed import all_gather_object

    parts = all_gather_object((loss, metrics))
    if len(parts) == 1:
        return loss, metrics
    values: dict[str, list[float]] = {}
    for _, m in parts:
        for key, v in m.items():
            if key != "nonfinite_where":
                values.setdefault(key, []).append(v)
    out: dict[str, Any] = merge_metrics(values)
    where = [m["nonfinite_where"] for _, m in parts if "nonfinite_where" in m]
    if where:
        out["nonfinite_where"] = where[0]
    return sum(p[0] for p in parts) / len(parts), out


class RLTrainer:
    """GRPO / DPO recipe. ``__init__`` reads scalars; ``setup`` builds; ``train`` runs."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.run_dir = common.resolve_run_dir(cfg)
        self.seed = int(cfg.seed)
        t = cfg.train
        self.total_steps = int(t.steps)
        self.prompts_per_step = int(t.prompts_per_step)
        self.group_size = int(t.group_size)
        self.resolution = int(t.resolution)
        self.max_nonfinite = int(t.max_nonfinite)
        self.eval_every, self.grid_every = int(t.eval_every), int(t.grid_every)
        self.checkpoint_every, self.keep_last = int(t.checkpoint_every), int(t.keep_last)
        self.sampler_kwargs = dict(
            num_steps=int(cfg.sampler.num_steps),
            kind=str(cfg.sampler.kind),
            noise_level=float(cfg.sampler.noise_level),
            sde_window=tuple(cfg.sampler.sde_window) if cfg.sampler.sde_window is not None else None,
            same_noise=bool(cfg.sampler.same_noise),
        )
        self.step = 0
        self.nonfinite = 0

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.engine = common.build_engine(cfg)
        common.seed_everything(self.seed, self.engine.rank)
        algo = cfg.algo
        needs_reference = algo.name == "dpo" or float(algo.get("beta", 0.0)) > 0
        self.policy, params = common.build_policy(cfg, self.engine.device, reference=needs_reference)
        self.engine.setup(self.policy.transformer, params, **common.optim_kwargs(cfg, self.total_steps))
        reward_device = cfg.get("reward_device") or self.engine.device
        self.reward = common.build_reward(cfg, reward_device)
        self.objective = self._build_objective(cfg.algo)
        self.records, self.heldout = common.build_prompt_records(cfg, self.run_dir)
        self.sampler = common.group_sampler(self.records, self.prompts_per_step, self.engine, self.seed)
        self.logger = common.build_logger(cfg, self.run_dir, self.engine.rank)
        self.timer = common.StepTimer()
        self.preemption = ckpt.PreemptionHandler(requeue=bool(cfg.get("requeue_on_preemption", True)))
        self.ckpt_root = self.run_dir / "checkpoints"
        self._resume(cfg.resume)

    def _build_objective(self, algo: DictConfig) -> GRPOObjective | DPOObjective:
        kwargs: dict[str, Any] = OmegaConf.to_container(algo, resolve=True)  # type: ignore[assignment]
        name = kwargs.pop("name")
        micro = int(self.cfg.train.micro_batch)
        epochs = int(self.cfg.train.inner_epochs)
        if name == "grpo":
            return GRPOObjective(**kwargs, micro_batch=micro, inner_epochs=epochs)
        if name == "dpo":
            return DPOObjective(**kwargs, micro_batch=micro, inner_epochs=epochs)
        raise ValueError(f"algo.name={name!r}; expected grpo or dpo")

    def _resume(self, resume: str | None) -> None:
        state = common.resume_state(resume, self.ckpt_root, self.policy, self.engine, "psr-rl")
        if state is not None:
            self.step = int(state["step"])
            self.nonfinite = int(state.get("nonfinite", 0))
            self.sampler.load_state_dict(state["data"])

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        bar = common.progress(
            range(self.step, self.total_steps), "psr-rl", self.engine.rank, initial=self.step
        )
        for step in bar:
            self.step = step
            records = self.sampler.next_batch()
            with self.timer("rollout"):
                trajs = self.rollout(records, step)
            with self.timer("reward"):
                scores = self.score(trajs, records)
            with self.timer("update"):
                metrics = self.update(trajs, scores)
            metrics.update(self.timer.pop())
            self.step = step + 1
            self.preemption.poll()  # collective: every rank stops at the same step
            self.logger.log(metrics, step=self.step)
            if self.grid_every and self.step % self.grid_every == 0:
                self.log_grid(trajs, records, scores["score"], "train/grid")
            if self.eval_every and self.step % self.eval_every == 0:
                self.evaluate()
            if common.checkpoint_or_stop(
                "psr-rl",
                self.step,
                self.total_steps,
                self.checkpoint_every,
                self.preemption,
                self.save_checkpoint,
            ):
                return

    def rollout(
        self, records: list[PromptRecord], step: int, first_group: int | None = None, **overrides: Any
    ) -> list[Trajectory]:
        """G samples for each record. Group ids are global (rank r holds groups ``r P .. r P + P - 1``)
        and the generator is a function of (seed, step, group id), so a resumed run draws exactly the
        noise an uninterrupted one would, and 2 ranks draw what 1 rank with the same batch would."""
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
                    common.derive_seed(self.seed, step, gid)
                )
                with self.engine.autocast():
                    trajs.append(
                        rollout(self.policy, cond, self.group_size, generator=gen, group_id=gid, **kwargs)
                    )
        return trajs

    @torch.no_grad()
    def score(self, trajs: list[Trajectory], records: list[PromptRecord]) -> dict[str, Tensor]:
        """The reward on every image of the step in one batched call; ``[P*G]`` per key."""
        images = torch.cat([t.images for t in trajs])
        inputs = common.reward_inputs([r for r in records for _ in range(self.group_size)])
        out = self.reward(images, inputs)
        return {k: v.float().to(images.device) for k, v in out.items()}

    def update(self, trajs: list[Trajectory], scores: dict[str, Tensor]) -> dict[str, float]:
        """Advantages (or pairs) and the objective's update. Rewards of every rank are gathered, so
        the advantages and the logged statistics are those of the whole step's batch."""
        gather = self.engine.all_gather_tensor
        local_ids = torch.cat([t.group_ids for t in trajs])
        group_ids = gather(local_ids)
        scores = {k: gather(v) for k, v in scores.items()}
        mine = torch.isin(group_ids, local_ids)  # this rank's samples in the gathered order
        metrics = common.reward_metrics(scores)
        components = common.reward_components(scores)
        rewards = (
            combine_rewards(
                components,
                common.component_weights(self.reward, components),
                group_ids,
                normalize_per_reward=bool(self.cfg.advantage.normalize_per_reward),
            )
            if len(components) > 1
            else scores["score"]
        )
        # NaN: no reward applies to the sample (e.g. a spatial reward for a prompt without a relation):
        # it gets advantage 0 and no DPO pair, and does not enter any group statistic
        valid = ~torch.isnan(rewards)
        seed = common.derive_seed(self.seed, self.step)
        sizes = [t.batch_size for t in trajs]
        if isinstance(self.objective, GRPOObjective):
            adv_cfg = self.cfg.advantage
            advantages = torch.zeros_like(rewards)
            if bool(valid.any()):
                advantages[valid], adv_metrics = group_advantages(
                    rewards[valid],
                    group_ids[valid],
                    global_std=bool(adv_cfg.global_std),
                    eps=float(adv_cfg.eps),
                    clip=float(adv_cfg.clip),
                )
                metrics.update(adv_metrics)
            self.policy.train()
            loss, obj_metrics = self.objective.update(
                self.policy, self.engine, trajs, list(advantages[mine].split(sizes)), seed=seed
            )
        else:
            self.policy.train()
            loss, obj_metrics = self.objective.update(
                self.policy, self.engine, trajs, list(rewards[mine].split(sizes)), seed=seed
            )
        loss, obj_metrics = _merge_over_ranks(loss, obj_metrics)
        metrics.update(obj_metrics)
        if not math.isfinite(loss):
            self.nonfinite += 1
            metrics["train/nonfinite_skipped"] = float(self.nonfinite)
            if self.nonfinite >= self.max_nonfinite:
                raise NonFiniteError(
                    f"psr-rl: {self.nonfinite} updates skipped for a non-finite loss or log-prob (last at step "
                    f"{self.step}, {obj_metrics.get('nonfinite_where', 'unknown place')}); "
                    f"lower optim.lr or raise train.max_nonfinite"
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
        records = self.heldout[: int(self.cfg.train.eval_prompts)]
        share, _ = split_evenly(len(records), self.engine.rank, self.engine.world_size)
        mine = records[share.start : share.stop]  # may be empty: fewer prompts than ranks
        with self.engine.ema_swap():  # the EMA weights when the engine keeps an EMA
            trajs = self.rollout(mine, step=-1, first_group=share.start, kind="ode")
        local = self.score(trajs, mine) if mine else {}
        scores = common.gather_scores(self.engine, local)
        metrics = {k.replace("reward/", "eval/reward/"): v for k, v in common.reward_metrics(scores).items()}
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
        self.logger.log_images(name, common.make_grid(rows, captions), step=self.step)

    def save_checkpoint(self) -> Path:
        return common.save_training_checkpoint(
            self.ckpt_root,
            self.step,
            self.policy,
            self.engine,
            data_state=self.sampler.state_dict(),
            extra={"nonfinite": self.nonfinite},
            keep_last=self.keep_last,
            export_lora=bool(self.cfg.train.export_lora),
        )

    def cleanup(self) -> None:
        self.preemption.uninstall()
        self.logger.close()
        self.engine.cleanup()


def main(cfg: DictConfig) -> None:
    """Entry point of ``psr-rl`` (see :mod:`psr.cli`)."""
    common.run_trainer(RLTrainer(cfg), "psr-rl")
