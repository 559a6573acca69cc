"""The SFT flow-matching objective against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from psr.objectives.flow_matching import (
    FlowMatchingLoss,
    flow_matching_errors,
    loss_weights,
    noisy_latents,
    sample_sigmas,
    shift_sigmas,
    target_velocity,
)

H = W = 64


def _ks_statistic(samples: torch.Tensor, cdf) -> float:
    """Kolmogorov-Smirnov distance between the empirical CDF of ``samples`` and ``cdf``."""
    x = np.sort(samples.double().numpy())
    f = cdf(x)
    n = len(x)
    return float(max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n)))


def test_logit_normal_matches_torch_distributions():
    # 20k draws: the KS critical value at alpha = 1e-3 is 1.95 / sqrt(n) ~ 0.0138.
    gen = torch.Generator().manual_seed(0)
    t = sample_sigmas(20_000, kind="logit_normal", logit_mean=0.3, logit_std=1.2, generator=gen)
    ref = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(
            torch.tensor(0.3, dtype=torch.float64), torch.tensor(1.2, dtype=torch.float64)
        ),
        [torch.distributions.transforms.SigmoidTransform()],
    )
    assert _ks_statistic(t, lambda x: ref.cdf(torch.from_numpy(x).clamp(1e-9, 1 - 1e-9)).numpy()) < 0.0138
    # and a wrong parameter is rejected by the same statistic (so the test can fail)
    wrong = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(
            torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.2, dtype=torch.float64)
        ),
        [torch.distributions.transforms.SigmoidTransform()],
    )
    assert _ks_statistic(t, lambda x: wrong.cdf(torch.from_numpy(x).clamp(1e-9, 1 - 1e-9)).numpy()) > 0.0138


def test_static_shifted_uniform_has_closed_form_cdf():
    # t' = s u / (1 + (s - 1) u) with u ~ U(0, 1)  =>  P(t' <= x) = u(x) = x / (s - (s - 1) x).
    s = 3.0
    t = sample_sigmas(20_000, kind="uniform", shift=s, generator=torch.Generator().manual_seed(1))
    assert _ks_statistic(t, lambda x: x / (s - (s - 1) * x)) < 0.0138
    assert _ks_statistic(t, lambda x: x) > 0.0138  # unshifted uniform is far off


def test_flux_shift_is_the_scheduler_rule():
    # mu linear in the token count between (256, 0.5) and (4096, 1.15); t' = e^mu / (e^mu + 1/t - 1).
    u = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    cfg = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
    for n in (16, 1024, 4096):
        mu = 0.5 + (1.15 - 0.5) * (n - 256) / (4096 - 256)
        expected = math.exp(mu) / (math.exp(mu) + 1 / u - 1)
        torch.testing.assert_close(shift_sigmas(u, "flux", image_seq_len=n, scheduler_config=cfg), expected)
    # FLUX's scheduler at 1024 tokens: the shifted value of 0.5 is e^mu / (e^mu + 1)
    got = shift_sigmas(
        torch.tensor([0.5], dtype=torch.float64), "flux", image_seq_len=1024, scheduler_config=cfg
    )
    assert got.item() == pytest.approx(1 / (1 + math.exp(-(0.5 + 0.65 * 768 / 3840))))


def test_weightings_equal_diffusers_sd3_weighting():
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigmas = torch.linspace(0.01, 0.99, 11)
    for scheme in ("sigma_sqrt", "cosmap"):
        torch.testing.assert_close(
            loss_weights(sigmas, scheme), compute_loss_weighting_for_sd3(scheme, sigmas)
        )
    torch.testing.assert_close(loss_weights(sigmas, "none"), torch.ones(11))


def test_bad_keys_name_the_config_key():
    with pytest.raises(ValueError, match="objective.timestep_sampling"):
        FlowMatchingLoss(timestep_sampling="beta")
    with pytest.raises(ValueError, match="objective.weighting"):
        FlowMatchingLoss(weighting="snr")
    with pytest.raises(ValueError, match="objective.shift"):
        FlowMatchingLoss(shift="resolution")


class _LinearPolicy:
    """v(x, t) = a x + b t: a closed-form stand-in that records what it was called with."""

    scheduler_config: dict = {}

    def __init__(self, a: float, b: float) -> None:
        self.a, self.b, self.calls = a, b, []

    def velocity(self, x, sigma, cond):
        self.calls.append((x.clone(), sigma.clone(), cond))
        return self.a * x + self.b * sigma.view(-1, 1, 1)


def test_loss_closed_form_on_a_linear_velocity():
    # x0 = 1, eps = 0, t = 0.5: x_t = 0.5, target u = -1, v = 2 * 0.5 + 4 * 0.5 = 3, err^2 = 16.
    policy = _LinearPolicy(2.0, 4.0)
    x0, noise = torch.ones(2, 3, 4), torch.zeros(2, 3, 4)
    loss, parts = FlowMatchingLoss(weighting="none")(
        policy, x0, "cond", sigmas=torch.tensor([0.5, 0.5]), noise=noise
    )
    assert loss.item() == pytest.approx(16.0)
    # the velocity saw the noisy TARGET latents only (N = 3 tokens) and the conditioning untouched
    x_seen, s_seen, cond_seen = policy.calls[0]
    torch.testing.assert_close(x_seen, torch.full((2, 3, 4), 0.5))
    assert cond_seen == "cond" and s_seen.tolist() == [0.5, 0.5]
    # cosmap weight at t = 0.5 is 2 / (pi * 0.5)
    loss_w, _ = FlowMatchingLoss(weighting="cosmap")(
        policy, x0, "cond", sigmas=torch.tensor([0.5, 0.5]), noise=noise
    )
    assert loss_w.item() == pytest.approx(16.0 * 4 / math.pi, rel=1e-6)
    assert parts["mse"].tolist() == [16.0, 16.0]


def test_loss_equals_float64_computation_on_tiny_policy(tiny_policy):
    """One batch through the real tiny FLUX Kontext: fp32 loss vs an independent float64 pipeline."""
    torch.manual_seed(0)
    refs = [torch.rand(3, H, W), torch.rand(3, 48, 64)]
    cond = tiny_policy.condition("a red square and a blue disc", refs, H, W)
    x0 = tiny_policy.encode_images(torch.rand(3, 3, H, W))  # [3, 16, 16]
    gen = torch.Generator().manual_seed(7)
    objective = FlowMatchingLoss(timestep_sampling="logit_normal", shift="flux", weighting="cosmap")
    loss, parts = objective(tiny_policy, x0, cond, generator=gen)
    # the same draws, reproduced from the same generator state
    gen = torch.Generator().manual_seed(7)
    sigmas = objective.sample(3, x0.shape[1], tiny_policy.scheduler_config, gen, "cpu")
    noise = torch.randn(x0.shape, generator=gen)
    torch.testing.assert_close(parts["sigma"], sigmas)

    tiny_policy.transformer.double()
    cond64 = cond.to("cpu", torch.float64)
    x0d, nd, sd = x0.double(), noise.double(), sigmas.double()
    x_t = (1 - sd[:, None, None]) * x0d + sd[:, None, None] * nd
    pred = tiny_policy.transformer(
        hidden_states=torch.cat([x_t, cond64.ref_tokens.expand(3, -1, -1)], dim=1),
        timestep=sd,
        guidance=torch.full((3,), 2.5, dtype=torch.float64),
        pooled_projections=cond64.pooled_prompt_embeds.expand(3, -1),
        encoder_hidden_states=cond64.prompt_embeds.expand(3, -1, -1),
        txt_ids=cond64.text_ids,
        img_ids=torch.cat([cond64.img_ids, cond64.ref_ids]),
        return_dict=False,
    )[0][:, : x0.shape[1]]
    mse = ((pred - (nd - x0d)) ** 2).mean(dim=(1, 2))
    w = 2 / (math.pi * (1 - 2 * sd + 2 * sd**2))
    expected = (w * mse).mean()
    # fp32 network vs fp64 network: agreement to ~1e-5 relative is float32 round-off over 2 blocks.
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    torch.testing.assert_close(parts["mse"].double(), mse, rtol=1e-4, atol=1e-7)


def test_reference_tokens_enter_as_context_only(tiny_policy):
    # The references are attended to (the loss changes with them) but they are clean context: the
    # network sees [noisy target tokens, clean reference tokens] and only the N target tokens are
    # scored. Checked three ways: what velocity() is called with; the loss against one written out
    # here, on the target tokens only; and three ways references could enter the loss, which must
    # differ from it by far more than the tolerance.
    refs = [torch.rand(3, H, W)]
    cond = tiny_policy.condition("a cat", refs, H, W)
    clean = tiny_policy.encode_images(refs[0][None])
    torch.testing.assert_close(cond.ref_tokens, clean)
    x0 = tiny_policy.encode_images(torch.rand(2, 3, H, W))
    sigmas = torch.tensor([0.4, 0.8])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    kw = dict(sigmas=sigmas, noise=noise)
    a, _ = FlowMatchingLoss()(tiny_policy, x0, cond, **kw)
    b, _ = FlowMatchingLoss()(
        tiny_policy, x0, tiny_policy.condition("a cat", [torch.rand(3, H, W)], H, W), **kw
    )
    assert a.item() != pytest.approx(b.item(), rel=1e-6)

    calls = []

    class Spy:  # records what the objective hands the policy
        scheduler_config = tiny_policy.scheduler_config

        def velocity(self, x, sigma, c):
            calls.append((x.detach().clone(), c))
            return tiny_policy.velocity(x, sigma, c)

    assert FlowMatchingLoss()(Spy(), x0, cond, **kw)[0].item() == a.item()
    ((x_seen, cond_seen),) = calls
    t = sigmas[:, None, None]
    x_t = (1 - t) * x0 + t * noise  # [B, N, C]: the target tokens alone are noised
    torch.testing.assert_close(x_seen, x_t)
    torch.testing.assert_close(cond_seen.ref_tokens, clean)  # references go in clean

    # Written out: the sequence [x_t, refs] through the network as one "target" of N + R tokens (the
    # references moved out of the conditioning, with their position ids), so every token's output
    # is visible; the flow-matching error is then taken over the chosen tokens.
    from dataclasses import replace

    n, r = x0.shape[1], clean.shape[1]
    merged = replace(
        cond,
        ref_tokens=cond.ref_tokens[:, :0],
        ref_ids=cond.ref_ids[:0],
        img_ids=torch.cat([cond.img_ids, cond.ref_ids]),
    )
    ref_clean = clean.expand(2, -1, -1)  # [B, R, C]
    ref_noise = torch.randn(ref_clean.shape, generator=torch.Generator().manual_seed(1))
    ref_t = (1 - t) * ref_clean + t * ref_noise

    def loss_over(ref_in: torch.Tensor, scored: slice, target: torch.Tensor) -> float:
        with torch.no_grad():
            out = tiny_policy.velocity(torch.cat([x_t, ref_in], dim=1), sigmas, merged).double()
        return ((out[:, scored] - target.double()) ** 2).mean().item()

    u = noise - x0  # the target velocity of the target tokens
    expected = loss_over(ref_clean, slice(0, n), u)
    # fp32 both ways, the same network on the same sequence: measured 4e-8 relative
    tol = 1e-6 * expected
    assert a.item() == pytest.approx(expected, abs=tol)
    leaks = {
        "references noised": loss_over(ref_t, slice(0, n), u),
        "references noised and scored": loss_over(
            ref_t, slice(0, n + r), torch.cat([u, ref_noise - ref_clean], dim=1)
        ),
        "clean references scored (target velocity 0)": loss_over(
            ref_clean, slice(0, n + r), torch.cat([u, torch.zeros_like(ref_clean)], dim=1)
        ),
    }
    for name, leaked in leaks.items():
        assert abs(leaked - expected) > 100 * tol, (name, leaked, expected)


def test_helpers_shapes_and_dtypes():
    x0, noise = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    s = torch.tensor([0.0, 1.0])
    xt = noisy_latents(x0, noise, s)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[1], noise[1])
    assert flow_matching_errors(noise - x0, target_velocity(x0, noise)).abs().max().item() == 0.0
    assert flow_matching_errors(x0.double(), target_velocity(x0, noise)).dtype == torch.float64
    assert target_velocity(x0.bfloat16(), noise).dtype == torch.float32  # never rounded to bf16


def test_flow_matching_errors_match_float64_manual():
    gen = torch.Generator().manual_seed(0)
    v, u = torch.randn(2, 5, 3, generator=gen), torch.randn(2, 5, 3, generator=gen)
    w = torch.rand(2, 5, generator=gen) + 0.1
    vd, ud, wd = v.double().numpy(), u.double().numpy(), w.double().numpy()
    plain, weighted = np.zeros(2), np.zeros(2)
    for b in range(2):
        wn = wd[b] / wd[b].mean()
        for n in range(5):
            for c in range(3):
                plain[b] += (vd[b, n, c] - ud[b, n, c]) ** 2 / 15
                weighted[b] += wn[n] * (vd[b, n, c] - ud[b, n, c]) ** 2 / 15
    # float32 sums of 15 terms of size ~1: relative error a few ulp (1e-6)
    np.testing.assert_allclose(flow_matching_errors(v, u).numpy(), plain, rtol=1e-6)
    np.testing.assert_allclose(flow_matching_errors(v, u, w).numpy(), weighted, rtol=1e-6)
    # uniform weights of any size are the plain mean
    torch.testing.assert_close(
        flow_matching_errors(v, u, torch.full((2, 5), 3.0)), flow_matching_errors(v, u)
    )


def test_flow_matching_errors_gradient_goes_to_the_prediction_only():
    v = torch.zeros(1, 2, 1, requires_grad=True)
    w = torch.tensor([[1.0, 3.0]], requires_grad=True)
    flow_matching_errors(v, torch.ones(1, 2, 1), w).sum().backward()
    # e = mean_n w_n (v_n - 1)^2 with w normalized to [0.5, 1.5]: de/dv_n = w_n (v_n - 1) = [-0.5, -1.5]
    torch.testing.assert_close(v.grad, torch.tensor([[[-0.5], [-1.5]]]))
    assert w.grad is None
    with pytest.raises(ValueError, match="weights"):
        flow_matching_errors(v.detach(), torch.ones(1, 2, 1), torch.tensor([[1.0, -1.0]]))
