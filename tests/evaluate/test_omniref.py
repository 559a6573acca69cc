"""``psr-eval suite=omniref``: the released ``benchmark.json`` layout read into records, subject
fidelity scored from result images with a colour detector and weight-free embedders, every value
checked against numpy on crops cut by hand, and the released pair-weighted means."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.evaluate.suite_fakes import ColourDetector, canvas


class LargestFirstDetector(ColourDetector):
    """The colour regions, each scored by its area / 1000 (so the largest is the best box), listed
    smallest first (so taking the first box instead of the best one is caught)."""

    def detect(self, images, queries):
        from rewards.detectors import Detections

        out = []
        for d in super().detect(images, queries):
            area = (d.boxes[:, 2] - d.boxes[:, 0]) * (d.boxes[:, 3] - d.boxes[:, 1])
            order = torch.argsort(area)
            out.append(Detections(d.boxes[order], area[order] / 1000, d.labels[order]))
        return out


class MeansOnly:
    """Per-channel means, L2-normalised (a second embedder, unlike ``MeanEmbedder``)."""

    def embed(self, images):
        rows = [im.double().mean((1, 2)) for im in images]
        return torch.nn.functional.normalize(torch.stack(rows).float(), dim=-1)


def mean_std_size(arr: np.ndarray) -> np.ndarray:  # MeanEmbedder in numpy
    x = arr.astype(np.float64) / 255
    f = np.concatenate([x.mean((0, 1)), x.std((0, 1)), [arr.shape[0] / 10, arr.shape[1] / 10]])
    return f / np.linalg.norm(f)


def means(arr: np.ndarray) -> np.ndarray:
    f = arr.astype(np.float64).mean((0, 1)) / 255
    return f / np.linalg.norm(f)


SMALL_RED, BIG_RED, BLUE, BLACK = (2, 2, 6, 6), (30, 30, 44, 50), (4, 36, 20, 52), (40, 4, 60, 16)
RESULTS = {  # position -> pieces of its 64 x 64 result image
    0: [("red", SMALL_RED), ("red", BIG_RED), ("blue", BLUE)],
    1: [("blue", BLUE)],  # its subject (green) is missing
    2: [("red", BIG_RED), ("black", BLACK)],
}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("OmniRef-Bench")
    entries = [
        ("subject/2/0", "subject", ["transfer_subjects/red.png", "transfer_subjects/blue.png"]),
        ("subject_style/2/1", "subject_style", ["transfer_subjects/green.png", "style/reference.png"]),
        (
            "subject_bg/3/2",
            "subject_bg",
            ["transfer_subjects/red.png", "background/background.png", "transfer_subjects/black.png"],
        ),
    ]
    meta = []
    for i, (folder, category, refs) in enumerate(entries):
        paths = []
        for ref in refs:
            path = root / folder / ref
            path.parent.mkdir(parents=True, exist_ok=True)
            colour = Path(ref).stem if "transfer_subjects" in ref else "green"
            size = 24 + 4 * i
            Image.fromarray(canvas(size, [(colour, (4, 6, size - 4, size - 2))])).save(path)
            paths.append(f"{folder}/{ref}")
        meta.append(
            {
                "image": f"{folder}/{i}.png",
                "prompt": f"sample {i}",
                "edit_image": paths,
                "index": i,
                "category": category,
            }
        )
    (root / "benchmark.json").write_text(json.dumps(meta))
    (root / "generated").mkdir()
    for pos, pieces in RESULTS.items():
        Image.fromarray(canvas(64, pieces)).save(root / "generated" / f"{pos}.png")
    return root


FAKES = [
    "~reward.detector",
    "+reward.detector={_target_:tests.evaluate.test_omniref.LargestFirstDetector}",
    "~reward.clip",
    "+reward.clip={_target_:tests.evaluate.suite_fakes.MeanEmbedder}",
    "~reward.dino",
    "+reward.dino={_target_:tests.evaluate.test_omniref.MeansOnly}",
]


@pytest.fixture(scope="module")
def scored(bench, tmp_path_factory):
    from psr.config import check_config, compose
    from psr.evaluate import main

    run_dir = tmp_path_factory.mktemp("omniref_run")
    overrides = [f"data.root={bench}", "eval.source=results", f"eval.results_root={bench / 'generated'}"]
    cfg = compose("eval", ["suite=omniref", f"run_dir={run_dir}", *FAKES, *overrides])
    check_config(cfg, "eval")
    main(cfg)
    rows = [json.loads(x) for x in (run_dir / "scores.jsonl").read_text().splitlines()]
    return run_dir, rows


def test_records_from_the_released_layout(bench):
    from psr.evaluate.omniref import load_omniref

    train, heldout, root = load_omniref(str(bench))
    assert heldout == [] and root == bench.resolve()
    assert [(s.id, s.kind) for s in train] == [
        ("omniref-0000", "subject"),
        ("omniref-0001", "subject_style"),
        ("omniref-0002", "subject_bg"),
    ]
    assert [(s.name, s.category) for s in train[2].subjects] == [
        ("red", "red"),
        ("background", ""),
        ("black", "black"),
    ]
    assert train[2].subjects[1].reference == "subject_bg/3/2/background/background.png"
    assert train[1].provenance["result_path"] == "1.png"
    assert [s.id for s in load_omniref(str(bench), categories=["subject_bg"])[0]] == ["omniref-0002"]
    with pytest.raises(ValueError, match=r"data\.categories: \['pose'\]"):
        load_omniref(str(bench), categories=["pose"])
    with pytest.raises(FileNotFoundError, match=r"data\.metadata"):
        load_omniref(str(bench / "generated"))


def test_subject_query_and_crop_box():
    from psr.evaluate.omniref import crop_box, subject_query

    assert subject_query("x/transfer_subjects/a wild rabbit.png") == "a wild rabbit"
    assert subject_query("x/transfer_subjects/red cabbage.v2.png") == "red cabbage"
    # int() truncates toward zero, 10 px each side, cut to [0, h - 1] / [0, w - 1] inclusive
    assert crop_box([12.9, 15.2, 30.7, 40.1], 64, 48) == (5, 51, 2, 41)
    assert crop_box([-3.5, 2.0, 60.0, 70.0], 64, 48) == (0, 64, 0, 48)


def expected(bench: Path, pos: int) -> tuple[float, float, float]:
    """(CLIP-I, DINO, detected fraction) of sample ``pos`` computed here: the largest region of the
    subject's colour, its box widened by 10 px and cut, against the whole reference."""
    from psr.evaluate.omniref import crop_box

    meta = json.loads((bench / "benchmark.json").read_text())[pos]
    gen = np.asarray(Image.open(bench / "generated" / f"{pos}.png").convert("RGB"))
    clip, dino, found = [], [], 0
    for ref_path in [p for p in meta["edit_image"] if "transfer_subjects" in p]:
        colour = Path(ref_path).stem
        boxes = [box for c, box in RESULTS[pos] if c == colour]
        if not boxes:
            clip.append(0.0)
            dino.append(0.0)
            continue
        found += 1
        box = max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
        y0, y1, x0, x1 = crop_box(box, 64, 64)
        crop = gen[y0:y1, x0:x1]
        ref = np.asarray(Image.open(bench / ref_path).convert("RGB"))
        clip.append(float(mean_std_size(crop) @ mean_std_size(ref)))
        dino.append(float(means(crop) @ means(ref)))
    return float(np.mean(clip)), float(np.mean(dino)), found / len(clip)


