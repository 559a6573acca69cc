"""CLIP-T, HPS, PickScore and ImageReward on tiny random backbones, each against an independent
computation whose preprocessing is the published one (open_clip's transform, transformers' CLIP
processor, ImageReward's torchvision transform on PIL images), not ours; ImageReward's key mapping
against a plain-torch forward of the published layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rewards import testing
from rewards.base import RewardInputs
from rewards.preference import IMAGEREWARD_MEAN, IMAGEREWARD_STD, imagereward, imagereward_state_dict

PROMPTS = ["a corgi wearing a chef's hat", "two cats on a sofa", "a red mug"]


def _images(b: int = 3, size: int = 48, width: int | None = None) -> torch.Tensor:
    """``[b, 3, size, width or size]`` smooth random images in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(b, 3, 6, 6, generator=g)
    return F.interpolate(coarse, size=(size, width or size), mode="bilinear", align_corners=False)


def _assert_scores_vary_with_the_image(reward, images: torch.Tensor, atol: float) -> None:
    """One prompt, different images: the scores spread over more than ``atol``, so agreement with a
    reference within ``atol`` says something about the image path."""
    scores = reward(images, RewardInputs.from_prompts([PROMPTS[0]] * len(images)))["score"]
    assert scores.max() - scores.min() > atol, scores


def test_clip_t_matches_open_clip_own_preprocessing_and_scale():
    import open_clip

    reward = testing.tiny_clip_t(0)
    model, tokenizer = testing.tiny_open_clip(0)
    images = _images(width=64)  # not square: the resize rule and the crop both matter
    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images]
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(p) for p in pil]), normalize=True)
        txt = model.encode_text(tokenizer(PROMPTS), normalize=True)
    expected = (img * txt).sum(-1)
    score = reward(images, RewardInputs.from_prompts(PROMPTS))["score"]
    assert torch.allclose(score, expected, atol=2e-3)  # uint8 rounding and PIL's bicubic vs ours
    _assert_scores_vary_with_the_image(reward, images, 2e-3)
    scaled = testing.tiny_clip_t(0, scale=100.0)(images, RewardInputs.from_prompts(PROMPTS))["score"]
    assert torch.allclose(scaled, 100 * score, atol=1e-4)
    hps = testing.tiny_hps(0)(images, RewardInputs.from_prompts(PROMPTS))["score"]
    assert torch.allclose(hps, score, atol=1e-6)  # HPS v2 is the same cosine, on its own weights


def test_pickscore_equals_clipmodel_logits(clip_pixels):
    reward = testing.tiny_pickscore(0)
    images = _images(width=64)  # 48 x 64: the shorter side resized to the model's 32, then cropped
    pixels = clip_pixels(images, 32)  # transformers' CLIP processor (PIL), built from an explicit config
    tok = reward.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = reward.model(
            input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pixels
        ).logits_per_image
    score = reward(images, RewardInputs.from_prompts(PROMPTS))["score"]
    # PIL's 8-bit bicubic vs ours: measured 1.2e-2 at logit scale 14.3 (8e-4 in cosine)
    assert torch.allclose(score, logits.diagonal(), atol=3e-2)
    _assert_scores_vary_with_the_image(reward, images, 3e-2)
    # the scoring itself, on the reference's own pixels: logit_scale.exp() * cosine to float rounding
    reward.transform = lambda images, device=None: pixels
    same_pixels = reward(images, RewardInputs.from_prompts(PROMPTS))["score"]
    assert torch.allclose(same_pixels, logits.diagonal(), atol=1e-4)


