"""``psr-eval suite=psrbench``: the released PSRBench layout, scored from ``result_path`` images and
by sampling, with weight-free stand-ins for the detector, embedder, judge and HPS
(:mod:`suite_fakes`). The scores are checked against the scorers called directly, the position
rule against hand-computed values, and the summary against means computed here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.evaluate.suite_fakes import COLOURS, TEMPLATE_SCORES, canvas

FAKES = [
    "~reward.detector",
    "+reward.detector={_target_:tests.evaluate.suite_fakes.ColourDetector}",
    "~reward.embedder",
    "+reward.embedder={_target_:tests.evaluate.suite_fakes.MeanEmbedder}",
    "reward.judge={_target_:tests.evaluate.suite_fakes.FakeJudge}",
    "reward.aesthetic={_target_:tests.evaluate.suite_fakes.FakeHPS}",
]
RED, GREEN, BLUE = (2, 10, 12, 20), (20, 10, 30, 20), (10, 22, 20, 30)


def record(instruction: str, colours: list[str], result: str) -> dict:
    rec = {"instruction": instruction, "input_path": [f"subjects/{c}.png" for c in colours]}
    rec.update({f"category{k + 1}": c for k, c in enumerate(colours)})
    rec["result_path"] = result
    return rec


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """Attribute (2 records: one the judge cannot read), Position (left of: holds; above: does
    not; no relation word), Three (one record, one whose result image is missing)."""
    root = tmp_path_factory.mktemp("PSRBench")
    (root / "subjects").mkdir()
    (root / "results").mkdir()
    for colour in COLOURS:
        Image.fromarray(canvas(24, [(colour, (6, 6, 18, 18))])).save(root / "subjects" / f"{colour}.png")
    images = {
        "attr0": [("red", RED), ("green", GREEN)],
        "attr1": [("red", RED), ("blue", (20, 2, 28, 9))],
        "pos0": [("red", RED), ("blue", GREEN)],
        "pos1": [("red", RED), ("blue", GREEN)],
        "pos2": [("red", RED), ("blue", BLUE)],
        "three0": [("red", RED), ("green", GREEN), ("blue", BLUE)],
    }
    for name, pieces in images.items():
        Image.fromarray(canvas(32, pieces)).save(root / "results" / f"{name}.png")
    files = {
        "Attribute.json": [
            record("a red and a green block", ["red", "green"], "results/attr0.png"),
            record("[unreadable] a red and a blue block", ["red", "blue"], "results/attr1.png"),
        ],
        "Position.json": [
            record("a red block to the left of a blue block", ["red", "blue"], "results/pos0.png"),
            record("a red block above a blue block", ["red", "blue"], "results/pos1.png"),
            record("a red block and a blue block", ["red", "blue"], "results/pos2.png"),
        ],
        "Three.json": [
            record("red, green and blue blocks", ["red", "green", "blue"], "results/three0.png"),
            record("red, green and blue blocks again", ["red", "green", "blue"], "results/gone.png"),
        ],
    }
    for name, records in files.items():
        (root / name).write_text(json.dumps(records))
    return root


def compose(run_dir: Path, *overrides: str):
    from psr.config import check_config, compose

    cfg = compose("eval", ["suite=psrbench", f"run_dir={run_dir}", *FAKES, *overrides])
    check_config(cfg, "eval")
    return cfg


def results_overrides(bench: Path) -> list[str]:
    return [
        f"data.root={bench}",
        "data.subsets=[attribute,position,three]",
        "eval.source=results",
        f"eval.results_root={bench}",
        "eval.grid_records=2",
    ]


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "scores.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def scored(bench, tmp_path_factory):
    from psr.evaluate import main

    run_dir = tmp_path_factory.mktemp("suite")
    main(compose(run_dir, *results_overrides(bench)))
    return run_dir, rows_of(run_dir)


def test_every_record_scored_or_excluded(scored):
    run_dir, rows = scored
    ids = [r["id"] for r in rows]
    assert ids == [
        "Attribute-0000",
        "Attribute-0001",
        "Position-0000",
        "Position-0001",
        "Position-0002",
        "Three-0000",
        "Three-0001",
    ]
    assert [r["kind"] for r in rows] == ["attribute"] * 2 + ["position"] * 3 + ["three"] * 2
    missing = rows[-1]
    assert missing["scores"] == {} and "gone.png" in missing["error"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["excluded"] == 1 and summary["source"] == "results"


def test_subject_consistency_equals_the_scorers_called_directly(scored, bench):
    """Both protocols' numbers are those of the two scorers on the same PNGs and references."""
    from psr.data.dataset import open_image, to_tensor
    from rewards.base import RewardInputs, Subject
    from rewards.psrbench_official import OfficialSubjectConsistency
    from rewards.subject_consistency import SubjectConsistencyReward
    from tests.evaluate.suite_fakes import ColourDetector, MeanEmbedder

    _, rows = scored
    official = OfficialSubjectConsistency(ColourDetector(), MeanEmbedder())
    strict = SubjectConsistencyReward(ColourDetector(), MeanEmbedder())
    for row in rows[:-1]:
        data = json.loads((bench / f"{row['id'].split('-')[0]}.json").read_text())[
            int(row["id"].split("-")[1])
        ]
        refs = [to_tensor(open_image(bench / p, row["id"], "ref")) for p in data["input_path"]]
        subs = [Subject(data[f"category{k + 1}"], data[f"category{k + 1}"]) for k in range(len(refs))]
        image = to_tensor(open_image(Path(row["image"]), row["id"], "result"))[None]
        inputs = RewardInputs([data["instruction"]], [refs], [subs])
        assert row["scores"]["sc_official"] == pytest.approx(
            float(official(image, inputs)["score"][0]), abs=1e-6
        )
        assert row["scores"]["sc_strict"] == pytest.approx(float(strict(image, inputs)["score"][0]), abs=1e-6)
        assert row["scores"]["score"] == row["scores"]["sc_official"]
        assert row["scores"]["sc_official_fallbacks"] == 0.0  # every colour is found
    # the subject's own colour block against its reference: the same statistics up to the crop size
    assert all(r["scores"]["sc_official"] > 0.9 for r in rows[:-1])


