"""Every console script as installed (``.venv/bin/psr-*``), run as a user runs it: status 0 after a
run on the tiniest config, a non-zero status and a message naming the problem for bad input.

One chain shares its outputs: psr-data writes a manifest, psr-sft trains on it; psr-eval samples a
PSRBench JSON and psr-score scores psr-eval's images through the same JSON, and the two name every
record alike (``rewards.psrbench.record_id``), so their outputs join on ``id``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # .venv/bin under `make test`
# tiny overrides (as in tests/test_cli.py): 32 px, 1-2 steps, nothing periodic
TINY_RL = [
    "experiment=quickstart",
    "train.resolution=32",
    "train.steps=1",
    "train.group_size=2",
    "train.micro_batch_size=2",
    "train.eval_every=0",
    "train.grid_every=0",
    "sampler.num_steps=2",
]
SYNTHETIC = ["data.num_records=6", "data.heldout=2", "data.image_size=32"]  # psr-rl's quickstart data
TINY_SFT = [
    "experiment=quickstart",
    "data.heldout=1",
    "dataset.resolution=32",
    "train.steps=1",
    "train.micro_batch_size=2",
    "validation.every=0",
    "optim.warmup_steps=0",  # the preset warms up for 3 steps; one step is run here
]
# conf/eval.yaml's own defaults are the tiny model, the colour reward and data=psrbench
TINY_EVAL = ["eval.samples_per_prompt=1", "eval.resolution=32", "eval.num_steps=2", "eval.grid_records=0"]


def script(name: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run the installed console script ``name`` offline, on one thread."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_"))
    }
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    exe = BIN / name
    assert exe.is_file(), f"{exe} is not installed (make install)"
    return subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"{done.args[0]} failed ({done.returncode}):\n{done.stderr[-4000:]}"
    return done


def fails_naming(done: subprocess.CompletedProcess, *words: str) -> None:
    """Non-zero status, no Python traceback needed to find the reason: the words are in stderr."""
    assert done.returncode != 0, f"{done.args[0]} exited 0 on bad input:\n{done.stdout[-2000:]}"
    for word in words:
        assert word in done.stderr, f"{done.args[0]}: {word!r} not in stderr:\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    ok(
        script(
            "psr-data",
            "experiment=quickstart",
            "plan.num_records=7",
            f"out_dir={out}",
            f"hydra.run.dir={out}/.run",
        )
    )
    path = out / "export" / "manifest.jsonl"
    assert path.is_file() and path.read_text().strip()
    return path


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """A PSRBench JSON (list form, no ``id`` fields: ids come from the file name) with 2 records."""
    root = tmp_path_factory.mktemp("bench")
    rng = np.random.default_rng(0)
    records = []
    for i in range(2):
        refs = []
        for k in range(2):
            ref = root / "refs" / f"{i}_{k}.png"
            ref.parent.mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(ref)
            refs.append(f"refs/{i}_{k}.png")
        records.append(
            {"instruction": "a dog and a cat", "input_path": refs, "category1": "dog", "category2": "cat"}
        )
    path = root / "Sample.json"
    path.write_text(json.dumps(records))
    return path


def test_psr_data(manifest):
    done = script("psr-data", "experiment=quickstart", "stage=nonsense", f"out_dir={manifest.parent.parent}")
    fails_naming(done, "nonsense")


def test_psr_sft(manifest, tmp_path):
    ok(script("psr-sft", *TINY_SFT, f"data.manifest={manifest}", f"hydra.run.dir={tmp_path / 'sft'}"))
    assert (tmp_path / "sft" / "metrics.jsonl").is_file()
    missing = tmp_path / "missing.jsonl"
    fails_naming(
        script("psr-sft", *TINY_SFT, f"data.manifest={missing}", f"hydra.run.dir={tmp_path / 'x'}"),
        str(missing),
    )


def test_psr_rl(tmp_path):
    ok(script("psr-rl", *TINY_RL, *SYNTHETIC, f"hydra.run.dir={tmp_path / 'rl'}"))
    assert (tmp_path / "rl" / "metrics.jsonl").is_file()
    missing = tmp_path / "missing.jsonl"
    done = script(
        "psr-rl", *TINY_RL, "data=manifest", f"data.manifest={missing}", f"hydra.run.dir={tmp_path / 'x'}"
    )
    fails_naming(done, str(missing))


def test_psr_eval_and_psr_score_name_records_alike(bench, tmp_path):
    run_dir = tmp_path / "eval"
    ok(script("psr-eval", *TINY_EVAL, f"data.path={bench}", f"hydra.run.dir={run_dir}"))
    rows = [json.loads(line) for line in (run_dir / "scores.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["Sample-0000", "Sample-0001"]

    # the same PSRBench JSON with result_path filled by psr-eval's samples, scored by psr-score
    records = json.loads(bench.read_text())
    for rec, row in zip(records, rows, strict=True):
        rec["input_path"] = [str(bench.parent / p) for p in rec["input_path"]]
        rec["result_path"] = str(run_dir / "samples" / f"{row['id']}_0.png")
    filled = tmp_path / "filled" / "Sample.json"  # the same file name: ids come from the stem
    filled.parent.mkdir()
    filled.write_text(json.dumps(records))
    out = tmp_path / "scores"
    ok(
        script(
            "psr-score", "--psrbench", str(filled), "--reward", "color", "--out", str(out), "--no-progress"
        )
    )
    samples = json.loads((out / "scores.json").read_text())["samples"]
    assert [s["id"] for s in samples] == [r["id"] for r in rows]
    # psr-eval scores 8-bit images, so scoring its saved PNGs again gives its numbers
    for s, r in zip(samples, rows, strict=True):
        assert s["score"] == pytest.approx(r["scores"]["score"], abs=1e-5)

    missing = tmp_path / "missing.json"
    done = script("psr-eval", *TINY_EVAL, f"data.path={missing}", f"hydra.run.dir={tmp_path / 'x'}")
    fails_naming(done, str(missing))


def test_psr_score_exit_status(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.full((16, 16, 3), 128, dtype=np.uint8)).save(tmp_path / "imgs" / "a.png")
    done = ok(
        script(
            "psr-score", "--images", str(tmp_path / "imgs"), "--reward", "color", "--out", str(tmp_path / "o")
        )
    )
    assert "psr-score: 1 images" in done.stdout  # a success used to exit 1 (main returned the means)
    missing = tmp_path / "missing.jsonl"
    fails_naming(
        script("psr-score", "--manifest", str(missing), "--reward", "color"),
        f"--manifest {missing}: no such file",
    )
