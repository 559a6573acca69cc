"""SFT dataset, buckets, reference planning and pairing, batch samplers and RL batch streams."""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter

import pytest
import torch
from PIL import Image

from psr.data.dataset import (
    BatchStream,
    BucketBatchSampler,
    ImageLoadError,
    PromptDataset,
    SampleKey,
    SFTDataset,
    collate_sft,
    make_buckets,
    nearest_bucket,
    plan_references,
    position_after,
)
from psr.data.manifest import Sample, Subject

COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
}


def _records(tmp_path, n_subjects=(4, 3, 2, 4), target_sizes=None):
    """Records whose subject k's reference is a flat image of a distinct colour named in the subject."""
    recs = []
    for r, s in enumerate(n_subjects):
        size = (target_sizes or {}).get(r, (64, 64))
        Image.new("RGB", (size[1], size[0]), (128, 128, 128)).save(tmp_path / f"t{r}.png")
        subs = []
        for k, colour in enumerate(list(COLOURS)[:s]):
            Image.new("RGB", (32 + 16 * k, 48), COLOURS[colour]).save(tmp_path / f"r{r}_{k}.png")
            subs.append(Subject(f"{colour} thing", "thing", f"r{r}_{k}.png"))
        names = " and ".join(f"the {x.name}" for x in subs)
        recs.append(Sample(f"rec{r}", f"{names} on a table", f"t{r}.png", subs))
    return recs


def _colour_of(ref: torch.Tensor) -> str:
    rgb = tuple(round(float(v) * 255) for v in ref[:, 0, 0])
    return next(name for name, c in COLOURS.items() if c == rgb)


def test_number_of_references_follows_psr_probabilities():
    # 4 subjects: P(2, 3, 4) = 0.9 / 0.05 / 0.05. 20k draws: binomial sd of 0.9 is 0.0021, of 0.05 is 0.0015;
    # tolerances are ~5 sd.
    rng = random.Random(0)
    counts = Counter(len(plan_references(4, rng)) for _ in range(20_000))
    assert counts[2] / 20_000 == pytest.approx(0.9, abs=0.011)
    assert counts[3] / 20_000 == pytest.approx(0.05, abs=0.008)
    assert counts[4] / 20_000 == pytest.approx(0.05, abs=0.008)
    # 3 subjects: 4 is impossible, renormalized to 0.9 / 0.95 and 0.05 / 0.95
    counts3 = Counter(len(plan_references(3, rng)) for _ in range(20_000))
    assert set(counts3) == {2, 3}
    assert counts3[3] / 20_000 == pytest.approx(0.05 / 0.95, abs=0.008)
    # fewer subjects than the smallest count: all of them
    assert sorted(plan_references(1, rng)) == [0]
    assert plan_references(0, rng) == []


def test_reference_order_is_random_and_dropout_drops():
    rng = random.Random(1)
    orders = Counter(tuple(plan_references(2, rng)) for _ in range(4000))
    assert set(orders) == {(0, 1), (1, 0)}
    assert orders[(1, 0)] / 4000 == pytest.approx(0.5, abs=0.04)  # sd 0.008
    assert all(
        plan_references(3, rng, counts=(3,), probs=(1.0,), shuffle=False) == [0, 1, 2] for _ in range(50)
    )
    kept = sum(len(plan_references(2, rng, counts=(2,), probs=(1.0,), dropout=0.25)) for _ in range(4000))
    assert kept / 8000 == pytest.approx(0.75, abs=0.03)  # sd 0.005


