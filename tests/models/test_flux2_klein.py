"""FLUX.2 klein against diffusers' own Flux2KleinPipeline on the same tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from psr.models.flux2_klein import (
    LORA_TARGETS,
    TINY_MAX_SEQUENCE_LENGTH,
    TINY_OUT_LAYERS,
    Flux2KleinPolicy,
    empirical_mu,
    flux2_klein,
    klein_reference_size,
    save_flux2_klein_components,
    tiny_flux2_klein_components,
)
from psr.sampling.rollout import initial_noise, rollout, step_log_prob

H, W = 64, 96  # non-square: 4 x 6 target tokens
PROMPT = "a corgi and a red mug on a wooden table"
REF_SIZES = [(64, 80), (96, 64), (64, 64)]  # each reference at its own size, as the pipeline encodes them


def _ref(seed: int, h: int, w: int) -> torch.Tensor:
    """A random image on the 8-bit grid, so its PIL copy for the pipeline holds the same pixels."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(3, h, w, generator=g) * 255).round() / 255


def _pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def components():
    return tiny_flux2_klein_components(seed=0)


def _policy(components, **kw) -> Flux2KleinPolicy:
    kw = {"max_sequence_length": TINY_MAX_SEQUENCE_LENGTH, "text_encoder_out_layers": TINY_OUT_LAYERS, **kw}
    return Flux2KleinPolicy(**components, **kw)


def _pipeline_images(components, refs, x0, *, is_distilled=False, guidance=4.0, steps=4):
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline(**components, is_distilled=is_distilled)
    pipe.set_progress_bar_config(disable=True)
    h, w = H // 16, W // 16
    return pipe(
        image=[_pil(r) for r in refs] or None,
        prompt=PROMPT,
        height=H,
        width=W,
        num_inference_steps=steps,
        num_images_per_prompt=x0.shape[0],
        guidance_scale=guidance,
        latents=x0.permute(0, 2, 1).reshape(x0.shape[0], -1, h, w).clone(),  # the pipeline's [B, C, h, w]
        output_type="pt",
        max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
        text_encoder_out_layers=TINY_OUT_LAYERS,
    ).images


@pytest.mark.parametrize("num_refs", [0, 1, 2, 3])
def test_ode_rollout_equals_flux2_klein_pipeline(components, num_refs):
    """Noise 0, true CFG at 4.0: the rollout's image equals Flux2KleinPipeline's, for 0-3 references
    of three different sizes at a non-square target.

    Tolerance 1e-5 on [0, 1] pixels: the same fp32 ops; our CFG runs both branches as one batch-2
    forward where the pipeline runs two, and our Euler step orders a few elementwise operations
    differently (measured: <= 7e-7).
    """
    policy = _policy(components)
    refs = [_ref(k + 1, *REF_SIZES[k]) for k in range(num_refs)]
    cond = policy.condition(PROMPT, refs, H, W)
    assert cond.guidance_scale == 4.0 and cond.negative_prompt_embeds is not None
    x0 = initial_noise(policy, cond, 1, torch.Generator().manual_seed(7))
    ours = rollout(policy, cond, 1, num_steps=4, method="ode", latents=x0).images
    theirs = _pipeline_images(components, refs, x0)
    assert ours.shape == theirs.shape == (1, 3, H, W)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=0)
    assert ours.std() > 1e-3  # not a degenerate constant image


def test_distilled_model_runs_the_conditional_branch_alone(components):
    policy = _policy(components, is_distilled=True)
    refs = [_ref(1, 64, 64), _ref(2, 64, 80)]
    cond = policy.condition(PROMPT, refs, H, W)
    assert cond.guidance_scale is None and cond.negative_prompt_embeds is None
    x0 = initial_noise(policy, cond, 2, torch.Generator().manual_seed(3))
    ours = rollout(policy, cond, 2, num_steps=3, method="ode", latents=x0).images
    theirs = _pipeline_images(components, refs, x0, is_distilled=True, steps=3)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=0)


def test_references_and_their_order_change_the_velocity(components):
    policy = _policy(components)
    a, b = _ref(1, 64, 64), _ref(2, 64, 64)
    x = torch.randn(1, 24, 16, generator=torch.Generator().manual_seed(0))
    v = [policy.velocity(x, 0.5, policy.condition(PROMPT, refs, H, W)) for refs in ([a, b], [b, a], [a])]
    assert (v[0] - v[1]).abs().max() > 1e-4 and (v[0] - v[2]).abs().max() > 1e-4
    ids = policy.condition(PROMPT, [a, _ref(3, 96, 64)], H, W).ref_ids
    # the native scheme: T = 10 + 10 k per reference, rows/cols from 0 on each reference's own grid
    assert ids[:16, 0].eq(10).all() and ids[16:, 0].eq(20).all() and ids[16:, 1].max() == 5


