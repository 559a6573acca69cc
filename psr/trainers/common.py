"""The glue the SFT and RL trainers share, written once: seeding, the run directory, the policy with
its trainable parameters (LoRA or full), data records and samplers, the engine and logger from the
config, one checkpoint format (save, resume, ``init_from``), reward plumbing, and the closing report
of where the outputs are. No numerics live here: the engine (:mod:`psr.engine`), checkpoint files
(:mod:`psr.checkpoint`) and telemetry (:mod:`psr.logging`) are used, not re-implemented.

Only trainers' ``setup()`` call the ``cfg``-taking functions here; the rest take plain arguments.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from psr.data.dataset import GroupSampler, PromptDataset, PromptRecord, derive_seed
from psr.logging import MetricLogger, StepTimer, make_grid, progress

__all__ = [
    "StepTimer",
    "make_grid",
    "progress",
    "derive_seed",
    "seed_everything",
    "resolve_run_dir",
    "build_policy",
    "load_records",
    "data_loader",
    "build_prompt_records",
    "group_sampler",
    "build_engine",
    "optim_kwargs",
    "build_logger",
    "save_training_checkpoint",
    "load_training_checkpoint",
    "load_initial_weights",
    "resume_state",
    "checkpoint_or_stop",
    "run_trainer",
    "build_reward",
    "reward_inputs",
    "reward_metrics",
    "reward_components",
    "component_weights",
    "print_outputs",
]


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, numpy and torch (CPU and CUDA) with a per-rank seed derived from ``seed``."""
    s = derive_seed(seed, rank) % (2**32)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def resolve_run_dir(cfg: DictConfig) -> Path:
    """``cfg.run_dir`` if set, else Hydra's output directory of this run, created."""
    run_dir = cfg.get("run_dir")
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    path = Path(os.path.expanduser(str(run_dir))).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------- policy


def build_policy(
    cfg: DictConfig, device: torch.device | str, *, reference: bool = False
) -> tuple[Any, list[nn.Parameter]]:
    """Instantiate ``cfg.model`` on ``device`` and make its transformer trainable per ``cfg.train``.

    ``train.mode=lora`` adds a LoRA adapter (``train.lora.rank``, ``alpha``, ``targets``, ``init``)
    and trains only it; ``train.mode=full`` trains every transformer weight. Text encoders and the
    VAE stay frozen either way. ``init_from`` (an SFT or RL run or checkpoint) is loaded into the
    base weights first, on fresh and resumed runs alike. With ``reference`` (an objective that needs the reference policy:
    DPO, or a KL term) and full fine-tuning, a frozen copy of the transformer is kept for it;
    with LoRA the reference is the network with its adapters disabled.

    Returns:
        ``(policy, trainable parameters)``.
    """
    from hydra.utils import instantiate

    from psr.models.lora import DEFAULT_TARGETS, add_lora

    policy = instantiate(cfg.model, device=str(device))
    if cfg.get("init_from"):
        # before adapters and engine: the base weights of every later run (resumed ones too) and the
        # reference policy are the init_from model
        # recorded in this run's checkpoints: a LoRA here is a delta on top of that model
        policy.init_from = str(load_initial_weights(policy, str(cfg.init_from)))
    mode = str(cfg.train.mode)
    if mode == "lora":
        lora = cfg.train.lora
        params = add_lora(
            policy.transformer,
            rank=int(lora.rank),
            alpha=float(lora.alpha) if lora.get("alpha") is not None else None,
            targets=tuple(lora.get("targets") or DEFAULT_TARGETS),
            init=lora.get("init", "gaussian"),
        )
    elif mode == "full":
        if reference:
            policy.keep_reference_copy()
        policy.transformer.requires_grad_(True)
        params = list(policy.transformer.parameters())
    else:
        raise ValueError(f"train.mode={mode!r}; expected lora or full")
    return policy, params


# ---------------------------------------------------------------------------------------------- data


