"""CLIP-T, HPS, PickScore and ImageReward on tiny random backbones, each against an independent
computation; ImageReward's key mapping against a plain-torch forward of the published layout."""

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


def _images(b: int = 3, size: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(b, 3, 6, 6, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def test_clip_t_matches_open_clip_own_preprocessing_and_scale():
    import open_clip

    reward = testing.tiny_clip_t(0)
    model, tokenizer = testing.tiny_open_clip(0)
    images = _images()
    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images]
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(p) for p in pil]), normalize=True)
        txt = model.encode_text(tokenizer(PROMPTS), normalize=True)
    expected = (img * txt).sum(-1)
    score = reward(images, RewardInputs.from_prompts(PROMPTS))["score"]
    assert torch.allclose(score, expected, atol=2e-3)  # uint8 rounding and PIL's bicubic vs ours
    scaled = testing.tiny_clip_t(0, scale=100.0)(images, RewardInputs.from_prompts(PROMPTS))["score"]
    assert torch.allclose(scaled, 100 * score, atol=1e-4)
    hps = testing.tiny_hps(0)(images, RewardInputs.from_prompts(PROMPTS))["score"]
    assert torch.allclose(hps, score, atol=1e-6)  # HPS v2 is the same cosine, on its own weights


def test_pickscore_equals_clipmodel_logits():
    reward = testing.tiny_pickscore(0)
    images = _images()
    pixels = reward.transform(images)
    tok = reward.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = reward.model(
            input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pixels
        ).logits_per_image
    score = reward(images, RewardInputs.from_prompts(PROMPTS))["score"]
    assert torch.allclose(score, logits.diagonal(), atol=1e-4)


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


def test_imagereward_key_mapping_reproduces_the_published_architecture():
    reward = testing.tiny_imagereward(0)
    sd = testing.tiny_imagereward_checkpoint(0)
    images = _images(size=40)
    pixels = reward.transform(images)
    tok = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        expected = _reference_imagereward(sd, pixels, tok["input_ids"], tok["attention_mask"], text_heads=2)
    score = reward(images, RewardInputs.from_prompts(PROMPTS))["score"]
    assert expected.std() > 1e-3  # the prompts/images are told apart, so equality is not vacuous
    assert torch.allclose(score, expected, atol=1e-4)


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
