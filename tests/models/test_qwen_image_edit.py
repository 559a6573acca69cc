"""Qwen-Image-Edit-Plus against diffusers' own QwenImageEditPlusPipeline on the same tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from psr.models.lora import DEFAULT_TARGETS
from psr.models.qwen_image_edit import (
    QwenImageEditPolicy,
    area_dimensions,
    qwen_image_edit_plus,
    tiny_qwen_image_edit_plus_components,
)
from psr.sampling.rollout import initial_noise, rollout, step_log_prob

H, W = 64, 96  # non-square: 4 x 6 target tokens
PROMPT = "a corgi and a red mug on a wooden table"
AREA = 96 * 96  # references as Qwen2.5-VL sees them and as they are encoded (the pipeline's 384^2, 1024^2)
REF_SIZES = [(64, 128), (128, 64), (80, 80)]  # encoded at 64x128, 128x64, 96x96


def _ref(seed: int, h: int, w: int) -> torch.Tensor:
    """A random image on the 8-bit grid, so its PIL copy for the pipeline holds the same pixels."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(3, h, w, generator=g) * 255).round() / 255


def _pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def components():
    return tiny_qwen_image_edit_plus_components(seed=0)


def _policy(components, **kw) -> QwenImageEditPolicy:
    return QwenImageEditPolicy(**components, **{"condition_area": AREA, "reference_area": AREA, **kw})


def _pipeline_images(components, refs, x0, monkeypatch, *, cfg=4.0, steps=4):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as module
    from diffusers import QwenImageEditPlusPipeline

    monkeypatch.setattr(module, "CONDITION_IMAGE_SIZE", AREA)
    monkeypatch.setattr(module, "VAE_IMAGE_SIZE", AREA)
    pipe = QwenImageEditPlusPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        image=[_pil(r) for r in refs],
        prompt=PROMPT,
        negative_prompt=" " if cfg > 1 else None,
        true_cfg_scale=cfg,
        height=H,
        width=W,
        num_inference_steps=steps,
        latents=x0.clone(),
        output_type="pt",
    ).images


@pytest.mark.parametrize("num_refs", [1, 2, 3])
def test_ode_rollout_equals_qwen_image_edit_plus_pipeline(components, monkeypatch, num_refs):
    """Noise 0, true CFG 4.0 with the norm rescale: the rollout's image equals the pipeline's for
    1-3 references of different aspect ratios at a non-square target (the pipeline needs at least
    one image). The same fp32 ops in the same order: equal to 1e-6 (measured: exactly equal)."""
    policy = _policy(components)
    refs = [_ref(k + 1, *REF_SIZES[k]) for k in range(num_refs)]
    cond = policy.condition(PROMPT, refs, H, W)
    assert cond.img_shapes == ((1, 4, 6), (1, 4, 8), (1, 8, 4), (1, 6, 6))[: num_refs + 1]
    x0 = initial_noise(policy, cond, 1, torch.Generator().manual_seed(7))
    ours = rollout(policy, cond, 1, num_steps=4, method="ode", latents=x0).images
    theirs = _pipeline_images(components, refs, x0, monkeypatch)
    assert ours.shape == theirs.shape == (1, 3, H, W)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-6, rtol=0)


def test_without_cfg_the_conditional_branch_alone(components, monkeypatch):
    policy = _policy(components, true_cfg_scale=1.0)
    refs = [_ref(1, 64, 128)]
    cond = policy.condition(PROMPT, refs, H, W)
    assert cond.true_cfg_scale is None and cond.negative_prompt_embeds is None
    x0 = initial_noise(policy, cond, 1, torch.Generator().manual_seed(3))
    ours = rollout(policy, cond, 1, num_steps=3, method="ode", latents=x0).images
    theirs = _pipeline_images(components, refs, x0, monkeypatch, cfg=1.0, steps=3)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-6, rtol=0)


def test_references_reach_both_the_text_encoder_and_the_transformer(components):
    policy = _policy(components)
    a, b = _ref(1, 64, 64), _ref(2, 64, 64)
    ca, cb = policy.condition(PROMPT, [a, b], H, W), policy.condition(PROMPT, [b, a], H, W)
    assert (ca.prompt_embeds - cb.prompt_embeds).abs().max() > 1e-4  # Qwen2.5-VL saw the pictures
    x = torch.randn(1, 24, 64, generator=torch.Generator().manual_seed(0))
    assert (policy.velocity(x, 0.5, ca) - policy.velocity(x, 0.5, cb)).abs().max() > 1e-4


