"""Data sources: each conf/data/*.yaml names a psr.data.sources function whose arguments are its keys."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from hydra.utils import get_method
from omegaconf import OmegaConf

from psr.data import sources

DATA_CONF = Path(__file__).resolve().parents[2] / "conf" / "data"


@pytest.mark.parametrize("name", sorted(p.stem for p in DATA_CONF.glob("*.yaml")))
def test_every_data_yaml_keys_are_its_function_arguments(name: str) -> None:
    node = OmegaConf.load(DATA_CONF / f"{name}.yaml")
    fn = get_method(node._target_)
    assert fn.__module__ == "psr.data.sources"
    params = inspect.signature(fn).parameters
    keys = set(node) - {"_target_"}
    assert keys <= set(params), f"conf/data/{name}.yaml keys {sorted(keys - set(params))} are not arguments"
    required = {k for k, p in params.items() if p.default is inspect.Parameter.empty}
    assert required <= keys | {"run_dir"}, f"{fn.__name__} needs {sorted(required - keys)}"
    assert "run_dir" in params and "heldout" in keys  # what every entry point passes / reads


def test_synthetic_source_splits_heldout_and_reuses_its_manifest(tmp_path: Path) -> None:
    node = OmegaConf.merge(OmegaConf.load(DATA_CONF / "synthetic.yaml"), {"num_records": 6, "heldout": 2})
    records = sources.load_records(node, tmp_path)
    assert isinstance(records, sources.Records)
    assert (len(records.train), len(records.heldout)) == (4, 2)
    assert records.root == tmp_path / "data" and (tmp_path / "data" / "manifest.jsonl").is_file()
    again = sources.load_records(node, tmp_path)
    assert [s.id for s in again.train + again.heldout] == [s.id for s in records.train + records.heldout]
    # the held-out records are the last ones of the source, in order
    train, heldout, _ = sources.load_records(OmegaConf.merge(node, {"heldout": 0}), tmp_path)
    assert heldout == [] and [s.id for s in train[-2:]] == [s.id for s in records.heldout]
    with pytest.raises(ValueError, match=r"data\.heldout=6"):
        sources.load_records(OmegaConf.merge(node, {"heldout": 6}), tmp_path)


@pytest.mark.parametrize("rank", [0, 1])
def test_synthetic_source_has_one_writer_and_a_barrier(tmp_path: Path, monkeypatch, rank: int) -> None:
    """Rank 0 writes before the barrier; every other rank only reads the complete manifest after it."""
    from psr import distributed
    from psr.data import synthetic

    events: list[str] = []
    write = synthetic.write_synthetic_manifest

    def recording_write(out_dir, **kwargs):
        events.append("write")
        return write(out_dir, **kwargs)

    monkeypatch.setattr(synthetic, "write_synthetic_manifest", recording_write)
    monkeypatch.setattr(distributed, "is_main", lambda: rank == 0)
    monkeypatch.setattr(distributed, "barrier", lambda: events.append("barrier"))
    if rank != 0:  # what rank 0 left behind before the barrier
        write(tmp_path / "data", num_records=4, num_subjects=(2,), image_size=32, seed=0)
    records = sources.load_synthetic(4, [2], 32, heldout=1, run_dir=tmp_path)
    assert events == (["write", "barrier", "write"] if rank == 0 else ["barrier", "write"])
    assert (len(records.train), len(records.heldout)) == (3, 1)


def test_file_sources_name_the_missing_config_key(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.manifest="):
        sources.load_manifest(str(tmp_path / "none.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"data\.path="):
        sources.load_psrbench(str(tmp_path / "none.json"))


def test_a_data_node_without_target_is_named() -> None:
    with pytest.raises(ValueError, match="data needs _target_"):
        sources.load_records(OmegaConf.create({"kind": "manifest", "manifest": "m.jsonl"}), ".")
