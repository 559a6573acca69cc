"""``psr-score``: score generated images with any configured reward; write JSON and CSV.

Inputs (one of):
  ``--images DIR``        every image in DIR; the prompt of ``x.png`` is ``x.txt`` beside it, else ``--prompt``;
  ``--manifest F.jsonl``  psr manifest records (``id``, ``instruction``, ``target``, ``subjects``: ``name``,
                          ``category``, ``reference``); the image scored is ``--images DIR/<id>.<ext>`` when
                          ``--images`` is given, else the record's ``target``;
  ``--psrbench F.json``   PSRBench records (``instruction``, ``input_path`` list, ``category1..4``,
                          ``result_path``); ``result_path`` is the image scored. Records get the ids
                          psr-eval gives them (``rewards.psrbench.record_id``: ``id``, the object key,
                          or ``<file stem>-<4-digit index>``), so the two outputs join on ``id``.
Relative paths resolve against ``--root`` (default: the manifest's / JSON's folder).

The reward: ``--reward NAME`` composes ``conf/reward/NAME.yaml`` with Hydra (``--config-dir`` to use
another tree), ``--reward FILE.yaml`` loads a file, ``--reward pkg.module.Class`` builds a ``_target_``.
Trailing ``key=value`` arguments override the reward config (``detector.path=/models/gd``);
``--device``/``--dtype`` set every ``device``/``dtype`` key in it.

Examples:
  psr-score --psrbench psrbench/three.json --reward psr detector.path=/m/gd embedder.path=/m/dino --device cuda
  psr-score --images outputs/samples --reward color --out scores/
Outputs: ``OUT/scores.json`` (config, means, per-sample values; NaN as null) and ``OUT/scores.csv``
(one row per image, then a ``mean`` row). Exit status 0 after a run; 1 with a message naming the
problem for bad input (a missing file, a bad record, a reward config key without a value); 2 for
bad arguments.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from rewards.base import RewardInputs, Subject
from rewards.psrbench import record_id as psrbench_record_id

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"


# ---------------------------------------------------------------------------------------------- config


def set_everywhere(node: Any, key: str, value: Any) -> None:
    """Set ``key`` to ``value`` in every mapping of a config tree that has it (device, dtype)."""
    from omegaconf import DictConfig, ListConfig

    if isinstance(node, DictConfig):
        for k in list(node.keys()):
            if k == key:
                node[k] = value
            else:
                set_everywhere(node._get_node(k), key, value)
    elif isinstance(node, ListConfig):
        for item in node:
            set_everywhere(item, key, value)


def reward_config(reward: str, overrides: list[str], config_dir: Path = DEFAULT_CONFIG_DIR) -> Any:
    """The reward's config: ``conf/reward/<reward>.yaml`` composed by Hydra, a YAML file, or a ``_target_``."""
    from omegaconf import OmegaConf

    for o in overrides:
        if "=" not in o and not o.startswith("~"):
            raise ValueError(
                f"psr-score: override {o!r} must look like key=value (or ~key to delete, with a conf/reward name)"
            )
    path = Path(reward).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"psr-score: --reward {reward}: no such file")
        return OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(overrides))
    if (config_dir / "reward" / f"{reward}.yaml").is_file():
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(version_base=None, config_dir=str(config_dir.resolve())):
            return compose(overrides=[f"+reward={reward}", *(_under_reward(o) for o in overrides)]).reward
    if "." in reward and "/" not in reward:
        return OmegaConf.merge(OmegaConf.create({"_target_": reward}), OmegaConf.from_dotlist(overrides))
    names = sorted(p.stem for p in (config_dir / "reward").glob("*.yaml"))
    raise ValueError(
        f"psr-score: --reward {reward!r} is not one of {names} in {config_dir / 'reward'}, a YAML file or a _target_"
    )


def _under_reward(override: str) -> str:
    """``key=v`` -> ``reward.key=v`` keeping Hydra's ``~``/``+``/``++`` prefixes in front."""
    prefix = override[: len(override) - len(override.lstrip("~+"))]
    return f"{prefix}reward.{override[len(prefix) :]}"


# ---------------------------------------------------------------------------------------------- records


