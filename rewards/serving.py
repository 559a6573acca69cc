"""Rewards beside the rollout: on their own device, in a background thread or in worker processes.

A trainer scores each prompt group as soon as its images exist (:meth:`RewardService.submit`) and
collects the results, in submission order, once every group of the step is sampled
(:meth:`Pending.result`). Three services share that shape:

- :class:`InlineRewards`: the reward runs in the caller's thread when a result is asked for
  (the sequential path: rollout, then reward);
- :class:`ThreadedRewards`: one background thread scores groups in order while the caller samples
  the next ones (an in-process reward on another device, on the CPU, or a client of a judge server);
- :class:`RewardWorkers`: N spawn-started processes, each building the reward from its config on
  its own device, so a judge's memory never sits in the trainer's process. Images and inputs travel
  as plain data (dtype, shape, bytes); models never cross a pipe. Also a plain :class:`Reward`
  (a synchronous call).

Every service calls the reward once per submitted batch (a prompt group of G images), so the scores
are those of the same calls made in turn: overlap on and off give equal tensors. What that needs of
a reward (the contract of :mod:`rewards.base`): no state across calls and no draws from torch's
global RNG (a reward that samples owns a ``torch.Generator`` seeded from its inputs). Beside the
rollout, a draw from the global RNG would interleave with the trainer's by timing; both services
that run beside it check the CPU generator around every call and fail naming the reward.

Errors: an exception in the thread is raised by :meth:`Pending.result` as is; a worker's exception
comes back as :class:`RewardWorkerError` with the worker's traceback; a worker that dies (killed,
out of memory) or does not answer within ``timeout`` seconds is an error naming the reward, the
worker, its device and exit code. Workers ignore SIGINT, SIGTERM and SIGUSR1 (the trainer decides
when to stop: preemption saves first), and exit when asked (:meth:`RewardWorkers.close`), when the
trainer's process is gone, or at its exit (daemon processes).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import queue
import signal
import threading
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from rewards.base import Reward, RewardInputs, Subject, build_reward

__all__ = [
    "Pending",
    "RewardService",
    "InlineRewards",
    "ThreadedRewards",
    "RewardWorkers",
    "RewardWorkerError",
    "build_served_reward",
    "worker_devices",
    "overlap_by_default",
    "serve",
    "concat_scores",
]

_POLL_S = 0.2  # how often a waiting caller checks that a worker is alive


class RewardWorkerError(RuntimeError):
    """A reward worker raised, died, or did not answer in time; the message names the reward and the worker."""


class Pending(Protocol):
    """One submitted batch. ``result()`` blocks until its scores exist; ``seconds`` is then the reward's
    own compute time for it (where it ran), whether or not the caller waited for it."""

    seconds: float

    def result(self) -> dict[str, Tensor]: ...


class RewardService(Protocol):
    """Scores batches beside the caller: ``submit`` returns at once, results come back in order."""

    def submit(self, images: Tensor, inputs: RewardInputs) -> Pending: ...


def reward_name(reward: Any) -> str:
    return type(reward).__name__


_RNG_PROBLEM = {
    "thread": "beside the rollout, its draws would interleave with the trainer's by timing "
    "(or set reward_serving.overlap=false)",
    "worker": "in a worker process, its draws would not resume with the run (or set reward_serving.workers=0)",
}


def _call(
    reward: Reward, images: Tensor, inputs: RewardInputs, name: str, check_rng: str | None = None
) -> dict[str, Tensor]:
    """``reward(images, inputs)`` without gradients; with ``check_rng`` (``thread`` | ``worker``: where
    it runs), an error when torch's global CPU generator moved during the call."""
    before = torch.random.get_rng_state() if check_rng else None
    with torch.no_grad():
        out = reward(images, inputs)
    if check_rng and before is not None and not torch.equal(before, torch.random.get_rng_state()):
        raise RuntimeError(
            f"reward {name}: torch's global RNG moved while it scored; {_RNG_PROBLEM[check_rng]}. Give the "
            "reward its own torch.Generator, seeded from its inputs"
        )
    return out


# --------------------------------------------------------------------------------------- in process