def test_shuffle_keeps_each_reference_paired_with_its_subject(tmp_path, tiny_policy):
    """Frame k (RoPE index k) shows subject meta["subjects"][k-1]; with tags, the prompt says so too."""
    recs = _records(tmp_path)
    ds = SFTDataset(recs, tmp_path, resolution=64, reference_tags=True)
    firsts = Counter()
    for seed in range(60):
        item = ds[SampleKey(seed % len(recs), seed, 0, 0)]
        refs, meta = item["references"], item["meta"]
        assert [_colour_of(r) for r in refs] == [n.split()[0] for n in meta["subjects"]]
        tags = re.findall(r"\[image (\d+): ([a-z]+) thing\]", item["prompt"])
        assert [int(k) for k, _ in tags] == list(range(1, len(refs) + 1))
        assert [c for _, c in tags] == [_colour_of(r) for r in refs]
        rec = recs[[r.id for r in recs].index(meta["id"])]
        assert [rec.subjects[i].name for i in meta["subject_indices"]] == meta["subjects"]
        assert item["prompt"].startswith(rec.instruction)  # the record's own words are untouched
        firsts[meta["subject_indices"][0]] += 1
    assert len(firsts) > 1  # the first frame is not always the first-named subject

    # Through the policy: the tokens with RoPE index k are the encoding of frame k's reference.
    item = ds[SampleKey(0, 3, 0, 0)]
    cond = tiny_policy.condition(item["prompt"], item["references"], 64, 64)
    offset = 0
    for k, ref in enumerate(item["references"], start=1):
        h, w = tiny_policy.reference_size(ref, 64, 64)
        n = (h // 16) * (w // 16)
        assert torch.all(cond.ref_ids[offset : offset + n, 0] == k)
        alone = tiny_policy.encode_references([ref], 64, 64)[0]
        torch.testing.assert_close(cond.ref_tokens[:, offset : offset + n], alone)
        offset += n
    assert offset == cond.ref_tokens.shape[1]


def test_missing_and_corrupt_files_name_file_and_record(tmp_path):
    recs = _records(tmp_path, n_subjects=(2,))
    (tmp_path / "r0_1.png").write_bytes(b"not a png at all")
    ds = SFTDataset(recs, tmp_path, resolution=64, shuffle_references=False)
    with pytest.raises(ImageLoadError, match=r"rec0.*r0_1\.png"):
        ds[0]
    recs[0].target = "gone.png"
    with pytest.raises(ImageLoadError, match=r"rec0.*target.*gone\.png"):
        SFTDataset(recs, tmp_path, resolution=64, aspect_ratios=(1.0, 2.0))  # buckets read headers
    with pytest.raises(ValueError, match="target image"):
        SFTDataset([Sample("x", "p", None, [])], tmp_path)
    with pytest.raises(ValueError, match="dataset.num_references_probs"):
        SFTDataset(recs, tmp_path, num_references=(2, 3), num_references_probs=(1.0,))


def test_buckets_and_target_resizing(tmp_path):
    buckets = make_buckets(512, [1.0, 0.75, 4 / 3, 0.5])
    assert buckets[0] == (512, 512)
    for h, w in buckets:
        assert h % 16 == 0 and w % 16 == 0
        assert h * w == pytest.approx(512 * 512, rel=0.06)
    assert nearest_bucket(600, 450, buckets) == 1  # w/h = 0.75
    assert nearest_bucket(100, 210, buckets) == 2  # closest to 4/3 of those above 1
    recs = _records(tmp_path, n_subjects=(2, 2, 2), target_sizes={0: (64, 64), 1: (100, 50), 2: (40, 80)})
    ds = SFTDataset(recs, tmp_path, resolution=64, aspect_ratios=(1.0, 0.5, 2.0))
    assert [ds.buckets[b] for b in ds.bucket_of] == [(64, 64), (96, 48), (48, 96)]
    assert ds[1]["target"].shape == (3, 96, 48)
    assert ds[2]["target"].shape == (3, 48, 96)


def test_bucket_batch_sampler_shards_and_resumes():
    bucket_of = [0, 1] * 10 + [2] * 3
    full = BucketBatchSampler(bucket_of, 3, seed=5)
    epoch0 = full.epoch_batches(0)
    assert all(len({bucket_of[i] for i in b}) == 1 for b in epoch0)
    flat = [i for b in epoch0 for i in b]
    assert len(flat) == len(set(flat)) == 3 * 7  # 10 + 10 + 3 records -> 3 + 3 + 1 full batches
    assert epoch0 != full.epoch_batches(1)
    ranks = [
        BucketBatchSampler(bucket_of, 3, seed=5, rank=r, world_size=2).epoch_batches(0) for r in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 3
    assert not {tuple(b) for b in ranks[0]} & {tuple(b) for b in ranks[1]}
    assert {tuple(b) for b in ranks[0] + ranks[1]} <= {tuple(b) for b in epoch0}
    # resume from the position after the 10th batch (crossing an epoch boundary) gives the same stream
    stream = list(itertools.islice(iter(full), 20))
    resumed = BucketBatchSampler(bucket_of, 3, seed=5)
    resumed.load_state_dict({"epoch": stream[9][0].epoch, "cursor": stream[9][0].position + 1})
    assert list(itertools.islice(iter(resumed), 10)) == stream[10:]
    assert stream[7][0].epoch == 1 and stream[7][0].position == 0
    with pytest.raises(ValueError, match="train.micro_batch_size"):
        BucketBatchSampler([0, 1], 2)


def test_dataloader_with_workers_equals_in_process(tmp_path):
    recs = _records(tmp_path, n_subjects=(2, 3, 4, 2, 3, 4))
    ds = SFTDataset(recs, tmp_path, resolution=64)

    def batches(workers):
        sampler = BucketBatchSampler(ds.bucket_of, 2, seed=3)
        loader = torch.utils.data.DataLoader(
            ds, batch_sampler=sampler, num_workers=workers, collate_fn=collate_sft
        )
        return list(itertools.islice(iter(loader), 4))

    a, b = batches(0), batches(2)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.target, y.target)
        assert x.prompts == y.prompts and x.meta == y.meta
        for rx, ry in zip(x.references, y.references, strict=True):
            assert len(rx) == len(ry) and all(torch.equal(p, q) for p, q in zip(rx, ry, strict=True))
    assert a[0].target.shape == (2, 3, 64, 64)
    assert position_after(a[3]) == {"epoch": 1, "cursor": 1}  # 3 batches per epoch


def test_batch_stream_whole_groups_per_rank_and_resume():
    g = 3
    samplers = [
        BatchStream(10, prompts_per_step=2, group_size=g, rank=r, world_size=2, seed=1) for r in range(2)
    ]
    seen = []
    for _step in range(2):  # steps_per_epoch = 10 // 4 = 2
        a, b = (s.next_indices() for s in samplers)
        assert len(a) == len(b) == 2 and not set(a) & set(b)
        seen += a + b
    assert len(set(seen)) == 8  # no prompt twice within the epoch
    assert samplers[0].state_dict() == {"epoch": 1, "step_in_epoch": 0}
    # iteration: each prompt G times in a row
    items = list(itertools.islice(iter(BatchStream(10, prompts_per_step=2, group_size=g, seed=1)), 12))
    assert all(len(set(items[i : i + g])) == 1 for i in range(0, 12, g))
    # resume
    ref = BatchStream(10, prompts_per_step=2, seed=4)
    steps = [ref.next_indices() for _ in range(7)]
    again = BatchStream(10, prompts_per_step=2, seed=4)
    for _ in range(3):
        again.next_indices()
    state = again.state_dict()
    resumed = BatchStream(10, prompts_per_step=2, seed=4)
    resumed.load_state_dict(state)
    assert [resumed.next_indices() for _ in range(4)] == steps[3:]
    assert steps[0] != BatchStream(10, prompts_per_step=2, seed=5).next_indices()
    with pytest.raises(ValueError, match="train.prompts_per_step"):
        BatchStream(3, prompts_per_step=2, world_size=2)


def test_prompt_dataset_loads_references_in_subject_order(tmp_path):
    recs = _records(tmp_path, n_subjects=(3,))
    rec = PromptDataset(recs, tmp_path)[0]
    assert rec.prompt == recs[0].instruction and rec.categories == ["thing"] * 3
    assert [_colour_of(r) for r in rec.references] == ["red", "green", "blue"]
    sampler = BatchStream(1, prompts_per_step=1, dataset=PromptDataset(recs, tmp_path))
    assert sampler.next_batch()[0].id == "rec0"


def test_psrbench_and_manifest_records_for_rl(tmp_path):
    """RL prompts from a PSRBench JSON (no targets) and from a manifest, through the data sources."""
    import json

    from omegaconf import OmegaConf

    from psr.data.manifest import write_manifest
    from psr.data.sources import load_manifest, load_records

    recs = _records(tmp_path, n_subjects=(2, 3, 2))
    bench = [
        {"instruction": r.instruction, "input_path": [s.reference for s in r.subjects], "result_path": ""}
        | {f"category{k}": s.name for k, s in enumerate(r.subjects, start=1)}
        for r in recs
    ]
    (tmp_path / "three.json").write_text(json.dumps(bench))
    cfg = OmegaConf.create(
        {
            "data": {
                "_target_": "psr.data.sources.load_psrbench",
                "path": str(tmp_path / "three.json"),
                "root": None,
                "heldout": 1,
            }
        }
    )
    records = load_records(cfg.data, tmp_path)
    train, heldout = PromptDataset(records.train, records.root), PromptDataset(records.heldout, records.root)
    assert len(train) == 2 and len(heldout) == 1 and train[1].kind == "three"
    assert [_colour_of(r) for r in train[1].references] == ["red", "green", "blue"]
    assert train[1].categories == ["red thing", "green thing", "blue thing"]
    with pytest.raises(ValueError, match="target image"):
        SFTDataset(records.train, tmp_path)  # PSRBench has no targets: RL/eval only

    write_manifest(tmp_path / "m.jsonl", recs)
    train_s, held_s, root = load_manifest(str(tmp_path / "m.jsonl"), heldout=1)
    assert (
        [s.id for s in train_s] == ["rec0", "rec1"]
        and [s.id for s in held_s] == ["rec2"]
        and root == tmp_path
    )
    with pytest.raises(FileNotFoundError, match="data.manifest"):
        load_manifest(str(tmp_path / "none.jsonl"))
    with pytest.raises(ValueError, match="data.heldout"):
        load_manifest(str(tmp_path / "m.jsonl"), heldout=3)
