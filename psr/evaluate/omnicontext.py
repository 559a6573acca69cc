"""The OmniContext suite (OmniGen2's in-context generation benchmark, docs/method.md §7): its
released parquet read into records, every sample scored by a VLM judge on prompt following (PF)
and subject consistency (SC).

``psr-eval suite=omnicontext data.root=OmniContext`` (``conf/suite/omnicontext.yaml``) reads the
parquet files of the dataset folder (the ``OmniGen2/OmniContext`` dataset as downloaded, or one
``.parquet`` file; :func:`load_omnicontext`). A row has the columns the released scripts read:
``key``, ``task_type`` (``single_character``, ``single_object``, ``multi_character``,
``multi_object``, ``multi_character_object``, ``scene_character``, ``scene_object``,
``scene_character_object``), ``instruction``, ``instruction_language`` and ``input_images`` (a
list of images, each stored as the ``datasets`` library stores an image: ``{bytes, path}``).
A record is one row: id ``<task_type>-<key>``, kind ``task_type``, one reference per input image
(the image bytes are written once, unchanged, under ``run_dir/omnicontext_inputs``). The released
statistics count the English instructions only (``data.languages``). With
``eval.source=results`` a record's image is ``<task_type>/<key>.png`` under ``eval.results_root``
(the released layout ``results/<model>/fullset/<task_type>/<key>.png``).

:class:`OmniContextScorer`, per sample, two judge requests, each with the input images (resized
as released: above 1024 x 1024 pixels scaled down to that area, then each side floored to a
multiple of 16) followed by the generated image, then a text:

- ``omnicontext_pf``: prompt following, 0-10 (template ``omnicontext_pf``; the released scorer
  uses the same prompt-following text for the scene tasks, so ``omnicontext_pf_scene`` ships but
  is not the default);
- ``omnicontext_sc``: subject consistency, 0-10 (``omnicontext_sc``; the task types containing
  ``scene`` also judge the scene: ``omnicontext_sc_scene``);
- ``omnicontext_overall`` = ``sqrt(PF x SC)`` per sample; ``score`` = overall / 10.

The summary's per-kind means are the released per-task-type means and its ``overall`` (the mean
over task types of each type's mean) the released "Average" row. A reply is read by
:func:`parse_judge_reply` (a JSON object with a 0-10 ``score``, or a bare integer); an unreadable
reply or failed request is NaN with ``omnicontext_pf_failed`` / ``omnicontext_sc_failed`` = 1,
never a guess (the released script draws a random score there).

The shipped templates are psr's wording of the released rubric and output format, not the
released prompts: scores are comparable with published OmniContext numbers only when the released
prompts (and judge, GPT-4.1) are used; put them in four text files with an ``{instruction}`` slot
and set ``reward.templates``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from psr.data.manifest import Sample, Subject
from psr.data.sources import Records, verify_images
from rewards.base import RewardInputs, check_images

__all__ = [
    "TASK_TYPES",
    "TEMPLATES",
    "load_omnicontext",
    "load_template",
    "parse_judge_reply",
    "released_input_size",
    "OmniContextScorer",
]

TASK_TYPES = (
    "single_character",
    "single_object",
    "multi_character",
    "multi_object",
    "multi_character_object",
    "scene_character",
    "scene_object",
    "scene_character_object",
)
"""The eight task types of the released benchmark (SINGLE / MULTIPLE / SCENE x character / object)."""

TEMPLATES = {
    "pf": "omnicontext_pf",
    "pf_scene": "omnicontext_pf",  # as released: the scene tasks get the same prompt-following text
    "sc": "omnicontext_sc",
    "sc_scene": "omnicontext_sc_scene",
}
"""Which judge template each request uses (``*_scene``: task types containing ``scene``)."""

SLOT = "{instruction}"
COLUMNS = ("key", "task_type", "instruction", "input_images")
INPUTS_DIR = "omnicontext_inputs"
MAX_INPUT_PIXELS = 1024 * 1024
_SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


# ---------------------------------------------------------------------------------------------- records


def _parquet_files(root: str) -> list[Path]:
    path = Path(os.path.expanduser(root)).resolve()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(
            f"data.root={root} is neither a .parquet file nor a folder (the OmniGen2/OmniContext dataset)"
        )
    files = sorted(path.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"data.root={root}: no .parquet files under {path} (the OmniContext dataset)")
    return files


def _read_rows(files: Sequence[Path], languages: Sequence[str] | None) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(
            "suite=omnicontext reads parquet with pyarrow: pip install 'psr-rl[benchmarks]'"
        ) from err
    rows: list[dict[str, Any]] = []
    for f in files:
        names = set(pq.read_schema(f).names)
        wanted = list(COLUMNS) + (["instruction_language"] if languages is not None else [])
        missing = [c for c in wanted if c not in names]
        if missing:
            hint = " (or set data.languages=null)" if missing == ["instruction_language"] else ""
            raise ValueError(
                f"{f}: no column(s) {missing}{hint}; OmniContext rows have {list(COLUMNS)} and "
                f"instruction_language (columns here: {sorted(names)})"
            )
        rows += pq.read_table(f, columns=wanted).to_pylist()
    return rows


def _image_bytes(value: Any, where: str) -> bytes:
    """The encoded bytes of one ``input_images`` entry (``{bytes, path}`` or raw bytes)."""
    if isinstance(value, Mapping):
        data = value.get("bytes")
        if data is None and value.get("path"):
            raise ValueError(f"{where}: the image is stored as a path ({value['path']}), not embedded bytes")
        value = data
    if not isinstance(value, (bytes, bytearray)) or not value:
        raise ValueError(f"{where}: expected embedded image bytes, got {type(value).__name__}")
    return bytes(value)


def _suffix(data: bytes, where: str) -> str:
    import io

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = str(im.format)
    except Exception as err:  # PIL raises several types for undecodable data
        raise ValueError(f"{where}: the embedded bytes are not an image ({err})") from err
    return _SUFFIX.get(fmt, ".img")


def _write_if_changed(path: Path, data: bytes) -> None:
    from psr.fileio import atomic_write

    if path.is_file() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)


def load_omnicontext(
    root: str,
    task_types: Sequence[str] | None = None,
    languages: Sequence[str] | None = ("en",),
    check_images: bool = True,
    heldout: int = 0,
    *,
    run_dir: str | os.PathLike,
) -> Records:
    """OmniContext records (``data`` of ``suite=omnicontext``; module docstring).

    Collective when ``torch.distributed`` is initialized: rank 0 writes the input images under
    ``run_dir/omnicontext_inputs``, every rank waits, then reads them.

    Args:
        root: the dataset folder (every ``*.parquet`` under it, sorted) or one parquet file.
        task_types: keep these task types (None: all); an unknown name is an error.
        languages: keep rows whose ``instruction_language`` is one of these (the released
            statistics: ``["en"]``); None: every row, and the column may be absent.
        check_images: open every written input image now.
        heldout: must be 0 (a benchmark is evaluated whole).
        run_dir: the run directory (the input images are written under it).
    """
    from psr import distributed

    if heldout:
        raise ValueError(
            f"data.heldout={heldout}: the OmniContext suite evaluates every record (set it to 0)"
        )
    rows = _read_rows(_parquet_files(root), languages)
    present = sorted({str(r["task_type"]) for r in rows})
    if task_types is not None:
        unknown = [t for t in task_types if t not in present]
        if unknown:
            raise ValueError(
                f"data.task_types: {unknown} not in data.root={root} (task types there: {present})"
            )
        rows = [r for r in rows if r["task_type"] in set(task_types)]
    if languages is not None:
        rows = [r for r in rows if r["instruction_language"] in set(languages)]
    if not rows:
        raise ValueError(
            f"data.root={root}: no rows left (data.task_types={task_types}, data.languages={languages})"
        )
    folder = Path(run_dir) / INPUTS_DIR
    samples: list[Sample] = []
    files: list[tuple[Path, bytes]] = []
    for i, r in enumerate(rows):
        task, key = str(r["task_type"]), str(r["key"])
        rid = f"{task}-{key}"
        images = r["input_images"] or []
        if not images:
            raise ValueError(f"data.root={root}: row {i} (key {key!r}) has no input_images")
        subjects = []
        for k, value in enumerate(images):
            where = f"data.root={root}: row {i} (key {key!r}) input_images[{k}]"
            data = _image_bytes(value, where)
            rel = f"{task}/{re.sub(r'[^A-Za-z0-9._-]', '_', key)}_{k}{_suffix(data, where)}"
            files.append((folder / rel, data))
            subjects.append(Subject(name=f"image {k + 1}", category=f"image {k + 1}", reference=rel))
        provenance = {
            "omnicontext": {"key": key, "instruction_language": r.get("instruction_language")},
            "result_path": f"{task}/{key}.png",
        }
        samples.append(Sample(rid, str(r["instruction"]), None, subjects, task, {}, provenance))
    if distributed.is_main():
        for path, data in files:
            _write_if_changed(path, data)
    distributed.barrier()
    if check_images:
        verify_images(samples, folder, f"data.root={root}")
    return Records(samples, [], folder.resolve())


# ---------------------------------------------------------------------------------------------- judge


def load_template(name_or_path: str) -> str:
    """A template: a shipped name (``rewards/templates/judge/<name>.txt``) or a text file, holding
    the slot ``{instruction}`` exactly once (the rest is sent as written, braces included)."""
    shipped = resources.files("rewards") / "templates" / "judge" / f"{name_or_path}.txt"
    if shipped.is_file():
        text, source = shipped.read_text(encoding="utf-8"), f"shipped template {name_or_path!r}"
    else:
        path = Path(os.path.expanduser(str(name_or_path)))
        if not path.is_file():
            raise ValueError(
                f"OmniContextScorer: template {name_or_path!r} is neither a file nor a shipped template "
                f"({sorted(set(TEMPLATES.values()) | {'omnicontext_pf_scene'})})"
            )
        text, source = path.read_text(encoding="utf-8"), str(path)
    if text.count(SLOT) != 1:
        raise ValueError(f"OmniContextScorer: {source} must contain the slot {SLOT} exactly once")
    return text.strip()


_NUMBER = r"-?\d+(?:\.\d+)?"
_SCORE_KEY = re.compile(r'"?score"?\s*:\s*\[?\s*(' + _NUMBER + r")")


def _in_range(value: Any) -> float | None:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    return v if math.isfinite(v) and 0.0 <= v <= 10.0 else None


def parse_judge_reply(text: str | None) -> float | None:
    """The 0-10 score of a judge reply, or None.

    Read, in order: the JSON object from the first ``{`` to the last ``}`` (line breaks removed),
    its ``score`` (a number or a one-number list); if that text is not valid JSON, a
    ``"score": <number>`` inside it; without braces, a reply that is only an integer. A score
    outside [0, 10] or anything else is None.
    """
    if text is None:
        return None
    start, end = text.find("{"), text.rfind("}")
    if start != -1 and end > start:
        body = text[start : end + 1].replace("\n", " ")
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            match = _SCORE_KEY.search(body)
            return _in_range(float(match.group(1))) if match else None
        return _in_range(obj.get("score")) if isinstance(obj, dict) else None
    stripped = text.strip()
    return _in_range(int(stripped)) if re.fullmatch(r"\d+", stripped) else None


def released_input_size(width: int, height: int, max_pixels: int = MAX_INPUT_PIXELS) -> tuple[int, int]:
    """The size an input image is sent to the judge at: above ``max_pixels``, scaled by
    ``sqrt(max_pixels / (w h))`` (each side truncated to an integer); then each side floored to a
    multiple of 16."""
    if width * height > max_pixels:
        ratio = math.sqrt(max_pixels / (width * height))
        width, height = int(width * ratio), int(height * ratio)
    return width // 16 * 16, height // 16 * 16


def _resize_input(image: Tensor, max_pixels: int) -> Tensor:
    """``[3, h, w]`` in [0, 1] resized as released (8-bit PIL bicubic), back as a tensor."""
    from psr.data.dataset import to_tensor
    from psr.evaluate.runner import to_pil

    pil = to_pil(image)
    size = released_input_size(pil.width, pil.height, max_pixels)
    if size == pil.size:
        return image
    if min(size) == 0:
        raise ValueError(
            f"OmniContextScorer: an input image of {pil.size} is too small to send (below 16 px)"
        )
    return to_tensor(pil.resize(size, Image.Resampling.BICUBIC))


class OmniContextScorer:
    """PF, SC and their geometric mean for OmniContext samples (module docstring).

    Args:
        judge: anything with ``complete(images: list[list[Tensor]], texts: list[str]) -> list[str | None]``
            (``rewards.judge.VLMJudge``; its own template is not used).
        templates: ``pf``, ``pf_scene``, ``sc``, ``sc_scene`` -> a shipped template name or a text
            file with the slot ``{instruction}`` (missing keys: :data:`TEMPLATES`).
        resize_inputs: resize the input images as the released scorer does (else send them as read).
        max_input_pixels: the area above which input images are scaled down.
    """

    def __init__(
        self,
        judge: Any,
        *,
        templates: Mapping[str, str] | None = None,
        resize_inputs: bool = True,
        max_input_pixels: int = MAX_INPUT_PIXELS,
    ) -> None:
        if not callable(getattr(judge, "complete", None)):
            raise ValueError(
                "OmniContextScorer: reward.judge needs complete(images, texts) (rewards.judge.VLMJudge)"
            )
        unknown = sorted(set(templates or {}) - set(TEMPLATES))
        if unknown:
            raise ValueError(
                f"OmniContextScorer: reward.templates has unknown keys {unknown}; use {sorted(TEMPLATES)}"
            )
        names = {**TEMPLATES, **dict(templates or {})}
        self.judge = judge
        self.templates = {k: load_template(v) for k, v in names.items()}
        self.resize_inputs = bool(resize_inputs)
        self.max_input_pixels = int(max_input_pixels)

    def prompt(self, which: str, kind: str, instruction: str) -> str:
        """The text of request ``which`` (``pf`` / ``sc``) for a sample of task type ``kind``."""
        key = f"{which}_scene" if "scene" in kind else which
        return self.templates[key].replace(SLOT, instruction)

    @torch.no_grad()
    def score(self, images: Tensor, inputs: RewardInputs, kinds: Sequence[str]) -> dict[str, Tensor]:
        """``{key: [B]}`` for a batch ``[B, 3, H, W]`` in [0, 1] of task types ``kinds``."""
        check_images(images, inputs, "OmniContextScorer")
        batch = len(inputs)
        if len(kinds) != batch:
            raise ValueError(f"OmniContextScorer: {batch} samples but {len(kinds)} kinds")
        request_images: list[list[Tensor]] = []
        texts: list[str] = []
        for b in range(batch):
            refs = [
                _resize_input(r, self.max_input_pixels) if self.resize_inputs else r
                for r in inputs.references[b]
            ]
            shown = [*refs, images[b].detach().float().cpu()]
            for which in ("pf", "sc"):
                request_images.append(shown)
                texts.append(self.prompt(which, kinds[b], inputs.prompts[b]))
        replies = self.judge.complete(request_images, texts)
        if len(replies) != len(texts):
            raise RuntimeError(
                f"OmniContextScorer: the judge answered {len(replies)} of {len(texts)} requests"
            )
        values = [parse_judge_reply(r) for r in replies]
        nan = math.nan
        pf = torch.tensor([nan if v is None else v for v in values[0::2]], dtype=torch.float64)
        sc = torch.tensor([nan if v is None else v for v in values[1::2]], dtype=torch.float64)
        overall = torch.sqrt(pf * sc)  # NaN where either is NaN
        out = {
            "omnicontext_pf": pf,
            "omnicontext_sc": sc,
            "omnicontext_overall": overall,
            "omnicontext_pf_failed": pf.isnan().double(),
            "omnicontext_sc_failed": sc.isnan().double(),
            "score": overall / 10,
        }
        return {k: v.to(device=images.device, dtype=torch.float32) for k, v in out.items()}

    def __call__(self, images: Tensor, inputs: RewardInputs) -> dict[str, Tensor]:
        """As a plain reward (no task types known): every sample judged as a non-scene one."""
        return self.score(images, inputs, ["multi_character_object"] * len(inputs))