class _Deferred:
    """A batch scored in the caller's thread when its result is first asked for."""

    def __init__(self, reward: Reward, images: Tensor, inputs: RewardInputs) -> None:
        self._job: tuple[Reward, Tensor, RewardInputs] | None = (reward, images, inputs)
        self._out: dict[str, Tensor] = {}
        self.seconds = 0.0

    def result(self) -> dict[str, Tensor]:
        if self._job is not None:
            reward, images, inputs = self._job
            start = time.perf_counter()
            self._out = _call(reward, images, inputs, reward_name(reward))
            self.seconds = time.perf_counter() - start
            self._job = None
        return self._out


class InlineRewards:
    """The sequential path: each batch is scored in the caller's thread by :meth:`Pending.result`."""

    def __init__(self, reward: Reward) -> None:
        self.reward = reward

    def submit(self, images: Tensor, inputs: RewardInputs) -> Pending:
        return _Deferred(self.reward, images, inputs)


class _Threaded:
    def __init__(self, future: Future, name: str, timeout: float | None) -> None:
        self._future, self._name, self._timeout = future, name, timeout
        self.seconds = 0.0

    def result(self) -> dict[str, Tensor]:
        try:
            out, self.seconds = self._future.result(timeout=self._timeout)
        except FutureTimeout:
            raise TimeoutError(
                f"reward {self._name}: no result from the reward thread within {self._timeout:g} s "
                "(reward_serving.timeout)"
            ) from None
        return out  # type: ignore[no-any-return]


class ThreadedRewards:
    """One background thread that scores submitted batches in order (daemon: never blocks exit).

    The thread runs without gradients, on the caller's current CUDA device, with torch's thread
    settings as they are (a new thread reads the process's intra-op thread count).

    Args:
        reward: the reward, already on its device.
        timeout: seconds :meth:`Pending.result` waits (None: no limit).
    """

    def __init__(self, reward: Reward, timeout: float | None = None) -> None:
        self.reward, self.timeout, self.name = reward, timeout, reward_name(reward)
        self._jobs: queue.SimpleQueue[tuple[Future, Tensor, RewardInputs] | None] = queue.SimpleQueue()
        cuda = (
            torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        )
        self._thread = threading.Thread(target=self._serve, args=(cuda,), name="psr-reward", daemon=True)
        self._thread.start()

    def _serve(self, cuda_device: int | None) -> None:
        if cuda_device is not None:
            torch.cuda.set_device(cuda_device)
        while (job := self._jobs.get()) is not None:
            future, images, inputs = job
            if not future.set_running_or_notify_cancel():
                continue
            start = time.perf_counter()
            try:
                out = _call(self.reward, images, inputs, self.name, check_rng="thread")
            except BaseException as err:  # noqa: BLE001 - handed to the trainer's thread, which raises it
                future.set_exception(err)
            else:
                future.set_result((out, time.perf_counter() - start))

    def submit(self, images: Tensor, inputs: RewardInputs) -> Pending:
        if not self._thread.is_alive():
            raise RuntimeError(f"reward {self.name}: the reward thread is closed")
        future: Future = Future()
        self._jobs.put((future, images, inputs))
        return _Threaded(future, self.name, self.timeout)

    def close(self, wait: float = 5.0) -> None:
        """Stop the thread after the batch it is scoring (waiting at most ``wait`` seconds); batches
        not started are cancelled."""
        while True:  # cancel what has not started
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        self._jobs.put(None)
        self._thread.join(timeout=wait)


# --------------------------------------------------------------------------------------- worker processes


def _pack(t: Tensor) -> tuple[str, tuple[int, ...], np.ndarray]:
    """A tensor as plain data: dtype name, shape, its bytes (any dtype, bfloat16 included)."""
    t = t.detach().to("cpu").contiguous()
    return str(t.dtype).removeprefix("torch."), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy()


def _unpack(packed: tuple[str, tuple[int, ...], np.ndarray]) -> Tensor:
    name, shape, data = packed
    dtype = getattr(torch, name)
    if data.size == 0:
        return torch.empty(shape, dtype=dtype)
    data = np.ascontiguousarray(data) if data.flags.writeable else data.copy()
    return torch.from_numpy(data).view(dtype).reshape(shape)


def _pack_inputs(inputs: RewardInputs) -> dict[str, Any]:
    """Prompts, subjects and references as plain data; a reference shared by samples travels once."""
    tensors: list[tuple[str, tuple[int, ...], np.ndarray]] = []
    index: dict[int, int] = {}
    references = []
    for refs in inputs.references:
        row = []
        for ref in refs:
            if id(ref) not in index:
                index[id(ref)] = len(tensors)
                tensors.append(_pack(ref))
            row.append(index[id(ref)])
        references.append(row)
    subjects = [[(s.name, s.category) for s in subs] for subs in inputs.subjects]
    return {
        "prompts": list(inputs.prompts),
        "subjects": subjects,
        "references": references,
        "tensors": tensors,
    }


