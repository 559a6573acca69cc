"""The manifest schema: round trips, errors that name file, line, record and field, PSRBench I/O."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from psr.data.manifest import (
    ManifestError,
    Sample,
    Subject,
    check_images,
    image_paths,
    read_manifest,
    read_psrbench,
    resolve,
    sample_from_dict,
    write_manifest,
    write_psrbench,
)


def _sample(i: int = 0, **kw) -> Sample:
    base = dict(
        id=f"rec-{i}",
        instruction="the dog and the chair in a garden",
        target=f"images/{i}/target.png",
        subjects=[
            Subject("dog", "dog", f"images/{i}/ref0.png", [1.0, 2.0, 30.5, 40.0]),
            Subject("chair", "chair", f"images/{i}/ref1.png", None),
        ],
        kind="background",
        scores={"psr_score": 0.75, "psr_subject_0": 0.5},
        provenance={"target": {"model": "x", "seed": 7}, "nested": [1, {"a": None}]},
    )
    base.update(kw)
    return Sample(**base)


def _line(**overrides) -> dict:
    d = _sample().to_dict()
    d.update(overrides)
    return d


def test_round_trip_is_exact(tmp_path):
    samples = [_sample(i) for i in range(3)] + [_sample(9, target=None, kind="", scores={}, provenance={})]
    path = write_manifest(tmp_path / "m.jsonl", samples)
    back = read_manifest(path)
    assert back == samples
    # writing what was read gives the same bytes
    again = write_manifest(tmp_path / "m2.jsonl", back)
    assert again.read_bytes() == path.read_bytes()


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "m.jsonl"
    write_manifest(path, [_sample(0)])
    with pytest.raises(ManifestError):
        write_manifest(path, [_sample(0), _sample(1, instruction="")])  # invalid record: nothing written
    assert read_manifest(path) == [_sample(0)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]


@pytest.mark.parametrize(
    ("overrides", "field", "problem"),
    [
        ({"instruction": 3}, "'instruction'", "expected a string"),
        ({"instruction": "  "}, "'instruction'", "must not be empty"),
        ({"target": ""}, "'target'", "must not be empty"),
        ({"subjects": []}, "'subjects'", "non-empty list"),
        ({"subjects": [{"name": "dog", "category": "dog"}]}, "'subjects[0].reference'", "missing"),
        (
            {"subjects": [{"name": "dog", "category": "dog", "reference": "r.png", "box": [1, 2, 3]}]},
            "'subjects[0].box'",
            "x0, y0, x1, y1",
        ),
        (
            {"subjects": [{"name": "dog", "category": "dog", "reference": "r.png", "box": [5, 2, 3, 4]}]},
            "'subjects[0].box'",
            "x0 <= x1",
        ),
        (
            {"subjects": [{"name": "dog", "category": "dog", "reference": "r.png", "refrence": "x"}]},
            "'subjects[0].refrence'",
            "unknown key",
        ),
        ({"scores": {"psr": "high"}}, "'scores.psr'", "finite number"),
        ({"scores": {"psr": True}}, "'scores.psr'", "finite number"),
        ({"provenance": []}, "'provenance'", "expected an object"),
        ({"extra": 1}, "'extra'", "unknown key"),
    ],
)
def test_malformed_record_names_file_line_record_and_field(tmp_path, overrides, field, problem):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(_sample(0).to_dict()), json.dumps(_line(id="rec-bad", **overrides))]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    msg = str(err.value)
    assert f"{path}:2" in msg and "'rec-bad'" in msg and f"field {field}" in msg and problem in msg


def test_missing_id_and_bad_json_and_duplicates(tmp_path):
    d = _line()
    del d["id"]
    (tmp_path / "a.jsonl").write_text(json.dumps(d) + "\n")
    with pytest.raises(ManifestError, match=r"a.jsonl:1: record \(no id\): field 'id': missing"):
        read_manifest(tmp_path / "a.jsonl")
    (tmp_path / "b.jsonl").write_text(json.dumps(_line()) + "\n{not json\n")
    with pytest.raises(ManifestError, match=r"b.jsonl:2: not valid JSON"):
        read_manifest(tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text(json.dumps(_line()) + "\n\n" + json.dumps(_line()) + "\n")
    with pytest.raises(
        ManifestError, match=r"c.jsonl:3: record 'rec-0': field 'id': duplicate; first seen at line 1"
    ):
        read_manifest(tmp_path / "c.jsonl")


def test_defaults_for_optional_fields():
    s = sample_from_dict(
        {
            "id": "a",
            "instruction": "x",
            "target": None,
            "subjects": [{"name": "n", "category": "c", "reference": "r.png"}],
        }
    )
    assert (s.kind, s.scores, s.provenance, s.subjects[0].box) == ("", {}, {}, None)


def test_psrbench_round_trip_and_kind_from_file_name(tmp_path):
    bench = [
        {
            "instruction": "a dog with a hat next to a cat",
            "input_path": ["refs/dog.png", "refs/cat.png"],
            "category1": "dog",
            "category2": "cat",
            "result_path": "",
        },
        {
            "instruction": "three things",
            "input_path": ["a.png", "b.png", "c.png"],
            "category1": "cup",
            "category2": "mug",
            "category3": "hat",
            "category4": "",
            "result_path": "out/1.png",
        },
    ]
    path = tmp_path / "attribute.json"
    path.write_text(json.dumps(bench))
    samples = read_psrbench(path)
    assert [s.id for s in samples] == ["attribute-0000", "attribute-0001"]
    assert [s.kind for s in samples] == ["attribute", "attribute"]
    assert [[(x.category, x.reference) for x in s.subjects] for s in samples] == [
        [("dog", "refs/dog.png"), ("cat", "refs/cat.png")],
        [("cup", "a.png"), ("mug", "b.png"), ("hat", "c.png")],
    ]
    assert samples[1].provenance["psrbench"]["result_path"] == "out/1.png"
    assert all(s.target is None for s in samples)
    out = write_psrbench(tmp_path / "out.json", samples, result_paths=["r0.png", "r1.png"])
    written = json.loads(out.read_text())
    assert written[0]["input_path"] == bench[0]["input_path"] and written[0]["category2"] == "cat"
    assert [w["result_path"] for w in written] == ["r0.png", "r1.png"]
    back = read_psrbench(out, kind="attribute")
    assert [(s.id, s.instruction, s.subjects) for s in back] == [
        (s.id, s.instruction, s.subjects) for s in samples
    ]


def test_psrbench_errors_name_record_and_field(tmp_path):
    path = tmp_path / "three.json"
    path.write_text(json.dumps([{"instruction": "x", "input_path": ["a.png", "b.png"], "category1": "dog"}]))
    with pytest.raises(
        ManifestError, match=r"three.json record 0: record 'three-0000': field 'category2': missing"
    ):
        read_psrbench(path)
    path.write_text(json.dumps([{"instruction": "x", "input_path": []}]))
    with pytest.raises(ManifestError, match=r"field 'input_path'"):
        read_psrbench(path)


def test_resolve_and_check_images(tmp_path):
    (tmp_path / "images" / "0").mkdir(parents=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "images/0/target.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "images/0/ref0.png")
    (tmp_path / "images/0/ref1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    s = _sample(0)
    assert resolve("images/0/target.png", tmp_path) == tmp_path / "images/0/target.png"
    assert resolve("/abs/x.png", tmp_path).as_posix() == "/abs/x.png"
    assert list(image_paths(s, tmp_path)) == ["target", "subjects[0].reference", "subjects[1].reference"]
    problems = check_images(s, tmp_path)
    assert len(problems) == 1 and problems[0].startswith("subjects[1].reference: unreadable image")
    (tmp_path / "images/0/target.png").unlink()
    assert check_images(s, tmp_path)[0].startswith("target: missing file")
