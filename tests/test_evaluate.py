"""psr-eval on the tiny model (CPU): the real config composed with Hydra, the real entry point."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CONF = str(Path(__file__).resolve().parents[1] / "conf")

# The quickstart on 5 synthetic records (2-3 subjects) x 2 samples at 32 px (2x2 target tokens), 3 ODE
# steps; with another data= override, the default tiny model and colour reward with the same eval keys.
QUICKSTART = ["experiment/eval=quickstart", "data.num_records=5", "data.image_size=32"]
BASE = [
    "eval.resolution=32",
    "eval.num_steps=3",
    "eval.samples_per_prompt=2",
    "eval.records_per_batch=2",
    "eval.grid_records=2",
]


def compose(run_dir: Path, *overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        own_data = any(o.startswith("data=") for o in overrides)
        base = BASE if own_data else [*QUICKSTART, *BASE]
        return hydra_compose("eval", overrides=[*base, f"run_dir={run_dir}", *overrides])


def evaluate(run_dir: Path, *overrides: str) -> list[dict]:
    """Run ``psr.evaluate.main`` and return the lines of ``scores.jsonl``."""
    from psr.evaluate import main

    main(compose(run_dir, *overrides))
    return lines(run_dir)


def lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "scores.jsonl").read_text().splitlines()]


def pixels(run_dir: Path, row: dict) -> np.ndarray:
    return np.asarray(Image.open(run_dir / row["image"]).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    run_dir = tmp_path_factory.mktemp("eval")
    return run_dir, evaluate(run_dir)


def test_every_sample_scored_and_summary_is_their_mean(first_run):
    run_dir, rows = first_run
    assert [(r["id"], r["sample"]) for r in rows] == [
        (f"synthetic-0-{i:05d}", k) for i in range(5) for k in range(2)
    ]
    for r in rows:
        assert (run_dir / r["image"]).is_file()
        assert set(r) >= {"id", "prompt", "kind", "sample", "seed", "image", "scores"}
        assert math.isfinite(r["scores"]["score"])
    assert len({r["seed"] for r in rows}) == len(rows)  # every sample its own noise
    summary = json.loads((run_dir / "summary.json").read_text())
    values = [r["scores"]["score"] for r in rows]
    assert summary["count"] == 10 and summary["records"] == 5
    assert summary["metrics"]["score"]["count"] == 10
    # the same 10 float32 numbers averaged in float64 both times: equal to rounding
    assert summary["metrics"]["score"]["mean"] == pytest.approx(float(np.mean(values)), abs=1e-12)
    assert summary["metrics"]["score"]["std"] == pytest.approx(float(np.std(values)), abs=1e-12)
    kinds = {r["kind"] for r in rows}
    assert set(summary["by_kind"]) == kinds
    for kind, block in summary["by_kind"].items():
        vals = [r["scores"]["score"] for r in rows if r["kind"] == kind]
        assert block["metrics"]["score"]["mean"] == pytest.approx(float(np.mean(vals)), abs=1e-12)
    assert Image.open(run_dir / "grid.png").size[0] > 0


def test_scores_are_those_of_the_saved_pngs(first_run):
    """Images are quantized before scoring: the colour reward on the PNGs gives the logged scores."""
    from psr.data.dataset import PromptDataset
    from psr.data.manifest import read_manifest
    from rewards.base import RewardInputs
    from rewards.color import ColorReward

    run_dir, rows = first_run
    records = {
        r.id: r for r in PromptDataset(read_manifest(run_dir / "data/manifest.jsonl"), run_dir / "data")
    }
    images = torch.stack([torch.from_numpy(pixels(run_dir, r)).permute(2, 0, 1).float() / 255 for r in rows])
    scores = ColorReward()(images, RewardInputs.from_records([records[r["id"]] for r in rows]))["score"]
    torch.testing.assert_close(scores, torch.tensor([r["scores"]["score"] for r in rows]), rtol=0, atol=1e-6)


def test_resume_regenerates_exactly_the_missing_samples(first_run, tmp_path):
    """Delete half the lines (and tear the last): the rerun samples only those again, to the same values."""
    src, rows = first_run
    run_dir = tmp_path / "resumed"
    shutil.copytree(src, run_dir)
    kept = rows[::2]
    text = "".join(json.dumps(r) + "\n" for r in kept) + json.dumps(rows[1])[:40]  # a torn last line
    (run_dir / "scores.jsonl").write_text(text)
    for r in rows[1::2]:
        (run_dir / r["image"]).unlink()
    again = evaluate(run_dir)
    assert again == rows  # same ids, seeds, images and scores, bit for bit, in record order
    for r in rows:
        np.testing.assert_array_equal(pixels(run_dir, r), pixels(src, r))
    # a complete run_dir: the rerun samples nothing
    assert evaluate(run_dir) == rows


def test_samples_do_not_depend_on_sharding_or_batching(first_run, tmp_path):
    """Two ranks (simulated: rank and world set on the evaluator) with another batch size give the
    same samples; rank 0 merges both ranks' files into scores.jsonl."""
    from psr.evaluate import Evaluator

    _, rows = first_run
    cfg = compose(tmp_path, "eval.records_per_batch=1")
    evaluators = []
    for rank in (1, 0):
        ev = Evaluator(cfg)
        ev.setup()
        ev.rank, ev.world = rank, 2
        ev.run()
        evaluators.append(ev)
    assert sorted(p.name for p in tmp_path.glob("scores.rank*.jsonl")) == [
        "scores.rank0.jsonl",
        "scores.rank1.jsonl",
    ]
    evaluators[1].finish()
    assert not list(tmp_path.glob("scores.rank*.jsonl"))
    assert lines(tmp_path) == rows


