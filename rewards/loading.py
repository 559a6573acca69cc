"""Offline weight loading with errors that say which config key to set and which files were expected.

Every real reward model loads from ``path``: a local directory (or file), or a Hugging Face model id
whose files are already in the local cache. Nothing is downloaded (``local_files_only=True``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "WeightsNotFoundError",
    "weights_error",
    "hf_from_pretrained",
    "load_state_dict_file",
    "require_path",
]


class WeightsNotFoundError(FileNotFoundError):
    """A reward model's weights are not where its config says; the message names the key and files."""


def weights_error(
    owner: str, key: str, path: Any, expected: str, cause: BaseException | None = None, *, hub: bool = True
) -> WeightsNotFoundError:
    """The error every loader raises: which config key to set, what was expected there, and why."""
    msg = f"{owner}: cannot load weights from {key}={path!r}. Expected {expected}. Nothing is downloaded: set {key} to "
    msg += (
        "a local directory, or a Hugging Face model id whose files are already in the cache (HF_HOME / HF_HUB_CACHE)"
        if hub
        else "a local file or directory"
    )
    if cause is not None:
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        msg += f". Cause: {type(cause).__name__}: {first[:300]}"
    return WeightsNotFoundError(msg)


def require_path(path: Any, owner: str, key: str, expected: str) -> str:
    """``path`` as an expanded string; a clear error when it is unset (``None``, ``???``, empty)."""
    if path is None or str(path).strip() in ("", "???"):
        raise weights_error(owner, key, path, expected)
    return os.path.expanduser(str(path))


def hf_from_pretrained(cls: Any, path: Any, *, owner: str, key: str, expected: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(path, local_files_only=True, **kwargs)`` with a :class:`WeightsNotFoundError`
    naming ``key`` and ``expected`` when the files are not there."""
    p = require_path(path, owner, key, expected)
    if p.startswith(("/", ".", "~")) and not Path(p).exists():
        raise weights_error(owner, key, path, expected, FileNotFoundError(f"{p} does not exist"))
    try:
        return cls.from_pretrained(p, local_files_only=True, **kwargs)
    except (
        OSError,
        ValueError,
    ) as err:  # missing files (OSError) or a path read as a bad hub id (ValueError)
        raise weights_error(owner, key, path, expected, err) from err


def load_state_dict_file(path: Any, *, owner: str, key: str, candidates: Sequence[str]) -> dict[str, Tensor]:
    """A state dict from a ``.safetensors`` or torch pickle file (``weights_only=True``), or from the
    first of ``candidates`` inside a directory. A ``{"state_dict": ...}`` or ``{"model": ...}``
    wrapper is unwrapped."""
    expected = f"a checkpoint file or a directory containing one of {list(candidates)}"
    p = Path(require_path(path, owner, key, expected))
    if p.is_dir():
        found = [p / c for c in candidates if (p / c).is_file()]
        if not found:
            raise weights_error(
                owner, key, path, expected, FileNotFoundError(f"none of {list(candidates)} in {p}"), hub=False
            )
        p = found[0]
    if not p.is_file():
        raise weights_error(owner, key, path, expected, FileNotFoundError(f"{p} does not exist"), hub=False)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise weights_error(owner, key, path, expected, err, hub=False) from err
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise weights_error(
            owner, key, path, expected, ValueError(f"{p} does not hold a state dict of tensors"), hub=False
        )
    return state
