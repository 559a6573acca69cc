"""All LoRA code in one tested place: peft injection, the trainable set of a run (LoRA or full),
checkpoint metadata, the merge ``W += (alpha / r) B A``, and the diffusers-format export and load.

The reference policy for KL is the same transformer with adapters disabled
(:meth:`psr.models.policy.FlowPolicy.reference_policy`), so no second copy of the weights exists.
Exported files are what ``FluxKontextPipeline.load_lora_weights`` reads, with the adapter's rank and
alpha in the file's metadata so that every loader applies the scale ``alpha / r`` (not 1).

Weight names: the engine and ``trainable.safetensors`` use the transformer's parameter names
(``<module>.lora_A.default.weight``); peft state dicts drop the adapter name (``<module>.lora_A.weight``);
diffusers files prefix those with ``transformer.``. :func:`merge_lora` reads all three.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "DEFAULT_TARGETS",
    "add_lora",
    "make_trainable",
    "lora_config",
    "lora_state_dict",
    "load_lora_state_dict",
    "diffusers_lora_layers",
    "export_diffusers_lora",
    "read_diffusers_lora",
    "merge_lora",
]

# Flow-GRPO's and diffusers' FLUX LoRA targets: joint attention of double and single blocks (FLUX.1,
# Qwen-Image); FLUX.2's single blocks hold their attention input in one fused projection
# (attn.to_qkv_mlp_proj). A target that matches no module of a backbone is skipped.
DEFAULT_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_qkv_mlp_proj",
)
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' load_lora_weights looks for
_LORA_KEY = re.compile(r"^(?:transformer\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$")


def add_lora(
    transformer: Any,
    *,
    rank: int = 64,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
    init: str | bool = "gaussian",
    adapter_name: str = "default",
) -> list[nn.Parameter]:
    """Freeze the transformer, add a LoRA adapter, return the trainable LoRA parameters.

    Args:
        rank: LoRA rank r (config key ``train.lora.rank``).
        alpha: scaling numerator; None = rank (scale 1).
        targets: module-name suffixes to adapt (``train.lora.targets``).
        init: peft's ``init_lora_weights`` ("gaussian": A ~ N(0, 1/r), B = 0, so the adapted model
            starts equal to the base model).
    """
    from peft import LoraConfig

    if rank <= 0:
        raise ValueError(f"train.lora.rank must be > 0, got {rank}")
    names = {n for n, _ in transformer.named_modules()}
    matched = [t for t in targets if any(n.endswith(t) for n in names)]
    if not matched:
        raise ValueError(
            f"train.lora.targets={list(targets)} match no module of {type(transformer).__name__}"
        )
    transformer.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,  # type: ignore[arg-type]  # peft accepts floats
        lora_dropout=dropout,
        target_modules=list(matched),
        init_lora_weights=init,  # type: ignore[arg-type]  # checked by peft
    )
    transformer.add_adapter(config, adapter_name=adapter_name)
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def make_trainable(
    policy: Any,
    mode: str,
    *,
    rank: int = 64,
    alpha: float | None = None,
    targets: Sequence[str] | None = None,
    init: str | bool = "gaussian",
    keep_reference: bool = False,
) -> list[nn.Parameter]:
    """Make ``policy.transformer`` trainable as ``train.mode`` says; text encoders and VAE stay frozen.

    Args:
        policy: a :class:`~psr.models.policy.FlowPolicy` (its ``transformer``).
        mode: ``lora`` (a new adapter, trained alone; ``rank``, ``alpha``, ``targets``, ``init`` as in
            :func:`add_lora`, ``targets=None``: :data:`DEFAULT_TARGETS`) or ``full`` (every
            transformer weight).
        keep_reference: full fine-tuning only: keep a frozen copy of the transformer for an
            objective that needs the reference policy (DPO, a KL term). With LoRA the reference is
            the network with its adapters disabled and costs nothing.

    Returns:
        The trainable parameters, for the engine.
    """
    if mode == "lora":
        return add_lora(
            policy.transformer,
            rank=int(rank),
            alpha=float(alpha) if alpha is not None else None,
            targets=tuple(targets or DEFAULT_TARGETS),
            init=init,
        )
    if mode == "full":
        if keep_reference:
            policy.keep_reference_copy()
        policy.transformer.requires_grad_(True)
        return list(policy.transformer.parameters())
    raise ValueError(f"train.mode={mode!r}; expected lora or full")


def lora_config(transformer: Any) -> dict[str, Any] | None:
    """``{"rank", "alpha", "targets"}`` of the transformer's adapter (checkpoint metadata), or None
    for a transformer without one (full fine-tuning)."""
    configs = getattr(transformer, "peft_config", None)
    if not configs:
        return None
    cfg = configs["default"]
    return {"rank": int(cfg.r), "alpha": float(cfg.lora_alpha), "targets": sorted(cfg.target_modules)}


def lora_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """peft-named LoRA weights (``...lora_A.weight``) of the active adapter, detached, on CPU."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


