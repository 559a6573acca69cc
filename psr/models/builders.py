"""Model builders: FLUX.1 Kontext from a local checkpoint, and a tiny random one built in code.

Every builder returns a :class:`~psr.models.policy.FlowPolicy`. The ``*_components`` functions return
the diffusers pipeline components (``transformer, vae, text_encoder, text_encoder_2, tokenizer,
tokenizer_2, scheduler``), which is what ``diffusers.FluxKontextPipeline(**components)`` takes and
what the data pipeline uses to render with diffusers' own pipelines.

Nothing here downloads: a real checkpoint is read from a local directory in diffusers layout or from
an already-filled Hugging Face cache (``local_files_only=True``).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import torch

from psr.models.policy import FlowPolicy

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
_EXPECTED_LAYOUT = (
    "a diffusers-layout directory with model_index.json and the subfolders transformer/, vae/, "
    "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/"
)
TINY_VAE_WEIGHTS = Path(__file__).with_name("assets") / "tiny_vae.safetensors"


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16" | "bf16" | "float16" | "fp16" | "float32" | "fp32"`` or a dtype -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "float32": torch.float32,
        "fp32": torch.float32,
    }
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r} (model.dtype); expected one of {sorted(table)}")
    return table[dtype]


def resolve_checkpoint(
    path: str | os.PathLike, *, config_key: str = "model.path", layout: str = _EXPECTED_LAYOUT
) -> Path:
    """A local diffusers directory, or a hub id already in the Hugging Face cache, as a local path.

    Raises:
        FileNotFoundError: naming ``config_key`` and the expected ``layout`` when neither exists.
    """
    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        if not (p / "model_index.json").is_file() and not (p / "transformer").is_dir():
            raise FileNotFoundError(f"{config_key}={path!s}: directory exists but is not {layout}")
        return p
    if "/" in str(path) and not str(path).startswith(("/", ".", "~")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(str(path), local_files_only=True))
        except (LocalEntryNotFoundError, FileNotFoundError, OSError) as err:
            raise FileNotFoundError(
                f"{config_key}={path!s}: not a local directory and not in the Hugging Face cache "
                f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}); psr never downloads. "
                f"Download it yourself (huggingface-cli download {path}) or point {config_key} at "
                f"{layout}."
            ) from err
    raise FileNotFoundError(f"{config_key}={path!s} does not exist; expected {layout}")


def load_components(
    path: str | os.PathLike,
    loaders: dict[str, tuple[Any, str | None]],
    *,
    layout: str,
    dtype: str | torch.dtype = "bfloat16",
    text_encoder_dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    text_encoder_device: str | torch.device | None = None,
    config_key: str = "model.path",
) -> tuple[Path, dict[str, Any]]:
    """Every component of a diffusers-layout checkpoint, offline: ``loaders`` maps each subfolder to
    ``(class, dtype keyword)`` (``"torch_dtype"`` for diffusers models, ``"dtype"`` for transformers
    models, None for tokenizers, processors and schedulers). Models are frozen, in eval mode, on
    ``device`` (text encoders, named ``text_encoder*``, on ``text_encoder_device`` when given, in
    ``text_encoder_dtype`` when given). Returns the resolved root and the components."""
    root = resolve_checkpoint(path, config_key=config_key, layout=layout)
    missing = [name for name in loaders if not (root / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"{config_key}={path!s}: missing subfolders {missing}; expected {layout}")
    dt = parse_dtype(dtype)
    te_dt = parse_dtype(text_encoder_dtype) if text_encoder_dtype is not None else dt
    comps: dict[str, Any] = {}
    for name, (cls, dtype_kw) in loaders.items():
        is_text = name.startswith("text_encoder")
        kw: dict[str, Any] = {"local_files_only": True}
        if dtype_kw is not None:
            kw[dtype_kw] = te_dt if is_text else dt
        comps[name] = cls.from_pretrained(root / name, **kw)
        if dtype_kw is not None:
            where = text_encoder_device if is_text and text_encoder_device else device
            comps[name].to(where).requires_grad_(False).eval()
    return root, comps


def flux_kontext_components(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "bfloat16",
    text_encoder_dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    text_encoder_device: str | torch.device | None = None,
    config_key: str = "model.path",
) -> dict[str, Any]:
    """Load the components of a FLUX.1 Kontext checkpoint in diffusers layout, offline.

    ``text_encoder_device`` (default: ``device``) places CLIP and T5 elsewhere, e.g. ``cpu`` to keep
    T5-XXL's ~9 GiB off the GPU: prompts are encoded once per prompt and cached, then moved."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast  # type: ignore[attr-defined]

    tokenizer_2_cls: Any = T5TokenizerFast
    tokenizer_2 = resolve_checkpoint(path, config_key=config_key) / "tokenizer_2"
    if (tokenizer_2 / "added_tokens.json").is_file() and not (tokenizer_2 / "spiece.model").is_file():
        from transformers import ByT5Tokenizer

        tokenizer_2_cls = ByT5Tokenizer  # the tiny model's byte-level tokenizer
    loaders: dict[str, tuple[Any, str | None]] = {
        "transformer": (FluxTransformer2DModel, "torch_dtype"),
        "vae": (AutoencoderKL, "torch_dtype"),
        "text_encoder": (CLIPTextModel, "dtype"),
        "text_encoder_2": (T5EncoderModel, "dtype"),
        "tokenizer": (CLIPTokenizer, None),
        "tokenizer_2": (tokenizer_2_cls, None),
        "scheduler": (FlowMatchEulerDiscreteScheduler, None),
    }
    _, comps = load_components(
        path,
        loaders,
        layout=_EXPECTED_LAYOUT,
        dtype=dtype,
        text_encoder_dtype=text_encoder_dtype,
        device=device,
        text_encoder_device=text_encoder_device,
        config_key=config_key,
    )
    return comps