def test_scores_against_numpy(scored, bench):
    _, rows = scored
    assert [r["id"] for r in rows] == ["omniref-0000", "omniref-0001", "omniref-0002"]
    for pos, row in enumerate(rows):
        clip, dino, frac = expected(bench, pos)
        s = row["scores"]
        assert s["omniref_clip_i"] == pytest.approx(clip, abs=1e-6)
        assert s["omniref_dino"] == pytest.approx(dino, abs=1e-6)
        assert s["omniref_detected_frac"] == pytest.approx(frac)
        assert s["score"] == s["omniref_dino"]
    assert [r["scores"]["omniref_subjects"] for r in rows] == [2.0, 1.0, 2.0]
    assert rows[1]["scores"]["omniref_clip_i"] == 0.0  # the missing subject scores 0
    assert rows[0]["scores"]["omniref_clip_i"] > 0.9  # the big red block, not the small one first listed


def test_released_summary_weighs_subject_pairs(scored, bench):
    run_dir, rows = scored
    released = json.loads((run_dir / "summary.json").read_text())["released"]
    per = [expected(bench, pos) for pos in range(3)]
    n = [2, 1, 2]
    assert released["omniref_clip_i"] == pytest.approx(
        sum(c * k for (c, _, _), k in zip(per, n, strict=True)) / 5, abs=1e-6
    )
    assert released["omniref_dino"] == pytest.approx(
        sum(d * k for (_, d, _), k in zip(per, n, strict=True)) / 5, abs=1e-6
    )
    assert released["omniref_subject_pairs"] == 5 and released["omniref_detected_frac"] == pytest.approx(
        4 / 5
    )
    # not the mean over samples
    assert released["omniref_dino"] != pytest.approx(float(np.mean([d for _, d, _ in per])), abs=1e-4)


