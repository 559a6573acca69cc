"""Two processes (``torchrun --nproc_per_node 2``, gloo, CPU) against one: same global batch, same
parameters; checkpoints written by two processes resume on one (and on two, in the worker).

Tolerance 1e-6: the two half-batch gradients are averaged by an all-reduce instead of summed in one
backward; measured differences are ~1e-8.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_cases import OPTIM, make_data, make_model, train_steps, trainable
from safetensors.torch import load_file

from psr import checkpoint as ckpt
from psr.distributed import free_port
from psr.engine import DeepSpeedEngine, TorchEngine

TOL = dict(rtol=1e-6, atol=1e-6)
WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_"))
    }
    # an empty extensions directory: test_no_extension_was_compiled checks it stays empty
    ext_dir = out / "torch_extensions"
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(Path(__file__).resolve().parents[2]),
        TORCH_EXTENSIONS_DIR=str(ext_dir),
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(WORKER),
        str(out),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, (
        f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    )
    return out


def _reference(steps: int) -> TorchEngine:
    """One process, the whole global batch: 4 micro-batches of 2 (each rank ran 2 of them)."""
    model = make_model()
    engine = TorchEngine()
    engine.setup(model, trainable(model), **OPTIM)
    engine.stats = train_steps(engine, *make_data(8), steps=steps, micro=4)
    return engine


def test_two_processes_match_one(two_process_run: Path) -> None:
    reports = [json.loads((two_process_run / f"rank{r}.json").read_text()) for r in (0, 1)]
    ref = _reference(steps=2)
    expected_weights = ref.trainable_state_dict()
    for name in ("torch", "ds_zero2", "ds_zero3"):
        got = reports[0][name]
        assert got["grad_norm"] == pytest.approx([s["grad_norm"] for s in ref.stats], rel=1e-6)
        assert got["global_loss"] == pytest.approx([s["loss"] for s in ref.stats], rel=1e-6)
        assert reports[1][name]["grad_norm"] == got["grad_norm"]  # every rank sees the global norm
        if name == "ds_zero3":
            continue  # compared after its third step below
        weights = load_file(str(two_process_run / name / "step_00000002" / ckpt.WEIGHTS))
        for n, t in expected_weights.items():
            torch.testing.assert_close(weights[n], t, **TOL)


@pytest.mark.parametrize("stage", [2, 3])
def test_dropped_nonfinite_backward_leaves_no_trace(two_process_run: Path, stage: int) -> None:
    """Rank 1 ran a NaN backward that both ranks dropped (zero_grad): the next two steps are those of
    a run that never saw it, on both ranks."""
    ref = _reference(steps=2)
    expected = ref.trainable_state_dict()
    for r in (0, 1):
        got = json.loads((two_process_run / f"rank{r}.json").read_text())[f"nan_then_clean_zero{stage}"]
        assert got["grad_norm"] == pytest.approx([s["grad_norm"] for s in ref.stats], rel=1e-6)
        for n, t in expected.items():
            torch.testing.assert_close(torch.tensor(got["weights"][n]), t, **TOL)


def test_zero3_uneven_gathered_rollouts_then_training(two_process_run: Path) -> None:
    """Rank 0 ran one gathered forward, rank 1 three; no hang, and step 3 still matches 1 process."""
    expected = _reference(steps=3).trainable_state_dict()
    for r in (0, 1):
        got = json.loads((two_process_run / f"rank{r}.json").read_text())["ds_zero3"]["step3_weights"]
        for n, t in expected.items():
            torch.testing.assert_close(torch.tensor(got[n]), t, **TOL)


def test_two_process_checkpoint_resumes_on_two_and_on_one(two_process_run: Path, ds_env: None) -> None:
    expected = _reference(steps=3).trainable_state_dict()
    on_two = load_file(str(two_process_run / "resumed_on_2.safetensors"))
    for n, t in expected.items():
        torch.testing.assert_close(on_two[n], t, **TOL)
    for name in ("torch", "ds_zero2"):
        path = ckpt.resolve_resume("auto", two_process_run / name)
        state = ckpt.load_checkpoint(path, rank=0)
        assert state["meta"]["world_size"] == 2 and sorted(p.name for p in (path / "rng").iterdir()) == [
            "rank_00000.pt",
            "rank_00001.pt",
        ]
        for engine in (TorchEngine(), DeepSpeedEngine(stage=2, precision="fp32")):
            model = make_model()
            engine.setup(model, trainable(model), **OPTIM)
            engine.load_trainable_state_dict(state["trainable"])
            engine.load_state_dict(state["training_state"]["engine"])
            train_steps(engine, *make_data(8), steps=1, micro=4)
            for n, t in expected.items():
                torch.testing.assert_close(engine.trainable_state_dict()[n], t, **TOL)


def test_collectives_and_preemption_agreement(two_process_run: Path) -> None:
    reports = [json.loads((two_process_run / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rep in reports:
        assert rep["gathered"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]  # 1 row from rank 0, 2 from rank 1
        assert rep["objects"] == [{"rank": 0}, {"rank": 1}]
        assert rep["agreed"] and rep["has_rng"]
    assert [rep["local_flag"] for rep in reports] == [False, True]  # only rank 1 got the signal


_GROUP_THREADS = """
import os, torch
from psr import distributed
distributed.init_distributed("gloo", force=True)
torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=1.0)  # the first optimizer imports torch._dynamo
distributed.destroy()
print(sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux /proc")
def test_destroy_ends_the_group_threads() -> None:
    """After destroy() no gloo thread is left running into interpreter teardown (where they can abort it)."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "SLURM_"))
    }
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    done = subprocess.run(
        [sys.executable, "-c", _GROUP_THREADS], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    threads = done.stdout.strip().splitlines()[-1]
    assert "gloo" not in threads, threads
