"""``psr-eval``: sample a benchmark with the ODE sampler and score every sample with a reward.

One run, top to bottom (:func:`main`):
  1. the records of ``data`` (PSRBench JSON, a ``psr-data`` manifest or the synthetic set),
     ``eval.split`` of them, this rank's share (``records[rank::world]``);
  2. the model of ``model``, optionally with ``checkpoint=`` (a psr-sft / psr-rl run or checkpoint
     directory, LoRA merged) and/or ``lora=`` (a diffusers-format LoRA file, merged);
  3. per record: condition once (prompt + references), ``eval.samples_per_prompt`` ODE samples from
     per-sample initial noise seeded by ``(seed, record id, sample index)`` (the ``eval`` domain of
     :mod:`psr.seeding`), so a sample is the same whatever the batch, the sharding or the resume;
  4. per batch of ``eval.records_per_batch`` records: the reward on its images (one call per image size), the PNGs
     under ``samples/`` and one line per sample appended to the scores file (flushed per batch);
  5. rank 0 merges every rank's lines into ``scores.jsonl``, writes ``summary.json`` (mean / std /
     count per reward key, overall and per task kind) and ``grid.png`` (references | samples).

Resume: a rerun in the same ``run_dir`` skips the samples already scored. Images are quantized to
8 bits before scoring, so scoring the saved PNGs again (``psr-score``) gives the same numbers.

``eval.source=results`` samples nothing: each record's ``result_path`` (PSRBench's field for the
image a model under test produced) is read and scored as sample 0, so other models' outputs get the
same numbers. A record whose image cannot be read is written with empty scores and an ``error``,
and counted as ``excluded`` in the summary (the released scripts skip such records); a rerun keeps
it as done, so delete its line from ``scores.jsonl`` to score the record once its image exists.

Suites (``suite=psrbench``): a reward with ``score(images, inputs, kinds)`` (:class:`SuiteScorer`)
is given each sample's task kind (its PSRBench subset), so it can pick a judge template or the
position rule per sample; the summary then also holds ``overall``, the mean over kinds of each
kind's mean (the paper's overall column: subsets weigh equally). A scorer with
``released_summary(rows)`` adds that dict as the summary's ``released`` block (OmniRef's mean over
subject pairs). A record's ``result_path`` is read from its provenance (top level, else PSRBench's
``provenance["psrbench"]``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor

from psr import distributed
from psr.checkpoint import checkpoint_fingerprint, find_checkpoint
from psr.config import EvalSettings, settings
from psr.data.dataset import ImageLoadError, PromptDataset, PromptRecord, open_image, to_tensor
from psr.data.sources import load_records
from psr.evaluate.scores import drop_torn_tail, json_value, print_summary, read_scores, summarize
from psr.logging import make_grid, progress
from psr.models.lora import merge_lora, read_diffusers_lora
from psr.resume import flatten, load_initial_weights
from psr.runlock import lock_run_dir
from psr.sampling.rollout import initial_noise, rollout
from psr.seeding import derive_seed
from psr.trainers import print_outputs, resolve_run_dir
from rewards.base import RewardInputs, build_reward


@runtime_checkable
class SuiteScorer(Protocol):
    """A benchmark's scorer: a reward that also needs each sample's task kind (e.g. PSRBench subset)."""

    def score(self, images: Tensor, inputs: RewardInputs, kinds: Sequence[str]) -> dict[str, Tensor]: ...


SCORES = "scores.jsonl"
SUMMARY = "summary.json"
SETTINGS = "eval_settings.json"
GRID = "grid.png"
SPLITS = ("all", "train", "heldout")
SAMPLING_KEYS = ("samples_per_prompt", "resolution", "num_steps")  # eval keys that change a sample

# ---------------------------------------------------------------------------------------------- pure helpers


def sample_seed(seed: int, record_id: str, index: int) -> int:
    """The seed of sample ``index`` of record ``record_id``: its initial noise depends on nothing else
    (keyed by the id, not the record's position, so subsets and reorderings keep every sample)."""
    return derive_seed(seed, "eval", record_id, index)


def image_name(record_id: str, index: int) -> str:
    """``<record_id>_<k>.png`` for an id made of ``[A-Za-z0-9._-]`` (at most 100 of them); otherwise the
    id with other characters replaced by ``_``, cut to 100 characters, and ``-<hash of the id>``, so
    ids that differ only in replaced characters (``x/1``, ``x?1``, ``x_1``) get files of their own."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", record_id)
    if safe == record_id and len(safe) <= 100:
        return f"{safe}_{index}.png"
    digest = hashlib.sha256(record_id.encode("utf-8")).hexdigest()[:12]
    return f"{safe[:100]}-{digest}_{index}.png"


def quantize(images: Tensor) -> Tensor:
    """``[B, 3, H, W]`` in [0, 1] rounded to the 8-bit values a PNG stores (fp32)."""
    return (images.float().clamp(0, 1) * 255).round() / 255


def to_pil(image: Tensor) -> Image.Image:
    """``[3, H, W]`` in [0, 1] -> an RGB PIL image."""
    arr = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def to_plain(node: Any) -> Any:
    """A config node as plain Python containers (for JSON); other values as they are."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def batched(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# ---------------------------------------------------------------------------------------------- model


def load_lora_file(policy: Any, path: str | os.PathLike) -> Path:
    """Merge a diffusers-format FLUX LoRA (``pytorch_lora_weights.safetensors`` or its folder) into
    the transformer's base weights, at the scale stored with it (alpha / rank; 1 without metadata)."""
    p = Path(os.path.expanduser(str(path)))
    weights, scale = read_diffusers_lora(p)
    merge_lora(policy.transformer, weights, scale, source=f"lora={path}")
    return p / "pytorch_lora_weights.safetensors" if p.is_dir() else p


# ---------------------------------------------------------------------------------------------- the run


class Evaluator:
    """``__init__`` reads scalars; ``setup`` builds; ``run`` samples and scores; ``finish`` merges."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        # the typed section (psr.schema): a value of the wrong type or out of range fails here, naming its key
        e = settings(cfg.eval, EvalSettings, "eval")
        self.seed = int(cfg.seed)
        self.split = e.split
        self.samples_per_prompt = e.samples_per_prompt
        self.resolution = e.resolution
        self.num_steps = e.num_steps
        self.records_per_batch = e.records_per_batch
        self.grid_records = e.grid_records
        self.limit = e.limit
        self.source = e.source
        self.results_root = e.results_root
        # results: the one image a model under test wrote per record
        self.group = 1 if self.source == "results" else self.samples_per_prompt
        if self.source == "results" and (cfg.get("checkpoint") or cfg.get("lora")):
            raise ValueError(
                "eval.source=results scores the records' result_path images; checkpoint= and lora= "
                "name a model to sample, which this does not do (drop them or use eval.source=sample)"
            )

    def setup(self) -> None:
        cfg = self.cfg
        self.info, self._owns_group = distributed.init_distributed()
        self.rank, self.world = self.info.rank, self.info.world_size
        self.run_dir = resolve_run_dir(cfg.run_dir)
        self.run_lock = lock_run_dir(self.run_dir, "psr-eval", rank=self.rank)  # collective; before any write
        self.device = torch.device(
            cfg.device
            if cfg.get("device")
            else (f"cuda:{self.info.local_rank}" if torch.cuda.is_available() else "cpu")
        )
        self.checkpoint = self._resolve_checkpoint(cfg.get("checkpoint"))
        self._check_settings()
        self.records = self._load_records()  # collective for data=synthetic (one writer, then all read)
        self.policy: Any = None
        if self.source == "sample":
            self.policy = instantiate(cfg.model, device=str(self.device))
            if self.checkpoint is not None:
                read = load_initial_weights(
                    self.policy, cfg.checkpoint, fingerprint=self.checkpoint, key="checkpoint"
                )
                self._say(f"psr-eval: weights from {read}")
            if cfg.get("lora"):
                read = load_lora_file(self.policy, str(cfg.lora))
                self._say(f"psr-eval: LoRA merged from {read}")
            self.policy.eval()
        self.reward = build_reward(cfg.reward, self.device)

    def _say(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)

    def _load_records(self) -> PromptDataset:
        train, heldout, root = load_records(self.cfg.data, self.run_dir)
        samples = {"all": train + heldout, "train": train, "heldout": heldout}[self.split]
        if self.limit is not None:
            samples = samples[: self.limit]
        if not samples:
            raise ValueError(
                f"eval.split={self.split} selects no records of data={self.cfg.data._target_} "
                f"(data.heldout={self.cfg.data.get('heldout')}, eval.limit={self.limit})"
            )
        ids = [s.id for s in samples]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(
                f"record ids must be unique (samples are named and resumed by id); repeated: {dup[:5]}"
            )
        return PromptDataset(samples, root)

    def _resolve_checkpoint(self, checkpoint: str | None) -> dict[str, Any] | None:
        """The checkpoint ``checkpoint=`` (a run directory: its newest) stands for, as a fingerprint
        (path, step, hash), resolved once by rank 0 for every rank."""
        if not checkpoint:
            return None
        found = (
            checkpoint_fingerprint(find_checkpoint(checkpoint, key="checkpoint")) if self.rank == 0 else None
        )
        return distributed.broadcast_object(found)  # type: ignore[no-any-return]

    def _check_settings(self) -> None:
        """A rerun in the same run_dir must sample the same way, or resumed scores would mix two models:
        the settings and the checkpoint ``checkpoint=`` resolved to (a run directory that saved a newer
        checkpoint since names another model) must equal the first start's."""
        keep = ("model", "reward", "seed", "checkpoint", "lora", *(f"eval.{k}" for k in SAMPLING_KEYS))
        keep += ("eval.source", "eval.results_root")
        settings = flatten({k: to_plain(OmegaConf.select(self.cfg, k)) for k in keep})
        settings.update(flatten({"checkpoint_resolved": self.checkpoint or {}}))
        path = self.run_dir / SETTINGS
        if path.is_file():
            old = json.loads(path.read_text())
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if changed:
                diff = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in changed)
                raise ValueError(
                    f"{self.run_dir} holds scores made with other settings ({diff} differ from "
                    f"{path}); evaluate into a new run_dir (hydra.run.dir=...) or delete it"
                )
        distributed.barrier()
        if self.rank == 0:
            path.write_text(json.dumps(settings, indent=1, sort_keys=True))

    # ------------------------------------------------------------------ sampling
    def scores_path(self) -> Path:
        """Where this rank appends: ``scores.jsonl`` alone, ``scores.rank<r>.jsonl`` with several ranks."""
        return self.run_dir / (SCORES if self.world == 1 else f"scores.rank{self.rank}.jsonl")

    def score_files(self) -> list[Path]:
        return [self.run_dir / SCORES, *sorted(self.run_dir.glob("scores.rank*.jsonl"))]

    def done(self) -> set[tuple[str, int]]:
        return {(r["id"], int(r["sample"])) for f in self.score_files() for r in read_scores(f)}

    @torch.no_grad()
    def sample(self, record: PromptRecord) -> tuple[Tensor, list[int]]:
        """All ``samples_per_prompt`` ODE samples of ``record`` ``[G, 3, H, W]`` (quantized) and their seeds.

        The whole group is always sampled, even on resume, so a sample's batch never changes.
        """
        res = self.resolution
        cond = self.policy.condition(record.prompt, record.references, res, res)
        seeds = [sample_seed(self.seed, record.id, k) for k in range(self.samples_per_prompt)]
        noise = torch.cat(
            [
                initial_noise(self.policy, cond, 1, torch.Generator(self.policy.device).manual_seed(s))
                for s in seeds
            ]
        )  # [G, N, C]
        traj = rollout(
            self.policy, cond, self.samples_per_prompt, num_steps=self.num_steps, method="ode", latents=noise
        )
        return quantize(traj.images), seeds

    def read_result(self, index: int) -> tuple[Tensor | None, str, str | None]:
        """Record ``index``'s ``result_path`` image ``[1, 3, H, W]`` (None if unreadable), its path,
        and the error. A relative path resolves against ``eval.results_root`` (null: the working
        directory, as the released scripts open it)."""
        sample = self.records.samples[index]
        prov = sample.provenance or {}  # PSRBench keeps it with the record's fields, other suites at the top
        given = str(prov.get("result_path") or prov.get("psrbench", {}).get("result_path") or "")
        if not given:
            return None, "", f"record {sample.id} has no result_path"
        path = Path(os.path.expanduser(given))
        if not path.is_absolute() and self.results_root:
            path = Path(os.path.expanduser(self.results_root)) / path
        try:
            image = to_tensor(open_image(path, sample.id, "result_path"))
        except ImageLoadError as err:  # recorded and counted as excluded, as the released scripts skip it
            return None, str(path), str(err)
        return image[None], str(path.resolve()), None

    def _score(self, images: Tensor, records: list[PromptRecord]) -> dict[str, list[float]]:
        inputs = RewardInputs.from_records(records)
        if isinstance(self.reward, SuiteScorer):
            scores = self.reward.score(images.to(self.device), inputs, [r.kind for r in records])
        else:
            scores = self.reward(images.to(self.device), inputs)
        return {k: v.detach().float().cpu().tolist() for k, v in scores.items()}

    def score_batch(self, images: list[Tensor], records: list[PromptRecord]) -> list[dict[str, float]]:
        """Scores per sample; samples of one image size are scored together (results may differ in size)."""
        by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, im in enumerate(images):
            by_size[tuple(im.shape)].append(i)
        out: list[dict[str, float]] = [{} for _ in images]
        for idx in by_size.values():
            values = self._score(torch.stack([images[i] for i in idx]), [records[i] for i in idx])
            for j, i in enumerate(idx):
                out[i] = {k: v[j] for k, v in values.items()}
        return out

    def run(self) -> int:
        """Sample and score this rank's missing samples; returns how many were scored."""
        done = self.done()
        distributed.barrier()  # every rank reads what is done before any rank appends
        G = self.group
        mine = list(range(self.rank, len(self.records), self.world))
        todo = [i for i in mine if any((self.records.samples[i].id, k) not in done for k in range(G))]
        self._say(
            f"psr-eval: {len(self.records)} records x {G} samples, {len(done)} already scored, "
            f"{len(todo)} records to sample on {self.world} rank(s)"
        )
        samples_dir = self.run_dir / "samples"
        samples_dir.mkdir(exist_ok=True)
        out_path = self.scores_path()
        drop_torn_tail(out_path)
        count = 0
        bar = progress(len(todo), "psr-eval", self.rank, unit="record")
        with out_path.open("a", encoding="utf-8") as out:
            for chunk in batched(todo, self.records_per_batch):
                images: list[Tensor] = []  # [3, H, W] each
                rows: list[dict[str, Any]] = []
                inputs: list[PromptRecord] = []
                failed: list[dict[str, Any]] = []
                for i in chunk:
                    rec = self.records[i]
                    base: dict[str, Any] = {"id": rec.id, "prompt": rec.prompt, "kind": rec.kind}
                    base["num_references"] = len(rec.references)
                    if self.source == "results":
                        image, path, error = self.read_result(i)
                        if image is None:
                            failed.append({**base, "sample": 0, "image": path, "error": error, "scores": {}})
                            continue
                        images.append(image[0])
                        inputs.append(rec)
                        rows.append({**base, "sample": 0, "image": path})
                        continue
                    group, seeds = self.sample(rec)
                    missing = [k for k in range(G) if (rec.id, k) not in done]
                    images += list(group[missing].unbind(0))
                    inputs += [rec] * len(missing)
                    rows += [
                        {**base, "sample": k, "seed": seeds[k], "image": f"samples/{image_name(rec.id, k)}"}
                        for k in missing
                    ]
                values = self.score_batch(images, inputs) if images else []
                for b, row in enumerate(rows):
                    if self.source != "results":
                        to_pil(images[b]).save(self.run_dir / row["image"])
                    row["scores"] = {k: json_value(v) for k, v in values[b].items()}
                    out.write(json.dumps(row) + "\n")
                for row in failed:
                    out.write(json.dumps(row) + "\n")
                rows += failed
                out.flush()  # a kill loses at most this batch
                count += len(rows)
                bar.update(len(chunk))
        bar.close()
        return count

    # ------------------------------------------------------------------ merge, summary, grid
    def finish(self) -> dict[str, Any] | None:
        """Rank 0: merge the ranks' scores into ``scores.jsonl`` (record order), write the summary and grid."""
        distributed.barrier()
        if self.rank != 0:
            return None
        order = {s.id: i for i, s in enumerate(self.records.samples)}
        merged: dict[tuple[str, int], dict[str, Any]] = {}
        files = self.score_files()
        for f in files:
            for r in read_scores(f):
                merged[(r["id"], int(r["sample"]))] = r
        rows = sorted(
            merged.values(), key=lambda r: (order.get(r["id"], len(order)), r["id"], int(r["sample"]))
        )
        tmp = self.run_dir / (SCORES + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, self.run_dir / SCORES)
        for f in files[1:]:
            f.unlink()
        wanted = [r for r in rows if r["id"] in order and int(r["sample"]) < self.group]
        expected = len(self.records) * self.group
        if len(wanted) != expected:
            raise RuntimeError(f"psr-eval: {len(wanted)} of {expected} samples scored; rerun to finish")
        summary = summarize(wanted)
        released = getattr(self.reward, "released_summary", None)  # a suite's own aggregate (OmniRef)
        if callable(released):
            summary["released"] = released(wanted)
        summary["split"] = self.split
        summary["source"] = self.source
        (self.run_dir / SUMMARY).write_text(json.dumps(summary, indent=1))
        self.write_grid(wanted)
        return summary

    def write_grid(self, rows: Sequence[dict[str, Any]]) -> None:
        if self.grid_records <= 0:
            return
        by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            if not r.get("error"):
                by_id[r["id"]].append(r)
        cells, captions = [], []
        for i in range(min(self.grid_records, len(self.records))):
            rec = self.records[i]
            samples = sorted(by_id[rec.id], key=lambda r: int(r["sample"]))
            cells.append(
                list(rec.references)
                + [to_tensor(open_image(self.run_dir / r["image"], rec.id, "sample")) for r in samples]
            )
            captions.append(
                [f"ref {k + 1}" for k in range(len(rec.references))]
                + [_caption(r["scores"].get("score")) for r in samples]
            )
        make_grid(cells, captions, cell_height=min(256, self.resolution)).save(self.run_dir / GRID)

    def cleanup(self) -> None:
        self.run_lock.release()
        if self._owns_group:
            distributed.destroy()


def _caption(score: float | None) -> str:
    return "n/a" if score is None else f"{score:.3f}"


def main(cfg: DictConfig) -> None:
    """Entry point of ``psr-eval`` (see :mod:`psr.cli`)."""
    start = time.time()
    evaluator = Evaluator(cfg)
    evaluator.setup()
    try:
        evaluator.run()
        summary = evaluator.finish()
    finally:
        evaluator.cleanup()
    if summary is not None:
        print_summary(summary)
        run_dir = evaluator.run_dir
        print_outputs(
            "psr-eval",
            run_dir,
            time.time() - start,
            extra={
                "samples": run_dir / "samples",
                "scores": run_dir / SCORES,
                "summary": run_dir / SUMMARY,
                "grid": run_dir / GRID,
            },
        )