def test_position_rule_and_judge_columns(scored):
    """Position: red (2..12) left of blue (20..30), same rows: left holds (1), above does not (0),
    no relation word (null). Others: the judge's fixed score per template; a failed reply is null
    in ``semantic`` and 5/10 in ``semantic_official``."""
    _, rows = scored
    sem = [r["scores"].get("semantic") for r in rows[:-1]]
    assert [r["scores"]["position"] for r in rows[2:5]] == [1.0, 0.0, None]
    expected = [TEMPLATE_SCORES["psrbench_attribute"] / 10, None, 1.0, 0.0, None, 0.9]
    assert [v is None for v in sem] == [e is None for e in expected]
    # float32 scores: 0.7 is stored as 0.69999998...
    assert [v for v in sem if v is not None] == pytest.approx(
        [e for e in expected if e is not None], abs=1e-6
    )
    assert [r["scores"]["semantic_failed"] for r in rows[:-1]] == [0.0, 1.0, 0.0, 0.0, None, 0.0]
    assert rows[1]["scores"]["semantic_official"] == 0.5
    assert rows[0]["scores"]["semantic_official"] == pytest.approx(0.7)
    for r in rows[:-1]:  # FakeHPS: ten times the mean pixel; /10 is the mean pixel of the PNG
        mean = np.asarray(Image.open(r["image"]).convert("RGB"), dtype=np.float64).mean() / 255
        assert r["scores"]["hps_div10"] == pytest.approx(mean, abs=1e-6)
        assert r["scores"]["hps"] == pytest.approx(10 * mean, abs=1e-5)