def test_bgr_crops_swap_red_and_blue(bench):
    """The released OpenCV crop: red and blue swapped, so a red subject matches a blue reference."""
    from psr.data.dataset import open_image, to_tensor
    from psr.evaluate.omniref import OmniRefScorer
    from rewards.base import RewardInputs, Subject

    gen = to_tensor(open_image(bench / "generated" / "2.png", "x", "result"))[None]
    red = to_tensor(Image.fromarray(canvas(24, [("red", (4, 6, 20, 22))])))
    blue = to_tensor(Image.fromarray(canvas(24, [("blue", (4, 6, 20, 22))])))
    inputs = RewardInputs(["p", "p"], [[red], [blue]], [[Subject("red", "red")], [Subject("red", "red")]])
    plain = OmniRefScorer(LargestFirstDetector(), MeansOnly(), MeansOnly())(gen.expand(2, -1, -1, -1), inputs)
    swapped = OmniRefScorer(LargestFirstDetector(), MeansOnly(), MeansOnly(), bgr_crops=True)(
        gen.expand(2, -1, -1, -1), inputs
    )
    p, s = plain["omniref_dino"].tolist(), swapped["omniref_dino"].tolist()
    assert p[0] > s[0] and s[1] > p[1]
    assert s[1] == pytest.approx(p[0], abs=1e-6)


def test_no_subject_reference_is_nan():
    from psr.evaluate.omniref import OmniRefScorer
    from rewards.base import RewardInputs, Subject

    out = OmniRefScorer(LargestFirstDetector(), MeansOnly(), MeansOnly())(
        torch.ones(1, 3, 16, 16), RewardInputs(["p"], [[torch.ones(3, 8, 8)]], [[Subject("style", "")]])
    )
    assert torch.isnan(out["omniref_clip_i"]).all() and out["omniref_subjects"].tolist() == [0.0]


def test_dinov2_mean_tokens_is_the_token_mean():
    """The embedding is the normalised mean of every output token (CLS included), not the CLS."""
    from rewards.embedders import HFImageEmbedder
    from rewards.testing import tiny_dinov2

    cls = tiny_dinov2(seed=0)
    mean = HFImageEmbedder(cls.model, cls.transform, output="mean")
    x = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = cls.model(pixel_values=cls.transform(x)).last_hidden_state  # [2, 1 + patches, D]
    manual = hidden.mean(1)
    manual = manual / manual.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(mean.embed(x), manual, atol=1e-6, rtol=0)
    assert not torch.allclose(mean.embed(x), cls.embed(x), atol=1e-3)


def test_suite_config_composes(tmp_path):
    from psr.config import check_config, compose

    cfg = compose("eval", ["suite=omniref", f"data.root={tmp_path}"])
    check_config(cfg, "eval")
    assert cfg.reward.detector.box_threshold == 0.35 and cfg.reward.margin == 10
    assert cfg.reward.dino._target_ == "psr.evaluate.omniref.dinov2_mean_tokens"


def test_report_shows_the_released_means(scored, tmp_path):
    """psr-report: the OmniRef columns of the run hold the released pair-weighted means."""
    import csv

    from psr.evaluate.report import write_report

    run_dir, _ = scored
    released = json.loads((run_dir / "summary.json").read_text())["released"]
    folder = write_report([run_dir], tmp_path / "report", contact=1)
    with (folder / "report.csv").open() as f:
        row = next(r for r in csv.DictReader(f) if r["quoted"] == "0")
    assert float(row["omniref_dino"]) == pytest.approx(released["omniref_dino"], abs=1e-3)
    assert float(row["omniref_clip_i"]) == pytest.approx(released["omniref_clip_i"], abs=1e-3)
    assert "OmniRef DINOv2" in (folder / "report.md").read_text()
    assert (folder / "bars_omniref_dino.png").is_file()
