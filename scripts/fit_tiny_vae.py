"""Fit the tiny VAE as an autoencoder on random coloured shapes and save it as safetensors.

A random-weight decoder barely depends on its input, so rewards on decoded images cannot tell
samples apart and nothing learns through it. This fitted tiny VAE is part of the embedded tiny
default (``psr.models.builders.tiny_flux_kontext_components(fitted_vae=True)``).

    python scripts/fit_tiny_vae.py --steps 1500 --lr 1e-3 --out psr/models/assets/tiny_vae.safetensors
"""

from __future__ import annotations

import argparse

import torch
from safetensors.torch import save_file

from psr.models.builders import tiny_vae


def shapes_batch(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``[B, 3, size, size]`` in [0, 1]: a flat background with 1-3 axis-aligned coloured boxes."""
    out = torch.rand(batch, 3, 1, 1, generator=generator).expand(batch, 3, size, size).clone()
    for b in range(batch):
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            x0, y0 = torch.randint(0, size - 8, (2,), generator=generator).tolist()
            w, h = torch.randint(8, size // 2 + 1, (2,), generator=generator).tolist()
            out[b, :, y0 : y0 + h, x0 : x0 + w] = torch.rand(3, 1, 1, generator=generator)
    return out


def fit(steps: int = 400, lr: float = 2e-3, batch: int = 8, size: int = 64, seed: int = 0) -> tuple:
    torch.manual_seed(seed)
    vae = tiny_vae(seed).train().requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    first = last = float("nan")
    for step in range(steps):
        x = shapes_batch(batch, size, gen) * 2 - 1
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample(generator=None)).sample
        mse = torch.nn.functional.mse_loss(recon, x)
        loss = mse + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 0:
            first = mse.item()
        last = mse.item()
        if step % 50 == 0:
            print(f"step {step:4d}  mse {mse.item():.4f}")
    return vae.eval().requires_grad_(False), first, last


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="psr/models/assets/tiny_vae.safetensors")
    args = parser.parse_args()
    vae, first, last = fit(args.steps, args.lr, seed=args.seed)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, args.out)
    print(f"reconstruction MSE {first:.4f} -> {last:.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
