"""The engines on the real training path: the tiny FLUX.1 Kontext transformer with peft LoRA,
called through ``FlowPolicy.velocity`` (not through any engine wrapper).

ZeRO-2 / ZeRO-3 (one gloo process) must give TorchEngine's LoRA weights after two accumulated steps,
and under ZeRO-3 a rollout-style forward inside ``gathered_parameters()`` (with and without the
adapters) must equal the plain model's. Tolerance 1e-6 (measured: 0 for ZeRO-2, ~2e-7 for ZeRO-3).
"""

from __future__ import annotations

import copy

import pytest
import torch

from psr.engine import DeepSpeedEngine, TorchEngine

TOL = dict(rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def flux_case():
    from psr.models.builders import tiny_flux_kontext
    from psr.models.lora import add_lora

    policy = tiny_flux_kontext(seed=0, fitted_vae=False)
    add_lora(policy.transformer, rank=4, alpha=4, targets=("attn.to_q", "attn.to_k", "attn.to_v"))
    g = torch.Generator().manual_seed(0)
    cond = policy.condition("a red cube and a dog", [torch.rand(3, 32, 32, generator=g)], 32, 32)
    x = torch.randn(4, cond.num_target_tokens, policy.transformer.config.in_channels, generator=g)
    return policy, policy.transformer, cond, x


def _run(flux_case, engine) -> dict:
    policy, base, cond, x = flux_case
    policy.transformer = copy.deepcopy(base)  # every engine starts from the same weights
    params = [p for n, p in policy.transformer.named_parameters() if "lora_" in n]
    engine.setup(policy.transformer, params, lr=1e-2, grad_clip=1.0)
    norms = []
    for _ in range(2):  # LoRA B starts at 0: the second step also moves A
        for xb in x.chunk(2):
            engine.backward(policy.velocity(xb, 0.5, cond).pow(2).mean() / 2)
        norms.append(engine.step()["grad_norm"])
    with torch.no_grad(), engine.gathered_parameters():
        v = policy.velocity(x, 0.3, cond)
        with policy.reference_policy():  # the reference policy of the KL term
            v_ref = policy.velocity(x, 0.3, cond)
    return {"weights": engine.trainable_state_dict(), "norms": norms, "v": v, "v_ref": v_ref}


@pytest.mark.timeout(120)
def test_lora_on_tiny_flux_matches_across_engines(flux_case, ds_env: None) -> None:
    ref = _run(flux_case, TorchEngine())
    assert all(n > 0 for n in ref["norms"])
    assert not torch.allclose(ref["v"], ref["v_ref"])  # the adapters did learn something
    for stage in (2, 3):
        got = _run(flux_case, DeepSpeedEngine(stage=stage, precision="fp32", zero3_persistence_threshold=0))
        assert got["norms"] == pytest.approx(ref["norms"], rel=1e-6)
        assert set(got["weights"]) == set(ref["weights"]) and all("lora_" in n for n in got["weights"])
        for n, t in ref["weights"].items():
            torch.testing.assert_close(got["weights"][n], t, **TOL)
        torch.testing.assert_close(got["v"], ref["v"], **TOL)
        torch.testing.assert_close(got["v_ref"], ref["v_ref"], **TOL)
