"""Checkpoints: exact resume, weights_only loading, atomic publish, pruning, resume resolution,
preemption signals."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from psr import checkpoint as ckpt
from psr.engine import TorchEngine


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _engine() -> TorchEngine:
    model = _model()
    engine = TorchEngine(ema_decay=0.9)
    engine.setup(
        model,
        list(model.parameters()),
        lr=1e-2,
        weight_decay=0.01,
        schedule="cosine",
        warmup_steps=2,
        total_steps=10,
        grad_clip=1.0,
    )
    return engine


def _step(engine: TorchEngine) -> float:
    """One step on a batch drawn from all three RNGs, so a resume is exact only if each is restored."""
    n = 4 + random.randrange(3)
    x = torch.randn(n, 4) + float(np.random.randn())
    loss = engine.unwrap()(x).pow(2).mean()
    engine.backward(loss)
    engine.step()
    return float(loss.detach())


def _save(engine: TorchEngine, root: Path, step: int, **kw) -> Path:
    return ckpt.save_checkpoint(
        root,
        step,
        trainable=engine.trainable_state_dict(),
        training_state={"engine": engine.state_dict(), "step": step},
        data_state={"position": step * 4, "order": torch.arange(5)},
        **kw,
    )


def _seed(s: int) -> None:
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path: Path) -> None:
    _seed(1)
    engine = _engine()
    for _ in range(2):
        _step(engine)
    path = _save(engine, tmp_path, 2)
    expected = [_step(engine) for _ in range(3)]

    _seed(12345)  # a fresh process: other seeds, other weights
    resumed = _engine()
    with torch.no_grad():
        for p in resumed.unwrap().parameters():
            p.mul_(-1.0)
    state = ckpt.load_checkpoint(ckpt.resolve_resume("auto", tmp_path))
    assert state["path"] == path and state["step"] == 2
    resumed.load_trainable_state_dict(state["trainable"])
    resumed.load_state_dict(state["training_state"]["engine"])
    ckpt.restore_rng(state["rng"])
    assert [_step(resumed) for _ in range(3)] == expected  # bit-identical
    assert state["data_state"]["position"] == 8 and torch.equal(state["data_state"]["order"], torch.arange(5))


def test_every_file_loads_with_weights_only(tmp_path: Path) -> None:
    engine = _engine()
    _step(engine)
    path = _save(engine, tmp_path, 1)
    for pt in path.rglob("*.pt"):
        torch.load(pt, map_location="cpu", weights_only=True)
    rng = torch.load(path / "rng" / "rank_00000.pt", weights_only=True)
    assert isinstance(rng["torch_cpu"], torch.Tensor) and rng["python_state"].shape == (625,)
    from safetensors.torch import load_file

    assert set(load_file(str(path / ckpt.WEIGHTS))) == {n for n, _ in engine.unwrap().named_parameters()}


def test_rng_round_trip_restores_python_numpy_torch() -> None:
    _seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.randn()
    state = ckpt.rng_state()
    expected = (random.random(), random.gauss(0, 1), float(np.random.randn()), torch.rand(3))
    _seed(99)
    ckpt.restore_rng(state)
    got = (random.random(), random.gauss(0, 1), float(np.random.randn()), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_incomplete_and_temp_dirs_are_ignored(tmp_path: Path) -> None:
    engine = _engine()
    _save(engine, tmp_path, 5)
    (tmp_path / "step_00000007").mkdir()  # killed before COMPLETE
    (tmp_path / ".tmp-step_00000009").mkdir()
    (tmp_path / ".tmp-step_00000009" / ckpt.COMPLETE).write_text("9")  # killed before the rename
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_00000005"
    assert ckpt.list_checkpoints(tmp_path) == [tmp_path / "step_00000005"]
    with pytest.raises(FileNotFoundError, match="COMPLETE"):
        ckpt.load_checkpoint(tmp_path / "step_00000007")


def test_a_save_that_dies_midway_publishes_nothing(tmp_path: Path) -> None:
    engine = _engine()
    _save(engine, tmp_path, 1)

    def broken_writer(path: Path) -> None:
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _save(engine, tmp_path, 2, extra_files={"lora/weights.bin": broken_writer})
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
    assert (tmp_path / ".tmp-step_00000002").exists()
    _save(engine, tmp_path, 3)  # the next save clears the leftovers
    assert not list(tmp_path.glob(".tmp-*"))


def test_keep_last_and_extra_files(tmp_path: Path) -> None:
    engine = _engine()
    for step in range(1, 6):
        _save(
            engine,
            tmp_path,
            step,
            keep_last=2,
            extra_files={"lora/readme.txt": lambda p: p.write_text("lora")},
        )
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    assert (tmp_path / "step_00000005" / "lora" / "readme.txt").read_text() == "lora"
    assert "lora/readme.txt" in ckpt.load_checkpoint(tmp_path / "step_00000005")["meta"]["files"]
    with pytest.raises(ValueError, match="extra_files"):
        _save(engine, tmp_path, 6, extra_files={"../escape": lambda p: None})
    with pytest.raises(ValueError, match="keep_last"):
        _save(engine, tmp_path, 6, keep_last=0)


def test_saving_the_same_step_again_replaces_it(tmp_path: Path) -> None:
    engine = _engine()
    _save(engine, tmp_path, 4)
    _step(engine)
    _save(engine, tmp_path, 4)
    saved = ckpt.load_checkpoint(tmp_path / "step_00000004")["trainable"]
    for name, tensor in engine.trainable_state_dict().items():
        assert torch.equal(saved[name], tensor)
    assert not list(tmp_path.glob(".old-*"))


@pytest.mark.parametrize("new_save_finished", [True, False])
def test_a_resave_killed_between_its_renames_is_recovered(tmp_path: Path, new_save_finished: bool) -> None:
    """A re-save of step 4 killed after moving the old directory aside and before publishing the new
    one leaves no step_00000004: the next start publishes the finished new save, or puts the old one
    back, and removes the leftovers (a real kill at that point, reproduced by making the renames)."""
    engine = _engine()
    _save(engine, tmp_path, 2)
    _save(engine, tmp_path, 4)
    before = ckpt.load_checkpoint(tmp_path / "step_00000004")["trainable"]
    _step(engine)
    _save(engine, tmp_path / "next", 4)  # the re-save's complete content, made aside
    after = ckpt.load_checkpoint(tmp_path / "next" / "step_00000004")["trainable"]
    os.replace(tmp_path / "step_00000004", tmp_path / ".old-step_00000004")
    os.replace(tmp_path / "next" / "step_00000004", tmp_path / ".tmp-step_00000004")
    if not new_save_finished:
        (tmp_path / ".tmp-step_00000004" / ckpt.COMPLETE).unlink()
    (tmp_path / ".tmp-step_00000006").mkdir()  # an unfinished save of a later step
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_00000002"  # step 4 is lost until recovered
    done = ckpt.recover_interrupted_saves(tmp_path)
    published = "the finished save" if new_save_finished else "the previous one"
    removed = [".tmp-step_00000006"] if new_save_finished else [".tmp-step_00000004", ".tmp-step_00000006"]
    assert done == [f"step_00000004: published {published}"] + [
        f"removed the unfinished {n}" for n in removed
    ]
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_00000004"
    got = ckpt.load_checkpoint(tmp_path / "step_00000004")["trainable"]
    expected = after if new_save_finished else before
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the two saves differ
    assert not [p.name for p in tmp_path.glob(".*-step_*")]


def test_resolve_resume(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    assert ckpt.resolve_resume("auto", root) is None  # first run: nothing yet
    assert ckpt.resolve_resume(None, root) is None and ckpt.resolve_resume("null", root) is None
    engine = _engine()
    first, second = _save(engine, root, 1), _save(engine, root, 2)
    assert ckpt.resolve_resume("auto", root) == second
    assert ckpt.resolve_resume(str(first), tmp_path / "elsewhere") == first
    assert ckpt.resolve_resume(str(root), tmp_path / "elsewhere") == second  # a root: its newest
    with pytest.raises(FileNotFoundError, match="resume="):
        ckpt.resolve_resume(str(tmp_path / "nope"), root)


@pytest.mark.parametrize("name", ["state.pt", "trainable.safetensors", "meta.json", "rng/rank_00000.pt"])
def test_a_truncated_file_is_named_and_resume_auto_falls_back(tmp_path: Path, name: str, capsys) -> None:
    from psr.resume import load_resume

    engine = _engine()
    _save(engine, tmp_path, 1)
    newest = _save(engine, tmp_path, 2)
    torn = newest / name
    torn.write_bytes(torn.read_bytes()[: max(1, torn.stat().st_size // 3)])
    with pytest.raises(ckpt.CorruptCheckpointError, match=rf"step_00000002/{name}: cannot be read"):
        ckpt.load_checkpoint(newest)
    with pytest.raises(ckpt.CorruptCheckpointError, match=name):  # named explicitly: an error
        load_resume(str(newest), tmp_path, "psr-test")
    assert load_resume("auto", tmp_path, "psr-test")["step"] == 1
    assert "falling back to the previous complete one" in capsys.readouterr().out
    (tmp_path / "step_00000001" / "state.pt").write_bytes(b"")
    with pytest.raises(ckpt.CorruptCheckpointError, match="no checkpoint .* can be read"):
        load_resume("auto", tmp_path, "psr-test")


def test_a_resumed_older_checkpoint_keeps_its_timeline(tmp_path: Path) -> None:
    """Resumed from step 6 while step 12 exists: step 12 is set aside (not pruned in place of the new
    ones, not picked by resume=auto / init_from), and keep_last prunes the resumed timeline only."""
    engine = _engine()
    six = _save(engine, tmp_path / "run" / "checkpoints", 6)
    _save(engine, tmp_path / "run" / "checkpoints", 12)
    root = tmp_path / "run" / "checkpoints"
    moved = ckpt.set_aside(root, six, "psr-test")
    assert [p.name.split("-")[-1] for p in moved] == ["step_00000012"] and (moved[0] / "COMPLETE").is_file()
    assert moved[0].parent == root / "abandoned"
    _save(engine, root, 8, keep_last=2)
    _save(engine, root, 10, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000008", "step_00000010"]
    assert ckpt.find_checkpoint(tmp_path / "run").name == "step_00000010"
    assert ckpt.resolve_resume("auto", root).name == "step_00000010"
    assert len(ckpt.set_aside(root, None, "psr-test")) == 2  # a fresh start: every earlier one
    assert ckpt.list_checkpoints(root) == [] and len(list((root / "abandoned").iterdir())) == 3


def test_a_fingerprint_tells_a_checkpoint_saved_again(tmp_path: Path) -> None:
    engine = _engine()
    path = _save(engine, tmp_path, 4)
    pinned = ckpt.checkpoint_fingerprint(path)
    assert pinned["step"] == 4 and ckpt.check_fingerprint(pinned, "this run") == path.resolve()
    _step(engine)
    _save(engine, tmp_path, 4)
    with pytest.raises(ValueError, match=r"this run was made from .*step_00000004.*has changed"):
        ckpt.check_fingerprint(pinned, "this run")
    shutil.rmtree(path)
    with pytest.raises(FileNotFoundError, match="no longer exists"):
        ckpt.check_fingerprint(pinned, "this run")


def test_config_changes_split_refused_and_allowed_keys() -> None:
    from psr.resume import config_changes

    old = {"seed": 0, "train": {"steps": 4, "lora": {"rank": 8}}, "logger": {"name": "jsonl"}}
    new = {"seed": 0, "train": {"steps": 8, "lora": {"rank": 4}}, "logger": {"name": "wandb"}, "x": 1}
    refused, allowed = config_changes(old, new)
    assert refused == ["train.lora.rank: 8 -> 4", "x: '<absent>' -> 1"]
    assert allowed == ["logger.name: 'jsonl' -> 'wandb'", "train.steps: 4 -> 8"]


def test_multi_rank_save_needs_a_barrier(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="barrier"):
        ckpt.save_checkpoint(tmp_path, 1, trainable={}, training_state={}, world_size=2)


def test_env_info_reads_srun_tasks_but_not_the_batch_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """``sbatch --ntasks=2`` gives its batch shell SLURM_PROCID=0 SLURM_NTASKS=2 without a step id:
    one process, not rank 0 of 2. Tasks of an ``srun`` step have SLURM_STEP_ID."""
    from psr.distributed import env_info

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    assert (env_info().rank, env_info().world_size) == (0, 1)
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert (env_info().rank, env_info().world_size, env_info().local_rank) == (1, 2, 1)
    monkeypatch.setenv("RANK", "3")  # torchrun's variables win
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert (env_info().rank, env_info().world_size) == (3, 4)