@pytest.mark.parametrize(("grid", "steps"), [((4, 6), 4), ((32, 32), 28), ((64, 64), 50), ((75, 80), 8)])
def test_schedule_equals_the_pipeline_scheduler(components, grid, steps):
    """Both branches of the empirical mu (N <= 4300 depends on K, above it does not)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

    seq_len = grid[0] * grid[1]
    assert empirical_mu(seq_len, steps) == compute_empirical_mu(seq_len, steps)
    policy = _policy(components)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(policy.scheduler_config)
    # the pipeline's own lines ("Prepare timesteps")
    sigmas = np.linspace(1.0, 1 / steps, steps)
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=compute_empirical_mu(seq_len, steps))
    cond = policy.condition("", [], 16 * grid[0], 16 * grid[1])
    torch.testing.assert_close(policy.schedule(cond, steps), scheduler.sigmas, atol=0, rtol=0)


def test_reference_size_rule_equals_the_pipeline():
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
    from PIL import Image

    for w, h in [(1500, 1000), (1023, 1025), (700, 500), (2048, 600)]:
        img = Flux2ImageProcessor._resize_if_exceeds_area(Image.new("RGB", (w, h)), 1024 * 1024)
        expected = (img.size[1] // 16 * 16, img.size[0] // 16 * 16)
        assert klein_reference_size(h, w, 1024 * 1024) == expected


@pytest.mark.parametrize("method", ["flow_grpo", "cps"])
def test_sde_log_probs_are_recomputed_with_gradients_through_both_cfg_branches(components, method):
    """What GRPO relies on: step_log_prob of a stored SDE step equals the rollout's log-prob (the same
    weights), and its gradient reaches the LoRA through the guided velocity."""
    from psr.models.lora import add_lora

    policy = _policy(tiny_flux2_klein_components(seed=0))  # its own copy: an adapter is added below
    cond = policy.condition(PROMPT, [_ref(1, 64, 64)], H, W)
    gen = torch.Generator().manual_seed(0)
    traj = rollout(
        policy, cond, 3, num_steps=4, method=method, noise_level=0.7, sde_window=(0, 3), generator=gen
    )
    for k in range(3):
        with torch.no_grad():
            again = torch.cat([step_log_prob(policy, traj, k, torch.tensor([i])).log_prob for i in range(3)])
        torch.testing.assert_close(again, traj.log_probs[:, k], rtol=0, atol=2e-5)
    params = add_lora(policy.transformer, rank=2, init=False, targets=LORA_TARGETS)
    step_log_prob(policy, traj, 1).log_prob.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_stacked_conditionings_give_the_per_sample_velocities(components):
    policy = _policy(components)
    conds = [
        policy.condition("a red disc", [_ref(1, 64, 64)], H, W),
        policy.condition("a blue square", [_ref(2, 64, 64), _ref(3, 64, 64)], H, W),
        policy.condition("a green star", [_ref(4, 64, 64)], H, W),
    ]
    groups = policy.stack_conditionings(conds)
    assert [idx for idx, _ in groups] == [[0, 2], [1]]
    x = torch.randn(3, 24, 16, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.3, 0.6, 0.9])
    for idx, cond in groups:
        stacked = policy.velocity(x[idx], sigma[idx], cond)
        single = torch.cat([policy.velocity(x[i : i + 1], sigma[i : i + 1], conds[i]) for i in idx])
        torch.testing.assert_close(stacked, single, atol=1e-5, rtol=0)


def test_exported_lora_loads_in_flux2_klein_pipeline(components, tmp_path):
    """Export (alpha != rank) -> Flux2KleinPipeline.load_lora_weights: the same guided velocity."""
    from diffusers import Flux2KleinPipeline

    from psr.models.lora import add_lora, export_diffusers_lora

    policy = _policy(tiny_flux2_klein_components(seed=0))  # its own copy: an adapter is added
    params = add_lora(policy.transformer, rank=4, alpha=8, targets=LORA_TARGETS)
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    weights = {n: p.detach() for n, p in policy.transformer.named_parameters() if "lora_" in n}
    export_diffusers_lora(policy.transformer, weights, tmp_path)
    cond = policy.condition(PROMPT, [_ref(1, 64, 64)], H, W)
    x = torch.randn(1, 24, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = policy.velocity(x, 0.4, cond)
        with policy.reference_policy():
            base = policy.velocity(x, 0.4, cond)
    pipe = Flux2KleinPipeline(**tiny_flux2_klein_components(seed=0))
    pipe.load_lora_weights(tmp_path)

    def branch(text: torch.Tensor) -> torch.Tensor:
        return pipe.transformer(
            hidden_states=torch.cat([x, cond.ref_tokens], dim=1),
            timestep=torch.tensor([0.4]),
            guidance=None,
            encoder_hidden_states=text,
            txt_ids=cond.text_ids,
            img_ids=torch.cat([cond.img_ids, cond.ref_ids]),
            return_dict=False,
        )[0][:, :24]

    with torch.no_grad():
        neg = branch(cond.negative_prompt_embeds)
        theirs = neg + 4.0 * (branch(cond.prompt_embeds) - neg)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (ours - base).abs().max() > 1e-3  # the adapter changed the model


def test_builder_loads_a_saved_checkpoint_like_a_user(components, tmp_path):
    save_flux2_klein_components(components, tmp_path / "klein", is_distilled=True)
    loaded = flux2_klein(
        tmp_path / "klein",
        dtype="float32",
        max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
        text_encoder_out_layers=TINY_OUT_LAYERS,
    )
    assert loaded.is_distilled and loaded.guidance_scale is None  # from model_index.json
    policy = _policy(components, is_distilled=True)
    refs = [_ref(1, 64, 64)]
    x = torch.randn(1, 24, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = loaded.velocity(x, 0.5, loaded.condition(PROMPT, refs, H, W))
        theirs = policy.velocity(x, 0.5, policy.condition(PROMPT, refs, H, W))
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    with pytest.raises(
        FileNotFoundError, match="model.path=.*nowhere does not exist; expected .*FLUX.2 klein"
    ):
        flux2_klein(tmp_path / "nowhere")


def test_bad_settings_name_their_config_key(components):
    with pytest.raises(ValueError, match="model.text_encoder_out_layers"):
        _policy(components, text_encoder_out_layers=(1, 9))
    policy = _policy(components)
    with pytest.raises(ValueError, match="multiple of 16"):
        policy.condition(PROMPT, [], 40, 64)
