"""Reward throughput on the tiny random-weight backbones (rewards/testing.py).

Prints images/second of every reward at batch sizes 1, 8 and 32 (64 x 64 images, two subjects per
sample with distinct 48 x 40 references), then the PSR reward's cost per image for 1..4 subjects.
The tiny models measure the reward code's own overhead (preprocessing, tokenization, matching,
Python per crop) more than model compute; real backbones are far heavier.

Usage: python benchmarks/rewards.py [--device cpu|cuda] [--threads N] [--min-seconds S]

One CPU thread by default: with several threads on a busy machine, OpenMP's waiting makes small
forwards up to 50x slower and the numbers meaningless.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# run as a script, this file's folder comes first on sys.path and its name would shadow the
# `rewards` package: import from the repository root instead
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
sys.modules.pop("rewards", None)

from rewards import testing  # noqa: E402
from rewards.base import RewardInputs, Subject  # noqa: E402
from rewards.color import ColorReward  # noqa: E402

CATEGORIES = ["dog", "cat", "cup", "teddy bear"]


def make_batch(
    batch: int, subjects: int, device: str, seed: int = 0, shared: bool = False
) -> tuple[torch.Tensor, RewardInputs]:
    """``shared``: every sample uses the same reference tensors (one prompt group, as in RL rollouts);
    otherwise each sample has its own (the worst case for the PSR reward)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, 64, 64, generator=g).to(device)
    one = [torch.rand(3, 48, 40, generator=g) for _ in range(subjects)]
    refs = [
        one if shared else [torch.rand(3, 48, 40, generator=g) for _ in range(subjects)] for _ in range(batch)
    ]
    subs = [[Subject(c, c) for c in CATEGORIES[:subjects]]] * batch
    prompt = " to the left of ".join(
        f"a {c}" for c in CATEGORIES[:subjects]
    )  # a relation for the spatial reward
    return images, RewardInputs([prompt] * batch, refs, subs)


def throughput(
    reward: Callable, batch: int, subjects: int, device: str, min_seconds: float, shared: bool = False
) -> float:
    """Images per second: one warm-up call, then calls until ``min_seconds`` have passed (at least 2)."""
    images, inputs = make_batch(batch, subjects, device, shared=shared)
    reward(images, inputs)
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < min_seconds:
        reward(images, inputs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        calls += 1
    return batch * calls / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: stable numbers on a shared machine)",
    )
    parser.add_argument("--min-seconds", type=float, default=1.0, help="timing window per cell")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    rewards: dict[str, Callable] = {
        "color (no weights)": ColorReward(),
        "psr: grounding-dino + dino": testing.tiny_psr(0, device=dev),
        "psr: owlv2 + dinov2": testing.tiny_psr(0, detector="owlv2", embedder="dinov2", device=dev),
        "clip-t (open_clip)": testing.tiny_clip_t(0, device=dev),
        "hps v2.1 (open_clip)": testing.tiny_hps(0, device=dev),
        "pickscore (CLIPModel)": testing.tiny_pickscore(0, device=dev),
        "imagereward (BLIP)": testing.tiny_imagereward(0, device=dev),
        "hpsv3 (Qwen2-VL)": testing.tiny_hpsv3(0, device=dev),
        "spatial (grounding-dino)": testing.tiny_spatial(0, device=dev),
    }
    print(
        f"# reward throughput, tiny random backbones, 64x64 images, 2 subjects/sample; device={dev}, threads={torch.get_num_threads()}"
    )
    print(f"{'reward':<28} {'B=1':>9} {'B=8':>9} {'B=32':>9}   (images/s)")
    for name, reward in rewards.items():
        cells = [throughput(reward, b, 2, dev, args.min_seconds) for b in (1, 8, 32)]
        print(f"{name:<28} " + " ".join(f"{c:9.1f}" for c in cells))

    print("\n# PSR reward (grounding-dino + dino) vs subjects per sample S, B=8, distinct references")
    print(
        f"{'S':>3} {'images/s':>9} {'ms/image':>9} {'vs S=1':>7} {'det. inputs':>12} {'crops embedded':>15} {'images/s, refs shared by the 8':>31}"
    )
    psr = rewards["psr: grounding-dino + dino"]
    seen: dict[str, int] = {}
    hooks = [
        psr.detector.model.register_forward_pre_hook(
            lambda m, a, k: seen.__setitem__("det", k["pixel_values"].shape[0]), with_kwargs=True
        ),
        psr.embedder.model.register_forward_pre_hook(
            lambda m, a, k: seen.__setitem__("emb", k["pixel_values"].shape[0]), with_kwargs=True
        ),
    ]
    base = None
    for s in (1, 2, 3, 4):
        images, inputs = make_batch(8, s, dev)
        psr(images, inputs)
        det_inputs, crops = seen["det"], seen["emb"]
        per_s = throughput(psr, 8, s, dev, args.min_seconds)
        shared = throughput(psr, 8, s, dev, args.min_seconds, shared=True)
        ms = 1000.0 / per_s
        base = base or ms
        print(f"{s:>3} {per_s:9.1f} {ms:9.1f} {ms / base:7.2f} {det_inputs:>12} {crops:>15} {shared:>31.1f}")
    for h in hooks:
        h.remove()


if __name__ == "__main__":
    main()
