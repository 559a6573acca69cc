import pytest
import torch

from psr.models.lora import (
    add_lora,
    export_diffusers_lora,
    load_lora_state_dict,
    lora_state_dict,
    make_trainable,
    merge_lora,
    read_diffusers_lora,
)

H = W = 64


def _perturb(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _engine_weights(policy):
    """The LoRA weights by parameter name, as the engine and ``trainable.safetensors`` hold them."""
    return {n: p.detach().clone() for n, p in policy.transformer.named_parameters() if "lora_" in n}


def test_lora_trains_only_adapters_and_disabled_is_base(tiny_policy):
    cond = tiny_policy.condition("a dog", [torch.rand(3, H, W)], H, W)
    x = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0))
    base = tiny_policy.velocity(x, 0.5, cond).detach()
    params = add_lora(tiny_policy.transformer, rank=4, alpha=8)
    assert params and all(
        "lora_" in n for n, p in tiny_policy.transformer.named_parameters() if p.requires_grad
    )
    assert tiny_policy.trainable_parameters() == params
    torch.testing.assert_close(tiny_policy.velocity(x, 0.5, cond), base)  # B = 0 at init
    _perturb(params)
    adapted = tiny_policy.velocity(x, 0.5, cond).detach()
    assert not torch.allclose(adapted, base, atol=1e-5)
    with tiny_policy.reference_policy():
        torch.testing.assert_close(tiny_policy.velocity(x, 0.5, cond), base)
    torch.testing.assert_close(tiny_policy.velocity(x, 0.5, cond), adapted)


def test_lora_state_round_trip(tiny_policy):
    from psr.models.builders import tiny_flux_kontext

    params = add_lora(tiny_policy.transformer, rank=4)
    _perturb(params)
    state = lora_state_dict(tiny_policy.transformer)
    other = tiny_flux_kontext(seed=0)
    add_lora(other.transformer, rank=4)
    load_lora_state_dict(other.transformer, state)
    cond = tiny_policy.condition("a cat", [], H, W)
    x = torch.randn(1, 16, 16)
    torch.testing.assert_close(
        other.velocity(x, 0.3, other.condition("a cat", [], H, W)), tiny_policy.velocity(x, 0.3, cond)
    )


def test_export_loads_in_flux_kontext_pipeline(tiny_policy, tiny_components, tmp_path):
    from diffusers import FluxKontextPipeline

    from psr.models.builders import tiny_flux_kontext_components

    # alpha != rank: the scale alpha / r must reach the pipeline through the file's metadata
    params = add_lora(tiny_policy.transformer, rank=4, alpha=8)
    _perturb(params)
    path = export_diffusers_lora(tiny_policy.transformer, _engine_weights(tiny_policy), tmp_path)
    assert path.is_file()
    pipe = FluxKontextPipeline(**tiny_flux_kontext_components(seed=0))
    pipe.load_lora_weights(tmp_path)
    cond = tiny_policy.condition("a cat", [], H, W)
    x = torch.randn(1, 16, 16)
    ours = tiny_policy.velocity(x, 0.4, cond)
    theirs = pipe.transformer(
        hidden_states=x,
        timestep=torch.tensor([0.4]),
        guidance=torch.tensor([2.5]),
        pooled_projections=cond.pooled_prompt_embeds,
        encoder_hidden_states=cond.prompt_embeds,
        txt_ids=cond.text_ids,
        img_ids=cond.img_ids,
        return_dict=False,
    )[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_merge_of_the_exported_file_equals_the_adapted_model(tiny_policy, tmp_path):
    """Export then merge (what psr-eval lora=... does) and merge from engine-named weights (what
    init_from does) both give the adapted model's velocity with the adapter's scale alpha / r = 2."""
    from psr.models.builders import tiny_flux_kontext

    params = add_lora(tiny_policy.transformer, rank=4, alpha=8)
    _perturb(params)
    refs = [torch.rand(3, H, W, generator=torch.Generator().manual_seed(1))]
    cond = tiny_policy.condition("a cat", refs, H, W)
    x = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(2))
    adapted = tiny_policy.velocity(x, 0.4, cond)
    weights, scale = read_diffusers_lora(
        export_diffusers_lora(tiny_policy.transformer, _engine_weights(tiny_policy), tmp_path)
    )
    assert scale == 2.0 and all(k.startswith("transformer.") for k in weights)
    for source in (weights, _engine_weights(tiny_policy)):
        merged = tiny_flux_kontext(seed=0)
        merge_lora(merged.transformer, source, scale)
        got = merged.velocity(x, 0.4, merged.condition("a cat", refs, H, W))
        torch.testing.assert_close(got, adapted, rtol=1e-5, atol=1e-5)


def test_merge_and_make_trainable_name_the_config_key(tiny_policy):
    with pytest.raises(KeyError, match="lora_A/lora_B"):
        merge_lora(tiny_policy.transformer, {"x.lora_A.weight": torch.zeros(1, 1)}, 1.0)
    with pytest.raises(ValueError, match="train.mode"):
        make_trainable(tiny_policy, "half")
    with pytest.raises(ValueError, match="train.lora.targets"):
        make_trainable(tiny_policy, "lora", rank=2, targets=["no_such_module"])
