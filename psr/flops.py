"""What a region of code costs, measured on the meta device: FLOPs and the peak of live tensor bytes.

Tensors on the meta device have shapes and dtypes but no data, so the real code path runs at full
size in seconds and allocates nothing. Three tools make its costs readable (used by
:mod:`psr.plan`):

* :class:`Meter`: ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs of matmuls, convolutions and
  attention, forward and backward; it counts ``2 m n k`` per matmul, ``4 B H N_q N_k D`` per
  attention forward and 2.5 times that for its backward, and nothing for elementwise ops, norms,
  softmax or RoPE) together with :class:`LiveBytes`, the peak of bytes held by tensors created
  inside the region.
* :func:`flash_attention`: ``F.scaled_dot_product_attention`` without a mask runs as
  ``aten._scaled_dot_product_flash_attention``, what a GPU runs for bf16: on meta (as on a CPU) the
  math fallback would materialize fp32 ``[B, H, N, N]`` scores that no GPU run holds.
* :func:`repeat_forwards`: a module called again with the same input shapes (a rollout's K
  forwards) is run once; later calls add the first call's FLOPs and transient bytes and return an
  empty output of the same shape.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["LiveBytes", "Meter", "flash_attention", "repeat_forwards"]


class LiveBytes(TorchDispatchMode):
    """The peak of bytes held by tensors that ops inside the mode created.

    Each new storage is weak-referenced and its bytes count until the last tensor using it dies
    (tensors that autograd saves for backward stay alive with the graph, so saved activations count
    until the backward frees them). Storages that existed before (parameters, buffers, inputs made
    outside) and views of them never count. Gradients do count while they are alive: the planner
    frees each one as soon as it is accumulated (ZeRO moves them into its buckets) and accounts for
    gradient memory separately.

    Attributes:
        live: bytes alive now.
        peak: the largest ``live`` seen since the last :meth:`reset_peak`.
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: dict[int, weakref.ref] = {}
        for t in exclude:
            self._remember(t.untyped_storage(), count=False)

    def _remember(self, storage: Any, count: bool) -> None:
        key = id(storage)
        ref = self._seen.get(key)
        if ref is not None and ref() is storage:
            return
        nbytes = int(storage.nbytes()) if count else 0

        def release(_: Any, key: int = key, nbytes: int = nbytes) -> None:
            self.live -= nbytes
            self._seen.pop(key, None)

        self._seen[key] = weakref.ref(storage, release)
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self._remember(t.untyped_storage(), count=True)
        return out

    def bump(self, transient: int) -> None:
        """Count a transient of ``transient`` bytes on top of what is alive now (a skipped forward)."""
        self.peak = max(self.peak, self.live + transient)

    def reset_peak(self) -> None:
        self.peak = self.live


class Meter:
    """FLOPs and live bytes of the code run inside ``with meter:`` (re-enterable, cumulative).

    Example::

        meter = Meter(exclude=model.parameters())
        with meter:
            loss = model(x).sum()
            loss.backward()
        meter.flops, meter.bytes.peak
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self.counter = FlopCounterMode(display=False)
        # totals only: the per-module tracker's hooks keep tensors that gradient checkpointing
        # recomputes alive until the graph dies, which would inflate the measured activations
        self.counter.mod_tracker = _GlobalOnly()  # type: ignore[assignment]
        self.bytes = LiveBytes(exclude)
        self._stack: contextlib.ExitStack | None = None
        self._done = 0  # FLOPs of earlier entries (FlopCounterMode starts from 0 at each entry)

    @property
    def flops(self) -> int:
        """FLOPs counted so far, over every entry (``FlopCounterMode.get_total_flops``)."""
        return self._done + (int(self.counter.get_total_flops()) if self._stack is not None else 0)

    def __enter__(self) -> Meter:
        stack = contextlib.ExitStack()
        stack.enter_context(self.counter)
        stack.enter_context(self.bytes)
        self._stack = stack
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._stack is not None
        self._stack.close()
        self._stack = None
        self._done += int(self.counter.get_total_flops())


class _GlobalOnly:
    """A stand-in for FlopCounterMode's module tracker: every FLOP counts under "Global" only."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _flash_sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    _original: Any = F.scaled_dot_product_attention,
) -> Tensor:
    if attn_mask is not None or dropout_p or enable_gqa or query.device.type != "meta":
        return _original(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )
    return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, is_causal, scale=scale)[
        0
    ]


@contextlib.contextmanager
def flash_attention() -> Iterator[None]:
    """Inside, unmasked attention on meta tensors is the fused flash kernel (see the module docstring).

    ``torch.nn.functional.scaled_dot_product_attention`` is replaced for the block (diffusers and
    transformers look it up at call time), not through a mode: gradient checkpointing recomputes
    forwards on autograd's thread, where a thread-local mode would not apply.
    """
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _flash_sdpa  # type: ignore[assignment]
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _shape_key(value: Any) -> Any:
    if isinstance(value, Tensor):
        return ("T", tuple(value.shape), value.dtype, value.device.type)
    if isinstance(value, (list, tuple)):
        return tuple(_shape_key(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _shape_key(v)) for k, v in value.items()))
    return ("V", repr(value))


@contextlib.contextmanager
def repeat_forwards(module: nn.Module, meter: Meter) -> Iterator[None]:
    """Inside, ``module`` runs once per distinct input shape; repeats only add the first run's costs.

    A repeat (same shapes, dtypes and non-tensor arguments, gradients off) adds the first run's
    FLOPs to ``meter`` op by op, counts its transient bytes on top of what is alive then, and
    returns empty tensors of the first output's shapes. Calls with gradients on always run.
    """
    seen: dict[Any, tuple[dict[Any, int], int, Any]] = {}
    forward = module.forward

    def once(*args: Any, **kwargs: Any) -> Any:
        key = (_shape_key(args), _shape_key(kwargs))
        if torch.is_grad_enabled():
            return forward(*args, **kwargs)
        global_counts = meter.counter.flop_counts["Global"]
        if key in seen:
            flops, transient, out = seen[key]
            for op, n in flops.items():
                global_counts[op] += n
            meter.bytes.bump(transient)
            return tree_map(
                lambda s: torch.empty(s.shape, dtype=s.dtype, device=s.device) if isinstance(s, _Spec) else s,
                out,
            )
        before, live, peak = dict(global_counts), meter.bytes.live, meter.bytes.peak
        meter.bytes.reset_peak()
        out = forward(*args, **kwargs)
        flops = {op: n - before.get(op, 0) for op, n in global_counts.items() if n != before.get(op, 0)}
        transient = meter.bytes.peak - live
        meter.bytes.peak = max(peak, meter.bytes.peak)
        # shapes only: keeping the output itself would keep its bytes alive
        spec = tree_map(lambda t: _Spec(t) if isinstance(t, Tensor) else t, out)
        seen[key] = (flops, transient, spec)
        return out

    own = module.__dict__.get("forward")
    module.forward = once  # type: ignore[method-assign]
    try:
        yield
    finally:
        if own is None:
            del module.forward  # the class's forward again
        else:
            module.forward = own  # type: ignore[method-assign]


class _Spec:
    """A tensor's shape, dtype and device (a pytree leaf, unlike a tuple)."""

    def __init__(self, t: Tensor) -> None:
        self.shape, self.dtype, self.device = t.shape, t.dtype, t.device
