"""Config files and command-line overrides (ml_collections config_flags conventions).

A config file is a Python file with ``get_config(arg: str | None = None)`` returning a
ConfigDict; ``path.py:size=tiny,steps=3`` passes ``"size=tiny,steps=3"`` as ``arg``.
Overrides ``--config.a.b=value`` then change existing keys only, with the value
converted to the key's current type.

Example:
    >>> cfg = load_config("configs/feed_ranker.py:size=tiny")   # or "feed_ranker:size=tiny"
    >>> apply_overrides(cfg, {"train.steps": "5"}).train.steps
    5
"""

import ast
import importlib.util
import json
import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from lf_jax.errors import UserInputError


class ConfigError(UserInputError):
    """A config file, argument or override that cannot be applied."""


def parse_config_arg(arg: str | None, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Parses ``"k1=v1,k2=v2"`` against ``defaults``, converting to each default's type.

    Unknown keys and values of the wrong type raise ConfigError naming the key.
    """
    values = dict(defaults)
    if not arg:
        return values
    for item in arg.split(","):
        if "=" not in item:
            raise ConfigError(
                f"config argument '{item}' is not key=value (known keys: {sorted(defaults)})"
            )
        key, raw = (part.strip() for part in item.split("=", 1))
        if key not in defaults:
            raise ConfigError(f"unknown config argument '{key}' (known: {sorted(defaults)})")
        values[key] = convert_value(key, raw, defaults[key])
    return values


def convert_value(key: str, raw: str, current: Any) -> Any:
    """Converts the string ``raw`` to the type of ``current`` for config key ``key``."""

    def fail(kind: str) -> ConfigError:
        return ConfigError(f"config key '{key}' expects {kind}, got {raw!r}")

    if isinstance(current, bool):
        lowered = raw.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise fail("a bool (true/false)")
    if isinstance(current, int):
        try:
            return int(raw)
        except ValueError:
            raise fail("an int") from None
    if isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            raise fail("a float") from None
    if isinstance(current, str):
        return raw
    if isinstance(current, (tuple, list, dict)) or current is None:
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            if current is None:
                return raw
            raise fail(f"a Python {type(current).__name__} literal") from None
        if current is not None and not isinstance(value, type(current)):
            if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
                return type(current)(value)
            raise fail(f"a {type(current).__name__}")
        return value
    raise fail(f"a value of type {type(current).__name__} (not settable from the command line)")


PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def packaged_configs() -> list[str]:
    """Names of the configs shipped in lf_jax/configs (``feed_ranker``, ``demo``, ...)."""
    return sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.py") if not p.stem.startswith("_"))


def config_path(spec: str | Path) -> tuple[Path, str]:
    """(file, arg) of a config spec: ``path.py[:arg]`` is a file; a bare ``name[:arg]``
    (no ``.py``, no ``/``) is the packaged lf_jax/configs/<name>.py, so an installed
    package runs ``lf-jax plan --config feed_ranker:size=large`` from any directory."""
    text = str(spec)
    path_text, dot_py, arg = text.partition(".py:")
    if dot_py:
        return Path(path_text + ".py"), arg
    if text.endswith(".py") or "/" in text or os.sep in text:
        return Path(text), ""
    name, _, arg = text.partition(":")
    if name not in packaged_configs():
        raise ConfigError(
            f"config '{name}' is neither a file (FILE.py[:ARG]) nor a packaged config "
            f"(one of {packaged_configs()})"
        )
    return PACKAGED_CONFIGS / f"{name}.py", arg


def load_config(spec: str | Path) -> ml_collections.ConfigDict:
    """Loads ``path.py``, ``path.py:arg`` or a packaged ``name[:arg]`` and returns its
    locked ConfigDict."""
    path, arg = config_path(spec)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    module_name = f"lf_jax_config_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as error:
        raise ConfigError(f"config file '{path}' line {error.lineno}: {error.msg}") from None
    except Exception as error:  # the file's own code failed: its one-line reason
        raise ConfigError(f"config file '{path}' failed to load: {_reason(error, path)}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file '{path}' has no get_config(arg=None) function")
    try:
        config = module.get_config(arg or None) if arg else module.get_config()
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError(
            f"get_config({arg or None!r}) in '{path}' raised {_reason(error, path)}"
        ) from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(
            f"get_config() in '{path}' returned {type(config).__name__}, not a ConfigDict"
        )
    config.lock()
    return config


def _reason(error: BaseException, path: Path) -> str:
    """``Type: message`` on one line, with the line of ``path`` where it was raised."""
    lines = [
        frame.lineno
        for frame in traceback.extract_tb(error.__traceback__)
        if Path(frame.filename).resolve() == path.resolve()
    ]
    message = " ".join(str(error).split()) or "(no message)"
    return f"{type(error).__name__}: {message}" + (f" (line {lines[-1]})" if lines else "")


def load_workdir_config(
    workdir: str | Path,
    field: str = "--workdir",
    hint: str = "pass --config, or the workdir of a training run",
) -> ml_collections.ConfigDict:
    """The locked config a training run wrote to ``workdir/config.json`` (tuples come back
    as lists); ConfigError naming ``field``, its value and the file when the file is missing
    or not a JSON object.

    Example: ``load_workdir_config("runs/demo").train.steps``.
    """
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{field}='{workdir}' has no config.json ('{path}'): {hint}")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{field}='{workdir}': '{path}' is not valid JSON: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(
            f"{field}='{workdir}': '{path}' holds {type(values).__name__}, not a config object"
        )
    config = ml_collections.ConfigDict(values)
    config.lock()
    return config


# Keys sized from their section's ``steps``: when ``steps`` is overridden, the ones not
# overridden as well keep their share of the run (see scale_step_intervals).
STEP_DERIVED_KEYS = ("log_every", "eval_every", "checkpoint_every", "warmup_steps")


def scale_step_intervals(
    config: ml_collections.ConfigDict, overrides: Mapping[str, str], old_steps: Mapping[str, int]
) -> None:
    """Rescales the step-derived keys of each section whose ``steps`` was overridden.

    Rule: ``new = max(1, round(old * new_steps / old_steps))`` for each key of
    STEP_DERIVED_KEYS in the section that the overrides leave unset; 0 (e.g. eval_every=0,
    never evaluate) stays 0. ``old_steps`` maps a section ("train", "ranker.train", "" for the
    root) to its steps before the overrides. Example: feed_ranker tiny (800 steps, log every
    80, eval and checkpoint every 400, warm-up 40) with ``train.steps=100`` logs every 10,
    evaluates and checkpoints every 50 and warms up for 5 steps.
    """
    for section, before in old_steps.items():
        node = config
        for part in filter(None, section.split(".")):
            node = node[part]
        after = node["steps"]
        if not before or after == before:
            continue
        prefix = f"{section}." if section else ""
        for key in STEP_DERIVED_KEYS:
            value = node.get(key)
            if prefix + key in overrides or isinstance(value, bool) or not isinstance(value, int):
                continue
            if value:
                with node.unlocked():
                    node[key] = max(1, round(value * after / before))


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Mapping[str, str]
) -> ml_collections.ConfigDict:
    """Sets dotted keys from strings; unknown keys and bad values raise ConfigError.

    Overriding a section's ``steps`` also rescales its step-derived keys that are not
    overridden (scale_step_intervals)."""
    old_steps: dict[str, int] = {}
    for dotted in overrides:
        section, _, leaf = dotted.rpartition(".")
        if leaf == "steps":
            node = config
            for part in filter(None, section.split(".")):
                node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
            if isinstance(node, ml_collections.ConfigDict) and isinstance(node.get("steps"), int):
                old_steps[section] = node["steps"]
    for dotted, raw in overrides.items():
        parts = dotted.split(".")
        node = config
        for depth, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                parent = ".".join(parts[:depth]) or "<root>"
                known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                raise ConfigError(f"unknown config key '{dotted}' (keys under {parent}: {known})")
            if depth < len(parts) - 1:
                node = node[part]
        leaf = parts[-1]
        current = node[leaf]
        if isinstance(current, ml_collections.ConfigDict):
            if current.keys():
                raise ConfigError(
                    f"config key '{dotted}' is a section; set one of {sorted(current.keys())}"
                )
            value = _section_value(dotted, raw)  # a free-form section, e.g. embedding.plan
        else:
            value = convert_value(dotted, raw, current)
        with node.unlocked():
            node[leaf] = value
    scale_step_intervals(config, overrides, old_steps)
    return config


def _section_value(dotted: str, raw: str) -> ml_collections.ConfigDict:
    """A Python dict literal for an empty (free-form) section such as ``embedding.plan``."""
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = None
    if not isinstance(value, dict):
        raise ConfigError(
            f"config key '{dotted}' is a free-form section: give a Python dict "
            f'literal, e.g. \'{{"member": {{"strategy": "row_wise"}}}}\', got {raw!r}'
        )
    return ml_collections.ConfigDict(value)


def split_override_args(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Pulls ``--config.a.b=value`` / ``--config.a.b value`` out of ``argv``.

    Returns (overrides, remaining args).
    """
    overrides: dict[str, str] = {}
    rest: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config.") :].partition("=")
            if not eq:
                if index + 1 >= len(argv):
                    raise ConfigError(f"override '--config.{key}' has no value")
                index += 1
                value = argv[index]
            if not key:
                raise ConfigError(f"override '{arg}' names no key")
            overrides[key] = value
        else:
            rest.append(arg)
        index += 1
    return overrides, rest
