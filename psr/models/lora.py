"""LoRA on the transformer's attention projections, through peft (diffusers' adapter integration).

The reference policy for KL is the same transformer with adapters disabled
(:meth:`psr.models.policy.FlowPolicy.adapters_disabled`), so no second copy of the weights exists.
LoRA weights are exported in the diffusers format that ``FluxKontextPipeline.load_lora_weights``
reads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Flow-GRPO's and diffusers' FLUX LoRA targets: joint attention of double and single blocks.
DEFAULT_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


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
        rank: LoRA rank r (config key ``model.lora.rank``).
        alpha: scaling numerator; None = rank (scale 1).
        targets: module-name suffixes to adapt (``model.lora.targets``).
        init: peft's ``init_lora_weights`` ("gaussian": A ~ N(0, 1/r), B = 0, so the adapted model
            starts equal to the base model).
    """
    from peft import LoraConfig

    if rank <= 0:
        raise ValueError(f"model.lora.rank must be > 0, got {rank}")
    names = {n for n, _ in transformer.named_modules()}
    matched = [t for t in targets if any(n.endswith(t) for n in names)]
    if not matched:
        raise ValueError(
            f"model.lora.targets={list(targets)} match no module of {type(transformer).__name__}"
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


def export_diffusers_lora(transformer: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` that ``FluxKontextPipeline.load_lora_weights`` loads."""
    from diffusers import FluxKontextPipeline

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    FluxKontextPipeline.save_lora_weights(
        out, transformer_lora_layers=lora_state_dict(transformer), safe_serialization=True
    )
    return out / "pytorch_lora_weights.safetensors"


def merge_lora(transformer: Any) -> Any:
    """Fold the adapter into the base weights (for export of a full model) and drop it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    transformer.delete_adapters(list(transformer.peft_config))
    return transformer