def load_lora_state_dict(transformer: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load weights from :func:`lora_state_dict` into an adapter added with the same config."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(transformer, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise KeyError(f"LoRA state has keys the model does not: {unexpected[:5]} ...")


def diffusers_lora_layers(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Engine-named LoRA weights (``...lora_A.default.weight``) as peft names without the adapter name."""
    return {
        k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
        for k, v in weights.items()
    }


def export_diffusers_lora(
    transformer_or_peft_config: Any, weights: Mapping[str, torch.Tensor], path: str | os.PathLike
) -> Path:
    """Write ``path/pytorch_lora_weights.safetensors`` that ``FluxKontextPipeline.load_lora_weights`` loads.

    Args:
        transformer_or_peft_config: the adapted transformer, or its ``LoraConfig``: rank, alpha and
            targets travel in the file's metadata, so loaders apply scale ``alpha / r``, not 1.
        weights: the LoRA weights to write, engine- or peft-named (e.g. the EMA's shadow weights,
            which need not be the ones in the transformer).
        path: the output directory (created).

    Returns:
        The written file.
    """
    from diffusers import FluxKontextPipeline

    config = transformer_or_peft_config
    if hasattr(config, "peft_config"):
        config = config.peft_config["default"]
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    FluxKontextPipeline.save_lora_weights(
        out,
        transformer_lora_layers={
            k: v.detach().cpu().contiguous() for k, v in diffusers_lora_layers(weights).items()
        },
        safe_serialization=True,
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    return out / WEIGHTS_NAME


def read_diffusers_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], float]:
    """The weights and the scale ``alpha / r`` of a diffusers-format LoRA file (or its folder).

    The scale comes from the metadata :func:`export_diffusers_lora` writes; a file without it gets
    scale 1, as diffusers assumes.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        p = p / WEIGHTS_NAME
    if not p.is_file():
        raise FileNotFoundError(f"lora={path}: no such file (a diffusers LoRA .safetensors or its folder)")
    with safe_open(str(p), framework="pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    scale = 1.0
    if raw:
        meta = json.loads(raw)
        if meta.get("transformer.rank_pattern") or meta.get("transformer.alpha_pattern"):
            raise ValueError(f"{p}: per-module rank or alpha patterns are not supported")
        scale = float(meta["transformer.lora_alpha"]) / int(meta["transformer.r"])
    return load_file(str(p)), scale


@torch.no_grad()
def merge_lora(
    transformer: Any, weights: Mapping[str, torch.Tensor], scale: float, *, source: str = ""
) -> None:
    """Add a LoRA's product into the base weights: ``W += scale * B A`` with ``scale = alpha / r``.

    The product is formed in float64 and rounded once into ``W``'s dtype. Adapters already on the
    transformer are left as they are (their base weights, ``base_layer``, are the ones changed).

    Args:
        weights: ``lora_A`` / ``lora_B`` pairs, engine-, peft- or diffusers-named (``[r, in]`` and
            ``[out, r]`` per module); nothing else.
        scale: ``alpha / r`` of the adapter that produced them.
        source: where the weights come from, for error messages.
    """
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise KeyError(f"{source}: {key} is not a LoRA weight (<module>.lora_A|lora_B.weight)")
        pairs.setdefault(match.group(1), {})[match.group(2)] = value
    if not pairs or any(len(p) != 2 for p in pairs.values()):
        raise KeyError(f"{source}: LoRA weights without matching lora_A/lora_B pairs")
    base = {
        k.replace(".base_layer.", "."): v
        for k, v in transformer.state_dict(keep_vars=True).items()
        if "lora_" not in k
    }
    for module, ab in pairs.items():
        target = base.get(f"{module}.weight")
        if target is None:
            raise KeyError(f"{source}: LoRA on {module}, which {type(transformer).__name__} does not have")
        target.add_((scale * (ab["B"].double() @ ab["A"].double())).to(target.dtype))
