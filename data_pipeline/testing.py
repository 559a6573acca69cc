"""Tiny random language and vision-language models saved in transformers layout, built in code.

They exercise the real loading path (``from_pretrained(path, local_files_only=True)``), chat
templates, batching and reply parsing of :mod:`data_pipeline.models.text`; their replies are
random bytes, so every reply is rejected with its reason. Tests and the benchmark use them.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from rewards.testing import TINY_TOWER

_SPECIALS = ["<pad>", "</s>", "<unk>", "<image>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def char_tokenizer() -> Any:
    """A character-level fast tokenizer (printable ASCII + ``<pad> </s> <unk> <image>``) with a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(_SPECIALS + list(string.printable))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _text_config(vocab_size: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        **TINY_TOWER,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )


def save_tiny_causal_lm(path: str | Path, seed: int = 0) -> Path:
    """A 1-layer Llama of width 32 and its tokenizer, saved to ``path``; returns ``path``."""
    import torch
    from transformers import LlamaForCausalLM

    tok = char_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(_text_config(len(tok)))
    out = Path(path)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def save_tiny_vlm(path: str | Path, seed: int = 0) -> Path:
    """A tiny LLaVA (1-layer CLIP vision tower at 32 px + 1-layer Llama) and its processor, saved to ``path``."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = char_tokenizer()
    vision = CLIPVisionConfig(
        **TINY_TOWER,
        image_size=32,
        patch_size=8,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=_text_config(len(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(cfg)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    out = Path(path)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
