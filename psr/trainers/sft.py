"""``psr-sft``: multi-reference supervised fine-tuning with the flow-matching loss (docs/method.md §1-2).

One step, top to bottom (:meth:`SFTTrainer.train`):
  1. ``train.grad_accum`` micro-batches of same-bucket records from the data loader, each record
     drawn with its number and order of references (:mod:`psr.data.dataset`);
  2. per micro-batch: clean target latents, the conditioning of every record (text, clean reference
     tokens with frame-wise ids), noise levels and noise from a generator keyed by (seed, step, the
     micro-batch's index in the global batch), and the flow-matching loss on the target tokens
     (:mod:`psr.objectives.flow_matching`);
  3. ``engine.step()``: gradient clipping, optimizer, LR schedule, EMA;
  4. telemetry, validation (ODE samples of held-out records, rewards, an image grid), checkpoint
     with a diffusers-format LoRA next to it; a preemption signal saves and exits.

Resume is exact: the data position, every random draw and the full training state are restored, so
a killed and resumed run logs the same losses as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from psr.checkpoint import checkpoint_or_stop, save_training_checkpoint
from psr.config import (
    DatasetSettings,
    LoaderSettings,
    OptimSettings,
    SFTTrainSettings,
    ValidationSettings,
    check_schedule,
    settings,
)
from psr.data.dataset import BucketBatchSampler, SFTDataset, collate_sft, position_after
from psr.data.sources import load_records
from psr.distributed import gather_scores, split_evenly
from psr.logging import MetricLogger, StepTimer, build_logger, make_grid, progress, reward_metrics
from psr.models.lora import make_trainable
from psr.plan import StepFlops, perf_metrics
from psr.preemption import PreemptionHandler
from psr.resume import finish_resume, load_resume, start_from
from psr.runlock import lock_run_dir
from psr.seeding import derive_seed, seed_everything
from psr.trainers import resolve_run_dir, run_trainer
from psr.types import Batch
from rewards.base import RewardInputs, build_reward

__all__ = ["SFTTrainer", "main"]


class SFTTrainer:
    """The SFT recipe. ``__init__`` reads scalars; ``setup`` builds; ``train`` runs."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.seed = int(cfg.seed)
        # the typed sections (psr.schema): a value of the wrong type or out of range fails here,
        # before anything is built, naming its key
        self.train_settings = t = settings(cfg.train, SFTTrainSettings, "train")
        self.dataset_settings = settings(cfg.dataset, DatasetSettings, "dataset")
        self.loader = settings(cfg.loader, LoaderSettings, "loader")
        self.optim = settings(cfg.optim, OptimSettings, "optim")
        check_schedule(self.optim, t.steps)
        v = settings(cfg.validation, ValidationSettings, "validation")
        self.total_steps = t.steps
        self.micro_batch_size = t.micro_batch_size
        self.grad_accum = t.grad_accum
        self.log_every = t.log_every
        self.checkpoint_every, self.keep_last = t.checkpoint_every, t.keep_last
        self.export_lora = t.export_lora  # LoRA runs only: save_training_checkpoint skips it for full
        self.val_every, self.val_records, self.val_steps = v.every, v.records, v.num_steps
        self.peak_tflops = cfg.get("peak_tflops")  # perf/tflops and perf/mfu when set
        self.step = 0
        self.data_state: dict[str, int] | None = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.run_dir = resolve_run_dir(cfg.run_dir)
        self.engine = instantiate(cfg.engine)  # device, rank and precision everything below is built for
        self.run_lock = lock_run_dir(self.run_dir, "psr-sft", rank=self.engine.rank)  # before any write there
        seed_everything(self.seed, self.engine.rank)
        self.ckpt_root = self.run_dir / "checkpoints"
        # read before the model is built: a resumed checkpoint fixes the init_from checkpoint it starts from
        self.resumed = load_resume(cfg.resume, self.ckpt_root, "psr-sft", self.engine.rank)
        self.policy, params = self._setup_policy(cfg.model, cfg.init_from)
        self._setup_engine(params)
        self.objective = instantiate(cfg.objective)
        self._setup_data(cfg.data)
        self.reward = self._setup_reward(cfg.validation.reward)
        self.logger = self._setup_logger(cfg)
        self.timer = StepTimer()
        # FLOPs per record from one symbolic step on the meta device, once per reference count
        self.step_flops = StepFlops(cfg, "sft") if self.peak_tflops else None
        self.preemption = PreemptionHandler(requeue=bool(cfg.requeue_on_preemption))
        self._resume(cfg)
        self.logger.resume_at(self.step)  # drop what a killed run logged after its checkpoint
        self.batches = iter(self._data_loader())  # after _resume: from the restored position

    def _setup_policy(self, cfg_model: DictConfig, init_from: str | None) -> tuple[Any, list[nn.Parameter]]:
        """The model on the engine's device and its trainable parameters (``train.mode``, ``train.lora``)."""
        policy = instantiate(cfg_model, device=str(self.engine.device))
        if init_from:  # before adapters and engine (psr.resume.start_from)
            start_from(policy, init_from, self.resumed)
        lora = dataclasses.asdict(self.train_settings.lora)
        return policy, make_trainable(policy, self.train_settings.mode, **lora)

    def _setup_engine(self, params: list[nn.Parameter]) -> None:
        """The transformer, its trainable parameters and the ``optim`` settings go to the engine."""
        self.engine.setup(
            self.policy.transformer,
            params,
            **dataclasses.asdict(self.optim),
            total_steps=self.total_steps,
            grad_accum=self.grad_accum,
            micro_batch_size=self.micro_batch_size,
        )

    def _setup_data(self, cfg_data: DictConfig) -> None:
        train, heldout, root = load_records(cfg_data, self.run_dir)  # the source data._target_ names
        dataset = dataclasses.asdict(self.dataset_settings)
        self.dataset = SFTDataset(train, root, **dataset)
        # validation: every subject's reference in the record's order, same buckets
        fixed = dict(
            num_references=(), num_references_probs=(), shuffle_references=False, reference_dropout=0.0
        )
        self.val_dataset = SFTDataset(heldout[: self.val_records], root, **{**dataset, **fixed})
        if self.val_every and len(self.val_dataset) == 0:
            raise ValueError(
                f"validation.every={self.val_every} but there are no held-out records: set data.heldout and "
                "validation.records > 0, or validation.every=0"
            )
        self.batch_sampler = BucketBatchSampler(
            self.dataset.bucket_of,
            self.micro_batch_size,
            seed=self.seed,
            rank=self.engine.rank,
            world_size=self.engine.world_size,
        )

    def _data_loader(self) -> torch.utils.data.DataLoader:
        workers = self.loader.num_workers
        prefetch = (
            dict(prefetch_factor=self.loader.prefetch_factor, persistent_workers=True) if workers else {}
        )
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self.batch_sampler,
            num_workers=workers,
            collate_fn=collate_sft,
            pin_memory=self.loader.pin_memory and torch.cuda.is_available(),
            **prefetch,  # type: ignore[arg-type]
        )

    def _setup_reward(self, cfg_reward: DictConfig | None) -> Any:
        """The validation reward (``validation.reward``), or None: loss and grid only."""
        return build_reward(cfg_reward, self.engine.device) if self.val_every and cfg_reward else None

    def _setup_logger(self, cfg: DictConfig) -> MetricLogger:
        run_config: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        return build_logger(run_config["logger"], self.run_dir, run_config=run_config, rank=self.engine.rank)

    def _resume(self, cfg: DictConfig) -> None:
        """Restore the checkpoint :func:`~psr.resume.load_resume` read (after checking this start's config
        against the first start's), or record this config as the first start's."""
        config: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        state = finish_resume(self.resumed, self.engine, self.run_dir, self.ckpt_root, config, "psr-sft")
        self.resumed = None  # the CPU copy of the checkpoint is no longer needed
        if state is not None:
            self.step = int(state["step"])
            self.data_state = state["data"]
            self.batch_sampler.load_state_dict(state["data"])

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        if self.val_every and self.step == 0:
            self.validate()  # the starting point of the validation curves
        bar = progress(range(self.step, self.total_steps), "psr-sft", self.engine.rank, initial=self.step)
        for step in bar:
            with self.timer("data"):
                batches = [next(self.batches) for _ in range(self.grad_accum)]
            with self.timer("update"):
                metrics = self.train_step(batches, step)
            metrics.update(self.timer.pop())
            if self.step_flops is not None:
                flops = self.step_flops([len(r) for b in batches for r in b.references])
                metrics.update(perf_metrics(flops, metrics["time/update"], self.peak_tflops))
            self.step, self.data_state = step + 1, position_after(batches[-1])
            self.preemption.poll()  # collective: every rank stops at the same step
            if self.step % self.log_every == 0 or self.step == self.total_steps:
                self.logger.log(metrics, step=self.step)
            if self.val_every and self.step % self.val_every == 0:
                self.validate()
            due = self.step % self.checkpoint_every == 0 or self.step == self.total_steps
            if checkpoint_or_stop("psr-sft", self.step, due, self.preemption, self.save_checkpoint):
                return

    def train_step(self, batches: list[Batch], step: int) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns the step's metrics."""
        self.policy.train()  # the transformer only: FlowPolicy.train keeps the frozen encoders in eval
        losses, sigmas = [], []
        for i, batch in enumerate(batches):
            # keyed by the micro-batch's index in the global batch (rank r holds r * grad_accum + i), so
            # 2 ranks x 1 micro-batch draw the noise 1 rank x 2 micro-batches of accumulation draws
            micro = self.engine.rank * self.grad_accum + i
            gen = torch.Generator(self.engine.device).manual_seed(
                derive_seed(self.seed, "sft_noise", step, micro)
            )
            with self.engine.autocast():
                loss, parts = self.batch_loss(batch, gen)
            self.engine.backward(loss / self.grad_accum)
            losses.append(loss.detach())
            sigmas.append(parts["sigma"])
        out = self.engine.step()  # {"grad_norm", "lr", "skipped"}
        loss = self.engine.all_reduce_mean(torch.stack(losses).mean())
        refs = [len(r) for b in batches for r in b.references]
        return {
            "train/loss": float(loss),
            "train/grad_norm": out["grad_norm"],
            "train/lr": out["lr"],
            "train/skipped": out["skipped"],
            # means over every rank's samples (equal counts per rank), not rank 0's alone
            "train/sigma_mean": float(self.engine.all_reduce_mean(torch.cat(sigmas).mean())),
            "train/num_references": float(
                self.engine.all_reduce_mean(torch.tensor(sum(refs) / len(refs), dtype=torch.float64))
            ),
        }

    def batch_loss(self, batch: Batch, generator: torch.Generator | None) -> tuple[Tensor, dict[str, Tensor]]:
        """Flow-matching loss of one micro-batch (mean over its samples) and per-sample parts."""
        device = self.engine.device
        h, w = batch.target.shape[-2:]
        x0 = self.policy.encode_images(batch.target.to(device))  # [B, N, C], no gradient (frozen VAE)
        conds = [
            self.policy.condition(p, refs, h, w)
            for p, refs in zip(batch.prompts, batch.references, strict=True)
        ]
        b, n = x0.shape[:2]
        # drawn for the whole micro-batch first, so the draws do not depend on how samples are grouped
        sigmas = self.objective.sample(b, n, self.policy.scheduler_config, generator, device)
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=torch.float32)
        total: Tensor | float = 0.0
        mse = torch.empty(b, device=device)
        for idx, cond in self.policy.stack_conditionings(conds):
            loss, parts = self.objective(self.policy, x0[idx], cond, sigmas=sigmas[idx], noise=noise[idx])
            total = total + loss * (len(idx) / b)
            mse[idx] = parts["mse"].to(mse.dtype)
        return total, {"mse": mse, "sigma": sigmas}  # type: ignore[return-value]

    # ------------------------------------------------------------------ validation, checkpoints
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Held-out records: a fixed-draw loss, ODE samples scored by the rewards, an image grid.

        Each rank takes a contiguous share of the records; draws are seeded by the record's global
        index and results are gathered in rank order, so the metrics are those of one process. Ranks
        run equally many forwards (a short share repeats a record with no weight: ZeRO-3 gathers
        parameters in every forward). The grid shows rank 0's share.
        """
        if len(self.val_dataset) == 0:
            return {}
        from psr.sampling.rollout import rollout

        self.policy.eval()
        device = self.engine.device
        share, size = split_evenly(len(self.val_dataset), self.engine.rank, self.engine.world_size)
        padded = [*share, *[share[-1] if share else 0] * (size - len(share))]
        items = [self.val_dataset[i] for i in padded]
        losses, images, rows, captions = [], [], [], []
        with self.engine.ema_swap(), self.engine.autocast():
            for k, (i, it) in enumerate(zip(padded, items, strict=True)):
                batch = collate_sft([it])
                gen = torch.Generator(device).manual_seed(derive_seed(self.seed, "validation", i))
                loss = self.batch_loss(batch, gen)[0].float()
                h, w = it["target"].shape[-2:]
                cond = self.policy.condition(it["prompt"], it["references"], h, w)
                with self.engine.gathered_parameters():
                    traj = rollout(
                        self.policy, cond, 1, num_steps=self.val_steps, method="ode", generator=gen
                    )
                if k >= len(share):
                    continue  # padding
                losses.append(loss.reshape(1))
                images.append(traj.images[0].float().cpu())
                rows.append([r.cpu() for r in it["references"]] + [it["target"], images[-1]])
                captions.append(
                    [f"ref {j + 1}: {s}" for j, s in enumerate(it["meta"]["subjects"])] + ["target", "sample"]
                )
        items = items[: len(share)]
        empty = torch.empty(0, device=device)
        all_losses = self.engine.all_gather_tensor(torch.cat(losses) if losses else empty)
        metrics = {"val/loss": float(all_losses.mean())}
        if self.reward is not None:
            local: dict[str, Tensor] = {}
            if items:
                inputs = RewardInputs.from_records(
                    [
                        {
                            "prompt": it["meta"]["instruction"],
                            "references": it["references"],
                            "names": it["meta"]["subjects"],
                            "categories": it["meta"]["categories"],
                        }
                        for it in items
                    ]
                )
                local = {
                    k: v.float().to(device)
                    for k, v in self.reward(torch.stack(images).to(device), inputs).items()
                }
                for row, s in zip(captions, local["score"].tolist(), strict=True):
                    row[-1] = f"sample {s:.3f}"
            scores = gather_scores(local, device)
            metrics.update(
                {k.replace("reward/", "val/reward/"): v for k, v in reward_metrics(scores).items()}
            )
        self.logger.log(metrics, step=self.step)
        if self.engine.is_main:
            self.logger.log_images("val/grid", make_grid(rows, captions), step=self.step)
        return metrics

    def save_checkpoint(self) -> Path:
        return save_training_checkpoint(
            self.ckpt_root,
            self.step,
            self.policy,
            self.engine,
            data_state=self.data_state or self.batch_sampler.state_dict(),
            keep_last=self.keep_last,
            export_lora=self.export_lora,
        )

    def cleanup(self) -> None:
        self.preemption.uninstall()
        self.logger.close()
        self.engine.cleanup()
        self.run_lock.release()  # last: the run's checkpoints and logs are complete


def main(cfg: DictConfig) -> None:
    """Entry point of ``psr-sft`` (see :mod:`psr.cli`)."""
    run_trainer(SFTTrainer(cfg), "psr-sft")
