"""Datasets and samplers over a manifest: SFT records (with targets) and RL prompt groups.

SFT (:class:`SFTDataset`, :class:`BucketBatchSampler`, :func:`collate_sft`)
    A record is (instruction, target, subjects with one reference each). Every time a record is
    drawn, :func:`plan_references` decides which subjects get a reference and in which order:

    - how many references: 2 / 3 / 4 with probabilities 0.9 / 0.05 / 0.05 (docs/method.md §2),
      restricted to counts the record can supply and renormalized; a record with fewer subjects
      than the smallest count uses all of its subjects. Subjects left without a reference stay in
      the target and the instruction (the model draws them from the text alone);
    - a random order of the references (``shuffle_references``), so that the model cannot learn
      "first reference = first noun";
    - optional reference dropout: each chosen reference is dropped with probability p; all may go,
      which leaves a text-only sample.

    **Pairing.** The reference at position k-1 of ``Batch.references[b]`` is frame k: it receives
    RoPE index k under frame-wise positions (:mod:`psr.models.positions`). ``Batch.meta[b]["subjects"]``
    lists the subject names in that same frame order, and ``meta["subject_indices"]`` their indices
    in the manifest record. The instruction names subjects in the record's own words and order and is
    not reordered; with ``reference_tags=True`` it gains a suffix ``" [image k: <name>]"`` for each
    frame k, so the text states which frame shows which subject.

    Targets are resized (cover, then centre crop) to their aspect-ratio bucket; references are
    passed at their own size and the policy fits each to its area budget. Randomness per draw comes
    from a seed carried in the sampler's key, so a draw is the same in any worker and after resume.

RL (:class:`PromptDataset`, :class:`BatchStream`)
    A prompt record is (instruction, references) without target, from a manifest or a PSRBench JSON.
    The batch stream hands each rank whole prompt groups: every prompt is repeated G times and a
    group never straddles ranks, so group statistics (advantages) are computed locally.

Seeds come from :func:`psr.seeding.derive_seed`: the record order of an epoch from the ``data``
domain, each SFT draw's reference plan from the ``references`` domain.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from psr.data.manifest import Sample, resolve
from psr.seeding import derive_seed
from psr.types import Batch

DEFAULT_COUNTS = (2, 3, 4)
DEFAULT_COUNT_PROBS = (0.9, 0.05, 0.05)


class ImageLoadError(RuntimeError):
    """A manifest image is missing or unreadable; the message names the file and the record."""


# ---------------------------------------------------------------------------------------------- images


@contextmanager
def _readable(path: Path, record_id: str, field_name: str) -> Iterator[None]:
    """Turn every way an image file can fail to open into :class:`ImageLoadError` naming it."""
    try:
        yield
    except (
        FileNotFoundError,
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        Image.DecompressionBombError,
    ) as err:
        raise ImageLoadError(f"record {record_id!r}: cannot read {field_name} image {path}: {err}") from err


def open_image(path: Path, record_id: str, field_name: str) -> Image.Image:
    """Open and fully decode an RGB image, or raise :class:`ImageLoadError` naming file and record."""
    with _readable(path, record_id, field_name), Image.open(path) as im:
        im.load()  # decode now: a truncated file fails here, not later in a worker
        return im.convert("RGB")


def image_size(path: Path, record_id: str, field_name: str) -> tuple[int, int]:
    """``(height, width)`` from the file header, without decoding the pixels."""
    with _readable(path, record_id, field_name), Image.open(path) as im:
        w, h = im.size
    return h, w


def to_tensor(im: Image.Image) -> Tensor:
    """PIL RGB -> ``[3, H, W]`` float32 in [0, 1]."""
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def resize_cover_crop(im: Image.Image, height: int, width: int) -> Image.Image:
    """Scale so the image covers ``height x width`` (aspect kept), then crop the centre."""
    w, h = im.size
    scale = max(width / w, height / h)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=None)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return im.crop((left, top, left + width, top + height))


# ---------------------------------------------------------------------------------------------- buckets


def make_buckets(
    resolution: int, aspect_ratios: Sequence[float], multiple: int = 16
) -> list[tuple[int, int]]:
    """Target sizes ``(H, W)`` of about ``resolution**2`` pixels, one per aspect ratio ``W / H``.

    Each side is rounded to a multiple of ``multiple`` (VAE factor 8 x 2x2 packing = 16).
    """
    if resolution % multiple:
        raise ValueError(f"dataset.resolution={resolution} must be a multiple of {multiple}")
    out = []
    for ar in aspect_ratios:
        if ar <= 0:
            raise ValueError(f"dataset.aspect_ratios has {ar}; each must be > 0 (width / height)")
        h = max(multiple, round(resolution / math.sqrt(ar) / multiple) * multiple)
        w = max(multiple, round(resolution * math.sqrt(ar) / multiple) * multiple)
        out.append((h, w))
    return list(dict.fromkeys(out))


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest in log space (ties: the first)."""
    target = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0]) - target))