def load_records(data: DictConfig, run_dir: Path) -> tuple[list[Any], list[Any], Path]:
    """``(train samples, held-out samples, image root)`` from the ``data`` config group.

    ``data.kind``: ``manifest`` (``data.manifest``: a JSONL from ``psr-data``), ``psrbench``
    (``data.path``: a PSRBench JSON, images under ``data.root`` or the JSON's folder), or
    ``synthetic`` (coloured shapes written to ``run_dir/data``). The last ``data.heldout`` records
    are held out (validation / evaluation), the rest train.
    """
    from psr.data import manifest as mf

    kind = str(data.kind)
    if kind == "manifest":
        path = Path(os.path.expanduser(str(data.manifest))).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"data.manifest={data.manifest} does not exist (make one with psr-data)")
        samples, root = mf.read_manifest(path), path.parent
    elif kind == "psrbench":
        path = Path(os.path.expanduser(str(data.path))).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"data.path={data.path} does not exist (a PSRBench JSON)")
        root = Path(os.path.expanduser(str(data.root))).resolve() if data.get("root") else path.parent
        samples = mf.read_psrbench(path)
    elif kind == "synthetic":
        from psr import distributed
        from psr.data.synthetic import write_synthetic_manifest

        kwargs: dict[str, Any] = dict(
            num_records=int(data.num_records),
            num_subjects=tuple(data.num_subjects),
            image_size=int(data.image_size),
            seed=int(data.get("seed", 0)),
        )
        if distributed.is_main():  # one writer; the other ranks read after the barrier
            write_synthetic_manifest(run_dir / "data", **kwargs)
        distributed.barrier()
        path = write_synthetic_manifest(run_dir / "data", **kwargs)  # reuses the complete manifest
        samples, root = mf.read_manifest(path), path.parent
    else:
        raise ValueError(f"data.kind={kind!r}; expected manifest, psrbench or synthetic")
    heldout = int(data.get("heldout", 0))
    if not 0 <= heldout < len(samples):
        raise ValueError(f"data.heldout={heldout} must be in [0, {len(samples)}) for {len(samples)} records")
    cut = len(samples) - heldout
    return samples[:cut], samples[cut:], root