def test_changed_settings_in_the_same_run_dir_fail(first_run, tmp_path):
    src, _ = first_run
    shutil.copytree(src, tmp_path / "run")
    with pytest.raises(ValueError, match="num_steps"):
        evaluate(tmp_path / "run", "eval.num_steps=4")


def test_checkpoint_and_lora_change_the_samples(first_run, tmp_path):
    """A LoRA checkpoint in the trainers' format (random non-zero B) changes every sample; the same
    adapter exported in diffusers format and passed as ``lora=`` gives the same samples."""
    from hydra.utils import instantiate

    from psr.checkpoint import save_training_checkpoint
    from psr.engine import TorchEngine
    from psr.models.lora import add_lora

    _, base_rows = first_run
    policy = instantiate(compose(tmp_path).model)
    # alpha = rank: the diffusers file carries no alpha, and diffusers then assumes scale 1
    params = add_lora(policy.transformer, rank=4, alpha=4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen))
    engine = TorchEngine(device="cpu")
    engine.setup(policy.transformer, params, lr=1e-4)
    ckpt = save_training_checkpoint(
        tmp_path / "sft/checkpoints", 1, policy, engine, data_state=None, export_lora=True
    )

    tuned = evaluate(tmp_path / "ckpt", f"checkpoint={tmp_path / 'sft'}")
    assert [r["seed"] for r in tuned] == [r["seed"] for r in base_rows]
    for a, b in zip(tuned, base_rows, strict=True):
        assert a["scores"]["score"] != b["scores"]["score"]
        # measured: 2.2-12.6 8-bit levels on average per sample with this adapter
        assert np.abs(pixels(tmp_path / "ckpt", a) - pixels(first_run[0], b)).mean() > 1.0

    via_lora = evaluate(tmp_path / "lora", f"lora={ckpt / 'lora'}")
    for a, b in zip(via_lora, tuned, strict=True):
        # merged in float64 (checkpoint=) vs by peft in float32 (lora=): measured identical PNGs; one
        # 8-bit level is allowed for a value that rounds the other way
        assert np.abs(pixels(tmp_path / "lora", a) - pixels(tmp_path / "ckpt", b)).max() <= 1
        assert a["scores"]["score"] == pytest.approx(b["scores"]["score"], abs=1e-3)