def _reference_imagereward(sd, pixels, ids, mask, text_heads):
    """ImageReward's forward written from the published key names with plain torch ops."""
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    b = pixels.shape[0]
    w = sd[v + "patch_embed.proj.weight"]
    x = F.conv2d(pixels, w, sd[v + "patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[v + "cls_token"].expand(b, -1, -1), x], 1) + sd[v + "pos_embed"]
    d = x.shape[-1]
    heads = d // 64
    n_blocks = len({k.split(".")[3] for k in sd if k.startswith(v + "blocks.")})
    for i in range(n_blocks):
        p = f"{v}blocks.{i}."
        h = F.layer_norm(x, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        qkv = (
            F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
            .reshape(b, -1, 3, heads, d // heads)
            .permute(2, 0, 3, 1, 4)
        )
        att = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (d // heads) ** -0.5).softmax(-1)
        x = x + F.linear(
            (att @ qkv[2]).transpose(1, 2).reshape(b, -1, d),
            sd[p + "attn.proj.weight"],
            sd[p + "attn.proj.bias"],
        )
        h = F.layer_norm(x, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
        x = x + F.linear(
            F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
            sd[p + "mlp.fc2.weight"],
            sd[p + "mlp.fc2.bias"],
        )
    image = F.layer_norm(x, (d,), sd[v + "norm.weight"], sd[v + "norm.bias"], 1e-6)

    def ln(y, name):
        return F.layer_norm(y, (y.shape[-1],), sd[name + ".weight"], sd[name + ".bias"], 1e-12)

    def lin(y, name):
        return F.linear(y, sd[name + ".weight"], sd[name + ".bias"])

    def attention(q_in, kv_in, p, additive_mask):
        hd = q_in.shape[-1] // text_heads
        split = lambda y: y.reshape(b, -1, text_heads, hd).transpose(1, 2)  # noqa: E731
        q, k, val = (
            split(lin(q_in, p + "self.query")),
            split(lin(kv_in, p + "self.key")),
            split(lin(kv_in, p + "self.value")),
        )
        att = (q @ k.transpose(-2, -1) / hd**0.5 + additive_mask).softmax(-1)
        ctx = (att @ val).transpose(1, 2).reshape(b, -1, q_in.shape[-1])
        return ln(lin(ctx, p + "output.dense") + q_in, p + "output.LayerNorm")

    length = ids.shape[1]
    h = ln(
        sd[t + "embeddings.word_embeddings.weight"][ids]
        + sd[t + "embeddings.position_embeddings.weight"][:length],
        t + "embeddings.LayerNorm",
    )
    pad = (1.0 - mask[:, None, None, :].float()) * -10000.0  # BERT's additive padding mask
    n_layers = len({k.split(".")[3] for k in sd if k.startswith(t + "encoder.layer.")})
    for i in range(n_layers):
        p = f"{t}encoder.layer.{i}."
        h = attention(h, h, p + "attention.", pad)
        h = attention(h, image, p + "crossattention.", 0.0)
        h = ln(lin(F.gelu(lin(h, p + "intermediate.dense")), p + "output.dense") + h, p + "output.LayerNorm")
    y = h[:, 0]
    for idx in (0, 2, 4, 6, 7):
        y = lin(y, f"mlp.layers.{idx}")
    return (y.squeeze(-1) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def _imagereward_pixels(images: torch.Tensor, n_px: int) -> torch.Tensor:
    """ImageReward's published ``_transform(n_px)``: Resize(n_px, bicubic), CenterCrop(n_px), RGB,
    ToTensor, Normalize(OpenAI CLIP mean/std), on PIL images; written out here with torchvision."""
    from torchvision import transforms as T

    transform = T.Compose(
        [
            T.Resize(n_px, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(n_px),
            lambda image: image.convert("RGB"),
            T.ToTensor(),
            T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images]
    return torch.stack([transform(p) for p in pil])


def test_imagereward_key_mapping_reproduces_the_published_architecture():
    reward = testing.tiny_imagereward(0)
    sd = testing.tiny_imagereward_checkpoint(0)
    images = _images(size=40, width=56)  # shorter side resized to the tiny model's 32 px, then cropped
    pixels = _imagereward_pixels(images, 32)
    tok = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        expected = _reference_imagereward(sd, pixels, tok["input_ids"], tok["attention_mask"], text_heads=2)
    score = reward(images, RewardInputs.from_prompts(PROMPTS))["score"]
    assert expected.std() > 1e-3  # the prompts/images are told apart, so equality is not vacuous
    # the published transform (PIL, 8-bit) vs ours: measured 9e-3; the scores spread over ~0.2
    assert torch.allclose(score, expected, atol=2e-2)
    _assert_scores_vary_with_the_image(reward, images, 2e-2)
    # the key mapping alone, on the same pixels: the published forward to float rounding
    reward.transform = lambda images, device=None: pixels
    same_pixels = reward(images, RewardInputs.from_prompts(PROMPTS))["score"]
    assert torch.allclose(same_pixels, expected, atol=1e-4)


def test_imagereward_loads_the_published_files(tmp_path):
    ckpt = tmp_path / "ImageReward"
    ckpt.mkdir()
    torch.save(testing.tiny_imagereward_checkpoint(0), ckpt / "ImageReward.pt")
    (ckpt / "med_config.json").write_text(json.dumps(testing.TINY_MED_CONFIG))
    testing.tiny_bert_tokenizer().save_pretrained(tmp_path / "bert")
    loaded = imagereward(str(ckpt), str(tmp_path / "bert"))
    images = _images(size=40)
    inputs = RewardInputs.from_prompts(PROMPTS)
    assert torch.allclose(
        loaded(images, inputs)["score"], testing.tiny_imagereward(0)(images, inputs)["score"], atol=1e-5
    )


def test_imagereward_mapping_rejects_unknown_keys():
    sd = testing.tiny_imagereward_checkpoint(0)
    sd["blip.visual_encoder.blocks.0.attn.q_norm.weight"] = torch.ones(1)
    with pytest.raises(ValueError, match="q_norm"):
        imagereward_state_dict(sd)


def test_batch_equals_single_calls_for_text_rewards():
    images = _images(size=40)
    inputs = RewardInputs.from_prompts(PROMPTS)
    for reward in (testing.tiny_clip_t(0), testing.tiny_pickscore(0), testing.tiny_imagereward(0)):
        batched = reward(images, inputs)["score"]
        singles = torch.cat([reward(images[i : i + 1], inputs.select([i]))["score"] for i in range(3)])
        assert torch.allclose(batched, singles, atol=1e-4), type(reward).__name__
