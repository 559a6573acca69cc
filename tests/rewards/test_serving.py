"""Rewards beside the rollout (rewards/serving.py): a background thread and spawn-started worker
processes return exactly what the reward returns in turn (every key, NaN, order), and a reward that
raises, dies, hangs or draws from the global RNG is a clear error, never a hang.

Worker processes import torch (seconds each on a busy machine): the tests share one pool of two
workers (module scope) and start three more, each for what only it can show. The rewards below are
importable by those processes as ``tests.rewards.test_serving.<name>`` (the checkout on sys.path).
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from torch import Tensor

from rewards.base import RewardInputs, Subject, WeightedReward
from rewards.color import ColorReward


class ScriptedReward:
    """The colour reward (mean and std: "score" and "spread") steered by the batch's first prompt:
    ``sleep=S`` sleeps S seconds first, ``raise`` raises, ``exit=N`` ends the process with code N,
    ``rng`` draws from torch's global RNG. Records the thread settings it ran under."""

    def __init__(self) -> None:
        self.mean, self.spread = ColorReward(), ColorReward(use_std=True)
        self.seen: list[tuple[int, bool]] = []

    def __call__(self, images: Tensor, inputs: RewardInputs) -> dict[str, Tensor]:
        self.seen.append((torch.get_num_threads(), torch.is_grad_enabled()))
        command = inputs.prompts[0]
        if command.startswith("sleep="):
            time.sleep(float(command[6:]))
        elif command == "raise":
            raise ValueError("the judge could not parse its own answer")
        elif command.startswith("exit="):
            os._exit(int(command[5:]))
        elif command == "rng":
            torch.rand(1)
        return {"score": self.mean(images, inputs)["score"], "spread": self.spread(images, inputs)["score"]}


def scripted_weighted() -> WeightedReward:
    """Two scripted rewards combined: keys ``a/score``, ``a/spread``, ``b/...``, ``score``."""
    return WeightedReward({"a": ScriptedReward(), "b": ScriptedReward()}, {"a": 0.25, "b": 0.75})


SCRIPTED = {"_target_": "tests.rewards.test_serving.scripted_weighted"}


