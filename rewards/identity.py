"""The face-identity reward: do the people in the generated image have the faces of their references?

For the subjects of a sample whose category names a person (``person_categories``: person, man,
woman, ...; case-insensitive; other subjects are ignored):

1. **Detect** faces: dlib's HOG frontal face detector (``detector: hog``, default), dlib's CNN
   (MMOD) face detector (``cnn``; accurate, about 100x slower on a CPU) or OpenCV's Haar cascade
   (``haar``; needs OpenCV 4's ``CascadeClassifier``). ``upsample`` doubles the image that many
   times before detecting, so that smaller faces are found (HOG's smallest face is about 80 px
   without it, 40 px with one doubling). In a reference the largest face is taken; in the generated
   image the ``max_faces`` largest are kept.
2. **Embed** each face with dlib's ResNet face-recognition model (``face_recognition_model_v1``,
   128-D), aligned by the 5-point (or 68-point) shape predictor. The weights ship in the
   ``face-recognition-models`` wheel and are found with :mod:`importlib` without importing that
   package (its ``__init__`` needs ``pkg_resources``); explicit ``*_path`` keys override them.
3. **Similarity** of descriptors ``a``, ``b`` (:func:`descriptor_similarity`):
   ``euclidean`` (default): ``s = clamp(1 - |a - b| / (2 t), 0, 1)`` with ``t = distance_threshold``
   (0.6, dlib's "same person" distance). Identical faces give 1, a pair at dlib's threshold gives
   0.5, a distance of ``2 t`` or more gives 0, so "same person" reads as ``s > 0.5``.
   ``cosine``: the raw cosine of the descriptors, in [-1, 1] (dlib's descriptors are not centred:
   different people still have cosines around 0.85-0.9; the euclidean mapping spreads better).
4. **Match** generated faces to person references by the Hungarian algorithm maximizing the summed
   similarity (:func:`match_faces`), so which person stands on the left does not matter. A person
   subject left without a face (fewer faces than people) scores ``missing_penalty`` (0) and is
   counted in ``missing``.
5. **Aggregate** (:func:`identity_terms`) per person subject ``i``, with ``S`` the similarity
   matrix (person references x generated faces) and ``j(i)`` the face matched to ``i``:

   - ``matched`` (default): ``term_i = S[i, j(i)]``;
   - ``umo`` (after UMO's multi-to-multi matching reward): the matched pair counts +, the matched
     face's similarity to the *other* person references counts -:
     ``term_i = S[i, j(i)] - cross_weight * mean_{k != i} S[k, j(i)]`` (no cross term with a single
     person subject). A face that resembles two references (identity blending) or the wrong one
     (a swap) is penalized even when it is the best available match. Range [-1, 1] with the
     euclidean similarity and ``cross_weight`` 1.

   A missing subject's term is ``missing_penalty`` in both modes. The sample score is the mean of
   the terms over the person subjects that count.

Where a person reference shows no face, ``missing_reference`` decides: ``skip`` (default) leaves
that subject out (it does not count; ``ref_no_face`` reports it), ``error`` raises. A sample with
no person subject that counts scores NaN ("does not apply").

Per-sample values reported next to ``score`` (all ``[B]``, NaN where the reward does not apply):
``faces`` (faces kept in the generated image), ``persons`` (person subjects that count),
``matched``, ``missing``, ``ref_no_face`` (counts), ``matched_similarity`` (mean similarity of the
matched pairs, NaN without any) and ``subject_<i>`` (the term of subject i, NaN for a subject that
is not a person or was skipped).

Cost: dlib runs on the CPU, image by image; the models are loaded once per process
(:func:`load_face_models`) and each distinct reference tensor is embedded once per call. Measured
on a lightly loaded 2-core CPU: HOG detection of a 512x512 image takes about 0.04 s (0.15 s with
``upsample: 1``; each doubling costs 4x), each face embedding 0.1-0.13 s, the CNN detector 3-4 s
per 512x512 image; loading the models 0.7 s.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rewards.base import RewardInputs, check_images

__all__ = [
    "FaceIdentityReward",
    "FaceModels",
    "descriptor_similarity",
    "identity_terms",
    "load_face_models",
    "match_faces",
    "packaged_model_path",
]

PERSON_CATEGORIES = ("person", "man", "woman", "boy", "girl", "child", "baby", "people", "human", "face")
DETECTORS = ("hog", "cnn", "haar")
SIMILARITIES = ("euclidean", "cosine")
AGGREGATIONS = ("matched", "umo")
MISSING_REFERENCE = ("skip", "error")
LANDMARKS = (5, 68)

# files of the face-recognition-models wheel (in its models/ folder)
RECOGNITION_FILE = "dlib_face_recognition_resnet_model_v1.dat"
SHAPE_PREDICTOR_FILES = {
    5: "shape_predictor_5_face_landmarks.dat",
    68: "shape_predictor_68_face_landmarks.dat",
}
CNN_DETECTOR_FILE = "mmod_human_face_detector.dat"
HAAR_CASCADE_FILE = "haarcascade_frontalface_default.xml"


# ---------------------------------------------------------------------------------------------- models


def packaged_model_path(filename: str) -> Path:
    """``face_recognition_models/models/<filename>`` of the installed wheel, found with
    :func:`importlib.util.find_spec`, which locates the package without running its ``__init__``
    (that imports ``pkg_resources``, absent from recent setuptools)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"FaceIdentityReward: {filename} ships in the face-recognition-models package, which is not "
            "installed (pip install 'psr-rl[faces]'), or give its path in the reward config"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / filename
    if not path.is_file():
        raise FileNotFoundError(f"FaceIdentityReward: {path} is missing from face-recognition-models")
    return path


