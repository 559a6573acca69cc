"""The DeepSpeed ZeRO-2/3 engine, and the only module of psr that touches deepspeed.

deepspeed is imported inside the functions that need it, so ``import psr.engine`` stays cheap and
runs without it installed. The DeepSpeed config is rendered from the trainer's own keys
(:func:`deepspeed_config`; no ``"auto"`` values) and DeepSpeed is given a torch ``AdamW`` object, so
no CPU-Adam extension is compiled. The contract is :mod:`psr.engine`'s.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from psr import distributed
from psr.engine.common import (
    ADAM_KEYS,
    EMA,
    OptimSettings,
    UpdateLedger,
    adamw,
    autocast,
    check_names,
    check_precision,
    check_shapes,
    named_trainable,
)

__all__ = ["DeepSpeedEngine", "deepspeed_config", "destroy_process_group"]


def destroy_process_group() -> bool:
    """End the process group through DeepSpeed's teardown if an engine loaded DeepSpeed's comm.

    DeepSpeed's teardown also drops the sub-groups it caches (ZeRO's data-parallel groups), so a
    later engine builds fresh ones and no group's communication threads outlive the call. Imports
    nothing: without DeepSpeed loaded it returns ``False`` and the caller ends the group itself.

    Returns:
        Whether DeepSpeed ended the group.
    """
    ds_comm = sys.modules.get("deepspeed.comm")  # loaded only if an engine imported deepspeed
    if ds_comm is None or not ds_comm.is_initialized():
        return False
    ds_comm.destroy_process_group()
    return True


def deepspeed_config(
    *,
    stage: int,
    precision: str,
    grad_clip: float | None,
    grad_accum: int,
    micro_batch_size: int,
    world_size: int,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    zero3_persistence_threshold: int | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config, rendered from the trainer's keys: every value explicit, no ``"auto"``.

    ``managed_gradient_accumulation: false`` makes every ``step()`` the accumulation boundary, the
    same contract as :class:`~psr.engine.torch.TorchEngine` (DeepSpeed's own counter would otherwise
    decide).
    """
    if stage not in (2, 3):
        raise ValueError(f"engine.stage={stage}; expected 2 or 3")
    if offload_params and stage != 3:
        raise ValueError("engine.offload_params needs engine.stage=3")
    zero: dict[str, Any] = {"stage": stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if stage == 3 and zero3_persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = int(zero3_persistence_threshold)
    return {
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "gradient_accumulation_steps": int(grad_accum),
        "train_batch_size": int(micro_batch_size) * int(grad_accum) * int(world_size),
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(grad_clip or 0.0),
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        # a torch AdamW object is passed in: no DeepSpeed optimizer, no CPU-Adam compilation
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """DeepSpeed ZeRO-2/3 behind the :class:`~psr.engine.Engine` interface.

    Args:
        stage: ZeRO stage, 2 (optimizer state and gradients partitioned) or 3 (also parameters).
        precision: ``bf16`` (module weights in bf16, fp32 master weights in the optimizer) or ``fp32``.
        ema_decay: EMA decay of the trainable weights, or ``None``. The EMA is a full fp32 copy on
            every rank, gathered after each update (cheap for LoRA, costly for full ZeRO-3 runs).
        offload_optimizer: keep optimizer state and master weights on the CPU.
        offload_params: ZeRO-3 only: keep partitioned parameters on the CPU.
        zero3_persistence_threshold: ZeRO-3 leaves parameters with at most this many elements
            unpartitioned (DeepSpeed's default when ``None``).
        backend: process-group backend (``None``: nccl on CUDA, else gloo). The group is created
            here, also for one process, so ``deepspeed.init_distributed`` (which compiles a
            shared-memory op on CPUs) never runs.

    Forwards call the module itself (``unwrap()``, or the policy holding it), never DeepSpeed's
    wrapper; hooks on the root module run DeepSpeed's per-forward bookkeeping. Under ZeRO-3 every
    forward outside :meth:`gathered_parameters` gathers weights layer by layer, a collective: all
    ranks must run the same such forwards.
    """

    # the collectives are psr.distributed's, on the group this engine joined
    barrier = staticmethod(distributed.barrier)
    all_gather_object = staticmethod(distributed.all_gather_object)
    all_gather_tensor = staticmethod(distributed.all_gather_tensor)
    all_reduce_mean = staticmethod(distributed.all_reduce_mean)
    broadcast_object = staticmethod(distributed.broadcast_object)

    def __init__(
        self,
        stage: int = 2,
        precision: str = "bf16",
        ema_decay: float | None = None,
        offload_optimizer: bool = False,
        offload_params: bool = False,
        zero3_persistence_threshold: int | None = None,
        backend: str | None = None,
    ) -> None:
        if int(stage) not in (2, 3):
            raise ValueError(f"engine.stage={stage}; expected 2 or 3")
        self.precision = check_precision(precision)
        self.ema_decay = ema_decay
        info, self._owns_group = distributed.init_distributed(backend, force=True)
        self.rank, self.world_size, self.local_rank = info.rank, info.world_size, info.local_rank
        # DeepSpeed reads these even when the group exists (srun sets only SLURM_* names)
        for key, value in (
            ("RANK", self.rank),
            ("WORLD_SIZE", self.world_size),
            ("LOCAL_RANK", self.local_rank),
        ):
            os.environ.setdefault(key, str(value))
        self.stage = int(stage)
        self.offload = {"offload_optimizer": bool(offload_optimizer), "offload_params": bool(offload_params)}
        self.zero3_persistence_threshold = zero3_persistence_threshold
        self.device = torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")
        self.ds: Any = None
        self.ds_config: dict[str, Any] = {}
        self._params: dict[str, nn.Parameter] = {}
        self._ledger: UpdateLedger | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_updates(self) -> int:
        """Updates applied so far (skipped ones do not count)."""
        return 0 if self._ledger is None else self._ledger.num_updates

    @property
    def ema(self) -> EMA | None:
        """The EMA of the trainable weights (``None`` without ``ema_decay`` or before ``setup``)."""
        return None if self._ledger is None else self._ledger.ema

    def setup(self, model: nn.Module, params: Sequence[nn.Parameter], *, lr: float, **optim: Any) -> None:
        """Wrap ``model`` with ``deepspeed.initialize``; same keyword args as ``TorchEngine.setup``."""
        import deepspeed
        import deepspeed.ops

        settings = OptimSettings(lr, **optim)
        self._params = named_trainable(model, params)
        self.ds_config = deepspeed_config(
            stage=self.stage,
            precision=self.precision,
            grad_clip=settings.grad_clip,
            grad_accum=settings.grad_accum,
            micro_batch_size=settings.micro_batch_size,
            world_size=self.world_size,
            zero3_persistence_threshold=self.zero3_persistence_threshold,
            **self.offload,
        )
        if self.device.type == "cpu":
            # The CPU accelerator would JIT-compile a shared-memory all-reduce op (~45 s) that only
            # inference uses; DeepSpeed reads this table before building it.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        optimizer = adamw(list(self._params.values()), settings)
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        self._forward_hooks = self._route_forwards(model)
        self._ledger = UpdateLedger(settings, self.ema_decay, self._full_fp32)

    def _route_forwards(self, model: nn.Module) -> list[Any]:
        """Give direct calls of ``model`` what ``DeepSpeedEngine.forward`` adds around them.

        Trainers call the module itself (through the policy), not DeepSpeed's wrapper. DeepSpeed's
        forward first resets ZeRO's per-backward bookkeeping (without it ZeRO-3 overwrites instead
        of accumulating the gradients of a second micro-batch) and hooks the outputs so that the
        backward prologue runs; these two hooks on the root module do the same.
        """
        from deepspeed.runtime.utils import register_output_backward_hooks

        ds = self.ds

        def before(module: nn.Module, args: Any) -> None:
            if torch.is_grad_enabled():
                ds.optimizer.clear_backward_seen_flag()

        def after(module: nn.Module, args: Any, output: Any) -> None:
            if torch.is_grad_enabled():
                register_output_backward_hooks(
                    output,
                    preprocess_once_fn=ds._backward_prologue,
                    preprocess_per_tensor_fn=ds._backward_prologue_per_tensor,
                )

        return [model.register_forward_pre_hook(before), model.register_forward_hook(after)]

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Context for forwards of the trained module: bf16 autocast when ``precision=bf16``."""
        return autocast(self.precision, self.device)

    # ------------------------------------------------------------------ the update
    def backward(self, loss: Tensor) -> None:
        """Accumulate gradients (no rescaling by ``grad_accum``; see :mod:`psr.engine`)."""
        self.ds.backward(loss, scale_wrt_gas=False)

    def zero_grad(self) -> None:
        """Drop the gradients accumulated since the last ``step()``."""
        zero = self.ds.optimizer
        zero.zero_grad(set_to_none=True)  # ZeRO-3 also restarts its accumulation counter here
        if self.stage == 2:
            # ZeRO-2 sums earlier backwards in these buffers; clear them as its skipped-step path does
            for buffers in (zero.averaged_gradients, zero.all_grad_tensors):
                for key in list(buffers):
                    buffers[key] = None

    def step(self) -> dict[str, float]:
        """The accumulation boundary (collective): reduce, clip, AdamW at this update's LR, EMA."""
        assert self._ledger is not None, "call setup() first"
        lr = self._ledger.lr()
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr
        self.ds.step()
        grad_norm = self.ds.get_global_grad_norm()
        grad_norm = float("nan") if grad_norm is None else float(grad_norm)
        skipped = not self.ds.was_step_applied()
        if not skipped:
            self._ledger.record_update(self._full_fp32)
        return {"grad_norm": grad_norm, "lr": lr, "skipped": float(skipped)}

    # ------------------------------------------------------------------ state
    def _full_fp32(self) -> dict[str, Tensor]:
        """Full fp32 master weights by name (collective)."""
        from deepspeed.utils import safe_get_full_fp32_param

        return {n: safe_get_full_fp32_param(p) for n, p in self._params.items()}

    def _base_optimizer(self) -> torch.optim.Optimizer:
        return self.ds.optimizer.optimizer  # the AdamW over the flat fp32 partitions

    def _flat_partitions(self) -> list[Tensor]:
        """This rank's flat fp32 master partitions: the tensors AdamW's state is keyed by."""
        zero = self.ds.optimizer
        return list(
            zero.fp32_partitioned_groups_flat if self.stage == 3 else zero.single_partition_of_fp32_groups
        )

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """fp32 CPU copies of the full trainable (master) weights (collective)."""
        return {n: t.float().cpu().contiguous().clone() for n, t in self._full_fp32().items()}

    @torch.no_grad()
    def load_trainable_state_dict(self, tensors: dict[str, Tensor]) -> None:
        """Set master and module weights (collective); the EMA restarts from them."""
        from deepspeed.utils import safe_set_full_fp32_param

        check_names("trainable weights", list(self._params), list(tensors))
        check_shapes("trainable weights", self._params, tensors)
        for n, p in self._params.items():
            safe_set_full_fp32_param(p, tensors[n].to(self.device, torch.float32))
        with self._module_params(modify=True):
            for n, p in self._params.items():
                p.data.copy_(tensors[n].to(p.device, p.dtype))
        if self._ledger is not None:
            self._ledger.restart_ema(self._full_fp32)

    def state_dict(self) -> dict[str, Any]:
        """Same format as ``TorchEngine.state_dict``, gathered from the partitions (collective)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        assert self._ledger is not None, "call setup() first"
        opt: dict[str, Any] = {"step": {}, "exp_avg": {}, "exp_avg_sq": {}}
        states = list(self._base_optimizer().state.values())
        if states:  # flat partitions share one step count
            step = float(states[0]["step"])
            for n, p in self._params.items():
                opt["step"][n] = step
                for k in ADAM_KEYS:
                    opt[k][n] = safe_get_full_optimizer_state(p, k).float().cpu().clone()
        return self._ledger.state_dict(opt)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Scatter a :meth:`state_dict` (from either engine, any world size) into the partitions."""
        from deepspeed.utils import safe_set_full_optimizer_state

        assert self._ledger is not None, "call setup() first"
        self._ledger.check_state(state)
        opt = state["optimizer"]
        if opt["step"]:
            check_names("optimizer state", list(self._params), list(opt["step"]))
            steps = set(opt["step"].values())
            if len(steps) != 1:
                raise ValueError(f"DeepSpeed keeps one AdamW step count; the checkpoint has {sorted(steps)}")
            step = steps.pop()
            base = self._base_optimizer()
            # AdamW creates its state lazily at the first update; create it (as AdamW would) so the
            # moments can be scattered into it, and let ZeRO-2 re-link its per-parameter views.
            for flat in self._flat_partitions():
                base.state[flat] = {
                    "step": torch.tensor(step, dtype=torch.float32),
                    **{k: torch.zeros_like(flat) for k in ADAM_KEYS},
                }
            if self.stage == 2:
                self.ds.optimizer._hp_optimizer_states_linked = False
                self.ds.optimizer._lazy_init_hp_params_optimizer_state()
            for n, p in self._params.items():
                for k in ADAM_KEYS:
                    safe_set_full_optimizer_state(p, opt[k][n].to(self.device, torch.float32), k)
        self._ledger.load_state_dict(state)

    # ------------------------------------------------------------------ forwards outside training
    @contextlib.contextmanager
    def _module_params(self, modify: bool) -> Iterator[None]:
        """Full trainable module weights inside the block; ZeRO-3 re-partitions (rank 0's) on exit."""
        if self.stage != 3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(
            list(self._params.values()), modifier_rank=0 if modify else None
        ):
            yield

    @contextlib.contextmanager
    def gathered_parameters(self) -> Iterator[nn.Module]:
        """The full model for no-grad forwards that do not go through training (collective).

        ZeRO-3: gathers every parameter once and removes ZeRO's per-module fetch/release hooks for
        the block, so a rollout is as many plain forwards as it likes with no collective inside
        (ranks may run different numbers of them without hanging). No-op for ZeRO-2.
        """
        module = self.unwrap()
        if self.stage != 3:
            yield module
            return
        import deepspeed

        coordinator = self.ds.optimizer.parameter_offload
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            for hook in coordinator.forward_hooks + coordinator.backward_hooks:
                hook.remove()
            coordinator.forward_hooks, coordinator.backward_hooks = [], []
            try:
                yield module
            finally:
                coordinator._register_deepspeed_module(module)

    @contextlib.contextmanager
    def ema_swap(self) -> Iterator[None]:
        """Evaluate with the EMA weights inside the block (collective; a no-op without EMA)."""
        ema = self.ema
        if ema is None:
            yield
            return
        with torch.no_grad(), self._module_params(modify=False):
            backup = {n: p.detach().clone() for n, p in self._params.items()}
        self._write_module(dict(ema.shadow))
        try:
            yield
        finally:
            self._write_module(backup)

    @torch.no_grad()
    def _write_module(self, values: dict[str, Tensor]) -> None:
        with self._module_params(modify=True):
            for n, p in self._params.items():
                p.data.copy_(values[n].to(p.device, p.dtype))

    def unwrap(self) -> nn.Module:
        assert self.ds is not None, "call setup() first"
        return self.ds.module

    def cleanup(self) -> None:
        """Leave the process group if this engine joined it."""
        if self._owns_group:
            distributed.destroy()
            self._owns_group = False