def batch(command: str, seed: int, b: int = 3) -> tuple[Tensor, RewardInputs]:
    """``b`` images; the last sample has no reference, so every colour score is NaN there."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, 16, 16, generator=g)
    ref = torch.rand(3, 8, 12, generator=g)
    refs = [[ref] for _ in range(b - 1)] + [[]]
    subjects = [[Subject("corgi", "dog")] for _ in range(b - 1)] + [[]]
    return images, RewardInputs([command] * b, refs, subjects)


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Equal dtype, shape and bits (NaN included: ``torch.equal`` calls NaN unequal to itself)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def reference(batches: list[tuple[Tensor, RewardInputs]]) -> dict[str, Tensor]:
    """The reward called on each batch in turn, in this thread, its outputs concatenated per key."""
    reward = scripted_weighted()
    outs = [reward(*b) for b in batches]
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


@pytest.fixture(scope="module")
def pool():
    from rewards.serving import RewardWorkers

    workers = RewardWorkers(SCRIPTED, ["cpu"], workers=2, timeout=120)
    yield workers
    workers.close()
    assert not any(p.is_alive() for p in workers._procs)


# ---------------------------------------------------------------------------------------------- results


def test_packing_keeps_every_bit_of_every_dtype():
    from rewards.serving import _pack, _pack_inputs, _unpack, _unpack_inputs

    for t in (
        torch.randn(2, 3, 5).to(torch.bfloat16),
        torch.tensor([1.0, float("nan"), -0.0, float("inf")]),
        torch.tensor([[True, False]]),
        torch.arange(6, dtype=torch.int64).reshape(3, 2)[:, 1],  # not contiguous
        torch.tensor(3.5, dtype=torch.float64),  # 0-dim
        torch.empty(0, 4),
    ):
        back = _unpack(_pack(t))
        assert back.dtype == t.dtype and back.shape == t.shape
        assert torch.equal(back.reshape(-1).view(torch.uint8), t.contiguous().reshape(-1).view(torch.uint8))
    _, inputs = batch("x", 0, b=4)
    back = _unpack_inputs(_pack_inputs(inputs))
    assert back.prompts == inputs.prompts and back.subjects == inputs.subjects
    assert [len(r) for r in back.references] == [1, 1, 1, 0]
    assert back.references[0][0] is back.references[1][0]  # one shared reference travels once
    assert torch.equal(back.references[2][0], inputs.references[2][0])


def test_the_thread_returns_exactly_the_in_process_result_in_order():
    from rewards.serving import ThreadedRewards, concat_scores

    batches = [batch("sleep=0.2" if i == 0 else "x", seed=i) for i in range(4)]
    expected = reference(batches)
    assert set(expected) == {"score", "a/score", "a/spread", "b/score", "b/spread"}
    assert torch.isnan(expected["score"][2]) and not torch.isnan(expected["score"][0])
    threaded = ThreadedRewards(scripted_weighted())
    try:
        got = concat_scores([threaded.submit(*b) for b in batches], "cpu")
    finally:
        threaded.close()
    assert got.keys() == expected.keys()
    for key in expected:
        assert same_bits(got[key], expected[key]), key
    assert not threaded._thread.is_alive()


def test_the_thread_keeps_the_callers_torch_settings():
    """One intra-op thread (the tests' setting; a new thread would otherwise take one per core) and
    no gradients, as in the caller's sequential path."""
    from rewards.serving import ThreadedRewards

    assert torch.get_num_threads() == 1 and torch.is_grad_enabled()
    reward = ScriptedReward()
    threaded = ThreadedRewards(reward)
    try:
        threaded.submit(*batch("x", 0)).result()
    finally:
        threaded.close()
    assert reward.seen == [(1, False)]


def test_workers_return_exactly_the_in_process_result_in_order(pool):
    """Batch 0 sleeps on worker 0 while worker 1 answers batches 1 and 3 first."""
    from rewards.serving import concat_scores

    batches = [batch("sleep=0.5" if i == 0 else "x", seed=10 + i) for i in range(4)]
    expected = reference(batches)
    pending = [pool.submit(*b) for b in batches]
    got = concat_scores(pending, "cpu")
    assert got.keys() == expected.keys()
    for key in expected:
        assert same_bits(got[key], expected[key]), key
    assert pending[0].seconds >= 0.5 > pending[1].seconds  # measured where the reward ran
    assert pool.weights == {"a": 0.25, "b": 0.75}  # read by the trainer (GRPO's per-reward weights)
    assert same_bits(pool(*batches[1])["score"], expected["score"][3:6])  # also a plain Reward


def test_different_keys_for_different_batches_are_refused():
    from rewards.serving import InlineRewards, concat_scores

    calls = iter([{"score": torch.zeros(2), "extra": torch.ones(2)}, {"score": torch.zeros(2)}])
    rewards = InlineRewards(lambda images, inputs: next(calls))
    with pytest.raises(
        ValueError, match=r"keys \['extra', 'score'\] for batch 0 but \['score'\] for batch 1"
    ):
        concat_scores([rewards.submit(*batch("x", 0, b=2)) for _ in range(2)], "cpu")


# ---------------------------------------------------------------------------------------------- failures


def test_a_reward_error_in_the_thread_is_raised_as_is():
    from rewards.serving import ThreadedRewards

    threaded = ThreadedRewards(scripted_weighted())
    try:
        ok, bad = threaded.submit(*batch("x", 0)), threaded.submit(*batch("raise", 1))
        assert ok.result()["score"].shape == (3,)
        with pytest.raises(ValueError, match="could not parse its own answer"):
            bad.result()
    finally:
        threaded.close()


def test_a_worker_error_names_the_reward_the_worker_and_its_traceback(pool):
    from rewards.serving import RewardWorkerError

    first, failing = pool.submit(*batch("x", 0)), pool.submit(*batch("raise", 1))
    with pytest.raises(RewardWorkerError) as err:
        failing.result()
    message = str(err.value)
    assert "reward tests.rewards.test_serving.scripted_weighted: worker " in message
    assert "raised while scoring batch" in message and "device cpu" in message
    assert "ValueError: the judge could not parse its own answer" in message  # the worker's traceback
    assert "in __call__" in message
    assert first.result()["score"].shape == (3,)  # the worker lives on; other batches are kept
    assert pool(*batch("x", 2))["score"].shape == (3,)


def test_a_reward_drawing_from_the_global_rng_is_refused_beside_the_rollout(pool):
    from rewards.serving import RewardWorkerError, ThreadedRewards

    threaded = ThreadedRewards(scripted_weighted())
    try:
        with pytest.raises(RuntimeError, match=r"global RNG moved .*interleave.* own torch\.Generator"):
            threaded.submit(*batch("rng", 0)).result()
    finally:
        threaded.close()
    with pytest.raises(RewardWorkerError, match=r"(?s)worker \d.*global RNG moved.*would not resume"):
        pool(*batch("rng", 0))


def test_a_worker_that_dies_or_hangs_is_an_error_naming_it_and_how(pool):
    """Worker 0 sleeps past the timeout, then is killed; worker 1 exits with code 3 mid-batch."""
    from rewards.serving import RewardWorkerError, RewardWorkers

    workers = RewardWorkers(SCRIPTED, ["cpu"], workers=2, timeout=1.0)
    try:
        hanging, exiting = workers.submit(*batch("sleep=60", 0)), workers.submit(*batch("exit=3", 1))
        start = time.monotonic()
        with pytest.raises(
            RewardWorkerError, match=r"worker 0 .* no answer within 1 s .*reward_serving\.timeout"
        ):
            hanging.result()
        with pytest.raises(
            RewardWorkerError, match=r"worker 1 \(pid \d+, device cpu\) died .*\(exit code 3\)"
        ):
            exiting.result()
        os.kill(workers.pids[0], signal.SIGKILL)
        with pytest.raises(RewardWorkerError, match=r"worker 0 .* died .*killed by signal 9"):
            workers(*batch("x", 2))
        assert time.monotonic() - start < 30  # never waits for the 60 s batch
    finally:
        workers.close(wait=2.0)
    assert not any(p.is_alive() for p in workers._procs)


def test_a_reward_that_cannot_be_built_fails_at_start_with_the_workers_traceback():
    from rewards.serving import RewardWorkerError, RewardWorkers

    with pytest.raises(RewardWorkerError, match=r"(?s)could not build the reward.*use_stdd"):
        RewardWorkers({"_target_": "rewards.color.ColorReward", "use_stdd": True}, ["cpu"], workers=1)


def test_the_thread_stops_when_the_loop_is_interrupted():
    from rewards.serving import serve

    reward = scripted_weighted()
    with pytest.raises(KeyboardInterrupt), serve(reward, overlap=True) as rewards:
        rewards.submit(*batch("sleep=0.2", 0))
        raise KeyboardInterrupt
    assert not rewards._thread.is_alive()  # type: ignore[attr-defined]  # joined after its batch


def test_a_thread_result_past_the_timeout_is_an_error():
    from rewards.serving import ThreadedRewards

    threaded = ThreadedRewards(scripted_weighted(), timeout=0.05)
    try:
        with pytest.raises(TimeoutError, match=r"within 0\.05 s \(reward_serving\.timeout\)"):
            threaded.submit(*batch("sleep=1", 0)).result()
    finally:
        threaded.close(wait=0.0)


# ---------------------------------------------------------------------------------------------- choices


@pytest.mark.parametrize(
    ("has_device", "device", "workers", "trainer", "expected"),
    [
        (True, "cuda:0", 0, "cuda:0", False),  # models on the policy's GPU, in its process
        (True, "cuda", 0, "cuda:0", False),  # the same GPU, named without an index
        (True, "cuda:1", 0, "cuda:0", True),  # a GPU kept for the reward
        (True, "cpu", 0, "cuda:0", True),
        (True, "cpu", 0, "cpu", True),  # CPU rollout and CPU reward: threads on other cores
        (False, "cuda:0", 0, "cuda:0", True),  # no models (a judge server's client, colour)
        (True, "cuda:0", 1, "cuda:0", True),  # another process
        (True, ("cuda:0",), 0, "cuda:0", False),  # a list of one
    ],
)
def test_overlap_by_default(has_device, device, workers, trainer, expected):
    from rewards.serving import overlap_by_default

    node = (
        {"_target_": "x", "judge": {"device": "cpu"}} if has_device else {"_target_": "x", "url": "http://j"}
    )
    assert overlap_by_default(node, device, workers, trainer) is expected


def test_a_served_judge_beside_a_gpu_reward_is_judged_by_the_gpu_reward():
    """A server client's ``device`` key (backend: openai) holds no model; a sibling's does."""
    from rewards.serving import overlap_by_default

    client = {"_target_": "rewards.judge.VLMJudge", "backend": "openai", "device": "cuda:0"}
    assert overlap_by_default({"_target_": "w", "rewards": {"j": client}}, "cuda:0", 0, "cuda:0") is True
    local = {"_target_": "hps", "device": "cuda:0"}
    both = {"_target_": "w", "rewards": {"j": client, "p": local}}
    assert overlap_by_default(both, "cuda:0", 0, "cuda:0") is False


def test_workers_take_the_listed_devices_in_turn_across_ranks():
    """Rank r's worker k: entry (r * workers + k) mod len (the trainer passes first = rank * workers)."""
    from rewards.serving import worker_devices

    gpus = ["cuda:6", "cuda:7"]
    assert [worker_devices(gpus, 1, first=rank)[0] for rank in range(4)] == ["cuda:6", "cuda:7"] * 2
    assert worker_devices(gpus, 3, first=2 * 3) == ["cuda:6", "cuda:7", "cuda:6"]
    assert worker_devices(["cpu"], 2) == ["cpu", "cpu"]


def test_a_device_list_needs_workers():
    from rewards.serving import build_served_reward

    with pytest.raises(ValueError, match=r"one device; set reward_serving\.workers=2"):
        build_served_reward({"_target_": "rewards.color.ColorReward"}, ["cuda:1", "cuda:2"], workers=0)