def clip_tokenizer_offline(model_max_length: int = 77) -> Any:
    """The real CLIP BPE tokenizer, built from the vocabulary file shipped in open_clip's wheel."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    with gzip.open(default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={v: i for i, v in enumerate(vocab)},
        merges=merges,  # type: ignore[arg-type]  # pairs are accepted
        model_max_length=model_max_length,
    )


def tiny_flux_kontext_components(seed: int = 0, *, fitted_vae: bool = True) -> dict[str, Any]:
    """Every FLUX.1 Kontext component at toy size with random weights, deterministic in ``seed``.

    Shapes: 1 double + 1 single block, 2 heads x 16 dims, RoPE axes (4, 6, 6); VAE with 4 blocks
    (8x downsampling) and 4 latent channels, so packed tokens have 16 channels; CLIP and T5 with
    hidden size 32. 64x64 pixels -> 16 target tokens.

    Args:
        seed: seeds every random initialization.
        fitted_vae: load the shipped tiny VAE that was fitted as an autoencoder on coloured shapes
            (``psr/models/assets/tiny_vae.safetensors``, made by ``scripts/fit_tiny_vae.py``). A
            random decoder's output hardly depends on its input, so nothing learns through it.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import ByT5Tokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    vae = tiny_vae(seed)
    if fitted_vae:
        from safetensors.torch import load_file

        vae.load_state_dict(load_file(TINY_VAE_WEIGHTS))
    tokenizer = clip_tokenizer_offline()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=32,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=1,
        )
    )
    tokenizer_2 = ByT5Tokenizer()
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    comps: dict[str, Any] = {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
    }
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        comps[name].requires_grad_(False).eval()
    return comps


def tiny_vae(seed: int = 0) -> Any:
    """The tiny VAE architecture (random weights): 3 -> 4 latent channels, 8x downsampling."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=1.0,
        shift_factor=0.0,
    )


def save_components(components: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write components in diffusers layout (what ``flux_kontext(path)`` and diffusers load)."""
    from diffusers import FluxKontextPipeline

    out = Path(path)
    FluxKontextPipeline(**{k: components[k] for k in COMPONENTS}).save_pretrained(out)  # type: ignore[attr-defined]
    return out


def flux_kontext(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "bfloat16",
    text_encoder_dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    position_scheme: str = "framewise",
    reference_max_area: int | None = None,
    guidance: float | None = 2.5,
    max_sequence_length: int = 512,
    gradient_checkpointing: bool = False,
    text_encoder_device: str | torch.device | None = None,
) -> FlowPolicy:
    """FLUX.1 Kontext-dev (or any checkpoint in its layout) as a multi-reference policy.

    Args:
        path: local diffusers directory or a hub id already in the HF cache (config key ``model.path``).
        dtype: transformer and VAE dtype; log-prob math is fp32 regardless.
        position_scheme: ``framewise`` (PSR), ``uno`` (diagonal offsets) or ``kontext`` (all index 1).
        reference_max_area: pixel-area budget per reference; None = the target's area.
        guidance: distilled guidance scale (Kontext-dev's default 2.5).
        text_encoder_device: where CLIP and T5 run (default ``device``; ``cpu`` saves GPU memory).
    """
    comps = flux_kontext_components(
        path,
        dtype=dtype,
        text_encoder_dtype=text_encoder_dtype,
        device=device,
        text_encoder_device=text_encoder_device,
    )
    return FlowPolicy(
        **comps,
        position_scheme=position_scheme,
        reference_max_area=reference_max_area,
        guidance=guidance,
        max_sequence_length=max_sequence_length,
        gradient_checkpointing=gradient_checkpointing,
    )


def tiny_flux_kontext(
    seed: int = 0,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    position_scheme: str = "framewise",
    reference_max_area: int | None = None,
    guidance: float | None = 2.5,
    fitted_vae: bool = True,
    gradient_checkpointing: bool = False,
) -> FlowPolicy:
    """The embedded default: a tiny random FLUX.1 Kontext (see :func:`tiny_flux_kontext_components`)."""
    comps = tiny_flux_kontext_components(seed, fitted_vae=fitted_vae)
    dt = parse_dtype(dtype)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        # built in float32; a dtype argument only when it changes (diffusers warns on any dtype cast)
        comps[name].to(device=device, **({} if dt == torch.float32 else {"dtype": dt}))
    return FlowPolicy(
        **comps,
        position_scheme=position_scheme,
        reference_max_area=reference_max_area,
        guidance=guidance,
        max_sequence_length=32,
        gradient_checkpointing=gradient_checkpointing,
    )
