"""Embedders: unit-norm outputs, batch invariance, and the CLS / projection outputs they claim."""

from __future__ import annotations

import pytest
import torch

from rewards import testing


@pytest.mark.parametrize("build", [testing.tiny_dino, testing.tiny_dinov2, testing.tiny_clip_image])
def test_embedders_are_unit_norm_and_batch_invariant(build):
    emb = build(0)
    g = torch.Generator().manual_seed(0)
    crops = [
        torch.rand(3, 40, 30, generator=g),
        torch.rand(3, 17, 60, generator=g),
        torch.rand(3, 32, 32, generator=g),
    ]
    batched = emb.embed(crops)
    assert batched.dtype == torch.float32 and batched.shape[0] == 3
    assert torch.allclose(batched.norm(dim=-1), torch.ones(3), atol=1e-5)
    singles = torch.cat([emb.embed([c]) for c in crops])
    assert torch.allclose(batched, singles, atol=1e-5)
    assert torch.allclose(emb.embed(crops[0][None].expand(2, -1, -1, -1))[1], batched[0], atol=1e-5)


def test_dino_embedding_is_the_normalized_cls_token():
    emb = testing.tiny_dino(0)
    x = torch.rand(2, 3, 50, 50)
    pixels = emb.transform(x)
    cls = emb.model(pixel_values=pixels).last_hidden_state[:, 0]
    assert torch.allclose(emb.embed(x), torch.nn.functional.normalize(cls, dim=-1), atol=1e-6)


def test_clip_embedding_is_the_projected_image_embedding():
    emb = testing.tiny_clip_image(0)
    x = torch.rand(2, 3, 32, 32)
    m = emb.model
    pooled = m.vision_model(pixel_values=emb.transform(x)).pooler_output
    assert torch.allclose(
        emb.embed(x), torch.nn.functional.normalize(m.visual_projection(pooled), dim=-1), atol=1e-6
    )


def test_embedder_runs_in_bfloat16():
    emb = testing.tiny_dino(0, dtype="bfloat16")
    ref = testing.tiny_dino(0)
    x = torch.rand(2, 3, 40, 40)
    out = emb.embed(x)
    assert out.dtype == torch.float32
    assert (out * ref.embed(x)).sum(-1).min() > 0.98  # bf16 keeps ~3 significant digits


def test_max_batch_chunks_give_the_same_embeddings():
    whole, chunked = testing.tiny_dino(0), testing.tiny_dino(0)
    chunked.max_batch = 2
    crops = [torch.rand(3, 20 + 3 * i, 30, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    assert torch.allclose(whole.embed(crops), chunked.embed(crops), atol=1e-6)
