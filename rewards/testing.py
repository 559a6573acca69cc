"""Tiny random-weight versions of every reward backbone, built from configs in code (CPU, < 1 s each).

They run the same code paths as the real models (preprocessing, tokenization, batching, matching)
so tests, benchmarks and the tiny quickstart need no weights. Scores from random weights carry no
meaning beyond "the pipeline runs and is deterministic". Tokenizers need no download either: a
BERT WordPiece vocabulary made here (with BERT's ids for [CLS], [SEP], "." and "?", which Grounding
DINO relies on), the real CLIP BPE that ships inside the open_clip wheel, and a byte-level BPE with
Qwen's special tokens and chat template for the Qwen vision-language models.
"""

from __future__ import annotations

import gzip
import string
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache, lru_cache
from typing import Any

import torch
from torch import Tensor

from rewards.detectors import GroundingDinoDetector, Owlv2Detector
from rewards.embedders import HFImageEmbedder
from rewards.imaging import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, ImageTransform
from rewards.subject_consistency import SubjectConsistencyReward

# the transformer towers of every tiny backbone: one layer of width 32, 2 heads
TINY_TOWER: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
)

__all__ = [
    "bert_vocab",
    "tiny_bert_tokenizer",
    "clip_tokenizer",
    "tiny_grounding_dino",
    "tiny_owlv2",
    "tiny_dino",
    "tiny_dinov2",
    "tiny_clip_image",
    "tiny_psr",
    "tiny_open_clip",
    "tiny_clip_t",
    "tiny_hps",
    "tiny_pickscore",
    "tiny_imagereward_checkpoint",
    "tiny_imagereward",
    "tiny_spatial",
    "QWEN_CHAT_TEMPLATE",
    "qwen_tokenizer",
    "tiny_qwen_vl_processor",
    "tiny_qwen_vl_config",
    "tiny_qwen_vl",
]

# BERT's ids for the tokens Grounding DINO hard-codes as separators
_BERT_SPECIAL = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}
_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "to",
    "on",
    "in",
    "at",
    "and",
    "with",
    "is",
    "are",
    "left",
    "right",
    "above",
    "below",
    "under",
    "next",
    "beside",
    "dog",
    "cat",
    "corgi",
    "square",
    "disc",
    "triangle",
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "white",
    "table",
    "side",
    "by",
    "photo",
    "person",
    "mug",
    "hat",
    "chef",
    "scarf",
    "bear",
    "toy",
    "cup",
    "book",
]


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Build under a fixed seed without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@lru_cache(maxsize=1)
def bert_vocab() -> dict[str, int]:
    """A WordPiece vocabulary (~1,200 entries) with BERT's special-token ids, every lower-case letter
    and digit (so any word tokenizes, letter by letter at worst), punctuation, and a few words."""
    tokens: dict[int, str] = {i: tok for tok, i in _BERT_SPECIAL.items()}
    pieces = (
        list(_WORDS)
        + list(string.ascii_lowercase + string.digits)
        + ["##" + c for c in string.ascii_lowercase + string.digits]
    )
    pieces += [c for c in string.punctuation if c not in ".?"]
    free = (i for i in range(1, 2000) if i not in tokens)
    for piece in pieces:
        tokens[next(free)] = piece
    size = max(tokens) + 1
    return {tokens.get(i, f"[unused{i}]"): i for i in range(size)}


def tiny_bert_tokenizer() -> Any:
    from transformers import BertTokenizer

    return BertTokenizer(vocab=dict(bert_vocab()), do_lower_case=True)


@lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP BPE vocabulary and merges, read from the file the open_clip wheel ships (the same
    construction as open_clip's ``SimpleTokenizer``)."""
    from importlib.resources import files

    from open_clip.tokenizer import bytes_to_unicode

    raw = gzip.decompress((files("open_clip") / "bpe_simple_vocab_16e6.txt.gz").read_bytes()).decode("utf-8")
    merges = [tuple(line.split()) for line in raw.split("\n")[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {v: i for i, v in enumerate(vocab)}, merges  # type: ignore[return-value]


def clip_tokenizer(model_max_length: int = 77) -> Any:
    """transformers ``CLIPTokenizer`` with the real CLIP BPE (same ids as open_clip's tokenizer)."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- detectors


def tiny_grounding_dino(
    seed: int = 0,
    *,
    box_threshold: float = 0.35,
    text_threshold: float = 0.25,
    size: int = 256,
    device: str = "cpu",
    dtype: str = "float32",
) -> GroundingDinoDetector:
    """Grounding DINO with a 4-stage Swin of width 16, a 1-layer BERT, 20 queries (inputs >= 256 px)."""
    from transformers import BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection, SwinConfig

    backbone = SwinConfig(
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        out_features=["stage2", "stage3", "stage4"],  # type: ignore[call-arg]  # accepted by SwinConfig's kwargs
    )
    text = BertConfig(
        vocab_size=len(bert_vocab()),
        **TINY_TOWER,
        max_position_embeddings=64,
    )
    cfg = GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text,
        num_queries=20,
        encoder_layers=1,
        decoder_layers=2,
        d_model=32,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        max_text_len=32,
        encoder_n_points=2,
        decoder_n_points=2,
    )
    with _seeded(seed):
        model = GroundingDinoForObjectDetection(cfg)
    return GroundingDinoDetector(
        model,
        tiny_bert_tokenizer(),
        box_threshold=box_threshold,
        text_threshold=text_threshold,
        size=size,
        device=device,
        dtype=dtype,
    )


def tiny_owlv2(
    seed: int = 0, *, threshold: float = 0.1, device: str = "cpu", dtype: str = "float32"
) -> Owlv2Detector:
    """OWLv2 with 1-layer towers of width 32 at 64 px (16 patches), the real CLIP BPE tokenizer."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection

    cfg = Owlv2Config(
        text_config=dict(
            vocab_size=49408,
            **TINY_TOWER,
            max_position_embeddings=16,
        ),
        vision_config=dict(
            **TINY_TOWER,
            image_size=64,
            patch_size=16,
        ),
        projection_dim=32,
    )
    with _seeded(seed):
        model = Owlv2ForObjectDetection(cfg)
    return Owlv2Detector(model, clip_tokenizer(16), threshold=threshold, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------- embedders


def tiny_dino(seed: int = 0, *, device: str = "cpu", dtype: str = "float32") -> HFImageEmbedder:
    """A ViT in DINO's layout (patch 8, width 32, 1 layer), PSRBench-style transform at 40 -> 32 px."""
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(
        **TINY_TOWER,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-6,
    )
    with _seeded(seed):
        model = ViTModel(cfg, add_pooling_layer=False)
    return HFImageEmbedder(
        model, ImageTransform(40, 32, IMAGENET_MEAN, IMAGENET_STD), device=device, dtype=dtype
    )


def tiny_dinov2(seed: int = 0, *, device: str = "cpu", dtype: str = "float32") -> HFImageEmbedder:
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8, mlp_ratio=2
    )
    with _seeded(seed):
        model = Dinov2Model(cfg)
    return HFImageEmbedder(
        model, ImageTransform(40, 32, IMAGENET_MEAN, IMAGENET_STD), device=device, dtype=dtype
    )


def tiny_clip_image(seed: int = 0, *, device: str = "cpu", dtype: str = "float32") -> HFImageEmbedder:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(
        **TINY_TOWER,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    with _seeded(seed):
        model = CLIPVisionModelWithProjection(cfg)
    return HFImageEmbedder(
        model, ImageTransform(32, 32, CLIP_MEAN, CLIP_STD), output="image_embeds", device=device, dtype=dtype
    )


_DETECTORS = {"grounding_dino": tiny_grounding_dino, "owlv2": tiny_owlv2}
_EMBEDDERS = {"dino": tiny_dino, "dinov2": tiny_dinov2, "clip": tiny_clip_image}


def _pick(table: dict[str, Any], kind: str, what: str) -> Any:
    if kind not in table:
        raise ValueError(f"{what}={kind!r}; expected one of {sorted(table)}")
    return table[kind]


def tiny_psr(
    seed: int = 0,
    *,
    detector: str = "grounding_dino",
    embedder: str = "dino",
    box_threshold: float = 0.35,
    device: str = "cpu",
    dtype: str = "float32",
    **reward_kwargs: Any,
) -> SubjectConsistencyReward:
    """The PSR reward on tiny random backbones (``detector``: grounding_dino | owlv2; ``embedder``:
    dino | dinov2 | clip); other keyword arguments go to :class:`SubjectConsistencyReward`."""
    if detector == "grounding_dino":
        det: Any = tiny_grounding_dino(seed, box_threshold=box_threshold, device=device, dtype=dtype)
    else:
        det = _pick(_DETECTORS, detector, "detector")(seed, device=device, dtype=dtype)
    emb = _pick(_EMBEDDERS, embedder, "embedder")(seed, device=device, dtype=dtype)
    return SubjectConsistencyReward(det, emb, **reward_kwargs)


def tiny_spatial(seed: int = 0, *, device: str = "cpu", dtype: str = "float32", **reward_kwargs: Any) -> Any:
    from rewards.spatial import SpatialReward

    return SpatialReward(tiny_grounding_dino(seed, device=device, dtype=dtype), **reward_kwargs)


# ---------------------------------------------------------------------------------------------- text-image rewards


def tiny_open_clip(seed: int = 0) -> tuple[Any, Any]:
    """An open_clip ``CLIP`` (1-layer towers of width 32, 32 px) and the real CLIP BPE tokenizer."""
    import open_clip

    with _seeded(seed):
        model = open_clip.CLIP(
            embed_dim=16,
            vision_cfg={"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
            text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        )
    return model, open_clip.get_tokenizer("ViT-B-32")


def tiny_clip_t(seed: int = 0, *, scale: float = 1.0, device: str = "cpu", dtype: str = "float32") -> Any:
    from rewards.text_alignment import ClipTextAlignment

    model, tokenizer = tiny_open_clip(seed)
    return ClipTextAlignment(model, tokenizer, scale=scale, device=device, dtype=dtype)


def tiny_hps(seed: int = 0, *, device: str = "cpu", dtype: str = "float32") -> Any:
    from rewards.preference import HPSv2

    model, tokenizer = tiny_open_clip(seed)
    return HPSv2(model, tokenizer, device=device, dtype=dtype)


def tiny_pickscore(seed: int = 0, *, device: str = "cpu", dtype: str = "float32") -> Any:
    from transformers import CLIPConfig, CLIPModel

    from rewards.preference import PickScore

    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            **TINY_TOWER,
            max_position_embeddings=77,
        ),
        vision_config=dict(
            **TINY_TOWER,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    with _seeded(seed):
        model = CLIPModel(cfg)
    return PickScore(model, clip_tokenizer(77), device=device, dtype=dtype)


def tiny_imagereward_checkpoint(
    seed: int = 0, *, vision_width: int = 128, text_width: int = 64, layers: int = 1
) -> dict[str, Tensor]:
    """A random state dict in the published ``ImageReward.pt`` layout (timm ViT + BLIP med BERT + MLP
    head, with the unused contrastive projections), tiny: 32 px images of 8 px patches, vision heads
    of width 64 (as BLIP's), the :func:`bert_vocab` vocabulary + [DEC] and [ENC]."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.05) -> Tensor:
        return torch.randn(*shape, generator=g) * scale

    def norm(prefix: str, width: int) -> dict[str, Tensor]:
        return {f"{prefix}.weight": 1 + rnd(width), f"{prefix}.bias": rnd(width)}

    def linear(prefix: str, out_f: int, in_f: int) -> dict[str, Tensor]:
        return {f"{prefix}.weight": rnd(out_f, in_f, scale=in_f**-0.5), f"{prefix}.bias": rnd(out_f)}

    dv, dt, patch, grid, vocab = vision_width, text_width, 8, 4, len(bert_vocab()) + 2
    sd: dict[str, Tensor] = {}
    v = "blip.visual_encoder"
    sd[f"{v}.cls_token"] = rnd(1, 1, dv)
    sd[f"{v}.pos_embed"] = rnd(1, grid * grid + 1, dv)
    sd |= linear(f"{v}.patch_embed.proj", dv, 3 * patch * patch)
    sd[f"{v}.patch_embed.proj.weight"] = sd[f"{v}.patch_embed.proj.weight"].reshape(dv, 3, patch, patch)
    for i in range(layers):
        b = f"{v}.blocks.{i}"
        sd |= norm(f"{b}.norm1", dv) | linear(f"{b}.attn.qkv", 3 * dv, dv) | linear(f"{b}.attn.proj", dv, dv)
        sd |= norm(f"{b}.norm2", dv) | linear(f"{b}.mlp.fc1", 4 * dv, dv) | linear(f"{b}.mlp.fc2", dv, 4 * dv)
    sd |= norm(f"{v}.norm", dv)
    t = "blip.text_encoder"
    sd[f"{t}.embeddings.word_embeddings.weight"] = rnd(vocab, dt, scale=0.5)
    sd[f"{t}.embeddings.position_embeddings.weight"] = rnd(40, dt, scale=0.5)
    sd[f"{t}.embeddings.position_ids"] = torch.arange(40)[None]
    sd |= norm(f"{t}.embeddings.LayerNorm", dt)
    for i in range(layers):
        b = f"{t}.encoder.layer.{i}"
        for att, kv_width in (("attention", dt), ("crossattention", dv)):
            sd |= linear(f"{b}.{att}.self.query", dt, dt) | linear(f"{b}.{att}.self.key", dt, kv_width)
            sd |= linear(f"{b}.{att}.self.value", dt, kv_width) | linear(f"{b}.{att}.output.dense", dt, dt)
            sd |= norm(f"{b}.{att}.output.LayerNorm", dt)
        sd |= (
            linear(f"{b}.intermediate.dense", 2 * dt, dt)
            | linear(f"{b}.output.dense", dt, 2 * dt)
            | norm(f"{b}.output.LayerNorm", dt)
        )
    sd |= linear("blip.vision_proj", 16, dv) | linear("blip.text_proj", 16, dt)
    for idx, (o, i) in zip(
        (0, 2, 4, 6, 7), ((1024, dt), (128, 1024), (64, 128), (16, 64), (1, 16)), strict=True
    ):
        sd |= linear(f"mlp.layers.{idx}", o, i)
    return sd


TINY_MED_CONFIG = {"num_attention_heads": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 0}


def tiny_imagereward(seed: int = 0, *, device: str = "cpu", dtype: str = "float32") -> Any:
    """ImageReward on :func:`tiny_imagereward_checkpoint`, loaded through the published-key mapping."""
    from rewards.preference import (
        ImageReward,
        ImageRewardModel,
        blip_tokenizer,
        imagereward_configs,
        imagereward_state_dict,
    )

    state = tiny_imagereward_checkpoint(seed)
    model = ImageRewardModel(*imagereward_configs(state, TINY_MED_CONFIG))
    model.load_state_dict(imagereward_state_dict(state), strict=True)
    return ImageReward(model, blip_tokenizer(tiny_bert_tokenizer()), device=device, dtype=dtype)


# ---------------------------------------------------------------- tiny Qwen vision-language models
# No Qwen tokenizer ships offline. A byte-level BPE trained here on a few sentences, with Qwen's
# special tokens and a chat template of the same shape as Qwen's, drives the real processor and model
# classes; the model config's image / video / vision token ids are set to this tokenizer's ids.

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# system turn, then each message's images (<|vision_start|><|image_pad|><|vision_end|>) and text in order
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_QWEN_CORPUS = [
    "You are a helpful assistant.",
    "[Thought]: The image shows a dog wearing a red hat next to a cat in a blue scarf. [Score]: 7",
    "Rate how well the image matches the description on a scale from 0 to 10.",
    "Yes No yes no 0 1 2 3 4 5 6 7 8 9 10 0.5 8.5",
    "a photo of a person, a man, a woman, a mug, a backpack on the left of a table",
]


@cache
def _qwen_bpe(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_QWEN_CORPUS * 4, trainer)
    return str(tok.to_str())


def qwen_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` with Qwen's special tokens and chat template
    (ids differ from Qwen's; the vocabulary is tiny). Deterministic: the same ids on every call."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_qwen_bpe(vocab_size)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=4096,
    )
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def _qwen_vl_parts(kind: str) -> tuple[Any, Any, Any, Any]:
    import transformers as tf

    if kind == "qwen2_5_vl":
        return tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLProcessor, 112
    if kind == "qwen2_vl":
        return tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLProcessor, None
    raise ValueError(f"kind={kind!r}; expected 'qwen2_5_vl' or 'qwen2_vl'")


def tiny_qwen_vl_processor(kind: str = "qwen2_5_vl", *, max_pixels: int = 56 * 56 * 4) -> Any:
    """The real Qwen2(.5)-VL processor over :func:`qwen_tokenizer`; images are resized to at most
    ``max_pixels`` (a 112 x 112 image becomes 16 patches of 14 px, 4 tokens after the 2x2 merge)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    _, _, processor_cls, _ = _qwen_vl_parts(kind)
    size = {"shortest_edge": 56 * 56, "longest_edge": max_pixels}
    return processor_cls(
        image_processor=Qwen2VLImageProcessor(size=size),
        video_processor=Qwen2VLVideoProcessor(size=size),
        tokenizer=qwen_tokenizer(),
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def tiny_qwen_vl_config(kind: str = "qwen2_5_vl", *, hidden_size: int = 64) -> Any:
    """A 2-layer Qwen2(.5)-VL config (width ``hidden_size``, 2 heads, a 1-block vision tower) whose
    special-token ids are :func:`qwen_tokenizer`'s."""
    config_cls, _, _, window = _qwen_vl_parts(kind)
    tok = qwen_tokenizer()
    ids = {name: tok.convert_tokens_to_ids(f"<|{name}|>") for name in ("image_pad", "video_pad")}
    vision: dict[str, Any] = dict(
        depth=1, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2
    )
    if kind == "qwen2_5_vl":
        vision.update(
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=hidden_size,
            window_size=window,
            fullatt_block_indexes=[0],
        )
    else:
        vision.update(embed_dim=32, hidden_size=hidden_size, mlp_ratio=2)
    head_dim = hidden_size // 2
    text = dict(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16],
        },
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
    )
    return config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image_pad"],
        video_token_id=ids["video_pad"],
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def tiny_qwen_vl(kind: str = "qwen2_5_vl", seed: int = 0, *, hidden_size: int = 64) -> tuple[Any, Any]:
    """``(model, processor)``: a random tiny Qwen2.5-VL (or Qwen2-VL) for conditional generation, in
    eval mode, fp32. Save both with ``save_pretrained`` to get a folder the real loaders accept."""
    _, model_cls, _, _ = _qwen_vl_parts(kind)
    with _seeded(seed):
        model = model_cls(tiny_qwen_vl_config(kind, hidden_size=hidden_size)).eval()
    return model, tiny_qwen_vl_processor(kind)


# ---------------------------------------------------------------- a stub OpenAI-compatible server


class StubChatServer:
    """A local HTTP server in a thread that answers ``POST /v1/chat/completions`` with
    ``respond(body, headers) -> (status, payload)``: a payload that is a dict is sent as JSON, bytes
    as they are, ``"drop"`` closes the connection without a reply; ``delay`` seconds pass before any
    answer. It records every request body and header set and the most requests handled at once
    (``max_active``). Use as a context manager; ``base_url`` ends in ``/v1``."""

    def __init__(self, respond: Any, delay: float = 0.0) -> None:
        import json
        import threading
        import time
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.respond, self.delay = respond, delay
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.active = self.max_active = 0
        lock, stub = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                with lock:
                    stub.active += 1
                    stub.max_active = max(stub.max_active, stub.active)
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                    with lock:
                        stub.bodies.append(body)
                        stub.headers.append({k.lower(): v for k, v in self.headers.items()})
                    time.sleep(stub.delay)
                    status, payload = stub.respond(body, dict(self.headers))
                    if isinstance(payload, str) and payload == "drop":
                        self.close_connection = True
                        return
                    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass
                finally:
                    with lock:
                        stub.active -= 1

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StubChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


def chat_reply(content: str) -> dict[str, Any]:
    """A minimal chat completion whose message is ``content``."""
    message = {"role": "assistant", "content": content}
    return {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}


def logprobs_reply(top: dict[str, float]) -> dict[str, Any]:
    """A chat completion of one token with vLLM's ``logprobs`` layout: ``top`` maps token text to
    probability, listed as ``top_logprobs`` (most likely first)."""
    import math

    ranked = sorted(top.items(), key=lambda kv: -kv[1])
    entries = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in ranked]
    content = [{**entries[0], "top_logprobs": entries}]
    message = {"role": "assistant", "content": ranked[0][0]}
    choice = {"index": 0, "message": message, "logprobs": {"content": content}, "finish_reason": "length"}
    return {"choices": [choice]}


# ---------------------------------------------------------------- tiny HPSv3 in the published layout


def _flat_qwen2_vl_config(config: Any) -> dict[str, Any]:
    """``config`` as Qwen2-VL-7B-Instruct's ``config.json`` writes it (transformers 4.4x's flat layout:
    text settings at the top, ``rope_scaling`` of type "mrope"), which the loaders must read."""
    t, v = config.text_config, config.vision_config
    rope = t.rope_parameters
    keys = "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads"
    keys += " num_key_value_heads hidden_act max_position_embeddings rms_norm_eps bos_token_id eos_token_id"
    flat = {k: getattr(t, k) for k in keys.split()}
    flat |= {k: getattr(config, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id")}
    vision = {k: getattr(v, k) for k in ("depth", "embed_dim", "hidden_size", "mlp_ratio", "num_heads")}
    vision |= {k: getattr(v, k) for k in ("patch_size", "spatial_merge_size", "temporal_patch_size")}
    return flat | {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "vision_end_token_id": config.vision_end_token_id,
        "rope_theta": rope["rope_theta"],
        "rope_scaling": {"type": "mrope", "mrope_section": list(rope["mrope_section"])},
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "torch_dtype": "float32",
        "vision_config": vision | {"in_chans": 3, "spatial_patch_size": v.patch_size},
    }


# a stand-in for HPSv3's published user turn, in the same shape: the prompt inside, then the query
# ending in the reward token (the real text is the user's copy, see rewards.preference.read_hpsv3_instruction)
TINY_HPSV3_INSTRUCTION = (
    "\nRate this generated image for visual quality and for how well it follows the prompt. \n"
    "Textual prompt - {prompt}\n\n\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"
)


def tiny_hpsv3_checkpoint(folder: Any, seed: int = 0, *, hidden_size: int = 64) -> tuple[Any, Any, Any]:
    """Write a random tiny HPSv3 in the published layout under ``folder`` and return
    ``(base, checkpoint, instruction)``: ``instruction`` = ``folder/instruction.txt``
    (:data:`TINY_HPSV3_INSTRUCTION`), ``base`` = ``folder/Qwen2-VL``, laid out as a local copy of
    Qwen2-VL-7B-Instruct (``config.json`` in its flat layout, processor and tokenizer files, no weights:
    the checkpoint holds them all) and ``checkpoint`` = ``folder/HPSv3.safetensors`` with the
    published names: ``visual.*``, ``model.*`` (embeddings with one more row than the tokenizer, for
    ``<|Reward|>``), ``lm_head.weight`` and ``rm_head.{0,3,5}.{weight,bias}`` (1024 -> 16 -> 2)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    base, checkpoint = Path(folder) / "Qwen2-VL", Path(folder) / "HPSv3.safetensors"
    instruction = Path(folder) / "instruction.txt"
    instruction.write_text(TINY_HPSV3_INSTRUCTION, encoding="utf-8")
    model, processor = tiny_qwen_vl("qwen2_vl", seed, hidden_size=hidden_size)
    processor.save_pretrained(base)
    (base / "config.json").write_text(json.dumps(_flat_qwen2_vl_config(model.config), indent=2))
    state: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.visual."):
            key = key[len("model.") :]
        elif key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model.") :]
        state[key] = value
    g = torch.Generator().manual_seed(seed + 1)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):  # the <|Reward|> row
        state[key] = torch.cat([state[key], 0.02 * torch.randn(1, hidden_size, generator=g)])
    for index, (out_f, in_f) in zip((0, 3, 5), ((1024, hidden_size), (16, 1024), (2, 16)), strict=True):
        state[f"rm_head.{index}.weight"] = torch.randn(out_f, in_f, generator=g) * in_f**-0.5
        state[f"rm_head.{index}.bias"] = 0.1 * torch.randn(out_f, generator=g)
    save_file({k: v.contiguous() for k, v in state.items()}, str(checkpoint))
    return base, checkpoint, instruction


def tiny_hpsv3(seed: int = 0, *, device: str = "cpu", dtype: str = "float32", **kwargs: Any) -> Any:
    """HPSv3 on :func:`tiny_hpsv3_checkpoint`, written to a temporary folder and loaded by
    :func:`rewards.preference.hpsv3`; images become 56 x 56 (4 image tokens) unless ``kwargs`` say."""
    import tempfile

    from rewards.preference import hpsv3

    kwargs = {"min_pixels": 56 * 56, "max_pixels": 56 * 56} | kwargs
    with tempfile.TemporaryDirectory() as tmp:
        base, checkpoint, instruction = tiny_hpsv3_checkpoint(tmp, seed)
        return hpsv3(str(base), str(checkpoint), str(instruction), device=device, dtype=dtype, **kwargs)


def tiny_qwen3_vl(seed: int = 0, *, hidden_size: int = 64) -> tuple[Any, Any]:
    """``(model, processor)``: a random tiny Qwen3-VL (2 text layers, a 1-block vision tower with
    16 px patches and one deepstack level) over :func:`qwen_tokenizer`, eval mode, fp32."""
    import transformers as tf

    tok = qwen_tokenizer()
    ids = {
        t: tok.convert_tokens_to_ids(f"<|{t}|>") for t in ("endoftext", "im_end", "image_pad", "video_pad")
    }
    head_dim = hidden_size // 2
    section = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]
    text = dict(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=head_dim,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1e4,
            "mrope_section": section,
            "mrope_interleaved": True,
        },
        bos_token_id=ids["endoftext"],
        eos_token_id=ids["im_end"],
        pad_token_id=ids["endoftext"],
    )
    vision: dict[str, Any] = dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2
    )
    vision |= dict(
        temporal_patch_size=2,
        out_hidden_size=hidden_size,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0],
    )
    config = tf.Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image_pad"],
        video_token_id=ids["video_pad"],
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    with _seeded(seed):
        model = tf.Qwen3VLForConditionalGeneration(config).eval()
    size = {"shortest_edge": 64 * 64, "longest_edge": 4 * 64 * 64}
    processor = tf.Qwen3VLProcessor(
        image_processor=tf.Qwen2VLImageProcessor(size=size, patch_size=16, merge_size=2),
        video_processor=tf.Qwen3VLVideoProcessor(size=size, patch_size=16, merge_size=2),
        tokenizer=tok,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    return model, processor