def _model_path(explicit: str | None, key: str, filename: str) -> Path:
    if explicit is None:
        return packaged_model_path(filename)
    path = Path(explicit).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"FaceIdentityReward: {key}={explicit}: no such file (expected {filename})")
    return path


def _haar_path(explicit: str | None) -> Path:
    import cv2

    if not hasattr(cv2, "CascadeClassifier"):
        raise RuntimeError(
            f"FaceIdentityReward: detector=haar needs cv2.CascadeClassifier, which OpenCV {cv2.__version__} "
            "does not have (OpenCV 5 moved the Haar cascades out); install opencv-python-headless<5 or "
            "use detector=hog|cnn"
        )
    if explicit is not None:
        return _model_path(explicit, "haar_cascade_path", HAAR_CASCADE_FILE)
    folder = getattr(getattr(cv2, "data", None), "haarcascades", "")
    path = Path(folder) / HAAR_CASCADE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"FaceIdentityReward: detector=haar: OpenCV {cv2.__version__} ships no {HAAR_CASCADE_FILE} in "
            f"cv2.data.haarcascades ({folder!r}); set haar_cascade_path, or use detector=hog|cnn"
        )
    return path


Box = tuple[int, int, int, int]  # left, top, right, bottom in pixels


class FaceModels:
    """dlib's face detector, shape predictor and recognition model, loaded once
    (:func:`load_face_models`). Images are ``[H, W, 3]`` uint8 RGB arrays."""

    def __init__(self, detector: str, detector_path: str | None, predictor_path: str, recognition_path: str):
        import dlib

        self.kind = detector
        self._dlib = dlib
        if detector == "hog":
            self._detector: Any = dlib.get_frontal_face_detector()
        elif detector == "cnn":
            self._detector = dlib.cnn_face_detection_model_v1(str(detector_path))
        else:
            import cv2

            # OpenCV 4 only (checked by _haar_path); OpenCV 5's stubs lack it
            self._detector = getattr(cv2, "CascadeClassifier")(str(detector_path))  # noqa: B009
            if self._detector.empty():
                raise FileNotFoundError(f"FaceIdentityReward: {detector_path} is not a Haar cascade")
        self._predictor = dlib.shape_predictor(predictor_path)
        self._recognizer = dlib.face_recognition_model_v1(recognition_path)

    def detect(self, image: np.ndarray, upsample: int, threshold: float) -> list[Box]:
        """Face boxes in ``image``, largest first. ``threshold``: dlib's detection score cut (HOG's
        ``adjust_threshold``, the CNN's confidence); unused by the Haar cascade."""
        if self.kind == "hog":
            rects, _, _ = self._detector.run(image, upsample, threshold)
            boxes = [(r.left(), r.top(), r.right(), r.bottom()) for r in rects]
        elif self.kind == "cnn":
            boxes = [
                (d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom())
                for d in self._detector(image, upsample)
                if d.confidence >= threshold
            ]
        else:
            import cv2

            scale = 2**upsample
            gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
            if scale > 1:
                gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
            found = self._detector.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5)
            boxes = [
                (int(x) // scale, int(y) // scale, (int(x) + int(w)) // scale, (int(y) + int(h)) // scale)
                for x, y, w, h in found
            ]
        return sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))

    def embed(self, image: np.ndarray, boxes: Sequence[Box], num_jitters: int, padding: float) -> np.ndarray:
        """``[K, 128]`` float64 descriptors of the faces in ``boxes``."""
        out = np.zeros((len(boxes), 128))
        for k, (left, top, right, bottom) in enumerate(boxes):
            shape = self._predictor(image, self._dlib.rectangle(left, top, right, bottom))
            out[k] = np.asarray(self._recognizer.compute_face_descriptor(image, shape, num_jitters, padding))
        return out


