"""Embedders: unit-norm outputs, batch invariance, and the CLS / projection outputs they claim, checked
against the published preprocessing (torchvision / transformers on PIL images), not our own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rewards import testing
from rewards.embedders import HFImageEmbedder


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


# Our preprocessing (float bicubic, clamped) against the published pipelines (PIL resampling of 8-bit
# images): unit-norm embeddings agree to 9e-4 per coordinate (measured on _images()); 3e-3 leaves a
# margin, while the two images' embeddings differ by 0.04-0.1, which each test checks first so that
# agreement within the tolerance is not vacuous.
PREPROCESSING_ATOL = 3e-3


def _images() -> list[torch.Tensor]:
    """Two inputs that need resizing: fine noise (50 x 50) and a smooth texture of another aspect."""
    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.rand(1, 3, 5, 7, generator=g), size=(45, 70), mode="bilinear")[0]
    return [torch.rand(3, 50, 50, generator=g), smooth.clamp(0, 1)]


def _check_against_reference(emb, x, pixels, expected) -> None:
    got = emb.embed(x)
    assert (got[0] - got[1]).abs().max() > PREPROCESSING_ATOL  # the images are told apart
    assert torch.allclose(got, expected, atol=PREPROCESSING_ATOL)
    # given the reference's own pixels, the embedding is the claimed output to float rounding
    same_pixels = HFImageEmbedder(emb.model, lambda images, device=None: pixels, output=emb.output)
    assert torch.allclose(same_pixels.embed(x), expected, atol=1e-6)


@pytest.mark.parametrize("name", ["dino", "dinov2"])
def test_dino_embedding_is_the_normalized_cls_token(name, psrbench_pixels, dinov2_pixels):
    emb = getattr(testing, f"tiny_{name}")(0)
    x = _images()
    # DINO: PSRBench's torchvision transform; DINOv2: transformers' processor; tiny sizes 40 -> 32 px
    pixels = psrbench_pixels(x, 40, 32) if name == "dino" else dinov2_pixels(x, 40, 32)
    with torch.no_grad():
        cls = emb.model(pixel_values=pixels).last_hidden_state[:, 0]
    _check_against_reference(emb, x, pixels, F.normalize(cls, dim=-1))


def test_clip_embedding_is_the_projected_image_embedding(clip_pixels):
    emb = testing.tiny_clip_image(0)
    x = _images()
    pixels = clip_pixels(x, 32)
    m = emb.model
    with torch.no_grad():
        pooled = m.vision_model(pixel_values=pixels).pooler_output
    _check_against_reference(emb, x, pixels, F.normalize(m.visual_projection(pooled), dim=-1))


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
