"""Run by ``torchrun --nproc_per_node 2`` from test_engine_multiprocess.py (gloo, CPU).

Each rank trains on its half of the global batch with TorchEngine (data parallel), DeepSpeed
ZeRO-2 and ZeRO-3 (with uneven numbers of gathered rollout forwards per rank, and a NaN backward on
one rank that every rank drops), saves a 2-process
checkpoint of the first two, resumes the ZeRO-2 one on 2 processes for
one more step, and exercises the collectives and the preemption agreement. Results go to
``OUT/<engine>/...`` (checkpoints) and ``OUT/rank<r>.json``.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine_cases import OPTIM, loss_fn, make_data, make_model, train_steps, trainable  # noqa: E402

from psr import checkpoint as ckpt  # noqa: E402
from psr import distributed  # noqa: E402
from psr.engine import DeepSpeedEngine, TorchEngine  # noqa: E402
from psr.preemption import PreemptionHandler  # noqa: E402


def build(name: str):
    if name == "torch":
        engine = TorchEngine(backend="gloo")
    else:  # threshold 0: ZeRO-3 really partitions these tiny weights
        engine = DeepSpeedEngine(
            stage=int(name[-1]), precision="fp32", backend="gloo", zero3_persistence_threshold=0
        )
    model = make_model()
    engine.setup(model, trainable(model), **OPTIM)
    return engine


def main(out: Path) -> None:
    torch.set_num_threads(1)
    x, y = make_data(8)
    report: dict = {}
    owner = None
    for name in ("torch", "ds_zero2", "ds_zero3"):
        engine = build(name)
        owner = owner or engine
        rank, world = engine.rank, engine.world_size
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]  # this rank's half of the global batch
        stats = train_steps(engine, xs, ys, steps=2, micro=2)
        report[name] = {
            "grad_norm": [s["grad_norm"] for s in stats],
            "global_loss": [float(engine.all_reduce_mean(torch.tensor(s["loss"]))) for s in stats],
        }
        if name == "ds_zero3":
            # rollouts: rank r runs r + 1 forwards inside the gathered block, no collective inside,
            # so uneven counts must not hang; then training goes on (the test compares step 3)
            with torch.no_grad(), engine.gathered_parameters() as module:
                for _ in range(rank + 1):
                    module(xs)
            stats += train_steps(engine, xs, ys, steps=1, micro=2)
            report[name]["step3_weights"] = {k: v.tolist() for k, v in engine.trainable_state_dict().items()}
            continue
        ckpt.save_checkpoint(
            out / name,
            2,
            trainable=engine.trainable_state_dict(),
            training_state={"engine": engine.state_dict()},
            data_state={"rank_batches": world},
            rank=rank,
            world_size=world,
            barrier=engine.barrier,
        )
    # a non-finite backward on rank 1 only, then zero_grad() on every rank (what the RL objectives do
    # when any rank saw a NaN): the dropped gradients must not leak into the next, clean steps
    for stage in (2, 3):
        engine = build(f"ds_zero{stage}")
        xs, ys = x.chunk(2)[rank], y.chunk(2)[rank]
        with engine.autocast():
            loss = loss_fn(engine.unwrap(), xs, ys)
        engine.backward(loss * (float("nan") if rank == 1 else 1.0))
        engine.zero_grad()
        stats = train_steps(engine, xs, ys, steps=2, micro=2)
        report[f"nan_then_clean_zero{stage}"] = {
            "grad_norm": [s["grad_norm"] for s in stats],
            "weights": {k: v.tolist() for k, v in engine.trainable_state_dict().items()},
        }
    # resume the 2-process ZeRO-2 checkpoint on 2 processes and take one more step
    resumed = build("ds_zero2")
    state = ckpt.load_checkpoint(out / "ds_zero2" / "step_00000002", rank=resumed.rank)
    resumed.load_trainable_state_dict(state["trainable"])
    resumed.load_state_dict(state["training_state"]["engine"])
    rank = resumed.rank
    train_steps(resumed, x.chunk(2)[rank], y.chunk(2)[rank], steps=1, micro=2)
    weights = resumed.trainable_state_dict()
    if rank == 0:
        from safetensors.torch import save_file

        save_file(weights, str(out / "resumed_on_2.safetensors"))
    # collectives: uneven all-gather, objects, and the preemption flag agreed across ranks
    report["gathered"] = distributed.all_gather_tensor(torch.full((rank + 1, 2), float(rank))).tolist()
    report["objects"] = distributed.all_gather_object({"rank": rank})
    report["has_rng"] = state["rng"] is not None
    with PreemptionHandler() as handler:
        if rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        distributed.barrier()
        report["local_flag"] = handler.signal_name == "SIGUSR1"
        report["agreed"] = handler.poll()
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    owner.cleanup()


if __name__ == "__main__":
    faulthandler.enable()  # a crash anywhere prints every thread's Python stack into the test's report
    main(Path(sys.argv[1]))
    # Leave without interpreter teardown: the gloo groups that DeepSpeed's engines used still have their
    # C++ threads running here (6 after cleanup(), measured), and on rare runs the teardown then aborts
    # ("terminate called without an active exception", SIGABRT) after all the work above is done and
    # written. The process group itself was left by cleanup().
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