def _resolve(root: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else root / q


def _find_image(folder: Path, stem: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    raise FileNotFoundError(
        f"psr-score: no image {stem}.<{'|'.join(s[1:] for s in IMAGE_SUFFIXES)}> in {folder}"
    )


def folder_records(folder: Path, prompt: str) -> list[dict[str, Any]]:
    if not folder.is_dir():
        raise FileNotFoundError(f"psr-score: --images {folder} is not a directory")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"psr-score: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    out = []
    for f in files:
        side = f.with_suffix(".txt")
        out.append(
            {
                "id": f.stem,
                "image": f,
                "prompt": side.read_text().strip() if side.is_file() else prompt,
                "references": [],
                "subjects": [],
            }
        )
    return out


def manifest_records(path: Path, root: Path, images: Path | None) -> list[dict[str, Any]]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            subjects = rec.get("subjects", [])
            out.append(
                {
                    "id": str(rec["id"]),
                    "image": _find_image(images, str(rec["id"])) if images else _resolve(root, rec["target"]),
                    "prompt": str(rec["instruction"]),
                    "references": [_resolve(root, s["reference"]) for s in subjects],
                    "subjects": [
                        Subject(str(s.get("name") or s["category"]), str(s["category"])) for s in subjects
                    ],
                }
            )
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(
                f"psr-score: {path} line {n}: not a manifest record ({type(err).__name__}: {err})"
            ) from err
    return out


def psrbench_records(path: Path, root: Path) -> list[dict[str, Any]]:
    """Records of a PSRBench JSON (a list, or an object of id -> record), named as psr-eval names
    them (:func:`rewards.psrbench.record_id`) so the two commands' outputs join on ``id``."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"psr-score: --psrbench {path}: not valid JSON ({err.msg} at line {err.lineno})"
        ) from err
    if isinstance(data, list):
        entries: list[tuple[str | None, Any]] = [(None, r) for r in data]
    elif isinstance(data, dict):
        entries = [(str(k), r) for k, r in data.items()]
    else:
        raise ValueError(
            f"psr-score: --psrbench {path}: expected a JSON list of records (or an object of id -> record)"
        )
    out = []
    for i, (key, rec) in enumerate(entries):
        try:
            if not isinstance(rec, dict):
                raise TypeError(f"record is a {type(rec).__name__}, not an object")
            refs = rec["input_path"] if isinstance(rec["input_path"], list) else [rec["input_path"]]
            cats = [str(rec[f"category{k}"]) for k in range(1, len(refs) + 1)]
            if not rec.get("result_path"):
                raise KeyError("result_path")
            out.append(
                {
                    "id": psrbench_record_id(rec, key, i, path.stem),
                    "image": _resolve(root, rec["result_path"]),
                    "prompt": str(rec["instruction"]),
                    "references": [_resolve(root, r) for r in refs],
                    "subjects": [Subject(c, c) for c in cats],
                }
            )
        except (KeyError, TypeError) as err:
            raise ValueError(
                f"psr-score: {path} record {i}: missing or bad field {err} (PSRBench records need instruction, input_path, category1..N, result_path)"
            ) from err
    return out


def load_image(path: Path) -> torch.Tensor:
    """``[3, H, W]`` float32 in [0, 1]; a clear error naming the file."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (FileNotFoundError, OSError) as err:
        raise FileNotFoundError(f"psr-score: cannot read image {path}: {err}") from err
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except (FileNotFoundError, OSError) as err:
        raise FileNotFoundError(f"psr-score: cannot read image {path}: {err}") from err


# ---------------------------------------------------------------------------------------------- scoring


def score_records(
    reward: Any, records: list[dict[str, Any]], batch_size: int, progress: bool = True
) -> list[dict[str, float]]:
    """Per-record reward values. Images of one size are batched together (a batch is one tensor)."""
    from tqdm import tqdm

    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        by_size[_size(rec["image"])].append(i)
    results: list[dict[str, float]] = [{} for _ in records]
    bar = tqdm(total=len(records), desc="psr-score", unit="img", disable=not progress)
    for indices in by_size.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            cache: dict[Path, torch.Tensor] = {}  # one tensor per reference file, shared within the batch
            for i in chunk:
                for p in records[i]["references"]:
                    if p not in cache:
                        cache[p] = load_image(p)
            refs = [[cache[p] for p in records[i]["references"]] for i in chunk]
            inputs = RewardInputs(
                [records[i]["prompt"] for i in chunk], refs, [records[i]["subjects"] for i in chunk]
            )
            images = torch.stack([load_image(records[i]["image"]) for i in chunk])
            out = reward(images, inputs)
            for j, i in enumerate(chunk):
                results[i] = {k: float(v[j]) for k, v in out.items()}
            bar.update(len(chunk))
    bar.close()
    return results


def write_outputs(
    out_dir: Path, records: list[dict[str, Any]], results: list[dict[str, float]], config: Any
) -> dict[str, float]:
    """``scores.json`` and ``scores.csv`` in ``out_dir``; returns the means (NaN entries skipped)."""
    keys = sorted({k for r in results for k in r}, key=lambda k: (k != "score", k))
    means = {}
    for k in keys:
        vals = [r[k] for r in results if k in r and not math.isnan(r[k])]
        means[k] = float(np.mean(vals)) if vals else float("nan")

    def clean(v: float) -> float | None:
        return None if math.isnan(v) else v

    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "reward": config,
        "count": len(records),
        "mean": {k: clean(v) for k, v in means.items()},
        "samples": [
            {"id": rec["id"], "image": str(rec["image"]), **{k: clean(r.get(k, float("nan"))) for k in keys}}
            for rec, r in zip(records, results, strict=True)
        ],
    }
    (out_dir / "scores.json").write_text(json.dumps(payload, indent=2))
    with open(out_dir / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "image", *keys])
        for rec, r in zip(records, results, strict=True):
            w.writerow(
                [
                    rec["id"],
                    rec["image"],
                    *("" if math.isnan(r.get(k, float("nan"))) else f"{r[k]:.6g}" for k in keys),
                ]
            )
        w.writerow(["mean", "", *("" if math.isnan(means[k]) else f"{means[k]:.6g}" for k in keys)])
    return means


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psr-score",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--manifest", type=Path, help="psr manifest JSONL")
    src.add_argument("--psrbench", type=Path, help="PSRBench JSON")
    parser.add_argument(
        "--images",
        type=Path,
        help="folder of images (alone: score them; with --manifest: <id>.<ext> per record)",
    )
    parser.add_argument("--reward", required=True, help="conf/reward/<name>, a YAML file, or a _target_")
    parser.add_argument("--root", type=Path, help="base of relative paths (default: the input file's folder)")
    parser.add_argument("--out", type=Path, default=Path("scores"), help="output folder (default: ./scores)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompt", default="", help="prompt for --images without .txt sidecars")
    parser.add_argument("--device", help="set every 'device' key of the reward config")
    parser.add_argument("--dtype", help="set every 'dtype' key of the reward config")
    parser.add_argument("--config-dir", type=Path, default=DEFAULT_CONFIG_DIR)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="reward config overrides key=value")
    return parser


