"""psr-sft end to end on the tiny model (CPU): the real config composed with Hydra, the real recipe."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from trainer_helpers import (
    BIN,
    CONF,
    kill_after_checkpoint,
    metric,
    run_cli,
    signal_at,
    start_trainer,
    trained_policy,
    velocities_with_exported_lora,
)

# Small and fast: synthetic records at 32 px (2x2 target tokens), LoRA rank 4, no validation.
BASE = [
    "data=synthetic",
    "data.num_records=6",
    "data.heldout=2",
    "data.image_size=32",
    "dataset.resolution=32",
    "train.micro_batch_size=2",
    "train.lora.rank=4",
    "train.lora.alpha=4",
    "train.checkpoint_every=2",
    "loader.num_workers=0",
    "validation.every=0",
    "validation.num_steps=3",
    "optim.lr=1e-3",
]


def compose(run_dir: Path, *overrides: str, base: list[str] = BASE):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("sft", overrides=[*base, f"run_dir={run_dir}", *overrides])


def losses(run_dir: Path) -> dict[int, float]:
    return metric(run_dir, "train/loss")


def trainer_for(run_dir: Path, *overrides: str):
    from psr.trainers.sft import SFTTrainer

    trainer = SFTTrainer(compose(run_dir, *overrides))
    trainer.setup()
    return trainer


def test_stacked_batch_loss_equals_per_sample_losses(tmp_path):
    """Samples sharing a token layout go through one forward; the loss must not change by it."""
    trainer = trainer_for(
        tmp_path,
        "dataset.num_references=[2,3]",
        "dataset.num_references_probs=[0.5,0.5]",
        "data.num_records=8",
    )
    try:
        batch = next(trainer.batches)
        for _ in range(50):  # a micro-batch holding both 2- and 3-reference samples
            if len({len(r) for r in batch.references}) > 1:
                break
            batch = next(trainer.batches)
        gen = torch.Generator().manual_seed(0)
        loss, parts = trainer.batch_loss(batch, gen)
        policy, obj = trainer.policy, trainer.objective
        x0 = policy.encode_images(batch.target)
        per_sample = [
            (policy.condition(prompt, refs, 32, 32), slice(i, i + 1))
            for i, (prompt, refs) in enumerate(zip(batch.prompts, batch.references, strict=True))
        ]
        # the same draws from the same generator state, then one forward per sample
        gen = torch.Generator().manual_seed(0)
        sigmas = obj.sample(x0.shape[0], x0.shape[1], policy.scheduler_config, gen, "cpu")
        noise = torch.randn(x0.shape, generator=gen)
        separate = torch.stack(
            [obj(policy, x0[sl], cond, sigmas=sigmas[sl], noise=noise[sl])[0] for cond, sl in per_sample]
        )
        torch.testing.assert_close(loss, separate.mean(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(parts["sigma"], sigmas)
    finally:
        trainer.cleanup()


def test_overfits_four_records(tmp_path):
    """Full fine-tuning on 4 records for 50 steps: the loss on fixed draws falls below half.

    Fixed draws (the same records, reference orders, noise levels and noise before and after) remove
    the step-to-step noise of the flow-matching loss. Measured: 5.3 -> 1.5-1.7 (ratio 0.28-0.33); a
    trainer that does not learn, or scores the wrong tokens, stays near 1.
    """
    from psr.data.dataset import SampleKey, collate_sft
    from psr.resume import load_initial_weights

    trainer = trainer_for(
        tmp_path,
        "data.num_records=4",
        "data.heldout=0",
        "validation.records=0",
        "train.mode=full",
        "train.steps=50",
        "train.micro_batch_size=4",
        "train.checkpoint_every=1000",
        "train.export_lora=false",
        "optim.lr=1e-3",
        "optim.grad_clip=1.0",
    )

    @torch.no_grad()
    def fixed_loss() -> float:
        total = 0.0
        for rep in range(4):
            batch = collate_sft([trainer.dataset[SampleKey(i, 1000 + 10 * rep + i, 0, 0)] for i in range(4)])
            total += float(trainer.batch_loss(batch, torch.Generator().manual_seed(rep))[0])
        return total / 4

    try:
        before = fixed_loss()
        trainer.train()
        after = fixed_loss()
    finally:
        trainer.cleanup()
    assert after < 0.5 * before, (before, after)
    logged = losses(tmp_path)
    assert sorted(logged) == list(range(1, 51))

    # init_from a full checkpoint reproduces the trained transformer
    from psr.models.builders import tiny_flux_kontext

    fresh = tiny_flux_kontext(seed=0)
    load_initial_weights(fresh, tmp_path)
    cond = trainer.policy.condition("a red square", [torch.rand(3, 32, 32)], 32, 32)
    x = torch.randn(1, 4, 16)
    torch.testing.assert_close(fresh.velocity(x, 0.5, cond), trainer.policy.velocity(x, 0.5, cond))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_every_trainable_parameter_changes(tmp_path, mode):
    """After one update every trainable parameter has moved.

    LoRA: peft's default init has B = 0, which makes dL/dA = 0 at step 0 (A cannot move on the
    first update). ``train.lora.init=false`` draws B non-zero too, so the test sees both A and B.
    """
    trainer = trainer_for(tmp_path, f"train.mode={mode}", "train.lora.init=false", "optim.grad_clip=null")
    try:
        named = {n: p for n, p in trainer.policy.transformer.named_parameters() if p.requires_grad}
        assert named and (mode == "full" or all("lora_" in n for n in named))
        before = {n: p.detach().clone() for n, p in named.items()}
        frozen = {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if not p.requires_grad}
        trainer.train_step([next(trainer.batches)], step=0)
        unchanged = [n for n, p in named.items() if torch.equal(p, before[n])]
        assert not unchanged, unchanged
        moved = [
            n for n, p in trainer.policy.named_parameters() if n in frozen and not torch.equal(p, frozen[n])
        ]
        assert not moved, moved  # text encoders, VAE (and the base weights under LoRA) stay frozen
    finally:
        trainer.cleanup()


def test_resume_after_sigkill_and_preemption_gives_identical_losses(tmp_path):
    """Uninterrupted 8 steps vs: a subprocess killed with SIGKILL after a checkpoint, resumed here,
    stopped by SIGUSR1 (save and exit) at step 6, resumed again to the end. Every step's loss must
    be the same: data position, noise draws, weights, AdamW moments, LR schedule and RNG all resume.
    """
    from psr.trainers.sft import SFTTrainer, main

    over = ["train.steps=8", "optim.schedule=cosine", "optim.warmup_steps=2", "dataset.reference_dropout=0.2"]
    main(compose(tmp_path / "straight", *over))
    expected = losses(tmp_path / "straight")
    assert sorted(expected) == list(range(1, 9))

    run = tmp_path / "interrupted"
    killed_at = kill_after_checkpoint(
        start_trainer("sft", [*BASE, f"run_dir={run}", *over]), run, timeout=120
    )
    assert killed_at < 8

    trainer = SFTTrainer(compose(run, *over))
    trainer.setup()
    assert trainer.step == killed_at
    signal_at(trainer, 6, "train/loss")
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    assert trainer.step == 6 and (run / "checkpoints" / "step_00000006" / "COMPLETE").is_file()

    main(compose(run, *over))
    got = losses(run)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), (step, got, expected)


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    """The psr-sft quickstart experiment, shortened to 30 steps, on a synthetic manifest."""
    from psr.data.synthetic import write_synthetic_manifest
    from psr.trainers.sft import main

    root = tmp_path_factory.mktemp("quickstart")
    manifest = write_synthetic_manifest(root / "data", num_records=12, num_subjects=(2, 3), image_size=64)
    cfg = compose(
        root / "sft",
        "experiment/sft=quickstart",
        f"data.manifest={manifest}",
        "train.steps=30",
        "train.checkpoint_every=15",
        "validation.every=15",
        base=[],
    )
    start = time.time()
    main(cfg)
    return cfg, root / "sft", time.time() - start


def test_quickstart_outputs(quickstart_run, capsys):
    cfg, run_dir, seconds = quickstart_run
    assert seconds < 120  # ~2 s on an idle core; a loose bound that still catches a runaway
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert len(train) == int(cfg.train.steps)
    assert all(k in train[0] for k in ("train/lr", "train/grad_norm", "time/update"))
    val = [r for r in records if "val/loss" in r]
    assert [r["step"] for r in val] == [0, 15, 30]
    assert all("val/reward/psr/score" in r and "val/reward/text/score" in r for r in val)
    assert (run_dir / "images" / "val_grid_000030.png").is_file()
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_00000015", "step_00000030"]
    assert (run_dir / "checkpoints" / "step_00000030" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def _trained_policy(cfg, run_dir: Path):
    """The quickstart's trained model rebuilt from its checkpoint (LoRA weights by parameter name)."""
    return trained_policy(cfg, run_dir / "checkpoints" / "step_00000030")


