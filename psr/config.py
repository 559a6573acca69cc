"""What each primary config may hold, checked once, right after composition.

A key that the composed run does not read is an error, not a silent no-op: a typo
(``train.stepz=3``), a GRPO key under ``algo=dpo``, or a preset written for another primary all
fail before anything is built, with the full dotted path of every such key and the closest valid
one. Two kinds of node are checked:

* a node with ``_target_`` holds the parameters of that callable (``inspect.signature``); a
  callable taking ``**kwargs`` accepts any key, unless it lists its keys in a ``config_schema``
  attribute (a dataclass whose fields are the keys);
* a plain section (``train``, ``sampler``, ``optim``, ``dataset``, ``eval``, ...) holds the fields
  of its frozen dataclass in :mod:`psr.schema` (re-exported here): one per section per primary,
  with the YAML's defaults and types. :func:`settings` builds that typed object from the section, so
  a reader never indexes raw config.

The top-level dataclasses (:class:`RLConfig`, :class:`SFTConfig`, :class:`EvalConfig`,
:class:`DataConfig`) are the keys each primary reads; :data:`SCHEMAS` maps primary names to them.
:func:`compose` composes a primary as its console script does (``experiment=NAME`` included).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from psr.schema import (  # re-exported: readers build their section with settings(node, X, path)
    SCHEMAS,
    CropSettings,
    DataConfig,
    DatasetSettings,
    EditSettings,
    EvalConfig,
    EvalSettings,
    ExportSettings,
    FilterSettings,
    InstructSettings,
    LoaderSettings,
    LoraSettings,
    OptimSettings,
    PathSettings,
    PlanSettings,
    PromptsSettings,
    ReferencesSettings,
    ReportSettings,
    RewardServingSettings,
    RLConfig,
    RLTrainSettings,
    SamplerSettings,
    SettingsError,
    SFTConfig,
    SFTTrainSettings,
    ShardSettings,
    TargetSettings,
    ValidationSettings,
    check_schedule,
)

__all__ = [
    "CONF_DIR",
    "ConfigError",
    "CropSettings",
    "DataConfig",
    "DatasetSettings",
    "EditSettings",
    "EvalConfig",
    "EvalSettings",
    "ExportSettings",
    "FilterSettings",
    "InstructSettings",
    "LoaderSettings",
    "LoraSettings",
    "OptimSettings",
    "PRESET_PRIMARIES",
    "PathSettings",
    "PlanSettings",
    "PromptsSettings",
    "RLConfig",
    "RLTrainSettings",
    "ReferencesSettings",
    "ReportSettings",
    "RewardServingSettings",
    "SCHEMAS",
    "SFTConfig",
    "SFTTrainSettings",
    "SamplerSettings",
    "SettingsError",
    "ShardSettings",
    "TargetSettings",
    "ValidationSettings",
    "check_config",
    "check_schedule",
    "compose",
    "conf_dir",
    "expand_experiment",
    "settings",
]

CONF_DIR = os.environ.get("PSR_CONF_DIR", str(Path(__file__).resolve().parent.parent / "conf"))
PRESET_PRIMARIES = ("rl", "sft", "eval")  # primaries whose presets live in conf/experiment/<primary>/
HYDRA_KEYS = frozenset({"_target_", "_recursive_", "_convert_", "_partial_", "_args_"})

T = TypeVar("T")


class ConfigError(ValueError):
    """A composed config holds keys no reader takes, or values of the wrong type.

    Attributes:
        problems: one line per key, each starting with the key's full dotted path.
    """

    def __init__(self, header: str, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__(header + "\n  " + "\n  ".join(self.problems))


# --- Composition -------------------------------------------------------------------------------


def conf_dir(primary: str) -> Path:
    """The config directory of a primary: ``conf/`` (psr-data: its own ``conf/pipeline/``)."""
    return Path(CONF_DIR, "pipeline") if primary == "data" else Path(CONF_DIR)


def expand_experiment(primary: str, overrides: Sequence[str]) -> list[str]:
    """``experiment=NAME`` -> ``experiment/<primary>=NAME``: each primary picks from its own presets.

    The Hydra group of psr-rl's presets is ``experiment/rl`` (``conf/experiment/rl/NAME.yaml``),
    so ``psr-rl experiment=NAME`` with an SFT-only preset fails with Hydra's "Could not find
    'experiment/rl/NAME'" and the list of psr-rl's presets. psr-data's presets are an ordinary
    ``experiment`` group of its own config directory and pass through unchanged.
    """
    if primary not in PRESET_PRIMARIES:
        return list(overrides)
    return [
        f"experiment/{primary}=" + a.split("=", 1)[1] if a.startswith("experiment=") else a for a in overrides
    ]


def compose(
    primary: str,
    overrides: Sequence[str] = (),
    config_dir: str | os.PathLike | None = None,
    return_hydra_config: bool = False,
) -> Any:
    """Compose a primary as its console script does (``experiment=NAME`` included), outside a run.

    Args:
        primary: ``rl`` | ``sft`` | ``eval`` | ``data``.
        overrides: command-line style ``key=value`` overrides.
        config_dir: the config directory; default :func:`conf_dir` (``PSR_CONF_DIR`` or the checkout's).
        return_hydra_config: keep the ``hydra`` node (run dir, choices).

    Returns:
        The composed DictConfig (not checked: call :func:`check_config`).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    directory = Path(config_dir) if config_dir is not None else conf_dir(primary)
    with initialize_config_dir(config_dir=str(directory.resolve()), version_base="1.3"):
        return hydra_compose(
            primary, overrides=expand_experiment(primary, overrides), return_hydra_config=return_hydra_config
        )


# --- Checking ----------------------------------------------------------------------------------


def check_config(cfg: Any, primary: str) -> None:
    """Raise :class:`ConfigError` listing every key of ``cfg`` that ``psr-<primary>`` does not read.

    Values that are interpolations or ``???`` are not type-checked here (they resolve later).

    Args:
        cfg: the composed config (DictConfig or plain mapping); a ``hydra`` node is ignored.
        primary: ``rl`` | ``sft`` | ``eval`` | ``data``.
    """
    from omegaconf import OmegaConf

    if primary not in SCHEMAS:
        raise ValueError(f"unknown primary {primary!r}; expected one of {sorted(SCHEMAS)}")
    container = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else cfg
    data = {str(k): v for k, v in dict(container).items() if k != "hydra"}  # type: ignore[arg-type]
    problems: list[str] = []
    _check_section(data, SCHEMAS[primary], "", problems, primary)
    if problems:
        raise ConfigError(
            f"psr-{primary}: {len(problems)} config key(s) that this run does not read, of the wrong type or "
            "out of range:",
            problems,
        )


def settings(node: Any, cls: type[T], path: str) -> T:
    """Build the typed settings object of one plain section, e.g. ``settings(cfg.train, RLTrainSettings, "train")``.

    Args:
        node: the section (DictConfig or mapping); interpolations are resolved, except inside
            ``_target_`` fields (kept as plain, unresolved containers: the code that builds them
            reads the config itself).
        cls: its frozen dataclass from this module.
        path: the section's dotted path, for error messages.

    Returns:
        ``cls`` with the section's values (lists become tuples; absent keys take the defaults).

    Raises:
        ConfigError: a key ``cls`` has no field for, a value of the wrong type, or one out of its
            range (the dataclass's ``__post_init__``), every one by its full path, all at once.
        omegaconf.errors.MissingMandatoryValue: a ``???`` value, naming its key.
    """
    from omegaconf import OmegaConf

    if OmegaConf.is_config(node):
        targets = {f.name for f in dataclasses.fields(cls) if f.metadata.get("target")}  # type: ignore[arg-type]
        data: Any = {
            str(k): OmegaConf.to_container(node[k], resolve=False)
            if k in targets and OmegaConf.is_config(node[k])
            else _plain(node[k])
            for k in node
        }
    else:
        data = node
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping", [f"{path}={data!r}"])
    section = {str(k): v for k, v in data.items()}
    problems: list[str] = []
    _check_section(section, cls, path, problems, None)
    built = None if problems else _build(section, cls, path, problems)
    if problems or built is None:
        raise ConfigError(f"{path}: settings of the wrong type or out of range:", problems)
    return built


def _plain(value: Any) -> Any:
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True, throw_on_missing=True)
    return value