def _unpack_inputs(data: Mapping[str, Any]) -> RewardInputs:
    tensors = [_unpack(t) for t in data["tensors"]]
    return RewardInputs(
        prompts=list(data["prompts"]),
        references=[[tensors[i] for i in row] for row in data["references"]],
        subjects=[[Subject(n, c) for n, c in subs] for subs in data["subjects"]],
    )


def _torch_settings() -> dict[str, Any]:
    """The numerics settings a worker copies from the trainer, so it computes what the trainer would."""
    return {
        "num_threads": torch.get_num_threads(),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }


def _worker(
    node: dict[str, Any], device: str, settings: dict[str, Any], requests: Any, responses: Any
) -> None:  # pragma: no cover - runs in the spawned process (its behaviour is tested from outside)
    """A worker's life: build the reward, then answer ``(seq, images, inputs)`` requests in order."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)  # the trainer stops it (after a preemption checkpoint)
    torch.set_num_threads(settings["num_threads"])
    torch.set_float32_matmul_precision(settings["matmul_precision"])
    torch.backends.cuda.matmul.allow_tf32 = settings["cuda_matmul_tf32"]
    torch.backends.cudnn.allow_tf32 = settings["cudnn_tf32"]
    torch.use_deterministic_algorithms(settings["deterministic"])
    try:
        from omegaconf import OmegaConf

        reward = build_reward(OmegaConf.create(node), device)
        weights = getattr(reward, "weights", None)
        weights = {str(k): float(v) for k, v in weights.items()} if isinstance(weights, Mapping) else None
    except BaseException:  # noqa: BLE001 - sent to the trainer, which raises it with this traceback
        responses.put(("error", -1, traceback.format_exc()))
        return
    responses.put(("ready", -1, weights))
    parent = mp.parent_process()
    name = str(node.get("_target_"))
    while True:
        try:
            request = requests.get(timeout=1.0)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                return  # the trainer is gone (killed): nobody will read an answer
            continue
        if request is None:
            return
        seq, images, inputs = request
        try:
            start = time.perf_counter()
            out = _call(reward, _unpack(images).to(device), _unpack_inputs(inputs), name, check_rng="worker")
            seconds = time.perf_counter() - start
            if not isinstance(out, Mapping) or not all(isinstance(v, Tensor) for v in out.values()):
                raise TypeError(f"reward {name} returned {type(out).__name__}, not a dict of tensors")
            responses.put(("ok", seq, {str(k): _pack(v) for k, v in out.items()}, seconds))
        except BaseException:  # noqa: BLE001 - sent to the trainer, which raises it with this traceback
            responses.put(("error", seq, traceback.format_exc()))


def worker_devices(devices: Sequence[str], workers: int, first: int = 0) -> list[str]:
    """The device of each of ``workers`` workers: ``devices`` in turn from entry ``first``."""
    return [str(devices[(first + k) % len(devices)]) for k in range(workers)]


class _FromWorker:
    def __init__(self, workers: RewardWorkers, seq: int, worker: int) -> None:
        self._workers, self._seq, self._worker = workers, seq, worker
        self._out: dict[str, Tensor] | None = None
        self.seconds = 0.0

    def result(self) -> dict[str, Tensor]:
        if self._out is None:
            self._out, self.seconds = self._workers._wait(self._seq, self._worker)
        return self._out


class RewardWorkers:
    """N spawn-started processes, each building the reward config ``node`` on its device.

    Batches go to the workers in turn (batch i to worker ``i mod N``); each worker answers in order,
    and :meth:`Pending.result` returns each batch's own scores whatever order they finish in.
    Construction waits until every worker has built its reward (a build error is raised here, with
    the worker's traceback). Also a :class:`~rewards.base.Reward`: ``workers(images, inputs)`` scores
    one batch and waits.

    Args:
        node: a reward config (``_target_``; a DictConfig or a plain mapping). Interpolations are
            resolved here, in the trainer's process.
        devices: one device per worker, or fewer, used in turn (worker k: ``devices[(first + k) % len]``).
        workers: the number of processes (>= 1).
        timeout: seconds a result may take once asked for (None: no limit).
        first: the list entry of worker 0 (a trainer passes ``rank * workers``: the ranks of a node
            spread their workers over the list).

    Attributes:
        weights: the reward's ``weights`` (a weighted reward's), as the workers built it, or None.
    """

    def __init__(
        self,
        node: Any,
        devices: Sequence[str],
        workers: int = 1,
        timeout: float | None = None,
        first: int = 0,
    ) -> None:
        from omegaconf import OmegaConf

        if workers < 1 or not devices:
            raise ValueError(
                f"RewardWorkers: need workers >= 1 and a device, got {workers} and {list(devices)}"
            )
        plain = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
        if not isinstance(plain, dict) or "_target_" not in plain:
            raise ValueError("RewardWorkers: the reward config needs _target_ (conf/reward/*.yaml)")
        self.name = str(plain["_target_"])
        self.timeout = timeout
        self.devices = worker_devices(devices, workers, first)
        self.weights: dict[str, float] | None = None
        self._seq = 0
        self._done: dict[int, tuple[dict[str, Tensor], float]] = {}
        self._closed = False
        ctx = mp.get_context("spawn")
        settings = _torch_settings()
        self._requests = [ctx.Queue() for _ in self.devices]
        self._responses = [ctx.Queue() for _ in self.devices]
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(plain, device, settings, self._requests[k], self._responses[k]),
                name=f"psr-reward-{k}",
                daemon=True,
            )
            for k, device in enumerate(self.devices)
        ]
        try:
            for p in self._procs:
                p.start()
            for k in range(len(self._procs)):
                kind, _, payload = self._receive(k, None, "building the reward")
                if kind == "error":
                    raise RewardWorkerError(f"{self._who(k)} could not build the reward:\n{payload}")
                self.weights = payload
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"RewardWorkers({self.name}, devices={self.devices})"

    @property
    def pids(self) -> list[int | None]:
        """The workers' process ids."""
        return [p.pid for p in self._procs]

    def _who(self, k: int) -> str:
        return f"reward {self.name}: worker {k} (pid {self._procs[k].pid}, device {self.devices[k]})"

    def _receive(self, k: int, timeout: float | None, doing: str) -> tuple[Any, ...]:
        """The next message of worker k; an error when it dies or stays silent past ``timeout``."""
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return self._responses[k].get(timeout=min(_POLL_S, max(0.0, deadline - time.monotonic())))  # type: ignore[no-any-return]
            except queue.Empty:
                pass
            proc = self._procs[k]
            if not proc.is_alive():
                try:  # it may have answered just before it exited
                    return self._responses[k].get(timeout=_POLL_S)  # type: ignore[no-any-return]
                except queue.Empty:
                    pass
                code = proc.exitcode
                how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                raise RewardWorkerError(
                    f"{self._who(k)} died while {doing} ({how}); its output above may say why "
                    "(out of memory is a common cause: SIGKILL, signal 9)"
                )
            if time.monotonic() >= deadline:
                raise RewardWorkerError(
                    f"{self._who(k)} gave no answer within {timeout:g} s while {doing} (reward_serving.timeout)"
                )

    def submit(self, images: Tensor, inputs: RewardInputs) -> Pending:
        if self._closed:
            raise RuntimeError(f"reward {self.name}: the reward workers are closed")
        seq, k = self._seq, self._seq % len(self._procs)
        self._seq += 1
        self._requests[k].put((seq, _pack(images), _pack_inputs(inputs)))
        return _FromWorker(self, seq, k)

    def _wait(self, seq: int, k: int) -> tuple[dict[str, Tensor], float]:
        while seq not in self._done:
            kind, got, *payload = self._receive(k, self.timeout, f"scoring batch {seq}")
            if kind == "error":
                raise RewardWorkerError(f"{self._who(k)} raised while scoring batch {got}:\n{payload[0]}")
            out, seconds = payload
            self._done[got] = ({key: _unpack(v) for key, v in out.items()}, seconds)
        return self._done.pop(seq)

    @torch.no_grad()
    def __call__(self, images: Tensor, inputs: RewardInputs) -> dict[str, Tensor]:
        return self.submit(images, inputs).result()

    def close(self, wait: float = 10.0) -> None:
        """Ask every worker to stop, wait up to ``wait`` seconds, then terminate (and kill) those left."""
        if self._closed:
            return
        self._closed = True
        for k, p in enumerate(self._procs):
            if p.is_alive():
                with contextlib.suppress(ValueError, OSError):  # a queue already closed
                    self._requests[k].put(None)
        deadline = time.monotonic() + wait
        for p in self._procs:
            if p.pid is not None:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=2.0)
            if p.is_alive():
                p.kill()
                p.join()
        for q in (*self._requests, *self._responses):
            q.cancel_join_thread()  # what a dead worker never read must not hold up this process's exit
            q.close()


