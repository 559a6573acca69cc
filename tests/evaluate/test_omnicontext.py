"""``psr-eval suite=omnicontext``: a small parquet in the released column layout (embedded image
bytes, ``datasets``' ``{bytes, path}`` image structs) read into records, scored from result images
by a scripted judge meeting the ``complete`` API (one reply unparseable), and the PF / SC /
overall columns and summary checked against values worked out by hand."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def hydra_judge() -> type:
    """The class as Hydra imports it (``tests.evaluate.test_omnicontext``, which may be another
    module object than the one pytest collected), whose ``requests`` the runs append to."""
    from importlib import import_module

    return import_module("tests.evaluate.test_omnicontext").ScriptedJudge  # type: ignore[no-any-return]


class ScriptedJudge:
    """Replies by (instruction marker, request kind); records every request it was sent."""

    REPLIES = {
        ("[m0]", "pf"): '{"score": 8, "reasoning": "ok"}',
        ("[m0]", "sc"): 'Here is my verdict:\n{"score": 2,\n "reasoning": "the faces differ"}',
        ("[m1]", "pf"): "7",
        ("[m1]", "sc"): "I cannot rate this image.",
        ("[s0]", "pf"): '{"score": [9], "reasoning": "fine"}',
        ("[s0]", "sc"): "{score: 4, reasoning: not quite json}",
    }
    requests: list[tuple[list, str]] = []

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs

    def complete(self, images, texts):
        out = []
        for imgs, text in zip(images, texts, strict=True):
            ScriptedJudge.requests.append(([im.clone() for im in imgs], text))
            which = "pf" if "PROMPT FOLLOWING" in text else "sc"
            marker = next(m for m, _ in self.REPLIES if m in text)
            out.append(self.REPLIES[(marker, which)])
        return out


def encoded(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


ROWS = [  # key, task_type, language, instruction, input image shapes (h, w)
    ("m0", "multi_object", "en", "[m0] the cup and the lamp on a desk", [(20, 40), (24, 24)]),
    ("m1", "multi_object", "en", "[m1] the kettle beside the vase", [(48, 33)]),
    ("s0", "scene_character", "en", "[s0] the girl in the kitchen", [(16, 16), (35, 50)]),
    ("z0", "scene_character", "zh", "[z0] 厨房里的女孩", [(16, 16)]),
]


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """``data/test-*.parquet`` as the dataset ships, and result images for m0, m1, s0 (z0: none)."""
    root = tmp_path_factory.mktemp("OmniContext")
    rng = np.random.default_rng(0)
    records = []
    for key, task, lang, text, shapes in ROWS:
        images = [
            {
                "bytes": encoded(rng.integers(0, 256, (*s, 3), dtype=np.uint8), "PNG" if k else "JPEG"),
                "path": None,
            }
            for k, s in enumerate(shapes)
        ]
        records.append(
            {
                "key": key,
                "task_type": task,
                "instruction": text,
                "input_images": images,
                "instruction_language": lang,
            }
        )
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("task_type", pa.string()),
            ("instruction", pa.string()),
            ("input_images", pa.list_(image)),
            ("instruction_language", pa.string()),
        ]
    )
    (root / "data").mkdir()
    pq.write_table(
        pa.Table.from_pylist(records[:2], schema=schema), root / "data" / "test-00000-of-00002.parquet"
    )
    pq.write_table(
        pa.Table.from_pylist(records[2:], schema=schema), root / "data" / "test-00001-of-00002.parquet"
    )
    results = root / "results"
    for key, task, *_ in ROWS[:3]:
        (results / task).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(results / task / f"{key}.png")
    return root


def compose(run_dir: Path, *overrides: str):
    from psr.config import check_config, compose

    cfg = compose(
        "eval",
        [
            "suite=omnicontext",
            f"run_dir={run_dir}",
            "~reward.judge",
            "+reward.judge={_target_:tests.evaluate.test_omnicontext.ScriptedJudge}",
            *overrides,
        ],
    )
    check_config(cfg, "eval")
    return cfg


@pytest.fixture(scope="module")
def scored(bench, tmp_path_factory):
    from psr.evaluate import main

    judge = hydra_judge()
    judge.requests.clear()
    run_dir = tmp_path_factory.mktemp("oc_run")
    overrides = [f"data.root={bench}", "eval.source=results", f"eval.results_root={bench / 'results'}"]
    main(compose(run_dir, *overrides, "eval.grid_records=1"))
    rows = [json.loads(x) for x in (run_dir / "scores.jsonl").read_text().splitlines()]
    return run_dir, rows, list(judge.requests)


def test_records_from_the_released_parquet(bench, tmp_path):
    from psr.evaluate.omnicontext import load_omnicontext

    train, heldout, root = load_omnicontext(str(bench), run_dir=tmp_path)
    assert heldout == [] and [s.id for s in train] == [
        "multi_object-m0",
        "multi_object-m1",
        "scene_character-s0",
    ]
    assert [s.kind for s in train] == ["multi_object", "multi_object", "scene_character"]
    m0 = train[0]
    assert [s.reference for s in m0.subjects] == ["multi_object/m0_0.jpg", "multi_object/m0_1.png"]
    assert m0.provenance["result_path"] == "multi_object/m0.png"
    # the embedded bytes are written unchanged
    table = pq.read_table(bench / "data" / "test-00000-of-00002.parquet").to_pylist()
    assert (root / m0.subjects[0].reference).read_bytes() == table[0]["input_images"][0]["bytes"]
    every = load_omnicontext(str(bench), languages=None, run_dir=tmp_path)[0]
    assert [s.id for s in every][-1] == "scene_character-z0"
    only = load_omnicontext(str(bench), task_types=["scene_character"], run_dir=tmp_path)[0]
    assert [s.id for s in only] == ["scene_character-s0"]
    with pytest.raises(ValueError, match=r"data\.task_types: \['scene'\]"):
        load_omnicontext(str(bench), task_types=["scene"], run_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no .parquet"):
        load_omnicontext(str(tmp_path), run_dir=tmp_path)


def test_missing_column_is_named(tmp_path):
    from psr.evaluate.omnicontext import load_omnicontext

    pq.write_table(pa.Table.from_pylist([{"key": "a", "task_type": "single_object"}]), tmp_path / "x.parquet")
    with pytest.raises(
        ValueError, match=r"no column\(s\) \['instruction', 'input_images', 'instruction_language'\]"
    ):
        load_omnicontext(str(tmp_path / "x.parquet"), run_dir=tmp_path)


def test_reply_parser():
    from psr.evaluate.omnicontext import parse_judge_reply

    assert parse_judge_reply('{"score": 7, "reasoning": "x"}') == 7.0
    assert parse_judge_reply('text before {"score": 6.5,\n"reasoning": "y"} after') == 6.5
    assert parse_judge_reply('{"score": [3], "reasoning": "z"}') == 3.0
    assert parse_judge_reply("{score: 4, reasoning: broken}") == 4.0
    assert parse_judge_reply(" 10 ") == 10.0
    for bad in (
        None,
        "",
        "no score",
        '{"score": 11}',
        '{"score": -1}',
        '{"reasoning": "none"}',
        "[6, 0]",
        "7.5",
    ):
        assert parse_judge_reply(bad) is None, bad


def test_released_input_size():
    from psr.evaluate.omnicontext import released_input_size

    # 2000 x 1000: ratio sqrt(1048576 / 2e6) = 0.72408 -> 1448 x 724 -> floored to multiples of 16
    assert released_input_size(2000, 1000) == (1440, 720)
    assert released_input_size(1024, 1024) == (1024, 1024)  # not above the limit
    assert released_input_size(500, 375) == (496, 368)  # below the limit: only floored
    assert released_input_size(40, 20) == (32, 16)


def test_scores_are_the_judge_replies(scored):
    """m0: PF 8, SC 2 -> sqrt(16) = 4; m1: PF 7, SC unreadable -> NaN overall, counted;
    s0: PF 9 (one-number list), SC 4 (invalid JSON, score read) -> 6; z0 (zh) is not a record."""
    _, rows, _ = scored
    assert [r["id"] for r in rows] == ["multi_object-m0", "multi_object-m1", "scene_character-s0"]
    got = [
        (r["scores"]["omnicontext_pf"], r["scores"]["omnicontext_sc"], r["scores"]["omnicontext_overall"])
        for r in rows
    ]
    assert got == [(8.0, 2.0, 4.0), (7.0, None, None), (9.0, 4.0, 6.0)]
    assert [r["scores"]["omnicontext_sc_failed"] for r in rows] == [0.0, 1.0, 0.0]
    assert [r["scores"]["omnicontext_pf_failed"] for r in rows] == [0.0, 0.0, 0.0]
    assert [r["scores"]["score"] for r in rows] == [pytest.approx(0.4), None, pytest.approx(0.6)]


def test_requests_hold_the_inputs_then_the_result(scored, bench):
    """Two requests per sample, each: the input images at the released sizes, then the result
    image; the scene task's SC request uses the scene template, its PF request the plain one."""
    from psr.evaluate.omnicontext import load_template

    _, rows, requests = scored
    assert len(requests) == 6
    shapes = {"[m0]": [(16, 32), (16, 16)], "[m1]": [(48, 32)], "[s0]": [(16, 16), (32, 48)]}
    for imgs, text in requests:
        marker = next(m for m in shapes if m in text)
        assert [tuple(im.shape[-2:]) for im in imgs[:-1]] == shapes[marker]
        row = next(r for r in rows if r["id"].endswith(marker[1:3]))
        result = np.asarray(Image.open(row["image"]).convert("RGB"), dtype=np.float32) / 255
        np.testing.assert_allclose(imgs[-1].permute(1, 2, 0).numpy(), result, atol=1e-6)
    texts = [t for _, t in requests]
    scene_sc = load_template("omnicontext_sc_scene").replace("{instruction}", "[s0] the girl in the kitchen")
    plain_pf = load_template("omnicontext_pf").replace("{instruction}", "[s0] the girl in the kitchen")
    assert scene_sc in texts and plain_pf in texts
    assert sum("[m0]" in t and "SUBJECT CONSISTENCY" in t and "SCENE" not in t for t in texts) == 1


