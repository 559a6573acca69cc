"""psr-sft, psr-rl (GRPO, DPO) and psr-eval on the tiny FLUX.2 klein and Qwen-Image-Edit-Plus (CPU):
the real configs composed with Hydra, the real recipes, one chain per backbone: SFT (stopped by a
preemption signal and resumed) -> its diffusers LoRA -> RL ``init_from`` the SFT run -> psr-eval of
the RL checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trainer_helpers import CONF, metric, signal_at, trained_policy

from psr.models.flux2_klein import LORA_TARGETS, Flux2KleinPolicy
from psr.models.qwen_image_edit import QwenImageEditPolicy

# backbone -> (its overrides, its policy class)
BACKBONES = {
    "flux2_klein": (
        ["model=tiny_flux2_klein", f"train.lora.targets=[{','.join(LORA_TARGETS)}]"],
        Flux2KleinPolicy,
    ),
    "qwen_image_edit_plus": (["model=tiny_qwen_image_edit_plus"], QwenImageEditPolicy),
}
# 32 px (2x2 target tokens), LoRA rank 4, no validation: each run takes a few seconds
SFT = [
    "data=synthetic",
    "data.num_records=6",
    "data.heldout=2",
    "data.image_size=32",
    "dataset.resolution=32",
    "train.steps=3",
    "train.micro_batch_size=2",
    "train.lora.rank=4",
    "train.lora.alpha=8",
    "train.checkpoint_every=3",
    "loader.num_workers=0",
    "validation.every=0",
    "optim.lr=1e-3",
]
RL = [
    "experiment/rl=quickstart",
    "data.num_records=4",
    "data.heldout=1",
    "data.image_size=32",
    "train.resolution=32",
    "train.steps=1",
    "train.prompts_per_step=1",
    "train.group_size=4",
    "train.micro_batch_size=4",
    "train.eval_every=0",
    "train.grid_every=0",
    "train.checkpoint_every=1",
    "sampler.num_steps=3",
]


def compose(primary: str, run_dir: Path, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(primary, overrides=[*overrides, f"run_dir={run_dir}"])


@pytest.fixture(scope="module", params=list(BACKBONES))
def sft_run(request, tmp_path_factory) -> tuple[str, Path, dict[int, float]]:
    """3 SFT steps straight, and the same run stopped by SIGUSR1 after step 2 and resumed."""
    from psr.trainers.sft import SFTTrainer, main

    backbone = request.param
    sft = [*BACKBONES[backbone][0], *SFT]
    root = tmp_path_factory.mktemp(f"{backbone}_sft")
    main(compose("sft", root / "straight", sft))
    expected = metric(root / "straight", "train/loss")
    run = root / "interrupted"
    trainer = SFTTrainer(compose("sft", run, sft))
    trainer.setup()
    assert isinstance(trainer.policy, BACKBONES[backbone][1])
    signal_at(trainer, 2, "train/loss")
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    assert trainer.step == 2 and (run / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    main(compose("sft", run, sft))  # resume=auto: from step 2
    return backbone, run, expected


def test_sft_resumes_exactly(sft_run):
    _, run, expected = sft_run
    got = metric(run, "train/loss")
    assert sorted(got) == sorted(expected) == [1, 2, 3]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), (step, got, expected)


def test_sft_lora_loads_in_the_diffusers_pipeline(sft_run):
    """The checkpoint's diffusers LoRA, loaded by the backbone's pipeline (``load_lora_weights``),
    gives the trained policy's guided velocity (the pipeline's transformer in the policy's place)."""
    import copy

    backbone, run, _ = sft_run
    ckpt = run / "checkpoints" / "step_00000003"
    cfg = compose("sft", run, [*BACKBONES[backbone][0], *SFT])
    policy = trained_policy(cfg, ckpt)
    if backbone == "flux2_klein":
        from diffusers import Flux2KleinPipeline

        from psr.models.flux2_klein import tiny_flux2_klein_components

        pipe = Flux2KleinPipeline(**tiny_flux2_klein_components(seed=0))
    else:
        from diffusers import QwenImageEditPlusPipeline

        from psr.models.qwen_image_edit import tiny_qwen_image_edit_plus_components

        pipe = QwenImageEditPlusPipeline(**tiny_qwen_image_edit_plus_components(seed=0))
    pipe.load_lora_weights(ckpt / "lora")
    theirs_policy = copy.copy(policy)  # shares everything but the transformer
    theirs_policy.transformer = pipe.transformer
    cond = policy.condition("the red disc", [torch.rand(3, 32, 32), torch.rand(3, 32, 32)], 32, 32)
    channels = policy.transformer.config.in_channels
    x = torch.randn(1, 4, channels, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = policy.velocity(x, 0.6, cond)
        theirs = theirs_policy.velocity(x, 0.6, cond)
        with policy.reference_policy():
            base = policy.velocity(x, 0.6, cond)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (ours - base).abs().max() > 1e-5  # training moved the adapter off B = 0


@pytest.mark.parametrize("algo", ["grpo", "dpo"])
def test_rl_from_the_sft_lora_then_eval(sft_run, tmp_path, algo):
    """RL ``init_from`` the SFT run (its LoRA merged into the base, no conversion): the reference
    policy is the SFT model; one update trains every adapter weight; psr-eval samples the result."""
    from psr.evaluate import main as evaluate
    from psr.trainers.rl import RLTrainer

    backbone, sft_dir, _ = sft_run
    own, policy_class = BACKBONES[backbone]
    extra = ["algo.beta=0.01"] if algo == "grpo" else ["algo.focus=true"]  # KL / FocusDPO's ref tokens
    cfg = compose(
        "rl",
        tmp_path / "rl",
        [*own, *RL, f"algo={algo}", f"init_from={sft_dir}", "train.lora.init=false", *extra],
    )
    trainer = RLTrainer(cfg)
    trainer.setup()
    try:
        assert isinstance(trainer.policy, policy_class)
        sft_cfg = compose("sft", sft_dir, [*own, *SFT])
        sft = trained_policy(sft_cfg, sft_dir / "checkpoints" / "step_00000003")
        cond = sft.condition("a red disc", [torch.rand(3, 32, 32)], 32, 32)
        channels = sft.transformer.config.in_channels
        x = torch.randn(2, 4, channels, generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), trainer.policy.reference_policy():
            torch.testing.assert_close(trainer.policy.velocity(x, 0.5, cond), sft.velocity(x, 0.5, cond))
        named = {n: p for n, p in trainer.policy.transformer.named_parameters() if p.requires_grad}
        before = {n: p.detach().clone() for n, p in named.items()}
        trainer.train()
    finally:
        trainer.cleanup()
    unchanged = [n for n, p in named.items() if torch.equal(p, before[n])]
    # Qwen-Image's last block: its text queries and text output reach no image token
    last = "transformer_blocks.0.attn"
    inert = (f"{last}.add_q_proj", f"{last}.to_add_out") if backbone == "qwen_image_edit_plus" else ()
    assert [n for n in unchanged if not n.startswith(inert)] == []
    losses = metric(tmp_path / "rl", "train/loss")
    assert list(losses) == [1] and torch.isfinite(torch.tensor(losses[1]))
    assert (tmp_path / "rl" / "checkpoints" / "step_00000001" / "lora").is_dir()

    eval_dir = tmp_path / "eval"
    evaluate(
        compose(
            "eval",
            eval_dir,
            [
                "experiment/eval=quickstart",
                own[0],
                "data.num_records=2",
                "data.image_size=32",
                "eval.resolution=32",
                "eval.num_steps=2",
                "eval.samples_per_prompt=1",
                "eval.grid_records=0",
                f"checkpoint={tmp_path / 'rl'}",
            ],
        )
    )
    assert len((eval_dir / "scores.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_zero2_reproduces_the_torch_engine(tmp_path, backbone):
    """psr-rl through its console script under engine=torch and engine=ds_zero2 (one CPU process,
    fp32): the same rewards, losses and gradient norms up to summation order (measured on FLUX.2
    klein: gradient norms within 2e-7 relative, the rest equal). ~45 s per backbone."""
    from trainer_helpers import BIN, metric_table, run_cli

    keys = ("reward/score", "train/loss", "train/grad_norm", "eval/reward/score")
    common = [
        "experiment=quickstart",
        BACKBONES[backbone][0][0],
        "train.steps=2",
        "train.resolution=32",
        "data.image_size=32",
        "train.eval_every=1",
        "train.grid_every=0",
        "train.export_lora=false",
        "engine.precision=fp32",
        "sampler.num_steps=3",
    ]
    runs = {}
    for engine in ("torch", "ds_zero2"):
        run_cli([str(BIN / "psr-rl"), *common, f"engine={engine}", f"hydra.run.dir={tmp_path / engine}"])
        runs[engine] = metric_table(tmp_path / engine, keys)
    assert len(runs["torch"]) == 2 * len(keys) and runs["ds_zero2"].keys() == runs["torch"].keys()
    for key, value in runs["torch"].items():
        assert runs["ds_zero2"][key] == pytest.approx(value, rel=1e-5, abs=1e-8), key