# --------------------------------------------------------------------------------------- building


def _mentions(node: Any, key: str) -> bool:
    """Whether ``key`` appears anywhere in a config tree (DictConfig, ListConfig or plain), outside the
    nodes of server clients (``backend: openai``, e.g. a served judge: its ``device`` holds nothing)."""
    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node
    if isinstance(tree, Mapping):
        if tree.get("backend") == "openai":
            return False
        return key in tree or any(_mentions(v, key) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return any(_mentions(v, key) for v in tree)
    return False


def _same_device(a: str | torch.device, b: str | torch.device) -> bool:
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


def build_served_reward(
    node: Any, device: str | Sequence[str], workers: int = 0, timeout: float | None = None, first: int = 0
) -> Reward:
    """The reward of config ``node``: built here on ``device`` (``workers=0``), or :class:`RewardWorkers`.

    Args:
        node: a reward config (``_target_``).
        device: where its models run; with workers, a list gives each worker its own (in turn).
        workers: 0 (this process) or the number of worker processes.
        timeout: a worker's answer limit in seconds (None: no limit).
        first: the ``device`` entry of worker 0 (see :class:`RewardWorkers`).
    """
    devices = [device] if isinstance(device, str) else [str(d) for d in device]
    if workers == 0:
        if len(devices) != 1:
            raise ValueError(
                f"reward_serving.device={devices}: an in-process reward runs on one device; set "
                f"reward_serving.workers={len(devices)} for one worker process per device"
            )
        return build_reward(node, devices[0])
    return RewardWorkers(node, devices, workers, timeout, first)


def overlap_by_default(
    node: Any, device: str | Sequence[str], workers: int, trainer_device: str | torch.device
) -> bool:
    """``reward_serving.overlap=auto``: overlap unless the reward would share the policy's GPU inside the
    trainer's process (some ``device`` key in its config set to the trainer's CUDA device). There its
    activations would add to the rollout's peak memory and the two would take turns on one GPU
    anyway. Worker processes, another device, the CPU and rewards without models (a judge server's
    client, ``backend: openai``; the colour reward) overlap."""
    devices = [device] if isinstance(device, str) else [str(d) for d in device]
    if workers > 0 or len(devices) != 1:
        return True
    shares_gpu = torch.device(devices[0]).type == "cuda" and _same_device(devices[0], trainer_device)
    return not (shares_gpu and _mentions(node, "device"))


@contextlib.contextmanager
def serve(reward: Reward, overlap: bool, timeout: float | None = None) -> Iterator[RewardService]:
    """The service a training loop submits to: ``reward`` in turn (no overlap), in a background thread,
    or its own worker processes (:class:`RewardWorkers`, left open: their owner closes them). A thread
    started here is stopped on leaving the block, exception or KeyboardInterrupt included."""
    if not overlap:
        yield InlineRewards(reward)
    elif isinstance(reward, RewardWorkers):
        yield reward
    else:
        threaded = ThreadedRewards(reward, timeout)
        try:
            yield threaded
        finally:
            threaded.close()


def concat_scores(pending: Sequence[Pending], device: torch.device | str) -> dict[str, Tensor]:
    """The results of ``pending`` in order, concatenated per key as float32 on ``device`` (what one call
    on all the batches would return: ``[sum B]`` per key). Every batch must report the same keys."""
    results = [p.result() for p in pending]
    if not results:
        return {}
    keys = list(results[0])
    for i, r in enumerate(results[1:], start=1):
        if set(r) != set(keys):
            raise ValueError(
                f"the reward returned keys {sorted(keys)} for batch 0 but {sorted(r)} for batch {i}; a reward "
                "must return the same keys for every batch (NaN where a value does not apply)"
            )
    return {k: torch.cat([r[k].float().to(device) for r in results]) for k in keys}