def test_lora_export_loads_in_flux_kontext_pipeline(quickstart_run):

    cfg, run_dir, _ = quickstart_run
    policy = _trained_policy(cfg, run_dir)
    ours, theirs, x, cond = velocities_with_exported_lora(
        policy, run_dir / "checkpoints" / "step_00000030" / "lora"
    )
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    with policy.reference_policy():  # the LoRA did learn something
        assert not torch.allclose(policy.velocity(x, 0.6, cond), ours, atol=1e-4)


def test_init_from_merges_sft_lora_under_a_new_adapter(quickstart_run):
    """What psr-rl does with init_from=<SFT run>: a fresh RL LoRA, the SFT LoRA merged into the base."""
    from psr.models.builders import tiny_flux_kontext
    from psr.models.lora import add_lora
    from psr.resume import load_initial_weights

    cfg, run_dir, _ = quickstart_run
    sft = _trained_policy(cfg, run_dir)
    rl = tiny_flux_kontext(seed=0)
    add_lora(rl.transformer, rank=2, alpha=2)
    assert load_initial_weights(rl, run_dir).name == "step_00000030"
    cond = sft.condition(
        "the blue square and the red disc", [torch.rand(3, 64, 64), torch.rand(3, 64, 48)], 64, 64
    )
    x = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(1))
    expected = sft.velocity(x, 0.3, cond)
    torch.testing.assert_close(rl.velocity(x, 0.3, cond), expected, rtol=1e-4, atol=1e-5)
    with rl.reference_policy():  # the RL reference policy is the SFT model
        torch.testing.assert_close(rl.velocity(x, 0.3, cond), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="init_from"):
        load_initial_weights(rl, run_dir / "nowhere")