# ---------------------------------------------------------------------------------------------- references


def plan_references(
    num_subjects: int,
    rng: random.Random,
    *,
    counts: Sequence[int] = DEFAULT_COUNTS,
    probs: Sequence[float] = DEFAULT_COUNT_PROBS,
    shuffle: bool = True,
    dropout: float = 0.0,
) -> list[int]:
    """Which subjects get a reference, in frame order (element k-1 is the subject shown at frame k).

    Args:
        num_subjects: S subjects in the record.
        rng: the draw's random source.
        counts, probs: the number-of-references distribution (see the module docstring); empty
            means every subject gets a reference.
        shuffle: random frame order; otherwise the record's subject order.
        dropout: probability of dropping each chosen reference.

    Returns:
        Distinct subject indices in ``range(S)``.
    """
    allowed = [(c, p) for c, p in zip(counts, probs, strict=True) if c <= num_subjects and p > 0]
    if num_subjects == 0:
        n = 0
    elif not allowed:
        n = num_subjects
    else:
        total = sum(p for _, p in allowed)
        n = rng.choices([c for c, _ in allowed], weights=[p / total for _, p in allowed])[0]
    chosen = rng.sample(range(num_subjects), n)  # a uniformly random subset, in random order
    if not shuffle:
        chosen.sort()
    if dropout > 0:
        chosen = [s for s in chosen if rng.random() >= dropout]
    return chosen


def tag_instruction(instruction: str, names: Sequence[str]) -> str:
    """``instruction`` + ``" [image k: name_k]"`` for each frame k (1-based)."""
    return instruction + "".join(f" [image {k}: {name}]" for k, name in enumerate(names, start=1))


# ---------------------------------------------------------------------------------------------- SFT


class SampleKey(NamedTuple):
    """What the SFT batch sampler yields per item: the record, the draw's seed, and its position."""

    index: int  # type: ignore[assignment]  # the record's index (shadows tuple.index)
    seed: int
    epoch: int
    position: int  # batch position within the epoch (for resume)


