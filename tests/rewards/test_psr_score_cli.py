"""psr-score end to end on temporary folders: manifest JSONL, PSRBench JSON and a plain folder."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from rewards.base import RewardInputs, Subject
from rewards.cli import main, run
from rewards.color import ColorReward


def _save(path, tensor):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((tensor.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


def _load(path):
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def _read_outputs(out):
    payload = json.loads((out / "scores.json").read_text())
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    return payload, rows


def test_manifest_end_to_end_with_tiny_psr(tmp_path, patch, paste):
    records = []
    for i in range(3):
        target = torch.ones(3, 64, 64)
        subjects = []
        for k, (name, category) in enumerate([("corgi", "dog"), ("tabby", "cat")]):
            piece = patch(10 * i + k, 20, 16)
            paste(target, piece, 4 + 30 * k, 20)
            ref = torch.ones(3, 40, 40)
            paste(ref, piece, 10, 10)
            _save(tmp_path / f"refs/{i}_{k}.png", ref)
            subjects.append(
                {"name": name, "category": category, "reference": f"refs/{i}_{k}.png", "box": None}
            )
        _save(tmp_path / f"targets/{i}.png", target)
        records.append(
            {
                "id": f"r{i}",
                "instruction": "a corgi and a tabby cat",
                "target": f"targets/{i}.png",
                "subjects": subjects,
            }
        )
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    out = tmp_path / "out"
    means = run(
        [
            "--manifest",
            str(tmp_path / "m.jsonl"),
            "--reward",
            "tiny_psr",
            "--out",
            str(out),
            "--no-progress",
            "--batch-size",
            "2",
            "box_threshold=0.2",
        ]
    )
    payload, rows = _read_outputs(out)
    assert payload["count"] == 3 and [s["id"] for s in payload["samples"]] == ["r0", "r1", "r2"]
    assert payload["reward"]["box_threshold"] == 0.2  # the override reached the config
    scores = [s["score"] for s in payload["samples"]]
    assert means["score"] == pytest.approx(float(np.mean(scores)))
    assert rows[-1]["id"] == "mean" and float(rows[-1]["score"]) == pytest.approx(means["score"], rel=1e-5)
    assert {"subject_1", "subject_2", "detected_frac"} <= set(rows[0])
    # the CLI's numbers are the reward's numbers on the same images
    from rewards.testing import tiny_psr

    reward = tiny_psr(0, box_threshold=0.2)
    images = torch.stack([_load(tmp_path / f"targets/{i}.png") for i in range(3)])
    refs = [[_load(tmp_path / f"refs/{i}_{k}.png") for k in range(2)] for i in range(3)]
    direct = reward(
        images,
        RewardInputs(
            ["a corgi and a tabby cat"] * 3, refs, [[Subject("corgi", "dog"), Subject("tabby", "cat")]] * 3
        ),
    )
    assert scores == pytest.approx(direct["score"].tolist(), abs=1e-4)


def test_psrbench_json_with_color_reward(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = []
    for i in range(2):
        _save(tmp_path / f"in/{i}_a.png", torch.rand(3, 20, 30, generator=g))
        _save(tmp_path / f"in/{i}_b.png", torch.rand(3, 25, 25, generator=g))
        _save(tmp_path / f"out/{i}.png", torch.rand(3, 32, 32, generator=g))
        data.append(
            {
                "instruction": "a dog and a cat",
                "input_path": [f"in/{i}_a.png", f"in/{i}_b.png"],
                "category1": "dog",
                "category2": "cat",
                "result_path": f"out/{i}.png",
            }
        )
    (tmp_path / "bench.json").write_text(json.dumps(data))
    run(
        [
            "--psrbench",
            str(tmp_path / "bench.json"),
            "--reward",
            "color",
            "--out",
            str(tmp_path / "scores"),
            "--no-progress",
        ]
    )
    payload, _ = _read_outputs(tmp_path / "scores")
    # psr-eval's ids for the same file (rewards.psrbench.record_id): <file stem>-<4-digit index>
    assert [s["id"] for s in payload["samples"]] == ["bench-0000", "bench-0001"]
    for i, sample in enumerate(payload["samples"]):
        refs = [_load(tmp_path / f"in/{i}_a.png"), _load(tmp_path / f"in/{i}_b.png")]
        expected = ColorReward()(
            _load(tmp_path / f"out/{i}.png")[None],
            RewardInputs(["x"], [refs], [[Subject("dog", "dog"), Subject("cat", "cat")]]),
        )
        assert sample["score"] == pytest.approx(expected["score"].item(), abs=1e-6)
    del data[1]["result_path"]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="record 1: missing or bad field 'result_path'"):
        run(
            [
                "--psrbench",
                str(tmp_path / "bad.json"),
                "--reward",
                "color",
                "--out",
                str(tmp_path / "x"),
                "--no-progress",
            ]
        )


def test_folder_of_mixed_sizes_with_a_target_and_nan_means(tmp_path):
    g = torch.Generator().manual_seed(0)
    for name, size in [("a", 32), ("b", 48), ("c", 32)]:
        _save(tmp_path / "imgs" / f"{name}.png", torch.rand(3, size, size, generator=g))
    (tmp_path / "imgs" / "a.txt").write_text("a red mug")
    run(
        [
            "--images",
            str(tmp_path / "imgs"),
            "--reward",
            "rewards.testing.tiny_clip_t",
            "--prompt",
            "a photo",
            "--out",
            str(tmp_path / "o1"),
            "--no-progress",
            "scale=100",
        ]
    )
    payload, rows = _read_outputs(tmp_path / "o1")
    assert [s["id"] for s in payload["samples"]] == ["a", "b", "c"] and all(
        abs(s["score"]) <= 100 for s in payload["samples"]
    )
    # color needs references: every sample is NaN ("does not apply"), written as null / empty
    means = run(
        [
            "--images",
            str(tmp_path / "imgs"),
            "--reward",
            "color",
            "--out",
            str(tmp_path / "o2"),
            "--no-progress",
        ]
    )
    payload, rows = _read_outputs(tmp_path / "o2")
    assert math.isnan(means["score"]) and payload["mean"]["score"] is None and rows[0]["score"] == ""


def test_console_script_help():
    result = subprocess.run(
        [sys.executable, "-m", "rewards.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "--psrbench" in result.stdout and "--reward" in result.stdout


def test_psrbench_ids_from_id_fields_and_object_keys(tmp_path):
    _save(tmp_path / "in/a.png", torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)))
    _save(tmp_path / "out/0.png", torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1)))
    rec = {"instruction": "a dog", "input_path": ["in/a.png"], "category1": "dog", "result_path": "out/0.png"}
    (tmp_path / "list.json").write_text(json.dumps([rec, {**rec, "id": "dog-7"}]))
    (tmp_path / "object.json").write_text(json.dumps({"first": rec, "second": {**rec, "id": 42}}))
    for name, ids in [("list", ["list-0000", "dog-7"]), ("object", ["first", "42"])]:
        out = tmp_path / f"scores_{name}"
        run(
            [
                "--psrbench",
                str(tmp_path / f"{name}.json"),
                "--reward",
                "color",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        assert [s["id"] for s in _read_outputs(out)[0]["samples"]] == ids


def test_main_turns_bad_input_into_a_message_and_a_non_zero_status(tmp_path, monkeypatch):
    for name in ("PSR_GROUNDING_DINO", "PSR_DINO"):  # conf/reward/psr.yaml's fallbacks for the paths
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["--manifest", str(tmp_path / "missing.jsonl"), "--reward", "color", "--no-progress"])
    assert exc.value.code == f"psr-score: --manifest {tmp_path / 'missing.jsonl'}: no such file"
    (tmp_path / "imgs").mkdir()
    _save(tmp_path / "imgs/a.png", torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(SystemExit) as exc:  # a reward config key left at ??? names the key
        main(["--images", str(tmp_path / "imgs"), "--reward", "psr", "--out", str(tmp_path / "o")])
    assert "detector.path" in str(exc.value.code) and str(exc.value.code).startswith("psr-score: ")
    # success returns None: the console script exits 0 (a returned dict would exit 1)
    assert (
        main(["--images", str(tmp_path / "imgs"), "--reward", "color", "--out", str(tmp_path / "o2")]) is None
    )