@functools.lru_cache(maxsize=4)
def load_face_models(
    detector: str, detector_path: str | None, predictor_path: str, recognition_path: str
) -> FaceModels:
    """The dlib models, loaded once per process and set of files (rewards stay stateless and
    picklable: they hold paths, not models)."""
    return FaceModels(detector, detector_path, predictor_path, recognition_path)


def to_uint8(image: Tensor) -> np.ndarray:
    """``[3, H, W]`` float in [0, 1] -> ``[H, W, 3]`` uint8 RGB (contiguous, as dlib needs)."""
    x = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return np.ascontiguousarray(x.permute(1, 2, 0).numpy())


# ---------------------------------------------------------------------------------------------- math


def descriptor_similarity(
    a: np.ndarray, b: np.ndarray, metric: str = "euclidean", distance_threshold: float = 0.6
) -> np.ndarray:
    """Similarities ``[S, K]`` of descriptors ``a`` ``[S, D]`` and ``b`` ``[K, D]``.

    ``euclidean``: ``clamp(1 - d / (2 t), 0, 1)`` with ``d`` the Euclidean distance and ``t`` =
    ``distance_threshold`` (d = t maps to 0.5); ``cosine``: the cosine, in [-1, 1].
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if metric == "cosine":
        return (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (
            b / np.linalg.norm(b, axis=1, keepdims=True)
        ).T
    if metric != "euclidean":
        raise ValueError(f"descriptor_similarity: metric={metric!r}; expected one of {SIMILARITIES}")
    d = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)
    return np.clip(1.0 - d / (2.0 * distance_threshold), 0.0, 1.0)


def match_faces(similarity: np.ndarray) -> list[tuple[int, int]]:
    """Pairs (reference row, face column) maximizing the summed similarity, ``min(S, K)`` of them
    (scipy's ``linear_sum_assignment``), sorted by row."""
    s = np.asarray(similarity, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] == 0:
        return []
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(s, maximize=True)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True)]


def identity_terms(
    similarity: np.ndarray,
    aggregation: str = "matched",
    *,
    cross_weight: float = 1.0,
    missing_penalty: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-subject terms of one sample (see the module docstring, step 5); the score is their mean.

    Args:
        similarity: ``[S, K]`` person references x generated faces (``K`` may be 0).
        aggregation: ``matched`` | ``umo``.
        cross_weight: weight of the cross pairs in ``umo``.
        missing_penalty: term of a subject without a face.

    Returns:
        ``terms`` ``[S]`` float64 and ``face`` ``[S]`` int64: the face matched to each subject, -1
        where none is.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"identity_terms: aggregation={aggregation!r}; expected one of {AGGREGATIONS}")
    sim = np.asarray(similarity, dtype=np.float64).reshape(len(similarity), -1)
    n = sim.shape[0]
    terms = np.full(n, float(missing_penalty))
    face = np.full(n, -1, dtype=np.int64)
    for i, j in match_faces(sim):
        face[i] = j
        terms[i] = sim[i, j]
        if aggregation == "umo" and n > 1:
            terms[i] -= cross_weight * (sim[:, j].sum() - sim[i, j]) / (n - 1)
    return terms, face


# ---------------------------------------------------------------------------------------------- reward


@dataclass
class _Sample:
    """What one sample contributes: person subjects counted, their terms, the matched similarities."""

    subjects: list[int]
    terms: np.ndarray
    matched: list[float]
    faces: int
    ref_no_face: int


