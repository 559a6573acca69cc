"""RoPE position ids for a target and N reference images (docs/method.md §2).

FLUX packs a latent of ``h x w`` (after 2x2 patching) into ``h*w`` tokens with 3-axis ids
``(index, row, col)``. The target always has index 0 and rows/cols from 0. Schemes for references:

- ``framewise`` (PSR, default): reference k = 1..N gets index k; rows/cols restart at 0.
- ``kontext``: every reference gets index 1 (what FluxKontextPipeline does with its one image);
  identical to ``framewise`` for N = 1.
- ``uno``: index 0; reference k's rows/cols are offset by the summed row and col extents of the
  target and references 1..k-1 (UNO's diagonal layout).
"""

from __future__ import annotations

import torch
from torch import Tensor

SCHEMES = ("framewise", "kontext", "uno")


def grid_ids(height: int, width: int, *, index: int = 0, row_offset: int = 0, col_offset: int = 0) -> Tensor:
    """Ids of an ``height x width`` token grid in row-major order (FLUX's packing order).

    Returns:
        ``[height * width, 3]`` float32: (index, row_offset + r, col_offset + c).
    """
    ids = torch.zeros(height, width, 3)
    ids[..., 0] = float(index)
    ids[..., 1] = torch.arange(height, dtype=torch.float32)[:, None] + row_offset
    ids[..., 2] = torch.arange(width, dtype=torch.float32)[None, :] + col_offset
    return ids.reshape(height * width, 3)


def reference_ids(
    target_hw: tuple[int, int], reference_hws: list[tuple[int, int]], scheme: str = "framewise"
) -> Tensor:
    """Ids of all reference tokens, concatenated in reference order.

    Args:
        target_hw: the target's token grid (rows, cols), i.e. latent size // 2.
        reference_hws: each reference's token grid (rows, cols).
        scheme: one of :data:`SCHEMES`.

    Returns:
        ``[sum_k h_k * w_k, 3]`` float32.
    """
    if scheme not in SCHEMES:
        raise ValueError(
            f"unknown position scheme {scheme!r} (model.position_scheme); expected one of {SCHEMES}"
        )
    parts = []
    row_off, col_off = target_hw
    for k, (h, w) in enumerate(reference_hws, start=1):
        if scheme == "framewise":
            parts.append(grid_ids(h, w, index=k))
        elif scheme == "kontext":
            parts.append(grid_ids(h, w, index=1))
        else:
            parts.append(grid_ids(h, w, index=0, row_offset=row_off, col_offset=col_off))
            row_off += h
            col_off += w
    if not parts:
        return torch.zeros(0, 3)
    return torch.cat(parts, dim=0)


def fit_to_area(height: int, width: int, max_area: int, multiple: int = 16) -> tuple[int, int]:
    """The size a reference image is resized to before VAE encoding.

    Rule: keep the aspect ratio, scale so the area equals ``max_area`` (up or down, as
    FluxKontextPipeline does with ``max_area``), then round each side down to a multiple of
    ``multiple`` (VAE factor 8 x 2x2 packing = 16), never below one multiple.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    aspect = width / height
    new_w = round((max_area * aspect) ** 0.5)
    new_h = round((max_area / aspect) ** 0.5)
    return max(multiple, new_h // multiple * multiple), max(multiple, new_w // multiple * multiple)