class SFTDataset(torch.utils.data.Dataset):
    """(target, references, instruction) records of a manifest, drawn with :func:`plan_references`.

    Indexed by :class:`SampleKey` (from :class:`BucketBatchSampler`) or a plain int (seed = index).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        root: str | Path,
        *,
        resolution: int = 512,
        aspect_ratios: Sequence[float] = (1.0,),
        num_references: Sequence[int] = DEFAULT_COUNTS,
        num_references_probs: Sequence[float] = DEFAULT_COUNT_PROBS,
        shuffle_references: bool = True,
        reference_dropout: float = 0.0,
        reference_tags: bool = False,
    ) -> None:
        if len(num_references) != len(num_references_probs):
            raise ValueError(
                f"dataset.num_references={list(num_references)} and dataset.num_references_probs="
                f"{list(num_references_probs)} must have the same length"
            )
        if num_references and (any(p < 0 for p in num_references_probs) or sum(num_references_probs) <= 0):
            raise ValueError(
                f"dataset.num_references_probs={list(num_references_probs)} must be >= 0 with a positive sum"
            )
        if not 0.0 <= reference_dropout < 1.0:
            raise ValueError(f"dataset.reference_dropout={reference_dropout} must be in [0, 1)")
        missing = [s.id for s in samples if not s.target]
        if missing:
            raise ValueError(f"SFT needs a target image per record; records without one: {missing[:5]}")
        self.samples = list(samples)
        self.root = Path(root)
        self.buckets = make_buckets(resolution, aspect_ratios)
        self.counts, self.probs = tuple(num_references), tuple(num_references_probs)
        self.shuffle_references = shuffle_references
        self.reference_dropout = reference_dropout
        self.reference_tags = reference_tags
        if len(self.buckets) == 1:
            self.bucket_of = [0] * len(self.samples)
        else:  # header reads only; one pass at start-up
            self.bucket_of = [
                nearest_bucket(*image_size(resolve(str(s.target), self.root), s.id, "target"), self.buckets)
                for s in self.samples
            ]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: SampleKey | int) -> dict[str, Any]:
        if not isinstance(key, SampleKey):
            key = SampleKey(int(key), int(key), 0, 0)
        s = self.samples[key.index]
        rng = random.Random(key.seed)
        order = plan_references(
            len(s.subjects),
            rng,
            counts=self.counts,
            probs=self.probs,
            shuffle=self.shuffle_references,
            dropout=self.reference_dropout,
        )
        subjects = [s.subjects[i] for i in order]
        h, w = self.buckets[self.bucket_of[key.index]]
        target = resize_cover_crop(open_image(resolve(str(s.target), self.root), s.id, "target"), h, w)
        refs = [
            to_tensor(
                open_image(resolve(sub.reference, self.root), s.id, f"reference of subject {sub.name!r}")
            )
            for sub in subjects
        ]
        names = [sub.name for sub in subjects]
        return {
            "target": to_tensor(target),  # [3, h, w]
            "references": refs,  # frame order
            "prompt": tag_instruction(s.instruction, names) if self.reference_tags else s.instruction,
            "meta": {
                "id": s.id,
                "instruction": s.instruction,
                "subjects": names,
                "categories": [sub.category for sub in subjects],
                "subject_indices": order,
                "kind": s.kind,
                "epoch": key.epoch,
                "position": key.position,
            },
        }


def collate_sft(items: list[dict[str, Any]]) -> Batch:
    """Stack same-bucket targets into :class:`psr.types.Batch` (references stay per-sample lists)."""
    sizes = {tuple(it["target"].shape) for it in items}
    if len(sizes) != 1:
        raise ValueError(f"one batch holds targets of several sizes {sorted(sizes)}; use BucketBatchSampler")
    return Batch(
        target=torch.stack([it["target"] for it in items]),
        references=[it["references"] for it in items],
        prompts=[it["prompt"] for it in items],
        meta=[it["meta"] for it in items],
    )


class BucketBatchSampler(torch.utils.data.Sampler):
    """Endless, deterministic batches of same-bucket records, sharded over ranks.

    Epoch e: shuffle the records of every bucket with ``(seed, e)``, cut each into batches of
    ``batch_size`` (a last incomplete batch is dropped), shuffle the batch order, keep a multiple of
    ``world_size`` batches and give rank r every ``world_size``-th batch from r. Each item is a
    :class:`SampleKey` whose seed depends on ``(seed, epoch, index)`` only.

    Resume: the consumer knows which batch it consumed last (``meta["epoch"]``,
    ``meta["position"]``); :meth:`load_state_dict` with ``{"epoch": e, "cursor": position + 1}``
    restarts right after it. This is exact with DataLoader workers, which prefetch ahead.
    """

    def __init__(
        self,
        bucket_of: Sequence[int],
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"train.micro_batch_size={batch_size} must be >= 1")
        self.bucket_of = list(bucket_of)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.cursor = 0, 0
        if len(self.epoch_batches(0)) == 0:
            per_bucket = {b: self.bucket_of.count(b) for b in sorted(set(self.bucket_of))}
            raise ValueError(
                f"no rank gets a full batch: {len(self.bucket_of)} records (per bucket {per_bucket}), "
                f"batch size {batch_size}, {world_size} ranks; lower train.micro_batch_size or add records"
            )

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of record indices in epoch ``epoch``."""
        rng = random.Random(derive_seed(self.seed, "data", epoch))
        batches: list[list[int]] = []
        for b in sorted(set(self.bucket_of)):
            idx = [i for i, x in enumerate(self.bucket_of) if x == b]
            if self.shuffle:
                rng.shuffle(idx)
            batches += [
                idx[i : i + self.batch_size]
                for i in range(0, len(idx) - self.batch_size + 1, self.batch_size)
            ]
        if self.shuffle:
            rng.shuffle(batches)
        keep = len(batches) // self.world_size * self.world_size
        return batches[:keep][self.rank :: self.world_size]

    def __len__(self) -> int:
        """Batches per epoch on this rank (the iterator itself never ends)."""
        return len(self.epoch_batches(self.epoch))

    def __iter__(self) -> Iterator[list[SampleKey]]:
        epoch, cursor = self.epoch, self.cursor
        while True:
            batches = self.epoch_batches(epoch)
            for pos in range(cursor, len(batches)):
                yield [
                    SampleKey(i, derive_seed(self.seed, "references", epoch, i), epoch, pos)
                    for i in batches[pos]
                ]
            epoch, cursor = epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def position_after(batch: Batch) -> dict[str, int]:
    """The sampler state that resumes right after ``batch`` (see :class:`BucketBatchSampler`)."""
    m = batch.meta[0]
    return {"epoch": int(m["epoch"]), "cursor": int(m["position"]) + 1}