class FaceIdentityReward:
    """Face identity of the person subjects; see the module docstring.

    Args:
        person_categories: subject categories that name a person (compared case-insensitively).
        detector: ``hog`` | ``cnn`` | ``haar``.
        upsample: times the image is doubled before detecting (finds smaller faces; slower).
        detection_threshold: detection score cut (HOG ``adjust_threshold``, CNN confidence; the Haar
            cascade has none).
        max_faces: the largest faces of a generated image kept for matching.
        landmarks: 5 | 68, the shape predictor aligning faces for the embedder.
        num_jitters: dlib's re-sampling of each face when embedding (0: one pass; n: n+1 passes averaged).
        padding: dlib's margin around the aligned face chip.
        similarity: ``euclidean`` | ``cosine`` (:func:`descriptor_similarity`).
        distance_threshold: the Euclidean distance mapped to similarity 0.5 (dlib: 0.6).
        aggregation: ``matched`` | ``umo`` (:func:`identity_terms`).
        cross_weight: weight of the cross pairs with ``umo``.
        missing_penalty: term of a person subject with no face left for it.
        missing_reference: ``skip`` | ``error`` for a person reference without a face.
        max_subjects: ``subject_<i>`` is reported for i = 1..max(this, most subjects in the batch).
        recognition_model_path, shape_predictor_path, cnn_detector_path, haar_cascade_path: model
            files (null: those of face-recognition-models, and OpenCV's cascade).
    """

    def __init__(
        self,
        *,
        person_categories: Sequence[str] = PERSON_CATEGORIES,
        detector: str = "hog",
        upsample: int = 1,
        detection_threshold: float = 0.0,
        max_faces: int = 8,
        landmarks: int = 5,
        num_jitters: int = 0,
        padding: float = 0.25,
        similarity: str = "euclidean",
        distance_threshold: float = 0.6,
        aggregation: str = "matched",
        cross_weight: float = 1.0,
        missing_penalty: float = 0.0,
        missing_reference: str = "skip",
        max_subjects: int = 4,
        recognition_model_path: str | None = None,
        shape_predictor_path: str | None = None,
        cnn_detector_path: str | None = None,
        haar_cascade_path: str | None = None,
    ) -> None:
        name = "FaceIdentityReward"
        choices = {
            "detector": (detector, DETECTORS),
            "similarity": (similarity, SIMILARITIES),
            "aggregation": (aggregation, AGGREGATIONS),
            "missing_reference": (missing_reference, MISSING_REFERENCE),
            "landmarks": (landmarks, LANDMARKS),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{name}: {key}={value!r}; expected one of {allowed}")
        if isinstance(person_categories, str) or not person_categories:
            raise ValueError(f"{name}: person_categories must be a non-empty list of category names")
        if not 0 <= upsample <= 4:
            raise ValueError(f"{name}: upsample={upsample} must be in 0..4 (each one doubles the image)")
        if max_faces < 1 or num_jitters < 0 or padding < 0:
            raise ValueError(f"{name}: max_faces must be >= 1, num_jitters and padding >= 0")
        if not 0 < distance_threshold < math.inf:
            raise ValueError(f"{name}: distance_threshold={distance_threshold} must be finite and > 0")
        if not (math.isfinite(missing_penalty) and math.isfinite(detection_threshold)):
            raise ValueError(f"{name}: missing_penalty and detection_threshold must be finite")
        if not 0 <= cross_weight < math.inf:
            raise ValueError(f"{name}: cross_weight={cross_weight} must be finite and >= 0")
        self.person_categories = frozenset(str(c).strip().lower() for c in person_categories)
        self.detector, self.upsample = detector, int(upsample)
        self.detection_threshold, self.max_faces = float(detection_threshold), int(max_faces)
        self.num_jitters, self.padding = int(num_jitters), float(padding)
        self.similarity, self.distance_threshold = similarity, float(distance_threshold)
        self.aggregation, self.cross_weight = aggregation, float(cross_weight)
        self.missing_penalty, self.missing_reference = float(missing_penalty), missing_reference
        self.max_subjects = int(max_subjects)
        # paths are resolved (and checked) now; the models load on first use, once per process
        if detector == "cnn":
            detector_path: str | None = str(
                _model_path(cnn_detector_path, "cnn_detector_path", CNN_DETECTOR_FILE)
            )
        elif detector == "haar":
            detector_path = str(_haar_path(haar_cascade_path))
        else:
            detector_path = None
        self._model_key = (
            detector,
            detector_path,
            str(_model_path(shape_predictor_path, "shape_predictor_path", SHAPE_PREDICTOR_FILES[landmarks])),
            str(_model_path(recognition_model_path, "recognition_model_path", RECOGNITION_FILE)),
        )

    @property
    def models(self) -> FaceModels:
        return load_face_models(*self._model_key)

    def is_person(self, category: str) -> bool:
        return category.strip().lower() in self.person_categories

    def faces(self, image: Tensor, limit: int | None = None) -> tuple[list[Box], np.ndarray]:
        """Boxes of the ``limit`` largest faces in ``image`` ``[3, H, W]`` (largest first; None: all)
        and their ``[K, 128]`` descriptors."""
        pixels = to_uint8(image)
        boxes = self.models.detect(pixels, self.upsample, self.detection_threshold)[:limit]
        return boxes, self.models.embed(pixels, boxes, self.num_jitters, self.padding)

    def _score_sample(
        self, b: int, image: Tensor, inputs: RewardInputs, ref_cache: dict[int, Any]
    ) -> _Sample:
        people = [i for i, s in enumerate(inputs.subjects[b]) if self.is_person(s.category)]
        refs = inputs.references[b]
        if people and not refs:
            raise ValueError(
                f"FaceIdentityReward: sample {b} has person subjects "
                f"{[inputs.subjects[b][i].name for i in people]} but no references"
            )
        counted, ref_desc, no_face = [], [], 0
        for i in people:
            key = id(refs[i])
            if key not in ref_cache:  # a reference shared by a prompt group is embedded once
                boxes, desc = self.faces(refs[i], limit=1)
                ref_cache[key] = desc[0] if boxes else None
            if ref_cache[key] is None:
                if self.missing_reference == "error":
                    raise ValueError(
                        f"FaceIdentityReward: no face in the reference of subject {i + 1} "
                        f"({inputs.subjects[b][i].name!r}) of sample {b}; set missing_reference=skip to leave "
                        "such subjects out"
                    )
                no_face += 1
                continue
            counted.append(i)
            ref_desc.append(ref_cache[key])
        if not counted:
            return _Sample([], np.zeros(0), [], 0, no_face)
        _, gen_desc = self.faces(image, limit=self.max_faces)
        sim = (
            descriptor_similarity(np.stack(ref_desc), gen_desc, self.similarity, self.distance_threshold)
            if len(gen_desc)
            else np.zeros((len(counted), 0))
        )
        terms, face = identity_terms(
            sim, self.aggregation, cross_weight=self.cross_weight, missing_penalty=self.missing_penalty
        )
        matched = [float(sim[r, c]) for r, c in enumerate(face) if c >= 0]
        return _Sample(counted, terms, matched, len(gen_desc), no_face)

    @torch.no_grad()
    def __call__(self, images: Tensor, inputs: RewardInputs) -> dict[str, Tensor]:
        check_images(images, inputs, "FaceIdentityReward")
        batch = len(inputs)
        width = max([self.max_subjects, *inputs.num_subjects])
        nan = float("nan")
        keys = ("score", "faces", "persons", "matched", "missing", "ref_no_face", "matched_similarity")
        out = {k: torch.full((batch,), nan, dtype=torch.float64) for k in keys}
        subject = torch.full((batch, width), nan, dtype=torch.float64)
        ref_cache: dict[int, Any] = {}
        for b in range(batch):
            if not any(self.is_person(s.category) for s in inputs.subjects[b]):
                continue  # the reward does not apply: every value stays NaN
            sample = self._score_sample(b, images[b], inputs, ref_cache)
            out["ref_no_face"][b] = sample.ref_no_face
            out["persons"][b] = len(sample.subjects)
            if not sample.subjects:
                continue
            out["score"][b] = float(sample.terms.mean())
            out["faces"][b] = sample.faces
            out["matched"][b] = len(sample.matched)
            out["missing"][b] = len(sample.subjects) - len(sample.matched)
            if sample.matched:
                out["matched_similarity"][b] = float(np.mean(sample.matched))
            for i, term in zip(sample.subjects, sample.terms, strict=True):
                subject[b, i] = float(term)
        for i in range(width):
            out[f"subject_{i + 1}"] = subject[:, i]
        return {k: v.to(device=images.device, dtype=torch.float32) for k, v in out.items()}
