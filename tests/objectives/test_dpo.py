"""Diffusion-DPO loss, pair construction and focus weighting against hand and float64 computations."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from psr.objectives.dpo import (
    DPOObjective,
    diffusion_dpo_loss,
    focus_weights,
    make_pairs,
    patch_reference_similarity,
)

LOG2 = math.log(2.0)


def _t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


# ------------------------------------------------------------------------------------------ loss
def test_sign_around_log_2():
    # winner better than the reference (0.9 < 1.0), loser worse (1.1 > 1.0), beta = 2:
    # inside = -(2/2) [(0.9 - 1.0) - (1.1 - 1.0)] = 0.2 -> L = log(1 + e^-0.2) = 0.598 < log 2
    good, m = diffusion_dpo_loss(_t(0.9), _t(1.0), _t(1.1), _t(1.0), beta=2.0)
    assert good.item() == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-12)
    assert good.item() < LOG2
    assert m["train/dpo/implicit_acc"].item() == 1.0
    # reversed: inside = -0.2 -> L = log(1 + e^0.2) = 0.798 > log 2
    bad, m = diffusion_dpo_loss(_t(1.1), _t(1.0), _t(0.9), _t(1.0), beta=2.0)
    assert bad.item() == pytest.approx(math.log1p(math.exp(0.2)), abs=1e-12)
    assert bad.item() > LOG2
    assert m["train/dpo/implicit_acc"].item() == 0.0
    # policy == reference: log 2 whatever beta
    same, _ = diffusion_dpo_loss(_t(0.7), _t(0.7), _t(0.3), _t(0.3), beta=5000.0)
    assert same.item() == pytest.approx(LOG2, abs=1e-12)


def test_exact_value_on_two_pairs():
    # beta = 10 (beta/2 = 5)
    #   pair 0: e_w - e_ref_w = 0.30 - 0.40 = -0.10, e_l - e_ref_l = 0.60 - 0.50 = 0.10
    #           inside = -5 (-0.10 - 0.10) = 1.0   -> L0 = log(1 + e^-1)  = 0.3132617
    #   pair 1: e_w - e_ref_w = 0.50 - 0.45 = 0.05, e_l - e_ref_l = 0.20 - 0.25 = -0.05
    #           inside = -5 (0.05 + 0.05) = -0.5   -> L1 = log(1 + e^0.5) = 0.9740770
    loss, m = diffusion_dpo_loss(_t(0.30, 0.50), _t(0.40, 0.45), _t(0.60, 0.20), _t(0.50, 0.25), beta=10.0)
    assert loss.item() == pytest.approx(
        (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2, abs=1e-12
    )
    assert loss.item() == pytest.approx(0.6436694, abs=1e-7)
    assert m["train/dpo/implicit_acc"].item() == 0.5
    assert m["train/dpo/margin"].item() == pytest.approx(0.25, abs=1e-12)
    assert m["train/dpo/err_diff_w"].item() == pytest.approx(-0.025, abs=1e-12)
    assert m["train/dpo/err_diff_l"].item() == pytest.approx(0.025, abs=1e-12)


def test_gradients_lower_winner_error_and_raise_loser_error():
    err_w, err_l = _t(0.5).requires_grad_(True), _t(0.5).requires_grad_(True)
    diffusion_dpo_loss(err_w, _t(0.5), err_l, _t(0.5), beta=4.0)[0].backward()
    # at inside = 0: dL/de_w = (beta/2) sigmoid(0) = 1, dL/de_l = -1
    assert err_w.grad.item() == pytest.approx(1.0)
    assert err_l.grad.item() == pytest.approx(-1.0)


def test_large_beta_stays_finite():
    # inside = -+1e5: a naive log(sigmoid(.)) underflows to -inf
    loss, _ = diffusion_dpo_loss(_t(0.2, 0.0), _t(0.0, 0.0), _t(0.0, 0.0), _t(0.0, 0.0), beta=1e6)
    assert math.isfinite(loss.item())
    # pair 0: inside = -1e5, -log sigmoid(-1e5) = 1e5 (+ e^-1e5); pair 1: inside = 0, log 2
    assert loss.item() == pytest.approx((1e5 + LOG2) / 2, abs=1e-9)
    with pytest.raises(ValueError, match="algo.beta"):
        diffusion_dpo_loss(_t(0.1), _t(0.1), _t(0.1), _t(0.1), beta=0.0)
    with pytest.raises(ValueError, match="err_l"):
        diffusion_dpo_loss(_t(0.1), _t(0.1), _t(0.1, 0.2), _t(0.1), beta=1.0)


# ----------------------------------------------------------------------------------------- pairs
REWARDS = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.3, 0.2, 0.8, 0.8])
GROUPS = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])


def test_best_worst_pairs():
    pairs = make_pairs(REWARDS, GROUPS, mode="best_worst")
    # group 0: best 1 (0.9), worst 0 (0.1); group 1: a tie, no pair; group 2: first best 6, worst 5
    assert pairs.tolist() == [[1, 0], [6, 5]]
    assert pairs.dtype == torch.long
    # a margin above group 2's gap of 0.6 drops it
    assert make_pairs(REWARDS, GROUPS, mode="best_worst", margin=0.7).tolist() == [[1, 0]]


def test_all_pairs():
    pairs = make_pairs(REWARDS, GROUPS, mode="all_pairs")
    assert pairs.tolist() == [[1, 0], [1, 2], [2, 0], [6, 5], [7, 5]]  # the tie 6-7 and group 1 form none
    # margin 0.5: 0.9-0.5 and 0.5-0.1 (0.4) drop; 0.8 and 0.6 gaps stay
    assert make_pairs(REWARDS, GROUPS, mode="all_pairs", margin=0.5).tolist() == [[1, 0], [6, 5], [7, 5]]


def test_pairs_stay_in_their_group_and_are_ordered_by_reward():
    gen = torch.Generator().manual_seed(0)
    r = torch.randint(0, 4, (30,), generator=gen).float()  # many ties
    g = torch.randint(10, 14, (30,), generator=gen)
    for mode in ("best_worst", "all_pairs"):
        pairs = make_pairs(r, g, mode=mode, margin=0.5)
        assert (g[pairs[:, 0]] == g[pairs[:, 1]]).all()
        assert (r[pairs[:, 0]] - r[pairs[:, 1]] > 0.5).all()
    # all_pairs is exactly the set of ordered in-group pairs above the margin (brute force)
    brute = {(i, j) for i in range(30) for j in range(30) if g[i] == g[j] and r[i] - r[j] > 0.5}
    assert {tuple(p) for p in make_pairs(r, g, mode="all_pairs", margin=0.5).tolist()} == brute
    assert make_pairs(torch.ones(4), torch.zeros(4, dtype=torch.long), mode="all_pairs").shape == (0, 2)


def test_pairs_reject_bad_input():
    with pytest.raises(ValueError, match="finite"):
        make_pairs(torch.tensor([1.0, math.nan]), torch.tensor([0, 0]), mode="best_worst")
    with pytest.raises(ValueError, match="algo.pairs"):
        make_pairs(REWARDS, GROUPS, mode="top_k")
    with pytest.raises(ValueError, match="algo.margin"):
        make_pairs(REWARDS, GROUPS, mode="all_pairs", margin=-0.1)


# ---------------------------------------------------------------------------------- focus weights
def test_focus_weights_by_hand():
    sim = torch.tensor([[0.0, 0.5, 1.0]])  # min-max scaled: s = [0, 0.5, 1]
    # linear, strength 2, sigma 0.5 -> lam = 1: w = [1, 1.5, 2] / 1.5
    lin = focus_weights(sim, torch.tensor([0.5]), strength=2.0, schedule="linear")
    torch.testing.assert_close(lin, torch.tensor([[2 / 3, 1.0, 4 / 3]]))
    # constant, strength 2 -> lam = 2: w = [1, 2, 3] / 2
    const = focus_weights(sim, torch.tensor([0.5]), strength=2.0, schedule="constant")
    torch.testing.assert_close(const, torch.tensor([[0.5, 1.0, 1.5]]))


def test_focus_weights_mean_one_ordering_and_timestep_adaptation():
    gen = torch.Generator().manual_seed(0)
    sim = torch.rand(4, 16, generator=gen) * 2 - 1
    sigma = torch.tensor([0.0, 0.3, 0.7, 1.0])
    w = focus_weights(sim, sigma, strength=3.0, schedule="linear")
    torch.testing.assert_close(w.mean(dim=1), torch.ones(4))
    # weights follow the similarity order (distinct random sims); sigma = 1 is uniform
    for b in range(3):
        assert torch.equal(torch.argsort(w[b]), torch.argsort(sim[b]))
    torch.testing.assert_close(w[3], torch.ones(16))
    # the same similarities get a stronger focus at lower noise
    same = sim[:1].expand(4, -1)
    spread = focus_weights(same, sigma, strength=3.0, schedule="linear")
    ratio = spread.max(dim=1).values / spread.min(dim=1).values
    assert ratio[0] == pytest.approx(4.0)  # max/min = 1 + lam with lam = 3 at sigma 0
    assert (ratio[:-1] > ratio[1:]).all()
    # no focus: strength 0, or all similarities equal
    torch.testing.assert_close(focus_weights(sim, sigma, strength=0.0), torch.ones(4, 16))
    torch.testing.assert_close(
        focus_weights(torch.full((2, 5), 0.3), sigma[:2], strength=3.0), torch.ones(2, 5)
    )
    with pytest.raises(ValueError, match="algo.focus_schedule"):
        focus_weights(sim, sigma, strength=1.0, schedule="cosine")


def test_patch_reference_similarity_matches_a_float64_loop():
    gen = torch.Generator().manual_seed(0)
    tgt = torch.randn(2, 6, 4, generator=gen)
    ref = torch.randn(1, 5, 4, generator=gen)
    tgt[0, 2] = 3.0 * ref[0, 1]  # a copied patch (scaled): similarity 1
    tgt[1, 0] = -ref[0, 4]
    got = patch_reference_similarity(tgt, ref)
    td, rd = tgt.double().numpy(), ref.double().numpy()[0]
    expected = np.zeros((2, 6))
    for b in range(2):
        for n in range(6):
            cos = [td[b, n] @ rd[r] / (np.linalg.norm(td[b, n]) * np.linalg.norm(rd[r])) for r in range(5)]
            expected[b, n] = max(cos)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert got[0, 2].item() == pytest.approx(1.0, abs=1e-6)
    # a per-sample reference batch gives the same as a shared one
    torch.testing.assert_close(patch_reference_similarity(tgt, ref.expand(2, -1, -1)), got)
    with pytest.raises(ValueError, match="ref_tokens"):
        patch_reference_similarity(tgt, torch.randn(3, 5, 4))


# ------------------------------------------------------------------------------------- DPOObjective
def test_dpo_yaml_instantiates_the_objective():
    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "algo" / "dpo.yaml")
    objective = instantiate(cfg, micro_batch_size=4, inner_epochs=1)
    assert isinstance(objective, DPOObjective)
    assert (objective.micro_batch_size, objective.inner_epochs) == (4, 1)
    keys = {k for k in cfg if k != "_target_"}
    # every constructor argument but the two train.* ones is a documented key, with its value
    assert keys == {f.name for f in fields(DPOObjective)} - {"micro_batch_size", "inner_epochs"}
    for key in keys:
        assert getattr(objective, key) == cfg[key], key
    assert objective.needs_reference
    with pytest.raises(Exception, match="algo.pairs"):  # hydra wraps the ValueError
        instantiate(cfg, micro_batch_size=4, inner_epochs=1, pairs="top_k")