# ---------------------------------------------------------------------------------------------- RL


@dataclass
class PromptRecord:
    """One RL prompt: instruction + references (no target).

    Attributes:
        id: the record id of the manifest / benchmark.
        prompt: the instruction.
        references: ``S`` tensors ``[3, h_i, w_i]`` float32 in [0, 1], in subject order.
        names, categories: per subject (categories are what detectors look for).
        kind: task kind (``attribute``, ``three``, ...).
        meta: anything else of the record (scores, provenance, boxes).
    """

    id: str
    prompt: str
    references: list[Tensor]
    names: list[str]
    categories: list[str]
    kind: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


class PromptDataset(torch.utils.data.Dataset):
    """Prompt records of a manifest or PSRBench file; images load on access."""

    def __init__(self, samples: Sequence[Sample], root: str | Path) -> None:
        self.samples = list(samples)
        self.root = Path(root)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> PromptRecord:
        s = self.samples[index]
        refs = [
            to_tensor(
                open_image(resolve(sub.reference, self.root), s.id, f"reference of subject {sub.name!r}")
            )
            for sub in s.subjects
        ]
        return PromptRecord(
            id=s.id,
            prompt=s.instruction,
            references=refs,
            names=[sub.name for sub in s.subjects],
            categories=[sub.category for sub in s.subjects],
            kind=s.kind,
            meta={"boxes": [sub.box for sub in s.subjects], "scores": dict(s.scores or {})},
        )


class BatchStream(torch.utils.data.Sampler):
    """A rank-aware, resumable stream of RL prompt batches: each step, each rank gets
    ``prompts_per_step`` whole prompt groups.

    Epoch e is a permutation of the prompts drawn from ``(seed, e)``; step s of the epoch takes the
    slice ``[s P W, (s + 1) P W)`` of it (P prompts per rank, W ranks) and rank r the sub-slice
    ``[r P, (r + 1) P)``; a tail shorter than P W is skipped, then the next epoch starts. Iterating
    yields this rank's prompt indices with each repeated ``group_size`` times (a group is G
    consecutive items); :meth:`next_indices` / :meth:`next_batch` give one step's distinct prompts.
    :meth:`state_dict` is the position of the next step.
    """

    def __init__(
        self,
        num_prompts: int,
        *,
        prompts_per_step: int,
        group_size: int = 1,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        dataset: Sequence[PromptRecord] | None = None,
    ) -> None:
        if prompts_per_step < 1 or group_size < 1:
            raise ValueError(
                f"train.prompts_per_step={prompts_per_step} and train.group_size={group_size} must be >= 1"
            )
        if num_prompts < prompts_per_step * world_size:
            raise ValueError(
                f"{num_prompts} prompts cannot give {prompts_per_step} prompt groups to each of {world_size} "
                f"ranks per step; lower train.prompts_per_step or add prompts"
            )
        self.num_prompts, self.prompts_per_step, self.group_size = num_prompts, prompts_per_step, group_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.dataset = dataset
        self.epoch, self.step_in_epoch = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_prompts // (self.prompts_per_step * self.world_size)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_prompts))
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "data", epoch))
        return torch.randperm(self.num_prompts, generator=gen).tolist()

    def indices_at(self, epoch: int, step: int) -> list[int]:
        """This rank's distinct prompt indices at step ``step`` of epoch ``epoch``."""
        per_step = self.prompts_per_step * self.world_size
        start = step * per_step + self.rank * self.prompts_per_step
        return self._permutation(epoch)[start : start + self.prompts_per_step]

    def next_indices(self) -> list[int]:
        """The next step's prompts on this rank; advances the position."""
        out = self.indices_at(self.epoch, self.step_in_epoch)
        self.step_in_epoch += 1
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        return out

    def next_batch(self) -> list[PromptRecord]:
        """The next step's prompt records on this rank (needs ``dataset``)."""
        if self.dataset is None:
            raise RuntimeError("BatchStream.next_batch needs dataset=...")
        return [self.dataset[i] for i in self.next_indices()]

    def __iter__(self) -> Iterator[int]:
        while True:
            for i in self.next_indices():
                yield from [i] * self.group_size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
