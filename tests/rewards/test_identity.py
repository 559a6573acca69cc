"""The face-identity reward (rewards/identity.py) with dlib's real weights on two real photographs
that ship in installed wheels: Grace Hopper (matplotlib's sample data) and Eileen Collins
(scikit-image's ``astronaut``). The matching and aggregation math is also checked on its own,
against brute force and hand-computed numbers."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from rewards.base import RewardInputs, Subject, build_reward
from rewards.identity import (
    FaceIdentityReward,
    descriptor_similarity,
    identity_terms,
    load_face_models,
    match_faces,
    packaged_model_path,
)

PERSON = Subject("Ada", "woman")
DOG = Subject("corgi", "dog")


# ---------------------------------------------------------------------------------------------- math


def test_euclidean_similarity_is_the_documented_clamped_line():
    refs = np.zeros((1, 128))
    faces = np.zeros((4, 128))
    faces[:, 0] = [0.0, 0.3, 0.6, 1.5]  # distances to refs[0]
    sim = descriptor_similarity(refs, faces, "euclidean", distance_threshold=0.6)
    # 1 - d / 1.2, clamped to [0, 1]: d = t maps to 0.5, d >= 2t to 0
    np.testing.assert_allclose(sim, [[1.0, 0.75, 0.5, 0.0]], atol=1e-12)


def test_cosine_similarity_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 128)), rng.normal(size=(2, 128))
    expected = [[x @ y / np.linalg.norm(x) / np.linalg.norm(y) for y in b] for x in a]
    np.testing.assert_allclose(descriptor_similarity(a, b, "cosine"), expected, atol=1e-12)


def _brute_force_best(sim: np.ndarray) -> float:
    s, k = sim.shape
    if s <= k:
        return max(sum(sim[i, p[i]] for i in range(s)) for p in itertools.permutations(range(k), s))
    return max(sum(sim[p[j], j] for j in range(k)) for p in itertools.permutations(range(s), k))


@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (2, 2), (2, 4), (3, 3), (3, 2), (4, 4), (4, 1)])
def test_hungarian_matching_equals_brute_force(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(20):
        sim = rng.uniform(-1, 1, size=shape)
        pairs = match_faces(sim)
        rows, cols = [r for r, _ in pairs], [c for _, c in pairs]
        assert len(pairs) == min(shape) and len(set(rows)) == len(rows) and len(set(cols)) == len(cols)
        assert math.isclose(sum(sim[r, c] for r, c in pairs), _brute_force_best(sim), abs_tol=1e-12)


def test_matched_and_umo_aggregation_by_hand():
    # references x faces; the Hungarian pairs are (0, 0) and (1, 1): 0.9 + 0.8 > 0.3 + 0.4
    good = np.array([[0.9, 0.3], [0.4, 0.8]])
    terms, face = identity_terms(good, "matched")
    np.testing.assert_allclose(terms, [0.9, 0.8])
    assert face.tolist() == [0, 1]
    # umo: own pair minus the matched face's similarity to the other reference
    terms, _ = identity_terms(good, "umo")
    np.testing.assert_allclose(terms, [0.9 - 0.4, 0.8 - 0.3])
    terms, _ = identity_terms(good, "umo", cross_weight=0.5)
    np.testing.assert_allclose(terms, [0.9 - 0.2, 0.8 - 0.15])

    # both faces look like reference 0 (identity blending): pairs (0, 0), (1, 1) as 1.35 > 1.25
    blended = np.array([[0.9, 0.85], [0.4, 0.45]])
    np.testing.assert_allclose(identity_terms(blended, "matched")[0].mean(), (0.9 + 0.45) / 2)
    np.testing.assert_allclose(identity_terms(blended, "umo")[0].mean(), ((0.9 - 0.4) + (0.45 - 0.85)) / 2)

    # three people, two faces: pairs (0, 0), (1, 1); subject 2 missing -> the penalty, no cross term;
    # the cross terms average over the two other references, the missing one's included
    three = np.array([[0.9, 0.2], [0.1, 0.7], [0.3, 0.4]])
    terms, face = identity_terms(three, "umo", missing_penalty=-0.25)
    np.testing.assert_allclose(terms, [0.9 - (0.1 + 0.3) / 2, 0.7 - (0.2 + 0.4) / 2, -0.25])
    assert face.tolist() == [0, 1, -1]
    # one person: no other reference, umo equals matched
    np.testing.assert_allclose(identity_terms(np.array([[0.6, 0.7]]), "umo")[0], [0.7])
    # no face at all
    np.testing.assert_allclose(identity_terms(np.zeros((2, 0)), "umo", missing_penalty=-1.0)[0], [-1.0, -1.0])


# ---------------------------------------------------------------------------------------------- photographs


def _require_faces() -> None:
    """Skip without the optional ``faces`` dependencies (psr-rl[faces])."""
    import importlib.util

    pytest.importorskip("dlib")
    if importlib.util.find_spec("face_recognition_models") is None:
        pytest.skip("face-recognition-models is not installed")


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array)).permute(2, 0, 1).float() / 255.0


def _resize(x: torch.Tensor, scale: float) -> torch.Tensor:
    return F.interpolate(x[None], scale_factor=scale, mode="bilinear", antialias=True)[0].clamp(0, 1)


@pytest.fixture(scope="module")
def photos() -> dict[str, torch.Tensor]:
    """Grace Hopper (600 x 512, face ~216 px) at half size, and the astronaut's face region."""
    _require_faces()
    import matplotlib
    from PIL import Image
    from skimage import data

    with Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg") as im:
        grace = _tensor(np.asarray(im.convert("RGB")))
    astronaut = _tensor(data.astronaut())  # 512 x 512, face ~88 px at (179, 83)
    return {
        "grace": _resize(grace, 0.5),  # [3, 300, 256]
        "astronaut": astronaut[:, 0:300, 80:360],  # [3, 300, 280]
        "grace_face": _resize(grace, 0.5)[:, 20:236, 20:236],  # [3, 216, 216]
        "astronaut_face": _resize(astronaut[:, 10:280, 90:360], 0.8),  # [3, 216, 216]
    }