def data_loader(
    dataset: Any, batch_sampler: Any, collate_fn: Any, loader: DictConfig | dict
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``batch_sampler`` with ``loader.num_workers`` / ``prefetch_factor`` / ``pin_memory``."""
    workers = int(loader.get("num_workers", 0))
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(prefetch_factor=int(loader.get("prefetch_factor", 2)), persistent_workers=True)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=bool(loader.get("pin_memory", False)) and torch.cuda.is_available(),
        **kwargs,
    )


def build_prompt_records(cfg: DictConfig, run_dir: Path) -> tuple[PromptDataset, list[PromptRecord]]:
    """RL prompts: the training records (loaded on access) and the held-out ones (loaded now)."""
    train, heldout, root = load_records(cfg.data, run_dir)
    held = PromptDataset(heldout, root)
    return PromptDataset(train, root), [held[i] for i in range(len(held))]


def group_sampler(
    records: PromptDataset, prompts_per_step: int, engine: Any, seed: int, group_size: int = 1
) -> GroupSampler:
    """This rank's :class:`~psr.data.dataset.GroupSampler` over ``records`` (``next_batch()`` per step)."""
    return GroupSampler(
        len(records),
        prompts_per_step=prompts_per_step,
        group_size=group_size,
        rank=engine.rank,
        world_size=engine.world_size,
        seed=seed,
        dataset=records,  # type: ignore[arg-type]  # indexable with len(): all GroupSampler uses
    )


# ---------------------------------------------------------------------------------------------- engine, logger


def build_engine(cfg: DictConfig) -> Any:
    """The training engine of ``cfg.engine`` (a ``_target_`` node, e.g. ``psr.engine.TorchEngine``)."""
    from hydra.utils import instantiate

    return instantiate(cfg.engine)


def optim_kwargs(cfg: DictConfig, total_steps: int) -> dict[str, Any]:
    """``engine.setup`` keyword arguments: ``cfg.optim`` plus the trainer's step and batch counts."""
    kwargs = dict(to_plain(cfg.optim))
    kwargs.pop("_target_", None)
    kwargs["total_steps"] = int(total_steps)
    kwargs["grad_accum"] = int(cfg.train.get("grad_accum", 1))
    kwargs["micro_batch_size"] = int(cfg.train.get("batch_size", cfg.train.get("micro_batch", 1)))
    return kwargs


def build_logger(cfg: DictConfig, run_dir: Path, rank: int) -> MetricLogger:
    """A rank-0 :class:`psr.logging.MetricLogger` from ``cfg.logger`` with the resolved config attached."""
    from hydra.utils import get_method

    kwargs = dict(to_plain(cfg.logger))
    # called directly, not through instantiate(): the run config holds _target_ nodes of its own
    make = get_method(kwargs.pop("_target_", "psr.logging.MetricLogger"))
    return make(run_dir, run_config=to_plain(cfg), rank=rank, **kwargs)


# ---------------------------------------------------------------------------------------------- checkpoints


def model_meta(policy: Any, mode: str) -> dict[str, Any]:
    """What :func:`load_initial_weights` needs to read the trainable weights of a checkpoint."""
    meta: dict[str, Any] = {"mode": mode, "init_from": getattr(policy, "init_from", None)}
    if mode == "lora":
        cfg = policy.transformer.peft_config["default"]
        meta["lora"] = {
            "rank": int(cfg.r),
            "alpha": float(cfg.lora_alpha),
            "targets": sorted(cfg.target_modules),
        }
    return meta


def diffusers_lora_layers(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Engine-named LoRA weights (``...lora_A.default.weight``) as peft names without the adapter name."""
    return {
        k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
        for k, v in weights.items()
    }


def save_training_checkpoint(
    ckpt_root: Path,
    step: int,
    policy: Any,
    engine: Any,
    *,
    data_state: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
    keep_last: int | None = None,
    export_lora: bool = False,
) -> Path:
    """Full training state at ``step`` (collective): weights, optimizer, schedule, EMA, RNG, data position.

    ``training_state`` holds ``{"engine": engine.state_dict(), "trainer": extra, "model":
    model_meta}``. With ``export_lora`` (LoRA runs only) a ``lora/pytorch_lora_weights.safetensors`` in diffusers
    format is written next to it, from the EMA weights when the engine keeps an EMA (what inference
    should use), else from the live weights.
    """
    from psr import checkpoint as ckpt

    trainable = engine.trainable_state_dict()
    meta = model_meta(policy, "lora" if getattr(policy.transformer, "peft_config", None) else "full")
    extra_files: dict[str, Any] = {}
    if export_lora and meta["mode"] == "lora":  # full weights are in trainable.safetensors already
        ema = getattr(engine, "ema", None)
        layers = diffusers_lora_layers(ema.shadow if ema is not None else trainable)

        def write_lora(path: Path) -> None:
            from diffusers import FluxKontextPipeline

            path.mkdir(parents=True, exist_ok=True)
            # the adapter config (rank, alpha, targets) travels in the file's metadata, so loaders
            # apply scale alpha / rank, not 1
            peft_cfg = policy.transformer.peft_config["default"].to_dict()
            FluxKontextPipeline.save_lora_weights(
                path,
                transformer_lora_layers=layers,
                safe_serialization=True,
                transformer_lora_adapter_metadata=peft_cfg,
            )

        extra_files["lora"] = write_lora
    return ckpt.save_checkpoint(
        ckpt_root,
        step,
        trainable=trainable,
        training_state={"engine": engine.state_dict(), "trainer": dict(extra or {}), "model": meta},
        data_state=data_state,
        extra_files=extra_files,
        keep_last=keep_last,
        rank=engine.rank,
        world_size=engine.world_size,
        barrier=engine.barrier,
    )


def load_training_checkpoint(path: Path, policy: Any, engine: Any) -> dict[str, Any]:
    """Restore what :func:`save_training_checkpoint` wrote into a set-up engine; restore RNG states.

    Returns:
        ``{"step", "data", **trainer extras}``.
    """
    from psr import checkpoint as ckpt

    state = ckpt.load_checkpoint(path, rank=engine.rank)
    try:
        engine.load_trainable_state_dict(state["trainable"])
        engine.load_state_dict(state["training_state"]["engine"])
    except (KeyError, ValueError, RuntimeError) as err:
        raise type(err)(f"resuming from {path}: {err}") from err
    if state["rng"] is not None:
        ckpt.restore_rng(state["rng"])
    return {"step": state["step"], "data": state["data_state"], **state["training_state"].get("trainer", {})}


def resume_state(
    resume: str | None, ckpt_root: Path, policy: Any, engine: Any, name: str
) -> dict[str, Any] | None:
    """``resume`` (``auto``, a path or null) resolved under ``ckpt_root`` and loaded into the set-up
    engine: the :func:`load_training_checkpoint` dict, or None for a fresh start (``init_from``,
    if set, was loaded by :func:`build_policy`)."""
    from psr import checkpoint as ckpt

    path = ckpt.resolve_resume(resume, ckpt_root)
    if path is None:
        return None
    state = load_training_checkpoint(path, policy, engine)
    if engine.is_main:
        print(f"{name}: resumed from {path} at step {state['step']}", flush=True)
    return state


def checkpoint_or_stop(
    name: str, step: int, total_steps: int, every: int, preemption: Any, save: Any
) -> bool:
    """At a step boundary (after ``preemption.poll()``): ``save()`` on schedule, at the last step or
    on a preemption signal; returns True when a signal asks the run to stop (after reporting it)."""
    if step % every == 0 or step == total_steps or preemption.triggered:
        save()
    if preemption.triggered:
        preemption.exit(f"{name}: {preemption.signal_name} at step {step}: checkpoint saved")
        return True
    return False


def run_trainer(trainer: Any, name: str) -> None:
    """``setup``, ``train``, ``cleanup`` (always), then the report of where the outputs are."""
    import time

    trainer.setup()
    start = time.time()
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    if trainer.engine.is_main:
        print_outputs(name, trainer.run_dir, time.time() - start)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a checkpoint, a run directory or a ``checkpoints/`` directory."""
    from psr import checkpoint as ckpt

    p = Path(os.path.expanduser(str(path)))
    if (p / ckpt.COMPLETE).is_file():
        return p
    for root in (p / "checkpoints", p):
        latest = ckpt.latest_checkpoint(root)
        if latest is not None:
            return latest
    raise FileNotFoundError(f"init_from={path}: no complete checkpoint there, nor under {p / 'checkpoints'}")


@torch.no_grad()
def load_initial_weights(
    policy: Any, path: str | os.PathLike, *, use_ema: bool = True, _depth: int = 0
) -> Path:
    """Start ``policy`` from the weights of an SFT (or RL) checkpoint; what ``init_from=`` does.

    ``path`` is a checkpoint directory, or a run directory (its newest complete checkpoint). A LoRA
    checkpoint is **merged** into the transformer's base weights, ``W += (alpha / r) B A``; a full
    checkpoint replaces them. Adapters already on ``policy`` (e.g. the fresh RL LoRA) are left
    as they are, so the adapted model starts equal to the checkpoint's model and the
    adapters-disabled reference policy is that model too. With ``use_ema`` the checkpoint's EMA
    weights are used when it has them. A LoRA run that itself started from ``init_from`` (RL on
    an SFT run) recorded it: that model is loaded first, then this run's delta.

    Returns:
        The checkpoint directory that was read.
    """
    from safetensors.torch import load_file

    from psr import checkpoint as ckpt

    ckpt_dir = find_checkpoint(path)
    state = torch.load(ckpt_dir / ckpt.STATE, map_location="cpu", weights_only=True)["training_state"]
    weights = load_file(str(ckpt_dir / ckpt.WEIGHTS))
    ema = state["engine"].get("ema")
    if use_ema and ema is not None:
        weights = ema["shadow"]
    meta = state.get("model") or {}
    if meta.get("mode") == "lora" and meta.get("init_from"):
        # this run's LoRA is a delta on the model it started from (e.g. RL on SFT): that one first
        if _depth >= 8:
            raise ValueError(f"{ckpt_dir}: init_from chain longer than 8 checkpoints (a cycle?)")
        load_initial_weights(policy, meta["init_from"], use_ema=use_ema, _depth=_depth + 1)
    transformer = policy.transformer
    base = {
        k.replace(".base_layer.", "."): v
        for k, v in transformer.state_dict(keep_vars=True).items()
        if "lora_" not in k
    }
    if meta.get("mode") == "lora":
        scale = float(meta["lora"]["alpha"]) / int(meta["lora"]["rank"])
        downs = {
            k[: -len(".lora_A.default.weight")]: v
            for k, v in weights.items()
            if k.endswith(".lora_A.default.weight")
        }
        if not downs or len(downs) * 2 != len(weights):
            raise KeyError(f"{ckpt_dir}: LoRA checkpoint without matching lora_A/lora_B weights")
        for module, a in downs.items():
            b = weights[f"{module}.lora_B.default.weight"]
            target = base.get(f"{module}.weight")
            if target is None:
                raise KeyError(
                    f"{ckpt_dir}: LoRA on {module}, which {type(transformer).__name__} does not have"
                )
            target.add_((scale * (b.double() @ a.double())).to(target.dtype))
    elif meta.get("mode") == "full":
        missing = sorted(set(base) - set(weights))
        unknown = sorted(set(weights) - set(base))
        if missing or unknown:
            raise KeyError(
                f"{ckpt_dir}: full checkpoint does not fit the model: missing {missing[:3]}, unknown {unknown[:3]}"
            )
        for k, v in weights.items():
            base[k].copy_(v.to(base[k].dtype))
    else:
        raise ValueError(f"{ckpt_dir}: checkpoint has no model metadata (mode lora | full)")
    return ckpt_dir


# ---------------------------------------------------------------------------------------------- rewards


def build_reward(node: DictConfig, device: torch.device | str) -> Any:
    """Instantiate a reward node (``_target_``; or a root config, whose ``reward`` node is used).

    Every ``device`` key in the node's tree (a weighted reward's components, a PSR reward's detector
    and embedder) is set to ``device``, on a copy: the run's config is left as written.
    """
    import copy

    from hydra.utils import instantiate

    from rewards.cli import set_everywhere

    if "_target_" not in node and "reward" in node:
        node = node.reward
    if "_target_" not in node:
        raise ValueError(f"a reward config needs _target_ (conf/reward/*.yaml); got keys {sorted(node)}")
    node = copy.deepcopy(node)
    set_everywhere(node, "device", str(device))
    return instantiate(node)


def reward_inputs(records: Sequence[Any]) -> Any:
    """:class:`rewards.base.RewardInputs` from prompt records (prompt, references, names, categories)."""
    from rewards.base import RewardInputs

    return RewardInputs.from_records(records)


def gather_scores(engine: Any, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's ``[n_r]`` scores concatenated in rank order (collective). A rank that scored
    nothing passes ``{}``; the keys come from the first rank that has some."""
    keys: list[str] = next((k for k in engine.all_gather_object(sorted(local)) if k), [])
    empty = torch.empty(0, device=engine.device)
    return {k: engine.all_gather_tensor(local.get(k, empty)) for k in keys}


def reward_metrics(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    """``{"reward/<key>": mean over samples where it applies}`` (NaN = does not apply), the std of
    the combined and of each component score (``reward/score_std``, ``reward/<name>/score_std``),
    and the fraction of samples where the combined score applies."""
    out = {}
    for k, v in scores.items():
        v = v.detach().float()
        ok = ~torch.isnan(v)
        out[f"reward/{k}"] = float(v[ok].mean()) if bool(ok.any()) else float("nan")
        if k == "score" or k.endswith("/score"):
            out[f"reward/{k}_std"] = float(v[ok].std(unbiased=False)) if bool(ok.any()) else float("nan")
    if "score" in scores:
        out["reward/applies_frac"] = float((~torch.isnan(scores["score"].float())).float().mean())
    return out


def reward_components(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The per-reward scores of a weighted reward (``<name>/score``), by name; ``{}`` for a single reward."""
    return {k[: -len("/score")]: v for k, v in scores.items() if k.endswith("/score")}


def component_weights(reward: Any, components: dict[str, torch.Tensor]) -> dict[str, float]:
    """The weights of ``components`` in a weighted reward (``reward.weights``)."""
    weights = getattr(reward, "weights", None)
    if weights is None or set(components) - set(weights):
        raise ValueError(f"reward components {sorted(components)} have no weights in {type(reward).__name__}")
    return {k: float(weights[k]) for k in components}


# ---------------------------------------------------------------------------------------------- reporting


def print_outputs(name: str, run_dir: Path, seconds: float, extra: dict[str, Any] | None = None) -> None:
    """Print where a run's outputs are: checkpoints (and LoRA exports), metrics, image grids, config."""
    from psr import checkpoint as ckpt

    lines = [f"{name}: done in {seconds:.1f} s; outputs under {run_dir}"]
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    if latest is not None:
        lines.append(f"  checkpoint:  {latest}")
        if (latest / "lora").is_dir():
            lines.append(f"  LoRA (diffusers): {latest / 'lora'}")
    for label, rel in (
        ("metrics", "metrics.jsonl"),
        ("image grids", "images"),
        ("config", ".hydra/config.yaml"),
    ):
        if (run_dir / rel).exists():
            lines.append(f"  {label + ':':<12} {run_dir / rel}")
    for k, v in (extra or {}).items():
        lines.append(f"  {k + ':':<12} {v}")
    print("\n".join(lines), flush=True)


def to_plain(node: Any) -> Any:
    """A config node as plain Python containers (for kwargs and JSON)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
