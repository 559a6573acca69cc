"""Where a run's records come from: one function per ``conf/data/*.yaml``, chosen by its ``_target_``.

Each function's keyword arguments are the keys of its YAML, plus ``run_dir`` that the entry point
passes (:func:`load_records`), and each returns :class:`Records`: the training records, the held-out
ones (the last ``heldout`` of the file: SFT validation, RL evaluation, ``psr-eval
eval.split=heldout``) and the folder relative image paths are resolved against. A new source is a
function here (or anywhere importable) and a YAML naming it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from omegaconf import DictConfig, OmegaConf

from psr.data.manifest import Sample, check_images, read_manifest, read_psrbench

__all__ = ["Records", "load_records", "load_manifest", "load_psrbench", "load_synthetic", "verify_images"]


class Records(NamedTuple):
    """The records of a data source, split; unpacks as ``train, heldout, root = records``."""

    train: list[Sample]
    heldout: list[Sample]  # the last ``data.heldout`` records of the source, in file order
    root: Path  # relative image paths of the records are relative to this folder


def load_records(data: DictConfig, run_dir: str | os.PathLike) -> Records:
    """The records of the ``data`` config group: its ``_target_`` called with its other keys and ``run_dir``.

    What ``hydra.utils.instantiate(data, run_dir=run_dir)`` does, minus the wrapping of every error in
    an ``InstantiationException``: a missing file stays a ``FileNotFoundError`` naming its key
    (``data.manifest=...``), a missing value an ``omegaconf`` ``MissingMandatoryValue`` naming it.

    Raises:
        ValueError: ``data`` has no ``_target_``.
    """
    from hydra.utils import get_method

    if "_target_" not in data:
        raise ValueError(
            f"data needs _target_ (a psr.data.sources function, see conf/data/*.yaml); got keys {sorted(data)}"
        )
    node = OmegaConf.to_container(data, resolve=True, throw_on_missing=True)
    kwargs = {str(k): v for k, v in node.items()} if isinstance(node, dict) else {}
    source = get_method(str(kwargs.pop("_target_")))
    return source(**kwargs, run_dir=run_dir)


def _expand(path: str | os.PathLike) -> Path:
    return Path(os.path.expanduser(str(path))).resolve()


def _split(samples: Sequence[Sample], heldout: int, root: Path) -> Records:
    heldout = int(heldout)
    if not 0 <= heldout < len(samples):
        raise ValueError(f"data.heldout={heldout} must be in [0, {len(samples)}) for {len(samples)} records")
    cut = len(samples) - heldout
    return Records(list(samples[:cut]), list(samples[cut:]), root)


def verify_images(samples: Sequence[Sample], root: Path, source: str) -> None:
    """Open every image of ``samples`` (targets and references), in parallel, before a run starts.

    Rank 0 reads the files (:func:`psr.data.manifest.check_images` per record, a bar on its
    terminal) and every rank gets its answer, so a missing or corrupt image fails the run at once,
    listing all of them, instead of at the step that first draws it.

    Args:
        samples: the records (all of them: train and held out).
        root: the folder their relative image paths are resolved against.
        source: the setting that named the records (``data.manifest=PATH``), for the message.

    Raises:
        ImageLoadError: one line per bad image: the record id, the field, the file, the reason.
    """
    from psr import distributed
    from psr.data.dataset import ImageLoadError
    from psr.logging import progress

    bad: list[str] | None = None
    if distributed.world_size() == 1 or distributed.is_main():  # one reader; without a group, each
        with ThreadPoolExecutor(max_workers=min(32, 4 * (os.cpu_count() or 1))) as pool:
            found = pool.map(lambda s: check_images(s, root), samples)  # PIL decodes without the GIL
            per_record = list(progress(found, "checking images", total=len(samples)))
        bad = [f"record {s.id!r}: {p}" for s, ps in zip(samples, per_record, strict=True) for p in ps]
    bad = distributed.broadcast_object(bad)
    assert bad is not None  # rank 0's, on every rank
    if bad:
        raise ImageLoadError(
            f"{source}: {len(bad)} image(s) cannot be read (fix or drop these records, or skip this check "
            "with data.check_images=false):\n  " + "\n  ".join(bad)
        )


def load_manifest(
    manifest: str, heldout: int = 0, check_images: bool = True, run_dir: str | os.PathLike | None = None
) -> Records:
    """A manifest written by ``psr-data`` (JSONL; images relative to its folder).

    Args:
        manifest: path to the ``manifest.jsonl``.
        heldout: how many of the last records to hold out.
        check_images: open every image now (:func:`verify_images`): a bad one fails before the run.
        run_dir: unused (every source takes it; the synthetic one writes there).
    """
    path = _expand(manifest)
    if not path.is_file():
        raise FileNotFoundError(f"data.manifest={manifest} does not exist (make one with psr-data)")
    samples = read_manifest(path)
    if check_images:
        verify_images(samples, path.parent, f"data.manifest={manifest}")
    return _split(samples, heldout, path.parent)


def load_psrbench(
    path: str,
    root: str | None = None,
    heldout: int = 0,
    check_images: bool = True,
    run_dir: str | os.PathLike | None = None,
) -> Records:
    """PSRBench prompts (a JSON of instruction, input_path, category1..4): no targets, so RL / eval only.

    Args:
        path: the PSRBench JSON file.
        root: the folder ``input_path`` entries are relative to; None = the JSON's folder.
        heldout: how many of the last records to hold out.
        check_images: open every image now (:func:`verify_images`): a bad one fails before the run.
        run_dir: unused (every source takes it; the synthetic one writes there).
    """
    json_path = _expand(path)
    if not json_path.is_file():
        raise FileNotFoundError(f"data.path={path} does not exist (a PSRBench JSON)")
    image_root = _expand(root) if root else json_path.parent
    samples = read_psrbench(json_path)
    if check_images:
        verify_images(samples, image_root, f"data.path={path}")
    return _split(samples, heldout, image_root)


def load_synthetic(
    num_records: int,
    num_subjects: Sequence[int],
    image_size: int,
    seed: int = 0,
    heldout: int = 0,
    *,
    run_dir: str | os.PathLike,
) -> Records:
    """Coloured shapes made in code (:mod:`psr.data.synthetic`), written as a real manifest under
    ``run_dir/data`` and read back through the same reader as user data.

    Collective when ``torch.distributed`` is initialized: rank 0 writes, every rank waits at a
    barrier, then reads the complete manifest (two writers would collide on the same files).

    Args:
        num_records: records written.
        num_subjects: each record draws its subject count from these.
        image_size: references and targets are ``image_size x image_size``.
        seed: drives colours, shapes and counts (independent of the run's seed).
        heldout: how many of the last records to hold out.
        run_dir: the run directory; the manifest goes under ``run_dir/data``.
    """
    from psr import distributed
    from psr.data.synthetic import write_synthetic_manifest

    def write() -> Path:  # returns an existing complete manifest as it is
        return write_synthetic_manifest(
            Path(run_dir) / "data",
            num_records=int(num_records),
            num_subjects=tuple(int(n) for n in num_subjects),
            image_size=int(image_size),
            seed=int(seed),
        )

    if distributed.is_main():
        write()
    distributed.barrier()
    path = write()
    return _split(read_manifest(path), heldout, path.parent)