@pytest.fixture(scope="module")
def reward() -> FaceIdentityReward:
    _require_faces()
    return FaceIdentityReward()


def _one(image: torch.Tensor, refs: list[torch.Tensor], subjects: list[Subject]) -> tuple:
    return image[None], RewardInputs(["a photo"], [refs], [subjects])


def test_model_files_are_found_without_importing_the_package():
    import sys

    _require_faces()
    path = packaged_model_path("dlib_face_recognition_resnet_model_v1.dat")
    assert path.is_file() and path.stat().st_size > 20_000_000
    assert "face_recognition_models" not in sys.modules  # its __init__ needs pkg_resources
    with pytest.raises(FileNotFoundError, match="shape_predictor_path=/nonexistent.dat"):
        FaceIdentityReward(shape_predictor_path="/nonexistent.dat")


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="aggregation='best'"):
        FaceIdentityReward(aggregation="best")
    with pytest.raises(ValueError, match="detector='mtcnn'"):
        FaceIdentityReward(detector="mtcnn")


def test_same_face_under_crop_scale_and_flip_beats_another_face(reward, photos):
    grace, astronaut = photos["grace"], photos["astronaut"]
    variants = {
        "crop": grace[:, 40:260, 10:240],
        "scale": _resize(grace, 0.6),  # face ~65 px: found thanks to upsample=1
        "flip": grace.flip(-1),
    }
    for name, image in variants.items():
        same = reward(*_one(image, [grace], [PERSON]))
        other = reward(*_one(image, [astronaut], [PERSON]))
        s, o = float(same["score"][0]), float(other["score"][0])
        # dlib's convention: same person below distance 0.6, i.e. similarity above 0.5 here
        assert s > 0.75 and o < 0.5, (name, s, o)
        assert same["faces"][0] == 1 and same["matched"][0] == 1 and same["missing"][0] == 0


