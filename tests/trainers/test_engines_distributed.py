"""psr-rl and psr-sft under DeepSpeed ZeRO-2 and ZeRO-3 on 2 processes (``torchrun``, gloo, CPU, fp32)
against 1 process of the same engine with the same global batch: every logged metric of every step,
and the final trainable weights.

Same global batch: psr-rl 1 process x 2 prompt groups vs 2 x 1; psr-sft 1 process x 2 micro-batches
of accumulation vs 2 x 1 (rank r takes the batch one process takes as micro-batch r, and draws its
noise: psr-sft keys it by the micro-batch's index in the global batch).

Two steps: the second step's rollouts, losses and gradients come from weights the first update
changed, so "every step" compares after a real update; psr-sft also validates before training and
after the last step (held-out records split over the ranks, under ZeRO-3's gathered weights).

The psr-rl ZeRO-3 pair also runs a rank with no work: the reward is constant for records with 3
subjects (:mod:`zero_variance_reward`), and the seed is chosen so that rank 1 draws only those, at
every step. Its groups have zero variance for real; it must still run the padded forwards (ZeRO-3
gathers parameters in each) and the optimizer steps, rank 0 must update, and the metrics must be
those of the one process that holds both groups.

Tolerances, measured on 2 CPU cores: gradients are averaged by an all-reduce (and ZeRO partitions
flatten and reduce them in buckets) instead of summed in one backward, so values differ by rounding.
Largest relative metric difference / weight difference measured: psr-rl ZeRO-2 1.1e-6 / 2.1e-7,
psr-rl ZeRO-3 (rank 1 idle: rank 0 computes what one process does) 1.4e-16 / 0, psr-sft ZeRO-2
8.0e-7 / 0, psr-sft ZeRO-3 8.0e-7 / 0 (``pytest -s`` prints them). Asserted: metrics rel 1e-5
(abs 1e-7 near 0), weights rtol 1e-5, atol 1e-6. Metrics that differ between the runs by
construction are not compared: ``time`` and ``time/*``.

Cost: about a minute per configuration on 2 CPU cores, almost all of it the start of 3 processes
(imports, the tiny model, DeepSpeed's initialization); the steps themselves take about a second.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from trainer_helpers import launch, run_cli

RL = [
    "experiment=quickstart",
    "data.num_records=6",
    "data.heldout=2",
    "data.image_size=32",
    "train.resolution=32",
    "train.group_size=4",
    "train.micro_batch_size=2",
    "train.steps=2",
    "train.eval_every=2",  # 2 held-out prompts: one per rank, under the ZeRO-3 gathered weights
    "train.eval_prompts=2",
    "train.grid_every=0",
    "train.checkpoint_every=1",
    "train.export_lora=false",
    "sampler.num_steps=4",
    "optim.grad_clip=null",
    "engine.precision=fp32",
]
ZERO_VARIANCE_REWARD = [
    "reward._target_=tests.trainers.zero_variance_reward.ColourOrConstant",
    "+reward.constant_for_subjects=3",
]
SFT = [
    "data=synthetic",
    "data.num_records=6",
    "data.heldout=2",
    "data.image_size=32",
    "dataset.resolution=32",
    "train.micro_batch_size=2",
    "train.steps=2",
    "train.lora.rank=4",
    "train.lora.alpha=4",
    "train.checkpoint_every=2",
    "train.export_lora=false",
    "loader.num_workers=0",
    "validation.every=2",  # steps 0 and 2: before and after training, split 1 + 1 over the ranks
    "validation.records=2",
    "validation.num_steps=3",
    "optim.lr=1e-3",
    "engine.precision=fp32",
]
REL, ABS = 1e-5, 1e-7
WEIGHTS = dict(rtol=1e-5, atol=1e-6)


def _rank_one_gets_only_three_subjects(run_dir: Path) -> int:
    """A ``seed`` for which the 2-process run gives rank 1 only 3-subject records and rank 0 only
    2-subject ones at both steps (the synthetic records of RL's data settings, data.seed 0)."""
    from psr.data.dataset import BatchStream
    from psr.data.manifest import read_manifest
    from psr.data.synthetic import write_synthetic_manifest

    samples = read_manifest(write_synthetic_manifest(run_dir, num_records=6, image_size=32, seed=0))
    subjects = [len(s.subjects) for s in samples[:4]]  # the 4 training records
    for seed in range(200):
        draws = [BatchStream(4, prompts_per_step=1, rank=r, world_size=2, seed=seed) for r in (0, 1)]
        got = [[subjects[g.next_indices()[0]] for _ in range(2)] for g in draws]
        if got == [[2, 2], [3, 3]]:
            return seed
    raise AssertionError(f"no seed below 200 splits the records {subjects} by subject count")


CONFIGS = ("rl-ds_zero2", "rl-ds_zero3", "sft-ds_zero2", "sft-ds_zero3")


@pytest.fixture(scope="module", params=CONFIGS)
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One configuration run by 1 process (``<root>/1``) and by 2 (``<root>/2``), through the console
    scripts. DeepSpeed must build no op: an empty extensions directory."""
    trainer, engine = request.param.split("-")
    root = tmp_path_factory.mktemp(request.param, numbered=False)
    ext_dir = root / "torch_extensions"
    for nproc in (1, 2):
        if trainer == "rl":
            args = [*RL, f"engine={engine}", f"train.prompts_per_step={2 // nproc}"]
            if engine == "ds_zero3":
                args += [*ZERO_VARIANCE_REWARD, f"seed={_rank_one_gets_only_three_subjects(root / 'probe')}"]
        else:
            args = [*SFT, f"engine={engine}", f"train.grad_accum={2 // nproc}"]
        # a collective that waits forever fails the test at the timeout instead of blocking it
        cmd = launch(f"psr-{trainer}", nproc, [*args, f"hydra.run.dir={root / str(nproc)}"])
        run_cli(cmd, timeout=600, env={"TORCH_EXTENSIONS_DIR": str(ext_dir)})
    assert not any(ext_dir.rglob("*.so")), "DeepSpeed compiled an op"
    return root


def _metrics(run_dir: Path) -> dict[int, dict[str, Any]]:
    """``step -> {key: value}`` of metrics.jsonl, without the wall-clock entries."""
    out: dict[int, dict[str, Any]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec["step"], {}).update(
            {k: v for k, v in rec.items() if k not in ("step", "time") and not k.startswith("time/")}
        )
    return out


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(max((run_dir / "checkpoints").glob("step_*")) / "trainable.safetensors"))


def _close(a: Any, b: Any) -> bool:
    if a is None or b is None:  # null: NaN, a reward that applies to no sample
        return a is None and b is None
    return bool(b == pytest.approx(a, rel=REL, abs=ABS))


def test_every_step_matches_one_process(runs: Path) -> None:
    config = runs.name
    one, two = _metrics(runs / "1"), _metrics(runs / "2")
    expected_steps = [1, 2] if config.startswith("rl") else [0, 1, 2]  # SFT validates at step 0
    assert sorted(one) == sorted(two) == expected_steps
    for step in expected_steps:
        assert one[step].keys() == two[step].keys(), step
        wrong = {k: (one[step][k], two[step][k]) for k in one[step] if not _close(one[step][k], two[step][k])}
        assert not wrong, (step, wrong)
    worst = max(
        abs(two[s][k] - v) / max(abs(v), 1e-30)
        for s in expected_steps
        for k, v in one[s].items()
        if isinstance(v, float) and math.isfinite(v) and abs(v) > ABS
    )
    print(f"{config}: largest relative metric difference {worst:.2e}")


def test_final_weights_match_one_process(runs: Path) -> None:
    config = runs.name
    a, b = _final_weights(runs / "1"), _final_weights(runs / "2")
    assert a.keys() == b.keys()
    for name, t in a.items():
        torch.testing.assert_close(b[name], t, **WEIGHTS)
    worst = max(float((b[n] - t).abs().max()) for n, t in a.items())
    print(f"{config}: largest weight difference {worst:.2e}")
    # the runs trained (LoRA B starts at 0): the comparison is not between two untouched models
    assert any(float(t.abs().max()) > 0 for n, t in a.items() if "lora_B" in n)


@pytest.mark.parametrize("runs", ["rl-ds_zero3"], indirect=True)  # the run that holds the zero-variance rank
def test_a_rank_whose_groups_all_have_zero_variance(runs: Path) -> None:
    """psr-rl ZeRO-3 with rank 1's records all scoring a constant: the run finished (no collective
    waited forever: run_cli's timeout kills it otherwise), half the groups had zero variance at each
    step, and rank 0's groups still updated the weights at each step."""
    two = _metrics(runs / "2")
    for step in (1, 2):
        assert two[step]["adv/zero_var_frac"] == 0.5, step  # rank 1's group of each step
        assert "train/skipped_update" not in two[step] and two[step]["train/grad_norm"] > 0, step
    ckpts = sorted((runs / "2" / "checkpoints").glob("step_*"))
    assert [p.name for p in ckpts] == ["step_00000001", "step_00000002"]
    before, after = (load_file(str(p / "trainable.safetensors")) for p in ckpts)
    assert any(not torch.equal(after[n], t) for n, t in before.items()), "step 2 did not update"