def _build(data: Mapping[str, Any], cls: type[T], path: str, problems: list[str]) -> T | None:
    """``cls`` from type-checked values; None (and lines in ``problems``) when a range check fails.

    A section's own checks run even when a subsection's fail (that one is replaced by its
    defaults), so every bad value of the run is listed at once.
    """
    hints = typing.get_type_hints(cls)
    values = {}
    failed = False
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            value = _build(value, hint, _join(path, key), problems)  # type: ignore[arg-type]
            if value is None:
                failed, value = True, hint()  # type: ignore[operator]
        elif isinstance(value, list) and _accepts_tuple(hint):
            value = tuple(value)
        values[key] = value
    try:
        built = cls(**values)
    except SettingsError as err:
        problems.extend(_join(path, p) for p in err.problems)
        return None
    return None if failed else built


def _concrete(node: Mapping[str, Any], cls: type) -> bool:
    """No interpolation or ``???`` among the plain values of a section (they resolve when read)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in node.items():
        if key not in fields or fields[key].metadata.get("target"):
            continue
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, Mapping):
            if not _concrete(value, hints[key]):  # type: ignore[arg-type]
                return False
        elif _deferred(value) or (isinstance(value, list) and any(_deferred(v) for v in value)):
            return False
    return True


def _accepts_tuple(hint: Any) -> bool:
    return any(typing.get_origin(h) is tuple for h in _union_members(hint))


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _unknown(path: str, key: str, valid: Sequence[str], primary: str | None, owner: str) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    line = f"{path}: not a key of {owner}"
    if close:
        line += f" (did you mean {_join(path.rsplit('.', 1)[0] if '.' in path else '', close[0])}?)"
    if primary is not None and "." not in path:
        readers = [p for p, schema in SCHEMAS.items() if p != primary and key in _field_names(schema)]
        if readers:
            line += f"; read by {', '.join('psr-' + p for p in readers)}, not psr-{primary}"
        if key == "local":
            line += "; conf/local/default.yaml must start with '# @package _global_'"
    return line


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _deferred(value: Any) -> bool:
    """An interpolation or a mandatory ``???``: resolved (and type-checked) when read."""
    return isinstance(value, str) and (value == "???" or "${" in value)


def _check_section(
    node: Mapping[str, Any], cls: type, path: str, problems: list[str], primary: str | None
) -> None:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    owner = f"psr-{primary}" if primary is not None and not path else f"{path} ({cls.__name__})"
    for key, value in node.items():
        key_path = _join(path, key)
        if key not in fields:
            problems.append(_unknown(key_path, str(key), list(fields), primary, owner))
            continue
        kind = fields[key].metadata.get("target")
        if kind is not None:
            if isinstance(value, Mapping) and "_target_" in value:
                _check_target(value, key_path, problems)
            elif not (value is None and kind == "optional") and not _deferred(value):
                problems.append(f"{key_path}: expected a node with _target_, got {value!r}")
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if isinstance(value, Mapping):
                before = len(problems)
                _check_section(value, hint, key_path, problems, None)  # type: ignore[arg-type]
                if primary is not None and len(problems) == before and _concrete(value, hint):  # type: ignore[arg-type]
                    _build(value, hint, key_path, problems)  # type: ignore[arg-type]  # the range checks
            elif not _deferred(value):
                problems.append(f"{key_path}: expected a mapping ({_type_name(hint)}), got {value!r}")
            continue
        if not _deferred(value) and not _matches(value, hint):
            problems.append(f"{key_path}={value!r}: expected {_type_name(hint)}")
        _check_nested_targets(value, key_path, problems)


def _check_nested_targets(value: Any, path: str, problems: list[str]) -> None:
    """Check every ``_target_`` node inside a value a schema or a callable takes as a whole."""
    if isinstance(value, Mapping):
        if "_target_" in value:
            _check_target(value, path, problems)
        else:
            for key, item in value.items():
                _check_nested_targets(item, _join(path, key), problems)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_nested_targets(item, _join(path, i), problems)


def _check_target(node: Mapping[str, Any], path: str, problems: list[str]) -> None:
    name = node["_target_"]
    if _deferred(name):
        return
    try:
        from hydra.utils import get_object

        obj = get_object(name)
    except Exception as err:  # noqa: BLE001 - any import failure is reported with the key that caused it
        problems.append(f"{path}._target_={name}: cannot be imported ({type(err).__name__}: {err})")
        return
    accepted = _parameters(obj)
    hints = _parameter_hints(obj)
    for key, value in node.items():
        if key in HYDRA_KEYS:
            continue
        key_path = _join(path, key)
        if accepted is not None and key not in accepted:
            problems.append(_unknown(key_path, str(key), accepted, None, name))
            continue
        hint = hints.get(str(key))
        if (
            hint is not None
            and _scalar_hint(hint)
            and not isinstance(value, (Mapping, list))
            and not _deferred(value)
            and not _matches(value, hint)
        ):
            # e.g. algo.clip_eps=abc: named here, not as a bare "could not convert" from the callable
            problems.append(f"{key_path}={value!r}: expected {_type_name(hint)}")
        _check_nested_targets(value, key_path, problems)


def _parameter_hints(obj: Any) -> dict[str, Any]:
    """The annotated types of a ``_target_``'s parameters ({} where they cannot be resolved)."""
    schema = getattr(obj, "config_schema", None)
    func = schema if schema is not None and dataclasses.is_dataclass(schema) else obj
    if inspect.isclass(func) and not dataclasses.is_dataclass(func):
        func = func.__init__
    try:
        return typing.get_type_hints(func)
    except Exception:  # noqa: BLE001 - names only importable for type checkers: no types to check against
        return {}


def _scalar_hint(hint: Any) -> bool:
    """A type :func:`_matches` checks exactly: int, float, str, bool, None, a Literal, unions of them."""
    if hint in (int, float, str, bool, type(None)):
        return True
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return True
    if origin in (typing.Union, types.UnionType):
        return all(_scalar_hint(h) for h in typing.get_args(hint))
    return False


def _parameters(obj: Any) -> list[str] | None:
    """The keyword parameters a ``_target_`` takes; None when it takes any (``**kwargs``)."""
    schema = getattr(obj, "config_schema", None)
    if schema is not None and dataclasses.is_dataclass(schema):
        return _field_names(schema)  # type: ignore[arg-type]
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check against
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in keyword]


def _union_members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _matches(value: Any, hint: Any) -> bool:
    """Whether a plain YAML value fits a schema type (ints pass for floats; bools are not ints)."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, member) for member in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args, strict=True))
    if origin is dict:
        key_type, value_type = typing.get_args(hint) or (Any, Any)
        return isinstance(value, Mapping) and all(
            _matches(k, key_type) and (_deferred(v) or _matches(v, value_type)) for k, v in value.items()
        )
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