def test_summary_per_subset_and_overall(scored):
    run_dir, rows = scored
    summary = json.loads((run_dir / "summary.json").read_text())
    by_kind = summary["by_kind"]
    assert set(by_kind) == {"attribute", "position", "three"}
    assert by_kind["attribute"]["metrics"]["semantic"] == {"mean": pytest.approx(0.7), "std": 0.0, "count": 1}
    assert by_kind["attribute"]["metrics"]["semantic_failed"]["mean"] == 0.5  # one of two replies failed
    assert by_kind["position"]["metrics"]["semantic"]["mean"] == pytest.approx(0.5)
    # overall: the subsets weigh equally (means 0.7, 0.5, 0.9 and 0.6, 0.5, 0.9)
    assert summary["overall"]["semantic"]["mean"] == pytest.approx((0.7 + 0.5 + 0.9) / 3)
    assert summary["overall"]["semantic_official"]["mean"] == pytest.approx((0.6 + 0.5 + 0.9) / 3)
    sc = {k: [r["scores"]["sc_official"] for r in rows if r["kind"] == k and r["scores"]] for k in by_kind}
    assert summary["overall"]["sc_official"]["mean"] == pytest.approx(
        float(np.mean([np.mean(v) for v in sc.values()])), abs=1e-9
    )
    assert (run_dir / "grid.png").is_file()


def test_sharded_results_equal_one_rank(scored, bench, tmp_path):
    from psr.evaluate import Evaluator

    _, rows = scored
    cfg = compose(tmp_path, *results_overrides(bench), "eval.records_per_batch=1")
    evaluators = []
    for rank in (1, 0):
        ev = Evaluator(cfg)
        ev.setup()
        ev.rank, ev.world = rank, 2
        ev.run()
        evaluators.append(ev)
    evaluators[1].finish()
    assert rows_of(tmp_path) == rows


def test_sampling_with_the_tiny_model(bench, tmp_path):
    """The same suite sampling a model (the tiny one): one PNG per record, the same columns."""
    from psr.evaluate import main

    main(
        compose(
            tmp_path,
            f"data.root={bench}",
            "data.subsets=[attribute]",
            "eval.resolution=32",
            "eval.num_steps=2",
            "eval.grid_records=0",
        )
    )
    rows = rows_of(tmp_path)
    assert [r["id"] for r in rows] == ["Attribute-0000", "Attribute-0001"]
    for r in rows:
        assert (tmp_path / r["image"]).is_file()
        assert {"sc_official", "sc_strict", "semantic", "semantic_official", "hps"} <= set(r["scores"])
        assert math.isfinite(r["scores"]["sc_official"])


def test_bad_layout_names_the_key(tmp_path):
    from psr.evaluate.psrbench import load_subsets

    (tmp_path / "Attribute.json").write_text("[]")
    with pytest.raises(FileNotFoundError, match=r"data\.subsets: no Four\.json.*Attribute\.json"):
        load_subsets(str(tmp_path), ["attribute", "four"])
    with pytest.raises(FileNotFoundError, match=r"data\.root="):
        load_subsets(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="checkpoint= and lora="):
        from psr.evaluate import Evaluator

        Evaluator(compose(tmp_path, f"data.root={tmp_path}", "eval.source=results", "checkpoint=/x"))


def test_plain_reward_is_not_a_suite_scorer():
    """Without a suite the reward is called as before (no kinds); the suite's scorer takes kinds."""
    from psr.evaluate.psrbench import PSRBenchScorer
    from psr.evaluate.runner import SuiteScorer
    from rewards.color import ColorReward
    from tests.evaluate.suite_fakes import ColourDetector, MeanEmbedder

    assert not isinstance(ColorReward(), SuiteScorer)
    assert isinstance(PSRBenchScorer(ColourDetector(), MeanEmbedder()), SuiteScorer)


def test_the_documented_judge_and_hps_overrides_compose(tmp_path):
    """The shipped judge and HPSv3 configs plug into the suite as conf/suite/psrbench.yaml says."""
    from psr.config import check_config
    from psr.config import compose as psr_compose

    cfg = psr_compose(
        "eval",
        [
            "suite=psrbench",
            f"data.root={tmp_path}",
            "+reward@reward.judge=judge",
            "+reward@reward.aesthetic=hpsv3",
        ],
    )
    check_config(cfg, "eval")
    assert cfg.reward.judge._target_ == "rewards.judge.VLMJudge"
    assert cfg.reward.aesthetic._target_ == "rewards.preference.hpsv3"