@pytest.mark.parametrize(("grid", "steps"), [((4, 6), 4), ((32, 32), 28), ((64, 64), 50)])
def test_schedule_equals_the_pipeline_scheduler(components, grid, steps):
    """The pipeline's timestep lines, with the scheduler's shift_terminal (Qwen-Image's 0.02)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift, retrieve_timesteps

    policy = _policy(components)
    cfg = policy.scheduler_config
    assert cfg["shift_terminal"] == 0.02
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    n = grid[0] * grid[1]
    mu = calculate_shift(
        n, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"], cfg["max_shift"]
    )
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    cond = policy.condition("", [_ref(0, 64, 64)], 16 * grid[0], 16 * grid[1])
    torch.testing.assert_close(policy.schedule(cond, steps), scheduler.sigmas, atol=0, rtol=0)


def test_area_rule_equals_the_pipeline():
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    for w, h in [(1500, 1000), (640, 480), (300, 900)]:
        assert area_dimensions(1024 * 1024, w / h) == calculate_dimensions(1024 * 1024, w / h)


def test_sde_log_probs_are_recomputed_with_gradients_through_both_cfg_branches():
    from psr.models.lora import add_lora

    policy = _policy(tiny_qwen_image_edit_plus_components(seed=0))  # its own copy: an adapter is added
    cond = policy.condition(PROMPT, [_ref(1, 64, 64)], H, W)
    gen = torch.Generator().manual_seed(0)
    traj = rollout(policy, cond, 3, num_steps=3, method="flow_grpo", noise_level=0.7, generator=gen)
    for k in range(3):
        with torch.no_grad():
            again = torch.cat([step_log_prob(policy, traj, k, torch.tensor([i])).log_prob for i in range(3)])
        torch.testing.assert_close(again, traj.log_probs[:, k], rtol=0, atol=2e-5)
    add_lora(policy.transformer, rank=2, init=False, targets=DEFAULT_TARGETS)
    step_log_prob(policy, traj, 1).log_prob.sum().backward()
    lora = {n: p for n, p in policy.transformer.named_parameters() if "lora_" in n}
    still = sorted(n for n, p in lora.items() if p.grad is None or not p.grad.abs().sum() > 0)
    # the last block's text queries and text output reach no image token (only the image stream
    # leaves the last block); every other adapter gets a gradient
    last = f"transformer_blocks.{len(policy.transformer.transformer_blocks) - 1}.attn"
    assert still == sorted(n for n in lora if n.startswith((f"{last}.add_q_proj", f"{last}.to_add_out")))


def test_exported_lora_loads_in_the_pipeline(tmp_path):
    """Export (alpha != rank) -> QwenImageEditPlusPipeline.load_lora_weights: the same guided velocity."""
    from diffusers import QwenImageEditPlusPipeline

    from psr.models.lora import add_lora, export_diffusers_lora

    policy = _policy(tiny_qwen_image_edit_plus_components(seed=0))
    params = add_lora(policy.transformer, rank=4, alpha=8, targets=DEFAULT_TARGETS)
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    weights = {n: p.detach() for n, p in policy.transformer.named_parameters() if "lora_" in n}
    export_diffusers_lora(policy.transformer, weights, tmp_path)
    cond = policy.condition(PROMPT, [_ref(1, 64, 64)], H, W)
    x = torch.randn(1, 24, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = policy.velocity(x, 0.4, cond)
    pipe = QwenImageEditPlusPipeline(**tiny_qwen_image_edit_plus_components(seed=0))
    pipe.load_lora_weights(tmp_path)
    theirs_policy = _policy({**tiny_qwen_image_edit_plus_components(seed=0), "transformer": pipe.transformer})
    with torch.no_grad():
        theirs = theirs_policy.velocity(x, 0.4, cond)
        with policy.reference_policy():
            base = policy.velocity(x, 0.4, cond)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (ours - base).abs().max() > 1e-3


def test_builder_loads_a_saved_checkpoint_like_a_user(components, tmp_path):
    from diffusers import QwenImageEditPlusPipeline

    QwenImageEditPlusPipeline(**components).save_pretrained(tmp_path / "qwen")
    loaded = qwen_image_edit_plus(
        tmp_path / "qwen", dtype="float32", condition_area=AREA, reference_area=AREA
    )
    policy = _policy(components)
    refs = [_ref(1, 64, 64)]
    x = torch.randn(1, 24, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = loaded.velocity(x, 0.5, loaded.condition(PROMPT, refs, H, W))
        theirs = policy.velocity(x, 0.5, policy.condition(PROMPT, refs, H, W))
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    with pytest.raises(FileNotFoundError, match="model.path=.*nowhere does not exist; expected .*processor/"):
        qwen_image_edit_plus(tmp_path / "nowhere")