def test_missing_data_path_names_the_config_key(tmp_path):
    from omegaconf.errors import MissingMandatoryValue

    from psr.evaluate import main

    with pytest.raises(FileNotFoundError, match=r"data\.manifest"):
        main(compose(tmp_path, "data=manifest", "data.manifest=/nonexistent/manifest.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"data\.path"):
        main(compose(tmp_path, "data=psrbench", "data.path=/nonexistent/three.json"))
    with pytest.raises(MissingMandatoryValue, match=r"data\.path"):
        main(compose(tmp_path, "data=psrbench"))


def test_psrbench_json(first_run, tmp_path):
    """A PSRBench JSON (ids and kinds from the file) through the same run."""
    from psr.data.manifest import read_manifest, write_psrbench

    src, _ = first_run
    samples = read_manifest(src / "data/manifest.jsonl")[:2]
    bench = write_psrbench(tmp_path / "bench/three.json", samples)  # references relative to data.root
    rows = evaluate(tmp_path / "run", "data=psrbench", f"data.path={bench}", f"data.root={src / 'data'}")
    assert [(r["id"], r["kind"]) for r in rows] == [(s.id, s.kind) for s in samples for _ in range(2)]
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["records"] == 2


def test_two_processes_under_torchrun(first_run, tmp_path):
    """The real multi-process path: ``torchrun`` with 2 CPU ranks (gloo), each sampling its share;
    rank 0 merges. One thread per rank, as in this test process, so the samples are bit-identical."""
    _, rows = first_run
    torchrun = Path(sys.executable).with_name("torchrun")
    psr_eval = Path(sys.executable).with_name("psr-eval")
    overrides = [*QUICKSTART, *BASE, f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PSR_CONF_DIR": CONF}
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "--no-python", str(psr_eval), *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 rank(s)" in proc.stdout
    assert lines(tmp_path) == rows
    assert not list(tmp_path.glob("scores.rank*.jsonl"))


def test_ids_that_differ_only_in_replaced_characters_get_their_own_pngs(first_run, tmp_path):
    """``x/1``, ``x_1`` and ``x?1`` all sanitize to ``x_1``: each record still gets its own PNGs, every
    row points to its own file, and a rerun finds them all done (nothing sampled or written again)."""
    import dataclasses

    from psr.data.manifest import read_manifest, write_manifest

    src, _ = first_run
    shutil.copytree(src / "data", tmp_path / "data")
    samples = read_manifest(tmp_path / "data/manifest.jsonl")[:3]
    ids = ["x/1", "x_1", "x?1"]
    manifest = write_manifest(
        tmp_path / "data/collide.jsonl",
        [dataclasses.replace(s, id=rid) for s, rid in zip(samples, ids, strict=True)],
    )
    run_dir = tmp_path / "run"
    over = ("data=manifest", f"data.manifest={manifest}", "data.heldout=0")
    rows = evaluate(run_dir, *over)
    assert [(r["id"], r["sample"]) for r in rows] == [(rid, k) for rid in ids for k in range(2)]
    assert len({r["image"] for r in rows}) == 6
    assert len(list((run_dir / "samples").glob("*.png"))) == 6
    for r in rows:  # each file holds its own sample: the pixels its score was computed on
        assert pixels(run_dir, r).shape == (32, 32, 3)
    from psr.evaluate import image_name

    assert image_name("x_1", 0) == "x_1_0.png"  # ids that need no replacing keep their plain names
    assert image_name("x/1", 0) == image_name("x/1", 0) != image_name("x?1", 0)
    stamps = {r["image"]: (run_dir / r["image"]).stat().st_mtime_ns for r in rows}
    assert evaluate(run_dir, *over) == rows  # resume: every sample found done
    assert {r["image"]: (run_dir / r["image"]).stat().st_mtime_ns for r in rows} == stamps