def test_resized_input_equals_pil(scored, bench):
    """The m0 input sent at 32 x 16 is PIL's bicubic resize of the decoded 40 x 20 JPEG."""
    _, _, requests = scored
    table = pq.read_table(bench / "data" / "test-00000-of-00002.parquet").to_pylist()
    pil = Image.open(io.BytesIO(table[0]["input_images"][0]["bytes"])).convert("RGB")
    expected = np.asarray(pil.resize((32, 16), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    sent = next(imgs for imgs, t in requests if "[m0]" in t)[0]
    np.testing.assert_allclose(sent.permute(1, 2, 0).numpy(), expected, atol=1e-6)


def test_missing_pyarrow_names_the_extra(bench, tmp_path, monkeypatch):
    import sys

    from psr.evaluate.omnicontext import load_omnicontext

    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"psr-rl\[benchmarks\]"):
        load_omnicontext(str(bench), run_dir=tmp_path)


def test_summary_is_the_released_average(scored):
    run_dir, _, _ = scored
    summary = json.loads((run_dir / "summary.json").read_text())
    multi = summary["by_kind"]["multi_object"]["metrics"]
    assert multi["omnicontext_pf"]["mean"] == pytest.approx(7.5)
    assert multi["omnicontext_sc"] == {"mean": 2.0, "std": 0.0, "count": 1}
    assert multi["omnicontext_sc_failed"]["mean"] == 0.5
    # the released Average: the mean over task types of each type's mean
    assert summary["overall"]["omnicontext_overall"]["mean"] == pytest.approx((4 + 6) / 2)
    assert summary["overall"]["omnicontext_pf"]["mean"] == pytest.approx((7.5 + 9) / 2)
    assert summary["overall"]["omnicontext_sc"]["mean"] == pytest.approx((2 + 4) / 2)
    assert (run_dir / "grid.png").is_file()


def test_missing_result_is_excluded(bench, tmp_path):
    from psr.evaluate import main

    overrides = [
        f"data.root={bench}",
        "eval.source=results",
        f"eval.results_root={bench}",
        "eval.grid_records=0",
    ]
    main(compose(tmp_path, *overrides, "data.languages=null", "data.task_types=[scene_character]"))
    rows = [json.loads(x) for x in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["scene_character-s0", "scene_character-z0"]
    assert all(r.get("error") for r in rows)  # results_root is the dataset folder: no images there
    assert json.loads((tmp_path / "summary.json").read_text())["excluded"] == 2


def test_user_templates(tmp_path):
    from psr.evaluate.omnicontext import OmniContextScorer

    (tmp_path / "pf.txt").write_text("Rate it. Instruction: {instruction}\nAnswer as JSON.")
    scorer = OmniContextScorer(ScriptedJudge(), templates={"pf": str(tmp_path / "pf.txt")})
    assert scorer.prompt("pf", "multi_object", "x") == "Rate it. Instruction: x\nAnswer as JSON."
    assert "SCENE" in scorer.prompt("sc", "scene_object", "x")
    (tmp_path / "bad.txt").write_text("no slot")
    with pytest.raises(ValueError, match=r"\{instruction\} exactly once"):
        OmniContextScorer(ScriptedJudge(), templates={"sc": str(tmp_path / "bad.txt")})
    with pytest.raises(ValueError, match="unknown keys"):
        OmniContextScorer(ScriptedJudge(), templates={"pf_typo": "omnicontext_pf"})
    with pytest.raises(ValueError, match="complete"):
        OmniContextScorer(object())


def test_sampling_with_the_tiny_model(bench, tmp_path):
    """The suite sampling a model (the tiny one): the records' references reach the sampler."""
    from psr.evaluate import main

    main(
        compose(
            tmp_path,
            f"data.root={bench}",
            "eval.limit=1",
            "eval.resolution=32",
            "eval.num_steps=2",
            "eval.grid_records=0",
        )
    )
    rows = [json.loads(x) for x in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["multi_object-m0"] and (tmp_path / rows[0]["image"]).is_file()
    assert rows[0]["scores"]["omnicontext_overall"] == 4.0
    assert math.isfinite(rows[0]["scores"]["score"])


def test_report_columns(scored, tmp_path):
    """psr-report: the OmniContext columns hold the mean over task types."""
    import csv

    from psr.evaluate.report import write_report

    run_dir, _, _ = scored
    folder = write_report([run_dir], tmp_path / "report", contact=0)
    with (folder / "report.csv").open() as f:
        row = next(r for r in csv.DictReader(f) if r["quoted"] == "0")
    assert float(row["omnicontext_overall"]) == pytest.approx(5.0, abs=1e-3)
    assert float(row["omnicontext_pf"]) == pytest.approx(8.25, abs=1e-3)
    assert float(row["omnicontext_sc_failed"]) == pytest.approx(0.25, abs=1e-3)  # (0.5 + 0) / 2
    assert "OmniContext overall" in (folder / "report.md").read_text()


def test_suite_config_composes(tmp_path):
    from psr.config import check_config
    from psr.config import compose as psr_compose

    cfg = psr_compose("eval", ["suite=omnicontext", f"data.root={tmp_path}"])
    check_config(cfg, "eval")
    assert cfg.reward.judge._target_ == "rewards.judge.VLMJudge" and cfg.data.languages == ["en"]
    assert dict(cfg.reward.templates) == {
        "pf": "omnicontext_pf",
        "pf_scene": "omnicontext_pf",
        "sc": "omnicontext_sc",
        "sc_scene": "omnicontext_sc_scene",
    }
