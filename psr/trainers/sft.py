"""``psr-sft``: multi-reference supervised fine-tuning with the flow-matching loss (PSR_METHOD.md §1-2).

One step, top to bottom (:meth:`SFTTrainer.train`):
  1. ``train.grad_accum`` micro-batches of same-bucket records from the data loader, each record
     drawn with its number and order of references (:mod:`psr.data.dataset`);
  2. per micro-batch: clean target latents, the conditioning of every record (text, clean reference
     tokens with frame-wise ids), noise levels and noise from a generator keyed by (seed, step, rank,
     micro-batch), and the flow-matching loss on the target tokens (:mod:`psr.objectives.flow_matching`);
  3. ``engine.step()``: gradient clipping, optimizer, LR schedule, EMA;
  4. telemetry, validation (ODE samples of held-out records, rewards, an image grid), checkpoint
     with a diffusers-format LoRA next to it; a preemption signal saves and exits.

Resume is exact: the data position, every random draw and the full training state are restored, so
a killed and resumed run logs the same losses as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor

from psr import checkpoint as ckpt
from psr.data.dataset import BucketBatchSampler, SFTDataset, collate_sft, derive_seed, position_after
from psr.distributed import split_evenly
from psr.trainers import common
from psr.trainers.common import load_initial_weights
from psr.types import Batch, Conditioning

__all__ = ["SFTTrainer", "main", "load_initial_weights", "stack_conditionings"]


def stack_conditionings(conds: list[Conditioning]) -> list[tuple[list[int], Conditioning]]:
    """Group per-sample conditionings that share their token layout into stacked ones.

    Samples whose references give the same position ids (same number and grid sizes) and whose
    targets have the same size go through the transformer in one forward: their text and reference
    tensors are concatenated along the batch dimension (``prompt_embeds`` ``[g, L, D]``,
    ``pooled_prompt_embeds`` ``[g, D]``, ``ref_tokens`` ``[g, R, C]``), which
    :meth:`~psr.models.policy.FlowPolicy.velocity` accepts as is.

    Returns:
        ``[(sample indices, stacked conditioning), ...]`` covering every index once, in first-seen order.
    """
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(conds):
        key = (
            c.height,
            c.width,
            tuple(c.text_ids.shape),
            tuple(c.ref_ids.shape),
            c.ref_ids.float().cpu().numpy().tobytes(),
        )
        groups.setdefault(key, []).append(i)
    out = []
    for idx in groups.values():
        first = conds[idx[0]]
        out.append(
            (
                idx,
                Conditioning(
                    prompt_embeds=torch.cat([conds[i].prompt_embeds for i in idx]),
                    pooled_prompt_embeds=torch.cat([conds[i].pooled_prompt_embeds for i in idx]),
                    text_ids=first.text_ids,
                    ref_tokens=torch.cat([conds[i].ref_tokens for i in idx]),
                    ref_ids=first.ref_ids,
                    img_ids=first.img_ids,
                    height=first.height,
                    width=first.width,
                    guidance=first.guidance,
                    num_references=first.num_references,
                    prompt=first.prompt,
                ),
            )
        )
    return out


class SFTTrainer:
    """The SFT recipe. ``__init__`` reads scalars; ``setup`` builds; ``train`` runs."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.seed = int(cfg.seed)
        t = cfg.train
        self.total_steps = int(t.steps)
        self.batch_size = int(t.batch_size)
        self.grad_accum = int(t.grad_accum)
        self.log_every = int(t.log_every)
        self.checkpoint_every, self.keep_last = int(t.checkpoint_every), int(t.keep_last)
        self.export_lora = bool(t.export_lora)  # LoRA runs only: save_training_checkpoint skips it for full
        v = cfg.validation
        self.val_every, self.val_records, self.val_steps = int(v.every), int(v.records), int(v.num_steps)
        if self.total_steps < 1 or self.grad_accum < 1 or self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError(
                "train.steps, train.grad_accum, train.checkpoint_every and train.log_every must be >= 1"
            )
        self.step = 0
        self.data_state: dict[str, int] | None = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from hydra.utils import instantiate

        cfg = self.cfg
        self.run_dir = common.resolve_run_dir(cfg)
        self.engine = common.build_engine(cfg)
        common.seed_everything(self.seed, self.engine.rank)
        self.policy, params = common.build_policy(cfg, self.engine.device)
        self.engine.setup(self.policy.transformer, params, **common.optim_kwargs(cfg, self.total_steps))
        self.objective = instantiate(cfg.objective)
        train, heldout, root = common.load_records(cfg.data, self.run_dir)
        self.dataset = SFTDataset(train, root, **common.to_plain(cfg.dataset))
        # validation: every subject's reference in the record's order, same buckets
        val_kw = {
            **common.to_plain(cfg.dataset),
            "num_references": (),
            "num_references_probs": (),
            "shuffle_references": False,
            "reference_dropout": 0.0,
        }
        self.val_dataset = SFTDataset(heldout[: self.val_records], root, **val_kw)
        self.sampler = BucketBatchSampler(
            self.dataset.bucket_of,
            self.batch_size,
            seed=self.seed,
            rank=self.engine.rank,
            world_size=self.engine.world_size,
        )
        if self.val_every and len(self.val_dataset) == 0:
            raise ValueError(
                f"validation.every={self.val_every} but there are no held-out records: set data.heldout and "
                "validation.records > 0, or validation.every=0"
            )
        self.reward = None
        if self.val_every and cfg.validation.reward:
            self.reward = common.build_reward(cfg.validation.reward, self.engine.device)
        self.logger = common.build_logger(cfg, self.run_dir, self.engine.rank)
        self.timer = common.StepTimer()
        self.preemption = ckpt.PreemptionHandler(requeue=bool(cfg.get("requeue_on_preemption", True)))
        self.ckpt_root = self.run_dir / "checkpoints"
        self._resume(cfg.resume)
        self.batches = iter(common.data_loader(self.dataset, self.sampler, collate_sft, cfg.loader))

    def _resume(self, resume: str | None) -> None:
        state = common.resume_state(resume, self.ckpt_root, self.policy, self.engine, "psr-sft")
        if state is not None:
            self.step = int(state["step"])
            self.data_state = state["data"]
            self.sampler.load_state_dict(state["data"])

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        if self.val_every and self.step == 0:
            self.validate()  # the starting point of the validation curves
        bar = common.progress(
            range(self.step, self.total_steps), "psr-sft", self.engine.rank, initial=self.step
        )
        for step in bar:
            with self.timer("data"):
                batches = [next(self.batches) for _ in range(self.grad_accum)]
            with self.timer("update"):
                metrics = self.train_step(batches, step)
            metrics.update(self.timer.pop())
            self.step, self.data_state = step + 1, position_after(batches[-1])
            self.preemption.poll()  # collective: every rank stops at the same step
            if self.step % self.log_every == 0 or self.step == self.total_steps:
                self.logger.log(metrics, step=self.step)
            if self.val_every and self.step % self.val_every == 0:
                self.validate()
            if common.checkpoint_or_stop(
                "psr-sft",
                self.step,
                self.total_steps,
                self.checkpoint_every,
                self.preemption,
                self.save_checkpoint,
            ):
                return

    def train_step(self, batches: list[Batch], step: int) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns the step's metrics."""
        self.policy.train()  # the transformer only: FlowPolicy.train keeps the frozen encoders in eval
        losses, sigmas = [], []
        for i, batch in enumerate(batches):
            gen = torch.Generator(self.engine.device).manual_seed(
                derive_seed(self.seed, step, self.engine.rank, i)
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
            "train/sigma_mean": float(torch.cat(sigmas).mean()),
            "train/num_references": sum(refs) / len(refs),
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
        for idx, cond in stack_conditionings(conds):
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
        from psr.sampling.sampler import rollout

        self.policy.eval()
        device = self.engine.device
        share, size = split_evenly(len(self.val_dataset), self.engine.rank, self.engine.world_size)
        padded = [*share, *[share[-1] if share else 0] * (size - len(share))]
        items = [self.val_dataset[i] for i in padded]
        losses, images, rows, captions = [], [], [], []
        with self.engine.ema_swap(), self.engine.autocast():
            for k, (i, it) in enumerate(zip(padded, items, strict=True)):
                batch = collate_sft([it])
                gen = torch.Generator(device).manual_seed(derive_seed(self.seed, 2**31, i))
                loss = self.batch_loss(batch, gen)[0].float()
                h, w = it["target"].shape[-2:]
                cond = self.policy.condition(it["prompt"], it["references"], h, w)
                with self.engine.gathered_parameters():
                    traj = rollout(self.policy, cond, 1, num_steps=self.val_steps, kind="ode", generator=gen)
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
                inputs = common.reward_inputs(
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
            scores = common.gather_scores(self.engine, local)
            metrics.update(
                {k.replace("reward/", "val/reward/"): v for k, v in common.reward_metrics(scores).items()}
            )
        self.logger.log(metrics, step=self.step)
        if self.engine.is_main:
            self.logger.log_images("val/grid", common.make_grid(rows, captions), step=self.step)
        return metrics

    def save_checkpoint(self) -> Path:
        return common.save_training_checkpoint(
            self.ckpt_root,
            self.step,
            self.policy,
            self.engine,
            data_state=self.data_state or self.sampler.state_dict(),
            keep_last=self.keep_last,
            export_lora=self.export_lora,
        )

    def cleanup(self) -> None:
        self.preemption.uninstall()
        self.logger.close()
        self.engine.cleanup()


def main(cfg: DictConfig) -> None:
    """Entry point of ``psr-sft`` (see :mod:`psr.cli`)."""
    common.run_trainer(SFTTrainer(cfg), "psr-sft")