def run(argv: list[str] | None = None) -> dict[str, float]:
    """``psr-score`` without the exit handling: parse ``argv``, score, write the outputs.

    Returns:
        The mean of every reward key over the samples where it applies (NaN where none does).

    Raises:
        ValueError, FileNotFoundError: bad input, with a message naming the flag, file or record.
        SystemExit: bad arguments (argparse's usage message, status 2).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    for flag in ("manifest", "psrbench"):
        given = getattr(args, flag)
        if given is not None and not given.is_file():
            raise FileNotFoundError(f"psr-score: --{flag} {given}: no such file")

    if args.manifest:
        records = manifest_records(args.manifest, args.root or args.manifest.parent, args.images)
    elif args.psrbench:
        records = psrbench_records(args.psrbench, args.root or args.psrbench.parent)
    elif args.images:
        records = folder_records(args.images, args.prompt)
    else:
        parser.error("give --images, --manifest or --psrbench")

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = reward_config(args.reward, list(args.overrides), args.config_dir)
    for key in ("device", "dtype"):
        if getattr(args, key):
            set_everywhere(cfg, key, getattr(args, key))
    reward = instantiate(cfg)
    results = score_records(reward, records, args.batch_size, progress=not args.no_progress)
    means = write_outputs(args.out, records, results, OmegaConf.to_container(cfg, resolve=True))
    print(
        f"psr-score: {len(records)} images, mean score {means.get('score', float('nan')):.4f}; wrote {args.out / 'scores.json'} and {args.out / 'scores.csv'}"
    )
    return means


def main(argv: list[str] | None = None) -> None:
    """The ``psr-score`` console script: exit status 0 after a run, 1 with the message of bad input
    (a missing file, a bad record, a reward config key without a value), 2 for bad arguments."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        run(argv)
    except (ValueError, FileNotFoundError, HydraException, OmegaConfBaseException) as err:
        # bad input: its message names the problem; a traceback would only bury it
        message = str(err)
        raise SystemExit(message if message.startswith("psr-score") else f"psr-score: {message}") from err


if __name__ == "__main__":
    main()
