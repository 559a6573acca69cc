"""Every seed of a run, derived in one place from the run's ``seed`` and a named domain.

A seed is ``derive_seed(seed, domain, *parts)``: the run seed, a domain saying what the randomness
is for, and the integers or strings that pick one draw inside it (a step, a group id, a record id).
Different domains give unrelated streams, so drawing more of one (more rollout steps, another
epoch) never shifts another; the same arguments give the same seed in any process, rank, worker or
Python version, which is what makes resumed runs and sharded evaluation repeat a run exactly.

Domains (:data:`DOMAINS`):

========== ====================================================================================
process    per-rank global RNGs (Python, numpy, torch): :func:`seed_everything`
data       the order of records in an epoch (psr.data samplers)
references which references a drawn SFT record shows, and in which frame order
sft_noise  SFT training noise levels and noise, per (step, micro-batch index in the global batch)
validation SFT validation initial noise, per record
rollout    RL rollout noise (initial and SDE), per (step, prompt group)
objective  an objective's own draws in an update (which steps train, DPO noise), per step
eval       psr-eval initial noise, per (record id, sample index)
pipeline   psr-data stages (plans, renders, edits)
========== ====================================================================================

The recipe (so it can be checked by hand, and reproduced outside psr): the JSON text of the list
``[seed, domain, *parts]`` without spaces (``json.dumps(..., separators=(",", ":"))``; an int
``3`` and a string ``"3"`` differ), its SHA-256, the first 8 bytes read big-endian, shifted right by
one bit. The result is in ``[0, 2**63)``: a valid ``torch.manual_seed`` / ``torch.Generator`` seed,
and a valid ``random.Random`` seed.
"""

from __future__ import annotations

import hashlib
import json
import random

DOMAINS = (
    "process",
    "data",
    "references",
    "sft_noise",
    "validation",
    "rollout",
    "objective",
    "eval",
    "pipeline",
)

__all__ = ["DOMAINS", "derive_seed", "seed_everything"]


def derive_seed(seed: int, domain: str, *parts: int | str) -> int:
    """The seed of one draw: a function of ``(seed, domain, *parts)`` only.

    Args:
        seed: the run's seed (``seed=`` in the config) or a seed derived from it.
        domain: what the randomness is for; one of :data:`DOMAINS`.
        parts: what picks the draw inside the domain, in order (step, group id, record id, ...).

    Returns:
        An int in ``[0, 2**63)``, stable across processes and Python versions.

    Raises:
        ValueError: ``domain`` is not one of :data:`DOMAINS`.
        TypeError: ``seed`` is not an int, or a part is neither an int nor a string.
    """
    if domain not in DOMAINS:
        raise ValueError(f"seed domain {domain!r} is not one of {DOMAINS} (add new domains to psr.seeding)")
    # bool is an int subclass whose JSON (true) would differ from 1's; numpy ints and tensors are not
    # JSON: all three are caller mistakes better named than hashed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int; got {seed!r} ({type(seed).__name__})")
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, int | str):
            raise TypeError(f"seed parts must be int or str; got {part!r} ({type(part).__name__})")
    text = json.dumps([seed, domain, *parts], separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python's, numpy's and torch's (CPU and CUDA) global RNGs with a per-rank seed.

    Only code that does not take an explicit generator draws from these; psr's own draws use
    :func:`derive_seed` generators, so they do not depend on what else consumed the global RNGs.
    """
    # imported here: derive_seed is stdlib-only, for light users such as data_pipeline.shards
    import numpy as np
    import torch

    s = derive_seed(seed, "process", rank) % 2**32  # numpy accepts at most 32 bits
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