def test_stack_conditionings_groups_by_token_layout():
    from psr.models.policy import stack_conditionings
    from psr.types import Conditioning

    def cond(n_refs: int, value: float, dtype=torch.bfloat16) -> Conditioning:
        ids = torch.cat([torch.full((4, 1), float(k + 1)) for k in range(n_refs)] or [torch.zeros(0, 1)])
        return Conditioning(
            prompt_embeds=torch.full((1, 3, 2), value, dtype=dtype),
            pooled_prompt_embeds=torch.full((1, 2), value, dtype=dtype),
            text_ids=torch.zeros(3, 3, dtype=dtype),
            ref_tokens=torch.full((1, 4 * n_refs, 5), value, dtype=dtype),
            ref_ids=ids.expand(-1, 3).to(dtype),
            img_ids=torch.zeros(4, 3, dtype=dtype),
            height=32,
            width=32,
        )

    groups = stack_conditionings([cond(2, 0.0), cond(1, 1.0), cond(2, 2.0), cond(0, 3.0)])
    assert [idx for idx, _ in groups] == [[0, 2], [1], [3]]
    stacked = groups[0][1]
    assert stacked.prompt_embeds.shape == (2, 3, 2) and stacked.ref_tokens.shape == (2, 8, 5)
    assert stacked.prompt_embeds[:, 0, 0].tolist() == [0.0, 2.0]


def test_gradient_checkpointing_gives_the_same_update(tmp_path):
    weights = []
    for flag in ("false", "true"):
        trainer = trainer_for(
            tmp_path / flag, f"model.gradient_checkpointing={flag}", "train.lora.init=false"
        )
        try:
            assert trainer.policy.transformer.is_gradient_checkpointing == (flag == "true")
            trainer.train_step([next(trainer.batches)], step=0)
            weights.append(trainer.engine.trainable_state_dict())
        finally:
            trainer.cleanup()
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=1e-5, atol=1e-7)


def test_ema_weights_are_exported_and_validation_needs_heldout(tmp_path):
    from safetensors.torch import load_file

    from psr.trainers.sft import SFTTrainer, main

    main(compose(tmp_path, "engine.ema_decay=0.5", "train.steps=2", "train.lora.init=false"))
    ckpt_dir = tmp_path / "checkpoints" / "step_00000002"
    shadow = torch.load(ckpt_dir / "state.pt", weights_only=True)["training_state"]["engine"]["ema"]["shadow"]
    live = load_file(str(ckpt_dir / "trainable.safetensors"))
    exported = load_file(str(ckpt_dir / "lora" / "pytorch_lora_weights.safetensors"))
    key = next(k for k in shadow if k.endswith("lora_B.default.weight"))
    assert not torch.equal(shadow[key], live[key])  # decay 0.5 over 2 updates lags the live weights
    name = "transformer." + key.replace(".lora_B.default.", ".lora_B.")
    torch.testing.assert_close(exported[name], shadow[key])
    with pytest.raises(ValueError, match="validation.every"):
        SFTTrainer(compose(tmp_path / "v", "validation.every=5", "data.heldout=0")).setup()


def test_validation_split_between_two_processes_matches_one(tmp_path):
    """3 held-out records on 2 ranks (2 + 1, the short share padded): the step-0 validation metrics
    (fixed-draw loss and rewards, before any update) are those of one process."""
    from psr.distributed import free_port

    args = [
        *(o for o in BASE if not o.startswith("validation.every")),
        "data.num_records=9",
        "data.heldout=3",
        "validation.records=3",
        "validation.every=1",
        "train.steps=1",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli([str(BIN / "psr-sft"), *args, f"hydra.run.dir={one}"])
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    run_cli(
        [
            *torchrun,
            "--master_port",
            str(free_port()),
            "--no-python",
            str(BIN / "psr-sft"),
            *args,
            f"hydra.run.dir={two}",
        ]
    )

    def step0(run_dir: Path) -> dict[str, float]:
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return next(r for r in lines if r["step"] == 0 and "val/loss" in r)

    a, b = step0(one), step0(two)
    keys = [k for k in a if k.startswith("val/")]
    assert "val/loss" in keys and any(k.startswith("val/reward/") for k in keys)
    for key in keys:  # null: NaN, a reward that applies to none of the records
        assert (b[key] is None) if a[key] is None else b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (
            key
        )