def test_two_faces_are_matched_not_paired_by_order(reward, photos):
    grace, astronaut = photos["grace"], photos["astronaut"]
    canvas = torch.cat([photos["grace_face"], photos["astronaut_face"]], dim=-1)  # [3, 216, 432]
    people = [Subject("Grace", "woman"), Subject("Eileen", "Woman")]
    forward = reward(*_one(canvas, [grace, astronaut], people))
    backward = reward(*_one(canvas, [astronaut, grace], people))
    assert forward["faces"][0] == 2 and forward["matched"][0] == 2
    assert float(forward["score"][0]) == float(backward["score"][0]) > 0.75
    assert float(forward["subject_1"][0]) == float(backward["subject_2"][0])

    # pairing faces with references by order (largest face first) would score the two orders apart
    _, faces = reward.faces(canvas)
    refs = np.stack([reward.faces(r, limit=1)[1][0] for r in (grace, astronaut)])
    by_order = [np.diag(descriptor_similarity(r, faces)).mean() for r in (refs, refs[::-1])]
    assert abs(by_order[0] - by_order[1]) > 0.3

    # umo: the cross pairs (each face against the other reference) are subtracted
    umo = FaceIdentityReward(aggregation="umo")(*_one(canvas, [grace, astronaut], people))
    sim = descriptor_similarity(refs, faces)
    expected = (sim.max(1) - sim.min(1)).mean()  # rows: own face (best) minus the other face
    assert math.isclose(float(umo["score"][0]), expected, abs_tol=1e-6)


def test_non_person_subjects_do_not_count(reward, photos, patch):
    grace, dog_ref = photos["grace"], patch(0, 64, 64)
    image = grace[:, 40:260, 10:240]
    person_only = reward(*_one(image, [grace], [PERSON]))
    with_dog = reward(*_one(image, [grace, dog_ref], [PERSON, DOG]))
    assert float(with_dog["score"][0]) == float(person_only["score"][0])
    assert with_dog["persons"][0] == 1 and math.isnan(float(with_dog["subject_2"][0]))
    dog_only = reward(*_one(image, [dog_ref], [DOG]))
    assert all(math.isnan(float(v[0])) for v in dog_only.values())
    prompt_only = reward(image[None], RewardInputs.from_prompts(["a photo"]))
    assert math.isnan(float(prompt_only["score"][0]))


def test_missing_face_scores_the_penalty_and_is_flagged(photos, patch):
    grace, astronaut = photos["grace"], photos["astronaut"]
    penalized = FaceIdentityReward(missing_penalty=-0.25)
    no_face = patch(1, 200, 200)
    out = penalized(*_one(no_face, [grace], [PERSON]))
    assert float(out["score"][0]) == -0.25 and out["missing"][0] == 1 and out["faces"][0] == 0
    assert math.isnan(float(out["matched_similarity"][0]))
    # two people, one face: the found one is matched, the other gets the penalty
    two = penalized(*_one(grace[:, 40:260, 10:240], [astronaut, grace], [PERSON, PERSON]))
    assert two["missing"][0] == 1 and two["matched"][0] == 1
    assert float(two["subject_1"][0]) == -0.25 and float(two["subject_2"][0]) > 0.75
    expected = (-0.25 + float(two["matched_similarity"][0])) / 2
    assert math.isclose(float(two["score"][0]), expected, abs_tol=1e-6)


def test_reference_without_a_face_is_skipped_or_an_error(reward, photos, patch):
    grace, faceless = photos["grace"], patch(2, 120, 120)
    image = grace[:, 40:260, 10:240]
    both = reward(*_one(image, [faceless, grace], [PERSON, PERSON]))
    alone = reward(*_one(image, [grace], [PERSON]))
    assert float(both["score"][0]) == float(alone["score"][0])
    assert both["ref_no_face"][0] == 1 and both["persons"][0] == 1
    only = reward(*_one(image, [faceless], [PERSON]))
    assert math.isnan(float(only["score"][0])) and only["persons"][0] == 0
    with pytest.raises(ValueError, match="no face in the reference of subject 1"):
        FaceIdentityReward(missing_reference="error")(*_one(image, [faceless, grace], [PERSON, PERSON]))


