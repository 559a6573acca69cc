"""The multi-reference policy against diffusers' own pipelines on the same tiny model."""

from __future__ import annotations

import pytest
import torch

from psr.models.builders import flux_kontext, tiny_flux_kontext
from psr.sampling.rollout import initial_noise, rollout

H = W = 64
PROMPT = "a corgi and a red mug on a wooden table"


def _ref(seed: int, h: int = H, w: int = W) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, h, w, generator=g)


def test_ode_rollout_equals_flux_kontext_pipeline(tiny_components):
    """One reference, noise 0: the rollout's image equals FluxKontextPipeline's.

    Tolerance 1e-5 on [0, 1] pixels: both run the same fp32 ops; only the order of a few
    elementwise operations (scheduler step vs our Euler step) differs, worth ~1e-7 per step.
    """
    from diffusers import FluxKontextPipeline

    policy = tiny_flux_kontext(seed=0)
    ref = _ref(1)
    cond = policy.condition(PROMPT, [ref], H, W)
    x0 = initial_noise(policy, cond, 1, torch.Generator().manual_seed(7))
    ours = rollout(policy, cond, 1, num_steps=4, method="ode", latents=x0).images
    pipe = FluxKontextPipeline(**tiny_components)
    theirs = pipe(
        image=ref[None],
        prompt=PROMPT,
        height=H,
        width=W,
        num_inference_steps=4,
        guidance_scale=2.5,
        latents=x0.clone(),
        max_area=H * W,
        _auto_resize=False,
        output_type="pt",
        max_sequence_length=32,
    ).images
    assert ours.shape == theirs.shape == (1, 3, H, W)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=0)
    assert ours.std() > 1e-3  # not a degenerate constant image


def test_ode_rollout_without_reference_equals_flux_pipeline(tiny_components):
    from diffusers import FluxPipeline

    policy = tiny_flux_kontext(seed=0)
    cond = policy.condition(PROMPT, [], H, W)
    x0 = initial_noise(policy, cond, 2, torch.Generator().manual_seed(3))
    ours = rollout(policy, cond, 2, num_steps=3, method="ode", latents=x0).images
    pipe = FluxPipeline(**tiny_components)
    theirs = pipe(
        prompt=[PROMPT] * 2,
        height=H,
        width=W,
        num_inference_steps=3,
        guidance_scale=2.5,
        latents=x0.clone(),
        output_type="pt",
        max_sequence_length=32,
    ).images
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=0)


def test_builder_loads_saved_checkpoint_like_a_user(tiny_checkpoint):
    tiny = tiny_flux_kontext(seed=0)
    loaded = flux_kontext(tiny_checkpoint, dtype="float32", max_sequence_length=32)
    cond_a = tiny.condition(PROMPT, [_ref(1)], H, W)
    cond_b = loaded.condition(PROMPT, [_ref(1)], H, W)
    x = torch.randn(2, cond_a.num_target_tokens, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(tiny.velocity(x, 0.5, cond_a), loaded.velocity(x, 0.5, cond_b))


def test_builder_dtype_option(tiny_checkpoint):
    policy = flux_kontext(
        tiny_checkpoint, dtype="bfloat16", text_encoder_dtype="float32", max_sequence_length=32
    )
    assert policy.dtype == torch.bfloat16
    assert policy.text_encoder.dtype == torch.float32
    traj = rollout(
        policy,
        policy.condition(PROMPT, [_ref(1)], H, W),
        2,
        num_steps=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert traj.log_probs.dtype == torch.float32 and torch.isfinite(traj.log_probs).all()


def test_missing_checkpoint_names_config_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.path"):
        flux_kontext(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        flux_kontext(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        flux_kontext("black-forest-labs/not-in-the-cache")


@pytest.mark.parametrize("n", range(7))
def test_any_number_of_references(tiny_policy, n):
    refs = [_ref(k, 32 + 16 * (k % 3), 48) for k in range(n)]
    cond = tiny_policy.condition(PROMPT, refs, H, W)
    assert cond.num_references == n
    assert cond.ref_tokens.shape[1] == cond.ref_ids.shape[0]
    if n:
        assert sorted(set(cond.ref_ids[:, 0].tolist())) == list(range(1, n + 1))
    x = torch.randn(2, cond.num_target_tokens, 16)
    v = tiny_policy.velocity(x, 0.7, cond)
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_reference_order_and_content_matter(tiny_policy):
    a, b = _ref(1), _ref(2)
    x = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(0))
    v_ab = tiny_policy.velocity(x, 0.5, tiny_policy.condition(PROMPT, [a, b], H, W))
    v_ba = tiny_policy.velocity(x, 0.5, tiny_policy.condition(PROMPT, [b, a], H, W))
    v_a = tiny_policy.velocity(x, 0.5, tiny_policy.condition(PROMPT, [a], H, W))
    assert not torch.allclose(v_ab, v_ba, atol=1e-6)
    assert not torch.allclose(v_ab, v_a, atol=1e-6)


def test_references_of_other_sizes_are_resized_by_the_area_rule(tiny_policy):
    cond = tiny_policy.condition(PROMPT, [_ref(1, 100, 50), _ref(2, 64, 64)], H, W)
    # 100x50 at area 64*64 -> 80x32 px -> 5x2 tokens; 64x64 -> 4x4 tokens
    assert cond.ref_tokens.shape[1] == 5 * 2 + 4 * 4
    first = cond.ref_ids[:10]
    assert first[:, 1].max() == 4 and first[:, 2].max() == 1


def test_prompt_embeddings_are_cached(tiny_policy, monkeypatch):
    calls = []
    forward = tiny_policy.text_encoder_2.forward
    monkeypatch.setattr(
        tiny_policy.text_encoder_2, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k)
    )
    tiny_policy.encode_prompt("x")
    tiny_policy.encode_prompt("x")
    assert len(calls) == 1


def test_target_size_must_be_multiple_of_16(tiny_policy):
    with pytest.raises(ValueError, match="multiple of 16"):
        tiny_policy.condition(PROMPT, [], 60, 64)


@pytest.mark.gpu
def test_text_encoders_on_cpu_transformer_on_gpu(tiny_checkpoint):
    policy = flux_kontext(
        tiny_checkpoint, dtype="bfloat16", device="cuda", text_encoder_device="cpu", max_sequence_length=32
    )
    assert policy.device.type == "cuda" and policy.text_encoder_2.device.type == "cpu"
    cond = policy.condition(PROMPT, [_ref(1)], H, W)
    assert cond.prompt_embeds.device.type == "cuda"
    traj = rollout(policy, cond, 2, num_steps=2, generator=torch.Generator("cuda").manual_seed(0))
    assert torch.isfinite(traj.log_probs).all()
