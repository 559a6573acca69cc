"""The PSR reward: closed-form cases with detectors whose output is known, and the batched real path.

Detectors used here: ``BoxesDetector`` (returns the boxes where the test pasted the subjects: an
oracle) and ``ForegroundDetector`` (finds pasted subjects on a blank canvas by itself). Embedder:
the tiny random DINO-layout ViT; identical pixels give identical embeddings whatever the weights.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rewards.base import RewardInputs, Subject
from rewards.detectors import BoxesDetector, Detections, ForegroundDetector
from rewards.subject_consistency import SubjectConsistencyReward, assign, psrbench_score, sigmoid_rescale

TOL = 1e-5  # float32 cosine of identical embeddings: 1 up to rounding
# Scores from our preprocessing vs PSRBench's (PIL bicubic on 8-bit crops): measured up to 1.2e-4
PREPROCESSING_TOL = 5e-4


def _canvas(size: int = 96) -> torch.Tensor:
    return torch.ones(3, size, size)


def test_identical_reference_and_crop_give_similarity_one(tiny_dino, patch, paste):
    ref = patch(1, 30, 24)
    canvas = _canvas()
    box = paste(canvas, ref, 10, 20)
    reward = SubjectConsistencyReward(BoxesDetector([{"dog": [box]}]), tiny_dino, detect_references=False)
    out = reward(canvas[None], RewardInputs(["a dog"], [[ref]], [[Subject("corgi", "dog")]]))
    assert out["subject_1"].item() == pytest.approx(1.0, abs=TOL)
    assert out["score"].item() == pytest.approx(1.0, abs=TOL)
    assert out["detected_frac"].item() == 1.0 and out["detected_1"].item() == 1.0
    assert math.isnan(out["subject_2"].item()) and math.isnan(out["detected_2"].item())


def test_pasted_subject_is_found_on_blank_canvas_and_matched(tiny_dino, patch, paste):
    # ForegroundDetector finds both pasted subjects by itself; references are the same pixels on white
    a, b = patch(2, 20, 28), patch(3, 26, 18)
    canvas = _canvas()
    paste(canvas, a, 60, 8)
    paste(canvas, b, 6, 50)
    refs = []
    for piece in (a, b):
        ref = torch.ones(3, 48, 48)
        paste(ref, piece, 10, 12)
        refs.append(ref)
    reward = SubjectConsistencyReward(ForegroundDetector(), tiny_dino)
    subjects = [Subject("mug", "mug"), Subject("teddy", "toy")]
    out = reward(canvas[None], RewardInputs(["a mug and a toy"], [refs], [subjects]))
    assert out["subject_1"].item() == pytest.approx(1.0, abs=TOL)
    assert out["subject_2"].item() == pytest.approx(1.0, abs=TOL)
    assert out["ref_detected_frac"].item() == 1.0


def _two_dogs(patch, paste):
    a, b = patch(4, 24, 24), patch(5, 24, 24)
    canvas = _canvas()
    box_a, box_b = paste(canvas, a, 8, 30), paste(canvas, b, 60, 30)
    # detection order puts dog B first (higher score): order-based pairing is wrong for refs [a, b]
    det = Detections.from_boxes([box_b, box_a], labels=[0, 0], scores=[0.9, 0.8])
    return canvas, a, b, BoxesDetector(lambda i, image, queries: det)


def test_same_category_subjects_are_matched_by_similarity_not_order(tiny_dino, patch, paste):
    canvas, a, b, det = _two_dogs(patch, paste)
    subjects = [Subject("dog A", "dog"), Subject("dog B", "dog")]
    hungarian = SubjectConsistencyReward(det, tiny_dino, detect_references=False)
    order = SubjectConsistencyReward(det, tiny_dino, detect_references=False, assignment="order")
    straight = RewardInputs(["two dogs"], [[a, b]], [subjects])
    swapped = RewardInputs(["two dogs"], [[b, a]], [subjects])
    for inputs in (straight, swapped):  # each reference finds its own dog, whichever subject it belongs to
        out = hungarian(canvas[None], inputs)
        assert out["subject_1"].item() == pytest.approx(1.0, abs=TOL)
        assert out["subject_2"].item() == pytest.approx(1.0, abs=TOL)
    # PSRBench's order-based pairing scores the straight order against the wrong dogs, and the score
    # changes when the references are swapped
    s_straight, s_swapped = (
        order(canvas[None], straight)["score"].item(),
        order(canvas[None], swapped)["score"].item(),
    )
    assert s_straight < 1.0 - 1e-3
    assert s_swapped == pytest.approx(1.0, abs=TOL)


def test_swapping_references_across_categories_changes_the_score(tiny_dino, patch, paste):
    dog, cat = patch(6, 24, 24), patch(7, 24, 24)
    canvas = _canvas()
    boxes = {"dog": [paste(canvas, dog, 8, 8)], "cat": [paste(canvas, cat, 60, 60)]}
    reward = SubjectConsistencyReward(BoxesDetector([boxes]), tiny_dino, detect_references=False)
    subjects = [Subject("dog", "dog"), Subject("cat", "cat")]
    right = reward(canvas[None], RewardInputs(["a dog and a cat"], [[dog, cat]], [subjects]))["score"].item()
    wrong = reward(canvas[None], RewardInputs(["a dog and a cat"], [[cat, dog]], [subjects]))["score"].item()
    assert right == pytest.approx(1.0, abs=TOL)
    assert wrong < right - 1e-3


@pytest.mark.parametrize("penalty", [0.0, -0.5])
def test_missing_subject_is_flagged_and_scored_by_the_penalty(tiny_dino, patch, paste, penalty):
    dog, cat = patch(8, 20, 20), patch(9, 20, 20)
    canvas = _canvas()
    box = paste(canvas, dog, 10, 10)
    reward = SubjectConsistencyReward(
        BoxesDetector([{"dog": [box]}]), tiny_dino, detect_references=False, missing_penalty=penalty
    )
    out = reward(
        canvas[None],
        RewardInputs(["a dog and a cat"], [[dog, cat]], [[Subject("dog", "dog"), Subject("cat", "cat")]]),
    )
    assert out["detected_1"].item() == 1.0 and out["detected_2"].item() == 0.0
    assert out["detected_frac"].item() == 0.5
    assert out["subject_2"].item() == penalty
    assert out["score"].item() == pytest.approx((1.0 + penalty) / 2, abs=TOL)


def test_sigmoid_rescale_by_hand():
    score = torch.tensor([0.5, 0.7, 0.7, 0.7, 0.3, float("nan")], dtype=torch.float64)
    n = torch.tensor([1, 1, 2, 4, 2, 1])
    out = sigmoid_rescale(score, n, k=4.0, tau=0.5, k_per_reference=1.0)
    assert out[0].item() == 0.5  # sigmoid(k * 0) whatever k
    # k_n = 4 n: 4, 8, 16 for n = 1, 2, 4; twice the references, twice the slope
    for i, slope in ((1, 4.0), (2, 8.0), (3, 16.0), (4, 8.0)):
        expected = 1.0 / (1.0 + math.exp(-slope * (score[i].item() - 0.5)))
        assert out[i].item() == pytest.approx(expected, rel=1e-12)
    assert out[2].item() == pytest.approx(1.0 / (1.0 + math.exp(-1.6)), rel=1e-12)
    assert out[4].item() == pytest.approx(1.0 - out[2].item(), rel=1e-12)  # symmetric about tau
    assert math.isnan(out[5].item())
    # k_per_reference = 0.5: k_3 = 4 (1 + 0.5 * 2) = 8; 0: the same slope for every n
    three = sigmoid_rescale(score[1:2], torch.tensor([3]), k=4.0, tau=0.5, k_per_reference=0.5)
    assert torch.equal(three, torch.sigmoid(torch.tensor([8.0 * 0.2], dtype=torch.float64)))
    flat = sigmoid_rescale(score[1:4], n[1:4], k=4.0, tau=0.5, k_per_reference=0.0)
    assert torch.equal(flat, torch.sigmoid(torch.full((3,), 4.0 * 0.2, dtype=torch.float64)))


def test_sigmoid_option_rescales_the_score_by_the_number_of_references(tiny_dino, patch, paste):
    # sample 0: one subject, found (similarity 1); sample 1: a found dog and a missing cat (0.5)
    dog, cat = patch(8, 20, 20), patch(9, 20, 20)
    canvases = torch.stack([_canvas(), _canvas()])
    boxes = [{"dog": [paste(canvases[0], dog, 10, 10)]}, {"dog": [paste(canvases[1], dog, 40, 40)]}]
    inputs = RewardInputs(
        ["a dog", "a dog and a cat"],
        [[dog], [dog, cat]],
        [[Subject("dog", "dog")], [Subject("dog", "dog"), Subject("cat", "cat")]],
    )
    plain = SubjectConsistencyReward(BoxesDetector(boxes), tiny_dino, detect_references=False)(
        canvases, inputs
    )
    off = SubjectConsistencyReward(
        BoxesDetector(boxes), tiny_dino, detect_references=False, sigmoid_k=None, sigmoid_tau=0.9
    )(canvases, inputs)
    assert "similarity" not in plain and plain.keys() == off.keys()
    for key in plain:  # off by default: nothing changes, bit for bit (NaN where a subject slot is empty)
        torch.testing.assert_close(off[key], plain[key], rtol=0, atol=0, equal_nan=True)
    shaped = SubjectConsistencyReward(
        BoxesDetector(boxes), tiny_dino, detect_references=False, sigmoid_k=3.0, sigmoid_tau=0.5
    )(canvases, inputs)
    assert torch.equal(shaped["similarity"], plain["score"])
    assert torch.equal(shaped["subject_1"], plain["subject_1"])  # per-subject values stay cosines
    s0 = plain["score"][0].item()
    assert s0 == pytest.approx(1.0, abs=TOL) and plain["score"][1].item() == pytest.approx(0.5, abs=TOL)
    # k = 3 for one reference, 6 for two: sigmoid(3 (s0 - 0.5)) and sigmoid(6 (0.5 - 0.5)) = 0.5
    assert shaped["score"][0].item() == pytest.approx(1.0 / (1.0 + math.exp(-3.0 * (s0 - 0.5))), abs=1e-6)
    assert shaped["score"][1].item() == pytest.approx(0.5, abs=TOL)


@pytest.mark.parametrize(
    "kwargs", [{"sigmoid_k": 0.0}, {"sigmoid_k": -1.0}, {"sigmoid_k": 1.0, "sigmoid_k_per_reference": -0.5}]
)
def test_sigmoid_option_rejects_bad_values(tiny_dino, kwargs):
    with pytest.raises(ValueError, match="sigmoid_k"):
        SubjectConsistencyReward(BoxesDetector([]), tiny_dino, **kwargs)


def test_two_subjects_cannot_share_one_detection(tiny_dino, patch, paste):
    a, b = patch(10, 24, 24), patch(11, 24, 24)
    canvas = _canvas()
    box = paste(canvas, a, 20, 20)
    reward = SubjectConsistencyReward(BoxesDetector([{"dog": [box]}]), tiny_dino, detect_references=False)
    out = reward(
        canvas[None], RewardInputs(["two dogs"], [[b, a]], [[Subject("b", "dog"), Subject("a", "dog")]])
    )
    assert (
        out["detected_1"].item() == 0.0 and out["detected_2"].item() == 1.0
    )  # the one dog goes to its own reference
    assert out["score"].item() == pytest.approx(0.5, abs=TOL)


def test_reference_without_detection(tiny_dino, patch, paste):
    dog = patch(12, 20, 20)
    canvas = _canvas()
    box = paste(canvas, dog, 30, 30)
    ref = torch.ones(3, 40, 40)
    paste(ref, dog, 10, 10)
    gen_det = BoxesDetector(lambda i, image, queries: Detections.from_boxes([box], [0]))
    none_det = BoxesDetector(lambda i, image, queries: Detections.empty())
    inputs = RewardInputs(["a dog"], [[ref]], [[Subject("dog", "dog")]])
    full = SubjectConsistencyReward(gen_det, tiny_dino, reference_detector=none_det)(canvas[None], inputs)
    penalty = SubjectConsistencyReward(
        gen_det, tiny_dino, reference_detector=none_det, missing_reference="penalty", missing_penalty=-1.0
    )(canvas[None], inputs)
    assert full["ref_detected_frac"].item() == 0.0 and full["detected_1"].item() == 1.0
    assert full["score"].item() < 1.0 - 1e-3  # the whole reference (with its white margin) is compared
    assert penalty["score"].item() == -1.0 and penalty["detected_1"].item() == 0.0


def test_reward_equals_psrbench_formula_on_the_same_crops(tiny_dino, patch, paste, psrbench_embed):
    gen, refs, boxes, ref_boxes = [], [], [], []
    for b in range(2):
        canvas = torch.rand(3, 80, 96, generator=torch.Generator().manual_seed(b))
        bx = {
            "dog": [[5.0, 7.0, 40.0, 50.0]],
            "cat": [[44.5, 20.2, 90.0, 77.9]],
            "cup": [[10.0, 55.0, 30.0, 78.0]],
        }
        gen.append(canvas)
        boxes.append(bx)
        refs.append([patch(20 + 3 * b + k, 50 + 4 * k, 40) for k in range(3)])
        ref_boxes += [
            {"dog": [[2.0, 3.0, 30.0, 40.0]]},
            {"cat": [[0.0, 0.0, 40.0, 54.0]]},
            {"cup": [[5.5, 6.5, 33.0, 50.0]]},
        ]
    subjects = [Subject("dog", "dog"), Subject("cat", "cat"), Subject("cup", "cup")]
    reward = SubjectConsistencyReward(
        BoxesDetector(boxes), tiny_dino, reference_detector=BoxesDetector(ref_boxes)
    )
    images = torch.stack(gen)
    out = reward(images, RewardInputs(["p", "q"], refs, [subjects, subjects]))
    for b in range(2):
        crops = [
            images[b][:, y0:y1, x0:x1]
            for x0, y0, x1, y1 in ((5, 7, 40, 50), (44, 20, 90, 78), (10, 55, 30, 78))
        ]
        ref_crops = [refs[b][0][:, 3:40, 2:30], refs[b][1][:, 0:54, 0:40], refs[b][2][:, 6:50, 5:33]]
        # the same crops through the same embedder: isolates detection, cropping and pairing
        expected = psrbench_score(tiny_dino.embed(crops), tiny_dino.embed(ref_crops))
        assert out["score"][b].item() == pytest.approx(expected.item(), abs=1e-5)
        # and through PSRBench's own preprocessing (torchvision on 8-bit PIL crops), not ours
        published = psrbench_score(
            psrbench_embed(tiny_dino.model, crops), psrbench_embed(tiny_dino.model, ref_crops)
        )
        assert out["score"][b].item() == pytest.approx(published.item(), abs=PREPROCESSING_TOL)
    # the two samples' scores differ by more than that tolerance (3e-3 apart), so it can tell them apart
    assert abs(out["score"][0].item() - out["score"][1].item()) > PREPROCESSING_TOL


def test_psrbench_score_closed_form():
    g = torch.Generator().manual_seed(0)
    c, r = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    cn, rn = c.double().numpy(), r.double().numpy()
    import numpy as np

    expected = np.mean([cn[i] @ rn[i] / (np.linalg.norm(cn[i]) * np.linalg.norm(rn[i])) for i in range(3)])
    assert psrbench_score(c, r).item() == pytest.approx(float(expected), abs=1e-12)
    with pytest.raises(ValueError, match="S, D"):
        psrbench_score(c, r[:2])


def test_assign_maximizes_total_similarity():
    sim = torch.tensor([[0.9, 0.8, 0.1], [0.85, 0.2, 0.3]])
    # greedy (row 0 takes 0.9) gives 0.9 + 0.3; optimal is 0.8 + 0.85
    assert sorted(assign(sim)) == [(0, 1), (1, 0)]
    assert assign(sim, "order") == [(0, 0), (1, 1)]
    assert assign(torch.zeros(2, 0)) == []


def _brute_force_assignment(sim: torch.Tensor) -> tuple[float, list[tuple[int, int]], float]:
    """Best and second-best totals over every one-to-one pairing of min(S, K) rows with columns."""
    s, k = sim.shape
    totals = []
    if s <= k:  # every row takes a distinct column
        for cols in itertools.permutations(range(k), s):
            pairs = list(enumerate(cols))
            totals.append((sum(sim[r, c].item() for r, c in pairs), pairs))
    else:  # every column is taken by a distinct row
        for rows in itertools.permutations(range(s), k):
            pairs = sorted((r, c) for c, r in enumerate(rows))
            totals.append((sum(sim[r, c].item() for r, c in pairs), pairs))
    totals.sort(key=lambda item: -item[0])
    return totals[0][0], totals[0][1], totals[1][0]


@pytest.mark.parametrize("shape", [(2, 5), (3, 4), (5, 2), (4, 3), (4, 4)])
@pytest.mark.parametrize("seed", range(4))
def test_assign_equals_brute_force_on_rectangular_matrices(shape, seed):
    sim = torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1
    best, pairs, second = _brute_force_assignment(sim)
    assert best - second > 1e-9  # ties excluded: the optimal pairing is unique, so it can be compared
    got = sorted(assign(sim))
    assert len(got) == min(shape)
    assert len({r for r, _ in got}) == len(got) == len({c for _, c in got})  # one-to-one
    assert got == pairs
    assert sum(sim[r, c].item() for r, c in got) == pytest.approx(best, abs=1e-12)


def test_leakage_and_margin_terms(tiny_dino, patch, paste, psrbench_embed):
    dog, cat = patch(30, 24, 24), patch(31, 24, 24)
    canvas = _canvas()
    boxes = {"dog": [paste(canvas, dog, 8, 8)], "cat": [paste(canvas, cat, 60, 60)]}
    inputs = RewardInputs(["a dog and a cat"], [[dog, cat]], [[Subject("dog", "dog"), Subject("cat", "cat")]])
    plain = SubjectConsistencyReward(BoxesDetector([boxes]), tiny_dino, detect_references=False)(
        canvas[None], inputs
    )
    extra = SubjectConsistencyReward(
        BoxesDetector([boxes]), tiny_dino, detect_references=False, leakage_weight=0.5, margin_weight=0.25
    )(canvas[None], inputs)
    e = tiny_dino.embed([dog, cat]).double()
    cross = float(e[0] @ e[1])  # each crop equals its reference, so its best "other" is the other reference
    assert extra["leakage"].item() == pytest.approx(cross, abs=TOL)
    assert extra["margin"].item() == pytest.approx(1.0 - cross, abs=TOL)
    assert extra["score"].item() == pytest.approx(
        plain["score"].item() - 0.5 * cross + 0.25 * (1 - cross), abs=TOL
    )
    assert "leakage" not in plain
    # the reference cosine through PSRBench's preprocessing instead of the reward's own
    p = psrbench_embed(tiny_dino.model, [dog, cat]).double()
    published = float(p[0] @ p[1])
    assert extra["leakage"].item() == pytest.approx(published, abs=PREPROCESSING_TOL)
    assert extra["margin"].item() == pytest.approx(1.0 - published, abs=PREPROCESSING_TOL)
    assert 1.0 - published > 100 * PREPROCESSING_TOL  # the two subjects are told apart


def test_batch_equals_single_calls_and_one_forward_per_model(tiny_gd, tiny_dino, patch):
    from rewards.testing import tiny_psr

    reward = tiny_psr(0, box_threshold=0.3)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 64, 64, generator=g)
    shared = [patch(40, 50, 40), patch(41, 36, 60)]  # one prompt's references, repeated as in a group
    inputs = RewardInputs(
        ["a dog and a cat", "a dog and a cat", "two dogs and a cup"],
        [shared, shared, [patch(42, 40, 40), patch(43, 40, 44), patch(44, 30, 30)]],
        [[Subject("dog", "dog"), Subject("cat", "cat")]] * 2
        + [[Subject("a", "dog"), Subject("b", "dog"), Subject("cup", "cup")]],
    )
    calls = {"det": [], "emb": []}
    h1 = reward.detector.model.register_forward_pre_hook(
        lambda m, a, k: calls["det"].append(k["pixel_values"].shape[0]), with_kwargs=True
    )
    h2 = reward.embedder.model.register_forward_pre_hook(
        lambda m, a, k: calls["emb"].append(k["pixel_values"].shape[0]), with_kwargs=True
    )
    try:
        batched = reward(images, inputs)
        assert calls["det"] == [3 + 2 + 3]  # one forward: 3 images + the 5 distinct references
        assert len(calls["emb"]) == 1
    finally:
        h1.remove()
        h2.remove()
    for b in range(3):
        single = reward(images[b : b + 1], inputs.select([b]))
        for key in ("score", "subject_1", "subject_2", "subject_3", "detected_frac"):
            assert torch.allclose(batched[key][b], single[key][0], atol=1e-4, equal_nan=True), key
    assert batched["detected_frac"].min() > 0  # the tiny detector finds something at this threshold


def test_bad_inputs_raise():
    reward = SubjectConsistencyReward(ForegroundDetector(), None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no references"):
        reward(torch.rand(1, 3, 8, 8), RewardInputs(["a dog"], [[]], [[Subject("dog", "dog")]]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reward(torch.rand(1, 3, 8, 8) * 2 - 1, RewardInputs.from_prompts(["x"]))
    with pytest.raises(ValueError, match="assignment"):
        SubjectConsistencyReward(ForegroundDetector(), None, assignment="greedy")  # type: ignore[arg-type]


@pytest.mark.parametrize(("detector", "embedder"), [("owlv2", "dinov2"), ("grounding_dino", "clip")])
def test_psr_runs_on_every_tiny_backbone(detector, embedder, patch):
    from rewards.testing import tiny_psr

    reward = tiny_psr(0, detector=detector, embedder=embedder)
    refs = [patch(50, 40, 40), patch(51, 30, 50)]
    inputs = RewardInputs(
        ["a dog and a cat"] * 2, [refs, refs], [[Subject("dog", "dog"), Subject("cat", "cat")]] * 2
    )
    out = reward(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)), inputs)
    assert out["score"].shape == (2,) and torch.isfinite(out["score"]).all()
    assert ((out["score"] >= -1 - TOL) & (out["score"] <= 1 + TOL)).all()