def test_reference_with_two_faces_uses_the_largest(reward, photos):
    def pair(big: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
        canvas = torch.full((3, 216, 216 + 130), 0.5)
        canvas[:, :, :216] = big
        canvas[:, 40:169, 216:345] = _resize(small, 0.6)  # [3, 129, 129], face ~60 px
        return canvas

    image = photos["grace"][:, 40:260, 10:240]
    grace_big = pair(photos["grace_face"], photos["astronaut_face"])
    astronaut_big = pair(photos["astronaut_face"], photos["grace_face"])
    assert len(reward.faces(grace_big)[0]) == 2  # both faces are found; only the largest counts
    assert float(reward(*_one(image, [grace_big], [PERSON]))["score"][0]) > 0.75
    assert float(reward(*_one(image, [astronaut_big], [PERSON]))["score"][0]) < 0.5


def test_batch_equals_single_calls_and_models_load_once(reward, photos):
    grace, astronaut = photos["grace"], photos["astronaut"]
    images = torch.stack([grace, grace.flip(-1)])
    inputs = RewardInputs(["a", "b"], [[grace], [astronaut]], [[PERSON], [PERSON]])
    before = load_face_models.cache_info()
    batch = reward(images, inputs)
    for b in range(2):
        single = reward(images[b : b + 1], inputs.select([b]))
        assert float(single["score"][0]) == float(batch["score"][b])
    assert load_face_models.cache_info().misses == before.misses  # the module's models, reused


def test_cnn_detector_finds_the_face(photos):
    cnn = FaceIdentityReward(detector="cnn", upsample=0)
    # [3, 216, 216], face ~108 px (the MMOD model's smallest face is ~80 px without upsampling);
    # the CNN costs about 1 s at this size on a CPU
    boxes, desc = cnn.faces(photos["grace_face"])
    assert len(boxes) == 1 and desc.shape == (1, 128)


def test_haar_detector_finds_the_face_or_says_why_not(photos):
    cv2 = pytest.importorskip("cv2")

    if not hasattr(cv2, "CascadeClassifier"):  # OpenCV 5 dropped the Haar cascades
        for path in (None, __file__):  # at construction, whether or not a cascade file is given
            with pytest.raises(RuntimeError, match="OpenCV 5 moved the Haar cascades out"):
                FaceIdentityReward(detector="haar", haar_cascade_path=path)
        return
    boxes, _ = FaceIdentityReward(detector="haar", upsample=0).faces(photos["grace"])
    assert len(boxes) >= 1


# ---------------------------------------------------------------------------------------------- configs


def test_config_builds_and_scores_alone_and_as_a_weighted_component(photos, tmp_path):
    from rewards.cli import DEFAULT_CONFIG_DIR, reward_config

    grace, astronaut = photos["grace"], photos["astronaut"]
    images = torch.stack([grace, grace])
    inputs = RewardInputs(["a", "b"], [[grace], [astronaut]], [[PERSON], [PERSON]])
    cfg = reward_config("face_identity", ["aggregation=umo"])
    alone = build_reward(cfg, "cpu")(images, inputs)
    assert alone["score"][0] > 0.75 > 0.5 > alone["score"][1]

    # a weighted reward naming it in its defaults list, as weighted.yaml names psr, composed by Hydra
    conf = tmp_path / "conf"
    (conf / "reward").mkdir(parents=True)
    for name in ("face_identity", "color"):
        (conf / "reward" / f"{name}.yaml").write_text(
            (DEFAULT_CONFIG_DIR / "reward" / f"{name}.yaml").read_text()
        )
    (conf / "reward" / "people.yaml").write_text(
        OmegaConf.to_yaml(
            {
                "defaults": ["face_identity@rewards.identity", "color@rewards.color", "_self_"],
                "_target_": "rewards.base.WeightedReward",
                "weights": {"identity": 0.5, "color": 0.5},
            }
        )
    )
    cfg = reward_config("people", ["rewards.identity.aggregation=umo"], conf)
    weighted = build_reward(cfg, "cpu")(images, inputs)
    assert torch.equal(weighted["identity/score"], alone["score"])
    np.testing.assert_allclose(
        weighted["score"], 0.5 * weighted["identity/score"] + 0.5 * weighted["color/score"], atol=1e-6
    )


def test_psr_score_runs_the_config_on_a_manifest(photos, tmp_path):
    from PIL import Image

    from rewards.cli import run

    def save(x: torch.Tensor, name: str) -> str:
        Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp_path / name)
        return name

    grace = photos["grace"]
    records = [
        {
            "id": "same",
            "instruction": "a portrait",
            "target": save(grace.flip(-1), "gen.png"),
            "subjects": [{"name": "Grace", "category": "person", "reference": save(grace, "ref.png")}],
        },
        {
            "id": "dog",
            "instruction": "a dog",
            "target": "gen.png",
            "subjects": [{"name": "corgi", "category": "dog", "reference": "ref.png"}],
        },
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in records))
    means = run(
        [
            "--manifest",
            str(manifest),
            "--reward",
            "face_identity",
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    samples = json.loads((tmp_path / "out" / "scores.json").read_text())["samples"]
    assert samples[0]["score"] > 0.75 and samples[1]["score"] is None
    assert means["score"] == pytest.approx(samples[0]["score"])
