"""Stage ``plan``: what each record will show: a task kind and 2-4 categories (docs/method.md §8 step 1).

Kinds are balanced: the sequence of ``num_records`` kinds is the kind list repeated (by weight) and
shuffled once with ``seed``, so every shard agrees on it and counts differ by at most one per unit
weight. Each record's categories are drawn without replacement from the vocabulary with the
record's own seed, so a record never depends on the shard it falls in.

Settings (``plan.*``):
    num_records: records to plan in total (over all shards).
    kinds: kind -> number of subjects (default: attribute/action/background/position/complex: 2,
        three: 3, four: 4).
    weights: kind -> relative frequency (default: equal).
    vocabulary: a text file, one category per line; null = Objects365's 365 names.
    exclude: categories never drawn (e.g. ``person`` when people are handled elsewhere).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from data_pipeline.shards import Outcome, Shard, derive_seed
from data_pipeline.stages.common import open_run
from data_pipeline.vocabulary import read_vocabulary

DEFAULT_KINDS = {
    "attribute": 2,
    "action": 2,
    "background": 2,
    "position": 2,
    "complex": 2,
    "three": 3,
    "four": 4,
}


def kind_sequence(
    num_records: int, kinds: dict[str, int], weights: dict[str, float] | None, seed: int
) -> list[str]:
    """The kind of every record index: a weighted round-robin of ``kinds``, shuffled with ``seed``."""
    names = list(kinds)
    w = {k: float((weights or {}).get(k, 1.0)) for k in names}
    if any(v < 0 for v in w.values()) or sum(w.values()) <= 0:
        raise ValueError(f"plan.weights={weights} must be >= 0 with a positive sum")
    unknown = sorted(set(weights or {}) - set(names))
    if unknown:
        raise ValueError(f"plan.weights names kinds {unknown} that are not in plan.kinds {names}")
    total = sum(w.values())
    # largest-remainder apportionment: exact shares, ties broken by the order of plan.kinds
    quota = {k: num_records * w[k] / total for k in names}
    counts = {k: int(quota[k]) for k in names}
    for k in sorted(names, key=lambda k: -(quota[k] - counts[k]))[: num_records - sum(counts.values())]:
        counts[k] += 1
    seq = [k for k in names for _ in range(counts[k])]
    random.Random(derive_seed(seed, "plan", "kinds")).shuffle(seq)
    return seq


def run(out_dir: str | Path, shard: Shard, settings: dict[str, Any], seed: int) -> dict[str, Any]:
    """Plan this shard's records; returns the shard summary (see :class:`~data_pipeline.shards.StageRun`)."""
    job = open_run(out_dir, "plan", shard, settings, seed)
    if job.is_done():
        return job.summary()
    num = int(settings["num_records"])
    if num < 1:
        raise ValueError(f"plan.num_records={num} must be >= 1")
    kinds = {str(k): int(v) for k, v in (settings.get("kinds") or DEFAULT_KINDS).items()}
    for k, n in kinds.items():
        if n < 1:
            raise ValueError(f"plan.kinds.{k}={n}: a record needs at least one subject")
    vocab = [
        c for c in read_vocabulary(settings.get("vocabulary")) if c not in set(settings.get("exclude") or [])
    ]
    too_many = {k: n for k, n in kinds.items() if n > len(vocab)}
    if too_many:
        raise ValueError(
            f"plan.kinds {too_many} ask for more subjects than the {len(vocab)} categories of the vocabulary"
        )
    seq = kind_sequence(num, kinds, settings.get("weights"), seed)
    width = max(7, len(str(num - 1)))
    inputs = [{"index": i, "id": f"rec-{i:0{width}d}"} for i in range(shard.index, num, shard.count)]

    def process(batch: list[dict[str, Any]]) -> list[Outcome]:
        out = []
        for r in batch:
            rec_seed = derive_seed(seed, "record", r["index"])
            cats = random.Random(rec_seed).sample(vocab, kinds[seq[r["index"]]])
            out.append(
                Outcome(
                    {
                        **r,
                        "seed": rec_seed,
                        "kind": seq[r["index"]],
                        "categories": cats,
                        "scores": {},
                        "provenance": {
                            "plan": {
                                "seed": seed,
                                "vocabulary": str(settings.get("vocabulary") or "objects365"),
                            }
                        },
                    }
                )
            )
        return out

    return job.run(inputs, process, batch_size=int(settings.get("batch_size", 1024)))
